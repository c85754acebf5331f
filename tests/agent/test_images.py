"""
The agent's image cache against a real registry (and misbehaving servers) on loopback.
"""

import hashlib
import os
from types import SimpleNamespace

import pytest
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web import server
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.registry.helpers import AGENT_ID, AGENT_TOKEN, OPERATOR, RunningRegistry
from zwrm.agent.images import ImageCache
from zwrm.errors import (
    AuthenticationFailed,
    Corrupt,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from zwrm.interfaces import IImageCache
from zwrm.registry import client as registry_client
from zwrm.registry import resource as registry_resource
from zwrm.registry.client import RegistryClient, push_image
from zwrm.registry.image import parse_manifest
from zwrm.testing.image import kernel_bytes


def aio(f):
    def wrapper(self, *a, **kw):
        return defer.Deferred.fromCoroutine(f(self, *a, **kw))

    wrapper.__name__ = f.__name__
    return wrapper


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Counting(Resource):
    """Counts requests, then lets the registry answer."""

    isLeaf = True

    def __init__(self, inner):
        Resource.__init__(self)
        self.inner = inner
        self.requests = []

    def render(self, request):
        self.requests.append((request.method, b"/".join(request.postpath)))
        return self.inner.render(request)


class Flaky(Resource):
    """
    Serves blobs with Range support, but drops the connection half-way through the first
    C{drops} responses and flips a byte in the first C{corrupt} ones.
    """

    isLeaf = True

    def __init__(self, blobs, drops=0, corrupt=0, stall=0, overclaim=0):
        Resource.__init__(self)
        self.overclaim = overclaim
        self.blobs = blobs
        self.drops = drops
        self.corrupt = corrupt
        self.stall = stall
        self.ranges = []

    def render_GET(self, request):
        data = self.blobs[request.postpath[-1].decode()]
        rng = request.getHeader(b"range")
        self.ranges.append(rng)
        start = 0
        if rng:
            start = int(rng.split(b"=")[1].split(b"-")[0])
            if start >= len(data):
                request.setResponseCode(416)
                return b""
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {start}-{len(data) - 1}/{len(data)}".encode())
        body = data[start:]
        if self.corrupt:
            self.corrupt -= 1
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        request.setHeader(b"content-length", str(len(body)).encode())
        if self.overclaim:
            # Claim more than is sent, send it all, then close: the client has every byte
            # but cannot know it.
            self.overclaim -= 1
            request.setHeader(b"content-length", str(len(body) + 10).encode())
            request.write(body)
            request.channel.transport.unregisterProducer()
            request.channel.transport.loseConnection()
            return server.NOT_DONE_YET
        if self.drops or self.stall:
            request.write(body[: len(body) // 2])
            if self.drops:
                self.drops -= 1
                # Close once the half is flushed (the channel must not stay its producer,
                # or the transport would resume it instead of closing).
                request.channel.transport.unregisterProducer()
                request.channel.transport.loseConnection()
            else:
                self.stall -= 1  # never finishes: the client's idle timeout must act
                self.stalled = request
            return server.NOT_DONE_YET
        return body


def serve(testcase, res):
    root = Resource()
    root.putChild(b"v2", res)
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return f"http://127.0.0.1:{port.getHost().port}"


class ImageCacheTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.reg = RunningRegistry(self, self.mktemp())
        self.client = RegistryClient(reactor, self.reg.url, OPERATOR)
        self.addCleanup(self.client.close)
        self.files = self.mktemp()
        os.makedirs(self.files)

    def cache(self, url=None, credentials=(AGENT_ID, AGENT_TOKEN), **kw):
        kw.setdefault("limit_bytes", 1 << 30)
        c = ImageCache(reactor, self.mktemp(), url or self.reg.url, credentials, **kw)
        self.addCleanup(c.close)
        return c

    def file(self, name, data):
        path = os.path.join(self.files, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    async def push(self, ref="app/web:v1", kernel=kernel_bytes(), initrd=b"I" * 500, disk=None,
                   cmdline="console=ttyS0", port=8080):
        return await push_image(
            self.client, ref,
            kernel=self.file("vmlinuz", kernel),
            initrd=self.file("initrd", initrd) if initrd else None,
            disk=self.file("disk.img", disk) if disk else None,
            cmdline=cmdline, service_port=port,
        )

    def test_provides_interface(self):
        from zope.interface.verify import verifyObject

        self.assertTrue(verifyObject(IImageCache, self.cache()))

    @aio
    async def test_resolve(self):
        kernel, initrd, disk = kernel_bytes(os.urandom(100_000)), os.urandom(50_000), os.urandom(5_000_000)
        mdigest = await self.push(kernel=kernel, initrd=initrd, disk=disk)
        cache = self.cache()
        out = await cache.resolve("app/web:v1")
        self.assertEqual(out["manifest"], mdigest)
        for role, data in (("kernel", kernel), ("initrd", initrd), ("disk", disk)):
            with open(out[role], "rb") as f:
                self.assertEqual(f.read(), data, role)
            self.assertEqual(os.path.basename(out[role]), sha(data)[7:])
        self.assertEqual((out["cmdline"], out["service_port"]), ("console=ttyS0", 8080))
        self.assertEqual(len(out["digests"]), 5)  # manifest, config, 3 layers
        st = cache.stats()
        self.assertEqual((st["hits"], st["misses"], st["pinned"]), (0, 5, 0))
        self.assertEqual(st["size"], sum(os.path.getsize(cache.path(d)) for d in out["digests"]))
        # Again: all local (the tag is looked up, the manifest is then a hit).
        out2 = await cache.resolve("app/web:v1")
        self.assertEqual(out2, out)
        self.assertEqual(cache.stats()["hits"], 5)
        self.assertEqual(cache.stats()["misses"], 5)

    @aio
    async def test_sparse_disk_stored_and_cached_sparse(self):
        # 64 MiB of disk with 1 MiB of data in the middle and 3 bytes at the very end.
        path = os.path.join(self.files, "sparse.raw")
        data = os.urandom(1 << 20)
        with open(path, "wb") as f:
            f.seek(10 << 20)
            f.write(data)
            f.seek((64 << 20) - 3)
            f.write(b"end")
        await push_image(self.client, "os/sparse:v1", kernel=self.file("k", kernel_bytes()),
                         disk=path)
        out = await self.cache().resolve("os/sparse:v1")
        self.assertEqual(out["disk_format"], "raw")
        st = os.stat(out["disk"])
        self.assertEqual(st.st_size, 64 << 20)
        self.assertLessEqual(st.st_blocks * 512, (1 << 20) + (256 << 10))
        with open(out["disk"], "rb") as f:
            f.seek(10 << 20)
            self.assertEqual(f.read(1 << 20), data)
            f.seek(-3, os.SEEK_END)
            self.assertEqual(f.read(), b"end")
        stored = os.stat(self.reg.resource.store.blob_path(sha(open(path, "rb").read())))
        self.assertEqual(stored.st_size, 64 << 20)
        self.assertLessEqual(stored.st_blocks * 512, (1 << 20) + (256 << 10))

    @aio
    async def test_qcow2_disk_layer(self):
        import subprocess

        path = os.path.join(self.files, "disk.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "8M"], check=True)
        await push_image(self.client, "os/q:v1", kernel=self.file("k", kernel_bytes()), disk=path)
        out = await self.cache().resolve("os/q:v1")
        self.assertEqual((out["disk_format"], out["firmware"]), ("qcow2", "bios"))

    @aio
    async def test_an_image_whose_kernel_is_not_one_is_refused(self):
        """
        An image stored before the registry checked kernel layers: resolving it fails,
        naming the layer, and pins nothing; QEMU never sees the file (it would run it).
        """
        unchecked = SimpleNamespace(inspect=lambda path, what: "bzImage")
        self.patch(registry_resource, "kernelimage", unchecked)  # (the registry of before)
        self.patch(registry_client, "kernelimage", unchecked)
        await self.push(kernel=os.urandom(200_000))
        cache = self.cache()
        with self.assertRaises(InvalidArgument) as raised:
            await cache.resolve("app/web:v1")
        self.assertRegex(raised.exception.message,
                         r"^image app/web:v1: its kernel layer sha256:[0-9a-f]{64} is not an "
                         r"x86 kernel QEMU can boot")
        self.assertEqual(cache.stats()["pinned"], 0)

    @aio
    async def test_resolve_by_digest_offline(self):
        mdigest = await self.push(initrd=None)
        cache = self.cache()
        first = await cache.resolve(f"app/web@{mdigest}")
        self.assertIsNone(first["initrd"])
        await self.reg.port.stopListening()
        await self.reg.pool.closeCachedConnections()
        await cache.close()
        again = await cache.resolve(f"app/web@{mdigest}")
        self.assertEqual(again, first)
        # A tag resolved before is used when the registry is unreachable.
        tagged = self.cache()
        with self.assertRaises(Unavailable):
            await tagged.resolve("app/web:v1")

    @aio
    async def test_tag_fallback_when_registry_down(self):
        await self.push()
        cache = self.cache()
        first = await cache.resolve("app/web:v1")
        await self.reg.port.stopListening()
        await self.reg.pool.closeCachedConnections()
        await cache.close()
        self.assertEqual(await cache.resolve("app/web:v1"), first)

    @aio
    async def test_pin_on_resolve(self):
        await self.push()
        cache = self.cache()
        out = await cache.resolve("app/web:v1", pin=True)
        self.assertEqual(cache.stats()["pinned"], 4)
        for d in out["digests"]:
            cache.unpin(d)
        self.assertEqual(cache.stats()["pinned"], 0)

    @aio
    async def test_errors(self):
        await self.push()
        with self.assertRaises(NotFound):
            await self.cache().resolve("app/nothing:v1")
        with self.assertRaises(AuthenticationFailed):
            await self.cache(credentials=(AGENT_ID, "wrong")).resolve("app/web:v1")
        with self.assertRaises(InvalidArgument):
            await self.cache().resolve("Not A Ref")
        with self.assertRaises(Unavailable):
            await self.cache(url="http://127.0.0.1:1").resolve("app/web:v1")
        # Not a zwrm image: a manifest without zwrm config.
        d = await self.client.push_bytes("app/other", b"{}")
        await self.client.put_manifest("app/other", "v1", (
            '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
            f'"config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{d}","size":2}},'
            '"layers":[]}').encode())
        with self.assertRaises(InvalidArgument):
            await self.cache().resolve("app/other:v1")

    @aio
    async def test_concurrent_requests_share_one_download(self):
        data = kernel_bytes(os.urandom(3_000_000))
        await self.push(kernel=data)
        counting = Counting(self.reg.resource)
        url = serve(self, counting)
        cache = self.cache(url=url)
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(cache.resolve("app/web:v1")) for _ in range(5)]
        )
        self.assertEqual(len({r["kernel"] for r in results}), 1)
        blob_gets = [p for m, p in counting.requests if m == b"GET" and b"/blobs/" in p]
        self.assertEqual(len(blob_gets), 3)  # config, kernel, initrd: once each
        self.assertEqual(cache.stats()["misses"], 3 + 1)  # + the manifest (by tag, once stored)
        with open(results[0]["kernel"], "rb") as f:
            self.assertEqual(f.read(), data)

    @aio
    async def test_dropped_connection_resumes_with_range(self):
        data = os.urandom(12_000_000)
        flaky = Flaky({sha(data): data}, drops=2)
        cache = self.cache(url=serve(self, flaky))
        path = await cache.fetch_blob("app/web", sha(data), len(data))
        cache.unpin(sha(data))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(flaky.ranges[0], None)
        self.assertEqual(len(flaky.ranges), 3)
        offsets = [int(r.split(b"=")[1].rstrip(b"-")) for r in flaky.ranges[1:]]
        self.assertTrue(0 < offsets[0] < offsets[1] < len(data), offsets)

    @aio
    async def test_write_failure(self):
        import errno

        from zwrm.agent import images as module

        def full(self, batch):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(module._BlobSink, "_write_sync", full)
        data = os.urandom(5_000_000)
        cache = self.cache(url=serve(self, Flaky({sha(data): data})))
        with self.assertRaises(ResourceExhausted):
            await cache.fetch_blob("app/web", sha(data), len(data))
        self.assertEqual(os.listdir(os.path.join(cache.root, "tmp")), [])
        self.assertFalse(cache.has(sha(data)))

    @aio
    async def test_oversize_blob_cut_short(self):
        """A server sending more than the manifest's size is cut off, not stored."""
        data = os.urandom(20_000_000)
        cache = self.cache(url=serve(self, Flaky({sha(data): data})), max_attempts=2)
        sizes = []
        original = cache._transfer

        async def transfer(*a):
            result = await original(*a)
            sizes.append(result[0])
            return result

        cache._transfer = transfer
        with self.assertRaises(Corrupt):
            await cache.fetch_blob("app/web", sha(data), 1_000_000)
        self.assertEqual(len(sizes), 2)
        self.assertTrue(all(n <= 1_000_001 for n in sizes), sizes)
        self.assertEqual(os.listdir(os.path.join(cache.root, "tmp")), [])

    @aio
    async def test_drop_after_last_byte(self):
        data = os.urandom(100_000)
        flaky = Flaky({sha(data): data}, overclaim=1)
        cache = self.cache(url=serve(self, flaky))
        path = await cache.fetch_blob("app/web", sha(data), len(data))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(flaky.ranges, [None, f"bytes={len(data)}-".encode()])

    @aio
    async def test_stalled_connection_resumes(self):
        data = os.urandom(1_000_000)
        flaky = Flaky({sha(data): data}, stall=1)
        cache = self.cache(url=serve(self, flaky), idle_timeout=0.3)
        path = await cache.fetch_blob("app/web", sha(data), len(data))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(len(flaky.ranges), 2)
        self.assertIsNotNone(flaky.ranges[1])

    @aio
    async def test_too_many_drops(self):
        data = os.urandom(100_000)
        flaky = Flaky({sha(data): data}, drops=100)
        cache = self.cache(url=serve(self, flaky), max_resumes=2)
        with self.assertRaises(Unavailable):
            await cache.fetch_blob("app/web", sha(data), len(data))
        self.assertFalse(cache.has(sha(data)))
        self.assertEqual(os.listdir(os.path.join(cache.root, "tmp")), [])
        self.assertEqual(cache.stats()["size"], 0)

    @aio
    async def test_corrupted_blob_discarded_and_refetched(self):
        data = os.urandom(200_000)
        flaky = Flaky({sha(data): data}, corrupt=2)
        cache = self.cache(url=serve(self, flaky), max_attempts=3)
        path = await cache.fetch_blob("app/web", sha(data), len(data))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(flaky.ranges, [None, None, None])

    @aio
    async def test_always_corrupt_never_used(self):
        data = os.urandom(200_000)
        flaky = Flaky({sha(data): data}, corrupt=100)
        cache = self.cache(url=serve(self, flaky), max_attempts=3)
        with self.assertRaises(Corrupt):
            await cache.fetch_blob("app/web", sha(data), len(data))
        self.assertEqual(len(flaky.ranges), 3)
        self.assertFalse(cache.has(sha(data)))
        self.assertFalse(os.path.exists(cache.path(sha(data))))
        self.assertEqual(os.listdir(os.path.join(cache.root, "tmp")), [])

    @aio
    async def test_survives_restart(self):
        await self.push()
        root = self.mktemp()
        c1 = ImageCache(reactor, root, self.reg.url, (AGENT_ID, AGENT_TOKEN), 1 << 30)
        out = await c1.resolve("app/web:v1")
        await c1.close()
        c2 = ImageCache(reactor, root, self.reg.url, (AGENT_ID, AGENT_TOKEN), 1 << 30)
        self.addCleanup(c2.close)
        self.assertEqual(c2.stats()["size"], c1.stats()["size"])
        self.assertEqual(c2.stats()["blobs"], 4)
        mdigest = out["manifest"]
        self.assertEqual((await c2.resolve(f"app/web@{mdigest}"))["kernel"], out["kernel"])
        self.assertEqual(c2.stats()["misses"], 0)


class EvictionTests(unittest.TestCase):
    timeout = 30

    """
    Eviction order, watermarks, pins and minimum age, with time from a Clock.

    Limit 1000 bytes, high watermark 800, low 500, blobs of 100 bytes, min_age 10s.
    """

    def setUp(self):
        self.reg = RunningRegistry(self, self.mktemp())
        self.clock = task.Clock()
        self.cache = ImageCache(
            reactor, self.mktemp(), self.reg.url, (AGENT_ID, AGENT_TOKEN),
            limit_bytes=1000, high_watermark=0.8, low_watermark=0.5, min_age=10,
            clock=self.clock,
        )
        self.addCleanup(self.cache.close)
        self.blobs = [bytes([i]) * 100 for i in range(12)]

    async def fill(self, indexes, step=1):
        for i in indexes:
            d = await self.reg.push_blob("app/web", self.blobs[i])
            await self.cache.fetch_blob("app/web", d, 100)
            self.cache.unpin(d)
            self.clock.advance(step)

    def cached(self):
        return [i for i, b in enumerate(self.blobs) if self.cache.has(sha(b))]

    @aio
    async def test_lru_down_to_low_watermark(self):
        await self.fill(range(8))  # 800 bytes: at, not above, the high watermark
        self.assertEqual(self.cached(), list(range(8)))
        self.clock.advance(100)
        await self.fill([0])  # a hit: 0 becomes most recently used
        self.assertEqual(self.cache.stats()["hits"], 1)
        await self.fill([8])  # 900 > 800: evict LRU (1, 2, 3, 4) to make room down to 500
        self.assertEqual(self.cached(), [0, 5, 6, 7, 8])
        self.assertEqual(self.cache.stats()["size"], 500)
        self.assertEqual(self.cache.stats()["evictions"], 4)
        for i in (1, 2, 3, 4):
            self.assertFalse(os.path.exists(self.cache.path(sha(self.blobs[i]))))

    @aio
    async def test_pinned_never_evicted(self):
        await self.fill(range(8))
        self.cache.pin(sha(self.blobs[1]))
        self.cache.pin(sha(self.blobs[2]))
        self.clock.advance(100)
        await self.fill([8])
        self.assertEqual(self.cached(), [1, 2, 6, 7, 8])
        # Unpinning counts as a use: kept for min_age even under pressure.
        self.cache.unpin(sha(self.blobs[1]))
        await self.fill([9, 10, 11])
        self.assertIn(1, self.cached())
        self.assertIn(2, self.cached())

    @aio
    async def test_min_age(self):
        await self.fill(range(8))  # used at t=0..7
        await self.fill([8, 9], step=0)  # at t=8: above the high mark, nothing old enough
        self.assertEqual(len(self.cached()), 10)
        self.assertEqual(self.cache.stats()["size"], 1000)
        # The limit is hard: the next blob does not fit and nothing may go yet.
        d = await self.reg.push_blob("app/web", self.blobs[10])
        with self.assertRaises(ResourceExhausted):
            await self.cache.fetch_blob("app/web", d, 100)
        self.assertFalse(self.cache.has(d))
        self.clock.advance(5)  # t=13: blobs 0..3 are 10s or more past their last use
        await self.cache.fetch_blob("app/web", d, 100)
        # Evicted what it could (0..3), though that leaves it above the low mark.
        self.assertEqual(self.cached(), [4, 5, 6, 7, 8, 9, 10])

    @aio
    async def test_evict_without_pressure_does_nothing(self):
        await self.fill(range(3))
        self.clock.advance(1000)
        self.cache.evict()
        self.assertEqual(self.cached(), [0, 1, 2])

    def test_bad_watermarks(self):
        for hi, lo in ((0.5, 0.8), (1.5, 0.5), (0.8, 0)):
            self.assertRaises(
                InvalidArgument, ImageCache, reactor, self.mktemp(), self.reg.url, None,
                1000, hi, lo,
            )

    @aio
    async def test_manifest_parsing(self):
        # Sanity of the format module used by resolve.
        with self.assertRaises(InvalidArgument):
            parse_manifest(b"{}")


@pytest.mark.qemu
class ExecutorWithImageCacheTests(unittest.TestCase):
    """
    The real executor and QEMU driver start a machine from an image reference through the
    cache, and the machine's pins are held while it exists.
    """

    timeout = 120

    @aio
    async def test_start_from_registry_image(self):
        from twisted.internet import threads

        from zwrm.agent.executor import Executor
        from zwrm.agent.volumes import VolumeStore
        from zwrm.drivers.qemu import QemuDriver
        from zwrm.testing import image as test_image

        img = await threads.deferToThread(test_image.build)
        reg = RunningRegistry(self, self.mktemp())
        client = RegistryClient(reactor, reg.url, OPERATOR)
        self.addCleanup(client.close)
        await push_image(client, "apps/vm:v1", kernel=img.kernel, initrd=img.initrd,
                         cmdline=img.cmdline)
        work = os.path.abspath(self.mktemp())
        cache = ImageCache(reactor, os.path.join(work, "images"), reg.url, (AGENT_ID, AGENT_TOKEN),
                           1 << 30)
        self.addCleanup(cache.close)
        driver = QemuDriver(reactor, os.path.join(work, "machines"), accel="tcg", stop_timeout=5)
        ex = Executor(reactor, AGENT_ID, driver, VolumeStore(reactor, os.path.join(work, "v")),
                      lambda event: defer.succeed(None), images=cache, data_dir=work)
        self.addCleanup(ex.close)
        spec = {"id": "m1", "app": "a", "image": "apps/vm:v1", "vcpus": 1, "memory_mb": 128,
                "volumes": [], "service_port": None, "health": None}
        try:
            status = await ex.start_machine(spec)
            self.assertEqual(status["state"], "running")
            self.assertEqual(cache.stats()["pinned"], 4)  # manifest, config, kernel, initrd
            with open(img.kernel, "rb") as f:
                kernel_path = cache.path(sha(f.read()))
            with open(f"/proc/{driver.status('m1')['pid']}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            self.assertIn(kernel_path.encode(), argv)  # QEMU boots the cached blob
        finally:
            await ex.destroy_machine("m1")
        self.assertEqual(cache.stats()["pinned"], 0)
        self.assertEqual(cache.stats()["misses"], 4)
