"""
Who may join the realm: the control plane's L{IAuthenticator}.

Every client uses ticket authentication:

 - authid C{join}, ticket = a join token: role C{joining}.  A C{zwrm1.} token
   (L{zwrm.pki.JoinToken}) is checked by the control plane's L{zwrm.control.tokens.ControlPKI}
   (unknown, expired, revoked or made for another CA: refused, saying which).
 - authid C{operator} (or C{viewer}), ticket = an operator (viewer) token: that role.
 - authid = a host id, ticket = that host's credential (issued by C{zwrm.agent.join}):
   role C{agent}.  An older zwrm's host id (C{h-<hex>}) is accepted for the host it was
   renamed to (C{h_<hex>}, L{zwrm.hostid.strict_host_id}); the session's authid (in
   WELCOME) is the new id, which the agent takes.  A host that connects over TLS with a client certificate (its host
   certificate from the cluster CA) must present the certificate of that same host id.

Tokens and credentials are stored only as SHA-256 hashes.
"""

import hmac
from contextvars import ContextVar

from twisted.internet import defer
from zope.interface import implementer

from zwrm import pki
from zwrm.control.store import hash_secret
from zwrm.errors import AuthenticationFailed, InvalidArgument
from zwrm.hostid import strict_host_id
from zwrm.interfaces import IAuthenticator
from zwrm.wamp.auth import Principal

TOKEN_ROLES = {"join": ("join", "joining"), "operator": ("operator", "operator"),
               "viewer": ("viewer", "viewer")}
"""authid -> (token kind, role) for token-holding clients."""

PEER_CERTIFICATE = ContextVar("zwrm_peer_certificate", default=None)
"""The TLS client certificate of the connection whose message is being handled, if any
(set by the control plane's WebSocket protocol around each message)."""

RESERVED_AUTHIDS = frozenset(TOKEN_ROLES) | {"control"}
"""authids that can never be host ids."""

AUTH_METHODS = ("ticket", "wampcra")
"""The authmethods the control plane can offer: ticket (every principal) and WAMP-CRA
(hosts).  The embedded router implements cryptosign and anonymous too, but the control plane
has no principals for them."""

DEFAULT_AUTH_METHODS = ("ticket",)
"""What it offers unless C{[wamp] auth_methods} says otherwise."""


def check_auth_methods(methods):
    """
    The authmethods to offer, as a tuple, checked.

    @raise InvalidArgument: a method the control plane cannot offer (naming it and those it
        can), a repeated one, or none.
    """
    if isinstance(methods, str) or not isinstance(methods, (list, tuple)):
        raise InvalidArgument(f"auth_methods must be a list of methods, not {methods!r}")
    methods = tuple(methods)
    if not methods:
        raise InvalidArgument(f"auth_methods is empty: offer at least one of {', '.join(AUTH_METHODS)}")
    for m in methods:
        if m not in AUTH_METHODS:
            raise InvalidArgument(
                f"auth_methods: the control plane cannot offer {m!r}; it offers"
                f" {', '.join(AUTH_METHODS)}")
    if len(set(methods)) != len(methods):
        raise InvalidArgument(f"auth_methods lists a method twice: {list(methods)}")
    return methods


def parse_token(text):
    """
    The secret carried by a token as an operator or agent gives it.

    Tokens are opaque text today; the one place to extend when tokens carry more
    (e.g. a CA fingerprint, see L{zwrm.pki}).

    @raise AuthenticationFailed: if C{text} is not a token at all.
    """
    if not isinstance(text, str) or not text.strip():
        raise AuthenticationFailed("an empty token is not accepted")
    text = text.strip()
    if text.startswith("zwrm1.") and text.count(".") == 3:
        # zwrm.pki join token: zwrm1.<id>.<secret>.<ca-fingerprint>
        return text.split(".")[2]
    return text


def _unknown_host(authid):
    return AuthenticationFailed(
        f"unknown host {authid!r} (it never joined, or was removed); join it with a join token")


def _certificate_refused(authid, host_id):
    """
    Why the TLS client certificate of the connection (if any) does not let C{authid} join
    as host C{host_id} (an L{AuthenticationFailed}), or L{None}.
    """
    peer = PEER_CERTIFICATE.get()
    if peer is None:
        return None
    certified = pki.host_id_of(peer)
    if certified is not None and strict_host_id(certified) == strict_host_id(host_id):
        return None
    return AuthenticationFailed(
        f"the TLS client certificate is for host {certified!r}, not for {authid!r}"
        if certified else
        f"the TLS client certificate is not a zwrm host certificate for {authid!r}")


@implementer(IAuthenticator)
class ControlAuthenticator:
    """
    Authenticates against the store's tokens and the registry's host credentials.
    """

    def __init__(self, store, registry, join_tokens=None, authmethods=DEFAULT_AUTH_METHODS):
        """
        @param store: a L{zwrm.control.store.Store} (tokens).
        @param registry: a L{zwrm.control.registry.HostRegistry} (host credentials).
        @param join_tokens: checks C{zwrm1.} join tokens: an object with C{check(text)}
            returning a Deferred (L{zwrm.control.tokens.ControlPKI}), or L{None}.
        @param authmethods: the methods offered, in preference order (a non-empty subset
            of L{AUTH_METHODS}; C{[wamp] auth_methods}).
        @raise InvalidArgument: an unknown method, or none.
        """
        self._store = store
        self._registry = registry
        self._join_tokens = join_tokens
        self._methods = check_auth_methods(authmethods)

    def authmethods(self):
        return list(self._methods)

    def authenticate_ticket(self, realm, authid, ticket):
        if (
            authid == "join"
            and self._join_tokens is not None
            and isinstance(ticket, str)
            and ticket.strip().startswith("zwrm1.")
        ):
            d = defer.maybeDeferred(self._join_tokens.check, ticket)

            def refused(f):
                f.trap(AuthenticationFailed, InvalidArgument)
                raise AuthenticationFailed(f.value.message)

            d.addCallbacks(lambda token_id: Principal("join", "joining", {"token": token_id}), refused)
            return d
        try:
            secret = parse_token(ticket)
        except AuthenticationFailed as e:
            return defer.fail(e)
        if authid in TOKEN_ROLES:
            kind, role = TOKEN_ROLES[authid]
            d = self._store.find_token(kind, secret)

            def found(row):
                if row is None:
                    raise AuthenticationFailed(f"the {kind} token was not accepted")
                # a token made by `zwrm tokens create --role` is its own authid (its id,
                # <role>-<hex>), so the audit trail and the router's session list tell
                # one holder from another; the operator.token file's stays `operator`
                if row["id"] != f"{kind}-default" and row["id"].startswith(f"{kind}-"):
                    return Principal(row["id"], role, {"token": row["id"]})
                return Principal(authid, role, {})

            return d.addCallback(found)
        # a host renamed by the store's migration (h-<hex> is h_<hex> now) joins under its
        # new id, which the agent takes from WELCOME's authid
        host_id = authid
        if self._registry.credential_hash(authid) is None:
            host_id = strict_host_id(authid)
        refused = _certificate_refused(authid, host_id)
        if refused is not None:
            return defer.fail(refused)
        stored = self._registry.credential_hash(host_id) if host_id else None
        if stored is None:
            return defer.fail(_unknown_host(authid))
        if not hmac.compare_digest(stored, hash_secret(secret)):
            return defer.fail(AuthenticationFailed(f"the credential of host {authid!r} was not accepted"))
        return defer.succeed(Principal(host_id, "agent", {}))

    def wampcra_secret(self, realm, authid):
        """
        WAMP-CRA, for hosts only: the secret is the hex SHA-256 of the host's credential
        (the form the control plane keeps, L{zwrm.tokens.hash_secret}).
        """
        if "wampcra" not in self._methods:
            return defer.fail(AuthenticationFailed("WAMP-CRA is not offered"))
        if not isinstance(authid, str) or authid in RESERVED_AUTHIDS:
            return defer.fail(AuthenticationFailed(
                "WAMP-CRA is offered to hosts only (authid = the host id); use ticket"))
        host_id = authid
        if self._registry.credential_hash(authid) is None:
            host_id = strict_host_id(authid)
        stored = self._registry.credential_hash(host_id) if host_id else None
        if stored is None:
            return defer.fail(_unknown_host(authid))
        refused = _certificate_refused(authid, host_id)
        if refused is not None:
            return defer.fail(refused)
        return defer.succeed((stored.encode("ascii"), Principal(host_id, "agent", {})))

    def cryptosign_principal(self, realm, authid, pubkey_hex):
        return defer.fail(AuthenticationFailed("cryptosign is not offered; use ticket"))
