"""
The cluster DNS server of an agent (twisted.names), the guests' resolver.

It listens on the host's bridge address (UDP and TCP port 53) and answers, for the
cluster domain (default C{zwrm.internal}):

 - C{<app>.<domain>}: an A record for every healthy replica of the app (anywhere in the
   cluster), in rotating order;
 - C{<replica>.<app>.<domain>}: the A record of that one replica (C{<replica>} is its
   index, e.g. C{0.web.zwrm.internal}, or its machine id);

with a TTL of 1 second, so a guest sees a health change within about a second of the
agent hearing of it.  Other names in the domain are NXDOMAIN; names outside it go to the
host's own resolvers (C{/etc/resolv.conf}) unless C{upstream} is off.
"""

import itertools

from twisted.internet import defer
from twisted.names import client, dns, error, server
from twisted.names.common import ResolverBase

TTL = 1


class ClusterResolver(ResolverBase):
    """Answers for the cluster domain from the records it was last given."""

    def __init__(self, domain="zwrm.internal"):
        ResolverBase.__init__(self)
        self.domain = domain.strip(".").lower()
        self._apps = {}  # app -> [(replica names, address, healthy)]
        self._turn = itertools.count()

    def set_records(self, apps):
        """
        @param apps: C{{app: [{"names": [replica names], "address", "healthy"}]}}.
        """
        self._apps = {a.lower(): [(tuple(str(n).lower() for n in r["names"]), r["address"],
                                   bool(r.get("healthy", True))) for r in rs]
                      for a, rs in apps.items()}

    def addresses(self, name):
        """The addresses C{name} resolves to (a list), or L{None} if it is not ours."""
        name = name.strip(".").lower()
        suffix = "." + self.domain
        if not name.endswith(suffix):
            return None
        labels = name[: -len(suffix)].split(".")
        if len(labels) == 1:
            healthy = [addr for _, addr, ok in self._apps.get(labels[0], []) if ok]
            if healthy:
                k = next(self._turn) % len(healthy)
                healthy = healthy[k:] + healthy[:k]
            return healthy
        if len(labels) == 2:
            replica, app = labels
            return [addr for names, addr, _ in self._apps.get(app, []) if replica in names][:1]
        return []

    def _lookup(self, name, cls, type, timeout=None):
        text = name.decode() if isinstance(name, bytes) else name
        found = self.addresses(text)
        if found is None:
            return defer.fail(error.DomainError(name))
        if not found:
            return defer.fail(error.AuthoritativeDomainError(name))
        if type not in (dns.A, dns.ALL_RECORDS):
            return defer.succeed(([], [], []))
        answers = [dns.RRHeader(name=name, type=dns.A, cls=dns.IN, ttl=TTL, auth=True,
                                payload=dns.Record_A(a, ttl=TTL)) for a in found]
        return defer.succeed((answers, [], []))


class ClusterDNS:
    """
    The DNS server: a L{ClusterResolver} first, then (optionally) the host's resolvers.

    @param interface: the address to listen on (the bridge address).
    """

    def __init__(self, reactor, interface, port=53, domain="zwrm.internal", upstream=True):
        self.reactor = reactor
        self.interface = interface
        self.port = port
        self.resolver = ClusterResolver(domain)
        clients = []
        if upstream:
            clients.append(client.Resolver(resolv="/etc/resolv.conf", reactor=reactor))
        self.factory = server.DNSServerFactory(authorities=[self.resolver], clients=clients)
        self.factory.noisy = False
        self._ports = []

    def start(self):
        """Listen on UDP and TCP; return the UDP port number (useful when C{port=0})."""
        udp = self.reactor.listenUDP(self.port, dns.DNSDatagramProtocol(self.factory),
                                     interface=self.interface)
        self._ports.append(udp)
        port = udp.getHost().port
        self._ports.append(self.reactor.listenTCP(port, self.factory, interface=self.interface))
        return port

    def stop(self):
        ports, self._ports = self._ports, []
        for c in self.factory.resolver.resolvers:
            # client.Resolver re-reads resolv.conf every minute: stop that timer too.
            call = getattr(c, "_parseCall", None)
            if call is not None and call.active():
                call.cancel()
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
