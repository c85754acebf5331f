"""
What a host keeps that the cluster does not record (L{zwrm.control.unrecorded}): listed at
each reconciliation and in C{zwrm.host.status}, deleted only by C{zwrm.host.clean}, never
what is recorded or under way; over the agents' real executors and volume stores
(tests/control/test_drain.py's cluster).
"""

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from tests.control import test_volume_replicas
from tests.control.test_apps import d
from tests.control.test_drain import drain_and_wait
from tests.control.test_healing import poll
from zwrm import errors
from zwrm.control.api import HostAPI
from zwrm.control.unrecorded import Unrecorded


class UnrecordedTests(TestCase):
    timeout = 120
    cluster = test_volume_replicas.ReplicaTests.cluster
    running = test_volume_replicas.ReplicaTests.running

    async def setup(self, c):
        c.registry.joined_anew.clear()  # (the cluster's hosts joined before this began)
        c.unrecorded = Unrecorded(c.registry, c.apps)
        c.api = HostAPI(c.registry, unrecorded=c.unrecorded)

    @d
    async def test_listed_then_deleted_on_request_and_nothing_recorded_touched(self):
        c = await self.cluster()
        await self.setup(c)
        await c.apps.snapshot_volume(c.vid, "one")
        rep = await c.apps.replicate_volume(c.vid, "one", c.dst)  # recorded on h-b
        # what h-b keeps that nothing records: a stale copy of the volume (as a host
        # removed and joined again keeps it), a snapshot file of it, and the record of a
        # machine that is down (its row gone with a database restored from a backup)
        store = c.store_of(c.dst)
        await store.create(c.vid, 32)
        await store.snapshot(c.vid, "s-stale")
        await c.registry.transition(c.src, "drain_requested")
        await c.apps.create_app("web")
        await c.apps.deploy("web", c.spec())
        [m] = await c.machines("web")
        self.assertEqual(m["host_id"], c.dst)
        await c.registry.transition(c.src, "undrain_requested")
        row = await c.apps.data.machines.get(m["id"])
        await c.apps.scale("web", 0)
        # (a machine destroyed while its host was away is destroyed there by the
        # reconciliation: its destroyed event says so; this one has none)
        stale_id = "m-0123456789ab"
        stale = dict(c.apps.replicas.agent_spec(row["spec"]), id=stale_id)
        await c.registry.call_executor(c.dst, "machine.start", stale)
        await c.registry.call_executor(c.dst, "machine.stop", stale["id"])

        # a host that joined as a new host (as a removed one joins again): its first
        # reconciliation lists them, once, in the log; the other host's does not look
        c.registry.joined_anew.add(c.dst)
        warned = []

        class Log:
            def warn(self, fmt, **kw):
                warned.append(kw)

            info = warn

        self.patch(Unrecorded, "log", Log())
        await c.registry.register(c.dst, {})  # its agent registers: it is reconciled
        c.clock.advance(0)

        async def looked():
            return c.dst in c.unrecorded.found

        await poll(looked, what="its reconciliation's look")
        self.assertNotIn(c.dst, c.registry.joined_anew)
        await c.unrecorded._reconciled(c.src)  # (h-a's does not look: it did not join anew)
        self.assertEqual(set(c.unrecorded.found), {c.dst})
        [w] = warned
        self.assertEqual(w["host_id"], c.dst)
        self.assertIn(f"1 volume(s) ({c.vid}), 1 snapshot file(s) (s-stale), 1 machine "
                      f"record(s) ({stale_id})", w["what"])
        found = (await c.api.status(c.dst))["unrecorded"]
        self.assertEqual([v["id"] for v in found["volumes"]], [c.vid])
        self.assertEqual([(s["id"], s["volume_id"]) for s in found["snapshots"]],
                         [("s-stale", c.vid)])
        self.assertEqual([(x["id"], x["state"]) for x in found["machines"]],
                         [(stale["id"], "stopped")])
        self.assertEqual((await c.api.status(c.src))["unrecorded"],
                         {"volumes": [], "snapshots": [], "machines": []})

        result = await c.api.clean(c.dst)
        self.assertEqual(result, {"host_id": c.dst, "kept": [], "deleted": {
            "volumes": [c.vid], "snapshots": ["s-stale"], "machines": [stale["id"]]}})
        self.assertFalse(store.exists(c.vid))
        self.assertEqual([s["id"] for s in store.snapshots()], [rep["id"]])  # the replica
        self.assertTrue(c.store_of(c.src).exists(c.vid))  # the volume, where it is recorded
        self.assertEqual(await c.registry.call_executor(c.dst, "machine.list"), [])
        self.assertEqual((await c.api.status(c.dst))["unrecorded"],
                         {"volumes": [], "snapshots": [], "machines": []})
        # and a drain back onto that host is no longer refused by the stale copy
        _, status = await drain_and_wait(c, c.src)
        self.assertEqual(status["state"], "completed")

    @d
    async def test_what_is_under_way_is_not_listed(self):
        c = await self.cluster()
        await self.setup(c)
        # a drain that has copied the volume to h-b, before its commit stores it there
        held, reached, commit = Deferred(), Deferred(), c.drains._step_committing

        async def hold(drain, run):
            reached.callback(None)
            await held
            return await commit(drain, run)

        self.patch(c.drains, "_step_committing", hold)
        draining = ensureDeferred(drain_and_wait(c, c.src, mode="cold"))
        await reached  # (no polling here: the drain's Clock moves while the reactor idles)
        self.assertTrue(c.store_of(c.dst).exists(c.vid))
        found = await c.unrecorded.find(c.dst)
        self.assertEqual(found, {"volumes": [], "snapshots": [], "machines": []})
        with self.assertRaises(errors.Conflict):  # and h-a drains: not cleaned
            await c.api.clean(c.src)
        held.callback(None)
        await draining
        # a volume a snapshot operation holds (a recovery makes it before its row moves)
        vol = await c.apps.data.volumes.get(c.vid)
        await c.store_of(c.src).create("v-made-first", 8)
        with c.apps.volumes.operation({"id": "v-made-first"}, "recovered"):
            self.assertEqual((await c.unrecorded.find(c.src))["volumes"], [])
        self.assertEqual([v["id"] for v in (await c.unrecorded.find(c.src))["volumes"]],
                         ["v-made-first"])
        self.assertEqual(vol["host_id"], c.dst)

    @d
    async def test_an_offline_host_is_not_cleaned(self):
        c = await self.cluster()
        await self.setup(c)
        await c.registry.mark_offline(c.dst)
        with self.assertRaises(errors.Conflict) as e:
            await c.api.clean(c.dst)
        self.assertIn(f"host {c.dst} is offline", e.exception.message)
        with self.assertRaises(errors.NotFound):
            await c.api.clean("h-nope")
