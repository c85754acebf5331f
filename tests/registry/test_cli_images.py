"""
C{zwrm images push|list|rm} against a real registry on loopback.
"""

import io
import json
import os
import sys

from twisted.internet import reactor, task, utils
from twisted.trial import unittest

from tests.registry.helpers import OPERATOR, RunningRegistry, aio
from zwrm.cli import images as cli
from zwrm.cli.client import EXIT_AUTH, EXIT_REMOTE, EXIT_USAGE, CliError
from zwrm.cli.main import build_parser
from zwrm.errors import InvalidArgument
from zwrm.registry.client import registry_url
from zwrm.registry.image import DISK_TYPE, INITRD_TYPE, KERNEL_TYPE
from zwrm.testing.image import kernel_bytes


class ImagesCommandTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.reg = RunningRegistry(self, self.mktemp())
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.patch(os, "environ", {"ZWRM_TOKEN": OPERATOR, "HOME": self.dir,
                                   "PATH": os.environ.get("PATH", "")})
        self.parser = build_parser()

    def file(self, name, data):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    async def zwrm(self, *argv):
        args = self.parser.parse_args(
            ["--api-url", self.reg.url.replace("http", "ws") + "/ws", "images", *argv]
        )
        out = io.StringIO()
        code = await args.func(reactor, args, out)
        return code, out.getvalue()

    @aio
    async def test_push_list_rm(self):
        k = self.file("vmlinuz", kernel_bytes(os.urandom(300_000)))
        i = self.file("initrd", os.urandom(100_000))
        d = self.file("disk.raw", os.urandom(2_000_000))
        code, out = await self.zwrm("push", "apps/web:v1", "--kernel", k, "--initrd", i,
                                   "--disk", d, "--cmdline", "console=ttyS0 quiet", "--port",
                                   "8080", "-q")
        self.assertEqual(code, 0)
        self.assertTrue(out.startswith("apps/web:v1 sha256:"), out)
        resp, body = await self.reg.request("GET", "/v2/apps/web/manifests/v1")
        manifest = json.loads(body)
        self.assertEqual([layer["mediaType"] for layer in manifest["layers"]],
                         [KERNEL_TYPE, INITRD_TYPE, DISK_TYPE])
        cfg = manifest["config"]["digest"]
        resp, body = await self.reg.request("GET", f"/v2/apps/web/blobs/{cfg}")
        self.assertEqual(json.loads(body), {"cmdline": "console=ttyS0 quiet", "service_port": 8080})

        # Pushing again uploads nothing new and gives the same digest.
        code, out2 = await self.zwrm("push", "apps/web:v2", "--kernel", k, "--initrd", i,
                                    "--disk", d, "--cmdline", "console=ttyS0 quiet", "--port",
                                    "8080", "-q")
        self.assertEqual(out2.split()[1], out.split()[1])

        code, listing = await self.zwrm("list")
        lines = listing.splitlines()
        self.assertEqual(lines[0].split(), ["IMAGE", "DIGEST", "SIZE", "LAYERS"])
        self.assertEqual([line.split()[0] for line in lines[1:]], ["apps/web:v1", "apps/web:v2"])
        self.assertIn("kernel+initrd+disk", lines[1])
        self.assertIn("2.3 MiB", lines[1])

        code, out = await self.zwrm("rm", "apps/web:v1")
        self.assertEqual((code, out), (0, "removed apps/web:v1\n"))
        code, listing = await self.zwrm("list", "apps/web")
        self.assertEqual([line.split()[0] for line in listing.splitlines()[1:]], ["apps/web:v2"])
        e = await self.assertFailsWith(self.zwrm("rm", "apps/web:v1"))
        self.assertEqual(e.code, EXIT_REMOTE)
        self.assertEqual(e.message, "no image apps/web:v1 in the registry (see zwrm images list)")
        e = await self.assertFailsWith(self.zwrm("rm", "apps/web"))
        self.assertEqual(e.code, EXIT_USAGE)

    @aio
    async def test_json(self):
        """C{--json}: push, list (full digests, sizes, layers) and rm, errors as without it."""
        k = self.file("vmlinuz", kernel_bytes(os.urandom(300_000)))
        i = self.file("initrd", os.urandom(100_000))
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        code, out = await self.zwrm("push", "apps/web:v1", "--kernel", k,
                               "--initrd", i, "--json")
        self.assertEqual(code, 0)
        pushed = json.loads(out)
        self.assertEqual(sorted(pushed), ["digest", "image"])
        self.assertEqual(pushed["image"], "apps/web:v1")
        self.assertRegex(pushed["digest"], r"^sha256:[0-9a-f]{64}$")
        self.assertEqual(err.getvalue(), "")  # no progress bar with --json
        # an image that is not zwrm's (no kernel, no disk): "other" in the table
        cfg = cli.image.make_config()
        cd = await self.reg.push_blob("apps/other", cfg)
        resp, _ = await self.reg.push_manifest("apps/other", "v1", {
            "schemaVersion": 2, "mediaType": cli.image.MANIFEST_TYPE,
            "config": {"mediaType": cli.image.CONFIG_TYPE, "digest": cd, "size": len(cfg)},
            "layers": []})
        self.assertEqual(resp.code, 201)
        other = resp.headers.getRawHeaders("Docker-Content-Digest")[0]

        code, out = await self.zwrm("list", "--json")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out), [
            {"image": "apps/other:v1", "name": "apps/other", "tag": "v1", "digest": other,
             "size": None, "layers": []},
            {"image": "apps/web:v1", "name": "apps/web", "tag": "v1",
             "digest": pushed["digest"], "size": 401_024, "layers": ["kernel", "initrd"]},
        ])
        code, out = await self.zwrm("list", "apps/web", "--json")
        self.assertEqual([r["image"] for r in json.loads(out)], ["apps/web:v1"])

        code, out = await self.zwrm("rm", f"apps/other@{other}", "--json")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out), [{"removed": f"apps/other@{other}"}])

        # an error stays one CliError; what was removed before it is still said, in JSON
        async def failing_rm(*refs):
            args = self.parser.parse_args(["--api-url", self.reg.url.replace("http", "ws")
                                           + "/ws", "images", "rm", *refs, "--json"])
            out = io.StringIO()
            with self.assertRaises(CliError) as e:
                await args.func(reactor, args, out)
            self.assertEqual(e.exception.code, EXIT_REMOTE)
            return out.getvalue()

        self.assertEqual(json.loads(await failing_rm("apps/web:v1", "apps/web:v2")),
                         [{"removed": "apps/web:v1"}])
        self.assertEqual(await failing_rm("apps/web:v1"), "")
        code, out = await self.zwrm("list", "--json")
        self.assertEqual(json.loads(out), [])

    async def assertFailsWith(self, coro):
        try:
            await coro
        except CliError as e:
            return e
        self.fail("no CliError")

    @aio
    async def test_bad_input(self):
        for argv in (("push", "apps/web:v1", "--kernel", os.path.join(self.dir, "missing")),
                     ("push", "Apps/Web:v1", "--kernel", self.file("k", b"k")),
                     ("push", "apps/web:v1", "--initrd", self.file("i", b"i"))):
            e = await self.assertFailsWith(self.zwrm(*argv))
            self.assertEqual(e.code, EXIT_USAGE, argv)
        # a disk alone with no boot sector (a root file system without its kernel)
        d = self.file("root.raw", bytes(1 << 20))
        e = await self.assertFailsWith(self.zwrm("push", "apps/web:v1", "--disk", d))
        self.assertEqual(e.code, EXIT_USAGE)
        self.assertTrue(e.message.startswith(f"--disk {d} has no boot sector (no MBR boot "
                                             "signature, no GPT)"), e.message)
        # not a kernel: refused before anything is sent
        k = self.file("vmlinuz", os.urandom(300_000))
        e = await self.assertFailsWith(self.zwrm("push", "apps/web:v1", "--kernel", k))
        self.assertEqual(e.code, EXIT_USAGE)
        self.assertEqual(e.message, f"--kernel {k} is not an x86 kernel QEMU can boot: a Linux "
                         "bzImage (vmlinuz), an ELF kernel with a PVH entry point or a "
                         "Multiboot kernel")
        os.environ["ZWRM_TOKEN"] = "wrong"
        e = await self.assertFailsWith(self.zwrm("list"))
        self.assertEqual(e.code, EXIT_AUTH)
        os.environ["ZWRM_TOKEN"] = OPERATOR
        self.assertEqual((await self.reg.request("GET", "/v2/_catalog"))[1], b'{"repositories": []}')

    def test_progress_bar(self):
        clock = task.Clock()
        stream = io.StringIO()
        bar = cli.ProgressBar(clock, stream, width=10)
        bar.update(0, 4 * 2**20)
        clock.advance(1)
        bar.update(2 * 2**20, 4 * 2**20)
        bar.update(3 * 2**20, 4 * 2**20)  # within the redraw interval: skipped
        clock.advance(1)
        bar.update(4 * 2**20, 4 * 2**20)
        bar.finish()
        frames = stream.getvalue().split("\r")[1:]
        self.assertEqual(len(frames), 3)
        self.assertIn("[#####.....]  50.0%  2.0/4.0 MiB  2.0 MiB/s", frames[1])
        self.assertTrue(frames[2].startswith("[##########] 100.0%"))
        self.assertTrue(frames[2].endswith("\n"))

    def test_registry_url(self):
        self.assertEqual(registry_url("wss://cp.example:8080/ws"), "https://cp.example:8080")
        self.assertEqual(registry_url("ws://127.0.0.1:9/ws"), "http://127.0.0.1:9")
        self.assertRaises(InvalidArgument, registry_url, "ftp://x")

    @aio
    async def test_process_exit_codes(self):
        k = self.file("vmlinuz", kernel_bytes(os.urandom(3_000_000)))
        env = dict(os.environ, ZWRM_API_URL=self.reg.url)
        main = ["-c", "from zwrm.cli.main import main; main()"]
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, [*main, "images", "push", "apps/x:v1", "--kernel", k],
            env=env, path=os.getcwd(),
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"100.0%", err)  # the progress bar
        self.assertTrue(out.startswith(b"apps/x:v1 sha256:"))
        env["ZWRM_TOKEN"] = "wrong"
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, [*main, "images", "list"], env=env, path=os.getcwd(),
        )
        self.assertEqual(code, EXIT_AUTH)
        self.assertEqual(len(err.decode().strip().splitlines()), 1, err)
        self.assertTrue(err.startswith(b"zwrm: the registry refused the credentials"), err)
