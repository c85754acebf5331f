"""
The agent's live-migration procedures (L{zwrm.agent.live.LiveMigrations}) with the fake
driver on a L{task.Clock}: the source and target machines driven by the driver's events,
progressive results, the convergence policy and rollbacks. The same with real QEMU:
tests/agent/test_live.py.
"""

import errno
import json
import os
import types

from twisted.internet import defer, task
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.agent.live_helpers import SIZE, TwoHosts
from zwrm.agent.live import LiveMigrations, check_policy
from zwrm.drivers.fake import FakeDriver
from zwrm.errors import (
    Conflict,
    Corrupt,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)


class Hosts(TwoHosts):
    """Two agents (host-a runs m1 with volume v1; host-b is empty) on one clock."""

    def __init__(self, testcase, clock, converges=True):
        TwoHosts.__init__(self, testcase, clock, "zwrm-live-agent-")
        self.agents = {h: self.live_for(h, *self.host(h, converges))
                       for h in ("host-a", "host-b")}
        self.a, self.b = self.agents["host-a"], self.agents["host-b"]
        path = self.a.volumes.path("v1")
        self.write_volume(path)
        self.a.driver.start(self.spec("m1", [{"id": "v1", "path": path}]))
        clock.advance(0)

    def spec(self, mid, volumes):
        return {"id": mid, "kernel": self.kernel, "initrd": None, "disk": None,
                "cmdline": "console=ttyS0", "vcpus": 1, "memory_mb": 128,
                "volumes": volumes, "forwards": []}

    def prepare(self, source="host-a", postcopy=False):
        desc = self.a.describe("m1")
        d = self.b.prepare("m1", self.spec("m1", [{"id": "v1"}]), desc["volumes"], source,
                           postcopy=postcopy)
        return self.settle(d)


class LiveProceduresTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()

    def test_migrate_moves_the_machine_with_progress(self):
        hosts = Hosts(self, self.clock)
        where = hosts.prepare()
        self.assertEqual(sorted(where), ["exports", "host", "host_port", "migration_port",
                                         "nbd_port"])
        hosts.a.driver.guest_write_file("m1", "before", b"before")
        announced = []
        # RAM passes of a second each (the fake's bandwidth limit): announced as they go.
        d = hosts.a.migrate("m1", "host-b", where, {"mirror_speed": SIZE,
                                                     "max_bandwidth": 10 ** 6},
                            details=types.SimpleNamespace(progress=announced.append))
        result = hosts.settle(d)
        self.assertIsInstance(result["downtime_ms"], int)
        self.assertEqual(result["target"], "host-b")
        # All was mirrored, even when it completed before the first progress reading.
        self.assertEqual(result["mirror"]["total"], SIZE)
        self.assertEqual(result["mirror"]["done"], SIZE)
        phases = [p["phase"] for p in announced]
        self.assertEqual(phases[0], "mirroring")
        ram = [p["ram"]["passes"] for p in announced if p["phase"] == "migrating"]
        self.assertTrue(ram, phases)
        self.assertEqual(ram, sorted(ram))
        self.assertEqual((phases[-1], announced[-1]["finished"]), ("completed", True))
        self.clock.advance(1)
        self.assertEqual(hosts.b.target_state("m1"), "resumed")
        self.assertEqual(hosts.b.incoming, {})
        self.assertEqual(hosts.b.driver.guest_read_file("m1", "before"), b"before")
        st = hosts.settle(hosts.a.status("m1"))
        self.assertEqual((st["state"], st["hypervisor"]["runstate"]), ("completed", "postmigrate"))
        st = hosts.settle(hosts.b.status("m1"))
        self.assertEqual((st["role"], st["state"]), ("target", "resumed"))
        # Nothing is left on the clock once both sides are done.
        self.assertEqual(hosts.a.outgoing, {})
        with self.assertRaises(Conflict):
            hosts.settle(hosts.b.cancel("m1"))

    def test_target_killed_during_the_mirror_rolls_back(self):
        hosts = Hosts(self, self.clock)
        where = hosts.prepare()
        d = hosts.a.migrate("m1", "host-b", where, {"mirror_speed": SIZE // 4})
        self.clock.advance(0.5)
        hosts.b.driver.crash("m1")
        with self.assertRaises(Unavailable) as cm:
            hosts.settle(d)
        self.assertIn("rolled back", cm.exception.message)
        self.assertIn("runs on here", cm.exception.message)
        st = hosts.settle(hosts.a.driver.migration_status("m1"))
        self.assertEqual((st["runstate"], st["mirrors"]), ("running", []))
        # The target's blank copy is gone.
        self.clock.advance(1)
        self.assertFalse(hosts.b.volumes.exists("v1"))
        self.assertEqual(hosts.b.incoming, {})
        # The caller's cancel of the target that ended by itself: done, not a conflict.
        self.assertEqual(hosts.settle(hosts.b.cancel("m1")),
                         {"cancelled": True, "already": True})
        self.assertEqual(hosts.b.driver.list(), [])

    def hang_target(self, hosts, d, within, message):
        """
        Hang the target's QEMU: after nine seconds the migration C{d} (C{stall_timeout}
        10) still waits; it then rolls back within C{within} s of the hang, with
        C{message}, and the source runs on alone.
        """
        hosts.b.driver.hang("m1")
        hung = self.clock.seconds()
        for _ in range(18):  # 9 s: still waiting
            self.clock.advance(0.5)
        self.assertFalse(d.called)
        with self.assertRaises(Unavailable) as cm:
            hosts.settle(d)
        self.assertLessEqual(self.clock.seconds() - hung, within)
        self.assertIn(message, cm.exception.message)
        self.assertIn("runs on here", cm.exception.message)
        st = hosts.settle(hosts.a.driver.migration_status("m1"))
        self.assertEqual((st["runstate"], st["mirrors"]), ("running", []))

    def test_a_target_that_stops_answering_during_the_mirror_rolls_back_after_stall_timeout(self):
        # The target's QEMU hangs mid-mirror (its connections stay up): the mirror copies
        # nothing more, and the mirror deadline (600 s) is far. After stall_timeout seconds
        # without progress the source rolls back and runs on.
        hosts = Hosts(self, self.clock)
        where = hosts.prepare()
        d = hosts.a.migrate("m1", "host-b", where, {"mirror_speed": SIZE // 4,
                                                     "stall_timeout": 10})
        for _ in range(4):
            self.clock.advance(0.5)
        copied = hosts.settle(hosts.a.driver.migration_status("m1"))["mirrors"][0]["offset"]
        self.assertTrue(0 < copied < SIZE, copied)
        self.hang_target(hosts, d, 11.1, "the mirrors copied nothing for 10 s")

    def test_a_target_that_stops_answering_during_the_ram_migration_rolls_back(self):
        # In sync, the RAM migration under way (a pass a second), then the target hangs:
        # nothing more is sent; after stall_timeout (not the 120 s deadline) the source
        # rolls back and runs on.
        hosts = Hosts(self, self.clock, converges=False)
        where = hosts.prepare()
        d = hosts.a.migrate("m1", "host-b", where, {"mirror_speed": SIZE, "stall_timeout": 10,
                                                     "max_bandwidth": 10 ** 6})
        for _ in range(10):
            self.clock.advance(0.5)
        st = hosts.settle(hosts.a.driver.migration_status("m1"))
        self.assertEqual(st["migration"], "active")
        self.hang_target(hosts, d, 12.1, "the RAM migration sent nothing for 10 s")

    def test_a_guest_that_never_converges_gives_up_at_the_deadline(self):
        hosts = Hosts(self, self.clock, converges=False)
        where = hosts.prepare()
        d = hosts.a.migrate("m1", "host-b", where, {"mirror_speed": SIZE, "deadline": 5})
        with self.assertRaises(Unavailable) as cm:
            hosts.settle(d)
        self.assertIn("did not converge within 5 s", cm.exception.message)
        st = hosts.settle(hosts.a.driver.migration_status("m1"))
        self.assertEqual((st["runstate"], st["migration"]), ("running", "cancelled"))
        self.clock.advance(1)
        self.assertFalse(hosts.b.volumes.exists("v1"))

    def test_postcopy_when_allowed(self):
        hosts = Hosts(self, self.clock, converges=False)
        where = hosts.prepare(postcopy=True)
        d = hosts.a.migrate("m1", "host-b", where, {"mirror_speed": SIZE, "deadline": 5,
                                                     "postcopy": True})
        result = hosts.settle(d)
        self.assertTrue(result["postcopy"])
        self.clock.advance(1)
        self.assertEqual(hosts.b.target_state("m1"), "resumed")
        self.assertEqual(hosts.b.incoming, {})

    def test_postcopy_needs_the_target_to_accept_it(self):
        hosts = Hosts(self, self.clock, converges=False)
        where = hosts.prepare(postcopy=False)
        d = hosts.a.migrate("m1", "host-b", where, {"mirror_speed": SIZE, "deadline": 5,
                                                     "postcopy": True})
        with self.assertRaises(Unavailable) as cm:
            hosts.settle(d)
        self.assertIn("the migration failed", cm.exception.message)
        self.assertEqual(hosts.a.driver.status("m1")["state"], "running")

    def test_cancel_during_the_mirror(self):
        hosts = Hosts(self, self.clock)
        where = hosts.prepare()
        d = hosts.a.migrate("m1", "host-b", where, {"mirror_speed": SIZE // 8})
        d.addErrback(lambda f: f.trap(Unavailable))
        self.clock.advance(0.2)
        self.assertEqual(hosts.settle(hosts.a.cancel("m1")), {"cancelled": True})
        self.assertEqual(hosts.a.driver.status("m1")["state"], "running")
        self.assertEqual(hosts.settle(hosts.b.cancel("m1")), {"cancelled": True})
        self.assertFalse(hosts.b.volumes.exists("v1"))
        self.assertRaises(NotFound, hosts.b.driver.status, "m1")

    def test_a_cancel_during_the_pause_waits_and_says_it_completed(self):
        hosts = Hosts(self, self.clock)
        where = hosts.prepare()
        # The mirrors' final sync takes half a second: the cancel comes in the pause.
        real = hosts.a.driver.complete_switchover
        hosts.a.driver.complete_switchover = lambda mid, timeout=30.0: task.deferLater(
            self.clock, 0.5, real, mid, timeout)
        d = hosts.a.migrate("m1", "host-b", where, {"mirror_speed": SIZE})
        out = hosts.a.outgoing["m1"]
        for _ in range(10000):
            if out.machine.state == "switching":
                break
            self.clock.advance(0.01)
        self.assertEqual(out.machine.state, "switching")
        cancel = hosts.a.cancel("m1")
        self.assertIsInstance(hosts.settle(d)["downtime_ms"], int)
        with self.assertRaises(Conflict) as cm:
            hosts.settle(cancel)
        self.assertIn("completed before the cancel", cm.exception.message)

    def test_wrong_source_is_refused(self):
        hosts = Hosts(self, self.clock)
        where = hosts.prepare(source="host-c")
        with self.assertRaises(Unavailable) as cm:
            hosts.settle(hosts.a.migrate("m1", "host-b", where, {"mirror_speed": SIZE}))
        self.assertIn("refused", cm.exception.message)
        self.assertEqual(hosts.a.driver.status("m1")["state"], "running")

    def test_prepare_takes_the_machine_spec_of_a_start(self):
        hosts = Hosts(self, self.clock)
        desc = hosts.a.describe("m1")
        spec = {"image": {"kernel": hosts.kernel, "initrd": None, "disk": None,
                          "cmdline": "console=ttyS0"},
                "vcpus": 1, "memory_mb": 128, "service_port": 8080,
                "volumes": [{"id": "v1", "mount": "/data", "size_mb": 4}]}
        where = hosts.settle(hosts.b.prepare("m1", spec, desc["volumes"], "host-a"))
        self.assertIsInstance(where["host_port"], int)
        dspec = hosts.b.driver.host.machines["m1"]["spec"]
        self.assertEqual(dspec["cmdline"], "console=ttyS0 zwrm.vol=v1:/data")
        self.assertEqual(dspec["forwards"], [{"guest": 8080, "host": where["host_port"]}])
        self.assertEqual(os.path.getsize(dspec["volumes"][0]["path"]), SIZE)
        # (bridge networking, the executor's adoption: tests/agent/test_live_executor.py)

    def test_bad_arguments(self):
        hosts = Hosts(self, self.clock)
        for policy, key in (({"speed": 1}, "unknown policy key"), ({"deadline": 0}, "deadline"),
                            ({"postcopy": "yes"}, "postcopy")):
            with self.assertRaises(InvalidArgument) as cm:
                check_policy(policy)
            self.assertIn(key, cm.exception.message)
        with self.assertRaises(InvalidArgument):
            hosts.settle(hosts.a.migrate("m1", "bad host!", {}, None))
        with self.assertRaises(InvalidArgument):
            hosts.settle(hosts.b.prepare("m1", hosts.spec("m1", [{"id": "v1"}]),
                                         {"v1": -1}, "host-a"))
        with self.assertRaises(InvalidArgument):
            hosts.settle(hosts.b.prepare("m1", hosts.spec("m1", [{"id": "v1"}]),
                                         {"v2": 10}, "host-a"))
        with self.assertRaises(Conflict):  # the volume is here already
            hosts.settle(hosts.a.prepare("m9", hosts.spec("m9", [{"id": "v1"}]),
                                         {"v1": SIZE}, "host-b"))
        self.assertEqual(hosts.b.volumes.list(), [])


class PrepareRecordTests(SynchronousTestCase):
    """
    The target records an incoming migration (for a restarted agent) before it answers
    C{live.prepare}; a record it cannot write leaves nothing behind.
    """

    def setUp(self):
        self.clock = Clock()

    def test_a_full_disk_leaves_nothing_behind(self):
        hosts = Hosts(self, self.clock)
        calls = []

        def full(f, *args):
            calls.append(f.__name__)
            return task.deferLater(self.clock, 0, _raise, OSError(errno.ENOSPC, "No space"))

        hosts.b._threads = full
        with self.assertRaises(ResourceExhausted) as cm:
            hosts.prepare()
        self.assertIn("host-b cannot record the incoming migration of m1: the disk is full",
                      cm.exception.message)
        self.assertEqual(calls, ["write_atomically"])
        self.assertNotIn("m1", hosts.b.driver.host.machines)  # the incoming QEMU destroyed
        self.assertEqual(hosts.b.incoming, {})
        self.assertEqual(hosts.b.volumes.list(), [])  # the blank copy deleted
        self.assertFalse(os.path.exists(hosts.b.volumes.path("v1")))
        self.assertEqual(os.listdir(hosts.b.state_dir), [])
        # and the source's volume is untouched: a second try (the disk freed) succeeds
        hosts.b._threads = _at_once
        where = hosts.prepare()
        self.assertIn("nbd_port", where)
        self.assertEqual(os.listdir(hosts.b.state_dir), ["m1.json"])

    def test_another_write_error_is_unavailable(self):
        hosts = Hosts(self, self.clock)
        hosts.b._threads = lambda f, *a: task.deferLater(
            self.clock, 0, _raise, OSError(errno.EIO, "Input/output error"))
        with self.assertRaises(Unavailable) as cm:
            hosts.prepare()
        self.assertIn("the incoming migration of m1: Input/output error", cm.exception.message)
        self.assertNotIn("m1", hosts.b.driver.host.machines)
        self.assertEqual(hosts.b.volumes.list(), [])

    def test_the_record_is_written_in_a_thread(self):
        hosts = Hosts(self, self.clock)
        threads = []

        def in_thread(f, *args):
            threads.append((f.__name__, args[2:]))
            return _at_once(f, *args)

        hosts.b._threads = in_thread
        hosts.prepare()
        self.assertEqual(threads, [("write_atomically", (True,))])  # fsynced
        path = os.path.join(hosts.b.state_dir, "m1.json")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(path) as f:
            self.assertEqual(json.load(f)["source"], "host-a")


def _raise(e):
    raise e


def _at_once(f, *args):
    return defer.maybeDeferred(f, *args)


class HoldTests(SynchronousTestCase):
    """
    C{live.migrate(..., hold=True)} answers once every mirror is in sync and waits there,
    the machine running, for C{live.switchover}: the caller stores its decision between
    the two (docs/drain.md, C{switching_over}); nothing of the RAM is sent before it.
    """

    def setUp(self):
        self.clock = Clock()
        self.hosts = Hosts(self, self.clock)
        self.where = self.hosts.prepare()

    def held(self, policy=None):
        hosts, announced = self.hosts, []
        d = hosts.a.migrate("m1", "host-b", self.where, dict({"mirror_speed": SIZE},
                                                             **(policy or {})),
                            True, details=types.SimpleNamespace(progress=announced.append))
        ready = hosts.settle(d)
        return ready, announced

    def test_it_waits_in_sync_until_the_switchover_is_asked(self):
        hosts = self.hosts
        # The agent says it takes hold: the control plane gives it to none that does not.
        self.assertIs(hosts.a.facts()["hold"], True)
        ready, announced = self.held()
        self.assertEqual((ready["ready"], ready["target"]), (True, "host-b"))
        self.assertEqual(ready["mirror"], {"done": SIZE, "total": SIZE, "rate": 0.0} | {
            "rate": ready["mirror"]["rate"]})
        self.assertEqual(announced[-1]["phase"], "ready")  # the call's last progress
        # Minutes later: still in sync, running, no RAM migration, the target waiting.
        self.clock.advance(120)
        st = hosts.settle(hosts.a.status("m1"))
        self.assertEqual((st["role"], st["state"]), ("source", "ready"))
        self.assertEqual((st["hypervisor"]["runstate"], st["hypervisor"]["migration"]),
                         ("running", "none"))
        self.assertEqual(hosts.b.target_state("m1"), "incoming")
        # A write meanwhile reaches both copies (the mirror is write-blocking).
        hosts.a.driver.guest_write_file("m1", "held", b"h" * 4096)
        with open(hosts.a.volumes.path("v1"), "rb") as a, \
                open(hosts.b.volumes.path("v1"), "rb") as b:
            self.assertEqual(a.read(), b.read())
        # The switchover, with its own progress.
        more = []
        result = hosts.settle(hosts.a.switchover(
            "m1", details=types.SimpleNamespace(progress=more.append)))
        self.assertIsInstance(result["downtime_ms"], int)
        self.assertEqual(result["mirror"]["total"], SIZE)
        self.assertGreaterEqual(result["mirror_seconds"], 0)
        phases = [p["phase"] for p in more]
        self.assertIn("migrating", phases)
        self.assertEqual((phases[-1], more[-1]["finished"]), ("completed", True))
        self.assertEqual(len(announced), len([p for p in announced]))  # nothing more there
        self.assertNotIn("migrating", [p["phase"] for p in announced])
        self.clock.advance(1)
        self.assertEqual(hosts.b.target_state("m1"), "resumed")
        self.assertEqual(hosts.b.driver.guest_read_file("m1", "held"), b"h" * 4096)
        # Asked again (its caller restarted): the same figures, nothing started.
        self.assertEqual(hosts.settle(hosts.a.switchover("m1")), result)

    def test_a_switchover_asked_again_follows_the_migration_under_way(self):
        hosts = self.hosts
        hosts.a.driver.host.live_converges = False
        self.held()
        first = hosts.a.switchover("m1")
        self.clock.advance(1)
        self.assertEqual(hosts.a.outgoing["m1"].machine.state, "migrating")
        again = hosts.a.switchover("m1")  # the caller restarted
        hosts.a.driver.host.live_converges = True
        a, b = hosts.settle(first), hosts.settle(again)
        self.assertEqual(a, b)
        self.assertIsInstance(a["downtime_ms"], int)

    def test_asked_again_before_the_go_it_follows_the_same_migration(self):
        hosts = self.hosts
        d = hosts.a.migrate("m1", "host-b", self.where, {"mirror_speed": SIZE // 8}, True)
        self.clock.advance(0.1)
        out = hosts.a.outgoing["m1"]
        again = hosts.a.migrate("m1", "host-b", self.where, {"mirror_speed": SIZE // 8}, True)
        self.assertEqual(hosts.settle(again), hosts.settle(d))  # the caller restarted
        self.assertIs(hosts.a.outgoing["m1"], out)
        ready = hosts.a.migrate("m1", "host-b", self.where, None, True)  # ready now
        self.assertTrue(hosts.settle(ready)["ready"])
        for target_host, hold in (("host-c", True), ("host-b", False)):
            with self.assertRaises(Conflict):  # another migration: refused
                hosts.settle(hosts.a.migrate("m1", target_host, self.where, None, hold))
        self.assertIsInstance(hosts.settle(hosts.a.switchover("m1"))["downtime_ms"], int)
        # Moved: paused here for good, never migrated a second time.
        with self.assertRaises(Conflict) as cm:
            hosts.settle(hosts.a.migrate("m1", "host-b", self.where, None, True))
        self.assertIn("host-b completed; it stays paused here", cm.exception.message)
        self.assertEqual(hosts.a.driver.host.machines["m1"]["live"]["runstate"], "postmigrate")

    def test_no_switchover_within_ready_timeout_rolls_back(self):
        hosts = self.hosts
        self.held({"ready_timeout": 5})
        self.clock.advance(4)
        self.assertEqual(hosts.a.outgoing["m1"].machine.state, "ready")
        self.clock.advance(2)
        self.assertNotIn("m1", hosts.a.outgoing)
        self.assertEqual(hosts.a.driver.status("m1")["state"], "running")
        with self.assertRaises(Unavailable) as cm:
            hosts.settle(hosts.a.switchover("m1"))
        self.assertIn("no switchover was asked within 5", cm.exception.message)
        st = hosts.settle(hosts.a.status("m1"))
        self.assertEqual(st["state"], "rolled_back")

    def test_a_cancel_while_ready_rolls_back(self):
        hosts = self.hosts
        self.held()
        self.assertEqual(hosts.settle(hosts.a.cancel("m1")), {"cancelled": True})
        st = hosts.settle(hosts.a.driver.migration_status("m1"))
        self.assertEqual((st["runstate"], st["mirrors"]), ("running", []))
        self.assertEqual(hosts.settle(hosts.b.cancel("m1")), {"cancelled": True})
        self.assertFalse(hosts.b.volumes.exists("v1"))

    def test_switchover_refused_before_ready_and_unknown(self):
        hosts = self.hosts
        with self.assertRaises(NotFound) as cm:
            hosts.settle(hosts.a.switchover("m1"))
        self.assertIn("ask live.status", cm.exception.message)
        d = hosts.a.migrate("m1", "host-b", self.where, {"mirror_speed": SIZE // 8}, True)
        self.clock.advance(0.1)
        with self.assertRaises(Conflict) as cm:
            hosts.settle(hosts.a.switchover("m1"), steps=1)
        self.assertIn("not in sync yet", cm.exception.message)
        self.assertTrue(hosts.settle(d)["ready"])
        with self.assertRaises(InvalidArgument):
            hosts.settle(hosts.a.migrate("m2", "host-b", self.where, None, "yes"))
        hosts.settle(hosts.a.cancel("m1"))


class VerifyTests(TestCase):
    """live.hashes on the source and live.verify on the target (threads: the real reactor)."""

    async def test_verify_passes_and_catches_a_corrupted_block(self):
        clock = Clock()
        hosts = Hosts(self, clock)
        where = hosts.prepare()
        hosts.a.driver.guest_write_file("m1", "before", b"b" * 5000)
        hosts.settle(hosts.a.migrate("m1", "host-b", where, {"mirror_speed": SIZE}))
        clock.advance(1)
        hosts.b.driver.guest_write_file("m1", "after", b"a" * 5000)
        frozen = await hosts.a.hashes("v1")
        self.assertEqual((frozen["blocks"], frozen["first"], frozen["count"]), (64, 0, 64))
        # In pages, joined: the same.
        pages = [await hosts.a.hashes("v1", first, 24) for first in (0, 24, 48)]
        self.assertEqual([p["count"] for p in pages], [24, 24, 16])
        self.assertEqual(b"".join(p["hashes"] for p in pages), frozen["hashes"])
        result = await hosts.b.verify("m1", "v1", frozen)
        self.assertTrue(result["ok"])
        self.assertEqual(result["differing_blocks"], 1)
        self.assertEqual(result["dirty_blocks"], 1)
        # Page by page (as the control plane verifies a large volume): the same counts.
        results = [await hosts.b.verify("m1", "v1", p) for p in pages]
        self.assertTrue(all(r["ok"] for r in results))
        self.assertEqual([(r["first"], r["blocks"]) for r in results], [(0, 24), (24, 24), (48, 16)])
        self.assertEqual(sum(r["differing_blocks"] for r in results), 1)
        self.assertEqual(sum(r["dirty_blocks"] for r in results), 1)
        with open(hosts.b.volumes.path("v1"), "r+b") as f:
            f.seek(SIZE - 100)
            f.write(b"corrupt")
        with self.assertRaises(Corrupt) as cm:
            await hosts.b.verify("m1", "v1", frozen)
        self.assertIn("outside the target's dirty bitmap", cm.exception.message)
        self.assertIn("[63]", cm.exception.message)
        # The last page alone names the same block (by its index in the volume); the
        # first passes.
        with self.assertRaises(Corrupt) as cm:
            await hosts.b.verify("m1", "v1", pages[2])
        self.assertIn("[63]", cm.exception.message)
        self.assertTrue((await hosts.b.verify("m1", "v1", pages[0]))["ok"])
        # A page that does not say where it is, or whose hashes do not fit it, is refused.
        for bad, words in [
            (dict(pages[1], first=-1), "hashes.first must be a block number"),
            (dict(pages[1], first="24"), "hashes.first must be a block number"),
            (dict(pages[1], count=True), "hashes.count must be a block number"),
            (dict(pages[1], count=23), "must hold 16 bytes for each of its 23 blocks"),
            (dict(pages[1], hashes="zz"), "hashes.hashes must be hexadecimal"),
            (dict(pages[1], block=4096), "hashes.block must be 65536"),
        ]:
            with self.assertRaises(InvalidArgument) as cm:
                await hosts.b.verify("m1", "v1", bad)
            self.assertIn(words, cm.exception.message)
        # A page of the source's that is somewhere else than it says: it does not verify.
        with self.assertRaises(Corrupt):
            await hosts.b.verify("m1", "v1", dict(pages[0], first=24))
        self.flushLoggedErrors()

    async def test_blake3_or_sha256_as_the_source_names_it(self):
        """
        The source hashes with the algorithm asked for (SHA-256 by default: a control plane
        of the version before) and names it; the target hashes its own blocks with the one
        the page names (SHA-256 when it names none: a source of the version before).
        """
        clock = Clock()
        hosts = Hosts(self, clock)
        for agent in (hosts.a, hosts.b):
            self.assertEqual(agent.facts()["verify_hashes"], ["blake3", "sha256"])
        where = hosts.prepare()
        hosts.a.driver.guest_write_file("m1", "before", b"b" * 5000)
        hosts.settle(hosts.a.migrate("m1", "host-b", where, {"mirror_speed": SIZE}))
        clock.advance(1)
        old = await hosts.a.hashes("v1")
        sha = await hosts.a.hashes("v1", 0, None, "sha256")
        b3 = await hosts.a.hashes("v1", 0, None, "blake3")
        self.assertEqual((old["hash"], sha["hash"], b3["hash"]), ("sha256", "sha256", "blake3"))
        self.assertEqual(old["hashes"], sha["hashes"])
        self.assertNotEqual(b3["hashes"], sha["hashes"])
        self.assertEqual(len(b3["hashes"]), len(sha["hashes"]))
        for page in (sha, b3, {k: v for k, v in sha.items() if k != "hash"}):
            result = await hosts.b.verify("m1", "v1", page)
            self.assertEqual((result["ok"], result["differing_blocks"]), (True, 0))
        # A page named wrongly does not verify: the target hashed with the named one.
        for page in (dict(b3, hash="sha256"), dict(sha, hash="blake3"),
                     {k: v for k, v in b3.items() if k != "hash"}):
            with self.assertRaises(Corrupt):
                await hosts.b.verify("m1", "v1", page)
        for name in ("md5", "", None, 3):
            with self.assertRaises(InvalidArgument) as cm:
                await hosts.b.verify("m1", "v1", dict(b3, hash=name))
            self.assertIn("hashes.hash must be one of blake3, sha256", cm.exception.message)
            with self.assertRaises(InvalidArgument) as cm:
                hosts.a.hashes("v1", 0, None, name)
            self.assertIn("algorithm must be one of blake3, sha256", cm.exception.message)
        self.flushLoggedErrors()


class AfterRestartTests(SynchronousTestCase):
    """A new agent process (a new LiveMigrations over a new driver of the same host)."""

    def restarted(self, hosts, name):
        old = hosts.agents[name]
        drv = FakeDriver(hosts.clock, old.driver.root, host=old.driver.host,
                         network=old.driver.network)
        new = LiveMigrations(hosts.clock, name, drv, old.volumes, old.credentials, old.listen,
                             state_dir=old.state_dir)
        hosts.settle(drv.recover())
        return new

    def test_a_target_paused_after_the_switchover_resumes_when_asked(self):
        clock = Clock()
        hosts = Hosts(self, clock)
        where = hosts.prepare()
        hosts.a.driver.guest_write_file("m1", "before", b"before")
        # The target's agent goes away just before the switchover: its machine keeps
        # waiting, the source completes the migration.
        hosts.b.incoming.pop("m1")._forget()
        hosts.settle(hosts.a.migrate("m1", "host-b", where, {"mirror_speed": SIZE}))
        b = self.restarted(hosts, "host-b")
        st = hosts.settle(b.status("m1"))
        self.assertEqual((st["hypervisor"]["role"], st["hypervisor"]["runstate"]),
                         ("target", "paused"))
        with self.assertRaises(Conflict):  # the source: its migration completed
            hosts.settle(hosts.a.cancel("m1"))
        self.assertEqual(hosts.settle(b.resume("m1")), {"resumed": True, "already": False})
        self.assertEqual(b.driver.guest_read_file("m1", "before"), b"before")
        with self.assertRaises(Conflict):
            hosts.settle(b.cancel("m1"))

    def test_a_target_left_incoming_is_cancelled_and_its_copy_deleted(self):
        clock = Clock()
        hosts = Hosts(self, clock)
        hosts.prepare()
        hosts.b.incoming.pop("m1")._forget()
        b = self.restarted(hosts, "host-b")
        # recover() ended the machine (it had not completed); cancelling deletes the copy.
        self.assertEqual(b.driver.status("m1")["state"], "failed")
        self.assertTrue(b.volumes.exists("v1"))
        self.assertEqual(hosts.settle(b.cancel("m1")), {"cancelled": True})
        self.assertFalse(b.volumes.exists("v1"))
        self.assertEqual(os.listdir(b.state_dir), [])


class SourceEndsTests(SynchronousTestCase):
    def test_the_source_machine_ending_fails_the_migration_at_once(self):
        clock = Clock()
        hosts = Hosts(self, clock)
        where = hosts.prepare()
        d = hosts.a.migrate("m1", "host-b", where, {"mirror_speed": SIZE // 8})
        clock.advance(0.2)
        hosts.a.driver.crash("m1")
        with self.assertRaises(Unavailable) as cm:
            hosts.settle(d, steps=10)
        self.assertIn("the machine failed", cm.exception.message)
        self.assertIn("the machine is failed", cm.exception.message)


class ProcedureNamesTests(SynchronousTestCase):
    def test_registered_names(self):
        """The agent registers these under zwrm.agent.<host_id>. (docs/live-migration.md)."""
        names = {}
        for attr in dir(LiveMigrations):
            for uri in getattr(getattr(LiveMigrations, attr), "_wampuris", ()):
                names[uri.uri()] = uri.options
        self.assertEqual(sorted(names), [f"live.{v}" for v in (
            "cancel", "describe", "facts", "hashes", "migrate", "prepare", "resume", "status",
            "switchover", "verify")])
        # Only migrate and switchover give progressive results (they take the details).
        self.assertEqual(sorted(u for u, o in names.items() if o is not None),
                         ["live.migrate", "live.switchover"])
        for uri in ("live.migrate", "live.switchover"):
            self.assertEqual(names[uri].details_arg, "details")
        with open(os.path.join(os.path.dirname(__file__), "..", "..", "docs",
                               "live-migration.md")) as f:
            doc = f.read()
        for uri in names:
            self.assertIn(f"`{uri}`", doc)
