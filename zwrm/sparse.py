"""
Writing disk images sparse: blocks of zeros become holes, and new files with O_DIRECT where
the file system takes it. Shared by the registry's blob store and the agent's image cache (it
imports neither).
"""

import errno
import mmap
import os

#: Blocks of this many zero bytes are left as holes (raw disks are stored sparse).
SPARSE_BLOCK = 64 * 1024
#: O_DIRECT writes start and end on multiples of this (the largest logical block size).
DIRECT_ALIGN = 4096
#: The page-aligned buffer O_DIRECT writes go from.
DIRECT_BUFFER = 4 * 1024 * 1024
_ZEROS = bytes(SPARSE_BLOCK)


def is_zero(block):
    """Whether C{block}, a non-empty memoryview, is all zeros."""
    # A memoryview compares byte by byte (about 1 GB/s); a copy compared with memcmp is
    # some 40 times faster. Data blocks mostly differ at their first byte: no copy then.
    return block[0] == 0 and block.tobytes() == _ZEROS[:len(block)]


def _runs(view, offset):
    """
    The C{(start, end)} runs of C{view} (which starts at file offset C{offset}) that are
    not all-zero L{SPARSE_BLOCK}s; blocks are aligned to file offsets, so holes are too.
    """
    n = len(view)
    start = None
    i = 0
    while i < n:
        j = min(n, i + SPARSE_BLOCK - (offset + i) % SPARSE_BLOCK)
        if is_zero(view[i:j]):
            if start is not None:
                yield start, i
                start = None
        elif start is None:
            start = i
        i = j
    if start is not None:
        yield start, n


def write_sparse(f, data):
    """
    Write C{data} at C{f}'s position, seeking over every all-zero L{SPARSE_BLOCK} instead
    of writing it, so the file keeps holes there; the blocks between holes go in one write.
    The caller sets the file's final size (C{truncate}) once everything is written: trailing
    holes do not extend it.
    """
    view = memoryview(data)
    pos = f.tell()
    for start, stop in _runs(view, pos):
        f.seek(pos + start)
        f.write(view[start:stop])
    f.seek(pos + len(view))


def pwrite_sparse(fd, data, offset):
    """
    Write C{data} at C{offset} of the file descriptor C{fd} (its position is not used nor
    moved), leaving every all-zero L{SPARSE_BLOCK} as a hole; the blocks between holes go
    in one C{pwrite} each. As with L{write_sparse}, the caller sets the final size.
    """
    view = memoryview(data)
    for start, stop in _runs(view, offset):
        while start < stop:
            start += os.pwrite(fd, view[start:stop], offset + start)


class SparseFile:
    """
    A new file written at increasing offsets by one thread at a time, with blocks of zeros
    left as holes: the agent's downloads (made, and each method called, in a thread) and
    the registry's spooled request bodies.

    Where the file system takes it, the bytes go with C{O_DIRECT} from one reused,
    page-aligned buffer, bypassing the page cache: a write then neither pays for filling
    the page cache (a copy into freshly allocated pages, the largest cost of a buffered
    write, and a slow one on a virtual machine) nor pushes the host's running machines'
    pages out of it, and an fsync has little left to write. The bytes
    short of an L{DIRECT_ALIGN} boundary wait in the buffer for the next batch; the last
    block goes whole, and the commit truncates what lies past the end. Where the file system
    refuses C{O_DIRECT} (tmpfs, some network file systems), the file is written through the
    page cache instead.
    """

    def __init__(self, path, direct=True):
        self.path = path
        self.size = 0  # bytes taken: written, or waiting in the buffer
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        self._direct = None
        self._buf = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._direct = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
                self._buf = mmap.mmap(-1, DIRECT_BUFFER)
            except OSError:
                # Not on this file system (or no memory for the buffer): the page cache.
                if self._direct is not None:
                    self._undirect()
        self._pos = 0  # the file offset of the buffer's first byte
        self._held = 0  # bytes in the buffer, not written yet

    @property
    def direct(self):
        """Whether the bytes bypass the page cache."""
        return self._direct is not None

    def write(self, chunks, offset):
        """Write C{chunks} (a list of bytes) at C{offset}, which must be L{size}."""
        if offset != self.size:
            raise ValueError(f"write at {offset} in a file of {self.size} bytes")
        if self._direct is None:
            pwrite_sparse(self._fd, chunks[0] if len(chunks) == 1 else b"".join(chunks), offset)
            self.size += sum(len(c) for c in chunks)
            return
        buf = self._buf
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                n = min(len(view), DIRECT_BUFFER - self._held)
                buf[self._held:self._held + n] = view[:n]
                self._held += n
                self.size += n
                view = view[n:]
                if self._held == DIRECT_BUFFER:
                    self._flush(DIRECT_BUFFER)
        if self._held >= DIRECT_ALIGN or self._direct is None:
            self._flush(self._held - self._held % DIRECT_ALIGN)

    def _flush(self, n):
        """
        Write the buffer's first C{n} bytes (a multiple of L{DIRECT_ALIGN}) at C{_pos};
        all it holds once O_DIRECT is given up.
        """
        view = memoryview(self._buf)
        if self._direct is not None and n:
            try:
                pwrite_sparse(self._direct, view[:n], self._pos)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # O_DIRECT opened, but the device wants another alignment: from here on
                # through the page cache.
                self._undirect()
        if self._direct is None:
            n = self._held
            pwrite_sparse(self._fd, view[:n], self._pos)
        rest = self._held - n
        if rest:
            self._buf.move(0, n, rest)
        self._pos += n
        self._held = rest

    def _undirect(self):
        os.close(self._direct)
        self._direct = None

    def finish(self):
        """
        Write what waits in the buffer, its last block whole: the bytes past the end are
        whatever the buffer held, and the commit truncates them away.
        """
        if self._direct is None or not self._held:
            return
        self._held += -self._held % DIRECT_ALIGN
        self._flush(self._held)

    def restart(self):
        """Empty the file, to be written again from offset 0."""
        os.ftruncate(self._fd, 0)
        self.size = self._pos = self._held = 0

    def close(self):
        """Close the file (again: nothing)."""
        if self._direct is not None:
            self._undirect()
        self._buf = None  # unmapped when no view of it is left (a traceback may hold one)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


__all__ = ["DIRECT_ALIGN", "DIRECT_BUFFER", "SPARSE_BLOCK", "SparseFile", "is_zero",
           "pwrite_sparse", "write_sparse"]
