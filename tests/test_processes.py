"""
The test harness's own process waiting (L{zwrm.testing.processes}): a child's end is
noticed even when the reactor's C{SIGCHLD} wake-up went missing.
"""

import signal

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from zwrm.testing.processes import _Collect, reaped


class ReapedTests(TestCase):
    timeout = 30

    async def test_an_end_the_reactor_was_not_woken_for_is_noticed(self):
        # No pipes (Twisted would reap when they close) and no SIGCHLD wake-up (the
        # reactor's wake-up descriptor taken away for this test): only waitpid can tell.
        await deferLater(reactor, 0, lambda: None)  # the reactor runs: its handling installed
        previous = signal.set_wakeup_fd(-1)
        self.addCleanup(signal.set_wakeup_fd, previous)
        proto = _Collect()
        reactor.spawnProcess(proto, "/bin/sh", ["sh", "-c", "exit 3"], env={}, childFDs={})
        code = await reaped(reactor, proto.ended, every=0.2).addTimeout(5, reactor)
        self.assertEqual(code, 3)
