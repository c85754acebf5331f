"""
Small files written whole: a crash leaves the old file or the new one, never a part.
"""

import os


def write_atomically(path, text, sync=False):
    """
    Write C{text} (str) to C{path}, mode 0600, through C{<path>.tmp} renamed over it; with
    C{sync}, fsynced before the rename (a power cut keeps one of the two; blocking: call it
    from a thread).  On any failure (a full disk: C{OSError} C{ENOSPC}) the temporary file
    is removed and C{path} is as it was.
    """
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
