"""The app, machine and volume commands: arguments become specs, mistakes become one line."""

from autobahn.wamp.exception import ApplicationError
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from zwrm.cli.apps import _failed_line, _last_reason, _settled, _spec, _why_failed
from zwrm.cli.client import EXIT_UNREACHABLE, EXIT_USAGE, CliError
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
