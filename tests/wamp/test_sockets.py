"""
The router on real loopback sockets, with autobahn-python clients: WebSocket and
RawSocket, JSON / MsgPack / CBOR, with and without TLS.
"""

import datetime
import gc
import weakref

from autobahn.twisted.rawsocket import WampRawSocketClientFactory
from autobahn.twisted.wamp import ApplicationSession
from autobahn.twisted.websocket import WampWebSocketClientFactory
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import ComponentConfig, PublishOptions, SubscribeOptions
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, ssl, task, tcp
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint
from twisted.protocols import policies
from twisted.python.filepath import FilePath
from twisted.trial import unittest

from tests.wamp.helpers import make_authenticator, make_authorizer
from zwrm.errors import NotFound
from zwrm.wamp.router import Router, RouterLimits
from zwrm.wamp.transport import WampWebSocketClientFactory as QuietClientFactory
from zwrm.wamp.transport import listen, make_serializers

TIMEOUT = 15


def make_cert(directory):
    """A self-signed certificate for 127.0.0.1 / localhost; returns (key path, cert path, PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    kp = directory.child("key.pem")
    cp = directory.child("cert.pem")
    kp.setContent(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cp.setContent(pem)
    return kp.path, cp.path, pem


class Client(ApplicationSession):
    """Joins with ticket auth and exercises CALL, REGISTER, PUBLISH, SUBSCRIBE."""

    def __init__(self, authid, ticket, done):
        ApplicationSession.__init__(self, ComponentConfig(realm="zwrm"))
        self.my_authid, self.ticket, self.done = authid, ticket, done

    def onConnect(self):
        self.join("zwrm", authmethods=["ticket"], authid=self.my_authid)

    def onChallenge(self, challenge):
        return self.ticket

    def onLeave(self, details):
        if not self.done.called:
            self.done.errback(ApplicationError(details.reason, details.message))
        ApplicationSession.onLeave(self, details)

    async def onJoin(self, details):
        try:
            out = {"authrole": details.authrole}

            def echo(*args, **kwargs):
                return [args, kwargs]

            def fail():
                raise NotFound("nothing here")

            await self.register(echo, "test.echo")
            await self.register(fail, "test.fail")
            out["echo"] = await self.call("test.echo", 1, "two", {"three": 3.0}, k=[b"\x00\x01".hex()])
            try:
                await self.call("test.fail")
            except ApplicationError as e:
                out["error"] = (e.error, e.args)
            got = defer.Deferred()
            await self.subscribe(lambda *a, **kw: got.callback((a, kw)), "test.",
                                 options=SubscribeOptions(match="prefix"))
            await self.publish("test.topic", "ev", n=1, options=PublishOptions(acknowledge=True, exclude_me=False))
            out["event"] = await got.addTimeout(TIMEOUT, reactor)
            out["count"] = await self.call("wamp.session.count")
            self.done.callback(out)
        except Exception as e:
            self.done.errback(e)
        self.leave()


class _SocketBase(unittest.TestCase):
    timeout = 60
    limits = RouterLimits()

    @defer.inlineCallbacks
    def setUp(self):
        self.router = Router(reactor, make_authenticator(), make_authorizer(), limits=self.limits)
        tmp = FilePath(self.mktemp())
        tmp.makedirs()
        self.key, self.cert, self.pem = make_cert(tmp)
        self.ports = {}
        for kind in ("websocket", "rawsocket"):
            p = yield listen(reactor, self.router, "tcp:0:interface=127.0.0.1", kind=kind)
            self.ports[(kind, False)] = p
            p = yield listen(reactor, self.router,
                             f"ssl:0:privateKey={self.key}:certKey={self.cert}:interface=127.0.0.1", kind=kind)
            self.ports[(kind, True)] = p
        for p in self.ports.values():
            self.addCleanup(p.stopListening)

    @defer.inlineCallbacks
    def run_client(self, kind, tls, serializer, authid="op", ticket="op-ticket"):
        port = self.ports[(kind, tls)].getHost().port
        done = defer.Deferred()
        session = Client(authid, ticket, done)
        ser = make_serializers([serializer])
        if kind == "websocket":
            scheme = "wss" if tls else "ws"
            factory = WampWebSocketClientFactory(lambda: session, url=f"{scheme}://localhost:{port}/ws",
                                                 serializers=ser)
        else:
            factory = WampRawSocketClientFactory(lambda: session, serializer=ser[0])
        if tls:
            trust = ssl.Certificate.loadPEM(self.pem)
            ep = SSL4ClientEndpoint(reactor, "127.0.0.1", port, ssl.optionsForClientTLS("localhost", trust))
        else:
            ep = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        proto = yield ep.connect(factory)
        try:
            result = yield done.addTimeout(TIMEOUT, reactor)
        finally:
            yield self._closed(proto)
        return result

    def _closed(self, proto):
        d = defer.Deferred()
        if not getattr(proto, "transport", None) or not proto.transport.connected:
            return defer.succeed(None)
        orig = proto.connectionLost

        def lost(reason):
            orig(reason)
            if not d.called:
                d.callback(None)

        proto.connectionLost = lost
        proto.transport.loseConnection()
        return d.addTimeout(TIMEOUT, reactor)

    def check(self, out):
        self.assertEqual(out["authrole"], "operator")
        self.assertEqual(out["echo"], [[1, "two", {"three": 3.0}], {"k": ["0001"]}])
        self.assertEqual(out["error"], ("zwrm.error.not_found", ("nothing here",)))
        self.assertEqual(out["event"], (("ev",), {"n": 1}))
        self.assertGreaterEqual(out["count"], 1)


class SocketTests(_SocketBase):
    """Generated below: one test per transport x TLS x serializer."""


def _make(kind, tls, serializer):
    @defer.inlineCallbacks
    def test(self):
        out = yield self.run_client(kind, tls, serializer)
        self.check(out)

    test.__name__ = f"test_{kind}_{'tls' if tls else 'plain'}_{serializer}"
    return test


for _kind in ("websocket", "rawsocket"):
    for _tls in (False, True):
        for _ser in ("json", "msgpack", "cbor"):
            _t = _make(_kind, _tls, _ser)
            setattr(SocketTests, _t.__name__, _t)


class SocketFailureTests(_SocketBase):
    """Bad credentials over a real socket get a readable ABORT, and the router keeps serving."""

    @defer.inlineCallbacks
    def test_bad_ticket_then_good(self):
        try:
            yield self.run_client("websocket", False, "json", ticket="wrong")
        except ApplicationError as e:
            self.assertEqual(e.error, "wamp.error.authentication_failed")
            self.assertIn("op", e.args[0])
        else:
            self.fail("a wrong ticket was accepted")
        out = yield self.run_client("rawsocket", True, "msgpack")
        self.check(out)


class Joined(ApplicationSession):
    """A ticket-authenticated session that just joins."""

    def __init__(self, authid, ticket, joined):
        ApplicationSession.__init__(self, ComponentConfig(realm="zwrm"))
        self.my_authid, self.ticket, self.joined = authid, ticket, joined

    def onConnect(self):
        self.join("zwrm", authmethods=["ticket"], authid=self.my_authid)

    def onChallenge(self, challenge):
        return self.ticket

    def onJoin(self, details):
        self.joined.callback(self)

    def onLeave(self, details):
        if not self.joined.called:
            self.joined.errback(ApplicationError(details.reason, details.message))
        ApplicationSession.onLeave(self, details)


class SocketLimitTests(_SocketBase):
    limits = RouterLimits(max_message_size=64 * 1024, max_outgoing_queue=64 * 1024)

    @defer.inlineCallbacks
    def join(self, authid="op", ticket="op-ticket", serializer="json", kind="websocket"):
        port = self.ports[(kind, False)].getHost().port
        joined = defer.Deferred()
        if kind in ("websocket", "wrapped"):
            factory = QuietClientFactory(lambda: Joined(authid, ticket, joined),
                                         url=f"ws://127.0.0.1:{port}/ws", serializers=make_serializers([serializer]))
        else:
            factory = WampRawSocketClientFactory(lambda: Joined(authid, ticket, joined),
                                                 serializer=make_serializers([serializer])[0])
        proto = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        session = yield joined.addTimeout(TIMEOUT, reactor)
        self.addCleanup(self._closed, proto)
        return session, proto

    @defer.inlineCallbacks
    def poll(self, condition, timeout=TIMEOUT):
        deadline = reactor.seconds() + timeout
        while not condition():
            if reactor.seconds() > deadline:
                self.fail("condition not reached in time")
            yield task.deferLater(reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def test_session_details_over_tcp(self):
        s, _ = yield self.join()
        details = yield s.call("wamp.session.get", s._session_id)
        self.assertEqual(details["authid"], "op")
        self.assertEqual(details["transport"]["type"], "tcp")
        self.assertEqual(details["transport"]["framing"], "websocket")
        self.assertEqual(details["transport"]["serializer"], "json")
        self.assertTrue(details["transport"]["peer"].startswith("tcp4:127.0.0.1:"))

    @defer.inlineCallbacks
    def test_oversized_message_closes_only_that_session(self):
        big, big_proto = yield self.join("op")
        other, _ = yield self.join("op2", "op2-ticket")
        self.assertEqual(self.router.session_count(), 2)
        big.publish("test.t", "x" * (128 * 1024))
        yield self.poll(lambda: self.router.session_count() == 1)
        self.assertEqual((yield other.call("wamp.session.count")), 1)

    @defer.inlineCallbacks
    def test_slow_subscriber_events_dropped_memory_bounded(self):
        slow, slow_proto = yield self.join("op", serializer="msgpack")
        yield slow.subscribe(lambda *a: None, "test.flood")
        pub, _ = yield self.join("host1", "h1-ticket", serializer="msgpack")
        rs = self.router.get_session(slow._session_id)
        slow_proto.transport.pauseProducing()  # the subscriber stops reading
        payload = "y" * 8000
        worst = 0
        for i in range(2000):
            pub.publish("test.flood", i, payload)
            if i % 50 == 0:
                yield task.deferLater(reactor, 0, lambda: None)
                worst = max(worst, rs.unsent_bytes())
        yield self.poll(lambda: self.router.stats.publications >= 2000)
        worst = max(worst, rs.unsent_bytes())
        self.assertGreater(rs.dropped_events, 0)
        self.assertLessEqual(worst, 64 * 1024 + 20000)
        # the router still serves everyone, and the slow session is still joined
        self.assertIsNotNone(self.router.get_session(slow._session_id))
        yield pub.publish("test.flood", "last", options=PublishOptions(acknowledge=True))
        slow_proto.transport.resumeProducing()


    @defer.inlineCallbacks
    def check_freed(self, kind):
        sessions = set()
        for serializer in ("json", "msgpack"):
            s, proto = yield self.join("op", serializer=serializer, kind=kind)
            sessions.add(s._session_id)
            yield s.subscribe(lambda *a: None, "test.t")
            yield s.register(lambda x: x, "test.echo")
            self.assertEqual((yield s.call("test.echo", 5)), 5)
            rs = self.router.get_session(s._session_id)
            session_ref, protocol_ref = weakref.ref(rs), weakref.ref(rs.transport)
            tcp_ref = weakref.ref(rs.transport.transport)  # (WebSocket) also held by the HTTP request it came in
            del rs
            gc.collect()
            gc.disable()
            try:
                yield self._closed(proto)
                yield self.poll(lambda: self.router.session_count() == 0)
                yield task.deferLater(reactor, 0, lambda: None)
                # freed without the cycle collector: the router's session, the server's
                # protocol, and the connection (with the HTTP objects a WebSocket came in)
                self.assertIsNone(session_ref())
                self.assertIsNone(protocol_ref())
                self.assertIsNone(tcp_ref())
                # and nothing else of the server's side waits in a cycle
                self.assertEqual(_server_side_cyclic_garbage(self.ports[(kind, False)], sessions), [])
            finally:
                gc.enable()
            del s, proto

    def test_closed_websocket_session_is_freed_by_reference_counting(self):
        return self.check_freed("websocket")

    def test_closed_rawsocket_session_is_freed_by_reference_counting(self):
        return self.check_freed("rawsocket")

    @defer.inlineCallbacks
    def test_socket_answers_are_sent_within_the_read(self):
        """
        What the router writes while it handles a read (the INVOCATION to the callee, the
        RESULT to the caller) goes to the socket before the read's handling returns, with
        one send() and without asking the reactor to report the socket writable (a second
        reactor turn and two epoll_ctl calls each); WebSocket on the router's own listener
        and behind a plain wrapper, as the control plane serves it, and RawSocket.
        """
        yield self.listen_wrapped()
        for kind in ("websocket", "wrapped", "rawsocket"):
            callee, _ = yield self.join("op", kind=kind)
            yield callee.register(lambda x: x, f"test.echo_{kind}")
            caller, _ = yield self.join("op2", "op2-ticket", serializer="msgpack", kind=kind)
            started = []
            for s in (callee, caller):
                t = self.router.get_session(s._session_id).transport.transport
                while isinstance(t, policies.ProtocolWrapper):  # the TCP connection under it
                    t = t.transport
                self.assertIsInstance(t, tcp.Server)
                t.startWriting = lambda t=t, start=t.startWriting, seen=started: (seen.append(t), start())
            for i in range(20):
                self.assertEqual((yield caller.call(f"test.echo_{kind}", i)), i)
            self.assertEqual(started, [], kind)

    def test_closed_session_behind_a_wrapped_site_is_freed_by_reference_counting(self):
        d = self.listen_wrapped()
        d.addCallback(lambda _: self.check_freed("wrapped"))
        return d

    def listen_wrapped(self):
        # as the control plane serves it: the router's resource on a web tree with its own
        # request class, behind a protocol wrapper (its plain-only listener)
        from twisted.internet.endpoints import serverFromString
        from twisted.web import resource, server

        from zwrm.wamp.transport import RouterWebSocketResource, websocket_factory

        class Wrapper(policies.ProtocolWrapper):
            pass

        class Request(server.Request):
            pass

        root = resource.Resource()
        root.putChild(b"ws", RouterWebSocketResource(websocket_factory(self.router)))
        site = server.Site(root, requestFactory=Request)
        factory = policies.WrappingFactory(site)
        factory.protocol = Wrapper
        d = serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)

        def listening(port):
            self.addCleanup(port.stopListening)
            self.ports[("wrapped", False)] = port

        return d.addCallback(listening)


def _server_side_cyclic_garbage(port, sessions):
    """
    What a full collection finds unreachable of the server's side of a connection to C{port}:
    the router's and its transports' objects, Twisted's server connections and HTTP objects,
    and autobahn objects that hang off them (the clients in this process leave their own
    cycles, which do not count; nor do the connections of an earlier test's listeners, whose
    teardown may end while this one runs: a CI run saw a TLS connection's). A router session
    is told by its id, one of C{sessions}: a CI run counted another test's detached session,
    which has no transport to lead to its listener, and another (12-04) a session whose
    protocol had let go of its TCP transport, which the walk down the transports then gave
    to this listener by default.
    """
    from twisted.internet.tcp import Server
    from twisted.protocols.policies import ProtocolWrapper
    from twisted.web.http import HTTPChannel, Request

    from zwrm.wamp import router as router_module
    from zwrm.wamp import transport as transport_module

    server_types = (Server, HTTPChannel, Request, ProtocolWrapper, router_module.RouterSession,
                    transport_module.WampWebSocketServerProtocol, transport_module.WampRawSocketServerProtocol)

    def listener(o):
        # the listening port an object's connection came in on, down its transports
        if isinstance(o, router_module.RouterSession):
            return port if o.session_id in sessions else None
        for _ in range(8):
            if isinstance(o, Server):
                return o.server
            o = getattr(o, "channel", None) or getattr(o, "transport", None)
        return port

    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return [repr(o)[:120] for o in gc.garbage
                if isinstance(o, server_types) and listener(o) is port]
    finally:
        gc.set_debug(0)
        del gc.garbage[:]


class _InProcess(ApplicationSession):
    """An in-process session, as the control plane's is."""

    async def onJoin(self, details):
        pass


class LargeMessageTests(_SocketBase):
    """
    What waits toward a session is counted before each message is added: one message larger
    than four times C{max_outgoing_queue} reaches its callee (the control plane's calls to an
    agent may carry megabytes), and a callee that stops reading is cut off at the next one.
    """

    limits = RouterLimits(max_outgoing_queue=64 * 1024)
    join = SocketLimitTests.join

    @defer.inlineCallbacks
    def test_a_large_invocation_reaches_its_callee(self):
        agent, proto = yield self.join("host1", "h1-ticket")
        yield agent.register(len, "zwrm.agent.host1.size")
        ctl = yield self.router.attach(_InProcess(ComponentConfig(realm="zwrm")), "ctl",
                                       "trusted")
        for n in (1 << 20, 4 << 20):  # 4 and 16 times the hard limit of 256 KiB
            got = yield ctl.call("zwrm.agent.host1.size", "a" * n).addTimeout(TIMEOUT, reactor)
            self.assertEqual(got, n)
        self.assertIsNotNone(self.router.get_session(agent._session_id))

    @defer.inlineCallbacks
    def test_a_callee_that_stops_reading_is_cut_off(self):
        agent, proto = yield self.join("host1", "h1-ticket")
        yield agent.register(len, "zwrm.agent.host1.size")
        sid = agent._session_id
        ctl = yield self.router.attach(_InProcess(ComponentConfig(realm="zwrm")), "ctl",
                                       "trusted")
        proto.transport.pauseProducing()  # the agent reads nothing more
        calls = [ctl.call("zwrm.agent.host1.size", "a" * (1 << 20)) for _ in range(32)]
        results = yield defer.DeferredList(calls, consumeErrors=True)
        failed = [r for ok, r in results if not ok]
        self.assertTrue(failed)
        self.assertIn("the callee left the realm", str(failed[0].value))
        self.assertIsNone(self.router.get_session(sid))
        proto.transport.resumeProducing()


class ListenerServiceTests(unittest.TestCase):
    def test_bad_endpoint_is_a_readable_error(self):
        from zwrm.wamp.transport import listener_service

        router = Router(reactor, make_authenticator(), make_authorizer())
        with self.assertRaises(ValueError) as cm:
            listener_service(reactor, router, "bogus:1234")
        self.assertIn("bogus:1234", str(cm.exception))
        with self.assertRaises(ValueError):
            listener_service(reactor, router, "tcp:0", kind="carrier-pigeon")

    @defer.inlineCallbacks
    def test_service_listens_while_running(self):
        from zwrm.wamp.transport import listener_service

        router = Router(reactor, make_authenticator(), make_authorizer())
        svc = listener_service(reactor, router, "tcp:0:interface=127.0.0.1", kind="rawsocket")
        svc.startService()
        ports = []
        svc._waitingForPort.addCallback(lambda p: ports.append(p) or p)
        yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual(ports[0].getHost().host, "127.0.0.1")
        yield svc.stopService()


class ComponentTests(_SocketBase):
    """The way agents and the CLI connect: autobahn's Component, ticket auth, TLS."""

    @defer.inlineCallbacks
    def test_component_over_tls(self):
        from autobahn.twisted.component import Component

        port = self.ports[("websocket", True)].getHost().port
        tls = ssl.optionsForClientTLS("localhost", ssl.Certificate.loadPEM(self.pem))
        comp = Component(
            transports=[{
                "url": f"wss://localhost:{port}/ws",
                "endpoint": {"type": "tcp", "host": "127.0.0.1", "port": port, "tls": tls},
                "serializers": ["msgpack"],
                "max_retries": 0,
            }],
            realm="zwrm",
            authentication={"ticket": {"authid": "host1", "ticket": "h1-ticket"}},
        )
        seen = {}

        @comp.on_join
        async def joined(session, details):
            seen["role"] = details.authrole
            await session.register(lambda: "pong", "zwrm.agent.host1.ping")
            try:
                await session.register(lambda: "x", "zwrm.agent.host2.ping")
            except ApplicationError as e:
                seen["denied"] = e.error
            await session.leave()

        yield comp.start(reactor).addTimeout(TIMEOUT, reactor)
        self.assertEqual(seen["role"], "agent")
        self.assertEqual(seen["denied"], "wamp.error.not_authorized")
        # wait (bounded) until the router's side of the connection is gone too
        listening = self.ports[("websocket", True)]

        def server_side_open():
            for sel in reactor.getReaders() + reactor.getWriters():
                if sel is not listening and getattr(sel, "getHost", None):
                    try:
                        if sel.getHost().port == port:
                            return True
                    except Exception:
                        pass
            return False

        for _ in range(250):
            if not server_side_open() and self.router.session_count() == 0:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        # autobahn's Component leaves a batched txaio timer behind
        for call in reactor.getDelayedCalls():
            if "_notify_bucket" in repr(call.func):
                call.cancel()
