"""
File systems that fill up, for tests: a tmpfs of a given size (real C{ENOSPC}), and filling
one as something else on the host would (a log, a backup).
"""

import errno
import os
import subprocess


def small_disk(testcase, path, size):
    """
    Mount a tmpfs of C{size} (mount's syntax: C{"16M"}, C{"256k"}) on C{path} (made if
    missing), mode 0700, unmounted after C{testcase} (lazily: a process may still hold it).
    """
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "zwrm-test", path],
                   check=True)
    testcase.addCleanup(subprocess.run, ["umount", "-l", path], check=False)


def free_bytes(path):
    """@return: the bytes free for anyone on C{path}'s file system."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill_disk(directory, leave=0):
    """
    Fill the file system of C{directory} up to C{leave} free bytes: the file
    C{<directory>/filler} grown by one allocation, and with C{leave} 0 by zeros written until
    C{ENOSPC} (every last byte: what the allocation left for its own bookkeeping).  Call it
    again to take what was freed since.

    @return: the file's path (remove it to free the disk again).
    """
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        size = free_bytes(directory) - leave
        if size > 0:
            os.posix_fallocate(fd, os.fstat(fd).st_size, size)
        if not leave:
            try:
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return path
