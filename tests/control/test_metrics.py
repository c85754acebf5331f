"""
The control plane's C{/metrics} (L{zwrm.control.metrics}) over real sockets: every family
has HELP and TYPE (read by a Prometheus parser); per-host and per-app gauges; a histogram
of WAMP call latency per procedure, an agent's procedures labelled by verb.
"""

import json
import math
import os
from types import SimpleNamespace

import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.agent.test_membership import make_agent, start_plane
from tests.agent.test_metrics import d, parse
from zwrm import pki
from zwrm.cli.client import close, connect
from zwrm.control import network
from zwrm.control.metrics import CallLatencies, procedure_label
from zwrm.testing.processes import poll

MiB = 1024 * 1024


class LabelTests(SynchronousTestCase):
    def test_agent_procedures_by_verb(self):
        self.assertEqual(procedure_label("zwrm.agent.h_1f2e3d.machine.start"),
                         "zwrm.agent.{host}.machine.start")
        self.assertEqual(procedure_label("zwrm.agent.heartbeat"), "zwrm.agent.heartbeat")
        self.assertEqual(procedure_label("zwrm.host.list"), "zwrm.host.list")

    def test_histogram(self):
        latencies = CallLatencies()
        latencies.observe("zwrm.host.list", 0.003)
        latencies.observe("zwrm.host.list", 2.0)
        [family] = latencies.collect()
        samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
        self.assertEqual(samples[("zwrm_wamp_call_duration_seconds_count", None)], 2)
        self.assertEqual(samples[("zwrm_wamp_call_duration_seconds_bucket", "0.005")], 1)
        self.assertEqual(samples[("zwrm_wamp_call_duration_seconds_bucket", "+Inf")], 2)


class ControlMetricsTests(TestCase):
    timeout = 60

    @d
    async def test_served_and_parsed(self):
        plane, tmp = await start_plane(self)
        agent = make_agent(self, plane, os.path.join(tmp, "a1"))
        await agent.registered
        host = agent.identity.host_id
        await poll(reactor, lambda: agent.heartbeats_sent >= 1, 10, 0.05, what="a heartbeat")

        # an app with one replica and its running machine, as the store holds them
        def rows(db):
            now = 1.0
            db["apps"].insert({"id": "a-web", "name": "web", "spec": json.dumps({"replicas": 2}),
                               "created_at": now, "spec_version": 1})
            db["machines"].insert({"id": "m1", "app_id": "a-web", "host_id": host, "state": "running",
                                   "spec": "{}", "health": "passing", "created_at": now,
                                   "updated_at": now})
            # as the replicas store them: a status beside the port, restarts, a pause
            for mid, health in (("m2", {"status": "passing", "host_port": 20001}),
                                ("m3", {"status": "passing", "host_port": 20002,
                                        "restart": {"count": 1}}),
                                ("m4", {"status": "failing", "host_port": 20003,
                                        "paused": "disk-full"})):
                db["machines"].insert({"id": mid, "app_id": "a-web", "host_id": host,
                                       "state": "running", "spec": "{}",
                                       "health": json.dumps(health), "created_at": now,
                                       "updated_at": now})

        await plane.store.run(rows)

        # two volumes of the app: one with two snapshots and a replica of the first, one
        # with none
        def volumes(db):
            for vid in ("v-1", "v-2"):
                db["volumes"].insert({"id": vid, "app_id": "a-web", "host_id": host,
                                      "name": vid, "replica": 0, "size_mb": 8, "mount": "/d",
                                      "state": "ready", "created_at": 1.0})
            for sid, at in (("s-1", 100.0), ("s-2", 200.0)):
                db["volume_snapshots"].insert({
                    "id": sid, "volume_id": "v-1", "app_id": "a-web", "host_id": host,
                    "name": sid, "state": "ready", "live": 0, "size_bytes": 1,
                    "allocated_bytes": 1, "reason": "", "created_at": at})
            for rid, state in (("r-1", "ready"), ("r-2", "creating")):
                db["volume_replicas"].insert({
                    "id": rid, "volume_id": "v-1", "app_id": "a-web", "host_id": "h-other",
                    "snapshot_id": "s-1", "name": "s-1", "state": state, "size_bytes": 1,
                    "allocated_bytes": 1, "taken_at": 100.0 if state == "ready" else 200.0,
                    "reason": "", "created_at": 300.0})
            # its snapshot schedule, whose last run left a volume not taken
            db["snapshot_schedules"].insert({
                "id": "a-web", "app_id": "a-web", "every": 3600.0, "keep": None,
                "replicate": 0, "next_at": 4100.0, "last_at": 500.0,
                "last_error": "v-2: not snapshotted: its host drains", "created_at": 1.0})

        await plane.store.run(volumes)
        # an operator's call, timed by the router
        session = await connect(reactor, {"url": plane.url, "token": plane.operator_token,
                                          "authid": "operator"})
        self.addCleanup(lambda: ensureDeferred(close(session)))
        await session.call("zwrm.host.list")

        port = plane.ports[0].getHost().port
        r = await treq.get(f"http://127.0.0.1:{port}/metrics", persistent=False)
        self.assertEqual(r.code, 200)
        samples, families = parse(await r.text())

        self.assertEqual(samples[("zwrm_hosts", (("state", "ready"),))], 1)
        self.assertEqual(samples[("zwrm_hosts", (("state", "offline"),))], 0)
        self.assertEqual(samples[("zwrm_host_state", (("host", host), ("name", "a1"), ("state", "ready")))], 1)
        self.assertEqual(samples[("zwrm_host_vcpus", (("host", host),))], 3)
        self.assertEqual(samples[("zwrm_host_allocated_vcpus", (("host", host),))], 0)
        self.assertEqual(
            samples[("zwrm_host_certificate_expiry_timestamp_seconds", (("host", host),))],
            pki.HostCredentials.load(agent.tls_dir).not_valid_after.timestamp())
        age = samples[("zwrm_host_heartbeat_age_seconds", (("host", host),))]
        self.assertTrue(0 <= age < 10, age)
        self.assertEqual(samples[("zwrm_app_replicas", (("app", "web"),))], 2)
        self.assertEqual(samples[("zwrm_app_machines", (("app", "web"), ("health", "passing"),
                                                        ("state", "running")))], 3)
        self.assertEqual(samples[("zwrm_app_machines", (("app", "web"), ("health", "failing"),
                                                        ("state", "running")))], 1)
        self.assertEqual(len(families["zwrm_app_machines"].samples), 2)  # one per label set
        self.assertEqual(samples[("zwrm_app_machines_paused", (("app", "web"),
                                                               ("reason", "disk-full")))], 1)
        self.assertEqual(families["zwrm_wamp_call_duration_seconds"].type, "histogram")
        calls = samples[("zwrm_wamp_call_duration_seconds_count", (("procedure", "zwrm.host.list"),))]
        self.assertEqual(calls, 1)
        self.assertGreaterEqual(
            samples[("zwrm_wamp_call_duration_seconds_count", (("procedure", "zwrm.agent.heartbeat"),))], 1)
        self.assertGreaterEqual(samples[("zwrm_wamp_calls_total", ())], 2)
        self.assertGreaterEqual(samples[("zwrm_wamp_sessions", ())], 2)
        view = plane.apps.network_view
        self.assertEqual(
            [samples[(f"zwrm_network_{n}_total", ())]
             for n in ("views_sent", "view_full_lists", "view_resumed")],
            [view.sent, view.full_lists, view.resumed])
        self.assertEqual(
            {r: samples[("zwrm_network_view_full_list_reasons_total", (("reason", r),))]
             for r in network.FULL_LIST_REASONS}, view.full_list_reasons)
        one, two = (("app", "web"), ("volume", "v-1")), (("app", "web"), ("volume", "v-2"))
        self.assertEqual(samples[("zwrm_volume_snapshot_newest_timestamp_seconds", one)], 200)
        self.assertEqual((samples[("zwrm_volume_replicas", one)],
                          samples[("zwrm_volume_replicas", two)]), (1, 0))  # a ready one
        self.assertEqual(samples[("zwrm_volume_replica_newest_timestamp_seconds", one)], 100)
        for family in ("zwrm_volume_snapshot_newest_timestamp_seconds",
                       "zwrm_volume_replica_newest_timestamp_seconds"):
            self.assertNotIn((family, two), samples)  # none: no sample
        self.assertEqual(
            (samples[("zwrm_snapshot_schedule_last_run_timestamp_seconds", (("app", "web"),))],
             samples[("zwrm_snapshot_schedule_last_run_failed", (("app", "web"),))]), (500, 1))
        self.assertEqual(families["zwrm_partition_held_hosts"].samples, [])  # no partition
        self.assertEqual(samples[("zwrm_registry_bytes", ())], 0)  # nothing pushed
        store = plane.apps.images._store
        digest = await store.put_bytes("demo", b"x" * 10_000)
        r = await treq.get(f"http://127.0.0.1:{port}/metrics", persistent=False)
        samples, _ = parse(await r.text())
        self.assertEqual(samples[("zwrm_registry_bytes", ())],
                         os.stat(store.blob_path(digest)).st_blocks * 512)
        self.assertGreaterEqual(samples[("zwrm_registry_bytes", ())], 10_000)
        ca = plane.pki.ca.certificate.not_valid_after_utc.timestamp()
        with open(os.path.join(plane.pki.directory, "server.pem"), "rb") as f:
            server = pki.expiry_time(f.read())
        self.assertEqual((samples[("zwrm_ca_certificate_expiry_timestamp_seconds", ())],
                          samples[("zwrm_server_certificate_expiry_timestamp_seconds", ())]),
                         (ca, server))

    @d
    async def test_a_partition_held(self):
        plane, tmp = await start_plane(self)
        agents = [make_agent(self, plane, os.path.join(tmp, n), name=n) for n in ("a1", "a2")]
        for agent in agents:
            await agent.registered
        ids = [a.identity.host_id for a in agents]
        for agent in agents:
            await agent.stopService()
        for host_id in ids:
            await plane.registry.mark_offline(host_id)
        plane.healer.check_done(ids)  # both hosts of dc1 lost in one check
        # (decided once its settle window, 1.5 heartbeat intervals, has passed)
        await poll(reactor, lambda: plane.healer.partitioned, 10, 0.05, "the partition held")
        port = plane.ports[0].getHost().port
        r = await treq.get(f"http://127.0.0.1:{port}/metrics", persistent=False)
        samples, families = parse(await r.text())
        self.assertEqual(samples[("zwrm_partition_held_hosts", (("datacenter", "dc1"),))], 2)



class _Entry:
    """A registry entry as L{ControlMetrics} reads it; C{written} notes each host read."""

    def __init__(self, i, written, name=None):
        self.record = {"id": f"h-{i:05d}", "name": name or f"n{i}", "vcpus": 8, "memory_mb": 1024,
                       "disk_mb": 2048, "alloc_vcpus": 1, "alloc_memory_mb": 512.5, "alloc_disk_mb": None}
        self.last_heartbeat = reactor.seconds() - 2.0
        self.stats = {"image_cache": {"size": 10, "hits": 3}} if i % 2 else {}
        self._i, self._written = i, written

    @property
    def machine(self):
        self._written.append(self._i)
        return SimpleNamespace(state="ready" if self._i % 3 else "offline")


def _plane(entries):
    return SimpleNamespace(registry=SimpleNamespace(hosts=SimpleNamespace(entries=lambda: entries)),
                           reactor=reactor, store=None, router=None, external=None,
                           partitions=lambda: [])


class HostSamplesTests(TestCase):
    """
    The per-host samples, written as text a slice of hosts per reactor turn (at 20,000 hosts,
    made by C{prometheus_client} in a thread, they delayed heartbeats up to 400 ms).
    """

    @d
    async def test_the_reactor_turns_between_slices(self):
        from zwrm.control import metrics

        written, turns = [], []
        entries = [_Entry(i, written) for i in range(int(2.5 * metrics.HOSTS_PER_TURN))]
        done = []

        def tick():
            turns.append(len(written))
            if not done:
                reactor.callLater(0, tick)

        reactor.callLater(0, tick)
        text = await metrics.ControlMetrics(_plane(entries)).render()
        done.append(True)
        self.assertEqual(len(written), len(entries))
        # the reactor ran while the hosts were written, and no turn wrote more than a slice
        during = sorted({n for n in turns if 0 < n < len(entries)})
        self.assertEqual(during, [metrics.HOSTS_PER_TURN, 2 * metrics.HOSTS_PER_TURN])
        samples, _ = parse(text.decode())
        self.assertEqual(samples[("zwrm_host_vcpus", (("host", "h-02499"),))], 8)

    @d
    async def test_samples(self):
        """Every per-host family, the values scaled and escaped as the text format wants them."""
        from zwrm.control import metrics

        written = []
        entries = [_Entry(0, written, name='rack "a"\\1\nb'), _Entry(1, written)]
        samples, families = parse((await metrics.ControlMetrics(_plane(entries)).render()).decode())
        self.assertEqual(samples[("zwrm_host_state", (("host", "h-00000"), ("name", 'rack "a"\\1\nb'),
                                                      ("state", "offline")))], 1)
        self.assertEqual(samples[("zwrm_host_state", (("host", "h-00001"), ("name", "n1"),
                                                      ("state", "ready")))], 1)
        self.assertEqual(samples[("zwrm_hosts", (("state", "ready"),))], 1)
        self.assertEqual(samples[("zwrm_hosts", (("state", "offline"),))], 1)
        one = (("host", "h-00001"),)
        self.assertEqual(samples[("zwrm_host_memory_bytes", one)], 1024 * MiB)
        self.assertEqual(samples[("zwrm_host_disk_bytes", one)], 2048 * MiB)
        self.assertEqual(samples[("zwrm_host_allocated_vcpus", one)], 1)
        self.assertEqual(samples[("zwrm_host_allocated_memory_bytes", one)], 512.5 * MiB)
        self.assertTrue(math.isnan(samples[("zwrm_host_allocated_disk_bytes", one)]))
        self.assertTrue(2.0 <= samples[("zwrm_host_heartbeat_age_seconds", one)] < 10)
        self.assertEqual(samples[("zwrm_host_image_cache_size_bytes", one)], 10)
        self.assertEqual(samples[("zwrm_host_image_cache_hits", one)], 3)
        self.assertNotIn(("zwrm_host_image_cache_limit_bytes", one), samples)
        self.assertNotIn(("zwrm_host_image_cache_size_bytes", (("host", "h-00000"),)), samples)
        self.assertEqual({f.type for n, f in families.items() if n.startswith("zwrm_host")}, {"gauge"})
        self.assertEqual(len([n for n in families if n.startswith("zwrm_host_")]),
                         len(metrics.HOST_FAMILIES))
