"""
Replicas of volume snapshots on other hosts (C{zwrm.volume.replicate|replicas|
delete_replica}) and the recovery of a lost host's volumes from them (C{zwrm.host.remove}
with C{recover_volumes}): the apps layer over a real store and the agents' real executors,
volume stores and volume streams (TLS between them; fake hypervisors), as
tests/control/test_drain.py builds them.
"""

import os
import sqlite3
import time

from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.trial.unittest import TestCase

from tests.control.test_apps import d
from tests.control.test_drain import (
    DrainCluster,
    MiB,
    corrupt_sends,
    drain_and_wait,
    sha,
    write_known,
)
from tests.control.test_healing import poll
from zwrm import errors
from zwrm.control.host_removal import HostRemoval

VOLUMES = [{"name": "data", "size_mb": 32, "mount": "/data"}]


class ReplicaTests(TestCase):
    timeout = 120

    async def cluster(self, volumes=VOLUMES, hosts=("h-a", "h-b")):
        c = await DrainCluster(self).start(hosts=hosts)
        self.addCleanup(c.drains.stop)
        c.removal = HostRemoval(c.registry, c.apps, c.drains)
        await c.apps.create_app("db")
        others = [h for h in hosts if h != "h-a"]
        for h in others:  # placed on h-a: the other hosts are drained meanwhile
            await c.registry.transition(h, "drain_requested")
            await c.registry.transition(h, "drain_finished")
        (m,) = (await c.apps.deploy("db", c.spec(volumes=volumes)))["machines"]
        for h in others:
            await c.registry.transition(h, "activate_requested")
        c.src, c.dst, c.vids = "h-a", "h-b", m["volumes"]
        c.vid = c.vids[0]
        await poll(lambda: self.running(c), what="db running")
        return c

    async def running(self, c, host="h-a"):
        return [(m["state"], m["host_id"]) for m in await c.machines("db")] == [
            ("running", host)]

    def replica_file(self, c, host, replica):
        return os.path.join(c.store_of(host).snapshots_root, replica["volume_id"],
                            replica["id"] + ".img")

    def events(self, c, kind):
        return [e for t, e in c.published if t == "zwrm.event.machine" and e["kind"] == kind]

    @d
    async def test_a_snapshot_is_replicated_to_another_host_and_deleted_there(self):
        c = await self.cluster()
        write_known(c.store_of(c.src).path(c.vid), "first")
        snap = await c.apps.snapshot_volume(c.vid, "one")
        data = sha(c.store_of(c.src).snapshot_info(c.vid, snap["id"])["path"])

        rep = await c.apps.replicate_volume(c.vid, "one", c.dst)
        self.assertEqual((rep["volume_id"], rep["host_id"], rep["snapshot_id"], rep["name"],
                          rep["state"], rep["taken_at"], rep["pruned"]),
                         (c.vid, c.dst, snap["id"], "one", "ready", snap["created_at"], []))
        path = self.replica_file(c, c.dst, rep)
        self.assertEqual(sha(path), data)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(os.path.dirname(path)).st_mode & 0o777, 0o700)
        self.assertGreater(rep["allocated_bytes"], 0)
        self.assertFalse(c.store_of(c.dst).exists(c.vid))  # a copy, not the volume
        self.assertEqual([r["id"] for r in await c.apps.list_replicas(c.vid)], [rep["id"]])
        self.assertEqual([r["id"] for r in await c.apps.list_replicas(app="db")], [rep["id"]])
        self.assertEqual([e["payload"]["reason"] for e in self.events(c, "volume_replica")],
                         ["creating", "ready"])

        # kept: the last 2 on that host
        for name in ("two", "three"):
            await c.apps.snapshot_volume(c.vid, name)
            last = await c.apps.replicate_volume(c.vid, name, c.dst, keep=2)
        self.assertEqual([p["name"] for p in last["pruned"]], ["one"])
        self.assertFalse(os.path.exists(path))
        self.assertEqual([r["name"] for r in await c.apps.list_replicas(c.vid)],
                         ["two", "three"])

        gone = await c.apps.delete_replica(c.vid, last["id"])
        self.assertEqual(gone, last["id"])
        self.assertFalse(os.path.exists(self.replica_file(c, c.dst, last)))
        self.assertEqual([r["name"] for r in await c.apps.list_replicas(c.vid)], ["two"])
        # the volume destroyed: its replicas go with it, on their host too
        await c.apps.scale("db", 0)
        await c.apps.destroy_volume(c.vid)
        self.assertEqual(await c.apps.list_replicas(), [])
        self.assertEqual(c.store_of(c.dst).snapshots(), [])

    @d
    async def test_bad_requests_change_nothing(self):
        c = await self.cluster()
        await c.apps.snapshot_volume(c.vid, "one")
        await c.apps.replicate_volume(c.vid, "one", c.dst)
        for args, error, text in (
                ((c.vid, "one", c.src), errors.Conflict, f"volume {c.vid} is on host h-a"),
                ((c.vid, "one", c.dst), errors.Conflict, "has a replica of snapshot one"),
                ((c.vid, "one", "h-x"), errors.NotFound, "no host 'h-x'"),
                ((c.vid, "two", c.dst), errors.NotFound, "has no snapshot 'two'"),
                (("v-nope", "one", c.dst), errors.NotFound, "no volume 'v-nope'"),
                ((c.vid, "one", None), errors.Conflict, "has a replica of snapshot one"),
                ((c.vid, "one", ""), errors.InvalidArgument, "a host to copy it to")):
            with self.assertRaises(error) as e:
                await c.apps.replicate_volume(*args)
            self.assertIn(text, e.exception.message)
        with self.assertRaises(errors.InvalidArgument):
            await c.apps.replicate_volume(c.vid, "one", c.dst, keep=0)
        await c.registry.transition(c.dst, "drain_requested")
        await c.apps.snapshot_volume(c.vid, "two")
        with self.assertRaises(errors.Conflict) as e:
            await c.apps.replicate_volume(c.vid, "two", c.dst)
        self.assertIn("h-b is draining: replicas go to a ready host", e.exception.message)
        with self.assertRaises(errors.NotFound):
            await c.apps.delete_replica(c.vid, "r-nope")
        # an agent of the version before (during an upgrade) cannot take one
        await c.registry.transition(c.dst, "undrain_requested")
        procs = c.executors[c.dst][1]
        facts = procs["host.facts"]
        procs["host.facts"] = lambda: {k: v for k, v in facts().items()
                                       if k != "snapshot_streams"}
        with self.assertRaises(errors.Conflict) as e:
            await c.apps.replicate_volume(c.vid, "two", c.dst)
        self.assertEqual(e.exception.message, f"the agent of host {c.dst} is of a version that "
                                              "cannot copy snapshots: upgrade it first")
        self.assertEqual(len(await c.apps.list_replicas()), 1)
        self.assertEqual(len(c.store_of(c.dst).snapshots()), 1)

    @d
    async def test_a_copy_that_fails_keeps_nothing(self):
        c = await self.cluster()
        await c.apps.snapshot_volume(c.vid, "one")
        procs = c.executors[c.src][1]
        send = procs["volume.send"]
        procs["volume.send"] = lambda *a, **kw: fail(errors.Unavailable("cut off (test)"))
        with self.assertRaises(errors.Unavailable):
            await c.apps.replicate_volume(c.vid, "one", c.dst)
        self.assertEqual(await c.apps.list_replicas(), [])
        self.assertEqual(c.store_of(c.dst).snapshots(), [])
        self.assertEqual(c.transfers[c.dst].receiver._transfers, {})  # its token cancelled
        [failed] = self.events(c, "volume_replica_failed")
        self.assertIn("cut off (test)", failed["payload"]["reason"])
        procs["volume.send"] = send
        await c.apps.replicate_volume(c.vid, "one", c.dst)  # again, once it can

    @d
    async def test_a_lost_host_s_volume_is_recovered_from_its_newest_replica(self):
        c = await self.cluster()
        vol = c.store_of(c.src).path(c.vid)
        write_known(vol, "old")
        await c.apps.snapshot_volume(c.vid, "one")
        await c.apps.replicate_volume(c.vid, "one", c.dst)
        newest = write_known(vol, "newest")
        await c.apps.snapshot_volume(c.vid, "two")
        rep = await c.apps.replicate_volume(c.vid, "two", c.dst)
        write_known(vol, "lost with the host", offsets=(9 * MiB,))

        await c.registry.mark_offline(c.src)
        # removed without a word on its volumes: refused, naming the replica recovery takes
        with self.assertRaises(errors.Conflict) as e:
            await c.removal.remove(c.src)
        taken = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(rep["taken_at"]))
        self.assertEqual(e.exception.message,
                         f"host {c.src} holds volumes {c.vid}. Their newest replicas on ready"
                         f" hosts: {c.vid} snapshot two of {taken} on {c.dst}. Bring the host"
                         " back and drain it to move them whole; recover them from those"
                         " replicas, losing what was written since (`zwrm host remove"
                         " --recover-volumes`); or give their data up (`zwrm host remove"
                         " --forget-volumes`)")
        result = await c.removal.remove(c.src, recover_volumes=True)
        self.assertEqual(result["volumes_forgotten"], [])
        self.assertEqual(result["volumes_recovered"], [
            {"volume_id": c.vid, "host_id": c.dst, "replica_id": rep["id"], "snapshot": "two",
             "taken_at": rep["taken_at"]}])
        self.assertEqual(result["rescheduled"], [{"app": "db", "replicas": [0]}])
        # the volume is on h-b with the data of its newest replica
        self.assertEqual((await c.store.get("volumes", c.vid))["host_id"], c.dst)
        self.assertEqual(sha(c.store_of(c.dst).path(c.vid)), newest)
        # its replicas there are its snapshots now; none is a replica any more
        self.assertEqual(await c.apps.list_replicas(), [])
        snaps = await c.apps.list_snapshots(c.vid)
        self.assertEqual([(s["name"], s["host_id"], s["state"]) for s in snaps],
                         [("one", c.dst, "ready"), ("two", c.dst, "ready")])
        self.assertEqual(sorted(s["id"] for s in c.store_of(c.dst).snapshots(c.vid)),
                         sorted(s["id"] for s in snaps))
        made = [e for e in self.events(c, "volume_snapshot")
                if e["payload"]["reason"].startswith(("recovered", "a replica of"))]
        self.assertEqual([(e["payload"]["snapshot_id"], e["payload"]["host_id"]) for e in made],
                         [(s["id"], c.dst) for s in snaps])
        [event] = self.events(c, "volume_recovered")
        self.assertEqual((event["subject"], event["payload"]["from"],
                          event["payload"]["replica"]["id"]), (c.vid, c.src, rep["id"]))
        # the replica runs again, on h-b, with that volume
        await poll(lambda: self.running(c, c.dst), what="db running on h-b")
        [m] = await c.machines("db")
        self.assertEqual(c.store_of(c.dst).in_use(c.vid), m["id"])
        # and a snapshot restores there
        await c.apps.scale("db", 0)
        await c.apps.restore_volume(c.vid, "one")

    @d
    async def test_a_fencing_host_s_volumes_are_recovered_once_it_has_stopped_them(self):
        """
        Its agent stops its machines with volumes 60 s after it last heard from the
        control plane (fence_after, reported at registration): its volumes are recovered
        only once that and the margin have passed since its last heartbeat (counted from
        the control plane's start at most); before, refused, nothing changed.
        """
        c = await self.cluster()
        await c.apps.snapshot_volume(c.vid, "one")
        await c.apps.replicate_volume(c.vid, "one", c.dst)
        await c.registry.register(c.src, {"fence_after": 60})
        self.assertEqual(c.registry.hosts.wire(c.src)["fence_after"], 60.0)
        self.assertEqual((await c.store.get("hosts", c.src))["fence_after"], 60.0)
        await c.registry.mark_offline(c.src)
        c.clock.advance(30)
        with self.assertRaises(errors.Conflict) as e:
            await c.removal.remove(c.src, recover_volumes=True)
        self.assertEqual(e.exception.message,
                         f"host {c.src}'s agent stops its machines with volumes 60 s after it"
                         " last heard from the control plane (fence_after), and its last"
                         " heartbeat came 30 s ago: recover its volumes in 45 s, once they"
                         " are stopped there for sure")
        self.assertIn(c.src, c.registry.hosts)
        self.assertEqual((await c.store.get("volumes", c.vid))["host_id"], c.src)
        c.clock.advance(45)
        result = await c.removal.remove(c.src, recover_volumes=True)
        self.assertEqual([v["host_id"] for v in result["volumes_recovered"]], [c.dst])

    @d
    async def test_a_recovery_that_fails_changes_nothing(self):
        c = await self.cluster(volumes=VOLUMES + [{"name": "logs", "size_mb": 8,
                                                   "mount": "/logs"}])
        for vid in c.vids:
            await c.apps.snapshot_volume(vid, "one")
            await c.apps.replicate_volume(vid, "one", c.dst)
        procs = c.executors[c.dst][1]
        recover = procs["volume.recover"]
        asked = []

        def second_fails(vid, rid):
            asked.append(vid)
            if len(asked) == 2:
                return fail(errors.ResourceExhausted("no room (test)"))
            return recover(vid, rid)

        procs["volume.recover"] = second_fails
        await c.registry.mark_offline(c.src)
        with self.assertRaises(errors.ResourceExhausted):
            await c.removal.remove(c.src, recover_volumes=True)
        self.assertEqual(len(asked), 2)
        # the first volume made there is deleted again; its replica stays
        self.assertEqual(c.store_of(c.dst).list(), [])
        self.assertEqual(len(c.store_of(c.dst).snapshots()), 2)
        self.assertEqual(len(await c.apps.list_replicas()), 2)
        self.assertEqual({v["host_id"] for v in await c.apps.list_volumes("db")}, {c.src})
        self.assertIn(c.src, c.registry)
        procs["volume.recover"] = recover
        result = await c.removal.remove(c.src, recover_volumes=True)
        self.assertEqual(sorted(v["volume_id"] for v in result["volumes_recovered"]),
                         sorted(c.vids))

    @d
    async def test_a_volume_without_a_replica_is_refused_unless_given_up(self):
        c = await self.cluster(volumes=VOLUMES + [{"name": "logs", "size_mb": 8,
                                                   "mount": "/logs"}])
        data, logs = c.vids
        await c.apps.snapshot_volume(data, "one")
        await c.apps.replicate_volume(data, "one", c.dst)
        await c.registry.mark_offline(c.src)
        with self.assertRaises(errors.Conflict) as e:
            await c.removal.remove(c.src, recover_volumes=True)
        self.assertIn(f"volumes {logs} of host h-a have no replica on a ready host",
                      e.exception.message)
        self.assertEqual(c.store_of(c.dst).list(), [])
        result = await c.removal.remove(c.src, recover_volumes=True, forget_volumes=True)
        self.assertEqual([v["volume_id"] for v in result["volumes_recovered"]], [data])
        self.assertEqual(result["volumes_forgotten"], [logs])
        self.assertIn(data, [v["id"] for v in c.store_of(c.dst).list()])

    @d
    async def test_the_replicas_of_a_volume_given_up_go_with_it(self):
        c = await self.cluster()
        await c.apps.snapshot_volume(c.vid, "one")
        rep = await c.apps.replicate_volume(c.vid, "one", c.dst)
        await c.registry.mark_offline(c.src)
        result = await c.removal.remove(c.src, forget_volumes=True)
        self.assertEqual(result["volumes_forgotten"], [c.vid])
        self.assertEqual(await c.apps.list_replicas(), [])
        self.assertFalse(os.path.exists(self.replica_file(c, c.dst, rep)))
        [gone] = self.events(c, "volume_replica_destroyed")
        self.assertIn("given up", gone["payload"]["reason"])

    @d
    async def test_a_removed_host_s_replicas_go_with_it(self):
        c = await self.cluster()
        await c.apps.snapshot_volume(c.vid, "one")
        rep = await c.apps.replicate_volume(c.vid, "one", c.dst)
        await c.registry.mark_offline(c.dst)
        result = await c.removal.remove(c.dst)
        self.assertEqual(result["replicas_forgotten"], [
            {"replica_id": rep["id"], "volume_id": c.vid, "host_id": c.dst}])
        self.assertEqual(await c.apps.list_replicas(), [])
        [gone] = self.events(c, "volume_replica_destroyed")
        self.assertIn("h-b was removed", gone["payload"]["reason"])

    @d
    async def test_a_drain_onto_the_replica_s_host_makes_it_a_snapshot(self):
        """
        A replica on the host a drain moves its volume to: one of a snapshot that moved
        too goes (its data is there twice); one of a snapshot deleted since becomes a
        snapshot of the volume there.
        """
        c = await self.cluster()
        write_known(c.store_of(c.src).path(c.vid), "first")
        one = await c.apps.snapshot_volume(c.vid, "one")
        twice = await c.apps.replicate_volume(c.vid, "one", c.dst)
        await c.apps.snapshot_volume(c.vid, "two")
        only = await c.apps.replicate_volume(c.vid, "two", c.dst)
        await c.apps.delete_snapshot(c.vid, "two")
        _, status = await drain_and_wait(c, c.src)
        self.assertEqual(status["state"], "completed")
        self.assertEqual(await c.apps.list_replicas(), [])
        snaps = await c.apps.list_snapshots(c.vid)
        self.assertEqual([(s["id"], s["name"], s["host_id"]) for s in snaps],
                         [(one["id"], "one", c.dst), (only["id"], "two", c.dst)])
        self.assertEqual(sorted(s["id"] for s in c.store_of(c.dst).snapshots(c.vid)),
                         sorted([one["id"], only["id"]]))
        self.assertFalse(os.path.exists(self.replica_file(c, c.dst, twice)))
        self.assertEqual(c.store_of(c.src).snapshots(), [])
        [gone] = self.events(c, "volume_replica_destroyed")
        self.assertEqual(gone["payload"]["replica_id"], twice["id"])

    @d
    async def test_a_drain_waits_for_a_replica_being_copied(self):
        c = await self.cluster()
        await c.apps.snapshot_volume(c.vid, "one")
        procs = c.executors[c.src][1]
        send = procs["volume.send"]
        held = []

        def hold(*a, **kw):
            held.append((Deferred(), a, kw))
            return held[-1][0]

        procs["volume.send"] = hold
        copying = ensureDeferred(c.apps.replicate_volume(c.vid, "one", c.dst))

        async def under_way():
            return bool(held)

        await poll(under_way, what="the copy under way")
        with self.assertRaises(errors.Conflict) as e:
            await c.drains.drain(c.src, dry_run=True)
        self.assertIn(f"a replica of volume {c.vid} on host h-a is being copied",
                      e.exception.message)
        with self.assertRaises(errors.Conflict) as e:  # nor the host it is copied to
            await c.drains.drain(c.dst, dry_run=True)
        self.assertIn(f"a replica of volume {c.vid} is being copied to host {c.dst}",
                      e.exception.message)
        d_, a, kw = held[0]
        send(*a, **kw).chainDeferred(d_)
        await copying
        await c.drains.drain(c.src, dry_run=True)
        await c.drains.drain(c.dst, dry_run=True)

    @d
    async def test_replicas_a_stopped_control_plane_left_creating_are_settled(self):
        """
        Rows stored C{creating} by a control plane that stopped during the copy: once the
        replica's host is reconciled, a copy it has is made ready with its sizes, one it
        does not have is removed.
        """
        c = await self.cluster()
        snap = await c.apps.snapshot_volume(c.vid, "one")
        done = await c.apps.replicate_volume(c.vid, "one", c.dst)
        done.pop("pruned")
        lost = dict(done, id="r-000000000001", state="creating", allocated_bytes=0)
        await c.apps.data.volumes.add_replica(lost)
        await c.apps.data.volumes.replica_failed(done, "(test)")  # its row, not its file
        await c.apps.data.volumes.add_replica(dict(done, state="creating", allocated_bytes=0))
        await c.registry._fetch_and_reconcile(c.dst, None)
        [settled] = await c.apps.list_replicas(c.vid)
        self.assertEqual((settled["id"], settled["state"], settled["snapshot_id"]),
                         (done["id"], "ready", snap["id"]))
        self.assertEqual(settled["allocated_bytes"], done["allocated_bytes"])
        failed = self.events(c, "volume_replica_failed")
        self.assertEqual(failed[-1]["payload"]["replica_id"], lost["id"])
        self.assertIn("control plane stopped", failed[-1]["payload"]["reason"])

    @d
    async def test_a_recovery_that_cannot_be_stored_is_undone_and_one_stored_is_kept(self):
        """
        The volume was made on the replica's host, but the removal cannot be stored (the
        control plane's disk full; here SQLite refuses the host row's deletion): the volume
        made there is deleted (its replica stays) and nothing changed. Once stored, a
        failure after it (placing the replica again) never undoes it.
        """
        c = await self.cluster()
        await c.apps.snapshot_volume(c.vid, "one")
        await c.apps.replicate_volume(c.vid, "one", c.dst)
        await c.registry.mark_offline(c.src)
        await c.store.run(lambda db: db.execute(
            "CREATE TRIGGER refuse BEFORE DELETE ON hosts"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        with self.assertRaises(sqlite3.IntegrityError):
            await c.removal.remove(c.src, recover_volumes=True)
        self.assertFalse(c.store_of(c.dst).exists(c.vid))
        self.assertEqual(len(c.store_of(c.dst).snapshots(c.vid)), 1)
        self.assertEqual((await c.store.get("volumes", c.vid))["host_id"], c.src)
        self.assertEqual(len(await c.apps.list_replicas()), 1)
        self.assertIn(c.src, c.registry)
        await c.store.run(lambda db: db.execute("DROP TRIGGER refuse"))

        async def broken(host_id):
            raise RuntimeError("placing failed (test)")

        self.patch(c.removal, "_reschedule", broken)
        with self.assertRaises(RuntimeError):
            await c.removal.remove(c.src, recover_volumes=True)
        self.assertTrue(c.store_of(c.dst).exists(c.vid))  # stored: it is the volume now
        self.assertEqual((await c.store.get("volumes", c.vid))["host_id"], c.dst)

    @d
    async def test_a_replica_on_an_agent_of_the_version_before_is_not_recovered_from(self):
        c = await self.cluster()
        await c.apps.snapshot_volume(c.vid, "one")
        await c.apps.replicate_volume(c.vid, "one", c.dst)
        procs = c.executors[c.dst][1]
        facts = procs["host.facts"]
        procs["host.facts"] = lambda: {k: v for k, v in facts().items()
                                       if k != "snapshot_streams"}
        await c.registry.mark_offline(c.src)
        with self.assertRaises(errors.Conflict) as e:
            await c.removal.remove(c.src, recover_volumes=True)
        self.assertEqual(e.exception.message, f"the agent of host {c.dst} is of a version that "
                                              "cannot recover a volume from its replica: "
                                              "upgrade it first")
        self.assertEqual(c.store_of(c.dst).list(), [])
        self.assertIn(c.src, c.registry)
        procs["host.facts"] = facts
        await c.removal.remove(c.src, recover_volumes=True)
        self.assertTrue(c.store_of(c.dst).exists(c.vid))

    @d
    async def test_a_replica_with_no_host_named_follows_the_newest_or_the_scheduler(self):
        c = await self.cluster(hosts=("h-a", "h-b", "h-c"))
        await c.apps.snapshot_volume(c.vid, "one")
        first = await c.apps.replicate_volume(c.vid, "one")
        self.assertIn(first["host_id"], ("h-b", "h-c"))  # the scheduler's pick, not h-a
        other = "h-c" if first["host_id"] == "h-b" else "h-b"
        await c.apps.snapshot_volume(c.vid, "two")
        await c.apps.replicate_volume(c.vid, "two", other)
        await c.apps.snapshot_volume(c.vid, "three")
        third = await c.apps.replicate_volume(c.vid, "three")
        self.assertEqual(third["host_id"], other)  # with the newest, not the scheduler's
        # that host not ready: the scheduler's pick again
        await c.registry.transition(other, "drain_requested")
        await c.apps.snapshot_volume(c.vid, "four")
        fourth = await c.apps.replicate_volume(c.vid, "four")
        self.assertEqual(fourth["host_id"], first["host_id"])
        # and with no other host ready, none fits
        await c.registry.transition(first["host_id"], "drain_requested")
        await c.apps.snapshot_volume(c.vid, "five")
        with self.assertRaises(errors.Unplaceable):
            await c.apps.replicate_volume(c.vid, "five")
        self.assertEqual(len(await c.apps.list_replicas()), 4)


class DrainedReplicaTests(TestCase):
    """A drain moves the replicas on its host (its machines first), or says why not."""

    timeout = 120
    cluster, running = ReplicaTests.cluster, ReplicaTests.running
    replica_file, events = ReplicaTests.replica_file, ReplicaTests.events

    @d
    async def test_a_drain_moves_the_replicas_on_its_host(self):
        c = await self.cluster(hosts=("h-a", "h-b", "h-c"))
        write_known(c.store_of(c.src).path(c.vid), "first")
        reps = []
        for name in ("one", "two"):
            await c.apps.snapshot_volume(c.vid, name)
            reps.append(await c.apps.replicate_volume(c.vid, name, "h-b"))
        data = [sha(self.replica_file(c, "h-b", r)) for r in reps]
        # and two machines there, moved at once first (each move's end asks for the next)
        for h in ("h-a", "h-c"):
            await c.registry.transition(h, "drain_requested")
        await c.apps.create_app("web")
        await c.apps.deploy("web", c.spec(replicas=2))
        for h in ("h-a", "h-c"):
            await c.registry.transition(h, "undrain_requested")
        self.assertEqual([m["host_id"] for m in await c.machines("web")], ["h-b", "h-b"])

        plan = await c.drains.drain("h-b", dry_run=True)
        self.assertEqual([(r["replica"], r["name"], r["target"], r["reason"])
                          for r in plan["replicas"]],
                         [(reps[0]["id"], "one", "h-c", None), (reps[1]["id"], "two", "h-c", None)])
        self.assertEqual([r["host_id"] for r in await c.apps.list_replicas()], ["h-b", "h-b"])

        result, status = await drain_and_wait(c, "h-b", max_parallel=2)
        self.assertEqual(status["state"], "completed")
        self.assertEqual([m["phase"] for m in status["migrations"]], ["done", "done"])
        moved = await c.apps.list_replicas(c.vid)
        self.assertEqual([(r["name"], r["host_id"], r["snapshot_id"], r["taken_at"], r["state"])
                          for r in moved],
                         [(r["name"], "h-c", r["snapshot_id"], r["taken_at"], "ready")
                          for r in reps])
        self.assertEqual([sha(self.replica_file(c, "h-c", r)) for r in moved], data)
        for r in moved:
            self.assertEqual(os.stat(self.replica_file(c, "h-c", r)).st_mode & 0o777, 0o600)
        self.assertEqual(c.store_of("h-b").snapshots(), [])
        self.assertEqual([(r["state"], r["target"], r["replica"]) for r in status["replicas"]],
                         [("moved", "h-c", r["id"]) for r in moved])
        # a control plane started since (what this one moved is not in its memory) says
        # the same: the moves' replicas say which drain made them
        c.drains.replica_moves.clear()
        self.assertEqual((await c.drains.drain_status("h-b"))["replicas"], status["replicas"])
        gone = self.events(c, "volume_replica_destroyed")
        self.assertEqual([e["payload"]["replica_id"] for e in gone], [r["id"] for r in reps])
        self.assertIn(f"moved to h-c as {moved[0]['id']} (drain {result['drain_id']})",
                      gone[0]["payload"]["reason"])
        # the drained host's removal forgets none
        await c.registry.mark_offline("h-b")
        self.assertEqual((await c.removal.remove("h-b"))["replicas_forgotten"], [])

    @d
    async def test_a_replica_no_other_host_may_keep_stays_and_the_drain_completes(self):
        c = await self.cluster()
        await c.apps.snapshot_volume(c.vid, "one")
        rep = await c.apps.replicate_volume(c.vid, "one", c.dst)
        plan = await c.drains.drain(c.dst, dry_run=True)
        [item] = plan["replicas"]
        self.assertIsNone(item["target"])
        self.assertIn(f"no host may keep replica {rep['id']} of volume {c.vid}", item["reason"])
        _, status = await drain_and_wait(c, c.dst)
        self.assertEqual(status["state"], "completed")
        [item] = status["replicas"]
        self.assertEqual((item["replica"], item["state"]), (rep["id"], "left"))
        self.assertIn("no host may keep", item["reason"])
        # announced (stored first): a control plane started since says why it stayed too
        [event] = [e for e in c.published if e[0] == "zwrm.event.drain"
                   and e[1]["kind"] == "replica"]
        self.assertEqual(event[1]["payload"]["replica"], dict(item, copy=None))
        self.assertEqual(event[1]["payload"]["reason"],
                         f"replica {rep['id']} stays: {item['reason']}")
        c.drains.replica_moves.clear()
        self.assertEqual((await c.drains.drain_status(c.dst))["replicas"], [item])
        self.assertEqual([(r["id"], r["host_id"]) for r in await c.apps.list_replicas()],
                         [(rep["id"], c.dst)])
        self.assertTrue(os.path.exists(self.replica_file(c, c.dst, rep)))

    @d
    async def test_a_replica_whose_copy_fails_stays_where_it_was(self):
        c = await self.cluster(hosts=("h-a", "h-b", "h-c"))
        await c.apps.snapshot_volume(c.vid, "one")
        rep = await c.apps.replicate_volume(c.vid, "one", "h-b")
        before = sha(self.replica_file(c, "h-b", rep))
        corrupt_sends(c, "h-b")
        _, status = await drain_and_wait(c, "h-b")
        self.assertEqual(status["state"], "completed")
        [item] = status["replicas"]
        self.assertEqual(item["state"], "left")
        self.assertIn("failed verification", item["reason"])
        self.assertEqual([(r["id"], r["host_id"], r["state"])
                          for r in await c.apps.list_replicas()], [(rep["id"], "h-b", "ready")])
        self.assertEqual(sha(self.replica_file(c, "h-b", rep)), before)
        self.assertEqual(c.store_of("h-c").snapshots(), [])
        # moved by the drain tried again, once the stream is sound
        c.transfers["h-b"].sender.send = type(c.transfers["h-b"].sender).send.__get__(
            c.transfers["h-b"].sender)
        await c.drains.activate("h-b")
        c.clock.advance(1)  # (drain-status reads the newest drain)
        _, status = await drain_and_wait(c, "h-b")
        [item] = status["replicas"]
        self.assertEqual((item["state"], item["target"]), ("moved", "h-c"))

    @d
    async def test_a_move_whose_end_was_not_stored_only_deletes_the_old_copy(self):
        c = await self.cluster(hosts=("h-a", "h-b", "h-c"))
        await c.apps.snapshot_volume(c.vid, "one")
        old = await c.apps.replicate_volume(c.vid, "one", "h-b")
        there = await c.apps.replicate_volume(c.vid, "one", "h-c")
        _, status = await drain_and_wait(c, "h-b")
        [item] = status["replicas"]
        self.assertEqual((item["state"], item["target"], item["replica"]),
                         ("moved", "h-c", there["id"]))
        self.assertEqual([r["id"] for r in await c.apps.list_replicas()], [there["id"]])
        self.assertFalse(os.path.exists(self.replica_file(c, "h-b", old)))
        self.assertEqual(len(self.events(c, "volume_replica")), 4)  # no new copy made

    @d
    async def test_a_replica_goes_to_a_host_whose_cpus_are_all_taken(self):
        """
        Every other host's vCPUs are taken by machines: a replica, data only, still goes
        to one (the one with the most disk left to allocate), and so does a drain's move.
        """
        c = await self.cluster(hosts=("h-a", "h-b", "h-c"))
        await c.apps.create_app("busy")  # 8 vCPUs each: not on h-a (db has 1 of its 8)
        await c.apps.deploy("busy", c.spec(vcpus=8, replicas=2))
        self.assertEqual(sorted(m["host_id"] for m in await c.machines("busy")),
                         ["h-b", "h-c"])
        await c.apps.snapshot_volume(c.vid, "one")
        rep = await c.apps.replicate_volume(c.vid, "one")
        self.assertEqual((rep["host_id"], rep["state"]), ("h-c", "ready"))
        volume = await c.apps.data.volumes.get(c.vid)
        self.assertEqual(await c.apps.volumes.move_target(volume, rep, exclude={"h-c"}),
                         "h-b")
        with self.assertRaises(errors.Unplaceable) as e:  # no disk: said so
            await c.apps.volumes.move_target(volume, dict(rep, allocated_bytes=10 ** 12),
                                             exclude={"h-c"})
        self.assertIn(f"no host may keep replica {rep['id']} of volume {c.vid} (not its "
                      f"volume's, h-a; not one with a copy of its snapshot): no host has "
                      f"953675 MiB of disk left to allocate for it (the most: 100000 MiB, on"
                      f" h-b)", e.exception.message)

    @d
    async def test_a_host_without_the_room_its_agent_reports_is_not_given_a_replica(self):
        c = await self.cluster(hosts=("h-a", "h-b", "h-c"))
        write_known(c.store_of(c.src).path(c.vid), "first")
        snap = await c.apps.snapshot_volume(c.vid, "one")
        need = -(-snap["allocated_bytes"] // MiB)
        floor = c.registry.min_free_disk_mb

        def free(host, room):  # its agent's heartbeat: so much free on its data disk
            c.registry.heartbeat(host, {"disk_free_mb": floor + room})

        free("h-b", need - 1)
        with self.assertRaises(errors.ResourceExhausted) as e:
            await c.apps.replicate_volume(c.vid, "one", "h-b")
        self.assertEqual(e.exception.message,
                         f"host h-b has {need - 1} MiB to spare on its data disk (what it "
                         f"reported free, less the room kept free); the copy needs {need} MiB")
        self.assertEqual(await c.apps.list_replicas(), [])
        self.assertEqual(c.store_of("h-b").snapshots(), [])
        rep = await c.apps.replicate_volume(c.vid, "one")  # not there: the other one
        self.assertEqual(rep["host_id"], "h-c")
        # a drain of h-c: h-b has not the room for its replica, which stays
        _, status = await drain_and_wait(c, "h-c")
        [item] = status["replicas"]
        self.assertEqual((item["state"], item["replica"]), ("left", rep["id"]))
        self.assertIn("no host may keep", item["reason"])
        free("h-b", -(-rep["allocated_bytes"] // MiB))  # room enough now: the next drain
        # moves it (its copy there takes what it takes on h-c)
        await c.drains.activate("h-c")
        c.clock.advance(1)
        _, status = await drain_and_wait(c, "h-c")
        [item] = status["replicas"]
        self.assertEqual((item["state"], item["target"]), ("moved", "h-b"))
        # its newest replica's host short of room: not that one (and no other is ready)
        await c.apps.snapshot_volume(c.vid, "two")
        free("h-b", 0)
        with self.assertRaises(errors.Unplaceable):
            await c.apps.replicate_volume(c.vid, "two")

    @d
    async def test_copies_under_way_to_a_host_count_against_its_room(self):
        """
        Two copies begun at once to a host with the room for one: the second is refused
        while the first is under way (the free space its agent reported does not show
        the first yet); what the first announces it wrote there is taken off (its agent's
        next heartbeat counts it); once it ends, the second goes where there is room.
        """
        c = await self.cluster(VOLUMES + [{"name": "logs", "size_mb": 32, "mount": "/logs"}],
                               hosts=("h-a", "h-b", "h-c"))
        snaps = []
        for vid in c.vids:
            write_known(c.store_of(c.src).path(vid), vid)
            snaps.append(await c.apps.snapshot_volume(vid, "one"))
        need = [-(-s["allocated_bytes"] // MiB) for s in snaps]
        floor = c.registry.min_free_disk_mb

        def free(host, room):  # its agent's heartbeat: so much free on its data disk
            c.registry.heartbeat(host, {"disk_free_mb": floor + room})

        free("h-b", need[0] + need[1] - 1)
        free("h-c", 0)
        _, procs = c.executors[c.src]
        send, held = procs["volume.send"], []

        def hold(*a, details=None, **kw):
            held.append((Deferred(), details))
            return held[-1][0].addCallback(lambda _: send(*a, details=details, **kw))

        procs["volume.send"] = hold
        first = ensureDeferred(c.apps.replicate_volume(c.vids[0], "one", "h-b"))

        async def copying():
            return bool(held)

        await poll(copying, what="the first copy under way")
        procs["volume.send"] = send

        async def refused(under_way=""):
            with self.assertRaises(errors.ResourceExhausted) as e:
                await c.apps.replicate_volume(c.vids[1], "one", "h-b")
            self.assertEqual(e.exception.message,
                             f"host h-b has {need[1] - 1} MiB to spare on its data disk (what "
                             f"it reported free, less the room kept free{under_way}); the copy"
                             f" needs {need[1]} MiB")

        await refused(f", less {need[0]} MiB of copies under way to it")
        with self.assertRaises(errors.Unplaceable):  # nor is h-b picked for it
            await c.apps.replicate_volume(c.vids[1], "one")
        # the first announces all of it written there, and h-b's heartbeat counts it
        total = snaps[0]["allocated_bytes"]
        held[0][1].progress({"sent": total, "done": total, "total": total})
        free("h-b", need[1] - 1)
        await refused()
        held[0][0].callback(None)
        self.assertEqual((await first)["state"], "ready")
        self.assertEqual(await c.apps.list_replicas(c.vids[1]), [])
        free("h-b", need[1])
        rep = await c.apps.replicate_volume(c.vids[1], "one")
        self.assertEqual((rep["state"], rep["host_id"]), ("ready", "h-b"))

    @d
    async def test_a_control_plane_stopping_during_a_move_ends_it_quietly(self):
        """(Its store may close under the copy: the next start resumes the drain.)"""
        c = await self.cluster(hosts=("h-a", "h-b", "h-c"))
        await c.apps.snapshot_volume(c.vid, "one")
        rep = await c.apps.replicate_volume(c.vid, "one", "h-b")
        procs = c.executors["h-b"][1]
        held = []

        def hold(*a, **kw):
            held.append(Deferred())
            return held[-1]

        procs["volume.send"] = hold
        await c.drains.drain("h-b")

        async def copying():
            return bool(held)

        await poll(copying, what="the replica's copy under way")
        c.drains.stop()
        held[0].errback(sqlite3.ProgrammingError("Cannot operate on a closed database."))
        await c.quiet()
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual([r["id"] for r in await c.apps.list_replicas() if r["state"] == "ready"],
                         [rep["id"]])
