"""
A volume stream's progress is announced at a bounded rate: the first report at once, then at
most one every L{PROGRESS_INTERVAL} seconds (the latest figures), plus the final one
(L{ProgressThrottle}, on a Clock); and C{volume.send} announces through it to a caller that
asks for progressive results (real executors and volume streams over TLS on loopback).
"""

import os
import tempfile
import types

from autobahn.wamp.exception import TransportLost
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm import pki
from zwrm.agent.executor import Executor
from zwrm.agent.transfer import VolumeTransfers, mint_token
from zwrm.agent.transfer.progress import PROGRESS_INTERVAL, ProgressThrottle
from zwrm.agent.volumes import VolumeStore
from zwrm.drivers.fake import FakeDriver, FakeHost

MiB = 1024 * 1024


class ThrottleTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.out = []
        self.throttle = ProgressThrottle(
            self.clock, lambda p: self.out.append((self.clock.seconds(), p["sent"])))

    def test_at_most_two_a_second_plus_the_final_one(self):
        self.assertEqual(PROGRESS_INTERVAL, 0.5)
        # A report every millisecond for 10 s (as a fast stream's blocks would).
        for n in range(10000):
            self.throttle.report({"sent": n})
            self.clock.advance(0.001)
        self.throttle.finish({"sent": 10000})
        times = [t for t, _ in self.out]
        self.assertLessEqual(len(self.out), 10 * 2 + 2)
        self.assertGreaterEqual(len(self.out), 10 * 2)
        for a, b in zip(times[:-2], times[1:-1], strict=True):
            self.assertGreaterEqual(b - a, PROGRESS_INTERVAL - 1e-9)
        self.assertEqual(self.out[0], (0.0, 0))
        self.assertEqual(self.out[-1][1], 10000)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_latest_figures_follow_a_burst(self):
        self.throttle.report({"sent": 1})
        self.throttle.report({"sent": 2})
        self.throttle.report({"sent": 3})
        self.assertEqual(self.out, [(0.0, 1)])
        self.clock.advance(PROGRESS_INTERVAL)
        self.assertEqual(self.out, [(0.0, 1), (PROGRESS_INTERVAL, 3)])
        self.clock.advance(10)
        self.assertEqual(len(self.out), 2)  # nothing new, nothing announced

    def test_nothing_after_the_end(self):
        self.throttle.report({"sent": 1})
        self.throttle.report({"sent": 2})
        self.throttle.finish()  # failed: what was reported and not yet announced
        self.assertEqual(self.out, [(0.0, 1), (0.0, 2)])
        self.throttle.report({"sent": 3})
        self.throttle.finish({"sent": 4})
        self.clock.advance(10)
        self.assertEqual(len(self.out), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_failing_announcement_is_logged_not_raised(self):
        calls = []

        def broken(p):
            calls.append(p)
            raise RuntimeError("a bug")

        throttle = ProgressThrottle(self.clock, broken)
        throttle.report({"sent": 1})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(throttle.announced, 1)
        throttle.report({"sent": 2})  # nothing more is announced
        throttle.finish({"sent": 3})
        self.clock.advance(10)
        self.assertEqual(len(calls), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_caller_gone_is_one_line_and_the_end_of_announcements(self):
        """
        The caller's session lost its transport (a control plane restarting during a drain):
        autobahn's progress callable fails (AttributeError on its None transport, or
        TransportLost); one line says so, no traceback, and nothing more is announced.
        """
        for gone in (AttributeError("'NoneType' object has no attribute 'send'"),
                     TransportLost()):
            calls, seen = [], []

            def lost(p, gone=gone, calls=calls):
                calls.append(p)
                raise gone

            throttle = ProgressThrottle(self.clock, lost)
            throttle.log = Logger(observer=seen.append)
            throttle.report({"sent": 1})
            self.clock.advance(PROGRESS_INTERVAL)
            throttle.report({"sent": 2})
            self.clock.advance(PROGRESS_INTERVAL)
            throttle.finish({"sent": 3})
            self.assertEqual(len(calls), 1)
            self.assertEqual([(e["log_level"].name, "log_failure" in e) for e in seen],
                             [("info", False)])
            self.assertEqual(formatEvent(seen[0]),
                             "progress no longer announced: the caller's session is gone")
        self.assertEqual(self.flushLoggedErrors(), [])


class SendAnnouncesTests(TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="zwrm-progress-")
        ca = pki.CertificateAuthority.create()
        self.ex = {}
        for h in ("h-src", "h-dst"):
            cert, key = ca.issue_host(h, names=("127.0.0.1",))
            creds = pki.HostCredentials(ca.certificate_pem, cert, key)
            store = VolumeStore(reactor, os.path.join(self.dir, h, "vols"))
            tr = VolumeTransfers(reactor, store, creds)
            self.ex[h] = (store, tr)
        return defer.gatherResults([tr.listen() for _, tr in self.ex.values()])

    @defer.inlineCallbacks
    def test_send_announces_its_start_and_its_end(self):
        executors = {}
        for h, (store, tr) in self.ex.items():
            self.addCleanup(tr.receiver.stopService)
            driver = FakeDriver(reactor, os.path.join(self.dir, h, "machines"),
                                host=FakeHost(powerdown_delay=0.01))
            ex = Executor(reactor, h, driver, store, lambda e: defer.succeed(None),
                          data_dir=os.path.join(self.dir, h), transfers=tr)
            self.addCleanup(ex.close)
            executors[h] = ex
        src, dst = executors["h-src"], executors["h-dst"]
        yield src.create_volume("v-1", 8)
        with open(src.volumes.path("v-1"), "r+b") as f:
            f.seek(2 * MiB)
            f.write(b"z" * MiB)
        token = mint_token()
        where = dst.receive_volume(token, "v-1", src.volume_info("v-1")["size_bytes"],
                                   source="h-src")
        announced = []
        details = types.SimpleNamespace(progress=announced.append)
        result = yield src.send_volume("v-1", where["host"], where["port"], token, "h-dst",
                                       mode="bulk", commit=True, details=details)
        self.assertTrue(result["committed"])
        self.assertGreaterEqual(len(announced), 2)
        first, last = announced[0], announced[-1]
        self.assertEqual((first["volume_id"], first["mode"], first["sent"], first["finished"]),
                         ("v-1", "bulk", 0, False))
        self.assertTrue(last["finished"])
        self.assertEqual((last["sent"], last["done"], last["total"]),
                         (result["sent"], result["allocated"], result["allocated"]))
        self.assertEqual(set(last), {"volume_id", "mode", "sent", "done", "total", "finished"})
