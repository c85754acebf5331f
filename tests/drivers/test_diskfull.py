"""
L{zwrm.drivers.diskfull}: the watch that resumes a machine paused on a full disk, and the
QEMU driver's reading of QEMU's C{BLOCK_IO_ERROR}.  (The whole path, a real guest meeting
a real full file system, is in the driver contract: tests/drivers/contract.py.)
"""

import errno
import json
import os
import shutil
import tempfile

from twisted.internet import task
from twisted.internet.defer import fail, succeed
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from zwrm.drivers import diskfull
from zwrm.drivers.qemu import QemuDriver, _Machine
from zwrm.errors import ResourceExhausted
from zwrm.files import Reserve
from zwrm.testing.disks import fill_disk, small_disk

MIB = 1 << 20


class RoomWatchTests(TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.free = {"/a": 0, "/b": 0}
        self.resumed = []
        self.result = succeed(None)

    def free_bytes(self, path):
        value = self.free[path]
        if isinstance(value, Exception):
            raise value
        return value

    def resume(self):
        self.resumed.append(self.clock.seconds())
        return self.result

    def watch(self):
        w = diskfull.RoomWatch(self.clock, 5.0, ["/a", "/b"], self.free_bytes, self.resume,
                               "vm")
        w.start()
        return w

    def test_resumes_once_every_file_system_has_room(self):
        self.watch()
        self.clock.advance(5)
        self.assertEqual(self.resumed, [])
        self.free["/a"] = diskfull.RESUME_FREE_BYTES  # one has room, the other not
        self.clock.advance(5)
        self.assertEqual(self.resumed, [])
        self.free["/b"] = diskfull.RESUME_FREE_BYTES - 1  # just short
        self.clock.advance(5)
        self.assertEqual(self.resumed, [])
        self.free["/b"] = diskfull.RESUME_FREE_BYTES
        self.clock.advance(4.9)
        self.assertEqual(self.resumed, [])  # only at the next look
        self.clock.advance(0.1)
        self.assertEqual(self.resumed, [20.0])

    def test_a_file_system_that_cannot_be_read_has_no_room(self):
        self.watch()
        self.free["/a"] = 100 * MIB
        self.free["/b"] = OSError(errno.EIO, "I/O error")
        self.clock.advance(5)
        self.assertEqual(self.resumed, [])

    def test_a_failed_resume_is_logged_and_tried_again(self):
        self.watch()
        self.free.update({"/a": 100 * MIB, "/b": 100 * MIB})
        self.result = fail(RuntimeError("QMP went away"))
        self.clock.advance(5)
        self.assertEqual(self.resumed, [5.0])
        self.assertEqual(len(self.flushLoggedErrors()), 0)  # a warning, not a traceback
        self.result = succeed(None)
        self.clock.advance(5)
        self.assertEqual(self.resumed, [5.0, 10.0])

    def test_stopped_it_looks_no_more(self):
        w = self.watch()
        self.free.update({"/a": 100 * MIB, "/b": 100 * MIB})
        w.stop()
        self.clock.advance(60)
        self.assertEqual(self.resumed, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reason_names_the_disk(self):
        self.assertEqual(
            diskfull.paused_reason("data", "/var/lib/zwrm/volumes/data.img"),
            "paused: disk data (/var/lib/zwrm/volumes/data.img) met a full file system on "
            "this host (no space left on device); it resumes by itself once there are 64 MiB "
            "free")


class _QemuMachine(TestCase):
    """A QEMU driver (on a task.Clock) with one running machine, its QEMU not started."""

    def setUp(self):
        self.clock = task.Clock()
        self.root = tempfile.mkdtemp(prefix="zwrm-diskfull-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.driver = QemuDriver(self.clock, self.root, accel="tcg")
        self.seen = []
        self.driver.subscribe(self.seen.append)
        m = self.m = _Machine("vm", os.path.join(self.root, "vm"))
        os.makedirs(m.dir)
        m.spec = {"disk": "/images/base", "forwards": [],
                  "volumes": [{"id": "data", "path": "/vols/data.img"},
                              {"id": "logs", "path": "/vols/logs.img"}]}
        m.state = "running"
        self.driver._machines["vm"] = m

    def event(self, name, **data):
        self.driver._event(self.m, name, data)


class QemuBlockErrorTests(_QemuMachine):
    """What the QEMU driver makes of QEMU's events about a machine's disks."""

    def test_enospc_pauses_and_names_the_volume(self):
        self.event("BLOCK_IO_ERROR", device="vol1", nospace=True, operation="write",
                   action="stop", reason="No space left on device")
        self.event("STOP")
        st = self.driver.status("vm")
        self.assertEqual((st["state"], st["paused"]), ("running", "disk-full"))
        self.assertEqual(st["reason"], diskfull.paused_reason("logs", "/vols/logs.img"))
        self.assertEqual(self.seen[-1]["paused"], "disk-full")
        # QEMU emits one event per failed request: one report
        self.event("BLOCK_IO_ERROR", device="vol1", nospace=True, action="stop")
        self.assertEqual(len(self.seen), 1)

    def test_the_root_disk(self):
        self.event("BLOCK_IO_ERROR", device="root", nospace=True, action="stop")
        self.assertIn("disk root (" + self.m.path("root.qcow2") + ")",
                      self.driver.status("vm")["reason"])

    def test_other_errors_reach_the_guest_and_pause_nothing(self):
        logged = []
        observer = lambda e: logged.append(formatEvent(e))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.event("BLOCK_IO_ERROR", device="vol0", nospace=False, action="report",
                   operation="write", reason="Input/output error")
        self.event("BLOCK_IO_ERROR", device="vol0", nospace=True, action="report")
        self.assertIsNone(self.driver.status("vm")["paused"])
        self.assertEqual(self.seen, [])
        for _ in range(3):  # a guest that retries: each error is logged once
            self.event("BLOCK_IO_ERROR", device="vol0", nospace=False, action="report",
                       operation="write", reason="Input/output error")
        errors = [x for x in logged if "error:" in x]
        self.assertEqual(errors, [
            "machine vm: disk data: write error: Input/output error (QEMU: report)",
            "machine vm: disk data: I/O error: ? (QEMU: report)"])

    def test_resume_clears_it_and_stops_the_watch(self):
        self.event("BLOCK_IO_ERROR", device="vol0", nospace=True, action="stop")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.event("RESUME")
        st = self.driver.status("vm")
        self.assertEqual((st["paused"], st["reason"]), (None, diskfull.RESUMED))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_resume_of_a_machine_not_paused_on_its_disk_says_nothing(self):
        # (a live migration pauses and resumes machines too)
        self.event("STOP")
        self.event("RESUME")
        self.assertEqual(self.seen, [])


class _QMP:
    """What the driver asks QEMU, and QEMU's run state."""

    def __init__(self, status):
        self.status = status
        self.commands = []

    def execute(self, command, arguments=None):
        self.commands.append(command)
        return succeed({"status": self.status} if command == "query-status" else {})

    def close(self):
        pass


class QemuResumeTests(_QemuMachine):
    """The room is back: the driver continues the machine only if it is still held on it."""

    def paused(self, status):
        self.m.qmp = qmp = _QMP(status)
        self.driver.free_bytes = lambda path: 1 << 40
        self.event("BLOCK_IO_ERROR", device="vol0", nospace=True, action="stop")
        self.clock.advance(self.driver.disk_room_interval)
        return qmp

    def test_continued_from_io_error(self):
        self.assertEqual(self.paused("io-error").commands, ["query-status", "cont"])

    def test_the_reserve_is_made_again_first(self):
        # (taken by the migration record of a machine that left this full disk earlier)
        self.assertTrue(self.driver.reserve.release())
        held = []
        self.m.qmp = qmp = _QMP("io-error")
        execute = qmp.execute
        qmp.execute = lambda command, arguments=None: (
            held.append((command, self.driver.reserve.held())), execute(command, arguments))[1]
        self.driver.free_bytes = lambda path: 1 << 40
        self.event("BLOCK_IO_ERROR", device="vol0", nospace=True, action="stop")
        self.clock.advance(self.driver.disk_room_interval)
        self.assertEqual(held, [("query-status", False), ("cont", True)])

    def test_not_continued_in_another_run_state(self):
        # e.g. postmigrate: a live migration completed, its guest runs on the target
        qmp = self.paused("postmigrate")
        self.assertEqual(qmp.commands, ["query-status"])
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no more looks
        self.assertIsNone(self.m.paused)
        self.clock.advance(60)
        self.assertEqual(qmp.commands, ["query-status"])

    def test_an_incoming_migration_not_finished_is_left_to_finish_incoming(self):
        # (a target arrives in io-error when its source was paused on a full disk)
        with open(self.m.path("live.json"), "w") as f:
            json.dump({"role": "target", "phase": "incoming"}, f)
        self.assertEqual(self.paused("io-error").commands, [])

    def test_a_past_migrations_record_does_not_keep_it_paused(self):
        # (a machine that came here by a live migration keeps its record: target, resumed)
        with open(self.m.path("live.json"), "w") as f:
            json.dump({"role": "target", "phase": "resumed"}, f)
        self.assertEqual(self.paused("io-error").commands, ["query-status", "cont"])


class _Answering(_QMP):
    def __init__(self, answers):
        super().__init__(None)
        self.answers = answers

    def execute(self, command, arguments=None):
        self.commands.append(command)
        return succeed(self.answers.get(command, {}))


class LiveMigrationOnAFullDiskTests(TestCase):
    """
    A machine on a host whose disk is full (a tmpfs filled up, real ENOSPC; QEMU's answers
    recorded), with no reserve left for its migration record (the tmpfs is too small for
    one, as when an earlier migration took it): a live migration cannot start, and says
    why; a cancel still succeeds.
    """

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="zwrm-fulllive-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.root, True)
        small_disk(self, self.root, "256k")
        self.driver = QemuDriver(task.Clock(), self.root, accel="tcg")
        self.assertFalse(self.driver.reserve.held())
        m = self.m = _Machine("vm", os.path.join(self.root, "vm"))
        os.makedirs(m.dir)
        m.spec = {"disk": None, "forwards": [],
                  "volumes": [{"id": "data", "path": os.path.join(self.root, "data.img")}]}
        m.state = "running"
        self.driver._machines["vm"] = m

    def fill(self):
        fill_disk(self.root)

    async def test_a_migration_cannot_start_and_says_why(self):
        self.fill()
        self.m.qmp = qmp = _Answering({})
        target = {"host": "127.0.0.1", "nbd_port": 1, "migration_port": 2,
                  "exports": {"data": "vol0"}}
        with self.assertRaises(ResourceExhausted) as e:
            await self.driver.start_mirror("vm", target)
        self.assertEqual(e.exception.message, "machine vm: this host's disk is full: its "
                                              "migration cannot be recorded (No space left on "
                                              "device)")
        self.assertEqual(qmp.commands, [])  # nothing begun
        self.assertEqual(sorted(os.listdir(self.m.dir)), [])  # no half-written record

    async def test_a_cancel_leaves_the_reserve_alone(self):
        # (the reserve is for machines leaving; a cancelled migration's record is removed)
        self.driver.reserve = Reserve(os.path.join(self.root, ".reserve"), 64 << 10, 0)
        self.assertTrue(self.driver.reserve.refill())
        await self.test_a_cancel_succeeds_without_room_for_its_record()
        self.assertTrue(self.driver.reserve.held())

    async def test_a_cancel_succeeds_without_room_for_its_record(self):
        with open(self.m.path("live.json"), "w") as f:
            json.dump({"role": "source", "phase": "mirroring"}, f)
        self.fill()
        self.m.qmp = qmp = _Answering({"query-migrate": {"status": "none"},
                                       "query-block-jobs": [],
                                       "query-status": {"status": "io-error"}})
        self.assertEqual(await self.driver.cancel_migration("vm"), {"cancelled": True})
        self.assertNotIn("cont", qmp.commands)  # held on its disk: the room watch's to resume
        self.assertEqual(sorted(os.listdir(self.m.dir)), [])  # in no migration
