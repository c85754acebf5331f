"""
L{zwrm.sockets.write_now} over real loopback TCP connections: sent at once while Twisted has
nothing queued, else queued behind what is (as bytes, so the caller may reuse its buffer).
"""

from twisted.internet import defer, endpoints, reactor, tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from zwrm.sockets import write_now


class Collecting(Protocol):
    def __init__(self):
        self.data = bytearray()
        self.connected_d = defer.Deferred()
        self.waiting = None  # (n, Deferred): fired once n bytes arrived

    def connectionMade(self):
        self.connected_d.callback(self)

    def dataReceived(self, data):
        self.data += data
        if self.waiting is not None and len(self.data) >= self.waiting[0]:
            d, self.waiting = self.waiting[1], None
            d.callback(bytes(self.data))

    def until(self, n):
        if len(self.data) >= n:
            return defer.succeed(bytes(self.data))
        self.waiting = (n, defer.Deferred())
        return self.waiting[1]


class WriteNowTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.server = Collecting()
        port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: self.server))
        self.addCleanup(port.stopListening)
        self.client = yield endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol())
        yield self.server.connected_d
        self.transport = self.client.transport
        self.assertIsInstance(self.transport, tcp.Client)
        self.addCleanup(self.transport.abortConnection)
        self.addCleanup(lambda: self.server.transport.abortConnection())
        self.started = []
        start = self.transport.startWriting
        self.transport.startWriting = lambda: (self.started.append(True), start())

    @defer.inlineCallbacks
    def test_sent_at_once(self):
        """
        With nothing queued, the bytes go to the socket in the call: nothing is left in
        Twisted's buffers, the reactor is not asked to report the socket writable, and the
        caller's buffer may change at once.
        """
        buf = bytearray(b"records" * 1000)
        write_now(self.transport, memoryview(buf))
        self.assertEqual((self.transport._tempDataLen, self.transport.dataBuffer), (0, b""))
        self.assertEqual(self.started, [])
        buf[:] = b"x" * len(buf)
        self.assertEqual((yield self.server.until(7000)), b"records" * 1000)

    @defer.inlineCallbacks
    def test_behind_what_is_queued(self):
        """
        Behind bytes Twisted holds (written, not yet sent), the bytes are queued after them,
        as a copy: the peer gets both in order, whatever becomes of the caller's buffer.
        """
        self.transport.write(b"first;")
        buf = bytearray(b"second")
        write_now(self.transport, memoryview(buf))
        buf[:] = b"xxxxxx"
        self.assertEqual((yield self.server.until(12)), b"first;second")

    @defer.inlineCallbacks
    def test_what_the_socket_does_not_take_is_queued(self):
        """
        More than the socket takes (the peer not reading): the rest is queued as a copy and
        sent as the peer reads, in order.
        """
        self.server.transport.stopReading()
        size = 64 * 1024 * 1024
        buf = bytearray(bytes(range(256)) * (size // 256))
        write_now(self.transport, memoryview(buf))
        queued = self.transport._tempDataLen + len(self.transport.dataBuffer)
        self.assertGreater(queued, 0)
        self.assertLess(queued, size)
        self.assertEqual(self.started, [True])
        buf[:] = bytes(size)
        self.server.transport.startReading()
        received = yield self.server.until(size)
        self.assertEqual(received, bytes(range(256)) * (size // 256))
