"""
What agents and the CLI learn from the control plane about the cluster: C{zwrm.cluster.info}.

Agents and the CLI are given one address, the WAMP URL.  The registry (this control plane's
HTTP listener) is at the same host and port only when the control plane is the router too;
behind an external router (C{[control] router_url}) it is elsewhere, so the control plane
says where (C{[control] registry_url}), and the web console's address (C{console_url}) too.
"""

from autobahn import wamp

import zwrm


class ClusterAPI:
    """The C{zwrm.cluster.*} procedures."""

    def __init__(self, registry_url=None, console_url=None, realm="zwrm"):
        """
        @param registry_url: the registry's base URL (C{https://host:port}), or L{None}:
            clients then use the host and port of their WAMP URL.
        @param console_url: the web console's URL, or L{None}.
        """
        self.registry_url = registry_url
        self.console_url = console_url
        self.realm = realm

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
