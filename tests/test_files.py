"""
Small files written whole, and the room kept for them (L{zwrm.files}), on a real file system
that fills up (a tmpfs of 1 MiB: real ENOSPC).
"""

import errno
import os
import shutil
import stat
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from zwrm.files import Reserve, write_atomically
from zwrm.testing.disks import fill_disk, free_bytes, small_disk

KiB = 1024


class FullDiskMixin:
    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="zwrm-files-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.root, True)
        small_disk(self, self.root, "1M")

    def free(self):
        return free_bytes(self.root)

    def fill(self):
        """Take every free byte left, as something else on the host would."""
        fill_disk(self.root)
        self.assertEqual(self.free(), 0)


class ReserveTests(FullDiskMixin, SynchronousTestCase):
    def test_refill_allocates_its_room(self):
        r = Reserve(os.path.join(self.root, ".reserve"), 256 * KiB, 128 * KiB)
        before = self.free()
        self.assertFalse(r.held())
        self.assertTrue(r.refill())
        self.assertTrue(r.held())
        st = os.stat(r.path)
        self.assertEqual((st.st_size, stat.S_IMODE(st.st_mode)), (256 * KiB, 0o600))
        self.assertEqual(before - self.free(), 256 * KiB)
        self.assertTrue(r.refill())  # held: nothing more taken
        self.assertEqual(before - self.free(), 256 * KiB)

    def test_refill_leaves_the_margin_alone(self):
        # 1 MiB free: the reserve and its margin do not fit.
        r = Reserve(os.path.join(self.root, ".reserve"), 256 * KiB, 896 * KiB)
        before = self.free()
        self.assertFalse(r.refill())
        self.assertFalse(r.held())
        self.assertEqual((sorted(os.listdir(self.root)), self.free()), ([], before))

    def test_refill_on_a_full_disk_leaves_nothing(self):
        r = Reserve(os.path.join(self.root, ".reserve"), 256 * KiB, 0)
        self.fill()
        self.assertFalse(r.refill())
        self.assertEqual(sorted(os.listdir(self.root)), ["filler"])

    def test_release(self):
        r = Reserve(os.path.join(self.root, ".reserve"), 256 * KiB, 0)
        r.refill()
        before = self.free()
        self.assertTrue(r.release())
        self.assertEqual(self.free() - before, 256 * KiB)
        self.assertFalse(r.held())
        self.assertFalse(r.release())  # nothing left to give


class WriteAtomicallyTests(FullDiskMixin, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.path = os.path.join(self.root, "record.json")
        write_atomically(self.path, "old")
        self.reserve = Reserve(os.path.join(self.root, ".reserve"), 64 * KiB, 0)
        self.assertTrue(self.reserve.refill())

    def test_written_whole_and_private(self):
        write_atomically(self.path, "new", sync=True)
        with open(self.path) as f:
            self.assertEqual(f.read(), "new")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(self.root)), [".reserve", "record.json"])

    def test_a_full_disk_without_a_reserve_changes_nothing(self):
        self.fill()
        with self.assertRaises(OSError) as e:
            write_atomically(self.path, "new")
        self.assertEqual(e.exception.errno, errno.ENOSPC)
        with open(self.path) as f:
            self.assertEqual(f.read(), "old")
        self.assertEqual(sorted(os.listdir(self.root)), [".reserve", "filler", "record.json"])

    def test_a_full_disk_takes_the_reserve(self):
        self.fill()
        write_atomically(self.path, "new", sync=True, reserve=self.reserve)
        with open(self.path) as f:
            self.assertEqual(f.read(), "new")
        self.assertFalse(self.reserve.held())
        self.assertEqual(sorted(os.listdir(self.root)), ["filler", "record.json"])
        # Once given up, it is not there for the next one.
        self.fill()
        with self.assertRaises(OSError) as e:
            write_atomically(self.path, "newer", reserve=self.reserve)
        self.assertEqual(e.exception.errno, errno.ENOSPC)
        with open(self.path) as f:
            self.assertEqual(f.read(), "new")

    def test_other_errors_keep_the_reserve(self):
        with self.assertRaises(OSError) as e:
            write_atomically(os.path.join(self.root, "no", "such"), "x", reserve=self.reserve)
        self.assertEqual(e.exception.errno, errno.ENOENT)
        self.assertTrue(self.reserve.held())
