"""
Volume snapshots through the control plane (C{zwrm.volume.snapshot|snapshots|restore|
delete_snapshot}): the apps layer over a real store and the agents' real executors and
volume stores (real ext4 images; fake hypervisors), as tests/control/test_apps.py builds
them.
"""

import re

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from tests.control.test_apps import Cluster, d
from tests.control.test_healing import poll
from zwrm import errors
from zwrm.control.drain import Drains
from zwrm.control.host_removal import HostRemoval

VOLUME = [{"name": "data", "size_mb": 4, "mount": "/data"}]
AT = 4 << 20 - 1  # an offset inside the 4 MiB volume, past ext4's metadata


class SnapshotTests(TestCase):
    async def cluster(self, hosts=("h-a", "h-b")):
        c = await Cluster(self).start(hosts=hosts)
        c.drains = Drains(c.clock, c.store, c.registry, c.apps, c.publish)
        self.addCleanup(c.drains.stop)
        await c.apps.create_app("db")
        await c.apps.deploy("db", c.spec(volumes=VOLUME))
        (m,) = await c.machines("db")
        await poll(lambda: self.running(c), what="db running")
        c.volume = (await c.apps.list_volumes("db"))[0]
        c.host = c.volume["host_id"]
        c.store_of = c.executors[c.host][0].volumes
        return c

    async def running(self, c):
        return [m["state"] for m in await c.machines("db")] == ["running"]

    def write(self, c, text):
        with open(c.store_of.path(c.volume["id"]), "r+b") as f:
            f.seek(3 << 20)
            f.write(text)

    def read(self, path):
        with open(path, "rb") as f:
            f.seek(3 << 20)
            return f.read(5)

    def events(self, c, kind):
        return [e for t, e in c.published if t == "zwrm.event.machine" and e["kind"] == kind]

    @d
    async def test_snapshot_a_running_volume_then_restore_it_once_scaled_away(self):
        c = await self.cluster()
        vid = c.volume["id"]
        self.write(c, b"first")
        snap = await c.apps.snapshot_volume(vid, "one")
        self.assertEqual((snap["name"], snap["state"], snap["live"], snap["host_id"]),
                         ("one", "ready", True, c.host))
        self.assertEqual(snap["size_bytes"], 4 << 20)
        [on_host] = c.store_of.snapshots(vid)
        self.assertEqual(on_host["id"], snap["id"])
        self.assertEqual(self.read(on_host["path"]), b"first")
        # stored before announced: creating, then ready, both in the event log
        made = self.events(c, "volume_snapshot")
        self.assertEqual([e["payload"]["reason"] for e in made], ["creating", "ready"])
        logged = {e["id"] for e in await c.store.select("events")}
        self.assertTrue(all(e["id"] in logged for e in made))

        self.write(c, b"later")
        with self.assertRaises(errors.Conflict) as e:
            await c.apps.restore_volume(vid, "one")
        self.assertIn("scale replica 0 of its app away first", e.exception.message)
        self.assertEqual(self.read(c.store_of.path(vid)), b"later")

        await c.apps.scale("db", 0)
        got = await c.apps.restore_volume(vid, "one")
        self.assertEqual(self.read(c.store_of.path(vid)), b"first")
        kept = got["kept"]
        self.assertRegex(kept["name"], r"^before-restore-\d{8}-\d{6}$")
        self.assertEqual(kept["state"], "ready")
        self.assertEqual(self.read(c.store_of.snapshot_info(vid, kept["id"])["path"]), b"later")
        [restored] = self.events(c, "volume_restored")
        self.assertEqual((restored["subject"], restored["payload"]["snapshot"],
                          restored["payload"]["kept"]["name"]), (vid, "one", kept["name"]))
        names = [s["name"] for s in await c.apps.list_snapshots(vid)]
        self.assertEqual(names, ["one", kept["name"]])
        self.assertEqual(len(await c.apps.list_snapshots(app="db")), 2)

        # The replica comes back with the restored data.
        await c.apps.scale("db", 1)
        await poll(lambda: self.running(c), what="db running again")
        # A snapshot of a volume at rest (its machine down) is not live.
        await c.apps.scale("db", 0)
        rest = await c.apps.snapshot_volume(vid)
        self.assertFalse(rest["live"])
        self.assertRegex(rest["name"], r"^\d{8}-\d{6}$")

        self.assertEqual(await c.apps.delete_snapshot(vid, kept["name"]), kept["id"])
        self.assertEqual(sorted(s["id"] for s in c.store_of.snapshots(vid)),
                         sorted([snap["id"], rest["id"]]))
        self.assertEqual(len(self.events(c, "volume_snapshot_destroyed")), 1)

        # The app's volumes destroyed: their snapshots go first, on the host and in the store.
        await c.apps.destroy_app("db", volumes=True)
        self.assertEqual(c.store_of.snapshots(), [])
        self.assertEqual(await c.apps.list_snapshots(), [])

    @d
    async def test_bad_requests_change_nothing(self):
        c = await self.cluster()
        vid = c.volume["id"]
        await c.apps.snapshot_volume(vid, "one")
        before = len(c.published)
        with self.assertRaises(errors.Conflict):
            await c.apps.snapshot_volume(vid, "one")
        with self.assertRaises(errors.InvalidArgument):
            await c.apps.snapshot_volume(vid, "Bad Name")
        with self.assertRaises(errors.NotFound):
            await c.apps.snapshot_volume("v-nope")
        with self.assertRaises(errors.InvalidArgument):
            await c.apps.snapshot_volume(None)
        await c.apps.scale("db", 0)
        with self.assertRaises(errors.NotFound) as e:
            await c.apps.restore_volume(vid, "two")
        self.assertIn("has no snapshot 'two'", e.exception.message)
        with self.assertRaises(errors.NotFound):
            await c.apps.delete_snapshot(vid, "two")
        with self.assertRaises(errors.NotFound):
            await c.apps.list_snapshots("v-nope")
        self.assertEqual([e for _, e in c.published[before:]
                          if e["kind"].startswith("volume_")], [])
        self.assertEqual(len(c.store_of.snapshots(vid)), 1)

    @d
    async def test_a_snapshot_its_host_cannot_make_leaves_no_row(self):
        c = await self.cluster()
        vid = c.volume["id"]
        c.store_of.reserve_mb = 10 ** 12  # the host's disk has no room for a copy
        with self.assertRaises(errors.ResourceExhausted):
            await c.apps.snapshot_volume(vid, "one")
        self.assertEqual(await c.apps.list_snapshots(vid), [])
        [failed] = self.events(c, "volume_snapshot_failed")
        self.assertIn("not enough disk", failed["payload"]["reason"])
        self.assertEqual(c.store_of.snapshots(), [])
        c.store_of.reserve_mb = 0
        await c.apps.snapshot_volume(vid, "one")  # the name is free again

    @d
    async def test_one_snapshot_operation_at_a_time_and_none_on_a_draining_host(self):
        c = await self.cluster()
        vid = c.volume["id"]
        first = ensureDeferred(c.apps.snapshot_volume(vid, "one"))
        with self.assertRaises(errors.Conflict) as e:
            await c.apps.snapshot_volume(vid, "two")
        self.assertIn("is being snapshotted", e.exception.message)
        await first
        c.drains._starting.add(c.host)  # a drain being planned
        with self.assertRaises(errors.Conflict) as e:
            await c.apps.snapshot_volume(vid, "two")
        self.assertIn("which is draining", e.exception.message)
        c.drains._starting.discard(c.host)

        # A drain that begins while the snapshot's row is being stored (its check of the
        # host's snapshots did not see it): the snapshot gives way, its row removed.
        add = c.apps.data.volumes.add_snapshot

        async def meanwhile(row):
            c.drains._starting.add(c.host)
            return await add(row)

        self.patch(c.apps.data.volumes, "add_snapshot", meanwhile)
        await c.apps.scale("db", 0)
        for attempt in (c.apps.snapshot_volume(vid, "two"), c.apps.restore_volume(vid, "one")):
            with self.assertRaises(errors.Conflict) as e:
                await attempt
            self.assertIn("which is draining", e.exception.message)
            c.drains._starting.discard(c.host)
        self.assertEqual([s["name"] for s in await c.apps.list_snapshots(vid)], ["one"])
        self.assertEqual(len(c.store_of.snapshots(vid)), 1)

        await c.registry.transition(c.host, "drain_requested")
        with self.assertRaises(errors.Conflict) as e:
            await c.apps.snapshot_volume(vid, "two")
        self.assertIn("which is draining", e.exception.message)

    @d
    async def test_a_removed_host_s_snapshots_are_forgotten_with_its_volumes(self):
        c = await self.cluster()
        vid = c.volume["id"]
        await c.apps.snapshot_volume(vid, "one")
        await c.apps.scale("db", 0)
        await c.registry.mark_offline(c.host)
        removal = HostRemoval(c.registry, c.apps, c.drains)
        result = await removal.remove(c.host, forget_volumes=True)
        self.assertEqual(result["volumes_forgotten"], [vid])
        self.assertEqual(await c.apps.list_snapshots(), [])
        [gone] = self.events(c, "volume_snapshot_destroyed")
        self.assertTrue(re.search("was removed", gone["payload"]["reason"]))

    @d
    async def test_snapshots_a_stopped_control_plane_left_creating_are_settled(self):
        """
        Rows stored C{creating} by a control plane that stopped during the copy: once the
        host is reconciled (its agent registered again), a copy the host has is made
        ready with its sizes, one it does not have is removed.
        """
        c = await self.cluster()
        vid = c.volume["id"]
        volumes = c.apps.volumes
        done = volumes._snapshot_row(c.volume, "done", "taken on request")
        lost = volumes._snapshot_row(c.volume, "lost", "taken on request")
        for row in (done, lost):
            await c.apps.data.volumes.add_snapshot(row)
        await c.apps.scale("db", 0)
        await c.store_of.snapshot(vid, done["id"])  # the host finished this one

        await c.registry._fetch_and_reconcile(c.host, None)
        [settled] = await c.apps.list_snapshots(vid)
        self.assertEqual((settled["id"], settled["state"], settled["size_bytes"]),
                         (done["id"], "ready", 4 << 20))
        [failed] = self.events(c, "volume_snapshot_failed")
        self.assertEqual(failed["payload"]["snapshot_id"], lost["id"])
        self.assertIn("control plane stopped", failed["payload"]["reason"])

    @d
    async def test_keep_prunes_the_oldest_but_never_what_a_restore_kept(self):
        c = await self.cluster()
        vid = c.volume["id"]
        for name in ("a", "b"):
            await c.apps.snapshot_volume(vid, name)
        await c.apps.scale("db", 0)
        kept = (await c.apps.restore_volume(vid, "a"))["kept"]
        snap = await c.apps.snapshot_volume(vid, "c", keep=2)
        self.assertEqual([p["name"] for p in snap["pruned"]], ["a"])
        snap = await c.apps.snapshot_volume(vid, "d", keep=2)
        self.assertEqual([p["name"] for p in snap["pruned"]], ["b"])
        names = [s["name"] for s in await c.apps.list_snapshots(vid)]
        self.assertEqual(names, [kept["name"], "c", "d"])
        self.assertEqual(sorted(s["id"] for s in c.store_of.snapshots(vid)),
                         sorted(s["id"] for s in await c.apps.list_snapshots(vid)))
        pruned = self.events(c, "volume_snapshot_destroyed")
        self.assertEqual([e["payload"]["reason"] for e in pruned],
                         ["pruned: the last 2 snapshot(s) are kept"] * 2)
        for bad in (0, 1001, "2", True, 1.5):
            with self.assertRaises(errors.InvalidArgument):
                await c.apps.snapshot_volume(vid, "e", keep=bad)
        self.assertEqual(len(await c.apps.list_snapshots(vid)), 3)
        self.assertEqual((await c.apps.snapshot_volume(vid, keep=3))["pruned"], [])

    @d
    async def test_a_restore_whose_answer_was_lost_keeps_track_of_the_kept_data(self):
        """
        The host restored the volume but its answer was lost: asked, it has the kept copy,
        so the restore is recorded done. When it cannot even be asked, the kept row stays
        C{creating} (a drain waits for it) and is settled once the host is reconciled.
        """
        c = await self.cluster()
        vid = c.volume["id"]
        self.write(c, b"first")
        await c.apps.snapshot_volume(vid, "one")
        self.write(c, b"later")
        await c.apps.scale("db", 0)
        real = c.apps.replicas.call
        cut = set()

        async def call(host, verb, *args, **kwargs):
            if verb in cut and verb != "volume.restore":
                raise errors.Unavailable(f"host {host} is not available")
            result = await real(host, verb, *args, **kwargs)
            if verb in cut:
                raise errors.Unavailable("the connection was lost")
            return result

        self.patch(c.apps.replicas, "call", call)
        cut.add("volume.restore")
        got = await c.apps.restore_volume(vid, "one")
        self.assertEqual(self.read(c.store_of.path(vid)), b"first")
        self.assertEqual(got["kept"]["state"], "ready")
        self.assertEqual(len(self.events(c, "volume_restored")), 1)

        cut.add("volume.snapshots")  # nor can the host be asked
        self.write(c, b"third")
        with self.assertRaises(errors.Unavailable):
            await c.apps.restore_volume(vid, "one")
        self.assertEqual(self.read(c.store_of.path(vid)), b"first")
        rows = await c.apps.list_snapshots(vid)
        self.assertEqual([s["state"] for s in rows], ["ready", "ready", "creating"])
        self.assertEqual(self.read(c.store_of.snapshot_info(vid, rows[2]["id"])["path"]),
                         b"third")
        cut.clear()
        await c.registry._fetch_and_reconcile(c.host, None)
        self.assertEqual([s["state"] for s in await c.apps.list_snapshots(vid)],
                         ["ready"] * 3)

    @d
    async def test_restore_with_restart_stops_and_starts_the_same_machine_around_it(self):
        c = await self.cluster()
        vid = c.volume["id"]
        [before] = await c.machines("db")
        self.write(c, b"first")
        await c.apps.snapshot_volume(vid, "one")
        self.write(c, b"later")
        got = await c.apps.restore_volume(vid, "one", restart=True)
        self.assertEqual(self.read(c.store_of.path(vid)), b"first")
        self.assertEqual((got["machine"]["id"], got["machine"]["state"]),
                         (before["id"], "running"))
        self.assertEqual(got["kept"]["state"], "ready")
        states = [e["payload"]["state"] for t, e in c.published
                  if e["subject"] == before["id"] and e["kind"] == "state"]
        self.assertEqual(states[3:], ["stopping", "stopped", "pending", "starting", "running"])
        # the restore happened while it was stopped: between its stopped and pending events
        [restored] = self.events(c, "volume_restored")
        stopped = next(e["id"] for t, e in c.published if e["subject"] == before["id"]
                       and e["payload"].get("state") == "stopped")
        pending = max(e["id"] for t, e in c.published if e["subject"] == before["id"]
                      and e["payload"].get("state") == "pending")
        self.assertTrue(stopped < restored["id"] < pending, (stopped, restored["id"], pending))

        # A restore that fails changes nothing, and the machine runs again all the same.
        self.write(c, b"third")
        c.store_of.reserve_mb = 10 ** 12  # no room for the copy
        with self.assertRaises(errors.ResourceExhausted):
            await c.apps.restore_volume(vid, "one", restart=True)
        c.store_of.reserve_mb = 0
        self.assertEqual(self.read(c.store_of.path(vid)), b"third")
        [m] = await c.machines("db")
        self.assertEqual((m["id"], m["state"]), (before["id"], "running"))
        self.assertEqual(len(await c.apps.list_snapshots(vid)), 2)  # one, and the first kept
        with self.assertRaises(errors.InvalidArgument):
            await c.apps.restore_volume(vid, "one", restart="yes")
        # Without a running machine, restart has nothing to restart.
        await c.apps.scale("db", 0)
        got = await c.apps.restore_volume(vid, "one", restart=True)
        self.assertNotIn("machine", got)
        self.assertEqual(self.read(c.store_of.path(vid)), b"first")
