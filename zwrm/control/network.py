"""
The cluster network's address management (IPAM) in the control plane.

The cluster CIDR (default C{10.80.0.0/16}) is cut into one subnet per host (default /24),
given to a host the first time one of its machines needs an address and kept (stored in
C{net_subnets}) for as long as the host exists.  A host's bridge takes the first address of
its subnet (the guests' gateway and DNS server); each machine gets the lowest free address
after it (stored in C{net_addresses} with the machine, its host and its app) until the
machine is deleted.  Guests use the whole cluster CIDR as their on-link prefix: all VMs of
the cluster share one layer-2 segment, stretched across hosts by the agents' VXLAN overlay.

Every allocation runs as one function on the store's thread (L{Store.run}), so two
allocations never hand out the same subnet or address.
"""

import ipaddress

from zwrm import errors
from zwrm.agent.network.addressing import GUEST_MTU

DEFAULT_CIDR = "10.80.0.0/16"
DEFAULT_HOST_PREFIX = 24
DEFAULT_DOMAIN = "zwrm.internal"


def check_cidr(cidr, host_prefix):
    """
    @return: the cluster network as an L{ipaddress.IPv4Network}.
    @raise errors.InvalidArgument: unless C{cidr} is a private IPv4 network with room for
        at least one host subnet of C{host_prefix} bits.
    """
    try:
        net = ipaddress.IPv4Network(cidr)
    except (ValueError, TypeError):
        raise errors.InvalidArgument(f"cluster CIDR must be an IPv4 network, not {cidr!r}") from None
    if not net.is_private:
        raise errors.InvalidArgument(f"cluster CIDR {cidr} is not a private network")
    if not isinstance(host_prefix, int) or not net.prefixlen < host_prefix <= 29:
        raise errors.InvalidArgument(
            f"host subnet prefix must be from {net.prefixlen + 1} to 29 for {cidr}, "
            f"not {host_prefix!r}")
    return net


def _allocate_subnet(db, cidr, host_prefix, host_id, now):
    rows = list(db["net_subnets"].rows_where("host_id = ?", [host_id]))
    if rows:
        return rows[0]["id"]
    used = {r["id"] for r in db["net_subnets"].rows}
    for i, subnet in enumerate(cidr.subnets(new_prefix=host_prefix)):
        if i == 0:
            continue  # the first subnet holds the network's own address; never given out
        if str(subnet) not in used:
            db["net_subnets"].insert({"id": str(subnet), "host_id": host_id, "created_at": now})
            return str(subnet)
    raise errors.ResourceExhausted(
        f"the cluster network {cidr} has no free /{host_prefix} subnet for host {host_id}")


def _allocate_address(db, cidr, host_prefix, machine_id, app_id, host_id, now):
    rows = list(db["net_addresses"].rows_where("machine_id = ?", [machine_id]))
    if rows:
        if rows[0]["host_id"] == host_id:
            return rows[0]["id"]
        db["net_addresses"].delete(rows[0]["id"])  # moved to another host: a new address
    subnet = ipaddress.IPv4Network(_allocate_subnet(db, cidr, host_prefix, host_id, now))
    used = {r["id"] for r in db["net_addresses"].rows_where("host_id = ?", [host_id])}
    hosts = list(subnet.hosts())
    for addr in hosts[1:]:  # hosts[0] is the bridge (gateway)
        if str(addr) not in used:
            db["net_addresses"].insert({"id": str(addr), "machine_id": machine_id,
                                        "host_id": host_id, "app_id": app_id,
                                        "created_at": now})
            return str(addr)
    raise errors.ResourceExhausted(f"host {host_id}'s subnet {subnet} has no free address")


class ClusterNetwork:
    """
    Subnets and addresses of the cluster network, stored.

    @param store: the L{zwrm.control.store.Store}.
    @param clock: for timestamps.
    """

    def __init__(self, store, clock, cidr=DEFAULT_CIDR, host_prefix=DEFAULT_HOST_PREFIX,
                 domain=DEFAULT_DOMAIN, mtu=GUEST_MTU):
        self._store = store
        self._clock = clock
        self.cidr = check_cidr(cidr, host_prefix)
        self.host_prefix = host_prefix
        self.domain = domain
        self.mtu = mtu

    def gateway(self, subnet):
        """The bridge address (gateway, DNS server) of a host's subnet."""
        return str(next(ipaddress.IPv4Network(subnet).hosts()))

    async def host_subnet(self, host_id):
        """Host C{host_id}'s subnet (allocated and stored on first use), e.g. C{10.80.1.0/24}."""
        return await self._store.run(_allocate_subnet, self.cidr, self.host_prefix, host_id,
                                     self._clock.seconds())

    async def attach(self, machine_id, app_id, host_id, hostname=None, open_ports=()):
        """
        Give machine C{machine_id} (of app C{app_id}, placed on C{host_id}) its address; the
        same again if it has one on that host already.

        @return: its network spec for the agent (see L{zwrm.agent.network.addressing}).
        @raise errors.ResourceExhausted: no subnet or address left.
        """
        address = await self._store.run(_allocate_address, self.cidr, self.host_prefix,
                                        machine_id, app_id, host_id, self._clock.seconds())
        subnet = ipaddress.IPv4Network(f"{address}/{self.host_prefix}", strict=False)
        gw = self.gateway(subnet)
        spec = {"address": address, "prefix": self.cidr.prefixlen, "gateway": gw, "dns": gw,
                "mtu": self.mtu, "domain": self.domain, "open_ports": sorted(set(open_ports))}
        if hostname:
            spec["hostname"] = hostname
        return spec

    async def release(self, machine_id):
        """Free machine C{machine_id}'s address (it was deleted); no error if it has none."""

        def release(db):
            db.execute("DELETE FROM net_addresses WHERE machine_id = ?", [machine_id])
            db.conn.commit()

        await self._store.run(release)

    async def forget_host(self, host_id):
        """Free host C{host_id}'s subnet (the host was removed from the cluster)."""

        def forget(db):
            db.execute("DELETE FROM net_addresses WHERE host_id = ?", [host_id])
            db.execute("DELETE FROM net_subnets WHERE host_id = ?", [host_id])
            db.conn.commit()

        await self._store.run(forget)

    async def address(self, machine_id):
        """Machine C{machine_id}'s address, or L{None}."""
        rows = await self._store.select("net_addresses", "machine_id = ?", [machine_id])
        return rows[0]["id"] if rows else None

    async def view(self):
        """
        The cluster network as agents need it::

            {"cidr", "hosts": [{"host_id", "subnet", "gateway"}],
             "members": [{"address", "machine_id", "app_id", "host_id"}]}
        """
        subnets = await self._store.select("net_subnets", order_by="id")
        addresses = await self._store.select("net_addresses", order_by="id")
        return {
            "cidr": str(self.cidr),
            "hosts": [{"host_id": s["host_id"], "subnet": s["id"],
                       "gateway": self.gateway(s["id"])} for s in subnets],
            "members": [{"address": a["id"], "machine_id": a["machine_id"],
                         "app_id": a["app_id"], "host_id": a["host_id"]} for a in addresses],
        }


# -- published ports -----------------------------------------------------------------

def check_publish(publish, domain=None):
    """
    Check an app spec's published ports (C{--publish PORT[:GUESTPORT][/tcp|/http]}).

    @param publish: a list of C{"PORT[:GUESTPORT][/MODE]"} strings or of
        C{{"port", "guest_port", "mode"}} dicts, or L{None}.
    @param domain: the app's domain (C{--domain}), which HTTP mode routes by.
    @return: C{[{"port", "guest_port", "mode"}]}.
    @raise errors.InvalidArgument: naming the bad entry.
    """
    if publish is None:
        return []
    if not isinstance(publish, list) or len(publish) > 16:
        raise errors.InvalidArgument("publish must be a list of at most 16 PORT[:GUESTPORT][/tcp|/http]")
    out = []
    for p in publish:
        if isinstance(p, str):
            text, _, mode = p.partition("/")
            port, _, guest = text.partition(":")
            p = {"port": port, "guest_port": guest or port, "mode": mode or "tcp"}
        if not isinstance(p, dict):
            raise errors.InvalidArgument(f"publish entry {p!r}: use PORT[:GUESTPORT][/tcp|/http]")
        entry = {}
        for key in ("port", "guest_port"):
            try:
                v = int(p.get(key) if p.get(key) is not None else p.get("port"))
                assert 1 <= v <= 65535
            except (TypeError, ValueError, AssertionError):
                raise errors.InvalidArgument(
                    f"publish {key} must be a TCP port (1-65535), not {p.get(key)!r}") from None
            entry[key] = v
        entry["mode"] = p.get("mode") or "tcp"
        if entry["mode"] not in ("tcp", "http"):
            raise errors.InvalidArgument(f"publish mode must be tcp or http, not {entry['mode']!r}")
        if any(o["port"] == entry["port"] for o in out):
            raise errors.InvalidArgument(f"port {entry['port']} is published twice")
        out.append(entry)
    if domain is not None and (not isinstance(domain, str) or not domain
                               or any(c in domain for c in " /:\t\n")):
        raise errors.InvalidArgument(f"domain must be a DNS name, not {domain!r}")
    return out


# -- the cluster view, pushed to agents ---------------------------------------------

LIVE = ("pending", "starting", "running", "stopping")


class ViewPublisher:
    """
    Keeps every agent's picture of the cluster network current: on each host or machine
    event it computes the view (L{zwrm.agent.network.agent.AgentNetwork.update}) once per
    reactor turn and calls C{network.update} on every reachable host.

    @param data: the control plane's resource layer (C{hosts}, C{machines}).
    @param call: C{call(host_id, verb, *args)}, an executor call.
    """

    def __init__(self, clock, network, data, call, log=None):
        self._clock = clock
        self._network = network
        self._data = data
        self._call = call
        self._pending = None
        self.pushes = 0
        from twisted.logger import Logger

        self.log = log or Logger()
        self._unsubscribe = [data.machines.subscribe(self._changed),
                             data.hosts.subscribe(self._changed)]

    def close(self):
        for u in self._unsubscribe:
            u()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()

    def _changed(self, event):
        if self._pending is None or not self._pending.active():
            self._pending = self._clock.callLater(0, self._push)

    def _push(self):
        from twisted.internet.defer import ensureDeferred

        ensureDeferred(self.push()).addErrback(
            lambda f: self.log.warn("cluster network view not pushed: {e}", e=f.getErrorMessage()))

    async def view(self):
        """The view every agent gets (see the agent's C{network.update})."""
        net = await self._network.view()
        gateways = {h["host_id"]: h["gateway"] for h in net["hosts"]}
        hosts = []
        for host_id in self._data.hosts.ids():
            entry = self._data.hosts.get(host_id)
            address = entry.record.get("address") if entry is not None else None
            if address:
                hosts.append({"host_id": host_id, "address": address,
                              "gateway": gateways.get(host_id)})
        rows = await self._data.machines.find(states=list(LIVE))
        addresses = {m["machine_id"]: m["address"] for m in net["members"]}
        members, published = [], {}
        for row in rows:
            spec = row.get("spec") or {}
            if row["id"] not in addresses:
                continue
            app_spec = spec.get("app_spec") or {}
            netspec = {"address": addresses[row["id"]],
                       "open_ports": [p["guest_port"] for p in app_spec.get("publish") or []]}
            status = (row.get("health") or {}).get("status")
            healthy = row["state"] == "running" and status in ("passing", "none", None)
            members.append({"machine_id": row["id"], "app": spec.get("app"),
                            "replica": spec.get("replica"), "address": netspec["address"],
                            "host_id": row["host_id"], "healthy": healthy,
                            "open_ports": netspec.get("open_ports") or []})
            for p in app_spec.get("publish") or []:
                entry = published.setdefault(str(p["port"]), {"mode": p["mode"], "routes": {}})
                domain = app_spec.get("domain") or "" if p["mode"] == "http" else ""
                entry["routes"].setdefault(domain, []).append(
                    {"key": row["id"], "host": netspec["address"], "port": p["guest_port"],
                     "healthy": healthy})
        return {"hosts": hosts, "members": members, "published": published}

    async def push(self):
        """Compute the view and give it to every host whose executor can be called."""
        view = await self.view()
        self.pushes += 1
        for host_id in self._data.hosts.ids():
            entry = self._data.hosts.get(host_id)
            if entry is None or not entry.executor:
                continue
            try:
                await self._call(host_id, "network.update", view)
            except Exception as e:
                self.log.info("host {h}: network view not delivered: {e}", h=host_id, e=e)
        return view
