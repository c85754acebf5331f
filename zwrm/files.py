"""
Small files written whole: a crash leaves the old file or the new one, never a part.  And
the room kept for them on a file system that fills up (L{Reserve}).
"""

import errno
import os


def fsync_path(path):
    """fsync the file or directory at C{path} (blocking: call it from a thread)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path, text, sync=False, reserve=None):
    """
    Write C{text} (str) to C{path}, mode 0600, through C{<path>.tmp} renamed over it; with
    C{sync}, fsynced before the rename (a power cut keeps one of the two; blocking: call it
    from a thread).  On any failure (a full disk: C{OSError} C{ENOSPC}) the temporary file
    is removed and C{path} is as it was.

    @param reserve: the L{Reserve} of C{path}'s file system, if it has one: when the disk
        is full, the reserve is given up and the write made once more in its room.
    """
    try:
        _write(path, text, sync)
    except OSError as e:
        if reserve is None or not _no_room(e) or not reserve.release():
            raise
        _write(path, text, sync)


def _write(path, text, sync):
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _no_room(e):
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


class Reserve:
    """
    Room kept on a file system for a program's own records, so that they can still be
    written once something else filled it: a file of C{size} bytes allocated ahead
    (C{posix_fallocate}), given up (L{release}) when a record meets the full disk, and made
    again (L{refill}) once the file system has room.

    What needs it: a machine paused on its host's full disk leaves the host by a live
    migration, whose source records its phases (L{zwrm.drivers.live}); without room for
    the record it could only leave by a stop, which loses the write its guest is waiting on.
    The blocks of a released reserve are free for anyone; the record that needs them is
    written at once, so they are there unless something else writes in that instant.
    """

    def __init__(self, path, size, margin):
        """
        @param path: the reserve's file (on the file system it keeps room on).
        @param size: its bytes.
        @param margin: the free bytes the file system must have beside C{size} before the
            reserve takes its room (it never takes what a machine waits for).
        """
        self.path = path
        self.size = size
        self.margin = margin

    def held(self):
        """@return: whether the reserve's room is allocated."""
        try:
            return os.stat(self.path).st_blocks * 512 >= self.size
        except OSError:
            return False

    def refill(self):
        """
        Allocate the reserve's room if it is not, when the file system has C{size} +
        C{margin} bytes free.

        @return: whether the reserve holds its room now.
        """
        if self.held():
            return True
        tmp = self.path + ".tmp"
        try:
            st = os.statvfs(os.path.dirname(self.path) or ".")
            if st.f_bavail * st.f_frsize < self.size + self.margin:
                return False
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            return True
        except OSError:  # (a full disk, say: tried again at the next refill)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False

    def release(self):
        """
        Give the reserve's room up (to a record about to be written).

        @return: whether it held any.
        """
        try:
            held = os.stat(self.path).st_blocks > 0
            os.unlink(self.path)
        except OSError:
            return False
        return held
