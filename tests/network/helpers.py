"""Small clients the network tests use (real sockets, bounded time)."""

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol


class _Fetch(protocol.Protocol):
    def __init__(self, request):
        self.request = request
        self.data = b""
        self.done = Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.done.callback(self.data)


async def http_get(reactor, host, port, path="/", headers=None, timeout=10, host_header=None):
    """
    C{GET path} over HTTP/1.0 (the server closes when done); the whole response as bytes.

    @raise Exception: if it cannot connect, or no answer within C{timeout} seconds.
    """
    head = f"GET {path} HTTP/1.0\r\nHost: {host_header or host}\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    p = _Fetch((head + "\r\n").encode())
    await connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=timeout), p)
    call = reactor.callLater(timeout, p.transport.abortConnection)
    try:
        return await p.done
    finally:
        if call.active():
            call.cancel()


async def answers(reactor, host, port, needle=b"zwrm test image", **kw):
    """True if C{GET /} at C{host:port} answers with C{needle} in it."""
    try:
        return needle in await http_get(reactor, host, port, **kw)
    except Exception:
        return False
