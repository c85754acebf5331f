"""
In-process autobahn ApplicationSessions attached to the router (no sockets).
"""

from autobahn.twisted.wamp import ApplicationSession
from autobahn.wamp import message
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import ComponentConfig, PublishOptions
from twisted.internet import defer
from twisted.trial import unittest

from tests.wamp.helpers import RouterTestMixin
from zwrm.errors import NotFound


class Control(ApplicationSession):
    """A trusted in-process component, like the control plane's."""

    joined = False

    async def onJoin(self, details):
        self.details = details
        self.events = []
        await self.register(self.add, "zwrm.add")
        await self.register(self.lookup, "zwrm.lookup")
        await self.register(lambda: object(), "zwrm.weird")
        await self.subscribe(self.events.append, "zwrm.event.test")
        self.joined = True

    def add(self, a, b):
        return a + b

    def lookup(self, name):
        raise NotFound(f"no host {name!r}")


class AttachTests(RouterTestMixin, unittest.TestCase):
    def attach(self, session=None, authid="control", authrole="trusted"):
        session = session or Control(ComponentConfig(realm="zwrm"))
        d = self.router.attach(session, authid, authrole)
        self.pump()
        return self.successResultOf(d)

    def test_attach_runs_onjoin_with_identity(self):
        s = self.attach()
        self.assertTrue(s.joined)
        self.assertEqual((s.details.authid, s.details.authrole), ("control", "trusted"))
        self.assertEqual(self.router.session_count(), 1)

    def test_attach_fires_only_after_onjoin(self):
        d = self.router.attach(Control(ComponentConfig(realm="zwrm")), "control", "trusted")
        self.assertNoResult(d)
        self.pump()
        self.assertTrue(self.successResultOf(d).joined)

    def test_remote_caller_gets_result_and_application_errors(self):
        self.attach()
        op = self.join("op")
        op.send(message.Call(1, "zwrm.add", args=[2, 3]))
        op.send(message.Call(2, "zwrm.lookup", args=["h9"]))
        self.pump()
        res = {m.request: m for m in op.take()}
        self.assertEqual(res[1].args, [5])
        self.assertIsInstance(res[2], message.Error)
        self.assertEqual((res[2].error, res[2].args), ("zwrm.error.not_found", ["no host 'h9'"]))

    def test_in_process_caller_and_subscriber(self):
        s = self.attach()
        d = s.call("zwrm.add", 1, 1)
        self.pump()
        self.assertEqual(self.successResultOf(d), 2)
        d = s.call("zwrm.lookup", "x")
        self.pump()
        f = self.failureResultOf(d, ApplicationError)
        self.assertEqual(f.value.error, "zwrm.error.not_found")
        d = s.publish("zwrm.event.test", "hello", options=PublishOptions(acknowledge=True, exclude_me=False))
        self.pump()
        self.successResultOf(d)
        self.assertEqual(s.events, ["hello"])

    def test_attach_to_unauthorized_role_cannot_register(self):
        class Bad(ApplicationSession):
            async def onJoin(self, details):
                await self.register(lambda: 1, "zwrm.secret")

        d = self.router.attach(Bad(ComponentConfig(realm="zwrm")), "x", "viewer")
        self.pump()
        # the failed onJoin fails the attach; nothing was registered
        f = self.failureResultOf(d, ApplicationError)
        self.assertEqual(f.value.error, "wamp.error.not_authorized")
        self.assertIsNone(self.router._registrations.best_match("zwrm.secret"))
        self.flushLoggedErrors(ApplicationError)

    def test_leave_is_seen_by_router(self):
        s = self.attach()
        s.leave()
        self.pump()
        self.assertEqual(self.router.session_count(), 0)

    def test_kill_in_process_session(self):
        s = self.attach()
        left = defer.Deferred()
        s.on("leave", lambda session, details: left.callback(details.reason))
        self.router.kill_by_authid("control", "bye")
        self.pump()
        self.assertEqual(self.successResultOf(left), "wamp.close.killed")

    def test_unserializable_result_becomes_an_error(self):
        from autobahn.wamp.serializer import JsonSerializer

        self.attach()
        op = self.join("op", serializer=JsonSerializer())
        op.send(message.Call(1, "zwrm.weird"))
        op.send(message.Call(2, "zwrm.add", args=[1, 2]))
        self.pump()
        res = {m.request: m for m in op.take()}
        self.assertEqual(res[1].error, "wamp.error.invalid_payload")
        self.assertEqual(res[2].args, [3])
        self.assertFalse(op.closed)
