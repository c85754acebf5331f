"""
Volume streams: copy a sparse volume image from one agent to another over TLS.

The target agent runs a L{VolumeReceiver} (a TLS endpoint, loopback unless configured).
The control plane mints a one-time token (L{zwrm.tokens.mint_token}) for a volume and gives it to both
agents: the target calls L{VolumeReceiver.expect}, the source calls L{VolumeSender.send}.
Only the allocated blocks of the image travel (C{SEEK_DATA}/C{SEEK_HOLE}), framed as
(offset, data), produced by a push producer that honours the transport's backpressure and
reads the file in threads.  The target writes into a sparse temporary file next to the volume,
hashes every block as it writes it, checks the image digest (L{zwrm.agent.blockmap}) sent at the
end, fsyncs, and only then hands the file to the volume store (C{VolumeStore.adopt}).

A dropped connection is retried by the sender and resumes at the offset the receiver reports.
A copy made while the VM runs (C{mode="bulk", commit=False}) is completed after the VM stopped
by a delta (C{mode="delta", commit=True}): the receiver sends its block hashes and the sender
sends only the blocks that differ.  The protocol is described in docs/volume-streams.md.
"""

import errno
import hashlib
import hmac
import json
import os
import re
import struct
from collections import deque

from OpenSSL import SSL
from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from zwrm import errors, pki
from zwrm.agent import blockmap
from zwrm.agent.blockmap import BLOCK_SIZE
from zwrm.tokens import mint_token

log = Logger()

PROTOCOL_VERSION = 1

# Frame kinds.  A frame is a 1-byte kind, a 4-byte big-endian payload length, the payload.
HELLO = b"H"  # sender -> receiver, JSON {v, token, mode, size, commit[, digest]}
READY = b"R"  # receiver -> sender, JSON {offset, block_size, blocks}
BLOCKMAP = b"M"  # receiver -> sender (delta only): 32-byte hash of every block
DATA = b"D"  # sender -> receiver: 8-byte offset, then one block's bytes
ZERO = b"Z"  # sender -> receiver (delta only): 8-byte offset, 8-byte length
END = b"E"  # sender -> receiver, JSON {digest, commit}
DONE = b"K"  # receiver -> sender, JSON {digest, committed}
ERROR = b"X"  # either way, JSON {uri, message}; the sender of it then closes

_HEADER = struct.Struct(">cI")
_OFFSET = struct.Struct(">Q")
_ZERO = struct.Struct(">QQ")
_MAX_CONTROL = 64 * 1024

_VOLUME_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: Writes queued on the receiver before it stops reading from the socket, and the level at
#: which it starts again.
RECEIVE_HIGH_WATER = 16
RECEIVE_LOW_WATER = 4

#: Block reads the sender keeps in flight ahead of the socket.
READ_AHEAD = 6

#: Bytes written between two kicks of the kernel's writeback, so the disk writes while the
#: network delivers and the final fsync has little left to do.
WRITEBACK_EVERY = 32 << 20


def _start_writeback(fd):
    """
    Start writing the file's dirty pages to disk without waiting for them
    (C{POSIX_FADV_DONTNEED} starts writeback, then drops the pages that are clean).
    """
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


# Seams for fault tests (a disk that fills up).
_pwritev = os.pwritev


def _write_parts(fd, parts, offset, length):
    """
    Write C{parts} (a block as received, in pieces) at C{offset}, and hash it.

    @return: the SHA-256 of the block.
    """
    written = _pwritev(fd, parts, offset)
    if written < length:
        rest = memoryview(b"".join(parts))[written:]
        while rest:
            n = os.pwrite(fd, rest, offset + written)
            written += n
            rest = rest[n:]
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


def _token_key(token):
    return hashlib.sha256(token.encode("utf-8")).digest()


def _encode(kind, obj):
    payload = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return _HEADER.pack(kind, len(payload)) + payload


def _error_payload(err):
    if isinstance(err, errors.ZwrmError):
        return {"uri": err.uri, "message": err.message}
    return {"uri": errors.Internal.uri, "message": "internal error in the volume receiver"}


def _error_from(msg):
    cls = errors.ALL.get(msg.get("uri"), errors.Internal)
    return cls(str(msg.get("message", "the peer reported an error")))


class _Framed(Protocol):
    """
    Splits the byte stream into frames and hands each to L{frameReceived}.

    @ivar limits: the largest payload accepted per frame kind; anything else is malformed.
    """

    limits = {}

    #: Frames whose payload is a short head followed by a long body (a block): the body is
    #: gathered as the list of received pieces, written with one C{pwritev}, never joined.
    heads = {DATA: _OFFSET.size}

    def connectionMade(self):
        self._buf = bytearray()
        self._body = None
        self._closing = False

    def dataReceived(self, data):
        if self._closing:
            return
        if self._body is not None:
            data = self._collect(data)
            if data is None:
                return
        self._buf += data
        while not self._closing and len(self._buf) >= _HEADER.size:
            kind, n = _HEADER.unpack_from(self._buf)
            limit = self.limits.get(kind)
            head = self.heads.get(kind, 0)
            if limit is None or n > limit or n < head:
                self.protocolError(
                    errors.Corrupt(
                        f"malformed volume stream: unexpected frame {kind!r} of {n} bytes"
                    )
                )
                return
            if head:
                start = _HEADER.size + head
                if len(self._buf) < start:
                    return
                self._body = (kind, bytes(self._buf[_HEADER.size : start]), n - head, [], 0)
                rest = bytes(self._buf[start:])
                del self._buf[:]
                rest = self._collect(rest)
                if rest is None:
                    return
                self._buf += rest
                continue
            end = _HEADER.size + n
            if len(self._buf) < end:
                return
            with memoryview(self._buf) as view:
                payload = view[_HEADER.size : end].tobytes()
            del self._buf[:end]
            self._dispatch(self.frameReceived, kind, payload)

    def _collect(self, data):
        """
        Add C{data} to the body being gathered.

        @return: what follows the body if it is now complete, else C{None}.
        """
        kind, head, need, parts, have = self._body
        take = need - have
        if len(data) < take:
            if data:
                parts.append(data)
            self._body = (kind, head, need, parts, have + len(data))
            return None
        if len(data) == take:
            parts.append(data)
            data = b""
        else:
            parts.append(data[:take])
            data = data[take:]
        self._body = None
        self._dispatch(self.bodyReceived, kind, head, parts, need)
        return None if self._closing else data

    def _dispatch(self, handler, *args):
        try:
            handler(*args)
        except errors.ZwrmError as e:
            self.protocolError(e)
        except Exception:
            log.failure("volume stream frame handling failed")
            self.protocolError(errors.Internal("internal error in the volume stream"))

    def bodyReceived(self, kind, head, parts, length):
        raise errors.Corrupt(f"malformed volume stream: unexpected frame {kind!r}")

    def sendFrame(self, kind, obj):
        self.transport.write(_encode(kind, obj))

    def protocolError(self, err):
        """
        Report C{err} to the peer and close.
        """
        if self._closing:
            return
        self._closing = True
        self.transport.write(_encode(ERROR, _error_payload(err)))
        self.transport.loseConnection()
        self.failed(err)

    def failed(self, err):
        pass

    def _json(self, payload):
        try:
            msg = json.loads(payload)
        except ValueError:
            raise errors.Corrupt("malformed volume stream: a control frame is not JSON") from None
        if not isinstance(msg, dict):
            raise errors.Corrupt("malformed volume stream: a control frame is not an object")
        return msg


# --- receiver ---------------------------------------------------------------------------


class IncomingTransfer:
    """
    One expected volume: the state the receiver keeps for a token across connections.

    @ivar state: C{"new"} (nothing received), C{"bulk"} (a bulk copy is in progress or was
        interrupted), C{"staged"} (a verified copy waits for a delta or commit), C{"delta"},
        C{"committed"}, C{"cancelled"}.
    @ivar offset: in bulk mode, every block before this offset has been written.
    @ivar received: payload bytes written to the temporary file, all connections included.
    @ivar resumed_at: the offsets reported to the sender, one per connection.
    """

    def __init__(self, receiver, token, volume_id, size, peer):
        self._receiver = receiver
        self.token = token
        self.volume_id = volume_id
        self.size = size
        self.peer = peer
        self.state = "new"
        self.offset = 0
        self.received = 0
        self.digest = None
        self.resumed_at = []
        self.hashes = blockmap.hole_hashes(size)
        self.tmp_path = None
        self._fd = None
        self._tail = defer.succeed(None)
        self._pending = 0
        self._write_error = None
        self._dirty = 0
        self._proto = None
        self._paused_reading = False
        self._expiry = None
        self._observers = []
        self._result = None

    # observers

    def when_done(self):
        """
        @return: a L{Deferred} that fires with C{{"volume_id", "digest", "size"}} once the volume is
            committed (adopted by the store), or fails if the transfer is cancelled or expires.
        """
        d = defer.Deferred()
        if self._result is not None:
            self._fire(d, self._result)
        else:
            self._observers.append(d)
        return d

    def _notify(self, result):
        self._result = result
        observers, self._observers = self._observers, []
        for d in observers:
            self._fire(d, result)

    @staticmethod
    def _fire(d, result):
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)

    def status(self):
        """
        @return: a dict describing the transfer (state, offset, received bytes, connected).
        """
        return {
            "volume_id": self.volume_id,
            "size": self.size,
            "state": self.state,
            "offset": self.offset,
            "received": self.received,
            "connected": self._proto is not None,
        }

    # connections

    def attach(self, proto, hello):
        """
        A sender presented this transfer's token; check its request and answer it.
        """
        if self.state == "committed":
            if hello.get("digest") == self.digest:
                # The sender committed this copy but never saw our answer.
                return ("done", {"digest": self.digest, "committed": True})
            raise errors.AuthenticationFailed("this transfer token was already used")
        if self.state == "cancelled":
            raise errors.AuthenticationFailed("unknown or expired transfer token")
        mode = hello.get("mode")
        if mode not in ("bulk", "delta"):
            raise errors.InvalidArgument(f"unknown transfer mode {mode!r}")
        if hello.get("size") != self.size:
            raise errors.InvalidArgument(
                f"volume {self.volume_id} is expected to be {self.size} bytes,"
                f" the sender has {hello.get('size')!r}"
            )
        if self.peer is not None and proto.peerName() != self.peer:
            raise errors.AuthenticationFailed(
                f"the transfer of volume {self.volume_id} is for host {self.peer},"
                f" not {proto.peerName()}"
            )
        if self.state == "verifying":
            raise errors.Unavailable(f"volume {self.volume_id} is being verified; try again")
        if self._proto is not None:
            # A newer connection wins: the old one is dead or about to be.
            old, self._proto = self._proto, None
            old.detached()
            old.transport.abortConnection()
        self._cancel_expiry()
        self._proto = proto
        commit = bool(hello.get("commit", True))
        digest = hello.get("digest")
        if digest and self.state == "staged" and digest == self.digest:
            # The sender finished before but never saw our answer.
            return ("finish", commit)
        if mode == "bulk":
            if self.state in ("new", "staged", "delta"):
                self._restart()
                self.state = "bulk"
            self.resumed_at.append(self.offset)
            return (
                "ready",
                {"offset": self.offset, "block_size": BLOCK_SIZE, "blocks": len(self.hashes)},
            )
        if self.state not in ("staged", "delta"):
            raise errors.Conflict(
                f"no verified bulk copy of volume {self.volume_id} to apply a delta to; send it in bulk"
            )
        self.state = "delta"
        self.resumed_at.append(0)
        return ("delta", b"".join(self.hashes))

    def detach(self, proto):
        if self._proto is proto:
            self._proto = None
            self._resume_reading()
            if self.state not in ("committed", "cancelled"):
                self._arm_expiry()

    def _arm_expiry(self):
        self._cancel_expiry()
        self._expiry = self._receiver.clock.callLater(self._receiver.ttl_for(self), self._expired)

    def _cancel_expiry(self):
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None

    def _expired(self):
        self._expiry = None
        self._receiver._forget(self)
        self.state = "cancelled"
        self._discard()
        self._notify(
            Failure(
                errors.Unavailable(
                    f"the token for volume {self.volume_id} expired before the transfer completed"
                )
            )
        )

    def cancel(self):
        self._cancel_expiry()
        self.state = "cancelled"
        if self._proto is not None:
            proto, self._proto = self._proto, None
            proto.detached()
            proto.transport.abortConnection()
        d = self._discard()
        self._notify(
            Failure(errors.Conflict(f"the transfer of volume {self.volume_id} was cancelled"))
        )
        return d

    # the temporary file

    def _restart(self):
        """
        Start from nothing: a new, empty, sparse temporary file.
        """
        self._discard()
        self.tmp_path = self._receiver.store.temporary_path(self.volume_id)
        try:
            self._fd = os.open(
                self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
            )
            os.ftruncate(self._fd, self.size)
        except OSError as e:
            self._discard()
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise errors.ResourceExhausted(
                    f"cannot store volume {self.volume_id}: {e.strerror}"
                ) from None
            raise errors.Unavailable(
                f"cannot store volume {self.volume_id}: {e.strerror}"
            ) from None
        self.hashes = blockmap.hole_hashes(self.size)
        self.offset = 0
        self.digest = None
        self._write_error = None

    def _discard(self):
        """
        Delete the temporary file once queued writes are done; forget what was received.
        """
        fd, path = self._fd, self.tmp_path
        self._fd = self.tmp_path = None
        self.hashes = blockmap.hole_hashes(self.size)
        self.offset = 0
        self.digest = None
        if self.state not in ("committed", "cancelled"):
            self.state = "new"

        def cleanup():
            if fd is not None:
                os.close(fd)
            if path is not None:
                try:
                    os.unlink(path)  # freeing a large file's extents takes a while
                except FileNotFoundError:
                    pass

        def inThread(_):
            r = self._receiver
            return deferToThreadPool(r.reactor, r.threadpool, cleanup).addErrback(
                lambda f: log.failure("cannot delete {path}", f, path=path)
            )

        return self._after_writes().addCallback(inThread)

    def _after_writes(self):
        """
        @return: a new L{Deferred} that fires once every write queued so far is done.
        """
        d = defer.Deferred()

        def fire(result):
            d.callback(None)
            return result

        self._tail.addCallback(fire)
        return d

    def _queue(self, work, done):
        fd = self._fd
        self._pending += 1
        if (
            self._pending >= RECEIVE_HIGH_WATER
            and self._proto is not None
            and not self._paused_reading
        ):
            self._paused_reading = True
            self._proto.transport.pauseProducing()

        def run(_):
            if self._write_error is not None or self._fd != fd:
                return None
            d = deferToThreadPool(self._receiver.reactor, self._receiver.threadpool, work, fd)
            d.addCallbacks(done, self._write_failed)
            return d

        def finished(_):
            self._pending -= 1
            if self._pending <= RECEIVE_LOW_WATER:
                self._resume_reading()

        self._tail = self._tail.addCallback(run).addBoth(finished)

    def _resume_reading(self):
        if self._paused_reading:
            self._paused_reading = False
            if self._proto is not None:
                self._proto.transport.resumeProducing()

    def _write_failed(self, f):
        if f.check(OSError) and f.value.errno in (errno.ENOSPC, errno.EDQUOT):
            err = errors.ResourceExhausted(
                f"the disk is full: cannot store volume {self.volume_id} ({f.value.strerror})"
            )
        elif f.check(OSError):
            err = errors.Unavailable(
                f"cannot write volume {self.volume_id}: {f.value.strerror or f.value}"
            )
        else:
            log.failure("volume write failed", f)
            err = errors.Internal(f"cannot write volume {self.volume_id}")
        self._write_error = err
        proto = self._proto
        self._discard()
        if proto is not None:
            proto.protocolError(err)

    # frames

    def _block_index(self, offset, length):
        if offset % BLOCK_SIZE or offset >= self.size:
            raise errors.Corrupt(f"malformed volume stream: bad block offset {offset}")
        index = offset // BLOCK_SIZE
        if length != blockmap.block_length(index, self.size):
            raise errors.Corrupt(f"malformed volume stream: block at {offset} has {length} bytes")
        return index

    def data(self, offset, parts, length):
        """
        A block arrived (as the list of pieces it came in, C{length} bytes in all).
        """
        index = self._block_index(offset, length)
        if self._write_error is not None:
            raise self._write_error
        if self.state == "bulk":
            if offset < self.offset:
                raise errors.Corrupt(f"malformed volume stream: block at {offset} sent twice")
            self.offset = offset + length  # frames arrive in order
        elif self.state != "delta":
            raise errors.Corrupt("malformed volume stream: data outside a transfer")

        self._dirty += length
        kick = self._dirty >= WRITEBACK_EVERY
        if kick:
            self._dirty = 0

        def work(fd):
            digest = _write_parts(fd, parts, offset, length)
            if kick:
                _start_writeback(fd)
            return digest

        def done(digest):
            self.hashes[index] = digest
            self.received += length

        self._queue(work, done)

    def zero(self, offset, length):
        index = self._block_index(offset, length)
        if self.state != "delta":
            raise errors.Corrupt("malformed volume stream: a zero frame outside a delta")

        def work(fd):
            blockmap.punch_hole(fd, offset, length)

        def done(_):
            self.hashes[index] = blockmap.zero_hash(length)

        self._queue(work, done)

    def end(self, msg):
        """
        The sender sent everything: verify, fsync, and commit or stage.

        @return: a L{Deferred} firing with the DONE message.
        """
        if self.state not in ("bulk", "delta"):
            raise errors.Corrupt("malformed volume stream: end outside a transfer")
        expected = msg.get("digest")
        commit = bool(msg.get("commit", True))
        self.state = "verifying"
        d = self._after_writes().addCallback(lambda _: self._verify(expected))
        d.addCallback(lambda _: self.finish(commit))

        def failed(f):
            if self.state == "verifying":
                # The copy cannot be trusted any more: start over at the next bulk.
                self._discard()
            if f.check(OSError):
                raise errors.Unavailable(
                    f"cannot store volume {self.volume_id}: {f.value.strerror or f.value}"
                )
            return f

        return d.addErrback(failed)

    def _verify(self, expected):
        if self.state != "verifying" or self._fd is None:
            raise errors.Conflict(f"the transfer of volume {self.volume_id} was cancelled")
        if self._write_error is not None:
            raise self._write_error
        digest = blockmap.image_digest(self.size, self.hashes)
        if not isinstance(expected, str) or not hmac.compare_digest(
            digest.encode("ascii"), expected.encode("utf-8")
        ):
            self._discard()
            raise errors.Corrupt(
                f"volume {self.volume_id} failed verification: the copy's digest {digest}"
                f" is not the sender's {expected}; the copy was deleted"
            )
        fd = self._fd
        self.digest = digest
        return deferToThreadPool(self._receiver.reactor, self._receiver.threadpool, os.fsync, fd)

    def finish(self, commit):
        if self._fd is None:
            return defer.fail(
                errors.Conflict(f"the transfer of volume {self.volume_id} was cancelled")
            )
        self.state = "staged"
        if not commit:
            return defer.succeed({"digest": self.digest, "committed": False})
        store = self._receiver.store
        if store.exists(self.volume_id):
            return defer.fail(
                errors.Conflict(
                    f"volume {self.volume_id} already exists on this host; it was not overwritten"
                )
            )
        fd, path = self._fd, self.tmp_path

        def adopt(_):
            return store.adopt(self.volume_id, path)

        def adopted(_):
            self.tmp_path = None
            self.state = "committed"
            self._receiver._committed(self)
            result = {"volume_id": self.volume_id, "digest": self.digest, "size": self.size}
            self._notify(result)
            return {"digest": self.digest, "committed": True}

        def notAdopted(f):
            self._discard()
            if f.check(errors.ZwrmError):
                return f
            log.failure("the volume store did not adopt volume {v}", f, v=self.volume_id)
            raise errors.Internal(f"the volume store could not store volume {self.volume_id}")

        def close(_):
            self._fd = None
            os.close(fd)

        d = self._after_writes().addCallback(close)
        d.addCallback(adopt)
        d.addCallbacks(adopted, notAdopted)
        return d


class _ReceiverProtocol(_Framed):
    limits = {
        HELLO: _MAX_CONTROL,
        DATA: _OFFSET.size + BLOCK_SIZE,
        ZERO: _ZERO.size,
        END: _MAX_CONTROL,
    }

    def __init__(self, receiver):
        self._receiver = receiver
        self._transfer = None
        self._idle = None

    def connectionMade(self):
        _Framed.connectionMade(self)
        self._idle = self._receiver.clock.callLater(self._receiver.idle_timeout, self._timedOut)
        self._receiver._connections.add(self)

    def _timedOut(self):
        self._idle = None
        log.info("volume stream idle for {t}s; closing", t=self._receiver.idle_timeout)
        self.transport.abortConnection()

    def peerName(self):
        """
        @return: the host id in the sender's (verified) certificate, else its common name.
        """
        cert = self.transport.getPeerCertificate()
        if cert is None:
            return None
        return pki.host_id_of(cert) or cert.get_subject().commonName

    def frameReceived(self, kind, payload):
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._receiver.idle_timeout)
        if self._transfer is None:
            if kind != HELLO:
                raise errors.Corrupt("malformed volume stream: it must start with a hello")
            self._hello(self._json(payload))
        elif kind == ZERO:
            self._transfer.zero(*_ZERO.unpack(payload))
        elif kind == END:
            if self._idle is not None and self._idle.active():
                # Verifying and fsyncing take as long as they take.
                self._idle.cancel()
            d = self._transfer.end(self._json(payload))
            d.addCallbacks(self._done, self._failedAsync)
        else:
            raise errors.Corrupt(f"malformed volume stream: unexpected frame {kind!r}")

    def bodyReceived(self, kind, head, parts, length):
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._receiver.idle_timeout)
        if self._transfer is None:
            raise errors.Corrupt("malformed volume stream: it must start with a hello")
        (offset,) = _OFFSET.unpack(head)
        self._transfer.data(offset, parts, length)

    def _hello(self, msg):
        if msg.get("v") != PROTOCOL_VERSION:
            raise errors.InvalidArgument(f"unsupported volume stream version {msg.get('v')!r}")
        token = msg.get("token")
        transfer = self._receiver._lookup(token) if isinstance(token, str) else None
        if transfer is None:
            raise errors.AuthenticationFailed("unknown or expired transfer token")
        what, arg = transfer.attach(self, msg)
        self._transfer = transfer
        if what == "finish":
            transfer.finish(arg).addCallbacks(self._done, self._failedAsync)
        elif what == "done":
            self._done(arg)
        elif what == "ready":
            self.sendFrame(READY, arg)
        else:
            self.sendFrame(READY, {"offset": 0, "block_size": BLOCK_SIZE, "blocks": len(arg) // 32})
            self.transport.write(_HEADER.pack(BLOCKMAP, len(arg)) + arg)

    def _done(self, msg):
        if not self._closing:
            self.sendFrame(DONE, msg)
            self._closing = True
            self.transport.loseConnection()

    def _failedAsync(self, f):
        if f.check(errors.ZwrmError):
            self.protocolError(f.value)
        else:
            log.failure("volume stream failed", f)
            self.protocolError(errors.Internal("internal error in the volume receiver"))

    def failed(self, err):
        transfer = self._transfer
        if transfer is not None and isinstance(err, (errors.Corrupt, errors.ResourceExhausted)):
            if transfer.state not in ("committed", "cancelled"):
                transfer._discard()

    def detached(self):
        self._transfer = None
        self._closing = True

    def connectionLost(self, reason):
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        self._receiver._connections.discard(self)
        if self._transfer is not None:
            self._transfer.detach(self)
            self._transfer = None


class VolumeReceiver(service.Service):
    """
    The target side: a TLS endpoint that accepts volume streams for expected tokens.

    @ivar port: the listening port once L{listen} has fired.
    """

    def __init__(
        self,
        reactor,
        store,
        tls,
        endpoint="tcp:0:interface=127.0.0.1",
        clock=None,
        threadpool=None,
        idle_timeout=60.0,
        ttl=3600.0,
    ):
        """
        @param reactor: the reactor (listening, threads).
        @param store: the volume store (L{zwrm.agent.volumes.VolumeStore}): C{exists},
            C{in_use}, C{temporary_path} (where the copy is written) and C{adopt}.
        @param tls: server TLS options that present this host's certificate and require a
            client certificate from the cluster CA: C{HostCredentials.server_context()} of
            L{zwrm.pki}.
        @param endpoint: a server endpoint string for the plain TCP listener that TLS runs on.
        @param clock: the time source for timeouts (defaults to C{reactor}).
        @param idle_timeout: seconds a connection may stay silent before it is closed.
        @param ttl: default seconds a token stays valid without a connection.
        """
        self.reactor = reactor
        self.store = store
        self.clock = clock if clock is not None else reactor
        self.threadpool = threadpool if threadpool is not None else reactor.getThreadPool()
        self.idle_timeout = idle_timeout
        self.ttl = ttl
        self._endpoint = endpoint
        self._tls = tls
        self._transfers = {}
        self._ttls = {}
        self._connections = set()
        self.port = None

    def buildFactory(self):
        """
        @return: the TLS-wrapped protocol factory (for listening on an endpoint of your own).
        """
        factory = Factory.forProtocol(lambda: _ReceiverProtocol(self))
        return TLSMemoryBIOFactory(self._tls, False, factory)

    def listen(self):
        """
        Start listening.

        @return: a L{Deferred} firing with the listening port.
        """
        ep = endpoints.serverFromString(self.reactor, self._endpoint)
        d = ep.listen(self.buildFactory())

        def listening(port):
            self.port = port
            return port

        return d.addCallback(listening)

    def startService(self):
        service.Service.startService(self)
        self.listen().addErrback(lambda f: log.failure("volume receiver cannot listen", f))

    def stopService(self):
        service.Service.stopService(self)
        for proto in list(self._connections):
            proto.transport.abortConnection()
        ds = []
        for t in list(self._transfers.values()):
            if t.state == "committed":
                t._cancel_expiry()
            else:
                ds.append(t.cancel())
        self._transfers.clear()
        self._ttls.clear()
        if self.port is not None:
            ds.append(defer.maybeDeferred(self.port.stopListening))
            self.port = None
        return defer.gatherResults(ds)

    def expect(self, token, volume_id, size, ttl=None, peer=None):
        """
        Accept one volume for C{token}.

        @param token: the one-time token (see L{mint_token}); valid until the volume is
            committed, the transfer is cancelled, or C{ttl} seconds pass without a connection.
        @param volume_id: the volume; it must not exist on this host.
        @param size: the image's size in bytes.
        @param peer: if given, the host id of the only sender accepted (its certificate
            must be that host's).
        @return: the L{IncomingTransfer}; its C{when_done()} fires when the volume is stored.
        @raise errors.InvalidArgument: a bad token, volume id or size.
        @raise errors.Conflict: the token is already expected, or the volume exists.
        """
        if not isinstance(token, str) or len(token) < 16:
            raise errors.InvalidArgument(
                "a transfer token must be a string of at least 16 characters"
            )
        if not isinstance(volume_id, str) or not _VOLUME_ID.match(volume_id):
            raise errors.InvalidArgument(f"invalid volume id {volume_id!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise errors.InvalidArgument(
                f"invalid volume size {size!r}: a positive number of bytes"
            )
        key = _token_key(token)
        if key in self._transfers:
            raise errors.Conflict("this transfer token is already in use")
        if any(
            t.volume_id == volume_id and t.state != "committed" for t in self._transfers.values()
        ):
            raise errors.Conflict(f"volume {volume_id} is already being received")
        if self.store.exists(volume_id) or self.store.in_use(volume_id):
            raise errors.Conflict(f"volume {volume_id} already exists on this host")
        transfer = IncomingTransfer(self, token, volume_id, size, peer)
        self._transfers[key] = transfer
        self._ttls[key] = self.ttl if ttl is None else ttl
        transfer._arm_expiry()
        return transfer

    def ttl_for(self, transfer):
        return self._ttls.get(_token_key(transfer.token), self.ttl)

    def transfer(self, token):
        """
        @return: the L{IncomingTransfer} for C{token}.
        @raise errors.NotFound: no such token.
        """
        t = self._transfers.get(_token_key(token)) if isinstance(token, str) else None
        if t is None:
            raise errors.NotFound("no transfer with this token")
        return t

    def cancel(self, token):
        """
        Cancel a transfer: close its connection, delete its temporary file, void the token.

        @return: a L{Deferred} that fires when the temporary file is gone.
        """
        t = self.transfer(token)
        self._forget(t)
        return t.cancel()

    def _lookup(self, token):
        t = self._transfers.get(_token_key(token))
        if t is not None and hmac.compare_digest(t.token.encode("utf-8"), token.encode("utf-8")):
            return t
        return None

    def _forget(self, transfer):
        key = _token_key(transfer.token)
        self._transfers.pop(key, None)
        self._ttls.pop(key, None)

    def _committed(self, transfer):
        # Remembered a while, so that a sender that lost our answer learns the outcome.
        transfer._expiry = self.clock.callLater(self.ttl_for(transfer), self._forget, transfer)


# --- sender -----------------------------------------------------------------------------


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
        }
        if s.end_digest is not None:
            hello["digest"] = s.end_digest
        self.sendFrame(HELLO, hello)
        s.connected(self)

    def frameReceived(self, kind, payload):
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
                item.buf = s.takeBuffer()
                d = deferToThreadPool(
                    s.reactor,
                    s.threadpool,
                    blockmap.read_block_into,
                    s.fd,
                    item.index,
                    s.size,
                    item.buf,
                )
                d.addCallbacks(
                    self._read, self._readFailed, callbackArgs=(item,), errbackArgs=(item,)
                )
            else:
                item.result = (
                    None,
                    blockmap.zero_hash(blockmap.block_length(item.index, s.size)),
                    True,
                )

    def _read(self, result, item):
        self._reads -= 1
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
        self._release(item)
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
                    self.transport.write(
                        _HEADER.pack(ZERO, _ZERO.size) + _ZERO.pack(offset, length)
                    )
                    s.zeroed += length
                else:
                    self._writeData(offset, data)
            if item.read:
                s.advance(length)
        elif item.send:
            if not is_zero:
                self._writeData(offset, data)
            s.advance(length)
        # The TLS transport has copied the block (into records) by now: the buffer is free.
        self._release(item)

    def _writeData(self, offset, data):
        data = self.frameData(offset, data)
        # Two writes: TLS then puts the block in records of its own, which the receiver joins
        # without slicing.
        self.transport.write(_HEADER.pack(DATA, _OFFSET.size + len(data)) + _OFFSET.pack(offset))
        self.transport.write(data)
        self._send.sent += len(data)
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
        s.end_digest = blockmap.image_digest(s.size, s.hashes)
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
        self.buffers = []
        self.proto = None
        self.delayed = None
        self.result = defer.Deferred(self._cancel)
        self.finished = False
        self.outcome = None
        self.last_error = None
        self.cause = None

    def start(self):
        d = deferToThreadPool(self.reactor, self.threadpool, self._scan)
        d.addCallbacks(lambda _: self.attempt(), self._scanFailed)
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
        self._fail(err)

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

    def attempt(self):
        self.delayed = None
        if self.finished:
            return
        self.attempts += 1
        ep = endpoints.wrapClientTLS(
            self.sender.tls(self.target, self.host),
            endpoints.TCP4ClientEndpoint(
                self.reactor, self.host, self.port, timeout=self.sender.connect_timeout
            ),
        )
        d = endpoints.connectProtocol(ep, self.sender.protocol(self))
        d.addErrback(self._connectFailed)

    def _connectFailed(self, f):
        self.retry(f)

    def connected(self, proto):
        self.proto = proto

    def disconnected(self, proto, reason):
        if self.proto is proto:
            self.proto = None
        if self.outcome is not None:
            self._fire()
        elif not self.finished:
            self.retry(reason)

    def retry(self, reason):
        if self.finished:
            return
        if reason.check(SSL.Error):
            detail = getattr(reason.value, "message", None)
            if not isinstance(detail, str):
                detail = "the certificates were refused"
            self._fail(
                errors.AuthenticationFailed(
                    f"the TLS handshake with host {self.target} ({self.host}:{self.port}) failed:"
                    f" {detail}"
                )
            )
            return
        self.last_error = self.cause or reason.getErrorMessage()
        self.cause = None
        if self.attempts > self.sender.retries:
            plural = "s" if self.attempts != 1 else ""
            self._fail(
                errors.Unavailable(
                    f"the volume stream to {self.host}:{self.port} failed after {self.attempts}"
                    f" attempt{plural}: {self.last_error}"
                )
            )
            return
        low, high = self.sender.backoff
        delay = min(high, low * 2 ** (self.attempts - 1))
        self.delayed = self.sender.clock.callLater(delay, self.attempt)

    def remoteError(self, err):
        if isinstance(err, errors.Unavailable):
            # The receiver is busy or had a transient failure: the connection closes and the
            # stream is retried like any broken connection.
            self.cause = err.message
            return
        self._fail(err)

    def localError(self, err):
        self._fail(err)

    def completed(self, msg):
        if self.finished:
            return
        if msg.get("digest") != self.end_digest:
            self._fail(errors.Corrupt("the receiver acknowledged a different digest"))
            return
        self._close(
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

    def _fail(self, err):
        if self.finished:
            return
        self._close(Failure(err))

    def _close(self, outcome):
        """
        Stop everything; fire the result with C{outcome} once the connection is closed, so a
        caller never sees its result while a socket of this transfer is still open.
        """
        self.finished = True
        self.outcome = outcome
        if self.delayed is not None and self.delayed.active():
            self.delayed.cancel()
        self.delayed = None
        if self.proto is not None:
            self.proto._stopped = True
            self.proto.transport.abortConnection()
        if self.fd is not None:
            fd, self.fd = self.fd, None
            # Reads still in flight hold the number; close after them.
            self.reactor.callLater(0, self.threadpool.callInThread, os.close, fd)
        if self.proto is None:
            self._fire()

    def _fire(self):
        outcome, self.outcome = self.outcome, None
        if outcome is None or self.result.called:
            return
        if isinstance(outcome, Failure):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)

    def _cancel(self, d):
        if not self.finished:
            self._close(None)


class VolumeSender:
    """
    The source side: streams a volume image to a L{VolumeReceiver}.

    @cvar protocol: the per-connection protocol class (fault tests substitute a subclass).
    """

    protocol = _SenderProtocol

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


class VolumeTransfers(service.MultiService):
    """
    An agent's side of volume moves: its receiver endpoint and its sender, addressed by volume
    id in its volume store. The agent's executor exposes these as procedures for the control
    plane (which mints the tokens).

    @ivar receiver: the L{VolumeReceiver}.
    @ivar sender: the L{VolumeSender}.
    """

    def __init__(
        self,
        reactor,
        store,
        credentials,
        endpoint="tcp:0:interface=127.0.0.1",
        clock=None,
        **options,
    ):
        """
        @param store: the agent's L{zwrm.agent.volumes.VolumeStore}.
        @param credentials: the agent's L{zwrm.pki.HostCredentials}.
        @param endpoint: where the receiver listens (loopback unless configured).
        @param options: passed to L{VolumeReceiver} (C{idle_timeout}, C{ttl}) and
            L{VolumeSender} (C{retries}, C{backoff}, C{connect_timeout}, C{verify_timeout}).
        """
        service.MultiService.__init__(self)
        self.store = store
        receiving = {k: options.pop(k) for k in ("ttl",) if k in options}
        sending = {
            k: options.pop(k)
            for k in ("retries", "backoff", "connect_timeout", "verify_timeout")
            if k in options
        }
        if "idle_timeout" in options:
            receiving["idle_timeout"] = sending["idle_timeout"] = options.pop("idle_timeout")
        if options:
            raise TypeError(f"unknown options {sorted(options)}")
        self.receiver = VolumeReceiver(
            reactor,
            store,
            credentials.server_context(),
            endpoint=endpoint,
            clock=clock,
            **receiving,
        )
        self.receiver.setServiceParent(self)
        self.sender = VolumeSender(reactor, credentials.peer_client_context, clock=clock, **sending)

    def listen(self):
        """
        Start the receiver's listener (outside a service hierarchy).

        @return: a L{Deferred} firing with the listening port.
        """
        return self.receiver.listen()

    def receive(self, token, volume_id, size, source=None, ttl=None):
        """
        Expect volume C{volume_id} from host C{source} for C{token}.

        @return: C{{"port": <the receiver's TCP port>}}: the sender connects there.
        @raise errors.Unavailable: the receiver is not listening.
        @raise errors.Conflict: the volume exists here or is already being received.
        @raise errors.InvalidArgument: bad token, volume id or size.
        """
        if self.receiver.port is None:
            raise errors.Unavailable("the volume receiver is not listening")
        self.receiver.expect(token, volume_id, size, ttl=ttl, peer=source)
        return {"port": self.receiver.port.getHost().port}

    def send(self, volume_id, host, port, token, target, mode="bulk", commit=True, progress=None):
        """
        Stream local volume C{volume_id} to host C{target} at C{host}:C{port}.

        @return: the L{Deferred} of L{VolumeSender.send}.
        @raise errors.NotFound: no such volume here.
        """
        if not self.store.exists(volume_id):
            raise errors.NotFound(f"no volume {volume_id!r} on this host")
        path = self.store.path(volume_id)
        return self.sender.send(
            host, port, token, path, target, mode=mode, commit=commit, progress=progress
        )

    def cancel(self, token):
        """
        Cancel an incoming transfer (see L{VolumeReceiver.cancel}).
        """
        return self.receiver.cancel(token)

    def status(self, token):
        """
        @return: the state of an incoming transfer (see L{IncomingTransfer.status}).
        @raise errors.NotFound: no such token.
        """
        return self.receiver.transfer(token).status()


__all__ = [
    "VolumeReceiver",
    "VolumeSender",
    "VolumeTransfers",
    "IncomingTransfer",
    "mint_token",
]
