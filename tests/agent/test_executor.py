"""
The executor with the fake driver (which passes the driver contract) and a real VolumeStore.
The QEMU end-to-end path is in tests/integration/test_qemu.py.
"""

import errno
import os
import shutil
import tempfile

from autobahn.wamp.exception import ApplicationError
from twisted.internet import reactor
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import TestCase
from zope.interface import implementer_only

from tests.agent.fakes import FakeImages
from tests.drivers.contract import poll
from zwrm.agent import executor as executor_module
from zwrm.agent.executor import Executor
from zwrm.agent.volumes import VolumeStore
from zwrm.drivers.fake import FakeDriver, FakeHost
from zwrm.errors import (
    Conflict,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from zwrm.interfaces import IHypervisorDriver
from zwrm.testing.image import kernel_bytes

EXPECTED = {
    "machine.start", "machine.stop", "machine.destroy", "machine.status", "machine.list",
    "machine.logs", "volume.create", "volume.delete", "volume.list", "volume.info", "host.facts",
    # volume moves (host drains; tests/agent/test_executor_volumes.py)
    "volume.receive", "volume.send", "volume.progress", "volume.cancel_receive", "volume.digest",
    "volume.snapshot", "volume.restore", "volume.snapshot_delete", "volume.snapshots",
    "volume.recover",  # a lost host's volume made from its replica here
    "network.update",  # the cluster network view (zwrm/agent/network/agent.py)
    "ingress.certs",  # the ingress TLS certificates (zwrm/agent/network/agent.py)
    "machine.console.attach", "machine.console.write",  # zwrm/agent/console.py
}


class ExecutorTests(TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="zwrm-ex-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.kernel = os.path.join(self.dir, "vmlinuz")
        with open(self.kernel, "wb") as f:
            f.write(kernel_bytes())
        self.host = FakeHost(powerdown_delay=0.01)
        self.store = VolumeStore(reactor, os.path.join(self.dir, "volumes"))
        self.events = []
        self.images = FakeImages(self.kernel)
        self.executor = self.make()

    def make(self, clock=None, probe=None):
        driver = FakeDriver(reactor, os.path.join(self.dir, "machines"), host=self.host)
        kw = {"health_probe": probe} if probe else {}
        ex = Executor(clock or reactor, "h1", driver, self.store, self.report,
                      images=self.images, data_dir=self.dir, **kw)
        self.addCleanup(ex.close)
        return ex

    def report(self, event):
        self.events.append(event)
        return succeed(None)

    def states(self, mid):
        return [e["state"] for e in self.events if e["machine_id"] == mid]

    def spec(self, mid="m1", **kw):
        spec = {"id": mid, "app": "web",
                "image": {"kernel": self.kernel, "initrd": None, "disk": None,
                          "cmdline": "console=ttyS0"},
                "vcpus": 1, "memory_mb": 128,
                "volumes": [{"id": f"{mid}-data", "mount": "/data", "size_mb": 8}],
                "service_port": 8080, "health": None}
        spec.update(kw)
        return spec

    def test_procedure_names(self):
        names = set()
        for attr in dir(Executor):
            for uri in getattr(getattr(Executor, attr), "_wampuris", []):
                names.add(uri.uri())
        self.assertEqual(names, EXPECTED)

    async def test_start_creates_volume_and_forwards_port(self):
        st = await self.executor.start_machine(self.spec())
        self.assertEqual(st["state"], "running")
        self.assertEqual(st["health"], "none")
        self.assertIsInstance(st["host_port"], int)
        self.assertEqual(self.states("m1"), ["pending", "starting", "running"])
        ev = self.events[-1]
        self.assertEqual((ev["kind"], ev["host_id"], ev["host_port"]), ("machine", "h1", st["host_port"]))
        info = self.store.info("m1-data")
        self.assertEqual((info["size_mb"], info["in_use_by"]), (8, "m1"))
        driver_spec = self.host.machines["m1"]["spec"]
        self.assertEqual(driver_spec["cmdline"], "console=ttyS0 zwrm.vol=m1-data:/data")
        self.assertEqual(driver_spec["forwards"], [{"guest": 8080, "host": st["host_port"]}])
        self.assertEqual(driver_spec["volumes"], [{"id": "m1-data", "path": info["path"], "serial": "m1-data", "mount": "/data"}])
        self.assertEqual(self.executor.machine_status("m1")["pid"], 4242)
        self.assertEqual([m["id"] for m in self.executor.list_machines()], ["m1"])
        self.assertIn("fake: booted", await self.executor.machine_logs("m1"))
        facts = self.executor.host_facts()
        self.assertEqual((facts["host_id"], facts["driver"], facts["running"]), ("h1", "fake", 1))
        self.assertGreater(facts["disk_free_mb"], 0)

    async def test_bad_input(self):
        bad = [
            "x", self.spec(id="a b"), self.spec(image=None), self.spec(image={"kernel": "rel"}),
            self.spec(vcpus=0), self.spec(memory_mb="1G"), self.spec(service_port=0),
            self.spec(volumes=[{"id": "v", "mount": "data"}]),
            self.spec(volumes=[{"id": "v", "mount": "/a,b"}]),
            self.spec(volumes=[{"id": "v", "mount": "/d"}, {"id": "v", "mount": "/e"}]),
            self.spec(volumes=[{"id": "v", "mount": "/d", "size_mb": 1}]),
            self.spec(health={"type": "ping"}),
            self.spec(service_port=None, health={"type": "tcp"}),
        ]
        for spec in bad:
            with self.assertRaises(InvalidArgument, msg=repr(spec)):
                await self.executor.start_machine(spec)
        self.assertEqual(self.events, [])
        self.assertRaises(NotFound, self.executor.machine_status, "nope")
        self.assertRaises(NotFound, self.executor.stop_machine, "nope")
        self.assertRaises(InvalidArgument, self.executor.machine_status, "../x")
        self.assertEqual(self.store.list(), [])

    async def test_a_local_kernel_qemu_would_not_boot_is_refused(self):
        """
        A development --kernel path (not an image) that is no kernel (an initrd given as
        the kernel, say) is refused before the driver sees it, as an image's kernel layer
        is: QEMU would run any file as an old zImage.
        """
        initrd = os.path.join(self.dir, "initrd.img")
        with open(initrd, "wb") as f:
            f.write(b"\x1f\x8b\x08\x00" + b"\0" * 4096)
        image = {"kernel": initrd, "initrd": None, "disk": None, "cmdline": ""}
        with self.assertRaises(InvalidArgument) as e:
            await self.executor.start_machine(self.spec(image=image))
        self.assertEqual(e.exception.message,
                         f"kernel {initrd} is not an x86 kernel QEMU can boot: a Linux bzImage"
                         " (vmlinuz), an ELF kernel with a PVH entry point or a Multiboot"
                         " kernel")
        self.assertEqual(self.states("m1")[-1], "failed")
        self.assertEqual(self.executor.driver.list(), [])

    async def test_fence_stops_the_machines_with_volumes(self):
        """
        (The agent heard nothing from the control plane for its fence_after.) A machine
        with volumes is powered down and failed with the reason, kept for the control
        plane; one without runs on; a second fence finds nothing to stop.
        """
        await self.executor.start_machine(self.spec())
        await self.executor.start_machine(self.spec("m2", volumes=[]))
        stopped = await self.executor.fence("fenced: test", 5)
        self.assertEqual(stopped, ["m1"])
        st = self.executor.machine_status("m1")
        self.assertEqual((st["state"], st["reason"]), ("failed", "fenced: test"))
        # from running to failed: an exit the restart policy restarts, not a stop asked for
        self.assertEqual(self.states("m1")[-2:], ["running", "failed"])
        self.assertEqual(self.executor.driver.status("m1")["state"], "stopped")
        self.assertEqual(self.executor.machine_status("m2")["state"], "running")
        self.assertEqual(await self.executor.fence("fenced: test", 5), [])
        # its volume stays, claimed by it: it starts again here once the host is back
        self.assertEqual(self.store.in_use("m1-data"), "m1")

    async def test_conflicts(self):
        await self.executor.start_machine(self.spec())
        with self.assertRaises(Conflict):
            await self.executor.start_machine(self.spec())
        other = self.spec("m2", volumes=[{"id": "m1-data", "mount": "/data"}])
        with self.assertRaises(Conflict):
            await self.executor.start_machine(other)
        self.assertRaises(Conflict, self.executor.delete_volume, "m1-data")
        self.assertTrue(self.store.exists("m1-data"))

    async def test_crash_is_reported_failed(self):
        await self.executor.start_machine(self.spec())
        self.executor.driver.crash("m1")
        self.assertEqual(self.states("m1")[-1], "failed")
        self.assertIn("signal 9", self.events[-1]["reason"])
        self.assertEqual(self.executor.machine_status("m1")["state"], "failed")
        # A failed machine can be started again, with its volume.
        st = await self.executor.start_machine(self.spec())
        self.assertEqual(st["state"], "running")

    async def test_stop_start_destroy(self):
        await self.executor.start_machine(self.spec())
        st = await self.executor.stop_machine("m1", timeout=5)
        self.assertEqual((st["state"], st["reason"]), ("stopped", "stopped on request"))
        self.assertEqual(self.states("m1")[-2:], ["stopping", "stopped"])
        self.assertEqual((await self.executor.stop_machine("m1"))["state"], "stopped")
        self.assertRaises(InvalidArgument, self.executor.stop_machine, "m1", timeout=-1)
        self.assertEqual(self.store.in_use("m1-data"), "m1")  # still its volume
        # Started again without it: the volume is free again.
        await self.executor.start_machine(self.spec(volumes=[]))
        self.assertIsNone(self.store.in_use("m1-data"))
        await self.executor.stop_machine("m1")
        await self.executor.start_machine(self.spec())
        self.assertEqual(self.store.in_use("m1-data"), "m1")
        result = await self.executor.destroy_machine("m1")
        self.assertEqual(result, {"machine_id": "m1", "destroyed": True})
        self.assertTrue(self.events[-1]["destroyed"])
        self.assertRaises(NotFound, self.executor.machine_status, "m1")
        self.assertTrue(self.store.exists("m1-data"))  # volumes outlive machines
        self.assertIsNone(self.store.in_use("m1-data"))
        self.assertEqual(await self.executor.delete_volume("m1-data"),
                         {"volume_id": "m1-data", "deleted": True})
        self.assertEqual(self.executor.list_volumes(), [])

    async def test_volume_snapshot_procedures(self):
        """
        A running machine's volume is copied through its driver (C{live}), a stopped one's
        at rest; a restore waits until no machine runs with the volume; the snapshots are
        listed and deleted.
        """
        await self.executor.start_machine(self.spec())
        path = self.store.path("m1-data")
        with open(path, "r+b") as f:
            f.write(b"first")
        snap = await self.executor.snapshot_volume("m1-data", "s1")
        self.assertEqual((snap["id"], snap["volume_id"], snap["live"]), ("s1", "m1-data", True))
        with open(snap["path"], "rb") as f:
            self.assertEqual(f.read(5), b"first")
        with self.assertRaises(Conflict):
            await self.executor.restore_volume("m1-data", "s1", "k1")
        self.executor._machines["m1"].held = "moving live to h2"
        self.assertRaises(Conflict, self.executor.snapshot_volume, "m1-data", "s2")
        self.executor._machines["m1"].held = None

        await self.executor.stop_machine("m1", timeout=5)
        with open(path, "r+b") as f:
            f.write(b"later")
        snap = await self.executor.snapshot_volume("m1-data", "s2")
        self.assertFalse(snap["live"])
        got = await self.executor.restore_volume("m1-data", "s1", "k1")
        self.assertEqual(got["kept"]["id"], "k1")
        with open(path, "rb") as f:
            self.assertEqual(f.read(5), b"first")
        self.assertEqual([s["id"] for s in self.executor.list_snapshots("m1-data")],
                         ["k1", "s1", "s2"])
        self.assertEqual(await self.executor.delete_snapshot("m1-data", "k1"),
                         {"volume_id": "m1-data", "snapshot_id": "k1", "deleted": True})
        self.assertEqual(len(self.executor.list_snapshots()), 2)
        st = await self.executor.start_machine(self.spec())  # its volume is free again
        self.assertEqual(st["state"], "running")
        self.assertRaises(InvalidArgument, self.executor.snapshot_volume, "m1-data", "a/b")
        self.assertRaises(NotFound, self.executor.delete_snapshot, "m1-data", "s9")

    async def test_a_volume_claimed_by_no_known_machine_is_not_copied_at_rest(self):
        await self.executor.create_volume("v2", 8)
        self.store.claim("v2", "ghost")  # no record of it here: it may be writing
        with self.assertRaises(Conflict):
            await self.executor.snapshot_volume("v2", "s1")
        self.store.release("v2", "ghost")
        await self.executor.snapshot_volume("v2", "s1")
        self.store.claim("v2", "ghost")
        with self.assertRaises(Conflict):
            await self.executor.restore_volume("v2", "s1", "k1")
        self.assertEqual([s["id"] for s in self.executor.list_snapshots("v2")], ["s1"])

    async def test_a_driver_that_cannot_copy_a_running_volume_says_so(self):
        @implementer_only(IHypervisorDriver)
        class NoBackup(FakeDriver):
            pass

        ex = Executor(reactor, "h1", NoBackup(reactor, os.path.join(self.dir, "m2"),
                                              host=FakeHost()),
                      self.store, self.report, images=self.images, data_dir=self.dir)
        self.addCleanup(ex.close)
        await ex.start_machine(self.spec())
        with self.assertRaises(Unavailable) as e:
            ex.snapshot_volume("m1-data", "s1")
        self.assertIn("stop the machine first", str(e.exception))
        self.assertEqual(self.store.snapshots(), [])

    async def test_volume_procedures(self):
        info = await self.executor.create_volume("v1", 4)
        self.assertEqual(info["size_mb"], 4)
        self.assertEqual(self.executor.volume_info("v1")["id"], "v1")
        self.assertEqual([v["id"] for v in self.executor.list_volumes()], ["v1"])
        with self.assertRaises(Conflict):
            await self.executor.create_volume("v1", 4)
        with self.assertRaises(InvalidArgument):
            await self.executor.create_volume("v2", -4)
        self.assertRaises(NotFound, self.executor.volume_info, "v2")

    async def test_image_reference_uses_cache_and_pins(self):
        st = await self.executor.start_machine(self.spec(image="demo:1"))
        self.assertEqual(st["state"], "running")
        self.assertEqual(self.host.machines["m1"]["spec"]["kernel"], self.kernel)
        self.assertEqual(self.images.pins, dict.fromkeys(FakeImages.DIGESTS, 1))
        with self.assertRaises(NotFound):
            await self.executor.start_machine(self.spec("m2", image="nope:1", volumes=[]))
        self.assertEqual(self.states("m2")[-1], "failed")
        await self.executor.destroy_machine("m1")
        self.assertEqual(self.images.pins, dict.fromkeys(FakeImages.DIGESTS, 0))
        ex = Executor(reactor, "h1", FakeDriver(reactor, os.path.join(self.dir, "m2")), self.store,
                      self.report, images=None, data_dir=os.path.join(self.dir, "d2"))
        self.addCleanup(ex.close)
        with self.assertRaises(InvalidArgument):
            await ex.start_machine(self.spec("m3", image="demo:1", volumes=[]))

    async def test_recover_after_agent_restart(self):
        await self.executor.start_machine(self.spec("m1"))
        await self.executor.start_machine(self.spec("m2"))
        await self.executor.start_machine(self.spec("m3"))
        await self.executor.stop_machine("m3")
        self.executor.close()
        await self.executor.driver.close()
        self.host.machines["m2"]["alive"] = False  # dies while no agent runs
        # The new agent process has a new volume store too (claims are in memory).
        self.store = VolumeStore(reactor, os.path.join(self.dir, "volumes"))
        self.events = []
        ex = self.make()
        found = {s["id"]: s for s in await ex.recover()}
        self.assertEqual(found["m1"]["state"], "running")
        self.assertEqual(found["m2"]["state"], "failed")
        self.assertIn("agent was not running", found["m2"]["reason"])
        self.assertEqual(found["m3"]["state"], "stopped")
        self.assertEqual({e["machine_id"]: e["state"] for e in self.events},
                         {"m1": "running", "m2": "failed", "m3": "stopped"})
        self.assertEqual(found["m1"]["host_port"],
                         self.host.machines["m1"]["spec"]["forwards"][0]["host"])
        for m in ("m1", "m2", "m3"):
            self.assertEqual(self.store.in_use(f"{m}-data"), m)
        ex.driver.crash("m1")
        self.assertEqual(self.states("m1")[-1], "failed")

    async def test_a_machine_paused_on_a_full_disk_is_reported(self):
        """
        Its driver pauses it on a full disk: reported running with C{paused} and the
        driver's reason, in its status too, and after an agent restart; resumed, reported
        again without it.
        """
        await self.executor.start_machine(self.spec("m1"))
        driver = self.executor.driver
        driver.disk_room_interval = 0.05
        driver.disk_full("m1")
        last = self.events[-1]
        self.assertEqual((last["machine_id"], last["state"], last["paused"]),
                         ("m1", "running", "disk-full"))
        self.assertIn("paused: disk m1-data", last["reason"])
        self.assertEqual(self.executor.machine_status("m1")["paused"], "disk-full")

        self.executor.close()
        await driver.close()
        self.events = []
        self.store = VolumeStore(reactor, os.path.join(self.dir, "volumes"))
        ex = self.make()
        ex.driver.disk_room_interval = 0.05
        [found] = await ex.recover()
        self.assertEqual((found["state"], found["paused"]), ("running", "disk-full"))
        self.assertEqual((self.events[-1]["paused"], self.events[-1]["reason"]),
                         ("disk-full", last["reason"]))

        self.host.free_bytes = None  # room again
        await poll(lambda: ex.machine_status("m1")["paused"] is None, 5, what="resumed")
        last = self.events[-1]
        self.assertEqual((last["state"], last["paused"], last["reason"]),
                         ("running", None, "resumed: its host's disk has room again"))

    async def test_taken_port_is_retried(self):
        driver = self.executor.driver
        real_start = driver.start
        ports = []

        def start(spec):
            ports.append(spec["forwards"][0]["host"])
            if len(ports) == 1:
                return fail(Unavailable("machine m1: QEMU exited with code 1: Could not set up "
                                        "host forwarding rule"))
            return real_start(spec)

        driver.start = start
        st = await self.executor.start_machine(self.spec())
        self.assertEqual(st["state"], "running")
        self.assertEqual(len(ports), 2)
        self.assertEqual(st["host_port"], ports[1])
        self.assertEqual(self.states("m1"), ["pending", "starting", "running"])

    async def test_unexpected_error_is_internal_without_traceback(self):
        def start(spec):
            return fail(OSError(errno.EIO, "Input/output error"))

        self.executor.driver.start = start
        with self.assertRaises(Internal) as cm:
            await self.executor.start_machine(self.spec(volumes=[]))
        self.assertIn("Input/output error", cm.exception.message)
        self.assertEqual(self.states("m1")[-1], "failed")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)  # logged on the agent

    async def test_a_full_disk_is_said_without_a_traceback(self):
        def start(spec):
            # e.g. the QEMU driver writing the machine's spec or its cloud-init seed
            return fail(OSError(errno.ENOSPC, "No space left on device"))

        self.executor.driver.start = start
        with self.assertRaises(ResourceExhausted) as cm:
            await self.executor.start_machine(self.spec(volumes=[]))
        self.assertEqual(cm.exception.message,
                         "the disk of host h1 is full (No space left on device)")
        self.assertEqual(self.states("m1")[-1], "failed")
        self.assertEqual(self.events[-1]["reason"],  # as the control plane is told
                         "could not start: the disk of host h1 is full (No space left on device)")
        self.assertEqual(self.flushLoggedErrors(), [])  # nothing logged as a fault

    async def test_report_failure_does_not_break_start(self):
        def broken(event):
            raise RuntimeError("control plane gone")

        self.executor.report = broken
        st = await self.executor.start_machine(self.spec(volumes=[]))
        self.assertEqual(st["state"], "running")


    async def test_report_of_a_machine_the_control_plane_destroyed(self):
        """
        A stop reported after the control plane deleted the machine (its app destroyed)
        is answered not_found over WAMP: an info line, not a warning; any other refusal
        stays a warning.
        """
        events = []
        self.patch(executor_module, "log", Logger(observer=events.append))
        st = await self.executor.start_machine(self.spec(volumes=[]))
        self.assertEqual(st["state"], "running")

        def gone(event):
            return fail(ApplicationError("zwrm.error.not_found", "no machine 'm1'"))

        self.executor.report = gone
        del events[:]
        await self.executor.stop_machine("m1")
        said = [(e["log_level"], formatEvent(e)) for e in events]
        self.assertIn((LogLevel.info,
                       "machine m1 stopped: the control plane has no record of it any more"), said)
        self.assertNotIn(LogLevel.warn, [level for level, _ in said])

        def refused(event):
            return fail(ApplicationError("zwrm.error.conflict", "not yours"))

        del events[:]
        self.executor.report = refused
        await self.executor.start_machine(self.spec(volumes=[]))
        self.assertIn(LogLevel.warn, [e["log_level"] for e in events])
        self.assertIn("could not report machine m1", " ".join(formatEvent(e) for e in events))


class ExecutorHealthTests(TestCase):
    """Health reporting, with a scripted probe on a Clock."""

    async def test_health_changes_are_reported(self):
        tmp = tempfile.mkdtemp(prefix="zwrm-exh-")
        self.addCleanup(shutil.rmtree, tmp, True)
        disk = os.path.join(tmp, "disk.img")  # (a kernel is read in the reactor's threads)
        open(disk, "wb").close()
        clock = Clock()
        results = ["refused", "refused", None, "500"]
        probes = []

        def probe_factory(r, spec, port):
            probes.append((r, spec["type"], port))
            return lambda: succeed(results.pop(0) if results else None)

        events = []
        driver = FakeDriver(reactor, os.path.join(tmp, "machines"))
        ex = Executor(clock, "h1", driver, VolumeStore(reactor, os.path.join(tmp, "v")),
                      lambda e: events.append(e), data_dir=tmp, health_probe=probe_factory)
        self.addCleanup(ex.close)
        spec = {"id": "m1", "image": {"disk": disk, "cmdline": ""}, "vcpus": 1,
                "memory_mb": 64, "volumes": [], "service_port": 8080,
                "health": {"type": "http", "interval": 1, "timeout": 1, "grace": 5}}
        st = await ex.start_machine(spec)
        self.assertEqual((st["state"], st["health"]), ("running", "starting"))
        self.assertEqual(probes, [(clock, "http", st["host_port"])])
        clock.advance(1)
        self.assertEqual(ex.machine_status("m1")["health"], "starting")
        clock.advance(1)
        self.assertEqual(ex.machine_status("m1")["health"], "passing")
        clock.advance(1)
        self.assertEqual(ex.machine_status("m1")["health"], "failing")
        self.assertEqual([(e["state"], e["health"]) for e in events],
                         [("pending", "none"), ("starting", "none"), ("running", "starting"),
                          ("running", "passing"), ("running", "failing")])
        self.assertIn("500", events[-1]["reason"])
        d = ex.stop_machine("m1", timeout=5)
        self.assertEqual(clock.getDelayedCalls(), [])  # the check stopped
        await d
        self.assertEqual(events[-1]["state"], "stopped")


