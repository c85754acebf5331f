"""
A host's utilization is its largest share in use of vCPUs, memory and disk: disk counts
(issue 14: dropping the disk share from it went unnoticed).
"""

from twisted.trial.unittest import SynchronousTestCase

from zwrm.scheduler import PlacementRequest
from zwrm.scheduler.strategies.pack import Pack

from .helpers import record, scheduler


class UtilizationTests(SynchronousTestCase):
    def test_each_share_counts(self):
        """The largest of the three shares, whichever it is."""
        for request, expected in (
            (PlacementRequest(vcpus=4, memory_mb=1024, disk_mb=100), 0.5),  # vCPUs
            (PlacementRequest(vcpus=1, memory_mb=6144, disk_mb=100), 0.75),  # memory
            (PlacementRequest(vcpus=1, memory_mb=1024, disk_mb=9000), 0.9),  # disk
        ):
            s = scheduler(hosts=[record("h0", vcpus=8, memory_mb=8192, disk_mb=10000)])
            s.place(request)
            self.assertAlmostEqual(s.host("h0").utilization, expected, msg=repr(request))

    def test_disk_only_host(self):
        """Disk in use on a host that reports no disk: fully used."""
        s = scheduler(hosts=[record("h0", disk_mb=0, alloc_disk_mb=10)])
        self.assertEqual(s.host("h0").utilization, 1.0)

    def test_pack_follows_disk(self):
        """Pack prefers the host whose disk is fuller, when disk is its largest share."""
        s = scheduler(Pack(), hosts=[record("h0", vcpus=8, memory_mb=8192, disk_mb=10000),
                                     record("h1", vcpus=8, memory_mb=8192, disk_mb=10000)])
        s.place(PlacementRequest(vcpus=1, memory_mb=512, disk_mb=9000, pinned_host="h0"))
        s.place(PlacementRequest(vcpus=3, memory_mb=512, disk_mb=0, pinned_host="h1"))
        self.assertEqual(s.place(PlacementRequest(vcpus=1, memory_mb=512)).host_id, "h0")
