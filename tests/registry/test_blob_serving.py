"""
How the registry sends a blob: a whole one in blocks read in a thread (L{_BlobProducer}),
a Range as Twisted's static files do, and a blob file that ends early cuts the response.
"""

import os

import treq
from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest
from twisted.web.client import ResponseFailed

from tests.registry.helpers import RunningRegistry, header
from zwrm.registry import resource as module


class BlobServingTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.reg = RunningRegistry(self, self.mktemp())
        self.reads = []
        real = module.RegistryResource._in_thread

        def in_thread(resource, f, *args):
            if getattr(f, "__name__", None) == "read":
                self.reads.append(args)
            return real(resource, f, *args)

        self.patch(module.RegistryResource, "_in_thread", in_thread)

    async def blob(self, size, block=1000):
        self.patch(module, "BLOB_BLOCK", block)
        data = os.urandom(size)
        digest = await self.reg.push_blob("app/web", data)
        return data, digest

    @defer.inlineCallbacks
    def test_whole_blob_in_blocks_read_in_a_thread(self):
        data, digest = yield defer.Deferred.fromCoroutine(self.blob(50_003))
        resp, body = yield defer.Deferred.fromCoroutine(
            self.reg.request("GET", f"/v2/app/web/blobs/{digest}"))
        self.assertEqual(resp.code, 200)
        self.assertEqual(body, data)
        self.assertEqual(header(resp, b"content-type"), b"application/octet-stream")
        self.assertEqual(header(resp, b"docker-content-digest"), digest.encode())
        self.assertEqual(self.reads, [(1000,)] * 50 + [(3,)])

    @defer.inlineCallbacks
    def test_blocks_larger_than_the_connection_takes_at_once(self):
        """The connection pauses the producer after each block, and resumes it."""
        data, digest = yield defer.Deferred.fromCoroutine(self.blob(3_000_000, block=256 << 10))
        resp, body = yield defer.Deferred.fromCoroutine(
            self.reg.request("GET", f"/v2/app/web/blobs/{digest}"))
        self.assertEqual((resp.code, len(body)), (200, len(data)))
        self.assertEqual(body, data)

    @defer.inlineCallbacks
    def test_empty_blob(self):
        data, digest = yield defer.Deferred.fromCoroutine(self.blob(0))
        resp, body = yield defer.Deferred.fromCoroutine(
            self.reg.request("GET", f"/v2/app/web/blobs/{digest}"))
        self.assertEqual((resp.code, body), (200, b""))

    @defer.inlineCallbacks
    def test_range_and_head(self):
        data, digest = yield defer.Deferred.fromCoroutine(self.blob(5000))
        resp, body = yield defer.Deferred.fromCoroutine(self.reg.request(
            "GET", f"/v2/app/web/blobs/{digest}", headers={b"Range": b"bytes=1000-"}))
        self.assertEqual((resp.code, body), (206, data[1000:]))
        self.assertEqual(header(resp, b"content-range"), b"bytes 1000-4999/5000")
        resp, body = yield defer.Deferred.fromCoroutine(
            self.reg.request("HEAD", f"/v2/app/web/blobs/{digest}"))
        self.assertEqual((resp.code, body), (200, b""))
        self.assertEqual(header(resp, b"content-length"), b"5000")
        self.assertEqual(self.reads, [])

    @defer.inlineCallbacks
    def test_file_ending_early_cuts_the_response(self):
        data, digest = yield defer.Deferred.fromCoroutine(self.blob(5000))
        real = module._Blob.getFileSize
        self.patch(module._Blob, "getFileSize", lambda f: real(f) + 10)
        resp = yield treq.get(f"{self.reg.url}/v2/app/web/blobs/{digest}",
                              headers={b"Authorization": b"Bearer op-token"},
                              pool=self.reg.pool)
        with self.assertRaises(ResponseFailed):
            yield treq.content(resp)

    @defer.inlineCallbacks
    def test_client_gone_mid_body_closes_the_file(self):
        data, digest = yield defer.Deferred.fromCoroutine(self.blob(2_000_000, block=65536))
        opened = []
        real_open = module._Blob.openForReading

        def open_for_reading(f):
            opened.append(real_open(f))
            return opened[-1]

        self.patch(module._Blob, "openForReading", open_for_reading)
        resp = yield treq.get(f"{self.reg.url}/v2/app/web/blobs/{digest}",
                              headers={b"Authorization": b"Bearer op-token"},
                              pool=self.reg.pool, unbuffered=True)
        got = defer.Deferred()

        class Hangup(protocol.Protocol):
            def dataReceived(self, data):
                self.transport.stopProducing()
                if not got.called:
                    got.callback(None)

            def connectionLost(self, reason):
                pass

        resp.deliverBody(Hangup())
        yield got
        for _ in range(1000):
            if opened[0].closed:
                break
            yield task.deferLater(reactor, 0.001, lambda: None)
        self.assertTrue(opened[0].closed)
        self.assertLess(len(self.reads), 2_000_000 // 65536)
