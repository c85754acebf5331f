"""
The control plane's join tokens and CA: L{ControlPKI} (start-up, token checks) and
L{TokenAPI} (the operator's C{zwrm.token.*} procedures, see L{zwrm.cli.tokens}).

Join tokens are L{zwrm.pki.JoinToken}s (C{zwrm1.<id>.<secret>.<ca-fingerprint>}), kept hashed
with their expiry in the store's C{join_tokens} table (L{zwrm.pki.JoinTokens}). All token
queries run on the store's thread.
"""

import datetime
import os
import socket

from autobahn import wamp
from twisted.logger import Logger

from zwrm import errors, pki

STARTUP_TOKEN_TTL = pki.DEFAULT_TOKEN_TTL
"""Validity of the join token the control plane writes to C{join.token} when it has none."""

MAX_TOKEN_TTL = 365 * 24 * 3600.0

RESETS_TABLE = "host_resets"
"""Hosts an operator reset (C{zwrm host reset}): each may join again once, until it expires."""


def rejoin_forgetting(host_id):
    """
    The change that deletes C{host_id}'s permission to join again (L{ControlPKI.allow_rejoin}),
    if it has one: it goes with the host's removal, stored in the same transaction
    (L{zwrm.control.host_removal}).
    """
    return lambda db: db.execute(f"DELETE FROM {RESETS_TABLE} WHERE host_id = ?", [host_id])


RESET_TTL = 3600.0
"""How long a host reset lets the host join again."""


def server_names(listen=()):
    """
    The names the control plane's server certificate is issued for: loopback, this host's
    names and every explicit listener interface.
    """
    names = ["localhost", "127.0.0.1", "::1"]
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in names:
            names.append(name)
    for description in listen:
        for part in description.split(":"):
            if part.startswith("interface="):
                iface = part[len("interface="):].strip("[]")
                if iface and iface not in ("0.0.0.0", "::") and iface not in names:
                    names.append(iface)
    return names


def _existing_names(pki_dir):
    """DNS names and addresses of the server certificate already in C{pki_dir}, if any."""
    from cryptography import x509

    try:
        with open(os.path.join(pki_dir, "server.pem"), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    ]


class ControlPKI:
    """
    The control plane's CA, server certificate and join tokens.

    @ivar ca: the L{pki.CertificateAuthority}.
    @ivar fingerprint: the CA's SHA-256 fingerprint.
    @ivar names: the names the server certificate is issued for.
    """

    log = Logger()

    def __init__(self, reactor, store, data_dir, listen=(),
                 host_lifetime=pki.HOST_LIFETIME.total_seconds()):
        """
        @param reactor: the reactor (its C{seconds()} decides expiry).
        @param store: the started L{zwrm.control.store.Store}.
        @param data_dir: the control plane's data directory (the CA goes to C{pki/}).
        @param listen: the listener descriptions (their interfaces go into the certificate).
        @param host_lifetime: seconds for which the host certificates it signs are valid
            (agents renew theirs when a third is left, L{pki.renewal_time}).
        """
        self.host_lifetime = datetime.timedelta(seconds=host_lifetime)
        self.reactor = reactor
        self.store = store
        self.directory = os.path.join(data_dir, pki.CONTROL_PKI_DIR)
        self._listen = list(listen)
        self.ca = None
        self.fingerprint = None
        self.names = None
        self.server_expires_at = None  # POSIX time the server certificate expires
        self._tokens = None

    async def start(self):
        """
        Load or create the CA and the server certificate (on the store's thread: a few small
        files), and open the token table.
        """
        created = not os.path.exists(os.path.join(self.directory, "ca.pem"))

        def load(db):
            ca = pki.CertificateAuthority.load_or_create(self.directory, self.reactor)
            names = server_names(self._listen)
            for n in _existing_names(self.directory):
                if n not in names:
                    names.append(n)
            cert_pem, _key = ca.server_credentials(names)
            tokens = pki.JoinTokens(db, ca.fingerprint, self.reactor)
            tokens.prune()  # expired or revoked for more than a week
            return ca, names, tokens, cert_pem

        self.ca, self.names, self._tokens, cert_pem = await self.store.run(load)
        self.server_expires_at = pki.expiry_time(cert_pem)
        self.fingerprint = self.ca.fingerprint
        self.log.info(
            "{what} the cluster CA in {dir}; CA fingerprint sha256:{fp}",
            what="created" if created else "loaded",
            dir=self.directory,
            fp=self.fingerprint,
        )

    def server_context(self):
        """TLS options for C{ssl:} listeners without certificate files of their own."""
        return self.ca.server_context(self.names)

    async def renew_server_certificate(self):
        """
        Reissue the server certificate if less than 30 days are left (on the store's thread:
        a key and two small files), as a start does; a control plane that runs for a year
        calls this every few hours (L{zwrm.control.service.ControlPlane}).

        @return: the new C{(cert_pem, key_pem)}, or L{None} if the one there is kept.
        """
        path = os.path.join(self.directory, "server.pem")

        def renew(db):
            before = _read_or_none(path)
            cert_pem, key_pem = self.ca.server_credentials(self.names)
            return None if cert_pem == before else (cert_pem, key_pem)

        renewed = await self.store.run(renew)
        if renewed is not None:
            self.server_expires_at = pki.expiry_time(renewed[0])
        return renewed

    # -- tokens -------------------------------------------------------------------------

    async def ensure_join_token(self, path, ttl=STARTUP_TOKEN_TTL):
        """
        Keep a valid join token in the file C{path} (mode 0600) for the local tools: the one
        there if it is still valid for this CA, else a new one.

        @return: the token's id.
        """
        text = None
        if os.path.exists(path):
            with open(path) as f:
                text = f.read().strip()
        if text and text.startswith(pki.TOKEN_PREFIX + "."):
            try:
                token = pki.JoinToken.parse(text)

                def check(db):
                    rows = list(db[pki.JoinTokens.table_name].rows_where("id = ?", [token.id]))
                    pki.check_join_token(
                        token, rows[0] if rows else None, self.fingerprint, self.reactor.seconds()
                    )

                await self.store.run(check)
                return token.id
            except (errors.InvalidArgument, errors.AuthenticationFailed) as e:
                self.log.info("the join token in {path} is no longer valid ({why}); making a new one",
                              path=path, why=e.message)
        token = await self.store.run(
            lambda db: self._tokens.create(ttl, "written to join.token at start-up"))
        _write_private(path, str(token) + "\n")
        self.log.info("created join token {id} in {path} (valid {h:.0f}h)", id=token.id, path=path,
                      h=ttl / 3600)
        return token.id

    def check(self, text):
        """
        Accept a join token, or fail with L{errors.AuthenticationFailed} /
        L{errors.InvalidArgument} saying why (unknown, expired, revoked, other CA, malformed).

        @return: a Deferred firing with the token's id.
        """
        return self.store.run(lambda db: self._tokens.check(text))

    def create(self, ttl, description):
        return self.store.run(lambda db: self._tokens.create(ttl, description))

    def list(self):
        return self.store.run(lambda db: self._tokens.list())

    def revoke(self, token_id):
        return self.store.run(lambda db: self._tokens.revoke(token_id))

    # -- host resets ------------------------------------------------------------------

    def allow_rejoin(self, host_id, ttl=RESET_TTL):
        """
        Let the next C{zwrm.agent.join} for the existing host C{host_id} in the coming
        C{ttl} seconds through without that host's credential (C{zwrm host reset}).

        @return: a Deferred firing with the time the permission expires.
        """
        expires = self.reactor.seconds() + ttl

        def allow(db):
            db[RESETS_TABLE].upsert({"host_id": host_id, "expires_at": expires}, pk="host_id")
            return expires

        return self.store.run(allow)

    def take_rejoin(self, host_id):
        """
        Use up the permission L{allow_rejoin} gave C{host_id}, if it has one still valid.

        @return: a Deferred firing with L{True} if it had one.
        """
        now = self.reactor.seconds()

        def take(db):
            rows = list(db[RESETS_TABLE].rows_where("host_id = ?", [host_id]))
            if not rows:
                return False
            db[RESETS_TABLE].delete(host_id)
            return rows[0]["expires_at"] > now

        return self.store.run(take)

    def sign(self, csr_pem, host_id):
        """
        Sign a joining agent's certificate request for C{host_id}.

        @return: C{{"certificate": <PEM str>, "ca": <PEM str>}}.
        @raise errors.InvalidArgument: a malformed request or one for another host.
        """
        cert = self.ca.sign_host_request(csr_pem, host_id, lifetime=self.host_lifetime)
        return {"certificate": cert.decode("ascii"), "ca": self.ca.certificate_pem.decode("ascii")}


def schema_host_resets(db):
    """
    The C{host_resets} table (a store migration, L{zwrm.control.store}). A database older
    than that already has it, made the same way by L{ControlPKI.start} before the table
    moved into the store's migrations: then it is kept as it is.

    @param db: a C{sqlite_utils.Database}.
    """
    if not db[RESETS_TABLE].exists():
        db[RESETS_TABLE].create({"host_id": str, "expires_at": float}, pk="host_id")


def _read_or_none(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _write_private(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


class TokenAPI:
    """The operator's C{zwrm.token.*} procedures."""

    def __init__(self, control_pki):
        """
        @param control_pki: the started L{ControlPKI}.
        """
        self.pki = control_pki

    @wamp.register("zwrm.token.create")
    async def create(self, ttl=pki.DEFAULT_TOKEN_TTL, description=""):
        """
        Make a join token valid for C{ttl} seconds.

        @return: C{{"token": <text, shown once>, "id", "expires_at"}}.
        """
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TOKEN_TTL:
            raise errors.InvalidArgument(
                f"a token's ttl is a number of seconds between 1 and {MAX_TOKEN_TTL:.0f}, not {ttl!r}")
        if not isinstance(description, str) or len(description) > 200:
            raise errors.InvalidArgument("a token's description is a string of at most 200 characters")
        token = await self.pki.create(ttl, description)
        return {"token": str(token), "id": token.id, "expires_at": token.expires}

    @wamp.register("zwrm.token.list")
    async def list(self):
        """Every join token without its secret (see L{pki.JoinTokens.list})."""
        return await self.pki.list()

    @wamp.register("zwrm.token.revoke")
    async def revoke(self, token_id=None):
        """Revoke a join token by id; C{zwrm.error.not_found} for an unknown one."""
        if not isinstance(token_id, str) or not token_id.strip():
            raise errors.InvalidArgument("zwrm.token.revoke needs a token id")
        await self.pki.revoke(token_id.strip())
