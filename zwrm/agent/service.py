"""
The agent's membership: join, register, heartbeat, reconnect forever.

One connection attempt (L{AgentService._attempt}):

 1. connect to the control plane's WebSocket. For C{wss://} the server is verified
    before anything is sent (L{zwrm.pki.PinnedClientTLSOptions}): when joining, against
    the CA fingerprint the C{zwrm1.} join token carries; once joined, against the CA saved
    in C{<data_dir>/tls/}, presenting the host certificate; else against C{ca_file} (or
    the platform's trust);
 2. without a credential: join the realm as C{join} with the join token, call
    C{zwrm.agent.join(host_id, facts, csr=...)} with a certificate request for the host
    id, store the credential (mode 0600) and the returned host certificate and CA in
    C{<data_dir>/tls/} (after checking they are for this host and the pinned CA), and
    start again at 1 with them;
 3. with a credential: join as the host id, register the executors under
    C{zwrm.agent.<host_id>.}, call C{zwrm.agent.register(facts)}, then heartbeat at
    the interval the control plane gives (with +-10% jitter) until the connection ends.

Whatever ends an attempt (refused connection, rejected token, lost connection), the
agent logs one line and tries again after an exponential backoff with jitter, from
C{retry_initial} doubling up to C{retry_max} (15 s by default, well inside the control
plane's default grace and offline_after of 30 s: a control plane back from an outage of any
length sees its agents again before it would mark them offline).  The backoff starts again
from C{retry_initial} after each registered session.  A rejected credential with a join
token at hand makes the next attempt join again.  Attempts, the backoff and stopping are one
machine, L{zwrm.agent.connection.ConnectionLife} (docs/state-machines/agent_connection.dot).
"""

import json
import os
import random

from autobahn import wamp
from autobahn.twisted.wamp import ApplicationSession
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.serializer import JsonSerializer, MsgPackSerializer
from autobahn.wamp.types import ComponentConfig
from autobahn.websocket.util import parse_url
from twisted.application import service
from twisted.internet import defer, endpoints, error
from twisted.logger import Logger

import zwrm
from zwrm import errors, hostid, pki
from zwrm.agent import capacity
from zwrm.agent.certificates import CertificateRenewal
from zwrm.agent.connection import ConnectionLife
from zwrm.agent.identity import Identity
from zwrm.endpoints import client_endpoint, connect_error_text, tcp_endpoint
from zwrm.files import write_atomically
from zwrm.wamp.procedures import QuietAnswers, register_agent_procedures
from zwrm.wamp.transport import WampWebSocketClientFactory


class AuthRejected(Exception):
    """
    The control plane did not accept our token or credential.

    @ivar what: what it refused (C{"credential"}, C{"join token"}), once known.
    """

    what = None


class ServerRejected(Exception):
    """We did not accept the control plane (its certificate, or what it issued us)."""


class _PinnedOptions(pki.PinnedClientTLSOptions):
    """L{pki.PinnedClientTLSOptions} that remember why they refused a server."""

    rejected = None

    def _verify(self, connection, cert, errno, depth, ok):
        try:
            return pki.PinnedClientTLSOptions._verify(self, connection, cert, errno, depth, ok)
        except pki.CertificateRejected as e:
            self.rejected = e.message
            raise


class SessionClosed(Exception):
    """The session ended (message says why)."""


class SessionEnded:
    """
    What ends an attempt whose session was registered: the connection was lost, or the
    control plane ended the session (C{why}, e.g. when it marked the host offline).
    """

    def __init__(self, why=None):
        self.why = why


class MembershipExecutor:
    """
    The membership part of a host's executor: C{zwrm.agent.<host_id>.agent.info}.
    """

    def __init__(self, agent):
        self._agent = agent

    @wamp.register("agent.info")
    def info(self):
        """The facts this agent reports (as in C{zwrm.agent.register})."""
        return self._agent.facts()


class _AgentSession(QuietAnswers, ApplicationSession):
    log = Logger()

    def __init__(self, realm, authid, ticket):
        ApplicationSession.__init__(self, ComponentConfig(realm=realm))
        self._authid = authid
        self._ticket = ticket
        self.joined = defer.Deferred()
        self.ended = defer.Deferred()
        self.leave_details = None

    def onConnect(self):
        self.join(self.config.realm, authmethods=["ticket"], authid=self._authid)

    #: set when the agent closes this connection before the session opened
    closing = False

    def onChallenge(self, challenge):
        if self.closing:
            # The WebSocket is closing: autobahn could not send the answer.  Never answer.
            return defer.Deferred()
        return self._ticket

    def onJoin(self, details):
        if not self.joined.called:
            self.joined.callback(details)

    def onLeave(self, details):
        self.leave_details = details
        self.disconnect()

    def onDisconnect(self):
        # Fail every call, registration, ... still waiting for an answer (TransportLost):
        # without this, an attempt that loses its connection mid-call would wait for ever.
        ApplicationSession.onDisconnect(self)
        d = self.leave_details
        if d is not None and d.reason == "wamp.error.authentication_failed":
            exc = AuthRejected(d.message or d.reason)
        elif d is not None:
            exc = SessionClosed(f"{d.reason}" + (f": {d.message}" if d.message else ""))
        else:
            exc = SessionClosed("the connection was lost")
        if not self.joined.called:
            self.joined.errback(exc)
        if not self.ended.called:
            self.ended.callback(exc)


# autobahn's WebSocket states (autobahn.websocket.protocol.WebSocketProtocol.STATE_*)
_WS_CLOSED, _WS_CONNECTING, _WS_CLOSING, _WS_OPEN = 0, 1, 2, 3


class _Connection:
    """
    One connection to the control plane, from TCP connect to connection lost.

    @ivar protocol: the WAMP-over-WebSocket client protocol.
    @ivar session: its L{_AgentSession}.
    @ivar lost: fires (with L{None}) once the connection is gone and every timer autobahn
        set for it is cancelled.
    """

    def __init__(self, protocol, session, options):
        self.protocol = protocol
        self.session = session
        self.lost = defer.Deferred()
        lost = protocol.connectionLost

        def connection_lost(reason):
            try:
                lost(reason)
            finally:
                # autobahn cancels its opening handshake, ping and drop timers when the
                # connection ends, but not the closing handshake timer: cancel it here.
                timer = getattr(protocol, "closeHandshakeTimeoutCall", None)
                if timer is not None:
                    protocol.closeHandshakeTimeoutCall = None
                    timer.cancel()
                # autobahn never tells a session whose connection ended before it opened (a
                # TLS handshake we refused, a failed WebSocket upgrade): it would wait for ever
                if not session.joined.called:
                    rejected = getattr(options, "rejected", None)
                    session.joined.errback(
                        ServerRejected(rejected)
                        if rejected
                        else SessionClosed(f"the connection was lost: {reason.getErrorMessage()}")
                    )
                self.lost.callback(None)

        protocol.connectionLost = connection_lost

    def close(self):
        """
        End the connection as cleanly as its state allows: leave a joined session
        (GOODBYE), close an open WebSocket (close handshake), let a closing one finish,
        and abort one still in its TLS or WebSocket opening handshake.
        """
        if self.lost.called:
            return
        state = getattr(self.protocol, "state", None)
        if self.session.is_attached():
            if not getattr(self.session, "_goodbye_sent", False):
                self.session.leave("wamp.close.normal", "agent stopping")
        elif state == _WS_OPEN:
            self.session.closing = True
            self.protocol.sendClose(1000)
        elif state != _WS_CLOSING:
            self.abort()

    def abort(self):
        """Drop the connection now (its C{lost} fires at the next reactor turn)."""
        transport = getattr(self.protocol, "transport", None)
        if not self.lost.called and transport is not None:
            transport.abortConnection()


#: The file (in the data directory) that keeps when the control plane last answered.
CONTACT_FILE = "contact.json"
#: Seconds a fenced machine's guest has to power down before it is stopped hard.
FENCE_GRACE = 10.0
#: Seconds between two looks while the silence lasts, once fenced (a machine that was
#: starting at the first is stopped at the next: this and L{FENCE_GRACE} stay within the
#: control plane's margin, L{zwrm.control.host_removal.FENCE_MARGIN}).
FENCE_RECHECK = 2.0


class AgentService(service.Service):
    """
    Keeps this host a member of the cluster.

    @ivar identity: the L{Identity} (host id, credential).
    @ivar session: the current joined session, or L{None}.
    @ivar life: the L{ConnectionLife} machine: attempts, backoff, stop.
    @ivar executors: objects whose C{@wamp.register} procedures (relative names) are
        registered under C{zwrm.agent.<host_id>.}; add more before the service starts.
    """

    log = Logger()

    def __init__(self, reactor, config, rng=None, runtime=None):
        """
        @param reactor: the reactor (time and TCP).
        @param config: a L{zwrm.agent.tap.AgentConfig}.
        @param rng: a L{random.Random} for the jitter.
        @param runtime: the L{zwrm.agent.runtime.HostRuntime} whose executor runs this
            host's machines, or L{None} for membership only (tests, benchmarks).
        """
        self.runtime = runtime
        self.reactor = reactor
        self.config = config
        self.rng = rng or random.Random()
        self.identity = Identity(config.data_dir)
        self.session = None
        self.executors = [MembershipExecutor(self)]
        self.heartbeat_interval = 5.0
        self.heartbeats_sent = 0
        self.heartbeat_rtt = None  # seconds, of the last answered heartbeat (/metrics)
        self.metrics_port = None  # the /metrics listening port, with --metrics-listen
        self.attempts = 0
        self.last_error = None
        self.registered = defer.Deferred()
        self._hb_call = None
        self._hb_timeout = None
        self._fence_call = None
        #: when the control plane last answered a call (the time it was sent), with
        #: C{fence_after}: persisted (L{CONTACT_FILE}), so an agent restarted while the
        #: control plane cannot be reached fences no later than it would have
        self.last_contact = None
        self.fenced = 0  # machines the fence stopped (/metrics)
        self._phase = "connecting"  # what the attempt in flight is doing: or "joining"
        self._connecting = None
        self._connections = set()
        self._tls = None
        self.renewal = CertificateRenewal(reactor, self.tls_dir, lambda: self.identity.host_id,
                                          on_renewed=self._certificate_renewed)
        self.life = ConnectionLife(
            reactor, self._start_attempt, self._backoff, self._retrying, self._abort_attempt,
            session_ended=lambda outcome: isinstance(outcome, SessionEnded))

    @property
    def state(self):
        """
        C{"connecting"} or C{"joining"} (an attempt runs), C{"registered"}, C{"waiting"} (to
        attempt again), C{"stopping"} or C{"stopped"}: from L{ConnectionLife}.
        """
        life = self.life.state
        if life == "attempting":
            return self._phase
        return "registered" if life == "connected" else life

    @property
    def _running(self):
        """Started and not stopping."""
        return self.life.state in ("attempting", "connected", "waiting")

    # -- facts ------------------------------------------------------------------------

    def facts(self):
        """What this agent reports about its host."""
        c = self.config
        facts = {
            "name": c.name,
            "region": c.region,
            "datacenter": c.datacenter,
            "labels": dict(c.labels),
            "agent_version": zwrm.__version__,
        }
        facts.update(capacity.detect(c.data_dir, c.vcpus, c.memory_mb, c.disk_mb))
        facts["fence_after"] = float(getattr(c, "fence_after", 0) or 0)
        if c.address:
            facts["address"] = c.address
        elif self.session is not None and self.session._transport is not None:
            try:
                facts["address"] = self.session._transport.transport.getHost().host
            except Exception:
                pass
        network = getattr(getattr(self.runtime, "executor", None), "network", None)
        held = network.held() if network is not None else None
        if held is not None:  # the hosts list it holds: not sent again if still current
            facts["network"] = held
        return facts

    # -- life cycle -------------------------------------------------------------------

    def startService(self):
        service.Service.startService(self)
        self.identity.load()
        self.log.info(
            "zwrm-agent: host {host_id}, control plane {url}",
            host_id=self.identity.host_id,
            url=self.config.url,
        )
        self._start_fencing()
        self.life.start()
        if getattr(self.config, "metrics_listen", None):
            self._listen_metrics(self.config.metrics_listen)

    def _listen_metrics(self, description):
        """Serve C{/metrics} (L{zwrm.agent.metrics}) on the endpoint C{description}."""
        from zwrm.agent.metrics import AgentMetrics, make_site

        site = make_site(AgentMetrics(self.reactor, self))
        d = endpoints.serverFromString(self.reactor, description).listen(site)

        def listening(port):
            if not self.running:
                return port.stopListening()
            self.metrics_port = port
            self.log.info("metrics on {where}", where=port.getHost())

        d.addCallbacks(listening, lambda f: self.log.error(
            "cannot serve metrics on {d}: {why}", d=description, why=f.getErrorMessage()))
        self._metrics_listening = d

    #: How long L{stopService} lets connections close cleanly before aborting them.
    stop_timeout = 2.0

    def stopService(self):
        """
        Stop: no more attempts or heartbeats; every connection to the control plane ends
        (a joined session leaves, an open WebSocket closes, one still in its TLS or
        WebSocket handshake is aborted; after L{stop_timeout} seconds, whatever is left is
        aborted); the runtime closes (its machines keep running).

        @return: a Deferred that fires once all of that is done and no timer of this
            service or of its connections is left in the reactor.
        """
        service.Service.stopService(self)
        self._stop_heartbeats()
        if self._fence_call is not None and self._fence_call.active():
            self._fence_call.cancel()
        self._fence_call = None
        ended = self.life.stop()  # cancels the backoff, or aborts the attempt's connect
        connections = list(self._connections)
        for connection in connections:
            connection.close()
        closing = (defer.Deferred.fromCoroutine(self.runtime.close())
                   if self.runtime is not None else defer.succeed(None))
        port, self.metrics_port = self.metrics_port, None
        unlistened = defer.maybeDeferred(port.stopListening) if port is not None else None
        return defer.gatherResults([self._all_lost(connections), closing, ended]
                                   + ([unlistened] if unlistened is not None else []))

    def _all_lost(self, connections):
        """Fires once every one of C{connections} is lost, aborting them after a while."""
        lost = [c.lost for c in connections if not c.lost.called]
        if not lost:
            return defer.succeed(None)

        def abort():
            for c in connections:
                c.abort()

        timer = self.reactor.callLater(self.stop_timeout, abort)

        def done(result):
            if timer.active():
                timer.cancel()
            return result

        return defer.gatherResults(lost).addBoth(done)

    def _backoff(self, failures):
        c = self.config
        delay = min(c.retry_max, c.retry_initial * (2 ** max(failures - 1, 0)))
        return delay * self.rng.uniform(0.5, 1.0)

    # -- the connection machine's hooks (L{ConnectionLife}) ------------------------------

    def _start_attempt(self):
        return defer.Deferred.fromCoroutine(self._attempt())

    def _retrying(self, outcome, delay):
        self.last_error = self._explain(outcome)
        self.log.warn("{why}; retrying in {delay:.1f}s", why=self.last_error, delay=delay)

    def _abort_attempt(self):
        """Stopping: a connect in flight is cancelled (a connection is closed by stopService)."""
        if self._connecting is not None and not self._connecting.called:
            self._connecting.cancel()

    def _explain(self, outcome):
        url = self.config.url
        if isinstance(outcome, SessionEnded):
            if outcome.why:
                return f"the control plane closed our session ({outcome.why})"
            return f"lost the connection to the control plane at {url}"
        if isinstance(outcome, str):
            return outcome
        if isinstance(outcome, ServerRejected):
            return f"refusing the control plane at {url}: {outcome}"
        if isinstance(outcome, errors.ZwrmError):
            return f"cannot join the control plane at {url}: {outcome.message}"
        if isinstance(outcome, AuthRejected):
            what = outcome.what or ("credential" if self.identity.credential else "join token")
            return f"the control plane at {url} rejected our {what}: {outcome}"
        if isinstance(outcome, error.ConnectionRefusedError):
            return f"cannot reach the control plane at {url}: connection refused"
        if isinstance(outcome, error.DNSLookupError):
            return f"cannot reach the control plane at {url}: unknown host"
        if isinstance(outcome, error.TimeoutError | defer.TimeoutError):
            return f"cannot reach the control plane at {url}: timed out"
        if isinstance(outcome, error.ConnectError | error.ConnectionLost | error.ConnectionDone):
            return f"cannot reach the control plane at {url}: {connect_error_text(outcome)}"
        if isinstance(outcome, SessionClosed):
            return f"the control plane at {url} closed our session ({outcome})"
        if isinstance(outcome, ApplicationError):
            return f"the control plane at {url} refused: {outcome.error}: {outcome.args[0] if outcome.args else ''}"
        if isinstance(outcome, OSError):
            return f"cannot reach the control plane at {url}: {connect_error_text(outcome)}"
        return f"connection to {url} failed: {outcome.__class__.__name__}: {outcome}"

    async def _connect(self, authid, ticket):
        session = _AgentSession("zwrm", authid, ticket)
        c = self.config
        factory = WampWebSocketClientFactory(
            lambda: session,
            url=c.url,
            serializers=[MsgPackSerializer(), JsonSerializer()],
            reactor=self.reactor,
        )
        factory.noisy = False
        factory.setProtocolOptions(autoPingInterval=10, autoPingTimeout=10, openHandshakeTimeout=10)
        options = self._tls_options(joining=authid == "join")
        if options is None:
            endpoint = client_endpoint(self.reactor, c.url, c.ca_file)
        else:
            _secure, host, port, _r, _p, _q = parse_url(c.url)
            endpoint = endpoints.wrapClientTLS(options, tcp_endpoint(self.reactor, host, port, 10))
        self._connecting = endpoint.connect(factory)
        try:
            protocol = await self._connecting
            self._connecting = None
            connection = _Connection(protocol, session, options)
            self._connections.add(connection)
            connection.lost.addCallback(lambda _: self._connections.discard(connection))
            if not self._running:
                connection.abort()  # stopService came while connecting
            await session.joined
        except Exception:
            if getattr(options, "rejected", None):
                raise ServerRejected(options.rejected) from None
            raise
        finally:
            self._connecting = None
        self._tls = options
        return session

    @property
    def tls_dir(self):
        """Where this agent keeps its CA and host certificate (L{pki.AGENT_TLS_DIR})."""
        return os.path.join(self.config.data_dir, pki.AGENT_TLS_DIR)

    def _tls_options(self, joining=False):
        """
        The pinned TLS options for a C{wss://} control plane (see the module docstring), or
        L{None} for C{ws://} or when only C{ca_file} / the platform's trust applies.

        @raise ServerRejected: the saved credentials are unusable or for another host.
        @raise zwrm.errors.InvalidArgument: a malformed C{zwrm1.} join token.
        """
        secure, host, _port, _r, _p, _q = parse_url(self.config.url)
        if not secure:
            return None
        if not joining:
            try:
                credentials = pki.HostCredentials.load(self.tls_dir)
            except errors.InvalidArgument as e:
                raise ServerRejected(
                    f"{e.message}; remove {self.tls_dir} to join again with a join token"
                ) from None
            if credentials is not None:
                if credentials.host_id != hostid.current_host_id(self.identity.host_id):
                    raise ServerRejected(
                        f"the host certificate in {self.tls_dir} is for host"
                        f" {credentials.host_id!r}, not this host {self.identity.host_id!r};"
                        f" remove {self.tls_dir} to join again with a join token"
                    )
                certificate = (credentials.cert_pem, credentials.key_pem)
                if credentials.not_valid_after.timestamp() <= self.reactor.seconds():
                    # the host was off for longer than its certificate lives: presented,
                    # it would fail the handshake; the credential alone lets the agent in,
                    # and it renews the certificate at once (CertificateRenewal)
                    self.log.warn("the host certificate in {dir} expired {t}; connecting"
                                  " without it, to renew it", dir=self.tls_dir,
                                  t=pki.expiry_of(credentials.cert_pem))
                    certificate = None
                return _PinnedOptions(
                    host,
                    credentials.fingerprint,
                    client_certificate=certificate,
                    ca_certificate=credentials.ca_pem,
                )
        token = self.config.join_token
        if joining and token and token.strip().startswith(pki.TOKEN_PREFIX + "."):
            # the token names the CA to trust; it wins over what an earlier cluster left
            return _PinnedOptions(host, pki.JoinToken.parse(token).ca_fingerprint)
        ca_path = os.path.join(self.tls_dir, "ca.pem")
        if os.path.exists(ca_path):
            with open(ca_path, "rb") as f:
                ca_pem = f.read()
            return _PinnedOptions(host, pki.fingerprint_of(ca_pem), ca_certificate=ca_pem)
        return None

    async def _attempt(self):
        """One connection; returns or raises what ended it."""
        ident = self.identity
        self.attempts += 1
        self._phase = "connecting"
        if ident.credential:
            try:
                session = await self._connect(ident.host_id, ident.credential)
                if not self._running:
                    return "stopped"
                self._adopt_authid(session)
            except AuthRejected as e:
                e.what = "credential"
                if self.config.join_token:
                    self.log.warn(
                        "the control plane rejected host {host_id}'s credential; joining again",
                        host_id=ident.host_id,
                    )
                    ident.credential = None
                    ident.save()
                raise
            return await self._member(session)
        if not self.config.join_token:
            return ("no credential and no join token: give the agent one with --join-token-file"
                    " (join_token_file) or $ZWRM_JOIN_TOKEN")
        self._phase = "joining"
        session = await self._connect("join", self.config.join_token)
        if not self._running:
            return "stopped"
        pinned = self._tls
        key_pem, csr_pem = pki.make_host_request(ident.host_id)
        try:
            result = await session.call(
                "zwrm.agent.join", ident.host_id, self.facts(), csr=csr_pem.decode("ascii")
            )
        finally:
            if session.is_attached():
                session.leave()
        if result.get("certificate"):
            self._save_credentials(result, key_pem, pinned)
        ident.host_id = result["host_id"]
        ident.credential = result["credential"]
        ident.save()
        self.log.info("joined the cluster as host {host_id}", host_id=ident.host_id)
        return "joined"

    def _adopt_authid(self, session):
        """
        The control plane renamed this host (an older zwrm's C{h-<hex>} id is C{h_<hex>}
        now): WELCOME's authid is the new id.  Take it and keep it in the identity file,
        before anything is registered under it.
        """
        ident = self.identity
        authid = session.authid
        if isinstance(authid, str) and authid and authid != ident.host_id:
            self.log.info("the control plane knows host {old} as {new} now; taking that id",
                          old=ident.host_id, new=authid)
            ident.host_id = authid
            ident.save()
            executor = getattr(self.runtime, "executor", None)
            if executor is not None:  # renamed while running (the control plane upgraded)
                executor.host_id = authid
                if getattr(executor, "network", None) is not None:
                    executor.network.host_id = authid

    def _save_credentials(self, result, key_pem, pinned):
        """
        Keep the host certificate and CA the control plane returned from C{zwrm.agent.join},
        after checking that the certificate is for our host id and the CA is the one we
        verified (or the join token names).

        @raise ServerRejected: they are not.
        """
        try:
            ca_pem = result["ca"].encode("ascii")
            cert_pem = result["certificate"].encode("ascii")
            credentials = pki.HostCredentials(ca_pem, cert_pem, key_pem)
            pki.check_host_certificate(cert_pem, self.identity.host_id)
        except (errors.InvalidArgument, errors.AuthenticationFailed) as e:
            raise ServerRejected(
                f"the certificate the control plane issued is unusable: {e.message}"
            ) from None
        except (KeyError, AttributeError, ValueError) as e:
            raise ServerRejected(f"the control plane returned no usable certificate: {e}") from None
        token = (self.config.join_token or "").strip()
        expected = None
        if isinstance(pinned, pki.PinnedClientTLSOptions):
            expected = pinned._fingerprint
        elif token.startswith(pki.TOKEN_PREFIX + "."):
            expected = pki.JoinToken.parse(token).ca_fingerprint
        if expected is not None and credentials.fingerprint != expected:
            raise ServerRejected(
                f"the control plane returned CA {credentials.fingerprint[:16]}..., not the CA"
                f" {expected[:16]}... the join token names"
            )
        credentials.save(self.tls_dir)
        self.log.info(
            "host certificate for {host_id} saved in {dir} (CA sha256:{fp})",
            host_id=credentials.host_id,
            dir=self.tls_dir,
            fp=credentials.fingerprint,
        )

    async def _member(self, session):
        self.session = session
        host_id = self.identity.host_id
        try:
            executors = list(self.executors)
            if self.runtime is not None:
                info = await self._cluster_info(session)
                executors.append(
                    await self.runtime.attach(host_id, self.identity.credential, session,
                                              registry_url=info.get("registry_url")))
                if getattr(self.runtime, "live", None) is not None:
                    executors.append(self.runtime.live)  # live.* (zwrm.agent.live)
            for executor in executors:
                # each behind a guard: a full disk or a bug is a zwrm.error.* answer
                await register_agent_procedures(session, executor, host_id, self.log)
            asked_at = self.reactor.seconds()
            result = await session.call("zwrm.agent.register", self.facts())
        except Exception:
            if session.is_attached():
                session.leave()
            self.session = None
            raise
        self.heartbeat_interval = float(result.get("heartbeat_interval") or 5.0)
        self._contact(asked_at)
        self.life.registered()
        self.log.info(
            "registered as host {host_id} (state {state}); heartbeat every {i}s",
            host_id=host_id,
            state=result.get("state"),
            i=self.heartbeat_interval,
        )
        if not self.registered.called:
            self.registered.callback(result)
        self._schedule_heartbeat()
        if self.runtime is not None:
            self.runtime.registered()
        self.renewal.start(session)
        try:
            outcome = await session.ended
        finally:
            self.renewal.stop()
        self._stop_heartbeats()
        self.session = None
        if isinstance(outcome, SessionClosed) and "killed" in str(outcome):
            return SessionEnded(str(outcome))
        return SessionEnded()

    def _certificate_renewed(self, credentials):
        """The host certificate was renewed (L{CertificateRenewal}): use it from now on."""
        if self.runtime is not None:
            self.runtime.credentials_renewed(credentials)

    async def _cluster_info(self, session):
        """
        What the control plane says about the cluster (C{zwrm.cluster.info}: where its
        registry is); C{{}} from a control plane that does not have the procedure yet.
        """
        try:
            info = await session.call("zwrm.cluster.info")
        except ApplicationError as e:
            if e.error in (ApplicationError.NO_SUCH_PROCEDURE, ApplicationError.NOT_AUTHORIZED):
                return {}
            raise
        return info if isinstance(info, dict) else {}

    # -- heartbeats -------------------------------------------------------------------

    def _schedule_heartbeat(self):
        delay = self.heartbeat_interval * self.rng.uniform(0.9, 1.1)
        self._hb_call = self.reactor.callLater(delay, self._heartbeat)

    def _stop_heartbeats(self):
        for call in (self._hb_call, self._hb_timeout):
            if call is not None and call.active():
                call.cancel()
        self._hb_call = self._hb_timeout = None

    def _heartbeat(self):
        session = self.session
        if session is None or not session.is_attached():
            return
        sent_at = self.reactor.seconds()
        stats = self.runtime.stats() if self.runtime else {}
        if self.renewal.expires_at is not None:  # (zwrm host status, the control's /metrics)
            stats["host_certificate_expires_at"] = self.renewal.expires_at
        d = defer.maybeDeferred(session.call, "zwrm.agent.heartbeat", stats)
        timeout = self._hb_timeout = self.reactor.callLater(
            3 * self.heartbeat_interval, self._heartbeat_timeout, session)

        def ok(result):
            self.heartbeats_sent += 1
            self.heartbeat_rtt = self.reactor.seconds() - sent_at
            self._contact(sent_at)
            interval = result.get("heartbeat_interval") if isinstance(result, dict) else None
            if interval:
                self.heartbeat_interval = float(interval)

        def failed(f):
            if f.check(defer.CancelledError):
                # the session ended with it outstanding: how it ended is logged on its own
                self.log.debug("heartbeat cancelled: the session ended")
                return
            self.log.warn("heartbeat failed: {why}", why=errors.message_of(f.value))

        def done(_):
            if timeout.active():
                timeout.cancel()
            if self._hb_timeout is timeout:
                self._hb_timeout = None
            if self._running and self.session is session and session.is_attached():
                self._schedule_heartbeat()

        d.addCallbacks(ok, failed)
        d.addBoth(done)

    # -- fencing ----------------------------------------------------------------------
    #
    # With fence_after, an agent that has heard nothing from the control plane for that
    # long stops its machines with volumes (Executor.fence): a host cut off from the
    # cluster, not dead, then runs no copy of a machine whose volumes the control plane
    # may recover on another host, which it does only once that time (and a margin) has
    # passed since the host's last heartbeat (zwrm.control.host_removal).  Counted from
    # when the last answered call was sent (no later than the control plane received it).

    def _fencing(self):
        return bool(getattr(self.config, "fence_after", 0)) and self.runtime is not None

    def _start_fencing(self):
        if not self._fencing():
            return
        now = self.reactor.seconds()
        last = None
        try:
            with open(os.path.join(self.config.data_dir, CONTACT_FILE)) as f:
                last = float(json.load(f)["at"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as e:
            # (written whole, it is unreadable only if damaged: the last answer may be
            # long ago, so the fence is due at once)
            self.log.warn("{f} unreadable ({e}): the machines with volumes are fenced now",
                          f=CONTACT_FILE, e=e)
            last = now - self.config.fence_after
        # (none yet, the first start with fence_after: from now; a time ahead of the
        # clock, which went back: from now)
        self.last_contact = now if last is None else min(last, now)
        self._arm_fence()

    def _contact(self, sent_at):
        """The control plane answered a call sent at C{sent_at}."""
        if not self._fencing() or (self.last_contact is not None
                                   and sent_at <= self.last_contact):
            return
        self.last_contact = sent_at
        try:
            write_atomically(os.path.join(self.config.data_dir, CONTACT_FILE),
                             json.dumps({"at": sent_at}))
        except OSError as e:  # (a full disk: a restart would count from an older time)
            self.log.debug("{f} not written: {e}", f=CONTACT_FILE, e=e)
        self._arm_fence()

    def _arm_fence(self, delay=None):
        if delay is None:
            delay = max(self.last_contact + self.config.fence_after - self.reactor.seconds(),
                        0)
        if self._fence_call is not None and self._fence_call.active():
            self._fence_call.reset(delay)
        else:
            self._fence_call = self.reactor.callLater(delay, self._fence)

    def _fence(self):
        self._fence_call = None
        if not self._running:
            return
        silent = self.reactor.seconds() - self.last_contact
        reason = (f"fenced: the control plane did not answer for {silent:.0f} s (fence_after"
                  f" {self.config.fence_after:g} s): stopped so that its volumes may be"
                  " recovered on another host")
        d = defer.Deferred.fromCoroutine(self.runtime.fence(
            self.identity.host_id, self.identity.credential, reason, FENCE_GRACE))

        def done(stopped):
            self.fenced += len(stopped)
            if stopped:
                self.log.warn("the control plane did not answer for {s:.0f} s (fence_after "
                              "{f:g} s): stopped the machines with volumes here: {ids}",
                              s=silent, f=self.config.fence_after, ids=", ".join(stopped))

        def failed(f):
            errors.log_failure(self.log, f, "fencing")

        def again(_):
            # While the silence lasts, look again (a machine that was starting runs now);
            # an answer puts the fence back to fence_after from it (_arm_fence).
            if self._running and self._fence_call is None:
                self._arm_fence(FENCE_RECHECK)

        d.addCallbacks(done, failed).addBoth(again)

    def _heartbeat_timeout(self, session):
        self.log.warn("heartbeat unanswered; dropping the connection")
        if session._transport is not None:
            session._transport.dropConnection() if hasattr(
                session._transport, "dropConnection"
            ) else session.disconnect()
