"""
The agent's volume store: one sparse raw ext4 image per volume, C{<root>/<id>.img}.

Images are made with C{mkfs.ext4 -q -F} on a regular file (no root, no loop device), in a
temporary file first and renamed into place, so a failed or interrupted create leaves
nothing behind. A volume claimed by a machine (L{VolumeStore.claim}) cannot be deleted or
replaced until the machine releases it.
"""

import errno
import os
import uuid

from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from zwrm.drivers import process
from zwrm.drivers.spec import check_id
from zwrm.errors import Conflict, InvalidArgument, NotFound, ResourceExhausted, Unavailable

log = Logger()

#: Largest volume, in MiB (1 TiB).
MAX_SIZE_MB = 1024 * 1024
#: Smallest volume mkfs.ext4 makes without complaint, in MiB.
MIN_SIZE_MB = 2


class VolumeStore:
    """
    @param reactor: provides C{IReactorProcess} and C{IReactorTime}.
    @param root: the directory holding the images (created if missing).
    @param mkfs: the mkfs program.
    @param reserve_mb: free space a create must leave on the file system, in MiB.
    """

    def __init__(self, reactor, root, mkfs="mkfs.ext4", reserve_mb=64, mkfs_timeout=300.0,
                 threads=None):
        self.reactor = reactor
        #: C{threads(f, *args)} -> Deferred: runs the directory's fsync off the reactor
        #: thread; default: the reactor's thread pool
        self._threads = threads or (
            lambda f, *a: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a))
        self.root = os.path.abspath(root)
        self.mkfs = mkfs
        self.reserve_mb = reserve_mb
        self.mkfs_timeout = mkfs_timeout
        self._claims = {}
        self._creating = set()
        os.makedirs(self.root, mode=0o700, exist_ok=True)  # volumes are private to the agent
        self._clean_temporaries()

    def _clean_temporaries(self):
        for name in os.listdir(self.root):
            if name.startswith(".tmp-"):
                try:
                    os.unlink(os.path.join(self.root, name))
                except OSError:
                    pass

    # --- paths and claims ---------------------------------------------------------------

    def _image(self, volume_id):
        return os.path.join(self.root, check_id(volume_id, "volume id") + ".img")

    def exists(self, volume_id):
        """@return: whether the volume exists."""
        return os.path.isfile(self._image(volume_id))

    def path(self, volume_id):
        """
        @return: the path of the volume's image, whether it exists or not (a receiver of a
            volume checks that it does not, and puts its temporary file beside it).
        @raise InvalidArgument: for an invalid id.
        """
        return self._image(volume_id)

    def existing_path(self, volume_id):
        """
        @return: the path of the volume's image.
        @raise NotFound: if there is no such volume.
        """
        p = self._image(volume_id)
        if not os.path.isfile(p):
            raise NotFound(f"no volume {volume_id!r} on this host")
        return p

    def in_use(self, volume_id):
        """@return: the id of the machine that has claimed the volume, or C{None}."""
        return self._claims.get(volume_id)

    def claim(self, volume_id, machine_id):
        """
        Mark the volume as used by C{machine_id} until L{release}.

        @raise NotFound: if there is no such volume.
        @raise Conflict: if another machine has claimed it.
        """
        self.existing_path(volume_id)
        owner = self._claims.get(volume_id)
        if owner is not None and owner != machine_id:
            raise Conflict(f"volume {volume_id!r} is used by machine {owner!r}")
        self._claims[volume_id] = machine_id

    def release(self, volume_id, machine_id):
        """Undo L{claim} (a no-op if C{machine_id} does not hold it)."""
        if self._claims.get(volume_id) == machine_id:
            del self._claims[volume_id]

    # --- create, delete, adopt ----------------------------------------------------------

    def free_mb(self):
        """@return: the free space of the store's file system, in MiB."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize // (1024 * 1024)

    def create(self, volume_id, size_mb):
        """
        Create an empty ext4 volume of C{size_mb} MiB.

        @return: a Deferred firing with its L{info}.
        @raise InvalidArgument: bad id or size. @raise Conflict: it exists (or is being made).
        @raise ResourceExhausted: the disk has not C{size_mb} + the reserve free, or filled up.
        @raise Unavailable: mkfs.ext4 is missing or failed (its message is included).
        """
        return ensureDeferred(self._create(volume_id, size_mb))

    async def _create(self, volume_id, size_mb):
        target = self._image(volume_id)
        if not isinstance(size_mb, int) or isinstance(size_mb, bool) or not (
            MIN_SIZE_MB <= size_mb <= MAX_SIZE_MB
        ):
            raise InvalidArgument(
                f"volume size must be an integer number of MiB from {MIN_SIZE_MB} to "
                f"{MAX_SIZE_MB}, not {size_mb!r}"
            )
        if os.path.exists(target) or volume_id in self._creating:
            raise Conflict(f"volume {volume_id!r} exists already")
        free = self.free_mb()
        if free < size_mb + self.reserve_mb:
            raise ResourceExhausted(
                f"not enough disk for volume {volume_id!r}: {size_mb} MiB requested, "
                f"{free} MiB free (of which {self.reserve_mb} MiB are kept in reserve)"
            )
        self._creating.add(volume_id)
        tmp = os.path.join(self.root, f".tmp-{volume_id}-{uuid.uuid4().hex[:8]}.img")
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.truncate(size_mb * 1024 * 1024)
            except OSError as e:
                raise self._disk_error(volume_id, e) from None
            try:
                result = await process.run(
                    self.reactor, [self.mkfs, "-q", "-F", "-L", volume_id[:16], tmp],
                    timeout=self.mkfs_timeout,
                )
            except OSError as e:
                raise Unavailable(f"cannot make volume {volume_id!r}: {e}") from None
            if result.timed_out or result.code != 0:
                out = result.output.decode("utf-8", "replace")
                if "No space left" in out:
                    raise ResourceExhausted(
                        f"the disk filled up while making volume {volume_id!r}"
                    )
                why = "timed out" if result.timed_out else (result.last_line() or repr(result))
                raise Unavailable(f"mkfs.ext4 failed for volume {volume_id!r}: {why}")
            if os.path.exists(target):
                raise Conflict(f"volume {volume_id!r} exists already")
            os.rename(tmp, target)
            await self._synced()
        finally:
            self._creating.discard(volume_id)
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("volume {id}: created, {size} MiB", id=volume_id, size=size_mb)
        return self.info(volume_id)

    def _disk_error(self, volume_id, e):
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return ResourceExhausted(f"cannot make volume {volume_id!r}: {e.strerror}")
        return Unavailable(f"cannot make volume {volume_id!r}: {e.strerror}")

    def _fsync_dir(self):
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _synced(self):
        """
        The store's directory fsynced in the reactor's thread pool (a directory's fsync
        waits for the file system's journal, which a busy disk, its VMs' among others,
        makes long): a Deferred.
        """
        return self._threads(self._fsync_dir)

    def delete(self, volume_id):
        """
        Delete a volume.

        @return: a Deferred that fires once the deletion is on disk (the directory
            fsynced); the volume is gone from the store at once.
        @raise NotFound: no such volume. @raise Conflict: a machine has claimed it (both
            at once, nothing changed).
        """
        p = self.existing_path(volume_id)
        owner = self._claims.get(volume_id)
        if owner is not None:
            raise Conflict(
                f"volume {volume_id!r} is used by machine {owner!r}; destroy the machine first"
            )
        os.unlink(p)
        log.info("volume {id}: deleted", id=volume_id)
        return self._synced()

    def adopt(self, volume_id, tmp_path):
        """
        Make the image at C{tmp_path} the volume C{volume_id}: an atomic rename, then the
        directory is fsynced. The caller has verified and fsynced the image.

        @param tmp_path: a file on the same file system as the store (e.g. made with
            L{temporary_path}).
        @return: a Deferred firing with the volume's info once the directory is fsynced
            (the volume is in the store at once).
        @raise Conflict: the volume exists already. @raise InvalidArgument: C{tmp_path} is
            not a file, or is on another file system (both at once, nothing changed).
        """
        target = self._image(volume_id)
        if os.path.exists(target) or volume_id in self._creating:
            raise Conflict(f"volume {volume_id!r} exists already")
        if not os.path.isfile(tmp_path):
            raise InvalidArgument(f"{tmp_path} is not a file")
        try:
            os.rename(tmp_path, target)
        except OSError as e:
            if e.errno == errno.EXDEV:
                raise InvalidArgument(
                    f"{tmp_path} is on another file system than the volume store {self.root}"
                ) from None
            raise
        return self._synced().addCallback(lambda _: self.info(volume_id))

    def temporary_path(self, volume_id):
        """
        A fresh path inside the store for an image being received; removed at the next start
        of the store if it was never adopted.
        """
        check_id(volume_id, "volume id")
        return os.path.join(self.root, f".tmp-{volume_id}-{uuid.uuid4().hex[:8]}.img")

    # --- reports ------------------------------------------------------------------------

    def info(self, volume_id):
        """
        @return: C{{id, size_mb, size_bytes, allocated_bytes, in_use_by, path}}.
        @raise NotFound: no such volume.
        """
        p = self.existing_path(volume_id)
        st = os.stat(p)
        return {
            "id": volume_id,
            "size_mb": st.st_size // (1024 * 1024),
            "size_bytes": st.st_size,
            "allocated_bytes": st.st_blocks * 512,
            "in_use_by": self._claims.get(volume_id),
            "path": p,
        }

    def list(self):
        """@return: the L{info} of every volume, by id."""
        out = []
        for name in sorted(os.listdir(self.root)):
            if name.endswith(".img") and not name.startswith("."):
                try:
                    out.append(self.info(name[:-4]))
                except (NotFound, InvalidArgument, OSError):
                    continue
        return out
