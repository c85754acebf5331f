"""
Apps that stay up, end to end: a real C{zwrm-control} and two real agents running QEMU (TCG).

 - a bad redeploy (an image tag that is not in the registry) exits non-zero and leaves the
   serving replica as it was;
 - C{kill -9} of a machine's QEMU: the machine is restarted on its host (same machine id)
   within the restart backoff;
 - SIGSTOP of an agent: its stateless replica is started on the other host; SIGCONT: the
   agent's stale copy is stopped and exactly the replica count runs.
"""

import glob
import json
import os
import signal

import pytest
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from zwrm.testing.processes import poll, run_cli, start_vm_cluster


def qemu_pid(agent, machine_id):
    paths = glob.glob(os.path.join(agent.data_dir, "**", machine_id, "qemu.pid"), recursive=True)
    if not paths:
        return None
    with open(paths[0]) as f:
        return int(f.read().strip())


def running_qemus(agent):
    """Machine ids whose QEMU runs under C{agent}'s data directory."""
    out = []
    for path in glob.glob(os.path.join(agent.data_dir, "**", "qemu.pid"), recursive=True):
        try:
            with open(path) as f:
                pid = int(f.read().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            continue
        out.append(os.path.basename(os.path.dirname(path)))
    return out


@pytest.mark.qemu
@pytest.mark.multihost
class SelfHealingTests(TestCase):
    timeout = 600

    async def cli(self, cp, *args, timeout=60, code=0):
        got, out, err = await run_cli(reactor, list(args), cp.url, cp.operator_token,
                                      timeout=timeout)
        self.assertEqual(got, code, f"zwrm {' '.join(args)} exited {got}: {err}")
        self.assertNotIn("Traceback", err)
        return out, err

    async def app(self, cp):
        out, _ = await self.cli(cp, "status", "web", "--json")
        return json.loads(out)

    def test_bad_redeploy_crash_and_agent_loss(self):
        return ensureDeferred(self._scenario())

    async def _scenario(self):
        cp, agents = await start_vm_cluster(reactor, self)
        by_host = {a.host_id: a for a in agents}
        await self.cli(cp, "apps", "create", "web")
        out, _ = await self.cli(cp, "deploy", "web", "--image", "demo:1", "--memory", "256",
                                "--wait", "300", "--json", timeout=330)
        (m,) = json.loads(out)["machines"]

        # a bad redeploy changes nothing
        _, err = await self.cli(cp, "deploy", "web", "--image", "demo:2", code=1)
        self.assertIn("not in the registry", err)
        app = await self.app(cp)
        self.assertEqual([(x["id"], x["state"]) for x in app["machines"]], [(m["id"], "running")])
        self.assertEqual(app["spec_version"], 1)

        # kill -9 of its QEMU: restarted on its host after the 5 s backoff
        agent = by_host[m["host_id"]]
        pid = qemu_pid(agent, m["id"])
        self.assertIsNotNone(pid)
        os.kill(pid, signal.SIGKILL)

        async def restarted():
            (x,) = (await self.app(cp))["machines"]
            return x["state"] == "running" and x["restarts"] == 1 and x

        x = await poll(reactor, restarted, 120, what="the restart after kill -9")
        self.assertEqual((x["id"], x["host_id"]), (m["id"], m["host_id"]))
        self.assertNotEqual(qemu_pid(agent, m["id"]), pid)

        # SIGSTOP of its agent: the replica runs on the other host
        agent.freeze()
        self.addCleanup(lambda: agent.running and agent.thaw())

        async def moved():
            ms = (await self.app(cp))["machines"]
            return (len(ms) == 1 and ms[0]["host_id"] != m["host_id"]
                    and ms[0]["state"] == "running" and ms[0])

        await poll(reactor, moved, 240, what="the replica on the other host")
        agent.thaw()

        async def one_copy():
            copies = sum(len(running_qemus(a)) for a in agents)
            hosts = json.loads((await self.cli(cp, "host", "list", "--json"))[0])
            return copies == 1 and all(h["state"] == "ready" for h in hosts)

        await poll(reactor, one_copy, 120, what="exactly one copy after SIGCONT")
        ms = (await self.app(cp))["machines"]
        self.assertEqual(len(ms), 1)
