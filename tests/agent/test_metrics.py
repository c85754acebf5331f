"""
An agent's C{/metrics} (L{zwrm.agent.metrics}): served on the endpoint C{--metrics-listen}
names (nowhere by default), Prometheus text that a Prometheus parser reads with HELP and
TYPE for every family; over real sockets, with a real control plane in the process; and,
with QEMU, a running machine's CPU and disk counters that grow.
"""

import math
import os
import shutil
import tempfile

import pytest
import treq
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm import pki
from zwrm.agent.metrics import AgentMetrics, _Families
from zwrm.agent.service import AgentService
from zwrm.agent.tap import AgentConfig, Options
from zwrm.testing.processes import poll

MiB = 1024 * 1024


def parse(text):
    """
    Parse Prometheus text; every family must have a HELP and a TYPE line.

    @return: C{{(sample name, ((label, value), ...)): value}} and the families by name.
    """
    samples, families = {}, {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"family {family.name} has no HELP line"
        assert family.type != "unknown", f"family {family.name} has no TYPE line"
        families[family.name] = family
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    # the parser invents nothing: each HELP and TYPE line is in the text itself
    for family in families.values():
        names = {family.name, family.name + "_total"} if family.type == "counter" else {family.name}
        assert any(f"# HELP {n} " in text for n in names), family.name
        assert any(f"# TYPE {n} {family.type}" in text for n in names), family.name
    return samples, families


def d(f):
    def wrapper(self):
        return ensureDeferred(f(self))

    wrapper.__name__ = f.__name__
    return wrapper


class OptionTests(SynchronousTestCase):
    def options(self, *extra):
        o = Options()
        o.parseOptions(["--control-plane-url", "ws://127.0.0.1:9/ws", *extra])
        return o.config

    def test_off_by_default(self):
        self.assertIsNone(self.options().metrics_listen)

    def test_configured(self):
        c = self.options("--metrics-listen", "tcp:9464:interface=127.0.0.1")
        self.assertEqual(c.metrics_listen, "tcp:9464:interface=127.0.0.1")

    def test_bad_endpoint(self):
        e = self.assertRaises(usage.UsageError, self.options, "--metrics-listen", "tcp:notaport")
        self.assertIn("metrics_listen", str(e))


class AgentMetricsTests(TestCase):
    timeout = 60

    @d
    async def test_served_and_parsed(self):
        from tests.agent.test_membership import start_host_agent, start_plane

        plane, tmp = await start_plane(self)
        agent = await start_host_agent(self, plane, os.path.join(tmp, "a1"), image_cache_mb=7,
                                       metrics_listen="tcp:0:interface=127.0.0.1",
                                       fence_after=30)
        await poll(reactor, lambda: agent.heartbeats_sent >= 1 and agent.metrics_port, 20, 0.05,
                   what="a heartbeat and the metrics port")
        await agent.runtime.volumes.create("v1", 16)
        snap = await agent.runtime.volumes.snapshot("v1", "s1")
        address = agent.metrics_port.getHost()
        self.assertEqual(address.host, "127.0.0.1")

        r = await treq.get(f"http://127.0.0.1:{address.port}/metrics", persistent=False)
        self.assertEqual(r.code, 200)
        self.assertTrue(r.headers.getRawHeaders("content-type")[0].startswith("text/plain"))
        samples, families = parse(await r.text())

        host = agent.identity.host_id
        self.assertEqual(samples[("zwrm_agent_info", (("host_id", host), ("name", "a1")))], 1)
        self.assertEqual(samples[("zwrm_agent_registered", ())], 1)
        self.assertGreaterEqual(samples[("zwrm_agent_heartbeats_total", ())], 1)
        self.assertEqual(samples[("zwrm_agent_host_certificate_expiry_timestamp_seconds", ())],
                         pki.HostCredentials.load(agent.tls_dir).not_valid_after.timestamp())
        self.assertEqual(samples[("zwrm_agent_fence_after_seconds", ())], 30)
        self.assertEqual(samples[("zwrm_agent_fenced_machines_total", ())], 0)
        rtt = samples[("zwrm_agent_heartbeat_rtt_seconds", ())]
        self.assertTrue(0 < rtt < 10, rtt)
        self.assertEqual(samples[("zwrm_volume_size_bytes", (("volume", "v1"),))], 16 * MiB)
        self.assertGreater(samples[("zwrm_volume_allocated_bytes", (("volume", "v1"),))], 0)
        self.assertEqual(samples[("zwrm_volume_snapshots", (("volume", "v1"),))], 1)
        self.assertEqual(samples[("zwrm_volume_snapshot_allocated_bytes", (("volume", "v1"),))],
                         snap["allocated_bytes"])
        self.assertEqual(samples[("zwrm_image_cache_limit_bytes", ())], 7 * MiB)
        self.assertEqual(families["zwrm_image_cache_hits"].type, "counter")
        self.assertEqual(samples[("zwrm_volume_transfer_sent_bytes_total", ())], 0)
        for name in ("zwrm_machine_cpu_seconds", "zwrm_machine_disk_read_bytes",
                     "zwrm_machine_network_receive_bytes"):
            self.assertIn(name, families)  # described even with no machine

        # only /metrics is served
        r = await treq.get(f"http://127.0.0.1:{address.port}/", persistent=False)
        self.assertEqual(r.code, 404)
        await r.content()

    @d
    async def test_not_served_unless_configured(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        config = AgentConfig(url="ws://127.0.0.1:9/ws", data_dir=tmp, retry_initial=5, retry_max=5)
        agent = AgentService(reactor, config)
        agent.startService()
        self.addCleanup(agent.stopService)
        self.assertIsNone(agent.metrics_port)
        self.assertFalse(hasattr(agent, "_metrics_listening"))


class _Agent:
    """What L{AgentMetrics} reads of an agent service, around a real driver and store."""

    def __init__(self, driver, volumes):
        self.identity = type("I", (), {"host_id": "h1"})()
        self.config = AgentConfig(url="ws://127.0.0.1:9/ws", name="a1")
        self.state = "registered"
        self.heartbeat_rtt = None
        self.heartbeats_sent = 0
        self.runtime = type("R", (), {"driver": driver, "volumes": volumes, "cache": None,
                                       "transfers": None})()


@pytest.mark.qemu
class QemuMetricsTests(TestCase):
    """
    A running machine's CPU, memory and disk counters appear and grow.  The test image boots
    from its kernel and initrd: its one disk is its volume (drive C{vol0}), which the guest
    mounts.
    """

    timeout = 240

    @d
    async def test_running_machine_counters_grow(self):
        from zwrm.agent.executor import Executor
        from zwrm.agent.volumes import VolumeStore
        from zwrm.drivers.qemu import QemuDriver
        from zwrm.testing import image

        img = image.build()
        tmp = tempfile.mkdtemp(prefix="zwrm-metrics-", dir="/tmp")
        self.addCleanup(shutil.rmtree, tmp, True)
        driver = QemuDriver(reactor, os.path.join(tmp, "machines"), accel="tcg", stop_timeout=5)
        volumes = VolumeStore(reactor, os.path.join(tmp, "volumes"))
        ex = Executor(reactor, "h1", driver, volumes, lambda event: succeed(None), data_dir=tmp)

        async def cleanup():
            ex.close()
            for mid in driver.list():
                await driver.destroy(mid)

        self.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
        await ex.start_machine({"id": "m1", "app": "web", "image": img.spec(), "vcpus": 1,
                                "memory_mb": 128, "service_port": 8080,
                                "volumes": [{"id": "data1", "mount": "/data", "size_mb": 16}]})
        metrics = AgentMetrics(reactor, _Agent(driver, volumes))

        async def scrape():
            text = generate_latest(_Families(await metrics.families())).decode()
            return parse(text)[0]

        def figures(samples):
            m = (("machine", "m1"),)
            return (samples.get(("zwrm_machine_cpu_seconds_total", m), math.nan),
                    samples.get(("zwrm_machine_disk_read_bytes_total", (("drive", "vol0"), *m)), math.nan))

        first = {}

        async def appeared():
            first["s"] = await scrape()
            cpu, read = figures(first["s"])
            return cpu > 0 and read > 0

        await _poll_async(appeared, 60, "CPU and disk counters of the running machine")
        samples = first["s"]
        self.assertEqual(samples[("zwrm_machine_memory_bytes", (("machine", "m1"),))], 128 * MiB)
        self.assertGreater(samples[("zwrm_machine_memory_rss_bytes", (("machine", "m1"),))], MiB)
        self.assertEqual(samples[("zwrm_agent_machines", (("state", "running"),))], 1)
        self.assertEqual(samples[("zwrm_volume_size_bytes", (("volume", "data1"),))], 16 * MiB)
        self.assertEqual(samples[("zwrm_volume_in_use", (("volume", "data1"),))], 1)
        # user-mode networking: no host-side device, no network series
        self.assertFalse([k for k in samples if k[0].startswith("zwrm_machine_network_")])
        cpu0, read0 = figures(samples)

        async def grew():
            cpu, read = figures(await scrape())
            return cpu > cpu0 and read > read0

        await _poll_async(grew, 90, "CPU and disk counters growing while the guest boots")


async def _poll_async(check, timeout, what, interval=0.5):
    """Await C{check()} until it is true, for at most C{timeout} seconds."""
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout
    while not await check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await deferLater(reactor, interval, lambda: None)


class _Driver:
    """A driver with C{usage}: one machine answers at once (bridge mode), one never does."""

    def __init__(self):
        self.pending = Deferred()

    def list(self):
        return ["m1", "m2"]

    def status(self, mid):
        return {"id": mid, "state": "running", "paused": "disk-full" if mid == "m2" else None}

    def usage(self, mid):
        if mid == "m2":
            return self.pending
        return succeed({"cpu_seconds": 1.5, "rss_bytes": 3, "memory_bytes": 4, "tap": "zt1",
                        "disks": {"vol0": {"rd_bytes": 5, "wr_bytes": 6, "rd_operations": 7,
                                           "wr_operations": 8}},
                        "net": {"rx_bytes": 9, "tx_bytes": 10, "rx_packets": 11, "tx_packets": 12}})


class _Volumes:
    def list(self):
        return []

    def snapshots(self):
        return []


class CollectionTests(SynchronousTestCase):
    def test_a_machine_that_does_not_answer_is_left_out(self):
        """QMP is asked asynchronously; a machine silent for C{timeout} s is left out of the scrape."""
        from twisted.internet.task import Clock

        clock = Clock()
        metrics = AgentMetrics(clock, _Agent(_Driver(), _Volumes()))
        d = Deferred.fromCoroutine(metrics.families())
        self.assertNoResult(d)
        clock.advance(metrics.timeout)
        samples, _ = parse(generate_latest(_Families(self.successResultOf(d))).decode())
        self.assertEqual(samples[("zwrm_machine_cpu_seconds_total", (("machine", "m1"),))], 1.5)
        self.assertNotIn(("zwrm_machine_cpu_seconds_total", (("machine", "m2"),)), samples)
        self.assertEqual(samples[("zwrm_machine_disk_writes_total", (("drive", "vol0"), ("machine", "m1")))], 8)
        self.assertEqual(
            samples[("zwrm_machine_network_transmit_packets_total", (("device", "zt1"), ("machine", "m1")))], 12)
        self.assertEqual(samples[("zwrm_agent_machines", (("state", "running"),))], 2)
        self.assertEqual(samples[("zwrm_agent_machines_paused", (("reason", "disk-full"),))], 1)
        self.assertFalse(clock.getDelayedCalls())

    def test_tap_counters(self):
        """A device's counters from /sys/class/net (loopback stands in for a TAP); none for a missing one."""
        from zwrm.drivers.qemu import _proc_usage, _tap_usage

        figures = _tap_usage("lo")
        self.assertEqual(sorted(figures), ["rx_bytes", "rx_packets", "tx_bytes", "tx_packets"])
        self.assertTrue(all(isinstance(v, int) and v >= 0 for v in figures.values()))
        self.assertIsNone(_tap_usage("zwrm-no-such-dev"))
        cpu, rss = _proc_usage(os.getpid())
        self.assertGreater(cpu, 0)
        self.assertGreater(rss, 1024 * 1024)
        self.assertIsNone(_proc_usage(2 ** 22 + 7))


@pytest.mark.multihost
class ProcessTests(TestCase):
    """C{twistd zwrm-agent --metrics-listen ...}: a real agent process serves /metrics."""

    timeout = 120

    @d
    async def test_agent_process(self):
        from twisted.internet.error import ConnectError

        from zwrm.testing.processes import AgentProcess, ControlPlaneProcess, free_port, temp_dir

        tmp = temp_dir(self)
        cp = ControlPlaneProcess(reactor, os.path.join(tmp, "cp"))
        await cp.start()
        self.addCleanup(lambda: ensureDeferred(cp.stop()))
        port = free_port()
        agent = AgentProcess(reactor, os.path.join(tmp, "a1"), cp.url, cp.join_token,
                             extra_args=["--metrics-listen", f"tcp:{port}:interface=127.0.0.1",
                                         "--accel", "tcg"])
        await agent.start()
        self.addCleanup(lambda: ensureDeferred(agent.stop()))
        found = {}

        async def scraped():
            try:
                r = await treq.get(f"http://127.0.0.1:{port}/metrics", persistent=False, timeout=5)
            except ConnectError:
                return False  # not listening yet
            found["samples"] = parse(await r.text())[0]
            return found["samples"].get(("zwrm_agent_heartbeats_total", ()), 0) >= 1

        await _poll_async(scraped, 60, "the agent process's /metrics with a heartbeat")
        samples = found["samples"]
        self.assertEqual(samples[("zwrm_agent_info", (("host_id", agent.host_id), ("name", "a1")))], 1)
        self.assertEqual(samples[("zwrm_agent_registered", ())], 1)
        self.assertGreater(samples[("zwrm_agent_heartbeat_rtt_seconds", ())], 0)
        self.assertEqual(samples[("zwrm_image_cache_limit_bytes", ())], 10240 * MiB)
        # and the control plane's /metrics describes that host
        r = await treq.get(f"http://127.0.0.1:{cp.port}/metrics", persistent=False)
        cp_samples, _ = parse(await r.text())
        self.assertEqual(cp_samples[("zwrm_host_state", (("host", agent.host_id), ("name", "a1"),
                                                         ("state", "ready")))], 1)
        self.assertGreaterEqual(cp_samples[("zwrm_wamp_call_duration_seconds_count",
                                            (("procedure", "zwrm.agent.heartbeat"),))], 1)
