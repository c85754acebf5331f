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
agent logs one line and tries again after an exponential backoff with jitter.  A
rejected credential with a join token at hand makes the next attempt join again.
"""

import os
import random
from ipaddress import ip_address

from autobahn import wamp
from autobahn.twisted.wamp import ApplicationSession
from autobahn.twisted.websocket import WampWebSocketClientFactory
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.serializer import JsonSerializer, MsgPackSerializer
from autobahn.wamp.types import ComponentConfig
from autobahn.websocket.util import parse_url
from twisted.application import service
from twisted.internet import defer, endpoints, error
from twisted.logger import Logger

import zwrm
from zwrm import errors, pki
from zwrm.agent import capacity
from zwrm.agent.identity import Identity


class AuthRejected(Exception):
    """The control plane did not accept our token or credential."""


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


class _AgentSession(ApplicationSession):
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

    def onChallenge(self, challenge):
        return self._ticket

    def onJoin(self, details):
        if not self.joined.called:
            self.joined.callback(details)

    def onLeave(self, details):
        self.leave_details = details
        self.disconnect()

    def onDisconnect(self):
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


def _tcp_endpoint(reactor, host, port, timeout):
    try:
        ip = ip_address(host.strip("[]"))
    except ValueError:
        return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    cls = endpoints.TCP6ClientEndpoint if ip.version == 6 else endpoints.TCP4ClientEndpoint
    return cls(reactor, str(ip), port, timeout=timeout)


def client_endpoint(reactor, url, ca_file=None, timeout=10):
    """
    A client endpoint for the WebSocket C{url}.

    @param ca_file: PEM file of the CA to trust for C{wss://} (default: the platform's).
    """
    secure, host, port, _resource, _path, _params = parse_url(url)
    tcp = _tcp_endpoint(reactor, host, port, timeout)
    if not secure:
        return tcp
    from twisted.internet import ssl

    if ca_file:
        with open(ca_file, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
    else:
        trust = ssl.platformTrust()
    return endpoints.wrapClientTLS(ssl.optionsForClientTLS(host, trustRoot=trust), tcp)


def _watch_connection(protocol, session, options):
    """
    Fail C{session.joined} when the connection ends before the session could open (a TLS
    handshake we refused, a failed WebSocket upgrade): autobahn then never tells the
    session, which would wait for ever.
    """
    lost = protocol.connectionLost

    def connection_lost(reason):
        try:
            lost(reason)
        finally:
            if not session.joined.called:
                rejected = getattr(options, "rejected", None)
                session.joined.errback(
                    ServerRejected(rejected)
                    if rejected
                    else SessionClosed(f"the connection was lost: {reason.getErrorMessage()}")
                )

    protocol.connectionLost = connection_lost


class AgentService(service.Service):
    """
    Keeps this host a member of the cluster.

    @ivar identity: the L{Identity} (host id, credential).
    @ivar session: the current joined session, or L{None}.
    @ivar state: C{"connecting"}, C{"joining"}, C{"registered"} or C{"stopped"}.
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
        self.state = "stopped"
        self.executors = [MembershipExecutor(self)]
        self.heartbeat_interval = 5.0
        self.heartbeats_sent = 0
        self.attempts = 0
        self.last_error = None
        self.registered = defer.Deferred()
        self._loop = None
        self._sleep = None
        self._hb_call = None
        self._running = False
        self._connecting = None
        self._pending = None
        self._pending_proto = None
        self._tls = None

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
        if c.address:
            facts["address"] = c.address
        elif self.session is not None and self.session._transport is not None:
            try:
                facts["address"] = self.session._transport.transport.getHost().host
            except Exception:
                pass
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
        self._running = True
        self._loop = defer.Deferred.fromCoroutine(self._run_forever())
        self._loop.addErrback(lambda f: self.log.failure("zwrm-agent stopped unexpectedly", f))

    def stopService(self):
        service.Service.stopService(self)
        self._running = False
        self._stop_heartbeats()
        if self._sleep is not None and self._sleep.active():
            self._sleep.cancel()
        if self._connecting is not None and not self._connecting.called:
            self._connecting.cancel()
        proto = self._pending_proto
        if proto is not None and getattr(proto, "transport", None) is not None:
            # connected but not joined yet (e.g. waiting for an authentication answer)
            proto.transport.abortConnection()
        closing = (defer.Deferred.fromCoroutine(self.runtime.close())
                   if self.runtime is not None else defer.succeed(None))
        session = self.session
        if session is None or not session.is_attached():
            return closing
        session.leave("wamp.close.normal", "agent stopping")
        # wait (briefly) for the GOODBYE to go out; never for a hanging attempt
        done = defer.Deferred()
        timer = self.reactor.callLater(2, lambda: done.called or done.callback(None))

        def ended(_):
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        session.ended.addBoth(ended)
        return defer.gatherResults([done, closing])

    def _backoff(self, failures):
        c = self.config
        delay = min(c.retry_max, c.retry_initial * (2 ** max(failures - 1, 0)))
        return delay * self.rng.uniform(0.5, 1.0)

    def _wait(self, seconds):
        d = defer.Deferred()
        self._sleep = self.reactor.callLater(seconds, d.callback, None)
        return d

    async def _run_forever(self):
        failures = 0
        while self._running:
            try:
                outcome = await self._attempt()
            except Exception as e:
                outcome = e
            if not self._running:
                break
            if outcome == "joined":
                failures = 0
                continue
            if outcome == "was-registered":
                failures = 0
            failures += 1
            delay = self._backoff(failures)
            self.last_error = self._explain(outcome)
            self.log.warn("{why}; retrying in {delay:.1f}s", why=self.last_error, delay=delay)
            await self._wait(delay)
        self.state = "stopped"

    def _explain(self, outcome):
        url = self.config.url
        if isinstance(outcome, str):
            if outcome == "was-registered":
                return f"lost the connection to the control plane at {url}"
            return outcome
        if isinstance(outcome, ServerRejected):
            return f"refusing the control plane at {url}: {outcome}"
        if isinstance(outcome, errors.ZwrmError):
            return f"cannot join the control plane at {url}: {outcome.message}"
        if isinstance(outcome, AuthRejected):
            what = "credential" if self.identity.credential else "join token"
            return f"the control plane at {url} rejected our {what}: {outcome}"
        if isinstance(outcome, error.ConnectionRefusedError):
            return f"cannot reach the control plane at {url}: connection refused"
        if isinstance(outcome, error.DNSLookupError):
            return f"cannot reach the control plane at {url}: unknown host"
        if isinstance(outcome, error.TimeoutError | defer.TimeoutError):
            return f"cannot reach the control plane at {url}: timed out"
        if isinstance(outcome, error.ConnectError | error.ConnectionLost | error.ConnectionDone):
            return f"cannot reach the control plane at {url}: {outcome.__class__.__name__}"
        if isinstance(outcome, SessionClosed):
            return f"the control plane at {url} closed our session ({outcome})"
        if isinstance(outcome, ApplicationError):
            return f"the control plane at {url} refused: {outcome.error}: {outcome.args[0] if outcome.args else ''}"
        if isinstance(outcome, OSError):
            return f"cannot reach the control plane at {url}: {outcome.strerror or outcome}"
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
            endpoint = endpoints.wrapClientTLS(options, _tcp_endpoint(self.reactor, host, port, 10))
        self._connecting = endpoint.connect(factory)
        self._pending = session
        try:
            protocol = self._pending_proto = await self._connecting
            _watch_connection(protocol, session, options)
            await session.joined
        except Exception:
            if getattr(options, "rejected", None):
                raise ServerRejected(options.rejected) from None
            raise
        finally:
            self._connecting = None
            self._pending = None
            self._pending_proto = None
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
                if credentials.host_id != self.identity.host_id:
                    raise ServerRejected(
                        f"the host certificate in {self.tls_dir} is for host"
                        f" {credentials.host_id!r}, not this host {self.identity.host_id!r};"
                        f" remove {self.tls_dir} to join again with a join token"
                    )
                return _PinnedOptions(
                    host,
                    credentials.fingerprint,
                    client_certificate=(credentials.cert_pem, credentials.key_pem),
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
        self.state = "connecting"
        if ident.credential:
            try:
                session = await self._connect(ident.host_id, ident.credential)
            except AuthRejected:
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
            return "no credential and no join token: start the agent with --join-token"
        self.state = "joining"
        session = await self._connect("join", self.config.join_token)
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
                executors.append(
                    await self.runtime.attach(host_id, self.identity.credential, session))
            for executor in executors:
                await session.register(executor, prefix=f"zwrm.agent.{host_id}.")
            result = await session.call("zwrm.agent.register", self.facts())
        except Exception:
            if session.is_attached():
                session.leave()
            self.session = None
            raise
        self.heartbeat_interval = float(result.get("heartbeat_interval") or 5.0)
        self.state = "registered"
        self.log.info(
            "registered as host {host_id} (state {state}); heartbeat every {i}s",
            host_id=host_id,
            state=result.get("state"),
            i=self.heartbeat_interval,
        )
        if not self.registered.called:
            self.registered.callback(result)
        self._schedule_heartbeat()
        outcome = await session.ended
        self._stop_heartbeats()
        self.session = None
        if isinstance(outcome, SessionClosed) and "killed" in str(outcome):
            return f"the control plane closed our session ({outcome})"
        return "was-registered"

    # -- heartbeats -------------------------------------------------------------------

    def _schedule_heartbeat(self):
        delay = self.heartbeat_interval * self.rng.uniform(0.9, 1.1)
        self._hb_call = self.reactor.callLater(delay, self._heartbeat)

    def _stop_heartbeats(self):
        if self._hb_call is not None and self._hb_call.active():
            self._hb_call.cancel()
        self._hb_call = None

    def _heartbeat(self):
        session = self.session
        if session is None or not session.is_attached():
            return
        d = session.call("zwrm.agent.heartbeat", self.runtime.stats() if self.runtime else {})
        timeout = self.reactor.callLater(3 * self.heartbeat_interval, self._heartbeat_timeout, session)

        def ok(result):
            self.heartbeats_sent += 1
            interval = result.get("heartbeat_interval") if isinstance(result, dict) else None
            if interval:
                self.heartbeat_interval = float(interval)

        def failed(f):
            self.log.warn("heartbeat failed: {why}", why=f.getErrorMessage())

        def done(_):
            if timeout.active():
                timeout.cancel()
            if self.session is session and session.is_attached():
                self._schedule_heartbeat()

        d.addCallbacks(ok, failed)
        d.addBoth(done)

    def _heartbeat_timeout(self, session):
        self.log.warn("heartbeat unanswered; dropping the connection")
        if session._transport is not None:
            session._transport.dropConnection() if hasattr(
                session._transport, "dropConnection"
            ) else session.disconnect()
