"""
Tests for zwrm.pki: the CA, certificates, pinned TLS on real loopback sockets, join tokens.
"""

import datetime
import hashlib
import json
import os
import stat

import sqlite_utils
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.task import Clock, deferLater
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm import pki
from zwrm.errors import AuthenticationFailed, InvalidArgument, NotFound
from zwrm.pki import ca as pki_ca
from zwrm.pki import join_tokens as pki_join_tokens

# A time well in the past, for certificates that have expired by now.
LONG_AGO = 1_000_000_000.0  # 2001-09-09


def token_db():
    """An in-memory database with the join tokens' table, as the store's migration makes it."""
    db = sqlite_utils.Database(memory=True)
    pki_join_tokens.schema_v7(db)
    return db


def clock_at(seconds):
    clock = Clock()
    clock.advance(seconds)
    return clock


# --- the CA and its files ---------------------------------------------------------------


class CertificateAuthorityTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.join(self.mktemp(), "pki")

    def test_created_on_first_start_with_private_files(self):
        ca = pki.CertificateAuthority.load_or_create(self.dir)
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)
        for name in ("ca.pem", "ca.key"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dir, name)).st_mode), 0o600)
        cert = x509.load_pem_x509_certificate(open(os.path.join(self.dir, "ca.pem"), "rb").read())
        self.assertTrue(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertEqual(
            ca.fingerprint,
            hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        )

    def test_loaded_on_second_start(self):
        first = pki.CertificateAuthority.load_or_create(self.dir)
        second = pki.CertificateAuthority.load_or_create(self.dir)
        self.assertEqual(first.fingerprint, second.fingerprint)
        cert_pem, _ = second.issue_host("h1")
        self.assertTrue(pki_ca._signed_by(x509.load_pem_x509_certificate(cert_pem), first.certificate))

    def test_key_of_another_ca_is_refused(self):
        pki.CertificateAuthority.load_or_create(self.dir)
        other = os.path.join(self.mktemp(), "other")
        pki.CertificateAuthority.load_or_create(other)
        os.replace(os.path.join(other, "ca.key"), os.path.join(self.dir, "ca.key"))
        e = self.assertRaises(InvalidArgument, pki.CertificateAuthority.load_or_create, self.dir)
        self.assertIn("is not the key of", e.message)

    def test_missing_certificate_is_a_clear_error(self):
        pki.CertificateAuthority.load_or_create(self.dir)
        os.remove(os.path.join(self.dir, "ca.pem"))
        e = self.assertRaises(InvalidArgument, pki.CertificateAuthority.load_or_create, self.dir)
        self.assertIn("cannot load the CA", e.message)

    def test_server_credentials_kept_and_reissued(self):
        clock = clock_at(2_000_000_000)
        ca = pki.CertificateAuthority.load_or_create(self.dir, clock=clock)
        first = ca.server_credentials(["cp.example.com", "127.0.0.1"])
        self.assertEqual(ca.server_credentials(["cp.example.com", "127.0.0.1"]), first)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dir, "server.key")).st_mode), 0o600)
        renamed = ca.server_credentials(["cp2.example.com"])
        self.assertNotEqual(renamed, first)
        clock.advance(340 * 86400)  # fewer than 30 days left
        self.assertNotEqual(ca.server_credentials(["cp2.example.com"]), renamed)

    def test_host_certificate_names_the_host(self):
        ca = pki.CertificateAuthority.create()
        cert_pem, key_pem = ca.issue_host("worker-7", names=["10.0.0.7"])
        self.assertEqual(pki.host_id_of(cert_pem), "worker-7")
        cert = x509.load_pem_x509_certificate(cert_pem)
        self.assertEqual(cert.subject.rfc4514_string(), "CN=worker-7")
        self.assertIsNone(pki.host_id_of(ca.issue_server(["cp.example.com"])[0]))
        self.assertIsNone(pki.host_id_of(None))

    def test_invalid_host_id(self):
        ca = pki.CertificateAuthority.create()
        for bad in ("", "a.b", "-x", "x" * 64, "a b", "a\n", 7):
            e = self.assertRaises(InvalidArgument, ca.issue_host, bad)
            self.assertIn("invalid host id", e.message)

    def test_check_host_certificate(self):
        ca = pki.CertificateAuthority.create()
        cert_pem, _ = ca.issue_host("a")
        self.assertEqual(pki.check_host_certificate(cert_pem, "a"), "a")
        e = self.assertRaises(AuthenticationFailed, pki.check_host_certificate, cert_pem, "b")
        self.assertEqual(e.message, "the peer's certificate is for host 'a', not for host 'b'")
        server_pem, _ = ca.issue_server(["x"])
        e = self.assertRaises(AuthenticationFailed, pki.check_host_certificate, server_pem, "b")
        self.assertIn("no zwrm host certificate", e.message)

    def test_sign_host_request(self):
        ca = pki.CertificateAuthority.create()
        key_pem, csr_pem = pki.make_host_request("h2")
        cert_pem = ca.sign_host_request(csr_pem, "h2")
        creds = pki.HostCredentials(ca.certificate_pem, cert_pem, key_pem)
        self.assertEqual(creds.host_id, "h2")
        self.assertEqual(creds.fingerprint, ca.fingerprint)

    def test_sign_request_for_another_host_refused(self):
        ca = pki.CertificateAuthority.create()
        _, csr_pem = pki.make_host_request("h2")
        e = self.assertRaises(InvalidArgument, ca.sign_host_request, csr_pem, "h3")
        self.assertEqual(e.message, "the certificate request is for 'h2', not for host 'h3'")
        e = self.assertRaises(InvalidArgument, ca.sign_host_request, b"garbage", "h3")
        self.assertIn("not a PEM certificate request", e.message)

    def test_host_credentials_from_another_ca_refused(self):
        ca, other = pki.CertificateAuthority.create(), pki.CertificateAuthority.create()
        cert_pem, key_pem = ca.issue_host("h")
        e = self.assertRaises(
            InvalidArgument, pki.HostCredentials, other.certificate_pem, cert_pem, key_pem
        )
        self.assertIn("not signed by the cluster CA", e.message)

    def test_host_credentials_saved_and_loaded(self):
        ca = pki.CertificateAuthority.create()
        d = self.mktemp()
        self.assertIsNone(pki.HostCredentials.load(d))
        creds = pki.HostCredentials(ca.certificate_pem, *ca.issue_host("h"))
        creds.save(d)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(d, "host.key")).st_mode), 0o600)
        self.assertEqual(pki.HostCredentials.load(d), creds)

    def test_renewal_time_is_when_a_third_of_the_lifetime_is_left(self):
        ca = pki.CertificateAuthority.create(clock=clock_at(LONG_AGO))
        year, _ = ca.issue_host("h", lifetime=datetime.timedelta(days=365))
        self.assertAlmostEqual(pki.renewal_time(year), LONG_AGO + 365 * 86400 * 2 / 3, delta=1)
        # the notBefore moved back for clock skew is not counted: 10 s -> due after 6.7 s
        short, _ = ca.issue_host("h", lifetime=datetime.timedelta(seconds=10))
        self.assertAlmostEqual(pki.renewal_time(short), LONG_AGO + 10 * 2 / 3, delta=1)

    def test_renewed_credentials_replace_the_pair(self):
        ca = pki.CertificateAuthority.create()
        d = self.mktemp()
        old = pki.HostCredentials(ca.certificate_pem, *ca.issue_host("h"))
        old.save(d)
        new = pki.HostCredentials(ca.certificate_pem, *ca.issue_host("h"))
        new.save_renewed(d)
        self.assertEqual(pki.HostCredentials.load(d), new)
        self.assertEqual(sorted(os.listdir(d)), ["ca.pem", "host.key", "host.pem"])
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(d, "host.key")).st_mode), 0o600)
        # a key that is not the certificate's changes nothing
        other = pki.HostCredentials(ca.certificate_pem, ca.issue_host("h")[0], new.key_pem)
        self.assertRaises(InvalidArgument, other.save_renewed, d)
        self.assertEqual(pki.HostCredentials.load(d), new)

    def test_a_renewal_cut_short_leaves_a_pair_that_belongs_together(self):
        ca = pki.CertificateAuthority.create()
        old = pki.HostCredentials(ca.certificate_pem, *ca.issue_host("h"))
        new = pki.HostCredentials(ca.certificate_pem, *ca.issue_host("h"))

        def crashed(files):
            d = self.mktemp()
            old.save(d)
            for name, data in files.items():
                with open(os.path.join(d, name), "wb") as f:
                    f.write(data)
            return d

        # the new key written, not yet the certificate: the old pair stands
        d = crashed({"host.key.next": new.key_pem})
        self.assertEqual(pki.HostCredentials.load(d), old)
        # both written, nothing moved yet; the key moved, not the certificate: the new pair
        for files in ({"host.key.next": new.key_pem, "host.pem.next": new.cert_pem},
                      {"host.key": new.key_pem, "host.pem.next": new.cert_pem}):
            d = crashed(files)
            self.assertEqual(pki.HostCredentials.load(d), new)
            self.assertEqual(sorted(os.listdir(d)), ["ca.pem", "host.key", "host.pem"])

    def test_certificates_do_not_outlive_the_ca(self):
        ca = pki.CertificateAuthority.create(clock=clock_at(LONG_AGO))
        cert_pem, _ = ca.issue_host("h", lifetime=pki.CA_LIFETIME * 2)
        cert = x509.load_pem_x509_certificate(cert_pem)
        self.assertLessEqual(cert.not_valid_after_utc, ca.certificate.not_valid_after_utc)

    def test_fingerprint_forms(self):
        fp = "ab" * 32
        self.assertEqual(pki.normalize_fingerprint("sha256:" + ":".join(["AB"] * 32)), fp)
        self.assertRaises(InvalidArgument, pki.normalize_fingerprint, "ab" * 31)


# --- real TLS handshakes on loopback ----------------------------------------------------


class _Recorder(protocol.Protocol):
    """Server side: echoes a line back and records what it received and who the peer is."""

    def connectionMade(self):
        self.factory.connections.append(self)
        self.received = b""
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.received += data
        self.factory.peer_host_ids.append(pki.host_id_of(self.transport.getPeerCertificate()))
        self.transport.write(b"echo:" + data)

    def connectionLost(self, reason):
        self.lost.callback(None)


class _Client(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"hello")

    def dataReceived(self, data):
        if not self.factory.result.called:
            self.factory.result.callback(data)
        self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.factory.result.called:
            self.factory.result.errback(reason)


class HandshakeTests(TestCase):
    """
    Each test listens on 127.0.0.1 with real server options and connects with real client
    options through Twisted endpoints.
    """

    def setUp(self):
        self.ca = pki.CertificateAuthority.load_or_create(os.path.join(self.mktemp(), "ca"))

    @defer.inlineCallbacks
    def exchange(self, server_options, client_options):
        """
        @return: C{(reply or failure, bytes the server received, server-side host ids)}
        """
        factory = protocol.Factory.forProtocol(_Recorder)
        factory.connections, factory.peer_host_ids = [], []
        port = yield SSL4ServerEndpoint(reactor, 0, server_options, interface="127.0.0.1").listen(
            factory
        )
        self.addCleanup(port.stopListening)
        client_factory = protocol.Factory.forProtocol(_Client)
        client_factory.result = defer.Deferred()
        endpoint = wrapClientTLS(
            client_options, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        )
        yield endpoint.connect(client_factory)
        try:
            outcome = yield client_factory.result
        except Exception as e:
            outcome = e
        # Wait (bounded) until the server side is gone too, so nothing is left behind.
        for _ in range(200):
            if all(c.lost.called for c in factory.connections):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        for c in factory.connections:
            if not c.lost.called:
                c.transport.abortConnection()
                yield c.lost
        received = b"".join(c.received for c in factory.connections)
        return outcome, received, factory.peer_host_ids

    @defer.inlineCallbacks
    def test_right_fingerprint_accepted(self):
        client = pki.pinned_client_context("127.0.0.1", self.ca.fingerprint)
        outcome, received, _ = yield self.exchange(self.ca.server_context(), client)
        self.assertEqual(outcome, b"echo:hello")
        self.assertEqual(received, b"hello")
        self.assertEqual(client.verified_ca_pem, self.ca.certificate_pem)

    @defer.inlineCallbacks
    def test_dns_name_accepted(self):
        client = pki.pinned_client_context("localhost", "sha256:" + self.ca.fingerprint.upper())
        outcome, _, _ = yield self.exchange(self.ca.server_context(["localhost"]), client)
        self.assertEqual(outcome, b"echo:hello")

    @defer.inlineCallbacks
    def test_wrong_fingerprint_refused_before_sending(self):
        other = pki.CertificateAuthority.create()
        client = pki.pinned_client_context("127.0.0.1", other.fingerprint)
        outcome, received, _ = yield self.exchange(self.ca.server_context(), client)
        self.assertIsInstance(outcome, pki.CertificateRejected)
        self.assertEqual(
            str(outcome),
            f"the server's CA has fingerprint {self.ca.fingerprint}, not the expected"
            f" {other.fingerprint} (from the join token): refusing to talk to it",
        )
        self.assertEqual(received, b"")
        self.assertIsNone(client.verified_ca_pem)

    @defer.inlineCallbacks
    def test_server_certificate_from_an_impostor_refused(self):
        # The impostor sends the real CA certificate (public) after a certificate it signed
        # itself with a CA of the same name.
        impostor = pki.CertificateAuthority.create()
        cert_pem, key_pem = impostor.issue_server(["127.0.0.1"])
        server = pki.server_options(cert_pem, key_pem, self.ca.certificate_pem)
        client = pki.pinned_client_context("127.0.0.1", self.ca.fingerprint)
        outcome, received, _ = yield self.exchange(server, client)
        self.assertIsInstance(outcome, pki.CertificateRejected)
        self.assertIn("not signed by the CA with the expected fingerprint", str(outcome))
        self.assertEqual(received, b"")

    @defer.inlineCallbacks
    def test_certificate_for_another_name_refused(self):
        client = pki.pinned_client_context("127.0.0.1", self.ca.fingerprint)
        outcome, received, _ = yield self.exchange(
            self.ca.server_context(["cp.example.com"]), client
        )
        self.assertIsInstance(outcome, pki.CertificateRejected)
        self.assertEqual(str(outcome), "the server's certificate is not issued for '127.0.0.1'")
        self.assertEqual(received, b"")

    @defer.inlineCallbacks
    def test_expired_server_certificate_refused(self):
        old = pki.CertificateAuthority.create(clock=clock_at(LONG_AGO))
        cert_pem, key_pem = old.issue_server(["127.0.0.1"])
        server = pki.server_options(cert_pem, key_pem, old.certificate_pem)
        client = pki.pinned_client_context("127.0.0.1", old.fingerprint)
        outcome, received, _ = yield self.exchange(server, client)
        self.assertIsInstance(outcome, pki.CertificateRejected)
        self.assertEqual(str(outcome), "the server's certificate has expired")
        self.assertEqual(received, b"")

    @defer.inlineCallbacks
    def test_a_serving_context_presents_a_renewed_certificate(self):
        # a volume endpoint whose certificate expired, renewed while it listens: the
        # connections made from then on get the new certificate
        a = pki.HostCredentials(self.ca.certificate_pem, *self.ca.issue_host("a"))
        expired = pki.HostCredentials(self.ca.certificate_pem, *self.ca.issue_host(
            "b", lifetime=datetime.timedelta(seconds=-60)))
        server = expired.server_context()
        outcome, _, _ = yield self.exchange(server, a.peer_client_context("b"))
        self.assertIsInstance(outcome, pki.CertificateRejected)
        self.assertEqual(str(outcome), "the server's certificate has expired")
        renewed = pki.HostCredentials(self.ca.certificate_pem, *self.ca.issue_host("b"))
        self.assertRaises(InvalidArgument, server.renew, renewed.cert_pem, a.key_pem)
        server.renew(renewed.cert_pem, renewed.key_pem)
        outcome, _, host_ids = yield self.exchange(server, a.peer_client_context("b"))
        self.assertEqual((outcome, host_ids), (b"echo:hello", ["a"]))

    @defer.inlineCallbacks
    def test_agent_presents_its_host_certificate_to_the_control_plane(self):
        creds = pki.HostCredentials(self.ca.certificate_pem, *self.ca.issue_host("worker-1"))
        outcome, _, host_ids = yield self.exchange(
            self.ca.server_context(), creds.control_client_context("127.0.0.1")
        )
        self.assertEqual(outcome, b"echo:hello")
        self.assertEqual(host_ids, ["worker-1"])

    @defer.inlineCallbacks
    def test_volume_endpoint_right_host(self):
        a = pki.HostCredentials(self.ca.certificate_pem, *self.ca.issue_host("a"))
        b = pki.HostCredentials(self.ca.certificate_pem, *self.ca.issue_host("b"))
        outcome, received, host_ids = yield self.exchange(
            b.server_context(), a.peer_client_context("b")
        )
        self.assertEqual(outcome, b"echo:hello")
        self.assertEqual(host_ids, ["a"])

    @defer.inlineCallbacks
    def test_volume_endpoint_certificate_for_another_host_refused(self):
        a = pki.HostCredentials(self.ca.certificate_pem, *self.ca.issue_host("a"))
        c = pki.HostCredentials(self.ca.certificate_pem, *self.ca.issue_host("c"))
        outcome, received, _ = yield self.exchange(c.server_context(), a.peer_client_context("b"))
        self.assertIsInstance(outcome, pki.CertificateRejected)
        self.assertEqual(str(outcome), "the peer's certificate is for host 'c', not for host 'b'")
        self.assertEqual(received, b"")

    @defer.inlineCallbacks
    def test_volume_endpoint_refuses_client_without_certificate(self):
        b = pki.HostCredentials(self.ca.certificate_pem, *self.ca.issue_host("b"))
        client = pki.pinned_client_context("b", self.ca.fingerprint, expected_host_id="b")
        outcome, received, _ = yield self.exchange(b.server_context(), client)
        self.assertIsInstance(outcome, Exception)
        self.assertEqual(received, b"")

    @defer.inlineCallbacks
    def test_volume_endpoint_refuses_client_of_another_ca(self):
        other = pki.CertificateAuthority.create()
        b = pki.HostCredentials(self.ca.certificate_pem, *self.ca.issue_host("b"))
        stranger_cert = other.issue_host("a")
        client = pki.pinned_client_context(
            "b", self.ca.fingerprint, client_certificate=stranger_cert, expected_host_id="b"
        )
        outcome, received, _ = yield self.exchange(b.server_context(), client)
        self.assertIsInstance(outcome, Exception)
        self.assertEqual(received, b"")


# --- the join exchange over a pinned connection -----------------------------------------


class _JoinServer(LineReceiver):
    """A minimal control-plane side of a join: checks the token, signs the request."""

    def lineReceived(self, line):
        request = json.loads(line)
        try:
            self.factory.tokens.check(request["token"])
            cert = self.factory.ca.sign_host_request(request["csr"], request["host_id"])
            reply = {"ca": self.factory.ca.certificate_pem.decode(), "cert": cert.decode()}
        except (AuthenticationFailed, InvalidArgument) as e:
            reply = {"error": e.uri, "message": e.message}
        self.sendLine(json.dumps(reply).encode())

    def connectionLost(self, reason):
        self.factory.closed.callback(None)


class _JoinClient(LineReceiver):
    def connectionMade(self):
        self.sendLine(json.dumps(self.factory.request).encode())

    def lineReceived(self, line):
        self.factory.result.callback(json.loads(line))
        self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.factory.result.called:
            self.factory.result.errback(reason)


class JoinTests(TestCase):
    @defer.inlineCallbacks
    def join(self, ca, tokens, token_text, host_id):
        factory = protocol.Factory.forProtocol(_JoinServer)
        factory.ca, factory.tokens = ca, tokens
        factory.closed = defer.Deferred()
        port = yield SSL4ServerEndpoint(
            reactor, 0, ca.server_context(), interface="127.0.0.1"
        ).listen(factory)
        self.addCleanup(port.stopListening)
        token = pki.JoinToken.parse(token_text)
        key_pem, csr_pem = pki.make_host_request(host_id)
        client_options = pki.pinned_client_context("127.0.0.1", token.ca_fingerprint)
        client = protocol.Factory.forProtocol(_JoinClient)
        client.request = {"token": token_text, "csr": csr_pem.decode(), "host_id": host_id}
        client.result = defer.Deferred()
        yield wrapClientTLS(
            client_options, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        ).connect(client)
        reply = yield client.result
        yield factory.closed  # the server side has closed too (no timer: an event)
        return reply, key_pem, client_options

    @defer.inlineCallbacks
    def test_join_with_a_valid_token(self):
        ca = pki.CertificateAuthority.create()
        tokens = pki.JoinTokens(token_db(), ca.fingerprint, Clock())
        token = tokens.create(ttl=600)
        reply, key_pem, options = yield self.join(ca, tokens, str(token), "w1")
        creds = pki.HostCredentials(options.verified_ca_pem, reply["cert"].encode(), key_pem)
        self.assertEqual(creds.host_id, "w1")
        self.assertEqual(reply["ca"].encode(), options.verified_ca_pem)

    @defer.inlineCallbacks
    def test_join_with_an_expired_token_refused(self):
        ca = pki.CertificateAuthority.create()
        clock = Clock()
        tokens = pki.JoinTokens(token_db(), ca.fingerprint, clock)
        token = tokens.create(ttl=600)
        clock.advance(601)
        reply, _, _ = yield self.join(ca, tokens, str(token), "w1")
        self.assertEqual(reply["error"], "zwrm.error.authentication_failed")
        self.assertIn(f"join token {token.id} expired at", reply["message"])


# --- join tokens ------------------------------------------------------------------------


class JoinTokenTextTests(SynchronousTestCase):
    def test_round_trip(self):
        token = pki.JoinToken.generate("cd" * 32, expires=None)
        text = str(token)
        self.assertRegex(text, r"^zwrm1\.[a-z0-9]{6}\.[a-z0-9]{32}\.[0-9a-f]{64}$")
        self.assertEqual(pki.JoinToken.parse(text), token)
        self.assertEqual(pki.JoinToken.parse("  " + text + "\n"), token)
        self.assertNotIn(token.secret, repr(token))

    def test_malformed(self):
        good = str(pki.JoinToken.generate("cd" * 32, expires=None))
        prefix, tid, secret, fp = good.split(".")
        cases = {
            "": "does not start with zwrm1.",
            "zwrm2." + good[6:]: "does not start with zwrm1.",
            f"zwrm1.{tid}.{secret}": "3 dot-separated parts, not 4",
            f"zwrm1.ABCDEF.{secret}.{fp}": "the id is not 6 characters",
            f"zwrm1.{tid}.{secret[:-1]}.{fp}": "the secret is not 32 characters",
            f"zwrm1.{tid}.{secret}.{fp[:-1]}": "the CA fingerprint is not 64",
        }
        for text, why in cases.items():
            e = self.assertRaises(InvalidArgument, pki.JoinToken.parse, text)
            self.assertIn(why, e.message)
            self.assertNotIn(secret, e.message)
        self.assertRaises(InvalidArgument, pki.JoinToken.parse, None)

    @settings(max_examples=200, deadline=None)
    @given(st.text())
    def test_parse_only_raises_invalid_argument(self, text):
        try:
            token = pki.JoinToken.parse(text)
        except InvalidArgument:
            return
        self.assertEqual(str(token), text.strip())


class JoinTokensTests(SynchronousTestCase):
    def setUp(self):
        self.clock = clock_at(1_800_000_000)
        self.db = token_db()
        self.fingerprint = "ef" * 32
        self.tokens = pki.JoinTokens(self.db, self.fingerprint, self.clock)

    def test_create_and_check(self):
        token = self.tokens.create(ttl=3600, description="rack 4")
        self.assertEqual(token.ca_fingerprint, self.fingerprint)
        self.assertEqual(self.tokens.check(str(token)), token.id)
        [row] = self.tokens.list()
        self.assertEqual(row["state"], "valid")
        self.assertEqual(row["used"], 1)
        self.assertEqual(row["description"], "rack 4")
        self.assertEqual(row["expires_at"], 1_800_003_600)

    def test_only_the_hash_of_the_secret_is_stored(self):
        token = self.tokens.create()
        dump = "\n".join(self.db.iterdump())
        self.assertNotIn(token.secret, dump)
        self.assertIn(pki.hash_secret(token.secret), dump)
        self.assertNotIn("secret_hash", self.tokens.list()[0])

    def test_expired(self):
        token = self.tokens.create(ttl=60)
        self.clock.advance(60)
        e = self.assertRaises(AuthenticationFailed, self.tokens.check, str(token))
        self.assertEqual(
            e.message,
            f"join token {token.id} expired at 2027-01-15 08:01:00 UTC;"
            " create a new one with `zwrm tokens create`",
        )
        self.assertEqual(self.tokens.list()[0]["state"], "expired")

    def test_revoked(self):
        token = self.tokens.create()
        self.tokens.revoke(token.id)
        self.tokens.revoke(token.id)
        e = self.assertRaises(AuthenticationFailed, self.tokens.check, str(token))
        self.assertIn(f"join token {token.id} was revoked at", e.message)
        self.assertEqual(self.tokens.list()[0]["state"], "revoked")

    def test_revoke_by_full_text(self):
        token = self.tokens.create()
        self.tokens.revoke(str(token))
        self.assertEqual(self.tokens.list()[0]["state"], "revoked")

    def test_revoke_unknown(self):
        e = self.assertRaises(NotFound, self.tokens.revoke, "abcdef")
        self.assertEqual(e.message, "no join token with id 'abcdef'")

    def test_wrong_secret_and_unknown_id(self):
        token = self.tokens.create()
        forged = pki.JoinToken(token.id, "0" * 32, token.ca_fingerprint)
        e = self.assertRaises(AuthenticationFailed, self.tokens.check, forged)
        self.assertIn("is not known to this control plane", e.message)
        e = self.assertRaises(
            AuthenticationFailed,
            self.tokens.check,
            pki.JoinToken("zzzzzz", token.secret, token.ca_fingerprint),
        )
        self.assertIn("join token zzzzzz is not known", e.message)

    def test_token_for_another_ca(self):
        token = self.tokens.create()
        moved = pki.JoinToken(token.id, token.secret, "01" * 32)
        e = self.assertRaises(AuthenticationFailed, self.tokens.check, moved)
        self.assertIn("names CA 0101010101010101..., not this control plane's CA", e.message)

    def test_check_against_another_store_record(self):
        # The control plane may keep tokens in its own table; the check is the same.
        token = pki.JoinToken.generate(self.fingerprint, expires=None)
        record = {"secret_hash": token.secret_hash, "expires_at": 100.0, "revoked": 0}
        self.assertEqual(pki.check_join_token(str(token), record, self.fingerprint, 99.0), token)
        e = self.assertRaises(
            AuthenticationFailed,
            pki.check_join_token,
            token,
            dict(record, revoked=1),
            self.fingerprint,
            99.0,
        )
        self.assertEqual(e.message, f"join token {token.id} was revoked")
        e = self.assertRaises(
            AuthenticationFailed, pki.check_join_token, token, record, self.fingerprint, 100.0
        )
        self.assertIn("expired at 1970-01-01 00:01:40 UTC", e.message)
        e = self.assertRaises(
            AuthenticationFailed, pki.check_join_token, token, None, self.fingerprint, 0
        )
        self.assertIn("is not known", e.message)

    def test_bad_ttl(self):
        for ttl in (0, -5, "1h", True, None):
            e = self.assertRaises(InvalidArgument, self.tokens.create, ttl=ttl)
            self.assertIn("positive number of seconds", e.message)
        self.assertEqual(self.tokens.list(), [])

    def test_list_order_and_persistence(self):
        a = self.tokens.create(ttl=10)
        self.clock.advance(1)
        b = self.tokens.create(ttl=10)
        again = pki.JoinTokens(self.db, self.fingerprint, self.clock)
        self.assertEqual([r["id"] for r in again.list()], [a.id, b.id])

    def test_prune(self):
        old = self.tokens.create(ttl=10)
        keep = self.tokens.create(ttl=30 * 86400)
        self.clock.advance(8 * 86400)
        self.tokens.prune()
        self.assertEqual([r["id"] for r in self.tokens.list()], [keep.id])
        self.assertNotEqual(old.id, keep.id)


class CommandLineTests(SynchronousTestCase):
    def test_init_and_fingerprint(self):
        import io

        d = os.path.join(self.mktemp(), "pki")
        out = io.StringIO()
        self.assertEqual(pki.main(["init", d, "cp.example.com", "192.0.2.1"], out=out), 0)
        ca = pki.CertificateAuthority.load(d)
        self.assertEqual(out.getvalue(), ca.fingerprint + "\n")
        cert = x509.load_pem_x509_certificate(open(os.path.join(d, "server.pem"), "rb").read())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["cp.example.com"])
        out = io.StringIO()
        self.assertEqual(pki.main(["fingerprint", d], out=out), 0)
        self.assertEqual(out.getvalue(), ca.fingerprint + "\n")

    def test_missing_ca(self):
        self.assertEqual(pki.main(["fingerprint", self.mktemp()]), 1)


class _EchoServer(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        self.factory.received.append(payload)
        self.sendMessage(payload, isBinary)

    def connectionLost(self, reason):
        WebSocketServerProtocol.connectionLost(self, reason)
        self.factory.lost.callback(None)


class _EchoClient(WebSocketClientProtocol):
    def onOpen(self):
        self.sendMessage(b"ping")

    def onMessage(self, payload, isBinary):
        self.factory.result.callback(payload)
        self.sendClose()

    def onClose(self, wasClean, code, reason):
        if not self.factory.result.called:
            self.factory.result.errback(Exception(f"closed: {reason}"))

    def connectionLost(self, reason):
        WebSocketClientProtocol.connectionLost(self, reason)
        self.factory.lost.callback(None)


class WebSocketTests(TestCase):
    """The pinned options with autobahn's WebSocket client, as an agent uses them."""

    @defer.inlineCallbacks
    def connect(self, ca, fingerprint):
        server = WebSocketServerFactory()
        server.protocol = _EchoServer
        server.received = []
        server.lost = defer.Deferred()
        # No handshake timers: they would outlive the test as txaio's batched calls.
        server.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
        port = yield SSL4ServerEndpoint(
            reactor, 0, ca.server_context(), interface="127.0.0.1"
        ).listen(server)
        self.addCleanup(port.stopListening)
        url = f"wss://127.0.0.1:{port.getHost().port}/ws"
        client = WebSocketClientFactory(url)
        client.protocol = _EchoClient
        client.result = defer.Deferred()
        client.lost = defer.Deferred()
        client.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
        endpoint = wrapClientTLS(
            pki.pinned_client_context("127.0.0.1", fingerprint),
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        )
        proto = yield endpoint.connect(client)
        try:
            result = yield client.result
        finally:
            if proto.transport is not None:
                proto.transport.loseConnection()
            # both ends closed (events, bounded: no sleeping)
            yield defer.gatherResults([client.lost, server.lost]).addTimeout(10, reactor)
        return result, server.received

    @defer.inlineCallbacks
    def test_pinned_websocket(self):
        ca = pki.CertificateAuthority.create(os.path.join(self.mktemp(), "ca"))
        result, received = yield self.connect(ca, ca.fingerprint)
        self.assertEqual((result, received), (b"ping", [b"ping"]))

    @defer.inlineCallbacks
    def test_pinned_websocket_wrong_ca(self):
        ca = pki.CertificateAuthority.create(os.path.join(self.mktemp(), "ca"))
        other = pki.CertificateAuthority.create()
        with self.assertRaises(Exception) as caught:
            yield self.connect(ca, other.fingerprint)
        self.assertIn("the server's CA has fingerprint", str(caught.exception))


class AgentClientOptionsTests(TestCase):
    """The agent's choice of trust, checked with real handshakes against the control plane."""

    def setUp(self):
        self.ca = pki.CertificateAuthority.create(os.path.join(self.mktemp(), "ca"))
        self.dir = os.path.join(self.mktemp(), "tls")

    @defer.inlineCallbacks
    def handshake(self, options):
        return (yield HandshakeTests.exchange(self, self.ca.server_context(), options))

    def test_nothing_known(self):
        self.assertIsNone(pki.agent_client_options("127.0.0.1", self.dir))
        self.assertIsNone(pki.agent_client_options("127.0.0.1", self.dir, "opaque-token"))

    @defer.inlineCallbacks
    def test_join_then_saved_ca_then_credentials(self):
        token = pki.JoinToken.generate(self.ca.fingerprint, None)
        options = pki.agent_client_options("127.0.0.1", self.dir, str(token))
        outcome, _, host_ids = yield self.handshake(options)
        self.assertEqual((outcome, host_ids), (b"echo:hello", [None]))
        pki.save_ca(self.dir, options.verified_ca_pem, token.ca_fingerprint)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dir, "ca.pem")).st_mode), 0o600)
        # The saved CA is trusted from now on, whatever token is configured.
        options = pki.agent_client_options("127.0.0.1", self.dir, None)
        outcome, _, _ = yield self.handshake(options)
        self.assertEqual(outcome, b"echo:hello")
        # With host credentials the agent also presents its certificate.
        pki.HostCredentials(self.ca.certificate_pem, *self.ca.issue_host("w9")).save(self.dir)
        outcome, _, host_ids = yield self.handshake(pki.agent_client_options("127.0.0.1", self.dir))
        self.assertEqual((outcome, host_ids), (b"echo:hello", ["w9"]))

    @defer.inlineCallbacks
    def test_saved_ca_refuses_another_control_plane(self):
        other = pki.CertificateAuthority.create()
        pki.save_ca(self.dir, other.certificate_pem, other.fingerprint)
        outcome, received, _ = yield self.handshake(pki.agent_client_options("127.0.0.1", self.dir))
        self.assertIsInstance(outcome, pki.CertificateRejected)
        self.assertEqual(received, b"")

    def test_save_ca_checks_the_fingerprint(self):
        other = pki.CertificateAuthority.create()
        e = self.assertRaises(
            InvalidArgument, pki.save_ca, self.dir, other.certificate_pem, self.ca.fingerprint
        )
        self.assertEqual(e.message, "the CA certificate does not have the expected fingerprint")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "ca.pem")))

    def test_malformed_zwrm1_token(self):
        e = self.assertRaises(
            InvalidArgument, pki.agent_client_options, "127.0.0.1", self.dir, "zwrm1.x.y.z"
        )
        self.assertIn("malformed join token", e.message)
