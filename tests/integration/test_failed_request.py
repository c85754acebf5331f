"""
Issue 14, item 2, end to end: a scale that fails while a volume app's host is unreachable
changes nothing, and when the host returns its VM goes on running.

A real C{zwrm-control} and two real C{zwrm-agent} processes on loopback (QEMU under TCG).
An app with a volume runs as one machine; its agent is frozen (SIGSTOP: it keeps its
sockets but answers nothing) until the control plane marks the host offline, while its
QEMU runs on.  C{zwrm scale app 2} must fail (replica 0 is pinned to the frozen host)
without deleting the machine's record; once the agent is thawed the host is reconciled
and the same machine is running again, its VM never stopped (it still serves what was
written through it).
"""

import json

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from zwrm.testing.processes import host_list, poll, run_cli, start_vm_cluster

OFFLINE_AFTER = 6.0


@pytest.mark.qemu
@pytest.mark.multihost
class FailedScaleTests(TestCase):
    timeout = 480

    def test_failed_scale_during_an_outage_keeps_the_vm(self):
        return ensureDeferred(self._scenario())

    async def cli(self, cp, *args, expect=0, timeout=60):
        code, out, err = await run_cli(reactor, list(args), cp.url, cp.operator_token,
                                       timeout=timeout)
        self.assertEqual(code, expect, f"zwrm {' '.join(args)} gave {code}: {err}")
        self.assertNotIn("Traceback", err)
        return out, err

    async def app(self, cp):
        out, _ = await self.cli(cp, "status", "db", "--json")
        return json.loads(out)

    async def _scenario(self):
        cp, agents = await start_vm_cluster(reactor, self, offline_after=OFFLINE_AFTER)
        await self.cli(cp, "apps", "create", "db")
        out, _ = await self.cli(
            cp, "deploy", "db", "--image", "demo:1", "--replicas", "1", "--memory", "256",
            "--port", "8080", "--health-http", "/", "--health-grace", "240",
            "--volume", "data:16:/data", "--wait", "300", "--json", timeout=330)
        m = json.loads(out)["machines"][0]
        self.assertEqual((m["state"], m["health"]), ("running", "passing"))
        base = f"http://127.0.0.1:{m['host_port']}"
        r = await treq.post(f"{base}/cgi-bin/write?index.txt", b"written before the outage")
        self.assertEqual(r.code, 200, await r.text())
        agent = next(a for a in agents if a.host_id == m["host_id"])

        agent.freeze()
        self.addCleanup(agent.thaw)

        async def host_state(wanted):
            hosts = {h["id"]: h["state"] for h in await host_list(reactor, cp)}
            return hosts.get(agent.host_id) == wanted

        await poll(reactor, lambda: host_state("offline"), 60, interval=0.5,
                   what="the frozen agent's host offline")
        before = await self.app(cp)
        self.assertEqual([x["state"] for x in before["machines"]], ["failed"])

        _, err = await self.cli(cp, "scale", "db", "2", expect=1)
        self.assertIn("replica 0", err)
        after = await self.app(cp)
        self.assertEqual(after["spec"]["replicas"], 1)  # the spec was not changed
        self.assertEqual([(x["id"], x["state"]) for x in after["machines"]],
                         [(m["id"], "failed")])  # nor the record deleted

        agent.thaw()

        async def running_again():
            status = await self.app(cp)
            return [(x["id"], x["state"]) for x in status["machines"]] == [(m["id"], "running")]

        await poll(reactor, running_again, 90, interval=1.0,
                   what="the machine restored to running when its host returned")
        # the VM was never stopped: it still serves what was written before the outage
        page = await (await treq.get(f"{base}/")).text()
        self.assertIn("written before the outage", page)
        out, _ = await self.cli(cp, "machines", "status", m["id"], "--json")
        kinds = [e["kind"] for e in json.loads(out)["events"]]
        self.assertNotIn("unknown_machine", kinds)
