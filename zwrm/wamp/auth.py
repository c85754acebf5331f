"""
Who a WAMP session is (authentication) and what it may do (authorization).

The router asks an L{zwrm.interfaces.IAuthenticator} who a joining session is and an
L{zwrm.interfaces.IAuthorizer} whether each CALL, REGISTER, PUBLISH and SUBSCRIBE is
allowed.  The control plane provides the authenticator; L{RoleBasedAuthorizer} is the
authorizer it normally uses.  L{StaticAuthenticator} serves tests and examples.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass, field

from twisted.internet import defer
from zope.interface import implementer

from zwrm.errors import AuthenticationFailed
from zwrm.interfaces import IAuthenticator, IAuthorizer

ACTIONS = frozenset({"call", "register", "publish", "subscribe"})
MATCHES = ("exact", "prefix", "wildcard")
AUTHMETHODS = ("cryptosign", "wampcra", "ticket", "anonymous")


@dataclass(frozen=True)
class Principal:
    """
    The identity a session joins with.

    @ivar authid: who (e.g. a host id, an operator name).
    @ivar authrole: the role whose rules apply (e.g. C{"agent"}, C{"operator"}).
    @ivar authextra: free-form details sent to the client in WELCOME.
    """

    authid: str
    authrole: str
    authextra: dict = field(default_factory=dict)


def wildcard_match(pattern, uri):
    """
    C{True} if C{uri} matches the WAMP wildcard C{pattern}: the same number of
    components, and every non-empty pattern component equal to the URI's.
    """
    p = pattern.split(".")
    u = uri.split(".")
    if len(p) != len(u):
        return False
    for a, b in zip(p, u, strict=True):
        if a and a != b:
            return False
    return True


@dataclass(frozen=True)
class Rule:
    """
    One permission of a role.

    @ivar uri: the URI, prefix or wildcard pattern this rule covers.  C{"{authid}"}
        in it is replaced with the session's authid before matching, so
        C{Rule("zwrm.agent.{authid}.", "prefix", {"register"})} lets each agent
        register only its own procedures.
    @ivar match: C{"exact"}, C{"prefix"} or C{"wildcard"} (empty components match
        any one component).
    @ivar allow: a subset of C{{"call", "register", "publish", "subscribe"}}.
    """

    uri: str
    match: str = "exact"
    allow: frozenset = frozenset()

    def __post_init__(self):
        if self.match not in MATCHES:
            raise ValueError(f"rule match must be one of {MATCHES}, not {self.match!r}")
        allow = frozenset(self.allow)
        bad = allow - ACTIONS
        if bad:
            raise ValueError(f"unknown actions in rule: {sorted(bad)}")
        object.__setattr__(self, "allow", allow)

    def covers(self, authid, uri, action, match="exact"):
        """
        C{True} if this rule allows C{action} on C{uri} for a session with
        C{authid}.  For a pattern-based subscription or registration (C{match}
        C{"prefix"} or C{"wildcard"}), the rule must cover every URI the pattern can
        match: only a prefix rule whose prefix starts the pattern's literal part
        (or an identical rule) does.
        """
        if action not in self.allow:
            return False
        pattern = self.uri
        if "{authid}" in pattern:
            if not authid or "." in authid or "#" in authid:
                return False
            pattern = pattern.replace("{authid}", authid)
        if match == "exact":
            if self.match == "exact":
                return uri == pattern
            if self.match == "prefix":
                return uri.startswith(pattern)
            return wildcard_match(pattern, uri)
        if match == self.match and uri == pattern:
            return True
        if self.match != "prefix":
            return False
        if match == "prefix":
            return uri.startswith(pattern)
        # wildcard pattern: its literal head (before the first empty component)
        # must lie inside the rule's prefix.
        head = []
        for comp in uri.split("."):
            if not comp:
                break
            head.append(comp)
        literal = ".".join(head) + "." if len(head) < len(uri.split(".")) else uri
        return literal.startswith(pattern)


@implementer(IAuthorizer)
class RoleBasedAuthorizer:
    """
    Decides from a fixed table of roles to rules.  A session whose role is not in
    the table, or whose request no rule covers, is denied; there is no implicit
    allow-all role (not even C{"trusted"}).
    """

    def __init__(self, roles):
        """
        @param roles: C{dict} of role name to a list of L{Rule}.
        """
        self._roles = {name: tuple(rules) for name, rules in roles.items()}
        for name, rules in self._roles.items():
            for r in rules:
                if not isinstance(r, Rule):
                    raise TypeError(f"role {name!r}: {r!r} is not a Rule")

    def authorize(self, session, uri, action):
        """
        See L{IAuthorizer.authorize}.
        """
        return self.authorize_pattern(session, uri, action, "exact")

    def authorize_pattern(self, session, uri, action, match):
        """
        See L{IAuthorizer.authorize}; C{match} is the subscription or
        registration match policy.
        """
        rules = self._roles.get(session.authrole)
        if not rules:
            return False
        authid = session.authid
        for rule in rules:
            if rule.covers(authid, uri, action, match):
                return True
        return False


def _fail(message):
    return defer.fail(AuthenticationFailed(message))


@implementer(IAuthenticator)
class StaticAuthenticator:
    """
    An authenticator from fixed tables; for tests and examples only.

    @param tickets: C{{authid: (ticket, Principal)}}.
    @param secrets: C{{authid: (secret bytes, Principal)}} for WAMP-CRA.
    @param pubkeys: C{{pubkey hex: Principal}} for cryptosign.
    @param anonymous: allow anonymous sessions (role C{"anonymous"}).
    """

    def __init__(self, tickets=None, secrets=None, pubkeys=None, anonymous=False):
        self.tickets = dict(tickets or {})
        self.secrets = dict(secrets or {})
        self.pubkeys = {k.lower(): v for k, v in (pubkeys or {}).items()}
        self.anonymous = anonymous

    def authmethods(self):
        methods = []
        if self.pubkeys:
            methods.append("cryptosign")
        if self.secrets:
            methods.append("wampcra")
        if self.tickets:
            methods.append("ticket")
        if self.anonymous:
            methods.append("anonymous")
        return methods

    def authenticate_ticket(self, realm, authid, ticket):
        entry = self.tickets.get(authid)
        if entry is None or not isinstance(ticket, str) or not hmac.compare_digest(
            entry[0].encode(), ticket.encode()
        ):
            return _fail(f"ticket for {authid!r} not accepted")
        return defer.succeed(entry[1])

    def wampcra_secret(self, realm, authid):
        entry = self.secrets.get(authid)
        if entry is None:
            return _fail(f"no WAMP-CRA secret for {authid!r}")
        secret = entry[0]
        if isinstance(secret, str):
            secret = secret.encode()
        return defer.succeed((secret, entry[1]))

    def cryptosign_principal(self, realm, authid, pubkey_hex):
        principal = self.pubkeys.get((pubkey_hex or "").lower())
        if principal is None or (authid and authid != principal.authid):
            return _fail("public key not accepted")
        return defer.succeed(principal)


def wampcra_signature(secret, challenge):
    """
    The WAMP-CRA signature of C{challenge} (str) with C{secret} (bytes):
    base64 of HMAC-SHA256, as a str.
    """
    if isinstance(secret, str):
        secret = secret.encode()
    digest = hmac.new(secret, challenge.encode("utf8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def verify_cryptosign(pubkey_hex, challenge_hex, signature_hex):
    """
    C{True} if C{signature_hex} (96 bytes hex: Ed25519 signature then the signed
    32-byte challenge) is a signature of C{challenge_hex} by C{pubkey_hex}.
    """
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    try:
        key = VerifyKey(binascii.unhexlify(pubkey_hex))
        sig = binascii.unhexlify(signature_hex)
        challenge = binascii.unhexlify(challenge_hex)
    except (TypeError, ValueError, binascii.Error, Exception):
        return False
    if len(sig) != 96 or sig[64:] != challenge:
        return False
    try:
        key.verify(challenge, sig[:64])
    except BadSignatureError:
        return False
    return True
