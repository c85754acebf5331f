"""
The control plane as a Twisted service: store, host registry, embedded WAMP router,
control component, health monitor and the HTTP site (C{/ws}, C{/healthz}, C{/metrics}).

With C{[control] router_url} there is no embedded router: the control component connects to
that external router (L{zwrm.control.crossbar.ExternalRouter}) and registers the dynamic
authenticator and authorizer it calls, and the HTTP site has no C{/ws} (registry,
C{/healthz}, C{/metrics} only).
"""

import json
import os
import secrets

from twisted.application import service
from twisted.internet import defer, endpoints, task
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web import resource, server

from zwrm import errors, pki
from zwrm.console import Console
from zwrm.control import audit
from zwrm.control.access_tokens import AccessTokenAPI
from zwrm.control.api import AgentAPI, ControlSession, HostAPI
from zwrm.control.apps import Apps
from zwrm.control.audit import AuditAPI, AuditLog
from zwrm.control.auth import PEER_CERTIFICATE, ControlAuthenticator
from zwrm.control.cluster import ClusterAPI
from zwrm.control.console import ConsoleAPI
from zwrm.control.drain import Drains
from zwrm.control.healing import Healer
from zwrm.control.host_removal import HostRemoval
from zwrm.control.images import ImageAPI
from zwrm.control.metrics import ControlMetrics, MetricsResource
from zwrm.control.monitor import HealthMonitor
from zwrm.control.registry import HostRegistry
from zwrm.control.resources.certs import CertAPI, CertPublisher, Certs
from zwrm.control.resources.events import (
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_EVENTS,
    EventAPI,
    EventHistory,
)
from zwrm.control.roles import roles
from zwrm.control.schedules import SnapshotSchedules
from zwrm.control.store import Store
from zwrm.control.tokens import ControlPKI
from zwrm.control.unrecorded import Unrecorded
from zwrm.registry import TicketAuthorizer, make_registry_resource
from zwrm.registry.guard import registry_request_factory
from zwrm.scheduler import Scheduler, load_strategy
from zwrm.wamp.auth import RoleBasedAuthorizer
from zwrm.wamp.router import Router
from zwrm.wamp.transport import RouterWebSocketResource, rawsocket_factory, websocket_factory
from zwrm.web import Root

_CERT_KEYS = ("privateKey=", "certKey=", "extraCertChain=", "caCertsDir=")
TOKEN_FILES = {"operator": "operator.token", "join": "join.token"}
URL_FILE = "control.url"
RAWSOCKET_PREFIX = "rawsocket:"
"""A listen description C{rawsocket:<endpoint>} serves WAMP over RawSocket on C{<endpoint>}."""
LOCK_FILE = "control.lock"
"""Held (C{flock}) by a running control plane in its data directory; C{zwrm-control restore}
refuses while it is held."""
CERT_CHECK_INTERVAL = 6 * 3600.0
"""Seconds between checks of the server certificate's expiry while running."""
STOP_GRACE = 10.0
"""Seconds a stop waits for the work it cancelled to finish undoing what it had begun (a
planned stop's machines put back in the routes, placements given back, the callers told),
before the session leaves and the store closes."""


class DataDirInUse(Exception):
    """Another control plane (or a restore) holds the data directory's lock."""

    def __init__(self, message):
        Exception.__init__(self, message)
        self.message = message


def lock_data_dir(data_dir):
    """
    Take the data directory's lock (L{LOCK_FILE}, mode 0600) for as long as the returned file
    descriptor stays open.

    @raise DataDirInUse: someone else holds it.
    """
    import fcntl

    path = os.path.join(data_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirInUse(
            f"another zwrm-control (or a restore) is using {data_dir} (it holds {path})"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def write_private(path, text):
    """Write C{text} to C{path} with mode 0600 (created so, never world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


class HealthResource(resource.Resource):
    isLeaf = True

    def __init__(self, plane):
        resource.Resource.__init__(self)
        self.plane = plane

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        ok = self.plane.ready and self.plane.wamp_connected()
        request.setResponseCode(200 if ok else 503)
        return json.dumps({"ok": ok, "hosts": len(self.plane.registry or ())}).encode()


class ControlPlane(service.MultiService):
    """
    The zwrm control plane.

    @ivar root: the HTTP root resource; other parts add children (e.g. C{v2}) to it.
    @ivar store: the L{Store} (once started).
    @ivar pki: the L{zwrm.control.tokens.ControlPKI} (CA, server certificate, join tokens;
        once started).
    @ivar registry: the L{HostRegistry} (once started).
    @ivar router: the L{Router} (once started).
    @ivar session: the control component's L{ControlSession} (once started).
    @ivar apis: objects with C{@wamp.register} procedures; others append theirs before
        the service starts (each is given nothing; wire what it needs yourself).
    @ivar started: a Deferred that fires when everything listens, or fails.
    @ivar gc_policy: the process's L{zwrm.gcpolicy.CollectionPolicy}, if
        C{makeService} gave it one (it is also a child service).
    @ivar stop_reactor_on_failure: stop the reactor, exit status 1, if start-up fails
        (set by C{makeService}: a control plane that cannot start must not linger).
    """

    log = Logger()

    def __init__(self, reactor, config):
        """
        @param reactor: the reactor (time, threads, listening).
        @param config: a L{zwrm.control.tap.Config}.
        """
        service.MultiService.__init__(self)
        self.reactor = reactor
        self.config = config
        self.store = None
        self.registry = None
        self.router = None
        self.session = None
        #: the work of procedures under way, of every session this control plane made (one
        #: per connection to an external router): its stop ends it before the store closes
        self.under_way = set()
        self._destroys = None  # the pass of _go_on_destroying under way
        self._destroys_again = False  # asked for during it: another pass after it
        self.monitor = None
        self.scheduler = None
        self.apps = None
        self.drains = None
        self.schedules = None
        self.pki = None
        self._server_tls = []  # the TLS options of the listeners with the CA's certificate
        self._cert_renewal = None
        self.events = None
        self.audit = None
        self.gc_policy = None
        self.ports = []
        self.apis = []
        self.ready = False
        self.root = Root()
        self.root.putChild(b"healthz", HealthResource(self))
        self.metrics = ControlMetrics(self)  # /metrics (zwrm.control.metrics)
        self.root.putChild(b"metrics", MetricsResource(self))
        Console().mount(self.root)  # the web console at / (zwrm.console, docs/console.md)
        self.started = defer.Deferred()
        self._flusher = None
        self._lock = None
        self.external = None
        self.stop_reactor_on_failure = False

    def startService(self):
        service.MultiService.startService(self)
        d = defer.Deferred.fromCoroutine(self._start())

        def failed(f):
            self._unlock()
            self.log.error("zwrm-control could not start: {why}", why=_why(f))
            if not self.started.called:
                self.started.errback(f)
            if self.stop_reactor_on_failure:
                # twistd has no exit status of its own: make a failed start non-zero.  A
                # start that fails at once (a held lock) fails before the reactor runs:
                # stop it as soon as it does, or the process would stay up doing nothing.
                self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
                if self.reactor.running:
                    self.reactor.stop()
                else:
                    self.reactor.callWhenRunning(self.reactor.stop)

        d.addErrback(failed)

    async def _start(self):
        cfg = self.config
        data_dir = cfg.data_dir
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        self._lock = lock_data_dir(data_dir)
        self.store = Store(self.reactor, os.path.join(data_dir, "zwrm.db"), now=self.reactor.seconds)
        version = await self.store.start()
        self.pki = ControlPKI(self.reactor, self.store, data_dir, cfg.listen,
                              host_lifetime=cfg.host_certificate_lifetime)
        await self.pki.start()
        tokens = await self._ensure_tokens(data_dir)
        self.registry = HostRegistry(
            self.reactor,
            self.store,
            self._publish,
            call=self._call,
            heartbeat_interval=cfg.heartbeat_interval,
            on_offline=self._drop_host_session,
            min_free_disk_mb=cfg.min_free_disk_mb,
        )
        n = await self.registry.load()
        authenticator = ControlAuthenticator(self.store, self.registry, join_tokens=self.pki,
                                             authmethods=cfg.auth_methods)
        if not cfg.router_url:
            self.router = Router(self.reactor, authenticator, RoleBasedAuthorizer(roles()))
            self.router.call_observer = self.metrics.latencies.observe
        if self.gc_policy is not None and self.router is not None:
            stats = self.router.stats
            self.gc_policy.watch_sessions(lambda: stats.sessions_closed, self.router.session_count)
        self.scheduler = Scheduler(load_strategy(cfg.strategy, cfg.plugin_dirs))
        self.apps = Apps(self.reactor, self.store, self.registry, self.scheduler, self._publish)
        await self.apps.network.configure(cfg.network_cidr)  # refused if changed under use
        restored = await self.apps.load()
        self.drains = Drains(self.reactor, self.store, self.registry, self.apps, self._publish)
        self.schedules = SnapshotSchedules(self.reactor, self.apps)
        images = make_registry_resource(
            self.reactor, os.path.join(data_dir, "registry"), TicketAuthorizer(authenticator),
            upload_ttl=cfg.registry_upload_ttl)
        image_api = ImageAPI(self.reactor, images.store, delete_enabled=images.delete_enabled)
        self.apps.images = image_api  # deploys are checked against the registry
        image_api.references = self.apps.image_references  # kept by zwrm.image.gc
        # The ingress's TLS certificates (zwrm certs add), given to every agent.
        self.certs = Certs(self.reactor, self.store, self._publish)
        # The stored event history (zwrm.event.history) and the audit trail, both bounded.
        self.events = EventHistory(
            self.reactor, self.store,
            max_events=int(getattr(cfg, "event_max_events", DEFAULT_MAX_EVENTS)),
            max_age=getattr(cfg, "event_max_age", DEFAULT_MAX_AGE))
        self.audit = AuditLog(
            self.reactor, self.store,
            max_entries=int(getattr(cfg, "audit_max_entries", audit.DEFAULT_MAX_ENTRIES)),
            max_age=getattr(cfg, "audit_max_age", audit.DEFAULT_MAX_AGE))
        self.events.service().setServiceParent(self)
        self.audit.service().setServiceParent(self)
        self.cert_publisher = CertPublisher(self.certs, self.registry.hosts,
                                            self.registry.call_executor,
                                            available=self.registry.executor_available)
        apis = [
            AgentAPI(self.registry, machines=self.apps, pki=self.pki),
            HostAPI(self.registry, HostRemoval(self.registry, self.apps, self.drains,
                                               pki=self.pki,
                                               drop_session=self._drop_host_session),
                    unrecorded=Unrecorded(self.registry, self.apps)),
            self.apps,
            AccessTokenAPI(self.pki, self.store, self.reactor),
            self.drains,
            self.schedules,
            image_api,
            ConsoleAPI(self.apps, self.registry),
            ClusterAPI(cfg.registry_url, cfg.console_url, cfg.router_realm,
                       partitions=self.partitions),
            CertAPI(self.reactor, self.certs),
            EventAPI(self.events),
            AuditAPI(self.audit),
        ] + self.apis
        if cfg.router_url:
            await self._connect_router(apis, authenticator)
        else:
            self.session = ControlSession(apis, audit=self.audit, under_way=self.under_way)
            await self.router.attach(self.session, authid="control", authrole="trusted")
            self._follow_sessions(self.session)
        await self.drains.resume()  # drains under way go on once their hosts are back
        self.schedules.start()  # (a run a stop missed is due at once)
        self.monitor = HealthMonitor(
            self.reactor, self.registry, cfg.check_interval, cfg.offline_after, cfg.grace
        )
        self.monitor.setServiceParent(self)
        # restart policies, rescheduling after host loss, the partition guard
        self.healer = Healer(
            self.reactor, self.apps,
            reschedule_after=cfg.reschedule_after,
            partition_threshold=cfg.partition_threshold,
            eviction_interval=cfg.eviction_interval,
            # hosts cut off at once are found offline as far apart as their last
            # heartbeats (up to an interval, its jitter 10 %): decided as one loss
            settle=1.5 * cfg.heartbeat_interval)
        self.monitor.after_check.append(self.healer.check_done)
        self.monitor.after_check.append(self._go_on_destroying)  # hosts back, or offline
        self.registry.on_reconciled.append(self._reconciled)  # a host back: at once
        self.registry.on_cut_short.append(self.healer.decide_exit)
        await self.healer.resume()  # restarts that were due before a restart of ours
        self._resume_rollouts()  # updates a stop of ours interrupted, once agents are back
        self._go_on_destroying()  # destroys a stop of ours interrupted
        images.expiry_service().setServiceParent(self)  # abandoned uploads go within 20 min
        self._cert_renewal = task.LoopingCall(self._renew_server_certificate)
        self._cert_renewal.clock = self.reactor
        self._cert_renewal.start(CERT_CHECK_INTERVAL, now=False)
        self._flusher = task.LoopingCall(self._flush)
        self._flusher.clock = self.reactor
        self._flusher.start(cfg.flush_interval, now=False)
        if self.router is not None:
            ws_factory = websocket_factory(self.router)
            ws_factory.protocol = _with_peer_certificate(ws_factory.protocol)
            self.root.putChild(b"ws", RouterWebSocketResource(ws_factory))  # frees closed sessions without the gc
        self.root.putChild(b"v2", images)
        # The registry's guard: credentials before bodies, bounded header and body times.
        site = server.Site(self.root, requestFactory=registry_request_factory(
            self.reactor, images, header_timeout=cfg.registry_header_timeout,
            body_timeout=cfg.registry_body_timeout, body_idle_timeout=cfg.registry_idle_timeout))
        site.noisy = False
        urls = []
        for description in cfg.listen:
            port = await self._listen(description, site)
            self.ports.append(port)
            urls.append(_url_of(description, port, http_only=self.router is None))
        write_private(os.path.join(data_dir, URL_FILE), "\n".join(urls) + "\n")
        self.ready = True
        self.log.info(
            "zwrm-control ready: {urls}; database {db} (schema v{version}, {n} hosts,"
            " {restored} live machines); scheduler strategy {strategy};"
            " operator token in {op}; join token in {join}; CA fingerprint sha256:{fp}",
            urls=", ".join(urls),
            db=self.store.path,
            version=version,
            n=n,
            restored=restored,
            strategy=cfg.strategy,
            op=tokens["operator"],
            join=tokens["join"],
            fp=self.pki.fingerprint,
        )
        self.started.callback(self)

    async def _connect_router(self, apis, authenticator):
        """
        Connect the control component to the external router C{router_url} (reconnecting
        for ever) and wait for its first session.
        """
        from zwrm.control.crossbar import CrossbarAPI, ExternalRouter

        cfg = self.config
        self.external = ExternalRouter(
            self.reactor, cfg.router_url, cfg.router_realm, cfg.router_authid,
            cfg.router_secret(), apis + [CrossbarAPI(authenticator, roles())],
            ca_file=cfg.router_ca_file, on_session=self._router_session,
            under_way=self.under_way)
        self.external.setServiceParent(self)
        self.log.info("connecting the control component to the router at {url}",
                      url=cfg.router_url)
        await self.external.joined()

    def _follow_sessions(self, session):
        """
        Subscribe to C{wamp.session.on_leave} (both routers publish it, its first argument
        the session id): a host whose agent's session ends is not called nor placed on from
        then on (L{HostRegistry.session_left}), not only once it is offline.
        """
        def left(session_id, *rest):
            self.registry.session_left(session_id)

        d = session.subscribe(left, "wamp.session.on_leave")
        d.addErrback(lambda f: self.log.warn(
            "the router does not let the control component follow sessions ending"
            " (wamp.session.on_leave: {why}); a host whose agent stops is noticed when it"
            " is offline", why=f.getErrorMessage()))
        return d

    def _router_session(self, session):
        first = self.session is None
        self.session = session
        self._follow_sessions(session)
        if first:
            # Behind an external router the agents' sessions outlive a restart of this
            # process, but their executors count as unregistered here until they register
            # again (and their image caches keep the registry_url they learnt): end their
            # sessions once, as a restart with the embedded router does.
            d = session.call("wamp.session.kill_by_authrole", "agent", reason="wamp.close.killed",
                             message="the control plane started; register again")
            d.addErrback(lambda f: self.log.warn(
                "could not ask the agents to register again: {why}", why=f.getErrorMessage()))

    def wamp_connected(self):
        """Whether the control component is on its router (always, for the embedded one)."""
        if self.router is not None:
            return True
        return self.session is not None and self.session.is_attached()

    def _listen(self, description, site):
        """
        Listen on one endpoint: the HTTP site (WebSocket at C{/ws}, registry, health), or
        for C{rawsocket:<endpoint>} WAMP over RawSocket.  An C{ssl:} endpoint without
        certificate files of its own (C{privateKey=}, C{certKey=}, C{extraCertChain=}), or
        with the files of the cluster CA's directory, uses the server certificate the
        cluster CA issued (L{zwrm.control.tokens.ControlPKI.server_context}).  A plain
        HTTP listener answers a TLS ClientHello at once (L{PlainOnlyFactory}).
        """
        if description.startswith(RAWSOCKET_PREFIX):
            description = description[len(RAWSOCKET_PREFIX):]
            factory = rawsocket_factory(self.router)
            factory.protocol = _with_peer_certificate(factory.protocol)
        else:
            factory = site
        if description.startswith("ssl:"):
            parts = description.split(":")
            files = [p.split("=", 1)[1] for p in parts if p.startswith(_CERT_KEYS)]
            pki_dir = os.path.realpath(self.pki.directory)
            if all(os.path.dirname(os.path.realpath(f)) == pki_dir for f in files):
                # no certificate files, or the CA's own (as install.sh writes them): use the
                # CA's server context, which also checks agents' host certificates
                rest = [p for p in parts[1:] if not p.startswith(_CERT_KEYS)]
                tcp = endpoints.serverFromString(self.reactor, ":".join(["tcp"] + rest))
                options = self.pki.server_context()
                self._server_tls.append(options)  # renewed while it runs (_renew_server_certificate)
                return tcp.listen(TLSMemoryBIOFactory(options, False, factory))
            return endpoints.serverFromString(self.reactor, description).listen(factory)
        if factory is site:
            factory = PlainOnlyFactory(site)
        return endpoints.serverFromString(self.reactor, description).listen(factory)

    async def _ensure_tokens(self, data_dir):
        """
        The operator token (plain, in C{operator.token}) and a valid C{zwrm1.} join token
        (in C{join.token}, for the local tools); both files mode 0600.
        """
        paths = {}
        for kind, name in TOKEN_FILES.items():
            path = os.path.join(data_dir, name)
            if kind == "join":
                await self.pki.ensure_join_token(path)
                paths[kind] = path
                continue
            if os.path.exists(path):
                with open(path) as f:
                    secret = f.read().strip()
            else:
                secret = secrets.token_urlsafe(32)
                write_private(path, secret + "\n")
                self.log.info("created the {kind} token in {path}", kind=kind, path=path)
            await self.store.add_token(f"{kind}-default", kind, secret)
            paths[kind] = path
        return paths

    def _publish(self, topic, event):
        if self.session is not None:
            self.session.publish_event(topic, event)

    def _call(self, procedure, *args, **kwargs):
        return self.session.call_procedure(procedure, *args, **kwargs)

    def _drop_host_session(self, host_id, message="host marked offline; register again"):
        """
        End the sessions of a host marked offline (its agent registers again) or removed,
        through the WAMP meta API (C{wamp.session.kill_by_authid}), which the embedded
        router and Crossbar.io both offer.
        """
        session = self.session
        if session is None or not session.is_attached():
            return None
        d = session.call("wamp.session.kill_by_authid", host_id, reason="wamp.close.killed",
                         message=message)
        d.addErrback(lambda f: self.log.warn("could not end host {host_id}'s session: {why}",
                                             host_id=host_id, why=f.getErrorMessage()))
        return d

    def _flush(self):
        d = self.registry.flush_heartbeats()
        d.addErrback(lambda f: errors.log_failure(self.log, f, "saving heartbeats"))
        return d

    async def _renew_server_certificate(self):
        """
        A start reissues the server certificate when less than 30 days are left; a control
        plane that runs for longer than that does it here, every L{CERT_CHECK_INTERVAL},
        and its TLS listeners present the new one to the connections made from then on.
        """
        try:
            renewed = await self.pki.renew_server_certificate()
            if renewed is None:
                return
            for options in self._server_tls:
                options.renew(*renewed)
        except Exception:
            self.log.failure("renewing the control plane's server certificate (tried again"
                             " in {h:g} h)", h=CERT_CHECK_INTERVAL / 3600)
            return
        self.log.info("server certificate renewed (valid until {t}); the TLS listeners"
                      " present it to new connections",
                      t=pki.expiry_of(renewed[0]))

    def partitions(self):
        """
        The partitions the healer holds now (L{zwrm.control.healing.Healer.partitions};
        none before it is made, early in the start).
        """
        healer = getattr(self, "healer", None)
        return healer.partitions() if healer is not None else []

    async def _stop(self):
        if getattr(self, "cert_publisher", None) is not None:
            self.cert_publisher.close()
        if self.drains is not None:
            self.drains.stop()
        if self.schedules is not None:
            self.schedules.stop()
        if getattr(self, "healer", None) is not None:
            self.healer.stop()
        if getattr(self, "apps", None) is not None:
            self.apps.network_view.close()  # no push to the agents left scheduled
        for port in self.ports:
            await port.stopListening()
        self.ports = []
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        if self._cert_renewal is not None and self._cert_renewal.running:
            self._cert_renewal.stop()
        if self.registry is not None:
            await self._flush()
        if self.schedules is not None:  # (a run under way ends with its volume's step)
            await self._ended([self.schedules.idle()], STOP_GRACE)
        cancelled = list(self.under_way)  # any session's, this one's or an earlier one's
        for work in cancelled:
            work.cancel()
        if cancelled:
            await self._ended(cancelled, STOP_GRACE)
        if self.session is not None:
            if self.session.is_attached():
                self.session.leave()
        if self.registry is not None:
            await self.registry.sessions_noted()  # (the ends of sessions so far stored)
            self.registry.stop()
        if self.store is not None:
            await self.store.stop()
        self._unlock()

    async def _ended(self, cancelled, grace):
        """
        Wait, at most C{grace} seconds, for the work the stop cancelled to end: what it
        undoes on its cancellation (a planned stop's machines back in the routes) is stored
        and its callers answered before the session leaves and the store closes.  (A
        scale-down stopped in its C{shutdown_delay} left its machine C{stopping}, out of
        the routes, for good.)
        """
        ended = defer.DeferredList(cancelled, consumeErrors=True)
        late = task.deferLater(self.reactor, grace, lambda: None)
        first = await defer.DeferredList([ended, late], fireOnOneCallback=True,
                                         consumeErrors=True)
        if first[1] == 1:
            self.log.warn("stopping: {n} call(s) under way did not end within {grace:g}s of"
                          " their cancellation", n=sum(1 for w in cancelled if not w.called),
                          grace=grace)
        else:
            late.cancel()

    def _resume_rollouts(self):
        work = defer.Deferred.fromCoroutine(self.apps.resume_rollouts())
        self.under_way.add(work)  # a stop ends it (cancelled with the calls under way)

        def ended(outcome):
            self.under_way.discard(work)
            if isinstance(outcome, Failure) and not outcome.check(defer.CancelledError):
                self.log.failure("taking up the interrupted rolling updates", outcome)
            elif not isinstance(outcome, Failure) and outcome:
                self.log.info("took up the rolling updates a stop interrupted: {apps}",
                              apps=", ".join(outcome))

        work.addBoth(ended)

    def _go_on_destroying(self, marked=None):
        """
        Carry on with the app destroys that did not end (L{Apps.go_on_destroying}); one
        pass at a time, and one more after it if asked for meanwhile (a health check's
        hook, C{marked} unused; a host's reconciliation's).
        """
        if self._destroys is not None:
            self._destroys_again = True
            return
        self._destroys_again = False
        work = self._destroys = defer.Deferred.fromCoroutine(self.apps.go_on_destroying())
        self.under_way.add(work)  # a stop ends it (cancelled with the calls under way)

        def ended(outcome):
            self.under_way.discard(work)
            self._destroys = None
            if isinstance(outcome, Failure):
                if not outcome.check(defer.CancelledError):
                    self.log.failure("carrying on with the destroys under way", outcome)
                return
            if self._destroys_again and self.running:
                self._go_on_destroying()

        work.addBoth(ended)

    async def _reconciled(self, host_id):
        """
        A host registered and was reconciled: the destroys that waited for it go on now,
        not at the next health check (after a restart of ours, each destroy it cut short
        goes on as soon as the hosts of its machines are back).  Not once it is stopping
        (its stop cancels the work under way).
        """
        if self.running:
            self._go_on_destroying()

    def _unlock(self):
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def stopService(self):
        if not self.running:
            return defer.succeed(None)  # stopped already: nothing is left to stop
        d = defer.maybeDeferred(service.MultiService.stopService, self)
        d.addCallback(lambda _: defer.Deferred.fromCoroutine(self._stop()))
        d.addErrback(lambda f: self.log.failure("stopping zwrm-control", f))
        return d


_TLS_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: 61\r\n\r\nthis is a plain HTTP listener: use http:// or ws://, not TLS\n"
)


class _PlainOnly(policies.ProtocolWrapper):
    """
    Looks at a plain listener's first bytes: a TLS ClientHello (a handshake record, first
    byte 0x16, which no HTTP request starts with) is answered with an HTTP 400 and the
    connection closed at once, so a client that tries https first (as OCI clients do) fails
    fast instead of waiting for a timeout.
    """

    _checked = False

    def dataReceived(self, data):
        if not self._checked:
            self._checked = True
            if data[:1] == b"\x16":
                self.transport.write(_TLS_ANSWER)
                self.transport.loseConnection()
                return
        self.wrappedProtocol.dataReceived(data)


class PlainOnlyFactory(policies.WrappingFactory):
    """Wraps a plain (not TLS) listener's factory in L{_PlainOnly}."""

    protocol = _PlainOnly
    noisy = False


_PLAIN = object()
"""A connection without TLS (no peer certificate, ever)."""


def _with_peer_certificate(protocol_class):
    """
    A subclass of a WAMP server protocol (WebSocket or RawSocket) that makes the
    connection's TLS client certificate known to the authenticator while the bytes it
    receives are handled (L{zwrm.control.auth.PEER_CERTIFICATE}), so that a host cannot
    authenticate as another host id than its certificate's.  It wraps C{dataReceived}, which
    every message passes through whichever way the protocol then parses it (the WebSocket
    protocol's fast path never calls C{onMessage}).
    """
    receive = protocol_class.dataReceived

    def dataReceived(self, data):
        peer = self.__dict__.get("_zwrm_peer")
        if peer is _PLAIN:  # plain TCP: the variable's default (None) holds; nothing to set
            return receive(self, data)
        if peer is None:  # known once the handshake is done; it does not change after
            get = getattr(self.transport, "getPeerCertificate", None)
            if get is None:
                self._zwrm_peer = _PLAIN
                return receive(self, data)
            peer = self._zwrm_peer = get()
        token = PEER_CERTIFICATE.set(peer)
        try:
            return receive(self, data)
        finally:
            PEER_CERTIFICATE.reset(token)

    return type("PeerCertificateProtocol", (protocol_class,), {"dataReceived": dataReceived})


def _why(failure):
    v = failure.value
    return getattr(v, "message", None) or str(v) or repr(v)


def _url_of(description, port, http_only=False):
    """
    The URL of a listener: C{ws(s)://.../ws}, C{rs(s)://...}; with C{http_only} (behind an
    external router: no WAMP here) C{http(s)://...}.
    """
    addr = port.getHost()
    if http_only:
        scheme, path = ("https" if description.startswith("ssl:") else "http"), ""
    elif description.startswith(RAWSOCKET_PREFIX):
        tls = description[len(RAWSOCKET_PREFIX):].startswith("ssl:")
        scheme, path = ("rss" if tls else "rs"), ""
    else:
        scheme, path = ("wss" if description.startswith("ssl:") else "ws"), "/ws"
    host = addr.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{addr.port}{path}"
