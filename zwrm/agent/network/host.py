"""
A host's VM network: a bridge, a TAP per VM, the VXLAN overlay, nftables isolation and NAT.

Layout (see docs/networking.md)::

    guest eth0 ── TAP zt<hash> ─┐
    guest eth0 ── TAP zt<hash> ─┼── bridge zwbr0 (gateway 10.80.H.1/16) ── routing + NAT ── uplink
                                └── vxlan zwvx0 (VNI, UDP 4789, local = host address)
                                       │ unicast to every other host (FDB entries)

All VMs of the cluster share one layer-2 segment (the cluster CIDR), stretched across hosts
by VXLAN with head-end replication: an all-zero FDB entry per peer host carries broadcasts
(ARP), and a unicast entry per remote VM (its MAC is derived from its address) sends its
frames straight to its host.  Nothing is learned from the wire (C{nolearning}).

Isolation, in two nftables tables, rewritten whole and atomically on every change:

 - C{bridge zwrm}: frames from a TAP must carry that VM's own MAC, and its ARP that VM's own
   MAC and address, checked before the bridge learns from a frame (C{prerouting}: a guest
   cannot take another's frames or its address on the segment); its IP packets must carry
   its own address (no spoofing); a guest may send IP only to VMs of its own app, to ports
   other apps' specs open, and to hosts' bridge addresses (where the host's own rules
   apply).
 - C{inet zwrm}: from the bridge, the host accepts only replies and DNS to its bridge address
   (so a guest reaches neither the host's loopback nor its services); routed traffic from
   guests may not go to other hosts' management addresses, the control plane, or back into
   the cluster network; it leaves NATed (masquerade).  Nothing is routed into the bridge
   except replies and the published C{tcp} ports' connections.

Published C{tcp} ports are forwarded by the kernel where it can (L{HostNetwork.set_forwards}):
C{inet zwrm} DNATs a new connection to this host's public address and the port to one
healthy replica (C{numgen inc}: round robin), marks it (C{ct mark}) and SNATs it to the
bridge address, so the replica, on this host or another, answers through this host.  The
connection tracking table keeps each connection with its replica until it ends; when a
replica leaves, its unanswered connections are deleted from it at once (the client's next
SYN goes to another replica) and its open ones after C{drain_timeout} (C{conntrack -D}).
"""

import ipaddress
import os
import shutil
import tempfile

from twisted.internet.defer import DeferredLock
from twisted.logger import Logger

from zwrm.agent.network import addressing
from zwrm.agent.network.commands import CommandFailed, Runner
from zwrm.drivers.cloudinit import HOSTNAME_RE
from zwrm.errors import InvalidArgument

BRIDGE = "zwbr0"
VXLAN = "zwvx0"
DEFAULT_VNI = 8080
DEFAULT_PORT = 4789
#: the connection mark of published connections the kernel forwards (DNAT, then SNAT to
#: the bridge address so replies come back through this host)
INGRESS_MARK = 0x7A770001


def _later(fn):
    """Run C{fn} (which may return a coroutine) from a C{callLater}, logging a failure."""
    from twisted.internet.defer import ensureDeferred

    r = fn()
    if r is not None:
        ensureDeferred(r).addErrback(lambda f: Logger().failure("conntrack", f))


def _ip(text, what):
    try:
        return str(ipaddress.IPv4Address(text))
    except (ValueError, TypeError):
        raise InvalidArgument(f"{what} must be an IPv4 address, not {text!r}") from None


def check_network(net):
    """
    Check a machine's network spec (L{addressing}); return a normalized copy.

    @raise InvalidArgument: naming the bad field.
    """
    if not isinstance(net, dict):
        raise InvalidArgument(f"network must be a dict, not {type(net).__name__}")
    prefix = net.get("prefix")
    if not isinstance(prefix, int) or isinstance(prefix, bool) or not 8 <= prefix <= 30:
        raise InvalidArgument(f"network prefix must be an integer from 8 to 30, not {prefix!r}")
    out = {"address": _ip(net.get("address"), "network address"), "prefix": prefix,
           "gateway": _ip(net.get("gateway"), "network gateway")}
    out["dns"] = _ip(net["dns"], "network dns") if net.get("dns") else None
    mtu = net.get("mtu", addressing.GUEST_MTU)
    if not isinstance(mtu, int) or isinstance(mtu, bool) or not 576 <= mtu <= 9000:
        raise InvalidArgument(f"network mtu must be an integer from 576 to 9000, not {mtu!r}")
    out["mtu"] = mtu
    v = net.get("domain")
    if v is not None and (not isinstance(v, str) or not v or any(c in v for c in " :,\t\n")):
        raise InvalidArgument(f"network domain must be a name without spaces, not {v!r}")
    out["domain"] = v
    v = net.get("hostname")
    if v is not None and (not isinstance(v, str) or not HOSTNAME_RE.match(v)):
        # The guest's host name (kernel ip=, the cloud-init seed's local-hostname).
        raise InvalidArgument(f"network hostname must be a DNS label (a-z, 0-9 and -, at "
                              f"most 63, not starting or ending with -), not {v!r}")
    out["hostname"] = v
    cidr = ipaddress.IPv4Network(f"{out['gateway']}/{prefix}", strict=False)
    if ipaddress.IPv4Address(out["address"]) not in cidr:
        raise InvalidArgument(f"network address {out['address']} is not in {cidr}")
    ports = net.get("open_ports") or []
    if not isinstance(ports, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in ports):
        raise InvalidArgument(f"network open_ports must be a list of TCP ports, not {ports!r}")
    out["open_ports"] = sorted(set(ports))
    return out


class HostNetwork:
    """
    The VM network of one host.

    @param reactor: the reactor (processes).
    @param local_address: this host's address on the underlay (VXLAN's source), or L{None}
        for a single host without the overlay.
    @param run: a L{commands.Runner} (tests give one acting inside a network namespace).
    @param state_dir: where a copy of the ruleset given to C{nft} is kept (private).
    @param deny: more addresses or CIDRs that guests may never reach (e.g. the control
        plane's address, a metadata service).
    """

    log = Logger()

    def __init__(self, reactor, local_address=None, run=None, state_dir=None, vni=DEFAULT_VNI,
                 port=DEFAULT_PORT, deny=(), uid=None, gid=None, drain_timeout=30.0):
        self.reactor = reactor
        self.drain_timeout = drain_timeout
        #: false once nftables refused the forwarding: the proxy serves every port
        self.kernel_forwarding = True
        #: kernel-forwarded published ports: port -> [(replica address, its port)]
        self.forwards = {}
        self._cuts = {}  # (port, address, replica port) -> the drain timeout's call
        self._no_conntrack = False
        self.local_address = local_address
        self.run = run or Runner(reactor)
        self.state_dir = state_dir or tempfile.mkdtemp(prefix="zwrm-net-")
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.vni = vni
        self.port = port
        self.deny = list(deny)
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.gateway = None
        self.prefix = None
        self.cidr = None
        self.machines = {}  # machine id -> {"tap", "address", "app", "open_ports"}
        self.peers = {}  # host id -> {"address", "gateway"}
        self.members = {}  # address -> {"app", "host_id", "open_ports"} (other hosts' VMs)
        self._fdb = set()  # (mac, dst) entries on the vxlan device
        self._lock = DeferredLock()
        self._ready = False

    # -- public ---------------------------------------------------------------------

    async def add_machine(self, machine_id, app, net, recreate=True):
        """
        Make machine C{machine_id}'s TAP on the bridge (creating the bridge for this host's
        subnet first) and let its address through the rules.

        @param net: its network spec (L{check_network}).
        @param recreate: make the TAP again if it exists (a new start); false to keep a
            running machine's TAP (after an agent restart).
        @return: C{{"tap", "mac"}} for the driver.
        """
        net = check_network(net)
        return await self._locked(self._add_machine, machine_id, app, net, recreate)

    async def ensure_bridge(self, net):
        """
        Make this host's bridge, overlay and rules for its subnet (C{{"gateway", "prefix"}})
        without a machine: the ingress reaches other hosts' VMs through them.
        """
        return await self._locked(self._setup, net)

    async def remove_machine(self, machine_id):
        """Delete machine C{machine_id}'s TAP and its rules; unknown machines are ignored."""
        return await self._locked(self._remove_machine, machine_id)

    async def set_cluster(self, hosts, members):
        """
        The rest of the cluster, as the control plane last described it.

        @param hosts: C{[{"host_id", "address", "gateway"}]}: every other host's underlay
            address and bridge address.
        @param members: C{[{"address", "app", "host_id", "open_ports"}]}: every VM of the
            cluster (this host's included; they are taken from L{add_machine}).
        """
        return await self._locked(self._set_cluster, hosts, members)

    def can_forward(self, backends):
        """
        Whether a C{tcp} published port with these replicas (C{[(address, port)]}) can be
        forwarded by the kernel: this host has a public (non-loopback) address, its bridge
        is up and every replica is on the cluster network.
        """
        if (not self.kernel_forwarding or not self._ready or not self.local_address
                or not backends):
            return False
        if ipaddress.IPv4Address(self.local_address).is_loopback:
            return False
        cidr = ipaddress.IPv4Network(self.cidr)
        try:
            return all(ipaddress.IPv4Address(a) in cidr and 0 < int(p) < 65536
                       for a, p in backends)
        except (ValueError, TypeError):  # a name, not an address: the proxy resolves it
            return False

    async def set_forwards(self, table):
        """
        The published C{tcp} ports the kernel forwards (nftables DNAT on this host's public
        address, round robin over the healthy replicas; the ingress proxy keeps listening
        and gets a connection only when no replica is healthy).

        @param table: C{{port: [(replica address, replica port)]}}: the healthy replicas.
            A replica no longer listed gets no new connections; its connections that it
            never answered are dropped from the connection tracking table at once (the
            client's next SYN goes to another replica), its open ones after
            C{drain_timeout} unless they end first.
        """
        return await self._locked(self._set_forwards, table)

    async def stop_forwarding(self):
        """No published port forwarded by the kernel any more, no drain timers (closing)."""
        return await self._locked(self._stop_forwarding)

    async def close(self):
        """Remove the bridge, the overlay, the TAPs and the rules (the host leaves)."""
        return await self._locked(self._teardown)

    def nic(self, machine_id):
        m = self.machines.get(machine_id)
        return None if m is None else {"tap": m["tap"], "mac": addressing.mac_for(m["address"])}

    # -- internals ------------------------------------------------------------------

    async def _locked(self, fn, *args):
        await self._lock.acquire()
        try:
            return await fn(*args)
        finally:
            self._lock.release()

    async def _setup(self, net):
        gw, prefix = net["gateway"], net["prefix"]
        if self._ready and (gw, prefix) == (self.gateway, self.prefix):
            return
        old = (self.gateway, self.prefix) if self.gateway is not None else None
        self.gateway, self.prefix = gw, prefix
        self.cidr = str(ipaddress.IPv4Network(f"{gw}/{prefix}", strict=False))
        run = self.run
        mac = None
        out = await run("ip", "-o", "link", "show", "dev", BRIDGE, check=False)
        if "link/ether " in out:
            # There already (an agent restart or upgrade): its MAC stays what guests know.
            mac = out.split("link/ether ", 1)[1].split()[0]
        else:
            await run("ip", "link", "add", BRIDGE, "type", "bridge")
        # A MAC of its own, set: a bridge without one takes the lowest of its ports', so a
        # TAP going (a VM stopped, or moved live) could change it, and every guest that
        # has the gateway's old MAC in its ARP cache (its DNS server, its egress; a moved
        # guest's replies to the ingress's SNAT address) would send into nothing until
        # that entry goes stale.  Seen in a live move: the source host's frames changed
        # source MAC when the moved guest's TAP was deleted.  Set once, it stays.
        await run("ip", "link", "set", BRIDGE, "address", mac or self.bridge_mac())
        if old is not None and old[0] != gw:
            # One gateway address: the old one (this host's previous subnet) goes first
            # (deleting a primary address deletes the secondaries of its subnet with it).
            await run("ip", "addr", "del", f"{old[0]}/{old[1]}", "dev", BRIDGE, check=False)
        await run("ip", "addr", "replace", f"{gw}/{prefix}", "dev", BRIDGE)
        await run("ip", "link", "set", BRIDGE, "up")
        await run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1", check=False)
        # Bridged frames are filtered by the bridge table only (br_netfilter off in here).
        await run("sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=0", check=False)
        forwarding = (await run("sysctl", "-n", "net.ipv4.ip_forward", check=False)).strip()
        if forwarding != "1":
            self.log.warn("net.ipv4.ip_forward is not 1 and cannot be set by the agent: guests "
                          "have no egress (set it in /etc/sysctl.d)")
        if self.local_address is not None:
            if not await self._exists(VXLAN):
                await run("ip", "link", "add", VXLAN, "type", "vxlan", "id", self.vni,
                          "dstport", self.port, "local", self.local_address, "nolearning")
            await run("ip", "link", "set", VXLAN, "master", BRIDGE, "up")
        self._ready = True
        await self._apply_rules()

    def bridge_mac(self):
        """
        The bridge's MAC: C{0a:59} and this host's underlay address (unique in the cluster
        whatever subnet the bridge serves; VMs' are C{0a:58} and theirs), or without one
        (no overlay) its gateway's.
        """
        if self.local_address is not None:
            return "0a:59:" + addressing.mac_for(self.local_address)[6:]
        return "0a:59:" + addressing.mac_for(self.gateway)[6:]

    async def _exists(self, dev):
        out = await self.run("ip", "-o", "link", "show", "dev", dev, check=False)
        return bool(out.strip())

    async def _add_machine(self, machine_id, app, net, recreate=True):
        if not self._ready:
            # The bridge serves this host's own subnet, from the cluster view
            # (ensure_bridge); a machine that comes before any view brings it.  Not once it
            # is made: a machine moved here live keeps its address, and the gateway, of its
            # old host's subnet (reached over the overlay), which must not become this
            # bridge's address too (the same address on two hosts of one segment).
            await self._setup(net)
        tap = addressing.tap_name(machine_id)
        exists = await self._exists(tap)
        if exists and recreate:
            await self.run("ip", "link", "del", tap, check=False)
        if recreate or not exists:
            await self.run("ip", "tuntap", "add", "dev", tap, "mode", "tap", "user", self.uid,
                           "group", self.gid)
        await self.run("ip", "link", "set", tap, "mtu", net["mtu"], "master", BRIDGE, "up")
        self.machines[machine_id] = {"tap": tap, "address": net["address"], "app": app,
                                     "open_ports": net["open_ports"]}
        await self._apply_rules()
        return {"tap": tap, "mac": addressing.mac_for(net["address"])}

    async def _remove_machine(self, machine_id):
        m = self.machines.pop(machine_id, None)
        tap = addressing.tap_name(machine_id)
        await self.run("ip", "link", "del", tap, check=False)
        if m is not None and self._ready:
            await self._apply_rules()

    async def _set_cluster(self, hosts, members):
        self.peers = {h["host_id"]: {"address": _ip(h["address"], "host address"),
                                     "gateway": _ip(h["gateway"], "host gateway")
                                     if h.get("gateway") else None}
                      for h in hosts if h.get("address") and h["address"] != self.local_address}
        local = {m["address"] for m in self.machines.values()}
        self.members = {}
        for m in members:
            addr = _ip(m["address"], "member address")
            if addr not in local:
                self.members[addr] = {"app": m["app"], "host_id": m.get("host_id"),
                                      "open_ports": list(m.get("open_ports") or [])}
        if self._ready:
            await self._sync_fdb()
            await self._apply_rules()

    async def _sync_fdb(self):
        if self.local_address is None:
            return
        want = {("00:00:00:00:00:00", p["address"]) for p in self.peers.values()}
        for addr, m in self.members.items():
            peer = self.peers.get(m["host_id"])
            if peer is not None:
                want.add((addressing.mac_for(addr), peer["address"]))
        for mac, dst in sorted(self._fdb - want):
            await self.run("bridge", "fdb", "del", mac, "dev", VXLAN, "dst", dst, check=False)
        for mac, dst in sorted(want - self._fdb):
            if mac == "00:00:00:00:00:00":
                # After an agent restart the entry may be there already ("File exists").
                await self.run("bridge", "fdb", "append", mac, "dev", VXLAN, "dst", dst,
                               check=False)
            else:
                await self.run("bridge", "fdb", "replace", mac, "dev", VXLAN, "dst", dst)
        self._fdb = want

    async def _set_forwards(self, table):
        table = {int(p): sorted({(str(a), int(bp)) for a, bp in bs})
                 for p, bs in table.items() if bs}
        if not self._ready:
            table = {}
        before, self.forwards = self.forwards, table
        if before != table:
            await self._apply_rules()  # may fall back to no forwarding at all
            for port in sorted(set(before) | set(self.forwards)):
                if before.get(port) != self.forwards.get(port):
                    self.log.info("ingress: port {port} forwarded by the kernel to {to}",
                                  port=port, to=" ".join(f"{a}:{p}" for a, p in
                                                         self.forwards.get(port, ())) or
                                  "nothing")
        for port, backends in before.items():
            for a, bp in backends:
                if (a, bp) not in table.get(port, ()):
                    await self._leave(port, a, bp)
        for port, backends in table.items():
            for a, bp in backends:
                call = self._cuts.pop((port, a, bp), None)
                if call is not None and call.active():
                    call.cancel()

    async def _stop_forwarding(self):
        self._cancel_cuts()
        if self.forwards:
            self.forwards = {}
            await self._apply_rules()

    def _cancel_cuts(self):
        for call in self._cuts.values():
            if call.active():
                call.cancel()
        self._cuts = {}

    async def _leave(self, port, address, bport):
        """Replica C{address:bport} left published port C{port}: see L{set_forwards}."""
        await self._conntrack_delete(port, address, bport, "SYN_SENT")
        key = (port, address, bport)
        if key not in self._cuts or not self._cuts[key].active():
            def cut():
                self._cuts.pop(key, None)
                if (address, bport) not in self.forwards.get(port, ()):
                    return self._conntrack_delete(port, address, bport)

            self._cuts[key] = self.reactor.callLater(self.drain_timeout, _later, cut)

    async def _conntrack_delete(self, port, address, bport, state=None):
        if self._no_conntrack or not self.local_address:
            return
        if shutil.which("conntrack") is None:
            self._no_conntrack = True
            self.log.warn("no conntrack tool: connections to a replica that left a published "
                          "port are not moved or cut (install the conntrack package)")
            return
        argv = ["conntrack", "-D", "-p", "tcp", "--orig-dst", self.local_address,
                "--orig-port-dst", port, "--reply-src", address, "--reply-port-src", bport]
        if state:
            argv += ["--state", state]
        try:
            await self.run(*argv, check=False)  # exit 1 when there was nothing to delete
        except CommandFailed as e:
            self.log.warn("{e}: connections to a replica that left a published port are "
                          "not moved or cut", e=e.message)

    def _forward_rules(self):
        """The DNAT rules of L{forwards} (for C{nat} chains: prerouting, output)."""
        rules = []
        for port, backends in sorted(self.forwards.items()):
            pick = ", ".join(f"{i} : {a} . {bp}" for i, (a, bp) in enumerate(backends))
            rules.append(f"ip daddr {self.local_address} tcp dport {port} ct mark set "
                         f"{INGRESS_MARK:#x} dnat ip to numgen inc mod {len(backends)} "
                         f"map {{ {pick} }}")
        return rules

    def ruleset(self):
        """The nftables ruleset for the current state (text for C{nft -f})."""
        gw, cidr = self.gateway, self.cidr
        local = {m["address"]: m for m in self.machines.values()}
        every = dict(self.members)
        every.update(local)
        deny = sorted({p["address"] for p in self.peers.values()} | set(self.deny))
        gateways = sorted({gw} | {p["gateway"] for p in self.peers.values() if p["gateway"]})

        def elements(items):
            return f"elements = {{ {', '.join(items)} }}" if items else ""

        guests = [f'"{m["tap"]}" . {a}' for a, m in sorted(local.items())]
        macs = [f'"{m["tap"]}" . {addressing.mac_for(a)}' for a, m in sorted(local.items())]
        appid = [f"{a} : {addressing.app_mark(m['app'])}" for a, m in sorted(every.items())]
        members = [f"{a} . {addressing.app_mark(m['app'])}" for a, m in sorted(every.items())]
        opened = [f"{a} . tcp . {p}" for a, m in sorted(every.items())
                  for p in m.get("open_ports") or []]
        pre = "".join(f"    {r}\n" for r in self._forward_rules())
        return f"""table bridge zwrm
delete table bridge zwrm
table bridge zwrm {{
  set guests {{ type ifname . ipv4_addr; {elements(guests)} }}
  set macs {{ type ifname . ether_addr; {elements(macs)} }}
  map appid {{ type ipv4_addr : mark; {elements(appid)} }}
  set members {{ type ipv4_addr . mark; {elements(members)} }}
  set gateways {{ type ipv4_addr; {elements(gateways)} }}
  set opened {{ type ipv4_addr . inet_proto . inet_service; {elements(opened)} }}
  chain prerouting {{
    type filter hook prerouting priority -200; policy accept;
    iifname "zt*" iifname . ether saddr != @macs drop
    iifname "zt*" ether type arp iifname . arp saddr ether != @macs drop
    iifname "zt*" ether type arp iifname . arp saddr ip != @guests drop
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "zt*" ether type ip iifname . ip saddr != @guests drop
    iifname "zt*" ether type != {{ ip, arp }} drop
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "zt*" jump guest_out
  }}
  chain guest_out {{
    ether type arp accept
    ether type != ip drop
    iifname . ip saddr != @guests drop
    ip daddr @gateways accept
    meta mark set ip saddr map @appid
    ip daddr . meta mark @members accept
    ip daddr . ip protocol . th dport @opened accept
    ip saddr . ip protocol . th sport @opened accept
    drop
  }}
}}
table inet zwrm
delete table inet zwrm
table inet zwrm {{
  set deny {{ type ipv4_addr; flags interval; {elements(deny)} }}
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "{BRIDGE}" ct state established,related accept
    iifname "{BRIDGE}" ip daddr {gw} udp dport 53 accept
    iifname "{BRIDGE}" ip daddr {gw} tcp dport 53 accept
    iifname "{BRIDGE}" drop
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    oifname "{BRIDGE}" ct state established,related accept
    oifname "{BRIDGE}" ct mark {INGRESS_MARK:#x} ct status dnat accept
    oifname "{BRIDGE}" drop
    iifname "{BRIDGE}" ct mark {INGRESS_MARK:#x} ct status dnat ct direction reply accept
    iifname "{BRIDGE}" ip daddr @deny drop
    iifname "{BRIDGE}" ip daddr {cidr} drop
  }}
  chain ingress {{
    type nat hook prerouting priority -100; policy accept;
    iifname "{BRIDGE}" return
{pre}  }}
  chain ingress_local {{
    type nat hook output priority -100; policy accept;
{pre}  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    ct mark {INGRESS_MARK:#x} oifname "{BRIDGE}" masquerade
    ip saddr {cidr} ip daddr != {cidr} oifname != "{BRIDGE}" masquerade
  }}
}}
"""

    async def _apply_rules(self):
        if not self._ready:
            return
        ruleset = self.ruleset()
        # nft reads the ruleset from its standard input: the rules never wait for the disk
        # (a host whose data disk is full keeps its guests isolated and reachable).  The
        # copy in the state directory is for the operator to read, when it can be written.
        path = os.path.join(self.state_dir, "nftables.conf")
        try:
            with open(path + ".tmp", "w") as f:
                f.write(ruleset)
            os.replace(path + ".tmp", path)
        except OSError as e:
            self.log.warn("the nftables ruleset's copy {path} was not written: {e}; applied"
                          " all the same", path=path, e=e.strerror or e)
            path = "(not saved)"
        try:
            await self.run("nft", "-f", "-", stdin=ruleset)
        except CommandFailed as e:
            if self.forwards:
                # Isolation first: without the forwarding (this kernel lacks a part of
                # it), the proxy, which listens on the ports too, serves them.
                self.log.error("nftables rejected the published ports' forwarding ({e}); "
                               "the proxy serves them", e=e.message)
                self.kernel_forwarding, self.forwards = False, {}
                return await self._apply_rules()
            self.log.error("nftables rejected the ruleset {path}: {e}", path=path, e=e.message)
            raise

    async def _teardown(self):
        self._cancel_cuts()
        self.forwards = {}
        for mid in list(self.machines):
            await self._remove_machine(mid)
        await self.run("nft", "delete", "table", "bridge", "zwrm", check=False)
        await self.run("nft", "delete", "table", "inet", "zwrm", check=False)
        await self.run("ip", "link", "del", VXLAN, check=False)
        await self.run("ip", "link", "del", BRIDGE, check=False)
        self._fdb = set()
        self._ready = False
