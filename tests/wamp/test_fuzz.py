"""
Random and mutated frames from one client: the router neither crashes nor misroutes,
and the other sessions keep working.
"""

import json

from autobahn.wamp import message
from autobahn.wamp.serializer import CBORSerializer, MsgPackSerializer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import Logger
from twisted.trial import unittest

import zwrm.wamp.router as router_module
from tests.wamp.helpers import RouterTestMixin
from zwrm.wamp.transport import FastJsonSerializer

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**60), max_value=2**60) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)

# valid frames the attacker may send once joined (JSON arrays), to be mutated
VALID = [
    [1, "zwrm", {"roles": {"caller": {}}, "authmethods": ["ticket"], "authid": "op"}],
    [5, "op-ticket", {}],
    [6, {}, "wamp.close.normal"],
    [3, {}, "wamp.error.x"],
    [16, 1, {"acknowledge": True}, "test.topic", [1], {"a": 1}],
    [16, 2, {"exclude": [1], "eligible_authrole": ["operator"]}, "test.topic"],
    [32, 3, {}, "test.topic"],
    [32, 4, {"match": "prefix"}, "test."],
    [32, 5, {"match": "wildcard"}, "test..x"],
    [34, 6, 1],
    [48, 7, {}, "test.proc", [1], {}],
    [48, 8, {"receive_progress": True, "timeout": 10}, "test.proc"],
    [49, 7, {"mode": "kill"}],
    [64, 9, {}, "test.mine"],
    [64, 10, {"match": "prefix"}, "test.mine."],
    [66, 11, 1],
    [70, 1, {"progress": True}, ["x"]],
    [70, 1, {}],
    [8, 68, 1, {}, "wamp.error.x", ["boom"]],
    [48, 12, {}, "wamp.session.get", [1]],
    [48, 13, {}, "wamp.session.list", ["x"]],
]


@st.composite
def mutated(draw):
    frame = list(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.integers(0, 2))
        if op == 0 and frame:
            frame[draw(st.integers(0, len(frame) - 1))] = draw(json_values)
        elif op == 1:
            frame.insert(draw(st.integers(0, len(frame))), draw(json_values))
        elif frame:
            del frame[draw(st.integers(0, len(frame) - 1))]
    return frame


class FuzzTests(RouterTestMixin, unittest.SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.failures = []
        self._old_log = router_module.log
        router_module.log = Logger(observer=self._observe)
        self.addCleanup(setattr, router_module, "log", self._old_log)

    def _observe(self, event):
        if "log_failure" in event:
            self.failures.append(event["log_failure"])

    def scenario(self, frames, join_attacker=True, serializer=None):
        serializer = serializer or FastJsonSerializer()
        # fresh router each example
        RouterTestMixin.setUp(self)
        self.failures[:] = []
        callee = self.join("host1")
        sub = self.join("op2")
        caller = self.join("op2")
        reg = self.register(callee, "test.proc")
        sid = self.subscribe(sub, "test.topic")
        if join_attacker:
            attacker = self.join("op", serializer=serializer)
        else:
            attacker = self.connect(serializer)
        for frame in frames:
            if isinstance(frame, bytes):
                attacker.transport.send_bytes(frame, is_binary=True)
            else:
                try:
                    payload = json.dumps(frame).encode()
                except (TypeError, ValueError):
                    continue
                attacker.transport.send_bytes(payload)
        self.pump()
        self.clock.advance(60)  # let any call timeouts fire
        self.pump()

        self.assertEqual(self.failures, [])
        # nothing misrouted: the good sessions got only what they asked for
        for m in sub.take():
            self.assertIsInstance(m, message.Event)
            self.assertEqual(m.subscription, sid)
        for m in callee.take():
            self.assertIsInstance(m, (message.Invocation, message.Interrupt))
            if isinstance(m, message.Invocation):
                self.assertEqual(m.registration, reg)
                callee.send(message.Yield(m.request))
        self.pump()
        self.assertEqual(caller.take(), [])
        # the router's books are consistent
        for s in self.router.sessions():
            self.assertIsNotNone(s.transport)
            for sub_ in s.subscriptions:
                self.assertIs(sub_.subscribers[s.session_id], s)
        # and the good sessions still work
        caller.send(message.Call(99, "test.proc", args=["ping"]))
        self.pump()
        inv = callee.last(message.Invocation)
        self.assertEqual(inv.args, ["ping"])
        callee.send(message.Yield(inv.request, args=["pong"]))
        callee.send(message.Publish(1, "test.topic", args=["still"]))
        self.pump()
        self.assertEqual(caller.last(message.Result).args, ["pong"])
        self.assertEqual(sub.last(message.Event).args, ["still"])
        # the attacker was told why whenever the router dropped it: its last message is
        # an ABORT (or the GOODBYE of a kill), unless it sent an ABORT itself, which the
        # router answers by closing; and an ABORT always comes with a close
        aborts = [m for m in attacker.received if isinstance(m, message.Abort)]
        if attacker.closed:
            sent_abort = any(isinstance(f, list) and f[:1] == [3] for f in frames)
            last = attacker.received[-1] if attacker.received else None
            self.assertTrue(isinstance(last, (message.Abort, message.Goodbye)) or sent_abort,
                            f"dropped without a reason; last message {last!r}")
        else:
            self.assertEqual(aborts, [])

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
    def test_random_bytes(self, frames):
        self.scenario(frames)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.lists(json_values, max_size=6), min_size=1, max_size=4))
    def test_random_arrays(self, frames):
        self.scenario(frames)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(mutated() | st.sampled_from(VALID), min_size=1, max_size=6))
    def test_mutated_frames(self, frames):
        self.scenario(frames)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(mutated() | st.sampled_from(VALID), min_size=1, max_size=6))
    def test_mutated_frames_before_join(self, frames):
        self.scenario(frames, join_attacker=False)

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
    def test_random_msgpack(self, frames):
        self.scenario(frames, serializer=MsgPackSerializer())

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
    def test_random_cbor(self, frames):
        self.scenario(frames, serializer=CBORSerializer())
