"""
The sending end of volume streams: L{VolumeSender} streams the allocated blocks of a local
image (C{SEEK_DATA}/C{SEEK_HOLE}) with a push producer that honours the transport's
backpressure and reads the file in threads, and retries a dropped connection from the offset
the receiver reports (L{_Send}).
"""

import os
from collections import deque

from OpenSSL import SSL
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IPushProducer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from zwrm import errors
from zwrm.agent import blockmap
from zwrm.agent.blockmap import BLOCK_SIZE
from zwrm.agent.transfer.attempts import SendAttempts
from zwrm.agent.transfer.wire import (
    _HEADER,
    _MAX_CONTROL,
    _OFFSET,
    _ZERO,
    BLOCKMAP,
    DATA,
    DONE,
    END,
    ERROR,
    HELLO,
    PROTOCOL_VERSION,
    READY,
    ZERO,
    RecordWriter,
    _error_from,
    _Framed,
    tls_factory,
)
from zwrm.endpoints import connect_error_text, tls_error_text

log = Logger()

#: Block reads the sender keeps in flight ahead of the socket.
READ_AHEAD = 6


class _Item:
    __slots__ = ("index", "read", "send", "result", "buf")

    def __init__(self, index, read, send):
        self.index = index
        self.read = read
        self.send = send
        self.result = None
        self.buf = None


@implementer(IPushProducer)
class _SenderProtocol(_Framed):
    """
    One connection of a L{_Send}: the hello, then blocks pushed as the transport allows.
    """

    limits = {READY: _MAX_CONTROL, DONE: _MAX_CONTROL, ERROR: _MAX_CONTROL}

    def __init__(self, send):
        self._send = send
        self._paused = False
        self._stopped = False
        self._pumping = False
        self._plan = None
        self._inflight = deque()
        self._reads = 0
        self._remote = None
        self._expectBlockmap = False
        self._finished = False
        self._timer = None
        self._out = None
        #: The receiver sent a frame: the TLS handshake is long over.
        self.answered = False

    def _touch(self, timeout=None):
        """
        Progress was made: the connection is given up (and retried) only if none is made for
        the sender's C{idle_timeout}, or C{timeout}.
        """
        if timeout is None:
            timeout = self._send.sender.idle_timeout
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        elif not self._stopped:
            self._timer = self._send.sender.clock.callLater(timeout, self._timedOut)

    def _timedOut(self):
        self._timer = None
        self._send.cause = "the receiver stopped answering"
        self.transport.abortConnection()

    def connectionMade(self):
        _Framed.connectionMade(self)
        self._touch()
        s = self._send
        hello = {
            "v": PROTOCOL_VERSION,
            "token": s.token,
            "mode": s.mode,
            "size": s.size,
            "commit": s.commit,
            # The block hashes it can use, the one it prefers first; once a receiver chose
            # one, only that one (its hashes of the blocks read so far are in it).
            "hashes": [s.algorithm] if s.algorithm is not None else list(blockmap.PREFERRED),
        }
        if s.end_digest is not None:
            hello["digest"] = s.end_digest
        self.sendFrame(HELLO, hello)
        s.connected(self)

    def frameReceived(self, kind, payload):
        self.answered = True
        s = self._send
        if not self._finished:
            self._touch()
        if kind == ERROR:
            self._closing = True
            self.transport.loseConnection()
            s.remoteError(_error_from(self._json(payload)))
        elif kind == DONE:
            self._closing = True
            self.transport.loseConnection()
            s.completed(self._json(payload))
        elif kind == READY and self._plan is None and not self._expectBlockmap:
            msg = self._json(payload)
            if msg.get("block_size") != BLOCK_SIZE:
                raise errors.InvalidArgument(
                    f"the receiver uses blocks of {msg.get('block_size')!r} bytes"
                )
            s.useAlgorithm(msg.get("hash", blockmap.DEFAULT))
            if s.mode == "bulk":
                offset = msg.get("offset")
                if not isinstance(offset, int) or offset < 0 or offset % BLOCK_SIZE:
                    raise errors.Corrupt(f"the receiver reported a bad resume offset {offset!r}")
                s.resumed_at.append(offset)
                self._start(s.bulkPlan(offset))
            else:
                self._expectBlockmap = True
                self.limits = {**self.limits, BLOCKMAP: 32 * len(s.hashes)}
        elif kind == BLOCKMAP and self._expectBlockmap:
            if len(payload) != 32 * len(s.hashes):
                raise errors.Corrupt("the receiver's block map has the wrong length")
            self._expectBlockmap = False
            self._remote = [payload[i : i + 32] for i in range(0, len(payload), 32)]
            s.resumed_at.append(0)
            self._start(s.deltaPlan())
        else:
            raise errors.Corrupt(f"malformed volume stream: unexpected frame {kind!r}")

    def failed(self, err):
        self._send.remoteError(err)

    def _start(self, plan):
        self._plan = iter(plan)
        self._out = RecordWriter(self.transport)
        self.transport.registerProducer(self, True)
        self._pump()

    # IPushProducer

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        self._touch()
        self._pump()

    def stopProducing(self):
        self._stopped = True

    # the pump

    def _fill(self):
        s = self._send
        while self._plan is not None and self._reads < READ_AHEAD and len(self._inflight) < 64:
            item = next(self._plan, None)
            if item is None:
                self._plan = None
                break
            self._inflight.append(item)
            if item.read:
                self._reads += 1
                s.reading += 1
                item.buf = s.takeBuffer()
                d = deferToThreadPool(
                    s.reactor,
                    s.threadpool,
                    blockmap.read_block_into,
                    s.fd,
                    item.index,
                    s.size,
                    item.buf,
                    BLOCK_SIZE,
                    s.algorithm,
                )
                d.addCallbacks(
                    self._read, self._readFailed, callbackArgs=(item,), errbackArgs=(item,)
                )
            else:
                item.result = (
                    None,
                    blockmap.zero_hash(blockmap.block_length(item.index, s.size), s.algorithm),
                    True,
                )

    def _read(self, result, item):
        self._reads -= 1
        self._send.readDone()
        item.result = result
        if self._stopped:
            self._release(item)
            return
        self._pump()

    def _release(self, item):
        if item.buf is not None:
            self._send.putBuffer(item.buf)
            item.buf = None

    def _readFailed(self, f, item):
        self._reads -= 1
        self._send.readDone()
        self._release(item)
        if self._stopped:
            # The connection is gone (or going) already: a read still in flight when it
            # went is moot, whatever became of it; the attempt's outcome is decided.
            return
        self._stopped = True
        err = errors.Unavailable(
            f"cannot read volume image {self._send.path}: {f.getErrorMessage()}"
        )
        self._send.localError(err)
        self.transport.abortConnection()

    def _pump(self):
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._paused and not self._stopped and not self._finished:
                if not self._out.flush(self._isPaused):
                    return
                self._fill()
                if not self._inflight:
                    if self._plan is None:
                        self._finish()
                    return
                head = self._inflight[0]
                if head.result is None:
                    return
                self._inflight.popleft()
                self._handle(head)
        finally:
            self._pumping = False

    def _isPaused(self):
        return self._paused or self._stopped

    def _handle(self, item):
        s = self._send
        data, digest, is_zero = item.result
        length = blockmap.block_length(item.index, s.size)
        s.hashes[item.index] = digest
        s.known.add(item.index)
        offset = item.index * BLOCK_SIZE
        if s.mode == "delta":
            if digest != self._remote[item.index]:
                if is_zero:
                    self._out.write(_HEADER.pack(ZERO, _ZERO.size) + _ZERO.pack(offset, length))
                    s.zeroed += length
                else:
                    self._writeData(offset, data)
            if item.read:
                s.advance(length)
        elif item.send:
            if not is_zero:
                self._writeData(offset, data)
            s.advance(length)
        # OpenSSL has encrypted the block into its memory BIO by now: the buffer is free.
        self._release(item)

    def _writeData(self, offset, data):
        data = self.frameData(offset, data)
        # The block gets TLS records of its own, which the receiver gathers without slicing.
        self._out.write(_HEADER.pack(DATA, _OFFSET.size + len(data)) + _OFFSET.pack(offset), data)
        self._send.sent += len(data)
        self._send.sender.bytes_sent += len(data)  # the agent's /metrics
        self._send.blocks_sent += 1
        self._touch()

    def frameData(self, offset, data):
        """
        The bytes that go on the wire for the block at C{offset} (a seam for fault tests).
        """
        return data

    def _finish(self):
        self._finished = True
        s = self._send
        s.end_digest = blockmap.image_digest(s.size, s.hashes, name=s.algorithm)
        self.sendFrame(END, {"digest": s.end_digest, "commit": s.commit})
        self.transport.unregisterProducer()
        # The receiver now verifies and fsyncs the whole copy before it answers.
        self._touch(s.sender.verify_timeout)

    def connectionLost(self, reason):
        self._stopped = True
        for item in self._inflight:
            if item.result is not None:
                self._release(item)
        self._inflight.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._send.disconnected(self, reason)


class _Send:
    """
    One call of L{VolumeSender.send}: the file, what has been read and hashed, the attempts.
    """

    def __init__(self, sender, host, port, token, path, target, mode, commit, progress):
        self.sender = sender
        self.reactor = sender.reactor
        self.threadpool = sender.threadpool
        self.host, self.port, self.token, self.path = host, port, token, path
        self.mode, self.commit, self.progress = mode, commit, progress
        self.target = target
        self.fd = None
        self.reading = 0  # block reads in threads, all connections included
        self.closing = False
        self.size = None
        self.blocks = []
        self.allocated = 0
        self.hashes = []
        self.known = set()
        self.sent = 0
        self.zeroed = 0
        self.blocks_sent = 0
        self.done_bytes = 0
        self.attempts = 0
        self.resumed_at = []
        self.end_digest = None
        self.algorithm = None  # the block hash, once a receiver chose it (L{useAlgorithm})
        self.buffers = []
        self.proto = None
        self.delayed = None
        self.result = defer.Deferred(self._cancel)
        self.outcome = None
        self.last_error = None
        self.cause = None
        self.machine = SendAttempts(self)

    def start(self):
        d = deferToThreadPool(self.reactor, self.threadpool, self._scan)
        d.addCallbacks(lambda _: self.machine.scanned(), self._scanFailed)
        return self.result

    def _scan(self):
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            blocks = blockmap.data_blocks(blockmap.data_extents(fd, size), size)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.size, self.blocks = fd, size, blocks
        self.allocated = sum(blockmap.block_length(i, size) for i in blocks)
        self.hashes = blockmap.hole_hashes(size)

    def _scanFailed(self, f):
        if f.check(FileNotFoundError):
            err = errors.NotFound(f"volume image {self.path} does not exist")
        elif f.check(OSError):
            err = errors.Unavailable(f"cannot open volume image {self.path}: {f.value.strerror}")
        else:
            err = errors.Internal(f"cannot read volume image {self.path}")
            log.failure("volume scan failed", f)
        self.machine.scan_failed(err)

    def useAlgorithm(self, name):
        """
        The receiver chose the block hash C{name} from what the hello offered.

        @raise errors.Corrupt: it was not offered.
        """
        offered = [self.algorithm] if self.algorithm is not None else blockmap.PREFERRED
        if name not in offered:
            raise errors.Corrupt(
                f"the receiver chose the block hash {name!r}, which was not offered"
            )
        if self.algorithm is None:
            self.algorithm = name
            self.hashes = blockmap.hole_hashes(self.size, name=name)

    def takeBuffer(self):
        """
        @return: a block buffer from the pool (a new one if it is empty).
        """
        return self.buffers.pop() if self.buffers else bytearray(BLOCK_SIZE)

    def putBuffer(self, buf):
        self.buffers.append(buf)

    def bulkPlan(self, offset):
        """
        @return: the blocks to read: those the receiver has (only to hash them, if not yet
            hashed), then those it lacks (to send).
        """
        self.done_bytes = 0
        plan = []
        for index in self.blocks:
            if index * BLOCK_SIZE < offset:
                self.done_bytes += blockmap.block_length(index, self.size)
                if index not in self.known:
                    plan.append(_Item(index, True, False))
            else:
                plan.append(_Item(index, True, True))
        self.report()
        return plan

    def deltaPlan(self):
        self.done_bytes = 0
        data = set(self.blocks)
        for index in range(len(self.hashes)):
            yield _Item(index, index in data, True)

    def advance(self, length):
        self.done_bytes += length
        self.report()

    def report(self):
        if self.progress is not None:
            try:
                self.progress({"sent": self.sent, "done": self.done_bytes, "total": self.allocated})
            except Exception:
                log.failure("volume stream progress callback failed")

    # -- the attempts (L{SendAttempts}) and their hooks ----------------------------------

    def _connect(self):
        self.delayed = None
        self.attempts += 1
        ep = endpoints.TCP4ClientEndpoint(
            self.reactor, self.host, self.port, timeout=self.sender.connect_timeout
        )
        factory = tls_factory(
            self.sender.tls(self.target, self.host), True, self.sender.protocol(self), self.reactor
        )
        d = ep.connect(factory)
        d.addErrback(self._lost)

    def connected(self, proto):
        self.machine.connected(proto)

    def disconnected(self, proto, reason):
        self._lost(reason, proto.answered)

    def _lost(self, reason, answered=False):
        """A connection failed or was lost: it is tried again, or the stream gives up."""
        err = self._why_not_again(reason, answered)
        if err is None:
            self.machine.broke()
        else:
            self.machine.gave_up(err)

    def _why_not_again(self, reason, answered=False):
        """
        @param answered: the receiver had answered on the connection (its TLS handshake was
            over): a TLS error then is a stream broken on the way (a record changed in
            flight, refused by either end), tried again like any broken connection.
        @return: the error to give up with (a refused TLS handshake, no retries left), or
            L{None} to try again.
        """
        if reason.check(SSL.Error) and not answered:
            detail = getattr(reason.value, "message", None)
            if not isinstance(detail, str):
                detail = "the certificates were refused"
            return errors.AuthenticationFailed(
                f"the TLS handshake with host {self.target} ({self.host}:{self.port}) failed:"
                f" {detail}"
            )
        if reason.check(SSL.Error) and self.cause is None:
            detail = tls_error_text(reason.value) or type(reason.value).__name__
            self.cause = f"the TLS connection broke: {detail}"
        self.last_error = self.cause or connect_error_text(reason)
        self.cause = None
        if self.attempts > self.sender.retries:
            plural = "s" if self.attempts != 1 else ""
            return errors.Unavailable(
                f"the volume stream to {self.host}:{self.port} failed after {self.attempts}"
                f" attempt{plural}: {self.last_error}"
            )
        return None

    def _schedule_retry(self):
        low, high = self.sender.backoff
        delay = min(high, low * 2 ** (self.attempts - 1))
        self.delayed = self.sender.clock.callLater(delay, self.attempt)

    def attempt(self):
        """The backoff is over (what the retry timer calls)."""
        self.machine.retry_due()

    def _cancel_retry(self):
        if self.delayed is not None and self.delayed.active():
            self.delayed.cancel()
        self.delayed = None

    def remoteError(self, err):
        if isinstance(err, errors.Unavailable):
            # The receiver is busy or had a transient failure: the connection closes and the
            # stream is retried like any broken connection.
            self.cause = err.message
            return
        self.machine.finish(Failure(err))

    def localError(self, err):
        self.machine.finish(Failure(err))

    def completed(self, msg):
        if msg.get("digest") != self.end_digest:
            self.machine.finish(Failure(errors.Corrupt(
                "the receiver acknowledged a different digest")))
            return
        self.machine.finish(
            {
                "digest": self.end_digest,
                "committed": bool(msg.get("committed")),
                "size": self.size,
                "allocated": self.allocated,
                "sent": self.sent,
                "zeroed": self.zeroed,
                "blocks_sent": self.blocks_sent,
                "attempts": self.attempts,
                "resumed_at": list(self.resumed_at),
            }
        )

    def _stop(self, outcome):
        """
        Keep the outcome (given to the caller once no connection of this stream is open,
        L{_fire}) and close the file.
        """
        self.outcome = outcome
        self._close_file()

    def _close_file(self):
        """
        Close the image once no read is in flight on it: closed while a read was (the number
        given back to the kernel), a file opened meanwhile (the next stream's) could get the
        same number and the read would fail, or read that file.
        """
        self.closing = True
        if self.fd is not None and not self.reading:
            fd, self.fd = self.fd, None
            self.threadpool.callInThread(os.close, fd)

    def readDone(self):
        """A block read has ended (on the reactor thread)."""
        self.reading -= 1
        if self.closing:
            self._close_file()

    def _fire(self):
        outcome, self.outcome = self.outcome, None
        if outcome is None or self.result.called:
            return
        if isinstance(outcome, Failure):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)

    def _cancel(self, d):
        self.machine.finish(None)


class VolumeSender:
    """
    The source side: streams a volume image to a L{VolumeReceiver}.

    @cvar protocol: the per-connection protocol class (fault tests substitute a subclass).
    @ivar bytes_sent: bytes of volume data sent, over all transfers (C{/metrics}).
    """

    protocol = _SenderProtocol
    bytes_sent = 0

    def __init__(
        self,
        reactor,
        tls,
        clock=None,
        threadpool=None,
        retries=5,
        backoff=(0.5, 10.0),
        connect_timeout=30,
        idle_timeout=60.0,
        verify_timeout=900.0,
    ):
        """
        @param tls: C{tls(target_host_id, hostname)} returns the client TLS options for a
            connection to the agent of C{target_host_id} at C{hostname}: it presents this host's
            certificate and accepts only that host's certificate from the cluster CA
            (C{HostCredentials.peer_client_context} of L{zwrm.pki}).
        @param clock: the time source for retry delays (defaults to C{reactor}).
        @param retries: how many times a broken stream is reconnected before giving up.
        @param backoff: C{(first, longest)} delay in seconds between attempts, doubling.
        @param idle_timeout: seconds without progress after which a connection is dropped and
            retried.
        @param verify_timeout: seconds to wait for the receiver's answer after the last block
            (it verifies and fsyncs the whole copy first).
        """
        self.reactor = reactor
        self.tls = tls
        self.clock = clock if clock is not None else reactor
        self.threadpool = threadpool if threadpool is not None else reactor.getThreadPool()
        self.retries = retries
        self.backoff = backoff
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.verify_timeout = verify_timeout

    def send(self, host, port, token, path, target, mode="bulk", commit=True, progress=None):
        """
        Stream the image at C{path} to the receiver at C{host}:C{port} for C{token}.

        @param target: the host id of the receiving agent (its certificate must name it).
        @param mode: C{"bulk"} sends every allocated block (resuming where an earlier
            connection for the same token stopped); C{"delta"} asks the receiver for the hashes of
            its verified copy and sends only the blocks that differ (blocks that became holes are
            sent as zero ranges).
        @param commit: when true the receiver stores the volume (the token is then used up);
            when false it keeps the verified copy staged for a later delta.
        @param progress: called with C{{"sent", "done", "total"}}: payload bytes sent so far,
            bytes of allocated blocks dealt with, and allocated bytes in all.
        @return: a L{Deferred} firing with C{{"digest", "committed", "size", "allocated",
            "sent", "zeroed", "blocks_sent", "attempts", "resumed_at"}}, or failing with a
            L{zwrm.errors.ZwrmError}: C{Corrupt} (verification failed, the copy was deleted),
            C{AuthenticationFailed} (token or certificate refused), C{Unavailable} (the stream
            broke more than C{retries} times), C{ResourceExhausted} (the target disk is full),
            C{NotFound}, C{Conflict}, C{InvalidArgument}.
        """
        if mode not in ("bulk", "delta"):
            return defer.fail(
                errors.InvalidArgument(f"unknown transfer mode {mode!r}: bulk or delta")
            )
        return _Send(self, host, port, token, path, target, mode, commit, progress).start()
