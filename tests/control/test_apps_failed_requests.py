"""
A request that fails changes nothing that was there (issue 14, item 2).

A volume app's host becomes unreachable (marked offline: its machine is recorded failed,
although its VM runs on); a scale or deploy then cannot place the pinned replica.  The
request must fail without deleting the machine's record or storing the new spec, so that
when the host returns, reconciliation restores the machine to running instead of
stopping it as unknown.

Real store, registry, scheduler and executors with the fake driver (the cluster of
L{tests.control.test_apps}); time from the Clock for the registry's deferred calls.
"""

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.control.helpers import FACTS
from tests.control.test_apps import Cluster, d
from zwrm import errors

VOL = [{"name": "data", "size_mb": 8, "mount": "/data"}]


async def settle(c, rounds=50):
    """Run the registry's deferred calls (Clock) and let the store's thread answer."""
    for _ in range(rounds):
        c.clock.advance(0)
        await c.store.run(lambda db: None)
        done = Deferred()
        reactor.callLater(0, done.callback, None)
        await done


class FailedRequestTests(TestCase):
    async def outage(self):
        """A one-replica volume app, its host then marked offline (its VM still runs)."""
        c = await Cluster(self).start(hosts=("h-a", "h-b"))
        await c.apps.create_app("db")
        status = await c.apps.deploy("db", c.spec(volumes=VOL))
        m = status["machines"][0]
        self.assertEqual(m["state"], "running")
        await c.registry.mark_offline(m["host_id"])
        self.assertEqual((await c.machines("db"))[0]["state"], "failed")
        return c, m

    async def comes_back(self, c, m):
        """The host's agent registers again; its machines are reconciled."""
        await c.registry.register(m["host_id"], dict(FACTS, name=m["host_id"]))
        await settle(c)

    def assert_nothing_changed(self, before, after):
        self.assertEqual(after["spec"], before["spec"])
        self.assertEqual([(x["id"], x["state"]) for x in after["machines"]],
                         [(x["id"], x["state"]) for x in before["machines"]])
        self.assertEqual(after["volumes"], before["volumes"])

    @d
    async def test_failed_scale_keeps_the_record_and_the_vm(self):
        c, m = await self.outage()
        before = await c.apps.app_status("db")
        events = len(c.published)
        with self.assertRaises(errors.Unplaceable):
            await c.apps.scale("db", 2)
        self.assert_nothing_changed(before, await c.apps.app_status("db"))
        self.assertEqual(c.published[events:], [])  # nothing announced: nothing changed
        await self.comes_back(c, m)
        after = await c.machines("db")
        self.assertEqual([(x["id"], x["state"]) for x in after], [(m["id"], "running")])
        self.assertNotIn((m["host_id"], "machine.stop"), c.calls)
        self.assertNotIn((m["host_id"], "machine.destroy"), c.calls)
        ex, _ = c.executors[m["host_id"]]
        self.assertEqual(ex.machine_status(m["id"])["state"], "running")

    @d
    async def test_failed_deploy_keeps_the_spec_the_record_and_the_vm(self):
        c, m = await self.outage()
        before = await c.apps.app_status("db")
        with self.assertRaises(errors.Unplaceable):
            await c.apps.deploy("db", c.spec(volumes=VOL, memory_mb=512))
        self.assert_nothing_changed(before, await c.apps.app_status("db"))
        await self.comes_back(c, m)
        self.assertEqual([(x["id"], x["state"]) for x in await c.machines("db")],
                         [(m["id"], "running")])
        self.assertNotIn((m["host_id"], "machine.stop"), c.calls)

    @d
    async def test_capacity_lent_to_a_failed_placement_is_given_back(self):
        """
        A deploy that replaces a running machine lends its capacity to the replacement's
        placement; when the placement fails, the machine keeps its reservation.
        """
        c = await Cluster(self).start(hosts=("h-a",))
        await c.apps.create_app("web")
        await c.apps.deploy("web", c.spec(vcpus=4))
        used = c.apps.scheduler.host("h-a").used_vcpus
        with self.assertRaises(errors.Unplaceable):
            await c.apps.deploy("web", c.spec(vcpus=4, replicas=3))  # 12 of 8 vCPUs
        self.assertEqual(c.apps.scheduler.host("h-a").used_vcpus, used)
        self.assertEqual((await c.store.get("hosts", "h-a"))["alloc_vcpus"], used)
        self.assertEqual(len(c.apps.scheduler.placements()), 1)
        # ... and a deploy that fits uses the capacity of the machine it replaces
        await c.apps.deploy("web", c.spec(vcpus=8))
        self.assertEqual(c.apps.scheduler.host("h-a").used_vcpus, 8)

    @d
    async def test_successful_scale_while_a_host_is_away_still_replaces(self):
        """Without volumes the failed replica is placed elsewhere, as before."""
        c = await Cluster(self).start(hosts=("h-a", "h-b"))
        await c.apps.create_app("web")
        m = (await c.apps.deploy("web", c.spec()))["machines"][0]
        await c.registry.mark_offline(m["host_id"])
        status = await c.apps.scale("web", 1)
        self.assertEqual([x["state"] for x in status["machines"]], ["running"])
        self.assertNotEqual(status["machines"][0]["host_id"], m["host_id"])

    @d
    async def test_a_spec_that_cannot_be_stored_keeps_no_reservation(self):
        c = await Cluster(self).start(hosts=("h-a",))
        await c.apps.create_app("web")

        async def broken(*args, **kwargs):
            raise errors.Unavailable("the disk is full")

        c.apps.data.apps.set_spec = broken
        with self.assertRaises(errors.Unavailable):
            await c.apps.deploy("web", c.spec(replicas=2))
        self.assertEqual(c.apps.scheduler.placements(), [])
        self.assertEqual(c.apps.scheduler.host("h-a").used_vcpus, 0)
        self.assertEqual(await c.machines("web"), [])
