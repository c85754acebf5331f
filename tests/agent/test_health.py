"""
Health checks: the grace/passing/failing logic on a Clock, and the real TCP and HTTP probes
against real local servers.
"""

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from zwrm.agent import health
from zwrm.errors import InvalidArgument


class ValidateTests(SynchronousTestCase):
    def test_defaults(self):
        self.assertEqual(health.validate({"type": "tcp"}),
                         {"type": "tcp", "path": "/", "interval": 5, "timeout": 2, "grace": 60})
        self.assertIsNone(health.validate(None))

    def test_bad(self):
        for spec in ("http", {"type": "icmp"}, {"path": "nope"}, {"interval": 0},
                     {"timeout": "2"}, {"grace": -1}, {"path": "/a b"}):
            self.assertRaises(InvalidArgument, health.validate, spec)


class HealthCheckTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.results = []
        self.changes = []
        self.calls = 0

    def probe(self):
        self.calls += 1
        return succeed(self.results.pop(0) if self.results else None)

    def check(self, grace=10, **kw):
        hc = health.HealthCheck(self.clock, self.probe, interval=1, grace=grace,
                                on_change=lambda h, d: self.changes.append((h, d)), **kw)
        hc.start()
        self.addCleanup(hc.stop)
        return hc

    def test_failures_within_grace_stay_starting(self):
        self.results = ["down", "down", "down"]
        hc = self.check(grace=10)
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(hc.health, "starting")
        self.assertEqual(hc.detail, "down")
        self.assertEqual(self.changes, [])
        self.clock.advance(1)  # 4th probe passes
        self.assertEqual(hc.health, "passing")
        self.assertEqual(self.changes, [("passing", "ok")])
        self.assertEqual(self.calls, 4)

    def test_failing_after_grace(self):
        self.results = ["down"] * 20
        hc = self.check(grace=3)
        for _ in range(5):
            self.clock.advance(1)
        self.assertEqual(hc.health, "failing")
        self.assertEqual(self.changes, [("failing", "down")])

    def test_passing_then_failing_then_passing(self):
        hc = self.check(grace=100)
        self.assertEqual(hc.health, "passing")
        self.results = ["refused", None]
        self.clock.advance(1)
        self.assertEqual(hc.health, "failing")  # once passed, grace no longer applies
        self.clock.advance(1)
        self.assertEqual(self.changes, [("passing", "ok"), ("failing", "refused"),
                                        ("passing", "ok")])

    def test_started_passing_stays_passing_through_failures_within_grace(self):
        # A live migration's target: the guest was passing at the source.
        self.results = ["down", "down"]
        hc = self.check(grace=3, health="passing")
        self.clock.advance(1)
        self.assertEqual((hc.health, hc.detail, self.changes), ("passing", "down", []))
        self.assertEqual(self.calls, 2)
        self.clock.advance(1)  # 3rd probe passes: confirmed, nothing changed
        self.assertEqual((hc.health, self.changes), ("passing", []))
        self.results = ["refused"]
        self.clock.advance(1)  # once confirmed here, a failure counts at once
        self.assertEqual(self.changes, [("failing", "refused")])

    def test_started_passing_fails_after_grace_without_a_pass(self):
        self.results = ["down"] * 10
        hc = self.check(grace=3, health="passing")
        for _ in range(2):
            self.clock.advance(1)
        self.assertEqual((hc.health, self.changes), ("passing", []))
        self.clock.advance(2)
        self.assertEqual((hc.health, self.changes), ("failing", [("failing", "down")]))

    def test_it_starts_only_from_starting_or_passing(self):
        with self.assertRaises(ValueError):
            health.HealthCheck(self.clock, self.probe, 1, 1, lambda h, d: None, health="failing")

    def test_slow_probe_does_not_overlap_and_stop_cancels(self):
        pending = []

        def slow():
            self.calls += 1
            d = Deferred()
            pending.append(d)
            return d

        hc = health.HealthCheck(self.clock, slow, 1, 10, lambda h, d: self.changes.append(h))
        hc.start()
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(self.calls, 1)
        hc.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.changes, [])

    def test_probe_exception_counts_as_failure(self):
        def broken():
            return Deferred.fromCoroutine(self._boom())

        hc = health.HealthCheck(self.clock, broken, 1, 0,
                                lambda h, d: self.changes.append((h, d)))
        hc.start()
        self.addCleanup(hc.stop)
        self.assertEqual(hc.health, "failing")
        self.assertIn("boom", self.changes[0][1])

    async def _boom(self):
        raise RuntimeError("boom")


class _Page(Resource):
    isLeaf = True

    def __init__(self, code):
        Resource.__init__(self)
        self.code = code

    def render_GET(self, request):
        request.setResponseCode(self.code)
        return b"hello"


class _NoLength(Protocol):
    """Answers like busybox httpd's CGI: no Content-Length, the body ends at close."""

    def dataReceived(self, data):
        if b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<p>hi</p>")
            self.transport.loseConnection()


class _Closer(Protocol):
    def connectionMade(self):
        self.transport.loseConnection()


class ProbeTests(TestCase):
    def listen(self, factory):
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def free_port(self):
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        n = port.getHost().port
        port.stopListening()
        return n

    async def test_http(self):
        ok = self.listen(Site(_Page(200)))
        bad = self.listen(Site(_Page(500)))
        self.assertIsNone(await health.http_probe(reactor, "127.0.0.1", ok, "/", 2)())
        nolength = self.listen(Factory.forProtocol(_NoLength))
        self.assertIsNone(await health.http_probe(reactor, "127.0.0.1", nolength, "/", 2)())
        problem = await health.http_probe(reactor, "127.0.0.1", bad, "/x", 2)()
        self.assertIn("answered 500", problem)
        problem = await health.http_probe(reactor, "127.0.0.1", self.free_port(), "/", 2)()
        self.assertIn("failed", problem)

    async def test_tcp(self):
        listening = self.listen(Site(_Page(200)))
        closing = self.listen(Factory.forProtocol(_Closer))
        self.assertIsNone(await health.tcp_probe(reactor, "127.0.0.1", listening, 2, 0.1)())
        problem = await health.tcp_probe(reactor, "127.0.0.1", closing, 2, 0.5)()
        self.assertIn("closed at once", problem)
        port = self.free_port()
        problem = await health.tcp_probe(reactor, "127.0.0.1", port, 2)()
        # (the OS's words, which a health status shows: it said the exception's class)
        self.assertEqual(problem, f"TCP connect to port {port} failed: Connection refused")

    async def test_http_timeout(self):
        silent = self.listen(Factory.forProtocol(Protocol))  # accepts, never answers
        problem = await health.http_probe(reactor, "127.0.0.1", silent, "/", 0.3)()
        self.assertIn("timed out", problem)
