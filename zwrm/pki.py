"""
zwrm's public-key infrastructure: the cluster CA, server and host certificates, and join tokens.

Every connection between hosts is TLS from the first byte:

  - On first start the control plane creates a certificate authority in its data directory
    (L{CertificateAuthority.load_or_create}) and a server certificate signed by it. Its TLS
    listeners use L{CertificateAuthority.server_context}, which sends the CA certificate along
    with the server certificate, so that a client can see which CA signed the server.
  - An operator creates a join token (L{JoinTokens.create}); its text carries the CA's
    fingerprint (L{JoinToken}). A joining agent connects with L{pinned_client_context}: the
    handshake is refused unless the server's certificate is signed by the CA whose SHA-256
    fingerprint the token names, so the agent verifies the control plane before it sends
    anything (as C{kubeadm join --discovery-token-ca-cert-hash} does).
  - The agent makes a key and a certificate request for its host id (L{make_host_request}); the
    control plane checks the token (L{JoinTokens.check}) and signs the request
    (L{CertificateAuthority.sign_host_request}). The certificate names the host id as SAN URI
    C{zwrm:host:<id>}; L{host_id_of} reads it back from a peer certificate, and
    L{check_host_certificate} refuses a certificate for another host id.
  - Agents keep their credentials in L{HostCredentials}, which builds the contexts for the
    control-plane connection (client certificate) and for volume transfers between agents
    (both sides present host certificates from the same CA and check each other's host id).

Keys are EC P-256. Private keys are written with mode 0600 in directories of mode 0700.

Join token text (version 1)::

    zwrm1.<id>.<secret>.<ca-fingerprint>

  - C{id}: 6 characters C{[a-z0-9]}, public; names the token in C{zwrm tokens list|revoke}.
  - C{secret}: 32 characters C{[a-z0-9]} (about 165 bits); the control plane stores only its
    SHA-256 (L{hash_secret}).
  - C{ca-fingerprint}: 64 lower-case hex digits, the SHA-256 of the CA certificate's DER bytes
    (what C{openssl x509 -in ca.pem -outform DER | sha256sum} prints).

The expiry is not in the text: the control plane holds it with the token's hash.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import os
import re
import secrets
import string
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from zwrm.errors import AuthenticationFailed, InvalidArgument, NotFound
from zwrm.tokens import hash_secret

__all__ = [
    "CertificateAuthority",
    "CertificateRejected",
    "HostCredentials",
    "JoinToken",
    "JoinTokens",
    "PinnedClientTLSOptions",
    "agent_client_options",
    "check_host_certificate",
    "check_join_token",
    "check_plain_url",
    "fingerprint_of",
    "hash_secret",
    "host_id_of",
    "is_loopback_host",
    "make_host_request",
    "pinned_client_context",
    "save_ca",
    "token_state",
    "websocket_endpoint",
    "server_options",
]

HOST_URI_PREFIX = "zwrm:host:"
TOKEN_PREFIX = "zwrm1"
CA_LIFETIME = datetime.timedelta(days=3650)
SERVER_LIFETIME = datetime.timedelta(days=365)
HOST_LIFETIME = datetime.timedelta(days=365)
RENEW_BEFORE = datetime.timedelta(days=30)
CLOCK_SKEW = datetime.timedelta(minutes=5)
DEFAULT_TOKEN_TTL = 24 * 3600

_HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_TOKEN = re.compile(r"zwrm1\.([a-z0-9]{6})\.([a-z0-9]{32})\.([0-9a-f]{64})")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_ALPHABET = string.ascii_lowercase + string.digits


class _WallClock:
    """The system's time, for callers that pass no clock."""

    def seconds(self):
        return time.time()


def _now(clock):
    return datetime.datetime.fromtimestamp(clock.seconds(), tz=datetime.UTC)


def _iso(seconds):
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).strftime(
        "%Y-%m-%d %H:%M:%S UTC"
    )


def check_host_id(host_id):
    """
    Check that C{host_id} can name a host (and be part of a WAMP URI).

    @raise InvalidArgument: it cannot.
    """
    if not isinstance(host_id, str) or not _HOST_ID.fullmatch(host_id):
        raise InvalidArgument(
            f"invalid host id {host_id!r}: use 1 to 63 letters, digits, '-' or '_',"
            " starting with a letter or digit"
        )
    return host_id


# --- files -----------------------------------------------------------------------------


def _write_private(path, data):
    """
    Write C{data} to C{path} atomically with mode 0600.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _ensure_directory(directory):
    os.makedirs(directory, mode=0o700, exist_ok=True)


# --- certificates ----------------------------------------------------------------------


def _as_cryptography(certificate):
    """
    Accept a certificate in any of the forms Twisted and pyOpenSSL hand out, or PEM bytes.
    """
    if isinstance(certificate, x509.Certificate):
        return certificate
    if isinstance(certificate, ssl.Certificate):
        return certificate.original.to_cryptography()
    if isinstance(certificate, crypto.X509):
        return certificate.to_cryptography()
    if isinstance(certificate, str):
        certificate = certificate.encode("ascii")
    if isinstance(certificate, bytes):
        try:
            return x509.load_pem_x509_certificate(certificate)
        except ValueError as e:
            raise InvalidArgument(f"not a PEM certificate: {e}") from None
    raise TypeError(f"not a certificate: {certificate!r}")


def fingerprint_of(certificate):
    """
    The SHA-256 fingerprint of a certificate's DER bytes, as 64 lower-case hex digits.
    """
    return _as_cryptography(certificate).fingerprint(hashes.SHA256()).hex()


def normalize_fingerprint(text):
    """
    Accept C{sha256:AB:CD...}, C{AB:CD:...} or plain hex; return 64 lower-case hex digits.

    @raise InvalidArgument: it is not a SHA-256 fingerprint.
    """
    value = str(text).strip().lower()
    if value.startswith("sha256:"):
        value = value[len("sha256:") :]
    value = value.replace(":", "")
    if not _FINGERPRINT.fullmatch(value):
        raise InvalidArgument(
            "a CA fingerprint is the SHA-256 of the CA certificate: 64 hex digits"
        )
    return value


def host_id_of(certificate):
    """
    The zwrm host id a certificate was issued for, or C{None} if it names none.

    Only meaningful for a certificate whose chain was verified against the cluster CA (the TLS
    contexts of this module do that before any application data flows).

    @param certificate: a C{twisted.internet.ssl.Certificate}, C{OpenSSL.crypto.X509},
        C{cryptography} certificate or PEM bytes (e.g. C{transport.getPeerCertificate()}).
    """
    if certificate is None:
        return None
    cert = _as_cryptography(certificate)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    ids = [
        uri[len(HOST_URI_PREFIX) :]
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith(HOST_URI_PREFIX)
    ]
    if len(ids) != 1 or not _HOST_ID.fullmatch(ids[0]):
        return None
    return ids[0]


def check_host_certificate(certificate, expected_host_id):
    """
    Refuse a peer certificate that was not issued for C{expected_host_id}.

    @raise AuthenticationFailed: with a message naming both host ids.
    """
    actual = host_id_of(certificate)
    if actual is None:
        raise AuthenticationFailed(
            f"the peer presented no zwrm host certificate (expected one for host {expected_host_id!r})"
        )
    if actual != expected_host_id:
        raise AuthenticationFailed(
            f"the peer's certificate is for host {actual!r}, not for host {expected_host_id!r}"
        )
    return actual


def _new_key():
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def _split_names(names):
    dns, ips = [], []
    for name in names:
        try:
            ips.append(ipaddress.ip_address(name))
        except ValueError:
            dns.append(name)
    return dns, ips


def _load_pair(cert_pem, key_pem):
    """
    Load a certificate and its key (as C{cryptography} objects, which pyOpenSSL's contexts
    take directly); refuse a key that does not belong to the certificate.
    """
    try:
        cert = _as_cryptography(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"unusable certificate or key: {e}") from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise InvalidArgument("the private key does not belong to the certificate")
    return cert, key


class CertificateAuthority:
    """
    The cluster's certificate authority, kept in a directory of the control plane.

    Files in that directory: C{ca.pem}, C{ca.key} (the CA), C{server.pem}, C{server.key} (the
    control plane's own TLS certificate, reissued when its names change or it nears expiry).
    Keys are mode 0600.

    @ivar certificate: the CA certificate (C{cryptography.x509.Certificate}).
    @ivar certificate_pem: the same, PEM-encoded.
    @ivar fingerprint: SHA-256 of the CA certificate's DER bytes, 64 lower-case hex digits.
    """

    def __init__(self, certificate, key, directory=None, clock=None):
        self.certificate = certificate
        self._key = key
        self.directory = directory
        self._clock = clock or _WallClock()
        self.certificate_pem = _cert_pem(certificate)
        self.fingerprint = fingerprint_of(certificate)

    @classmethod
    def create(cls, directory=None, clock=None, name="zwrm cluster CA"):
        """
        Make a new CA (and write it to C{directory} if one is given).
        """
        clock = clock or _WallClock()
        key = _new_key()
        now = _now(clock)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "zwrm"),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        ca = cls(cert, key, directory, clock)
        if directory is not None:
            _ensure_directory(directory)
            _write_private(os.path.join(directory, "ca.key"), _key_pem(key))
            _write_private(os.path.join(directory, "ca.pem"), _cert_pem(cert))
        return ca

    @classmethod
    def load(cls, directory, clock=None):
        """
        Load the CA from C{directory}.

        @raise InvalidArgument: the files are missing, unreadable or do not belong together.
        """
        try:
            cert = x509.load_pem_x509_certificate(_read(os.path.join(directory, "ca.pem")))
            key = serialization.load_pem_private_key(
                _read(os.path.join(directory, "ca.key")), password=None
            )
        except (OSError, ValueError) as e:
            raise InvalidArgument(f"cannot load the CA from {directory}: {e}") from None
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise InvalidArgument(f"{directory}/ca.key is not the key of {directory}/ca.pem")
        return cls(cert, key, directory, clock)

    @classmethod
    def load_or_create(cls, directory, clock=None):
        """
        Load the CA from C{directory}, creating it (and the directory, mode 0700) on first start.

        Reads or writes a few small files: call it while starting up (C{makeService} or
        C{startService}), not on a hot path.
        """
        if os.path.exists(os.path.join(directory, "ca.pem")) or os.path.exists(
            os.path.join(directory, "ca.key")
        ):
            return cls.load(directory, clock)
        return cls.create(directory, clock)

    # -- issuing ---------------------------------------------------------------------

    def _issue(self, public_key, subject_cn, san, lifetime, usages):
        now = _now(self._clock)
        not_after = min(now + lifetime, self.certificate.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        return _cert_pem(builder.sign(self._key, hashes.SHA256()))

    def issue_server(self, names, lifetime=SERVER_LIFETIME):
        """
        Issue a server certificate for the given DNS names and IP addresses.

        @param names: e.g. C{["cp.example.com", "127.0.0.1"]}; at least one.
        @return: C{(cert_pem, key_pem)}, both C{bytes}.
        """
        names = list(names)
        if not names:
            raise InvalidArgument("a server certificate needs at least one name or address")
        dns, ips = _split_names(names)
        san = [x509.DNSName(n) for n in dns] + [x509.IPAddress(i) for i in ips]
        key = _new_key()
        cert = self._issue(
            key.public_key(),
            names[0],
            san,
            lifetime,
            [ExtendedKeyUsageOID.SERVER_AUTH],
        )
        return cert, _key_pem(key)

    def _host_san(self, host_id, names):
        dns, ips = _split_names(names or ())
        return (
            [x509.UniformResourceIdentifier(HOST_URI_PREFIX + host_id)]
            + [x509.DNSName(n) for n in dns]
            + [x509.IPAddress(i) for i in ips]
        )

    def issue_host(self, host_id, names=(), lifetime=HOST_LIFETIME):
        """
        Issue a certificate (and make its key) for the agent of host C{host_id}.

        The certificate's CN is the host id and its SAN holds the URI C{zwrm:host:<id>}
        (plus C{names}, for the agent's volume endpoint); it is valid for client and server use.

        @return: C{(cert_pem, key_pem)}.
        """
        check_host_id(host_id)
        key = _new_key()
        cert = self._issue(
            key.public_key(),
            host_id,
            self._host_san(host_id, names),
            lifetime,
            [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
        )
        return cert, _key_pem(key)

    def sign_host_request(self, csr_pem, host_id, names=(), lifetime=HOST_LIFETIME):
        """
        Sign an agent's certificate request (from L{make_host_request}) for C{host_id}.

        Only the request's public key is used; the host id is the one the control plane
        decided, and the request must name the same one.

        @raise InvalidArgument: the request is malformed, badly signed or names another host.
        @return: the certificate, PEM C{bytes}.
        """
        check_host_id(host_id)
        if isinstance(csr_pem, str):
            csr_pem = csr_pem.encode("ascii")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except (ValueError, TypeError) as e:
            raise InvalidArgument(f"not a PEM certificate request: {e}") from None
        if not csr.is_signature_valid:
            raise InvalidArgument("the certificate request's signature is not valid")
        cns = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cns != [host_id]:
            raise InvalidArgument(
                f"the certificate request is for {cns[0] if cns else 'no host'!r},"
                f" not for host {host_id!r}"
            )
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise InvalidArgument("the certificate request must use an EC P-256 key")
        return self._issue(
            public_key,
            host_id,
            self._host_san(host_id, names),
            lifetime,
            [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
        )

    def server_credentials(self, names):
        """
        The control plane's server certificate for C{names}, from the CA directory.

        Issued on first use; reissued when the names change or less than 30 days are left.

        @return: C{(cert_pem, key_pem)}.
        """
        names = list(names)
        if self.directory is None:
            return self.issue_server(names)
        cert_path = os.path.join(self.directory, "server.pem")
        key_path = os.path.join(self.directory, "server.key")
        try:
            cert_pem, key_pem = _read(cert_path), _read(key_path)
            cert = x509.load_pem_x509_certificate(cert_pem)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have = {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
                str(v) for v in san.get_values_for_type(x509.IPAddress)
            }
            fresh = cert.not_valid_after_utc - _now(self._clock) > RENEW_BEFORE
            ours = cert.issuer == self.certificate.subject and _signed_by(cert, self.certificate)
            if fresh and ours and have == {str(n) for n in _canonical(names)}:
                return cert_pem, key_pem
        except (OSError, ValueError, x509.ExtensionNotFound):
            pass
        cert_pem, key_pem = self.issue_server(names)
        _write_private(key_path, key_pem)
        _write_private(cert_path, cert_pem)
        return cert_pem, key_pem

    # -- TLS contexts ----------------------------------------------------------------

    def trust_root(self):
        """A Twisted trust root that trusts this CA only."""
        return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(self.certificate_pem)])

    def server_context(
        self, names=("localhost", "127.0.0.1", "::1"), require_client_certificate=False
    ):
        """
        TLS options for the control plane's listeners (C{SSL4ServerEndpoint},
        C{TLSMemoryBIOFactory}, autobahn's WebSocket server behind C{ssl:} endpoints).

        The handshake sends the CA certificate after the server certificate, so a joining
        agent can pin it. Client certificates, when sent, must be issued by this CA; with
        C{require_client_certificate} a client without one is refused.

        @param names: the DNS names and IP addresses clients use to reach the control plane.
        @rtype: L{twisted.internet.ssl.CertificateOptions}
        """
        cert_pem, key_pem = self.server_credentials(names)
        return server_options(cert_pem, key_pem, self.certificate_pem, require_client_certificate)

    def client_context(self, hostname, client_certificate=None):
        """
        TLS options for a client that holds the CA certificate (e.g. the CLI on the control
        host): the server must present a certificate for C{hostname} issued by this CA.

        @param client_certificate: optional C{(cert_pem, key_pem)} to present.
        """
        return pinned_client_context(
            hostname,
            self.fingerprint,
            client_certificate=client_certificate,
            ca_certificate=self.certificate_pem,
        )


def _canonical(names):
    out = []
    for n in names:
        try:
            out.append(ipaddress.ip_address(n))
        except ValueError:
            out.append(n)
    return out


def _signed_by(cert, ca_cert):
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def server_options(cert_pem, key_pem, ca_pem, require_client_certificate=False):
    """
    Server TLS options from PEM credentials: present C{cert_pem} followed by the CA
    certificate C{ca_pem}; accept client certificates from that CA only (and require one
    when C{require_client_certificate}).

    @rtype: L{twisted.internet.ssl.CertificateOptions}
    """
    cert, key = _load_pair(cert_pem, key_pem)
    ca = _as_cryptography(ca_pem)
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=cert,
        extraCertChain=[ca],
        verify=True,
        caCerts=[crypto.X509.from_cryptography(ca)],
        requireCertificate=require_client_certificate,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def make_host_request(host_id):
    """
    Make an agent's key and a certificate request for its host id.

    @return: C{(key_pem, csr_pem)}; keep the key, send the request to the control plane.
    """
    check_host_id(host_id)
    key = _new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_id)]))
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


# --- verifying servers -----------------------------------------------------------------


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

    @classmethod
    def load(cls, directory):
        """
        Load the credentials saved in C{directory}, or return C{None} if there are none yet.

        @raise InvalidArgument: they are there but unusable.
        """
        paths = [os.path.join(directory, n) for n in ("ca.pem", "host.pem", "host.key")]
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
        return server_options(self.cert_pem, self.key_pem, self.ca_pem, True)


CONTROL_PKI_DIR = "pki"
"""Where the control plane keeps its CA and server certificate, under its data directory
(install.sh creates them there: C{/var/lib/zwrm/control/pki})."""

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


# --- join tokens -----------------------------------------------------------------------


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


class JoinTokens:
    """
    The control plane's join tokens, in a table of its SQLite store (C{sqlite_utils}).

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
            self._table.create(
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


# --- plain connections -----------------------------------------------------------------


def is_loopback_host(host):
    """True for C{localhost} and addresses in 127.0.0.0/8 and ::1."""
    if host is None:
        return False
    host = host.strip("[]")
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plain_url(url, allow_plain=False):
    """
    Refuse a plain C{ws://} or C{http://} URL to a host that is not loopback.

    @param allow_plain: the operator configured plain connections anyway.
    @raise InvalidArgument: with a message that says how to fix it.
    @return: C{True} when the URL uses TLS (C{wss://}, C{https://}).
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise InvalidArgument(f"not a URL: {url!r}") from None
    scheme = parts.scheme.lower()
    if scheme in ("wss", "https"):
        return True
    if scheme not in ("ws", "http"):
        raise InvalidArgument(
            f"unsupported URL scheme {scheme!r} in {url!r}: use wss:// or https://"
        )
    if is_loopback_host(host) or allow_plain:
        return False
    raise InvalidArgument(
        f"{url} is not encrypted: plain {scheme}:// is only allowed to loopback addresses;"
        f" use {'wss' if scheme == 'ws' else 'https'}:// or allow plain connections in the configuration"
    )


def websocket_endpoint(reactor, url, tls_options=None, allow_plain=False):
    """
    The client endpoint for a C{ws://} or C{wss://} URL: TCP, wrapped in TLS with
    C{tls_options} for C{wss://} (e.g. L{pinned_client_context} or
    L{HostCredentials.control_client_context}). Autobahn's WebSocket client factories connect
    over it, and autobahn's C{Component} takes it as a transport's C{endpoint}.

    @raise InvalidArgument: a C{wss://} URL without TLS options, or plain C{ws://} beyond
        loopback without C{allow_plain} (see L{check_plain_url}).
    """
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

    secure = check_plain_url(url, allow_plain)
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if secure else 80)
    except ValueError:
        raise InvalidArgument(f"bad port in {url!r}") from None
    endpoint = HostnameEndpoint(reactor, parts.hostname, port)
    if not secure:
        return endpoint
    if tls_options is None:
        raise InvalidArgument(f"{url} needs TLS options (a CA fingerprint or certificate)")
    return wrapClientTLS(tls_options, endpoint)


# --- command line (used by install.sh) -------------------------------------------------


def main(argv=None, out=None):
    """
    C{python -m zwrm.pki init DIR NAME...}: create (or load) the CA in DIR and a server
    certificate for the NAMEs (DNS names or IP addresses); print the CA fingerprint.
    C{python -m zwrm.pki fingerprint DIR}: print the CA fingerprint.

    Errors are one line on stderr and exit status 1 (usage: 2).
    """
    import argparse
    import sys

    out = out or sys.stdout
    parser = argparse.ArgumentParser(prog="python -m zwrm.pki", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create the CA and a server certificate")
    init.add_argument("directory")
    init.add_argument("names", nargs="+", metavar="NAME")
    show = sub.add_parser("fingerprint", help="print the CA's fingerprint")
    show.add_argument("directory")
    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            ca = CertificateAuthority.load_or_create(args.directory)
            ca.server_credentials(args.names)
        else:
            ca = CertificateAuthority.load(args.directory)
    except (InvalidArgument, OSError) as e:
        print(f"zwrm.pki: {getattr(e, 'message', None) or e}", file=sys.stderr)
        return 1
    print(ca.fingerprint, file=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
