"""
The image-cache contract (L{zwrm.interfaces.IImageCache}), run against the real
L{zwrm.agent.images.ImageCache} (a real registry on loopback) and the unit tests' fake
(L{tests.agent.fakes.FakeImages}). Every branch asserts.
"""

import os

from twisted.internet import reactor
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from tests.agent.fakes import FakeImages
from tests.agent.test_images import aio
from tests.registry.helpers import AGENT_ID, AGENT_TOKEN, OPERATOR, RunningRegistry
from zwrm.agent.images import ImageCache
from zwrm.errors import InvalidArgument, NotFound
from zwrm.interfaces import IImageCache
from zwrm.registry.client import RegistryClient, push_image
from zwrm.testing.image import kernel_bytes

KEYS = {"kernel", "initrd", "disk", "cmdline", "service_port", "manifest", "digests"}


class ImageCacheContract:
    """Mixed into a TestCase whose C{make()} returns an IImageCache holding C{demo:1}."""

    timeout = 60

    def test_provides_the_interface(self):
        self.assertTrue(verifyObject(IImageCache, self.make()))

    @aio
    async def test_unknown_image_is_not_found(self):
        cache = await self.ready()
        with self.assertRaises(NotFound):
            await cache.resolve("nothing/here:1")

    @aio
    async def test_malformed_reference_is_invalid(self):
        cache = await self.ready()
        for ref in ("Not A Ref!", "demo:1\n", ""):
            with self.assertRaises(InvalidArgument, msg=repr(ref)):
                await cache.resolve(ref)

    @aio
    async def test_resolve_gives_local_files(self):
        cache = await self.ready()
        out = await cache.resolve("demo:1")
        self.assertLessEqual(KEYS, set(out))
        self.assertTrue(os.path.isfile(out["kernel"]))
        self.assertIsInstance(out["cmdline"], str)
        self.assertTrue(out["digests"])
        self.assertIn(out["manifest"], out["digests"])
        self.assertEqual(cache.stats()["pinned"], 0, "resolve without pin keeps no pin")

    @aio
    async def test_pins_count_until_every_unpin(self):
        cache = await self.ready()
        out = await cache.resolve("demo:1", pin=True)
        self.assertEqual(cache.stats()["pinned"], len(set(out["digests"])))
        for d in out["digests"]:
            cache.pin(d)  # a second holder
        for d in out["digests"]:
            cache.unpin(d)
        self.assertEqual(cache.stats()["pinned"], len(set(out["digests"])),
                         "one unpin of two pins leaves the blob pinned")
        for d in out["digests"]:
            cache.unpin(d)
        self.assertEqual(cache.stats()["pinned"], 0)

    @aio
    async def test_stats(self):
        cache = await self.ready()
        await cache.resolve("demo:1")
        st = cache.stats()
        self.assertLessEqual({"size", "limit", "hits", "misses", "pinned"}, set(st))
        self.assertGreater(st["misses"], 0, "the first resolve downloads")
        await cache.resolve("demo:1", pin=True)
        self.assertGreater(cache.stats()["hits"], st["hits"], "the second resolve is local")


class RealImageCacheContractTests(ImageCacheContract, unittest.TestCase):
    def setUp(self):
        self.reg = RunningRegistry(self, self.mktemp())

    def make(self):
        c = ImageCache(reactor, self.mktemp(), self.reg.url, (AGENT_ID, AGENT_TOKEN),
                       limit_bytes=1 << 30)
        self.addCleanup(c.close)
        return c

    async def ready(self):
        client = RegistryClient(reactor, self.reg.url, OPERATOR)
        self.addCleanup(client.close)
        kernel = os.path.join(self.mktemp())
        with open(kernel, "wb") as f:
            f.write(kernel_bytes())
        await push_image(client, "demo:1", kernel=kernel, cmdline="console=ttyS0")
        return self.make()


class FakeImageCacheContractTests(ImageCacheContract, unittest.TestCase):
    def make(self):
        kernel = self.mktemp()
        with open(kernel, "wb") as f:
            f.write(b"K")
        return FakeImages(kernel)

    async def ready(self):
        return self.make()
