"""
The contract test suite of L{zwrm.interfaces.IHypervisorDriver}.

L{make_driver_tests} builds a TestCase class from a fixture describing one implementation;
tests/drivers/test_contract.py runs it against the QEMU driver (real VMs) and the fake.

A fixture provides:
 - C{make(testcase, root, boot_id=None)}: a new driver whose machines live under C{root}; a
   second call with the same C{root} is "the same host after an agent restart" (with another
   C{boot_id}: after the host restarted too);
 - C{spec(testcase, machine_id)}: a valid machine spec;
 - C{kill(driver, machine_id, pid)}: end the machine's process as C{kill -9} would;
 - C{boot_output}: a str the console shows once the guest is up;
 - C{volume_backup} (optional, default C{True}): whether the driver provides
   L{zwrm.interfaces.IVolumeBackup} (copies of a running machine's volumes);
 - C{full_disk_spec(testcase, machine_id)}: a spec whose volume C{data} lives on a file
   system with little room (undone at the test's end), C{fill_disk(driver, machine_id)}:
   its guest writes more than that room (or starts to), C{make_room(testcase)}: the file
   system gets room, and C{filled_output}: what the console shows once the write is done.
"""

import os
import shutil
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from zwrm.drivers.boot import ENDED_WITH_THE_HOST
from zwrm.errors import Conflict, InvalidArgument, NotFound
from zwrm.interfaces import MACHINE_STATES, IHypervisorDriver, IVolumeBackup


async def poll(predicate, timeout=30.0, interval=0.05, what="condition"):
    """Wait until C{predicate()} is true, for at most C{timeout} seconds."""
    waited = 0.0
    while True:
        value = predicate()
        if value:
            return value
        if waited >= timeout:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await deferLater(reactor, interval, lambda: None)
        waited += interval


async def poll_console(driver, machine_id, text, timeout=60.0):
    """Wait until the machine's console shows C{text}; return the console."""
    found = []

    async def shown():
        found[:] = [await driver.console(machine_id)]
        return text in found[0]

    waited = 0.0
    while not await shown():
        if waited >= timeout:
            raise AssertionError(f"{text!r} not on the console within {timeout} s: "
                                 f"{found[0][-500:]!r}")
        await deferLater(reactor, 0.1, lambda: None)
        waited += 0.1
    return found[0]


def make_driver_tests(fixture):
    class DriverContractTests(TestCase):
        timeout = 120

        def setUp(self):
            self.root = tempfile.mkdtemp(prefix="zwrm-drv-", dir="/tmp")
            self.drivers = []
            self.addCleanup(shutil.rmtree, self.root, True)

        async def _cleanup(self):
            for drv in self.drivers:
                for mid in list(drv.list()):
                    await drv.destroy(mid)

        def driver(self, boot_id=None):
            drv = fixture.make(self, self.root, boot_id=boot_id)
            if not self.drivers:
                self.addCleanup(lambda: Deferred.fromCoroutine(self._cleanup()))
            self.drivers.append(drv)
            return drv

        def test_provides_interface(self):
            drv = self.driver()
            self.assertTrue(verifyObject(IHypervisorDriver, drv))
            self.assertEqual(drv.list(), [])
            facts = drv.facts()
            self.assertEqual(facts["driver"], drv.name)
            self.assertIn("accel", facts)

        async def test_start_status_list_console(self):
            drv = self.driver()
            seen = []
            drv.subscribe(seen.append)
            st = await drv.start(fixture.spec(self, "m1"))
            self.assertEqual(st["state"], "running")
            self.assertIsInstance(st["pid"], int)
            self.assertEqual(drv.status("m1")["state"], "running")
            self.assertEqual(drv.list(), ["m1"])
            self.assertEqual([s["state"] for s in seen], ["running"])
            self.assertEqual(st["forwards"], fixture.spec(self, "m1")["forwards"])

            async def has_output():
                return fixture.boot_output in await drv.console("m1")

            done = False
            for _ in range(600):
                if await has_output():
                    done = True
                    break
                await deferLater(reactor, 0.1, lambda: None)
            self.assertTrue(done, "the console never showed the guest booting")
            tail = await drv.console("m1", max_bytes=5)
            self.assertLessEqual(len(tail.encode()), 5)

        async def test_start_twice_conflicts(self):
            drv = self.driver()
            await drv.start(fixture.spec(self, "m1"))
            with self.assertRaises(Conflict):
                await drv.start(fixture.spec(self, "m1"))
            self.assertEqual(drv.status("m1")["state"], "running")

        async def test_bad_specs(self):
            drv = self.driver()
            good = fixture.spec(self, "m1")
            bad = [
                "not a dict",
                dict(good, id="bad id!"),
                dict(good, id=""),
                dict(good, kernel=None, disk=None),
                dict(good, vcpus=0),
                dict(good, vcpus="2"),
                dict(good, memory_mb=1),
                dict(good, kernel="/nonexistent/vmlinuz"),
                dict(good, volumes=[{"id": "v1", "path": "/nonexistent/v1.img"}]),
                dict(good, forwards=[{"guest": 8080, "host": 70000}]),
                dict(good, cmdline="two\nlines"),
            ]
            for spec in bad:
                with self.assertRaises(InvalidArgument, msg=repr(spec)) as cm:
                    await drv.start(spec)
                self.assertTrue(cm.exception.message)
            self.assertEqual(drv.list(), [])

        def test_unknown_machine(self):
            drv = self.driver()
            self.assertRaises(NotFound, drv.status, "nope")
            self.assertRaises(NotFound, drv.stop, "nope")
            self.assertRaises(NotFound, drv.console, "nope")
            self.assertRaises(InvalidArgument, drv.status, "../etc")
            return drv.destroy("nope")  # not an error

        async def test_kill_is_noticed_as_failed(self):
            drv = self.driver()
            seen = []
            drv.subscribe(seen.append)
            st = await drv.start(fixture.spec(self, "m1"))
            fixture.kill(drv, "m1", st["pid"])
            await poll(lambda: drv.status("m1")["state"] == "failed", 10, what="failed")
            self.assertEqual([s["state"] for s in seen], ["running", "failed"])
            self.assertIn("signal 9", drv.status("m1")["reason"])
            self.assertIsNone(drv.status("m1")["pid"])

        async def test_stop_then_start_again(self):
            drv = self.driver()
            seen = []
            unsubscribe = drv.subscribe(seen.append)
            await drv.start(fixture.spec(self, "m1"))
            # The guest may not have booted: then the hard stop after the timeout ends it.
            st = await drv.stop("m1", timeout=1.0)
            self.assertEqual(st["state"], "stopped")
            self.assertEqual(st["reason"], "stopped on request")
            self.assertEqual((await drv.stop("m1"))["state"], "stopped")  # no-op
            st = await drv.start(fixture.spec(self, "m1"))
            self.assertEqual(st["state"], "running")
            self.assertEqual([s["state"] for s in seen], ["running", "stopped", "running"])
            unsubscribe()
            await drv.destroy("m1")
            self.assertEqual(len(seen), 3)
            self.assertEqual(drv.list(), [])
            self.assertRaises(NotFound, drv.status, "m1")
            self.assertFalse(os.path.exists(os.path.join(self.root, "m1")))

        async def test_recover_running_and_dead_machines(self):
            first = self.driver()
            a = await first.start(fixture.spec(self, "alive"))
            b = await first.start(fixture.spec(self, "dies"))
            await first.start(fixture.spec(self, "stops"))
            await first.stop("stops", timeout=0.5)
            await first.close()
            fixture.kill(first, "dies", b["pid"])
            await deferLater(reactor, 0.2, lambda: None)

            second = self.driver()
            seen = []
            second.subscribe(seen.append)
            found = {s["id"]: s for s in await second.recover()}
            self.assertEqual(sorted(found), ["alive", "dies", "stops"])
            self.assertEqual(found["alive"]["state"], "running")
            self.assertEqual(found["alive"]["pid"], a["pid"])
            self.assertEqual(found["dies"]["state"], "failed")
            self.assertIn("agent was not running", found["dies"]["reason"])
            self.assertEqual(found["stops"]["state"], "stopped")
            self.assertEqual(second.list(), ["alive", "dies", "stops"])
            for s in found.values():
                self.assertIn(s["state"], MACHINE_STATES)
            self.assertEqual(await second.recover(), [])  # nothing new

            # The recovered machine is under control: a kill is noticed.
            fixture.kill(second, "alive", a["pid"])
            await poll(lambda: second.status("alive")["state"] == "failed", 10, what="failed")
            self.assertEqual(seen[-1]["id"], "alive")
            self.assertEqual(seen[-1]["state"], "failed")

        async def test_a_machine_that_ended_with_its_host_says_so(self):
            """
            The host restarted (its boot id changed) while the machine ran: found ended, it
            says the host restarted; in the same boot, that it ended without the agent.
            """
            first = self.driver(boot_id="boot-a")
            a = await first.start(fixture.spec(self, "vm"))
            await first.close()
            fixture.kill(first, "vm", a["pid"])  # the power went: it ended with the host
            await deferLater(reactor, 0.2, lambda: None)
            second = self.driver(boot_id="boot-b")
            [found] = await second.recover()
            self.assertEqual((found["id"], found["state"], found["reason"]),
                             ("vm", "failed", ENDED_WITH_THE_HOST))
            await second.close()
            third = self.driver(boot_id="boot-b")  # the agent restarts again, same boot
            [found] = await third.recover()
            self.assertEqual(found["reason"], ENDED_WITH_THE_HOST)  # what was recorded

        async def test_a_full_disk_pauses_the_machine_until_there_is_room(self):
            """
            A guest's write meets a full file system on the host: the machine is paused
            (still running, C{paused} C{disk-full}, the reason naming its volume), its
            listeners told; a new driver (the agent restarted) finds it paused; once the
            file system has room it resumes by itself and the write completes.
            """
            first = self.driver()
            first.disk_room_interval = 0.2
            spec = fixture.full_disk_spec(self, "vm")
            seen = []
            first.subscribe(seen.append)
            await first.start(spec)
            fixture.fill_disk(first, "vm")
            await poll(lambda: first.status("vm")["paused"] == "disk-full", 90, what="paused")
            st = first.status("vm")
            self.assertEqual(st["state"], "running")
            self.assertIn("paused: disk data", st["reason"])
            self.assertIn("no space left on device", st["reason"])
            self.assertEqual(seen[-1]["paused"], "disk-full")
            await deferLater(reactor, 0.5, lambda: None)  # no room yet: still paused
            self.assertEqual(first.status("vm")["paused"], "disk-full")

            await first.close()
            second = self.driver()
            second.disk_room_interval = 0.2
            [found] = await second.recover()
            self.assertEqual((found["state"], found["paused"]), ("running", "disk-full"))
            self.assertIn("paused: disk data", found["reason"])

            seen = []
            second.subscribe(seen.append)
            fixture.make_room(self)
            await poll(lambda: second.status("vm")["paused"] is None, 30, what="resumed")
            self.assertEqual(second.status("vm")["reason"],
                             "resumed: its host's disk has room again")
            self.assertEqual((seen[-1]["state"], seen[-1]["paused"]), ("running", None))
            console = await poll_console(second, "vm", fixture.filled_output)
            self.assertIn(fixture.filled_output, console)

        async def test_backup_volume_copies_a_running_machine_s_volume(self):
            """
            L{IVolumeBackup.backup_volume} copies a running machine's volume into a new
            private file, byte for byte, its holes left holes; an unknown machine or volume is C{NotFound}, a
            target that exists or a machine that is not running C{Conflict} (no file left).
            """
            drv = self.driver()
            if not getattr(fixture, "volume_backup", True):
                # optional: a driver without it says so (its volumes are copied at rest)
                self.assertFalse(IVolumeBackup.providedBy(drv))
                return
            self.assertTrue(verifyObject(IVolumeBackup, drv))
            path = os.path.join(self.root, "data.img")
            with open(path, "wb") as f:
                f.truncate(8 << 20)
                f.seek(3 << 20)
                f.write(b"zwrm volume " * 4096)
            spec = fixture.spec(self, "vm")
            spec["volumes"] = [{"id": "data", "path": path}]
            target = os.path.join(self.root, "copy.img")
            with self.assertRaises(NotFound):
                await drv.backup_volume("vm", "data", target)
            await drv.start(spec)
            with self.assertRaises(NotFound):
                await drv.backup_volume("vm", "other", target)
            self.assertFalse(os.path.exists(target))
            await drv.backup_volume("vm", "data", target)
            with open(path, "rb") as a, open(target, "rb") as b:
                self.assertTrue(a.read() == b.read(), "the copy differs from the volume")
            self.assertEqual(os.stat(target).st_mode & 0o777, 0o600)
            # sparse: the copy takes the room of the volume's data, not of its size
            self.assertLess(os.stat(target).st_blocks * 512, 1 << 20)
            with self.assertRaises(Conflict):
                await drv.backup_volume("vm", "data", target)
            await drv.stop("vm")
            again = os.path.join(self.root, "again.img")
            with self.assertRaises(Conflict):
                await drv.backup_volume("vm", "data", again)
            self.assertFalse(os.path.exists(again))

    DriverContractTests.__name__ = fixture.__name__ + "ContractTests"
    DriverContractTests.__qualname__ = DriverContractTests.__name__
    return DriverContractTests
