"""
The agent's volume store: one sparse raw ext4 image per volume, C{<root>/<id>.img}.

Images are made with C{mkfs.ext4 -q -F} on a regular file (no root, no loop device), in a
temporary file first and renamed into place, so a failed or interrupted create leaves
nothing behind. A volume claimed by a machine (L{VolumeStore.claim}) cannot be deleted or
replaced until the machine releases it.

Snapshots (L{VolumeStore.snapshot}) are whole copies of a volume, immutable, kept beside it
in C{<root>/snapshots/<volume id>/<snapshot id>.img}: a copy at rest (C{cp
--sparse=always --reflink=auto}, so a file system with reflinks shares the blocks, and
verified against the volume), or of a running machine's volume through its hypervisor
(L{zwrm.interfaces.IVolumeBackup}, a point in time). A restore (L{VolumeStore.restore})
copies a snapshot, verifies the copy, links the volume's current data as another snapshot
and only then renames the copy over the volume. While a volume is snapshotted at
rest or restored, no machine can claim it.
"""

import errno
import os
import uuid

from twisted.internet.defer import FirstError, ensureDeferred, gatherResults
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from zwrm.agent.blockmap import file_digest
from zwrm.drivers import process
from zwrm.drivers.spec import check_id
from zwrm.errors import Conflict, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from zwrm.files import fsync_path

log = Logger()

#: Largest volume, in MiB (1 TiB).
MAX_SIZE_MB = 1024 * 1024
#: Smallest volume mkfs.ext4 makes without complaint, in MiB.
MIN_SIZE_MB = 2
#: The directory, under the store's, of the volumes' snapshots (one directory per volume).
SNAPSHOTS = "snapshots"


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
        #: volume id -> what is being done to it (a snapshot at rest, a restore): no claim
        self._busy = {}
        self.copy_timeout = 3600.0
        os.makedirs(self.root, mode=0o700, exist_ok=True)  # volumes are private to the agent
        #: made with the first snapshot
        self.snapshots_root = os.path.join(self.root, SNAPSHOTS)
        self._clean_temporaries()

    def _clean_temporaries(self):
        try:
            dirs = [self.root] + [os.path.join(self.snapshots_root, d)
                                  for d in os.listdir(self.snapshots_root)]
        except FileNotFoundError:
            dirs = [self.root]
        for d in dirs:
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                if name.startswith(".tmp-"):
                    try:
                        os.unlink(os.path.join(d, name))
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
        if volume_id in self._busy:
            raise Conflict(f"volume {volume_id!r} is being {self._busy[volume_id]}; "
                           "try again once that is done")
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
        fsync_path(self.root)

    def _synced(self):
        """
        The store's directory fsynced in the reactor's thread pool (a directory's fsync
        waits for the file system's journal, which a busy disk, its VMs' among others,
        makes long): a Deferred.
        """
        return self._threads(self._fsync_dir)

    def delete(self, volume_id, snapshots="refuse"):
        """
        Delete a volume.

        @param snapshots: what of the volume's snapshots here: C{"refuse"} the deletion
            while there are some; C{"keep"} them (a copy that is not the volume: the blank
            copy of an incoming live migration, a drain's copy rolled back, a recovery
            undone; the snapshots there, replicas of it, or copies the drain deletes by
            their ids, are not the copy's).
        @return: a Deferred that fires once the deletion is on disk (the directory
            fsynced); the volume is gone from the store at once.
        @raise NotFound: no such volume. @raise Conflict: a machine has claimed it, or it
            has snapshots (both at once, nothing changed).
        """
        if snapshots not in ("refuse", "keep"):
            raise InvalidArgument(f"snapshots must be refuse or keep, not {snapshots!r}")
        p = self.existing_path(volume_id)
        owner = self._claims.get(volume_id)
        if owner is not None:
            raise Conflict(
                f"volume {volume_id!r} is used by machine {owner!r}; destroy the machine first"
            )
        self._idle(volume_id)
        left = self.snapshots(volume_id)
        if left and snapshots == "refuse":
            raise Conflict(f"volume {volume_id!r} has {len(left)} snapshot(s) on this host; "
                           "delete them first")
        os.unlink(p)
        try:
            os.rmdir(self._snapshot_dir(volume_id))
        except OSError:
            pass
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

    # --- snapshots ---------------------------------------------------------------------

    def _snapshot_dir(self, volume_id):
        return os.path.join(self.snapshots_root, check_id(volume_id, "volume id"))

    def _snapshot_path(self, volume_id, snapshot_id):
        return os.path.join(self._snapshot_dir(volume_id),
                            check_id(snapshot_id, "snapshot id") + ".img")

    def _idle(self, volume_id):
        """@raise Conflict: while the volume is snapshotted at rest or restored."""
        if volume_id in self._busy:
            raise Conflict(f"volume {volume_id!r} is being {self._busy[volume_id]}; "
                           "try again once that is done")

    def snapshot_info(self, volume_id, snapshot_id):
        """
        @return: C{{id, volume_id, size_bytes, allocated_bytes, path}}.
        @raise NotFound: no such snapshot.
        """
        p = self._snapshot_path(volume_id, snapshot_id)
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise NotFound(f"no snapshot {snapshot_id!r} of volume {volume_id!r} on this "
                           "host") from None
        return {"id": snapshot_id, "volume_id": volume_id, "size_bytes": st.st_size,
                "allocated_bytes": st.st_blocks * 512, "path": p}

    def snapshots(self, volume_id=None):
        """@return: the L{snapshot_info} of every snapshot (of C{volume_id} if given)."""
        if volume_id is not None:
            volumes = [volume_id]
        elif os.path.isdir(self.snapshots_root):
            volumes = sorted(os.listdir(self.snapshots_root))
        else:
            volumes = []
        out = []
        for vid in volumes:
            try:
                names = sorted(os.listdir(self._snapshot_dir(vid)))
            except (OSError, InvalidArgument):
                continue
            for name in names:
                if name.endswith(".img") and not name.startswith("."):
                    try:
                        out.append(self.snapshot_info(vid, name[:-4]))
                    except (NotFound, InvalidArgument, OSError):
                        continue
        return out

    def _room_for(self, volume_id, nbytes):
        free = self.free_mb()
        need = -(-nbytes // (1024 * 1024))
        if free < need + self.reserve_mb:
            raise ResourceExhausted(
                f"not enough disk to copy volume {volume_id!r}: {need} MiB of data, {free} MiB "
                f"free (of which {self.reserve_mb} MiB are kept in reserve)")

    def _snapshot_tmp(self, volume_id):
        d = self._snapshot_dir(volume_id)
        os.makedirs(self.snapshots_root, mode=0o700, exist_ok=True)
        os.makedirs(d, mode=0o700, exist_ok=True)
        return os.path.join(d, f".tmp-{uuid.uuid4().hex[:12]}.img")

    async def _copy(self, volume_id, src, dst):
        """Copy C{src} to the new file C{dst} (sparse, reflinked where the file system can)."""
        try:
            result = await process.run(
                self.reactor, ["cp", "--sparse=always", "--reflink=auto", src, dst],
                timeout=self.copy_timeout)
        except OSError as e:
            raise Unavailable(f"cannot copy volume {volume_id!r}: {e}") from None
        if result.timed_out or result.code != 0:
            out = result.output.decode("utf-8", "replace")
            if "No space left" in out or "quota exceeded" in out:
                raise ResourceExhausted(f"the disk filled up while copying volume "
                                        f"{volume_id!r}")
            why = "timed out" if result.timed_out else (result.last_line() or repr(result))
            raise Unavailable(f"cannot copy volume {volume_id!r}: {why}")
        os.chmod(dst, 0o600)
        await self._threads(fsync_path, dst)

    async def _verify(self, volume_id, a, b):
        """@raise Unavailable: unless files C{a} and C{b} hold the same data."""
        try:  # both at once, in two threads (the hashes and reads release the GIL)
            da, db = await gatherResults([self._threads(file_digest, a),
                                          self._threads(file_digest, b)], consumeErrors=True)
        except FirstError as e:
            e.subFailure.raiseException()
        if da != db:
            raise Unavailable(f"the copy of volume {volume_id!r} differs from what it was "
                              f"copied from ({db} instead of {da}); nothing was changed")

    def snapshot(self, volume_id, snapshot_id, backup=None, idle_owner=None):
        """
        Make snapshot C{snapshot_id} of the volume.

        @param backup: L{None} to copy the volume at rest (no machine may claim it
            meanwhile; the copy is verified against it), or C{backup(target) -> Deferred}
            that makes C{target} a copy of the volume of a running machine (its driver's
            L{zwrm.interfaces.IVolumeBackup.backup_volume}).
        @param idle_owner: the machine that claims the volume but is down (its process
            ended), whose volume may be copied at rest.
        @return: the snapshot's L{snapshot_info}, once it is on disk.
        @raise NotFound: no such volume. @raise Conflict: the snapshot exists, or the
            volume is busy (being snapshotted at rest or restored, or, without
            C{backup}, claimed by a machine). @raise ResourceExhausted: no room for the copy.
        """
        return ensureDeferred(self._take_snapshot(volume_id, snapshot_id, backup, idle_owner))

    async def _take_snapshot(self, volume_id, snapshot_id, backup, idle_owner):
        src = self.existing_path(volume_id)
        target = self._snapshot_path(volume_id, snapshot_id)
        if os.path.exists(target):
            raise Conflict(f"snapshot {snapshot_id!r} of volume {volume_id!r} exists already")
        self._idle(volume_id)
        owner = self._claims.get(volume_id)
        if backup is None and owner is not None and owner != idle_owner:
            raise Conflict(f"volume {volume_id!r} is used by machine {owner!r}")
        self._room_for(volume_id, os.stat(src).st_blocks * 512)
        tmp = self._snapshot_tmp(volume_id)
        if backup is None:
            self._busy[volume_id] = "snapshotted"
        try:
            if backup is None:
                await self._copy(volume_id, src, tmp)
                await self._verify(volume_id, src, tmp)
            else:
                await backup(tmp)
            if os.path.exists(target):
                raise Conflict(f"snapshot {snapshot_id!r} of volume {volume_id!r} exists "
                               "already")
            os.rename(tmp, target)
            await self._threads(fsync_path, os.path.dirname(target))
        finally:
            if backup is None:
                self._busy.pop(volume_id, None)
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("volume {id}: snapshot {snap} made ({how})", id=volume_id, snap=snapshot_id,
                 how="at rest" if backup is None else "while its machine runs")
        return self.snapshot_info(volume_id, snapshot_id)

    def restore(self, volume_id, snapshot_id, keep_id, idle_owner=None):
        """
        Put the data of snapshot C{snapshot_id} back into the volume; what the volume held
        becomes snapshot C{keep_id}. The snapshot is copied and the copy verified before
        anything is renamed: a failure leaves the volume as it was.

        @param idle_owner: the machine that claims the volume but is down (its process
            ended), which does not stop the restore.
        @return: C{{"volume", "kept"}}: the volume's L{info} and the L{snapshot_info} of
            C{keep_id}.
        @raise NotFound: no such volume or snapshot. @raise Conflict: a machine claims the
            volume, it is busy, or C{keep_id} exists. @raise ResourceExhausted: no room
            for the copy.
        """
        return ensureDeferred(self._restore(volume_id, snapshot_id, keep_id, idle_owner))

    async def _restore(self, volume_id, snapshot_id, keep_id, idle_owner):
        vol = self.existing_path(volume_id)
        snap = self.snapshot_info(volume_id, snapshot_id)["path"]
        keep = self._snapshot_path(volume_id, keep_id)
        owner = self._claims.get(volume_id)
        if owner is not None and owner != idle_owner:
            raise Conflict(f"volume {volume_id!r} is used by machine {owner!r}; it can be "
                           "restored only while no machine uses it")
        self._idle(volume_id)
        if os.path.exists(keep):
            raise Conflict(f"snapshot {keep_id!r} of volume {volume_id!r} exists already")
        self._room_for(volume_id, os.stat(snap).st_blocks * 512)
        self._busy[volume_id] = "restored"
        tmp = self.temporary_path(volume_id)
        try:
            await self._copy(volume_id, snap, tmp)
            await self._verify(volume_id, snap, tmp)
            # The volume's data gets a second name first, then the copy replaces the
            # volume in one rename: at every moment the volume's file is whole, the old
            # data or the restored, and a crash in between leaves it as it was.
            os.link(vol, keep)
            try:
                os.rename(tmp, vol)
            except OSError:
                os.unlink(keep)
                raise
            await self._threads(fsync_path, os.path.dirname(keep))
            await self._synced()
        finally:
            self._busy.pop(volume_id, None)
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("volume {id}: restored from snapshot {snap} (what it held is snapshot "
                 "{keep})", id=volume_id, snap=snapshot_id, keep=keep_id)
        return {"volume": self.info(volume_id),
                "kept": self.snapshot_info(volume_id, keep_id)}

    def snapshot_slot(self, volume_id, snapshot_id):
        """
        Where a copy of snapshot C{snapshot_id} of volume C{volume_id} streamed from
        another host (a drain moving the volume with its snapshots) is written and then
        adopted: a L{SnapshotSlot}, which the volume receiver uses as it uses the store.
        """
        check_id(volume_id, "volume id")
        check_id(snapshot_id, "snapshot id")
        return SnapshotSlot(self, volume_id, snapshot_id)

    def recover(self, volume_id, snapshot_id):
        """
        Make volume C{volume_id}, which is not on this host, from its snapshot
        C{snapshot_id} here (a copy another host's volume replicated here, its host lost):
        the snapshot is copied, the copy verified against it, then adopted as the volume.
        The snapshot stays.

        @return: a Deferred of the volume's L{info}.
        @raise Conflict: the volume is here already. @raise NotFound: no such snapshot.
        @raise ResourceExhausted: no room for the copy.
        """
        return ensureDeferred(self._recover(volume_id, snapshot_id))

    async def _recover(self, volume_id, snapshot_id):
        snap = self.snapshot_info(volume_id, snapshot_id)["path"]
        if self.exists(volume_id) or volume_id in self._creating:
            raise Conflict(f"volume {volume_id!r} exists already on this host")
        self._idle(volume_id)
        self._room_for(volume_id, os.stat(snap).st_blocks * 512)
        self._busy[volume_id] = "recovered"
        tmp = self.temporary_path(volume_id)
        try:
            await self._copy(volume_id, snap, tmp)
            await self._verify(volume_id, snap, tmp)
            info = await self.adopt(volume_id, tmp)
        finally:
            self._busy.pop(volume_id, None)
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("volume {id}: recovered from its snapshot {snap}", id=volume_id,
                 snap=snapshot_id)
        return info

    def delete_snapshot(self, volume_id, snapshot_id):
        """
        Delete a snapshot. @return: a Deferred firing once that is on disk.
        @raise NotFound: no such snapshot. @raise Conflict: its volume is being restored.
        """
        p = self.snapshot_info(volume_id, snapshot_id)["path"]
        if self._busy.get(volume_id) == "restored":
            self._idle(volume_id)
        os.unlink(p)
        log.info("volume {id}: snapshot {snap} deleted", id=volume_id, snap=snapshot_id)
        d = self._threads(fsync_path, os.path.dirname(p))
        if not self.exists(volume_id):
            # Copies a drain brought here for a volume that never came (rolled back): no
            # empty directory stays behind them.
            def tidy(_):
                try:
                    os.rmdir(os.path.dirname(p))
                except OSError:
                    pass  # another snapshot is there, or one is being received
            d.addCallback(tidy)
        return d

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


class SnapshotSlot:
    """
    One snapshot of a volume, as the volume receiver sees a store
    (L{zwrm.agent.transfer.receiver.VolumeReceiver}): whether it C{exists}, where its copy
    is written (C{temporary_path}, in the store's directory, 0700) and its C{adopt}ion
    (into the volume's snapshot directory, 0700, made then: a rename that never replaces
    a snapshot, then the directory fsynced). The volume itself need not be on this host: a
    drain copies its snapshots before it.
    """

    def __init__(self, store, volume_id, snapshot_id):
        self._store = store
        self.volume_id = volume_id
        self.snapshot_id = snapshot_id
        self.path = store._snapshot_path(volume_id, snapshot_id)

    def __repr__(self):
        return f"<snapshot {self.snapshot_id} of volume {self.volume_id}>"

    def exists(self, volume_id):
        return os.path.exists(self.path)

    def in_use(self, volume_id):
        return False  # a snapshot is never claimed

    def temporary_path(self, volume_id):
        # In the store's directory (its file system; removed at the store's next start if
        # never adopted): the snapshot's directory is made only when a copy is adopted.
        return self._store.temporary_path(volume_id)

    def adopt(self, volume_id, tmp_path):
        if os.path.exists(self.path):
            raise Conflict(f"snapshot {self.snapshot_id!r} of volume {volume_id!r} exists "
                           "already")
        os.chmod(tmp_path, 0o600)
        os.makedirs(self._store.snapshots_root, mode=0o700, exist_ok=True)
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        os.rename(tmp_path, self.path)
        log.info("volume {id}: snapshot {snap} received", id=volume_id, snap=self.snapshot_id)
        return self._store._threads(fsync_path, os.path.dirname(self.path)).addCallback(
            lambda _: self._store.snapshot_info(volume_id, self.snapshot_id))
