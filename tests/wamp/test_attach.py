"""
In-process autobahn ApplicationSessions attached to the router (no sockets).
"""

from autobahn.twisted.wamp import ApplicationSession
from autobahn.wamp import message
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import CallResult, ComponentConfig, PublishOptions, RegisterOptions
from twisted.internet import defer
from twisted.trial import unittest

from tests.wamp.helpers import TICKETS, RouterTestMixin
from zwrm.errors import NotFound
from zwrm.wamp.local import LocalCallee


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


def _frame(obj, mask=b"abcd"):
    """A masked (client-to-server) JSON WebSocket frame."""
    import json

    p = json.dumps(obj, separators=(",", ":")).encode()
    assert len(p) < 126
    return bytes([0x81, 0x80 | len(p)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(p))


def _server_frames(data):
    """The JSON messages in a server's (unmasked, short) frames."""
    import json

    out, pos = [], 0
    while pos < len(data):
        n, head = data[pos + 1] & 0x7F, pos + 2
        if n == 126:
            n, head = int.from_bytes(data[pos + 2:pos + 4], "big"), pos + 4
        out.append(json.loads(data[head:head + n]))
        pos = head + n
    return out


class LocalDeliveryTests(RouterTestMixin, unittest.TestCase):
    """
    A call read from a network connection to an attached session is answered at the end
    of that read (no reactor turns), and the attached session is never re-entered.
    """

    def websocket(self, authid="op"):
        from twisted.internet.error import ConnectionDone
        from twisted.internet.testing import StringTransport
        from twisted.python.failure import Failure

        from zwrm.wamp.transport import websocket_factory

        p, t = websocket_factory(self.router).buildProtocol(None), StringTransport()
        p.makeConnection(t)
        self.addCleanup(p.connectionLost, Failure(ConnectionDone()))  # its ping timers
        p.dataReceived(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                       b"Sec-WebSocket-Protocol: wamp.2.json\r\n\r\n")
        t.clear()
        p.dataReceived(_frame([1, "zwrm", {"roles": {"caller": {}}, "authmethods": ["ticket"],
                               "authid": authid}]))
        p.dataReceived(_frame([5, TICKETS[authid], {}]))
        self.assertEqual([m[0] for m in _server_frames(t.value())], [4, 2])  # CHALLENGE, WELCOME
        t.clear()
        return p, t

    def attach(self, session):
        d = self.router.attach(session, "control", "trusted")
        self.pump()
        return self.successResultOf(d)

    def test_call_to_attached_session_answered_within_the_read(self):
        """
        The RESULT of a WebSocket CALL to an in-process callee is written before
        C{dataReceived} returns, and nothing is left for the reactor.
        """
        self.attach(Control(ComponentConfig(realm="zwrm")))
        p, t = self.websocket()
        deferred = self.router.local_delivery.deferred_flushes
        p.dataReceived(_frame([48, 1, {}, "zwrm.add", [2, 3]]) + _frame([48, 2, {}, "zwrm.lookup", ["h9"]]))
        got = _server_frames(t.value())
        self.assertEqual(got[0], [50, 1, {}, [5]])
        self.assertEqual(got[1][:5], [8, 48, 2, {}, "zwrm.error.not_found"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.router.local_delivery.deferred_flushes, deferred)

    def test_attached_session_runs_after_the_router_returns(self):
        """The in-process callee runs once the read is handled, not inside the router."""
        import traceback

        stacks = []

        class Probe(Control):
            def add(self, a, b):
                stacks.append([f.name for f in traceback.extract_stack()])
                return a + b

        self.attach(Probe(ComponentConfig(realm="zwrm")))
        p, t = self.websocket()
        p.dataReceived(_frame([48, 1, {}, "zwrm.add", [1, 1]]))
        self.assertEqual(_server_frames(t.value()), [[50, 1, {}, [2]]])
        self.assertEqual(len(stacks), 1)
        for inside in ("on_list", "_call", "_fast_frames"):
            self.assertNotIn(inside, stacks[0])

    def test_outside_a_read_delivery_waits_for_the_reactor(self):
        """An in-process session's call that no read started is delivered in a later turn."""
        s = self.attach(Control(ComponentConfig(realm="zwrm")))
        d = s.call("zwrm.add", 1, 2)
        self.assertNoResult(d)
        self.assertTrue(self.clock.getDelayedCalls())
        self.pump()
        self.assertEqual(self.successResultOf(d), 3)

    def test_deliveries_at_a_reads_end_are_bounded(self):
        """
        At most C{MAX_PER_SCOPE} deliveries run at the end of one read; the rest go, in
        order, to later reactor turns.
        """
        from zwrm.wamp.transport import LocalDelivery

        class Turns:
            """A reactor's callLater(0) as turns: step() runs what the last turn left."""

            def __init__(self):
                self.calls = []

            def callLater(self, delay, f, *args):
                self.calls.append((f, args))

            def getDelayedCalls(self):
                return self.calls

            def advance(self, _):
                calls, self.calls = self.calls, []
                for f, args in calls:
                    f(*args)

        clock = Turns()
        delivery = LocalDelivery(clock)
        delivery.MAX_PER_SCOPE = 2
        ran = []

        def again(i):
            ran.append(i)
            if i < 8:
                delivery.schedule(lambda: again(i + 1))  # each delivery schedules another

        delivery.enter()
        delivery.schedule(lambda: again(1))
        self.assertEqual(ran, [])
        delivery.leave()
        self.assertEqual(ran, [1, 2])
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0)  # one delivery, then at most two more at its scope's end
        self.assertEqual(ran, [1, 2, 3, 4, 5])
        clock.advance(0)
        self.assertEqual(ran, [1, 2, 3, 4, 5, 6, 7, 8])
        self.assertEqual(clock.getDelayedCalls(), [])


class LeanControl(LocalCallee, Control):
    """L{Control} taking its INVOCATIONs from the router's lists."""

    async def onJoin(self, details):
        await Control.onJoin(self, details)
        self.pending = defer.Deferred()
        self.canceled = []
        self.pending.addErrback(lambda f: self.canceled.append(f.type) or f)
        await self.register(self.who, "zwrm.who", options=RegisterOptions(details_arg="details"))
        await self.register(lambda: self.pending, "zwrm.wait")
        await self.register(self.broken, "zwrm.broken")
        await self.register(lambda *a, **kw: [list(a), kw], "zwrm.echo")
        await self.register(lambda: CallResult(1, 2, k=3), "zwrm.many")
        await self.register(self.later, "zwrm.later")

    def who(self, details=None):
        return [details.caller_authid, details.caller_authrole, details.procedure]

    def broken(self):
        raise KeyError("boom")

    async def later(self, x):
        return x * 2


class LocalCalleeTests(RouterTestMixin, unittest.TestCase):
    """
    A L{LocalCallee} answers the router's INVOCATION lists itself, with the same results
    and errors as autobahn's own path.
    """

    def attach(self, cls):
        d = self.router.attach(cls(ComponentConfig(realm="zwrm")), "control", "trusted")
        self.pump()
        return self.successResultOf(d)

    CALLS = [("zwrm.add", [2, 3], None), ("zwrm.lookup", ["h9"], None), ("zwrm.who", None, None),
             ("zwrm.broken", None, None), ("zwrm.echo", [1, "a"], {"k": [True]}), ("zwrm.many", None, None),
             ("zwrm.later", [21], None), ("zwrm.add", [1], None), ("zwrm.echo", None, None)]

    def answers(self, cls):
        """What an operator's calls to C{cls}'s procedures get back (marshalled messages)."""
        s = self.attach(cls)
        if not hasattr(s, "who"):  # the plain Control: the same procedures, autobahn's path
            for name in ("who", "broken", "later"):
                setattr(s, name, getattr(LeanControl, name).__get__(s))
            for uri, fn, opts in [("zwrm.who", s.who, RegisterOptions(details_arg="details")),
                                  ("zwrm.broken", s.broken, None),
                                  ("zwrm.echo", lambda *a, **kw: [list(a), kw], None),
                                  ("zwrm.many", lambda: CallResult(1, 2, k=3), None),
                                  ("zwrm.later", s.later, None)]:
                s.register(fn, uri, options=opts)
            self.pump()
        op = self.join("op")
        for i, (uri, args, kwargs) in enumerate(self.CALLS, 1):
            op.send(message.Call(i, uri, args=args, kwargs=kwargs))
        self.pump()
        got = {m.request: m.marshal() for m in op.take()}
        self.flushLoggedErrors(KeyError, TypeError)
        s.leave()
        self.pump()
        return s, [got[i] for i in range(1, len(self.CALLS) + 1)]

    def test_same_answers_as_autobahns_path(self):
        plain, expected = self.answers(Control)
        lean, got = self.answers(LeanControl)
        self.assertEqual(got, expected)
        self.assertEqual(got[0], [50, 1, {}, [5]])
        self.assertEqual(got[2][3], [["op", "operator", "zwrm.who"]])
        self.assertEqual(got[3][4], "wamp.error.runtime_error")
        self.assertEqual(got[5], [50, 6, {}, [1, 2], {"k": 3}])
        self.assertEqual(got[6], [50, 7, {}, [42]])
        self.assertEqual(lean.lean_invocations, len(self.CALLS))
        self.assertEqual(plain.lean_invocations if hasattr(plain, "lean_invocations") else 0, 0)

    def test_interrupt_cancels_a_pending_answer(self):
        s = self.attach(LeanControl)
        op = self.join("op")
        op.send(message.Call(1, "zwrm.wait"))
        self.pump()
        self.assertEqual(op.take(), [])
        self.assertEqual(len(s._invocations), 1)
        op.send(message.Cancel(1, mode="kill"))
        self.pump()
        self.assertEqual(s.canceled, [defer.CancelledError])
        [err] = op.take()
        self.assertEqual(err.error, "wamp.error.canceled")
        self.assertEqual(s._invocations, {})
        self.flushLoggedErrors(defer.CancelledError)
