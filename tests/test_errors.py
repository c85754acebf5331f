"""
L{zwrm.errors}: how background work logs its failures (L{errors.log_failure}) and the
readable sentence of an error (L{errors.message_of}).
"""

from autobahn.wamp.exception import ApplicationError
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from zwrm import errors


class LogFailureTests(SynchronousTestCase):
    def setUp(self):
        self.seen = []
        self.log = Logger(observer=self.seen.append)

    def logged(self):
        return [(e["log_level"].name, "log_failure" in e, formatEvent(e)) for e in self.seen]

    def test_a_named_condition_is_one_line(self):
        full = errors.ResourceExhausted("the control plane's disk is full: its database (db)"
                                        " cannot grow")
        errors.log_failure(self.log, Failure(full), "healing: {what}", what="app web")
        self.assertEqual(self.logged(), [
            ("error", False, "healing: app web: the control plane's disk is full: its"
                             " database (db) cannot grow")])

    def test_a_bug_keeps_its_traceback(self):
        for bug in (KeyError("k"), errors.Internal("machine 'm1' could not start: boom")):
            self.seen.clear()
            errors.log_failure(self.log, Failure(bug), "drain {id}", id="d1")
            self.assertEqual([(level, failure) for level, failure, _ in self.logged()],
                             [("critical", True)])
            self.assertEqual(self.seen[0]["log_format"], "drain {id}")

    def test_message_of(self):
        self.assertEqual(errors.message_of(errors.NotFound("no machine 'm9'")),
                         "no machine 'm9'")
        received = ApplicationError("zwrm.error.not_found", "no machine 'm9'")
        self.assertEqual(errors.message_of(received), "no machine 'm9'")
        self.assertEqual(errors.message_of(ApplicationError("wamp.error.other", "why")),
                         "wamp.error.other: why")
        self.assertEqual(errors.message_of(KeyError("k")), "'k'")
        self.assertEqual(errors.message_of(RuntimeError()), "RuntimeError")

    def test_disk_full(self):
        import errno

        for code in (errno.ENOSPC, errno.EDQUOT):
            self.assertTrue(errors.disk_full(OSError(code, "full")))
        self.assertFalse(errors.disk_full(OSError(errno.EIO, "Input/output error")))
        self.assertFalse(errors.disk_full(RuntimeError("full")))
