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

In C{http} mode (L{_HTTPClient}) the proxy reads each request: a port can carry several
apps, chosen by the request's C{Host} header (C{--domain}); each request goes to a replica
on its own (least requests in flight), with C{X-Forwarded-For}, C{X-Forwarded-Proto} and
C{X-Forwarded-Host} set, over a kept-alive HTTP/1.1 connection to the replica (a pool per
replica, L{Backend.take}, closed when the replica leaves the routes).

C{https} mode is C{http} behind TLS that the ingress terminates: the certificate is chosen
by the name the client asks for (SNI) among those the control plane gave
(L{Ingress.set_certs}, from C{zwrm certs add}), exactly or by a wildcard certificate of
its parent domain; a name without a certificate fails the handshake.  Replicas get plain
HTTP with C{X-Forwarded-Proto: https}.
"""

import itertools
import re
import socket

from twisted.internet import error, main, protocol, ssl, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from zwrm.endpoints import connect_error_text

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


#: default of L{Ingress}'s C{connect_retry}: a connection to a replica that is not up after
#: this many seconds gets another attempt beside the first, and so on every as many seconds
CONNECT_RETRY = 0.25


class _AttemptFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, race, proto):
        self.race = race
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto

    def clientConnectionFailed(self, connector, reason):
        self.race.lost(connector, reason)


class _ConnectRace:
    """
    One connection to a replica, with a new attempt beside the ones still waiting every
    C{retry} seconds until C{timeout}: the first to connect is used, the others are
    stopped.  A SYN that is lost (sent to a guest paused for its live migration's
    switchover, or a frame dropped on the overlay) then costs C{retry}, not the kernel's
    first SYN retransmission a second later (and the next, two seconds after that).  At
    most C{timeout / retry} SYNs in flight to a replica that drops them (its accept queue
    full), where the kernel alone would send two in that time.  A refusal ends it at once
    (the replica's host answered).

    C{make()} returns a new protocol whose C{connected_d} is fired by its
    C{connectionMade}; C{d} fires with the winner, or fails with the last attempt's error.
    """

    def __init__(self, reactor, host, port, make, timeout, retry):
        self.reactor = reactor
        self.host, self.port = host, port
        self.make = make
        self.deadline = reactor.seconds() + timeout
        self.retry = retry
        self.pending = set()  # the connectors still connecting
        self.timer = None
        self.failure = None
        self.attempts = 0
        self.done = False
        self.d = Deferred()
        self._attempt()

    def _attempt(self):
        self.timer = None
        left = self.deadline - self.reactor.seconds()
        if left <= 0:
            if not self.pending:
                self._finish(self.failure or Failure(error.TimeoutError(
                    f"{self.host}:{self.port} did not accept a connection")))
            return
        self.attempts += 1
        proto = self.make()
        won = proto.connected_d = Deferred()
        connector = self.reactor.connectTCP(self.host, self.port, _AttemptFactory(self, proto),
                                            timeout=left)
        self.pending.add(connector)
        won.addCallback(self._won, connector)
        if self.retry and self.retry < left:
            self.timer = self.reactor.callLater(self.retry, self._attempt)

    def _won(self, proto, connector):
        self.pending.discard(connector)
        if self.done:  # another attempt won in the same turn: this one is not needed
            proto.transport.loseConnection()
            return
        self._finish(proto)

    def lost(self, connector, reason):
        self.pending.discard(connector)
        if self.done:
            return  # stopped by L{_finish}, or too late
        self.failure = reason
        if reason.check(error.ConnectionRefusedError) or not (self.pending or self.timer):
            self._finish(reason)

    def _finish(self, result):
        """Fire C{d} with C{result} (a protocol or a Failure); stop the other attempts."""
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        pending, self.pending = self.pending, set()
        for connector in pending:
            connector.stopConnecting()  # Twisted reports each one's failure (to lost) at once
        if isinstance(result, Failure):
            self.d.errback(result)
        else:
            self.d.callback(result)


#: Seconds between two lines about one replica's failed connections: a booting guest refuses
#: every connection until its app listens (each is tried on another replica), and a line
#: for each would flood the agent's log under load.
REFUSALS_SAID_EVERY = 10.0


class Backend:
    """A replica behind a published port: its address and port, and its open connections."""

    def __init__(self, key, host, port):
        self.key = key
        self.host = host
        self.port = port
        self.draining = False
        self.conns = set()
        self.drain_call = None
        self.idle = []  # kept-alive connections (HTTP mode), the newest last
        self.refusals = 0  # failed connections not said yet
        self.refusals_said_at = None

    def refused(self, reason, now):
        """
        A connection to this replica failed (C{reason}, a string) at C{now}; the caller
        tries another.  Said in the log at most once per L{REFUSALS_SAID_EVERY} seconds,
        with how many failed since the last line.
        """
        self.refusals += 1
        if (self.refusals_said_at is not None
                and now - self.refusals_said_at < REFUSALS_SAID_EVERY):
            return
        log.info("ingress: {b}:{p} did not accept {n} connection(s) ({e}); trying another",
                 b=self.host, p=self.port, n=self.refusals, e=reason)
        self.refusals, self.refusals_said_at = 0, now

    def take(self, now):
        """A kept-alive connection to this replica, or L{None}."""
        idle = self.idle
        while idle:
            up = idle.pop()
            if now - up.idle_since <= POOL_IDLE and up.transport.connected:
                up.reused = True
                return up
            up.transport.loseConnection()  # and every older one, in turn
        return None

    def give(self, up, now):
        """Keep C{up} for the next request (at most L{POOL_SIZE}, none older than L{POOL_IDLE})."""
        up.idle_since = now
        up.transport.resumeProducing()  # a client that was slow to read may have paused it
        idle = self.idle
        idle.append(up)
        while len(idle) > POOL_SIZE or now - idle[0].idle_since > POOL_IDLE:
            idle.pop(0).transport.loseConnection()

    def unpool(self, up):
        if up in self.idle:
            self.idle.remove(up)

    def close_idle(self):
        idle, self.idle = self.idle, []
        for up in idle:
            up.transport.loseConnection()


class Route:
    """The replicas of one app on one published port."""

    def __init__(self):
        self.backends = {}  # key -> Backend
        self._rr = itertools.count()

    def candidates(self):
        if len(self.backends) == 1:
            for b in self.backends.values():
                return [] if b.draining else [b]
        live = [b for b in self.backends.values() if not b.draining]
        if not live:
            return []
        start = next(self._rr) % len(live)
        ordered = live[start:] + live[:start]
        return sorted(ordered, key=lambda b: len(b.conns))  # stable: ties stay round robin


class _Client(protocol.Protocol):
    """
    A client connection to a C{tcp} published port (L{_HTTPClient} serves C{http} and
    C{https} ones): piped to a replica once one accepts, its first bytes replayed to
    another if the replica closes before answering.
    """

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
        self.buffer += data  # the replica is being chosen: sent once connected

    def _refuse(self, status):
        self.transport.loseConnection()  # a tcp client gets no status line

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

        def make():
            up = _Upstream()
            up.client = self
            return up

        backend.conns.add(self)  # counted while connecting too (least connections)
        d = self.listener.connect(backend.host, backend.port, make)

        def connected(up):
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
            backend.refused(connect_error_text(f), self.listener.reactor.seconds())
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


# -- HTTP mode ---------------------------------------------------------------------------

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
#: a request's header fields (after its first line): each a token, a colon, a value
#: without CR or LF
_FIELDS = re.compile(rb"(?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*)*\Z")
#: fields that need more than passing on (in the lowercased head): one search, about a
#: tenth of the time of eight C{in} tests
_SPECIAL = re.compile(rb"\r\n(?:connection:|keep-alive:|proxy-connection:|te:|upgrade:|"
                      rb"http2-settings:|x-forwarded-|transfer-encoding:)")
#: request headers that belong to one hop (RFC 9110 7.6.1), not forwarded
_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade",
                  b"http2-settings"))
_PLAIN = (tcp.Server, tcp.Client)
_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux
#: idle connections kept to one replica (newest reused first)
POOL_SIZE = 32
#: a connection to a replica whose sent bytes go unacknowledged this long (ms) is given
#: up by the kernel (TCP_USER_TIMEOUT): a replica whose VM was killed answers nothing,
#: not even a reset, and a request sent on a kept connection to it would wait for TCP's
#: retransmissions (minutes); this way it goes to another replica within seconds
UNACKED_MS = 3000
#: a kept connection lost this soon after the request was sent, before any answer, was
#: closed by the replica as the request went out (its idle timeout): the request is sent
#: again on a new connection, the same replica allowed.  Later, the replica is skipped.
STALE_WINDOW = 1.0
#: an idle pooled connection older than this is closed rather than reused: most servers
#: close theirs after 5 s or more, and a request sent as one closes is retried anyway
POOL_IDLE = 4.0
#: default of L{Ingress}'s C{keepalive_timeout}: a client connection waiting this long for
#: its next request (or for the rest of a request head) is closed (nginx's
#: C{keepalive_timeout} is 75 s too)
KEEPALIVE_TIMEOUT = 75.0

_STATUS = {
    400: b"400 Bad Request", 404: b"404 Not Found", 405: b"405 Method Not Allowed",
    408: b"408 Request Timeout",
    431: b"431 Request Header Fields Too Large", 501: b"501 Not Implemented",
    502: b"502 Bad Gateway", 503: b"503 Service Unavailable",
    505: b"505 HTTP Version Not Supported",
}


def _write(transport, data):
    """
    C{transport.write(data)}, sent at once when the transport is a plain TCP connection
    with nothing buffered: Twisted otherwise buffers every write until the reactor's next
    turn (two more epoll_ctl calls and a wake-up per write), which for a proxy of small
    requests and responses is a large part of its time.  Whatever the socket does not take
    at once goes through C{transport.write} (order is kept: nothing was buffered before).
    """
    if _plain_idle(transport):
        try:
            n = transport.socket.send(data)
        except OSError:
            n = 0  # EAGAIN, or an error transport.write's own attempt will report
        if n == len(data):
            return
        data = data[n:]
    transport.write(data)


def _plain_idle(transport):
    """A plain TCP transport, open, with nothing buffered to send."""
    return (transport.__class__ in _PLAIN and not transport.TLS and transport.connected
            and not transport.disconnecting and not transport._tempDataLen
            and not transport.dataBuffer)


def _end(transport):
    """
    C{transport.loseConnection()}, done at once when nothing is left to send (the usual
    case after an answer to an HTTP/1.0 client): Twisted otherwise waits for the
    reactor's next turn to find the buffer empty and then closes, which costs a proxy of
    short connections two epoll_ctl calls, a wake-up and an empty send each.  What is
    done is what Twisted does then (L{twisted.internet.abstract.FileDescriptor.doWrite}
    finding nothing left: C{_postLoseConnection}, the reactor's C{_disconnectSelectable}).
    """
    if _plain_idle(transport) and transport.producer is None:
        transport.disconnecting = True
        transport.reactor._disconnectSelectable(transport, main.CONNECTION_DONE, False)
    else:
        transport.loseConnection()


class _Chunks:
    """
    Finds where a chunked body ends as it streams through (RFC 9112 7.1); strict about
    the sizes and line ends, so that the proxy and the replica never disagree on where a
    message ends.  With C{decode}, also the data without the framing.
    """

    __slots__ = ("state", "left", "line")

    SIZE, DATA, DATA_END, TRAILER, DONE = range(5)

    def __init__(self):
        self.state = self.SIZE
        self.left = 0
        self.line = b""

    def feed(self, data, decode=False):
        """
        @return: C{(end, pieces)}: the index in C{data} just past the body's end (-1: not
            yet) and the decoded data (a list, when C{decode}).
        @raise ValueError: not a chunked body.
        """
        i, n = 0, len(data)
        out = [] if decode else None
        while i < n:
            st = self.state
            if st == self.DATA:
                take = min(self.left, n - i)
                if decode:
                    out.append(data[i:i + take])
                i += take
                self.left -= take
                if not self.left:
                    self.state = self.DATA_END
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self.line += data[i:]
                if len(self.line) > 4096:
                    raise ValueError("chunk line too long")
                return -1, out
            line, self.line = self.line + data[i:j], b""
            i = j + 1
            if line[-1:] != b"\r":
                raise ValueError("bare LF in chunked framing")
            line = line[:-1]
            if st == self.SIZE:
                size = line.split(b";", 1)[0].rstrip(b" \t")
                if not _HEX.match(size):
                    raise ValueError("bad chunk size")
                self.left = int(size, 16)
                self.state = self.DATA if self.left else self.TRAILER
            elif st == self.DATA_END:
                if line:
                    raise ValueError("chunk longer than its size")
                self.state = self.SIZE
            elif not line:  # TRAILER: the empty line ends the body
                self.state = self.DONE
                return i, out
        return -1, out


class _UpConn(protocol.Protocol):
    """
    A connection to a replica: serves one request at a time (of the L{_HTTPClient} in
    C{client}); between requests it waits in its backend's pool.
    """

    client = None
    connected_d = None
    reused = False
    idle_since = 0.0

    def __init__(self, backend):
        self.backend = backend

    def connectionMade(self):
        _nodelay(self.transport)
        if _TCP_USER_TIMEOUT is not None:
            try:
                self.transport.getHandle().setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT,
                                                      UNACKED_MS)
            except OSError:
                pass
        d, self.connected_d = self.connected_d, None
        if d is not None:
            d.callback(self)

    def dataReceived(self, data):
        c = self.client
        if c is None:  # an idle connection speaking out of turn: not a partner to reuse
            self.backend.unpool(self)
            self.transport.loseConnection()
            return
        c.response_data(data)

    def connectionLost(self, reason):
        self.backend.unpool(self)
        c, self.client = self.client, None
        if c is not None:
            c.upstream_lost(self)


# client side states
_HEAD, _BODY, _WAIT, _TUNNEL, _CLOSED = range(5)
# response framing
_R_HEAD, _R_LENGTH, _R_CHUNKED, _R_CLOSE, _R_NONE, _R_TUNNEL = range(6)


class _HTTPClient(protocol.Protocol):
    """
    A client connection to an C{http} or C{https} port: HTTP/1.1 (and 1.0) requests, one
    at a time (pipelined ones wait their turn, in order), each routed by its C{Host} to a
    replica of the app and sent over a kept-alive connection to it (L{Backend.take}).

    The request and the response are streamed through with their own framing
    (C{Content-Length}, chunked, to the close); the proxy only rewrites the heads:
    hop-by-hop headers are dropped, C{X-Forwarded-*} set, the request goes as HTTP/1.1
    (kept alive), and a chunked response to an HTTP/1.0 client is decoded and ended by
    closing.  A request that asks to C{Upgrade} gets a connection of its own, and after a
    C{101} both sides are joined as they are (WebSockets).
    """

    # The state of the connection and of its exchange in flight (class defaults: a new
    # connection sets only what differs).
    buf = b""
    state = _HEAD
    paused = False
    closed = False
    route = None
    backend = None
    up = None
    tried = ()
    fresh = False  # a new connection for this request (a kept one was closed under it)
    sent = None  # the request as the replica gets it, kept until it answers (replay)
    sent_at = 0.0
    coupled = False  # the client's connection is the producer of the replica's
    body_left = 0
    body_chunks = None
    v11 = True
    keep = True
    head_req = False
    upgrading = False
    replied = False
    rstate = _R_HEAD
    rbuf = b""
    rleft = 0
    rchunks = None
    dechunk = False
    reusable = False
    idle_call = None  # closes the connection if no request head comes (keepalive_timeout)

    def __init__(self, listener, peer_addr):
        self.listener = listener
        self.xff = peer_addr.encode("latin-1")

    def connectionMade(self):
        self.listener.clients.add(self)
        t = self.transport
        _nodelay(t)
        if t.__class__ is tcp.Server and not t.TLS:
            # The request is usually here already (a client writes it as soon as it is
            # connected): read it now rather than after the reactor's next poll.
            why = t.doRead()
            if why is not None and not self.closed:
                t.reactor._disconnectSelectable(t, why, True)
        if self.state == _HEAD:
            self._await_request()

    def _await_request(self):
        """Between requests (or before the first): no head within the timeout, no connection."""
        timeout = self.listener.keepalive_timeout
        if timeout is not None and self.idle_call is None:
            self.idle_call = self.listener.reactor.callLater(timeout, self._idle_timeout)

    def _idle_timeout(self):
        self.idle_call = None
        if self.state != _HEAD:
            return
        if self.buf:
            self._refuse(408)  # a request head begun and not finished in time
        else:
            self._close()  # an idle kept-alive connection: closed without a word

    def _request_came(self):
        call, self.idle_call = self.idle_call, None
        if call is not None:
            call.cancel()

    # -- the client's bytes --

    def dataReceived(self, data):
        st = self.state
        if st == _HEAD:
            self.buf = self.buf + data if self.buf else data
            self._next()
        elif st == _BODY:
            rest = self._body(data)
            if rest:
                self._hold(rest)
        elif st == _TUNNEL:
            if self.up is not None:
                self.up.transport.write(data)
        elif st == _WAIT:
            self._hold(data)

    def _hold(self, data):
        """Bytes after the request in flight (pipelining): kept for their turn."""
        self.buf += data
        if not self.keep:
            self.buf = b""  # the connection ends with this response
        elif len(self.buf) > MAX_HEAD and not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def _pause(self):
        if not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def _resume(self):
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()

    def _next(self):
        """Parse the request head in C{buf}, if it is all there, and send it on."""
        buf = self.buf
        if buf[:1] in (b"\r", b"\n"):
            buf = self.buf = buf.lstrip(b"\r\n")  # RFC 9112 2.2: empty lines before one
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head, rest = buf[:end], buf[end + 4:]
            if head.count(b"\n") != head.count(b"\r\n"):
                end = -1  # a bare LF before it: a blank line may come earlier
        if end < 0:
            # RFC 9112 2.2: a bare LF ends a line too (as nginx, Apache and Twisted read
            # it); the head goes on with CRLFs.  A bare CR stays an error (_request).
            m = _BLANK_LINE.search(buf) if b"\n" in buf else None
            if m is None:
                if len(buf) > MAX_HEAD:
                    self._refuse(431)
                return
            head, rest = buf[:m.start()], buf[m.end():]
            head = head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if len(head) > MAX_HEAD:
            self._refuse(431)
            return
        self.buf = b""
        self._request_came()
        code = self._request(head)
        if code:
            self._refuse(code)
            return
        if self.body_left or self.body_chunks is not None:
            self.state = _BODY
            rest = self._body(rest) if rest else b""
        else:
            self.state = _WAIT
        if rest:
            self._hold(rest)
        self._dispatch()

    def _request(self, head):
        """
        Read the request head; set what the exchange needs.

        @return: an error status to refuse it with, or L{None}.
        """
        eol = head.find(b"\r\n")
        first, fields = (head, b"") if eol < 0 else (head[:eol], head[eol:])
        if b"\r" in first or b"\n" in first or not _FIELDS.match(fields):
            # A bare CR or LF (another parser could see another message), a folded line,
            # a field name that is not a token (a space before the colon).
            return 400
        parts = first.split(b" ")
        if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
            return 400
        method, target, version = parts
        if version == b"HTTP/1.1":
            v11 = True
        elif version == b"HTTP/1.0":
            v11 = False
        else:
            return 505 if version.startswith(b"HTTP/") else 400
        if method == b"CONNECT":
            return 405
        lower = fields.lower()
        te = chunked = False
        tokens = ()
        upgrade = None
        if _SPECIAL.search(lower) is None:
            # The usual request: its fields go on as they are.
            host = clen = None
            i = lower.find(b"\r\nhost:")
            if i >= 0:
                if lower.find(b"\r\nhost:", i + 7) >= 0:
                    return 400
                j = fields.find(b"\r\n", i + 7)
                host = fields[i + 7:j if j >= 0 else len(fields)].strip()
            i = lower.find(b"\r\ncontent-length:")
            if i >= 0:
                j = fields.find(b"\r\n", i + 17)
                v = fields[i + 17:j if j >= 0 else len(fields)].strip()
                if not v.isdigit() or (j >= 0 and lower.find(b"\r\ncontent-length:", j) >= 0):
                    return 400
                clen = int(v)
            kept = fields
        else:
            host = clen = None
            keep = []
            for line in fields.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                lname = name.lower()
                if lname == b"host":
                    if host is not None:
                        return 400
                    host = value.strip()
                    keep.append(line)
                elif lname == b"content-length":
                    v = value.strip()
                    if not v.isdigit() or (clen is not None and int(v) != clen):
                        return 400
                    clen = int(v)
                    keep.append(line)
                elif lname == b"transfer-encoding":
                    te = True
                    chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
                    keep.append(line)
                elif lname == b"connection":
                    tokens += tuple(t.strip().lower() for t in value.split(b","))
                elif lname in _HOP:
                    if lname == b"upgrade":
                        upgrade = value.strip()
                elif lname.startswith(b"x-forwarded-"):
                    pass  # the client's own are not believed
                else:
                    keep.append(line)
            others = [t for t in tokens if t not in (b"close", b"keep-alive", b"upgrade", b"")]
            if others:  # fields the Connection header names are this hop's too
                keep = [ln for ln in keep if ln.partition(b":")[0].lower() not in others]
            kept = b"".join(b"\r\n" + ln for ln in keep)
        if te and (not chunked or clen is not None or not v11):
            return 400  # RFC 9112 6.1, 6.3: a framing two parsers could read two ways
        if host is None and v11:
            return 400  # RFC 9112 3.2
        name = (host or b"").decode("latin-1").lower()
        if name.startswith("["):
            name = name[:name.find("]") + 1]
        else:
            name = name.split(":", 1)[0]
        route = self.listener.route_for(name)
        if route is None:
            return 404
        self.route, self.tried, self.fresh = route, (), False
        self.v11 = v11
        self.keep = v11 and b"close" not in tokens
        self.head_req = method == b"HEAD"
        self.upgrading = bool(v11 and upgrade and b"upgrade" in tokens)
        extra = b"\r\nConnection: Upgrade\r\nUpgrade: " + upgrade if self.upgrading else b""
        self.sent = b"".join((
            b" ".join((method, target, b"HTTP/1.1")) if host is not None else first,
            kept, extra, b"\r\nX-Forwarded-For: ", self.xff, self.listener.proto_header,
            b"\r\nX-Forwarded-Host: ", name.encode("latin-1"), b"\r\n\r\n"))
        if chunked:
            self.body_chunks, self.body_left = _Chunks(), 0
        else:
            self.body_chunks, self.body_left = None, clen or 0
        self.replied = False
        self.rstate, self.rbuf = _R_HEAD, b""
        return None

    def _body(self, data):
        """
        Send on the part of C{data} that belongs to the request's body.

        @return: what follows the body (the next request), or C{b""}.
        """
        if self.body_chunks is None:
            n = self.body_left
            if len(data) < n:
                self.body_left -= len(data)
                self._send(data)
                return b""
            self.body_left = 0
            rest = data[n:]
            self._send(data[:n] if rest else data)
        else:
            try:
                end, _ = self.body_chunks.feed(data)
            except ValueError:
                if self.replied:
                    self._close()
                else:
                    self._refuse(400)
                return b""
            if end < 0:
                self._send(data)
                return b""
            self.body_chunks = None
            rest = data[end:]
            self._send(data[:end] if rest else data)
        self.state = _WAIT
        if self.coupled:
            self._uncouple(self.up)
        return rest

    def _send(self, data):
        """Request bytes for the replica: sent now or when connected, kept for a replay."""
        up = self.up
        if up is None:
            self.sent += data  # not connected yet: the client is paused meanwhile
            return
        if self.sent is not None:
            self.sent += data
            if len(self.sent) > MAX_HEAD:
                self._couple()
        _write(up.transport, data)

    def _uncouple(self, up):
        """The body is through: the client no longer paces with the replica's connection."""
        self.coupled = False
        if up is not None and up.transport is not None:
            up.transport.unregisterProducer()
        self.paused = True  # it may have paused the client meanwhile
        self._resume()

    def _couple(self):
        """Too much to replay: the replica's connection paces the client from now on."""
        self.sent = None
        if self.state == _BODY and not self.coupled:
            self.coupled = True
            self._resume()
            self.up.transport.registerProducer(self.transport, True)

    # -- choosing a replica --

    def _dispatch(self):
        if self.state == _CLOSED:
            return
        tried = self.tried
        options = self.route.candidates()
        if tried:
            options = [b for b in options if b.key not in tried]
        if not options:
            self.listener.failed += 1
            self._refuse(503)
            return
        b = self.backend = options[0]
        b.conns.add(self)  # counted while connecting too (least connections)
        if not (self.fresh or self.upgrading):
            up = b.take(self.listener.reactor.seconds())
            if up is not None:
                self._attach(up)
                return
        self._pause()  # until connected: what arrives meanwhile is kept in sent
        d = self.listener.connect(b.host, b.port, lambda: _UpConn(b))
        d.addCallbacks(self._connected, self._connect_failed, errbackArgs=(b,))

    def _connected(self, up):
        if self.state == _CLOSED or self.backend is not up.backend or self.up is not None:
            # Nobody waits for it any more: a spare for the next request.
            if up.backend.draining:
                up.transport.loseConnection()
            else:
                up.backend.give(up, self.listener.reactor.seconds())
            return
        self._attach(up)

    def _connect_failed(self, f, b):
        b.conns.discard(self)
        if self.closed or self.backend is not b:
            return
        b.refused(connect_error_text(f), self.listener.reactor.seconds())
        self.backend = None
        self.tried += (b.key,)
        self._dispatch()

    def _attach(self, up):
        self.up = up
        up.client = self
        self.sent_at = self.listener.reactor.seconds()
        self.transport.registerProducer(up.transport, True)  # the response paces the replica
        sent = self.sent
        _write(up.transport, sent)
        if len(sent) > MAX_HEAD:
            self._couple()
        if self.state != _WAIT or len(self.buf) <= MAX_HEAD:
            self._resume()

    # -- the replica's answer --

    def response_data(self, data):
        if not self.replied:
            self.replied = True
            self.sent = None  # no replay from now on
        st = self.rstate
        if st == _R_HEAD:
            data = self._response_head(data)
            if data is None:
                return
            st = self.rstate
        if st == _R_LENGTH:
            n = self.rleft
            if len(data) < n:
                self.rleft -= len(data)
                _write(self.transport, data)
                return
            self.rleft = 0
            if len(data) > n:
                self.reusable = False  # more than it announced
                data = data[:n]
            if data:
                _write(self.transport, data)
            self._response_done()
        elif st == _R_CHUNKED:
            try:
                end, pieces = self.rchunks.feed(data, self.dechunk)
            except ValueError:
                self._response_broken()
                return
            if end >= 0 and end < len(data):
                self.reusable = False
                data = data[:end]
            out = b"".join(pieces) if self.dechunk else data
            if out:
                _write(self.transport, out)
            if end >= 0:
                self._response_done()
        elif st == _R_CLOSE:
            _write(self.transport, data)
        elif st == _R_NONE:
            if data:
                self.reusable = False
            self._response_done()
        elif st == _R_TUNNEL:
            self.transport.write(data)

    def _response_head(self, data):
        """
        Read and pass on the response head (and the 1xx heads before it).

        @return: what follows it (the body's first bytes), or L{None} (not all there yet,
            or done with).
        """
        if self.rbuf:
            data, self.rbuf = self.rbuf + data, b""
        while True:
            # RFC 9112 2.2: a bare LF ends a line too (CGI scripts write such heads).
            m = _BLANK_LINE.search(data)
            if m is None:
                if len(data) > MAX_HEAD:
                    self._response_broken()
                else:
                    self.rbuf = data
                return None
            end, stop = m.span()
            head, rest = data[:end], data[stop:]
            crlf = stop - end == 4 and head.count(b"\n") == head.count(b"\r\n")
            eol = head.find(b"\n")
            first = head if eol < 0 else head[:eol].rstrip(b"\r")
            if first[:7] != b"HTTP/1." or first[8:9] != b" " or not first[9:12].isdigit():
                self._response_broken()
                return None
            code = int(first[9:12])
            if code < 100:
                self._response_broken()
                return None
            if 100 <= code < 200 and code != 101:
                if self.v11:  # RFC 9110 15.2: never to an HTTP/1.0 client
                    _write(self.transport, data[:stop])
                data = rest
                if not data:
                    return None
                continue
            break
        clen = None
        te = False
        chunked = False
        close = first[:8] != b"HTTP/1.1"
        drop = not crlf  # a head with bare LFs goes on rewritten with CRLFs
        lines = None
        lower = head.lower()
        i = lower.find(b"\r\ncontent-length:")
        if (crlf and i >= 0 and b"\r\ntransfer-encoding:" not in lower and b"\r\nconnection:" not in lower
                and b"keep-alive:" not in lower and lower.find(b"\r\ncontent-length:", i + 17) < 0):
            # The usual answer: one Content-Length, nothing of this hop's to remove.
            j = head.find(b"\r\n", i + 17)
            v = head[i + 17:j if j >= 0 else len(head)].strip()
            if v.isdigit():
                clen = int(v)
                lines = ()
        if lines is None:
            lines = head.split(b"\r\n")[1:] if crlf else \
                [ln.rstrip(b"\r") for ln in head.split(b"\n")[1:]]
        for line in lines:
            name, _, value = line.partition(b":")
            lname = name.strip().lower()
            if lname == b"content-length":
                v = value.strip()
                if not v.isdigit() or (clen is not None and clen != int(v)):
                    self._response_broken()
                    return None
                clen = int(v)
            elif lname == b"transfer-encoding":
                te = True
                chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
            elif lname == b"connection":
                drop = True
                tokens = [t.strip().lower() for t in value.split(b",")]
                close = close or b"close" in tokens
            elif lname in (b"keep-alive", b"proxy-connection"):
                drop = True
        if code == 101:
            if not self.upgrading:
                self._response_broken()
                return None
            _write(self.transport, data[:stop])
            self._tunnel()
            return rest
        keep = self.keep and self.state == _WAIT
        self.dechunk = False
        if self.head_req or code in (204, 304):
            self.rstate = _R_NONE
        elif te:
            if chunked:
                self.rstate = _R_CHUNKED
                self.rchunks = _Chunks()
                if not self.v11:
                    self.dechunk = drop = True
                    keep = False
            else:
                self.rstate = _R_CLOSE
                close = True
        elif clen is not None:
            self.rstate = _R_LENGTH
            self.rleft = clen
        else:
            self.rstate = _R_CLOSE
            close = True
        self.reusable = not close and self.rstate != _R_CLOSE and not self.upgrading
        if self.rstate == _R_CLOSE:
            keep = False
        self.keep = keep
        if drop:
            skip = (b"connection", b"keep-alive", b"proxy-connection")
            if self.dechunk:
                skip += (b"transfer-encoding",)
            out = [first] + [ln for ln in lines
                             if ln.partition(b":")[0].strip().lower() not in skip]
            if not keep and self.v11:
                out.append(b"Connection: close")
            out = b"\r\n".join(out) + b"\r\n\r\n"
        elif not keep and self.v11:
            out = head + b"\r\nConnection: close\r\n\r\n"
        else:
            out = None  # unchanged
        if self.rstate == _R_LENGTH and len(rest) == clen:
            # The whole response is here (the usual small one): one write.
            self.rleft = 0
            _write(self.transport, data if out is None else out + rest)
            self._response_done()
            return None
        _write(self.transport, data[:stop] if out is None else out)
        if self.rstate == _R_NONE:
            if rest:
                self.reusable = False
            self._response_done()
            return None
        return rest

    def _tunnel(self):
        """After a 101: both connections carry whatever they get, as they are."""
        self.state = _TUNNEL
        self.rstate = _R_TUNNEL
        self.sent = None
        if self.buf:
            buf, self.buf = self.buf, b""
            self.up.transport.write(buf)
        if not self.coupled:
            self.up.transport.registerProducer(self.transport, True)
            self.coupled = True
        self._resume()

    def _response_done(self):
        """The response is all through: the replica's connection goes back to its pool."""
        up, b = self.up, self.backend
        self.up = self.backend = None
        up.client = None
        self.transport.unregisterProducer()
        if self.coupled:
            self._uncouple(up)
        b.conns.discard(self)
        if self.reusable and self.state == _WAIT and not b.draining:
            b.give(up, self.listener.reactor.seconds())
        else:
            up.transport.loseConnection()
        self.rstate = _R_HEAD
        if not self.keep or self.state != _WAIT or self.listener.stopped:
            self._close()
            return
        self.state = _HEAD
        self._resume()
        if self.buf:
            self._next()
        if self.state == _HEAD:
            self._await_request()

    def _response_broken(self):
        """The replica's answer is not HTTP, or it broke off: nothing more to pass on."""
        log.info("ingress: {b}:{p} sent a malformed response", b=self.backend.host,
                 p=self.backend.port)
        wrote_nothing = self.rstate == _R_HEAD
        self._drop_upstream()
        if wrote_nothing:
            self._refuse(502)
        else:
            self._close()

    def _drop_upstream(self):
        up, b = self.up, self.backend
        self.up = self.backend = None
        if b is not None:
            b.conns.discard(self)
        if up is not None:
            up.client = None
            self.transport.unregisterProducer()
            if up.transport is not None:
                up.transport.loseConnection()

    def upstream_lost(self, up):
        """The replica's connection ended (L{_UpConn.connectionLost})."""
        if self.up is not up or self.closed:
            return
        if not self.replied and self.sent is not None:
            # It closed without a word (its service is going away, or a kept-alive
            # connection it had just closed): the request goes to another.
            b = self.backend
            self.up = self.backend = None
            b.conns.discard(self)
            self.transport.unregisterProducer()
            if self.coupled:
                self.coupled = False
            if up.reused and self.listener.reactor.seconds() - self.sent_at < STALE_WINDOW:
                self.fresh = True
            else:
                self.tried += (b.key,)
                log.info("ingress: {b}:{p} closed before answering; trying another",
                         b=b.host, p=b.port)
            self._pause()
            self._dispatch()
            return
        if self.rstate == _R_TUNNEL:
            self._drop_upstream()
            self._close()
            return
        self.up = None
        b, self.backend = self.backend, None
        if b is not None:
            b.conns.discard(self)
        if self.rstate == _R_HEAD:  # it ended before its answer's head was through
            log.info("ingress: {b}:{p} closed in the middle of its answer's head",
                     b=getattr(b, "host", "?"), p=getattr(b, "port", "?"))
            self._refuse(502)
        else:
            self._close()

    # -- ending --

    def _refuse(self, code):
        self._drop_upstream()
        self.state = _CLOSED
        if not self.closed:
            self.transport.write(b"HTTP/1.1 " + _STATUS[code] + b"\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
        self._close()

    def _close(self):
        self.state = _CLOSED
        self.buf = b""
        self._request_came()
        _end(self.transport)

    def close(self):
        """Cut this connection (a drain's time is up)."""
        self._drop_upstream()
        self._close()

    def connectionLost(self, reason):
        self.closed = True
        self.state = _CLOSED
        self._request_came()
        self.listener.clients.discard(self)
        self._drop_upstream()


class _Listener(protocol.Factory):
    def __init__(self, ingress, port, mode):
        self.ingress = ingress
        self.reactor = ingress.reactor
        self.port = port
        self.mode = mode
        self.http = mode in ("http", "https")
        self.proto_header = b"\r\nX-Forwarded-Proto: " + (b"https" if mode == "https" else b"http")
        self.connect_timeout = ingress.connect_timeout
        self.connect_retry = ingress.connect_retry
        self.keepalive_timeout = ingress.keepalive_timeout
        self.stopped = False  # no longer published: clients are closed after their answer
        self.routes = {}  # domain (or None for tcp / default) -> Route
        self.failed = 0
        self.listening = None
        self.clients = set()  # HTTP mode: the open client connections

    def connect(self, host, port, make):
        """A connection to a replica (L{_ConnectRace}): a Deferred of C{make()}'s protocol."""
        return _ConnectRace(self.reactor, host, port, make, self.connect_timeout,
                            self.connect_retry).d

    def close_idle_clients(self):
        """The port is no longer published: kept-alive clients between requests are closed."""
        for c in list(self.clients):
            if c.state == _HEAD and not c.buf:
                c.close()

    def route_for(self, host):
        if not self.http:
            return self.routes.get(None)
        return self.routes.get(host) or self.routes.get(None)

    def buildProtocol(self, addr):
        if self.http:
            return _HTTPClient(self, getattr(addr, "host", ""))
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
                 drain_timeout=30.0, keepalive_timeout=KEEPALIVE_TIMEOUT,
                 connect_retry=CONNECT_RETRY):
        self.reactor = reactor
        self.interface = interface
        self.connect_timeout = connect_timeout
        #: seconds before a connection to a replica that is not up yet gets another attempt
        #: beside it (L{_ConnectRace}); L{None}: one attempt, the kernel's SYN retries
        self.connect_retry = connect_retry
        self.drain_timeout = drain_timeout
        #: seconds an C{http}/C{https} client connection may wait for its next request
        #: (or the rest of a request head) before it is closed; L{None}: no limit
        self.keepalive_timeout = keepalive_timeout
        self._listeners = {}  # port -> _Listener
        self._draining = set()  # drained backends whose open connections are cut later
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
        backend.close_idle()
        if backend.conns and backend.drain_call is None:
            def cut():
                self._draining.discard(backend)
                for c in list(backend.conns):
                    c.close()
            backend.drain_call = self.reactor.callLater(self.drain_timeout, cut)
            self._draining.add(backend)

    def _close_port(self, port):
        lst = self._listeners.pop(port)
        lst.stopped = True
        for route in lst.routes.values():
            for b in route.backends.values():
                self._drain(b)
        if lst.http:
            lst.close_idle_clients()
        return lst.listening.stopListening()

    def close(self):
        """Stop listening and close every proxied connection at once."""
        backends = [b for lst in self._listeners.values() for r in lst.routes.values()
                    for b in r.backends.values()]
        clients = [c for lst in self._listeners.values() for c in lst.clients]
        ds = [self._close_port(port) for port in list(self._listeners)]
        for c in clients:
            c.close()
        backends = set(backends) | self._draining  # and those of routes or ports gone before
        self._draining = set()
        for b in backends:
            if b.drain_call is not None and b.drain_call.active():
                b.drain_call.cancel()
            b.close_idle()
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
