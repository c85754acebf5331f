"""zwrm-control and zwrm-agent options: TOML + flags, readable errors."""

import os

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from zwrm.agent import capacity
from zwrm.agent.tap import Options as AgentOptions
from zwrm.control.tap import Options
from zwrm.testing.processes import temp_dir


class ControlOptionsTests(SynchronousTestCase):
    def write(self, text):
        path = os.path.join(temp_dir(self), "control.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def parse(self, *argv):
        o = Options()
        o.parseOptions(list(argv))
        return o.config

    def test_file_then_flags(self):
        path = self.write(
            '[control]\nlisten = "tcp:9000:interface=127.0.0.1"\ndata_dir = "/tmp/d"\n'
            "[health]\ncheck_interval = 15\noffline_after = 30\n[scheduler]\nstrategy = \"pack\"\n"
        )
        c = self.parse("--config", path)
        self.assertEqual((c.listen, c.data_dir, c.check_interval, c.offline_after, c.strategy),
                         (["tcp:9000:interface=127.0.0.1"], "/tmp/d", 15.0, 30.0, "pack"))
        c = self.parse("--config", path, "--offline-after", "7", "--listen",
                       "tcp:1:interface=127.0.0.1", "--strategy", "spread")
        self.assertEqual((c.offline_after, c.listen, c.strategy),
                         (7.0, ["tcp:1:interface=127.0.0.1"], "spread"))

    def test_healing_settings(self):
        path = self.write("[health]\nreschedule_after = 0\npartition_threshold = 0.7\n"
                          "eviction_interval = 20\n")
        c = self.parse("--config", path)
        self.assertEqual((c.reschedule_after, c.partition_threshold, c.eviction_interval),
                         (0.0, 0.7, 20.0))
        c = self.parse("--config", path, "--reschedule-after", "30")
        self.assertEqual(c.reschedule_after, 30.0)

    def test_min_free_disk(self):
        self.assertEqual(self.parse().min_free_disk_mb, 256.0)
        c = self.parse("--config", self.write("[health]\nmin_free_disk_mb = 1024\n"))
        self.assertEqual(c.min_free_disk_mb, 1024.0)
        self.assertEqual(self.parse("--min-free-disk-mb", "0").min_free_disk_mb, 0.0)  # never

    def test_host_certificate_lifetime(self):
        self.assertEqual(self.parse().host_certificate_lifetime, 365 * 86400.0)
        c = self.parse("--config", self.write("[pki]\nhost_certificate_lifetime = 7776000\n"))
        self.assertEqual(c.host_certificate_lifetime, 7776000.0)
        self.assertEqual(self.parse("--host-certificate-lifetime", "60").host_certificate_lifetime,
                         60.0)

    def test_defaults(self):
        c = self.parse()
        self.assertEqual((c.check_interval, c.offline_after, c.grace), (15.0, 30.0, None))
        self.assertEqual(c.listen, ["tcp:8080:interface=127.0.0.1"])

    def test_readable_errors(self):
        cases = [
            (["--config", "/nonexistent.toml"], "does not exist"),
            (["--config", self.write("[health\n")], "not valid TOML"),
            (["--config", self.write("[health]\nofline_after = 3\n")], "unknown setting"),
            (["--config", self.write('[health]\noffline_after = "soon"\n')], "must be a number"),
            (["--check-interval", "-1"], "must be positive"),
            # (TOML and float() take nan and inf: a monitor's timer took them)
            (["--check-interval", "nan"], "--check-interval must be a number, not nan"),
            (["--config", self.write("[health]\noffline_after = inf\n")],
             "offline_after must be a number, not inf"),
            (["--reschedule-after", "inf"], "must be a number, not inf"),
            (["--strategy", "nope"], "unknown placement strategy 'nope'; available: pack, spread"),
            (["--listen", "tcp:8080"], "not on loopback"),
            (["--listen", "udp:1"], "use tcp:, ssl: or unix:"),
            (["--gc-policy", "never"], "[gc] policy must be one of freeze, python, not 'never'"),
            (["--config", self.write("[gc]\ngrowth = 0\n")], "must be positive"),
            (["--partition-threshold", "1.5"], "partition_threshold must be a fraction"),
            (["--eviction-interval", "0"], "must be positive"),
            (["--reschedule-after", "-1"], "must not be negative"),
            (["--min-free-disk-mb", "-1"], "must not be negative"),
            (["--min-free-disk-mb", "lots"], "must be a number"),
            (["--host-certificate-lifetime", "5"],
             "[pki] host_certificate_lifetime must be at least 10 seconds, not 5"),
        ]
        for argv, text in cases:
            e = self.assertRaises(usage.UsageError, self.parse, *argv)
            self.assertIn(text, str(e), argv)
            self.assertEqual(len(str(e).splitlines()), 1)

    def test_gc_policy(self):
        """
        The garbage-collection policy: C{freeze} by default, set up by makeService as a
        child service of the control plane; C{python} leaves the collector alone.
        """
        from zwrm.control.tap import makeService
        from zwrm.gcpolicy import CollectionPolicy

        c = self.parse()
        self.assertEqual((c.gc_policy, c.gc_interval, c.gc_churn, c.gc_growth),
                         ("freeze", 5.0, 0.25, 1.0))
        c = self.parse("--config", self.write('[gc]\npolicy = "python"\ninterval = 2\n'
                                              "growth = 0.5\nchurn = 0.1\n"))
        self.assertEqual((c.gc_policy, c.gc_interval, c.gc_churn, c.gc_growth),
                         ("python", 2.0, 0.1, 0.5))
        c = self.parse("--gc-interval", "3", "--gc-churn", "0.5", "--gc-growth", "2")
        self.assertEqual((c.gc_interval, c.gc_churn, c.gc_growth), (3.0, 0.5, 2.0))
        o = Options()
        o.parseOptions(["--data-dir", temp_dir(self)])
        plane = makeService(o)
        self.assertIsInstance(plane.gc_policy, CollectionPolicy)
        self.assertIn(plane.gc_policy, list(plane))
        p = plane.gc_policy
        self.assertEqual((p.interval, p.churn, p.growth), (5.0, 0.25, 1.0))
        o = Options()
        o.parseOptions(["--data-dir", temp_dir(self), "--gc-policy", "python"])
        self.assertIsNone(makeService(o).gc_policy)

    def test_plain_beyond_loopback_when_allowed(self):
        c = self.parse("--listen", "tcp:8080", "--insecure-listen")
        self.assertEqual(c.listen, ["tcp:8080"])
        self.parse("--listen", "ssl:8443:privateKey=k.pem:certKey=c.pem")


class AgentOptionsTests(SynchronousTestCase):
    def parse(self, *argv):
        o = AgentOptions()
        o.parseOptions(list(argv))
        return o.config

    def test_flags(self):
        c = self.parse("--control-plane-url", "ws://127.0.0.1:8080/ws", "--region", "eu",
                       "--datacenter", "dc1", "--label", "a=b",
                       "--vcpus", "4", "--memory-mb", "1024")
        self.assertEqual((c.region, c.datacenter, c.labels, c.vcpus, c.memory_mb),
                         ("eu", "dc1", {"a": "b"}, 4, 1024))

    def test_toml(self):
        path = os.path.join(temp_dir(self), "agent.toml")
        with open(path, "w") as f:
            f.write('[agent]\ncontrol_plane_url = "wss://cp.example.com:8443/ws"\n'
                    'region = "eu"\nlabels = {disk = "ssd"}\n')
        c = self.parse("--config", path, "--region", "us")
        self.assertEqual((c.url, c.region, c.labels), ("wss://cp.example.com:8443/ws", "us",
                                                       {"disk": "ssd"}))

    def test_errors(self):
        cases = [
            ([], "--control-plane-url is required"),
            (["--control-plane-url", "http://x/"], "bad --control-plane-url"),
            (["--control-plane-url", "ws://cp.example.com/ws"], "beyond loopback"),
            (["--control-plane-url", "ws://127.0.0.1/ws", "--vcpus", "many"], "non-negative"),
            (["--control-plane-url", "ws://127.0.0.1/ws", "--label", "novalue"], "key=value"),
            (["--control-plane-url", "wss://x/ws", "--ca-file", "/nonexistent"], "does not exist"),
        ]
        for argv, text in cases:
            e = self.assertRaises(usage.UsageError, self.parse, *argv)
            self.assertIn(text, str(e), argv)

    def test_capacity(self):
        found = capacity.detect("/")
        self.assertGreater(found["vcpus"], 0)
        self.assertGreater(found["memory_mb"], 0)
        self.assertGreater(found["disk_mb"], 0)
        self.assertEqual(capacity.detect("/", vcpus=3, memory_mb=5, disk=7),
                         {"vcpus": 3, "memory_mb": 5, "disk_mb": 7})
        self.assertEqual(capacity.meminfo_mb("/nonexistent"), 0)
