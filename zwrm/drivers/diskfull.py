"""
A machine paused on a full disk, and resumed once there is room.

When a guest's write to one of its disks (a volume's raw file, the root overlay) fails
with ENOSPC because the host's file system is full, QEMU does not pass the error to the
guest: it pauses the whole machine (its default C{werror=enospc}) and emits
C{BLOCK_IO_ERROR} with C{nospace: true}.  Nothing is lost: the write is retried when the
machine continues.  Left alone, the machine stays paused for ever, and a restart would
throw away what the guest had not written yet, and meet the same full disk.

Both drivers therefore report such a machine as C{running} with C{paused} set to
L{DISK_FULL} and a reason naming the disk, check its disks' file systems every
L{CHECK_INTERVAL} seconds, and continue it once each has L{RESUME_FREE_BYTES} free (as
oVirt's VDSM resumes machines paused on a storage error once the storage is back).  If
the room is taken again before the write completes, QEMU pauses it again.
"""

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger

log = Logger()

#: A machine's C{paused} while QEMU holds it on a write its host's disk had no room for.
DISK_FULL = "disk-full"

#: Seconds between two looks at the file systems of a paused machine's disks.
CHECK_INTERVAL = 5.0

#: Free bytes each of its disks' file systems needs before a paused machine continues
#: (room for the write that failed and what the guest has buffered behind it).
RESUME_FREE_BYTES = 64 << 20

#: The room each driver keeps on its machines' file system for the records of their live
#: migrations (L{zwrm.files.Reserve}): a machine paused on a full disk can still leave the
#: host live, with the write it waits on.  A migration's records and TLS files take a few
#: KiB; the reserve is made again once the disk has it and L{RESUME_FREE_BYTES} free.
RESERVE_BYTES = 1 << 20

RESUMED = "resumed: its host's disk has room again"


def paused_reason(disk, path):
    """The reason of a machine paused because disk C{disk} (file C{path}) met a full disk."""
    where = f"disk {disk}" + (f" ({path})" if path else "")
    return (f"paused: {where} met a full file system on this host (no space left on "
            f"device); it resumes by itself once there are {RESUME_FREE_BYTES >> 20} MiB "
            f"free")


class RoomWatch:
    """
    Every C{interval} seconds, while started, ask C{free_bytes(path)} of each of C{paths}
    and call C{resume()} once each has at least L{RESUME_FREE_BYTES}; keep looking until
    L{stop} (the driver stops it when the machine has resumed or ended).

    @param reactor: provides C{IReactorTime}.
    @param free_bytes: C{free_bytes(path)} -> int; an C{OSError} counts as no room.
    @param resume: called with no argument; may return a Deferred (a failure is logged and
        the next look tries again).
    """

    def __init__(self, reactor, interval, paths, free_bytes, resume, name):
        self._reactor = reactor
        self._interval = interval
        self._paths = list(paths)
        self._free_bytes = free_bytes
        self._resume = resume
        self._name = name
        self._call = None

    def start(self):
        if self._call is None:
            self._call = self._reactor.callLater(self._interval, self._look)

    def stop(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _room(self):
        for path in self._paths:
            try:
                if self._free_bytes(path) < RESUME_FREE_BYTES:
                    return False
            except OSError:
                return False
        return True

    def _look(self):
        self._call = self._reactor.callLater(self._interval, self._look)
        if not self._room():
            return
        log.info("machine {id}: its disks have room again; resuming it", id=self._name)
        maybeDeferred(self._resume).addErrback(
            lambda f: log.warn("machine {id}: could not resume it: {e}", id=self._name,
                               e=f.getErrorMessage()))
