"""
Operator and viewer tokens made on demand (C{zwrm tokens create --role viewer|operator}),
beside the join tokens of L{zwrm.control.tokens.TokenAPI}.

A role token is C{<id>.<secret>} with an id C{operator-<8 hex>} or C{viewer-<8 hex>}; the
store keeps its SHA-256 with its kind (the role), expiry and revocation in the C{tokens}
table, where the C{operator.token} file's token is too (id C{operator-default}, no expiry).
A client uses it as the ticket of authid C{operator} or C{viewer}
(L{zwrm.control.auth.ControlAuthenticator}), as it does the file's token.  It is accepted
until it expires or is revoked; a session already open when it is revoked is not ended (the
next connection is refused).

L{AccessTokenAPI} keeps the C{zwrm.token.*} procedures and adds the role:

 - C{zwrm.token.create(ttl, description, role="join")}: with role C{operator} or C{viewer}
   a role token, C{{"token", "id", "role", "expires_at"}} (the text shown only here);
 - C{zwrm.token.list()}: the join tokens, then the role tokens, each with its C{role};
 - C{zwrm.token.revoke(token_id)}: a role token by id (or whole text) too.
"""

import secrets

from autobahn import wamp

from zwrm import errors, pki
from zwrm.control.tokens import MAX_TOKEN_TTL, TokenAPI
from zwrm.tokens import hash_secret

ROLES = ("operator", "viewer")
"""The roles a token can be made for besides joining."""


def _state(row, now):
    if row.get("revoked"):
        return "revoked"
    if row.get("expires_at") is not None and row["expires_at"] <= now:
        return "expired"
    return "valid"


def role_token_id(text):
    """The id of a role token given by id or whole text, or L{None} if it is not one."""
    token_id = text.split(".", 1)[0]
    role, _, rest = token_id.partition("-")
    return token_id if role in ROLES and rest else None


class AccessTokenAPI(TokenAPI):
    """The C{zwrm.token.*} procedures for join, operator and viewer tokens."""

    def __init__(self, control_pki, store, clock):
        """
        @param store: the started L{zwrm.control.store.Store}.
        @param clock: an L{IReactorTime} (expiry).
        """
        TokenAPI.__init__(self, control_pki)
        self.store = store
        self.clock = clock

    @wamp.register("zwrm.token.create")
    async def create(self, ttl=pki.DEFAULT_TOKEN_TTL, description="", role="join"):
        """
        A join token (C{role="join"}), or an operator or viewer token valid for C{ttl}
        seconds: C{{"token": <text, shown once>, "id", "role", "expires_at"}}.
        """
        if role == "join":
            return dict(await TokenAPI.create(self, ttl, description), role="join")
        if role not in ROLES:
            raise errors.InvalidArgument(
                f"role must be join, operator or viewer, not {role!r}", argument="role")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TOKEN_TTL:
            raise errors.InvalidArgument(
                f"a token's ttl is a number of seconds between 1 and {MAX_TOKEN_TTL:.0f},"
                f" not {ttl!r}", argument="ttl")
        token_id = f"{role}-{secrets.token_hex(4)}"
        text = f"{token_id}.{secrets.token_urlsafe(32)}"
        expires = self.clock.seconds() + ttl
        await self.store.add_token(token_id, role, text, expires_at=expires)
        return {"token": text, "id": token_id, "role": role, "expires_at": expires,
                "description": description}

    @wamp.register("zwrm.token.list")
    async def list(self):
        """The join tokens, then the operator and viewer tokens, each with its C{role}."""
        joins = [dict(t, role="join") for t in await TokenAPI.list(self)]
        rows = await self.store.select("tokens", "kind IN ('operator', 'viewer')",
                                       order_by="created_at, id")
        now = self.clock.seconds()
        roles = [{"id": r["id"], "role": r["kind"], "created_at": r.get("created_at"),
                  "expires_at": r.get("expires_at"), "revoked": r.get("revoked") or None,
                  "used": None, "description": "", "state": _state(r, now)} for r in rows]
        return joins + roles

    @wamp.register("zwrm.token.revoke")
    async def revoke(self, token_id=None):
        """Revoke a join, operator or viewer token by id (or whole text)."""
        if isinstance(token_id, str) and role_token_id(token_id.strip()):
            text = token_id.strip()
            rid = role_token_id(text)
            row = await self.store.get("tokens", rid)
            if row is None or row.get("kind") not in ROLES:
                raise errors.NotFound(f"no token with id {rid!r}")
            if "." in text and row["secret_hash"] != hash_secret(text):
                raise errors.NotFound(f"no token with id {rid!r} and that text")
            await self.store.update("tokens", rid, {"revoked": int(self.clock.seconds()) or 1})
            return None
        return await TokenAPI.revoke(self, token_id)
