"""The ingress proxy over real loopback sockets (replicas are small web servers)."""

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from tests.network.helpers import http_get
from zwrm.agent.network.proxy import Ingress, forward_loopback
from zwrm.testing.processes import free_port


class _Page(resource.Resource):
    isLeaf = True

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.seen = []

    def render_GET(self, request):
        self.seen.append({k.decode().lower(): v.decode()
                          for k, v in request.requestHeaders.getAllRawHeaders() for v in v})
        return f"replica {self.name}".encode()


class IngressTests(TestCase):
    def replica(self, name):
        page = _Page(name)
        port = reactor.listenTCP(0, server.Site(page), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return page, port

    def ingress(self, **kw):
        ing = Ingress(reactor, interface="127.0.0.1", **kw)
        self.addCleanup(ing.close)
        return ing

    async def get(self, port, host=None):
        data = await http_get(reactor, "127.0.0.1", port, host_header=host)
        return data.split(b"\r\n\r\n", 1)[-1].decode()

    async def test_round_robin_and_failover_with_no_failed_request(self):
        (_, pa), (_, pb) = self.replica("a"), self.replica("b")
        ing = self.ingress()
        port = free_port()
        table = {port: {"mode": "tcp", "routes": {None: [
            {"key": "a", "host": "127.0.0.1", "port": pa.getHost().port, "healthy": True},
            {"key": "b", "host": "127.0.0.1", "port": pb.getHost().port, "healthy": True}]}}}
        ing.set_routes(table)
        got = [await self.get(port) for _ in range(6)]
        self.assertEqual(sorted(set(got)), ["replica a", "replica b"])
        # Replica a dies (the ingress has not heard yet): every request still succeeds.
        await pa.stopListening()
        got = [await self.get(port) for _ in range(6)]
        self.assertEqual(set(got), {"replica b"})
        self.assertEqual(ing.listener(port).failed, 0)
        # Its health check fails: it is no longer tried at all.
        table[port]["routes"][None][0]["healthy"] = False
        ing.set_routes(table)
        self.assertEqual([b.key for b in ing.listener(port).routes[None].candidates()], ["b"])
        # No replica: a refusal, counted.
        await pb.stopListening()
        self.assertEqual(await self.get(port), "")
        self.assertEqual(ing.listener(port).failed, 1)

    async def test_http_routes_by_host_and_adds_forwarding_headers(self):
        (a, pa), (_, pb) = self.replica("a"), self.replica("b")
        ing = self.ingress()
        port = free_port()
        ing.set_routes({port: {"mode": "http", "routes": {
            "a.example.test": [{"key": "a", "host": "127.0.0.1", "port": pa.getHost().port}],
            "b.example.test": [{"key": "b", "host": "127.0.0.1", "port": pb.getHost().port}]}}})
        self.assertEqual(await self.get(port, "a.example.test"), "replica a")
        self.assertEqual(await self.get(port, "b.example.test"), "replica b")
        self.assertEqual(a.seen[-1]["x-forwarded-for"], "127.0.0.1")
        self.assertEqual(a.seen[-1]["x-forwarded-host"], "a.example.test")
        self.assertEqual(a.seen[-1]["x-forwarded-proto"], "http")
        raw = await http_get(reactor, "127.0.0.1", port, headers=None)
        self.assertIn(b"404", raw.split(b"\r\n")[0])  # Host 127.0.0.1: no such app

    async def test_drain_keeps_open_connections_until_the_timeout(self):
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.protocol import Protocol

        _, pa = self.replica("a")
        ing = self.ingress(drain_timeout=0.5)
        port = free_port()
        entry = {"key": "a", "host": "127.0.0.1", "port": pa.getHost().port}
        ing.set_routes({port: {"mode": "tcp", "routes": {None: [entry]}}})
        lost = []

        class Idle(Protocol):
            def connectionLost(self, reason):
                lost.append(reactor.seconds())

        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Idle())
        for _ in range(50):
            if ing.listener(port).routes[None].backends["a"].conns:
                break
            await deferLater(reactor, 0.02, lambda: None)
        start = reactor.seconds()
        ing.set_routes({port: {"mode": "tcp", "routes": {None: []}}})  # a is drained
        self.assertEqual(await self.get(port), "")  # no new connection goes to it
        await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(lost, [])  # the open one stays until the drain timeout
        for _ in range(100):
            if lost:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(lost and lost[0] - start >= 0.45, lost)

    async def test_loopback_forward(self):
        _, pa = self.replica("a")
        lp = forward_loopback(reactor, "127.0.0.1", pa.getHost().port)
        self.addCleanup(lp.stopListening)
        self.assertEqual(lp.getHost().host, "127.0.0.1")
        self.assertEqual(await self.get(lp.getHost().port), "replica a")



class _Dies(Protocol):
    """A replica whose service is going away: it accepts, then closes without a word."""

    def dataReceived(self, data):
        self.transport.loseConnection()


class ReplayTests(TestCase):
    async def test_a_replica_that_closes_before_answering_gets_no_request_lost(self):
        good = reactor.listenTCP(0, server.Site(_Page("good")), interface="127.0.0.1")
        self.addCleanup(good.stopListening)
        dying = reactor.listenTCP(0, Factory.forProtocol(_Dies), interface="127.0.0.1")
        self.addCleanup(dying.stopListening)
        ing = Ingress(reactor, interface="127.0.0.1")
        self.addCleanup(ing.close)
        port = free_port()
        ing.set_routes({port: {"mode": "tcp", "routes": {None: [
            {"key": "dying", "host": "127.0.0.1", "port": dying.getHost().port},
            {"key": "good", "host": "127.0.0.1", "port": good.getHost().port}]}}})
        for _ in range(6):
            raw = await http_get(reactor, "127.0.0.1", port)
            self.assertTrue(raw.endswith(b"replica good"), raw)
