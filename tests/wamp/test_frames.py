"""
The WebSocket server's lean frame path (L{zwrm.wamp.transport.WampWebSocketServerProtocol}):
whole plain frames are cut out of each read; everything else (partial frames, control
frames, fragments, large or invalid frames) is handed to autobahn's parser from that byte
on.  Driven byte by byte over a StringTransport, on a Clock.
"""

import json
import os
import struct

import txaio
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from zwrm.wamp.auth import RoleBasedAuthorizer, Rule, StaticAuthenticator
from zwrm.wamp.router import Router
from zwrm.wamp.transport import rawsocket_factory, websocket_factory

HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: wamp.2.json\r\n\r\n"
)


def frame(payload, opcode=1, fin=True, mask=None):
    """A client frame (masked)."""
    if isinstance(payload, (list, dict)):
        payload = json.dumps(payload).encode()
    mask = mask or os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frames(data):
    """Parse the server's (unmasked) frames: [(opcode, payload)]."""
    out, pos = [], 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        n, pos = b1 & 0x7F, pos + 2
        if n == 126:
            n, pos = struct.unpack("!H", data[pos:pos + 2])[0], pos + 2
        elif n == 127:
            n, pos = struct.unpack("!Q", data[pos:pos + 8])[0], pos + 8
        out.append((b0 & 0x0F, data[pos:pos + n]))
        pos += n
    return out


class _Transport(StringTransport):
    def unregisterProducer(self):
        self.producer = None


class FramePathTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        # autobahn's timers (auto-ping: txaio's batched timer) run on txaio's loop: the clock
        self.patch(txaio.config, "loop", self.clock)
        self.router = Router(self.clock, StaticAuthenticator(anonymous=True),
                             RoleBasedAuthorizer({"anonymous": [Rule("t.", "prefix", {"call", "register",
                                                                                         "publish", "subscribe"})]}))
        self.proto = websocket_factory(self.router).buildProtocol(None)
        self.transport = _Transport()
        self.proto.makeConnection(self.transport)
        self.proto.dataReceived(HANDSHAKE)
        response = self.transport.value()
        self.assertIn(b"101 Switching Protocols", response)
        self.transport.clear()
        self.send(frame([1, "zwrm", {"roles": {"caller": {}, "callee": {}, "publisher": {}, "subscriber": {}}}]))
        [welcome] = self.messages()
        self.assertEqual(welcome[0], 2)

    def tearDown(self):
        self.lose()
        for call in self.clock.getDelayedCalls():
            call.cancel()

    def lose(self):
        if not getattr(self, "_lost", False):
            self._lost = True
            self.proto.connectionLost(Failure(ConnectionDone()))

    def send(self, data, chunk=None):
        if chunk is None:
            self.proto.dataReceived(data)
        else:
            for i in range(0, len(data), chunk):
                self.proto.dataReceived(data[i:i + chunk])

    def frames(self):
        out = server_frames(self.transport.value())
        self.transport.clear()
        return out

    def messages(self):
        frames = self.frames()
        self.assertTrue(all(op == 1 for op, _ in frames), frames)
        return [json.loads(p) for _, p in frames]

    def test_many_frames_in_one_read_and_one_frame_over_many_reads(self):
        self.send(frame([64, 1, {}, "t.echo"]) + frame([32, 2, {}, "t.topic"]) + frame([48, 3, {}, "t.echo", [5]]))
        registered, subscribed, invocation = self.messages()
        self.assertEqual((registered[0], registered[1]), (65, 1))
        self.assertEqual((subscribed[0], subscribed[1]), (33, 2))
        self.assertEqual((invocation[0], invocation[4]), (68, [5]))
        # the YIELD arrives one byte per read (autobahn buffers it, then the lean path resumes)
        self.send(frame([70, invocation[1], {}, [6]]), chunk=1)
        [result] = self.messages()
        self.assertEqual(result, [50, 3, {}, [6]])
        self.send(frame([16, 4, {"acknowledge": True, "exclude_me": False}, "t.topic", ["x"]]))
        event, published = self.messages()
        self.assertEqual((event[0], event[4]), (36, ["x"]))
        self.assertEqual((published[0], published[1]), (17, 4))

    def test_control_frames_and_fragments_between_plain_frames(self):
        self.send(frame([64, 1, {}, "t.echo"]))
        self.messages()
        call = json.dumps([48, 2, {}, "t.echo", ["frag"]]).encode()
        data = (frame(b"ping!", opcode=9)
                + frame(call[:7], opcode=1, fin=False) + frame(call[7:], opcode=0)
                + frame([48, 3, {}, "t.echo", ["plain"]]))
        self.send(data)
        frames = self.frames()
        self.assertEqual(frames[0], (10, b"ping!"))  # the pong
        invocations = [json.loads(p) for _, p in frames[1:]]
        self.assertEqual([i[4] for i in invocations], [["frag"], ["plain"]])

    def test_sixteen_bit_length_and_shared_event_frame(self):
        self.send(frame([32, 1, {}, "t.big"]))
        self.messages()
        payload = "y" * 1000
        self.send(frame([16, 2, {"acknowledge": True, "exclude_me": False}, "t.big", [payload]]))
        event, published = self.messages()
        self.assertEqual(event[4], [payload])
        self.assertEqual(published[0], 17)

    def test_invalid_utf8_is_closed_by_autobahn_with_1007(self):
        self.send(frame(b'[48, 2, {}, "t.\xff"]'))
        [(op, payload)] = self.frames()
        self.assertEqual(op, 8)
        self.assertEqual(struct.unpack("!H", payload[:2])[0], 1007)

    def test_unmasked_frame_fails_the_connection(self):
        self.send(b"\x81\x05hello")
        [(op, payload)] = self.frames()
        self.assertEqual((op, struct.unpack("!H", payload[:2])[0]), (8, 1002))  # autobahn's close
        self.lose()
        self.assertEqual(self.router.session_count(), 0)

    def test_malformed_wamp_in_a_plain_frame_is_a_protocol_violation(self):
        self.send(frame(b"[48, 0, {}, \"t.echo\"]") + frame(b"[48, 5, {}, \"t.echo\"]"))
        frames = self.frames()
        abort = json.loads(frames[0][1])
        self.assertEqual((abort[0], abort[2]), (3, "wamp.error.protocol_violation"))
        self.assertEqual(self.router.session_count(), 0)
        self.assertEqual(len([f for f in frames if f[0] == 1]), 1)  # nothing after the ABORT

    def test_non_minimal_length_is_left_to_autobahn(self):
        payload = json.dumps([48, 2, {}, "t.echo"]).encode()
        mask = b"abcd"
        data = (bytes([0x81, 0x80 | 126]) + struct.pack("!H", len(payload)) + mask
                + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        self.send(data)
        [(op, body)] = self.frames()
        self.assertEqual((op, struct.unpack("!H", body[:2])[0]), (8, 1002))

    def test_frames_held_for_a_read_go_out_before_autobahns_own(self):
        """
        What the router writes while a read is handled is held until the read's end; a
        frame autobahn writes meanwhile (here the pong to a ping in the same read) does
        not overtake it.
        """
        self.send(frame([64, 1, {}, "t.echo"]))
        self.messages()
        self.send(frame([48, 2, {}, "t.echo", ["x"]]) + frame(b"ping!", opcode=9)
                  + frame([48, 3, {}, "t.echo", ["y"]]))
        frames = self.frames()
        self.assertEqual([op for op, _ in frames], [1, 10, 1])
        self.assertEqual([json.loads(frames[0][1])[4], frames[1][1], json.loads(frames[2][1])[4]],
                         [["x"], b"ping!", ["y"]])

    def test_held_frames_count_as_unsent(self):
        """Frames held until the end of a read are unsent bytes (the router's backlog checks)."""
        delivery = self.router.local_delivery
        delivery.enter()
        self.proto.send_list([36, 1, 2, {}, ["e"]])
        held = self.proto.unsent_bytes()
        self.assertEqual(self.transport.value(), b"")
        delivery.leave()
        self.assertEqual(len(self.transport.value()), held)
        self.assertEqual(self.messages(), [[36, 1, 2, {}, ["e"]]])
        self.assertEqual(self.proto.unsent_bytes(), 0)

    def test_auto_ping_only_when_no_data_frame_came(self):
        """
        A connection that sent data frames since its last auto-ping was due is not pinged
        (autobahn's autoPingRestartOnAnyTraffic, for the frames autobahn's parser does not
        see); once quiet for an interval, it is, and a missing pong still closes it.
        """
        interval = self.proto.autoPingInterval
        self.assertTrue(interval)
        for i in range(3):
            self.clock.advance(interval / 2)
            self.send(frame([64, 10 + i, {}, f"t.p{i}"]))
            self.assertEqual([op for op, _ in self.frames()], [1])  # REGISTERED, no ping
        self.clock.advance(interval)  # the ping due in this interval is put off once more
        self.assertEqual(self.frames(), [])
        self.clock.advance(interval)
        self.assertEqual([op for op, _ in self.frames()], [9])  # quiet for an interval: pinged
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(self.proto.autoPingTimeout + 1)
        self.assertTrue(self.transport.disconnecting)  # no pong: dropped


class RawSocketHeldTests(unittest.SynchronousTestCase):
    """The RawSocket server protocol holds what it sends during a read like the WebSocket one."""

    def setUp(self):
        self.clock = Clock()
        self.patch(txaio.config, "loop", self.clock)
        self.router = Router(self.clock, StaticAuthenticator(anonymous=True),
                             RoleBasedAuthorizer({"anonymous": [Rule("t.", "prefix", {"call"})]}))

        class Transport(_Transport):
            def loseConnection(self):
                self.at_close = self.value()
                _Transport.loseConnection(self)

        self.proto = rawsocket_factory(self.router, serializers=("json",)).buildProtocol(None)
        self.transport = Transport()
        self.proto.makeConnection(self.transport)
        self.proto.dataReceived(b"\x7f\xf1\x00\x00")  # RawSocket handshake: JSON
        self.assertEqual(len(self.transport.value()), 4)
        self.transport.clear()
        self.addCleanup(self.proto.connectionLost, Failure(ConnectionDone()))

    def test_held_messages_are_counted_and_sent_before_a_close(self):
        delivery = self.router.local_delivery
        delivery.enter()
        self.proto.send_list([36, 1, 2, {}, ["e"]])
        held = self.proto.unsent_bytes()
        self.assertGreater(held, 4)
        self.assertEqual(self.transport.value(), b"")
        self.proto.close()  # what was held goes first
        delivery.leave()
        self.assertEqual(len(self.transport.at_close), held)
        self.assertEqual(json.loads(self.transport.at_close[4:]), [36, 1, 2, {}, ["e"]])
        self.assertEqual(self.proto.unsent_bytes(), 0)
