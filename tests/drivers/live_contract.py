"""
The contract test suite of L{zwrm.interfaces.ILiveMigration}, run against the QEMU driver
(real VMs under TCG, two drivers on loopback with TLS) and the fake
(tests/drivers/test_live.py).

A fixture provides:
 - C{make(testcase, root)}: a new driver under C{root} (one per "host");
 - C{spec(testcase, machine_id, volume_path)}: a machine spec with one volume;
 - C{make_volume(testcase, path, size)}: a formatted volume image of C{size} bytes;
 - C{write(testcase, driver, machine_id, name, data)}: have the running guest write a file
   to its volume (and sync): fires once acknowledged;
 - C{kill(driver, machine_id)}: end the machine's process as C{kill -9} would;
 - C{hang(testcase, driver, machine_id)}: make the machine's process stop answering (as
   C{SIGSTOP} would: its connections stay up, nothing is read or answered);
 - C{ready_output}: a str the console shows once the guest serves.
"""

import os
import re
import shutil
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from tests.drivers.contract import poll
from zwrm.errors import Conflict, InvalidArgument, NotAuthorized, NotFound, Unavailable
from zwrm.interfaces import IHypervisorDriver, ILiveMigration
from zwrm.pki.ca import CertificateAuthority

VOLUME_SIZE = 64 * 1024 * 1024


def tls_for(ca, host_id, peer, cache={}):  # noqa: B006 - a per-process cache of keys
    if (ca.fingerprint, host_id) not in cache:
        cache[(ca.fingerprint, host_id)] = ca.issue_host(host_id)
    cert, key = cache[(ca.fingerprint, host_id)]
    return {"ca": ca.certificate_pem.decode(), "cert": cert.decode(), "key": key.decode(),
            "peer": peer}


def same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


class Events:
    """A live listener that keeps every event and lets a test wait for one."""

    def __init__(self):
        self.seen = []
        self._waiters = []

    def __call__(self, name, data):
        self.seen.append((name, data))
        for w in list(self._waiters):
            if w[0](name, data):
                self._waiters.remove(w)
                w[1].callback((name, data))

    def wait(self, match, timeout=120.0):
        for name, data in self.seen:
            if match(name, data):
                return _fired((name, data))
        d = Deferred()
        self._waiters.append((match, d))
        return d.addTimeout(timeout, reactor)


async def switch_over(src, dst, where, stls, speed=50 * 1024 * 1024, before_switchover=None):
    """
    Move machine C{m1} from driver C{src} to C{dst} (waiting at C{where}) as the agents do,
    up to its incoming migration completed on C{dst}, before C{dst} resumes it.

    @return: the source's L{Events}.
    """
    sev, dev = Events(), Events()
    src.live_subscribe("m1", sev)
    dst.live_subscribe("m1", dev)
    await src.start_mirror("m1", where, stls, speed=speed)
    await sev.wait(lambda n, d: n == "BLOCK_JOB_READY")
    await src.start_migration("m1", where, stls, downtime_limit_ms=300)
    await sev.wait(lambda n, d: n == "MIGRATION" and d.get("status") == "pre-switchover")
    if before_switchover is not None:
        await before_switchover()
    await src.complete_switchover("m1")
    await dev.wait(lambda n, d: n == "MIGRATION" and d.get("status") == "completed")
    return sev


def _fired(value):
    d = Deferred()
    d.callback(value)
    return d


#: How QEMU 7.2 aborts on its own right after the NBD cut (docs/live-migration.md): on its
#: corrupted heap (glibc's words after the signal), or in its image locking on a descriptor
#: it closed itself ('Failed to get "consistent read" lock: Bad file descriptor', ci14).
QEMU_OWN_ABORT = re.compile(r"killed by signal 6: .*(corrupted|malloc\(\)|free\(\)"
                            r"|Failed to get \".*\" lock: Bad file descriptor)")


def make_live_tests(fixture):
    class LiveMigrationContractTests(TestCase):
        timeout = 300

        def setUp(self):
            self.root = tempfile.mkdtemp(prefix="zwrm-live-", dir="/tmp")
            self.addCleanup(shutil.rmtree, self.root, True)
            self.ca = CertificateAuthority.create()
            self.drivers = []
            self.addCleanup(lambda: Deferred.fromCoroutine(self._cleanup()))

        async def _cleanup(self):
            for drv in self.drivers:
                for mid in list(drv.list()):
                    await drv.destroy(mid)

        async def bounded(self, what, work, seconds=90):
            """C{await work} (a coroutine or Deferred), failing the test after C{seconds}."""
            try:
                return await ensureDeferred(work).addTimeout(seconds, reactor)
            except TimeoutError:
                self.fail(f"{what} did not end within {seconds} s")

        def driver(self, name):
            drv = fixture.make(self, os.path.join(self.root, name))
            self.drivers.append(drv)
            return drv

        async def source_and_target(self, tls=True, peer=None, ready=True, hosts=("a", "b")):
            """A running source (host-a, guest ready) and a target (host-b) waiting."""
            a, b = hosts
            src, dst = self.driver(a), self.driver(b)
            vol_a = os.path.join(self.root, a, "vol.img")
            vol_b = os.path.join(self.root, b, "vol.img")
            fixture.make_volume(self, vol_a, VOLUME_SIZE)
            with open(vol_b, "wb") as f:
                f.truncate(VOLUME_SIZE)
            await src.start(fixture.spec(self, "m1", vol_a))
            if ready:
                await self.until_ready(src, "m1")
            ttls = tls_for(self.ca, f"host-{b}", peer or f"host-{a}") if tls else None
            where = await dst.start_incoming(fixture.spec(self, "m1", vol_b), "127.0.0.1",
                                             ttls)
            stls = tls_for(self.ca, f"host-{a}", f"host-{b}") if tls else None
            return src, dst, vol_a, vol_b, where, stls

        async def until_ready(self, drv, mid):
            for _ in range(1800):
                if fixture.ready_output in await drv.console(mid):
                    return
                await deferLater(reactor, 0.1, lambda: None)
            self.fail(f"machine {mid} never became ready")

        async def migrate(self, src, dst, where, stls, before_switchover=None):
            """The whole sequence, as the agents drive it; @return: the source's status."""
            sev = await switch_over(src, dst, where, stls, before_switchover=before_switchover)
            resumed = await dst.finish_incoming("m1")
            self.assertEqual(resumed["resumed"], True)
            await sev.wait(lambda n, d: n == "MIGRATION" and d.get("status") == "completed")
            return await src.migration_status("m1")

        def test_provides_interface(self):
            drv = self.driver("a")
            self.assertTrue(verifyObject(IHypervisorDriver, drv))
            self.assertTrue(verifyObject(ILiveMigration, drv))
            facts = drv.migration_facts()
            for k in ("live", "reason", "cpu_model", "machine_type", "accel"):
                self.assertIn(k, facts)
            self.assertTrue(facts["live"], facts)

        async def test_bad_arguments_change_nothing(self):
            drv = self.driver("a")
            self.assertRaises(NotFound, drv.live_subscribe, "nope", lambda n, d: None)
            with self.assertRaises(NotFound):
                await drv.start_mirror("nope", {"host": "127.0.0.1", "nbd_port": 1,
                                                "migration_port": 2, "exports": {}})
            with self.assertRaises(NotFound):
                await drv.cancel_migration("nope")
            vol = os.path.join(self.root, "v.img")
            fixture.make_volume(self, vol, VOLUME_SIZE)
            await drv.start(fixture.spec(self, "m1", vol))
            for target in ("x", {"host": "127.0.0.1"},
                           {"host": "127.0.0.1", "nbd_port": 0, "migration_port": 1,
                            "exports": {}},
                           {"host": "127.0.0.1", "nbd_port": 1, "migration_port": 2,
                            "exports": {}}):
                with self.assertRaises(InvalidArgument):
                    await drv.start_mirror("m1", target)
            with self.assertRaises(InvalidArgument):
                await drv.start_mirror("m1", {"host": "127.0.0.1", "nbd_port": 1,
                                              "migration_port": 2, "exports": {"v1": "vol0"}},
                                       tls={"ca": "x"})
            with self.assertRaises(Conflict):
                # No mirror is ready: the RAM migration cannot start.
                await drv.start_migration("m1", {"host": "127.0.0.1", "nbd_port": 1,
                                                 "migration_port": 2, "exports": {"v1": "vol0"}})
            with self.assertRaises(Conflict):
                await drv.complete_switchover("m1")
            with self.assertRaises(Conflict):
                await drv.finish_incoming("m1")
            st = await drv.migration_status("m1")
            self.assertEqual((st["runstate"], st["migration"], st["mirrors"]),
                             ("running", "none", []))
            self.assertEqual(drv.status("m1")["state"], "running")

        async def test_live_migration_moves_the_machine_and_its_writes_verified(self):
            src, dst, vol_a, vol_b, where, stls = await self.source_and_target()
            await fixture.write(self, src, "m1", "before", b"written before the mirror\n")
            st = await self.migrate(src, dst, where, stls)
            self.assertEqual(st["migration"], "completed")
            self.assertEqual(st["runstate"], "postmigrate")
            self.assertIsInstance(st["downtime_ms"], int)
            self.assertGreaterEqual(st["downtime_ms"], 0)
            self.assertEqual(dst.status("m1")["state"], "running")
            dst_st = await dst.migration_status("m1")
            self.assertEqual(dst_st["runstate"], "running")
            # The target serves the data written on the source, and takes new writes.
            self.assertEqual(await fixture.read(self, dst, "m1", "before"),
                             b"written before the mirror\n")
            await fixture.write(self, dst, "m1", "after", b"written on the target\n")
            # The source stays paused; its frozen image differs from the target's only
            # where the target wrote since it resumed.
            dirty = await dst.dirty_extents("m1", "v1")
            self.assertTrue(dirty, "the target wrote, yet its bitmap is empty")
            self.assertLess(sum(n for _o, n in dirty), VOLUME_SIZE // 4, dirty)
            from zwrm.agent.live import verify_images
            result = await verify_images(reactor, vol_a, vol_b, dirty)
            self.assertTrue(result["ok"], result)
            # One byte changes behind the guest's back, in a block it did not write: the
            # verification catches it.
            covered = {o // (64 * 1024) for o, n in dirty for o in range(o, o + n, 64 * 1024)}
            block = next(b for b in range(VOLUME_SIZE // (64 * 1024) - 1, 0, -1)
                         if b not in covered)
            with open(vol_b, "r+b") as f:
                f.seek(block * 64 * 1024 + 17)
                old = f.read(1)
                f.seek(block * 64 * 1024 + 17)
                f.write(bytes([old[0] ^ 0xFF]))
            result = await verify_images(reactor, vol_a, vol_b, dirty)
            self.assertFalse(result["ok"])
            self.assertEqual(result["bad_blocks"], [block])
            with self.assertRaises(Conflict):
                await src.cancel_migration("m1")
            await src.destroy("m1")

        async def test_a_machine_that_moved_rolls_its_next_migration_back(self):
            """
            The machine that arrived moves on; its next migration, given up during its
            mirror, is rolled back (a hypervisor keeps saying "completed" of the migration
            that brought it), and so is one that an agent restart finds there.
            """
            # Each step bounded, so that a step that never ends (once in CI, 2026-12-06:
            # the test still running at its 300 s) says which it was.
            step = self.bounded
            src, dst, _vol_a, _vol_b, where, stls = await step(
                "the source and target", self.source_and_target())
            await step("the first migration", self.migrate(src, dst, where, stls))

            async def mirror_to(host):
                drv = self.driver(host)
                vol = os.path.join(self.root, host, "vol.img")
                os.makedirs(os.path.dirname(vol), exist_ok=True)
                with open(vol, "wb") as f:
                    f.truncate(VOLUME_SIZE)
                there = await drv.start_incoming(fixture.spec(self, "m1", vol), "127.0.0.1",
                                                 tls_for(self.ca, f"host-{host}", "host-b"))
                await dst.start_mirror("m1", there, tls_for(self.ca, "host-b", f"host-{host}"),
                                       speed=1024 * 1024)

            await step("the mirror to host-c", mirror_to("c"))
            self.assertEqual(await step("its cancel", dst.cancel_migration("m1")),
                             {"cancelled": True})
            st = await step("the status after the cancel", dst.migration_status("m1"))
            self.assertEqual((st["runstate"], st["mirrors"]), ("running", []))
            self.assertEqual(dst.status("m1")["state"], "running")

            await step("the mirror to host-d", mirror_to("d"))
            await step("the agent's close", dst.close())  # it restarts during the mirror
            again = self.driver("b")
            [found] = await step("the recovery", again.recover())
            self.assertEqual((found["state"], found["reason"]), (
                "running", "recovered: its interrupted live migration was cancelled; it runs "
                "here"))
            self.assertEqual((await step("the status after the recovery",
                                         again.migration_status("m1")))["mirrors"], [])

        async def test_target_that_stops_answering_during_the_mirror_is_cut_off(self):
            # The target's QEMU stops answering (fixture.hang: SIGSTOP for QEMU; its
            # kernel still acknowledges) while the mirror copies, and the guest writes
            # (write-blocking: the write waits for the target). The cancel returns at once
            # and the write is acknowledged: the driver cuts the connection first.
            #
            # QEMU 7.2 (Debian 12) itself aborts now and then (about 1 in 30 runs on a
            # loaded host; twice in CI) soon after the cut, on a corrupted heap ("killed
            # by signal 6: malloc(): unsorted double linked list corrupted"), before any
            # command of the driver's reaches it: QEMU's bug, not the driver's (see
            # docs/live-migration.md). That abort alone gets another source and target,
            # up to three times (one CI run, loaded, saw it twice in a row); anything
            # else fails here.
            pairs = (("a", "b"), ("c", "d"), ("e", "f"), ("g", "h"))
            for attempt, hosts in enumerate(pairs):
                aborted = await self._cut_off(hosts, last=attempt == len(pairs) - 1)
                if not aborted:
                    return
                print(f"QEMU's own abort during the cut ({aborted}); once more")

        async def _cut_off(self, hosts, last):
            src, dst, vol_a, vol_b, where, stls = await self.source_and_target(hosts=hosts)
            await src.start_mirror("m1", where, stls, speed=2 * 1024 * 1024)
            for _ in range(600):
                st = await src.migration_status("m1")
                if any(m["offset"] > 0 for m in st["mirrors"]):
                    break
                await deferLater(reactor, 0.1, lambda: None)
            else:
                self.fail(f"the mirror never copied: {st}")
            fixture.hang(self, dst, "m1")
            writing = Deferred.fromCoroutine(fixture.write(
                self, src, "m1", "during", b"written while the target hangs\n"))
            await deferLater(reactor, 1.0, lambda: None)
            started = reactor.seconds()
            cancelled = None
            try:
                await src.cancel_migration("m1").addTimeout(60, reactor)
            except Exception as e:
                cancelled = e
            took = reactor.seconds() - started
            try:
                written = await writing.addTimeout(60, reactor)
            except Exception as e:
                written = e
            if cancelled is not None or written != "during":
                # How the source ended, if it did (with QEMU: the last line of its log).
                try:
                    await poll(lambda: src.status("m1")["state"] != "running", 10)
                except AssertionError:
                    pass
                reason = src.status("m1")["reason"]
                if not last and QEMU_OWN_ABORT.search(reason or ""):
                    return reason
                self.fail(f"the cancel: {cancelled or 'returned'}; the write: {written!r}; "
                          f"the source machine: {src.status('m1')}")
            self.assertLess(took, 10)
            self.assertEqual(await fixture.read(self, src, "m1", "during"),
                             b"written while the target hangs\n")
            st = await src.migration_status("m1")
            self.assertEqual((st["runstate"], st["mirrors"]), ("running", []))
            await fixture.write(self, src, "m1", "after", b"the source serves\n")
            return None

        async def test_target_killed_during_the_mirror_leaves_the_source_running(self):
            src, dst, vol_a, vol_b, where, stls = await self.source_and_target()
            sev = Events()
            src.live_subscribe("m1", sev)
            await src.start_mirror("m1", where, stls, speed=1024 * 1024)
            fixture.kill(dst, "m1")
            await poll(lambda: dst.status("m1")["state"] != "running", 30, what="target ended")
            await src.cancel_migration("m1")
            st = await src.migration_status("m1")
            self.assertEqual((st["runstate"], st["mirrors"]), ("running", []))
            await fixture.write(self, src, "m1", "still", b"the source serves\n")

        async def test_target_killed_during_ram_migration_leaves_the_source_running(self):
            src, dst, vol_a, vol_b, where, stls = await self.source_and_target()
            sev = Events()
            src.live_subscribe("m1", sev)
            await src.start_mirror("m1", where, stls, speed=50 * 1024 * 1024)
            await sev.wait(lambda n, d: n == "BLOCK_JOB_READY")
            await src.start_migration("m1", where, stls, max_bandwidth=1024 * 1024)
            await sev.wait(lambda n, d: n == "MIGRATION" and d.get("status") == "active")
            fixture.kill(dst, "m1")
            await sev.wait(lambda n, d: n == "MIGRATION" and d.get("status") in (
                "failed", "cancelled"), timeout=60)
            await src.cancel_migration("m1")
            st = await src.migration_status("m1")
            self.assertEqual((st["runstate"], st["mirrors"]), ("running", []))
            await fixture.write(self, src, "m1", "still", b"the source serves\n")

        async def test_target_killed_at_the_switchover_leaves_the_source_running(self):
            src, dst, vol_a, vol_b, where, stls = await self.source_and_target()
            sev = Events()
            src.live_subscribe("m1", sev)
            await src.start_mirror("m1", where, stls, speed=50 * 1024 * 1024)
            await sev.wait(lambda n, d: n == "BLOCK_JOB_READY")
            await src.start_migration("m1", where, stls)
            await sev.wait(lambda n, d: n == "MIGRATION" and d.get("status") == "pre-switchover")
            # The guest is paused; the target dies before the mirrors' final sync.
            fixture.kill(dst, "m1")
            await poll(lambda: dst.status("m1")["state"] != "running", 30, what="target ended")
            with self.assertRaises(Unavailable):
                await src.complete_switchover("m1", timeout=20)
            await src.cancel_migration("m1")
            st = await src.migration_status("m1")
            self.assertEqual((st["runstate"], st["mirrors"]), ("running", []))
            await fixture.write(self, src, "m1", "still", b"the source serves\n")
            self.assertEqual(await fixture.read(self, src, "m1", "still"),
                             b"the source serves\n")

        async def test_recover_after_agent_restarts_mid_migration(self):
            # Both agents restart while the mirror is in sync: the target (inmigrate) is
            # ended, the source's migration is cancelled and it runs on.
            src, dst, vol_a, vol_b, where, stls = await self.source_and_target()
            sev = Events()
            src.live_subscribe("m1", sev)
            await src.start_mirror("m1", where, stls, speed=50 * 1024 * 1024)
            await sev.wait(lambda n, d: n == "BLOCK_JOB_READY")
            await src.close()
            await dst.close()
            src2, dst2 = self.driver("a"), self.driver("b")
            [s] = await src2.recover()
            [t] = await dst2.recover()
            self.assertEqual(s["state"], "running")
            self.assertIn("live migration was cancelled", s["reason"])
            self.assertEqual(t["state"], "failed")
            self.assertIn("incoming migration was interrupted", t["reason"])
            st = await src2.migration_status("m1")
            self.assertEqual((st["runstate"], st["mirrors"]), ("running", []))
            await fixture.write(self, src2, "m1", "still", b"the source serves\n")

        async def test_recover_after_the_switchover_keeps_both_paused(self):
            # Both agents restart after the source completed and before the target resumed:
            # neither resumes on its own; the target resumes when asked.
            src, dst, vol_a, vol_b, where, stls = await self.source_and_target()
            await fixture.write(self, src, "m1", "before", b"written on the source\n")
            sev, dev = Events(), Events()
            src.live_subscribe("m1", sev)
            dst.live_subscribe("m1", dev)
            await src.start_mirror("m1", where, stls, speed=50 * 1024 * 1024)
            await sev.wait(lambda n, d: n == "BLOCK_JOB_READY")
            await src.start_migration("m1", where, stls)
            await sev.wait(lambda n, d: n == "MIGRATION" and d.get("status") == "pre-switchover")
            await src.complete_switchover("m1")
            await dev.wait(lambda n, d: n == "MIGRATION" and d.get("status") == "completed")
            await sev.wait(lambda n, d: n == "MIGRATION" and d.get("status") == "completed")
            await src.close()
            await dst.close()
            src2, dst2 = self.driver("a"), self.driver("b")
            [s] = await src2.recover()
            [t] = await dst2.recover()
            self.assertEqual((s["state"], t["state"]), ("running", "running"))
            self.assertIn("the target holds the machine", s["reason"])
            self.assertIn("waiting to be resumed", t["reason"])
            self.assertEqual((await src2.migration_status("m1"))["runstate"], "postmigrate")
            self.assertEqual((await dst2.migration_status("m1"))["runstate"], "paused")
            with self.assertRaises(Conflict):
                await src2.cancel_migration("m1")
            await dst2.finish_incoming("m1")
            self.assertEqual((await dst2.migration_status("m1"))["runstate"], "running")
            self.assertEqual(await fixture.read(self, dst2, "m1", "before"),
                             b"written on the source\n")

        async def test_a_wrong_peer_is_refused(self):
            # The target accepts only host-c: the source (host-a) is refused.
            src, dst, vol_a, vol_b, where, stls = await self.source_and_target(peer="host-c",
                                                                               ready=False)
            with self.assertRaises(NotAuthorized):
                await src.start_mirror("m1", where, stls)
            st = await src.migration_status("m1")
            self.assertEqual((st["runstate"], st["mirrors"]), ("running", []))
            # The source accepts only host-c: the target (host-b) is refused.
            stls = dict(stls, peer="host-c")
            with self.assertRaises((NotAuthorized, Unavailable)):
                await src.start_mirror("m1", where, stls)
            self.assertEqual(src.status("m1")["state"], "running")

    LiveMigrationContractTests.__name__ = fixture.__name__ + "LiveContractTests"
    LiveMigrationContractTests.__qualname__ = LiveMigrationContractTests.__name__
    return LiveMigrationContractTests
