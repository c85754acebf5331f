"""
An agent's side of the cluster network: what the executor calls for each machine, and the
view of the cluster the control plane pushes (C{zwrm.agent.<host_id>.network.update}).

L{AgentNetwork} owns the host's L{host.HostNetwork} (bridge, TAPs, overlay, rules), its
L{dns.ClusterDNS} (started on the bridge address once the host has its subnet), its
L{proxy.Ingress} (the published ports, on the host's public address) and the loopback
forwards that give each bridged VM a C{host_port} as user-mode networking did.
"""

import json
import os
import re

import orjson
from autobahn import wamp
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from zwrm.agent.network import addressing
from zwrm.agent.network.dns import ClusterDNS
from zwrm.agent.network.host import HostNetwork, check_network
from zwrm.agent.network.proxy import KEEPALIVE_TIMEOUT, Ingress, forward_loopback
from zwrm.errors import InvalidArgument, StaleView

CERT_DOMAIN_RE = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\Z")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _host_entries(hosts, field):
    """
    A view's hosts list (C{field}: C{hosts} or C{hosts_delta.set}) by host id.

    @raise InvalidArgument: C{hosts} is not a list of dicts with a string C{host_id}.
    """
    if not isinstance(hosts, list):
        raise InvalidArgument(f"{field} must be a list, not {type(hosts).__name__}")
    out = {}
    for i, h in enumerate(hosts):
        if not isinstance(h, dict) or not isinstance(h.get("host_id"), str):
            raise InvalidArgument(f'{field}[{i}] must be a dict with a "host_id" string')
        out[h["host_id"]] = h
    return out


class AgentNetwork:
    """
    @param reactor: the reactor.
    @param host_id: this host's id (its own VMs are local in the view).
    @param public_address: where published ports listen (the agent's C{--address}); also
        the VXLAN source address.
    @param host_network: a L{HostNetwork} (tests give one acting in a namespace).
    @param dns_port: 53 in production; tests may use another.
    @param keepalive_timeout: seconds an C{http}/C{https} client of a published port may
        wait for its next request before it is closed (L{proxy.KEEPALIVE_TIMEOUT}).
    """

    log = Logger()

    def __init__(self, reactor, host_id, public_address, host_network=None, state_dir=None,
                 dns_port=53, drain_timeout=30.0, deny=(), deny_names=(),
                 kernel_forwarding=True, keepalive_timeout=KEEPALIVE_TIMEOUT, threads=None):
        self.reactor = reactor
        #: C{threads(f, *args)} -> Deferred: runs a file write off the reactor thread (the
        #: hosts list is 1.6 MB at 20,000 hosts); default: the reactor's thread pool
        self._threads = threads or (
            lambda f, *a: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a))
        #: C{tcp} published ports are forwarded by the kernel (nftables DNAT) where the
        #: host can; false: every published port goes through the proxy
        self.kernel_forwarding = kernel_forwarding
        self.host_id = host_id
        self.public_address = public_address
        self.host = host_network or HostNetwork(reactor, local_address=public_address,
                                                state_dir=state_dir, deny=deny,
                                                drain_timeout=drain_timeout)
        self.dns_port = dns_port
        self.dns = None
        self.ingress = Ingress(reactor, interface=public_address or "127.0.0.1",
                               drain_timeout=drain_timeout, keepalive_timeout=keepalive_timeout)
        self._forwards = {}  # machine id -> listening port
        self._view = None
        self._view_serial = 0  # views received
        # The hosts list of the views received, by host id, and the control plane's serial
        # of it (None: a list without one, or none yet): a C{hosts_delta} applies to it.
        self._hosts, self._hosts_serial = {}, None
        self._hosts_digest = None  # hosts_digest(self._hosts), computed when asked for
        self._applied_serial, self._applied_result = 0, None  # the newest view applied
        self._applying = defer.DeferredLock()
        # The answers to views, in the order the views came (see _answer)
        self._answers = {}  # view number -> the Deferred its caller was given
        self._outcomes = {}  # view number -> its outcome, while an earlier one is unanswered
        self._answered = 0  # the number of the newest view answered
        #: where the ingress certificates are kept (0600 files in a 0700 directory), so an
        #: agent restart serves TLS before the control plane gives them again
        self.certs_dir = os.path.join(state_dir, "certs") if state_dir else None
        self._load_certs()
        #: where the hosts list held is kept (a 0600 file in a 0700 directory), so that after
        #: an agent restart its registration can say it holds it (L{held}) and the control
        #: plane need not send it again
        self.state_dir = state_dir
        self._hosts_saving = None  # the DelayedCall of the next save of the hosts list
        self._hosts_writes = defer.DeferredLock()  # one write of it at a time, in order
        self._load_hosts()
        #: host names (e.g. the control plane's) guests may not reach, resolved on first use
        self._deny_names = [n for n in deny_names if n]

    async def prepare(self, machine_id, app, net, service_port=None, kernel=True,
                      host_port=None, adopt=False):
        """
        Network a machine about to start (or found running after an agent restart, with
        C{adopt}): its TAP, its rules, its loopback forward.

        @return: C{{"nic", "cmdline", "host_port"}}: the driver's NIC (with the guest's
            cloud-init C{network_config}, for disk images), kernel arguments to add (kernel
            images only) and the loopback port that reaches its service port.
        """
        net = check_network(net)
        await self._resolve_deny()
        nic = await self.host.add_machine(machine_id, app, net, recreate=not adopt)
        # On the bridge's address (this host's gateway): a machine moved here live has its
        # old host's gateway in its network spec.
        self._start_dns(dict(net, gateway=self.host.gateway or net["gateway"]))
        if self._view is not None:  # the newest view again, now with this machine
            await self._applying.run(lambda: defer.ensureDeferred(self._apply(self._view)))
        self._close_forward(machine_id)
        if service_port is not None:
            try:
                lp = forward_loopback(self.reactor, net["address"], service_port,
                                      listen_port=host_port or 0)
            except Exception:
                lp = forward_loopback(self.reactor, net["address"], service_port)
            self._forwards[machine_id] = lp
            host_port = lp.getHost().port
        # A disk image learns its address from its cloud-init seed's network-config.
        nic = dict(nic, network_config=addressing.cloud_init_network_config(net))
        return {"nic": nic, "cmdline": addressing.kernel_ip_arg(net) if kernel else "",
                "host_port": host_port}

    async def _resolve_deny(self):
        names, self._deny_names = self._deny_names, []
        for name in names:
            try:
                address = await self.reactor.resolve(name)
            except Exception as e:
                self.log.warn("cannot resolve {name} to keep guests from it: {e}", name=name, e=e)
                continue
            if address not in self.host.deny:
                self.host.deny.append(address)

    async def release(self, machine_id):
        """The machine was destroyed: its TAP, rules and forward go."""
        self._close_forward(machine_id)
        await self.host.remove_machine(machine_id)

    def _close_forward(self, machine_id):
        lp = self._forwards.pop(machine_id, None)
        if lp is not None:
            lp.stopListening()

    def _start_dns(self, net):
        if self.dns is not None:
            return
        self.dns = ClusterDNS(self.reactor, net["gateway"], port=self.dns_port,
                              domain=net.get("domain") or "zwrm.internal")
        try:
            self.dns.start()
        except Exception as e:
            self.log.warn("cluster DNS cannot listen on {gw}:{port}: {e}", gw=net["gateway"],
                          port=self.dns_port, e=e)
            self.dns.stop()
            self.dns = None

    # -- ingress certificates ----------------------------------------------------------

    def set_certs(self, doc):
        """
        The ingress certificates, the whole set (C{zwrm.agent.<host>.ingress.certs}, from
        the control plane's L{zwrm.control.resources.certs.CertPublisher})::

            {"certs": [{"domain", "cert" (PEM, with its chain), "key" (PEM), "fingerprint"}]}

        Kept in L{certs_dir} and served by C{https} ports from the next handshake.

        @return: C{{"certs": [domains served], "refused": {domain: why}}}.
        @raise InvalidArgument: C{doc} is not of that form (nothing changes).
        """
        certs = doc.get("certs") if isinstance(doc, dict) else None
        if not isinstance(certs, list) or not all(
                isinstance(c, dict) and isinstance(c.get("domain"), str)
                and isinstance(c.get("cert"), str) and isinstance(c.get("key"), str)
                and CERT_DOMAIN_RE.match(c["domain"]) for c in certs):
            raise InvalidArgument('ingress certificates must be {"certs": [{"domain", "cert", '
                                  '"key"}]}')
        result = self.ingress.set_certs(certs)
        self._save_certs([c for c in certs if c["domain"].lower() in result["certs"]])
        return result

    def _save_certs(self, certs):
        if self.certs_dir is None:
            return
        os.makedirs(self.certs_dir, mode=0o700, exist_ok=True)
        os.chmod(self.certs_dir, 0o700)
        keep = set()
        for c in certs:
            name = c["domain"].lower().replace("*", "_wildcard_") + ".pem"
            keep.add(name)
            path = os.path.join(self.certs_dir, name)
            tmp = path + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"domain": c["domain"].lower(), "cert": c["cert"], "key": c["key"]}, f)
            os.replace(tmp, path)
        for name in os.listdir(self.certs_dir):
            if name not in keep:
                os.unlink(os.path.join(self.certs_dir, name))

    def _load_certs(self):
        if self.certs_dir is None or not os.path.isdir(self.certs_dir):
            return
        certs = []
        for name in sorted(os.listdir(self.certs_dir)):
            if not name.endswith(".pem"):
                continue
            try:
                with open(os.path.join(self.certs_dir, name)) as f:
                    certs.append(json.load(f))
            except (OSError, ValueError) as e:
                self.log.warn("ingress certificate {name} not read: {e}", name=name, e=e)
        if certs:
            self.ingress.set_certs(certs)

    @wamp.register("network.update")
    def update(self, view):
        """
        The cluster as the control plane sees it now (pushed on every change)::

            {"hosts": [{"host_id", "address", "gateway"}], "hosts_serial": S,
             "members": [{"machine_id", "app", "replica", "address", "host_id", "healthy",
                          "open_ports"}],
             "published": {"PORT": {"mode": "tcp"|"http"|"https", "routes": {"DOMAIN"|"": [
                 {"key", "host", "port", "healthy"}]}}},
             "prefix": N}

        or, instead of C{hosts} and C{hosts_serial}, the changes to the hosts list since
        serial C{B}::

            "hosts_delta": {"base": B, "serial": S, "set": [{"host_id", "address",
                            "gateway"}], "remove": [host_id]}

        (entries of C{set} added or replaced by C{host_id}, C{remove}'s ids dropped).  A
        delta applies only to the list of serial C{B}.  The list is kept here and changed
        by each view as it arrives, in order, even by a view whose apply is skipped
        because a newer one came meanwhile (only the newest is applied).  C{hosts_serial}
        is optional (a control plane before deltas sends none: then no delta applies
        until a list with a serial comes).

        @return: a Deferred of C{{"members", "published", "hosts_serial"}}: the view's
            member count, the published ports and the serial of the hosts list held once
            this view was taken (L{None} when it has none); the control plane sends a delta
            only to an agent whose answers carry C{hosts_serial}.  Views are answered in
            the order they came.
        @raise StaleView: a C{hosts_delta} whose C{base} is not the serial of the list held
            (a view lost or reordered, an agent restarted): nothing is applied, and the
            control plane sends the whole list again.
        @raise InvalidArgument: the view, its C{hosts}, C{hosts_serial} or C{hosts_delta}
            is malformed (naming the field); nothing is applied.
        """
        if not isinstance(view, dict):
            raise InvalidArgument(f"a network view must be a dict, not {type(view).__name__}")
        hosts, serial = self._hosts_of(view)
        if hosts is not self._hosts:
            self._hosts_digest = None
        # (a delta that sets or removes nothing changes nothing: no compare of the lists)
        delta = view.get("hosts_delta")
        changed = hosts is not self._hosts and (
            delta is None or bool(delta.get("set") or delta.get("remove")))
        self._hosts, self._hosts_serial = hosts, serial
        if changed:
            self._save_hosts_soon()
        self._view = dict(view, hosts=[hosts[h] for h in sorted(hosts)])
        self._view.pop("hosts_delta", None)
        self._view.pop("hosts_serial", None)
        self._view_serial += 1
        n = self._view_serial
        # One view applied at a time, and only the newest: an apply waits on commands (the
        # bridge's first setup after an agent restart), and two applies interleaved there
        # could end with the older view's routes (a replica's health flipping back).
        answer = self._answers[n] = defer.Deferred()
        d = self._applying.run(lambda: defer.ensureDeferred(self._apply_newest(n)))
        d.addBoth(self._answer, n)
        return answer.addCallback(lambda result: dict(result, hosts_serial=serial))

    def _answer(self, outcome, n):
        """
        View C{n}'s apply ended with C{outcome} (a result or a Failure): answer it once
        every view before it is answered, and the ones after it that waited for it.  The
        lock lets the next view run as it is released, before this one's answer goes out;
        a view that finds its work done (a newer one applied) would otherwise answer
        first, and the control plane takes an answer out of order for a list not held.
        """
        self._outcomes[n] = outcome
        while self._answered + 1 in self._outcomes:
            self._answered += 1
            outcome = self._outcomes.pop(self._answered)
            answer = self._answers.pop(self._answered)
            if isinstance(outcome, Failure):
                answer.errback(outcome)
            else:
                answer.callback(outcome)

    def held(self):
        """
        The hosts list this agent holds, as its registration reports it to the control
        plane (facts C{network}): C{{"hosts_serial", "hosts_digest"}} (L{hosts_digest}), or
        L{None} when it holds none with a serial.  A control plane whose list has the same
        digest then sends a C{hosts_delta} on that serial instead of the whole list (after
        its own restart, or this agent's reconnection, the list is mostly unchanged).
        """
        if self._hosts_serial is None:
            return None
        if self._hosts_digest is None:
            self._hosts_digest = addressing.hosts_digest(self._hosts.values())
        return {"hosts_serial": self._hosts_serial, "hosts_digest": self._hosts_digest}

    #: seconds after a change of the hosts list before it is saved (changes meanwhile join it)
    HOSTS_SAVE_DELAY = 2.0

    def _hosts_path(self):
        return os.path.join(self.state_dir, "hosts.json") if self.state_dir else None

    def _save_hosts_soon(self):
        if self.state_dir is None or (self._hosts_saving is not None
                                      and self._hosts_saving.active()):
            return
        self._hosts_saving = self.reactor.callLater(self.HOSTS_SAVE_DELAY, self._save_hosts)

    def _save_hosts(self):
        """
        Keep the hosts list held and its serial in L{_hosts_path} (atomically, 0600): the
        list as it is now, written in a thread after the writes before it.

        @return: a Deferred that fires once it is written or failed (a warning: a full
            disk; the next restart gets the whole list, as without the file); never fails.
        """
        path, state_dir = self._hosts_path(), self.state_dir
        if path is None:
            return defer.succeed(None)
        text = orjson.dumps({"hosts_serial": self._hosts_serial,
                             "hosts": [self._hosts[h] for h in sorted(self._hosts)]})

        def write():
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            os.chmod(state_dir, 0o700)
            tmp = path + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(text)
            os.replace(tmp, path)

        def failed(f):
            if f.check(OSError):
                self.log.warn("the cluster's hosts list not saved in {path}: {e}", path=path,
                              e=f.value)
            else:
                self.log.failure("the cluster's hosts list not saved in {path}", f, path=path)

        return self._hosts_writes.run(lambda: self._threads(write).addErrback(failed))

    def _load_hosts(self):
        """The hosts list saved before a restart, if any and well formed."""
        path = self._hosts_path()
        if path is None or not os.path.exists(path):
            return
        try:
            with open(path, "rb") as f:
                saved = orjson.loads(f.read())
            if not isinstance(saved, dict) or not _is_int(saved.get("hosts_serial")):
                raise ValueError("not {hosts_serial: integer, hosts: [...]}")
            hosts = _host_entries(saved.get("hosts"), "hosts")
        except (OSError, ValueError, InvalidArgument) as e:
            self.log.warn("the cluster's hosts list saved in {path} not read (the control"
                          " plane sends it whole): {e}", path=path, e=e)
            return
        self._hosts, self._hosts_serial = hosts, saved["hosts_serial"]

    def _hosts_of(self, view):
        """
        The hosts list (by host id) and its serial once C{view} is taken; nothing changed.

        @raise StaleView: a delta on another serial than the one held.
        @raise InvalidArgument: a malformed C{hosts}, C{hosts_serial} or C{hosts_delta}.
        """
        delta = view.get("hosts_delta")
        if delta is None:
            serial = view.get("hosts_serial")
            if serial is not None and not _is_int(serial):
                raise InvalidArgument(
                    f"hosts_serial must be an integer, not {type(serial).__name__}")
            return _host_entries(view.get("hosts", []), "hosts"), serial
        if not isinstance(delta, dict):
            raise InvalidArgument(f"hosts_delta must be a dict, not {type(delta).__name__}")
        for key in ("base", "serial"):
            if not _is_int(delta.get(key)):
                raise InvalidArgument(f"hosts_delta.{key} must be an integer, not "
                                      f"{type(delta.get(key)).__name__}")
        changed = _host_entries(delta.get("set", []), "hosts_delta.set")
        remove = delta.get("remove", [])
        if not isinstance(remove, list) or not all(isinstance(h, str) for h in remove):
            raise InvalidArgument("hosts_delta.remove must be a list of host ids")
        if delta["base"] != self._hosts_serial:
            raise StaleView(
                f"hosts_delta base {delta['base']} is not the hosts list this agent holds "
                f"(serial {self._hosts_serial}): send the whole list",
                hosts_serial=self._hosts_serial)
        hosts = dict(self._hosts)
        for host_id in remove:
            hosts.pop(host_id, None)
        hosts.update(changed)
        return hosts, delta["serial"]

    async def _apply_newest(self, serial):
        if serial <= self._applied_serial:  # a newer view was applied meanwhile
            return self._applied_result
        serial, view = self._view_serial, self._view
        result = await self._apply(view)
        self._applied_serial, self._applied_result = serial, result
        return result

    async def _apply(self, view):
        own = [h for h in view.get("hosts", []) if h.get("host_id") == self.host_id]
        if own and own[0].get("gateway") and view.get("prefix"):
            # Its bridge even without a VM here: the ingress reaches other hosts' VMs.
            net = {"gateway": own[0]["gateway"], "prefix": int(view["prefix"])}
            await self.host.ensure_bridge(net)
            self._start_dns(net)
        hosts = [h for h in view.get("hosts", []) if h.get("host_id") != self.host_id]
        members = view.get("members", [])
        await self.host.set_cluster(hosts, members)
        if self.dns is not None:
            apps = {}
            for m in members:
                names = [str(m.get("replica")), m.get("machine_id")]
                apps.setdefault(m["app"], []).append(
                    {"names": [n for n in names if n not in (None, "None")],
                     "address": m["address"], "healthy": m.get("healthy", False)})
            self.dns.resolver.set_records(apps)
        table = {}
        for port, entry in (view.get("published") or {}).items():
            table[int(port)] = {"mode": entry["mode"],
                                "routes": {(d or None): rs for d, rs in entry["routes"].items()}}
        self.ingress.set_routes(table)
        await self.host.set_forwards(self._kernel_forwards(table))
        return {"members": len(members), "published": sorted(table)}

    def _kernel_forwards(self, table):
        """
        The C{tcp} published ports the kernel forwards (L{HostNetwork.set_forwards}): their
        healthy replicas, when the host can (L{HostNetwork.can_forward}).  C{http} and
        C{https} ports, and C{tcp} ports without a healthy replica, stay with the proxy.
        """
        if not self.kernel_forwarding:
            return {}
        out = {}
        for port, entry in table.items():
            if entry["mode"] != "tcp":
                continue
            try:
                backends = [(b["host"], int(b["port"])) for rs in entry["routes"].values()
                            for b in rs if b.get("healthy", True)]
            except (KeyError, TypeError, ValueError, AttributeError):
                continue  # the proxy's to judge
            if self.host.can_forward(backends):
                out[port] = backends
        return out

    def save_pending(self):
        """
        Save now a change of the hosts list not saved yet (the agent is stopping).

        @return: a Deferred that fires once every save begun is written (or failed).
        """
        if self._hosts_saving is not None and self._hosts_saving.active():
            self._hosts_saving.cancel()
            self._save_hosts()
        return self._hosts_writes.run(lambda: None)  # after the writes queued before

    async def close(self):
        await self.save_pending()
        for mid in list(self._forwards):
            self._close_forward(mid)
        self.ingress.close()
        await self.host.stop_forwarding()
        if self.dns is not None:
            await self.dns.stop()
