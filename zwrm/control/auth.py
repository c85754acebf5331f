"""
Who may join the realm: the control plane's L{IAuthenticator}.

Every client uses ticket authentication:

 - authid C{join}, ticket = a join token: role C{joining}.
 - authid C{operator} (or C{viewer}), ticket = an operator (viewer) token: that role.
 - authid = a host id, ticket = that host's credential (issued by C{zwrm.agent.join}):
   role C{agent}.

Tokens and credentials are stored only as SHA-256 hashes.
"""

import hmac

from twisted.internet import defer
from zope.interface import implementer

from zwrm.control.store import hash_secret
from zwrm.errors import AuthenticationFailed
from zwrm.interfaces import IAuthenticator
from zwrm.wamp.auth import Principal

TOKEN_ROLES = {"join": ("join", "joining"), "operator": ("operator", "operator"),
               "viewer": ("viewer", "viewer")}
"""authid -> (token kind, role) for token-holding clients."""

RESERVED_AUTHIDS = frozenset(TOKEN_ROLES) | {"control"}
"""authids that can never be host ids."""


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


@implementer(IAuthenticator)
class ControlAuthenticator:
    """
    Authenticates against the store's tokens and the registry's host credentials.
    """

    def __init__(self, store, registry):
        """
        @param store: a L{zwrm.control.store.Store} (tokens).
        @param registry: a L{zwrm.control.registry.HostRegistry} (host credentials).
        """
        self._store = store
        self._registry = registry

    def authmethods(self):
        return ["ticket"]

    def authenticate_ticket(self, realm, authid, ticket):
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
                return Principal(authid, role, {})

            return d.addCallback(found)
        stored = self._registry.credential_hash(authid)
        if stored is None:
            return defer.fail(AuthenticationFailed(f"unknown host {authid!r}; join it with a join token"))
        if not hmac.compare_digest(stored, hash_secret(secret)):
            return defer.fail(AuthenticationFailed(f"the credential of host {authid!r} was not accepted"))
        return defer.succeed(Principal(authid, "agent", {}))

    def wampcra_secret(self, realm, authid):
        return defer.fail(AuthenticationFailed("WAMP-CRA is not offered; use ticket"))

    def cryptosign_principal(self, realm, authid, pubkey_hex):
        return defer.fail(AuthenticationFailed("cryptosign is not offered; use ticket"))
