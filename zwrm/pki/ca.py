"""
The cluster's certificate authority and its certificates: the control plane's side of zwrm's
PKI (L{zwrm.pki} gives the whole picture).

  - L{CertificateAuthority}: created on first start in the control plane's data directory
    (L{CertificateAuthority.load_or_create}), with the control plane's server certificate;
    signs agents' certificate requests (L{CertificateAuthority.sign_host_request}).
  - Host certificates name the host id as SAN URI C{zwrm:host:<id>}: L{make_host_request}
    (an agent's key and request), L{host_id_of}, L{check_host_certificate}.
  - L{server_options}: server TLS options from PEM credentials.
  - L{fingerprint_of}, L{normalize_fingerprint}: a CA's SHA-256 fingerprint.

Keys are EC P-256. Private keys are written with mode 0600 in directories of mode 0700.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import time

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from zwrm.errors import AuthenticationFailed, InvalidArgument
from zwrm.hostid import current_host_id

HOST_URI_PREFIX = "zwrm:host:"
CA_LIFETIME = datetime.timedelta(days=3650)
SERVER_LIFETIME = datetime.timedelta(days=365)
HOST_LIFETIME = datetime.timedelta(days=365)
RENEW_BEFORE = datetime.timedelta(days=30)
CLOCK_SKEW = datetime.timedelta(minutes=5)

_HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


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
    The zwrm host id a certificate was issued for, or C{None} if it names none.  A
    certificate of an older zwrm's C{h-<16 hex>} id names today's C{h_<16 hex>}
    (L{zwrm.hostid.current_host_id}).

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
    return current_host_id(ids[0])  # an older zwrm's h-<hex> id is h_<hex> now


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
    if actual != current_host_id(expected_host_id):
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


def expiry_time(certificate):
    """A certificate's C{notAfter} as a POSIX time."""
    return _as_cryptography(certificate).not_valid_after_utc.timestamp()


def expiry_of(certificate):
    """A certificate's C{notAfter} as C{"YYYY-MM-DD HH:MM:SS UTC"} (for log lines)."""
    return _iso(expiry_time(certificate))


def renewal_time(certificate):
    """
    When a host certificate is due to be renewed (L{zwrm.agent.certificates}): once two
    thirds of the lifetime it was issued for have passed (a third is left: 122 days of a
    year's), as Kubernetes' kubelet and cert-manager do, so that a host that is down for a
    while still renews in time.  (The control plane's server certificate keeps its own rule,
    L{RENEW_BEFORE}: it is reissued where it is, with no one to ask.)  (The lifetime is counted without the L{CLOCK_SKEW} its
    C{notBefore} was moved back by.)

    @param certificate: PEM bytes, or any form L{_as_cryptography} takes.
    @return: a POSIX time.
    """
    cert = _as_cryptography(certificate)
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    skew = CLOCK_SKEW.total_seconds()
    if end - start > skew:
        start += skew
    return end - (end - start) / 3


@implementer(IOpenSSLServerConnectionCreator)
class RenewableServerOptions:
    """
    Server TLS options whose certificate and key can be replaced while they serve
    (L{renew}): the connections set up from then on present the new ones, those set up
    before keep theirs.  (pyOpenSSL does not let a context that has made connections
    change, so each renewal makes new options and this hands connections to the latest.)

    @ivar options: the L{twisted.internet.ssl.CertificateOptions} in use.
    """

    def __init__(self, cert_pem, key_pem, ca_pem, require_client_certificate=False):
        self._ca_pem = ca_pem
        self._require = require_client_certificate
        self.options = server_options(cert_pem, key_pem, ca_pem, require_client_certificate)

    def renew(self, cert_pem, key_pem):
        """
        Present C{cert_pem} with C{key_pem} from now on.

        @raise InvalidArgument: the key does not belong to the certificate (nothing changes).
        """
        self.options = server_options(cert_pem, key_pem, self._ca_pem, self._require)

    def serverConnectionForTLS(self, tlsProtocol):
        return self.options.serverConnectionForTLS(tlsProtocol)

    def getContext(self):
        """The current options' context (for callers of the older interface)."""
        return self.options.getContext()


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
        @rtype: L{RenewableServerOptions}
        """
        cert_pem, key_pem = self.server_credentials(names)
        return RenewableServerOptions(cert_pem, key_pem, self.certificate_pem,
                                      require_client_certificate)

    def client_context(self, hostname, client_certificate=None):
        """
        TLS options for a client that holds the CA certificate (e.g. the CLI on the control
        host): the server must present a certificate for C{hostname} issued by this CA.

        @param client_certificate: optional C{(cert_pem, key_pem)} to present.
        """
        from zwrm.pki.agent_tls import pinned_client_context

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


CONTROL_PKI_DIR = "pki"
"""Where the control plane keeps its CA and server certificate, under its data directory
(install.sh creates them there: C{/var/lib/zwrm/control/pki})."""
