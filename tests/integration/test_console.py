"""
Serial consoles through the control plane, end to end: a real control plane and agent, the
test image booted under QEMU (TCG). C{zwrm logs -f} shows the log and then follows what the
guest writes until the machine stops; C{zwrm console} attaches interactively and Ctrl-]
detaches, leaving the machine running.
"""

import json
import os

import pytest
from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from zwrm.testing.processes import ZWRM, poll, run_cli, start_vm_cluster


class _Interactive(protocol.ProcessProtocol):
    def __init__(self):
        self.out, self.err = b"", b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.out += data

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


@pytest.mark.qemu
class ConsoleTests(TestCase):
    timeout = 600

    def test_follow_attach_detach(self):
        return ensureDeferred(self._scenario())

    async def cli(self, cp, *args, timeout=60):
        code, out, err = await run_cli(reactor, list(args), cp.url, cp.operator_token,
                                       timeout=timeout)
        self.assertEqual(code, 0, f"zwrm {' '.join(args)} failed ({code}): {err}")
        return out

    def spawn(self, cp, *args):
        p = _Interactive()
        env = dict(os.environ, ZWRM_API_URL=cp.url, ZWRM_TOKEN=cp.operator_token)
        transport = reactor.spawnProcess(p, ZWRM[0], ZWRM + list(args), env=env)
        self.addCleanup(lambda: p.ended.called or transport.signalProcess("KILL"))
        return p, transport

    async def _scenario(self):
        cp, _ = await start_vm_cluster(reactor, self, agents=1)
        # A machine that is not there: one line and exit 1, the terminal never taken.
        code, _, err = await run_cli(reactor, ["console", "m-0123456789ab"], cp.url,
                                     cp.operator_token)
        self.assertEqual((code, err), (1, "zwrm: no machine 'm-0123456789ab'\n"))
        await self.cli(cp, "apps", "create", "web")
        out = await self.cli(cp, "deploy", "web", "--image", "demo:1", "--memory", "128",
                             "--port", "8080", "--json")
        [m] = json.loads(out)["machines"]

        async def running():
            st = json.loads(await self.cli(cp, "machines", "status", m["id"], "--json"))
            return st["state"] == "running"

        await poll(reactor, running, 120, interval=0.2, what="the machine running")
        # Follow from (at most) the last byte of the log: the guest's boot messages, which
        # come after QEMU started, must come through the follow stream.
        follower, _ = self.spawn(cp, "logs", "-f", "--bytes", "1", m["id"])
        await poll(reactor, lambda: b"zwrm: ready" in follower.out, 240,
                   what="the guest's ready line followed")
        # Ended by its user (SIGTERM, as Ctrl-C's SIGINT in a shell): exit 0, not a word of
        # a lost connection (exit 3), as zwrm events -f.
        stopped, stopped_transport = self.spawn(cp, "logs", "-f", m["id"])
        await poll(reactor, lambda: b"zwrm: ready" in stopped.out, 60, what="its log's tail")
        stopped_transport.signalProcess("TERM")
        code = await defer.Deferred.addTimeout(stopped.ended, 30, reactor)
        self.assertEqual((code, stopped.err), (0, b""))

        # Interactive: attach, type, detach with Ctrl-]; the machine goes on.
        p, transport = self.spawn(cp, "console", m["id"])
        await poll(reactor, lambda: b"Ctrl-] detaches" in p.err, 30, what="attached")
        transport.write(b"hello\r")
        transport.write(b"\x1d")
        code = await defer.Deferred.addTimeout(p.ended, 30, reactor)
        self.assertEqual(code, 0, p.err)
        self.assertIn(b"detached", p.err)
        status = json.loads(await self.cli(cp, "machines", "status", m["id"], "--json"))
        self.assertEqual(status["state"], "running")
        self.assertFalse(follower.ended.called)

        # The machine goes: the follower's stream ends, and so does the command.
        await self.cli(cp, "scale", "web", "0", timeout=120)
        code = await defer.Deferred.addTimeout(follower.ended, 60, reactor)
        self.assertEqual(code, 0, follower.err)
        self.assertIn(b"the console closed", follower.err)
