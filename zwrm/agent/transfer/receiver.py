"""
The receiving end of volume streams: L{VolumeReceiver}, a TLS endpoint on the target agent,
and the state it keeps for each expected volume (L{IncomingTransfer}).

The target writes into a sparse temporary file next to the volume, hashes every block as it
writes it, checks the image digest (L{zwrm.agent.blockmap}) sent at the end, fsyncs, and only
then hands the file to the volume store (C{VolumeStore.adopt}).
"""

import errno
import hashlib
import hmac
import mmap
import os
from collections import deque

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from zwrm import errors, pki
from zwrm.agent import blockmap
from zwrm.agent.blockmap import BLOCK_SIZE
from zwrm.agent.transfer.wire import (
    _HEADER,
    _MAX_CONTROL,
    _OFFSET,
    _VOLUME_ID,
    _ZERO,
    BLOCKMAP,
    DATA,
    DONE,
    END,
    HELLO,
    PROTOCOL_VERSION,
    READY,
    ZERO,
    _Framed,
    _token_key,
    tls_factory,
)

log = Logger()

#: Writes queued on the receiver before it stops reading from the socket, and the level at
#: which it starts again.
RECEIVE_HIGH_WATER = 16
RECEIVE_LOW_WATER = 4

#: Block writes (hash, then write) a receiver runs at once, in threads: one hashes while
#: another waits for the disk.
WRITERS = 2

#: Bytes the receiver reads from its socket at a time.
READ_SIZE = 256 * 1024

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

#: The alignment C{O_DIRECT} asks of offsets, lengths and buffers (enough for 4 KiB sectors).
DIRECT_ALIGN = 4096


def _open_direct(path):
    """
    @return: a second descriptor of the file at C{path} opened with C{O_DIRECT}, or C{None}
        where the file system does not take it (tmpfs, some FUSE file systems).
    """
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | flag)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


#: Free block buffers a receiver keeps between streams.
KEEP_BUFFERS = 4


class _Buffers:
    """
    Page-aligned block buffers (anonymous maps) for direct writes, reused from block to block:
    no memory is allocated (and page-faulted in) per block.
    """

    def __init__(self):
        self._free = []

    def take(self):
        try:
            return self._free.pop()
        except IndexError:
            return mmap.mmap(-1, BLOCK_SIZE)

    def give(self, buf):
        self._free.append(buf)

    def trim(self, keep=KEEP_BUFFERS):
        """
        Unmap free buffers beyond C{keep} (between streams, the pool's memory goes back).
        """
        while len(self._free) > keep:
            try:
                self._free.pop().close()
            except BufferError:  # still viewed somewhere: the collector unmaps it
                pass


def _write_parts(fd, parts, offset, length, direct=None, buffers=None, new=hashlib.sha256):
    """
    Write C{parts} (a block as received, in pieces) at C{offset}, and hash it with C{new} (a
    constructor of L{blockmap.ALGORITHMS}).

    With C{direct} (the file opened with C{O_DIRECT}) and a whole number of aligned sectors,
    the pieces are gathered into an aligned buffer from C{buffers}, hashed there in one call
    and written past the page cache: no page-cache copy, no dirty pages for the kernel to write
    back and the final C{fsync} to wait for.

    @return: the hash of the block.
    """
    if direct is not None and buffers is not None and not (offset | length) % DIRECT_ALIGN:
        buf = buffers.take()
        try:
            view = memoryview(buf)[:length]
            pos = 0
            for part in parts:
                n = len(part)
                view[pos : pos + n] = part
                pos += n
            digest = new(view).digest()
            written = _pwritev(direct, [view], offset)
            if written < length:
                # The rest (unaligned now) through the page cache.
                _write_rest(fd, view[written:], offset + written)
            view.release()
            return digest
        finally:
            buffers.give(buf)
    written = _pwritev(fd, parts, offset)
    if written < length:
        _write_rest(fd, memoryview(b"".join(parts))[written:], offset + written)
    h = new()
    for part in parts:
        h.update(part)
    return h.digest()


def _write_block(fd, buf, offset, length, direct=None, new=hashlib.sha256, sparse=False):
    """
    Hash the block in the first C{length} bytes of C{buf} (an aligned buffer of L{_Buffers})
    with C{new} (a constructor of L{blockmap.ALGORITHMS}) and write it at C{offset}: through
    C{direct} (the file opened with C{O_DIRECT}) when it is a whole number of sectors, else
    through C{fd} (the page cache).

    @param sparse: the block lands in a hole of the file (a bulk copy writes each block of
        a new sparse file once): its pages of zeros are not written, so the copy keeps the
        holes of its source (an ext4 volume's sparse metadata) instead of taking whole
        blocks of zeros.
    @return: the hash of the block.
    """
    with memoryview(buf) as whole:
        view = whole[:length]
        digest = new(view).digest()
        for start, end in _data_runs(buf, length) if sparse else ((0, length),):
            run = view[start:end]
            at = offset + start
            aligned = direct is not None and not (at | (end - start)) % DIRECT_ALIGN
            written = _pwritev(direct if aligned else fd, [run], at)
            if written < end - start:
                # The rest (unaligned now) through the page cache.
                _write_rest(fd, run[written:], at + written)
            run.release()
        view.release()
    return digest


#: The unit in which a sparse write skips zeros (a page, a file system block).
PAGE = 4096
_ZERO_PAGE = bytes(PAGE)


def _data_runs(buf, length):
    """
    The C{(start, end)} runs of pages of C{buf[:length]} (an mmap: its slices are bytes,
    compared at C speed) that are not all zeros; the last page may be shorter.
    """
    runs = []
    start = None
    whole = length - length % PAGE
    probe = _ZERO_PAGE[:16]
    for i in range(0, whole, PAGE):
        # (a page of data rarely starts with 16 zero bytes: most are told by those alone)
        if buf[i:i + 16] == probe and buf[i:i + PAGE] == _ZERO_PAGE:
            if start is not None:
                runs.append((start, i))
                start = None
        elif start is None:
            start = i
    if whole < length and buf[whole:length] != bytes(length - whole):
        if start is None:
            start = whole
        whole = length
    if start is not None:
        runs.append((start, whole))
    return runs


def _write_rest(fd, rest, offset):
    while rest:
        n = os.pwrite(fd, rest, offset)
        offset += n
        rest = rest[n:]


def _what(volume_id, snapshot_id):
    if snapshot_id is None:
        return f"volume {volume_id}"
    return f"snapshot {snapshot_id} of volume {volume_id}"


class IncomingTransfer:
    """
    One expected volume: the state the receiver keeps for a token across connections.

    @ivar state: C{"new"} (nothing received), C{"bulk"} (a bulk copy is in progress or was
        interrupted), C{"staged"} (a verified copy waits for a delta or commit), C{"delta"},
        C{"committed"}, C{"cancelled"}.
    @ivar offset: in bulk mode, every block before this offset has been written.
    @ivar received: payload bytes written to the temporary file, all connections included.
    @ivar resumed_at: the offsets reported to the sender, one per connection.
    @ivar algorithm: the name of the block hash (L{blockmap.ALGORITHMS}) of the copy: the first
        of the sender's offer this host knows, chosen when a bulk copy starts.
    """

    def __init__(self, receiver, token, volume_id, size, peer, snapshot_id=None):
        self._receiver = receiver
        self.token = token
        self.volume_id = volume_id
        #: a snapshot of the volume rather than the volume (L{VolumeReceiver.expect})
        self.snapshot_id = snapshot_id
        #: where the copy is written and adopted: the volume store, or the snapshot's slot
        self.store = (receiver.store if snapshot_id is None
                      else receiver.store.snapshot_slot(volume_id, snapshot_id))
        self.size = size
        self.peer = peer
        self.state = "new"
        self.offset = 0
        self.received = 0
        self.digest = None
        self.resumed_at = []
        self.algorithm = blockmap.DEFAULT
        self.hashes = blockmap.hole_hashes(size)
        self.tmp_path = None
        self._fd = None
        self._direct = None
        self._pending = 0
        self._waiting = deque()  # writes not started: (seq, fd, index, work, done, release)
        self._unfinished = deque()  # the seqs of writes not finished, in order
        self._finished = set()
        self._writing = set()  # the blocks being written
        self._seq = 0
        self._waiters = []  # (seq, Deferred): fire once every write before seq is done
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
        offered = hello.get("hashes", [blockmap.DEFAULT])
        if not (
            isinstance(offered, list) and offered and all(isinstance(n, str) for n in offered)
        ):
            raise errors.InvalidArgument(
                f"malformed hello: hashes must be a list of block hash names, not {offered!r}"
            )
        known = [n for n in offered if n in blockmap.ALGORITHMS]
        if not known:
            raise errors.InvalidArgument(
                f"none of the block hashes {offered!r} is known to this host"
                f" (it knows {', '.join(sorted(blockmap.ALGORITHMS))})"
            )
        if mode == "delta" and self.state in ("staged", "delta") and self.algorithm not in known:
            raise errors.Conflict(
                f"the bulk copy of volume {self.volume_id} is hashed with {self.algorithm},"
                " which the sender does not offer; send it in bulk"
            )
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
            if self.state in ("new", "staged", "delta") or self.algorithm not in known:
                # (a copy begun with a hash the sender no longer offers starts over)
                self._restart(known[0])
                self.state = "bulk"
            self.resumed_at.append(self.offset)
            return (
                "ready",
                {
                    "offset": self.offset,
                    "block_size": BLOCK_SIZE,
                    "blocks": len(self.hashes),
                    "hash": self.algorithm,
                },
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

    def _restart(self, algorithm):
        """
        Start from nothing: a new, empty, sparse temporary file, its blocks to be hashed with
        C{algorithm}.
        """
        self._discard()
        self.tmp_path = self.store.temporary_path(self.volume_id)
        try:
            self._fd = os.open(
                self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
            )
            os.ftruncate(self._fd, self.size)
            self._direct = _open_direct(self.tmp_path)
        except OSError as e:
            self._discard()
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise errors.ResourceExhausted(
                    f"cannot store volume {self.volume_id}: {e.strerror}"
                ) from None
            raise errors.Unavailable(
                f"cannot store volume {self.volume_id}: {e.strerror}"
            ) from None
        self.algorithm = algorithm
        self.hashes = blockmap.hole_hashes(self.size, name=algorithm)
        self.offset = 0
        self.digest = None
        self._write_error = None

    def _discard(self):
        """
        Delete the temporary file once queued writes are done; forget what was received.
        """
        fd, direct, path = self._fd, self._direct, self.tmp_path
        self._fd = self._direct = self.tmp_path = None
        self.hashes = blockmap.hole_hashes(self.size, name=self.algorithm)
        self.offset = 0
        self.digest = None
        if self.state not in ("committed", "cancelled"):
            self.state = "new"

        def cleanup():
            if direct is not None:
                os.close(direct)
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
        if not self._unfinished:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append((self._seq, d))
        return d

    def _queue(self, work, done, release=None, index=None):
        """
        Queue C{work(fd)} for a writer thread; C{done} gets its result (on the reactor
        thread) if the file is still the same; C{release()} is called once it is over or
        skipped. Up to L{WRITERS} run at once, each on another block (C{index}), and a
        block's writes in the order queued.
        """
        seq, self._seq = self._seq, self._seq + 1
        self._pending += 1
        self._unfinished.append(seq)
        self._waiting.append((seq, self._fd, index, work, done, release))
        if (
            self._pending >= RECEIVE_HIGH_WATER
            and self._proto is not None
            and not self._paused_reading
        ):
            self._paused_reading = True
            self._proto.transport.pauseProducing()
        self._start_writes()

    def _start_writes(self):
        while self._waiting and len(self._writing) < WRITERS:
            seq, fd, index, work, done, release = self._waiting[0]
            if index in self._writing:
                return  # in order: the block's earlier write first
            self._waiting.popleft()
            if self._write_error is not None or self._fd != fd:
                self._write_over(seq, index, release)
                continue
            self._writing.add(index)
            d = deferToThreadPool(self._receiver.reactor, self._receiver.threadpool, work, fd)

            def written(result, fd=fd, done=done):
                if self._fd == fd:
                    done(result)

            d.addCallbacks(written, self._write_failed)
            d.addBoth(lambda _, seq=seq, index=index, release=release: self._write_over(
                seq, index, release, True))

    def _write_over(self, seq, index, release, started=False):
        if started:
            self._writing.discard(index)
        if release is not None:
            release()
        self._pending -= 1
        self._finished.add(seq)
        while self._unfinished and self._unfinished[0] in self._finished:
            self._finished.discard(self._unfinished.popleft())
        if self._waiters:
            first = self._unfinished[0] if self._unfinished else self._seq
            ready = [d for mark, d in self._waiters if mark <= first]
            self._waiters = [(mark, d) for mark, d in self._waiters if mark > first]
            for d in ready:
                d.callback(None)
        if self._pending <= RECEIVE_LOW_WATER:
            self._resume_reading()
        if not self._pending and self._proto is None:
            # The stream is over and its last block written: the pool shrinks back.
            self._receiver.buffers.trim()
        self._start_writes()

    def _resume_reading(self):
        if self._paused_reading:
            self._paused_reading = False
            if self._proto is not None:
                self._proto.transport.resumeProducing()

    def _write_failed(self, f):
        if errors.disk_full(f.value):
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

    def data(self, offset, parts, length, buf=None, release=None):
        """
        A block arrived: as the list of pieces it came in (C{parts}, C{length} bytes in all),
        or in the first C{length} bytes of C{buf}, a buffer that C{release(buf)} takes back
        once it is written (or not written after all).
        """
        try:
            self._data(offset, parts, length, buf, release)
        except BaseException:
            if buf is not None:
                release(buf)
            raise

    def _data(self, offset, parts, length, buf, release):
        index = self._block_index(offset, length)
        if self._write_error is not None:
            raise self._write_error
        if self.state == "bulk":
            if offset < self.offset:
                raise errors.Corrupt(f"malformed volume stream: block at {offset} sent twice")
            self.offset = offset + length  # frames arrive in order
        elif self.state != "delta":
            raise errors.Corrupt("malformed volume stream: data outside a transfer")

        direct, buffers = self._direct, self._receiver.buffers
        kick = False
        if direct is None or (offset | length) % DIRECT_ALIGN:
            self._dirty += length
            kick = self._dirty >= WRITEBACK_EVERY
            if kick:
                self._dirty = 0

        new = blockmap.algorithm(self.algorithm)
        sparse = self.state == "bulk"  # (each block lands once in a new sparse file)

        def work(fd):
            if buf is not None:
                digest = _write_block(fd, buf, offset, length, direct, new, sparse)
            else:
                digest = _write_parts(fd, parts, offset, length, direct, buffers, new)
            if kick:
                _start_writeback(fd)
            return digest

        def done(digest):
            self.hashes[index] = digest
            self.received += length
            self._receiver.bytes_received += length  # the agent's /metrics

        self._queue(work, done, (lambda: release(buf)) if buf is not None else None, index)

    def zero(self, offset, length):
        index = self._block_index(offset, length)
        if self.state != "delta":
            raise errors.Corrupt("malformed volume stream: a zero frame outside a delta")

        def work(fd):
            blockmap.punch_hole(fd, offset, length)

        def done(_, name=self.algorithm):
            self.hashes[index] = blockmap.zero_hash(length, name)

        self._queue(work, done, None, index)

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
        digest = blockmap.image_digest(self.size, self.hashes, name=self.algorithm)
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
        store = self.store
        if store.exists(self.volume_id):
            return defer.fail(
                errors.Conflict(
                    f"{_what(self.volume_id, self.snapshot_id)} already exists on this host; "
                    "it was not overwritten"
                )
            )
        fd, direct, path = self._fd, self._direct, self.tmp_path

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
            self._fd = self._direct = None
            if direct is not None:
                os.close(direct)
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
        tcp = getattr(self.transport, "transport", None)
        if isinstance(getattr(tcp, "bufferSize", None), int):
            # Read the socket in larger pieces than Twisted's 64 KiB: fewer reactor turns, and
            # fewer passes through the TLS layer (each ends with a failed read of its BIO).
            tcp.bufferSize = max(tcp.bufferSize, READ_SIZE)

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

    def bodyBuffer(self, kind, length):
        if self._transfer is None or kind != DATA or length > BLOCK_SIZE:
            return None
        return self._receiver.buffers.take()

    def bufferReceived(self, kind, head, buf, length):
        release = self._receiver.buffers.give
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._receiver.idle_timeout)
        if self._transfer is None:
            release(buf)
            raise errors.Corrupt("malformed volume stream: it must start with a hello")
        (offset,) = _OFFSET.unpack(head)
        self._transfer.data(offset, None, length, buf, release)

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
            ready = {
                "offset": 0,
                "block_size": BLOCK_SIZE,
                "blocks": len(arg) // 32,
                "hash": transfer.algorithm,
            }
            self.sendFrame(READY, ready)
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
        body, self._body = self._body, None
        if body is not None and body.buf is not None:
            # A block cut short: its buffer goes back.
            body.view.release()
            self._receiver.buffers.give(body.buf)
        if self._transfer is not None:
            self._transfer.detach(self)
            self._transfer = None
        self._receiver.buffers.trim()


class VolumeReceiver(service.Service):
    """
    The target side: a TLS endpoint that accepts volume streams for expected tokens.

    @ivar port: the listening port once L{listen} has fired.
    @ivar bytes_received: bytes of volume data written, over all transfers (C{/metrics}).
    """

    bytes_received = 0

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
        self.tls = tls  # renewed (RenewableServerOptions.renew) with the host certificate
        self._transfers = {}
        self._ttls = {}
        self._connections = set()
        self.buffers = _Buffers()
        self.port = None

    def buildFactory(self):
        """
        @return: the TLS-wrapped protocol factory (for listening on an endpoint of your own).
        """
        factory = Factory.forProtocol(lambda: _ReceiverProtocol(self))
        return tls_factory(self.tls, False, factory, self.reactor)

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

    def expect(self, token, volume_id, size, ttl=None, peer=None, snapshot_id=None):
        """
        Accept one volume (or, with C{snapshot_id}, one snapshot of a volume) for C{token}.

        @param token: the one-time token (see L{mint_token}); valid until the volume is
            committed, the transfer is cancelled, or C{ttl} seconds pass without a connection.
        @param volume_id: the volume; it must not exist on this host.
        @param size: the image's size in bytes.
        @param peer: if given, the host id of the only sender accepted (its certificate
            must be that host's).
        @param snapshot_id: the copy is that snapshot of the volume, adopted into the
            store's snapshot directory (L{zwrm.agent.volumes.VolumeStore.snapshot_slot});
            the snapshot must not exist here, the volume need not.
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
        what = _what(volume_id, snapshot_id)
        if any(
            (t.volume_id, t.snapshot_id) == (volume_id, snapshot_id) and t.state != "committed"
            for t in self._transfers.values()
        ):
            raise errors.Conflict(f"{what} is already being received")
        store = self.store if snapshot_id is None else self.store.snapshot_slot(
            volume_id, snapshot_id)
        if store.exists(volume_id) or store.in_use(volume_id):
            raise errors.Conflict(f"{what} already exists on this host")
        transfer = IncomingTransfer(self, token, volume_id, size, peer, snapshot_id=snapshot_id)
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
