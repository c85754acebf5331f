"""
C{--json} on the commands that lacked it (README: "Every command takes C{--json}"):
C{zwrm host undrain|activate|reset}, C{zwrm tokens revoke}, C{zwrm certs remove} against a
real control plane over a real socket (C{zwrm images push|list|rm}: in
tests/registry/test_cli_images.py, against a real registry).  Each is parsed by the CLI's own
parser, so the option must exist.
"""

import io
import json
import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.agent.test_membership import start_plane
from tests.cli.test_cli import d
from tests.cli.test_drain_follow import plane_with_an_agent
from tests.network.test_ingress_tls import CA
from zwrm.cli import client
from zwrm.cli.client import EXIT_REMOTE, CliError
from zwrm.cli.main import build_parser
from zwrm.control.access_tokens import role_token_id
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
