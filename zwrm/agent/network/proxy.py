"""
TCP forwarding to guests: the loopback C{host_port} of a bridged VM and the ingress.

L{Ingress} serves published ports: C{zwrm deploy --publish PORT[:GUESTPORT][/tcp|/http]}
makes every agent listen on PORT of its public address and forward each connection to one
healthy replica of the app, wherever it runs (the overlay reaches every VM from every
host).  Choice: least connections, ties broken round robin.  A replica that refuses or does
not answer within C{connect_timeout} is skipped for that connection and the next one is
tried, so a client sees no error while another replica is healthy.  A replica being stopped
is I{drained}: it gets no new connections, and its open ones are closed after
C{drain_timeout} seconds unless they end first.

In C{http} mode a port can carry several apps, chosen by the request's C{Host} header
(C{--domain}); the proxy adds C{X-Forwarded-For}, C{X-Forwarded-Proto} and
C{X-Forwarded-Host} to the first request of each connection (and the connection then
stays with that replica).

C{https} mode is C{http} behind TLS that the ingress terminates: the certificate is chosen
by the name the client asks for (SNI) among those the control plane gave
(L{Ingress.set_certs}, from C{zwrm certs add}), exactly or by a wildcard certificate of
its parent domain; a name without a certificate fails the handshake.  Replicas get plain
HTTP with C{X-Forwarded-Proto: https}.
"""

import itertools

from twisted.internet import protocol, ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

log = Logger()

MAX_HEAD = 16384


class _Pipe(protocol.Protocol):
    """One side of a proxied connection; writes what it receives to its C{peer}."""

    peer = None
    connected_d = None

    def connectionMade(self):
        d, self.connected_d = self.connected_d, None
        if d is not None:
            d.callback(self)

    def dataReceived(self, data):
        self.peer.transport.write(data)

    def connectionLost(self, reason):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()
            self.peer = None


class _Upstream(_Pipe):
    """
    The connection to a replica.  Until the replica sends its first byte, the client's
    bytes are kept (up to C{MAX_HEAD}); a replica that closes before answering (it was
    stopping, its service died) gets the connection replayed to another replica.
    """

    client = None

    def dataReceived(self, data):
        c = self.client
        if not c.replied:
            c.replied = True
            c.couple()
        _Pipe.dataReceived(self, data)

    def connectionLost(self, reason):
        c = self.client
        if (c is not None and self.peer is c and not c.replied and c.sent is not None
                and not c.closed):
            self.peer = None
            c.retry()
            return
        _Pipe.connectionLost(self, reason)


def _nodelay(transport):
    """Small writes go out at once (a proxy must not add Nagle's delay to each hop)."""
    try:
        transport.setTcpNoDelay(True)
    except Exception:
        pass


class Backend:
    """A replica behind a published port: its address and port, and its open connections."""

    def __init__(self, key, host, port):
        self.key = key
        self.host = host
        self.port = port
        self.draining = False
        self.conns = set()
        self.drain_call = None


class Route:
    """The replicas of one app on one published port."""

    def __init__(self):
        self.backends = {}  # key -> Backend
        self._rr = itertools.count()

    def candidates(self):
        live = [b for b in self.backends.values() if not b.draining]
        if not live:
            return []
        start = next(self._rr) % len(live)
        ordered = live[start:] + live[:start]
        return sorted(ordered, key=lambda b: len(b.conns))  # stable: ties stay round robin


class _UpFactory(protocol.ClientFactory):
    """Connects one L{_Pipe} to a replica; C{d} fires when connected, fails if not."""

    noisy = False

    def __init__(self, pipe, d):
        self.pipe = pipe
        self.d = d

    def buildProtocol(self, addr):
        return self.pipe

    def startedConnecting(self, connector):
        pass

    def clientConnectionFailed(self, connector, reason):
        if not self.d.called:
            self.d.errback(reason)


class _Client(protocol.Protocol):
    """A client connection to a published port."""

    def __init__(self, listener, peer_addr):
        self.listener = listener
        self.peer_addr = peer_addr
        self.buffer = b""
        self.backend = None
        self.upstream = None
        self.closed = False
        self.replied = False
        self.sent = b""  # what the replica got before it answered (None: too much to replay)
        self.route = None
        self.tried = ()

    def connectionMade(self):
        _nodelay(self.transport)
        if not self.listener.http:
            self.transport.pauseProducing()  # until the replica is connected
            self._choose(self.listener.route_for(None))

    def _remember(self, data):
        if self.sent is not None and not self.replied:
            self.sent += data
            if len(self.sent) > MAX_HEAD:
                self.couple()

    def couple(self):
        """
        No replay from now on: the client's bytes are no longer kept, and the replica's
        connection paces the client (backpressure).  Not before: a replica connection
        that ends stops its producer, which would end the client's connection too.
        """
        self.sent = None
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.registerProducer(self.transport, True)

    def retry(self):
        """The replica closed without answering: replay what it got to another one."""
        backend, self.upstream = self.backend, None
        if isinstance(backend, Backend):
            backend.conns.discard(self)
            self.tried = tuple(self.tried) + (backend.key,)
        self.transport.unregisterProducer()
        self.transport.pauseProducing()
        self.buffer, self.sent = self.sent + self.buffer, b""
        log.info("ingress: {b} closed before answering; trying another",
                 b=getattr(backend, "host", "?"))
        self._choose(self.route, self.tried)

    def dataReceived(self, data):
        if self.upstream is not None:
            self._remember(data)
            self.upstream.transport.write(data)
            return
        self.buffer += data
        if not self.listener.http or self.backend is not None:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._refuse(b"431 Request Header Fields Too Large")
            return
        head = self.buffer[:end].decode("latin-1")
        lines = head.split("\r\n")
        host = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "host":
                host = value.strip().split(":")[0].lower()
        route = self.listener.route_for(host)
        if route is None:
            self._refuse(b"404 Not Found")
            return
        proto = "https" if self.listener.mode == "https" else "http"
        extra = (f"X-Forwarded-For: {self.peer_addr}\r\nX-Forwarded-Proto: {proto}\r\n"
                 f"X-Forwarded-Host: {host}\r\n")
        lines = [ln for ln in lines if not ln.lower().startswith(("x-forwarded-",))]
        self.buffer = ("\r\n".join(lines) + "\r\n" + extra).encode("latin-1") + \
            self.buffer[end + 2:]
        self.backend = True  # choosing
        self._choose(route)

    def _refuse(self, status):
        if self.listener.http:
            self.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
        self.transport.loseConnection()

    def _choose(self, route, tried=()):
        if self.closed:
            return
        self.route, self.tried = route, tuple(tried)
        options = [b for b in (route.candidates() if route else []) if b.key not in tried]
        if not options:
            self.listener.failed += 1
            self._refuse(b"503 Service Unavailable")
            return
        backend = options[0]
        up = _Upstream()
        up.client = self
        backend.conns.add(self)  # counted while connecting too (least connections)
        d = up.connected_d = Deferred()
        self.listener.reactor.connectTCP(backend.host, backend.port, _UpFactory(up, d),
                                         timeout=self.listener.connect_timeout)

        def connected(_):
            if self.closed:
                backend.conns.discard(self)
                up.transport.loseConnection()
                return
            self.backend, self.upstream = backend, up
            _nodelay(up.transport)
            up.peer = self
            self.transport.registerProducer(up.transport, True)
            if self.buffer:
                self._remember(self.buffer)
                up.transport.write(self.buffer)
                self.buffer = b""
            self.transport.resumeProducing()

        def failed(f):
            backend.conns.discard(self)
            log.info("ingress: {b}:{p} did not accept a connection ({e}); trying another",
                     b=backend.host, p=backend.port, e=f.getErrorMessage())
            self._choose(route, tuple(tried) + (backend.key,))

        d.addCallbacks(connected, failed)

    def connectionLost(self, reason):
        self.closed = True
        if isinstance(self.backend, Backend):
            self.backend.conns.discard(self)
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.peer = None
            self.upstream.transport.loseConnection()

    def close(self):
        self.transport.loseConnection()


class _Listener(protocol.Factory):
    def __init__(self, ingress, port, mode):
        self.ingress = ingress
        self.reactor = ingress.reactor
        self.port = port
        self.mode = mode
        self.http = mode in ("http", "https")
        self.connect_timeout = ingress.connect_timeout
        self.routes = {}  # domain (or None for tcp / default) -> Route
        self.failed = 0
        self.listening = None

    def route_for(self, host):
        if not self.http:
            return self.routes.get(None)
        return self.routes.get(host) or self.routes.get(None)

    def buildProtocol(self, addr):
        return _Client(self, getattr(addr, "host", ""))


def _server_context(cert_pem, key_pem):
    """
    A server TLS context (Twisted's defaults: TLS 1.2 and later, its cipher list) serving
    the certificate (with its chain) and key in PEM.

    @raise ValueError: a PEM does not parse, or the key is not the certificate's.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    chain = x509.load_pem_x509_certificates(cert_pem.encode())
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise ValueError("the key is not the certificate's")
    ctx = ssl.CertificateOptions().getContext()
    ctx.use_certificate(chain[0])
    ctx.use_privatekey(key)
    for c in chain[1:]:
        ctx.add_extra_chain_cert(c)
    ctx.check_privatekey()
    return ctx


@implementer(IOpenSSLContextFactory)
class SNIContextFactory:
    """
    The server TLS contexts of the ingress: one per domain; each handshake takes the
    context of the name the client sent (SNI), exact or C{*.<parent>}.  Without a match
    the handshake fails (the default context has no certificate).
    """

    def __init__(self):
        self.contexts = {}  # domain -> OpenSSL.SSL.Context
        self._default = None

    def set(self, certs):
        """
        Serve C{certs} (C{[{"domain", "cert", "key"}]}, PEM) from now on (handshakes under
        way keep theirs).

        @return: C{(domains served, {domain: why it was refused})}.
        """
        contexts, refused = {}, {}
        for c in certs:
            domain = str(c.get("domain") or "").lower()
            try:
                contexts[domain] = _server_context(c["cert"], c["key"])
            except Exception as e:
                refused[domain] = str(e) or e.__class__.__name__
        self.contexts = contexts
        return sorted(contexts), refused

    def lookup(self, name):
        """The context for server name C{name}, or L{None}."""
        if not name:
            return None
        name = name.lower().rstrip(".")
        ctx = self.contexts.get(name)
        if ctx is None:
            head, _, parent = name.partition(".")
            if head and parent:
                ctx = self.contexts.get("*." + parent)
        return ctx

    def _servername(self, conn):
        raw = conn.get_servername()
        ctx = self.lookup(raw.decode("ascii", "replace") if raw else None)
        if ctx is not None:
            conn.set_context(ctx)

    def getContext(self):
        if self._default is None:
            ctx = ssl.CertificateOptions().getContext()
            ctx.set_tlsext_servername_callback(self._servername)
            self._default = ctx
        return self._default


class Ingress:
    """
    The published ports of one agent.

    @param interface: the address the ports listen on (the host's public address).
    """

    def __init__(self, reactor, interface="127.0.0.1", connect_timeout=2.0,
                 drain_timeout=30.0):
        self.reactor = reactor
        self.interface = interface
        self.connect_timeout = connect_timeout
        self.drain_timeout = drain_timeout
        self._listeners = {}  # port -> _Listener
        self.tls = SNIContextFactory()

    def set_certs(self, certs):
        """
        The certificates C{https} ports serve, replacing the ones before (see
        L{SNIContextFactory.set}).

        @return: C{{"certs": [domains served], "refused": {domain: why}}}.
        """
        served, refused = self.tls.set(certs)
        for domain, why in refused.items():
            log.warn("ingress: the certificate of {d} cannot be used: {why}", d=domain, why=why)
        return {"certs": served, "refused": refused}

    def ports(self):
        return sorted(self._listeners)

    def listener(self, port):
        return self._listeners[port]

    def set_routes(self, table):
        """
        What every published port serves now.

        @param table: C{{port: {"mode": "tcp"|"http"|"https", "routes": {domain|None:
            [{"key", "host", "port", "healthy"}]}}}}.  A replica that is no longer
            listed, or is not healthy, is drained.
        """
        for port in list(self._listeners):
            if port not in table:
                self._close_port(port)
        for port, entry in table.items():
            lst = self._listeners.get(port)
            if lst is not None and lst.mode != entry["mode"]:
                self._close_port(port)
                lst = None
            if lst is None:
                lst = _Listener(self, port, entry["mode"])
                factory = lst
                if lst.mode == "https":
                    factory = TLSMemoryBIOFactory(self.tls, False, lst)
                    factory.noisy = False
                lst.listening = self.reactor.listenTCP(port, factory, interface=self.interface)
                self._listeners[port] = lst
            for domain in list(lst.routes):
                if domain not in entry["routes"]:
                    for b in lst.routes[domain].backends.values():
                        self._drain(b)
                    lst.routes.pop(domain)
            for domain, backends in entry["routes"].items():
                route = lst.routes.setdefault(domain, Route())
                want = {b["key"]: b for b in backends if b.get("healthy", True)}
                for key, b in list(route.backends.items()):
                    if key not in want:
                        self._drain(b)
                        route.backends.pop(key)
                for key, b in want.items():
                    have = route.backends.get(key)
                    if have is None or (have.host, have.port) != (b["host"], b["port"]):
                        if have is not None:
                            self._drain(have)
                        route.backends[key] = Backend(key, b["host"], b["port"])

    def _drain(self, backend):
        """No new connections; close the open ones after C{drain_timeout}."""
        backend.draining = True
        if backend.conns and backend.drain_call is None:
            def cut():
                for c in list(backend.conns):
                    c.close()
            backend.drain_call = self.reactor.callLater(self.drain_timeout, cut)

    def _close_port(self, port):
        lst = self._listeners.pop(port)
        for route in lst.routes.values():
            for b in route.backends.values():
                self._drain(b)
        return lst.listening.stopListening()

    def close(self):
        """Stop listening and close every proxied connection at once."""
        backends = [b for lst in self._listeners.values() for r in lst.routes.values()
                    for b in r.backends.values()]
        ds = [self._close_port(port) for port in list(self._listeners)]
        for b in backends:
            if b.drain_call is not None and b.drain_call.active():
                b.drain_call.cancel()
            for c in list(b.conns):
                c.close()
        return ds


def forward_loopback(reactor, host, port, listen_port=0):
    """
    Listen on 127.0.0.1 (C{listen_port}, or a free port) and forward every connection to
    C{host:port}: a bridged VM's C{host_port}, which health checks and tools use as they
    used QEMU's user-mode forward.

    @return: the listening port (C{.getHost().port}, C{.stopListening()}).
    """
    ingress = Ingress(reactor, interface="127.0.0.1")
    lst = _Listener(ingress, listen_port, "tcp")
    route = lst.routes[None] = Route()
    route.backends["guest"] = Backend("guest", host, port)
    return reactor.listenTCP(listen_port, lst, interface="127.0.0.1")
