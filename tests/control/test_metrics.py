"""
The control plane's C{/metrics} (L{zwrm.control.metrics}) over real sockets: every family
has HELP and TYPE (read by a Prometheus parser); per-host and per-app gauges; a histogram
of WAMP call latency per procedure, an agent's procedures labelled by verb.
"""

import json
import os

import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.agent.test_membership import make_agent, start_plane
from tests.agent.test_metrics import d, parse
from zwrm.cli.client import close, connect
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

        await plane.store.run(rows)
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
        age = samples[("zwrm_host_heartbeat_age_seconds", (("host", host),))]
        self.assertTrue(0 <= age < 10, age)
        self.assertEqual(samples[("zwrm_app_replicas", (("app", "web"),))], 2)
        self.assertEqual(samples[("zwrm_app_machines", (("app", "web"), ("health", "passing"),
                                                        ("state", "running")))], 1)
        self.assertEqual(families["zwrm_wamp_call_duration_seconds"].type, "histogram")
        calls = samples[("zwrm_wamp_call_duration_seconds_count", (("procedure", "zwrm.host.list"),))]
        self.assertEqual(calls, 1)
        self.assertGreaterEqual(
            samples[("zwrm_wamp_call_duration_seconds_count", (("procedure", "zwrm.agent.heartbeat"),))], 1)
        self.assertGreaterEqual(samples[("zwrm_wamp_calls_total", ())], 2)
        self.assertGreaterEqual(samples[("zwrm_wamp_sessions", ())], 2)

    @d
    async def test_written_in_a_thread(self):
        """
        The per-host families are built and the text written off the reactor thread (at
        20,000 hosts that took the reactor about a second per scrape), from a copy of the
        hosts' figures taken on it.
        """
        from twisted.python import threadable

        from zwrm.control import metrics

        plane, tmp = await start_plane(self)
        agent = make_agent(self, plane, os.path.join(tmp, "a1"))
        await agent.registered
        where = []
        write = metrics.generate_latest

        def recording(registry):
            where.append("reactor" if threadable.isInIOThread() else "thread")
            return write(registry)

        self.patch(metrics, "generate_latest", recording)
        built = []
        families = metrics.ControlMetrics._host_families

        def recording_families(rows, now):
            built.append("reactor" if threadable.isInIOThread() else "thread")
            return families(rows, now)

        self.patch(metrics.ControlMetrics, "_host_families", staticmethod(recording_families))
        port = plane.ports[0].getHost().port
        r = await treq.get(f"http://127.0.0.1:{port}/metrics", persistent=False)
        self.assertEqual(r.code, 200)
        samples, _ = parse(await r.text())
        self.assertEqual(samples[("zwrm_host_vcpus", (("host", agent.identity.host_id),))], 3)
        self.assertEqual((where, built), (["thread"], ["thread"]))
