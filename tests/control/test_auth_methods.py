"""
The authmethods the control plane offers are configurable (C{[wamp] auth_methods}, the
C{--auth-methods} flag; default ticket only): checked as config, and over real WAMP sessions
(real sockets, a real control plane): a method that is not offered gets ABORT
C{wamp.error.no_auth_method}; one that is offered works.
"""

import os

from autobahn.twisted.wamp import ApplicationSession
from autobahn.twisted.websocket import WampWebSocketClientFactory, WampWebSocketClientProtocol
from autobahn.wamp import auth as wamp_auth
from autobahn.wamp.serializer import MsgPackSerializer
from autobahn.wamp.types import ComponentConfig
from twisted.internet import defer, reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm.control.service import ControlPlane
from zwrm.control.tap import Config, Options
from zwrm.testing.processes import temp_dir
from zwrm.tokens import hash_secret


class ConfigTests(SynchronousTestCase):
    def options(self, *args, toml=None):
        argv = ["--data-dir", temp_dir(self), *args]
        if toml is not None:
            path = os.path.join(temp_dir(self), "control.toml")
            with open(path, "w") as f:
                f.write(toml)
            argv += ["--config", path]
        o = Options()
        o.parseOptions(argv)
        return o.config

    def refused(self, *args, toml=None):
        with self.assertRaises(usage.UsageError) as c:
            self.options(*args, toml=toml)
        message = str(c.exception)
        self.assertNotIn("\n", message)
        return message

    def test_default_is_ticket(self):
        self.assertEqual(self.options().auth_methods, ["ticket"])
        self.assertEqual(Config().auth_methods, ["ticket"])

    def test_file_and_flag(self):
        both = '[wamp]\nauth_methods = ["wampcra", "ticket"]\n'
        self.assertEqual(self.options(toml=both).auth_methods, ["wampcra", "ticket"])
        self.assertEqual(self.options("--auth-methods", "ticket,wampcra").auth_methods,
                         ["ticket", "wampcra"])
        # the flag wins over the file
        self.assertEqual(self.options("--auth-methods", "ticket", toml=both).auth_methods,
                         ["ticket"])

    def test_readable_errors(self):
        message = self.refused(toml='[wamp]\nauth_methods = ["ticket", "cryptosign"]\n')
        self.assertIn("cannot offer 'cryptosign'", message)
        self.assertIn("ticket, wampcra", message)
        self.assertIn("cannot offer 'kerberos'", self.refused("--auth-methods", "kerberos"))
        self.assertIn("empty", self.refused(toml="[wamp]\nauth_methods = []\n"))
        self.assertIn("twice", self.refused("--auth-methods", "ticket,ticket"))
        self.assertIn("must be a string or a list",
                      self.refused(toml="[wamp]\nauth_methods = 3\n"))
        self.assertIn("external router", self.refused(
            "--auth-methods", "wampcra", "--router-url", "ws://127.0.0.1:1/ws",
            "--router-ticket-file", __file__, "--registry-url", "http://127.0.0.1:1"))


class DocsTests(SynchronousTestCase):
    def test_docs_list_exactly_the_offered_methods(self):
        """docs/wamp-clients.md's table of the control plane's methods: AUTH_METHODS."""
        import re

        from zwrm.control.auth import AUTH_METHODS, DEFAULT_AUTH_METHODS

        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(os.path.join(root, "docs", "wamp-clients.md")) as f:
            text = f.read()
        section = text[text.index("## Authentication"):text.index("## Roles and authorization")]
        rows = re.findall(r"^\| `([a-z]+)` \(([^)]*)\) \|", section, re.M)
        self.assertEqual([m for m, _ in rows], list(AUTH_METHODS))
        self.assertEqual([m for m, when in rows if when == "default"], list(DEFAULT_AUTH_METHODS))


class _Client(ApplicationSession):
    """Offers C{methods}; answers a ticket challenge with C{ticket}, WAMP-CRA with C{key}."""

    def __init__(self, methods, authid=None, ticket=None, key=None):
        ApplicationSession.__init__(self, ComponentConfig(realm="zwrm"))
        self._methods, self._authid, self._ticket, self._key = methods, authid, ticket, key
        self.joined = defer.Deferred()

    def onConnect(self):
        self.join("zwrm", authmethods=self._methods, authid=self._authid)

    def onChallenge(self, challenge):
        if challenge.method == "wampcra":
            return wamp_auth.compute_wcs(self._key, challenge.extra["challenge"])
        return self._ticket

    def onJoin(self, details):
        self.joined.callback(details)

    def onLeave(self, details):
        if not self.joined.called:
            self.joined.callback(details)  # refused: CloseDetails (reason, message)
        self.disconnect()


class _Protocol(WampWebSocketClientProtocol):
    def connectionLost(self, reason):
        WampWebSocketClientProtocol.connectionLost(self, reason)
        if not self.factory.lost.called:
            self.factory.lost.callback(None)


def d(f):
    def wrapper(self):
        return ensureDeferred(f(self))

    wrapper.__name__ = f.__name__
    return wrapper


class SessionTests(TestCase):
    timeout = 60

    async def plane(self, **kw):
        tmp = temp_dir(self)
        plane = ControlPlane(reactor, Config(listen=["tcp:0:interface=127.0.0.1"],
                                             data_dir=os.path.join(tmp, "cp"), **kw))
        plane.startService()
        self.addCleanup(plane.stopService)
        await plane.started
        self.port = plane.ports[0].getHost().port
        joined = await plane.registry.join(None, {"name": "a1"})
        return plane, joined["host_id"], joined["credential"]

    async def session(self, client):
        factory = WampWebSocketClientFactory(lambda: client, url=f"ws://127.0.0.1:{self.port}/ws",
                                             serializers=[MsgPackSerializer()])
        factory.noisy = False
        factory.protocol = _Protocol
        factory.lost = defer.Deferred()
        proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(factory)

        def close():
            if not factory.lost.called:
                proto.transport.abortConnection()
            return factory.lost

        self.addCleanup(close)
        return await client.joined

    @d
    async def test_default_offers_ticket_only(self):
        plane, host_id, credential = await self.plane()
        key = hash_secret(credential)
        for methods in (["wampcra"], ["anonymous"], ["cryptosign"]):
            refused = await self.session(_Client(methods, host_id, key=key))
            self.assertEqual(refused.reason, "wamp.error.no_auth_method", methods)
            self.assertIn("offered: ['ticket']", refused.message)
        welcome = await self.session(_Client(["wampcra", "ticket"], host_id, ticket=credential))
        self.assertEqual((welcome.authmethod, welcome.authid, welcome.authrole),
                         ("ticket", host_id, "agent"))

    @d
    async def test_wampcra_when_configured(self):
        plane, host_id, credential = await self.plane(auth_methods=["wampcra", "ticket"])
        welcome = await self.session(_Client(["wampcra"], host_id, key=hash_secret(credential)))
        self.assertEqual((welcome.authmethod, welcome.authid, welcome.authrole),
                         ("wampcra", host_id, "agent"))
        wrong = await self.session(_Client(["wampcra"], host_id, key=hash_secret("guess")))
        self.assertEqual(wrong.reason, "wamp.error.authentication_failed")
        operator = await self.session(_Client(["wampcra"], "operator", key="x"))
        self.assertEqual(operator.reason, "wamp.error.authentication_failed")
        self.assertIn("hosts only", operator.message)

    @d
    async def test_ticket_can_be_disabled(self):
        plane, host_id, credential = await self.plane(auth_methods=["wampcra"])
        refused = await self.session(_Client(["ticket"], host_id, ticket=credential))
        self.assertEqual(refused.reason, "wamp.error.no_auth_method")
        self.assertIn("offered: ['wampcra']", refused.message)
