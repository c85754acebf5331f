"""The app, machine and volume commands: arguments become specs, mistakes become one line."""

import io

from autobahn.wamp.exception import ApplicationError
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from zwrm.cli.apps import (
    DECISION_GRACE,
    _failed_line,
    _last_reason,
    _settled,
    _spec,
    _why_failed,
    destroy_cut_short,
    history_rows,
    wait_until_settled,
)
from zwrm.cli.client import EXIT_REMOTE, EXIT_UNREACHABLE, EXIT_USAGE, CliError
from zwrm.cli.main import build_parser


def parse(*argv):
    return build_parser().parse_args(list(argv))


class DeploySpecTests(SynchronousTestCase):
    def test_full_spec(self):
        spec = _spec(parse(
            "deploy", "web", "--image", "demo:1", "--vcpus", "2", "--memory", "512",
            "--replicas", "3", "--region", "eu", "--datacenter", "dc1", "--port", "8080",
            "--health-http", "/", "--volume", "data:64:/data", "--constraint", "disk=ssd"))
        self.assertEqual(spec["image"], "demo:1")
        self.assertEqual((spec["vcpus"], spec["memory_mb"], spec["replicas"]), (2, 512, 3))
        self.assertEqual((spec["region"], spec["datacenter"]), ("eu", "dc1"))
        self.assertEqual(spec["health"]["type"], "http")
        self.assertEqual(spec["health"]["path"], "/")
        self.assertEqual(spec["volumes"], [{"name": "data", "size_mb": 64, "mount": "/data"}])
        self.assertEqual(spec["constraints"], {"disk": "ssd"})

    def test_local_paths_are_absolute(self):
        spec = _spec(parse("deploy", "web", "--kernel", "vmlinuz", "--initrd", "initrd.gz"))
        self.assertTrue(spec["image"]["kernel"].startswith("/"))
        self.assertIsNone(spec["image"]["disk"])

    def test_mistakes_are_usage_errors(self):
        for argv, word in [
            (("deploy", "web"), "--image"),
            (("deploy", "web", "--image", "x:1", "--kernel", "k"), "--image"),
            (("deploy", "web", "--image", "x:1", "--volume", "data"), "NAME:SIZE_MB:/MOUNT"),
            (("deploy", "web", "--image", "x:1", "--volume", "d:big:/d"), "NAME:SIZE_MB:/MOUNT"),
            (("deploy", "web", "--image", "x:1", "--constraint", "ssd"), "LABEL=VALUE"),
            (("deploy", "web", "--image", "x:1", "--health-tcp", "--health-http", "/"), "not both"),
        ]:
            e = self.assertRaises(CliError, _spec, parse(*argv))
            self.assertEqual(e.code, EXIT_USAGE)
            self.assertIn(word, e.message)


class MachineStatusTests(SynchronousTestCase):
    def test_text(self):
        """
        The machine's image, volumes and restarts (the next one's time and reason when one
        is due), then its recent events with their times, newest first.
        """
        from zwrm.cli import apps

        status = {
            "id": "m-1", "app": "web", "replica": 0, "host_id": "h_1", "state": "stopped",
            "health": None, "address": "10.80.1.2", "host_port": None, "paused": None,
            "spec": {"image": "demo:2"}, "volumes": ["v-1", "v-2"], "restarts": 2,
            "next_restart_at": 1796566830.0, "restart_reason": "QEMU exited 1",
            "events": [
                {"id": 9, "ts": 1796566824.9, "kind": "state",
                 "payload": {"state": "stopped", "reason": "QEMU exited 1"}},
                {"id": 8, "ts": 1796566816.7, "kind": "volume", "payload": {}}]}

        async def answer(reactor, args, procedure, *a):
            self.assertEqual((procedure, a), ("zwrm.machine.status", ("m-1",)))
            return status

        self.patch(apps, "_with_session", answer)
        out = io.StringIO()
        self.successResultOf(defer.ensureDeferred(apps.machine_status(
            None, parse("machines", "status", "m-1"), out)))
        text = out.getvalue()
        self.assertIn("\nimage       demo:2\nvolumes     v-1, v-2\nrestarts    2; the next at"
                      " 14:20:30 UTC (QEMU exited 1)\n", text)
        self.assertIn("host_port   -\n", text)
        events = text.split("recent events (2):\n", 1)[1].splitlines()
        self.assertEqual([line.split() for line in events], [
            ["TIME", "(UTC)", "KIND", "DETAIL"],
            ["2026-12-06", "14:20:24", "state", "stopped", "(QEMU", "exited", "1)"],
            ["2026-12-06", "14:20:16", "volume"]])


class HistoryTests(SynchronousTestCase):
    def test_each_version_says_what_it_changed(self):
        """
        C{zwrm apps history}: what each version's spec changed from the one before it, and
        when it is an earlier spec again (the revert of a failed update, a rollback).
        """
        base = {"image": "demo:1", "replicas": 2, "health": {"path": "/"}}
        specs = [base, dict(base, health={"path": "/nosuch"}), base, dict(base, replicas=1),
                 dict(base, replicas=1)]
        versions = [{"version": n, "created_at": 0.0, "spec": spec, "current": n == 6}
                    for n, spec in enumerate(specs, start=2)]  # version 1 is no longer kept
        versions.append({"version": 9, "created_at": 0.0, "spec": base, "current": False})
        self.assertEqual(
            [(r[0], r[2], r[3], r[4], r[5]) for r in history_rows(reversed(versions))],
            [(2, "demo:1", 2, "-", ""), (3, "demo:1", 2, "health", ""),
             (4, "demo:1", 2, "health (as version 2)", ""), (5, "demo:1", 1, "replicas", ""),
             (6, "demo:1", 1, "nothing", "current"), (9, "demo:1", 2, "-", "")])


class SettledTests(SynchronousTestCase):
    def app(self, replicas, *machines):
        return {"spec": {"replicas": replicas},
                "machines": [{"state": s, "health": h} for s, h in machines]}

    def test_settled(self):
        self.assertEqual(_settled(self.app(2, ("running", "passing"), ("running", "none"))), "ok")
        self.assertIsNone(_settled(self.app(2, ("running", "passing"), ("starting", None))))
        self.assertIsNone(_settled(self.app(2, ("running", "passing"), ("running", "failing"))))
        self.assertIsNone(_settled(self.app(2, ("running", "passing"))))
        self.assertEqual(_settled(self.app(1, ("failed", None))), "failed")
        # A failed machine whose restart is due is on its way, not failed for good.
        app = self.app(1, ("failed", None))
        app["machines"][0]["next_restart_at"] = 1000.0
        self.assertIsNone(_settled(app))


class _Statuses:
    """
    A session (a fake, for these unit tests) whose C{zwrm.app.status} answers are given
    by the test, one per call (the last one again once they run out), and whose
    C{zwrm.machine.status} has the newest reason C{why}.
    """

    def __init__(self, statuses, why="the guest ended itself (guest-reset)"):
        self.statuses = list(statuses)
        self.why = why
        self.asked = 0

    def call(self, procedure, *args):
        if procedure == "zwrm.machine.status":
            return defer.succeed({"id": args[0], "events": [{"payload": {"reason": self.why}}]})
        assert (procedure, args) == ("zwrm.app.status", ("web",)), (procedure, args)
        self.asked += 1
        return defer.succeed(self.statuses.pop(0) if len(self.statuses) > 1
                             else self.statuses[0])


def _app(*machines):
    """An app status: C{(state, health, restarts, next_restart_at)} per machine."""
    return {"name": "web", "id": "a-1", "spec": {"replicas": len(machines), "image": "demo:1"},
            "machines": [{"id": f"m-{i}", "replica": i, "host_id": "h1", "state": s,
                          "health": h, "restarts": n, "next_restart_at": at,
                          "restart_reason": "the guest ended itself (guest-reset)"
                          if s == "failed" else None, "address": None, "host_port": None}
                         for i, (s, h, n, at) in enumerate(machines)],
            "volumes": []}


class WaitUntilSettledTests(SynchronousTestCase):
    """
    C{zwrm deploy --wait} follows a machine that fails through the restart its policy
    gives it (a transient failure: a guest that panicked at boot on a loaded host), and
    fails when a machine fails for good or the wait is over.  Time is a L{task.Clock}.
    """

    def wait(self, statuses, wait=300.0, steps=1000, told=None, spent=0.0):
        clock, err = task.Clock(), io.StringIO()
        clock.advance(spent)  # of the wait, by the deploy before it
        session = _Statuses(statuses[1:] or statuses)
        d = defer.ensureDeferred(wait_until_settled(clock, session, "web", statuses[0], wait,
                                                    err, told=told,
                                                    deadline=wait if spent else None))
        for _ in range(steps):
            if d.called:
                break
            clock.advance(0.5)
        return d, clock, err

    def test_a_machine_restarted_after_a_failure_is_followed_to_healthy(self):
        due = 1_000_000.0
        # Failed, its restart due, for longer than a decision's grace (the backoff: 5 s).
        d, clock, err = self.wait([_app(("starting", None, 0, None))]
                                  + [_app(("failed", None, 0, due))] * 10 + [
            _app(("starting", None, 1, None)),
            _app(("running", "passing", 1, None)),
        ])
        app = self.successResultOf(d)
        self.assertEqual(app["machines"][0]["state"], "running")
        self.assertEqual(err.getvalue(), "machine m-0 of web failed: the guest ended itself "
                         "(guest-reset); restart 1 at 13:46:40 UTC\n")

    def test_a_restart_the_deploy_s_follower_wrote_is_not_written_again(self):
        """
        A restart that C{deploy_following} wrote (it follows the machines' events during
        the deploy call) is not written again by the wait that follows.
        """
        told = {("m-0", 0)}
        d, clock, err = self.wait([_app(("failed", None, 0, 60.0)),
                                   _app(("running", "passing", 1, None))], told=told)
        self.assertEqual(self.successResultOf(d)["machines"][0]["state"], "running")
        self.assertEqual(err.getvalue(), "")

    def test_a_machine_that_powered_off_is_followed_through_its_restart(self):
        stopped = _app(("stopped", None, 0, 60.0))
        stopped["machines"][0]["restart_reason"] = "the guest powered off"
        d, clock, err = self.wait([stopped, _app(("running", "none", 1, None))])
        self.assertEqual(self.successResultOf(d)["machines"][0]["state"], "running")
        self.assertEqual(err.getvalue(), "machine m-0 of web stopped: the guest powered off; "
                                         "restart 1 at 00:01:00 UTC\n")

    def test_a_machine_failed_for_good_ends_the_wait(self):
        # No restart due (its policy gives it none) for longer than the decision's grace.
        d, clock, err = self.wait([_app(("starting", None, 0, None)),
                                   _app(("failed", None, 0, None))])
        e = self.failureResultOf(d, CliError).value
        self.assertEqual((e.code, e.message), (EXIT_REMOTE, "machine m-0 of web failed: the "
                                               "guest ended itself (guest-reset)"))
        self.assertGreaterEqual(clock.seconds(), DECISION_GRACE)
        self.assertLess(clock.seconds(), DECISION_GRACE + 1.0)
        self.assertIn("m-0", err.getvalue())  # the app's status, on the error stream

    def test_a_failure_whose_restart_is_decided_within_the_grace_is_followed(self):
        # Read between the failure and its policy's decision, which the control plane
        # stores just after.
        d, clock, err = self.wait([
            _app(("failed", None, 0, None)),
            _app(("failed", None, 0, None)),
            _app(("failed", None, 0, 60.0)),
            _app(("running", "none", 1, None)),
        ])
        self.assertEqual(self.successResultOf(d)["machines"][0]["state"], "running")
        self.assertIn("restart 1 at 00:01:00 UTC", err.getvalue())

    def test_the_wait_ends_with_the_last_failure_seen(self):
        statuses = [_app(("failed", None, n, 10.0 * (n + 1))) if n % 2 else
                    _app(("starting", None, n, None)) for n in range(8)]
        d, clock, err = self.wait(statuses, wait=30.0)
        e = self.failureResultOf(d, CliError).value
        self.assertEqual(e.code, EXIT_REMOTE)
        self.assertEqual(e.message, "web did not become healthy within 30 s; last: machine m-0 "
                         "of web failed: the guest ended itself (guest-reset); restart 8 at "
                         "00:01:20 UTC (see zwrm status and zwrm logs)")
        self.assertEqual(len(err.getvalue().splitlines()), 4)  # one line per failure

    def test_the_wait_counts_from_the_deploy_s_start(self):
        """
        The deploy's own course (a rolling update) took 25 of the 30 s: 5 are left.
        """
        d, clock, err = self.wait([_app(("starting", None, 0, None))], wait=30.0, spent=25.0)
        self.assertEqual(self.failureResultOf(d, CliError).value.message,
                         "web did not become healthy within 30 s (see zwrm status and zwrm logs)")
        self.assertEqual(clock.seconds(), 30.0)

    def test_failed_line_says_why(self):
        """
        A deploy that waits and meets a failed machine ends with one line naming it and
        its newest event's reason (the agent's: a full disk, a missing image), not a
        pointer to its console, which a machine that never started does not have.
        """
        status = {"id": "m-2", "state": "failed", "events": [
            {"kind": "state", "payload": {"reason": "could not start: the disk of host h1 is"
                                                    " full (No space left on device)"}},
            {"kind": "state", "payload": {"reason": "created"}}]}
        why = _last_reason(status)
        self.assertEqual(_failed_line("web", status, why), "machine m-2 of web failed: could"
                         " not start: the disk of host h1 is full (No space left on device)")
        self.assertIsNone(_last_reason({"id": "m-2", "events": [{"payload": {}}]}))
        self.assertEqual(_failed_line("web", status, None),
                         "machine m-2 of web failed (see zwrm logs m-2)")

    def test_why_failed_when_the_machine_is_gone(self):
        """
        The reason is asked of the control plane; a machine it no longer knows (destroyed
        meanwhile) gives no reason, so the deploy's line is the failed machine's, not "no
        machine ...".  A lost connection is still said as such.
        """

        class Session:
            def __init__(self, answer):
                self.answer = answer

            def call(self, procedure, *args):
                assert (procedure, args) == ("zwrm.machine.status", ("m-2",))
                return self.answer

        status = {"id": "m-2", "events": [{"payload": {"reason": "could not start: x"}}]}
        self.assertEqual(self.successResultOf(defer.ensureDeferred(
            _why_failed(Session(defer.succeed(status)), "m-2"))), "could not start: x")
        gone = ApplicationError("zwrm.error.not_found", "no machine 'm-2'")
        self.assertIsNone(self.successResultOf(defer.ensureDeferred(
            _why_failed(Session(defer.fail(gone)), "m-2"))))
        lost = ApplicationError("wamp.close.transport_lost", "lost")
        err = self.failureResultOf(defer.ensureDeferred(
            _why_failed(Session(defer.fail(lost)), "m-2")), CliError).value
        self.assertEqual(err.code, EXIT_UNREACHABLE)


class DestroyLineTests(SynchronousTestCase):
    def test_a_destroy_cut_short_says_it_goes_on(self):
        """
        A destroy is stored before its first machine stops and goes on after the control
        plane's stop or kill: the line of a destroy cut short says so; others are as
        they were.
        """
        lost = CliError("lost the connection to the control plane at wss://cp:8443/ws",
                        EXIT_UNREACHABLE)
        e = destroy_cut_short(lost, "web")
        self.assertEqual((e.message, e.code), (
            "lost the connection to the control plane at wss://cp:8443/ws; a destroy that"
            " reached it goes on (`zwrm status web` shows it)", EXIT_UNREACHABLE))
        stopping = CliError("zwrm.app.destroy was interrupted: the control plane is stopping"
                            " (what it had done is kept: zwrm events shows it once the"
                            " control plane is back)", EXIT_REMOTE)
        e = destroy_cut_short(stopping, "web")
        self.assertEqual((e.message, e.code), (
            "the destroy of web was interrupted: the control plane is stopping; it goes on"
            " once the control plane is back (`zwrm status web` shows it)", EXIT_REMOTE))
        other = CliError("no app 'web'", EXIT_REMOTE)
        self.assertIs(destroy_cut_short(other, "web"), other)
