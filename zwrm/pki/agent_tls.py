"""
The agent's side of zwrm's PKI: TLS that trusts exactly one CA, named by its fingerprint
(L{zwrm.pki} gives the whole picture).

  - A joining agent connects with L{pinned_client_context}: the handshake is refused
    (L{CertificateRejected}) unless the server's certificate is signed by the CA whose SHA-256
    fingerprint the join token names, so the agent verifies the control plane before it sends
    anything (as C{kubeadm join --discovery-token-ca-cert-hash} does).
  - Agents keep their credentials in L{HostCredentials}, which builds the contexts for the
    control-plane connection (client certificate) and for volume transfers between agents
    (both sides present host certificates from the same CA and check each other's host id).
  - L{agent_client_options} picks the trust an agent has (credentials, a saved CA, a join
    token); L{save_ca} keeps the CA a joining agent verified.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from zwrm.errors import AuthenticationFailed, InvalidArgument
from zwrm.pki.ca import (
    RenewableServerOptions,
    _as_cryptography,
    _cert_pem,
    _ensure_directory,
    _load_pair,
    _read,
    _signed_by,
    _write_private,
    check_host_certificate,
    fingerprint_of,
    host_id_of,
    normalize_fingerprint,
)
from zwrm.pki.join_tokens import TOKEN_PREFIX, JoinToken


class CertificateRejected(SSL.Error):
    """
    The peer's certificate was refused during the TLS handshake.

    Raised inside the handshake so that Twisted ends the connection with it: a client's
    C{connectionLost} (and the failed C{connect()} of an endpoint-based client) gets this
    exception, whose message says what was wrong. Nothing was sent to the peer.
    """

    def __init__(self, message):
        # SSL.Error's argument is OpenSSL's error queue: (library, function, reason) tuples;
        # Twisted's TLS code reads it, so keep that shape.
        SSL.Error.__init__(self, [("zwrm", "certificate verification", message)])

    @property
    def message(self):
        return self.args[0][-1][2]

    def __str__(self):
        return self.message


@implementer(IOpenSSLClientConnectionCreator)
class PinnedClientTLSOptions:
    """
    Client TLS options that trust exactly one CA, named by its SHA-256 fingerprint.

    The server must send its CA certificate in the handshake (zwrm's servers do). The
    handshake is refused with L{CertificateRejected}, before any application data is sent,
    unless:
      - every certificate above the server's own is the pinned CA (by fingerprint);
      - the server's certificate is signed by it and within its validity period;
      - it is issued for C{hostname} (DNS name or IP address), or, with C{expected_host_id},
        is a zwrm host certificate for that host id.

    Usable wherever Twisted takes client TLS options: C{wrapClientTLS}, C{SSL4ClientEndpoint},
    C{connectSSL}, and so autobahn's WebSocket client (which takes an endpoint).

    @ivar verified_ca_pem: after a successful handshake, the CA certificate the server sent
        (PEM); an agent that joined with only a fingerprint saves it.
    """

    def __init__(
        self,
        hostname,
        fingerprint,
        client_certificate=None,
        ca_certificate=None,
        expected_host_id=None,
    ):
        self._hostname = hostname
        self._fingerprint = normalize_fingerprint(fingerprint)
        self._expected_host_id = expected_host_id
        self.verified_ca_pem = None
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_COMPRESSION)
        if ca_certificate is not None:
            ca = _as_cryptography(ca_certificate)
            if fingerprint_of(ca) != self._fingerprint:
                raise InvalidArgument("the CA certificate does not have the pinned fingerprint")
            ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(ca))
        if client_certificate is not None:
            cert_pem, key_pem = client_certificate
            cert, key = _load_pair(cert_pem, key_pem)
            ctx.use_certificate(cert)
            ctx.use_privatekey(key)
            ctx.check_privatekey()
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        self._context = ctx
        try:
            ipaddress.ip_address(hostname)
            self._sni = None
        except ValueError:
            self._sni = hostname.encode("idna")

    def _verify(self, connection, cert, errno, depth, ok):
        # Called for each certificate of the chain OpenSSL built, the top first. Raising
        # aborts the handshake; pyOpenSSL re-raises the exception from do_handshake, and
        # Twisted reports it (an SSL.Error) to the protocol as the reason of the loss.
        c = cert.to_cryptography()
        if depth > 0:
            got = fingerprint_of(c)
            if got != self._fingerprint:
                raise CertificateRejected(
                    f"the server's CA has fingerprint {got}, not the expected {self._fingerprint}"
                    " (from the join token): refusing to talk to it"
                )
            self.verified_ca_pem = _cert_pem(c)
            return True
        if not ok:
            raise CertificateRejected(_leaf_error(errno, self._fingerprint))
        if self._expected_host_id is not None:
            try:
                check_host_certificate(c, self._expected_host_id)
            except AuthenticationFailed as e:
                raise CertificateRejected(e.message) from None
        else:
            _check_name(c, self._hostname)
        return True

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection


def _leaf_error(errno, fingerprint):
    known = {
        2: "the server did not send its CA certificate",
        10: "the server's certificate has expired",
        9: "the server's certificate is not valid yet",
        7: "the server's certificate is not signed by the CA with the expected fingerprint",
        20: "the server's certificate is not signed by the CA with the expected fingerprint"
        " (or the server did not send its CA certificate)",
        21: "the server's certificate is not signed by the CA with the expected fingerprint"
        " (or the server did not send its CA certificate)",
        18: "the server's certificate is self-signed, not signed by the CA with the expected"
        f" fingerprint {fingerprint}",
    }
    return known.get(errno, f"the server's certificate was refused (OpenSSL verify error {errno})")


def _check_name(cert, hostname):
    try:
        try:
            ip = ipaddress.ip_address(hostname)
        except ValueError:
            verify_certificate_hostname(cert, hostname)
        else:
            verify_certificate_ip_address(cert, str(ip))
    except (VerificationError, CertificateError):
        raise CertificateRejected(
            f"the server's certificate is not issued for {hostname!r}"
        ) from None


def pinned_client_context(
    hostname,
    fingerprint,
    client_certificate=None,
    ca_certificate=None,
    expected_host_id=None,
):
    """
    Client TLS options that trust only the CA with the given SHA-256 fingerprint.

    See L{PinnedClientTLSOptions}. A joining agent passes the fingerprint from its join token;
    an agent that has joined also passes its host certificate and the saved CA certificate.

    @param hostname: the name or address the client connects to.
    @param fingerprint: the CA's fingerprint (hex, optionally with colons or C{sha256:}).
    @param client_certificate: optional C{(cert_pem, key_pem)} to present.
    @param expected_host_id: check that the server holds this zwrm host's certificate instead
        of checking C{hostname} (volume transfers between agents).
    """
    return PinnedClientTLSOptions(
        hostname,
        fingerprint,
        client_certificate=client_certificate,
        ca_certificate=ca_certificate,
        expected_host_id=expected_host_id,
    )


@dataclass
class HostCredentials:
    """
    An agent's TLS identity: the cluster CA certificate, its host certificate and key.

    Kept in the agent's data directory as C{ca.pem}, C{host.pem} and C{host.key} (0600).
    """

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def __post_init__(self):
        cert = _as_cryptography(self.cert_pem)
        ca = _as_cryptography(self.ca_pem)
        if not _signed_by(cert, ca):
            raise InvalidArgument("the host certificate is not signed by the cluster CA")
        self.host_id = host_id_of(cert)
        if self.host_id is None:
            raise InvalidArgument("the certificate is not a zwrm host certificate")
        self.fingerprint = fingerprint_of(ca)
        self.not_valid_after = cert.not_valid_after_utc

    def save(self, directory):
        """Write the three files to C{directory} (mode 0700), keys 0600."""
        _ensure_directory(directory)
        _write_private(os.path.join(directory, "host.key"), self.key_pem)
        _write_private(os.path.join(directory, "host.pem"), self.cert_pem)
        _write_private(os.path.join(directory, "ca.pem"), self.ca_pem)

    def save_renewed(self, directory):
        """
        Put this renewed host certificate and key (from the same CA) in place of those in
        C{directory}, so that a crash at any point leaves a pair that belongs together:
        both are written as C{.next} files first, then moved in, the key first; L{load}
        finishes a move that a crash cut short.

        @raise InvalidArgument: the key does not belong to the certificate.
        """
        _load_pair(self.cert_pem, self.key_pem)
        key, cert = (os.path.join(directory, n) for n in ("host.key", "host.pem"))
        _write_private(key + NEXT, self.key_pem)
        _write_private(cert + NEXT, self.cert_pem)
        _fsync_directory(directory)
        os.replace(key + NEXT, key)
        os.replace(cert + NEXT, cert)
        _fsync_directory(directory)

    @classmethod
    def load(cls, directory):
        """
        Load the credentials saved in C{directory}, or return C{None} if there are none yet.

        @raise InvalidArgument: they are there but unusable.
        """
        paths = [os.path.join(directory, n) for n in ("ca.pem", "host.pem", "host.key")]
        _finish_renewal(directory)
        if not any(os.path.exists(p) for p in paths[1:]):
            return None  # not joined yet (a ca.pem alone is the CA an agent has pinned)
        try:
            return cls(*(_read(p) for p in paths))
        except OSError as e:
            raise InvalidArgument(
                f"cannot load the host credentials from {directory}: {e}"
            ) from None

    def control_client_context(self, hostname):
        """Options for connecting to the control plane, presenting the host certificate."""
        return pinned_client_context(
            hostname,
            self.fingerprint,
            client_certificate=(self.cert_pem, self.key_pem),
            ca_certificate=self.ca_pem,
        )

    def peer_client_context(self, expected_host_id, hostname=None):
        """
        Options for connecting to another agent's volume endpoint: the server must hold the
        host certificate of C{expected_host_id}; this agent presents its own.
        """
        return pinned_client_context(
            hostname or expected_host_id,
            self.fingerprint,
            client_certificate=(self.cert_pem, self.key_pem),
            ca_certificate=self.ca_pem,
            expected_host_id=expected_host_id,
        )

    def server_context(self):
        """
        Options for this agent's volume endpoint: present the host certificate and require a
        client certificate from the same CA. After the handshake, call
        L{host_id_of}C{(transport.getPeerCertificate())} to learn (and check) who connected.
        """
        return RenewableServerOptions(self.cert_pem, self.key_pem, self.ca_pem, True)


NEXT = ".next"
"""The suffix of a renewed host certificate and key on their way in (L{HostCredentials.save_renewed})."""


def _finish_renewal(directory):
    """Finish (or drop, if it had not got that far) a renewal a crash cut short."""
    key, cert = (os.path.join(directory, n) for n in ("host.key", "host.pem"))
    try:
        if os.path.exists(cert + NEXT):  # both written: move in what is left to move
            if os.path.exists(key + NEXT):
                os.replace(key + NEXT, key)
            os.replace(cert + NEXT, cert)
        elif os.path.exists(key + NEXT):  # the certificate never was: the old pair stands
            os.remove(key + NEXT)
    except OSError as e:
        raise InvalidArgument(f"cannot finish renewing the host certificate in {directory}: {e}") \
            from None


def _fsync_directory(directory):
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


AGENT_TLS_DIR = "tls"
"""Where an agent keeps its TLS files, under its data directory: C{ca.pem}, C{host.pem},
C{host.key}."""


def save_ca(directory, ca_pem, expected_fingerprint):
    """
    Keep the CA certificate an agent verified (e.g. C{PinnedClientTLSOptions.verified_ca_pem})
    in C{directory}/C{ca.pem} (mode 0600), after checking it has the expected fingerprint.

    @raise InvalidArgument: it does not.
    """
    if fingerprint_of(ca_pem) != normalize_fingerprint(expected_fingerprint):
        raise InvalidArgument("the CA certificate does not have the expected fingerprint")
    _ensure_directory(directory)
    _write_private(os.path.join(directory, "ca.pem"), _cert_pem(_as_cryptography(ca_pem)))


def agent_client_options(hostname, directory, join_token=None):
    """
    The TLS options an agent uses to reach the control plane at C{hostname}, from what it has:

      1. host credentials in C{directory} (L{HostCredentials.load}): present the host
         certificate and trust only the saved CA;
      2. else a saved CA certificate (C{directory}/C{ca.pem}, see L{save_ca}): trust only it;
      3. else a join token in zwrm1 form: trust only the CA whose fingerprint it carries (after
         a successful handshake the options' C{verified_ca_pem} holds the CA certificate: keep
         it with L{save_ca});
      4. else C{None}: the caller decides (a configured CA file, or the platform's trust).

    @param directory: the agent's TLS directory (C{<data_dir>/}L{AGENT_TLS_DIR}).
    @param join_token: the configured join token text, if any.
    @raise InvalidArgument: saved files are unusable, or the token is a malformed zwrm1 token.
    """
    credentials = HostCredentials.load(directory)
    if credentials is not None:
        return credentials.control_client_context(hostname)
    ca_path = os.path.join(directory, "ca.pem")
    if os.path.exists(ca_path):
        try:
            ca_pem = _read(ca_path)
        except OSError as e:
            raise InvalidArgument(f"cannot read {ca_path}: {e.strerror}") from None
        return pinned_client_context(hostname, fingerprint_of(ca_pem), ca_certificate=ca_pem)
    if join_token and join_token.strip().startswith(TOKEN_PREFIX + "."):
        token = JoinToken.parse(join_token)
        return pinned_client_context(hostname, token.ca_fingerprint)
    return None
