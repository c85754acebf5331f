"""
The control plane's RawSocket listener (C{--listen rawsocket:<endpoint>}, docs/wamp-clients.md):
autobahn's RawSocket client over a real socket, plain and with TLS, joins with a ticket and
calls a procedure (issue 12 item 3).
"""

import os

from autobahn.twisted.rawsocket import WampRawSocketClientFactory
from autobahn.twisted.wamp import ApplicationSession
from autobahn.wamp.serializer import JsonSerializer, MsgPackSerializer
from autobahn.wamp.types import ComponentConfig
from twisted.internet import defer, endpoints, reactor, ssl
from twisted.internet.defer import ensureDeferred
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm import pki
from zwrm.agent.service import AgentService, _PinnedOptions
from zwrm.agent.tap import AgentConfig
from zwrm.control.service import ControlPlane
from zwrm.control.tap import Config, Options
from zwrm.testing.processes import temp_dir


class _Client(ApplicationSession):
    def __init__(self, authid, ticket):
        ApplicationSession.__init__(self, ComponentConfig(realm="zwrm"))
        self._authid = authid
        self._ticket = ticket
        self.joined = defer.Deferred()
        self.left = defer.Deferred()

    def onConnect(self):
        self.join("zwrm", authmethods=["ticket"], authid=self._authid)

    def onChallenge(self, challenge):
        return self._ticket

    def onJoin(self, details):
        self.joined.callback(details)

    def onLeave(self, details):
        if not self.joined.called:
            self.joined.errback(RuntimeError(f"{details.reason}: {details.message}"))
        self.disconnect()

    def onDisconnect(self):
        if not self.left.called:
            self.left.callback(None)


class RawSocketListenerTests(TestCase):
    timeout = 60

    def test_plain_and_tls(self):
        return ensureDeferred(self._scenario())

    async def _scenario(self):
        tmp = temp_dir(self)
        config = Config(listen=["tcp:0:interface=127.0.0.1",
                                "rawsocket:tcp:0:interface=127.0.0.1",
                                "rawsocket:ssl:0:interface=127.0.0.1"],
                        data_dir=os.path.join(tmp, "cp"))
        plane = ControlPlane(reactor, config)
        plane.startService()
        self.addCleanup(plane.stopService)
        await plane.started
        with open(os.path.join(config.data_dir, "operator.token")) as f:
            token = f.read().strip()
        with open(os.path.join(config.data_dir, "control.url")) as f:
            urls = f.read().split()
        plain, tls = (p.getHost().port for p in plane.ports[1:])
        self.assertEqual(urls[1:], [f"rs://127.0.0.1:{plain}", f"rss://127.0.0.1:{tls}"])

        with open(os.path.join(config.data_dir, "pki", "ca.pem"), "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        tcp = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", tls)
        cases = [
            (endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", plain), JsonSerializer()),
            (endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", plain), MsgPackSerializer()),
            (endpoints.wrapClientTLS(ssl.optionsForClientTLS("127.0.0.1", trustRoot=trust), tcp),
             JsonSerializer()),
        ]
        for n, (endpoint, serializer) in enumerate(cases):
            session = _Client("operator", token)
            factory = WampRawSocketClientFactory(lambda s=session: s, serializer=serializer)
            await endpoint.connect(factory)
            details = await session.joined
            self.assertEqual(details.authrole, "operator")
            self.assertEqual(await session.call("zwrm.host.list"), [])
            created = await session.call("zwrm.app.create", f"web-{n}")
            self.assertEqual(created["name"], f"web-{n}")
            session.leave()
            await session.left

        # a bad ticket is refused over RawSocket too
        session = _Client("operator", "wrong")
        factory = WampRawSocketClientFactory(lambda: session, serializer=JsonSerializer())
        await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", plain).connect(factory)
        with self.assertRaises(RuntimeError) as c:
            await session.joined
        self.assertIn("authentication_failed", str(c.exception))
        await session.left


class HostCertificateTests(TestCase):
    """Over RawSocket with TLS, a host certificate only authenticates its own host id."""

    timeout = 60

    def test_certificate_for_another_host(self):
        return ensureDeferred(self._scenario())

    async def _scenario(self):
        tmp = temp_dir(self)
        config = Config(listen=["ssl:0:interface=127.0.0.1", "rawsocket:ssl:0:interface=127.0.0.1"],
                        data_dir=os.path.join(tmp, "cp"), heartbeat_interval=0.2,
                        flush_interval=0.2)
        plane = ControlPlane(reactor, config)
        plane.startService()
        self.addCleanup(plane.stopService)
        await plane.started
        wss, raw = (p.getHost().port for p in plane.ports)
        with open(os.path.join(config.data_dir, "join.token")) as f:
            join_token = f.read().strip()
        agent = AgentService(reactor, AgentConfig(
            url=f"wss://127.0.0.1:{wss}/ws", join_token=join_token, name="a1",
            data_dir=os.path.join(tmp, "a1"), retry_initial=0.05, retry_max=0.2))
        agent.startService()
        self.addCleanup(agent.stopService)
        await agent.registered
        creds = pki.HostCredentials.load(os.path.join(tmp, "a1", pki.AGENT_TLS_DIR))
        options = _PinnedOptions("127.0.0.1", creds.fingerprint,
                                 client_certificate=(creds.cert_pem, creds.key_pem),
                                 ca_certificate=creds.ca_pem)
        session = _Client("h-other", agent.identity.credential)
        factory = WampRawSocketClientFactory(lambda: session, serializer=JsonSerializer())
        await endpoints.wrapClientTLS(
            options, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", raw)).connect(factory)
        with self.assertRaises(RuntimeError) as c:
            await session.joined
        self.assertIn(f"the TLS client certificate is for host {creds.host_id!r}, not for"
                      " 'h-other'", str(c.exception))
        await session.left


class OptionTests(SynchronousTestCase):
    def parse(self, *argv):
        o = Options()
        o.parseOptions(list(argv))
        return o.config

    def test_listen_rawsocket(self):
        c = self.parse("--listen", "tcp:8080:interface=127.0.0.1",
                       "--listen", "rawsocket:tcp:8081:interface=127.0.0.1",
                       "--listen", "rawsocket:ssl:8443:interface=0.0.0.0")
        self.assertEqual(c.listen[1:], ["rawsocket:tcp:8081:interface=127.0.0.1",
                                        "rawsocket:ssl:8443:interface=0.0.0.0"])
        # a plain RawSocket listener beyond loopback needs insecure_listen, like any other
        self.assertRaises(usage.UsageError, self.parse, "--listen", "rawsocket:tcp:8081")
        self.assertRaises(usage.UsageError, self.parse, "--listen", "rawsocket:bogus:1")
