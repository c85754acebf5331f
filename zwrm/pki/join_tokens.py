"""
Join tokens: what an operator gives a new host so that it may join, and how the control plane
keeps and checks them (L{zwrm.pki} gives the whole picture).

An operator creates a join token (L{JoinTokens.create}); its text carries the CA's fingerprint
(L{JoinToken}), so the joining agent can pin the CA (L{zwrm.pki.agent_tls}). The control plane
checks the token (L{JoinTokens.check}, L{check_join_token}) before it signs the agent's
certificate request.

Join token text (version 1)::

    zwrm1.<id>.<secret>.<ca-fingerprint>

  - C{id}: 6 characters C{[a-z0-9]}, public; names the token in C{zwrm tokens list|revoke}.
  - C{secret}: 32 characters C{[a-z0-9]} (about 165 bits); the control plane stores only its
    SHA-256 (L{zwrm.tokens.hash_secret}).
  - C{ca-fingerprint}: 64 lower-case hex digits, the SHA-256 of the CA certificate's DER bytes
    (what C{openssl x509 -in ca.pem -outform DER | sha256sum} prints).

The expiry is not in the text: the control plane holds it with the token's hash.
"""

from __future__ import annotations

import hmac
import re
import secrets
import string
from dataclasses import dataclass

from zwrm.errors import AuthenticationFailed, InvalidArgument, NotFound
from zwrm.pki.ca import _iso, normalize_fingerprint
from zwrm.tokens import hash_secret

TOKEN_PREFIX = "zwrm1"
DEFAULT_TOKEN_TTL = 24 * 3600

_TOKEN = re.compile(r"zwrm1\.([a-z0-9]{6})\.([a-z0-9]{32})\.([0-9a-f]{64})")
_ALPHABET = string.ascii_lowercase + string.digits


def _random(n):
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


@dataclass(frozen=True)
class JoinToken:
    """
    A join token as an agent holds it: C{zwrm1.<id>.<secret>.<ca-fingerprint>}.

    @ivar id: 6 characters, public.
    @ivar secret: 32 characters; only its hash is stored by the control plane.
    @ivar ca_fingerprint: the CA's SHA-256 fingerprint, 64 hex digits.
    @ivar expires: POSIX time after which the token is refused, or C{None} when it was parsed
        from text (the expiry is known only to the control plane).
    """

    id: str
    secret: str
    ca_fingerprint: str
    expires: float | None = None

    @classmethod
    def generate(cls, ca_fingerprint, expires):
        return cls(_random(6), _random(32), normalize_fingerprint(ca_fingerprint), expires)

    @classmethod
    def parse(cls, text):
        """
        Parse a token's text.

        @raise InvalidArgument: it is not a zwrm join token; the message never repeats the
            text (it holds a secret).
        """
        if not isinstance(text, str):
            raise InvalidArgument("a join token is a string")
        text = text.strip()
        m = _TOKEN.fullmatch(text)
        if m is None:
            parts = text.split(".")
            if parts[0] != TOKEN_PREFIX:
                why = f"it does not start with {TOKEN_PREFIX}."
            elif len(parts) != 4:
                why = f"it has {len(parts)} dot-separated parts, not 4"
            elif not re.fullmatch(r"[a-z0-9]{6}", parts[1]):
                why = "the id is not 6 characters a-z, 0-9"
            elif not re.fullmatch(r"[a-z0-9]{32}", parts[2]):
                why = "the secret is not 32 characters a-z, 0-9"
            else:
                why = "the CA fingerprint is not 64 lower-case hex digits"
            raise InvalidArgument(
                f"malformed join token: {why}; expected zwrm1.<id>.<secret>.<ca-fingerprint>"
                " as printed by `zwrm tokens create`"
            )
        return cls(m.group(1), m.group(2), m.group(3))

    def __str__(self):
        return f"{TOKEN_PREFIX}.{self.id}.{self.secret}.{self.ca_fingerprint}"

    def __repr__(self):
        return f"<JoinToken {self.id} ca={self.ca_fingerprint[:12]}...>"

    @property
    def secret_hash(self):
        return hash_secret(self.secret)


def token_state(record, now):
    """
    C{"revoked"}, C{"expired"} or C{"valid"} for a stored token record at time C{now}.

    @param record: a mapping with C{expires_at} (POSIX time) and C{revoked} (falsy, or the
        time or flag of revocation).
    """
    if record.get("revoked"):
        return "revoked"
    if now >= record["expires_at"]:
        return "expired"
    return "valid"


def check_join_token(token, record, ca_fingerprint, now):
    """
    Accept a presented join token against its stored record, or refuse it saying why.

    Independent of where tokens are stored: the control plane looks the record up by
    C{JoinToken.parse(text).id} and passes it here (or C{None} when there is none).

    @param token: the token's text or a L{JoinToken}.
    @param record: a mapping with C{secret_hash}, C{expires_at} and C{revoked}, or C{None}.
    @param ca_fingerprint: this control plane's CA fingerprint.
    @param now: POSIX time (from the injected clock).
    @raise InvalidArgument: the token is malformed.
    @raise AuthenticationFailed: unknown, wrong secret, made for another CA, expired or revoked.
    @return: the L{JoinToken}.
    """
    if not isinstance(token, JoinToken):
        token = JoinToken.parse(token)
    if record is None or not hmac.compare_digest(record["secret_hash"], token.secret_hash):
        raise AuthenticationFailed(
            f"join token {token.id} is not known to this control plane;"
            " create one with `zwrm tokens create`"
        )
    fingerprint = normalize_fingerprint(ca_fingerprint)
    if token.ca_fingerprint != fingerprint:
        raise AuthenticationFailed(
            f"join token {token.id} names CA {token.ca_fingerprint[:16]}..., not this"
            f" control plane's CA {fingerprint[:16]}..."
        )
    state = token_state(record, now)
    if state == "revoked":
        revoked = record["revoked"]
        when = (
            f" at {_iso(revoked)}"
            if isinstance(revoked, (int, float)) and not isinstance(revoked, bool) and revoked > 1
            else ""
        )
        raise AuthenticationFailed(f"join token {token.id} was revoked{when}")
    if state == "expired":
        raise AuthenticationFailed(
            f"join token {token.id} expired at {_iso(record['expires_at'])};"
            " create a new one with `zwrm tokens create`"
        )
    return token


def schema_v7(db):
    """
    The C{join_tokens} table (the store's schema version 7). A database older than that
    already has it, made the same way by L{JoinTokens} itself before the table moved into the
    store's migrations: then it is kept as it is.

    @param db: a C{sqlite_utils.Database}.
    """
    table = db[JoinTokens.table_name]
    if table.exists():
        return
    table.create(
        {
            "id": str,
            "secret_hash": str,
            "description": str,
            "created_at": float,
            "expires_at": float,
            "revoked": float,
            "used": int,
        },
        pk="id",
        not_null={"secret_hash", "created_at", "expires_at"},
        defaults={"used": 0},
    )


class JoinTokens:
    """
    The control plane's join tokens, in a table of its SQLite store (C{sqlite_utils}), made
    by the store's migrations (L{schema_v7}).

    Stores the id, the SHA-256 of the secret, creation and expiry times, a description and
    the revocation time; never the secret. Calls are short single-row queries: run them where
    the store runs its queries (e.g. its database thread).

    @param db: a C{sqlite_utils.Database}.
    @param ca_fingerprint: the current CA's fingerprint, put into every token made.
    @param clock: C{IReactorTime}; its C{seconds()} decides expiry.
    """

    table_name = "join_tokens"

    def __init__(self, db, ca_fingerprint, clock):
        self._db = db
        self._fingerprint = normalize_fingerprint(ca_fingerprint)
        self._clock = clock
        self._table = db[self.table_name]
        if not self._table.exists():
            raise RuntimeError(
                f"no {self.table_name} table: the store's migrations make it"
                " (zwrm.control.store.migrate)"
            )

    def create(self, ttl=DEFAULT_TOKEN_TTL, description=""):
        """
        Make a token valid for C{ttl} seconds.

        @return: the L{JoinToken}, whose C{str()} is shown to the operator once.
        @raise InvalidArgument: C{ttl} is not a positive number of seconds.
        """
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
            raise InvalidArgument(f"a token's ttl is a positive number of seconds, not {ttl!r}")
        now = self._clock.seconds()
        while True:
            token = JoinToken.generate(self._fingerprint, now + ttl)
            if self._table.count_where("id = ?", [token.id]) == 0:
                break
        self._table.insert(
            {
                "id": token.id,
                "secret_hash": token.secret_hash,
                "description": str(description),
                "created_at": now,
                "expires_at": now + ttl,
                "revoked": None,
                "used": 0,
            }
        )
        return token

    def list(self):
        """
        All tokens, oldest first, without secrets: dicts with C{id}, C{description},
        C{created_at}, C{expires_at}, C{revoked}, C{used} and C{state} (valid, expired or
        revoked).
        """
        now = self._clock.seconds()
        out = []
        for row in self._table.rows_where(order_by="created_at, id"):
            row = dict(row)
            del row["secret_hash"]
            row["state"] = token_state(row, now)
            out.append(row)
        return out

    def revoke(self, token_id):
        """
        Revoke a token (by id, or by its whole text); revoking a revoked token is a no-op.

        @raise NotFound: no token has this id.
        """
        token_id = token_id.split(".")[1] if token_id.startswith(TOKEN_PREFIX + ".") else token_id
        rows = list(self._table.rows_where("id = ?", [token_id]))
        if not rows:
            raise NotFound(f"no join token with id {token_id!r}")
        if rows[0]["revoked"] is None:
            self._table.update(token_id, {"revoked": self._clock.seconds()})

    def check(self, token):
        """
        Accept a joining agent's token, or refuse it with a message that says why
        (see L{check_join_token}); counts its uses.

        @return: the token's id.
        """
        if not isinstance(token, JoinToken):
            token = JoinToken.parse(token)
        rows = list(self._table.rows_where("id = ?", [token.id]))
        record = rows[0] if rows else None
        check_join_token(token, record, self._fingerprint, self._clock.seconds())
        self._table.update(token.id, {"used": record["used"] + 1})
        return token.id

    def prune(self, older_than=7 * 24 * 3600):
        """Delete tokens that expired or were revoked more than C{older_than} seconds ago."""
        limit = self._clock.seconds() - older_than
        self._table.delete_where(
            "expires_at < ? or (revoked is not null and revoked < ?)", [limit, limit]
        )
