"""
The QMP client protocol, against scripted server lines (StringTransport).
"""

import json

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from zwrm.drivers.qmp import QMPError, QMPProtocol

GREETING = b'{"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": ["oob"]}}\r\n'


class QMPProtocolTests(SynchronousTestCase):
    def setUp(self):
        self.events = []
        self.lost = []
        self.proto = QMPProtocol(lambda n, d, t: self.events.append((n, d)), self.lost.append)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def sent(self):
        lines = [json.loads(x) for x in self.transport.value().splitlines() if x]
        self.transport.clear()
        return lines

    def negotiate(self):
        self.proto.dataReceived(GREETING)
        [cmd] = self.sent()
        self.assertEqual(cmd["execute"], "qmp_capabilities")
        self.assertNoResult(self.proto.ready)
        self.proto.dataReceived(b'{"return": {}, "id": %d}\r\n' % cmd["id"])
        self.assertEqual(self.successResultOf(self.proto.ready)["version"]["qemu"]["major"], 7)

    def test_negotiation_then_commands(self):
        self.failureResultOf(self.proto.execute("query-status"), QMPError)  # not ready yet
        self.negotiate()
        d1 = self.proto.execute("query-status")
        d2 = self.proto.execute("system_powerdown")
        c1, c2 = self.sent()
        self.assertEqual((c1["execute"], c2["execute"]), ("query-status", "system_powerdown"))
        self.assertNotIn("arguments", c1)
        # An event can arrive between a command and its reply; replies match by id.
        self.proto.dataReceived(
            b'{"timestamp": {"seconds": 1}, "event": "POWERDOWN"}\r\n'
            b'{"return": {}, "id": %d}\r\n{"return": {"status": "running", "running": true}, '
            b'"id": %d}\r\n' % (c2["id"], c1["id"])
        )
        self.assertEqual(self.events, [("POWERDOWN", {})])
        self.assertEqual(self.successResultOf(d1)["status"], "running")
        self.assertEqual(self.successResultOf(d2), {})

    def test_arguments_and_errors(self):
        self.negotiate()
        d = self.proto.execute("device_del", {"id": "x"})
        [c] = self.sent()
        self.assertEqual(c["arguments"], {"id": "x"})
        self.proto.dataReceived(
            b'{"error": {"class": "DeviceNotFound", "desc": "no x"}, "id": %d}\r\n' % c["id"]
        )
        err = self.failureResultOf(d, QMPError).value
        self.assertEqual((err.error_class, err.desc), ("DeviceNotFound", "no x"))

    def test_events_in_pieces_and_junk_ignored(self):
        self.negotiate()
        self.proto.dataReceived(b'{"event": "SHUTDOWN", "data": {"guest": tr')
        self.proto.dataReceived(b'ue, "reason": "guest-shutdown"}}\r\nnot json\r\n[1]\r\n\r\n')
        self.assertEqual(self.events, [("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})])

    def test_connection_lost_fails_pending(self):
        self.negotiate()
        d = self.proto.execute("query-status")
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.failureResultOf(d, QMPError).value.error_class, "Disconnected")
        self.assertEqual(len(self.lost), 1)
        self.failureResultOf(self.proto.execute("query-status"), QMPError)

    def test_lost_before_negotiation(self):
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(self.proto.ready, QMPError)


class QMPCommandTimeoutTests(SynchronousTestCase):
    """
    Every command is bounded: one QEMU does not answer fails with C{Timeout}, and the
    connection stays usable.
    """

    def setUp(self):
        self.clock = Clock()
        self.proto = QMPProtocol(reactor=self.clock, command_timeout=60.0)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.proto.dataReceived(GREETING)
        [cmd] = self.sent()
        self.proto.dataReceived(b'{"return": {}, "id": %d}\r\n' % cmd["id"])
        self.successResultOf(self.proto.ready)

    def sent(self):
        lines = [json.loads(x) for x in self.transport.value().splitlines() if x]
        self.transport.clear()
        return lines

    def test_unanswered_command_times_out(self):
        d = self.proto.execute("query-status")
        [c] = self.sent()
        self.clock.advance(59.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        err = self.failureResultOf(d, QMPError).value
        self.assertEqual(err.error_class, "Timeout")
        self.assertEqual(err.desc, "QEMU did not answer query-status within 60 s")
        # The late reply is dropped; the next command is answered as usual.
        self.proto.dataReceived(b'{"return": {"status": "running"}, "id": %d}\r\n' % c["id"])
        d2 = self.proto.execute("query-status")
        [c2] = self.sent()
        self.proto.dataReceived(b'{"return": {"status": "paused"}, "id": %d}\r\n' % c2["id"])
        self.assertEqual(self.successResultOf(d2), {"status": "paused"})

    def test_answered_command_leaves_no_timer(self):
        d = self.proto.execute("stop", timeout=5)
        [c] = self.sent()
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [5.0])
        self.proto.dataReceived(b'{"return": {}, "id": %d}\r\n' % c["id"])
        self.assertEqual(self.successResultOf(d), {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_own_timeout_per_command(self):
        fds = []
        self.transport.sendFileDescriptor = fds.append
        d = self.proto.execute_with_fd("getfd", {"fdname": "x"}, 7, timeout=2)
        self.assertEqual(fds, [7])
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(2)
        self.assertIn("within 2 s", self.failureResultOf(d, QMPError).value.desc)

    def test_connection_lost_cancels_timers(self):
        d = self.proto.execute("query-status")
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.failureResultOf(d, QMPError).value.error_class, "Disconnected")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_ends_the_bounds(self):
        d = self.proto.execute("query-status")
        self.proto.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.failureResultOf(d, QMPError).value.error_class, "Disconnected")
