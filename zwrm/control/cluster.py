"""
What agents and the CLI learn from the control plane about the cluster: C{zwrm.cluster.info}
and C{zwrm.cluster.partitions}.

Agents and the CLI are given one address, the WAMP URL.  The registry (this control plane's
HTTP listener) is at the same host and port only when the control plane is the router too;
behind an external router (C{[control] router_url}) it is elsewhere, so the control plane
says where (C{[control] registry_url}), and the web console's address (C{console_url}) too.
"""

from autobahn import wamp

import zwrm


class ClusterAPI:
    """The C{zwrm.cluster.*} procedures."""

    def __init__(self, registry_url=None, console_url=None, realm="zwrm", partitions=None):
        """
        @param registry_url: the registry's base URL (C{https://host:port}), or L{None}:
            clients then use the host and port of their WAMP URL.
        @param console_url: the web console's URL, or L{None}.
        @param partitions: called with no arguments, the partitions the healer holds now
            (L{zwrm.control.healing.Healer.partitions}); L{None}: none.
        """
        self.registry_url = registry_url
        self.console_url = console_url
        self.realm = realm
        self._partitions = partitions or (lambda: [])

    @wamp.register("zwrm.cluster.info")
    def info(self):
        """
        C{{"registry_url", "console_url", "realm", "version"}}; a URL is L{None} when it is
        not configured (for C{registry_url}: use the WAMP URL's host and port).
        """
        return {
            "registry_url": self.registry_url,
            "console_url": self.console_url,
            "realm": self.realm,
            "version": zwrm.__version__,
        }

    @wamp.register("zwrm.cluster.partitions")
    def partitions(self):
        """
        The datacenters where the partition guard holds the replicas of offline hosts
        (nothing is rescheduled from them until enough hosts return): a list of
        C{{"datacenter", "since", "offline_share", "held_hosts", "threshold",
        "evicting"}}, empty when there is none.
        """
        return self._partitions()
