"""
An agent's procedures whose caller (the control plane) cancels or goes away mid-call: a
start or a stop is carried out whole (L{zwrm.wamp.procedures.shielded}); a procedure marked
L{zwrm.wamp.procedures.cancellable} (a console attachment, a volume copy, the live
subsystem's) ends with its caller.  Over a real control plane, router and agent session.
"""

import os

from autobahn import wamp
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from tests.agent.test_membership import make_agent, start_plane
from tests.cli.test_cli import d
from zwrm.testing.processes import poll
from zwrm.wamp.procedures import cancellable


class _Procedures:
    def __init__(self):
        self.release = {"change": defer.Deferred(), "stream": defer.Deferred()}
        self.outcomes = []
        self.entered = []

    async def _wait(self, name):
        self.entered.append(name)
        try:
            await self.release[name]
        except defer.CancelledError:
            self.outcomes.append((name, "cancelled"))
            raise
        self.outcomes.append((name, "done"))
        return name

    @wamp.register("test.change")
    def change(self):
        return defer.Deferred.fromCoroutine(self._wait("change"))

    @wamp.register("test.stream")
    @cancellable
    def stream(self):
        return defer.Deferred.fromCoroutine(self._wait("stream"))


class CallerLeftTests(TestCase):
    timeout = 60

    @d
    async def test_a_cancelled_call_runs_to_its_end_unless_cancellable(self):
        plane, tmp = await start_plane(self)
        agent = make_agent(self, plane, os.path.join(tmp, "a1"))
        procedures = _Procedures()
        agent.executors.append(procedures)
        await agent.registered
        host_id = agent.identity.host_id

        calls = [plane.registry.call_executor(host_id, verb) for verb in ("test.change",
                                                                          "test.stream")]
        await poll(reactor, lambda: len(procedures.entered) == 2, 10, interval=0.01,
                   what="both procedures invoked")
        for call in calls:
            call.cancel()
            with self.assertRaises(defer.CancelledError):
                await call
        await poll(reactor, lambda: procedures.outcomes, 10, interval=0.01,
                   what="the cancellable procedure's end")
        self.assertEqual(procedures.outcomes, [("stream", "cancelled")])
        procedures.release["change"].callback(None)  # (it ends as the release fires)
        self.assertEqual(procedures.outcomes, [("stream", "cancelled"), ("change", "done")])

