"""
C{zwrm tokens create --role viewer|operator --expires ...}, C{list} and C{revoke} against a
real control plane over real sockets: the token made is the ticket of its role, for as long
as it is valid and not revoked.
"""

import io

from autobahn.wamp.exception import ApplicationError
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.agent.test_membership import start_plane
from tests.cli.test_cli import Args, d
from zwrm.cli import client
from zwrm.cli import tokens as cli_tokens
from zwrm.cli.client import EXIT_AUTH, CliError
from zwrm.cli.main import build_parser
from zwrm.control.access_tokens import role_token_id
from zwrm.testing.processes import poll


async def _session(plane, authid, token):
    return await client.connect(reactor, {"url": plane.url, "token": token, "authid": authid,
                                          "timeout": 10})


class RoleTokenTests(TestCase):
    timeout = 60

    async def _create(self, plane, role, ttl="1h"):
        out = io.StringIO()
        args = build_parser().parse_args(
            ["--api-url", plane.url, "tokens", "create", "--role", role, "--expires", ttl])
        self.assertEqual(await cli_tokens.tokens_create(reactor, args, out), 0)
        return out.getvalue().strip()

    @d
    async def test_viewer_and_operator_tokens(self):
        plane, _ = await start_plane(self)
        self.patch(client.os, "environ", {"ZWRM_TOKEN": plane.operator_token})
        viewer_token = await self._create(plane, "viewer")
        operator_token = await self._create(plane, "operator")
        self.assertTrue(viewer_token.startswith("viewer-"))

        viewer = await _session(plane, "viewer", viewer_token)
        self.addCleanup(client.close, viewer)
        await viewer.call("zwrm.host.list")
        with self.assertRaises(ApplicationError) as c:
            await viewer.call("zwrm.app.create", "web")
        self.assertEqual(c.exception.error, "wamp.error.not_authorized")
        with self.assertRaises(CliError) as c:  # not the ticket of another role
            await _session(plane, "operator", viewer_token)
        self.assertEqual(c.exception.code, EXIT_AUTH)
        op = await _session(plane, "operator", operator_token)
        self.addCleanup(client.close, op)
        await op.call("zwrm.app.create", "web")

        out = io.StringIO()
        args = Args(api_url=plane.url, json=False)
        await cli_tokens.tokens_list(reactor, args, out)
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[0].split()[:3], ["ID", "ROLE", "STATE"])
        vid = role_token_id(viewer_token)
        self.assertEqual([line.split()[1:3] for line in lines if line.startswith(vid)],
                         [["viewer", "valid"]])
        self.assertNotIn(viewer_token.split(".")[1], out.getvalue())  # never the secret

        out = io.StringIO()
        await cli_tokens.tokens_revoke(reactor, Args(api_url=plane.url, token_id=vid), out)
        self.assertEqual(out.getvalue(), f"revoked {vid}\n")
        with self.assertRaises(CliError) as c:
            await _session(plane, "viewer", viewer_token)
        self.assertEqual(c.exception.code, EXIT_AUTH)
        out = io.StringIO()
        await cli_tokens.tokens_list(reactor, Args(api_url=plane.url, json=True), out)
        self.assertIn('"state": "revoked"', out.getvalue())
        with self.assertRaises(CliError) as c:
            await cli_tokens.tokens_revoke(reactor, Args(api_url=plane.url,
                                                         token_id="viewer-00000000"), out)
        self.assertIn("no token", c.exception.message)

    @d
    async def test_token_expires(self):
        plane, _ = await start_plane(self)
        self.patch(client.os, "environ", {"ZWRM_TOKEN": plane.operator_token})
        token = await self._create(plane, "viewer", ttl="1s")

        async def refused():
            try:
                s = await _session(plane, "viewer", token)
            except CliError as e:
                return e.code == EXIT_AUTH
            await client.close(s)
            return False

        await poll(reactor, refused, 10, 0.1, what="the token expired")

    def test_bad_role(self):
        with self.assertRaises(SystemExit):
            build_parser().parse_args(["tokens", "create", "--role", "admin"])


class ActorTests(TestCase):
    timeout = 60

    @d
    async def test_audit_names_the_token(self):
        plane, _ = await start_plane(self)
        self.patch(client.os, "environ", {"ZWRM_TOKEN": plane.operator_token})
        token = await RoleTokenTests._create(self, plane, "operator")
        op = await _session(plane, "operator", token)
        self.addCleanup(client.close, op)
        await op.call("zwrm.app.create", "web")
        entries = await op.call("zwrm.audit.list")
        self.assertEqual(entries[-1]["authid"], role_token_id(token))
