"""
Credentials for the registry.

The registry itself only calls an injected C{authorize(request, action)}; this module reads
the credentials out of a request and offers L{TokenAuthorizer}, a table-driven authorizer the
control plane (or a test, or a standalone registry) can use.

Clients present either C{Authorization: Bearer <token>} or HTTP Basic auth with the authid as
user name and the token as password (what OCI tools such as oras and docker send).
"""

import base64
import hmac

from twisted.internet import defer

from zwrm.errors import AuthenticationFailed, NotAuthorized

ACTIONS = ("pull", "push", "delete")


def parse_credentials(request):
    """
    @return: C{(authid, token)}: C{authid} is L{None} for a bearer token; both are L{None}
        when the request carries no credentials.
    @raise AuthenticationFailed: for a malformed Authorization header.
    """
    header = request.getHeader(b"authorization")
    if not header:
        return None, None
    scheme, _, value = header.decode("latin-1").strip().partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer" and value:
        return None, value
    if scheme == "basic":
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise AuthenticationFailed("malformed Basic credentials") from None
        if sep:
            return user, password
    raise AuthenticationFailed("unsupported Authorization header (use Bearer or Basic)")


class TokenAuthorizer:
    """
    Authorizes registry requests from a table of credentials.

    @param tokens: C{{token: (principal, actions)}}: bearer tokens (also accepted as the
        password of Basic auth with any user name), e.g. operator tokens.
    @param basic: C{{authid: (token, actions)}}: Basic-auth credentials, e.g. an agent's
        host id and per-host token.
    @param anonymous: actions allowed without credentials (default: none).
    """

    def __init__(self, tokens=(), basic=(), anonymous=()):
        self.tokens = dict(tokens)
        self.basic = dict(basic)
        self.anonymous = frozenset(anonymous)

    def __call__(self, request, action):
        """
        @return: a Deferred firing with the principal, or failing with
            L{AuthenticationFailed} (no or wrong credentials: HTTP 401) or
            L{NotAuthorized} (valid credentials without the right: HTTP 403).
        """
        return defer.maybeDeferred(self._check, request, action)

    def _check(self, request, action):
        authid, token = parse_credentials(request)
        if token is None:
            if action in self.anonymous:
                return "anonymous"
            raise AuthenticationFailed("authentication required")
        if authid is not None and authid in self.basic:
            expected, actions = self.basic[authid]
            if hmac.compare_digest(expected.encode(), token.encode()):
                return self._allow(authid, actions, action)
        for known, (principal, actions) in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return self._allow(principal, actions, action)
        raise AuthenticationFailed("credentials not accepted")

    @staticmethod
    def _allow(principal, actions, action):
        if action not in actions:
            raise NotAuthorized(f"{principal} may not {action}")
        return principal


ROLE_ACTIONS = {
    "operator": frozenset(ACTIONS),
    "trusted": frozenset(ACTIONS),
    "viewer": frozenset({"pull"}),
    "agent": frozenset({"pull"}),
}
"""What each WAMP role may do in the registry (other roles, e.g. C{joining}: nothing)."""


class TicketAuthorizer:
    """
    Authorizes registry requests with the same credentials as WAMP ticket auth, through
    an L{zwrm.interfaces.IAuthenticator} (the control plane's):

     - Basic auth: user = the WAMP authid (C{operator}, C{viewer}, or a host id), password =
       the ticket (operator/viewer token, or the host's credential);
     - Bearer token: taken as an operator token (authid C{operator}).

    The principal's role is mapped to actions by C{role_actions} (default L{ROLE_ACTIONS}):
    operators push, pull and delete; agents and viewers pull.

    @param authenticator: provides C{authenticate_ticket(realm, authid, ticket)}.
    @param realm: the WAMP realm passed to it.
    @param anonymous: actions allowed without credentials (default: none).
    """

    def __init__(self, authenticator, realm="zwrm", role_actions=None, anonymous=()):
        self._authenticator = authenticator
        self._realm = realm
        self._roles = dict(role_actions or ROLE_ACTIONS)
        self.anonymous = frozenset(anonymous)

    def __call__(self, request, action):
        """
        @return: a Deferred firing with the L{Principal}, or failing with
            L{AuthenticationFailed} or L{NotAuthorized}.
        """
        return defer.Deferred.fromCoroutine(self._check(request, action))

    async def _check(self, request, action):
        authid, token = parse_credentials(request)
        if token is None:
            if action in self.anonymous:
                return None
            raise AuthenticationFailed("authentication required")
        principal = await self._authenticator.authenticate_ticket(
            self._realm, authid or "operator", token
        )
        if action not in self._roles.get(principal.authrole, ()):
            raise NotAuthorized(f"{principal.authid} ({principal.authrole}) may not {action}")
        return principal
