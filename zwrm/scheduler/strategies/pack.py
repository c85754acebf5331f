"""
The C{pack} strategy: fill hosts to capacity before using new ones (fewest hosts).
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from zwrm.interfaces import IPlacementStrategy


@implementer(IPlugin, IPlacementStrategy)
class Pack:
    """
    The most utilized host first (best fit: the largest of its used/capacity fractions
    of vCPUs, memory and disk); among equally utilized ones, the one with more
    machines; then by host id.

    An empty host has utilization 0 and no machines, so it sorts after every open
    host (one with a machine or other capacity in use): a new host is opened only when
    no open host fits.
    """

    name = "pack"
    description = "fill hosts to capacity before using new ones"

    def key(self, host):
        return (-host.utilization, -host.machines)
