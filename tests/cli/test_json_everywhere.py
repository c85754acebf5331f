"""
C{--json} on the commands that lacked it (README: "Every command takes C{--json}"):
C{zwrm host undrain|activate|reset}, C{zwrm tokens revoke}, C{zwrm certs remove} against a
real control plane over a real socket, and C{zwrm images push|list|rm} against a real
registry on loopback.  Each is parsed by the CLI's own parser, so the option must exist.
"""

import io
import json
import os
import sys

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.agent.test_membership import start_plane
from tests.cli.test_cli import d
from tests.cli.test_drain_follow import plane_with_an_agent
from tests.network.test_ingress_tls import CA
from tests.registry.helpers import OPERATOR, RunningRegistry
from zwrm.cli import client
from zwrm.cli.client import EXIT_REMOTE, CliError
from zwrm.cli.main import build_parser
from zwrm.control.access_tokens import role_token_id
from zwrm.registry import image
from zwrm.testing.processes import poll


async def zwrm(url, *argv):
    """Run C{zwrm --api-url URL ARGV...} in this process: C{(exit code, stdout)}."""
    args = build_parser().parse_args(["--api-url", url, *argv])
    out = io.StringIO()
    code = await args.func(reactor, args, out)
    return code, out.getvalue()


class ControlPlaneCommandTests(TestCase):
    timeout = 60

    @d
    async def test_undrain_and_activate(self):
        plane, host_id = await plane_with_an_agent(self)
        await plane.registry.transition(host_id, "drain_requested")  # draining, no drain run
        code, out = await zwrm(plane.url, "host", "undrain", host_id, "--json")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out), {"host_id": host_id, "state": "ready"})

        code, out = await zwrm(plane.url, "host", "drain", host_id, "--detach", "--json")
        self.assertEqual(code, 0)
        await poll(reactor, lambda: plane.registry.entry(host_id).machine.state == "drained",
                   10, 0.05, what="the host drained (it has no machines)")
        code, out = await zwrm(plane.url, "host", "activate", host_id, "--json")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out), {"host_id": host_id, "state": "ready"})
        # an error stays one CliError, nothing on stdout
        out = io.StringIO()
        args = build_parser().parse_args(["--api-url", plane.url, "host", "activate",
                                          "h-nobody", "--json"])
        with self.assertRaises(CliError) as e:
            await args.func(reactor, args, out)
        self.assertEqual(e.exception.code, EXIT_REMOTE)
        self.assertEqual(out.getvalue(), "")

    @d
    async def test_host_reset(self):
        plane, host_id = await plane_with_an_agent(self)
        before = reactor.seconds()
        code, out = await zwrm(plane.url, "host", "reset", host_id, "--ttl", "10m", "--json")
        self.assertEqual(code, 0)
        result = json.loads(out)
        self.assertEqual(result["host_id"], host_id)
        self.assertTrue(before + 600 - 5 <= result["expires_at"] <= reactor.seconds() + 600 + 5,
                        result)

    @d
    async def test_tokens_revoke(self):
        plane, _ = await start_plane(self)
        self.patch(client.os, "environ", {"ZWRM_TOKEN": plane.operator_token})
        code, out = await zwrm(plane.url, "tokens", "create", "--json")
        created = json.loads(out)
        # by its whole text: the id printed is the token's id, as the line without --json
        code, out = await zwrm(plane.url, "tokens", "revoke", created["token"], "--json")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out), {"id": created["id"], "revoked": True})
        code, out = await zwrm(plane.url, "tokens", "create", "--role", "viewer", "--json")
        viewer = json.loads(out)
        code, out = await zwrm(plane.url, "tokens", "revoke", viewer["id"], "--json")
        self.assertEqual(json.loads(out), {"id": role_token_id(viewer["token"]),
                                           "revoked": True})
        code, out = await zwrm(plane.url, "tokens", "list", "--json")
        self.assertEqual({t["id"]: t["state"] for t in json.loads(out)
                          if t["id"] in (created["id"], viewer["id"])},
                         {created["id"]: "revoked", viewer["id"]: "revoked"})

    @d
    async def test_certs_remove(self):
        plane, tmp = await start_plane(self)
        self.patch(client.os, "environ", {"ZWRM_TOKEN": plane.operator_token})
        pem, key = CA().issue(["shop.example.test"])
        files = []
        for name, text in (("shop.pem", pem), ("shop.key", key)):
            files.append(os.path.join(tmp, name))
            with open(files[-1], "w") as f:
                f.write(text)
        await zwrm(plane.url, "certs", "add", "shop.example.test", "--cert", files[0],
                   "--key", files[1])
        code, out = await zwrm(plane.url, "certs", "remove", "shop.example.test", "--json")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out), {"domain": "shop.example.test", "removed": True})
        self.assertEqual(await plane.certs.all(), [])


class ImagesCommandTests(TestCase):
    timeout = 60

    def setUp(self):
        self.reg = RunningRegistry(self, self.mktemp())
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.patch(os, "environ", {"ZWRM_TOKEN": OPERATOR, "HOME": self.dir,
                                   "PATH": os.environ.get("PATH", "")})
        self.url = self.reg.url.replace("http", "ws") + "/ws"

    def file(self, name, size):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        return path

    @d
    async def test_push_list_rm(self):
        k, i = self.file("vmlinuz", 300_000), self.file("initrd", 100_000)
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        code, out = await zwrm(self.url, "images", "push", "apps/web:v1", "--kernel", k,
                               "--initrd", i, "--json")
        self.assertEqual(code, 0)
        pushed = json.loads(out)
        self.assertEqual(sorted(pushed), ["digest", "image"])
        self.assertEqual(pushed["image"], "apps/web:v1")
        self.assertRegex(pushed["digest"], r"^sha256:[0-9a-f]{64}$")
        self.assertEqual(err.getvalue(), "")  # no progress bar with --json
        # an image that is not zwrm's (no kernel, no disk): "other" in the table
        cfg = image.make_config()
        cd = await self.reg.push_blob("apps/other", cfg)
        resp, _ = await self.reg.push_manifest("apps/other", "v1", {
            "schemaVersion": 2, "mediaType": image.MANIFEST_TYPE,
            "config": {"mediaType": image.CONFIG_TYPE, "digest": cd, "size": len(cfg)},
            "layers": []})
        self.assertEqual(resp.code, 201)
        other = resp.headers.getRawHeaders("Docker-Content-Digest")[0]

        code, out = await zwrm(self.url, "images", "list", "--json")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out), [
            {"image": "apps/other:v1", "name": "apps/other", "tag": "v1", "digest": other,
             "size": None, "layers": []},
            {"image": "apps/web:v1", "name": "apps/web", "tag": "v1",
             "digest": pushed["digest"], "size": 400_000, "layers": ["kernel", "initrd"]},
        ])
        code, out = await zwrm(self.url, "images", "list", "apps/web", "--json")
        self.assertEqual([r["image"] for r in json.loads(out)], ["apps/web:v1"])

        code, out = await zwrm(self.url, "images", "rm", f"apps/other@{other}", "--json")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out), [{"removed": f"apps/other@{other}"}])

        # an error stays one CliError; what was removed before it is still said, in JSON
        async def failing_rm(*refs):
            args = build_parser().parse_args(["--api-url", self.url, "images", "rm", *refs,
                                              "--json"])
            out = io.StringIO()
            with self.assertRaises(CliError) as e:
                await args.func(reactor, args, out)
            self.assertEqual(e.exception.code, EXIT_REMOTE)
            return out.getvalue()

        self.assertEqual(json.loads(await failing_rm("apps/web:v1", "apps/web:v2")),
                         [{"removed": "apps/web:v1"}])
        self.assertEqual(await failing_rm("apps/web:v1"), "")
        code, out = await zwrm(self.url, "images", "list", "--json")
        self.assertEqual(json.loads(out), [])
