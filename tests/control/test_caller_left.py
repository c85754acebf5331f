"""
A caller that goes away while the control plane carries out its call (an agent that loses
power mid-report, a CLI that gives up): the router tells the control plane's session with an
INTERRUPT, and the change is still carried out whole, stored and then announced
(L{zwrm.wamp.procedures.shielded}).  Over a real control plane, router and agent session.
"""

import os

from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.agent.test_membership import make_agent, start_plane
from tests.cli.test_cli import d
from tests.control.test_resources import machine_row
from zwrm.control.api import ControlSession
from zwrm.control.crossbar import ExternalRouter
from zwrm.testing.processes import poll
from zwrm.wamp.procedures import shielded


class AgentLeftMidReportTests(TestCase):
    timeout = 60

    @d
    async def test_a_report_whose_agent_left_is_stored_and_announced(self):
        """
        The agent's report that its machine failed is stored; the agent's session ends
        before the event is delivered: it still is (before, the router's INTERRUPT
        cancelled the report between the machine's store and its event: the store held the
        machine failed and no event ever told the healer, so it never restarted: the
        acceptance power cut of stop 43).
        """
        plane, tmp = await start_plane(self)
        agent = make_agent(self, plane, os.path.join(tmp, "a1"))
        await agent.registered
        host_id = agent.identity.host_id
        machines = plane.registry.data.machines
        row = dict(machine_row("m-left", state="running"), host_id=host_id)
        await machines.add(row, "placed")
        announced = []
        machines.subscribe(lambda e: announced.append(e) if e["subject"] == "m-left" else None)

        stored, release = defer.Deferred(), defer.Deferred()
        update = plane.store.update_with_event

        async def held(table, pk, fields, *event):
            result = await update(table, pk, fields, *event)
            if table == "machines" and fields.get("state") == "failed":
                stored.callback(None)
                await release  # the agent goes away meanwhile
            return result

        plane.store.update_with_event = held
        report = agent.session.call("zwrm.agent.report", {
            "kind": "machine", "host_id": host_id, "machine_id": "m-left",
            "state": "failed", "health": "none", "reason": "QEMU was killed by signal 9"})
        report.addErrback(lambda f: None)  # its answer never comes: the agent is gone
        await stored
        await agent.stopService()
        await poll(reactor, lambda: not plane.registry.executor_available(host_id), 10,
                   interval=0.01, what="the agent's session ended")
        # (the router sent its INTERRUPT before it announced the session's end, on the same
        # in-memory transport: the report is interrupted by now)
        release.callback(None)

        await poll(reactor, lambda: announced, 10, interval=0.01, what="the machine's event")
        [event] = announced
        self.assertEqual((event["kind"], event["payload"]["old"], event["payload"]["state"],
                          event["payload"]["reason"]),
                         ("state", "running", "failed", "QEMU was killed by signal 9"))
        [last, *_] = await plane.store.recent_events("m-left")
        self.assertEqual(last["id"], event["id"])  # stored, then announced
        self.assertEqual((await machines.get("m-left"))["state"], "failed")


    async def _report_under_way(self, on_cancel=None):
        """
        An agent's report, under way in the control plane (held after its store);
        C{on_cancel}: awaited when the stop cancels it, before it ends.
        """
        plane, tmp = await start_plane(self)
        agent = make_agent(self, plane, os.path.join(tmp, "a1"))
        await agent.registered
        host_id = agent.identity.host_id
        machines = plane.registry.data.machines
        await machines.add(dict(machine_row("m-stop", state="running"), host_id=host_id),
                           "placed")
        stored, ended = defer.Deferred(), []
        update = plane.store.update_with_event

        async def held(*args):
            result = await update(*args)
            if stored.called:  # (a write of on_cancel's)
                return result
            stored.callback(None)
            try:
                await defer.Deferred()  # never released
            except defer.CancelledError:
                ended.append("cancelled")
                if on_cancel is not None:
                    await on_cancel()
                raise
            return result

        plane.store.update_with_event = held
        report = agent.session.call("zwrm.agent.report", {
            "kind": "machine", "host_id": host_id, "machine_id": "m-stop",
            "state": "failed", "health": "none", "reason": "QEMU was killed by signal 9"})
        self.answers = []
        report.addErrback(lambda f: self.answers.append(f.value))
        await stored
        self.assertEqual(len(plane.session.under_way), 1)
        return plane, agent, ended

    @d
    async def test_a_procedure_under_way_when_the_control_plane_stops_is_ended(self):
        """
        The control plane stops while a procedure is under way: its work is ended (as a
        stop ends a drain's steps) before the store closes, not left to meet a closed
        database.
        """
        plane, agent, ended = await self._report_under_way()
        await plane.stopService()
        self.assertEqual(ended, ["cancelled"])
        self.assertEqual(plane.session.under_way, set())
        # the caller, still connected, is told why (over the real router and session)
        await poll(reactor, lambda: self.answers, 10, interval=0.01, what="the answer")
        [e] = self.answers
        self.assertEqual(e.error, "zwrm.error.unavailable")
        self.assertIn("zwrm.agent.report was interrupted: the control plane is stopping",
                      e.args[0])
        await agent.stopService()
        self.assertEqual(self.flushLoggedErrors(), [])

    @d
    async def test_what_cancelled_work_undoes_is_stored_before_the_store_closes(self):
        """
        The stop waits for the work it cancelled to end: what that work undoes on its
        cancellation (as a planned stop's take_out puts its machines back in the routes)
        is stored, and its caller answered, before the session leaves and the store
        closes.  (A scale-down stopped in its shutdown_delay left its machine stopping,
        out of the routes, for good; its CLI said "the callee left the realm".)
        """
        undone = []

        async def put_back():
            row = await plane.registry.data.machines.get("m-stop")
            await plane.registry.data.machines.set(row, "stop cancelled; back in the routes",
                                                    state="running")
            undone.append("stored")

        plane, agent, ended = await self._report_under_way(lambda: put_back())
        await plane.stopService()
        self.assertEqual((ended, undone), (["cancelled"], ["stored"]))
        await poll(reactor, lambda: self.answers, 10, interval=0.01, what="the answer")
        [e] = self.answers
        self.assertEqual(e.error, "zwrm.error.unavailable")
        await agent.stopService()

    @d
    async def test_the_work_of_an_earlier_session_is_ended_too(self):
        """
        Behind an external router the control plane has a session per connection: the
        work a procedure of an earlier one started (its connection was lost, another
        joined) is ended by the stop as well.
        """
        plane, agent, ended = await self._report_under_way()
        earlier = plane.session
        plane.session = ControlSession([], under_way=plane.under_way)  # as a new connection's
        await agent.stopService()
        await plane.stopService()
        self.assertEqual(ended, ["cancelled"])
        self.assertEqual(earlier.under_way, set())
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_every_session_behind_an_external_router_shares_the_set(self):
        under_way = set()
        router = ExternalRouter(reactor, "ws://127.0.0.1:9/ws", "zwrm", "control", "t", [],
                                under_way=under_way)
        first, second = router.make_session(), router.make_session()
        self.assertIs(first.under_way, under_way)
        self.assertIs(second.under_way, under_way)


class ShieldedTests(SynchronousTestCase):
    def setUp(self):
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def _shield(self, work):
        from twisted.logger import Logger

        return shielded("zwrm.app.deploy", lambda: work, Logger())

    def test_a_cancel_answers_the_caller_and_the_work_goes_on(self):
        work = defer.Deferred()
        answer = self._shield(work)()
        answer.cancel()
        self.failureResultOf(answer, defer.CancelledError)
        self.assertFalse(work.called)  # not cancelled
        work.callback("deployed")
        self.assertEqual(self.successResultOf(work), None)  # consumed

    def test_an_error_after_the_caller_left_is_one_line(self):
        from zwrm import errors

        work = defer.Deferred()
        answer = self._shield(work)()
        answer.cancel()
        self.failureResultOf(answer)
        work.errback(errors.NotFound("no app 'web'"))
        lines = [e for e in self.logged if e.get("log_namespace", "").startswith("tests.")
                 or "its caller had gone" in (e.get("log_format") or "")]
        self.assertEqual(len(lines), 1)
        self.assertNotIn("log_failure", lines[0])
        self.assertEqual(lines[0]["why"], "no app 'web'")

    def test_work_ended_by_its_owner_stopping_is_said_so(self):
        # The control plane's stop cancels the work under way: the caller still waiting is
        # told so with zwrm.error.unavailable, not a bare cancellation (which autobahn sends
        # as wamp.error.runtime_error, without a word).
        from twisted.logger import Logger

        from zwrm import errors

        under_way = set()
        work = defer.Deferred()
        answer = shielded("zwrm.app.deploy", lambda: work, Logger(), under_way)()
        [held] = under_way
        held.cancel()
        e = self.failureResultOf(answer, errors.Unavailable).value
        self.assertEqual(e.message, "zwrm.app.deploy was interrupted: the control plane is "
                         "stopping (what it had done is kept: zwrm events shows it once the "
                         "control plane is back)")
        self.assertEqual(under_way, set())

    def test_answers_pass_as_they_are(self):
        work = defer.Deferred()
        answer = self._shield(work)()
        work.callback({"ok": True})
        self.assertEqual(self.successResultOf(answer), {"ok": True})
        self.assertEqual(self._shield({"plain": 1})(), {"plain": 1})

    def test_an_error_before_the_caller_left_is_its_answer(self):
        from zwrm import errors

        work = defer.Deferred()
        answer = self._shield(work)()
        work.errback(errors.NotFound("no app 'web'"))
        self.assertEqual(self.failureResultOf(answer, errors.NotFound).value.message,
                         "no app 'web'")
        self.assertEqual(self.successResultOf(work), None)  # consumed: not unhandled
