"""
A real cluster on loopback: one C{twistd zwrm-control}, two C{twistd zwrm-agent}
processes, observed through the real C{zwrm host list --json}.
"""

import json
import time

import pytest
from autobahn.wamp.exception import ApplicationError
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from zwrm.testing.processes import (
    AgentProcess,
    ControlPlaneProcess,
    host_list,
    poll,
    run_cli,
    temp_dir,
)

CHECK_INTERVAL = 1.0
OFFLINE_AFTER = 3.0
CLI_SLACK = 6.0
"""Seconds a `zwrm host list` may take on a loaded 2-core machine (Python start-up)."""


def states(hosts):
    return {h["id"]: h["state"] for h in hosts}


@pytest.mark.multihost
class ClusterTests(TestCase):
    timeout = 240

    def test_join_offline_back_restart(self):
        return ensureDeferred(self._scenario())

    async def _scenario(self):
        tmp = temp_dir(self)
        cp = ControlPlaneProcess(
            reactor, f"{tmp}/cp", heartbeat_interval=0.5, check_interval=CHECK_INTERVAL,
            offline_after=OFFLINE_AFTER, grace=OFFLINE_AFTER, flush_interval=0.5,
        )
        self.addCleanup(cp.stop)
        await cp.start()
        agents = [AgentProcess(reactor, f"{tmp}/a{i}", cp.url, cp.join_token, name=f"a{i}")
                  for i in (1, 2)]
        for a in agents:
            self.addCleanup(a.stop)
            await a.start()
        a1, a2 = agents
        ids = {a1.host_id, a2.host_id}
        self.assertEqual(len(ids), 2)

        async def in_states(wanted):
            hosts = await host_list(reactor, cp)
            return hosts if states(hosts) == wanted else None

        # both join and are ready
        hosts = await poll(reactor, lambda: in_states({a1.host_id: "ready", a2.host_id: "ready"}),
                           60, what="both agents ready")
        by_id = {h["id"]: h for h in hosts}
        self.assertEqual(by_id[a1.host_id]["name"], "a1")
        self.assertEqual(by_id[a1.host_id]["region"], "r1")
        self.assertGreater(by_id[a1.host_id]["vcpus"], 0)
        self.assertGreater(by_id[a1.host_id]["memory_mb"], 0)

        # freeze a1: offline within offline_after + check_interval (+ CLI time)
        a1.freeze()
        frozen_at = time.monotonic()
        frozen_wall = time.time()
        await poll(reactor, lambda: in_states({a1.host_id: "offline", a2.host_id: "ready"}),
                   OFFLINE_AFTER + CHECK_INTERVAL + CLI_SLACK, interval=0.1,
                   what="frozen agent offline")
        elapsed = time.monotonic() - frozen_at
        self.assertLessEqual(elapsed, OFFLINE_AFTER + CHECK_INTERVAL + CLI_SLACK)
        code, out, err = await run_cli(reactor, ["host", "status", a1.host_id], cp.url,
                                       cp.operator_token)
        self.assertEqual(code, 0, err)
        self.assertIn("heartbeat_lost", out)
        # the control plane's own record: marked offline within offline_after + check_interval
        code, out, err = await run_cli(reactor, ["host", "status", "--json", a1.host_id],
                                       cp.url, cp.operator_token)
        offline = [e for e in json.loads(out)["events"] if e["payload"].get("state") == "offline"]
        self.assertEqual(len(offline), 1)
        self.assertLessEqual(offline[0]["ts"] - frozen_wall, OFFLINE_AFTER + CHECK_INTERVAL + 1.0)

        # thaw it: ready again, same host
        a1.thaw()
        await poll(reactor, lambda: in_states({a1.host_id: "ready", a2.host_id: "ready"}),
                   30, what="thawed agent ready again")

        # restart the control plane: nothing lost, agents come back by themselves
        before = {h["id"]: h for h in await host_list(reactor, cp)}
        await cp.stop()
        await cp.start()
        hosts = await poll(reactor, lambda: in_states({a1.host_id: "ready", a2.host_id: "ready"}),
                           60, what="agents ready after control-plane restart")
        after = {h["id"]: h for h in hosts}
        self.assertEqual(set(after), set(before))
        for hid in after:
            for key in ("name", "region", "datacenter", "joined_at", "vcpus", "memory_mb"):
                self.assertEqual(after[hid][key], before[hid][key], key)
        self.assertEqual((a1.host_id, a2.host_id), tuple(sorted(ids, key=[a1.host_id, a2.host_id].index)))

        # the CLI's one-line errors against the real control plane
        code, out, err = await run_cli(reactor, ["host", "status", "h-nope"], cp.url,
                                       cp.operator_token)
        self.assertEqual((code, err.strip().splitlines()[-1]), (1, "zwrm: no host 'h-nope'"))
        code, out, err = await run_cli(reactor, ["host", "list"], cp.url, "wrong-token")
        self.assertEqual(code, 4)
        self.assertIn("rejected the token", err.strip().splitlines()[-1])
        self.assertNotIn("Traceback (most recent call last)", _without_numpy_noise(err))

        # the real process runs the garbage-collection policy and reports it in /metrics
        import treq

        response = await treq.get(f"http://127.0.0.1:{cp.port}/metrics", persistent=False)
        metrics = dict(line.rsplit(" ", 1) for line in (await response.text()).splitlines()
                       if line and not line.startswith("#"))
        self.assertGreaterEqual(float(metrics["zwrm_gc_full_collections_total"]), 1)
        self.assertGreater(float(metrics["zwrm_gc_frozen_objects"]), 10_000)
        self.assertEqual(float(metrics['zwrm_hosts{state="ready"}']), 2)

        # zwrm.image.* over WAMP, as an operator's client sees it
        from zwrm.cli.client import connect

        session = await connect(reactor, {"url": cp.url, "token": cp.operator_token,
                                          "authid": "operator", "ca_file": None})
        try:
            self.assertEqual(await session.call("zwrm.image.list"), [])
            with self.assertRaises(ApplicationError) as cm:
                await session.call("zwrm.image.info", "demo:1")
            self.assertEqual(cm.exception.error, "zwrm.error.not_found")
        finally:
            session.leave()
            await session.ended


def _without_numpy_noise(text):
    """Drop the NumPy/bjdata import warning that this environment prints on import."""
    keep = [line for line in text.splitlines() if line.startswith("zwrm:")]
    return "\n".join(keep)
