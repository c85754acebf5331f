"""
The parts of running behind an external router that need no router process: the dynamic
authenticator and authorizer Crossbar calls (over a real control plane's store, registry
and CA, with certificate details in the form Crossbar passes them), the session kill through
the WAMP meta API on the embedded router, and the configuration checks.
"""

import inspect
import os

from autobahn.twisted.wamp import ApplicationSession
from autobahn.twisted.websocket import WampWebSocketClientFactory
from autobahn.util import peer_certificate_details
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.serializer import JsonSerializer
from autobahn.wamp.types import ComponentConfig
from cryptography import x509
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm import pki
from zwrm.control import schema
from zwrm.control.api import procedures_of
from zwrm.control.auth import ControlAuthenticator
from zwrm.control.cluster import ClusterAPI
from zwrm.control.crossbar import CrossbarAPI, certified_host_id
from zwrm.control.roles import roles
from zwrm.control.service import ControlPlane
from zwrm.control.tap import Config, check_config
from zwrm.testing.processes import poll, temp_dir


async def start_plane(testcase, **kw):
    config = Config(listen=["tcp:0:interface=127.0.0.1"],
                    data_dir=os.path.join(temp_dir(testcase), "cp"),
                    heartbeat_interval=1.0, flush_interval=0.2, **kw)
    plane = ControlPlane(reactor, config)
    plane.startService()
    testcase.addCleanup(plane.stopService)
    await plane.started
    plane.url = f"ws://127.0.0.1:{plane.ports[0].getHost().port}/ws"
    with open(os.path.join(config.data_dir, "operator.token")) as f:
        plane.operator_token = f.read().strip()
    return plane


def crossbar_view(cert_pem):
    """A certificate as Crossbar passes it to a dynamic authenticator (transport.peer_cert)."""
    return peer_certificate_details(x509.load_pem_x509_certificate(cert_pem.encode()))


class AuthenticatorTests(TestCase):
    async def setUp(self):
        self.plane = await start_plane(self)
        self.api = CrossbarAPI(
            ControlAuthenticator(self.plane.store, self.plane.registry,
                                 join_tokens=self.plane.pki), roles())
        joined = await self.plane.registry.join("h-one", {"name": "one"})
        self.credential = joined["credential"]
        await self.plane.registry.join("h-two", {"name": "two"})

    def cert(self, host_id):
        _key, csr = pki.make_host_request(host_id)
        return crossbar_view(self.plane.pki.sign(csr.decode(), host_id)["certificate"])

    async def refused(self, authid, details, words):
        with self.assertRaises(ApplicationError) as c:
            await self.api.authenticate("zwrm", authid, details)
        self.assertEqual(c.exception.error, "wamp.error.authentication_failed")
        self.assertIn(words, c.exception.args[0])

    async def test_tokens_and_credentials(self):
        """Each kind of ticket gets its role, as with the embedded router; bad ones are refused."""
        op = await self.api.authenticate("zwrm", "operator", {"ticket": self.plane.operator_token,
                                                               "authmethod": "ticket"})
        self.assertEqual((op["authid"], op["role"]), ("operator", "operator"))
        with open(os.path.join(self.plane.config.data_dir, "join.token")) as f:
            join = await self.api.authenticate("zwrm", "join", {"ticket": f.read().strip()})
        self.assertEqual(join["role"], "joining")
        host = await self.api.authenticate("zwrm", "h-one", {"ticket": self.credential,
                                                             "transport": {"peer_cert": None}})
        self.assertEqual((host["authid"], host["role"]), ("h-one", "agent"))
        await self.refused("operator", {"ticket": "nope"}, "operator token was not accepted")
        await self.refused("h-two", {"ticket": self.credential}, "credential of host 'h-two'")
        await self.refused("h-nobody", {"ticket": "x"}, "unknown host")
        await self.refused("operator", {"ticket": self.plane.operator_token,
                                        "authmethod": "wampcra"}, "ticket authentication only")

    async def test_host_certificate_binding(self):
        """
        A host presenting a TLS client certificate (as Crossbar describes it) must present its
        own: another host's certificate, or one that names no host, is refused even with the
        right credential.
        """
        own = self.cert("h-one")
        self.assertEqual(certified_host_id(own), "h-one")
        ok = await self.api.authenticate("zwrm", "h-one", {"ticket": self.credential,
                                                           "transport": {"peer_cert": own}})
        self.assertEqual(ok["role"], "agent")
        # older Crossbar releases pass it as client_cert only
        await self.api.authenticate("zwrm", "h-one", {"ticket": self.credential,
                                                      "transport": {"client_cert": own}})
        await self.refused("h-one", {"ticket": self.credential,
                                     "transport": {"peer_cert": self.cert("h-two")}},
                           "certificate is for host 'h-two'")
        server = crossbar_view(self.plane.pki.ca.certificate_pem.decode())
        await self.refused("h-one", {"ticket": self.credential,
                                     "transport": {"peer_cert": server}},
                           "not a zwrm host certificate")

    async def test_tls_transport_details_fit_the_schema(self):
        """
        The details Crossbar passes for a TLS transport fit zwrm.crossbar.authenticate's
        schema (its channel id is bytes) and travel over the control component's first
        serializer (a certificate's serial number can be 160 bits: too big for MessagePack).
        """
        import txaio

        txaio.use_twisted()
        from autobahn.wamp import message
        from autobahn.wamp.serializer import CBORSerializer

        from zwrm.control.crossbar import ExternalRouter

        peer = self.cert("h-one")
        peer["serial"] = 2**159 + 1  # the largest serials X.509 allows are this long
        details = {"ticket": self.credential, "authmethod": "ticket",
                   "transport": {"channel_type": "tls", "is_secure": True, "peer_cert": peer,
                                 "channel_id": {"tls-unique": b"\x01" * 12}}}
        schema.PROCEDURES["zwrm.crossbar.authenticate"].check(["zwrm", "h-one", details], {})
        router = ExternalRouter(reactor, "ws://127.0.0.1:1/ws", "zwrm", "control", "t", [])
        # the subprotocols it offers, in its order of preference
        self.assertEqual(router.factory.protocols[0], "wamp.2.cbor")
        first = CBORSerializer()
        wire, _ = first.serialize(message.Invocation(1, 2, args=["zwrm", "h-one", details]))
        [back] = first.unserialize(wire)
        self.assertEqual(back.args[2]["transport"]["peer_cert"]["serial"], 2**159 + 1)
        self.assertEqual((await self.api.authenticate("zwrm", "h-one", back.args[2]))["authid"],
                         "h-one")


class AuthorizerTests(SynchronousTestCase):
    def setUp(self):
        self.api = CrossbarAPI(None, roles())

    def decide(self, authid, role, uri, action, match=None):
        options = {"match": match} if match else {}
        return self.api.authorize({"authid": authid, "authrole": role, "session": 1}, uri,
                                  action, options)

    def test_agent(self):
        """
        An agent calls the agent procedures (disclosed, so the control plane knows which host
        calls) and registers only its own host's procedures; what depends on its authid is
        never cached (Crossbar's cache key has no authid).
        """
        self.assertEqual(self.decide("h-1", "agent", "zwrm.agent.heartbeat", "call"),
                         {"allow": True, "cache": True, "disclose": True})
        self.assertEqual(self.decide("h-1", "agent", "zwrm.cluster.info", "call")["allow"], True)
        self.assertEqual(self.decide("h-1", "agent", "zwrm.host.list", "call"),
                         {"allow": False, "cache": True})
        self.assertEqual(self.decide("h-1", "agent", "zwrm.agent.h-1.machine.start", "register"),
                         {"allow": True, "cache": False})
        self.assertEqual(self.decide("h-2", "agent", "zwrm.agent.h-1.machine.start", "register"),
                         {"allow": False, "cache": False})
        self.assertFalse(self.decide("h-1", "agent", "zwrm.agent.", "register", "prefix")["allow"])
        self.assertTrue(self.decide("h-1", "agent", "zwrm.agent.h-1.", "register", "prefix")["allow"])
        self.assertFalse(self.decide("h-1", "agent", "zwrm.agent.h-1.x", "call")["allow"])
        self.assertFalse(self.decide("h-1", "agent", "zwrm.event.host", "publish")["allow"])

    def test_other_roles(self):
        """Operators, viewers and joining agents get exactly zwrm's role table; other roles nothing."""
        self.assertTrue(self.decide("operator", "operator", "zwrm.host.drain", "call")["allow"])
        self.assertTrue(self.decide("operator", "operator", "zwrm.event.", "subscribe",
                                    "prefix")["allow"])
        self.assertFalse(self.decide("operator", "operator", "zwrm.agent.h-1.machine.start",
                                     "call")["allow"])
        self.assertFalse(self.decide("operator", "operator", "zwrm.crossbar.authenticate",
                                     "call")["allow"])
        self.assertTrue(self.decide("viewer", "viewer", "zwrm.host.list", "call")["allow"])
        self.assertFalse(self.decide("viewer", "viewer", "zwrm.host.drain", "call")["allow"])
        self.assertTrue(self.decide("join", "joining", "zwrm.agent.join", "call")["allow"])
        self.assertFalse(self.decide("join", "joining", "zwrm.agent.register", "call")["allow"])
        for role in ("trusted", "control", "anonymous", None):
            self.assertFalse(self.decide("x", role, "zwrm.host.list", "call")["allow"], role)
        self.assertFalse(self.api.authorize("not a mapping", "zwrm.host.list", "call")["allow"])

    def test_schemas(self):
        """The procedures an external router calls, and zwrm.cluster.info, fit their schemas."""
        for api in (self.api, ClusterAPI()):
            for uri, endpoint, _options in procedures_of(api):
                p = schema.PROCEDURES[uri]
                params = list(inspect.signature(endpoint).parameters.values())
                self.assertEqual([a.name for a in p.args], [v.name for v in params], uri)


class _Agent(ApplicationSession):
    def __init__(self, authid, ticket):
        ApplicationSession.__init__(self, ComponentConfig(realm="zwrm"))
        self._id, self._ticket = authid, ticket
        self.joined, self.left, self.gone = defer.Deferred(), defer.Deferred(), defer.Deferred()

    def onConnect(self):
        self.join("zwrm", authmethods=["ticket"], authid=self._id)

    def onChallenge(self, challenge):
        return self._ticket

    def onJoin(self, details):
        self.joined.callback(details)

    def onLeave(self, details):
        self.left.callback(details)
        self.disconnect()

    def onDisconnect(self):
        ApplicationSession.onDisconnect(self)
        if not self.gone.called:
            self.gone.callback(None)


class EmbeddedKillTests(TestCase):
    async def test_offline_host_session_ended_through_meta_api(self):
        """
        Marking a host offline ends its session through wamp.session.kill_by_authid, which the
        embedded router offers as Crossbar does (GOODBYE wamp.close.killed); other sessions stay.
        """
        plane = await start_plane(self)
        joined = await plane.registry.join("h-one", {"name": "one"})
        sessions = []
        for authid, ticket in (("h-one", joined["credential"]),
                               ("operator", plane.operator_token)):
            s = _Agent(authid, ticket)
            port = plane.ports[0].getHost().port
            factory = WampWebSocketClientFactory(lambda s=s: s, url=plane.url,
                                                 serializers=[JsonSerializer()])
            await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
            await s.joined
            sessions.append(s)
        agent, operator = sessions
        killed = await plane._drop_host_session("h-one")
        self.assertEqual(len(killed), 1)
        details = await agent.left
        self.assertEqual(details.reason, "wamp.close.killed")
        self.assertIn("host marked offline", details.message)
        self.assertTrue(operator.is_attached())
        self.assertEqual(await plane._drop_host_session("h-nobody"), [])
        await poll(reactor, lambda: plane.router.session_count() == 2, 10,
                   what="only the operator and the control component left")
        await agent.gone
        operator.leave()
        await operator.gone
        # autobahn's WebSocket close timers sit in txaio buckets until their bucket's time
        await poll(reactor, lambda: not any("_notify_bucket" in repr(c)
                                            for c in reactor.getDelayedCalls()), 10,
                   what="the WebSocket close timers")


class ConfigTests(SynchronousTestCase):
    def check(self, **kw):
        config = Config(**kw)
        check_config(config)
        return config

    def refused(self, words, **kw):
        with self.assertRaises(usage.UsageError) as c:
            self.check(**kw)
        self.assertIn(words, str(c.exception))

    def test_router_settings(self):
        """router_url needs a ticket and registry_url, refuses RawSocket listeners and plain
        ws:// beyond loopback; registry_url must be an http(s) base URL."""
        ticket = self.mktemp()
        with open(ticket, "w") as f:
            f.write("secret\n")
        good = {"router_url": "ws://127.0.0.1:8082/ws", "router_ticket_file": ticket,
                "registry_url": "http://127.0.0.1:8080"}
        self.assertEqual(self.check(**good).router_secret(), "secret")
        self.refused("exactly one of router_ticket", **dict(good, router_ticket_file=None))
        self.refused("exactly one of router_ticket", **dict(good, router_ticket="x"))
        self.refused("needs registry_url", **dict(good, registry_url=None))
        self.refused("listen serves HTTP only",
                     **dict(good, listen=["rawsocket:tcp:8081:interface=127.0.0.1"]))
        self.refused("plain ws:// beyond loopback", **dict(good, router_url="ws://cb.example:8082"))
        self.refused("ws:// or wss://", **dict(good, router_url="http://127.0.0.1:8082"))
        self.refused("registry_url must be an http", **dict(good, registry_url="ftp://x"))
        self.refused("needs router_url", router_ticket="x")
        empty = self.mktemp()
        open(empty, "w").close()
        self.refused("is empty", **dict(good, router_ticket_file=empty))
        self.refused("No such file", **dict(good, router_ticket_file=empty + ".missing"))


class LearnRegistryTests(TestCase):
    async def test_cli_learns_registry_url(self):
        """
        The CLI takes the registry's address from zwrm.cluster.info when the control plane
        gives one, and falls back to its WAMP URL's host and port when it gives none or
        cannot be asked.
        """
        from zwrm.cli.images import learn_registry_url

        elsewhere = "http://127.0.0.1:9"
        plane = await start_plane(self, registry_url=elsewhere, console_url="http://c.example")
        settings = {"url": plane.url, "token": plane.operator_token, "authid": "operator",
                    "timeout": 30}
        self.assertEqual(await learn_registry_url(reactor, settings), elsewhere)
        info = await plane.session.call("zwrm.cluster.info")
        self.assertEqual((info["registry_url"], info["console_url"]),
                         (elsewhere, "http://c.example"))
        plain = await start_plane(self)
        self.assertIsNone(await learn_registry_url(
            reactor, dict(settings, url=plain.url, token=plain.operator_token)))
        self.assertIsNone(await learn_registry_url(
            reactor, dict(settings, url=plane.url, token="wrong")))
