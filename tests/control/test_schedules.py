"""
Snapshot schedules kept and run by the control plane (L{zwrm.control.schedules}): each run
snapshots (and replicates) every volume of the app, prunes only its own snapshots, goes on
past a volume that fails, stores its end before announcing it, and a run a stopped control
plane missed is one run at its start; over the agents' real executors and volume stores
(tests/control/test_drain.py's cluster), time from its Clock.
"""

import sqlite3

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.control import test_volume_replicas
from tests.control.test_apps import d
from zwrm import errors
from zwrm.control.schedules import SnapshotSchedules

HOUR = 3600.0


class ScheduleTests(TestCase):
    timeout = 120
    cluster = test_volume_replicas.ReplicaTests.cluster
    running = test_volume_replicas.ReplicaTests.running
    events = test_volume_replicas.ReplicaTests.events

    async def schedules(self, c):
        s = SnapshotSchedules(c.clock, c.apps)
        s.start()
        self.addCleanup(s.stop)
        return s

    async def due(self, c, s, seconds=0.0):
        """Move the Clock by C{seconds} once the schedules are armed; wait for the runs."""
        await c.quiet()
        c.clock.advance(seconds)
        await c.quiet()
        await s.idle()
        await c.quiet()

    async def names(self, c, what="snapshots"):
        rows = await (c.apps.list_snapshots(c.vid) if what == "snapshots"
                      else c.apps.list_replicas(c.vid))
        return [(r["name"], r["host_id"]) for r in rows]

    @d
    async def test_runs_now_then_every_period_pruning_only_its_own(self):
        c = await self.cluster()
        await c.apps.snapshot_volume(c.vid, "before-upgrade")  # by hand: never pruned
        s = await self.schedules(c)
        row = await s.schedule("db", HOUR, keep=2, replicate=True)
        self.assertEqual((row["app"], row["every"], row["keep"], row["replicate"],
                          row["next_at"], row["last_at"]), ("db", HOUR, 2, True, 0.0, None))
        await self.due(c, s)  # the first run: at once
        self.assertEqual(await self.names(c), [("before-upgrade", c.src),
                                               ("scheduled-19700101-000000", c.src)])
        self.assertEqual(await self.names(c, "replicas"),
                         [("scheduled-19700101-000000", c.dst)])
        [listed] = await s.schedules()
        self.assertEqual((listed["last_at"], listed["last_error"], listed["next_at"]),
                         (0.0, None, HOUR))
        [ran] = self.events(c, "snapshot_schedule_run")
        self.assertEqual((ran["subject"], ran["payload"]["reason"]),
                         (listed["app_id"], "1 of 1 volume(s) taken"))
        await self.due(c, s, HOUR - 1)
        self.assertEqual(s.runs, 1)  # not yet
        for _ in range(2):
            await self.due(c, s, 1 if s.runs == 1 else HOUR)
        self.assertEqual(s.runs, 3)
        self.assertEqual(await self.names(c), [("before-upgrade", c.src),
                                               ("scheduled-19700101-010000", c.src),
                                               ("scheduled-19700101-020000", c.src)])
        self.assertEqual(await self.names(c, "replicas"),
                         [("scheduled-19700101-010000", c.dst),
                          ("scheduled-19700101-020000", c.dst)])

        await s.unschedule("db")
        self.assertEqual(await s.schedules(), [])
        await self.due(c, s, 10 * HOUR)
        self.assertEqual(s.runs, 3)
        self.assertEqual(len(await c.apps.list_snapshots(c.vid)), 3)  # they stay

    @d
    async def test_a_volume_that_fails_is_said_and_the_next_run_tries_again(self):
        c = await self.cluster()
        s = await self.schedules(c)
        await c.registry.transition(c.dst, "drain_requested")  # no other host for a replica
        await s.schedule("db", HOUR, replicate=True)
        await self.due(c, s)
        [row] = await s.schedules()
        self.assertIn(f"{c.vid}: snapshot scheduled-19700101-000000 taken, not replicated: ",
                      row["last_error"])
        self.assertEqual(len(await c.apps.list_snapshots(c.vid)), 1)
        await c.registry.transition(c.dst, "undrain_requested")
        await self.due(c, s, HOUR)
        [row] = await s.schedules()
        self.assertIsNone(row["last_error"])
        self.assertEqual(await self.names(c, "replicas"),
                         [("scheduled-19700101-010000", c.dst)])

    @d
    async def test_runs_a_stopped_control_plane_missed_are_one_run(self):
        c = await self.cluster()
        s = await self.schedules(c)
        await s.schedule("db", HOUR)
        await self.due(c, s)
        s.stop()
        await self.due(c, s, 5 * HOUR)  # stopped: nothing runs
        self.assertEqual(len(await c.apps.list_snapshots(c.vid)), 1)
        again = await self.schedules(c)  # the next start
        await self.due(c, again)
        await self.due(c, again)  # (not one run per missed hour)
        self.assertEqual(again.runs, 1)
        self.assertEqual(len(await c.apps.list_snapshots(c.vid)), 2)
        [row] = await again.schedules()
        self.assertEqual((row["last_at"], row["next_at"]), (5 * HOUR, 6 * HOUR))

    @d
    async def test_bad_requests_change_nothing(self):
        c = await self.cluster()
        s = await self.schedules(c)
        for kw, argument in (({"every": 59}, "every"), ({"every": "1h"}, "every"),
                             ({"every": HOUR, "keep": 0}, "keep"),
                             ({"every": HOUR, "replicate": "yes"}, "replicate")):
            with self.assertRaises(errors.InvalidArgument) as e:
                await s.schedule("db", **kw)
            self.assertEqual(e.exception.kwargs["argument"], argument)
        with self.assertRaises(errors.NotFound):
            await s.schedule("nope", HOUR)
        with self.assertRaises(errors.NotFound):
            await s.unschedule("db")
        self.assertEqual(await s.schedules(), [])
        self.assertEqual(self.events(c, "snapshot_schedule"), [])

    @d
    async def test_a_stop_during_a_run_arms_nothing_and_stores_nothing(self):
        """
        The control plane stops (its store closes) during a run: nothing more is armed,
        nothing of the run is stored or logged as a fault, and the next start runs it again.
        """
        c = await self.cluster()
        s = await self.schedules(c)
        held, entered = Deferred(), Deferred()

        async def closing(*a, **kw):
            entered.callback(None)
            await held
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")

        self.patch(c.apps.volumes, "snapshot", closing)
        await s.schedule("db", HOUR)
        await c.quiet()
        c.clock.advance(0)  # the run begins, and waits for its snapshot
        await entered
        s.stop()
        held.callback(None)
        await s.idle()
        await c.quiet()
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual((s.runs, s._timer), (0, None))
        [row] = await s.schedules()
        self.assertEqual((row["last_at"], row["next_at"]), (None, 0.0))  # due at the start
        await self.due(c, s, 10 * HOUR)
        self.assertEqual(s.runs, 0)

    @d
    async def test_an_app_destroyed_takes_its_schedule_one_keeping_its_volumes_does_not(self):
        c = await self.cluster()
        s = await self.schedules(c)
        await s.schedule("db", HOUR)
        await self.due(c, s)
        await c.apps.destroy_app("db")  # its volume kept: still snapshotted
        self.assertEqual([x["app"] for x in await s.schedules()], ["db"])
        store = c.apps.data.store
        await store.run(lambda db: db.execute(  # its row's delete fails: the schedule stays
            "CREATE TRIGGER refuse BEFORE DELETE ON apps BEGIN SELECT RAISE(ABORT, 'no'); END"))
        with self.assertRaises(sqlite3.IntegrityError):
            await c.apps.destroy_app("db", volumes=True)
        self.assertEqual([x["app"] for x in await s.schedules()], ["db"])
        self.assertEqual(self.events(c, "snapshot_schedule_destroyed"), [])
        await store.run(lambda db: db.execute("DROP TRIGGER refuse"))
        await c.apps.destroy_app("db", volumes=True)
        self.assertEqual(await s.schedules(), [])
        [gone] = self.events(c, "snapshot_schedule_destroyed")
        self.assertEqual(gone["payload"]["reason"], "app db destroyed")

    async def app_on(self, c, name, host):
        """App C{name}, one machine with a volume, placed on C{host} (the others drained)."""
        others = [h for h in ("h-a", "h-b", "h-c") if h != host]
        for h in others:
            await c.registry.transition(h, "drain_requested")
            await c.registry.transition(h, "drain_finished")
        await c.apps.create_app(name)
        (m,) = (await c.apps.deploy(name, c.spec(volumes=test_volume_replicas.VOLUMES)))[
            "machines"]
        for h in others:
            await c.registry.transition(h, "activate_requested")
        self.assertEqual(m["host_id"], host)
        return m["volumes"][0]

    def held_snapshots(self, c):
        """Each snapshot waits for its own Deferred (C{gates}); C{started}: their volumes."""
        real, started, gates = c.apps.volumes.snapshot, [], []

        async def snapshot(volume, *a, **kw):
            started.append(volume["id"])
            gate = Deferred()
            gates.append(gate)
            await gate
            return await real(volume, *a, **kw)

        self.patch(c.apps.volumes, "snapshot", snapshot)
        return started, gates

    @d
    async def test_a_slow_run_holds_no_other_host_s_back_and_a_host_takes_one_at_a_time(self):
        """
        Schedules run at once: an app's snapshot on h-a, held, does not hold back app
        other's on h-b; the volume of the third app, on h-a too, waits for it (one volume
        at a time on a host).
        """
        c = await self.cluster(hosts=("h-a", "h-b", "h-c"))
        other = await self.app_on(c, "other", "h-b")
        third = await self.app_on(c, "third", "h-a")
        s = await self.schedules(c)
        started, gates = self.held_snapshots(c)
        for app in ("db", "other", "third"):
            await s.schedule(app, HOUR)
        await c.quiet()
        c.clock.advance(0)
        await c.quiet()
        # one of h-a's two (the next due first: their ids decide) and h-b's, not the other
        [first] = [v for v in started if v != other]
        [then] = {c.vid, third} - {first}
        self.assertEqual(sorted(started), sorted([first, other]))
        gates[started.index(other)].callback(None)
        await c.quiet()
        [ran] = self.events(c, "snapshot_schedule_run")  # other's, while h-a's is held
        self.assertEqual(ran["payload"]["reason"], "1 of 1 volume(s) taken")
        self.assertEqual(len(await c.apps.list_snapshots(other)), 1)
        self.assertEqual(len(started), 2)
        gates[started.index(first)].callback(None)
        await c.quiet()
        self.assertEqual(started[2:], [then])  # h-a free: the other one's now
        gates[2].callback(None)
        await s.idle()
        await c.quiet()
        self.assertEqual(s.runs, 3)
        self.assertEqual([len(await c.apps.list_snapshots(v)) for v in (c.vid, other, third)],
                         [1, 1, 1])
