"""
The control plane's plain (not TLS) listener answers a TLS ClientHello at once, so clients
that try https first (OCI clients built on containers/image) fail fast instead of waiting
for a timeout (issue 12).
"""

import os
import time

import treq
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from zwrm.control.service import ControlPlane
from zwrm.control.tap import Config
from zwrm.testing.processes import temp_dir


class _Raw(protocol.Protocol):
    def __init__(self):
        self.data = b""
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost.callback(self.data)


class PlainListenerTests(TestCase):
    timeout = 60

    async def _plane(self):
        tmp = temp_dir(self)
        config = Config(listen=["tcp:0:interface=127.0.0.1"], data_dir=os.path.join(tmp, "cp"))
        plane = ControlPlane(reactor, config)
        plane.startService()
        self.addCleanup(plane.stopService)
        await plane.started
        return plane.ports[0].getHost().port

    async def _bounded(self, d, seconds=5):
        """C{d}'s result, or its cancellation after C{seconds} (the old behaviour: a wait)."""
        timer = reactor.callLater(seconds, d.cancel)
        try:
            return await d
        finally:
            if timer.active():
                timer.cancel()

    def test_tls_client_fails_fast(self):
        return ensureDeferred(self._tls_client())

    async def _tls_client(self):
        port = await self._plane()
        start = time.monotonic()
        with self.assertRaises(Exception) as c:
            await self._bounded(treq.get(f"https://127.0.0.1:{port}/v2/", persistent=False))
        elapsed = time.monotonic() - start
        self.assertNotIsInstance(c.exception, defer.CancelledError)
        self.assertLess(elapsed, 1.0)
        # plain HTTP on the same listener still works
        response = await treq.get(f"http://127.0.0.1:{port}/healthz", persistent=False)
        self.assertEqual(response.code, 200)
        await response.content()

    def test_answer_to_a_client_hello(self):
        return ensureDeferred(self._answer())

    async def _answer(self):
        port = await self._plane()
        raw = _Raw()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        transport = (await endpoints.connectProtocol(endpoint, raw)).transport
        # the start of a TLS record: handshake (0x16), TLS 1.0 record version, a length
        transport.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        answer = await self._bounded(raw.lost)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer)
        self.assertTrue(answer.endswith(b"this is a plain HTTP listener: use http:// or ws://,"
                                        b" not TLS\n"), answer)
