"""
A pushed blob's body is spooled in the store's C{uploads/} directory, and an upload whose
whole content is one body becomes the upload's file by a rename instead of a copy; bodies
with a block of zeros, later chunks and refused bodies take the copy or leave nothing.
"""

import os

from twisted.trial import unittest

from tests.registry.helpers import RunningRegistry, aio, digest_of, error_codes, header
from zwrm.registry import store as store_module
from zwrm.sparse import SPARSE_BLOCK


class SpoolTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.reg = RunningRegistry(self, self.mktemp())
        self.copies = []
        real = store_module.write_sparse

        def write_sparse(f, data):
            self.copies.append(len(data))
            return real(f, data)

        self.patch(store_module, "write_sparse", write_sparse)
        self.uploads = os.path.join(self.reg.resource.store.root, "uploads")

    async def get(self, digest):
        resp, body = await self.reg.request("GET", f"/v2/app/web/blobs/{digest}")
        self.assertEqual(resp.code, 200)
        return body

    @aio
    async def test_whole_body_is_renamed_into_place(self):
        data = os.urandom(300_000)  # above twisted.web's in-memory body limit
        d = await self.reg.push_blob("app/web", data)
        self.assertEqual(self.copies, [])
        self.assertEqual(await self.get(d), data)
        self.assertEqual(os.listdir(self.uploads), [])

    @aio
    async def test_body_with_a_block_of_zeros_is_copied_sparse(self):
        data = os.urandom(SPARSE_BLOCK) + bytes(4 * SPARSE_BLOCK) + os.urandom(1000)
        d = await self.reg.push_blob("app/web", data)
        self.assertNotEqual(self.copies, [])
        self.assertEqual(await self.get(d), data)
        st = os.stat(self.reg.resource.store.blob_path(d))
        self.assertLess(st.st_blocks * 512, len(data) - 2 * SPARSE_BLOCK)
        self.assertEqual(os.listdir(self.uploads), [])

    @aio
    async def test_later_chunks_are_appended(self):
        a, b = os.urandom(200_000), os.urandom(150_000)
        resp, _ = await self.reg.request("POST", "/v2/app/web/blobs/uploads/")
        loc = header(resp, "Location")
        resp, _ = await self.reg.request("PATCH", loc, a)
        self.assertEqual((resp.code, self.copies), (202, []))
        loc = header(resp, "Location")
        resp, body = await self.reg.request("PUT", f"{loc}?digest={digest_of(a + b)}", b)
        self.assertEqual(resp.code, 201, body)
        self.assertEqual(sum(self.copies), len(b))
        self.assertEqual(await self.get(digest_of(a + b)), a + b)
        self.assertEqual(os.listdir(self.uploads), [])

    @aio
    async def test_wrong_digest_leaves_nothing(self):
        data = os.urandom(300_000)
        bad = digest_of(b"something else")
        resp, body = await self.reg.request(
            "POST", f"/v2/app/web/blobs/uploads/?digest={bad}", data)
        self.assertEqual((resp.code, error_codes(body)), (400, ["DIGEST_INVALID"]))
        self.assertEqual(os.listdir(self.uploads), [])
        self.assertFalse(os.path.exists(self.reg.resource.store.blob_path(digest_of(data))))

    @aio
    async def test_refused_body_leaves_nothing(self):
        resp, body = await self.reg.request(
            "POST", f"/v2/app/web/blobs/uploads/?digest={digest_of(b'x' * 300_000)}",
            b"x" * 300_000, auth="wrong-token")
        self.assertEqual(resp.code, 401)
        self.assertEqual(os.listdir(self.uploads), [])

    def test_spool_removed_at_close_unless_adopted(self):
        store = self.reg.resource.store
        s = store.spool()
        s.write(b"abc")
        s.close()
        self.assertEqual(os.listdir(self.uploads), [])
        s = store.spool()
        s.write(b"abc")
        dest = os.path.join(self.uploads, "kept")
        s.adopt(dest)
        s.close()
        with open(dest, "rb") as f:
            self.assertEqual(f.read(), b"abc")
