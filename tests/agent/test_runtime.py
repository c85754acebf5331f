"""The agent's volume endpoint option and the address it advertises to other agents."""

import os
import tempfile

from twisted.internet import reactor
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from zwrm.agent.runtime import HostRuntime, _advertised
from zwrm.agent.tap import Options


class _Port:
    def __init__(self, host):
        self.host = host

    def getHost(self):
        return self


class VolumeEndpointTests(SynchronousTestCase):
    def options(self, *extra):
        o = Options()
        o.parseOptions(["--control-plane-url", "ws://127.0.0.1:9/ws", *extra])
        return o.config

    def test_default_is_loopback(self):
        self.assertEqual(self.options().volume_endpoint, "tcp:0:interface=127.0.0.1")

    def test_configured(self):
        c = self.options("--volume-endpoint", "tcp:7443:interface=0.0.0.0", "--address", "10.1.2.3")
        self.assertEqual(c.volume_endpoint, "tcp:7443:interface=0.0.0.0")

    def test_bad_endpoints_are_usage_errors(self):
        for bad in ("unix:/tmp/x", "tcp:notaport", "ssl:7443"):
            self.assertRaises(usage.UsageError, self.options, "--volume-endpoint", bad)

    def test_cpu_model_and_machine_type(self):
        c = self.options()
        self.assertEqual((c.cpu_model, c.machine_type), (None, None))
        c = self.options("--cpu-model", "x86-64-v2-AES", "--machine-type", "pc-i440fx-7.2")
        self.assertEqual((c.cpu_model, c.machine_type), ("x86-64-v2-AES", "pc-i440fx-7.2"))
        for flag in ("--cpu-model", "--machine-type"):
            with self.assertRaises(usage.UsageError) as cm:
                self.options(flag, "qemu64,+vmx")
            self.assertIn(flag[2:].replace("-", "_"), str(cm.exception))

    def test_cpu_model_and_machine_type_in_the_config_file(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "agent.toml")
            with open(path, "w") as f:
                f.write('[agent]\ncpu_model = "Haswell-noTSX"\nmachine_type = "pc-q35-7.2"\n')
            c = self.options("--config", path)
        self.assertEqual((c.cpu_model, c.machine_type), ("Haswell-noTSX", "pc-q35-7.2"))

    def test_facts_the_control_plane_refuses_are_refused_at_the_start(self):
        """
        A region, datacenter, name or label the control plane's join refuses: a usage error
        when the agent starts (the unit fails, saying why), not a warning at each attempt.
        """
        c = self.options("--region", "eu-central", "--datacenter", "dc.1", "--label",
                         "disk=ssd", "--name", "web-1")
        self.assertEqual((c.region, c.datacenter, c.labels), ("eu-central", "dc.1",
                                                              {"disk": "ssd"}))
        for flags, said in [
            (("--region", "eu central"), "region must be at most 63 characters of A-Z a-z 0-9"
                                         " . _ -, not 'eu central'"),
            (("--datacenter", "d" * 64), "datacenter must be at most 63 characters"),
            (("--label", "disk type=ssd"), "label key must be 1-63 characters of A-Z a-z 0-9"
                                           " . _ / -, not 'disk type'"),
            (("--label", "disk=" + "s" * 256), "label disk: its value must be text of at"
                                                " most 255 characters"),
            (("--name", "n" * 254), "name must be text of at most 253 characters"),
        ]:
            with self.assertRaises(usage.UsageError) as cm:
                self.options(*flags)
            self.assertTrue(str(cm.exception).startswith(said), (flags, str(cm.exception)))
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "agent.toml")
            with open(path, "w") as f:
                f.write('[agent]\nregion = "us/east"\n')
            with self.assertRaises(usage.UsageError) as cm:
                self.options("--config", path)
            self.assertIn("region must be", str(cm.exception))

    def test_retry_delays_are_finite(self):
        self.assertEqual(self.options("--retry-max", "30").retry_max, 30.0)
        for bad in ("nan", "inf", "0", "-1"):
            with self.assertRaises(usage.UsageError) as cm:
                self.options("--retry-max", bad)
            self.assertEqual(str(cm.exception), "retry_max must be a positive number")

    def test_ingress_keepalive_timeout(self):
        self.assertEqual(self.options().ingress_keepalive_timeout, 75.0)
        c = self.options("--ingress-keepalive-timeout", "5.5")
        self.assertEqual(c.ingress_keepalive_timeout, 5.5)
        for bad in ("0", "-1", "soon", "inf"):
            with self.assertRaises(usage.UsageError) as cm:
                self.options("--ingress-keepalive-timeout", bad)
            self.assertIn("ingress_keepalive_timeout", str(cm.exception))
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "agent.toml")
            with open(path, "w") as f:
                f.write("[agent]\ningress_keepalive_timeout = 30\n")
            self.assertEqual(self.options("--config", path).ingress_keepalive_timeout, 30.0)

    def test_the_agents_network_gets_the_keepalive_timeout(self):
        from zwrm.agent.runtime import _network

        with tempfile.TemporaryDirectory() as d:
            c = self.options("--network", "bridge", "--address", "10.1.2.3", "--data-dir", d,
                             "--ingress-keepalive-timeout", "9")
            net = _network(reactor, "h-1", c)
        self.assertEqual(net.ingress.keepalive_timeout, 9.0)

    def test_the_driver_gets_them(self):
        # HostRuntime passes them to the driver, whose live.facts reports them.
        with tempfile.TemporaryDirectory() as d:
            c = self.options("--data-dir", d, "--accel", "tcg", "--cpu-model", "Haswell-noTSX",
                             "--machine-type", "pc-q35-7.2")
            rt = HostRuntime(reactor, c)
            facts = rt.driver.migration_facts()
        self.assertEqual((facts["cpu_model"], facts["machine_type"], facts["live"]),
                         ("Haswell-noTSX", "pc-q35-7.2", True))

    def test_heartbeats_carry_the_free_disk(self):
        # What the control plane's placement needs to leave a full data disk alone.
        with tempfile.TemporaryDirectory() as d:
            rt = HostRuntime(reactor, self.options("--data-dir", d, "--accel", "tcg"))
            st = os.statvfs(d)
            self.assertAlmostEqual(rt.stats()["disk_free_mb"],
                                   st.f_bavail * st.f_frsize // (1024 * 1024), delta=64)
            rt.config.data_dir = os.path.join(d, "gone")
            self.assertNotIn("disk_free_mb", rt.stats())

    def test_advertised_address(self):
        self.assertEqual(_advertised("tcp:0:interface=10.0.0.5", _Port("10.0.0.5")), "10.0.0.5")
        self.assertEqual(
            _advertised("tcp:7443:interface=0.0.0.0", _Port("0.0.0.0"), "10.1.2.3"), "10.1.2.3")
        self.assertEqual(_advertised("tcp:7443", _Port("0.0.0.0")), "127.0.0.1")
