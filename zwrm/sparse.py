"""
Writing disk images sparse: blocks of zeros become holes. Shared by the registry's blob store
and the agent's image cache (it imports neither).
"""

import os

#: Blocks of this many zero bytes are left as holes (raw disks are stored sparse).
SPARSE_BLOCK = 64 * 1024
_ZEROS = bytes(SPARSE_BLOCK)


def write_sparse(f, data):
    """
    Write C{data} at C{f}'s position, seeking over every all-zero L{SPARSE_BLOCK} instead
    of writing it, so the file keeps holes there. The caller sets the file's final size
    (C{truncate}) once everything is written: trailing holes do not extend it.
    """
    view = memoryview(data)
    for i in range(0, len(view), SPARSE_BLOCK):
        block = view[i:i + SPARSE_BLOCK]
        if block == _ZEROS[:len(block)]:
            f.seek(len(block), os.SEEK_CUR)
        else:
            f.write(block)


__all__ = ["SPARSE_BLOCK", "write_sparse"]
