"""
The WebSocket server protocol leaves no timer behind when its peer goes away in the middle
of a closing handshake (autobahn cancels its other timers on connection loss, not that one).
"""

import base64
import os

from twisted.internet import reactor
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.wamp.helpers import make_authenticator, make_authorizer
from zwrm.wamp.router import Router
from zwrm.wamp.transport import websocket_factory


class CloseTimerTests(unittest.TestCase):
    def test_peer_gone_mid_close_leaves_no_timer(self):
        router = Router(reactor, make_authenticator(), make_authorizer())
        factory = websocket_factory(router)
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        key = base64.b64encode(os.urandom(16))
        proto.dataReceived(
            b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: wamp.2.json\r\n\r\n"
        )
        self.assertIn(b"101 Switching Protocols", transport.value())
        proto.sendClose(1000)  # the server starts a closing handshake...
        self.assertIsNotNone(proto.closeHandshakeTimeoutCall)
        proto.connectionLost(Failure(ConnectionLost()))  # ...and the peer is gone
        self.assertIsNone(proto.closeHandshakeTimeoutCall)
        # trial's reactor check fails the test if the timer is still pending
