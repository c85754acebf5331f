"""
The C{spread} strategy: distribute machines evenly across hosts (fault tolerance).
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from zwrm.interfaces import IPlacementStrategy


@implementer(IPlugin, IPlacementStrategy)
class Spread:
    """
    The host with the fewest machines first; among those, the least utilized (the
    largest of its used/capacity fractions of vCPUs, memory and disk); then by host id.

    Across equal eligible hosts and equal machines the per-host machine counts never
    differ by more than one.
    """

    name = "spread"
    description = "distribute machines evenly across all eligible hosts"

    def key(self, host):
        return (host.machines, host.utilization)
