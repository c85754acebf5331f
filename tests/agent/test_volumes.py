"""
VolumeStore: real ext4 images made by a real mkfs.ext4.
"""

import os
import shutil
import stat
import tempfile
import threading

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from zwrm.agent.volumes import VolumeStore
from zwrm.drivers import process
from zwrm.errors import Conflict, InvalidArgument, NotFound, ResourceExhausted, Unavailable


class _Filtered:
    """The entries of a list that C{pick} maps to something, as they are now."""

    def __init__(self, entries, pick):
        self.entries, self.pick = entries, pick

    def __iter__(self):
        return iter([x for x in map(self.pick, self.entries) if x is not None])


class VolumeStoreTests(TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="zwrm-vol-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.store = VolumeStore(reactor, self.root)

    def fake_mkfs(self, script):
        path = os.path.join(self.root, "..", os.path.basename(self.root) + "-mkfs")
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + script + "\n")
        os.chmod(path, stat.S_IRWXU)
        self.addCleanup(os.unlink, path)
        return path

    def directory_fsyncs(self):
        """The threads that fsync the store's directory from now on, as a list."""
        synced = []
        real_fsync = os.fsync

        def fsync(fd):
            synced.append((threading.current_thread(), os.path.realpath(f"/proc/self/fd/{fd}")))
            return real_fsync(fd)

        self.patch(os, "fsync", fsync)
        root = os.path.realpath(self.root)
        return _Filtered(synced, lambda e: e[0] if e[1] == root else None)

    async def test_create_delete_and_adopt_fsync_the_directory_in_a_thread(self):
        """A volume's directory entry is fsynced off the reactor's thread, and awaited."""
        for what in ("create", "delete", "adopt"):
            if what == "adopt":
                tmp = self.store.temporary_path("v1")
                with open(tmp, "wb") as f:
                    f.write(b"x" * 4096)
            dirs = self.directory_fsyncs()
            if what == "create":
                d = self.store.create("v1", 32)
            elif what == "delete":
                d = self.store.delete("v1")
                self.assertFalse(self.store.exists("v1"))  # gone at once
            else:
                d = self.store.adopt("v1", tmp)
                self.assertTrue(self.store.exists("v1"))  # there at once
            self.assertNotIn(threading.current_thread(), list(dirs), what)
            await d
            self.assertEqual(len(list(dirs)), 1, what)
            self.assertIsNot(list(dirs)[0], threading.current_thread(), what)

    async def test_create_makes_sparse_ext4(self):
        info = await self.store.create("v1", 32)
        self.assertEqual(info["id"], "v1")
        self.assertEqual(info["size_mb"], 32)
        self.assertEqual(info["size_bytes"], 32 * 1024 * 1024)
        self.assertLess(info["allocated_bytes"], info["size_bytes"])  # sparse
        self.assertGreater(info["allocated_bytes"], 0)
        self.assertIsNone(info["in_use_by"])
        self.assertEqual(info["path"], os.path.join(self.root, "v1.img"))
        result = await process.run(reactor, ["dumpe2fs", "-h", info["path"]], timeout=30)
        self.assertEqual(result.code, 0, result.output)
        self.assertIn(b"Filesystem volume name:   v1", result.output)
        self.assertIn(b"clean", result.output)
        self.assertEqual([v["id"] for v in self.store.list()], ["v1"])
        self.assertEqual(self.store.info("v1"), info)
        self.assertEqual(os.listdir(self.root), ["v1.img"])  # no temporaries left

    async def test_create_twice_conflicts(self):
        await self.store.create("v1", 8)
        with self.assertRaises(Conflict):
            await self.store.create("v1", 8)

    async def test_bad_arguments(self):
        for vid, size in (("v1", 0), ("v1", 1), ("v1", "8"), ("v1", True), ("v1", 2**40),
                          ("../x", 8), ("", 8), ("a b", 8)):
            with self.assertRaises(InvalidArgument, msg=(vid, size)):
                await self.store.create(vid, size)
        self.assertEqual(self.store.list(), [])

    async def test_not_enough_disk(self):
        store = VolumeStore(reactor, self.root, reserve_mb=10**12)
        with self.assertRaises(ResourceExhausted) as cm:
            await store.create("v1", 8)
        self.assertIn("MiB free", cm.exception.message)
        self.assertEqual(os.listdir(self.root), [])

    async def test_mkfs_reports_full_disk(self):
        mkfs = self.fake_mkfs('echo "$5: No space left on device while writing" >&2; exit 1')
        store = VolumeStore(reactor, self.root, mkfs=mkfs)
        with self.assertRaises(ResourceExhausted):
            await store.create("v1", 8)
        self.assertEqual(os.listdir(self.root), [])

    async def test_mkfs_failure_is_clear(self):
        mkfs = self.fake_mkfs('echo "mkfs.ext4: Device size reported to be zero." >&2; exit 1')
        store = VolumeStore(reactor, self.root, mkfs=mkfs)
        with self.assertRaises(Unavailable) as cm:
            await store.create("v1", 8)
        self.assertIn("Device size reported to be zero", cm.exception.message)
        self.assertEqual(os.listdir(self.root), [])
        store = VolumeStore(reactor, self.root, mkfs="/nonexistent/mkfs.ext4")
        with self.assertRaises(Unavailable):
            await store.create("v1", 8)

    async def test_claimed_volume_is_never_deleted(self):
        await self.store.create("v1", 8)
        self.store.claim("v1", "m1")
        self.assertEqual(self.store.in_use("v1"), "m1")
        self.assertEqual(self.store.info("v1")["in_use_by"], "m1")
        self.assertRaises(Conflict, self.store.delete, "v1")
        self.assertRaises(Conflict, self.store.claim, "v1", "m2")
        self.store.claim("v1", "m1")  # idempotent
        self.store.release("v1", "m2")  # not the holder: no effect
        self.assertEqual(self.store.in_use("v1"), "m1")
        self.assertTrue(os.path.exists(self.store.path("v1")))
        self.store.release("v1", "m1")
        self.assertIsNone(self.store.in_use("v1"))
        await self.store.delete("v1")
        self.assertFalse(os.path.exists(self.store.path("v1")))
        self.assertRaises(NotFound, self.store.delete, "v1")
        self.assertRaises(NotFound, self.store.info, "v1")
        self.assertRaises(NotFound, self.store.claim, "v1", "m1")

    async def test_path_and_adopt(self):
        p = self.store.path("v9")
        self.assertEqual(p, os.path.join(self.root, "v9.img"))  # even before it exists
        self.assertFalse(self.store.exists("v9"))
        tmp = self.store.temporary_path("v9")
        with open(tmp, "wb") as f:
            f.write(b"x" * 4096)
        info = await self.store.adopt("v9", tmp)
        self.assertEqual(info["size_bytes"], 4096)
        self.assertFalse(os.path.exists(tmp))
        tmp2 = self.store.temporary_path("v9")
        with open(tmp2, "wb") as f:
            f.write(b"y")
        self.assertRaises(Conflict, self.store.adopt, "v9", tmp2)
        with open(p, "rb") as f:
            self.assertEqual(f.read(1), b"x")  # not overwritten
        self.assertRaises(InvalidArgument, self.store.adopt, "v8", "/nonexistent")
        # Temporaries never adopted are removed when the store starts again.
        VolumeStore(reactor, self.root)
        self.assertEqual(os.listdir(self.root), ["v9.img"])


class VolumeSnapshotTests(TestCase):
    """Snapshots of real ext4 volumes: copies at rest, through a backup, and restores."""

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="zwrm-vol-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.store = VolumeStore(reactor, self.root)

    def scribble(self, volume_id, text, offset=4 << 20):
        with open(self.store.path(volume_id), "r+b") as f:
            f.seek(offset)
            f.write(text)

    def read(self, path, offset=4 << 20, length=5):
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    async def test_snapshot_at_rest_then_restore_keeps_what_the_volume_held(self):
        await self.store.create("v1", 8)
        self.scribble("v1", b"first")
        info = await self.store.snapshot("v1", "s1")
        self.assertEqual((info["id"], info["volume_id"], info["size_bytes"]),
                         ("s1", "v1", 8 << 20))
        self.assertEqual(self.read(info["path"]), b"first")
        self.assertEqual(os.stat(info["path"]).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(os.path.dirname(info["path"])).st_mode & 0o777, 0o700)
        self.assertEqual(os.stat(self.store.snapshots_root).st_mode & 0o777, 0o700)
        self.assertLess(info["allocated_bytes"], 8 << 20)  # sparse
        with self.assertRaises(Conflict):
            await self.store.snapshot("v1", "s1")

        self.scribble("v1", b"later")
        got = await self.store.restore("v1", "s1", "k1")
        self.assertEqual(self.read(self.store.path("v1")), b"first")
        self.assertEqual(got["kept"]["id"], "k1")
        self.assertEqual(self.read(got["kept"]["path"]), b"later")
        self.assertEqual(got["volume"]["id"], "v1")
        self.assertEqual([s["id"] for s in self.store.snapshots("v1")], ["k1", "s1"])
        self.assertEqual([s["id"] for s in self.store.snapshots()], ["k1", "s1"])
        self.assertEqual([v["id"] for v in self.store.list()], ["v1"])
        with self.assertRaises(Conflict):
            await self.store.restore("v1", "s1", "k1")  # k1 is taken

        self.assertRaises(Conflict, self.store.delete, "v1")  # its snapshots first
        await self.store.delete_snapshot("v1", "k1")
        await self.store.delete_snapshot("v1", "s1")
        self.assertRaises(NotFound, self.store.delete_snapshot, "v1", "s1")
        await self.store.delete("v1")
        self.assertEqual(self.store.snapshots(), [])
        self.assertEqual(os.listdir(self.store.snapshots_root), [])

    async def test_a_snapshot_received_from_another_host_is_adopted_into_its_slot(self):
        """
        A drain streams a volume's snapshots before the volume: the receiver writes each
        into its slot's temporary file and adopts it there, with no volume here yet.
        """
        slot = self.store.snapshot_slot("v1", "s1")
        self.assertFalse(slot.exists("v1"))
        self.assertFalse(slot.in_use("v1"))
        tmp = slot.temporary_path("v1")
        self.assertFalse(os.path.exists(self.store.snapshots_root))  # made by the adoption
        with open(tmp, "wb") as f:
            f.write(b"copied")
        info = await slot.adopt("v1", tmp)
        self.assertEqual((info["id"], info["volume_id"], info["size_bytes"]), ("s1", "v1", 6))
        self.assertEqual(os.stat(info["path"]).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(os.path.dirname(info["path"])).st_mode & 0o777, 0o700)
        self.assertTrue(slot.exists("v1"))
        self.assertFalse(self.store.exists("v1"))
        other = slot.temporary_path("v1")
        with open(other, "wb") as f:
            f.write(b"again")
        self.assertRaises(Conflict, slot.adopt, "v1", other)  # never replaced
        with open(info["path"], "rb") as f:
            self.assertEqual(f.read(), b"copied")
        self.assertRaises(InvalidArgument, self.store.snapshot_slot, "v1", "../s2")
        # a temporary file never adopted is removed at the store's next start
        VolumeStore(reactor, self.root)
        self.assertEqual(sorted(os.listdir(os.path.dirname(info["path"]))), ["s1.img"])
        self.assertEqual(sorted(os.listdir(self.root)), ["snapshots"])

    async def test_a_volume_is_recovered_from_its_replica_here(self):
        """
        A replica (a snapshot of a volume another host holds, streamed here) becomes the
        volume once that host is lost: copied, verified, adopted; the replica stays.
        """
        other = VolumeStore(reactor, tempfile.mkdtemp(prefix="zwrm-vol-", dir=self.root))
        await other.create("v1", 8)
        with open(other.path("v1"), "r+b") as f:
            f.seek(4 << 20)
            f.write(b"data!")
        await other.snapshot("v1", "s1")
        slot = self.store.snapshot_slot("v1", "r1")
        tmp = slot.temporary_path("v1")
        shutil.copyfile(other.snapshot_info("v1", "s1")["path"], tmp)
        await slot.adopt("v1", tmp)

        info = await self.store.recover("v1", "r1")
        self.assertEqual((info["id"], info["size_bytes"]), ("v1", 8 << 20))
        self.assertEqual(self.read(self.store.path("v1")), b"data!")
        self.assertEqual(os.stat(self.store.path("v1")).st_mode & 0o777, 0o600)
        self.assertEqual([s["id"] for s in self.store.snapshots("v1")], ["r1"])
        with self.assertRaises(Conflict):
            await self.store.recover("v1", "r1")  # never over a volume
        with self.assertRaises(NotFound):
            await self.store.recover("v2", "r1")
        self.assertEqual(sorted(os.listdir(self.root)), sorted(["snapshots", "v1.img",
                                                                 os.path.basename(other.root)]))
        # undone (its recovery not stored): the volume goes, the replica stays
        self.assertRaises(InvalidArgument, self.store.delete, "v1", "sometimes")
        await self.store.delete("v1", snapshots="keep")
        self.assertFalse(self.store.exists("v1"))
        self.assertEqual([s["id"] for s in self.store.snapshots("v1")], ["r1"])

    async def test_claims_and_snapshots_at_rest_exclude_each_other(self):
        await self.store.create("v1", 8)
        await self.store.snapshot("v1", "s1")
        self.store.claim("v1", "m1")
        with self.assertRaises(Conflict):
            await self.store.snapshot("v1", "s2")
        with self.assertRaises(Conflict):
            await self.store.restore("v1", "s1", "k1")
        self.store.release("v1", "m1")
        d = self.store.snapshot("v1", "s2")  # copying: no machine may start with it
        self.assertRaises(Conflict, self.store.claim, "v1", "m1")
        with self.assertRaises(Conflict):
            await self.store.restore("v1", "s1", "k1")
        await d
        d = self.store.restore("v1", "s1", "k1")
        self.assertRaises(Conflict, self.store.claim, "v1", "m1")
        await d
        self.store.claim("v1", "m1")

    async def test_a_running_machine_s_volume_is_copied_by_its_backup(self):
        await self.store.create("v1", 8)
        self.scribble("v1", b"first")
        self.store.claim("v1", "m1")
        targets = []

        async def backup(target):
            targets.append(target)
            shutil.copyfile(self.store.path("v1"), target)

        info = await self.store.snapshot("v1", "s1", backup=backup)
        self.assertEqual(self.read(info["path"]), b"first")
        [target] = targets
        self.assertEqual(os.path.dirname(target), os.path.dirname(info["path"]))

        async def broken(target):
            with open(target, "wb") as f:
                f.write(b"half")
            raise Unavailable("the hypervisor failed")

        with self.assertRaises(Unavailable):
            await self.store.snapshot("v1", "s2", backup=broken)
        self.assertEqual([s["id"] for s in self.store.snapshots("v1")], ["s1"])
        self.assertEqual(os.listdir(os.path.dirname(info["path"])), ["s1.img"])

    async def test_a_restore_whose_copy_differs_changes_nothing(self):
        await self.store.create("v1", 8)
        self.scribble("v1", b"first")
        await self.store.snapshot("v1", "s1")
        self.scribble("v1", b"later")
        real_copy = self.store._copy

        async def corrupting(volume_id, src, dst):
            await real_copy(volume_id, src, dst)
            with open(dst, "r+b") as f:
                f.seek(4 << 20)
                f.write(b"rot!!")

        self.store._copy = corrupting
        with self.assertRaises(Unavailable) as e:
            await self.store.restore("v1", "s1", "k1")
        self.assertIn("differs", str(e.exception))
        self.assertEqual(self.read(self.store.path("v1")), b"later")
        self.assertEqual([s["id"] for s in self.store.snapshots("v1")], ["s1"])
        self.assertEqual(sorted(os.listdir(self.root)), ["snapshots", "v1.img"])
        self.store.claim("v1", "m1")  # not left busy

    async def test_no_room_and_bad_arguments_change_nothing(self):
        await self.store.create("v1", 8)
        self.scribble("v1", b"first")
        await self.store.snapshot("v1", "s1")
        full = VolumeStore(reactor, self.root, reserve_mb=10**12)
        with self.assertRaises(ResourceExhausted):
            await full.snapshot("v1", "s2")
        with self.assertRaises(ResourceExhausted):
            await full.restore("v1", "s1", "k1")
        self.assertEqual([s["id"] for s in self.store.snapshots("v1")], ["s1"])
        with self.assertRaises(NotFound):
            await self.store.snapshot("v2", "s1")
        with self.assertRaises(NotFound):
            await self.store.restore("v1", "s9", "k1")
        with self.assertRaises(InvalidArgument):
            await self.store.snapshot("v1", "../s")
        with self.assertRaises(InvalidArgument):
            await self.store.restore("v1", "s1", "a/b")
        self.assertEqual(self.read(self.store.path("v1")), b"first")
        # A copy an agent's stop cut short is removed when the store starts again.
        with open(os.path.join(self.store.snapshots_root, "v1", ".tmp-cut.img"), "wb"):
            pass
        VolumeStore(reactor, self.root)
        self.assertEqual(os.listdir(os.path.join(self.store.snapshots_root, "v1")), ["s1.img"])

    async def test_a_restore_cut_before_its_last_rename_leaves_the_volume_whole(self):
        """
        The volume's file is never missing: its data is linked as the kept snapshot before
        the copy replaces it in one rename; a rename that fails leaves the volume as it was.
        """
        await self.store.create("v1", 8)
        self.scribble("v1", b"first")
        await self.store.snapshot("v1", "s1")
        self.scribble("v1", b"later")
        real_rename = os.rename
        seen = []

        def rename(src, dst):  # the copy's rename over the volume fails
            seen.append(os.path.exists(self.store.path("v1")))
            if dst == self.store.path("v1"):
                raise OSError(5, "Input/output error")
            return real_rename(src, dst)

        self.patch(os, "rename", rename)
        with self.assertRaises(OSError):
            await self.store.restore("v1", "s1", "k1")
        self.patch(os, "rename", real_rename)
        self.assertEqual(seen, [True])
        self.assertEqual(self.read(self.store.path("v1")), b"later")
        self.assertEqual([s["id"] for s in self.store.snapshots("v1")], ["s1"])
        self.assertEqual(sorted(os.listdir(self.root)), ["snapshots", "v1.img"])
        await self.store.restore("v1", "s1", "k1")  # not left busy
        self.assertEqual(self.read(self.store.path("v1")), b"first")
