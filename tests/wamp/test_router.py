"""
Every message path of the router, over the in-memory transport (no sockets).
"""

import binascii
import gc
import json
import weakref

from autobahn.wamp import message
from autobahn.wamp.auth import compute_wcs
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.serializer import JsonSerializer, MsgPackSerializer
from nacl.signing import SigningKey
from twisted.trial import unittest

from tests.wamp.helpers import CLIENT_ROLES, RouterTestMixin
from zwrm.wamp.auth import Principal, Rule, StaticAuthenticator
from zwrm.wamp.router import BROKER_FEATURES, DEALER_FEATURES, RouterLimits
from zwrm.wamp.transport import FastJsonSerializer

CALL = message.Call.MESSAGE_TYPE


class SessionTests(RouterTestMixin, unittest.SynchronousTestCase):
    def test_ticket_welcome_announces_exactly_the_implemented_features(self):
        c = self.connect()
        c.send(message.Hello("zwrm", CLIENT_ROLES, authmethods=["ticket"], authid="op"))
        self.pump()
        self.assertEqual(c.take()[0].method, "ticket")
        c.send(message.Authenticate("op-ticket"))
        self.pump()
        [w] = c.take()
        self.assertIsInstance(w, message.Welcome)
        self.assertEqual((w.authid, w.authrole, w.authmethod), ("op", "operator", "ticket"))
        self.assertEqual(set(w.roles), {"broker", "dealer"})
        for role, features in (("broker", BROKER_FEATURES), ("dealer", DEALER_FEATURES)):
            announced = {k for k, v in vars(w.roles[role]).items() if v}
            self.assertEqual(announced, set(features))
        self.assertEqual(self.router.session_count(), 1)

    def test_welcome_survives_serialization(self):
        c = self.join("op", serializer=JsonSerializer())
        self.assertTrue(c.session_id)
        self.assertEqual(self.router.session_count(), 1)

    def test_bad_ticket_aborts(self):
        c = self.connect()
        c.send(message.Hello("zwrm", CLIENT_ROLES, authmethods=["ticket"], authid="op"))
        self.pump()
        c.send(message.Authenticate("wrong"))
        self.pump()
        abort = c.last(message.Abort)
        self.assertEqual(abort.reason, "wamp.error.authentication_failed")
        self.assertIn("op", abort.message)
        self.assertTrue(c.closed)
        self.assertEqual(self.router.session_count(), 0)

    def test_unknown_authid_aborts(self):
        c = self.connect()
        c.send(message.Hello("zwrm", CLIENT_ROLES, authmethods=["ticket"], authid="nobody"))
        self.pump()
        c.send(message.Authenticate("x"))
        self.pump()
        self.assertEqual(c.last(message.Abort).reason, "wamp.error.authentication_failed")

    def test_wrong_realm_aborts(self):
        c = self.connect()
        c.send(message.Hello("other", CLIENT_ROLES, authmethods=["ticket"], authid="op"))
        self.pump()
        self.assertEqual(c.last(message.Abort).reason, "wamp.error.no_such_realm")

    def test_anonymous_refused_unless_configured(self):
        c = self.connect()
        c.send(message.Hello("zwrm", CLIENT_ROLES))
        self.pump()
        self.assertEqual(c.last(message.Abort).reason, "wamp.error.no_auth_method")
        self.assertEqual(self.router.session_count(), 0)

    def test_anonymous_when_configured(self):
        self.router.authenticator = StaticAuthenticator(anonymous=True)
        c = self.connect()
        c.send(message.Hello("zwrm", CLIENT_ROLES))
        self.pump()
        w = c.last(message.Welcome)
        self.assertEqual((w.authrole, w.authmethod), ("anonymous", "anonymous"))

    def test_wampcra(self):
        secret = b"s3cret"
        self.router.authenticator = StaticAuthenticator(secrets={"cra": (secret, Principal("cra", "operator"))})
        c = self.connect(JsonSerializer())
        c.send(message.Hello("zwrm", CLIENT_ROLES, authmethods=["wampcra"], authid="cra"))
        self.pump()
        ch = c.last(message.Challenge)
        self.assertEqual(ch.method, "wampcra")
        self.assertEqual(json.loads(ch.extra["challenge"])["authid"], "cra")
        c.send(message.Authenticate(compute_wcs(secret, ch.extra["challenge"].encode()).decode()))
        self.pump()
        self.assertEqual(c.last(message.Welcome).authmethod, "wampcra")

    def test_wampcra_bad_signature(self):
        self.router.authenticator = StaticAuthenticator(secrets={"cra": (b"s", Principal("cra", "operator"))})
        c = self.connect()
        c.send(message.Hello("zwrm", CLIENT_ROLES, authmethods=["wampcra"], authid="cra"))
        self.pump()
        c.send(message.Authenticate("AAAA"))
        self.pump()
        self.assertEqual(c.last(message.Abort).reason, "wamp.error.authentication_failed")

    def _cryptosign(self, key, sign_with):
        pub = key.verify_key.encode().hex()
        self.router.authenticator = StaticAuthenticator(pubkeys={pub: Principal("k1", "agent")})
        c = self.connect(MsgPackSerializer())
        c.send(message.Hello("zwrm", CLIENT_ROLES, authmethods=["cryptosign"], authextra={"pubkey": pub}))
        self.pump()
        ch = c.last(message.Challenge)
        self.assertEqual(ch.method, "cryptosign")
        data = binascii.unhexlify(ch.extra["challenge"])
        sig = sign_with.sign(data).signature
        c.send(message.Authenticate(sig.hex() + data.hex()))
        self.pump()
        return c

    def test_cryptosign(self):
        key = SigningKey.generate()
        c = self._cryptosign(key, key)
        w = c.last(message.Welcome)
        self.assertEqual((w.authid, w.authrole, w.authmethod), ("k1", "agent", "cryptosign"))

    def test_cryptosign_wrong_key(self):
        c = self._cryptosign(SigningKey.generate(), SigningKey.generate())
        self.assertEqual(c.last(message.Abort).reason, "wamp.error.authentication_failed")

    def test_join_timeout(self):
        silent = self.connect()
        slow_auth = self.connect()
        slow_auth.send(message.Hello("zwrm", CLIENT_ROLES, authmethods=["ticket"], authid="op"))
        joined = self.join("op2")
        self.clock.advance(29)
        self.pump()
        self.assertFalse(silent.closed or slow_auth.closed)
        self.clock.advance(1)
        self.pump()
        for c in (silent, slow_auth):
            self.assertEqual(c.last(message.Abort).reason, "wamp.error.timeout")
            self.assertTrue(c.closed)
        self.assertFalse(joined.closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_goodbye(self):
        c = self.join("op")
        c.send(message.Goodbye())
        self.pump()
        self.assertEqual(c.last(message.Goodbye).reason, "wamp.close.goodbye_and_out")
        self.assertEqual(self.router.session_count(), 0)

    def test_kill_by_authid(self):
        a, a2, b = self.join("host1"), self.join("host1"), self.join("op")
        self.assertEqual(self.router.kill_by_authid("host1", "credential revoked"), 2)
        self.pump()
        self.assertEqual(self.router.session_count(), 1)
        for c in (a, a2):
            g = c.last(message.Goodbye)
            self.assertEqual((g.reason, g.message), ("wamp.close.killed", "credential revoked"))
        # a client that answers GOODBYE is disconnected at once, one that does not after 5 s
        a.send(message.Goodbye("wamp.close.goodbye_and_out"))
        self.pump()
        self.assertTrue(a.closed)
        self.assertFalse(a2.closed)
        self.clock.advance(5)
        self.pump()
        self.assertTrue(a2.closed)
        self.assertFalse(b.closed)

    def test_transport_loss_leaves(self):
        c = self.join("op")
        c.transport.close()
        self.pump()
        self.assertEqual(self.router.session_count(), 0)

    def test_closed_sessions_are_counted(self):
        """
        stats.sessions_closed counts every joined session that left, however it left
        (the control plane's garbage-collection policy watches it).
        """
        a, b, c = self.join("op"), self.join("op2"), self.join("host1")
        self.assertEqual(self.router.stats.sessions_closed, 0)
        a.send(message.Goodbye())
        b.transport.close()
        self.router.kill_by_authid("host1", "gone")
        c.send(message.Goodbye("wamp.close.goodbye_and_out"))
        self.pump()
        self.assertEqual(self.router.stats.sessions_closed, 3)
        refused = self.connect()
        refused.send(message.Hello("zwrm", CLIENT_ROLES))
        self.pump()
        self.assertEqual(self.router.stats.sessions_closed, 3)  # never joined


class ProtocolViolationTests(RouterTestMixin, unittest.SynchronousTestCase):
    def assertViolation(self, c):
        self.assertEqual(c.last(message.Abort).reason, "wamp.error.protocol_violation")
        self.assertTrue(c.closed)

    def test_message_before_hello(self):
        c = self.connect()
        c.send(message.Call(1, "zwrm.x"))
        self.pump()
        self.assertViolation(c)

    def test_second_hello(self):
        c = self.join("op")
        other = self.join("op2")
        c.send(message.Hello("zwrm", CLIENT_ROLES, authmethods=["ticket"], authid="op"))
        self.pump()
        self.assertViolation(c)
        self.assertEqual(self.router.session_count(), 1)
        # the other session still works
        other.send(message.Call(1, "wamp.session.count"))
        self.pump()
        self.assertEqual(other.last(message.Result).args, [1])

    def test_router_only_message_from_client(self):
        c = self.join("op")
        c.send(message.Event(1, 2))
        self.pump()
        self.assertViolation(c)

    def test_malformed_bytes(self):
        c = self.join("op", serializer=JsonSerializer())
        c.transport.send_bytes(b"[1, 2, {")
        self.pump()
        self.assertViolation(c)
        self.assertEqual(self.router.session_count(), 0)

    def test_unknown_message_type(self):
        c = self.join("op", serializer=JsonSerializer())
        c.transport.send_bytes(b"[99, 1, {}]")
        self.pump()
        self.assertViolation(c)

    def test_bad_binary_string_in_json(self):
        c = self.join("op", serializer=FastJsonSerializer())
        c.transport.send_bytes(b'[16,1,{},"test.t",["\\u0000not base64!"]]')
        self.pump()
        self.assertViolation(c)

    def test_binary_crosses_serializers(self):
        pub = self.join("host1", serializer=FastJsonSerializer())
        sub = self.join("op", serializer=MsgPackSerializer())
        self.subscribe(sub, "test.bin")
        pub.send(message.Publish(1, "test.bin", args=[b"\x00\xffraw", "text"], kwargs={"k": b"v"}))
        self.pump()
        ev = sub.last(message.Event)
        self.assertEqual((ev.args, ev.kwargs), ([b"\x00\xffraw", "text"], {"k": b"v"}))

    def test_authenticate_without_challenge(self):
        c = self.connect()
        c.send(message.Authenticate("x"))
        self.pump()
        self.assertViolation(c)

    def test_reused_call_request_id_is_an_error_not_a_lost_session(self):
        caller, callee = self.join("op"), self.join("host1")
        self.register(callee, "zwrm.agent.host1.x")
        caller.send(message.Call(7, "zwrm.agent.host1.x"))
        caller.send(message.Call(7, "zwrm.agent.host1.x"))
        self.pump()
        err = caller.last(message.Error)
        self.assertEqual((err.request_type, err.request, err.error),
                         (message.Call.MESSAGE_TYPE, 7, "zwrm.error.invalid_argument"))
        self.assertIn("request id 7", err.args[0])
        self.assertFalse(caller.closed)
        self.assertEqual(caller.take(message.Abort), [])
        # the first call is still served
        [inv] = callee.take(message.Invocation)
        callee.send(message.Yield(inv.request, args=["first"]))
        self.pump()
        self.assertEqual(caller.last(message.Result).args, ["first"])

    def test_request_id_zero_is_a_protocol_violation(self):
        for msg in (message.Call(0, "test.proc"), message.Publish(0, "test.topic"),
                    message.Subscribe(0, "test.topic"), message.Register(0, "test.mine")):
            for serializer in (None, FastJsonSerializer()):
                with self.subTest(msg=type(msg).__name__, serializer=serializer):
                    c = self.join("op", serializer=serializer)
                    c.send(msg)
                    self.pump()
                    self.assertViolation(c)
                    self.assertIn("request id 0", c.last(message.Abort).message)


class DealerTests(RouterTestMixin, unittest.SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.caller = self.join("op")
        self.callee = self.join("host1")

    def call(self, procedure, args=None, kwargs=None, **kw):
        r = self.caller.req()
        self.caller.send(message.Call(r, procedure, args=args, kwargs=kwargs, **kw))
        self.pump()
        return r

    def test_call_result_with_caller_disclosure(self):
        reg = self.register(self.callee, "zwrm.agent.host1.start")
        r = self.call("zwrm.agent.host1.start", [1, 2], {"k": "v"})
        inv = self.callee.last(message.Invocation)
        self.assertEqual((inv.registration, inv.args, inv.kwargs), (reg, [1, 2], {"k": "v"}))
        self.assertEqual((inv.caller, inv.caller_authid, inv.caller_authrole),
                         (self.caller.session_id, "op", "operator"))
        self.callee.send(message.Yield(inv.request, args=["ok"], kwargs={"a": 1}))
        self.pump()
        res = self.caller.last(message.Result)
        self.assertEqual((res.request, res.args, res.kwargs), (r, ["ok"], {"a": 1}))

    def test_no_such_procedure(self):
        r = self.call("zwrm.nothing")
        err = self.caller.last(message.Error)
        self.assertEqual((err.request_type, err.request, err.error), (CALL, r, "wamp.error.no_such_procedure"))

    def test_call_not_authorized(self):
        self.register(self.callee, "zwrm.agent.host1.start")
        v = self.join("view")
        v.send(message.Call(1, "zwrm.agent.host1.start"))
        self.pump()
        self.assertEqual(v.last(message.Error).error, "wamp.error.not_authorized")
        self.assertEqual(self.callee.received, [])

    def test_agent_may_only_register_its_own_procedures(self):
        self.callee.send(message.Register(1, "zwrm.agent.host2.start"))
        self.callee.send(message.Register(2, "zwrm.agent.host1x.start"))
        self.callee.send(message.Register(3, "zwrm.host.list"))
        self.pump()
        errs = self.callee.take(message.Error)
        self.assertEqual([(e.request, e.error) for e in errs],
                         [(i, "wamp.error.not_authorized") for i in (1, 2, 3)])
        self.register(self.callee, "zwrm.agent.host1.start")

    def test_pattern_registration_authorization(self):
        # a prefix registration is allowed only inside the agent's own prefix
        self.callee.send(message.Register(1, "zwrm.agent.", match="prefix"))
        self.callee.send(message.Register(2, "zwrm.agent..start", match="wildcard"))
        self.pump()
        self.assertEqual([e.error for e in self.callee.take(message.Error)], ["wamp.error.not_authorized"] * 2)
        self.register(self.callee, "zwrm.agent.host1.", match="prefix")

    def test_already_registered(self):
        self.register(self.callee, "test.proc")
        other = self.join("host2")
        other.send(message.Register(1, "test.proc"))
        self.pump()
        self.assertEqual(other.last(message.Error).error, "wamp.error.procedure_already_exists")

    def test_unregister(self):
        reg = self.register(self.callee, "test.proc")
        self.callee.send(message.Unregister(5, reg))
        self.pump()
        self.assertEqual(self.callee.last(message.Unregistered).request, 5)
        self.call("test.proc")
        self.assertEqual(self.caller.last(message.Error).error, "wamp.error.no_such_procedure")

    def test_unregister_someone_elses(self):
        reg = self.register(self.callee, "test.proc")
        self.caller.send(message.Unregister(5, reg))
        self.pump()
        self.assertEqual(self.caller.last(message.Error).error, "wamp.error.no_such_registration")

    def test_callee_error_reaches_caller(self):
        self.register(self.callee, "test.proc")
        r = self.call("test.proc")
        inv = self.callee.last(message.Invocation)
        self.callee.send(message.Error(message.Invocation.MESSAGE_TYPE, inv.request, "zwrm.error.not_found",
                                       args=["no such host"], kwargs={"host": "h9"}))
        self.pump()
        err = self.caller.last(message.Error)
        self.assertEqual((err.request, err.error, err.args, err.kwargs),
                         (r, "zwrm.error.not_found", ["no such host"], {"host": "h9"}))

    def test_callee_leaves_pending_callers_get_errors(self):
        self.register(self.callee, "test.proc")
        r = self.call("test.proc")
        self.callee.transport.close()
        self.pump()
        err = self.caller.last(message.Error)
        self.assertEqual((err.request, err.error), (r, "wamp.error.canceled"))
        self.call("test.proc")
        self.assertEqual(self.caller.last(message.Error).error, "wamp.error.no_such_procedure")

    def test_caller_leaves_callee_interrupted(self):
        self.register(self.callee, "test.proc")
        self.call("test.proc")
        inv = self.callee.last(message.Invocation)
        self.caller.transport.close()
        self.pump()
        intr = self.callee.last(message.Interrupt)
        self.assertEqual(intr.request, inv.request)
        # a late YIELD goes nowhere and breaks nothing
        self.callee.send(message.Yield(inv.request))
        self.pump()
        self.assertFalse(self.callee.closed)

    def test_progressive_results(self):
        self.register(self.callee, "test.proc")
        r = self.call("test.proc", receive_progress=True)
        inv = self.callee.last(message.Invocation)
        self.assertTrue(inv.receive_progress)
        for i in range(3):
            self.callee.send(message.Yield(inv.request, args=[i], progress=True))
        self.callee.send(message.Yield(inv.request, args=["done"]))
        self.pump()
        results = self.caller.take(message.Result)
        self.assertEqual([(x.request, x.args, bool(x.progress)) for x in results],
                         [(r, [0], True), (r, [1], True), (r, [2], True), (r, ["done"], False)])

    def test_progress_not_forwarded_unless_asked(self):
        self.register(self.callee, "test.proc")
        self.call("test.proc")
        inv = self.callee.last(message.Invocation)
        self.callee.send(message.Yield(inv.request, args=[0], progress=True))
        self.callee.send(message.Yield(inv.request, args=["done"]))
        self.pump()
        self.assertEqual([x.args for x in self.caller.take(message.Result)], [["done"]])

    def test_cancel_killnowait(self):
        self.register(self.callee, "test.proc")
        r = self.call("test.proc")
        inv = self.callee.last(message.Invocation)
        self.caller.send(message.Cancel(r, mode="killnowait"))
        self.pump()
        self.assertEqual(self.caller.last(message.Error).error, "wamp.error.canceled")
        self.assertEqual(self.callee.last(message.Interrupt).request, inv.request)
        self.callee.send(message.Yield(inv.request, args=["late"]))
        self.pump()
        self.assertEqual(self.caller.take(message.Result), [])

    def test_cancel_kill_waits_for_callee(self):
        self.register(self.callee, "test.proc")
        r = self.call("test.proc")
        inv = self.callee.last(message.Invocation)
        self.caller.send(message.Cancel(r, mode="kill"))
        self.pump()
        self.assertEqual(self.callee.last(message.Interrupt).mode, "kill")
        self.assertEqual(self.caller.take(message.Error), [])
        self.callee.send(message.Error(message.Invocation.MESSAGE_TYPE, inv.request, "wamp.error.canceled"))
        self.pump()
        self.assertEqual(self.caller.last(message.Error).error, "wamp.error.canceled")

    def test_cancel_skip(self):
        self.register(self.callee, "test.proc")
        r = self.call("test.proc")
        self.caller.send(message.Cancel(r, mode="skip"))
        self.pump()
        self.assertEqual(self.caller.last(message.Error).error, "wamp.error.canceled")
        self.assertEqual(self.callee.take(message.Interrupt), [])

    def test_call_timeout_from_caller(self):
        self.register(self.callee, "test.proc")
        r = self.call("test.proc", timeout=500)
        self.clock.advance(0.4)
        self.pump()
        self.assertEqual(self.caller.take(message.Error), [])
        self.clock.advance(0.2)
        self.pump()
        err = self.caller.last(message.Error)
        self.assertEqual((err.request, err.error), (r, "wamp.error.timeout"))
        self.assertEqual(self.callee.last(message.Interrupt).reason, "wamp.error.timeout")

    def test_router_call_timeout(self):
        self.router.limits = RouterLimits(call_timeout=2)
        self.register(self.callee, "test.proc")
        self.call("test.proc")
        self.clock.advance(2)
        self.pump()
        self.assertEqual(self.caller.last(message.Error).error, "wamp.error.timeout")

    def test_answered_call_leaves_no_timer(self):
        self.register(self.callee, "test.proc")
        self.call("test.proc", timeout=1000)
        inv = self.callee.last(message.Invocation)
        self.callee.send(message.Yield(inv.request))
        self.pump()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pending_call_limit(self):
        self.router.limits = RouterLimits(max_pending_calls_per_session=2)
        self.register(self.callee, "test.proc")
        for _ in range(3):
            self.call("test.proc")
        self.assertEqual(len(self.callee.take(message.Invocation)), 2)
        self.assertEqual(self.caller.last(message.Error).error, "zwrm.error.resource_exhausted")

    def test_prefix_and_wildcard_registration(self):
        self.register(self.callee, "test.", match="prefix")
        self.register(self.callee, "test..echo", match="wildcard")
        exact = self.register(self.callee, "test.a.echo")
        self.call("test.a.echo")
        self.assertEqual(self.callee.last(message.Invocation).registration, exact)
        self.callee.take()
        self.call("test.b.echo")
        inv = self.callee.last(message.Invocation)
        self.assertEqual(inv.procedure, "test.b.echo")
        self.callee.take()
        self.call("test.zzz")
        self.assertEqual(self.callee.last(message.Invocation).procedure, "test.zzz")

    def test_registration_reserved_wamp_namespace(self):
        # a role whose rules allow registering anything: only the reserved-namespace
        # guard stands between it and the router's own procedures
        self.router.authorizer._roles["trusted"] += (Rule("", "prefix", {"register"}),)
        ctl = self.join("ctl")
        self.assertTrue(self.router.authorizer.authorize_pattern(
            self.router.get_session(ctl.session_id), "wamp.", "register", "prefix"))
        self.register(ctl, "test.free")  # the rule does let it register
        cases = [("wamp.session.count", None), ("wamp.zwrm.mine", None), ("wamp.", "prefix"),
                 ("wam", "prefix"), ("", "prefix"), (".session.count", "wildcard"), ("wamp..count", "wildcard")]
        for procedure, match in cases:
            with self.subTest(procedure=procedure, match=match):
                r = ctl.req()
                ctl.send(message.Register(r, procedure, match=match))
                self.pump()
                err = ctl.last(message.Error)
                self.assertEqual((err.request, err.error), (r, "wamp.error.invalid_uri"))
                self.assertEqual(ctl.take(message.Registered), [])
                ctl.take()
        # the router still answers its own procedures, and nobody took a wamp. URI
        ctl.send(message.Call(100, "wamp.session.count"))
        self.pump()
        self.assertEqual(ctl.last(message.Result).request, 100)
        for uri in ("wamp.zwrm.mine", "wamp.x.count", "wamp.session.count"):
            reg = self.router._registrations.best_match(uri)
            self.assertTrue(reg is None or reg.handler is not None, uri)


class BrokerTests(RouterTestMixin, unittest.SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.pub = self.join("host1")
        self.sub = self.join("op")

    def publish(self, topic, args=None, **kw):
        r = self.pub.req()
        self.pub.send(message.Publish(r, topic, args=args, **kw))
        self.pump()
        return r

    def test_exact_subscription_and_publisher_disclosure(self):
        sid = self.subscribe(self.sub, "test.topic")
        self.publish("test.topic", [1])
        self.publish("test.other", [2])
        [ev] = self.sub.take(message.Event)
        self.assertEqual((ev.subscription, ev.args), (sid, [1]))
        self.assertEqual((ev.publisher, ev.publisher_authid, ev.publisher_authrole),
                         (self.pub.session_id, "host1", "agent"))
        self.assertIsNone(ev.topic)

    def test_prefix_subscription_with_or_without_trailing_dot(self):
        viewer = self.join("view")  # may subscribe to the prefix zwrm.event. only
        a = self.subscribe(viewer, "zwrm.event", match="prefix")
        b = self.subscribe(viewer, "zwrm.event.", match="prefix")
        self.assertEqual(a, b)
        ctl = self.join("ctl")
        for topic in ("zwrm.event.host.updated", "zwrm.events.x", "zwrm.eventually"):
            ctl.send(message.Publish(ctl.req(), topic, args=[topic]))
        self.pump()
        got = [(e.subscription, e.topic) for e in viewer.take(message.Event)]
        self.assertEqual(got, [(a, "zwrm.event.host.updated")])

    def test_prefix_and_wildcard(self):
        p = self.subscribe(self.sub, "test.a.", match="prefix")
        w = self.subscribe(self.sub, "test..x", match="wildcard")
        self.publish("test.a.x", ["both"])
        self.publish("test.a.y.z", ["prefix"])
        self.publish("test.b.x", ["wild"])
        self.publish("test.b.y", ["none"])
        got = sorted((e.subscription, e.args[0], e.topic) for e in self.sub.take(message.Event))
        self.assertEqual(got, sorted([(p, "both", "test.a.x"), (w, "both", "test.a.x"),
                                      (p, "prefix", "test.a.y.z"), (w, "wild", "test.b.x")]))

    def test_same_topic_shares_subscription(self):
        other = self.join("op2")
        a = self.subscribe(self.sub, "test.t")
        b = self.subscribe(other, "test.t")
        self.assertEqual(a, b)
        self.sub.send(message.Unsubscribe(9, a))
        self.pump()
        self.assertEqual(self.sub.last(message.Unsubscribed).request, 9)
        self.publish("test.t")
        self.assertEqual(len(other.take(message.Event)), 1)
        self.assertEqual(self.sub.take(message.Event), [])

    def test_unsubscribe_unknown(self):
        self.sub.send(message.Unsubscribe(9, 12345))
        self.pump()
        self.assertEqual(self.sub.last(message.Error).error, "wamp.error.no_such_subscription")

    def test_publisher_exclusion(self):
        self.subscribe(self.pub, "test.t")
        self.publish("test.t")
        self.assertEqual(self.pub.take(message.Event), [])
        self.publish("test.t", exclude_me=False)
        self.assertEqual(len(self.pub.take(message.Event)), 1)

    def test_acknowledge(self):
        r = self.publish("test.t", acknowledge=True)
        self.assertEqual(self.pub.last(message.Published).request, r)

    def test_publish_not_authorized(self):
        v = self.join("view")
        v.send(message.Publish(1, "zwrm.event.host", acknowledge=True))
        v.send(message.Publish(2, "zwrm.event.host"))
        self.pump()
        [err] = v.take(message.Error)
        self.assertEqual((err.request, err.error), (1, "wamp.error.not_authorized"))

    def test_subscribe_not_authorized(self):
        v = self.join("view")
        v.send(message.Subscribe(1, "test.t"))
        v.send(message.Subscribe(2, "zwrm.", match="prefix"))
        self.pump()
        self.assertEqual([e.error for e in v.take(message.Error)], ["wamp.error.not_authorized"] * 2)
        self.subscribe(v, "zwrm.event.", match="prefix")

    def test_exclude_and_eligible(self):
        s2, s3 = self.join("op2"), self.join("host2")
        for c in (self.sub, s2, s3):
            self.subscribe(c, "test.t")

        def receivers(**kw):
            self.publish("test.t", **kw)
            return {c.session_id for c in (self.sub, s2, s3) if c.take(message.Event)}

        everyone = {self.sub.session_id, s2.session_id, s3.session_id}
        self.assertEqual(receivers(), everyone)
        self.assertEqual(receivers(exclude=[s2.session_id]), everyone - {s2.session_id})
        self.assertEqual(receivers(eligible=[s2.session_id]), {s2.session_id})
        self.assertEqual(receivers(exclude_authid=["op"]), {s2.session_id, s3.session_id})
        self.assertEqual(receivers(eligible_authid=["op"]), {self.sub.session_id})
        self.assertEqual(receivers(exclude_authrole=["operator"]), {s3.session_id})
        self.assertEqual(receivers(eligible_authrole=["operator"]), {self.sub.session_id, s2.session_id})
        self.assertEqual(receivers(eligible_authrole=["operator"], exclude=[s2.session_id]),
                         {self.sub.session_id})

    def test_subscriber_leaving_is_forgotten(self):
        self.subscribe(self.sub, "test.t")
        self.sub.transport.close()
        self.pump()
        self.publish("test.t")
        self.assertEqual(self.router.stats.events_sent, 0)
        self.assertEqual(self.router._subscriptions.exact, {})


class SlowSubscriberTests(RouterTestMixin, unittest.SynchronousTestCase):
    limits = RouterLimits(max_outgoing_queue=1000)

    def test_events_dropped_then_disconnected(self):
        pub = self.join("host1")
        slow = self.join("op", serializer=JsonSerializer())
        fast = self.join("op2", serializer=JsonSerializer())
        for c in (slow, fast):
            self.subscribe(c, "test.t")
        slow.pair.ends[1].paused = True  # the slow client stops reading
        session = self.router.get_session(slow.session_id)
        for i in range(40):
            pub.send(message.Publish(i + 1, "test.t", args=["x" * 90]))
        self.pump()
        self.assertEqual(len(fast.take(message.Event)), 40)
        self.assertGreater(session.dropped_events, 0)
        held = session.unsent_bytes()
        self.assertLessEqual(held, 1000 + 200)
        self.assertFalse(slow.closed)
        # results are never dropped: a flood of them disconnects the session
        ctl = self.join("ctl")
        self.register(ctl, "zwrm.big")
        for i in range(60):
            slow.transport.send(message.Call(100 + i, "zwrm.big"))
        self.pump()
        for inv in ctl.take(message.Invocation):
            ctl.send(message.Yield(inv.request, args=["y" * 100]))
        self.pump()
        self.assertIsNone(self.router.get_session(slow.session_id))
        self.assertEqual(len(fast.take()), 0)
        pub.send(message.Publish(999, "test.t", args=["after"]))
        self.pump()
        self.assertEqual(len(fast.take(message.Event)), 1)


class MetaApiTests(RouterTestMixin, unittest.SynchronousTestCase):
    def test_on_join_on_leave(self):
        watcher = self.join("op")
        j = self.subscribe(watcher, "wamp.session.on_join")
        lv = self.subscribe(watcher, "wamp.session.on_leave")
        c = self.join("host1")
        [ev] = watcher.take(message.Event)
        self.assertEqual(ev.subscription, j)
        details = ev.args[0]
        self.assertEqual((details["session"], details["authid"], details["authrole"]),
                         (c.session_id, "host1", "agent"))
        c.transport.close()
        self.pump()
        [ev] = watcher.take(message.Event)
        self.assertEqual((ev.subscription, ev.args), (lv, [c.session_id, "host1", "agent"]))

    def test_count_list_get(self):
        a = self.join("op")
        b = self.join("host1")
        a.send(message.Call(1, "wamp.session.count"))
        a.send(message.Call(2, "wamp.session.count", args=[["agent"]]))
        a.send(message.Call(3, "wamp.session.list"))
        a.send(message.Call(4, "wamp.session.get", args=[b.session_id]))
        a.send(message.Call(5, "wamp.session.get", args=[12345]))
        a.send(message.Call(6, "wamp.session.list", kwargs={"filter_authroles": "bad"}))
        self.pump()
        results = {m.request: m for m in a.take()}
        self.assertEqual(results[1].args, [2])
        self.assertEqual(results[2].args, [1])
        self.assertEqual(sorted(results[3].args[0]), sorted([a.session_id, b.session_id]))
        self.assertEqual(results[4].args[0]["authid"], "host1")
        self.assertEqual(results[5].error, "wamp.error.no_such_session")
        self.assertEqual(results[6].error, "wamp.error.invalid_argument")

    def test_clients_cannot_publish_meta_events(self):
        watcher = self.join("op")
        self.subscribe(watcher, "wamp.session.on_join")
        ctl = self.join("ctl")
        watcher.take()
        # even a role whose rules allow it
        self.router.authorizer._roles["trusted"] += (Rule("wamp.", "prefix", {"publish"}),)
        ctl.send(message.Publish(1, "wamp.session.on_join", args=[{"session": 1}], acknowledge=True))
        self.pump()
        self.assertEqual(ctl.last(message.Error).error, "wamp.error.not_authorized")
        self.assertEqual(watcher.take(message.Event), [])

    def test_meta_procedures_are_authorized(self):
        v = self.join("view")
        v.send(message.Call(1, "wamp.session.list"))
        v.send(message.Call(2, "wamp.session.kill_by_authid", args=["host1"]))
        self.pump()
        self.assertEqual([e.error for e in v.take(message.Error)], ["wamp.error.not_authorized"] * 2)

    def test_kill_by_authid(self):
        """
        wamp.session.kill_by_authid(authid, reason=None, message=None), as Crossbar.io has it:
        ends every session of authid but the caller's own, answers their ids.
        """
        op, op2 = self.join("op"), self.join("op")
        a, a2, other = self.join("host1"), self.join("host1"), self.join("host2")
        op.send(message.Call(1, "wamp.session.kill_by_authid", args=["host1"],
                             kwargs={"message": "host marked offline"}))
        self.pump()
        self.assertEqual(sorted(op.last(message.Result).args[0]), sorted([a.session_id, a2.session_id]))
        for c in (a, a2):
            g = c.last(message.Goodbye)
            self.assertEqual((g.reason, g.message), ("wamp.close.killed", "host marked offline"))
        self.assertEqual(other.take(message.Goodbye), [])
        # a reason of the caller's choosing; the caller itself is spared
        op.send(message.Call(2, "wamp.session.kill_by_authid", args=["op", "zwrm.close.revoked"]))
        self.pump()
        self.assertEqual(op.last(message.Result).args, [[op2.session_id]])
        self.assertEqual(op2.last(message.Goodbye).reason, "zwrm.close.revoked")
        self.assertEqual(op.take(message.Goodbye), [])
        # no such sessions: nothing ended; bad arguments: invalid_argument, nothing ended
        calls = [message.Call(3, "wamp.session.kill_by_authid", args=["nobody"]),
                 message.Call(4, "wamp.session.kill_by_authid"),
                 message.Call(5, "wamp.session.kill_by_authid", args=[7]),
                 message.Call(6, "wamp.session.kill_by_authid", args=["host2", "not a uri"]),
                 message.Call(7, "wamp.session.kill_by_authid", args=["host2"], kwargs={"message": 1})]
        for call in calls:
            op.send(call)
        self.pump()
        answers = {m.request: m for m in op.take() if isinstance(m, (message.Result, message.Error))}
        self.assertEqual(answers[3].args, [[]])
        for request in (4, 5, 6, 7):
            self.assertEqual(answers[request].error, "wamp.error.invalid_argument", request)
            self.assertIn("kill_by_authid", answers[request].args[0])
        self.assertEqual(other.take(message.Goodbye), [])


class _RaisingAuthorizer:
    """An authorizer that fails on every question."""

    def authorize(self, session, uri, action):
        raise RuntimeError("authorizer broken")

    def authorize_pattern(self, session, uri, action, match):
        raise RuntimeError("authorizer broken")


class _ExactOnlyAuthorizer:
    """An authorizer that allows every exact URI and knows nothing of patterns."""

    def authorize(self, session, uri, action):
        return True


class AuthorizerFailureTests(RouterTestMixin, unittest.SynchronousTestCase):
    """The router fails closed: an authorizer that raises, or lacks pattern support, denies."""

    def setUp(self):
        super().setUp()
        self.caller = self.join("op")
        self.callee = self.join("host1")
        self.registration = self.register(self.callee, "test.proc")
        self.subscription = self.subscribe(self.callee, "test.topic")

    def assertRefused(self, client, request, error="wamp.error.not_authorized"):
        err = client.last(message.Error)
        self.assertEqual((err.request, err.error), (request, error))
        client.take()

    def test_raising_authorizer_denies_everything(self):
        self.router.authorizer = _RaisingAuthorizer()
        self.router._authorize_pattern = self.router.authorizer.authorize_pattern
        c = self.caller
        c.send(message.Call(1, "test.proc"))
        c.send(message.Publish(2, "test.topic", args=["x"], acknowledge=True))
        c.send(message.Subscribe(3, "test.topic"))
        c.send(message.Subscribe(4, "test.", match="prefix"))
        c.send(message.Register(5, "test.other"))
        c.send(message.Register(6, "test.pre.", match="prefix"))
        self.pump()
        errors = {m.request: m.error for m in c.take() if isinstance(m, message.Error)}
        self.assertEqual(errors, {r: "wamp.error.not_authorized" for r in range(1, 7)})
        self.assertEqual(self.callee.take(), [])  # no INVOCATION, no EVENT
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 6)

    def test_authorizer_without_pattern_support_denies_patterns(self):
        self.router.authorizer = _ExactOnlyAuthorizer()
        self.router._authorize_pattern = None
        c = self.caller
        c.send(message.Subscribe(1, "test.", match="prefix"))
        c.send(message.Subscribe(2, "test..x", match="wildcard"))
        c.send(message.Register(3, "test.pre.", match="prefix"))
        c.send(message.Register(4, "test..x", match="wildcard"))
        c.send(message.Subscribe(5, "test.topic"))
        self.pump()
        errors = {m.request: m.error for m in c.take(message.Error)}
        self.assertEqual(errors, {r: "wamp.error.not_authorized" for r in range(1, 5)})
        self.assertEqual(c.last(message.Subscribed).request, 5)  # exact URIs are still allowed


class SessionLifetimeTests(RouterTestMixin, unittest.SynchronousTestCase):
    """
    A closed session is freed by reference counting alone: it is in no reference
    cycle, so session churn leaves nothing for the cycle collector (whose full
    collections stop the world for seconds with many hosts).
    """

    def busy_session(self, serializer, close):
        callee = self.join("host1", serializer=serializer)
        self.register(callee, "test.echo")
        c = self.join("op", serializer=serializer)
        self.subscribe(c, "test.topic")
        self.subscribe(c, "test.", match="prefix")
        self.register(c, "test.mine")
        c.send(message.Call(1, "test.echo", args=[1]))  # answered
        c.send(message.Call(2, "test.echo", args=[2], timeout=60000))  # still in flight, with a timer
        c.send(message.Publish(3, "test.topic", args=["x"], acknowledge=True))
        self.pump()
        invs = callee.take(message.Invocation)
        callee.send(message.Yield(invs[0].request, args=[1]))
        self.pump()
        ref = weakref.ref(self.router.get_session(c.session_id))
        close(c)
        self.pump()
        self.assertEqual(self.router.session_count(), 1)
        return ref, callee

    def check_freed(self, close):
        for serializer in (None, FastJsonSerializer()):
            with self.subTest(serializer=serializer):
                gc.collect()
                gc.disable()
                try:
                    before = {id(o) for o in gc.get_objects()}
                    ref, callee = self.busy_session(serializer, close)
                    self.assertIsNone(ref(), "the closed RouterSession is still referenced")
                    self.assertEqual(_cyclic_garbage(older=before), [])
                finally:
                    gc.enable()
                callee.transport.close()
                self.pump()

    def test_transport_lost(self):
        self.check_freed(lambda c: c.transport.close())

    def test_goodbye(self):
        def goodbye(c):
            c.send(message.Goodbye())
            self.pump()
            c.transport.close()

        self.check_freed(goodbye)

    def test_killed(self):
        def kill(c):
            self.router.kill_by_authid("op", "bye")
            self.pump()
            c.send(message.Goodbye("wamp.close.goodbye_and_out"))

        self.check_freed(kill)

    def test_protocol_violation(self):
        self.check_freed(lambda c: c.send(message.Call(0, "test.echo")))


def _cyclic_garbage(prefixes=("zwrm.", "autobahn.", "twisted.", "tests."), older=frozenset()):
    """
    What a full collection finds unreachable, of the router's and its tests' making: objects
    (or functions) of those packages. Other threads' garbage (pytest-xdist's execnet thread
    in a worker) does not count, nor do objects in C{older} (ids of objects alive before the
    test): earlier tests' cycles that die meanwhile, e.g. when Twisted's buffer of log events
    (65,536 before logging begins, as in a long test run) drops its oldest, which held them.
    """
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = [o for o in gc.garbage if id(o) not in older and (
                 (getattr(o, "__module__", None) or type(o).__module__ or "").startswith(prefixes)
                 or type(o).__module__.startswith(prefixes))]
        return [repr(o)[:120] for o in found]
    finally:
        gc.set_debug(0)
        del gc.garbage[:]


class ErrorPassThroughTests(unittest.SynchronousTestCase):
    def test_application_error_uri(self):
        from zwrm.errors import NotFound

        e = NotFound("gone")
        self.assertIsInstance(e, ApplicationError)
        self.assertEqual((e.error, e.args), ("zwrm.error.not_found", ("gone",)))


# the same dealer and broker tests with clients that send bytes: the router then parses
# CALL, YIELD and PUBLISH straight from the decoded list (its hot path) and sends
# INVOCATION, RESULT and EVENT as lists


class DealerTestsJson(DealerTests):
    serializer = FastJsonSerializer()


class DealerTestsMsgPack(DealerTests):
    serializer = MsgPackSerializer()


class BrokerTestsJson(BrokerTests):
    serializer = FastJsonSerializer()


class BrokerTestsMsgPack(BrokerTests):
    serializer = MsgPackSerializer()
