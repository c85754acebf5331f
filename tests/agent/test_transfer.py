"""
Tests for L{zwrm.agent.transfer} and L{zwrm.agent.blockmap}: real TLS sockets on loopback,
the real volume store, a L{Clock} for every timeout and retry delay.
"""

import errno
import fcntl
import hashlib
import json
import mmap
import os
import struct
import subprocess
import threading

import blake3
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols import portforward
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from zwrm import errors, pki
from zwrm.agent import blockmap, transfer
from zwrm.agent.blockmap import BLOCK_SIZE
from zwrm.agent.transfer import VolumeReceiver, VolumeSender, VolumeTransfers, mint_token, wire
from zwrm.agent.transfer import receiver as receiving
from zwrm.agent.transfer import sender as sending
from zwrm.agent.volumes import VolumeStore

MiB = 1 << 20


def write_image(path, size, blocks):
    """
    Write a sparse image of C{size} bytes holding C{blocks} ({offset: bytes}).
    """
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in blocks.items():
            f.seek(offset)
            f.write(data)


def pattern(seed, length=BLOCK_SIZE):
    """
    @return: C{length} pseudo-random bytes, different for every seed.
    """
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 32
        counter += 1
    return bytes(out[:length])


def streamed_digest(path):
    """
    @return: the image digest of C{path} with the block hash two hosts of this version
        choose for a stream (BLAKE3).
    """
    return blockmap.file_digest(path, name="blake3")


def allocated(path):
    return os.stat(path).st_blocks * 512


def wait_for(predicate, timeout=20.0, interval=0.01):
    """
    Poll C{predicate} on the real reactor, for at most C{timeout} seconds.
    """
    start = reactor.seconds()

    def check():
        if predicate():
            return True
        if reactor.seconds() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        return task.deferLater(reactor, interval, check)

    return defer.maybeDeferred(check)


class BlockmapTests(SynchronousTestCase):
    """
    The image digest and the sparse-file helpers.
    """

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def test_digest_ignores_layout(self):
        """
        A sparse image and a fully allocated one with the same bytes have the same digest;
        changing one byte changes it; so does the size.
        """
        size = 5 * BLOCK_SIZE + 123
        blocks = {BLOCK_SIZE: pattern(1), 3 * BLOCK_SIZE + 7: b"hello"}
        sparse = os.path.join(self.dir, "sparse")
        write_image(sparse, size, blocks)
        dense = os.path.join(self.dir, "dense")
        with open(sparse, "rb") as f, open(dense, "wb") as g:
            g.write(f.read())
        self.assertLess(allocated(sparse), allocated(dense))
        digest = blockmap.file_digest(sparse)
        self.assertTrue(digest.startswith("sha256-blocks:"))
        self.assertEqual(digest, blockmap.file_digest(dense))
        with open(dense, "r+b") as g:
            g.seek(3 * BLOCK_SIZE + 8)
            g.write(b"E")
        self.assertNotEqual(digest, blockmap.file_digest(dense))
        longer = os.path.join(self.dir, "longer")
        write_image(longer, size + 1, blocks)
        self.assertNotEqual(digest, blockmap.file_digest(longer))

    def test_digest_definition(self):
        """
        The digest is the hash (SHA-256 unless another is named, or BLAKE3) over the header,
        the size and block size, and every block hash of that algorithm.
        """
        size = 2 * BLOCK_SIZE + 10
        path = os.path.join(self.dir, "img")
        write_image(path, size, {0: b"abc"})
        with open(path, "rb") as f:
            content = f.read()
        for name, new, kwargs in [
            ("sha256", hashlib.sha256, {}),
            ("sha256", hashlib.sha256, {"name": "sha256"}),
            ("blake3", blake3.blake3, {"name": "blake3"}),
        ]:
            hashes = [new(content[i : i + BLOCK_SIZE]).digest() for i in range(0, size, BLOCK_SIZE)]
            expected = new(
                b"zwrm-volume-v1\0" + struct.pack(">QI", size, BLOCK_SIZE) + b"".join(hashes)
            ).hexdigest()
            self.assertEqual(blockmap.file_digest(path, **kwargs), f"{name}-blocks:" + expected)
            self.assertEqual(blockmap.file_blockmap(path, **kwargs), (size, hashes))
        self.assertNotEqual(
            blockmap.file_digest(path, name="sha256")[-64:], blockmap.file_digest(path, name="blake3")[-64:]
        )
        self.assertRaises(ValueError, blockmap.file_digest, path, name="md5")

    def test_extents_and_blocks(self):
        """
        The data extents of a sparse file are found and mapped to the blocks they touch.
        """
        size = 64 * BLOCK_SIZE
        path = os.path.join(self.dir, "img")
        write_image(path, size, {2 * BLOCK_SIZE: pattern(1), 40 * BLOCK_SIZE - 1: b"xy"})
        fd = os.open(path, os.O_RDONLY)
        try:
            extents = blockmap.data_extents(fd, size)
        finally:
            os.close(fd)
        blocks = blockmap.data_blocks(extents, size)
        self.assertEqual(blocks, [2, 39, 40])

    def test_read_block_into(self):
        """
        Reading into a reused buffer gives the same blocks and hashes as reading afresh,
        for whole blocks, the shorter last block, zero blocks, and past the end of a file
        shorter than the announced size.
        """
        size = 3 * BLOCK_SIZE + 100
        path = os.path.join(self.dir, "img")
        write_image(path, size - 50, {0: pattern(1), 3 * BLOCK_SIZE: b"z" * 30})
        fd = os.open(path, os.O_RDONLY)
        buf = bytearray(b"\xff" * BLOCK_SIZE)
        try:
            for index in range(4):
                got = blockmap.read_block_into(fd, index, size, buf)
                want = blockmap.read_block(fd, index, size)
                self.assertEqual(got[1:], want[1:])
                self.assertEqual(got[0] if got[0] is None else bytes(got[0]), want[0])
        finally:
            os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        try:
            self.assertTrue(blockmap.read_block(fd, 1, size)[2])
            self.assertEqual(blockmap.read_block(fd, 3, size)[0], b"z" * 30 + bytes(70))
        finally:
            os.close(fd)

    def test_data_runs(self):
        """The runs of pages a sparse write writes: those not all zeros, a short last page."""
        page = receiving.PAGE
        buf = mmap.mmap(-1, BLOCK_SIZE)
        self.assertEqual(receiving._data_runs(buf, BLOCK_SIZE), [])
        buf[0:1] = b"x"  # the first page
        buf[5 * page + 9 : 5 * page + 10] = b"x"  # pages 5 and 6
        buf[6 * page : 6 * page + 1] = b"x"
        buf[BLOCK_SIZE - 1 :] = b"x"  # the last byte
        self.assertEqual(receiving._data_runs(buf, BLOCK_SIZE),
                         [(0, page), (5 * page, 7 * page), (BLOCK_SIZE - page, BLOCK_SIZE)])
        self.assertEqual(receiving._data_runs(buf, 6 * page + 100),  # short: its last page
                         [(0, page), (5 * page, 6 * page + 100)])
        buf[:] = b"y" * BLOCK_SIZE
        self.assertEqual(receiving._data_runs(buf, BLOCK_SIZE), [(0, BLOCK_SIZE)])

    def test_punch_hole(self):
        """
        A punched block reads as zeros and no longer takes space.
        """
        path = os.path.join(self.dir, "img")
        write_image(path, 4 * BLOCK_SIZE, {0: pattern(1, 4 * BLOCK_SIZE)})
        before = allocated(path)
        fd = os.open(path, os.O_RDWR)
        try:
            blockmap.punch_hole(fd, BLOCK_SIZE, BLOCK_SIZE)
            self.assertEqual(os.pread(fd, BLOCK_SIZE, BLOCK_SIZE), bytes(BLOCK_SIZE))
            self.assertEqual(os.pread(fd, 10, 0), pattern(1)[:10])
        finally:
            os.close(fd)
        self.assertLessEqual(allocated(path), before - BLOCK_SIZE)


class Corrupting(sending._SenderProtocol):
    """
    A sender that flips one bit of the third block it puts on the wire.
    """

    def frameData(self, offset, data):
        self._count = getattr(self, "_count", 0) + 1
        if self._count == 3:
            data = bytes([data[0] ^ 1]) + data[1:]
        return data


class DropsAfterEnd(sending._SenderProtocol):
    """
    A sender whose first connection closes right after the end frame, before the answer.
    """

    dropped = 0
    dropping = False

    def _finish(self):
        sending._SenderProtocol._finish(self)
        if not DropsAfterEnd.dropped:
            DropsAfterEnd.dropped += 1
            self.dropping = True
            self.transport.loseConnection()

    def frameReceived(self, kind, payload):
        # The answer is lost: TLS closes after the receiver's close_notify, so on a busy
        # machine the receiver's answer can still arrive on this connection; dropping it
        # here is what the test means by "lost".
        if not self.dropping:
            sending._SenderProtocol.frameReceived(self, kind, payload)


class PauseRecorder(sending._SenderProtocol):
    """
    A sender that records how often the transport paused it, and fails if it writes a block
    while paused.
    """

    pauses = 0
    written_while_paused = 0

    def pauseProducing(self):
        PauseRecorder.pauses += 1
        sending._SenderProtocol.pauseProducing(self)

    def frameData(self, offset, data):
        if self._paused:
            PauseRecorder.written_while_paused += 1
        return data


class CountsTLSWrites(sending._SenderProtocol):
    """
    A sender that counts what it writes through the TLS transport's own C{write} (Twisted's
    per-record path) rather than L{wire.RecordWriter}.
    """

    tls_writes = 0

    def makeConnection(self, transport):
        write = transport.write

        def counting(data):
            CountsTLSWrites.tls_writes += 1
            return write(data)

        transport.write = counting
        sending._SenderProtocol.makeConnection(self, transport)


class CuttingProxy(portforward.ProxyFactory):
    """
    A TCP proxy that aborts both sides once, after C{cut_at} bytes came from the client; or,
    with C{flip}, passes the bytes on with the one at C{cut_at} changed, once.
    """

    def __init__(self, host, port, cut_at, flip=False):
        portforward.ProxyFactory.__init__(self, host, port)
        self.cut_at = cut_at
        self.flip = flip
        self.seen = 0
        self.cuts = 0
        self.connections = 0
        outer = self

        class Server(portforward.ProxyServer):
            def connectionMade(self):
                outer.connections += 1
                portforward.ProxyServer.connectionMade(self)

            def dataReceived(self, data):
                outer.seen += len(data)
                if outer.cut_at is not None and outer.seen > outer.cut_at and outer.flip:
                    at = len(data) - (outer.seen - outer.cut_at)
                    data = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]
                    outer.cut_at = None
                    outer.cuts += 1
                elif outer.cut_at is not None and outer.seen > outer.cut_at:
                    outer.cut_at = None
                    outer.cuts += 1
                    self.transport.abortConnection()
                    if self.peer is not None:
                        self.peer.transport.abortConnection()
                    return
                portforward.ProxyServer.dataReceived(self, data)

        self.protocol = Server


class StreamTests(TestCase):
    """
    Volume streams between a sender and a receiver over real TLS on loopback.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.clock = task.Clock()
        self.ca = ca = pki.CertificateAuthority.create()

        def host(name):
            cert, key = ca.issue_host(name, names=("127.0.0.1",))
            return pki.HostCredentials(ca.certificate_pem, cert, key)

        self.src_creds = host("host-src")
        self.dst_creds = host("host-dst")
        self.store = VolumeStore(reactor, os.path.join(self.dir, "dst"))
        self.receiver = VolumeReceiver(
            reactor, self.store, self.dst_creds.server_context(), clock=self.clock
        )
        port = yield self.receiver.listen()
        self.port = port.getHost().port
        self.addCleanup(self._stopReceiver)
        self.sender = VolumeSender(reactor, self.src_creds.peer_client_context, clock=self.clock)
        self.src = os.path.join(self.dir, "src.img")

    @defer.inlineCallbacks
    def _proxied(self, proxy):
        """
        Listen with C{proxy} in front of the receiver. @return: the proxy's port.
        """
        listening = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            proxy
        )
        self.addCleanup(listening.stopListening)
        return listening.getHost().port

    @defer.inlineCallbacks
    def _sendThrough(self, proxy, size, blocks):
        """
        Write a source image of C{size} bytes holding the patterned C{blocks}, and start
        sending it through C{proxy} (L{_proxied}).

        @return: the receiver's transfer and the sender's L{Deferred}.
        """
        write_image(self.src, size, {i * BLOCK_SIZE: pattern(i) for i in blocks})
        port = yield self._proxied(proxy)
        token = mint_token()
        incoming = self.receiver.expect(token, "vol-1", size)
        return incoming, self.sender.send("127.0.0.1", port, token, self.src, "host-dst")

    def _retryScheduled(self):
        """@return: a L{Deferred} that fires once the sender has scheduled a retry."""
        return wait_for(
            lambda: any(c.func.__name__ == "attempt" for c in self.clock.getDelayedCalls())
        )

    @defer.inlineCallbacks
    def _stopReceiver(self):
        yield self.receiver.stopService()
        yield wait_for(lambda: not self.receiver._connections)

    def temporaries(self):
        return [n for n in os.listdir(self.store.root) if n.startswith(".tmp-")]

    def assertSameBytes(self, a, b):
        """
        The two files have the same size and bytes (compared in place, chunk by chunk).
        """
        self.assertEqual(os.path.getsize(a), os.path.getsize(b))
        buf_a, buf_b = bytearray(4 * MiB), bytearray(4 * MiB)
        with open(a, "rb", buffering=0) as f, open(b, "rb", buffering=0) as g:
            while True:
                n = f.readinto(buf_a)
                self.assertEqual(g.readinto(buf_b), n)
                if not n:
                    break
                self.assertTrue(buf_a[:n] == buf_b[:n], "the files differ")

    @defer.inlineCallbacks
    def test_bulk_copy_sends_only_allocated_blocks(self):
        """
        A bulk copy sends exactly the allocated, non-zero blocks, reports progress, and leaves a
        byte-identical, still sparse volume in the store; the token is used up.
        """
        size = 256 * MiB
        blocks = {i * BLOCK_SIZE: pattern(i) for i in (0, 1, 2, 100, 101, 255)}
        blocks[50 * BLOCK_SIZE] = bytes(BLOCK_SIZE)  # allocated, but zeros: not sent
        write_image(self.src, size, blocks)
        token = mint_token()
        incoming = self.receiver.expect(token, "vol-1", size, peer="host-src")
        done = incoming.when_done()
        seen = []
        result = yield self.sender.send(
            "127.0.0.1", self.port, token, self.src, "host-dst", progress=seen.append
        )
        self.assertEqual(result["sent"], 6 * BLOCK_SIZE)
        self.assertEqual(result["blocks_sent"], 6)
        self.assertEqual(result["allocated"], 7 * BLOCK_SIZE)
        self.assertTrue(result["committed"])
        self.assertEqual(result["attempts"], 1)
        self.assertEqual(result["digest"], streamed_digest(self.src))
        self.assertTrue(result["digest"].startswith("blake3-blocks:"), result["digest"])
        self.assertEqual(
            seen[-1], {"sent": 6 * BLOCK_SIZE, "done": 7 * BLOCK_SIZE, "total": 7 * BLOCK_SIZE}
        )
        stored = yield done
        self.assertEqual(stored["digest"], result["digest"])
        path = self.store.path("vol-1")
        self.assertSameBytes(self.src, path)
        self.assertLess(allocated(path), 8 * BLOCK_SIZE)
        self.assertEqual(self.temporaries(), [])
        # The token was used up.
        self.assertEqual(self.receiver.transfer(token).state, "committed")
        f = yield self.assertFailure(
            self.sender.send("127.0.0.1", self.port, token, self.src, "host-dst"),
            errors.AuthenticationFailed,
        )
        self.assertEqual(f.message, "this transfer token was already used")
        # It is forgotten after its time to live.
        self.clock.advance(self.receiver.ttl)
        self.assertRaises(errors.NotFound, self.receiver.transfer, token)

    @defer.inlineCallbacks
    def test_blocks_bypass_the_per_record_path(self):
        """
        Blocks are encrypted straight into the TLS connection and handed to TCP by the
        stream's L{wire.RecordWriter}: only the control frames (hello, end) go through the
        TLS transport's own write; the receiver decrypts their records straight into its block
        buffers and writes them with C{O_DIRECT} where the file system takes it (here, the
        test's directory), past the page cache.
        """
        size = 16 * MiB
        write_image(self.src, size, {i * BLOCK_SIZE: pattern(i) for i in range(12)})
        written_by = []

        def recording(fd, parts, offset):
            written_by.append(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
            return os.pwritev(fd, parts, offset)

        self.patch(receiving, "_pwritev", recording)
        filled = [0]
        real_filled = wire._Framed.bodyFilled

        def counting_filled(proto, n):
            filled[0] += n
            return real_filled(proto, n)

        self.patch(wire._Framed, "bodyFilled", counting_filled)
        CountsTLSWrites.tls_writes = 0
        sender = VolumeSender(reactor, self.src_creds.peer_client_context, clock=self.clock)
        sender.protocol = CountsTLSWrites
        token = mint_token()
        self.receiver.expect(token, "vol-1", size)
        result = yield sender.send("127.0.0.1", self.port, token, self.src, "host-dst")
        self.assertEqual(result["blocks_sent"], 12)
        self.assertEqual(CountsTLSWrites.tls_writes, 2)
        # The receiver decrypted most of the blocks' bytes straight into its block buffers
        # (those of a socket read that starts between two blocks go through Twisted's path).
        self.assertGreater(filled[0], 12 * BLOCK_SIZE // 2)
        self.assertEqual(len(written_by), 12)
        if receiving._open_direct(os.path.join(self.dir, "src.img")) is not None:
            self.assertTrue(all(written_by))
        self.assertSameBytes(self.src, self.store.path("vol-1"))

    @defer.inlineCallbacks
    def test_one_call_per_block_and_record(self):
        """
        With L{wire.fast_calls}, the sender encrypts each block with one C{send} (not one per
        16 KiB record) and takes the records out of the memory BIO without pyOpenSSL's
        C{bio_read} (which then carries only the handshake and control frames), and the
        receiver decrypts each record with one C{SSL_read} straight into its block buffer,
        all the records of a socket read in one Python call: pyOpenSSL's C{recv_into} is
        called only to raise for a read that found no whole record, and never returns data.
        """
        self.assertIsNotNone(wire.fast_calls)
        calls = []
        real_read_into = wire.fast_calls.read_into

        def read_into(conn, view):
            calls.append(real_read_into(conn, view))
            return calls[-1]

        self.patch(wire.fast_calls, "read_into", read_into)
        result, sends, reads, taken = yield self._countedStream()
        self.assertEqual(result["blocks_sent"], 12)
        self.assertEqual(sends, [BLOCK_SIZE] * 12)
        self.assertEqual(reads, [])
        self.assertLess(sum(taken), 64 * 1024)
        # Every record buffered whole is decrypted in one call: several per socket read.
        self.assertGreater(sum(calls), 12 * BLOCK_SIZE // 2)
        self.assertLess(len(calls), 12 * (BLOCK_SIZE // 16384) // 2)
        self.assertSameBytes(self.src, self.store.path("vol-1"))

    @defer.inlineCallbacks
    def test_without_the_fast_calls(self):
        """
        Where pyOpenSSL lacks what L{wire.fast_calls} uses, the stream takes pyOpenSSL's
        public calls (a C{send} per record, C{recv_into}) and delivers the same volume.
        """
        self.patch(wire, "fast_calls", None)
        result, sends, reads, taken = yield self._countedStream()
        self.assertEqual(result["blocks_sent"], 12)
        self.assertEqual(result["digest"], streamed_digest(self.src))
        self.assertEqual(len(sends), 12 * (BLOCK_SIZE // 16384))
        self.assertGreater(len(reads), 12 * (BLOCK_SIZE // 16384) // 2)
        self.assertGreater(sum(taken), 12 * BLOCK_SIZE)
        self.assertSameBytes(self.src, self.store.path("vol-1"))

    @defer.inlineCallbacks
    def _countedStream(self):
        """
        Stream 12 blocks, counting pyOpenSSL's calls (L{_countCalls}).

        @return: the sender's result, the sends, the reads and the C{bio_read}s.
        """
        size = 16 * MiB
        write_image(self.src, size, {i * BLOCK_SIZE: pattern(i) for i in range(12)})
        sends, reads, taken = self._countCalls()
        token = mint_token()
        self.receiver.expect(token, "vol-1", size)
        result = yield self.sender.send("127.0.0.1", self.port, token, self.src, "host-dst")
        return result, sends, reads, taken

    def _countCalls(self):
        """
        Record the buffer size of every C{SSL.Connection.send} larger than a control frame
        (the sender's blocks), what every C{recv_into} that returned read, and what every
        C{bio_read} (at both ends) took out of a memory BIO.
        """
        sends, reads, taken = [], [], []
        real_send, real_recv_into = SSL.Connection.send, SSL.Connection.recv_into
        real_bio_read = SSL.Connection.bio_read

        def bio_read(conn, *args):
            out = real_bio_read(conn, *args)
            taken.append(len(out))
            return out

        def send(conn, buf, *args):
            n = real_send(conn, buf, *args)
            if len(buf) > 4096:
                sends.append(n)
            return n

        def recv_into(conn, buf, *args):
            n = real_recv_into(conn, buf, *args)
            reads.append(n)
            return n

        self.patch(SSL.Connection, "send", send)
        self.patch(SSL.Connection, "recv_into", recv_into)
        self.patch(SSL.Connection, "bio_read", bio_read)
        return sends, reads, taken

    def test_corrupt_record_mid_block(self):
        """
        A TLS record changed in flight in the middle of a block's body: the receiver's
        OpenSSL refuses it, the connection ends, the sender resumes on a new one, and the
        volume arrives intact.
        """
        return self._corruptRecord()

    def test_corrupt_record_mid_block_without_the_fast_calls(self):
        """
        The same on pyOpenSSL's public calls.
        """
        self.patch(wire, "fast_calls", None)
        return self._corruptRecord()

    @defer.inlineCallbacks
    def test_corrupt_record_without_retries_left(self):
        """
        With no retries left, a stream whose record was changed in flight fails as
        unavailable, naming what OpenSSL said: not as a refused handshake.
        """
        self.sender.retries = 0
        proxy = CuttingProxy("127.0.0.1", self.port, cut_at=5 * MiB + 100_000, flip=True)
        _, d = yield self._sendThrough(proxy, 16 * MiB, range(12))
        f = yield self.assertFailure(d, errors.Unavailable)
        # (the receiver's alert, or the connection's end if the sender met that first)
        self.assertIn("failed after 1 attempt: ", f.message)

    @defer.inlineCallbacks
    def _corruptRecord(self):
        proxy = CuttingProxy("127.0.0.1", self.port, cut_at=5 * MiB + 100_000, flip=True)
        incoming, d = yield self._sendThrough(proxy, 16 * MiB, range(12))
        yield self._retryScheduled()
        self.assertEqual(proxy.cuts, 1)
        self.assertNotEqual(incoming.state, "committed")
        self.clock.advance(self.sender.backoff[0])
        result = yield d
        self.assertEqual(result["attempts"], 2)
        self.assertEqual(result["digest"], streamed_digest(self.src))
        self.assertSameBytes(self.src, self.store.path("vol-1"))
        self.assertEqual(self.temporaries(), [])

    @defer.inlineCallbacks
    def test_without_direct_io(self):
        """
        On a file system that refuses C{O_DIRECT} the receiver writes through the page cache;
        so it does for a last block that is not a whole number of sectors.
        """
        size = 5 * BLOCK_SIZE + 1000
        write_image(
            self.src,
            size,
            {i * BLOCK_SIZE: pattern(i, min(BLOCK_SIZE, size - i * BLOCK_SIZE)) for i in range(6)},
        )
        real_open = os.open

        def no_direct(path, flags, *args):
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return real_open(path, flags, *args)

        self.patch(receiving.os, "open", no_direct)
        token = mint_token()
        self.receiver.expect(token, "vol-1", size)
        result = yield self.sender.send("127.0.0.1", self.port, token, self.src, "host-dst")
        self.assertEqual(result["blocks_sent"], 6)
        self.assertEqual(result["digest"], streamed_digest(self.src))
        self.assertSameBytes(self.src, self.store.path("vol-1"))

    @defer.inlineCallbacks
    def test_ext4_image(self):
        """
        A real ext4 image made by mkfs.ext4 arrives byte-identical and passes e2fsck.
        """
        content = os.path.join(self.dir, "content")
        os.makedirs(content)
        with open(os.path.join(content, "data.bin"), "wb") as f:
            f.write(pattern("ext4", 3 * MiB + 5))
        with open(os.path.join(content, "hello.txt"), "w") as f:
            f.write("hello volume\n")
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-d", content, self.src, "64M"], check=True, timeout=60
        )
        token = mint_token()
        self.receiver.expect(token, "vol-ext4", os.path.getsize(self.src))
        result = yield self.sender.send("127.0.0.1", self.port, token, self.src, "host-dst")
        self.assertLess(result["sent"], 16 * MiB)
        path = self.store.path("vol-ext4")
        self.assertSameBytes(self.src, path)
        # its holes kept: the pages of zeros in the blocks sent are not written
        self.assertLessEqual(allocated(path), allocated(self.src))
        check = subprocess.run(["e2fsck", "-fn", path], capture_output=True, timeout=60)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        out = subprocess.run(
            ["debugfs", "-R", "cat /hello.txt", path], capture_output=True, timeout=60
        )
        self.assertEqual(out.stdout, b"hello volume\n")

    @defer.inlineCallbacks
    def test_empty_image(self):
        """
        An image that is all holes sends no data and arrives as all holes; so does an
        empty delta.
        """
        write_image(self.src, 32 * MiB + 5, {})
        token = mint_token()
        self.receiver.expect(token, "vol-1", 32 * MiB + 5)
        result = yield self.sender.send(
            "127.0.0.1", self.port, token, self.src, "host-dst", commit=False
        )
        self.assertEqual((result["sent"], result["allocated"]), (0, 0))
        result = yield self.sender.send(
            "127.0.0.1", self.port, token, self.src, "host-dst", mode="delta"
        )
        self.assertEqual((result["sent"], result["zeroed"]), (0, 0))
        path = self.store.path("vol-1")
        self.assertEqual(os.path.getsize(path), 32 * MiB + 5)
        self.assertEqual(allocated(path), 0)
        self.assertEqual(result["digest"], streamed_digest(self.src))

    @defer.inlineCallbacks
    def test_wrong_token(self):
        """
        A wrong token is refused with AuthenticationFailed; nothing is written and the real
        token still works.
        """
        write_image(self.src, 8 * MiB, {0: pattern(0)})
        token = mint_token()
        self.receiver.expect(token, "vol-1", 8 * MiB)
        f = yield self.assertFailure(
            self.sender.send("127.0.0.1", self.port, mint_token(), self.src, "host-dst"),
            errors.AuthenticationFailed,
        )
        self.assertEqual(f.message, "unknown or expired transfer token")
        self.assertEqual(self.temporaries(), [])
        self.assertFalse(self.store.exists("vol-1"))
        yield self.sender.send("127.0.0.1", self.port, token, self.src, "host-dst")
        self.assertSameBytes(self.src, self.store.path("vol-1"))

    @defer.inlineCallbacks
    def test_wrong_peer(self):
        """
        A token bound to one host is refused to a sender with another host's certificate.
        """
        write_image(self.src, 8 * MiB, {0: pattern(0)})
        token = mint_token()
        self.receiver.expect(token, "vol-1", 8 * MiB, peer="host-other")
        f = yield self.assertFailure(
            self.sender.send("127.0.0.1", self.port, token, self.src, "host-dst"),
            errors.AuthenticationFailed,
        )
        self.assertIn("host-other", f.message)
        self.assertFalse(self.store.exists("vol-1"))

    @defer.inlineCallbacks
    def test_foreign_certificates(self):
        """
        A sender whose certificate another CA issued is refused in the TLS handshake, and a
        sender that does not trust the receiver's CA refuses it: neither retries.
        """
        write_image(self.src, 8 * MiB, {0: pattern(0)})
        token = mint_token()
        self.receiver.expect(token, "vol-1", 8 * MiB)
        other = pki.CertificateAuthority.create()
        cert, key = other.issue_host("host-src", names=("127.0.0.1",))
        foreign = pki.HostCredentials(other.certificate_pem, cert, key)
        for sender, target in [
            # A sender from another cluster: the receiver refuses its certificate.
            (VolumeSender(reactor, foreign.peer_client_context, clock=self.clock), "host-dst"),
            # A sender that expects another host: it refuses the receiver's certificate.
            (
                VolumeSender(reactor, self.src_creds.peer_client_context, clock=self.clock),
                "host-elsewhere",
            ),
        ]:
            f = yield self.assertFailure(
                sender.send("127.0.0.1", self.port, token, self.src, target),
                errors.AuthenticationFailed,
            )
            self.assertIn("TLS handshake", f.message)
        self.assertFalse(self.store.exists("vol-1"))
        self.assertEqual(self.receiver.transfer(token).state, "new")

    @defer.inlineCallbacks
    def test_resume_after_dropped_connection(self):
        """
        A connection cut mid-stream is retried after the backoff delay and resumes at the
        offset the receiver reports: the volume arrives intact, with far less than twice
        its data sent.
        """
        proxy = CuttingProxy("127.0.0.1", self.port, cut_at=12 * MiB)
        incoming, d = yield self._sendThrough(proxy, 64 * MiB, range(0, 64, 2))
        yield self._retryScheduled()
        self.assertEqual(proxy.cuts, 1)
        self.clock.advance(self.sender.backoff[0])
        result = yield d
        self.assertEqual(result["attempts"], 2)
        self.assertEqual(result["resumed_at"][0], 0)
        self.assertGreater(result["resumed_at"][1], 0)
        self.assertEqual(incoming.resumed_at, result["resumed_at"])
        self.assertLess(result["sent"], 32 * MiB + 16 * MiB)
        self.assertSameBytes(self.src, self.store.path("vol-1"))
        self.assertEqual(self.temporaries(), [])

    @defer.inlineCallbacks
    def test_answer_lost_after_end(self):
        """
        When the connection closes after the end frame, before the receiver's answer, the
        retry's hello carries the digest and the receiver answers with the outcome (staged or
        committed) without anything being sent again.
        """
        write_image(self.src, 16 * MiB, {i * BLOCK_SIZE: pattern(i) for i in range(8)})
        sender = VolumeSender(reactor, self.src_creds.peer_client_context, clock=self.clock)
        sender.protocol = DropsAfterEnd
        for commit in (False, True):
            DropsAfterEnd.dropped = 0
            token = mint_token()
            volume = f"vol-{commit}"
            incoming = self.receiver.expect(token, volume, 16 * MiB)
            d = sender.send("127.0.0.1", self.port, token, self.src, "host-dst", commit=commit)
            yield wait_for(
                lambda: any(c.func.__name__ == "attempt" for c in self.clock.getDelayedCalls())
            )
            yield wait_for(lambda i=incoming: i.state in ("staged", "committed"))
            self.clock.advance(sender.backoff[0])
            result = yield d
            self.assertEqual(result["attempts"], 2)
            self.assertEqual(result["sent"], 8 * BLOCK_SIZE)
            self.assertEqual(result["committed"], commit)
            self.assertEqual(self.store.exists(volume), commit)
        self.assertSameBytes(self.src, self.store.path("vol-True"))

    @defer.inlineCallbacks
    def test_gives_up_after_retries(self):
        """
        When the receiver cannot be reached, the sender retries C{retries} times with its
        backoff, then fails with Unavailable naming the cause.
        """
        write_image(self.src, 8 * MiB, {0: pattern(0)})
        port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Protocol)
        )
        dead = port.getHost().port
        yield port.stopListening()
        sender = VolumeSender(
            reactor, self.src_creds.peer_client_context, clock=self.clock, retries=2
        )
        d = sender.send("127.0.0.1", dead, mint_token(), self.src, "host-dst")
        for _ in range(2):
            yield wait_for(
                lambda: any(c.func.__name__ == "attempt" for c in self.clock.getDelayedCalls())
            )
            self.clock.advance(sender.backoff[1])
        f = yield self.assertFailure(d, errors.Unavailable)
        self.assertIn("after 3 attempts", f.message)

    @defer.inlineCallbacks
    def test_silent_receiver(self):
        """
        A receiver that accepts the connection but never answers is given up after the
        sender's idle timeout (then retried; here no retries are left): Unavailable.
        """
        write_image(self.src, 8 * MiB, {0: pattern(0)})
        silent = []

        class Silent(Protocol):
            def connectionMade(self):
                silent.append(self)

        factory = TLSMemoryBIOFactory(
            self.dst_creds.server_context(), False, Factory.forProtocol(Silent)
        )
        port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        sender = VolumeSender(
            reactor, self.src_creds.peer_client_context, clock=self.clock, retries=0
        )
        d = sender.send("127.0.0.1", port.getHost().port, mint_token(), self.src, "host-dst")
        yield wait_for(lambda: silent)
        self.clock.advance(sender.idle_timeout - 1)
        self.assertNoResult(d)
        self.clock.advance(2)
        f = yield self.assertFailure(d, errors.Unavailable)
        self.assertIn("stopped answering", f.message)

    @defer.inlineCallbacks
    def test_corrupt_block_in_flight(self):
        """
        A block changed in flight fails verification: Corrupt, the partial copy is deleted,
        nothing is stored; a clean retry with the same token then succeeds.
        """
        write_image(self.src, 16 * MiB, {i * BLOCK_SIZE: pattern(i) for i in range(8)})
        token = mint_token()
        self.receiver.expect(token, "vol-1", 16 * MiB)
        corrupting = VolumeSender(reactor, self.src_creds.peer_client_context, clock=self.clock)
        corrupting.protocol = Corrupting
        f = yield self.assertFailure(
            corrupting.send("127.0.0.1", self.port, token, self.src, "host-dst"), errors.Corrupt
        )
        self.assertIn("failed verification", f.message)
        yield wait_for(lambda: self.temporaries() == [])
        self.assertFalse(self.store.exists("vol-1"))
        yield self.sender.send("127.0.0.1", self.port, token, self.src, "host-dst")
        self.assertSameBytes(self.src, self.store.path("vol-1"))

    @defer.inlineCallbacks
    def test_delta_sends_only_changed_blocks(self):
        """
        After a staged bulk copy, the source changes (blocks rewritten, a block punched to a
        hole, a hole filled); the delta sends only those blocks, then the volume is
        committed byte-identical.
        """
        size = 128 * MiB
        write_image(self.src, size, {i * BLOCK_SIZE: pattern(i) for i in range(0, 64)})
        token = mint_token()
        incoming = self.receiver.expect(token, "vol-1", size)
        bulk = yield self.sender.send(
            "127.0.0.1", self.port, token, self.src, "host-dst", commit=False
        )
        self.assertFalse(bulk["committed"])
        self.assertEqual(bulk["sent"], 64 * BLOCK_SIZE)
        self.assertEqual(incoming.state, "staged")
        self.assertFalse(self.store.exists("vol-1"))
        # The VM writes on, then stops.
        with open(self.src, "r+b") as f:
            for i in (3, 40):
                f.seek(i * BLOCK_SIZE + 100)
                f.write(b"changed")
            f.seek(100 * BLOCK_SIZE)
            f.write(pattern("new"))
        fd = os.open(self.src, os.O_RDWR)
        blockmap.punch_hole(fd, 10 * BLOCK_SIZE, BLOCK_SIZE)
        os.close(fd)
        delta = yield self.sender.send(
            "127.0.0.1", self.port, token, self.src, "host-dst", mode="delta"
        )
        self.assertTrue(delta["committed"])
        self.assertEqual(delta["blocks_sent"], 3)
        self.assertEqual(delta["sent"], 3 * BLOCK_SIZE)
        self.assertEqual(delta["zeroed"], BLOCK_SIZE)
        self.assertEqual(delta["digest"], streamed_digest(self.src))
        self.assertSameBytes(self.src, self.store.path("vol-1"))
        self.assertEqual(self.temporaries(), [])

    @defer.inlineCallbacks
    def test_delta_resumes(self):
        """
        A delta cut mid-stream resumes from the receiver's block map: the blocks it already
        wrote are not sent again, so every changed block is written exactly once.
        """
        size = 64 * MiB
        write_image(self.src, size, {i * BLOCK_SIZE: pattern(i) for i in range(48)})
        token = mint_token()
        incoming = self.receiver.expect(token, "vol-1", size)
        yield self.sender.send("127.0.0.1", self.port, token, self.src, "host-dst", commit=False)
        bulk = incoming.received
        with open(self.src, "r+b") as f:
            for i in range(0, 48, 2):  # 24 blocks change
                f.seek(i * BLOCK_SIZE)
                f.write(b"changed")
        proxy = CuttingProxy("127.0.0.1", self.port, cut_at=12 * MiB)
        port = yield self._proxied(proxy)
        d = self.sender.send(
            "127.0.0.1", port, token, self.src, "host-dst", mode="delta"
        )
        yield self._retryScheduled()
        # What the first attempt wrote, once the receiver saw the cut and its writes are done
        # (blocks still in flight at the cut are counted once they are written, not twice).
        yield wait_for(lambda: incoming._proto is None and not incoming._pending)
        first = incoming.received - bulk
        self.assertGreater(first, 0)
        self.assertLess(first, 24 * BLOCK_SIZE)
        self.clock.advance(self.sender.backoff[0])
        result = yield d
        self.assertEqual(proxy.cuts, 1)
        self.assertEqual(result["attempts"], 2)
        # The resumed attempt asked for the rest only: a resume that sent every changed block
        # again would write 24 blocks plus the first attempt's.
        self.assertEqual(incoming.received - bulk, 24 * BLOCK_SIZE)
        self.assertSameBytes(self.src, self.store.path("vol-1"))

    @defer.inlineCallbacks
    def test_delta_without_bulk(self):
        """
        A delta with no verified bulk copy to apply to is refused with Conflict.
        """
        write_image(self.src, 8 * MiB, {0: pattern(0)})
        token = mint_token()
        self.receiver.expect(token, "vol-1", 8 * MiB)
        f = yield self.assertFailure(
            self.sender.send("127.0.0.1", self.port, token, self.src, "host-dst", mode="delta"),
            errors.Conflict,
        )
        self.assertIn("send it in bulk", f.message)

    @defer.inlineCallbacks
    def test_size_mismatch(self):
        """
        An image whose size differs from the expected size is refused; nothing is written.
        """
        write_image(self.src, 8 * MiB, {0: pattern(0)})
        token = mint_token()
        self.receiver.expect(token, "vol-1", 16 * MiB)
        f = yield self.assertFailure(
            self.sender.send("127.0.0.1", self.port, token, self.src, "host-dst"),
            errors.InvalidArgument,
        )
        self.assertIn("16777216 bytes", f.message)
        self.assertEqual(self.temporaries(), [])

    @defer.inlineCallbacks
    def test_disk_full(self):
        """
        ENOSPC while writing: ResourceExhausted with a readable message, the partial copy is
        deleted, the sender does not retry.
        """
        write_image(self.src, 16 * MiB, {i * BLOCK_SIZE: pattern(i) for i in range(8)})
        calls = []

        def full(fd, parts, offset):
            calls.append(offset)
            if len(calls) >= 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return os.pwritev(fd, parts, offset)

        self.patch(receiving, "_pwritev", full)
        token = mint_token()
        self.receiver.expect(token, "vol-1", 16 * MiB)
        f = yield self.assertFailure(
            self.sender.send("127.0.0.1", self.port, token, self.src, "host-dst"),
            errors.ResourceExhausted,
        )
        self.assertIn("disk is full", f.message)
        yield wait_for(lambda: self.temporaries() == [])
        self.assertFalse(self.store.exists("vol-1"))

    @defer.inlineCallbacks
    def test_missing_source(self):
        """
        A source image that does not exist is NotFound, before any connection.
        """
        f = yield self.assertFailure(
            self.sender.send("127.0.0.1", self.port, mint_token(), self.src, "host-dst"),
            errors.NotFound,
        )
        self.assertIn(self.src, f.message)

    @defer.inlineCallbacks
    def test_backpressure(self):
        """
        When the receiver falls behind, the transport pauses the sender, which then writes
        nothing until resumed; the copy completes intact.
        """
        size = 96 * MiB
        write_image(self.src, size, {0: pattern("big", size)})
        slow = []  # offsets written

        def counting_write(fd, parts, offset):
            slow.append(offset)
            return os.pwritev(fd, parts, offset)

        self.patch(receiving, "_pwritev", counting_write)
        PauseRecorder.pauses = PauseRecorder.written_while_paused = 0
        sender = VolumeSender(reactor, self.src_creds.peer_client_context, clock=self.clock)
        sender.protocol = PauseRecorder
        token = mint_token()
        self.receiver.expect(token, "vol-1", size)
        yield sender.send("127.0.0.1", self.port, token, self.src, "host-dst")
        self.assertGreater(PauseRecorder.pauses, 0)
        self.assertEqual(PauseRecorder.written_while_paused, 0)
        self.assertEqual(len(slow), 96)
        self.assertSameBytes(self.src, self.store.path("vol-1"))

    @defer.inlineCallbacks
    def test_receiver_backpressure(self):
        """
        While the disk does not keep up, the receiver stops reading from the socket once
        RECEIVE_HIGH_WATER writes are queued, so memory stays bounded; when the disk
        catches up the copy completes intact.
        """
        size = 64 * MiB
        write_image(self.src, size, {0: pattern("bp", size)})
        gate = threading.Event()
        self.addCleanup(gate.set)

        def stuck(fd, parts, offset):
            gate.wait(30)
            return os.pwritev(fd, parts, offset)

        self.patch(receiving, "_pwritev", stuck)
        token = mint_token()
        incoming = self.receiver.expect(token, "vol-1", size)
        d = self.sender.send("127.0.0.1", self.port, token, self.src, "host-dst")
        yield wait_for(lambda: incoming._paused_reading)
        queued = incoming._pending
        self.assertGreaterEqual(queued, transfer.RECEIVE_HIGH_WATER)
        self.assertLessEqual(queued, transfer.RECEIVE_HIGH_WATER + 1)
        # The socket is no longer read from (when it is, it is in pieces of READ_SIZE).
        tcp = incoming._proto.transport.transport
        self.assertNotIn(tcp, reactor.getReaders())
        self.assertEqual(tcp.bufferSize, receiving.READ_SIZE)
        self.assertNoResult(d)
        gate.set()
        yield d
        self.assertFalse(incoming._paused_reading)
        self.assertSameBytes(self.src, self.store.path("vol-1"))

    @defer.inlineCallbacks
    def test_cancel(self):
        """
        Cancelling a transfer mid-stream closes it, deletes the partial copy, fails its
        observers and voids the token.
        """
        size = 64 * MiB
        write_image(self.src, size, {0: pattern("c", size)})
        token = mint_token()
        incoming = self.receiver.expect(token, "vol-1", size)
        done = incoming.when_done()
        d = self.sender.send("127.0.0.1", self.port, token, self.src, "host-dst")
        yield wait_for(lambda: incoming.received > 0)
        yield self.receiver.cancel(token)
        yield self.assertFailure(done, errors.Conflict)
        self.assertEqual(self.temporaries(), [])
        # The sender's reconnection is refused: the token is gone.
        yield self._retryScheduled()
        self.clock.advance(self.sender.backoff[0])
        yield self.assertFailure(d, errors.AuthenticationFailed)
        self.assertFalse(self.store.exists("vol-1"))

    @defer.inlineCallbacks
    def test_receiver_stops(self):
        """
        Stopping the receiver mid-stream closes the connection, deletes the partial copy and
        fails the transfer's observers; the sender, out of retries, fails with Unavailable.
        """
        size = 64 * MiB
        write_image(self.src, size, {0: pattern("s", size)})
        token = mint_token()
        incoming = self.receiver.expect(token, "vol-1", size)
        done = incoming.when_done()
        sender = VolumeSender(
            reactor, self.src_creds.peer_client_context, clock=self.clock, retries=0
        )
        d = sender.send("127.0.0.1", self.port, token, self.src, "host-dst")
        yield wait_for(lambda: incoming.received > 0)
        yield self.receiver.stopService()
        yield self.assertFailure(done, errors.Conflict)
        yield self.assertFailure(d, errors.Unavailable)
        self.assertEqual(self.temporaries(), [])
        self.assertFalse(self.store.exists("vol-1"))

    @defer.inlineCallbacks
    def test_token_expires(self):
        """
        A token not used within its time to live expires: its observers fail with
        Unavailable and a sender is then refused.
        """
        write_image(self.src, 8 * MiB, {0: pattern(0)})
        token = mint_token()
        incoming = self.receiver.expect(token, "vol-1", 8 * MiB, ttl=30)
        done = incoming.when_done()
        self.clock.advance(29)
        self.assertNoResult(done)
        self.clock.advance(2)
        f = yield self.assertFailure(done, errors.Unavailable)
        self.assertIn("expired", f.message)
        yield self.assertFailure(
            self.sender.send("127.0.0.1", self.port, token, self.src, "host-dst"),
            errors.AuthenticationFailed,
        )

    @defer.inlineCallbacks
    def test_idle_connection_closed(self):
        """
        A connection that sends nothing is closed after the idle timeout.
        """
        proto = yield self._rawConnection()
        yield wait_for(lambda: len(self.receiver._connections) == 1)
        self.clock.advance(self.receiver.idle_timeout + 1)
        yield wait_for(lambda: proto.lost)
        self.assertEqual(self.receiver._connections, set())

    @defer.inlineCallbacks
    def test_malformed_frames(self):
        """
        A frame that is not part of the protocol gets a Corrupt error frame and the
        connection is closed.
        """
        for garbage in [b"GET / HTTP/1.1\r\n\r\n", b"H\x00\x00\x00\x05notjs"]:
            proto = yield self._rawConnection()
            proto.transport.write(garbage)
            yield wait_for(lambda p=proto: p.lost)
            kind, n = struct.unpack(">cI", proto.received[:5])
            self.assertEqual(kind, b"X")
            msg = json.loads(proto.received[5 : 5 + n])
            self.assertEqual(msg["uri"], errors.Corrupt.uri)
            self.assertIn("malformed volume stream", msg["message"])

    # -- protocol violations each side refuses (issue 14) -----------------------------

    def _frame(self, kind, payload):
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        return struct.pack(">cI", kind, len(payload)) + payload

    def _frames(self, data):
        out = []
        while len(data) >= 5:
            kind, n = struct.unpack(">cI", data[:5])
            if len(data) < 5 + n:
                break
            out.append((kind, data[5 : 5 + n]))
            data = data[5 + n :]
        return out

    @defer.inlineCallbacks
    def _bulkHello(self, size=16 * MiB):
        """A raw connection that said hello for a bulk stream of C{size} bytes, answered."""
        token = mint_token()
        incoming = self.receiver.expect(token, "vol-1", size, peer="host-src")
        proto = yield self._rawConnection()
        proto.transport.write(self._frame(transfer.HELLO, {
            "v": transfer.PROTOCOL_VERSION, "token": token, "mode": "bulk", "size": size,
            "commit": True}))
        yield wait_for(lambda: proto.received)
        return incoming, proto

    @defer.inlineCallbacks
    def _refused_blocks(self, offsets):
        """Send blocks at C{offsets} in one bulk stream; @return: the answer frames."""
        incoming, proto = yield self._bulkHello()
        for off in offsets:
            proto.transport.write(self._frame(
                transfer.DATA, struct.pack(">Q", off) + pattern(off)))
        yield wait_for(lambda: proto.lost)
        frames = self._frames(proto.received)
        self.assertEqual(frames[0][0], transfer.READY)
        self.assertFalse(self.store.exists("vol-1"))
        self.assertNotEqual(incoming.state, "committed")
        return frames[1:]

    @defer.inlineCallbacks
    def test_tls_closed_mid_block(self):
        """
        A sender that ends TLS in the middle of a block's body: the connection ends, nothing
        is stored, the block's buffer goes back to the pool.
        """
        incoming, proto = yield self._bulkHello()
        block = self._frame(transfer.DATA, struct.pack(">Q", 0) + pattern(0))
        proto.transport.write(block[: len(block) // 2])
        yield wait_for(lambda: incoming._proto is not None and incoming._proto._body is not None
                       and incoming._proto._body.have > 0)
        taken = len(self.receiver.buffers._free)
        proto.transport.loseConnection()
        yield wait_for(lambda: proto.lost and not self.receiver._connections)
        self.assertEqual(len(self.receiver.buffers._free), taken + 1)
        self.assertIsNone(incoming._proto)
        self.assertEqual(incoming.received, 0)
        self.assertFalse(self.store.exists("vol-1"))

    @defer.inlineCallbacks
    def test_duplicate_block_refused(self):
        frames = yield self._refused_blocks([0, 0])
        self.assertEqual(frames[-1][0], transfer.ERROR)
        msg = json.loads(frames[-1][1])
        self.assertEqual(msg["uri"], errors.Corrupt.uri)
        self.assertIn("sent twice", msg["message"])

    @defer.inlineCallbacks
    def test_out_of_order_block_refused(self):
        frames = yield self._refused_blocks([2 * BLOCK_SIZE, BLOCK_SIZE])
        self.assertEqual(frames[-1][0], transfer.ERROR)
        msg = json.loads(frames[-1][1])
        self.assertEqual(msg["uri"], errors.Corrupt.uri)
        self.assertIn(f"block at {BLOCK_SIZE} sent twice", msg["message"])

    @defer.inlineCallbacks
    def test_staged_copy_is_not_finished_for_another_digest(self):
        """
        A sender that reconnects to a staged copy with another image digest (its image
        changed) is told to send again from the start, never that its copy is done.
        """
        size = 16 * MiB
        write_image(self.src, size, {0: pattern(0)})
        token = mint_token()
        incoming = self.receiver.expect(token, "vol-1", size, peer="host-src")
        bulk = yield self.sender.send(
            "127.0.0.1", self.port, token, self.src, "host-dst", commit=False)
        self.assertEqual(incoming.state, "staged")
        proto = yield self._rawConnection()
        other = "sha256-blocks:" + "0" * 64
        self.assertNotEqual(other, bulk["digest"])
        proto.transport.write(self._frame(transfer.HELLO, {
            "v": transfer.PROTOCOL_VERSION, "token": token, "mode": "bulk", "size": size,
            "commit": True, "digest": other}))
        yield wait_for(lambda: self._frames(proto.received))
        kind, payload = self._frames(proto.received)[0]
        self.assertEqual(kind, transfer.READY)
        self.assertEqual(json.loads(payload)["offset"], 0)
        self.assertFalse(self.store.exists("vol-1"))
        proto.transport.abortConnection()

    @defer.inlineCallbacks
    def _fake_receiver(self, answer):
        """
        A TLS endpoint that speaks as the receiver: C{answer(kind, payload)} returns the
        frames to send back. @return: its port number.
        """
        test = self

        class Fake(Protocol):
            buf = b""

            def dataReceived(self, data):
                self.buf += data
                frames = test._frames(self.buf)
                for kind, payload in frames:
                    self.buf = self.buf[5 + len(payload):]
                    for k, p in answer(kind, payload):
                        self.transport.write(test._frame(k, p))

        factory = TLSMemoryBIOFactory(self.dst_creds.server_context(), False,
                                      Factory.forProtocol(Fake))
        port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def test_sender_refuses_a_bad_resume_offset(self):
        size = 16 * MiB
        write_image(self.src, size, {0: pattern(0), BLOCK_SIZE: pattern(1)})
        for offset in (-BLOCK_SIZE, 100, BLOCK_SIZE + 1, "0", None):
            def answer(kind, payload, offset=offset):
                if kind == transfer.HELLO:
                    return [(transfer.READY, {"offset": offset, "block_size": BLOCK_SIZE,
                                              "blocks": size // BLOCK_SIZE})]
                return []

            port = yield self._fake_receiver(answer)
            e = yield self.assertFailure(
                self.sender.send("127.0.0.1", port, mint_token(), self.src, "host-dst"),
                errors.Corrupt)
            self.assertIn("bad resume offset", e.message, offset)

    @defer.inlineCallbacks
    def test_sender_refuses_a_done_with_another_digest(self):
        size = 16 * MiB
        write_image(self.src, size, {0: pattern(0)})

        def answer(kind, payload):
            if kind == transfer.HELLO:
                return [(transfer.READY, {"offset": 0, "block_size": BLOCK_SIZE,
                                          "blocks": size // BLOCK_SIZE})]
            if kind == transfer.END:
                return [(transfer.DONE, {"digest": "sha256-blocks:" + "0" * 64,
                                         "committed": True})]
            return []

        port = yield self._fake_receiver(answer)
        e = yield self.assertFailure(
            self.sender.send("127.0.0.1", port, mint_token(), self.src, "host-dst"),
            errors.Corrupt)
        self.assertIn("different digest", e.message)

    # -- the block hash each end offers and chooses -------------------------------------

    @defer.inlineCallbacks
    def test_a_receiver_that_names_no_hash_gets_sha256(self):
        """
        A receiver of the version before BLAKE3 (its ready names no hash; it hashes with
        SHA-256) gets blocks hashed with SHA-256 and a C{sha256-blocks:} end digest; the hello
        offered BLAKE3 first.
        """
        size = 16 * MiB
        write_image(self.src, size, {0: pattern(0), 5 * BLOCK_SIZE: pattern(5)})
        hellos, ends = [], []

        def answer(kind, payload):
            if kind == transfer.HELLO:
                hellos.append(json.loads(payload))
                return [(transfer.READY, {"offset": 0, "block_size": BLOCK_SIZE,
                                          "blocks": size // BLOCK_SIZE})]
            if kind == transfer.END:
                ends.append(json.loads(payload))
                return [(transfer.DONE, {"digest": ends[-1]["digest"], "committed": True})]
            return []

        port = yield self._fake_receiver(answer)
        result = yield self.sender.send("127.0.0.1", port, mint_token(), self.src, "host-dst")
        self.assertEqual(hellos[0]["hashes"], ["blake3", "sha256"])
        self.assertEqual(ends[0]["digest"], blockmap.file_digest(self.src, name="sha256"))
        self.assertEqual(result["digest"], ends[0]["digest"])

    @defer.inlineCallbacks
    def test_a_sender_that_offers_no_hash_gets_sha256(self):
        """
        A sender of the version before BLAKE3 (its hello offers none) is answered with
        C{"hash": "sha256"}, and its SHA-256 end digest verifies the copy.
        """
        size = 16 * MiB
        write_image(self.src, size, {0: pattern(0)})
        incoming, proto = yield self._bulkHello(size)
        ready = json.loads(self._frames(proto.received)[0][1])
        self.assertEqual(ready["hash"], "sha256")
        done = incoming.when_done()
        proto.transport.write(self._frame(transfer.DATA, struct.pack(">Q", 0) + pattern(0)))
        proto.transport.write(self._frame(transfer.END, {
            "digest": blockmap.file_digest(self.src), "commit": True}))
        stored = yield done
        self.assertEqual(stored["digest"], blockmap.file_digest(self.src, name="sha256"))
        self.assertSameBytes(self.src, self.store.path("vol-1"))

    @defer.inlineCallbacks
    def test_unknown_or_malformed_hashes_refused(self):
        """
        A hello whose hashes are none this host knows, or not a list of names, is refused with
        InvalidArgument, and the transfer is left as it was (nothing staged).
        """
        for hashes, words in [
            (["md5", "crc32"], "none of the block hashes ['md5', 'crc32'] is known to this host"
                               " (it knows blake3, sha256)"),
            ("blake3", "malformed hello: hashes must be a list"),
            ([], "malformed hello: hashes must be a list"),
            ([1], "malformed hello: hashes must be a list"),
        ]:
            token = mint_token()
            incoming = self.receiver.expect(token, "vol-1", 16 * MiB, peer="host-src")
            proto = yield self._rawConnection()
            proto.transport.write(self._frame(transfer.HELLO, {
                "v": transfer.PROTOCOL_VERSION, "token": token, "mode": "bulk",
                "size": 16 * MiB, "commit": True, "hashes": hashes}))
            yield wait_for(lambda p=proto: p.lost)
            kind, payload = self._frames(proto.received)[0]
            self.assertEqual(kind, transfer.ERROR)
            msg = json.loads(payload)
            self.assertEqual(msg["uri"], errors.InvalidArgument.uri)
            self.assertIn(words, msg["message"])
            self.assertEqual(incoming.state, "new")
            self.assertEqual(self.temporaries(), [])
            self.receiver.cancel(token)

    @defer.inlineCallbacks
    def test_the_receiver_takes_the_senders_first_known_hash(self):
        """
        The receiver answers with the first hash of the offer it knows.
        """
        for hashes, chosen in [(["md5", "sha256", "blake3"], "sha256"), (["blake3"], "blake3")]:
            token = mint_token()
            self.receiver.expect(token, "vol-1", 16 * MiB, peer="host-src")
            proto = yield self._rawConnection()
            proto.transport.write(self._frame(transfer.HELLO, {
                "v": transfer.PROTOCOL_VERSION, "token": token, "mode": "bulk",
                "size": 16 * MiB, "commit": True, "hashes": hashes}))
            yield wait_for(lambda p=proto: self._frames(p.received))
            kind, payload = self._frames(proto.received)[0]
            self.assertEqual(kind, transfer.READY)
            self.assertEqual(json.loads(payload)["hash"], chosen)
            proto.transport.abortConnection()
            yield self.receiver.cancel(token)

    @defer.inlineCallbacks
    def test_sender_refuses_a_hash_it_did_not_offer(self):
        size = 16 * MiB
        write_image(self.src, size, {0: pattern(0)})

        def answer(kind, payload):
            if kind == transfer.HELLO:
                return [(transfer.READY, {"offset": 0, "block_size": BLOCK_SIZE,
                                          "blocks": size // BLOCK_SIZE, "hash": "md5"})]
            return []

        port = yield self._fake_receiver(answer)
        e = yield self.assertFailure(
            self.sender.send("127.0.0.1", port, mint_token(), self.src, "host-dst"),
            errors.Corrupt)
        self.assertEqual(e.message, "the receiver chose the block hash 'md5', which was not offered")

    @defer.inlineCallbacks
    def test_a_copy_keeps_its_hash(self):
        """
        A bulk copy begun by an older sender (SHA-256) is resumed by a newer one in SHA-256,
        which it also offers; a delta to a SHA-256 copy from a sender that offers only BLAKE3
        is refused (Conflict), the staged copy kept.
        """
        size = 16 * MiB
        write_image(self.src, size, {0: pattern(0), 3 * BLOCK_SIZE: pattern(3)})
        incoming, proto = yield self._bulkHello(size)
        proto.transport.write(self._frame(transfer.DATA, struct.pack(">Q", 0) + pattern(0)))
        yield wait_for(lambda: incoming.received == BLOCK_SIZE)
        proto.transport.loseConnection()
        yield wait_for(lambda: incoming._proto is None)
        result = yield self.sender.send(
            "127.0.0.1", self.port, incoming.token, self.src, "host-dst", commit=False)
        self.assertEqual(incoming.resumed_at, [0, BLOCK_SIZE])
        self.assertEqual(result["blocks_sent"], 1)
        self.assertEqual(result["digest"], blockmap.file_digest(self.src, name="sha256"))
        self.assertEqual(incoming.state, "staged")

        proto = yield self._rawConnection()
        proto.transport.write(self._frame(transfer.HELLO, {
            "v": transfer.PROTOCOL_VERSION, "token": incoming.token, "mode": "delta",
            "size": size, "commit": True, "hashes": ["blake3"]}))
        yield wait_for(lambda: proto.lost)
        kind, payload = self._frames(proto.received)[0]
        self.assertEqual(kind, transfer.ERROR)
        msg = json.loads(payload)
        self.assertEqual(msg["uri"], errors.Conflict.uri)
        self.assertIn("hashed with sha256, which the sender does not offer", msg["message"])
        self.assertEqual(incoming.state, "staged")
        self.assertEqual(incoming.digest, result["digest"])

    def _rawConnection(self):
        class Raw(Protocol):
            lost = False
            received = b""

            def dataReceived(self, data):
                self.received += data

            def connectionLost(self, reason):
                self.lost = True

        ep = endpoints.wrapClientTLS(
            self.src_creds.peer_client_context("host-dst", "127.0.0.1"),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
        )
        d = endpoints.connectProtocol(ep, Raw())

        def connected(proto):
            self.addCleanup(lambda: wait_for(lambda: proto.lost))
            self.addCleanup(lambda: proto.lost or proto.transport.abortConnection())
            return proto

        return d.addCallback(connected)


class ExpectTests(SynchronousTestCase):
    """
    L{VolumeReceiver.expect} rejects bad requests with readable errors.
    """

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        ca = pki.CertificateAuthority.create()
        cert, key = ca.issue_host("host-dst", names=("127.0.0.1",))
        creds = pki.HostCredentials(ca.certificate_pem, cert, key)
        self.store = VolumeStore(reactor, os.path.join(self.dir, "dst"))
        self.clock = task.Clock()
        self.receiver = VolumeReceiver(
            reactor, self.store, creds.server_context(), clock=self.clock, threadpool=object()
        )

    def test_bad_arguments(self):
        for args in [
            ("short", "v", 10),
            (mint_token(), "../etc", 10),
            (mint_token(), "v", 0),
            (mint_token(), "v", "10"),
            (mint_token(), "v", True),
        ]:
            self.assertRaises(errors.InvalidArgument, self.receiver.expect, *args)

    def test_duplicates(self):
        token = mint_token()
        self.receiver.expect(token, "v", 10)
        self.assertRaises(errors.Conflict, self.receiver.expect, token, "w", 10)
        self.assertRaises(errors.Conflict, self.receiver.expect, mint_token(), "v", 10)

    def test_existing_volume(self):
        """
        A volume that exists on the host is never overwritten: expecting it is a Conflict.
        """
        with open(os.path.join(self.store.root, "v.img"), "wb") as f:
            f.write(b"x")
        e = self.assertRaises(errors.Conflict, self.receiver.expect, mint_token(), "v", 10)
        self.assertIn("already exists", e.message)

    def test_tokens_are_random(self):
        tokens = {mint_token() for _ in range(100)}
        self.assertEqual(len(tokens), 100)
        self.assertTrue(all(len(t) >= 43 for t in tokens))


class WritePartsTests(SynchronousTestCase):
    """
    L{receiving._write_parts} writes a block received in pieces, even after a short write.
    """

    def test_short_write(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.truncate(4 * MiB)
        parts = [pattern(1, 1000), pattern(2, 5000), pattern(3, 300)]

        def short(fd, parts, offset):
            return os.pwrite(fd, parts[0][:700], offset)

        self.patch(receiving, "_pwritev", short)
        fd = os.open(path, os.O_RDWR)
        try:
            digest = receiving._write_parts(fd, parts, MiB, 6300)
            self.assertEqual(os.pread(fd, 6300, MiB), b"".join(parts))
        finally:
            os.close(fd)
        self.assertEqual(digest, hashlib.sha256(b"".join(parts)).digest())

    def test_direct_write(self):
        """
        With a descriptor opened with C{O_DIRECT}, an aligned block is gathered into an aligned
        buffer and written through it (the rest through the page cache after a short write);
        the buffer goes back to the pool.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.truncate(4 * MiB)
        direct = receiving._open_direct(path)
        if direct is None:
            raise SkipTest("this file system does not take O_DIRECT")
        parts = [pattern(1, 5000), pattern(2, BLOCK_SIZE - 5000)]
        calls = []

        def short(fd, bufs, offset):
            calls.append(fd)
            return os.pwritev(fd, [memoryview(bufs[0])[: 64 * 1024]], offset)

        self.patch(receiving, "_pwritev", short)
        buffers = receiving._Buffers()
        fd = os.open(path, os.O_RDWR)
        try:
            digest = receiving._write_parts(fd, parts, MiB, BLOCK_SIZE, direct, buffers)
            self.assertEqual(calls, [direct])
            self.assertEqual(os.pread(fd, BLOCK_SIZE, MiB), b"".join(parts))
            self.assertEqual(digest, hashlib.sha256(b"".join(parts)).digest())
            self.assertEqual(len(buffers._free), 1)
            # Not a whole number of sectors: through the page cache.
            digest = receiving._write_parts(fd, [b"x" * 1000], 0, 1000, direct, buffers)
            self.assertEqual(calls, [direct, fd])
            self.assertEqual(os.pread(fd, 1000, 0), b"x" * 1000)
        finally:
            os.close(fd)
            os.close(direct)


class SenderFileTests(SynchronousTestCase):
    """
    The sender closes the image only once no block read is in flight on it.
    """

    def _send(self):
        sender = VolumeSender(task.Clock(), None, threadpool=object())
        return sending._Send(
            sender, "127.0.0.1", 1, "t" * 16, self.mktemp(), "host-dst", "bulk", True, None
        )

    def test_tls_error_after_an_answer_is_retried(self):
        """
        A TLS error on a connection the receiver had answered on (its handshake over) is a
        stream broken on the way: tried again, and named if it was the last attempt. Before
        an answer, it is a refused handshake: given up at once.
        """
        alert = Failure(SSL.Error([("SSL routines", "", "sslv3 alert bad record mac")]))
        send = self._send()
        send.attempts = 1
        self.assertIsNone(send._why_not_again(alert, answered=True))
        self.assertEqual(send.last_error, "the TLS connection broke: sslv3 alert bad record mac")
        send.attempts = send.sender.retries + 1
        err = send._why_not_again(alert, answered=True)
        self.assertIsInstance(err, errors.Unavailable)
        self.assertIn("the TLS connection broke: sslv3 alert bad record mac", err.message)
        err = self._send()._why_not_again(alert, answered=False)
        self.assertIsInstance(err, errors.AuthenticationFailed)
        self.assertIn("the TLS handshake with host host-dst", err.message)

    def test_closed_after_the_last_read(self):
        class Pool:
            def callInThread(self, f, *args):
                f(*args)

        path = self.mktemp()
        with open(path, "wb") as f:
            f.truncate(MiB)
        sender = VolumeSender(task.Clock(), None, threadpool=Pool())
        send = sending._Send(
            sender, "127.0.0.1", 1, "t" * 16, path, "host-dst", "bulk", True, None
        )
        send.fd = fd = os.open(path, os.O_RDONLY)
        self.addCleanup(lambda: send.fd is not None and os.close(send.fd))
        send.reading = 2  # two reads in flight
        send._close_file()  # the outcome is decided
        os.fstat(fd)  # still open: a read in flight holds the number
        send.readDone()
        os.fstat(fd)
        send.readDone()
        self.assertIsNone(send.fd)
        self.assertRaises(OSError, os.fstat, fd)


class WriteQueueTests(SynchronousTestCase):
    """
    A receiver's block writes: L{receiving.WRITERS} at once, on different blocks; a block's
    writes in the order they came; L{IncomingTransfer._after_writes} waits for those queued
    before it.
    """

    def test_writes_overlap_but_not_on_one_block(self):
        started = []

        def in_thread(reactor, threadpool, work, fd):
            d = defer.Deferred()
            started.append((work.__name__, d))
            return d

        self.patch(receiving, "deferToThreadPool", in_thread)
        receiver = VolumeReceiver(task.Clock(), None, None, threadpool=object())
        incoming = receiving.IncomingTransfer(receiver, "t" * 16, "vol-1", 8 * MiB, None)
        incoming._fd = 99  # never touched: the work functions are fakes
        done = []

        def queue(name, index):
            work = lambda fd: None  # noqa: E731
            work.__name__ = name
            incoming._queue(work, lambda _: done.append(name), None, index)

        queue("a", 1)
        queue("c", 2)
        queue("b", 1)
        queue("d", 3)
        after_four = incoming._after_writes()
        self.assertEqual([n for n, _ in started], ["a", "c"])
        started[1][1].callback(None)  # c is written; b must wait for a, d behind b
        self.assertEqual([n for n, _ in started], ["a", "c"])
        started[0][1].callback(None)
        self.assertEqual([n for n, _ in started], ["a", "c", "b", "d"])
        queue("e", 4)
        self.assertNoResult(after_four)
        started[2][1].callback(None)
        started[3][1].callback(None)
        self.successResultOf(after_four)  # e, queued after, is not waited for
        self.assertEqual(done, ["c", "a", "b", "d"])
        self.assertEqual(incoming._pending, 1)
        # A write that ends after its file was given up (a new copy started) changes
        # nothing of the new copy's state.
        incoming._fd = 100
        for _ in range(receiving.KEEP_BUFFERS + 3):
            receiver.buffers.give(mmap.mmap(-1, 4096))
        started[4][1].callback(None)
        self.assertEqual(done, ["c", "a", "b", "d"])
        self.assertEqual(incoming._pending, 0)
        # No connection and nothing left to write: the buffer pool shrinks back.
        self.assertEqual(len(receiver.buffers._free), receiving.KEEP_BUFFERS)


class Recorder(wire._Framed):
    """
    A framed protocol that records what it parses.
    """

    limits = {transfer.HELLO: 1000, transfer.DATA: 8 + 5000, transfer.END: 1000}

    def __init__(self):
        self.frames = []

    def frameReceived(self, kind, payload):
        self.frames.append((kind, payload))

    def bodyReceived(self, kind, head, parts, length):
        body = b"".join(parts)
        assert len(body) == length
        self.frames.append((kind, head + body))


class BufferRecorder(Recorder):
    """
    A framed protocol that gathers bodies into buffers of its own.
    """

    def bodyBuffer(self, kind, length):
        return bytearray(length + 3)

    def bodyReceived(self, kind, head, parts, length):
        raise AssertionError("a body was gathered in pieces")

    def bufferReceived(self, kind, head, buf, length):
        self.frames.append((kind, head + bytes(buf[:length])))


class FramingTests(SynchronousTestCase):
    """
    Frames are reassembled whatever the pieces the transport delivers them in.
    """

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just(transfer.HELLO), st.binary(max_size=1000)),
                st.tuples(st.just(transfer.DATA), st.binary(min_size=8, max_size=5008)),
                st.tuples(st.just(transfer.END), st.binary(max_size=50)),
            ),
            max_size=8,
        ),
        st.lists(st.integers(min_value=1, max_value=7000), max_size=30),
    )
    def test_any_split(self, frames, cuts):
        wire = b"".join(struct.pack(">cI", k, len(p)) + p for k, p in frames)
        for recorder in (Recorder, BufferRecorder):
            proto = recorder()
            proto.makeConnection(StringTransport())
            pos = 0
            for cut in cuts:
                proto.dataReceived(wire[pos : pos + cut])
                pos += cut
            proto.dataReceived(wire[pos:])
            self.assertEqual(proto.frames, frames)

    def test_body_filled_in_place(self):
        """
        Bytes written into L{wire._Framed.bodyView} (as the TLS layer decrypts them) count
        toward the body, which is handed over once complete; what follows is parsed as usual.
        """
        proto = BufferRecorder()
        proto.makeConnection(StringTransport())
        self.assertIsNone(proto.bodyView())
        body = pattern(7, 3000)
        proto.dataReceived(struct.pack(">cI", transfer.DATA, 8 + 3000) + b"offset!!" + body[:10])
        view = proto.bodyView()
        self.assertEqual(len(view), 2990)
        view[:1990] = body[10:2000]
        proto.bodyFilled(1990)
        proto.bodyView()[:1000] = body[2000:]
        proto.bodyFilled(1000)
        self.assertIsNone(proto.bodyView())
        self.assertEqual(proto.frames, [(transfer.DATA, b"offset!!" + body)])
        proto.dataReceived(struct.pack(">cI", transfer.END, 2) + b"{}")
        self.assertEqual(proto.frames[-1], (transfer.END, b"{}"))

    def test_oversized_frame(self):
        """
        A frame longer than its kind allows is refused with an error frame; the connection
        is closed.
        """
        proto = Recorder()
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(struct.pack(">cI", transfer.HELLO, 1001))
        self.assertTrue(transport.disconnecting)
        kind, n = struct.unpack(">cI", transport.value()[:5])
        self.assertEqual(kind, transfer.ERROR)
        self.assertEqual(json.loads(transport.value()[5 : 5 + n])["uri"], errors.Corrupt.uri)
        self.assertEqual(proto.frames, [])


class VolumeTransfersTests(TestCase):
    """
    L{VolumeTransfers}: two agents' stores, volumes addressed by id.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.clock = task.Clock()
        ca = pki.CertificateAuthority.create()
        self.agents = {}
        for name in ("host-a", "host-b"):
            cert, key = ca.issue_host(name, names=("127.0.0.1",))
            store = VolumeStore(reactor, os.path.join(self.dir, name))
            self.agents[name] = VolumeTransfers(
                reactor,
                store,
                pki.HostCredentials(ca.certificate_pem, cert, key),
                clock=self.clock,
                retries=1,
            )
        self.addCleanup(self._stop)
        yield self.agents["host-b"].listen()

    @defer.inlineCallbacks
    def _stop(self):
        for agent in self.agents.values():
            yield agent.receiver.stopService()
        yield wait_for(lambda: not any(a.receiver._connections for a in self.agents.values()))

    @defer.inlineCallbacks
    def test_move_volume(self):
        """
        A volume made by the source's store arrives in the target's store, byte-identical,
        and passes e2fsck; the target reports the transfer committed.
        """
        a, b = self.agents["host-a"], self.agents["host-b"]
        yield a.store.create("data-1", 16)
        size = os.path.getsize(a.store.path("data-1"))
        token = mint_token()
        where = b.receive(token, "data-1", size, source="host-a")
        self.assertEqual(b.status(token)["state"], "new")
        result = yield a.send("data-1", "127.0.0.1", where["port"], token, "host-b")
        self.assertTrue(result["committed"])
        self.assertEqual(b.status(token)["state"], "committed")
        with open(a.store.path("data-1"), "rb") as f, open(b.store.path("data-1"), "rb") as g:
            self.assertEqual(f.read(), g.read())
        check = subprocess.run(["e2fsck", "-fn", b.store.path("data-1")], capture_output=True)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        # It is never overwritten.
        self.assertRaises(errors.Conflict, b.receive, mint_token(), "data-1", size)

    def test_unknown_volume(self):
        """
        Sending a volume the source does not have is NotFound.
        """
        e = self.assertRaises(
            errors.NotFound,
            self.agents["host-a"].send,
            "nope",
            "127.0.0.1",
            1,
            mint_token(),
            "host-b",
        )
        self.assertIn("nope", e.message)

    def test_not_listening(self):
        """
        Expecting a volume before the receiver listens is Unavailable.
        """
        self.assertRaises(errors.Unavailable, self.agents["host-a"].receive, mint_token(), "v", 10)

    def test_unknown_options(self):
        self.assertRaises(TypeError, VolumeTransfers, reactor, None, None, retry=3)
