"""
An example third-party placement strategy: C{label-affinity}.

Hosts carry labels (C{ssd=true}, C{gpu=a100}, ...) and a deployment may prefer some of
them without requiring them (C{preferences}).  This strategy places each machine on a
host with as many of its preferred labels as possible, spreading machines evenly among
equally good hosts.  Required labels (C{constraints}) are a hard filter in the
scheduler core already; this is the soft version.

Because its order depends on the request, it provides
L{IRequestAwarePlacementStrategy}: the core scores every eligible host (O(n) per
placement).  Install by putting this file in a directory named in the control plane's
configuration::

    [scheduler]
    strategy = "label-affinity"
    plugin_dirs = ["/etc/zwrm/plugins"]
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from zwrm.interfaces import IRequestAwarePlacementStrategy


@implementer(IPlugin, IRequestAwarePlacementStrategy)
class LabelAffinity:
    name = "label-affinity"
    description = "hosts with the most of the machine's preferred labels first, then spread"

    def score(self, host, request):
        labels = host.labels
        return -sum(1 for k, v in request.preferences.items() if labels.get(k) == v)

    def key(self, host):
        return (host.machines, host.utilization)


label_affinity = LabelAffinity()
