"""
The scheduler's host index follows the hosts resource's events: every change of a host
made through the registry reaches the scheduler without a re-sync, and hosts that did not
change since they were last given are skipped.

Real store, registry and scheduler (the cluster of L{tests.control.test_apps}).
"""

from twisted.trial.unittest import TestCase

from tests.control.helpers import FACTS
from tests.control.test_apps import Cluster, d


class Counting:
    """Counts the scheduler's C{update_host} calls, then makes them."""

    def __init__(self, scheduler):
        self.hosts = []
        real = scheduler.update_host

        def update_host(record):
            self.hosts.append(record["id"])
            return real(record)

        scheduler.update_host = update_host


class HostEventTests(TestCase):
    @d
    async def test_every_change_reaches_the_scheduler_by_its_event(self):
        c = await Cluster(self).start(hosts=("h-a", "h-b"))
        sched = c.apps.scheduler
        self.assertEqual((sched.host("h-a").vcpus, sched.host("h-a").state), (8, "ready"))

        # new facts when the agent registers again
        await c.registry.register("h-a", dict(FACTS, name="h-a", vcpus=4, memory_mb=2048,
                                              disk_mb=500, region="us-east",
                                              datacenter="dc9", labels={"disk": "hdd"}))
        h = sched.host("h-a")
        self.assertEqual((h.vcpus, h.memory_mb, h.disk_mb, h.region, h.datacenter, h.labels),
                         (4, 2048, 500, "us-east", "dc9", {"disk": "hdd"}))

        # offline, then back
        await c.registry.mark_offline("h-b")
        self.assertEqual(sched.host("h-b").state, "offline")
        await c.registry.register("h-b", dict(FACTS, name="h-b"))
        self.assertEqual(sched.host("h-b").state, "ready")

        # an operator's transition
        await c.registry.transition("h-b", "drain_requested")
        self.assertEqual(sched.host("h-b").state, "draining")

        # a new host: known at once, placeable once its executor registered
        await c.registry.join("h-c", dict(FACTS, name="h-c"))
        self.assertEqual(sched.host("h-c").state, "unreachable")
        await c.registry.register("h-c", dict(FACTS, name="h-c"))
        self.assertEqual(sched.host("h-c").state, "ready")

    @d
    async def test_no_event_no_change(self):
        """
        What is changed behind the resource's back (no update method, no event) does not
        reach the scheduler; the re-sync kept for drain.py still gives it.
        """
        c = await Cluster(self).start(hosts=("h-a",))
        c.registry.entry("h-a").executor = False
        self.assertEqual(c.apps.scheduler.host("h-a").state, "ready")
        c.apps.sync_hosts()
        self.assertEqual(c.apps.scheduler.host("h-a").state, "unreachable")

    @d
    async def test_unchanged_hosts_are_skipped(self):
        c = await Cluster(self).start(hosts=("h-a", "h-b"))
        counting = Counting(c.apps.scheduler)
        c.apps.sync_hosts()
        await c.registry.register("h-a", dict(FACTS, name="h-a"))  # same facts: an event
        self.assertEqual(counting.hosts, [])
        # the allocation stored on the record is not a fact the scheduler is given
        c.registry.entry("h-a").record.update(alloc_vcpus=3)
        c.apps.sync_hosts()
        self.assertEqual(counting.hosts, [])
        await c.registry.register("h-a", dict(FACTS, name="h-a", vcpus=2))
        self.assertEqual(counting.hosts, ["h-a"])

    @d
    async def test_a_bad_record_is_tried_again(self):
        c = await Cluster(self).start(hosts=("h-a",))
        c.registry.entry("h-a").record["vcpus"] = -1
        c.apps.sync_hosts()  # logged, not schedulable as given
        self.assertEqual(c.apps.scheduler.host("h-a").vcpus, 8)
        self.flushLoggedErrors()
        counting = Counting(c.apps.scheduler)
        c.apps.sync_hosts()
        self.assertEqual(counting.hosts, ["h-a"])  # not remembered as given
        await c.registry.register("h-a", dict(FACTS, name="h-a", vcpus=6))
        self.assertEqual(c.apps.scheduler.host("h-a").vcpus, 6)
