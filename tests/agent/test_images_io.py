"""
How the image cache writes a download: L{zwrm.sparse.SparseFile} (O_DIRECT from an aligned
buffer where the file system takes it, through the page cache where not), the sparse writers
of L{zwrm.sparse}, and the sink that feeds them from two threads. These run in threads in
production; here they are called directly.
"""

import errno
import hashlib
import os
import random

from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import ResponseDone

from zwrm import sparse
from zwrm.agent import images
from zwrm.sparse import (
    DIRECT_ALIGN,
    DIRECT_BUFFER,
    SPARSE_BLOCK,
    SparseFile,
    pwrite_sparse,
    write_sparse,
)


def _direct_supported(directory):
    if not hasattr(os, "O_DIRECT"):
        return False
    path = os.path.join(directory, "probe")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(path)
    return True


def _pieces(rng, total):
    """C{total} bytes of mixed data and zero runs, cut at awkward places."""
    sizes = [1, 7, DIRECT_ALIGN - 1, DIRECT_ALIGN, DIRECT_ALIGN + 1, SPARSE_BLOCK + 3,
             1 << 20, DIRECT_BUFFER - 5, DIRECT_BUFFER + 5]
    out, n = [], 0
    while n < total:
        size = min(rng.choice(sizes), total - n)
        out.append(bytes(size) if rng.random() < 0.3 else rng.randbytes(size))
        n += size
    return out


class BlobFileTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "blob")

    def blobfile(self, direct=True):
        f = SparseFile(self.path, direct)
        self.addCleanup(f.close)
        return f

    def written(self, f, size):
        f.finish()
        os.truncate(self.path, size)  # as the commit does
        with open(self.path, "rb") as g:
            return g.read()

    def test_direct_where_the_file_system_takes_it(self):
        if not _direct_supported(self.dir):
            raise unittest.SkipTest(f"{self.dir}'s file system refuses O_DIRECT")
        self.assertTrue(self.blobfile().direct)
        self.assertFalse(self.blobfile(direct=False).direct)

    def test_writes_of_any_size_in_any_mode(self):
        rng = random.Random(20)
        for direct in (True, False):
            for total in (0, 1, DIRECT_ALIGN, 3 * DIRECT_BUFFER + 12345):
                pieces = _pieces(rng, total)
                f = self.blobfile(direct)
                # Batches of a few pieces each, as the sink hands them over.
                i = 0
                while i < len(pieces):
                    k = rng.randint(1, 4)
                    f.write(pieces[i:i + k], f.size)
                    i += k
                self.assertEqual(f.size, total)
                self.assertEqual(self.written(f, total), b"".join(pieces), (direct, total))
                f.close()

    def test_zero_blocks_are_holes(self):
        for direct in (True, False):
            data = os.urandom(5000)
            f = self.blobfile(direct)
            f.write([os.urandom(100)], 0)
            f.write([bytes(4 << 20), data, bytes(3 << 20)], 100)
            size = 100 + (7 << 20) + len(data)
            body = self.written(f, size)
            self.assertEqual(body[100 + (4 << 20):100 + (4 << 20) + len(data)], data)
            self.assertEqual(len(body), size)
            st = os.stat(self.path)
            self.assertLessEqual(st.st_blocks * 512, 4 * SPARSE_BLOCK, direct)
            f.close()

    def test_device_refusing_the_alignment_falls_back(self):
        """O_DIRECT opened but its writes refused (EINVAL): the rest goes buffered."""
        if not _direct_supported(self.dir):
            raise unittest.SkipTest(f"{self.dir}'s file system refuses O_DIRECT")
        f = self.blobfile()
        direct_fd = f._direct
        real = os.pwrite

        def pwrite(fd, data, offset):
            if fd == direct_fd:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, data, offset)

        self.patch(sparse.os, "pwrite", pwrite)
        data = [os.urandom(DIRECT_BUFFER + 777), os.urandom(10)]
        f.write(data[:1], 0)
        self.assertFalse(f.direct)
        f.write(data[1:], f.size)
        self.assertEqual(self.written(f, f.size), b"".join(data))

    def test_other_write_errors_are_raised(self):
        f = self.blobfile()
        real = os.pwrite

        def pwrite(fd, data, offset):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(sparse.os, "pwrite", pwrite)
        with self.assertRaises(OSError) as e:
            f.write([os.urandom(DIRECT_BUFFER)], 0)
            f.finish()
        self.assertEqual(e.exception.errno, errno.ENOSPC)
        self.patch(sparse.os, "pwrite", real)

    def test_file_system_refusing_o_direct(self):
        real = os.open

        def refuse(path, flags, *a):
            if flags & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(path, flags, *a)

        self.patch(sparse.os, "open", refuse)
        f = self.blobfile()
        self.assertFalse(f.direct)
        data = os.urandom(10000)
        f.write([data], 0)
        self.assertEqual(self.written(f, len(data)), data)

    def test_no_memory_for_the_buffer(self):
        def no_memory(*a):
            raise OSError(errno.ENOMEM, "Cannot allocate memory")

        self.patch(sparse.mmap, "mmap", no_memory)
        f = self.blobfile()
        self.assertFalse(f.direct)
        data = os.urandom(10000)
        f.write([data], 0)
        self.assertEqual(self.written(f, len(data)), data)

    def test_restart(self):
        f = self.blobfile()
        f.write([os.urandom(DIRECT_BUFFER + 100)], 0)
        f.restart()
        self.assertEqual(f.size, 0)
        data = os.urandom(5000)
        f.write([data], 0)
        self.assertEqual(self.written(f, len(data)), data)

    def test_write_must_continue_the_file(self):
        f = self.blobfile()
        f.write([b"abc"], 0)
        with self.assertRaises(ValueError):
            f.write([b"def"], 2)


class SparseTests(unittest.TestCase):
    def test_round_trip_with_holes(self):
        import tempfile

        rng = random.Random(6)
        for _ in range(150):
            parts = []
            for _ in range(rng.randint(0, 6)):
                n = rng.choice([0, 1, 100, SPARSE_BLOCK - 1, SPARSE_BLOCK, SPARSE_BLOCK + 1,
                                3 * SPARSE_BLOCK, 2 * SPARSE_BLOCK + 7])
                parts.append(bytes(n) if rng.random() < 0.5 else rng.randbytes(n))
            data = b"".join(parts)
            offset = rng.choice([0, 1, SPARSE_BLOCK - 3, SPARSE_BLOCK, 5 * SPARSE_BLOCK + 11])
            with tempfile.TemporaryFile() as f:
                f.write(b"x" * offset)
                write_sparse(f, data)
                self.assertEqual(f.tell(), offset + len(data))
                f.truncate(offset + len(data))
                f.seek(0)
                self.assertEqual(f.read(), b"x" * offset + data)
            with tempfile.TemporaryFile(buffering=0) as f:
                pwrite_sparse(f.fileno(), data, offset)
                f.truncate(offset + len(data))
                f.seek(0)
                self.assertEqual(f.read(), bytes(offset) + data)

    def test_holes_are_aligned_to_the_file_and_runs_written_at_once(self):
        writes = []
        real = os.pwrite

        def pwrite(fd, data, offset):
            writes.append((offset, len(data)))
            return real(fd, data, offset)

        self.patch(sparse.os, "pwrite", pwrite)
        path = self.mktemp()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        # From offset 1000: data to the first block boundary and one block on, then three
        # zero blocks, then data.
        first = SPARSE_BLOCK - 1000
        data = os.urandom(first + SPARSE_BLOCK) + bytes(3 * SPARSE_BLOCK) + os.urandom(500)
        pwrite_sparse(fd, data, 1000)
        self.assertEqual(writes, [(1000, first + SPARSE_BLOCK), (4 * SPARSE_BLOCK + SPARSE_BLOCK, 500)])


class _Transport:
    def __init__(self):
        self.paused = False
        self.stopped = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.stopped = True


class SinkTests(unittest.TestCase):
    """
    L{images._BlobSink} with its two threads replaced by calls the test completes by hand.
    """

    def setUp(self):
        self.jobs = []
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.file = SparseFile(os.path.join(self.dir, "blob"))
        self.addCleanup(self.file.close)
        self.hasher = hashlib.sha256()
        self.sink = images._BlobSink(self.in_thread, self.file, 0, self.hasher, task.Clock(), 0)
        self.transport = _Transport()
        self.sink.makeConnection(self.transport)

    def in_thread(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def run_job(self, name):
        """Run the oldest job of the stage whose work is C{name}."""
        for i, (f, args, d) in enumerate(self.jobs):
            if f.__name__ == name:
                del self.jobs[i]
                d.callback(f(*args))
                return
        self.fail(f"no {name} job waiting")

    def test_hashing_and_writing_overlap_in_order_with_backpressure(self):

        batch = images.BATCH
        self.assertEqual(images.MAX_PENDING, 3 * batch)
        body = [os.urandom(batch) for _ in range(5)] + [os.urandom(1000)]
        for chunk in body[:3]:
            self.sink.dataReceived(chunk)
        # Both threads got the first batch at once; the others wait, in order, one job
        # per stage at a time.
        self.assertEqual(sorted(f.__name__ for f, _, _ in self.jobs), ["_hash_sync", "_write_sync"])
        self.assertFalse(self.transport.paused)
        self.sink.dataReceived(body[3])  # 4 batches handed over, none done: past MAX_PENDING
        self.assertTrue(self.transport.paused)
        for _ in range(3):
            self.run_job("_hash_sync")
        self.assertTrue(self.transport.paused)  # none written yet
        for _ in range(2):
            self.run_job("_write_sync")
        self.assertTrue(self.transport.paused)  # 2 batches still waiting: above half
        self.run_job("_write_sync")
        self.assertFalse(self.transport.paused)
        self.assertEqual(self.sink.written, 3 * batch)
        self.sink.dataReceived(body[4])
        self.sink.dataReceived(body[5])
        self.sink.connectionLost(Failure(ResponseDone()))
        self.assertFalse(self.sink.done.called)
        while self.jobs:
            self.run_job(self.jobs[0][0].__name__)
        self.assertIsNone(self.successResultOf(self.sink.done))
        data = b"".join(body)
        self.assertEqual(self.sink.written, len(data))

        self.assertEqual(self.hasher.hexdigest(), hashlib.sha256(data).hexdigest())
        self.file.finish()
        os.truncate(self.file.path, len(data))
        with open(self.file.path, "rb") as f:
            self.assertEqual(f.read(), data)

    def test_write_error_stops_the_transfer_after_the_jobs_in_flight(self):

        self.sink.dataReceived(os.urandom(images.BATCH))
        self.sink.dataReceived(os.urandom(images.BATCH))
        for i, (f, _args, d) in enumerate(self.jobs):
            if f.__name__ == "_write_sync":
                del self.jobs[i]
                d.errback(Failure(OSError(errno.ENOSPC, "No space left on device")))
                break
        self.assertTrue(self.transport.stopped)
        self.sink.connectionLost(Failure(ResponseDone()))
        self.assertFalse(self.sink.done.called)  # a hash job is still running
        self.run_job("_hash_sync")
        self.assertEqual(self.jobs, [])  # the queued batches were dropped
        self.failureResultOf(self.sink.done, OSError)
