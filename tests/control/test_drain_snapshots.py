"""
A drain moves a volume's snapshots with it: each streamed to the target (real volume
streams over TLS between the agents' real volume stores), their rows moved with the volume
at the commit, the source's copies deleted once it is clean; a rollback deletes the copies
on the target and leaves everything where it was.
"""

import os

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
from zwrm import errors


class DrainSnapshotTests(TestCase):
    timeout = 120

    async def cluster(self, **kw):
        c = await DrainCluster(self).start()
        await c.apps.create_app("db")
        spec = c.spec(**kw)
        spec["volumes"] = [{"name": "data", "size_mb": 32, "mount": "/data"}]
        (m,) = (await c.apps.deploy("db", spec))["machines"]
        c.src = m["host_id"]
        c.dst = "h-b" if c.src == "h-a" else "h-a"
        c.vid = m["volumes"][0]
        return c

    async def snapshots(self, c):
        """Two snapshots: one of the running machine's volume, one of later data."""
        vol = c.store_of(c.src).path(c.vid)
        data = {}
        write_known(vol, "first")
        one = await c.apps.snapshot_volume(c.vid, "one")
        data[one["id"]] = sha(c.store_of(c.src).snapshot_info(c.vid, one["id"])["path"])
        write_known(vol, "second", offsets=(3 * MiB, 20 * MiB))
        two = await c.apps.snapshot_volume(c.vid, "two")
        data[two["id"]] = sha(c.store_of(c.src).snapshot_info(c.vid, two["id"])["path"])
        self.assertNotEqual(data[one["id"]], data[two["id"]])
        return data

    def held(self, c, host):
        store = c.store_of(host)
        return {s["id"]: sha(s["path"]) for s in store.snapshots(c.vid)}

    @d
    async def test_a_drain_moves_the_volumes_snapshots(self):
        c = await self.cluster()
        data = await self.snapshots(c)
        plan = await c.drains.drain(c.src, dry_run=True)
        self.assertEqual([p["snapshots"] for p in plan["plan"]], [2])
        store = c.store_of(c.src)
        snapshots = sum(s["allocated_bytes"] for s in store.snapshots(c.vid))
        moving = store.info(c.vid)["allocated_bytes"] + snapshots
        _, status = await drain_and_wait(c, c.src)
        self.assertEqual(status["state"], "completed")
        [mg] = status["migrations"]
        self.assertEqual((mg["phase"], mg["error"]), ("done", None))
        # byte for byte on the target, private there; nothing of them left on the source
        self.assertEqual(self.held(c, c.dst), data)
        for s in c.store_of(c.dst).snapshots(c.vid):
            self.assertEqual(os.stat(s["path"]).st_mode & 0o777, 0o600)
            self.assertEqual(os.stat(os.path.dirname(s["path"])).st_mode & 0o777, 0o700)
        self.assertEqual(self.held(c, c.src), {})
        self.assertFalse(os.path.exists(os.path.join(c.store_of(c.src).snapshots_root, c.vid)))
        rows = await c.apps.list_snapshots(c.vid)
        self.assertEqual([(r["name"], r["host_id"], r["state"]) for r in rows],
                         [("one", c.dst, "ready"), ("two", c.dst, "ready")])
        # the data moved counts them: two snapshots and the volume
        self.assertEqual(mg["bytes_total"], moving)

        # and they are the volume's there: restored on the target, snapshotted again
        await c.drains.activate(c.src)
        await c.apps.scale("db", 0)
        restored = await c.apps.restore_volume(c.vid, "one")
        self.assertEqual(sha(c.store_of(c.dst).path(c.vid)), data[rows[0]["id"]])
        self.assertEqual(restored["kept"]["host_id"], c.dst)
        await c.apps.snapshot_volume(c.vid, "three")
        self.assertEqual(len(c.store_of(c.dst).snapshots(c.vid)), 4)

    @d
    async def test_a_rollback_deletes_the_copies_and_leaves_the_snapshots(self):
        c = await self.cluster(service_port=8080,
                               health={"type": "tcp", "interval": 0.1, "grace": 0})
        data = await self.snapshots(c)
        c.probes[c.dst] = "connection refused"
        _, status = await drain_and_wait(c, c.src, healthy_deadline=5)
        [mg] = status["migrations"]
        self.assertEqual(mg["phase"], "rolled_back")
        # the copies on the target are gone with the volume's; the snapshots are where
        # they were, on disk and in the store
        self.assertEqual(c.store_of(c.dst).snapshots(), [])
        self.assertFalse(c.store_of(c.dst).exists(c.vid))
        self.assertFalse(os.path.exists(os.path.join(c.store_of(c.dst).snapshots_root, c.vid)))
        self.assertEqual(self.held(c, c.src), data)
        rows = await c.apps.list_snapshots(c.vid)
        self.assertEqual({r["host_id"] for r in rows}, {c.src})

        # the operator retries once the target is fixed: they move then
        del c.probes[c.dst]
        _, status = await drain_and_wait(c, c.src)
        self.assertEqual(status["state"], "completed")
        self.assertEqual(self.held(c, c.dst), data)
        self.assertEqual(self.held(c, c.src), {})

    @d
    async def test_a_corrupt_snapshot_copy_rolls_back(self):
        """A snapshot's stream is verified as a volume's: a changed block fails it."""
        c = await self.cluster()
        data = await self.snapshots(c)
        # a block of the second snapshot's stream altered in flight; the first was
        # copied whole
        snapshots = []

        def second_snapshot(path):
            if "/snapshots/" in path:
                snapshots.append(path)
                return len(snapshots) == 2
            return False

        corrupt_sends(c, c.src, second_snapshot)
        _, status = await drain_and_wait(c, c.src)
        [mg] = status["migrations"]
        self.assertEqual(mg["phase"], "rolled_back")
        self.assertIn("bulk_copying", mg["error"])
        self.assertIn("verification", mg["error"])
        self.assertEqual(len(snapshots), 2)
        self.assertEqual(c.store_of(c.dst).snapshots(), [])  # the first's copy too
        self.assertFalse(os.path.exists(os.path.join(c.store_of(c.dst).snapshots_root, c.vid)))
        self.assertEqual(self.held(c, c.src), data)
        self.assertEqual((await c.store.get("volumes", c.vid))["host_id"], c.src)

    @d
    async def test_a_snapshot_under_way_refuses_the_drain(self):
        c = await self.cluster()
        volume = (await c.apps.list_volumes("db"))[0]
        row = c.apps.volumes._snapshot_row(volume, "busy", "taken on request")
        await c.apps.data.volumes.add_snapshot(row)  # its host still copying
        with self.assertRaises(errors.Conflict) as e:
            await c.drains.drain(c.src)
        self.assertEqual(e.exception.message,
                         f"a snapshot or restore of volume {c.vid} on host {c.src} is under "
                         "way: drain once it is done (zwrm volumes snapshots)")
        self.assertEqual(c.registry.entry(c.src).machine.state, "ready")
        self.assertEqual(await c.store.select("drains"), [])

    @d
    async def test_an_agent_of_the_version_before_refuses_a_drain_with_snapshots(self):
        """
        During an upgrade (the control plane first, docs/install.md), a drain that would
        move snapshots to or from an agent that cannot stream them is refused at once,
        with nothing changed; one with no snapshots goes on.
        """
        c = await self.cluster()
        await c.apps.snapshot_volume(c.vid, "one")
        procs = c.executors[c.dst][1]
        facts = procs["host.facts"]

        def before():
            return {k: v for k, v in facts().items() if k != "snapshot_streams"}

        procs["host.facts"] = before
        used = c.apps.placements.scheduler.host(c.dst).used_vcpus
        for dry_run in (True, False):
            with self.assertRaises(errors.Conflict) as e:
                await c.drains.drain(c.src, dry_run=dry_run)
            self.assertEqual(e.exception.message,
                             f"the agent of host {c.dst} is of a version that cannot move "
                             "volume snapshots (a drain moves them with their volumes; or "
                             "delete them): upgrade it first")
        self.assertEqual(c.registry.entry(c.src).machine.state, "ready")
        self.assertEqual(await c.store.select("drains"), [])
        self.assertEqual(c.apps.placements.scheduler.host(c.dst).used_vcpus, used)
        await c.apps.delete_snapshot(c.vid, "one")
        plan = await c.drains.drain(c.src, dry_run=True)
        self.assertEqual(plan["plan"][0]["target"], c.dst)
