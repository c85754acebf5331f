"""
Tests for L{zwrm.control.images.ImageAPI} (C{zwrm.image.*}) over a real registry: images
pushed over HTTP (the OCI API) as C{zwrm images push} does, then seen and removed through
the WAMP procedures' implementation, with the errors callers get.
"""

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from tests.registry.helpers import RunningRegistry
from zwrm import errors
from zwrm.control.images import ImageAPI
from zwrm.registry import image
from zwrm.testing.image import kernel_bytes


def d(f):
    def wrapper(self):
        return ensureDeferred(f(self))

    wrapper.__name__ = f.__name__
    wrapper.__doc__ = f.__doc__
    return wrapper


class ImageAPITests(TestCase):
    async def push(self, registry, name, tag, kernel=kernel_bytes(b"k" * 100), initrd=b"i" * 50):
        config = image.make_config("console=ttyS0", 8080)
        cd = await registry.push_blob(name, config)
        kd = await registry.push_blob(name, kernel)
        idd = await registry.push_blob(name, initrd)
        manifest = image.make_manifest(
            (cd, len(config)),
            [("kernel", kd, len(kernel), "vmlinuz"), ("initrd", idd, len(initrd), "initrd")],
        )
        resp, body = await registry.push_manifest(name, tag, manifest)
        self.assertEqual(resp.code, 201, body)
        return resp.headers.getRawHeaders("Docker-Content-Digest")[0]

    def api(self, **kw):
        registry = RunningRegistry(self, self.mktemp(), **kw)
        return registry, ImageAPI(reactor, registry.resource.store,
                                  delete_enabled=registry.resource.delete_enabled)

    @d
    async def test_list_info_delete(self):
        registry, api = self.api()
        self.assertEqual(await api.list(), [])
        digest = await self.push(registry, "demo", "1")
        await registry.push_manifest(  # a second tag on the same manifest
            "demo", "latest", (await registry.request("GET", "/v2/demo/manifests/1"))[1])
        await self.push(registry, "team/other", "v2", kernel=kernel_bytes(b"x" * 10))
        images = await api.list()
        self.assertEqual([(i["name"], i["tag"]) for i in images],
                         [("demo", "1"), ("demo", "latest"), ("team/other", "v2")])
        first = images[0]
        self.assertEqual((first["digest"], first["kind"], first["size"]), (digest, "zwrm", 1174))
        self.assertEqual(sorted(first["layers"]), ["initrd", "kernel"])
        self.assertEqual([i["tag"] for i in await api.list("demo")], ["1", "latest"])
        info = await api.info("demo:1")
        self.assertEqual((info["digest"], info["tags"]), (digest, ["1", "latest"]))
        self.assertEqual((await api.info(f"demo@{digest}"))["tags"], ["1", "latest"])

        self.assertEqual(await api.delete("demo:latest"), {"image": "demo:latest", "deleted": True})
        self.assertEqual([i["tag"] for i in await api.list("demo")], ["1"])
        await api.delete(f"demo@{digest}")
        self.assertEqual([i["name"] for i in await api.list()], ["team/other"])
        resp, _ = await registry.request("GET", "/v2/demo/manifests/1")
        self.assertEqual(resp.code, 404)

    @d
    async def test_errors(self):
        registry, api = self.api()
        await self.push(registry, "demo", "1")
        for call, kind, text in [
            (lambda: api.info("demo:2"), errors.NotFound, "no image demo:2"),
            (lambda: api.delete("nope:1"), errors.NotFound, "no image nope:1"),
            (lambda: api.delete("demo"), errors.InvalidArgument, "say which tag or digest"),
            (lambda: api.info("Bad Name"), errors.InvalidArgument, "invalid image reference"),
            (lambda: api.info("a" * 256), errors.InvalidArgument, "at most 255 characters"),
            (lambda: api.info("a/" * 128 + "a:1"), errors.InvalidArgument,
             "at most 255 characters"),
        ]:
            with self.assertRaises(kind) as cm:
                await call()
            self.assertIn(text, cm.exception.args[0])
        self.assertEqual(len(await api.list()), 1)  # nothing lost

    @d
    async def test_delete_turned_off(self):
        registry, api = self.api(delete_enabled=False)
        await self.push(registry, "demo", "1")
        with self.assertRaises(errors.NotAuthorized):
            await api.delete("demo:1")
        with self.assertRaises(errors.NotAuthorized):
            await api.gc(grace=0)
        self.assertEqual(len(await api.list()), 1)

    @d
    async def test_gc_keeps_an_image_deployed_by_digest_while_it_scanned(self):
        """
        An app deployed by the digest of an untagged image while the collector scans: the
        image stays (its repository is left for the next run).
        """
        registry, api = self.api()
        digest = await self.push(registry, "demo", "1")
        await api.delete("demo:1")
        named = [set(), {"demo@" + digest}]  # the references before and after the scan
        api.references = lambda: ensureDeferred(_first(named))
        done = await api.gc(grace=0)
        self.assertEqual((done["manifests"], done["blobs"], done["changed"]), ([], [], ["demo"]))
        self.assertEqual((await api.info("demo@" + digest))["digest"], digest)
        named = [{"demo@" + digest}]
        done = await api.gc(grace=0)  # named from the start: kept, and nothing else to do
        self.assertEqual((done["manifests"], done["blobs"], done["changed"]), ([], [], []))
        named = [set()]
        done = await api.gc(grace=0)  # named no more: it goes, with its layers
        self.assertEqual((done["manifests"], len(done["blobs"]), done["changed"]),
                         ([{"name": "demo", "digest": digest}], 3, []))
        with self.assertRaises(errors.NotFound):
            await api.info("demo@" + digest)


async def _first(named):
    """The next of the reference sets in C{named} (the last one again once it is the last)."""
    return named.pop(0) if len(named) > 1 else named[0]
