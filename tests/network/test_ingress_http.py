"""
The ingress's HTTP mode over real loopback sockets: kept-alive connections to the replicas,
HTTP/1.1 framing (Content-Length, chunked, to the close, HEAD, 1xx, pipelining,
Connection: close), Upgrade, malformed requests and responses, draining.  The replicas
are small Twisted web servers or scripted protocols on 127.0.0.1.
"""

import socket

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from zwrm.agent.network import proxy
from zwrm.agent.network.proxy import Ingress
from zwrm.testing.processes import free_port


class _App(resource.Resource):
    """A replica: C{/} names it, C{/echo} returns the body, C{/chunked} streams, C{/slow} waits."""

    isLeaf = True

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.seen = []
        self.pending = []

    def render(self, request):
        self.seen.append({k.decode().lower(): b",".join(v).decode()
                          for k, v in request.requestHeaders.getAllRawHeaders()})
        self.seen[-1]["_version"] = request.clientproto.decode()
        if request.path == b"/echo":
            return b"echo:" + request.content.read()
        if request.path == b"/chunked":  # no length: chunked to HTTP/1.1 clients
            request.write(b"part1-")
            request.write(b"part2")
            request.finish()
            return server.NOT_DONE_YET
        if request.path == b"/slow":
            self.pending.append(request)
            return server.NOT_DONE_YET
        return f"replica {self.name}".encode()


class _Counting(WrappingFactory):
    """The replica's listener: counts the connections it accepted; C{protocols} are open."""

    accepted = 0

    def buildProtocol(self, addr):
        self.accepted += 1
        return super().buildProtocol(addr)


class _Raw(Protocol):
    """A client that sends what it is told and keeps every byte it gets."""

    def __init__(self):
        self.data = b""
        self.lost = False

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = True


async def until(check, timeout=5.0, what="condition"):
    """Poll C{check()} every 10 ms until true (at most C{timeout} seconds)."""
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


class _Base(TestCase):
    def replica(self, name="a", app=None):
        app = app or _App(name)
        factory = _Counting(server.Site(app))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return app, factory, port.getHost().port

    def scripted(self, protocol_class):
        port = reactor.listenTCP(0, Factory.forProtocol(protocol_class), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def ingress(self, ports, mode="http", domain=None, **kw):
        """An ingress with one port whose route has the replicas on C{ports}."""
        ing = Ingress(reactor, interface="127.0.0.1", **kw)
        self.addCleanup(ing.close)
        port = free_port()
        self.table = {port: {"mode": mode, "routes": {domain: [
            {"key": f"r{p}", "host": "127.0.0.1", "port": p, "healthy": True}
            for p in ports]}}}
        ing.set_routes(self.table)
        return ing, port

    async def client(self, port, send=b""):
        p = _Raw()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), p)
        self.addCleanup(lambda: p.transport.abortConnection() if not p.lost else None)
        if send:
            p.transport.write(send)
        return p

    async def fetch(self, port, send):
        """Send C{send} on a new connection; everything until the ingress closes it."""
        p = await self.client(port, send)
        await until(lambda: p.lost, what="the ingress to close the connection")
        return p.data


def _bodies(data):
    """The bodies of the responses in C{data} (each with a Content-Length)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = [int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
                  if ln.lower().startswith(b"content-length:")]
        n = length[0] if length else len(rest)
        out.append(rest[:n])
        data = rest[n:]
    return out


class KeepAliveTests(_Base):
    async def test_requests_share_one_connection_to_the_replica(self):
        _, counting, rp = self.replica("a")
        _, port = self.ingress([rp])
        for _ in range(5):  # five clients, a connection each, one after the other
            data = await self.fetch(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            self.assertTrue(data.endswith(b"replica a"), data)
        self.assertEqual(counting.accepted, 1)

    async def test_the_kept_connections_close_when_the_replica_leaves_the_routes(self):
        _, counting, rp = self.replica("a")
        ing, port = self.ingress([rp])
        await self.fetch(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        self.assertEqual(len(counting.protocols), 1)  # kept for the next request
        self.table[port]["routes"][None][0]["healthy"] = False
        ing.set_routes(self.table)
        await until(lambda: not counting.protocols, what="the kept connection to close")

    async def test_a_kept_connection_the_replica_closed_is_not_a_failed_request(self):
        # The replica answers one request per connection and keeps it open, then closes
        # it without a word when the next request comes (a server's idle timeout racing
        # with the request): the ingress retries on a new connection to the same replica.
        class OneEach(Protocol):
            served = False

            def dataReceived(self, data):
                if self.served:
                    self.transport.loseConnection()
                    return
                self.served = True
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        rp = self.scripted(OneEach)
        ing, port = self.ingress([rp])
        for _ in range(3):
            data = await self.fetch(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            self.assertTrue(data.endswith(b"\r\n\r\nok"), data)
        self.assertEqual(ing.listener(port).failed, 0)

    async def test_an_answer_with_connection_close_does_not_keep_the_connection(self):
        class Once(Protocol):  # answers one request, says so, but leaves closing to us
            answered = False

            def dataReceived(self, data):
                if self.answered:
                    return  # a second request on this connection is never answered
                self.answered = True
                self.transport.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                                     b"Content-Length: 4\r\n\r\nonce")

        rp = self.scripted(Once)
        _, port = self.ingress([rp])
        for _ in range(2):
            data = await self.fetch(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            self.assertTrue(data.endswith(b"\r\n\r\nonce"), data)
            self.assertNotIn(b"Connection:", data)  # this hop's header stays here

    async def test_a_kept_connection_that_dies_later_skips_the_replica(self):
        # The same replica, but the kept connection is lost long after the request went
        # out (STALE_WINDOW made 0 here): the replica took the request and went silent
        # (its VM killed; the kernel gives up after UNACKED_MS), so it is not asked again.
        class OneEach(Protocol):
            served = False

            def dataReceived(self, data):
                if self.served:
                    self.transport.abortConnection()
                    return
                self.served = True
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        self.patch(proxy, "STALE_WINDOW", 0.0)
        factory = _Counting(Factory.forProtocol(OneEach))
        lp = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(lp.stopListening)
        ing, port = self.ingress([lp.getHost().port])
        data = await self.fetch(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        self.assertTrue(data.endswith(b"ok"), data)
        data = await self.fetch(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        self.assertIn(b" 503 ", data.split(b"\r\n")[0])  # no other replica
        self.assertEqual((factory.accepted, ing.listener(port).failed), (1, 1))

    async def test_kept_connections_give_up_on_unacknowledged_bytes(self):
        _, _, rp = self.replica("a")
        ing, port = self.ingress([rp])
        await self.fetch(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        (up,) = ing.listener(port).routes[None].backends[f"r{rp}"].idle
        sock = up.transport.getHandle()
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                         proxy.UNACKED_MS)

    async def test_a_slow_idle_connection_is_not_reused(self):
        _, counting, rp = self.replica("a")
        self.patch(proxy, "POOL_IDLE", 0.0)
        _, port = self.ingress([rp])
        await self.fetch(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        await deferLater(reactor, 0.02, lambda: None)
        await self.fetch(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        self.assertEqual(counting.accepted, 2)


class FramingTests(_Base):
    async def test_keep_alive_and_pipelining_in_order_each_request_balanced(self):
        (a, _, pa), (b, _, pb) = self.replica("a"), self.replica("b")
        _, port = self.ingress([pa, pb])
        req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        c = await self.client(port, req * 3 + b"GET /echo HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 3\r\n\r\nabc")
        await until(lambda: len(_bodies(c.data)) == 4 and _bodies(c.data)[-1] == b"echo:abc")
        bodies = _bodies(c.data)
        self.assertEqual(sorted(set(bodies[:3])), [b"replica a", b"replica b"])
        self.assertFalse(c.lost)  # HTTP/1.1: still open for the next request
        c.transport.write(req)
        await until(lambda: len(_bodies(c.data)) == 5)
        self.assertEqual(len(a.seen) + len(b.seen), 5)

    async def test_connection_close_ends_the_connection_after_the_response(self):
        _, _, rp = self.replica("a")
        _, port = self.ingress([rp])
        data = await self.fetch(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertIn(b"\r\nConnection: close\r\n", data)
        self.assertTrue(data.endswith(b"replica a"))

    async def test_request_bodies_content_length_and_chunked(self):
        app, _, rp = self.replica("a")
        _, port = self.ingress([rp])
        big = b"z" * 100000  # beyond what is kept for a replay: streamed with backpressure
        data = await self.fetch(port, b"POST /echo HTTP/1.0\r\nHost: x\r\nContent-Length: "
                                + str(len(big)).encode() + b"\r\n\r\n" + big)
        self.assertTrue(data.endswith(b"echo:" + big))
        c = await self.client(port, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await deferLater(reactor, 0.05, lambda: None)
        c.transport.write(b"2;ext=1\r\nde\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: c.data.endswith(b"replica a"))
        self.assertEqual(_bodies(c.data), [b"echo:abcde", b"replica a"])
        self.assertEqual(app.seen[-2]["transfer-encoding"], "chunked")

    async def test_chunked_responses_pass_to_http11_and_are_decoded_for_http10(self):
        _, _, rp = self.replica("a")
        _, port = self.ingress([rp])
        c = await self.client(port, b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: c.data.endswith(b"0\r\n\r\n"))
        self.assertIn(b"Transfer-Encoding: chunked", c.data)
        self.assertIn(b"6\r\npart1-\r\n5\r\npart2\r\n0\r\n\r\n", c.data)
        self.assertFalse(c.lost)
        data = await self.fetch(port, b"GET /chunked HTTP/1.0\r\nHost: x\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertNotIn(b"chunked", head.lower())
        self.assertEqual(body, b"part1-part2")

    async def test_head_has_no_body_and_the_connection_goes_on(self):
        _, _, rp = self.replica("a")
        _, port = self.ingress([rp])
        c = await self.client(port, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
                              b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: c.data.endswith(b"replica a"))
        first, _, second = c.data.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: 9", first)
        self.assertTrue(second.startswith(b"HTTP/1.1 200"), second)

    async def test_100_continue_to_http11_clients_only(self):
        _, _, rp = self.replica("a")
        _, port = self.ingress([rp])
        c = await self.client(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                              b"Expect: 100-continue\r\n\r\n")
        await until(lambda: c.data.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"))
        c.transport.write(b"hi")
        await until(lambda: c.data.endswith(b"echo:hi"))
        data = await self.fetch(port, b"POST /echo HTTP/1.0\r\nHost: x\r\nContent-Length: 2\r\n"
                                b"Expect: 100-continue\r\n\r\nhi")
        self.assertTrue(data.startswith(b"HTTP/1.1 200"), data)

    async def test_a_response_ended_by_the_close(self):
        class Old(Protocol):
            def dataReceived(self, data):
                self.transport.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
                self.transport.loseConnection()

        ing, port = self.ingress([self.scripted(Old)])
        c = await self.client(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: c.lost)
        self.assertTrue(c.data.endswith(b"\r\nConnection: close\r\n\r\nuntil the end"), c.data)

    async def test_a_head_with_bare_line_feeds(self):
        # As a CGI script behind busybox httpd writes it (the test image's web page).
        class Cgi(Protocol):
            def dataReceived(self, data):
                self.transport.write(b"HTTP/1.1 200 OK\r\n")
                self.transport.write(b"Content-Type: text/html\n\n<html>page</html>\n")
                self.transport.loseConnection()

        _, port = self.ingress([self.scripted(Cgi)])
        for version in (b"1.1", b"1.0"):
            data = await self.fetch(port, b"GET / HTTP/" + version + b"\r\nHost: x\r\n\r\n")
            head, _, body = data.partition(b"\r\n\r\n")
            self.assertEqual(head.split(b"\r\n")[:2], [b"HTTP/1.1 200 OK",
                                                       b"Content-Type: text/html"], data)
            self.assertNotIn(b"\n", head.replace(b"\r\n", b""))
            self.assertEqual(body, b"<html>page</html>\n")

    async def test_request_heads_with_bare_line_feeds(self):
        # RFC 9112 2.2: a bare LF ends a line (printf-made requests, old clients).  The
        # replica gets the head with CRLFs, the Host routed and the body framed as usual.
        app, _, rp = self.replica("a")
        _, port = self.ingress([rp], domain="a.test")
        data = await self.fetch(port, b"GET / HTTP/1.0\nHost: a.test\nX-One: 1\n\n")
        self.assertTrue(data.endswith(b"replica a"), data)
        self.assertEqual(app.seen[-1]["x-one"], "1")
        # Mixed line ends, a body after the head, then a pipelined request with CRLFs:
        # the blank line that ends the head is the first one, whatever its form.
        c = await self.client(port, b"POST /echo HTTP/1.1\r\nHost: a.test\nContent-Length: 8"
                              b"\r\n\nab\r\n\r\ncd" + b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        await until(lambda: c.data.endswith(b"replica a"))
        self.assertEqual(_bodies(c.data), [b"echo:ab\r\n\r\ncd", b"replica a"])
        self.assertEqual(app.seen[-2]["content-length"], "8")

    async def test_a_replica_that_breaks_off_in_its_head_is_a_502(self):
        class Half(Protocol):
            def dataReceived(self, data):
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Le")
                self.transport.loseConnection()

        _, port = self.ingress([self.scripted(Half)])
        data = await self.fetch(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 502 "), data)

    async def test_hop_by_hop_and_forwarding_headers(self):
        app, _, rp = self.replica("a")
        _, port = self.ingress([rp], domain="a.test")
        await self.fetch(port, b"GET / HTTP/1.1\r\nHost: A.test:8000\r\nConnection: close, X-Secret"
                         b"\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nX-Forwarded-For: 6.6.6.6\r\n"
                         b"X-Other: kept\r\n\r\n")
        seen = app.seen[-1]
        for gone in ("connection", "x-secret", "keep-alive"):
            self.assertNotIn(gone, seen)
        self.assertEqual((seen["x-forwarded-for"], seen["x-forwarded-host"],
                          seen["x-forwarded-proto"], seen["x-other"], seen["_version"]),
                         ("127.0.0.1", "a.test", "http", "kept", "HTTP/1.1"))


class UpgradeTests(_Base):
    async def test_101_joins_both_sides(self):
        class Echo(Protocol):
            upgraded = False

            def dataReceived(self, data):
                if not self.upgraded:
                    assert b"\r\nUpgrade: echo\r\n" in data and b"Connection: Upgrade" in data
                    self.upgraded = True
                    self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\n"
                                         b"Upgrade: echo\r\nConnection: Upgrade\r\n\r\nhello ")
                    return
                self.transport.write(data.upper())

        _, port = self.ingress([self.scripted(Echo)])
        c = await self.client(port, b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\n"
                              b"Connection: Upgrade\r\n\r\n")
        await until(lambda: c.data.endswith(b"hello "))
        c.transport.write(b"shout")
        await until(lambda: c.data.endswith(b"hello SHOUT"))

    async def test_an_upgrade_the_replica_declines_is_a_plain_request(self):
        app, counting, rp = self.replica("a")
        _, port = self.ingress([rp])
        data = await self.fetch(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        c = await self.client(port, b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\n\r\n")
        await until(lambda: c.data.endswith(b"replica a"))
        self.assertTrue(data.endswith(b"replica a"))
        self.assertEqual(app.seen[-1]["upgrade"], "websocket")
        self.assertEqual(counting.accepted, 2)  # an upgrade gets a connection of its own


class BadInputTests(_Base):
    async def test_malformed_requests_are_refused_and_reach_no_replica(self):
        app, counting, rp = self.replica("a")
        _, port = self.ingress([rp])
        cases = {
            b"GARBAGE\r\n\r\n": b"400",
            b"GET / HTTP/1.1\r\n\r\n": b"400",  # no Host
            b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n": b"400",
            b"GET / HTTP/2.0\r\nHost: x\r\n\r\n": b"505",
            b"GET / HTTP/1.1\r\nHost: x\r\nX: a\rY: b\r\n\r\n": b"400",  # a bare CR
            b"GET / HTTP/1.1\nHost: x\nX: a\rY: b\n\n": b"400",  # the same, LF heads
            b"GET / HTTP/1.1\rHost: x\r\n\r\n": b"400",
            b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n": b"400",
            b"GET / HTTP/1.1\r\nHost : x\r\n\r\n": b"400",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n": b"400",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n": b"400",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n": b"400",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n": b"400",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n": b"405",
            b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 20000: b"431",
        }
        for request, status in cases.items():
            data = await self.fetch(port, request)
            self.assertEqual(data.split(b"\r\n")[0][9:12], status, request)
        self.assertEqual((app.seen, counting.accepted), ([], 0))
        c = await self.client(port, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n")
        await until(lambda: c.lost)
        self.assertIn(b" 400 ", c.data.split(b"\r\n")[0])
        self.assertEqual(counting.accepted, 0)  # refused by the ingress, not the replica

    async def test_a_malformed_response_is_a_502(self):
        class Bad(Protocol):
            def dataReceived(self, data):
                self.transport.write(b"SPDY nonsense\r\n\r\n")

        _, port = self.ingress([self.scripted(Bad)])
        data = await self.fetch(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 502 "), data)


class DrainTests(_Base):
    async def test_a_drained_replica_finishes_its_response_then_gets_cut(self):
        (a, _, pa), (_, _, pb) = self.replica("a"), self.replica("b")
        ing, port = self.ingress([pa], drain_timeout=0.5)
        slow = await self.client(port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: a.pending)
        # a is stopped on purpose: b takes its place.
        self.table[port]["routes"][None] = [
            {"key": "b", "host": "127.0.0.1", "port": pb, "healthy": True}]
        ing.set_routes(self.table)
        data = await self.fetch(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        self.assertTrue(data.endswith(b"replica b"), data)
        a.pending[0].write(b"still here")  # the open exchange goes on within the timeout
        await until(lambda: b"still here" in slow.data)
        self.assertFalse(slow.lost)
        await until(lambda: slow.lost, what="the drain timeout to cut it")

    async def test_kept_alive_clients_between_requests_are_closed_with_the_port(self):
        _, _, rp = self.replica("a")
        ing, port = self.ingress([rp])
        idle = await self.client(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: idle.data.endswith(b"replica a"))
        ing.set_routes({})  # the port is no longer published
        await until(lambda: idle.lost, what="the idle client to be closed")

    async def test_a_client_of_a_port_no_longer_published_is_closed_after_its_answer(self):
        a, _, rp = self.replica("a")
        ing, port = self.ingress([rp])
        busy = await self.client(port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: a.pending)
        ing.set_routes({})
        a.pending.pop().finish()
        await until(lambda: busy.lost, what="the client to be closed after its answer")
        self.assertTrue(busy.data.startswith(b"HTTP/1.1 200 "), busy.data)

    async def test_idle_clients_are_closed_after_the_keepalive_timeout(self):
        # The proxy and these clients share one reactor, so a stalled test process cannot
        # let the timeout pass between a check and the next step; 1 s leaves room anyway.
        a, _, rp = self.replica("a")
        ing, port = self.ingress([rp], keepalive_timeout=1.0)
        self.assertEqual(Ingress(reactor).keepalive_timeout, proxy.KEEPALIVE_TIMEOUT)
        # A request in flight longer than the timeout is not cut ...
        busy = await self.client(port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: a.pending)
        # ... a client that began a head and did not finish it is refused (408) ...
        partial = await self.client(port, b"GET / HTTP/1.1\r\nHo")
        # ... and a kept-alive client that sends nothing more after its answer is closed.
        idle = await self.client(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: idle.data.endswith(b"replica a"))
        self.assertFalse(idle.lost)
        await until(lambda: idle.lost and partial.lost, what="the idle clients to be closed")
        self.assertEqual(idle.data.count(b"HTTP/1.1"), 1)  # without a word
        self.assertTrue(partial.data.startswith(b"HTTP/1.1 408 "), partial.data)
        self.assertFalse(busy.lost)
        a.pending.pop().finish()
        await until(lambda: busy.data.endswith(b"replica a") or busy.data.endswith(b"\r\n\r\n"))
        # Its next request may come within the timeout after its answer, not from its start.
        busy.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: busy.data.endswith(b"replica a"))
        await until(lambda: busy.lost, what="the client idle after its answers to be closed")
        self.assertEqual(len(ing.listener(port).clients), 0)

    async def test_least_connections_per_request(self):
        (a, _, pa), (b, _, pb) = self.replica("a"), self.replica("b")
        _, port = self.ingress([pa, pb])
        held = []
        for _ in range(2):
            c = await self.client(port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            held.append(c)
            await until(lambda: len(a.pending) + len(b.pending) == len(held))
        self.assertEqual((len(a.pending), len(b.pending)), (1, 1))
        a.pending.pop().finish()
        # a has none in flight, b has one: the next two requests both go to a.
        for _ in range(2):
            data = await self.fetch(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            self.assertTrue(data.endswith(b"replica a"), data)
        b.pending.pop().finish()
