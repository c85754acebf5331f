"""
The registry refuses what would hurt its hosts: hostile qcow2 disk layers, malformed tags and
manifests, unbounded Range headers, bodies sent before credentials, and idle uploads; and a
principal with pull rights may not delete. Real loopback HTTP, real qemu-img.
"""

import hashlib
import io
import json
import os
import shutil
import tempfile

from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.trial import unittest
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import UNKNOWN_LENGTH

from tests.drivers.test_diskimage import hostile_images
from tests.registry.helpers import (
    AGENT_ID,
    AGENT_TOKEN,
    RunningRegistry,
    aio,
    basic,
    error_codes,
    header,
)
from zwrm.errors import InvalidArgument
from zwrm.registry import image
from zwrm.testing.image import kernel_bytes

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


async def push_layer(reg, name, tag, media_type, data):
    """
    Push an image of one layer, C{data} of C{media_type}, as a generic OCI client does.

    @return: C{(the layer's digest, (response, body) of the manifest's push)}.
    """
    cfg = image.make_config()
    cd = await reg.push_blob(name, cfg)
    digest = await reg.push_blob(name, data)
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": image.CONFIG_TYPE, "digest": cd, "size": len(cfg)},
        "layers": [{"mediaType": media_type, "digest": digest, "size": len(data)}],
    }
    return digest, await reg.push_manifest(name, tag, doc)


class Qcow2LayerTests(unittest.TestCase):
    def setUp(self):
        self.reg = RunningRegistry(self, self.mktemp())
        self.dir = tempfile.mkdtemp(prefix="zwrm-rq-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.images = hostile_images(self.dir)

    async def push_disk(self, path, media_type=image.QCOW2_TYPE, tag="v1"):
        with open(path, "rb") as f:
            _, pushed = await push_layer(self.reg, "os/deb", tag, media_type, f.read())
        return pushed

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


class KernelLayerTests(unittest.TestCase):
    """A kernel layer QEMU would not boot is refused with the manifest (an ORAS push too)."""

    def setUp(self):
        self.reg = RunningRegistry(self, self.mktemp())

    def push_kernel(self, data):
        return push_layer(self.reg, "apps/k", "v1", image.KERNEL_TYPE, data)

    @aio
    async def test_not_a_kernel_refused(self):
        kd, (resp, body) = await self.push_kernel(os.urandom(200_000))
        self.assertEqual(resp.code, 400, body)
        self.assertEqual(error_codes(body), ["MANIFEST_INVALID"])
        self.assertEqual(json.loads(body)["errors"][0]["message"],
                         f"kernel layer {kd} is not an x86 kernel QEMU can boot: a Linux "
                         "bzImage (vmlinuz), an ELF kernel with a PVH entry point or a "
                         "Multiboot kernel")
        resp, _ = await self.reg.request("GET", "/v2/apps/k/manifests/v1")
        self.assertEqual(resp.code, 404)

    @aio
    async def test_kernel_taken(self):
        _, (resp, body) = await self.push_kernel(kernel_bytes())
        self.assertEqual(resp.code, 201, body)


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


def _Chunked(data):
    """A request body of unknown length (sent chunked)."""
    p = FileBodyProducer(io.BytesIO(data))
    p.length = UNKNOWN_LENGTH
    return p


class _Raw(protocol.Protocol):
    """A raw HTTP client: sends what it is told, records what comes back and when it ends."""

    def __init__(self):
        self.data = b""
        self.ended = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.ended.callback(self.data)


async def poll(predicate, timeout=10.0, what="condition"):
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"{what} not reached within {timeout} s")


class GuardTests(unittest.TestCase):
    """Credentials before bodies, bounded header and body times (issue 14, item 6)."""

    def setUp(self):
        self.clock = task.Clock()
        self.reg = RunningRegistry(self, self.mktemp(), guard={
            "reactor": self.clock, "header_timeout": 10.0, "body_idle_timeout": 30.0,
            "body_timeout": 600.0})

    async def connect(self):
        port = self.reg.port.getHost().port
        p = _Raw()
        await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), p)
        self.addCleanup(lambda: p.transport.abortConnection() if p.transport.connected else None)
        return p

    def spooled(self):
        return sum(len(files) for _, _, files in os.walk(os.path.join(self.reg.root, "uploads")))

    @aio
    async def test_anonymous_upload_refused_before_its_body(self):
        p = await self.connect()
        digest = "sha256:" + "0" * 64
        p.transport.write(
            f"POST /v2/app/web/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {300 << 20}\r\nContent-Type: application/octet-stream\r\n\r\n"
            .encode() + b"x" * 65536)
        # The answer comes without the other 300 MiB: nothing waits for the body.
        data = await defer.Deferred.addTimeout(p.ended, 10, reactor)
        self.assertTrue(data.startswith(b"HTTP/1.1 401 "), data[:200])
        self.assertIn(b'WWW-Authenticate: Basic realm="zwrm"', data)
        self.assertEqual(json.loads(data.split(b"\r\n\r\n", 1)[1])["errors"][0]["code"],
                         "UNAUTHORIZED")
        self.assertEqual(self.spooled(), 0)

    @aio
    async def test_pull_only_upload_is_403_before_its_body(self):
        p = await self.connect()
        p.transport.write(
            b"POST /v2/app/web/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Authorization: " + basic(AGENT_ID, AGENT_TOKEN) + b"\r\n"
            b"Content-Length: 1000000\r\n\r\n")
        data = await defer.Deferred.addTimeout(p.ended, 10, reactor)
        self.assertTrue(data.startswith(b"HTTP/1.1 403 "), data[:200])
        self.assertNotIn(b"100 Continue", data)

    @aio
    async def test_authorized_upload_goes_through(self):
        data = os.urandom(200_000)
        digest = await self.reg.push_blob("app/web", data)
        resp, body = await self.reg.request("GET", f"/v2/app/web/blobs/{digest}")
        self.assertEqual(body, data)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no timer left behind

    @aio
    async def test_headers_must_arrive_in_time(self):
        p = await self.connect()
        p.transport.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")  # and no end of headers
        await poll(lambda: self.clock.getDelayedCalls(), what="the header timer")
        self.clock.advance(9)
        self.assertFalse(p.ended.called)
        self.clock.advance(1)
        await defer.Deferred.addTimeout(p.ended, 10, reactor)

    @aio
    async def test_a_stalled_body_is_dropped(self):
        p = await self.connect()
        p.transport.write(
            b"PATCH /v2/app/web/blobs/uploads/00000000-0000-0000-0000-000000000000 HTTP/1.1\r\n"
            b"Host: x\r\nAuthorization: Bearer op-token\r\nContent-Length: 1000\r\n\r\n"
            b"0123456789")
        await poll(lambda: len(self.clock.getDelayedCalls()) == 2, what="the body timers")
        self.clock.advance(29)
        p.transport.write(b"more")
        await task.deferLater(reactor, 0.2, lambda: None)
        self.clock.advance(29)  # bytes came within the last 30 s: not idle
        self.assertFalse(p.ended.called)
        self.clock.advance(31)
        await defer.Deferred.addTimeout(p.ended, 10, reactor)

    @aio
    async def test_a_slow_body_is_dropped(self):
        p = await self.connect()
        p.transport.write(
            b"PATCH /v2/app/web/blobs/uploads/00000000-0000-0000-0000-000000000000 HTTP/1.1\r\n"
            b"Host: x\r\nAuthorization: Bearer op-token\r\nContent-Length: 100000\r\n\r\n")
        await poll(lambda: len(self.clock.getDelayedCalls()) == 2, what="the body timers")
        for _ in range(30):
            p.transport.write(b"x")
            await task.deferLater(reactor, 0.02, lambda: None)
            self.clock.advance(20)
        await defer.Deferred.addTimeout(p.ended, 10, reactor)


class UploadExpiryTests(unittest.TestCase):
    @aio
    async def test_abandoned_sessions_go_within_the_hour(self):
        clock = task.Clock()
        reg = RunningRegistry(self, self.mktemp(), clock=clock)
        resp, _ = await reg.request("POST", "/v2/app/web/blobs/uploads/")
        self.assertEqual(resp.code, 202)
        store = reg.resource.store
        self.assertEqual(len(store._uploads), 1)
        svc = reg.resource.expiry_service(interval=300)
        svc.startService()
        self.addCleanup(svc.stopService)
        clock.advance(900)
        self.assertEqual(len(store._uploads), 1)
        clock.advance(300)  # idle for more than the 15-minute lifetime, and a sweep came
        self.assertEqual(store._uploads, {})
        self.assertEqual(os.listdir(os.path.join(reg.root, "uploads")), [])
        self.assertLess(store.upload_ttl + 300, 3600)


class BoundsTests(unittest.TestCase):
    """Tags, manifests and Range headers are validated and bounded (issue 14, item 8)."""

    def setUp(self):
        self.reg = RunningRegistry(self, self.mktemp())

    async def manifest(self):
        cfg = image.make_config()
        cd = await self.reg.push_blob("app/web", cfg)
        return {"schemaVersion": 2, "mediaType": MANIFEST,
                "config": {"mediaType": image.CONFIG_TYPE, "digest": cd, "size": len(cfg)},
                "layers": []}

    @aio
    async def test_tag_with_a_trailing_newline_is_refused(self):
        doc = await self.manifest()
        for tag in ("v1%0A", "v1%0D", "%0Av1", "x" * 129):
            resp, body = await self.reg.push_manifest("app/web", tag, doc)
            self.assertEqual(resp.code, 400, tag)
            self.assertEqual(error_codes(body), ["TAG_INVALID"], tag)
        self.assertEqual(self.reg.resource.store.tags("app/web"), [])
        from zwrm.registry.store import StoreError, check_name, check_tag, parse_digest

        for f, arg in ((check_tag, "v1\n"), (check_name, "app\n"),
                       (parse_digest, "sha256:" + "a" * 64 + "\n")):
            with self.assertRaises(StoreError):
                f(arg)
        with self.assertRaises(InvalidArgument):
            image.parse_reference("app:v1\n")
        # an image's kernel command line: what QEMU's -append can take, at the push and at
        # the agent's pull (it failed only at each machine's start)
        for cmdline in ("console=ttyS0\nx", "a\0b", "a\rb"):
            with self.assertRaises(InvalidArgument):
                image.make_config(cmdline)
            with self.assertRaises(InvalidArgument) as cm:
                image.parse_config(json.dumps({"cmdline": cmdline}).encode())
            self.assertEqual(cm.exception.message, "zwrm image config: cmdline must be one line"
                                                   f" of text, not {cmdline!r}")
        self.assertEqual(image.parse_config(image.make_config("console=ttyS0"))["cmdline"],
                         "console=ttyS0")

    @aio
    async def test_deep_manifest_is_a_clear_400(self):
        for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
                     b'{"layers": ' + b"[" * 40 + b"]" * 40 + b"}"):
            resp, content = await self.reg.push_manifest("app/web", "deep", body)
            self.assertEqual(resp.code, 400)
            err = json.loads(content)["errors"][0]
            self.assertEqual(err["code"], "MANIFEST_INVALID")
            self.assertIn("nested more than 32 levels", err["message"])
        # Brackets inside strings do not count.
        doc = await self.manifest()
        doc["annotations"] = {"note": "[" * 1000}
        resp, content = await self.reg.push_manifest("app/web", "ok", doc)
        self.assertEqual(resp.code, 201, content)

    @aio
    async def test_many_ranges_are_refused_at_once(self):
        data = os.urandom(10_000)
        digest = await self.reg.push_blob("app/web", data)
        many = "bytes=" + ",".join(f"{i}-{i}" for i in range(1000))
        resp, body = await defer.Deferred.addTimeout(defer.Deferred.fromCoroutine(
            self.reg.request("GET", f"/v2/app/web/blobs/{digest}",
                             headers={b"Range": many.encode()})), 10, reactor)
        self.assertEqual(resp.code, 416)
        self.assertEqual(error_codes(body), ["RANGE_INVALID"])
        for bad in ("bytes=0-1,2-3,4-5,6-7,8-9,10-11,12-13,14-15,16-17", "lines=1-2",
                    "bytes=" + "1" * 600 + "-"):
            resp, body = await self.reg.request("GET", f"/v2/app/web/blobs/{digest}",
                                                headers={b"Range": bad.encode()})
            self.assertEqual(resp.code, 416, bad)
        resp, body = await self.reg.request("GET", f"/v2/app/web/blobs/{digest}",
                                            headers={b"Range": b"bytes=10-19"})
        self.assertEqual((resp.code, body), (206, data[10:20]))
        resp, body = await self.reg.request("GET", f"/v2/app/web/blobs/{digest}",
                                            headers={b"Range": b"bytes=0-1, 5-6"})
        self.assertEqual(resp.code, 206)


class DeclaredChunkLengthTests(unittest.TestCase):
    """A chunk shorter or longer than declared is refused and leaves nothing (store.py)."""

    @aio
    async def test_store_enforces_the_declared_length(self):
        from zwrm.registry.store import RegistryStore, StoreError

        store = RegistryStore(reactor, self.mktemp())
        upload = store.start_upload("app/web")
        await store.append(upload, io.BytesIO(b"a" * 10), 10)
        for body, declared in ((b"b" * 50, 100), (b"c" * 50, 20)):
            with self.assertRaises(StoreError) as cm:
                await store.append(upload, io.BytesIO(body), declared)
            self.assertEqual(cm.exception.code, "BLOB_UPLOAD_INVALID")
            self.assertEqual(upload.size, 10)
            self.assertEqual(os.path.getsize(upload.path), 10)
        size = await store.finish_upload(upload, "sha256:" + hashlib.sha256(b"a" * 10).hexdigest())
        self.assertEqual(size, 10)

    @aio
    async def test_chunked_patch_shorter_than_its_range(self):
        reg = RunningRegistry(self, self.mktemp())
        resp, _ = await reg.request("POST", "/v2/app/web/blobs/uploads/")
        location = header(resp, "Location")

        resp, body = await reg.request(
            "PATCH", location, body=_Chunked(b"x" * 50),
            headers={b"Content-Range": b"0-99", b"Content-Type": b"application/octet-stream"})
        self.assertEqual(resp.code, 400, body)
        self.assertEqual(error_codes(body), ["BLOB_UPLOAD_INVALID"])
        uuid = location.rsplit("/", 1)[1]
        self.assertEqual(reg.resource.store._uploads[uuid].size, 0)


class ControlPlaneGuardTests(unittest.TestCase):
    """The control plane's own site has the guard (a real zwrm-control process)."""

    timeout = 90

    @aio
    async def test_anonymous_upload_refused_before_its_body(self):
        from urllib.parse import urlsplit

        from zwrm.testing.processes import ControlPlaneProcess, temp_dir

        cp = ControlPlaneProcess(reactor, os.path.join(temp_dir(self), "cp"))
        self.addCleanup(cp.stop)
        await cp.start()
        parts = urlsplit(cp.url)
        p = _Raw()
        await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, parts.hostname, parts.port), p)
        p.transport.write(
            b"POST /v2/app/web/blobs/uploads/ HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 314572800\r\n\r\n" + b"x" * 65536)
        data = await defer.Deferred.addTimeout(p.ended, 20, reactor)
        self.assertTrue(data.startswith(b"HTTP/1.1 401 "), data[:200])


class GuardConfigTests(unittest.SynchronousTestCase):
    def test_flags(self):
        from twisted.python import usage

        from zwrm.control.tap import Options

        o = Options()
        o.parseOptions(["--data-dir", self.mktemp(), "--registry-header-timeout", "3",
                        "--registry-body-timeout", "60", "--registry-idle-timeout", "5",
                        "--registry-upload-ttl", "120"])
        c = o.config
        self.assertEqual((c.registry_header_timeout, c.registry_body_timeout,
                          c.registry_idle_timeout, c.registry_upload_ttl), (3, 60, 5, 120))
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--data-dir", self.mktemp(), "--registry-idle-timeout", "0"])
