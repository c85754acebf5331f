"""
The control component behind an external WAMP router (Crossbar.io): the connection to it
and the dynamic authenticator and authorizer the router calls.

With C{[control] router_url} set, the control plane runs no WAMP listener of its own.  Its
control component connects to the router as C{router_authid} (default C{control}) with a
ticket (a static principal of the router's config, role C{control}: Crossbar refuses the
reserved role name C{trusted}), and registers, besides the control plane's procedures:

 - C{zwrm.crossbar.authenticate(realm, authid, details)}: Crossbar's dynamic ticket
   authenticator.  It checks the ticket as the embedded router does
   (L{zwrm.control.auth.ControlAuthenticator}: join tokens, operator and viewer tokens, host
   credentials) and answers C{{"role", "authid", "extra"}}, or fails with
   C{wamp.error.authentication_failed} saying why.  A host that connected with a TLS client
   certificate must present its own host's certificate: the certificate's details are read
   from C{details["transport"]["peer_cert"]} (Crossbar passes them when the transport's TLS
   endpoint verifies client certificates against the cluster CA, C{ca_certificates}).
 - C{zwrm.crossbar.authorize(session, uri, action, options)}: Crossbar's dynamic authorizer
   for the roles C{joining}, C{agent}, C{operator} and C{viewer}: zwrm's role table
   (L{zwrm.control.roles.roles}) decides, exactly as in the embedded router (an agent calls
   only C{zwrm.agent.register|heartbeat|report} and registers only C{zwrm.agent.<its host
   id>.*}).  Calls and publications are allowed with caller disclosure (the control plane
   knows its callers by their authid).  Crossbar caches a decision per (realm, role, URI,
   action), not per authid, so a decision that depends on the authid is never cached.

docs/wamp-clients.md has Crossbar configurations that work as they are (plain WebSocket on
loopback, and TLS with host certificates), and says what an external router must pass.
"""

from autobahn import wamp
from autobahn.twisted.websocket import WampWebSocketClientFactory
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.serializer import CBORSerializer, JsonSerializer, MsgPackSerializer
from twisted.application import internet, service
from twisted.internet import defer
from twisted.logger import Logger

from zwrm import errors, pki
from zwrm.control.api import ControlSession
from zwrm.hostid import strict_host_id
from zwrm.wamp.auth import RoleBasedAuthorizer

ROUTER_ROLES = ("joining", "agent", "operator", "viewer")
"""The roles a router authorizes with L{CrossbarAPI.authorize}."""

CONTROL_ROLE = "control"
"""The control component's role in an external router's config (static permissions)."""

_SAN = "subjectAltName"


def certified_host_id(peer_cert):
    """
    The zwrm host id in a TLS client certificate as an external router describes it
    (autobahn's C{TransportDetails.peer_cert}: C{extensions} with the subject alternative
    names as OpenSSL prints them, C{URI:zwrm:host:<id>}), or L{None}.
    """
    if not isinstance(peer_cert, dict):
        return None
    ids = []
    for ext in peer_cert.get("extensions") or ():
        if not isinstance(ext, dict) or ext.get("name") != _SAN:
            continue
        for name in str(ext.get("value") or "").split(","):
            name = name.strip()
            if name.startswith("URI:" + pki.HOST_URI_PREFIX):
                ids.append(name[len("URI:" + pki.HOST_URI_PREFIX):])
    return ids[0] if len(ids) == 1 else None


def _denied(message):
    return ApplicationError(ApplicationError.AUTHENTICATION_FAILED, message)


class _Session:
    """What L{RoleBasedAuthorizer} reads of a session."""

    def __init__(self, authid, authrole):
        self.authid = authid
        self.authrole = authrole


class CrossbarAPI:
    """
    The dynamic authenticator and authorizer an external router calls (see the module
    docstring).
    """

    log = Logger()

    def __init__(self, authenticator, roles):
        """
        @param authenticator: the control plane's L{zwrm.control.auth.ControlAuthenticator}.
        @param roles: the role table (L{zwrm.control.roles.roles}).
        """
        self._authenticator = authenticator
        self._roles = roles
        self._authorizer = RoleBasedAuthorizer(roles)

    @wamp.register("zwrm.crossbar.authenticate")
    async def authenticate(self, realm, authid, details):
        if not isinstance(details, dict) or details.get("authmethod") not in (None, "ticket"):
            raise _denied("zwrm offers ticket authentication only")
        ticket = details.get("ticket")
        if not isinstance(authid, str) or not authid:
            raise _denied("an authid is needed (join, operator, viewer or a host id)")
        try:
            principal = await self._authenticator.authenticate_ticket(realm, authid, ticket)
        except errors.ZwrmError as e:
            raise _denied(e.message) from None
        if principal.authrole == "agent":
            transport = details.get("transport") or {}
            peer = transport.get("peer_cert") or transport.get("client_cert")
            if peer:
                certified = certified_host_id(peer)
                if certified is None or strict_host_id(certified) != strict_host_id(principal.authid):
                    raise _denied(
                        f"the TLS client certificate is for host {certified!r}, not for {authid!r}"
                        if certified else
                        f"the TLS client certificate is not a zwrm host certificate for {authid!r}")
        return {"authid": principal.authid, "role": principal.authrole,
                "extra": dict(principal.authextra)}

    @wamp.register("zwrm.crossbar.authorize")
    def authorize(self, session, uri, action, options=None):
        if not isinstance(session, dict):
            return {"allow": False, "cache": False}
        role = session.get("authrole")
        authid = session.get("authid")
        match = (options or {}).get("match") or "exact"
        if role not in ROUTER_ROLES or match not in ("exact", "prefix", "wildcard"):
            return {"allow": False, "cache": False}
        allowed = self._authorizer.authorize_pattern(_Session(authid, role), uri, action, match)
        # Crossbar's cache key has no authid: cache only what no {authid} rule decides
        personal = any("{authid}" in r.uri and action in r.allow for r in self._roles[role])
        decision = {"allow": bool(allowed), "cache": not personal}
        if allowed and action in ("call", "publish"):
            decision["disclose"] = True
        return decision


class RouterControlSession(ControlSession):
    """
    The control component's session on an external router: joins with ticket
    authentication as C{authid}.
    """

    def __init__(self, apis, realm, authid, ticket, on_join, under_way=None):
        ControlSession.__init__(self, apis, realm=realm, under_way=under_way)
        self._authid = authid
        self._ticket = ticket
        self._on_join = on_join

    def onConnect(self):
        self.join(self.config.realm, authmethods=["ticket"], authid=self._authid)

    def onChallenge(self, challenge):
        if challenge.method != "ticket":
            raise ApplicationError(ApplicationError.AUTHENTICATION_FAILED,
                                   f"the router asked for {challenge.method}; zwrm uses ticket")
        return self._ticket

    async def onJoin(self, details):
        await ControlSession.onJoin(self, details)
        self._on_join(self)

    def onLeave(self, details):
        if details.reason not in ("wamp.close.normal", "wamp.close.goodbye_and_out"):
            self.log.warn("the router ended the control component's session: {reason} {message}",
                          reason=details.reason, message=details.message or "")
        ControlSession.onLeave(self, details)


class ExternalRouter(service.MultiService):
    """
    Keeps the control component connected to the external router at C{url}, reconnecting
    for ever with backoff (a new L{RouterControlSession} per connection).

    @ivar session: the joined session, or L{None}.
    """

    log = Logger()

    def __init__(self, reactor, url, realm, authid, ticket, apis, ca_file=None,
                 on_session=None, under_way=None):
        """
        @param apis: objects with C{@wamp.register} procedures, registered at each join.
        @param on_session: called with each joined session.
        @param under_way: the set every session's procedures keep their work under way in
            (L{zwrm.control.api.ControlSession}): one for all the connections' sessions.
        """
        from zwrm.endpoints import client_endpoint

        service.MultiService.__init__(self)
        self.url = url
        self.session = None
        self._joined = []
        self._on_session = on_session

        def make_session():
            return RouterControlSession(apis, realm, authid, ticket, self._joined_session,
                                        under_way=under_way)

        self.make_session = make_session

        # CBOR first: a router's details can hold what MessagePack cannot carry (Crossbar
        # passes a TLS client certificate's serial number, up to 160 bits, to the
        # authenticator) and what JSON cannot (a TLS channel id, bytes)
        factory = WampWebSocketClientFactory(
            make_session, url=url,
            serializers=[CBORSerializer(), MsgPackSerializer(), JsonSerializer()],
            reactor=reactor)
        factory.noisy = False
        self.factory = factory
        endpoint = client_endpoint(reactor, url, ca_file)
        self.client = internet.ClientService(
            endpoint, factory, retryPolicy=internet.backoffPolicy(1.0, 15.0), clock=reactor)
        self.client.setServiceParent(self)

    def _joined_session(self, session):
        first = self.session is None
        self.session = session
        self.log.info("control component joined the router at {url}{again}", url=self.url,
                      again="" if first else " again")
        if self._on_session is not None:
            self._on_session(session)
        joined, self._joined = self._joined, []
        for d in joined:
            d.callback(session)

    def joined(self):
        """A Deferred that fires with the session once one has joined."""
        if self.session is not None and self.session.is_attached():
            return defer.succeed(self.session)
        d = defer.Deferred()
        self._joined.append(d)
        return d

    def stopService(self):
        session = self.session
        if session is not None and session.is_attached():
            session.leave()
        return service.MultiService.stopService(self)
