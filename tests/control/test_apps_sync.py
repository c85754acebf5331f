"""
L{Apps.sync_hosts}: the scheduler follows the host registry, and hosts that did not change
since the last sync are skipped.

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


class SyncTests(TestCase):
    @d
    async def test_unchanged_hosts_are_skipped(self):
        c = await Cluster(self).start(hosts=("h-a", "h-b"))
        c.apps.sync_hosts()
        counting = Counting(c.apps.scheduler)
        c.apps.sync_hosts()
        self.assertEqual(counting.hosts, [])
        # the allocation the apps store on the record is not a fact the sync looks at
        c.registry.entry("h-a").record.update(alloc_vcpus=3)
        c.apps.sync_hosts()
        self.assertEqual(counting.hosts, [])

    @d
    async def test_every_change_reaches_the_scheduler(self):
        c = await Cluster(self).start(hosts=("h-a", "h-b"))
        sched = c.apps.scheduler
        c.apps.sync_hosts()
        self.assertEqual((sched.host("h-a").vcpus, sched.host("h-a").state), (8, "ready"))
        counting = Counting(sched)

        # new facts when the agent registers again
        await c.registry.register("h-a", dict(FACTS, name="h-a", vcpus=4, memory_mb=2048,
                                              disk_mb=500, region="us-east",
                                              datacenter="dc9", labels={"disk": "hdd"}))
        c.apps.sync_hosts()
        h = sched.host("h-a")
        self.assertEqual((h.vcpus, h.memory_mb, h.disk_mb, h.region, h.datacenter, h.labels),
                         (4, 2048, 500, "us-east", "dc9", {"disk": "hdd"}))
        self.assertEqual(counting.hosts, ["h-a"])

        # labels changed in place
        c.registry.entry("h-a").record["labels"]["gpu"] = "yes"
        c.apps.sync_hosts()
        self.assertEqual(sched.host("h-a").labels, {"disk": "hdd", "gpu": "yes"})

        # offline, then its executor back
        await c.registry.mark_offline("h-b")
        c.apps.sync_hosts()
        self.assertNotEqual(sched.host("h-b").state, "ready")
        await c.registry.register("h-b", dict(FACTS, name="h-b"))
        c.apps.sync_hosts()
        self.assertEqual(sched.host("h-b").state, "ready")

        # ready in the registry but its executor not callable: not ready for placement
        c.registry.entry("h-b").executor = False
        c.apps.sync_hosts()
        self.assertEqual(sched.host("h-b").state, "unreachable")

    @d
    async def test_a_bad_record_is_tried_again(self):
        c = await Cluster(self).start(hosts=("h-a",))
        c.apps.sync_hosts()
        c.registry.entry("h-a").record["vcpus"] = -1
        c.apps.sync_hosts()  # logged, not schedulable as given
        self.assertEqual(c.apps.scheduler.host("h-a").vcpus, 8)
        self.flushLoggedErrors()
        counting = Counting(c.apps.scheduler)
        c.apps.sync_hosts()
        self.assertEqual(counting.hosts, ["h-a"])  # not remembered as given
        c.registry.entry("h-a").record["vcpus"] = 6
        c.apps.sync_hosts()
        self.assertEqual(c.apps.scheduler.host("h-a").vcpus, 6)
