"""
The registry's collector (L{RegistryStore.scan} and L{RegistryStore.collect}) on a real store
in a temporary directory: what no tag, index or caller needs goes once it is older than the
grace period, its content freed when no repository links it; what a push holds, what a tag
points at and what changed since the scan stay.
"""

import io
import json
import os
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from tests.agent.test_membership import start_plane
from tests.registry.helpers import RunningRegistry, aio
from zwrm.cli import client
from zwrm.cli.main import build_parser
from zwrm.registry import image
from zwrm.registry.store import RegistryStore
from zwrm.testing.image import kernel_bytes

HOUR = 3600.0
INDEX = "application/vnd.oci.image.index.v1+json"


class CollectorTests(unittest.TestCase):
    def setUp(self):
        self.store = RegistryStore(reactor, self.mktemp())

    async def blob(self, name, data):
        digest = await self.store.put_bytes(name, data)
        self.store._link(name, digest)
        return digest

    async def push(self, name, tag, *layers):
        """An image of C{layers} (bytes) in C{name}, tagged C{tag} (or untagged: None)."""
        config = image.make_config()
        cd = await self.blob(name, config)
        digests = [await self.blob(name, data) for data in layers]
        manifest = image.make_manifest((cd, len(config)), [
            ("disk", d, len(data), "f") for d, data in zip(digests, layers, strict=True)])
        md = await self.store.put_bytes(name, manifest)
        self.store.link_manifest(name, md, image.MANIFEST_TYPE, tag)
        return md, cd, digests

    def age(self, name, *digests, seconds=2 * HOUR):
        """Make the links of C{digests} in C{name} C{seconds} old."""
        then = time.time() - seconds
        for d in digests:
            for path in (self.store._link_path(name, d), self.store._manifest_link(name, d)):
                if os.path.exists(path):
                    os.utime(path, (then, then))

    def gc(self, name, keep=(), grace=HOUR):
        done = self.store.collect(self.store.scan(name, keep, grace), grace)
        self.store.empty_trash(done["trash"])
        return done

    def content(self, digest):
        return os.path.exists(self.store.blob_path(digest))

    @aio
    async def test_an_untagged_image_goes_once_old_what_a_tag_needs_stays(self):
        shared = os.urandom(5000)
        v1, c1, [s1, only1] = await self.push("web", "v1", shared, os.urandom(70_000))
        v2, c2, [s2, only2] = await self.push("web", "v2", shared, os.urandom(9000))
        self.store.delete_manifest("web", "v1")  # the tag only: nothing else goes
        self.assertTrue(self.content(v1) and self.content(only1))
        # too young: a push may be under way
        self.assertEqual(self.gc("web")["manifests"], [])
        self.age("web", v1, v2, c1, s1, only1, only2)
        done = self.gc("web")
        self.assertEqual((done["manifests"], done["blobs"], done["changed"]),
                         ([v1], [only1], False))
        self.assertGreaterEqual(done["bytes"], 70_000)
        self.assertFalse(self.content(v1) or self.content(only1))
        for d in (v2, c2, s1, s2, only2):  # v2, its config, the shared layer, its own
            self.assertTrue(self.content(d), d)
        self.assertEqual(self.store.resolve("web", "v2")[0], v2)
        self.assertEqual(os.listdir(os.path.join(self.store.root, "trash")), [])
        self.assertEqual(self.gc("web")["manifests"], [])  # nothing more

    @aio
    async def test_an_old_layer_a_new_untagged_image_uses_stays(self):
        """A push by digest (no tag yet) of an image whose layer was stored long ago."""
        layer = os.urandom(4000)
        old, _, [d] = await self.push("web", "v1", layer)
        self.age("web", old, d)
        self.store.delete_manifest("web", "v1")
        new, _, _ = await self.push("web", None, layer, os.urandom(10))
        self.age("web", d)  # (linked again by the push: as old as before)
        done = self.gc("web")
        self.assertEqual((done["manifests"], done["blobs"]), ([old], []))
        self.assertTrue(self.content(d) and self.content(new))
        self.assertEqual(self.store.has_blob("web", d), 4000)

    @aio
    async def test_what_the_caller_keeps_and_a_kept_index_uses_stay(self):
        pinned, _, [p] = await self.push("web", None, os.urandom(3000))
        child, _, [c] = await self.push("web", None, os.urandom(3000))
        index = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
            {"mediaType": image.MANIFEST_TYPE, "digest": child, "size": 1}]}).encode()
        idx = await self.store.put_bytes("web", index)
        self.store.link_manifest("web", idx, INDEX, "multi")
        self.age("web", pinned, p, child, c, idx)
        done = self.gc("web", keep={pinned})
        self.assertEqual((done["manifests"], done["blobs"]), ([], []))
        self.store.delete_manifest("web", "multi")
        done = self.gc("web")  # neither pinned nor tagged any more
        self.assertEqual(sorted(done["manifests"]), sorted([pinned, child, idx]))
        self.assertEqual(sorted(done["blobs"]), sorted([p, c]))

    @aio
    async def test_content_another_repository_links_stays(self):
        layer = os.urandom(4000)
        md, _, [d] = await self.push("web", None, layer)
        await self.push("api", "v1", layer)
        self.age("web", md, d)
        done = self.gc("web")
        self.assertIn(d, done["blobs"])
        self.assertTrue(self.content(d))
        self.assertEqual(self.store.has_blob("api", d), 4000)
        self.assertIsNone(self.store.has_blob("web", d))

    @aio
    async def test_what_a_push_holds_stays(self):
        md, _, [d] = await self.push("web", None, os.urandom(4000))
        self.age("web", md, d)
        release = self.store.hold([d, md])
        done = self.gc("web")
        self.assertEqual((done["manifests"], done["blobs"]), ([], []))
        self.assertTrue(self.content(d) and self.content(md))
        release()
        done = self.gc("web")
        self.assertEqual((done["manifests"], done["blobs"]), ([md], [d]))

    @aio
    async def test_a_repository_changed_since_its_scan_is_left(self):
        md, _, [d] = await self.push("web", None, os.urandom(4000))
        self.age("web", md, d)
        plan = self.store.scan("web", (), HOUR)
        self.assertEqual((plan["manifests"], plan["blobs"]), ([md], [d]))
        self.store.link_manifest("web", md, image.MANIFEST_TYPE, "again")  # tagged meanwhile
        done = self.store.collect(plan, HOUR)
        self.assertEqual((done["manifests"], done["blobs"], done["changed"]), ([], [], True))
        self.assertEqual(self.store.resolve("web", "again")[0], md)
        self.assertTrue(self.content(d))
        # pushed again by digest (no tag) between the scan and the removal: its layer stays
        self.store.delete_manifest("web", "again")
        self.age("web", md, d)
        plan = self.store.scan("web", (), HOUR)
        self.assertEqual((plan["manifests"], plan["blobs"]), ([md], [d]))
        self.store.link_manifest("web", md, image.MANIFEST_TYPE)
        done = self.store.collect(plan, HOUR)
        self.assertEqual((done["blobs"], done["changed"]), ([], True))
        self.assertTrue(self.content(d))

    @aio
    async def test_a_manifest_that_cannot_be_read_keeps_everything(self):
        md, _, [d] = await self.push("web", "v1", os.urandom(4000))
        old, _, [o] = await self.push("web", None, os.urandom(4000))
        self.age("web", md, d, old, o)
        with open(self.store.blob_path(md), "wb") as f:
            f.write(b"{not json")
        done = self.gc("web")
        self.assertEqual((done["manifests"], done["blobs"]), ([], []))
        self.assertTrue(self.content(o))

    def test_content_left_in_the_trash_goes_at_start(self):
        trash = os.path.join(self.store.root, "trash", "x")
        with open(trash, "wb") as f:
            f.write(b"collected")
        RegistryStore(reactor, self.store.root)
        self.assertEqual(os.listdir(os.path.join(self.store.root, "trash")), [])

    @aio
    async def test_an_upload_committing_what_was_unused_keeps_it(self):
        """
        The same content uploaded again while the collector takes its old, unused link:
        committed, it stays (held from its commit to its link).
        """
        data = os.urandom(5000)
        d = await self.blob("web", data)
        self.age("web", d)
        committed, go_on = Deferred(), Deferred()
        commit = self.store._commit

        async def slow_commit(*args):
            await commit(*args)
            committed.callback(None)
            await go_on

        self.patch(self.store, "_commit", slow_commit)
        upload = self.store.start_upload("web")
        with open(os.path.join(self.mktemp()), "wb") as f:
            f.write(data)
            path = f.name
        with open(path, "rb") as f:
            await self.store.append(upload, f)
        finishing = Deferred.fromCoroutine(self.store.finish_upload(upload, d))
        await committed
        done = self.gc("web")
        self.assertEqual((done["blobs"], done["bytes"]), ([], 0))
        go_on.callback(None)
        self.assertEqual(await finishing, 5000)
        self.assertEqual(self.store.has_blob("web", d), 5000)


class PushUnderWayTests(unittest.TestCase):
    timeout = 30

    @aio
    async def test_what_a_manifest_push_checked_stays_until_it_is_linked(self):
        """
        A manifest pushed (over HTTP) whose blobs were stored long ago and nothing used
        since: the collector runs while the push checks its layers; they stay, and the
        image is whole.
        """
        reg = RunningRegistry(self, self.mktemp())
        store = reg.resource.store
        config, layer = image.make_config(), os.urandom(6000)
        cd, ld = await reg.push_blob("web", config), await reg.push_blob("web", layer)
        then = time.time() - 2 * HOUR
        for d in (cd, ld):
            os.utime(store._link_path("web", d), (then, then))
        checking, go_on = Deferred(), Deferred()

        async def check_layers(doc):
            checking.callback(None)
            await go_on

        self.patch(reg.resource, "_check_layers", check_layers)
        manifest = image.make_manifest((cd, len(config)), [("disk", ld, len(layer), "f")])
        push = Deferred.fromCoroutine(reg.push_manifest("web", "v1", manifest))
        await checking
        done = store.collect(store.scan("web", (), HOUR), HOUR)
        self.assertEqual(done["blobs"], [])
        go_on.callback(None)
        resp, body = await push
        self.assertEqual(resp.code, 201, body)
        for d, size in ((cd, len(config)), (ld, len(layer))):
            self.assertEqual(store.has_blob("web", d), size)
        # once linked, the tag keeps them
        self.assertEqual(store.collect(store.scan("web", (), HOUR), HOUR)["blobs"], [])


class ImagesGcCommandTests(unittest.TestCase):
    """C{zwrm images gc} against a real control plane (its registry, its apps)."""

    timeout = 60

    async def zwrm(self, plane, *argv):
        args = build_parser().parse_args(["--api-url", plane.url, *argv])
        out = io.StringIO()
        await args.func(reactor, args, out)
        return out.getvalue()

    @aio
    async def test_gc_keeps_what_tags_and_apps_name(self):
        plane, tmp = await start_plane(self)
        self.patch(client.os, "environ", {"ZWRM_TOKEN": plane.operator_token})
        kernel = os.path.join(tmp, "vmlinuz")
        with open(kernel, "wb") as f:
            f.write(kernel_bytes(os.urandom(200_000)))
        digests = {}
        for tag in ("v1", "v2", "v3"):
            disk = os.path.join(tmp, f"{tag}.raw")
            with open(disk, "wb") as f:
                f.write(os.urandom(300_000))
            out = await self.zwrm(plane, "images", "push", f"web:{tag}", "--kernel", kernel,
                                  "--disk", disk, "-q")
            digests[tag] = out.split()[1]
        # v1 is deployed by its digest, then untagged; v3 untagged and used by nothing
        await self.zwrm(plane, "apps", "create", "pinned")
        await self.zwrm(plane, "deploy", "pinned", "--image", f"web@{digests['v1']}",
                        "--replicas", "0")
        await self.zwrm(plane, "images", "rm", "web:v1", "web:v3")

        dry = json.loads(await self.zwrm(plane, "images", "gc", "--dry-run", "--grace", "0",
                                         "--json"))
        self.assertEqual([m["digest"] for m in dry["manifests"]], [digests["v3"]])
        self.assertEqual(len(dry["blobs"]), 1)  # v3's disk (the kernel and config are shared)
        self.assertTrue(dry["dry_run"])
        # nothing happened: by default a day's grace, and the dry run removed nothing
        self.assertIn("removed 0 manifest(s) and 0 blob(s): 0.0 MiB freed",
                      await self.zwrm(plane, "images", "gc"))
        out = await self.zwrm(plane, "images", "gc", "--grace", "0")
        lines = out.splitlines()
        self.assertEqual(lines[0], f"removed manifest web@{digests['v3']}")
        self.assertEqual(lines[1], f"removed blob web@{dry['blobs'][0]['digest']}")
        self.assertRegex(lines[2], r"^removed 1 manifest\(s\) and 1 blob\(s\): 0\.\d MiB freed$")
        listing = await self.zwrm(plane, "images", "list", "--json")
        self.assertEqual([i["tag"] for i in json.loads(listing)], ["v2"])
        # the pinned app's image is whole: a redeploy of it is checked against the registry
        status = json.loads(await self.zwrm(plane, "deploy", "pinned", "--memory", "300",
                                            "--json"))
        self.assertEqual(status["spec"]["image"], f"web@{digests['v1']}")
        info = json.loads(await self.zwrm(plane, "images", "gc", "--grace", "0", "--json"))
        self.assertEqual((info["manifests"], info["blobs"]), ([], []))

    @aio
    async def test_a_repository_left_for_the_next_run_is_said(self):
        from zwrm.cli import images as cli_images

        async def answer(reactor, url, procedure, *args):
            self.assertEqual((procedure, args), ("zwrm.image.gc", (True, 0.0)))
            return {"manifests": [], "blobs": [{"name": "web", "digest": "sha256:" + "a" * 64}],
                    "bytes": 3 << 20, "dry_run": True, "changed": ["api"]}

        self.patch(cli_images, "call_once", answer)
        args = build_parser().parse_args(["images", "gc", "--dry-run", "--grace", "0"])
        out = io.StringIO()
        await args.func(reactor, args, out)
        self.assertEqual(out.getvalue().splitlines(), [
            "would remove blob web@sha256:" + "a" * 64,
            "would remove 0 manifest(s) and 1 blob(s): at most 3.0 MiB to free",
            "api: changed by a push or a deploy meanwhile; left for the next run"])

    def test_bad_grace(self):
        with self.assertRaises(SystemExit):
            build_parser().parse_args(["images", "gc", "--grace", "-1"])
