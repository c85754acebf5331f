"""
The registry refuses what would hurt its hosts: hostile qcow2 disk layers, malformed tags and
manifests, unbounded Range headers, bodies sent before credentials, and idle uploads; and a
principal with pull rights may not delete. Real loopback HTTP, real qemu-img.
"""

import json
import os
import shutil
import tempfile

from twisted.internet import defer
from twisted.trial import unittest

from tests.drivers.test_diskimage import hostile_images
from tests.registry.helpers import (
    AGENT_ID,
    AGENT_TOKEN,
    RunningRegistry,
    basic,
    error_codes,
    header,
)
from zwrm.registry import image

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def aio(f):
    def wrapper(self, *a, **kw):
        return defer.Deferred.fromCoroutine(f(self, *a, **kw))

    wrapper.__name__ = f.__name__
    return wrapper


class Qcow2LayerTests(unittest.TestCase):
    def setUp(self):
        self.reg = RunningRegistry(self, self.mktemp())
        self.dir = tempfile.mkdtemp(prefix="zwrm-rq-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.images = hostile_images(self.dir)

    async def push_disk(self, path, media_type=image.QCOW2_TYPE, tag="v1"):
        with open(path, "rb") as f:
            data = f.read()
        cfg = image.make_config()
        cd = await self.reg.push_blob("os/deb", cfg)
        dd = await self.reg.push_blob("os/deb", data)
        doc = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": image.CONFIG_TYPE, "digest": cd, "size": len(cfg)},
            "layers": [{"mediaType": media_type, "digest": dd, "size": len(data)}],
        }
        return await self.reg.push_manifest("os/deb", tag, doc)

    @aio
    async def test_hostile_qcow2_refused(self):
        for case in ("backing-relative", "backing-absolute", "backing-json", "data-file"):
            resp, body = await self.push_disk(self.images[case])
            self.assertEqual(resp.code, 400, case)
            self.assertEqual(error_codes(body), ["MANIFEST_INVALID"], case)
            self.assertIn("refused", json.loads(body)["errors"][0]["message"], case)
        resp, _ = await self.reg.request("GET", "/v2/os/deb/manifests/v1")
        self.assertEqual(resp.code, 404)

    @aio
    async def test_raw_declared_qcow2_refused(self):
        resp, body = await self.push_disk(self.images["raw"])
        self.assertEqual(resp.code, 400)
        self.assertIn("not a valid qcow2 image", body.decode())

    @aio
    async def test_self_contained_qcow2_and_raw_accepted(self):
        resp, body = await self.push_disk(self.images["ok"])
        self.assertEqual(resp.code, 201, body)
        resp, body = await self.push_disk(self.images["raw"], image.DISK_TYPE, "raw")
        self.assertEqual(resp.code, 201, body)
        resp, body = await self.reg.request("GET", "/v2/os/deb/manifests/v1")
        info = image.parse_manifest(body)
        self.assertEqual(info["disk"]["format"], "qcow2")


class PullRightsTests(unittest.TestCase):
    """A principal with pull rights only (an agent) may not delete (issue 14, mutation gap)."""

    def setUp(self):
        self.reg = RunningRegistry(self, self.mktemp())

    @aio
    async def test_manifest_and_tag_delete_need_delete_rights(self):
        cfg = b"{}"
        cd = await self.reg.push_blob("app/web", cfg)
        doc = {"schemaVersion": 2, "mediaType": MANIFEST,
               "config": {"mediaType": image.CONFIG_TYPE, "digest": cd, "size": 2},
               "layers": []}
        resp, _ = await self.reg.push_manifest("app/web", "v1", doc)
        digest = header(resp, "Docker-Content-Digest")
        agent = basic(AGENT_ID, AGENT_TOKEN)
        for ref in ("v1", digest):
            resp, body = await self.reg.request("DELETE", f"/v2/app/web/manifests/{ref}",
                                                auth=agent)
            self.assertEqual(resp.code, 403, ref)
            self.assertEqual(error_codes(body), ["DENIED"])
        for ref in ("v1", digest):
            resp, _ = await self.reg.request("GET", f"/v2/app/web/manifests/{ref}", auth=agent)
            self.assertEqual(resp.code, 200, ref)
        resp, _ = await self.reg.request("DELETE", f"/v2/app/web/blobs/{cd}", auth=agent)
        self.assertEqual(resp.code, 403)
        self.assertTrue(os.path.isdir(self.reg.root))
