"""
The registry over TLS with a certificate from the cluster CA (as the control plane serves
it), read by an agent's cache and the CLI's client that trust only that CA.
"""

import os

from twisted.internet import reactor
from twisted.trial import unittest

from tests.registry.helpers import (
    AGENT_ID,
    AGENT_TOKEN,
    OPERATOR,
    TrackingSite,
    aio,
    default_authorizer,
)
from zwrm.agent.images import ImageCache
from zwrm.errors import InvalidArgument, Unavailable
from zwrm.pki import CertificateAuthority
from zwrm.registry import make_registry_resource
from zwrm.registry.client import RegistryClient, make_http_client, push_image
from zwrm.testing.image import kernel_bytes
from zwrm.web import Root


class TLSTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        ca = CertificateAuthority.create()
        self.ca_file = os.path.join(self.dir, "ca.pem")
        with open(self.ca_file, "wb") as f:
            f.write(ca.certificate_pem)
        top = Root()
        top.putChild(b"v2", make_registry_resource(reactor, os.path.join(self.dir, "reg"),
                                                   default_authorizer()))
        site = TrackingSite(top)
        port = reactor.listenSSL(0, site, ca.server_context(names=("localhost",)),
                                 interface="127.0.0.1")
        self.addCleanup(site.close_connections)
        self.addCleanup(port.stopListening)
        self.url = f"https://localhost:{port.getHost().port}"

    def client(self, ca_file):
        http, pool = make_http_client(reactor, ca_file)
        self.addCleanup(pool.closeCachedConnections)
        return http

    @aio
    async def test_push_and_pull_over_tls(self):
        kernel = os.path.join(self.dir, "vmlinuz")
        with open(kernel, "wb") as f:
            f.write(kernel_bytes(os.urandom(500_000)))
        client = RegistryClient(reactor, self.url, OPERATOR, http_client=self.client(self.ca_file))
        await push_image(client, "apps/tls:v1", kernel=kernel, cmdline="quiet")
        cache = ImageCache(reactor, os.path.join(self.dir, "cache"), self.url,
                           (AGENT_ID, AGENT_TOKEN), 1 << 30, http_client=self.client(self.ca_file))
        out = await cache.resolve("apps/tls:v1")
        with open(out["kernel"], "rb") as a, open(kernel, "rb") as b:
            self.assertEqual(a.read(), b.read())

    @aio
    async def test_other_ca_refused(self):
        other = os.path.join(self.dir, "other.pem")
        with open(other, "wb") as f:
            f.write(CertificateAuthority.create().certificate_pem)
        client = RegistryClient(reactor, self.url, OPERATOR, http_client=self.client(other))
        with self.assertRaises(Unavailable):
            await client.check()

    def test_bad_ca_file(self):
        self.assertRaises(InvalidArgument, make_http_client, reactor, "/nonexistent/ca.pem")
