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

A machine moved live keeps its address (it is in the guest's memory), so an address may
lie in another host's subnet, or in the subnet of a host that is gone: when a host is
forgotten (L{ClusterNetwork.forget_host}) while machines elsewhere still hold addresses of
its subnet, the subnet stays stored as a reservation (its C{host_id} is L{RESERVED} and
the old host's id) and is given to no other host until the last of those addresses is
released.
"""

import collections
import inspect
import ipaddress
import time

from twisted.internet.defer import Deferred, fail, maybeDeferred

from zwrm import errors
from zwrm.agent.network.addressing import GUEST_MTU, hosts_digest
from zwrm.control.resources.certs import DOMAIN_RE

DEFAULT_CIDR = "10.80.0.0/16"
DEFAULT_HOST_PREFIX = 24
DEFAULT_DOMAIN = "zwrm.internal"

RESERVED = "reserved:"
"""The C{host_id} prefix of a subnet kept for the addresses of machines moved away from a
host that is gone (see the module docstring)."""


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


CIDR_PREFIXES = (8, 20)  # a cluster CIDR's prefix length: from /8 to /20 (16+ host /24s)


def check_cluster_cidr(cidr):
    """
    Check the cluster CIDR setting (C{[network] cidr}, C{--cluster-cidr}).

    @return: the network as an L{ipaddress.IPv4Network}.
    @raise errors.InvalidArgument: unless C{cidr} is a private IPv4 network (RFC 1918 and
        the like) of prefix length /8 to /20, with room for a /24 per host.
    """
    net = check_cidr(cidr, DEFAULT_HOST_PREFIX)
    low, high = CIDR_PREFIXES
    if not low <= net.prefixlen <= high:
        raise errors.InvalidArgument(
            f"cluster CIDR {cidr} must be a /{low} to /{high} network (a /24 per host)")
    return net


def _configure(db, cidr, host_prefix):
    """Record C{cidr} as the cluster network, unless subnets of another one are stored."""
    row = None
    if "net_cluster" in db.table_names():
        rows = list(db["net_cluster"].rows_where("id = 1"))
        row = rows[0] if rows else None
    # Subnets stored before the setting was recorded came from the default network.
    current = row["cidr"] if row else DEFAULT_CIDR
    subnets = db["net_subnets"].count
    if current != cidr and subnets:
        raise errors.Conflict(
            f"the cluster network is {current} ({subnets} host subnets and "
            f"{db['net_addresses'].count} machine addresses allocated); it cannot change to "
            f"{cidr} while addresses are allocated: set [network] cidr back to {current}")
    # Made here on first use (it holds one row), not by a schema migration.
    db["net_cluster"].upsert({"id": 1, "cidr": cidr, "host_prefix": host_prefix}, pk="id")
    db.conn.commit()


def _allocate_subnet(db, cidr, host_prefix, host_id, now, hint=None):
    """
    Host C{host_id}'s subnet: the stored one, else the lowest free one of C{cidr}, stored.

    @param hint: a dict the caller keeps across calls (on the store's thread only): it
        remembers the index below which every subnet is taken, so that allocating a subnet
        for each of N joining hosts costs a primary-key lookup or two each, not a walk over
        every subnet taken (10,000 hosts took minutes of the store's thread, and the GIL
        the reactor needs). Whatever deletes a subnet empties it (L{_forget_hint}).
    """
    row = db.execute("SELECT id FROM net_subnets WHERE host_id = ?", [host_id]).fetchone()
    if row:
        return row[0]
    count = 1 << (host_prefix - cidr.prefixlen)
    size = 1 << (32 - host_prefix)
    base = int(cidr.network_address)
    key = (str(cidr), host_prefix)
    hint = {} if hint is None else hint
    # The first subnet holds the network's own address: never given out.
    start = hint["low"] if hint.get("key") == key else 1
    for i in range(start, count):
        subnet = f"{ipaddress.IPv4Address(base + i * size)}/{host_prefix}"
        if db.execute("SELECT 1 FROM net_subnets WHERE id = ?", [subnet]).fetchone() is None:
            db["net_subnets"].insert({"id": subnet, "host_id": host_id, "created_at": now})
            hint.update(key=key, low=i + 1)
            return subnet
    hint.update(key=key, low=count)
    raise errors.ResourceExhausted(
        f"the cluster network {cidr} has no free /{host_prefix} subnet for host {host_id}")


def _forget_hint(hint):
    """A subnet was deleted: the next allocation looks from the first again."""
    if hint is not None:
        hint.clear()


def _held(db, subnet):
    """Whether a machine holds an address of C{subnet} (by primary key: no scan)."""
    hosts = [str(a) for a in ipaddress.IPv4Network(subnet).hosts()]
    for i in range(0, len(hosts), 500):
        chunk = hosts[i:i + 500]
        if db.execute(f"SELECT 1 FROM net_addresses WHERE id IN ({','.join('?' * len(chunk))})"
                      " LIMIT 1", chunk).fetchone():
            return True
    return False


def _free_reservations(db, hint=None):
    """Delete each reserved subnet (L{RESERVED}) of which no machine holds an address now."""
    for row in db.execute("SELECT id FROM net_subnets WHERE host_id LIKE ?",
                          [RESERVED + "%"]).fetchall():
        if not _held(db, row[0]):
            db.execute("DELETE FROM net_subnets WHERE id = ?", [row[0]])
            _forget_hint(hint)


def _allocate_address(db, cidr, host_prefix, machine_id, app_id, host_id, now, hint=None):
    rows = list(db["net_addresses"].rows_where("machine_id = ?", [machine_id]))
    if rows:
        if rows[0]["host_id"] == host_id:
            return rows[0]["id"]
        db["net_addresses"].delete(rows[0]["id"])  # moved to another host: a new address
        _free_reservations(db, hint)
    subnet = ipaddress.IPv4Network(_allocate_subnet(db, cidr, host_prefix, host_id, now, hint))
    hosts = [str(a) for a in subnet.hosts()][1:]  # the first is the bridge (gateway)
    for i in range(0, len(hosts), 500):  # by primary key: no scan of every address
        chunk = hosts[i:i + 500]
        used = {r[0] for r in db.execute(
            f"SELECT id FROM net_addresses WHERE id IN ({','.join('?' * len(chunk))})", chunk)}
        for addr in chunk:
            if addr not in used:
                db["net_addresses"].insert({"id": addr, "machine_id": machine_id,
                                            "host_id": host_id, "app_id": app_id,
                                            "created_at": now})
                return addr
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
        # What is stored, in memory once loaded (L{load}): host id -> subnet and
        # machine id -> (address, host id, app id); kept by every change made here.
        self.subnets = None
        self.addresses = None
        self._listeners = []
        # Where to look for a free subnet (L{_allocate_subnet}); used on the store's thread.
        self._subnet_hint = {}

    async def configure(self, cidr):
        """
        Use C{cidr} as the cluster network (the C{[network] cidr} setting) and record it.

        @raise errors.InvalidArgument: it is not a private /8-/20 IPv4 network.
        @raise errors.Conflict: another network's subnets are allocated (a change of the
            cluster network would leave every guest's address outside it).
        """
        net = check_cluster_cidr(cidr)
        await self._store.run(_configure, str(net), self.host_prefix)
        self.cidr = net

    async def load(self):
        """Read the stored subnets and addresses into L{subnets} and L{addresses}."""

        def read(db):
            return ([(r["host_id"], r["id"]) for r in db["net_subnets"].rows
                     if not r["host_id"].startswith(RESERVED)],
                    [(r["machine_id"], (r["id"], r["host_id"], r["app_id"]))
                     for r in db["net_addresses"].rows])

        subnets, addresses = await self._store.run(read)
        if self.subnets is None:
            self.subnets, self.addresses = dict(subnets), dict(addresses)

    def subscribe(self, listener):
        """
        Call C{listener(kind, key)} after each change: C{("address", machine_id)} or
        C{("subnet", host_id)}.

        @return: a function of no arguments that ends the subscription.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _notify(self, kind, key):
        for listener in list(self._listeners):
            listener(kind, key)

    def _noted_address(self, machine_id, address, host_id, app_id):
        if self.addresses is None:
            return
        subnet = str(ipaddress.IPv4Network(f"{address}/{self.host_prefix}", strict=False))
        if self.subnets.get(host_id) != subnet:
            self.subnets[host_id] = subnet
            self._notify("subnet", host_id)
        if self.addresses.get(machine_id) != (address, host_id, app_id):
            self.addresses[machine_id] = (address, host_id, app_id)
            self._notify("address", machine_id)

    def gateway(self, subnet):
        """The bridge address (gateway, DNS server) of a host's subnet."""
        return str(next(ipaddress.IPv4Network(subnet).hosts()))

    async def host_subnet(self, host_id):
        """Host C{host_id}'s subnet (allocated and stored on first use), e.g. C{10.80.1.0/24}."""
        subnet = await self._store.run(_allocate_subnet, self.cidr, self.host_prefix, host_id,
                                       self._clock.seconds(), self._subnet_hint)
        if self.subnets is not None and self.subnets.get(host_id) != subnet:
            self.subnets[host_id] = subnet
            self._notify("subnet", host_id)
        return subnet

    async def attach(self, machine_id, app_id, host_id, hostname=None, open_ports=()):
        """
        Give machine C{machine_id} (of app C{app_id}, placed on C{host_id}) its address; the
        same again if it has one on that host already.

        @return: its network spec for the agent (see L{zwrm.agent.network.addressing}).
        @raise errors.ResourceExhausted: no subnet or address left.
        """
        known = self.addresses.get(machine_id) if self.addresses is not None else None
        if known is not None and known[1] == host_id:
            address = known[0]  # stored already (a start after its placement)
        else:
            address = await self._store.run(_allocate_address, self.cidr, self.host_prefix,
                                            machine_id, app_id, host_id, self._clock.seconds(),
                                            self._subnet_hint)
            self._noted_address(machine_id, address, host_id, app_id)
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
            _free_reservations(db, self._subnet_hint)
            db.conn.commit()

        await self._store.run(release)
        if self.addresses is not None and self.addresses.pop(machine_id, None) is not None:
            self._notify("address", machine_id)

    async def move_address(self, machine_id, new_id, host_id):
        """
        Give machine C{machine_id}'s address to machine C{new_id} on host C{host_id}: a
        machine moved live keeps its address (it is in the guest's memory), so its
        replacement takes the stored row over (and the view then says it is on
        C{host_id}).  Nothing if C{machine_id} has none (moved already: idempotent).

        @return: the address moved, or L{None}.
        """

        def move(db):
            rows = list(db["net_addresses"].rows_where("machine_id = ?", [machine_id]))
            if not rows:
                return None
            db.execute("DELETE FROM net_addresses WHERE machine_id = ?", [new_id])
            db.execute("UPDATE net_addresses SET machine_id = ?, host_id = ? "
                       "WHERE machine_id = ?", [new_id, host_id, machine_id])
            db.conn.commit()
            return rows[0]

        row = await self._store.run(move)
        if row is None:
            return None
        if self.addresses is not None:
            self.addresses.pop(machine_id, None)
            self.addresses[new_id] = (row["id"], host_id, row["app_id"])
            self._notify("address", machine_id)
            self._notify("address", new_id)
        return row["id"]

    async def forget_host(self, host_id):
        """
        Free host C{host_id}'s subnet and its machines' addresses (the host was removed
        from the cluster): L{forgetting}, then L{forgot}.
        """
        change = self.forgetting(host_id)

        def forget(db):
            change(db)
            db.conn.commit()

        await self._store.run(forget)
        self.forgot(host_id)

    def forgetting(self, host_id):
        """
        The change that frees host C{host_id}'s subnet and its machines' addresses in the
        store (it commits nothing: a host's removal stores it with the host's row,
        L{zwrm.control.host_removal}); L{forgot} follows it in memory once stored.  While
        machines on other hosts hold addresses of that subnet (they were moved live from
        it), the subnet stays reserved (given to no other host) until the last of them is
        released.
        """

        def forget(db):
            db.execute("DELETE FROM net_addresses WHERE host_id = ?", [host_id])
            for row in db.execute("SELECT id FROM net_subnets WHERE host_id = ?",
                                  [host_id]).fetchall():
                if _held(db, row[0]):
                    db.execute("UPDATE net_subnets SET host_id = ? WHERE id = ?",
                               [RESERVED + host_id, row[0]])
                else:
                    db.execute("DELETE FROM net_subnets WHERE id = ?", [row[0]])
                    _forget_hint(self._subnet_hint)
            _free_reservations(db, self._subnet_hint)  # addresses of this host may have held one

        return forget

    def forgot(self, host_id):
        """L{forgetting}'s change was stored: forget C{host_id}'s subnet and addresses here."""
        if self.subnets is not None:
            self.subnets.pop(host_id, None)
            for mid in [m for m, a in self.addresses.items() if a[1] == host_id]:
                del self.addresses[mid]
                self._notify("address", mid)
            self._notify("subnet", host_id)

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
                       "gateway": self.gateway(s["id"])} for s in subnets
                      if not s["host_id"].startswith(RESERVED)],
            "members": [{"address": a["id"], "machine_id": a["machine_id"],
                         "app_id": a["app_id"], "host_id": a["host_id"]} for a in addresses],
        }


# -- published ports -----------------------------------------------------------------

PUBLISH_MODES = ("tcp", "http", "https")

def check_publish(publish, domain=None):
    """
    Check an app spec's published ports (C{--publish PORT[:GUESTPORT][/tcp|/http|/https]};
    C{https} is C{http} behind TLS that the ingress terminates, and needs a domain).

    @param publish: a list of C{"PORT[:GUESTPORT][/MODE]"} strings or of
        C{{"port", "guest_port", "mode"}} dicts, or L{None}.
    @param domain: the app's domain (C{--domain}), which HTTP and HTTPS modes route by.
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
        if entry["mode"] not in PUBLISH_MODES:
            raise errors.InvalidArgument(
                f"publish mode must be tcp or http (or https), not {entry['mode']!r}")
        if entry["mode"] == "https" and not domain:
            raise errors.InvalidArgument(
                f"publish {entry['port']}/https needs a domain (--domain: the name of the "
                "certificate the ingress serves, see zwrm certs add)")
        if any(o["port"] == entry["port"] for o in out):
            raise errors.InvalidArgument(f"port {entry['port']} is published twice")
        out.append(entry)
    check_domain(domain)
    return out


def check_domain(domain):
    """
    Check an app's domain (C{--domain}): one DNS name, which the ingress's http and https
    ports route by (a request's C{Host}, compared in lower case; a wildcard names no host).

    @return: C{domain} in lower case, or L{None} for none.
    @raise errors.InvalidArgument: (argument C{domain}) for anything else.
    """
    if domain is None:
        return None
    if (not isinstance(domain, str) or len(domain) > 253 or domain.startswith("*.")
            or not DOMAIN_RE.match(domain.lower())):
        raise errors.InvalidArgument(
            f"domain must be one DNS name such as shop.example.com (the Host its requests"
            f" name), not {domain!r}", argument="domain")
    return domain.lower()


# -- the cluster view, pushed to agents ---------------------------------------------

EDGE_LABEL = "edge"


def is_edge(host_record):
    """Whether a host is labelled as an edge host (C{edge=true}): it serves published ports."""
    labels = host_record.get("labels")
    return isinstance(labels, dict) and str(labels.get(EDGE_LABEL, "")).lower() in (
        "true", "yes", "1")


LIVE = ("pending", "starting", "running", "stopping")
PAUSE_RATIO = 4  # after a push that took t seconds, none for PAUSE_RATIO * t (<= 20% busy)
HOSTS_HISTORY = 256
"""How many serials of the hosts list's changes are kept for deltas (see L{ViewPublisher});
an agent whose list is older gets the whole list."""
#: what one push sends at most, in entries (a host of a hosts list or delta, or a member), a
#: view counting L{VIEW_COST} more: about 0.25 µs each to build and pack, so a push stays
#: near 60 ms however many agents need a view or the whole list (at 20,000 hosts one list is
#: 1.4 MB and 5 ms; 20,000 small views about 170 ms); at least one view per push. The hosts
#: beyond it get theirs in the next push, after the pause.
VIEW_ENTRIES_PER_PUSH = 250_000
#: a view's own cost, in entries (about 8 µs for a view with an empty delta)
VIEW_COST = 32
#: why a view carries the whole hosts list (L{ViewPublisher.full_list_reasons}, the
#: C{zwrm_network_view_full_list_reasons_total} metric)
FULL_LIST_REASONS = (
    "new_session",  # an agent session's first view, without a list held (or reported)
    "list_changed",  # a new session that reported a list other than the current one
    "no_deltas",  # the agent has not answered with a serial (yet; or is before deltas)
    "lost",  # the last view was not delivered (or found no agent session)
    "refused",  # the agent refused a delta (it holds another list than its base)
    "out_of_order",  # the agent answered views out of order
    "other_serial",  # the agent answered holding another serial than the one sent
    "history",  # the list it holds is older than the history kept (or the delta larger)
)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _why_whole(peer, resumed):
    """Why a view to C{peer} (before it is counted as sent) carries the whole list."""
    if resumed:
        return "list_changed"  # the list its new session reported is not the current one
    if not peer.capable:
        return "no_deltas" if peer.sent else "new_session"
    if peer.serial is None:
        return peer.why or "new_session"
    return "history"


class _Peer:
    """What the publisher knows of one host's agent (one session of it): its hosts list."""

    __slots__ = ("capable", "serial", "sent", "full_at", "answered", "held", "session", "gone",
                 "why")

    def __init__(self, held=None, session=0):
        # its answers carry hosts_serial: it takes hosts_delta (so does an agent that said
        # what it holds when it registered)
        self.capable = held is not None
        self.serial = None  # the hosts serial it holds once it took every view sent; None:
        # not known (the next view has the whole list)
        #: what its registration said it holds ({"hosts_serial", "hosts_digest"}), for its
        #: first view only
        self.held = held
        self.sent = 0  # views sent to it, numbered from 1
        self.full_at = 0  # the number of the last one with the whole list
        self.answered = 0  # the number of the newest one answered with a serial
        self.session = session  # the host entry's count of registrations when it was made
        #: a view found no procedure to call: the session is gone (its agent restarting);
        #: nothing more is sent to it, the next registration's session gets the view
        self.gone = False
        self.why = None  # why serial is None after a view: the reason its next list is whole


class _App:
    """One app's part of the view: its members, the hosts they are on, its published ports."""

    __slots__ = ("members", "hosts", "publish", "domain", "listed")

    def __init__(self):
        self.members = {}  # machine id -> member (the view's form)
        self.hosts = {}  # host id -> how many of its members are there
        self.publish = []  # [{"port", "guest_port", "mode"}] of its members' specs
        self.domain = ""
        self.listed = None  # list(members.values()), built when asked for

    def list(self):
        if self.listed is None:
            self.listed = list(self.members.values())
        return self.listed

    @property
    def reachable(self):
        """Members other apps may reach (an open port): every agent needs them."""
        return bool(self.publish)


class ViewPublisher:
    """
    Keeps every agent's picture of the cluster network current (what
    L{zwrm.agent.network.agent.AgentNetwork.update} takes).

    The view is kept in memory: read from the store once (the first push), then changed by
    each host and machine event and each address change of the L{ClusterNetwork}; a
    machine's app, replica and published ports (its spec, which never changes) are read
    the first time it is seen, in one query per push.  Once per reactor turn with a
    change, each host whose part changed gets its view (C{network.update}) at once, even
    while an earlier call to it is unanswered (the agent applies its views in order; holding
    the next view until the last one is answered delayed a route change by a whole apply,
    and a request through the ingress failed when a replica was killed).  A push that took
    C{t} seconds is followed by none for C{pause_ratio * t}: changes meanwhile go together
    in the next one.  Sending views never takes more than 1 / (1 + C{pause_ratio}) of the
    control plane's time, so a burst of changes in a large cluster (a host lost, a
    redeploy) costs each host a few views rather than one per machine, while a small
    cluster still gets every change in the next reactor turn.  One push sends at most
    L{VIEW_ENTRIES_PER_PUSH} entries' worth of views (at least one view); the hosts beyond
    it get theirs in the next push, so many agents needing the whole list at once never
    hold the reactor for long.

    What a host needs: every host's underlay and bridge addresses (the overlay); the
    members of the apps that have a machine on it (same-app traffic, DNS) and of every
    app with an open port (reachable from all); the published ports' routes if it serves
    them (L{serves_ingress}; default: the edge hosts, or every host).  A change elsewhere
    is not sent to it.

    The hosts list is sent whole only once per agent session: it has a serial
    (L{hosts_serial}, one more for each push that changed it) and the changes of the last
    L{HOSTS_HISTORY} serials are kept, so an agent whose answers to C{network.update} carry
    the serial it holds is sent C{hosts_delta} (the entries changed and the ids gone since
    the serial it will hold once the views sent before are applied) instead of C{hosts}.  A
    host joining, leaving or getting its subnet costs each view one entry, not the whole
    list.  The whole list (C{hosts} with C{hosts_serial}) goes to an agent whose session is
    new (registered, or lost) unless its registration said it holds the current list
    (L{_resumed}: an empty delta on the serial it holds), that has not answered with a
    serial yet (an agent before deltas never does: it gets the whole list every time),
    whose list is older than the history, whose view was not delivered, or that refused a
    delta (L{errors.StaleView}: at once) or answered out of order.  A session is new from
    the moment its registration begins (the host entry's C{sessions} count): a view sent
    while the registration is being stored is the new session's first (its resumed list),
    whatever the last session's last view did.  A view that finds no procedure
    (L{errors.NoCallee}: the session is gone, its agent restarting) stops the views to that
    host until its next registration.

    @param data: the control plane's resource layer (C{hosts}, C{machines}).
    @param call: C{call(host_id, verb, *args)}, an executor call.
    @param serves_ingress: C{serves_ingress(host_entry)} -> bool: whether a host serves
        published ports (gets their routes); L{None}: the hosts labelled C{edge=true}
        (C{zwrm-agent --label edge=true}), or every host while none is.
    """

    def __init__(self, clock, network, data, call, log=None, serves_ingress=None,
                 pause_ratio=PAUSE_RATIO):
        from twisted.logger import Logger

        self._clock = clock
        self._network = network
        self._data = data
        self._call = call
        self._serves = serves_ingress
        self._edges = set()  # hosts labelled edge=true (see is_edge)
        self.log = log or Logger()
        self._pending = None
        self._pushing = None  # the Deferred of the push running now
        self._again = False
        self.pushes = 0  # pushes that sent at least one view
        self.sent = 0  # views sent
        self._loaded = False
        self._machines = {}  # machine id -> {"app", "replica", "state", "health", "host_id"}
        self._unknown = set()  # machine ids to read (first seen, or seen while loading)
        self._apps = {}  # app name -> _App
        self._host_apps = {}  # host id -> names of the apps with members on it
        self._reachable = set()  # names of the apps with an open port
        self._hosts = {}  # host id -> {"host_id", "address", "gateway"}
        self._needs_subnet = set()  # host ids with an address and no subnet yet
        self._host_list = None  # the hosts list (sorted by id), built when asked for
        #: the hosts list's serial: one more for each push that changed it
        self.hosts_serial = 0
        self._hosts_changed = set()  # ids of the hosts changed since the serial
        self._history = collections.deque()  # (serial, ids of the hosts it changed)
        self._history_ids = 0  # ids in the history
        self._deltas = {}  # (base, serial) -> hosts_delta (or None), of the newest serial
        self._peers = {}  # host id -> _Peer
        self.full_lists = 0  # views sent with the whole hosts list
        #: the same by reason (L{FULL_LIST_REASONS})
        self.full_list_reasons = dict.fromkeys(FULL_LIST_REASONS, 0)
        #: new agent sessions told the list they held is current (see L{_resumed})
        self.resumed = 0
        self._digest = None  # (serial, hosts_digest of the list of that serial)
        self._budget = VIEW_ENTRIES_PER_PUSH  # what the push running may still send
        self._deferred = set()  # hosts whose view waits for the next push
        self._published = {}
        self._all_dirty = True  # every host needs a view (first push, who serves ingress)
        self._hosts_dirty = False  # every host needs the hosts list's change
        self._dirty_apps = set()
        self._dirty_hosts = set()
        self._inflight = 0  # calls not answered yet
        self._next_at = 0.0  # no push starts before this time (see pause_ratio)
        self.pause_ratio = pause_ratio
        self._unsubscribe = [data.machines.subscribe(self._machine_event),
                             data.hosts.subscribe(self._host_event),
                             network.subscribe(self._network_event)]

    def close(self):
        """
        Stop: no more events, and no push scheduled from now on, also by what ends after
        (a push under way, an agent's late answer that asks for the whole list again).
        """
        self._closed = True
        for u in self._unsubscribe:
            u()
        self._unsubscribe = []
        if self._pending is not None and self._pending.active():
            self._pending.cancel()

    # -- events ---------------------------------------------------------------------

    _closed = False

    def _soon(self):
        if self._closed:
            return
        if self._pending is None or not self._pending.active():
            delay = max(0.0, self._next_at - self._clock.seconds())
            self._pending = self._clock.callLater(delay, self._push)

    def _machine_event(self, event):
        p = event.get("payload") or {}
        mid = p.get("machine_id") or event.get("subject")
        if event.get("kind") not in ("state", "destroyed") or mid is None:
            return
        m = self._machines.get(mid)
        if not self._loaded or (m is None and event["kind"] != "destroyed"):
            self._unknown.add(mid)
        elif m is not None:
            m.update(state=p.get("state"), health=p.get("health"), host_id=p.get("host_id"))
            if event["kind"] == "destroyed":
                del self._machines[mid]
            self._refresh(mid, m)
        self._soon()

    def _host_event(self, event):
        host_id = event.get("subject")
        self._dirty_hosts.add(host_id)  # it may have (re)registered: it needs a view
        p = event.get("payload") or {}
        if not p.get("executor") or self._data.hosts.get(host_id) is None:
            # No agent session: what the last one held is not known.  (A new session is
            # known by its entry's count of registrations, in _send.)
            self._peers.pop(host_id, None)
        if self._loaded:
            self._refresh_host(host_id)
        self._soon()

    def _network_event(self, kind, key):
        if not self._loaded:
            return
        if kind == "subnet":
            self._refresh_host(key)
        elif key in self._machines:
            self._refresh(key, self._machines[key])
        self._soon()

    # -- the view, kept ---------------------------------------------------------------

    def _refresh_host(self, host_id):
        entry = self._data.hosts.get(host_id)
        address = entry.record.get("address") if entry is not None else None
        edge = entry is not None and is_edge(entry.record)
        if edge != (host_id in self._edges):
            (self._edges.add if edge else self._edges.discard)(host_id)
            self._all_dirty = True  # who serves the published ports changed
        subnet = (self._network.subnets or {}).get(host_id)
        if address and subnet is None:
            # Its subnet now, not with its first machine: a host without VMs still needs
            # its bridge on the cluster network, for its ingress to reach the replicas on
            # other hosts (allocated by the next push; its event refreshes the host).
            self._needs_subnet.add(host_id)
        new = ({"host_id": host_id, "address": address,
                "gateway": self._network.gateway(subnet) if subnet else None}
               if address else None)
        if self._hosts.get(host_id) != new:
            if new is None:
                del self._hosts[host_id]
            else:
                self._hosts[host_id] = new
            self._host_list = None
            self._hosts_changed.add(host_id)
            self._hosts_dirty = True

    def _hosts_list(self):
        if self._host_list is None:
            self._host_list = [self._hosts[h] for h in sorted(self._hosts)]
        return self._host_list

    def _commit_hosts(self):
        """The hosts list's serial, one more if it changed since (its changes kept)."""
        if self._hosts_changed:
            self.hosts_serial += 1
            self._history.append((self.hosts_serial, frozenset(self._hosts_changed)))
            self._history_ids += len(self._hosts_changed)
            self._hosts_changed = set()
            self._deltas = {}
            # A delta past about twice the list is larger than the list: none that old.
            while len(self._history) > 1 and (len(self._history) > HOSTS_HISTORY or
                                              self._history_ids > 2 * len(self._hosts) + 64):
                self._history_ids -= len(self._history.popleft()[1])
        return self.hosts_serial

    def _resumed(self, held):
        """
        For a new agent session whose registration said it holds the hosts list C{held}
        (C{{"hosts_serial", "hosts_digest"}}, of a session before, perhaps of a control
        plane before this one): an empty C{hosts_delta} from its serial to L{hosts_serial}
        if that list is the current one (the same L{hosts_digest}), else L{None} (the whole
        list).  The agent applies the delta only if it still holds that serial, and refuses
        it otherwise (then the whole list follows), so a digest that matched by mistake
        cannot leave it with a list it does not hold.
        """
        if self._digest is None or self._digest[0] != self.hosts_serial:
            self._digest = (self.hosts_serial, hosts_digest(self._hosts.values()))
        if held["hosts_digest"] != self._digest[1]:
            return None
        self.resumed += 1
        return {"base": held["hosts_serial"], "serial": self.hosts_serial, "set": [],
                "remove": []}

    def _delta(self, base):
        """
        The C{hosts_delta} from serial C{base} to L{hosts_serial} (committed), or L{None}
        when the history does not reach back to C{base} or the whole list is no larger.
        Computed once per base and serial: every host at that base gets the same one.
        """
        serial = self.hosts_serial
        if (base, serial) in self._deltas:
            return self._deltas[base, serial]
        delta = None
        if base == serial:
            delta = {"base": base, "serial": serial, "set": [], "remove": []}
        elif self._history and self._history[0][0] <= base + 1 <= serial:
            ids = set()
            for s, changed in reversed(self._history):
                if s <= base:
                    break
                ids.update(changed)
            if len(ids) <= len(self._hosts):
                delta = {"base": base, "serial": serial,
                         "set": [self._hosts[h] for h in sorted(ids) if h in self._hosts],
                         "remove": sorted(h for h in ids if h not in self._hosts)}
        self._deltas[base, serial] = delta
        return delta

    def _refresh(self, mid, m):
        """Machine C{mid} changed (or went, when not in C{_machines}): update its member."""
        addr = (self._network.addresses or {}).get(mid)
        app = self._apps.get(m["app"])
        if app is None:
            app = self._apps[m["app"]] = _App()
            app.publish, app.domain = m["publish"], m["domain"]
        old = app.members.get(mid)
        new = None
        if mid in self._machines and addr is not None and m["state"] in LIVE:
            healthy = m["state"] == "running" and m["health"] in ("passing", "none", None)
            new = {"machine_id": mid, "app": m["app"], "replica": m["replica"],
                   "address": addr[0], "host_id": m["host_id"], "healthy": healthy,
                   "open_ports": m["open_ports"]}
        if old == new:
            return
        if m["publish"] != app.publish or m["domain"] != app.domain:
            # A new version's ports: the app's routes follow its newest machines.
            if new is not None:
                app.publish, app.domain = m["publish"], m["domain"]
            self._all_dirty = True
        if old is not None:
            del app.members[mid]
            n = app.hosts[old["host_id"]] - 1
            if n:
                app.hosts[old["host_id"]] = n
            else:
                del app.hosts[old["host_id"]]
                self._host_apps[old["host_id"]].discard(m["app"])
                self._dirty_hosts.add(old["host_id"])  # no longer needs this app
        if new is not None:
            app.members[mid] = new
            app.hosts[new["host_id"]] = app.hosts.get(new["host_id"], 0) + 1
            self._host_apps.setdefault(new["host_id"], set()).add(m["app"])
        if app.reachable:
            self._reachable.add(m["app"])
        else:
            self._reachable.discard(m["app"])
        app.listed = None
        self._dirty_apps.add(m["app"])
        if not app.members:
            if app.reachable:
                self._all_dirty = True  # every host had its members
            self._reachable.discard(m["app"])
            del self._apps[m["app"]]

    def _known(self, row):
        spec = row.get("spec") or {}
        app_spec = spec.get("app_spec") or {}
        publish = [dict(p) for p in app_spec.get("publish") or []]
        return {"app": spec.get("app"), "replica": spec.get("replica"),
                "state": row.get("state"), "health": (row.get("health") or {}).get("status"),
                "host_id": row.get("host_id"), "publish": publish,
                "domain": app_spec.get("domain") or "",
                "open_ports": [p["guest_port"] for p in publish]}

    async def _read(self):
        """Read what is not known yet: everything the first time, then new machines."""
        if not self._loaded:
            await self._network.load()
            rows = await self._data.machines.find(states=list(LIVE))
            self._loaded = True
            for host_id in self._data.hosts.ids():
                self._refresh_host(host_id)
            for row in rows:
                self._unknown.discard(row["id"])
                self._machines[row["id"]] = m = self._known(row)
                self._refresh(row["id"], m)
            self._all_dirty = True
        while self._unknown:
            ids, self._unknown = sorted(self._unknown), set()
            rows = {}
            for i in range(0, len(ids), 500):  # SQLite bounds the parameters of a query
                rows.update((r["id"], r) for r in await self._data.machines.find(ids=ids[i:i + 500]))
            for mid in ids:
                if mid in self._unknown:
                    continue  # an event came while reading: read it again
                row = rows.get(mid)
                m = self._machines.get(mid)
                if row is not None:
                    self._machines[mid] = m = self._known(row)
                elif m is not None:
                    del self._machines[mid]
                if m is not None:
                    self._refresh(mid, m)

    def _rebuild_published(self):
        published = {}
        for name in sorted(self._apps):
            app = self._apps[name]
            for p in app.publish:
                entry = published.setdefault(str(p["port"]), {"mode": p["mode"], "routes": {}})
                # (lower case: a spec stored before domains were checked may have capitals)
                domain = (app.domain or "").lower() if p["mode"] in ("http", "https") else ""
                routes = entry["routes"].setdefault(domain, [])
                for mem in app.list():
                    routes.append({"key": mem["machine_id"], "host": mem["address"],
                                   "port": p["guest_port"], "healthy": mem["healthy"]})
        self._published = published

    def view_for(self, host_id):
        """
        The view host C{host_id} gets (after a push has read the store), with the whole
        hosts list (C{hosts} and C{hosts_serial}).
        """
        view = self._parts(host_id)
        view["hosts"] = self._hosts_list()
        view["hosts_serial"] = self._commit_hosts()
        return view

    def _parts(self, host_id):
        """The view of host C{host_id} but its hosts list."""
        members = []
        apps = self._apps
        for name in self._host_apps.get(host_id, ()):
            if name not in self._reachable:
                members.extend(apps[name].list())
        for name in self._reachable:
            members.extend(apps[name].list())
        entry = self._data.hosts.get(host_id)
        if self._serves is not None:
            serves = entry is not None and self._serves(entry)
        else:  # the edge hosts if any host is labelled edge=true, else every host
            serves = host_id in self._edges or not self._edges
        return {"members": members, "published": self._published if serves else {},
                "prefix": self._network.cidr.prefixlen}

    async def view(self, host_id=None):
        """
        The view as a host gets it (see the agent's C{network.update}), or with
        C{host_id} L{None} the whole cluster's: every member and route.
        """
        await self._read()
        self._rebuild_published()
        if host_id is not None:
            return self.view_for(host_id)
        members = [mem for name in sorted(self._apps) for mem in self._apps[name].list()]
        return {"hosts": self._hosts_list(), "hosts_serial": self._commit_hosts(),
                "members": members, "published": self._published}

    # -- pushes ---------------------------------------------------------------------

    def busy(self):
        """Whether a push is due or running, or a view is still being delivered."""
        return bool((self._pending is not None and self._pending.active())
                    or self._pushing is not None or self._inflight)

    def _push(self):
        from twisted.internet.defer import ensureDeferred

        if self._pushing is not None:
            self._again = True
            return

        def done(result):
            self._pushing = None
            if self._again:
                self._again = False
                self._soon()
            return result

        self._pushing = ensureDeferred(self.push())
        self._pushing.addErrback(
            lambda f: self.log.warn("cluster network view not pushed: {e}", e=f.getErrorMessage()))
        self._pushing.addBoth(done)

    def _targets(self):
        """The hosts whose part of the view changed since the last push (and clears that)."""
        reachable_changed = not self._reachable.isdisjoint(self._dirty_apps)
        if self._all_dirty or self._hosts_dirty or reachable_changed:
            targets = set(self._data.hosts.ids())
        else:
            targets = set(self._dirty_hosts)
            for name in self._dirty_apps:
                if name in self._apps:  # else its hosts are in _dirty_hosts
                    targets.update(self._apps[name].hosts)
        if self._all_dirty or reachable_changed:
            self._rebuild_published()
        self._all_dirty = self._hosts_dirty = False
        self._dirty_apps = set()
        self._dirty_hosts = set()
        return targets

    async def push(self):
        """Read what is new, then send each reachable host whose part changed its view."""
        await self._read()
        while self._needs_subnet:
            # in host id order, sorted once per pass (not the lowest of the set per host: with
            # 20,000 hosts without subnets, as after the cluster network is first set, that
            # walked the set 20,000 times); hosts that need one meanwhile come in the next pass
            needing = sorted(self._needs_subnet)
            self._needs_subnet.clear()
            for host_id in needing:
                if self._data.hosts.get(host_id) is None:
                    continue
                try:
                    await self._network.host_subnet(host_id)
                except errors.ResourceExhausted as e:
                    self.log.warn("host {h}: no subnet on the cluster network: {e}", h=host_id,
                                  e=e)
        targets = self._targets()
        n = 0
        started = time.perf_counter()
        # what this push may still send (at least one view): the others wait for the next
        self._budget = VIEW_ENTRIES_PER_PUSH
        for host_id in sorted(targets):
            entry = self._data.hosts.get(host_id)
            if entry is None or not entry.executor:
                continue
            if self._send(host_id):
                n += 1
        if self._deferred:
            self.log.debug("{n} hosts' network views wait for the next push",
                           n=len(self._deferred))
            self._dirty_hosts.update(self._deferred)
            self._deferred = set()
            self._again = True
        if n:
            self.pushes += 1
            cost = time.perf_counter() - started
            self._next_at = self._clock.seconds() + cost * self.pause_ratio
        return n

    def _send(self, host_id):
        """
        Send C{host_id} its view; L{False} when this push has sent its share
        (L{VIEW_ENTRIES_PER_PUSH}): it is sent next push; or when its agent session is
        gone (L{errors.NoCallee}): its next registration's session is sent one.
        """
        if self._budget <= 0:
            self._deferred.add(host_id)
            return False
        peer = self._peers.get(host_id)
        entry = self._data.hosts.get(host_id)
        session = getattr(entry, "sessions", 0)
        if peer is None or peer.session != session:
            # The first view of this agent session: its registration may have begun a
            # moment ago (stored and announced after this view; the last session's peer is
            # not its own).
            held = getattr(entry, "network_held", None)
            if held is not None:
                entry.network_held = None
            peer = self._peers[host_id] = _Peer(held, session)
        elif peer.gone:
            return False
        view = self._parts(host_id)
        serial = self._commit_hosts()
        resumed = peer.held is not None
        if resumed:
            delta = self._resumed(peer.held)
            peer.held = None
        else:
            delta = self._delta(peer.serial) if peer.capable and peer.serial is not None else None
        self._budget -= VIEW_COST + len(view["members"]) + (
            len(self._hosts) if delta is None else len(delta["set"]) + len(delta["remove"]))
        why = _why_whole(peer, resumed) if delta is None else None
        self.sent += 1
        peer.sent += 1
        n = peer.sent
        if delta is None:
            view["hosts"], view["hosts_serial"] = self._hosts_list(), serial
            peer.full_at = n
            self.full_lists += 1
            self.full_list_reasons[why] += 1
        else:
            view["hosts_delta"] = delta
        peer.serial, peer.why = serial, None
        try:
            d = self._call(host_id, "network.update", view)
            d = Deferred.fromCoroutine(d) if inspect.iscoroutine(d) else maybeDeferred(lambda: d)
        except Exception:
            d = fail()
        self._inflight += 1

        def failed(f):
            stale = f.check(errors.StaleView)
            self.log.info("host {h}: network view {what}: {e}", h=host_id, e=f.getErrorMessage(),
                          what="refused (the whole hosts list follows)" if stale
                          else "not delivered")
            if peer is not self._peers.get(host_id):
                return  # a session ago
            if f.check(errors.NoCallee):
                # No agent session serves it (the agent restarting): a view sent before the
                # next registration would go nowhere, or to the new session's process before
                # it said which list it holds (the whole list, where an empty delta does).
                peer.gone = True
                peer.serial, peer.why = None, "lost"
            elif n < peer.full_at:
                return  # a whole list was sent after it
            elif stale:
                self._resend(host_id, peer, "refused")  # it applied nothing: the whole list, now
            else:
                # it may not hold it: the next view has the whole list
                peer.serial, peer.why = None, "lost"

        def answered(_):
            self._inflight -= 1

        d.addCallbacks(lambda result: self._answered(host_id, peer, n, serial, result),
                       failed)
        d.addErrback(lambda f: self.log.failure("host {h}: network view answer", f,
                                                h=host_id))
        d.addBoth(answered)
        return True

    def _answered(self, host_id, peer, n, serial, result):
        """Agent C{host_id} answered view C{n} (of hosts serial C{serial}) with C{result}."""
        if peer is not self._peers.get(host_id):
            return  # a session ago
        if isinstance(result, dict) and _is_int(result.get("hosts_serial")):
            in_order = n > peer.answered
            peer.answered = max(peer.answered, n)
            peer.capable = True
            if not in_order or result["hosts_serial"] != serial:
                # It took views out of order (it may hold an older list than the newest
                # sent) or holds another list than the one sent: the whole list, now.
                self.log.debug("host {h}: network view {n} answered {how}: the whole list "
                               "follows", h=host_id, n=n, how="out of order" if not in_order
                               else f"holding serial {result['hosts_serial']}, not {serial}")
                self._resend(host_id, peer, "out_of_order" if not in_order else "other_serial")
        elif isinstance(result, dict) and result.get("network") == "user":
            peer.capable = True  # user-mode networking: it ignores views (deltas too)
        else:
            # No serial: an agent before deltas, which takes the whole list only.
            if peer.capable:
                self.log.debug("host {h}: network view {n} answered without a serial: "
                               "{result!r}", h=host_id, n=n, result=result)
                self._resend(host_id, peer, "no_deltas")  # it may have been sent a delta
            peer.capable = False

    def _resend(self, host_id, peer, why):
        peer.serial, peer.why = None, why
        self._dirty_hosts.add(host_id)
        self._soon()
