"""
C{zwrm deploy} follows a rolling update on its announcements (C{zwrm.event.app}, kind
C{rollout}) instead of one call bounded by the timeout: against a real control plane over a
real socket, whose deploy is held at each step by the test (its rollout service is replaced by
one that announces as the real one does and waits for the test between announcements).  The
command's timers run on a L{task.Clock}, so "longer than the timeout" is the test's to say.
"""

import io

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.agent.test_membership import start_plane
from tests.cli.test_cli import d
from zwrm import errors
from zwrm.cli import client
from zwrm.cli.apps import deploy_following
from zwrm.cli.client import EXIT_REMOTE, EXIT_TIMEOUT, CliError
from zwrm.testing.processes import poll

UPDATE = {"max_parallel": 1, "min_healthy_time": 0.0, "healthy_deadline": 10.0,
          "auto_revert": True}


class HeldRollout:
    """A rollout service whose steps the test releases; it announces as the real one does."""

    def __init__(self, data, announce=True, refuse=False):
        self._data = data
        self.announce = announce
        self.refuse = refuse
        self.gates = [Deferred(), Deferred()]
        self.finished = False
        self.machine_events = []  # published after "started", as a failing machine's

    def updating(self, app_id):
        return False  # (one deploy at a time here: none to supersede)

    def supersede(self, app_id, by):
        return False

    async def deploy(self, app, given, merge=True, **extra):
        if self.refuse:
            raise errors.InvalidArgument(f"image {given['image']} is not in the registry")
        spec = dict(given)
        await self._data.apps.set_spec(app, spec, "deployed")
        if not self.announce:
            return
        version = app["spec_version"]

        def say(state, reason, replaced):
            return self._data.apps.rollout(app, state, reason, version=version,
                                           replaced=replaced, total=2, update=UPDATE)

        await say("started", f"rolling update to version {version}: 2 machine(s), 1 at a time",
                  0)
        for payload in self.machine_events:
            await self._data.machines.produce_event("state", payload["id"], payload)
        await self.gates[0]
        await say("progress", "1 of 2 machine(s) replaced", 1)
        await self.gates[1]
        await say("completed", f"version {version} rolled out: 2 machine(s) replaced", 2)
        self.finished = True


class DeployFollowTests(TestCase):
    timeout = 60

    async def start(self, announce=True, refuse=False, machine_events=(), wait=None):
        plane, _ = await start_plane(self)
        self.patch(client.os, "environ", {"ZWRM_TOKEN": plane.operator_token})
        await plane.apps.create_app("web")
        held = HeldRollout(plane.apps.data, announce, refuse)
        held.machine_events = machine_events
        plane.apps.rollout = held  # the facade looks it up at each call
        session = await client.connect(reactor, dict(client.load_settings(plane.url),
                                                     timeout=1.0))
        self.addCleanup(client.close, session)
        clock = task.Clock()
        out, self.err = io.StringIO(), io.StringIO()
        done = Deferred.fromCoroutine(deploy_following(
            clock, session, "web", {"image": "demo:2"}, out, False, 1.0, err=self.err,
            deadline=wait, wait=wait))
        return held, clock, out, done

    @d
    async def test_a_new_machine_s_restart_is_one_line_on_stderr(self):
        """
        A machine of the app that failed and is due a restart while the update waits is
        one line on stderr, as with C{--wait}; once per restart, and only the app's.
        """
        failed = {"id": "m-0123456789ab", "app": "web", "state": "failed", "restarts": 0,
                  "restart_reason": "the guest ended itself (guest-reset): Kernel panic",
                  "next_restart_at": 1796556227.0}
        held, clock, out, done = await self.start(machine_events=[
            dict(failed, next_restart_at=None),  # its failure, before the healer's decision
            failed, failed, dict(failed, app="other"), dict(failed, restarts=1)])
        await poll(reactor, lambda: self.err.getvalue().count("\n") == 2, 10, 0.01,
                   what="the restart lines")
        held.gates[0].callback(None)
        held.gates[1].callback(None)
        await done
        self.assertEqual(self.err.getvalue().splitlines(), [
            "machine m-0123456789ab of web failed: the guest ended itself (guest-reset): Kernel"
            " panic; restart 1 at 11:23:47 UTC",
            "machine m-0123456789ab of web failed: the guest ended itself (guest-reset): Kernel"
            " panic; restart 2 at 11:23:47 UTC"])

    @d
    async def test_an_update_longer_than_the_timeout_is_followed_to_its_end(self):
        held, clock, out, done = await self.start()
        await poll(reactor, lambda: "started" in out.getvalue() or "rolling" in out.getvalue(),
                   10, 0.01, what="the start")
        clock.advance(5)  # five times the call timeout: the update runs, the command waits
        self.assertFalse(done.called)
        held.gates[0].callback(None)
        await poll(reactor, lambda: "1 of 2" in out.getvalue(), 10, 0.01, what="progress")
        clock.advance(10.5)  # each wait starts again at an announcement
        self.assertFalse(done.called)
        held.gates[1].callback(None)
        app = await done
        self.assertEqual((app["name"], app["spec"]["image"]), ("web", "demo:2"))
        self.assertEqual(out.getvalue().splitlines(), [
            "web: rolling update to version 1: 2 machine(s), 1 at a time",
            "web: 1 of 2 machine(s) replaced",
            "web: version 1 rolled out: 2 machine(s) replaced"])

    @d
    async def test_no_news_for_longer_than_a_batch_gives_up(self):
        held, clock, out, done = await self.start()
        await poll(reactor, lambda: "rolling" in out.getvalue(), 10, 0.01, what="the start")
        clock.advance(10.9)  # healthy_deadline + min_healthy_time + the timeout: 11 s
        self.assertFalse(done.called)
        clock.advance(0.2)
        with self.assertRaises(CliError) as cm:
            await done
        self.assertEqual(cm.exception.code, EXIT_TIMEOUT)
        self.assertIn("may still be running", cm.exception.message)
        # and it is: the control plane carries the deploy out to its end
        held.gates[0].callback(None)
        held.gates[1].callback(None)
        await poll(reactor, lambda: held.finished, 10, 0.01, what="the deploy's end")

    @d
    async def test_wait_bounds_the_update_s_course(self):
        """
        C{zwrm deploy --wait 3}: the command ends 3 s after its start, the update under
        way (exit 1, its line says it goes on); the control plane carries it out.
        """
        held, clock, out, done = await self.start(wait=3.0)
        await poll(reactor, lambda: "rolling" in out.getvalue(), 10, 0.01, what="the start")
        clock.advance(2.9)
        self.assertFalse(done.called)
        clock.advance(0.2)
        with self.assertRaises(CliError) as cm:
            await done
        self.assertEqual((cm.exception.code, cm.exception.message), (
            EXIT_REMOTE, "web did not become healthy within 3 s: its rolling update goes on"
                         " (see zwrm status web)"))
        held.gates[0].callback(None)
        held.gates[1].callback(None)
        await poll(reactor, lambda: held.finished, 10, 0.01, what="the deploy's end")

    @d
    async def test_a_deploy_that_does_not_roll_is_one_call(self):
        _, clock, out, done = await self.start(announce=False)
        app = await done
        self.assertEqual(app["spec"]["image"], "demo:2")
        self.assertEqual(out.getvalue(), "")
        self.assertEqual(clock.getDelayedCalls(), [])

    @d
    async def test_a_refused_deploy_is_one_line(self):
        _, clock, out, done = await self.start(refuse=True)
        with self.assertRaises(CliError) as cm:
            await done
        self.assertEqual(cm.exception.message, "image demo:2 is not in the registry")
        self.assertEqual(out.getvalue(), "")
