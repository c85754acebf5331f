"""
The ingress's connection to a replica (L{proxy._ConnectRace}): a SYN that gets no answer
(lost: a guest paused for its live migration's switchover, a frame dropped on the overlay)
costs C{connect_retry}, not the kernel's first retransmission a second later, because a new
attempt starts beside the waiting one.  On a L{MemoryReactorClock}: attempts are the
reactor's C{connectTCP} calls, the clock is advanced by hand.
"""

from twisted.internet import error
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from zwrm.agent.network.proxy import (
    CONNECT_RETRY,
    REFUSALS_SAID_EVERY,
    Backend,
    Ingress,
    _ConnectRace,
)


class _Up(Protocol):
    connected_d = None

    def connectionMade(self):
        d, self.connected_d = self.connected_d, None
        if d is not None:
            d.callback(self)


class _Socket:
    def setsockopt(self, *args):
        pass


class _Transport(StringTransport):
    def getHandle(self):
        return _Socket()


def _connect(reactor, n):
    """Attempt C{n} (from 0) connects: what the reactor would do when its SYN-ACK came."""
    factory = reactor.tcpClients[n][2]
    proto = factory.buildProtocol(None)
    transport = _Transport()
    proto.makeConnection(transport)
    return proto, transport


def _fail(reactor, n, exc):
    reactor.tcpClients[n][2].clientConnectionFailed(reactor.connectors[n], Failure(exc))


class ConnectRaceTests(SynchronousTestCase):
    def race(self, timeout=2.0, retry=0.25):
        self.reactor = MemoryReactorClock()
        self.made = []

        def make():
            p = _Up()
            self.made.append(p)
            return p

        race = _ConnectRace(self.reactor, "10.80.2.5", 8080, make, timeout, retry)
        self.result = []
        race.d.addBoth(self.result.append)
        return race

    def test_a_second_attempt_starts_beside_the_first_and_the_first_up_wins(self):
        self.race()
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(0.24)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(0.01)  # the first SYN got no answer in 0.25 s
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("10.80.2.5", 8080)] * 2)
        # Each attempt waits at most until the deadline (2 s from the start).
        self.assertEqual([c[3] for c in self.reactor.tcpClients], [2.0, 1.75])
        self.assertEqual(self.result, [])
        proto, _ = _connect(self.reactor, 1)
        self.assertEqual(self.result, [proto])
        self.assertIs(proto, self.made[1])
        # The first attempt is stopped, and no more are started.
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.reactor.advance(5)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_one_more_every_interval_until_the_deadline(self):
        race = self.race(timeout=2.0, retry=0.25)
        starts = []
        for _ in range(10):
            self.reactor.advance(0.25)
            starts.append(len(self.reactor.tcpClients))
        # Attempts at 0, 0.25, ..., 1.75 s; none at the deadline or after.
        self.assertEqual(starts, [2, 3, 4, 5, 6, 7, 8, 8, 8, 8])
        self.assertEqual(race.attempts, 8)
        self.assertEqual(self.result, [])  # the attempts are still waiting
        for n in range(8):
            _fail(self.reactor, n, error.TimeoutError())
        [f] = self.result
        self.assertTrue(f.check(error.TimeoutError))

    def test_an_attempt_that_fails_while_others_wait_ends_nothing(self):
        self.race()
        self.reactor.advance(0.25)
        _fail(self.reactor, 0, error.TimeoutError())
        self.assertEqual(self.result, [])
        proto, _ = _connect(self.reactor, 1)
        self.assertEqual(self.result, [proto])

    def test_stopped_attempts_report_their_failure_at_once_and_change_nothing(self):
        # Twisted's connectors call clientConnectionFailed from stopConnecting.
        self.race()
        self.reactor.advance(0.25)
        self.reactor.advance(0.25)
        for n, connector in enumerate(self.reactor.connectors):
            connector.stopConnecting = lambda n=n: _fail(self.reactor, n, error.UserError())
        proto, _ = _connect(self.reactor, 2)
        self.assertEqual(self.result, [proto])

    def test_a_refusal_ends_it_at_once(self):
        self.race()
        self.reactor.advance(0.25)
        _fail(self.reactor, 1, error.ConnectionRefusedError())
        [f] = self.result
        self.assertTrue(f.check(error.ConnectionRefusedError))
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.reactor.advance(5)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_a_late_winner_in_the_same_turn_is_closed(self):
        self.race()
        self.reactor.advance(0.25)
        first, _ = _connect(self.reactor, 0)
        _, late = _connect(self.reactor, 1)
        self.assertEqual(self.result, [first])
        self.assertTrue(late.disconnecting)

    def test_without_retry_one_attempt(self):
        self.race(retry=None)
        self.reactor.advance(1.9)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        _fail(self.reactor, 0, error.TimeoutError())
        [f] = self.result
        self.assertTrue(f.check(error.TimeoutError))


class IngressRetriesTests(SynchronousTestCase):
    """Both kinds of published port connect to replicas through the race."""

    def ingress(self, mode):
        reactor = MemoryReactorClock()
        ing = Ingress(reactor, interface="127.0.0.1")
        ing.set_routes({8000: {"mode": mode, "routes": {None: [
            {"key": "a", "host": "10.80.2.5", "port": 8080, "healthy": True}]}}})
        [(port, factory, _backlog, _iface)] = reactor.tcpServers
        self.assertEqual(port, 8000)
        client = factory.buildProtocol(None)
        client.makeConnection(StringTransport())
        return reactor, client

    def assertRetried(self, reactor):
        self.assertEqual(len(reactor.tcpClients), 1)
        reactor.advance(CONNECT_RETRY)
        self.assertEqual([c[:2] for c in reactor.tcpClients], [("10.80.2.5", 8080)] * 2)

    def test_tcp_port(self):
        reactor, client = self.ingress("tcp")
        client.dataReceived(b"hello")
        self.assertRetried(reactor)
        # The second attempt's connection carries the client's bytes.
        _, transport = _connect(reactor, 1)
        self.assertEqual(transport.value(), b"hello")
        self.assertTrue(reactor.connectors[0].stoppedConnecting)

    def test_http_port(self):
        reactor, client = self.ingress("http")
        client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertRetried(reactor)
        _, transport = _connect(reactor, 1)
        self.assertTrue(transport.value().startswith(b"GET / HTTP/1.1\r\n"))
        self.assertTrue(reactor.connectors[0].stoppedConnecting)


class RefusalLinesTests(SynchronousTestCase):
    """
    A replica whose port refuses (a guest booting: its app does not listen yet) has each
    connection tried on another; the agent's log says so once per
    L{REFUSALS_SAID_EVERY} seconds per replica, with the count, not once per connection.
    """

    def test_one_line_per_interval_with_the_count(self):
        lines = []
        observer = lines.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        b, other = Backend("m1", "10.80.2.5", 8080), Backend("m2", "10.80.2.6", 8080)
        for i in range(50):  # 50 connections within the first interval
            b.refused("Connection was refused by other side: 111", i * 0.1)
        other.refused("User timeout caused connection failure.", 1.0)
        b.refused("Connection was refused by other side: 111", REFUSALS_SAID_EVERY - 0.01)
        b.refused("Connection was refused by other side: 111", REFUSALS_SAID_EVERY + 0.5)
        said = [formatEvent(e) for e in lines if "did not accept" in (e.get("log_format") or "")]
        self.assertEqual(said, [
            "ingress: 10.80.2.5:8080 did not accept 1 connection(s) (Connection was refused by"
            " other side: 111); trying another",
            "ingress: 10.80.2.6:8080 did not accept 1 connection(s) (User timeout caused"
            " connection failure.); trying another",
            "ingress: 10.80.2.5:8080 did not accept 51 connection(s) (Connection was refused"
            " by other side: 111); trying another"])
