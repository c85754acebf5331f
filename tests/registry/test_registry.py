"""
Conformance of zwrm's registry with the OCI Distribution spec, over real loopback HTTP.
"""

import errno
import json
import os

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from tests.registry.helpers import (
    AGENT_ID,
    AGENT_TOKEN,
    RunningRegistry,
    aio,
    basic,
    default_authorizer,
    digest_of,
    error_codes,
    header,
)
from zwrm.testing.image import kernel_bytes

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


class RegistryTestsMixin:
    def setUp(self):
        self.reg = RunningRegistry(self, self.mktemp())

    async def image(self, name="app/web", tag="v1", data=kernel_bytes(b"kernel-bytes")):
        cfg = b"{}"
        cd = await self.reg.push_blob(name, cfg)
        ld = await self.reg.push_blob(name, data)
        doc = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": "application/vnd.zwrm.image.config.v1+json", "digest": cd, "size": len(cfg)},
            "layers": [{"mediaType": "application/vnd.zwrm.kernel.v1", "digest": ld, "size": len(data)}],
        }
        resp, body = await self.reg.push_manifest(name, tag, doc)
        self.assertEqual(resp.code, 201, body)
        return doc, header(resp, "Docker-Content-Digest")


class AuthTests(RegistryTestsMixin, unittest.TestCase):
    @aio
    async def test_anonymous_refused_with_challenge(self):
        resp, body = await self.reg.request("GET", "/v2/", auth=None)
        self.assertEqual(resp.code, 401)
        self.assertEqual(error_codes(body), ["UNAUTHORIZED"])
        self.assertIn("Basic realm=", header(resp, "WWW-Authenticate"))
        self.assertEqual(header(resp, "Docker-Distribution-API-Version"), "registry/2.0")

    @aio
    async def test_bearer_and_basic(self):
        resp, _ = await self.reg.request("GET", "/v2/")
        self.assertEqual(resp.code, 200)
        resp, _ = await self.reg.request("GET", "/v2/", auth=basic(AGENT_ID, AGENT_TOKEN))
        self.assertEqual(resp.code, 200)
        # An operator token works as the password of Basic auth too (docker/oras login).
        resp, _ = await self.reg.request("GET", "/v2/", auth=basic("anyone", "op-token"))
        self.assertEqual(resp.code, 200)

    @aio
    async def test_wrong_token(self):
        for auth in ("nope", basic(AGENT_ID, "wrong"), b"Basic !!!", b"Digest x"):
            resp, body = await self.reg.request("GET", "/v2/", auth=auth)
            self.assertEqual(resp.code, 401, auth)
            self.assertEqual(error_codes(body), ["UNAUTHORIZED"])

    @aio
    async def test_agent_may_pull_not_push(self):
        d = await self.reg.push_blob("a/b", b"data")
        agent = basic(AGENT_ID, AGENT_TOKEN)
        resp, body = await self.reg.request("GET", f"/v2/a/b/blobs/{d}", auth=agent)
        self.assertEqual((resp.code, body), (200, b"data"))
        resp, body = await self.reg.request("POST", "/v2/a/b/blobs/uploads/", auth=agent)
        self.assertEqual(resp.code, 403)
        self.assertEqual(error_codes(body), ["DENIED"])
        resp, body = await self.reg.request("DELETE", f"/v2/a/b/blobs/{d}", auth=agent)
        self.assertEqual(resp.code, 403)

    @aio
    async def test_anonymous_pull_when_configured(self):
        reg = RunningRegistry(self, self.mktemp(), default_authorizer(anonymous=("pull",)))
        resp, _ = await reg.request("GET", "/v2/", auth=None)
        self.assertEqual(resp.code, 200)
        resp, _ = await reg.request("POST", "/v2/x/blobs/uploads/", auth=None)
        self.assertEqual(resp.code, 401)


    @aio
    async def test_synchronous_authorizer(self):
        from zwrm.errors import NotAuthorized

        def authorize(request, action):
            if action != "pull":
                raise NotAuthorized("read-only registry")
            return "reader"

        reg = RunningRegistry(self, self.mktemp(), authorize)
        resp, _ = await reg.request("GET", "/v2/", auth=None)
        self.assertEqual(resp.code, 200)
        resp, body = await reg.request("POST", "/v2/x/blobs/uploads/", auth=None)
        self.assertEqual((resp.code, error_codes(body)), (403, ["DENIED"]))


class BlobTests(RegistryTestsMixin, unittest.TestCase):
    @aio
    async def test_monolithic_post(self):
        data = os.urandom(300_000)  # above twisted.web's in-memory body limit
        d = await self.reg.push_blob("app/web", data)
        resp, body = await self.reg.request("HEAD", f"/v2/app/web/blobs/{d}")
        self.assertEqual(resp.code, 200)
        self.assertEqual(body, b"")
        self.assertEqual(header(resp, "Content-Length"), str(len(data)))
        self.assertEqual(header(resp, "Docker-Content-Digest"), d)
        resp, body = await self.reg.request("GET", f"/v2/app/web/blobs/{d}")
        self.assertEqual(resp.code, 200)
        self.assertEqual(body, data)

    @aio
    async def test_post_then_put(self):
        data = b"hello world"
        resp, _ = await self.reg.request("POST", "/v2/app/web/blobs/uploads/")
        self.assertEqual(resp.code, 202)
        loc = header(resp, "Location")
        self.assertTrue(loc.startswith("/v2/app/web/blobs/uploads/"))
        resp, body = await self.reg.request("PUT", f"{loc}?digest={digest_of(data)}", data)
        self.assertEqual(resp.code, 201, body)
        self.assertEqual(header(resp, "Location"), f"/v2/app/web/blobs/{digest_of(data)}")
        self.assertEqual(header(resp, "Docker-Content-Digest"), digest_of(data))
        resp, body = await self.reg.request("GET", header(resp, "Location"))
        self.assertEqual(body, data)

    @aio
    async def test_chunked_upload(self):
        a, b = os.urandom(150_000), os.urandom(1000)
        resp, _ = await self.reg.request("POST", "/v2/app/web/blobs/uploads/")
        loc = header(resp, "Location")
        resp, _ = await self.reg.request(
            "PATCH", loc, a, headers={b"Content-Range": f"0-{len(a) - 1}".encode(),
                                      b"Content-Type": b"application/octet-stream"}
        )
        self.assertEqual(resp.code, 202)
        self.assertEqual(header(resp, "Range"), f"0-{len(a) - 1}")
        loc = header(resp, "Location")
        # Out of order: refused with 416, nothing appended.
        resp, body = await self.reg.request(
            "PATCH", loc, b, headers={b"Content-Range": f"5-{5 + len(b) - 1}".encode()}
        )
        self.assertEqual(resp.code, 416)
        self.assertEqual(error_codes(body), ["BLOB_UPLOAD_INVALID"])
        # Streamed chunk without Content-Range.
        resp, _ = await self.reg.request("PATCH", loc, b)
        self.assertEqual(resp.code, 202)
        resp, _ = await self.reg.request("GET", loc)
        self.assertEqual(resp.code, 204)
        self.assertEqual(header(resp, "Range"), f"0-{len(a) + len(b) - 1}")
        resp, body = await self.reg.request("PUT", f"{loc}?digest={digest_of(a + b)}")
        self.assertEqual(resp.code, 201, body)
        resp, body = await self.reg.request("GET", f"/v2/app/web/blobs/{digest_of(a + b)}")
        self.assertEqual(body, a + b)
        # The session is gone after completion.
        resp, body = await self.reg.request("GET", loc)
        self.assertEqual(resp.code, 404)
        self.assertEqual(error_codes(body), ["BLOB_UPLOAD_UNKNOWN"])

    @aio
    async def test_wrong_digest_refused_and_nothing_stored(self):
        data, other = b"actual", b"claimed"
        resp, body = await self.reg.request(
            "POST", f"/v2/app/web/blobs/uploads/?digest={digest_of(other)}", data
        )
        self.assertEqual(resp.code, 400)
        self.assertEqual(error_codes(body), ["DIGEST_INVALID"])
        for d in (digest_of(data), digest_of(other)):
            resp, body = await self.reg.request("HEAD", f"/v2/app/web/blobs/{d}")
            self.assertEqual(resp.code, 404)
        resp, _ = await self.reg.request("POST", "/v2/app/web/blobs/uploads/")
        loc = header(resp, "Location")
        resp, body = await self.reg.request("PUT", f"{loc}?digest={digest_of(other)}", data)
        self.assertEqual(resp.code, 400)
        self.assertEqual(error_codes(body), ["DIGEST_INVALID"])
        self.assertEqual(os.listdir(os.path.join(self.reg.root, "uploads")), [])

    @aio
    async def test_malformed_digest(self):
        for bad in ("sha256:xyz", "md5:" + "0" * 32, "sha256:" + "A" * 64):
            resp, body = await self.reg.request("POST", f"/v2/app/web/blobs/uploads/?digest={bad}", b"x")
            self.assertEqual(resp.code, 400, bad)
            self.assertEqual(error_codes(body), ["DIGEST_INVALID"])
        resp, _ = await self.reg.request("POST", "/v2/app/web/blobs/uploads/")
        resp, body = await self.reg.request("PUT", header(resp, "Location"), b"x")
        self.assertEqual(error_codes(body), ["DIGEST_INVALID"])

    @aio
    async def test_sha512(self):
        import hashlib

        data = b"five-twelve"
        d = "sha512:" + hashlib.sha512(data).hexdigest()
        resp, body = await self.reg.request("POST", f"/v2/app/web/blobs/uploads/?digest={d}", data)
        self.assertEqual(resp.code, 201, body)
        resp, body = await self.reg.request("GET", f"/v2/app/web/blobs/{d}")
        self.assertEqual(body, data)

    @aio
    async def test_range_get(self):
        data = bytes(range(256)) * 100
        d = await self.reg.push_blob("app/web", data)
        resp, body = await self.reg.request(
            "GET", f"/v2/app/web/blobs/{d}", headers={b"Range": b"bytes=1000-"}
        )
        self.assertEqual(resp.code, 206)
        self.assertEqual(body, data[1000:])
        resp, body = await self.reg.request(
            "GET", f"/v2/app/web/blobs/{d}", headers={b"Range": b"bytes=10-19"}
        )
        self.assertEqual((resp.code, body), (206, data[10:20]))
        self.assertEqual(header(resp, "Content-Range"), f"bytes 10-19/{len(data)}")

    @aio
    async def test_unknown_blob(self):
        d = await self.reg.push_blob("app/web", b"private")
        resp, body = await self.reg.request("GET", f"/v2/app/web/blobs/{digest_of(b'none')}")
        self.assertEqual(resp.code, 404)
        self.assertEqual(error_codes(body), ["BLOB_UNKNOWN"])
        # Held by another repository only: not served here.
        resp, body = await self.reg.request("GET", f"/v2/other/repo/blobs/{d}")
        self.assertEqual(resp.code, 404)

    @aio
    async def test_cross_repository_mount(self):
        d = await self.reg.push_blob("app/web", b"shared layer")
        resp, body = await self.reg.request(
            "POST", f"/v2/app/api/blobs/uploads/?mount={d}&from=app/web"
        )
        self.assertEqual(resp.code, 201, body)
        self.assertEqual(header(resp, "Location"), f"/v2/app/api/blobs/{d}")
        resp, body = await self.reg.request("GET", f"/v2/app/api/blobs/{d}")
        self.assertEqual(body, b"shared layer")
        # Mount from a repository that lacks the blob: an ordinary upload session.
        other = digest_of(b"nowhere")
        resp, body = await self.reg.request(
            "POST", f"/v2/app/api/blobs/uploads/?mount={other}&from=app/web"
        )
        self.assertEqual(resp.code, 202)
        self.assertIn("/blobs/uploads/", header(resp, "Location"))

    @aio
    async def test_cancel_upload(self):
        resp, _ = await self.reg.request("POST", "/v2/app/web/blobs/uploads/")
        loc = header(resp, "Location")
        await self.reg.request("PATCH", loc, b"partial")
        resp, _ = await self.reg.request("DELETE", loc)
        self.assertEqual(resp.code, 204)
        resp, body = await self.reg.request("GET", loc)
        self.assertEqual(resp.code, 404)
        self.assertEqual(error_codes(body), ["BLOB_UPLOAD_UNKNOWN"])
        self.assertEqual(os.listdir(os.path.join(self.reg.root, "uploads")), [])

    @aio
    async def test_upload_belongs_to_its_repository(self):
        resp, _ = await self.reg.request("POST", "/v2/app/web/blobs/uploads/")
        uuid = header(resp, "Location").rsplit("/", 1)[1]
        resp, body = await self.reg.request("GET", f"/v2/app/other/blobs/uploads/{uuid}")
        self.assertEqual(error_codes(body), ["BLOB_UPLOAD_UNKNOWN"])

    @aio
    async def test_interrupted_upload(self):
        """
        A chunk whose connection drops before all its bytes arrived adds nothing; the
        upload can continue from where it was, and a blob is only made from all bytes.
        """
        data = os.urandom(200_000)
        resp, _ = await self.reg.request("POST", "/v2/app/web/blobs/uploads/")
        loc = header(resp, "Location")
        resp, _ = await self.reg.request(
            "PATCH", loc, data[:1000], headers={b"Content-Range": b"0-999"}
        )
        loc = header(resp, "Location")
        # Declare the rest but send only part of it, then drop the connection.
        head = (
            f"PATCH {loc} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer op-token\r\n"
            f"Content-Range: 1000-{len(data) - 1}\r\nContent-Length: {len(data) - 1000}\r\n\r\n"
        ).encode()
        lost = defer.Deferred()

        class Dropper(protocol.Protocol):
            def connectionMade(self):
                self.transport.write(head + data[1000:50_000])
                self.transport.loseConnection()

            def connectionLost(self, reason):
                lost.callback(None)

        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.reg.port.getHost().port), Dropper()
        )
        await lost
        await task.deferLater(reactor, 0.05, lambda: None)
        resp, _ = await self.reg.request("GET", loc)
        self.assertEqual(header(resp, "Range"), "0-999")
        # Finishing now with the full digest fails: the bytes are not all there.
        resp, body = await self.reg.request("PUT", f"{loc}?digest={digest_of(data)}")
        self.assertEqual(error_codes(body), ["DIGEST_INVALID"])
        resp, _ = await self.reg.request("HEAD", f"/v2/app/web/blobs/{digest_of(data)}")
        self.assertEqual(resp.code, 404)

    @aio
    async def test_resume_after_interruption(self):
        data = os.urandom(5000)
        resp, _ = await self.reg.request("POST", "/v2/app/web/blobs/uploads/")
        loc = header(resp, "Location")
        resp, _ = await self.reg.request("PATCH", loc, data[:2000], headers={b"Content-Range": b"0-1999"})
        resp, _ = await self.reg.request("GET", header(resp, "Location"))
        offset = int(header(resp, "Range").split("-")[1]) + 1
        resp, body = await self.reg.request(
            "PUT", f"{loc}?digest={digest_of(data)}", data[offset:],
            headers={b"Content-Range": f"{offset}-{len(data) - 1}".encode()},
        )
        self.assertEqual(resp.code, 201, body)

    @aio
    async def test_a_full_disk_is_507_and_the_upload_goes_on_after(self):
        """
        A chunk the disk cannot take: 507 with the reason, nothing logged as a fault, the
        upload keeps what it had (the chunk's written part truncated away), and the same
        chunk is taken once there is room.
        """
        from zwrm.registry import store as store_module

        data = os.urandom(3 * 1024 * 1024)
        resp, _ = await self.reg.request("POST", "/v2/app/web/blobs/uploads/")
        loc = header(resp, "Location")
        resp, _ = await self.reg.request("PATCH", loc, data[:1000],
                                         headers={b"Content-Range": b"0-999"})
        self.assertEqual(resp.code, 202)
        loc = header(resp, "Location")
        real, written = store_module.write_sparse, []

        def full(out, block):
            if written:  # the first block of the chunk is written, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(len(block))
            return real(out, block)

        self.patch(store_module, "write_sparse", full)
        resp, body = await self.reg.request("PATCH", loc, data[1000:],
                                            headers={b"Content-Range": f"1000-{len(data) - 1}".encode()})
        self.assertEqual(resp.code, 507)
        self.assertEqual(json.loads(body)["errors"], [
            {"code": "UNKNOWN", "message": "the registry's disk is full (No space left on device)"}])
        self.assertEqual(written, [1024 * 1024])
        self.assertEqual(self.flushLoggedErrors(), [])
        # what zwrm's client (the CLI's image push) makes of it: resource_exhausted
        from zwrm.errors import ResourceExhausted
        from zwrm.registry.client import RegistryClient

        err = RegistryClient._error(resp.code, body, loc)
        self.assertIsInstance(err, ResourceExhausted)
        self.assertEqual(err.message, f"the registry cannot store {loc}: UNKNOWN: the"
                         " registry's disk is full (No space left on device)")
        resp, _ = await self.reg.request("GET", loc)
        self.assertEqual(header(resp, "Range"), "0-999")
        upload_file = [os.path.join(d, f) for d, _, fs in os.walk(self.reg.root) for f in fs
                       if os.path.getsize(os.path.join(d, f)) == 1000]
        self.assertEqual(len(upload_file), 1)  # the partial chunk is gone from the disk too
        self.patch(store_module, "write_sparse", real)
        resp, body = await self.reg.request(
            "PUT", f"{loc}?digest={digest_of(data)}", data[1000:],
            headers={b"Content-Range": f"1000-{len(data) - 1}".encode()})
        self.assertEqual(resp.code, 201, body)
        resp, body = await self.reg.request("GET", f"/v2/app/web/blobs/{digest_of(data)}")
        self.assertEqual(body, data)

    @aio
    async def test_short_chunk_refused(self):
        resp, _ = await self.reg.request("POST", "/v2/app/web/blobs/uploads/")
        loc = header(resp, "Location")
        resp, body = await self.reg.request("PATCH", loc, b"abc", headers={b"Content-Range": b"0-9"})
        self.assertEqual(resp.code, 416)
        resp, _ = await self.reg.request("GET", loc)
        self.assertEqual(header(resp, "Range"), "0-0")

    @aio
    async def test_delete_blob(self):
        d = await self.reg.push_blob("app/web", b"bye")
        resp, _ = await self.reg.request("DELETE", f"/v2/app/web/blobs/{d}")
        self.assertEqual(resp.code, 202)
        resp, body = await self.reg.request("GET", f"/v2/app/web/blobs/{d}")
        self.assertEqual(resp.code, 404)
        resp, body = await self.reg.request("DELETE", f"/v2/app/web/blobs/{d}")
        self.assertEqual(error_codes(body), ["BLOB_UNKNOWN"])

    @aio
    async def test_deletes_disabled(self):
        reg = RunningRegistry(self, self.mktemp(), delete_enabled=False)
        d = await reg.push_blob("app/web", b"keep")
        resp, body = await reg.request("DELETE", f"/v2/app/web/blobs/{d}")
        self.assertEqual(resp.code, 405)
        self.assertEqual(error_codes(body), ["UNSUPPORTED"])

    @aio
    async def test_bad_names_and_methods(self):
        resp, body = await self.reg.request("GET", "/v2/Bad_Name/tags/list")
        self.assertEqual(error_codes(body), ["NAME_INVALID"])
        resp, body = await self.reg.request("PUT", "/v2/app/web/blobs/" + digest_of(b"x"))
        self.assertEqual(resp.code, 405)
        self.assertEqual(error_codes(body), ["UNSUPPORTED"])


class ManifestTests(RegistryTestsMixin, unittest.TestCase):
    @aio
    async def test_put_get_by_tag_and_digest(self):
        doc, digest = await self.image()
        resp, body = await self.reg.request("GET", "/v2/app/web/manifests/v1")
        self.assertEqual(resp.code, 200)
        self.assertEqual(header(resp, "Content-Type"), MANIFEST)
        self.assertEqual(header(resp, "Docker-Content-Digest"), digest)
        self.assertEqual(digest_of(body), digest)
        self.assertEqual(json.loads(body), doc)
        resp, body2 = await self.reg.request("GET", f"/v2/app/web/manifests/{digest}")
        self.assertEqual(body2, body)
        resp, body3 = await self.reg.request("HEAD", "/v2/app/web/manifests/v1")
        self.assertEqual((resp.code, body3), (200, b""))
        self.assertEqual(header(resp, "Content-Length"), str(len(body)))

    @aio
    async def test_put_by_digest(self):
        doc, digest = await self.image()
        body = json.dumps(doc, indent=1).encode()
        resp, _ = await self.reg.push_manifest("app/web", digest_of(body), body)
        self.assertEqual(resp.code, 201)
        self.assertEqual(header(resp, "Location"), f"/v2/app/web/manifests/{digest_of(body)}")
        resp, content = await self.reg.push_manifest("app/web", digest_of(b"other"), body)
        self.assertEqual(error_codes(content), ["DIGEST_INVALID"])

    @aio
    async def test_unknown_manifest(self):
        resp, body = await self.reg.request("GET", "/v2/app/web/manifests/nope")
        self.assertEqual(resp.code, 404)
        self.assertEqual(error_codes(body), ["MANIFEST_UNKNOWN"])
        resp, body = await self.reg.request("GET", f"/v2/app/web/manifests/{digest_of(b'x')}")
        self.assertEqual(error_codes(body), ["MANIFEST_UNKNOWN"])

    @aio
    async def test_missing_blob(self):
        doc, _ = await self.image()
        doc["layers"][0]["digest"] = digest_of(b"never pushed")
        resp, body = await self.reg.push_manifest("app/web", "v2", doc)
        self.assertEqual(resp.code, 400)
        self.assertEqual(error_codes(body), ["MANIFEST_BLOB_UNKNOWN"])

    @aio
    async def test_invalid_manifests(self):
        doc, _ = await self.image()
        bad_size = json.loads(json.dumps(doc))
        bad_size["layers"][0]["size"] = 1
        bad_type = json.loads(json.dumps(doc))
        bad_type["layers"][0]["mediaType"] = "not a media type"
        wrong_declared = dict(doc, mediaType=INDEX)
        for body in (b"{not json", b"[]", {"schemaVersion": 1}, bad_size, bad_type,
                     wrong_declared, dict(doc, layers="x")):
            resp, content = await self.reg.push_manifest("app/web", "bad", body)
            self.assertEqual(resp.code, 400, body)
            self.assertEqual(error_codes(content), ["MANIFEST_INVALID"])
        resp, _ = await self.reg.request("GET", "/v2/app/web/manifests/bad")
        self.assertEqual(resp.code, 404)

    @aio
    async def test_unknown_media_type(self):
        doc, _ = await self.image()
        resp, body = await self.reg.push_manifest("app/web", "v2", doc, media_type="text/plain")
        self.assertEqual(resp.code, 415)
        self.assertEqual(error_codes(body), ["MANIFEST_INVALID"])

    @aio
    async def test_bad_tag(self):
        doc, _ = await self.image()
        resp, body = await self.reg.push_manifest("app/web", "-bad", doc)
        self.assertEqual(error_codes(body), ["TAG_INVALID"])

    @aio
    async def test_index(self):
        doc, digest = await self.image()
        size = len((await self.reg.request("GET", f"/v2/app/web/manifests/{digest}"))[1])
        index = {"schemaVersion": 2, "mediaType": INDEX,
                 "manifests": [{"mediaType": MANIFEST, "digest": digest, "size": size}]}
        resp, body = await self.reg.push_manifest("app/web", "multi", index, INDEX)
        self.assertEqual(resp.code, 201, body)
        resp, _ = await self.reg.request("GET", "/v2/app/web/manifests/multi")
        self.assertEqual(header(resp, "Content-Type"), INDEX)
        index["manifests"][0]["digest"] = digest_of(b"missing")
        resp, body = await self.reg.push_manifest("app/web", "multi2", index, INDEX)
        self.assertEqual(error_codes(body), ["MANIFEST_BLOB_UNKNOWN"])

    @aio
    async def test_delete_tag_and_manifest(self):
        _, digest = await self.image(tag="v1")
        resp, _ = await self.reg.push_manifest(
            "app/web", "v1b", (await self.reg.request("GET", "/v2/app/web/manifests/v1"))[1]
        )
        resp, _ = await self.reg.request("DELETE", "/v2/app/web/manifests/v1")
        self.assertEqual(resp.code, 202)
        resp, _ = await self.reg.request("GET", "/v2/app/web/manifests/v1")
        self.assertEqual(resp.code, 404)
        resp, _ = await self.reg.request("GET", f"/v2/app/web/manifests/{digest}")
        self.assertEqual(resp.code, 200)
        resp, _ = await self.reg.request("DELETE", f"/v2/app/web/manifests/{digest}")
        self.assertEqual(resp.code, 202)
        resp, body = await self.reg.request("GET", f"/v2/app/web/manifests/{digest}")
        self.assertEqual(error_codes(body), ["MANIFEST_UNKNOWN"])
        resp, body = await self.reg.request("GET", "/v2/app/web/manifests/v1b")
        self.assertEqual(resp.code, 404)
        resp, body = await self.reg.request("DELETE", "/v2/app/web/manifests/v1")
        self.assertEqual(error_codes(body), ["MANIFEST_UNKNOWN"])

    @aio
    async def test_persistent_across_restart(self):
        _, digest = await self.image()
        reg2 = RunningRegistry(self, self.reg.root)
        resp, body = await reg2.request("GET", "/v2/app/web/manifests/v1")
        self.assertEqual(header(resp, "Docker-Content-Digest"), digest)


class ListingTests(RegistryTestsMixin, unittest.TestCase):
    @aio
    async def test_tags_list_and_pagination(self):
        for tag in ("b", "a", "c"):
            await self.image(tag=tag)
        resp, body = await self.reg.request("GET", "/v2/app/web/tags/list")
        self.assertEqual(json.loads(body), {"name": "app/web", "tags": ["a", "b", "c"]})
        resp, body = await self.reg.request("GET", "/v2/app/web/tags/list?n=2")
        self.assertEqual(json.loads(body)["tags"], ["a", "b"])
        self.assertEqual(header(resp, "Link"), '</v2/app/web/tags/list?n=2&last=b>; rel="next"')
        resp, body = await self.reg.request("GET", "/v2/app/web/tags/list?n=2&last=b")
        self.assertEqual(json.loads(body)["tags"], ["c"])
        self.assertIsNone(header(resp, "Link"))
        resp, body = await self.reg.request("GET", "/v2/app/web/tags/list?n=0")
        self.assertEqual(json.loads(body)["tags"], [])

    @aio
    async def test_tags_unknown_repository(self):
        resp, body = await self.reg.request("GET", "/v2/no/such/tags/list")
        self.assertEqual(resp.code, 404)
        self.assertEqual(error_codes(body), ["NAME_UNKNOWN"])

    @aio
    async def test_catalog(self):
        for name in ("zeta", "app/web", "app/api"):
            await self.image(name=name)
        resp, body = await self.reg.request("GET", "/v2/_catalog")
        self.assertEqual(json.loads(body), {"repositories": ["app/api", "app/web", "zeta"]})
        resp, body = await self.reg.request("GET", "/v2/_catalog?n=1&last=app/api")
        self.assertEqual(json.loads(body), {"repositories": ["app/web"]})
        self.assertIn("last=app/web", header(resp, "Link"))


class TicketAuthorizerTests(unittest.TestCase):
    """The registry with the same credentials as WAMP ticket auth."""

    def setUp(self):
        from zwrm.registry import TicketAuthorizer
        from zwrm.wamp.auth import Principal, StaticAuthenticator

        authn = StaticAuthenticator(tickets={
            "operator": ("op-token", Principal("operator", "operator")),
            "host-1": ("host-secret", Principal("host-1", "agent")),
            "join": ("join-token", Principal("join", "joining")),
        })
        self.reg = RunningRegistry(self, self.mktemp(), TicketAuthorizer(authn))

    @aio
    async def test_roles(self):
        d = await self.reg.push_blob("a/b", b"data")  # Bearer: an operator token
        resp, body = await self.reg.request("GET", f"/v2/a/b/blobs/{d}", auth=basic("host-1", "host-secret"))
        self.assertEqual((resp.code, body), (200, b"data"))
        resp, body = await self.reg.request("POST", "/v2/a/b/blobs/uploads/", auth=basic("host-1", "host-secret"))
        self.assertEqual(error_codes(body), ["DENIED"])
        resp, body = await self.reg.request("GET", "/v2/", auth=basic("join", "join-token"))
        self.assertEqual(error_codes(body), ["DENIED"])
        resp, body = await self.reg.request("GET", "/v2/", auth=basic("host-1", "wrong"))
        self.assertEqual(resp.code, 401)
        resp, body = await self.reg.request("GET", "/v2/", auth=basic("operator", "op-token"))
        self.assertEqual(resp.code, 200)


class StoreTests(RegistryTestsMixin, unittest.TestCase):
    @aio
    async def test_disk_usage(self):
        """The disk the blobs take (zwrm_registry_bytes): their allocated blocks."""
        store = self.reg.resource.store

        def allocated(*digests):
            return sum(os.stat(store.blob_path(d)).st_blocks * 512 for d in digests)

        a = await self.reg.push_blob("a/b", b"x" * 1000)
        c = await self.reg.push_blob("a/c", b"y" * 500)
        self.assertEqual(await store.disk_usage(), allocated(a, c))
        self.assertGreaterEqual(allocated(a, c), 1500)
        # a sparse blob (a raw disk's zeros are holes) counts its data, not its length
        z = await self.reg.push_blob("a/d", bytes(8 << 20) + b"z")
        self.assertEqual(await store.disk_usage(), allocated(a, c, z))
        self.assertLess(allocated(z), 1 << 20)


class UploadExpiryTests(unittest.TestCase):
    @aio
    async def test_idle_sessions_expire(self):
        clock = task.Clock()
        reg = RunningRegistry(self, self.mktemp(), clock=clock, upload_ttl=100)
        resp, _ = await reg.request("POST", "/v2/app/web/blobs/uploads/")
        old = header(resp, "Location")
        clock.advance(60)
        resp, _ = await reg.request("POST", "/v2/app/web/blobs/uploads/")
        young = header(resp, "Location")
        clock.advance(50)
        resp, _ = await reg.request("PATCH", young, b"more")  # touched: stays
        self.assertEqual(resp.code, 202)
        clock.advance(60)
        resp, _ = await reg.request("POST", "/v2/app/web/blobs/uploads/")  # expires `old`
        resp, body = await reg.request("GET", old)
        self.assertEqual(error_codes(body), ["BLOB_UPLOAD_UNKNOWN"])
        resp, _ = await reg.request("GET", young)
        self.assertEqual(resp.code, 204)
        self.assertEqual(len(os.listdir(os.path.join(reg.root, "uploads"))), 2)
