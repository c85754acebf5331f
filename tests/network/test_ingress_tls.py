"""
TLS termination in the ingress (C{--publish 443:8080/https}, C{zwrm certs add}): real
sockets, real TLS with certificates made here (cryptography), replicas that are small web
servers on loopback; the control plane's certificate resource over a real store.
"""

import datetime
import json
import os
import shutil
import sqlite3
import stat
import tempfile
from types import SimpleNamespace

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import protocol, reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server

from zwrm import errors
from zwrm.agent.network.agent import AgentNetwork
from zwrm.agent.network.proxy import Ingress
from zwrm.control.resources import certs as certs_mod
from zwrm.control.store import Store
from zwrm.testing.processes import free_port

#: what a client sees when the ingress has no certificate for the name it asked for
HANDSHAKE_FAILED = (SSL.Error, ConnectionLost)
NOW = datetime.datetime.now(datetime.UTC)


def _pem_key(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


class CA:
    """A throwaway certificate authority."""

    def __init__(self, name="zwrm test CA"):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256()))
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def intermediate(self):
        """A CA signed by this one (its C{pem}: its own certificate only)."""
        sub = CA("zwrm test intermediate")
        sub.cert = (
            x509.CertificateBuilder().subject_name(sub.name).issuer_name(self.name)
            .public_key(sub.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256()))
        sub.pem = sub.cert.public_bytes(serialization.Encoding.PEM).decode()
        return sub

    def issue(self, names, days=10, expired=False, san=True, key=None):
        """C{(cert PEM with the CA after it, key PEM)} for DNS C{names}."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        start, end = NOW - datetime.timedelta(days=1), NOW + datetime.timedelta(days=days)
        if expired:
            start, end = NOW - datetime.timedelta(days=10), NOW - datetime.timedelta(days=1)
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
             .issuer_name(self.name).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(start).not_valid_after(end))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                                critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM).decode() + self.pem, _pem_key(key)


def fingerprint(pem):
    return x509.load_pem_x509_certificates(pem.encode())[0].fingerprint(hashes.SHA256()).hex()


class _Fetch(protocol.Protocol):
    def __init__(self, request):
        self.request = request
        self.data = b""
        self.peer = None
        self.done = Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        if self.peer is None:
            cert = self.transport.getPeerCertificate()
            self.peer = cert.to_cryptography() if cert is not None else None
        self.data += data

    def connectionLost(self, reason):
        if self.data:
            self.done.callback(self)
        else:
            self.done.errback(reason)


async def https_get(port, server_name, ca_pem, host_header=None, timeout=10, headers=""):
    """
    C{GET /} over TLS to 127.0.0.1:C{port}, asking for C{server_name} (SNI) and trusting
    only C{ca_pem}; the L{_Fetch} (C{.data}, C{.peer} certificate).
    """
    options = ssl.optionsForClientTLS(server_name,
                                      trustRoot=ssl.Certificate.loadPEM(ca_pem.encode()))
    p = _Fetch(f"GET / HTTP/1.0\r\nHost: {host_header or server_name}\r\n{headers}\r\n".encode())
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port,
                                                         timeout=timeout))
    await connectProtocol(endpoint, p)
    call = reactor.callLater(timeout, p.transport.abortConnection)
    try:
        return await p.done
    finally:
        if call.active():
            call.cancel()


class _Page(resource.Resource):
    isLeaf = True

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.seen = []

    def render_GET(self, request):
        self.seen.append({k.decode().lower(): ",".join(v.decode() for v in vs)
                          for k, vs in request.requestHeaders.getAllRawHeaders()})
        return f"replica {self.name}".encode()


class IngressTLSTests(TestCase):
    def setUp(self):
        self.ca = CA()

    def replica(self, name):
        page = _Page(name)
        port = reactor.listenTCP(0, server.Site(page), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return page, port.getHost().port

    def ingress(self):
        ing = Ingress(reactor, interface="127.0.0.1")
        self.addCleanup(ing.close)
        return ing

    def cert(self, domain, names=None, **kw):
        pem, key = self.ca.issue(names or [domain], **kw)
        return {"domain": domain, "cert": pem, "key": key}

    async def test_sni_picks_the_certificate_and_replicas_see_https(self):
        (a, pa), (b, pb) = self.replica("a"), self.replica("b")
        ing = self.ingress()
        ca, cb = self.cert("a.example.test"), self.cert("b.example.test")
        self.assertEqual(ing.set_certs([ca, cb]),
                         {"certs": ["a.example.test", "b.example.test"], "refused": {}})
        port = free_port()
        ing.set_routes({port: {"mode": "https", "routes": {
            "a.example.test": [{"key": "a", "host": "127.0.0.1", "port": pa}],
            "b.example.test": [{"key": "b", "host": "127.0.0.1", "port": pb}]}}})
        got = await https_get(port, "a.example.test", self.ca.pem)
        self.assertTrue(got.data.endswith(b"replica a"), got.data)
        self.assertEqual(got.peer.fingerprint(hashes.SHA256()).hex(), fingerprint(ca["cert"]))
        self.assertEqual(a.seen[-1]["x-forwarded-proto"], "https")
        self.assertEqual(a.seen[-1]["x-forwarded-host"], "a.example.test")
        self.assertEqual(a.seen[-1]["x-forwarded-for"], "127.0.0.1")
        # A client's own X-Forwarded-Proto does not get through.
        got = await https_get(port, "b.example.test", self.ca.pem,
                              headers="X-Forwarded-Proto: http\r\n")
        self.assertTrue(got.data.endswith(b"replica b"), got.data)
        self.assertEqual(got.peer.fingerprint(hashes.SHA256()).hex(), fingerprint(cb["cert"]))
        self.assertEqual(b.seen[-1]["x-forwarded-proto"], "https")
        self.assertEqual(ing.listener(port).failed, 0)

    async def test_wildcard_unknown_names_and_replacement(self):
        (a, pa) = self.replica("a")
        ing = self.ingress()
        wild = self.cert("*.apps.example.test")
        ing.set_certs([wild])
        port = free_port()
        ing.set_routes({port: {"mode": "https", "routes": {
            "web.apps.example.test": [{"key": "a", "host": "127.0.0.1", "port": pa}]}}})
        got = await https_get(port, "web.apps.example.test", self.ca.pem)
        self.assertTrue(got.data.endswith(b"replica a"))
        self.assertEqual(got.peer.fingerprint(hashes.SHA256()).hex(), fingerprint(wild["cert"]))
        # A name no certificate covers: the handshake fails, nothing reaches a replica.
        seen = len(a.seen)
        with self.assertRaises(HANDSHAKE_FAILED):
            await https_get(port, "other.example.test", self.ca.pem)
        with self.assertRaises(HANDSHAKE_FAILED):  # a wildcard covers one label only
            await https_get(port, "x.web.apps.example.test", self.ca.pem)
        self.assertEqual(len(a.seen), seen)
        # A new certificate for the name: the next connection gets it, without relistening.
        exact = self.cert("web.apps.example.test")
        ing.set_certs([wild, exact])
        got = await https_get(port, "web.apps.example.test", self.ca.pem)
        self.assertEqual(got.peer.fingerprint(hashes.SHA256()).hex(), fingerprint(exact["cert"]))
        # Removed: refused again.
        ing.set_certs([])
        with self.assertRaises(HANDSHAKE_FAILED):
            await https_get(port, "web.apps.example.test", self.ca.pem)

    async def test_the_chain_is_served(self):
        # The client trusts only the root; the leaf is signed by an intermediate that the
        # cert file carries after it.
        (_, pa) = self.replica("a")
        sub = self.ca.intermediate()
        pem, key = sub.issue(["a.example.test"])
        ing = self.ingress()
        self.assertEqual(ing.set_certs([{"domain": "a.example.test", "cert": pem,
                                         "key": key}])["certs"], ["a.example.test"])
        port = free_port()
        ing.set_routes({port: {"mode": "https", "routes": {
            "a.example.test": [{"key": "a", "host": "127.0.0.1", "port": pa}]}}})
        got = await https_get(port, "a.example.test", self.ca.pem)
        self.assertTrue(got.data.endswith(b"replica a"))
        # Without the intermediate in the file the root alone cannot verify it.
        leaf_only = pem.split(sub.pem)[0]
        ing.set_certs([{"domain": "a.example.test", "cert": leaf_only, "key": key}])
        with self.assertRaises(HANDSHAKE_FAILED):
            await https_get(port, "a.example.test", self.ca.pem)

    async def test_plain_http_on_an_https_port_is_not_proxied(self):
        (a, pa) = self.replica("a")
        ing = self.ingress()
        ing.set_certs([self.cert("a.example.test")])
        port = free_port()
        ing.set_routes({port: {"mode": "https", "routes": {
            "a.example.test": [{"key": "a", "host": "127.0.0.1", "port": pa}]}}})
        from tests.network.helpers import http_get

        data = await http_get(reactor, "127.0.0.1", port, host_header="a.example.test")
        self.assertNotIn(b"replica a", data)
        self.assertEqual(a.seen, [])

    def test_a_bad_certificate_is_refused_and_the_others_served(self):
        ing = Ingress(reactor, interface="127.0.0.1")
        good = self.cert("a.example.test")
        other = self.cert("b.example.test")
        mismatched = dict(other, key=self.cert("c.example.test")["key"])
        garbage = {"domain": "d.example.test", "cert": "nope", "key": "nope"}
        result = ing.set_certs([good, mismatched, garbage])
        self.assertEqual(result["certs"], ["a.example.test"])
        self.assertEqual(sorted(result["refused"]), ["b.example.test", "d.example.test"])
        self.assertIn("not the certificate's", result["refused"]["b.example.test"])


class AgentCertsTests(TestCase):
    """The agent keeps the certificates it is given in 0600 files and serves them again
    after a restart."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="zwrm-certs-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = CA()

    def agent(self):
        agent = AgentNetwork(reactor, "h1", "127.0.0.1", state_dir=self.dir)
        self.addCleanup(lambda: Deferred.fromCoroutine(agent.close()))
        return agent

    async def test_kept_private_and_loaded_after_a_restart(self):
        pem, key = self.ca.issue(["a.example.test"])
        wpem, wkey = self.ca.issue(["*.example.test"])
        first = self.agent()
        result = first.set_certs({"certs": [
            {"domain": "a.example.test", "cert": pem, "key": key, "fingerprint": "x"},
            {"domain": "*.example.test", "cert": wpem, "key": wkey}]})
        self.assertEqual(result["certs"], ["*.example.test", "a.example.test"])
        d = os.path.join(self.dir, "certs")
        self.assertEqual(stat.S_IMODE(os.stat(d).st_mode), 0o700)
        files = sorted(os.listdir(d))
        self.assertEqual(len(files), 2)
        for name in files:
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(d, name)).st_mode), 0o600)
        with open(os.path.join(d, "a.example.test.pem")) as f:
            self.assertEqual(json.load(f)["key"], key)
        # A new agent process serves them before the control plane gives them again.
        second = self.agent()
        self.assertEqual(sorted(second.ingress.tls.contexts),
                         ["*.example.test", "a.example.test"])
        self.assertIsNotNone(second.ingress.tls.lookup("b.example.test"))
        # The set shrinks: the file of the removed one goes.
        second.set_certs({"certs": [{"domain": "a.example.test", "cert": pem, "key": key}]})
        self.assertEqual(os.listdir(d), ["a.example.test.pem"])

    def test_malformed_sets_change_nothing(self):
        agent = AgentNetwork(reactor, "h1", "127.0.0.1", state_dir=self.dir)
        pem, key = self.ca.issue(["a.example.test"])
        agent.set_certs({"certs": [{"domain": "a.example.test", "cert": pem, "key": key}]})
        for bad in (None, [], {"certs": "x"}, {"certs": [{"domain": "../../etc", "cert": pem,
                                                          "key": key}]},
                    {"certs": [{"domain": "a.example.test", "cert": 5, "key": key}]}):
            with self.assertRaises(errors.InvalidArgument, msg=repr(bad)):
                agent.set_certs(bad)
        self.assertEqual(list(agent.ingress.tls.contexts), ["a.example.test"])
        self.assertEqual(os.listdir(os.path.join(self.dir, "certs")), ["a.example.test.pem"])


class CheckCertificateTests(SynchronousTestCase):
    def setUp(self):
        self.ca = CA()
        self.now = NOW.timestamp()

    def refused(self, domain, cert, key, argument, words):
        with self.assertRaises(errors.InvalidArgument) as cm:
            certs_mod.check_certificate(domain, cert, key, self.now)
        self.assertEqual(cm.exception.kwargs.get("argument"), argument, cm.exception.message)
        self.assertIn(words, cm.exception.message)

    def test_good(self):
        pem, key = self.ca.issue(["www.example.test", "example.test"])
        info = certs_mod.check_certificate("www.example.test", pem, key, self.now)
        self.assertEqual(info["names"], ["www.example.test", "example.test"])
        self.assertEqual(info["fingerprint"], fingerprint(pem))
        self.assertGreater(info["not_after"], self.now)
        pem, key = self.ca.issue(["*.example.test"])
        certs_mod.check_certificate("web.example.test", pem, key, self.now)
        certs_mod.check_certificate("*.example.test", pem, key, self.now)
        # No SubjectAlternativeName: the common name.
        pem, key = self.ca.issue(["old.example.test"], san=False)
        certs_mod.check_certificate("old.example.test", pem, key, self.now)

    def test_refused(self):
        pem, key = self.ca.issue(["www.example.test"])
        _, other_key = self.ca.issue(["www.example.test"])
        self.refused("www.example.test", pem, other_key, "key", "does not belong")
        self.refused("api.example.test", pem, key, "cert", "not api.example.test")
        self.refused("www.example.test", "-----BEGIN CERTIFICATE-----\nxx\n", key, "cert",
                     "not a PEM certificate")
        self.refused("www.example.test", pem, "not a key", "key", "not a PEM private key")
        self.refused("www..example", pem, key, "domain", "DNS name")
        self.refused("www.example.test", "", key, "cert", "PEM")
        old_pem, old_key = self.ca.issue(["www.example.test"], expired=True)
        self.refused("www.example.test", old_pem, old_key, "cert", "expired")
        wild, wkey = self.ca.issue(["*.example.test"])
        self.refused("a.b.example.test", wild, wkey, "cert", "not a.b.example.test")
        k = ec.generate_private_key(ec.SECP256R1())
        pem, _ = self.ca.issue(["www.example.test"], key=k)
        encrypted = k.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(b"pw")).decode()
        self.refused("www.example.test", pem, encrypted, "key", "encrypted")


class CertResourceTests(TestCase):
    async def asyncSetUp(self):
        self.clock = Clock()
        self.clock.advance(NOW.timestamp())
        self.store = Store(reactor, ":memory:", now=self.clock.seconds)
        await self.store.start()
        self.addCleanup(self.store.stop)
        self.published = []
        self.certs = certs_mod.Certs(self.clock, self.store,
                                     lambda topic, e: self.published.append((topic, e)))
        self.api = certs_mod.CertAPI(self.clock, self.certs)
        self.ca = CA()

    async def test_add_list_replace_remove(self):
        await self.asyncSetUp()
        pem, key = self.ca.issue(["www.example.test"])
        w = await self.api.add("WWW.example.test", pem, key)
        self.assertEqual(w["domain"], "www.example.test")
        self.assertEqual(w["fingerprint"], fingerprint(pem))
        listed = await self.api.list()
        self.assertEqual([c["domain"] for c in listed], ["www.example.test"])
        self.assertNotIn(key, json.dumps(listed))
        self.assertNotIn("key", listed[0])
        # Stored with its key (the agents need it).
        self.assertEqual((await self.certs.get("www.example.test"))["key"], key)
        pem2, key2 = self.ca.issue(["www.example.test"])
        await self.api.add("www.example.test", pem2, key2)
        self.assertEqual((await self.api.list())[0]["fingerprint"], fingerprint(pem2))
        self.assertEqual(await self.api.remove("www.example.test"),
                         {"domain": "www.example.test", "removed": True})
        self.assertEqual(await self.api.list(), [])
        kinds = [(t, e["kind"]) for t, e in self.published]
        self.assertEqual(kinds, [("zwrm.event.cert", "added"), ("zwrm.event.cert", "replaced"),
                                 ("zwrm.event.cert", "removed")])
        for _, e in self.published:
            self.assertNotIn(key, json.dumps(e))
            self.assertNotIn(key2, json.dumps(e))

    async def test_bad_input_changes_nothing(self):
        await self.asyncSetUp()
        pem, key = self.ca.issue(["www.example.test"])
        _, other = self.ca.issue(["www.example.test"])
        with self.assertRaises(errors.InvalidArgument):
            await self.api.add("www.example.test", pem, other)
        with self.assertRaises(errors.NotFound):
            await self.api.remove("www.example.test")
        self.assertEqual(await self.api.list(), [])
        self.assertEqual(self.published, [])

    async def test_publisher_gives_every_agent_the_set(self):
        await self.asyncSetUp()
        from zwrm.control.resources.hosts import Hosts

        hosts = Hosts(self.clock, self.store, lambda topic, e: None)
        for h in ("h1", "h2"):
            await hosts.add({
                "id": h, "name": h, "region": "", "datacenter": "", "address": "",
                "labels": {}, "vcpus": 4, "memory_mb": 1024, "disk_mb": 10, "alloc_vcpus": 0,
                "alloc_memory_mb": 0, "alloc_disk_mb": 0, "state": "ready",
                "state_before_offline": None, "last_heartbeat": 0.0, "agent_version": "1",
                "credential_hash": "x", "joined_at": 0.0})
        calls = []

        async def call(host_id, verb, doc):
            calls.append((host_id, verb, doc))
            if host_id == "h2":
                raise errors.Unavailable("host h2 is not available")

        pub = certs_mod.CertPublisher(self.certs, hosts, call)
        self.addCleanup(pub.close)
        pem, key = self.ca.issue(["www.example.test"])
        await self.api.add("www.example.test", pem, key)
        await self.until(lambda: len(calls) >= 2)
        self.assertEqual(sorted(c[0] for c in calls), ["h1", "h2"])
        self.assertEqual({c[1] for c in calls}, {"ingress.certs"})
        self.assertEqual(calls[0][2]["certs"][0]["key"], key)
        self.assertEqual(pub.sent, 1)
        # An agent that registers (again) gets the set; a removal goes to every host.
        del calls[:]
        await hosts.registered("h1", {"vcpus": 4})
        await self.until(lambda: calls)
        self.assertEqual([c[0] for c in calls], ["h1"])
        del calls[:]
        await self.api.remove("www.example.test")
        await self.until(lambda: len(calls) >= 2)
        self.assertEqual([c[2] for c in calls], [{"certs": []}, {"certs": []}])

    async def hosts(self, n):
        from zwrm.control.resources.hosts import Hosts

        hosts = Hosts(self.clock, self.store, lambda topic, e: None)
        for i in range(n):
            await hosts.add({
                "id": f"h{i}", "name": f"h{i}", "region": "", "datacenter": "", "address": "",
                "labels": {}, "vcpus": 4, "memory_mb": 1024, "disk_mb": 10, "alloc_vcpus": 0,
                "alloc_memory_mb": 0, "alloc_disk_mb": 0, "state": "ready",
                "state_before_offline": None, "last_heartbeat": 0.0, "agent_version": "1",
                "credential_hash": "x", "joined_at": 0.0})
        return hosts

    async def test_agents_registering_together_share_one_read(self):
        """
        Agents that register while a push runs wait for the next one, which reads the set
        once for all of them (20,000 agents registering at once read it one at a time for
        a minute before); each gets the set once, the newest.
        """
        await self.asyncSetUp()
        hosts = await self.hosts(101)
        calls, gate = [], Deferred()

        async def call(host_id, verb, doc):
            calls.append((host_id, [c["domain"] for c in doc["certs"]]))
            if host_id == "h0":
                await gate

        pub = certs_mod.CertPublisher(self.certs, hosts, call)
        self.addCleanup(pub.close)
        first = pub.push(["h0"])
        await self.until(lambda: calls)
        pem, key = self.ca.issue(["www.example.test"])
        await self.api.add("www.example.test", pem, key)  # every host, in the next push
        del calls[:]
        for i in range(1, 101):
            await hosts.registered(f"h{i}", {"vcpus": 4})
        self.assertEqual((calls, pub.reads), ([], 1))  # all wait behind h0's push
        gate.callback(None)
        await first
        self.assertEqual(pub.reads, 2)
        self.assertEqual(sorted(calls), sorted((f"h{i}", ["www.example.test"]) for i in range(101)))
        self.assertEqual(pub.sent, 102)

    async def test_closed_it_reads_and_sends_nothing(self):
        """Closed (the control plane stopping), a push reads nothing; a read the store's
        closing cut short is not logged as a failure."""
        await self.asyncSetUp()
        hosts = await self.hosts(1)
        calls, reading = [], Deferred()

        async def call(host_id, verb, doc):
            calls.append(host_id)

        pub = certs_mod.CertPublisher(self.certs, hosts, call)
        self.patch(pub, "_certs", SimpleNamespace(all=lambda: reading))
        done = pub.push(["h0"])
        pub.close()
        reading.errback(sqlite3.ProgrammingError("Cannot operate on a closed database."))
        await done
        await pub.push(["h0"])
        self.assertEqual((calls, pub.reads), ([], 0))
        self.assertEqual(self.flushLoggedErrors(), [])

    async def until(self, predicate):
        from twisted.internet.task import deferLater

        for _ in range(200):
            if predicate():
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("not within 2 s")


class EndToEndTests(TestCase):
    """
    C{zwrm certs add|list|remove} against a real control plane over a real socket; an agent
    (its executor with an L{AgentNetwork}) gets the certificate through the router, its
    ingress serves it, and gets it again when it registers after a restart.
    """

    timeout = 60

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def agent(self, plane, data_dir):
        from twisted.internet import defer

        from zwrm.agent.executor import Executor
        from zwrm.agent.service import AgentService
        from zwrm.agent.tap import AgentConfig
        from zwrm.agent.volumes import VolumeStore
        from zwrm.drivers.fake import FakeDriver

        net = AgentNetwork(reactor, "a1", "127.0.0.1", state_dir=os.path.join(data_dir, "network"))
        self.addCleanup(lambda: Deferred.fromCoroutine(net.close()))
        executor = Executor(reactor, "a1", FakeDriver(reactor, os.path.join(data_dir, "m")),
                            VolumeStore(reactor, os.path.join(data_dir, "v")),
                            lambda e: defer.succeed(None), data_dir=data_dir, network=net)
        config = AgentConfig(url=plane.url, join_token=plane.join_token, data_dir=data_dir,
                             name="a1", region="eu", datacenter="dc1", vcpus=2,
                             retry_initial=0.05, retry_max=0.2)
        agent = AgentService(reactor, config)
        agent.executors.append(executor)
        agent.startService()
        self.addCleanup(agent.stopService)
        return agent, net

    async def test_add_list_remove_through_the_cli_and_the_agents_ingress(self):
        from tests.agent.test_membership import start_plane
        from zwrm.cli import certs as cli
        from zwrm.cli import client
        from zwrm.cli.client import EXIT_CONFIG, EXIT_REMOTE, CliError
        from zwrm.testing.processes import poll

        class Args:
            def __init__(self, **kw):
                self.__dict__.update(kw)

        plane, tmp = await start_plane(self)
        self.dir = tmp
        agent, net = self.agent(plane, os.path.join(tmp, "a1"))
        await agent.registered
        self.patch(client.os, "environ", {"ZWRM_TOKEN": plane.operator_token})
        ca = CA()
        pem, key = ca.issue(["shop.example.test"])
        cert_file, key_file = self.write("shop.pem", pem), self.write("shop.key", key)
        import io

        out = io.StringIO()
        await cli.certs_add(reactor, Args(api_url=plane.url, domain="shop.example.test",
                                          cert=cert_file, key=key_file, json=False), out)
        self.assertIn("shop.example.test: certificate", out.getvalue())
        # The agent got it through the router; its https port serves it.
        await poll(reactor, lambda: "shop.example.test" in net.ingress.tls.contexts, 10, 0.05,
                   what="the certificate on the agent")
        page = _Page("shop")
        rport = reactor.listenTCP(0, server.Site(page), interface="127.0.0.1")
        self.addCleanup(rport.stopListening)
        port = free_port()
        net.ingress.set_routes({port: {"mode": "https", "routes": {"shop.example.test": [
            {"key": "m1", "host": "127.0.0.1", "port": rport.getHost().port}]}}})
        got = await https_get(port, "shop.example.test", ca.pem)
        self.assertTrue(got.data.endswith(b"replica shop"))
        self.assertEqual(page.seen[-1]["x-forwarded-proto"], "https")
        # list: no key anywhere in what the CLI prints
        out = io.StringIO()
        await cli.certs_list(reactor, Args(api_url=plane.url, json=True), out)
        listed = json.loads(out.getvalue())
        self.assertEqual([c["domain"] for c in listed], ["shop.example.test"])
        self.assertNotIn("PRIVATE KEY", out.getvalue())
        out = io.StringIO()
        await cli.certs_list(reactor, Args(api_url=plane.url, json=False), out)
        self.assertIn("shop.example.test", out.getvalue())
        # Bad input: one line naming the argument, exit 1; nothing changes.
        _, other_key = ca.issue(["shop.example.test"])
        with self.assertRaises(CliError) as cm:
            await cli.certs_add(reactor, Args(api_url=plane.url, domain="shop.example.test",
                                              cert=cert_file, key=self.write("o.key", other_key),
                                              json=False), out)
        self.assertEqual(cm.exception.code, EXIT_REMOTE)
        self.assertIn("key does not belong to the certificate", cm.exception.message)
        with self.assertRaises(CliError) as cm:
            await cli.certs_add(reactor, Args(api_url=plane.url, domain="shop.example.test",
                                              cert=os.path.join(tmp, "none.pem"), key=key_file,
                                              json=False), out)
        self.assertEqual(cm.exception.code, EXIT_CONFIG)
        self.assertIn("--cert", cm.exception.message)
        self.assertEqual(len(await plane.certs.all()), 1)
        # A restarted agent gets the set when it registers (and serves its kept copy at once).
        await agent.stopService()
        with open(os.path.join(tmp, "a1", "network", "certs", "shop.example.test.pem")) as f:
            self.assertEqual(json.load(f)["cert"], pem)
        net.ingress.set_certs([])
        agent2, net2 = self.agent(plane, os.path.join(tmp, "a1"))
        self.assertIn("shop.example.test", net2.ingress.tls.contexts)  # from its files
        net2.ingress.set_certs([])
        await agent2.registered
        await poll(reactor, lambda: "shop.example.test" in net2.ingress.tls.contexts, 10, 0.05,
                   what="the certificate given again after registration")
        # remove: gone from the agent too
        out = io.StringIO()
        await cli.certs_remove(reactor, Args(api_url=plane.url, domain="shop.example.test"), out)
        await poll(reactor, lambda: not net2.ingress.tls.contexts, 10, 0.05,
                   what="the certificate removed from the agent")
        with self.assertRaises(CliError) as cm:
            await cli.certs_remove(reactor, Args(api_url=plane.url, domain="shop.example.test"),
                                   out)
        self.assertEqual(cm.exception.code, EXIT_REMOTE)
