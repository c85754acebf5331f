"""
Interoperability: a generic OCI client (the C{oras} package from PyPI) pushes to and pulls
from zwrm's registry, and reads images pushed by zwrm.

oras is synchronous (requests), so it runs in a thread while the reactor serves.
"""

import hashlib
import json
import os

import oras.provider
from twisted.internet import reactor, threads
from twisted.trial import unittest

from tests.registry.helpers import AGENT_ID, AGENT_TOKEN, OPERATOR, RunningRegistry, aio, header
from zwrm.agent.images import ImageCache
from zwrm.registry.client import RegistryClient, push_image
from zwrm.testing.image import kernel_bytes


class OrasInteropTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.reg = RunningRegistry(self, self.mktemp())
        self.host = self.reg.url.removeprefix("http://")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self._cwd = os.getcwd()
        os.chdir(self.dir)  # oras wants files relative to the working directory
        self.addCleanup(os.chdir, self._cwd)

    def oras(self, user, password):
        client = oras.provider.Registry(hostname=self.host, insecure=True, auth_backend="basic")
        client.session.trust_env = False  # no proxies for loopback
        client.auth.session.trust_env = False
        client.auth.set_basic_auth(user, password)
        return client

    def write(self, name, data):
        with open(os.path.join(self.dir, name), "wb") as f:
            f.write(data)
        return name

    @aio
    async def test_oras_push_then_pull(self):
        small = self.write("hello.txt", b"hello from oras\n")
        big = self.write("big.bin", os.urandom(3 * 1024 * 1024 + 17))
        client = self.oras("operator", OPERATOR)

        def push():
            client.push(target=f"{self.host}/interop/files:v1",
                        files=[f"{small}:text/plain", big], quiet=True)
            # Chunked uploads (POST, PATCH with Content-Range..., PUT) too.
            client.push(target=f"{self.host}/interop/chunked:v1", files=[big],
                        do_chunked=True, chunk_size=1024 * 1024, quiet=True)

        await threads.deferToThread(push)
        resp, body = await self.reg.request("GET", "/v2/interop/files/manifests/v1")
        self.assertEqual(resp.code, 200)
        manifest = json.loads(body)
        titles = {layer["annotations"]["org.opencontainers.image.title"]: layer
                  for layer in manifest["layers"]}
        self.assertEqual(set(titles), {"hello.txt", "big.bin"})
        self.assertEqual(titles["hello.txt"]["mediaType"], "text/plain")
        resp, body = await self.reg.request("GET", "/v2/interop/chunked/tags/list")
        self.assertEqual(json.loads(body)["tags"], ["v1"])

        out = os.path.join(self.dir, "pulled")
        reader = self.oras(AGENT_ID, AGENT_TOKEN)
        paths = await threads.deferToThread(
            reader.pull, target=f"{self.host}/interop/files:v1", outdir=out
        )
        got = {os.path.basename(p) for p in paths}
        self.assertEqual(got, {"hello.txt", "big.bin"})
        for name in got:
            with open(os.path.join(out, name), "rb") as a, open(name, "rb") as b:
                self.assertEqual(a.read(), b.read(), name)
        out2 = os.path.join(self.dir, "pulled2")
        paths = await threads.deferToThread(
            reader.pull, target=f"{self.host}/interop/chunked:v1", outdir=out2
        )
        with open(paths[0], "rb") as a, open(big, "rb") as b:
            self.assertEqual(hashlib.sha256(a.read()).digest(), hashlib.sha256(b.read()).digest())

    @aio
    async def test_oras_reads_zwrm_image_and_agent_reads_oras_push(self):
        kernel = self.write("vmlinuz", kernel_bytes(os.urandom(200_000)))
        initrd = self.write("initrd.img", os.urandom(100_000))
        client = RegistryClient(reactor, self.reg.url, OPERATOR)
        self.addCleanup(client.close)
        await push_image(client, "apps/web:v1", kernel=kernel, initrd=initrd,
                         cmdline="console=ttyS0", service_port=80)
        out = os.path.join(self.dir, "out")
        reader = self.oras(AGENT_ID, AGENT_TOKEN)
        paths = await threads.deferToThread(
            reader.pull, target=f"{self.host}/apps/web:v1", outdir=out
        )
        self.assertEqual({os.path.basename(p) for p in paths}, {"vmlinuz", "initrd.img"})
        with open(os.path.join(out, "vmlinuz"), "rb") as a, open(kernel, "rb") as b:
            self.assertEqual(a.read(), b.read())

        # And the other way: an image pushed by oras with zwrm's media types boots-ready
        # for an agent.
        cfg = self.write("config.json", json.dumps({"cmdline": "quiet", "service_port": 8080}).encode())
        pusher = self.oras("operator", OPERATOR)
        await threads.deferToThread(
            pusher.push, target=f"{self.host}/apps/oras:v1",
            files=[f"{kernel}:application/vnd.zwrm.kernel.v1",
                   f"{initrd}:application/vnd.zwrm.initrd.v1"],
            manifest_config=f"{cfg}:application/vnd.zwrm.image.config.v1+json", quiet=True,
        )
        cache = ImageCache(reactor, self.mktemp(), self.reg.url, (AGENT_ID, AGENT_TOKEN), 1 << 30)
        self.addCleanup(cache.close)
        got = await cache.resolve("apps/oras:v1")
        self.assertEqual((got["cmdline"], got["service_port"]), ("quiet", 8080))
        with open(got["kernel"], "rb") as a, open(kernel, "rb") as b:
            self.assertEqual(a.read(), b.read())

    @aio
    async def test_oras_refused_without_push_right(self):
        self.write("x.txt", b"x")
        agent = self.oras(AGENT_ID, AGENT_TOKEN)
        with self.assertRaises(ValueError):  # oras: "Issue with ...: Forbidden"
            await threads.deferToThread(
                agent.push, target=f"{self.host}/interop/denied:v1", files=["x.txt"], quiet=True
            )
        resp, _ = await self.reg.request("GET", "/v2/interop/denied/manifests/v1")
        self.assertEqual(resp.code, 404)
        self.assertIsNotNone(header(resp, "Docker-Distribution-API-Version"))
