"""
What an agent runs on its host: the hypervisor driver, the volume store, the image cache
and the executor that the control plane calls.

The executor is created once the host id is known (after the first join) and then kept
across reconnections; each new session registers it again under C{zwrm.agent.<host_id>.}.
"""

import itertools
import os

from autobahn.exception import Disconnected
from autobahn.wamp.exception import TransportLost
from twisted.internet import defer
from twisted.logger import Logger

from zwrm import pki, plugins
from zwrm.agent import capacity
from zwrm.agent.executor import Executor
from zwrm.agent.images import ImageCache
from zwrm.agent.live import LiveMigrations
from zwrm.agent.transfer import VolumeTransfers
from zwrm.agent.volumes import VolumeStore
from zwrm.errors import Unavailable
from zwrm.interfaces import IHypervisorDriverPlugin
from zwrm.registry.client import make_http_client
from zwrm.registry.client import registry_url as derived_registry_url

MiB = 1024 * 1024


class HostRuntime:
    """
    The driver, volumes, image cache and executor of one agent.

    @ivar executor: the L{Executor}, or L{None} before the host id is known.
    """

    log = Logger()

    def __init__(self, reactor, config):
        """
        @param reactor: the reactor.
        @param config: the agent's L{zwrm.agent.tap.AgentConfig}.
        @raise zwrm.plugins.PluginError: for an unknown driver (named, with the ones there are).
        @raise zwrm.errors.InvalidArgument: for a bad driver setting.
        """
        self.reactor = reactor
        self.config = config
        self.executor = None
        #: The live-migration procedures (zwrm.agent.live), registered beside the executor.
        self.live = None
        self.transfers = None
        self.cache = None
        self._pool = None
        self._session = None
        self._making = defer.DeferredLock()  # one making of the executor at a time
        self._unsent = {}  # machine id -> (seq, the latest event that could not be sent)
        self._sent = {}  # machine id -> seq of the latest event the control plane got
        self._seq = itertools.count()
        root = config.data_dir
        plugin = plugins.find(IHypervisorDriverPlugin, config.driver, config.plugin_dirs,
                              kind="hypervisor driver")
        settings = {"root": os.path.join(root, "machines"), "accel": config.accel}
        # The pinned CPU model and machine type live migration needs (the same on every
        # host); only when set, so a driver plugin without these settings still loads.
        for key in ("cpu_model", "machine_type"):
            if getattr(config, key, None) is not None:
                settings[key] = getattr(config, key)
        self.driver = plugin.create(reactor, settings)
        self.volumes = VolumeStore(reactor, os.path.join(root, "volumes"))

    async def attach(self, host_id, credential, session, registry_url=None):
        """
        A session joined as C{host_id}: make the executor if this is the first, and send
        its reports through C{session} from now on.

        @param registry_url: the registry's URL the control plane gave
            (C{zwrm.cluster.info}), or L{None}: the host and port of the agent's
            control-plane URL.  The image cache follows it at every session (new pulls go
            there), and asks again when a pull finds no image where it looked.

        @return: the executor, to register.
        """
        self._session = session
        url = derived_registry_url(self.config.url)
        if isinstance(registry_url, str) and registry_url.startswith(("http://", "https://")):
            url = registry_url
        elif registry_url:
            self.log.warn("the control plane's registry_url {url!r} is not an http(s) URL;"
                          " using {derived}", url=registry_url, derived=url)
        if self.cache is not None:
            self.cache.follow_registry(url)
        await self._executor_ready(host_id, credential, url)
        if self.transfers is None:
            await self._start_transfers()
        return self.executor

    def _executor_ready(self, host_id, credential, url):
        """
        Make the executor, once (a session's L{attach}, or a L{fence} before any session:
        the agent started while the control plane could not be reached), its machines
        recovered; one at a time. @return: a Deferred that fires once it is made.
        """
        return self._making.run(
            lambda: defer.Deferred.fromCoroutine(self._make_executor(host_id, credential, url)))

    async def _make_executor(self, host_id, credential, url):
        if self.executor is None:
            client, self._pool = make_http_client(self.reactor, registry_ca_file(self.config))
            self.cache = ImageCache(
                self.reactor, os.path.join(self.config.data_dir, "images"),
                url, (host_id, credential),
                limit_bytes=self.config.image_cache_mb * MiB, http_client=client,
                learn_registry=self._learn_registry)
            self.executor = Executor(self.reactor, host_id, self.driver, self.volumes,
                                     self.report, images=self.cache,
                                     data_dir=self.config.data_dir,
                                     network=_network(self.reactor, host_id, self.config))
            tls_dir = os.path.join(self.config.data_dir, pki.AGENT_TLS_DIR)
            self.live = LiveMigrations(
                self.reactor, host_id, self.driver, self.volumes,
                credentials=lambda: pki.HostCredentials.load(tls_dir),
                # The address other hosts reach this one at: the volume endpoint's.
                listen=lambda: self.executor.transfer_host, images=self.cache,
                state_dir=os.path.join(self.config.data_dir, "live"),
                # It holds a source machine while moving it and hands a resumed target
                # machine to the executor (Executor.hold, Executor.adopt).
                executor=self.executor)
            recovered = await self.executor.recover()
            self.log.info("executor ready for host {host_id}; recovered {n} machine(s)",
                          host_id=host_id, n=len(recovered or ()))

    async def fence(self, host_id, credential, reason, grace):
        """
        The control plane has not answered for the agent's C{fence_after}: stop every
        machine here with volumes (L{Executor.fence}), the executor made first if no
        session made it yet (its machines are those the agent ran before it started).

        @return: the ids of the machines stopped (none before the host ever joined).
        """
        if host_id is None or credential is None:
            return []
        await self._executor_ready(host_id, credential, derived_registry_url(self.config.url))
        return await self.executor.fence(reason, grace)

    async def _learn_registry(self):
        """
        The registry's URL the control plane announces now (C{zwrm.cluster.info}) over the
        current session, or L{None} without one (the image cache's C{learn_registry}).
        """
        session = self._session
        if session is None or not session.is_attached():
            return None
        info = await session.call("zwrm.cluster.info")
        url = info.get("registry_url") if isinstance(info, dict) else None
        return url or derived_registry_url(self.config.url)

    async def _start_transfers(self):
        """
        Start the volume endpoint (host drains stream volumes to it, TLS with the host
        certificate in C{<data_dir>/tls}); without a host certificate yet, try again at the
        next session.
        """
        directory = os.path.join(self.config.data_dir, pki.AGENT_TLS_DIR)
        try:
            creds = pki.HostCredentials.load(directory)
        except Exception as e:
            self.log.warn("no volume endpoint: {e}", e=getattr(e, "message", e))
            return
        if creds is None:
            self.log.info("no volume endpoint yet: no host certificate in {d}", d=directory)
            return
        endpoint = self.config.volume_endpoint
        transfers = VolumeTransfers(self.reactor, self.volumes, creds, endpoint=endpoint)
        port = await transfers.listen()
        self.transfers = transfers
        self.executor.transfers = transfers
        self.executor.transfer_host = _advertised(endpoint, port, self.config.address)
        self.log.info("volume endpoint on {h}:{p}", h=self.executor.transfer_host,
                      p=port.getHost().port)

    def stats(self):
        """
        What heartbeats carry (C{zwrm host status} shows them): the image cache's figures
        and C{disk_free_mb}, the MiB the agent may still write on its data directory's
        filesystem (the control plane places nothing new on a host whose disk is nearly
        full).
        """
        out = {"image_cache": self.cache.stats()} if self.cache is not None else {}
        free = capacity.free_disk_mb(self.config.data_dir)
        if free is not None:
            out["disk_free_mb"] = free
        return out

    def report(self, event):
        """
        Send one machine event to the control plane (C{zwrm.agent.report}).

        An event that cannot be sent because the agent is not connected (or the connection
        goes while it is sent) is kept, the latest per machine, and sent by
        L{registered}: the control plane's reconciliation after a registration restores
        machine states but not their health, and a drain waits for a replacement's health.
        Events carry a machine's whole status, so a newer one replaces a kept one.

        @return: a Deferred firing with the control plane's answer.
        """
        mid = event.get("machine_id")
        self._unsent.pop(mid, None)
        seq = next(self._seq)
        session = self._session
        if session is None or not session.is_attached():
            self._keep(seq, event)
            return defer.fail(Unavailable(
                "not connected to the control plane (sent again once registered)"))
        d = defer.maybeDeferred(session.call, "zwrm.agent.report", event)

        def sent(result):
            self._sent[mid] = max(seq, self._sent.get(mid, -1))
            return result

        def failed(f):
            if f.check(TransportLost, Disconnected):
                self._keep(seq, event)
            return f

        return d.addCallbacks(sent, failed)

    def _keep(self, seq, event):
        """Keep C{event} (the C{seq}th reported) unless a later one is kept or was sent."""
        mid = event.get("machine_id")
        kept = self._unsent.get(mid)
        if (kept is None or kept[0] < seq) and self._sent.get(mid, -1) < seq:
            self._unsent[mid] = (seq, event)

    def credentials_renewed(self, credentials):
        """
        The host certificate was renewed (L{zwrm.agent.certificates}): the volume endpoint
        presents it to the connections it accepts from now on, and volume streams to
        other hosts present it.  (Live migrations read the credentials at each move.)
        """
        if self.transfers is not None:
            self.transfers.use_credentials(credentials)

    def registered(self):
        """
        The agent registered (again): send the events L{report} kept, oldest first.

        @return: a Deferred that fires when they are sent (failures are logged).
        """
        return defer.Deferred.fromCoroutine(self._send_unsent())

    async def _send_unsent(self):
        while self._unsent:
            session = self._session
            if session is None or not session.is_attached():
                return  # kept for the next registration
            mid, (_seq, event) = next(iter(self._unsent.items()))
            try:
                await self.report(event)  # if a newer event is reported meanwhile, it wins
            except Exception as e:
                if mid in self._unsent:
                    return  # the connection went again: kept
                self.log.warn("could not report machine {id} {state} again: {e}",
                              id=mid, state=event.get("state"),
                              e=getattr(e, "message", None) or e)

    async def close(self):
        """Stop watching machines (they keep running) and close connections."""
        for closer in (self.executor, self.driver):
            if closer is not None:
                try:
                    await defer.maybeDeferred(closer.close)
                except Exception:
                    self.log.failure("closing {what}", what=closer)
        if self.transfers is not None:
            await defer.maybeDeferred(self.transfers.receiver.stopService)
        if self.cache is not None:
            await self.cache.close()
        if self._pool is not None:
            await self._pool.closeCachedConnections()


def registry_ca_file(config):
    """
    The CA the agent trusts for the control plane's registry (C{https://}): the cluster CA
    it received at join (C{<data_dir>/tls/ca.pem}), as its WAMP connection does; before a
    join (or for a control plane without a cluster CA) C{ca_file} from its configuration,
    else L{None} (the platform's trust).
    """
    joined = os.path.join(config.data_dir, pki.AGENT_TLS_DIR, "ca.pem")
    if os.path.exists(joined):
        return joined
    return config.ca_file


def _advertised(endpoint, port, address=None):
    """
    The address other agents reach the volume endpoint at: its interface; for a wildcard
    interface, the host's configured C{address}; else loopback.
    """
    for part in endpoint.split(":"):
        if part.startswith("interface="):
            host = part[len("interface="):]
            if host not in ("", "0.0.0.0", "::"):
                return host
    host = port.getHost().host
    if host in ("0.0.0.0", "::", ""):
        return address or "127.0.0.1"
    return host


def _network(reactor, host_id, config):
    """The agent's bridge networking (L{zwrm.agent.network.agent}), or None in user mode."""
    if getattr(config, "network", "user") != "bridge":
        return None
    from autobahn.websocket.util import parse_url

    from zwrm.agent.network.agent import AgentNetwork

    control_plane = parse_url(config.url)[1]  # guests may not reach the control plane
    return AgentNetwork(reactor, host_id, config.address, dns_port=config.dns_port,
                        keepalive_timeout=config.ingress_keepalive_timeout,
                        state_dir=os.path.join(config.data_dir, "network"),
                        deny_names=[control_plane])
