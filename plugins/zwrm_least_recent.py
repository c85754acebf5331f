"""
An example third-party placement strategy: C{least-recently-used}.

Each machine goes to the eligible host whose latest placement is the oldest (hosts
never used first, by id), which rotates new machines over the hosts regardless of their
size.  Its order depends on the host alone, so it only provides
L{IPlacementStrategy.key} and the scheduler core keeps hosts sorted by it: a placement
costs about O(log n), not a scan.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from zwrm.interfaces import IPlacementStrategy


@implementer(IPlugin, IPlacementStrategy)
class LeastRecentlyUsed:
    name = "least-recently-used"
    description = "the host whose latest placement is the oldest first"

    def key(self, host):
        return host.last_placed


least_recently_used = LeastRecentlyUsed()
