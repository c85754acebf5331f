"""
C{zwrm machines restart MACHINE} and the roles of C{zwrm.machine.restart} and
C{zwrm.drain.list} against a real control plane over real sockets (its router's role table,
its schema check, its audit trail): an unknown machine is one readable line and exit 1, and
is audited; a viewer may list drains but not restart a machine.
"""

import io

from autobahn.wamp.exception import ApplicationError
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.agent.test_membership import start_plane
from tests.cli import test_role_tokens  # as a module: its tests are not collected twice
from tests.cli.test_cli import d
from zwrm.cli import apps as cli_apps
from zwrm.cli import client
from zwrm.cli.client import EXIT_REMOTE, CliError
from zwrm.cli.main import build_parser


class ParseTests(SynchronousTestCase):
    def test_machines_restart(self):
        args = build_parser().parse_args(["machines", "restart", "m-1"])
        self.assertEqual((args.func, args.machine_id, args.json),
                         (cli_apps.machine_restart, "m-1", False))


class RestartCliTests(TestCase):
    timeout = 60
    _create = test_role_tokens.RoleTokenTests._create

    @d
    async def test_unknown_machine_viewer_refused_drains_listed(self):
        plane, _ = await start_plane(self)
        self.patch(client.os, "environ", {"ZWRM_TOKEN": plane.operator_token})
        args = build_parser().parse_args(["--api-url", plane.url, "machines", "restart",
                                          "m-nosuch"])
        with self.assertRaises(CliError) as c:
            await cli_apps.machine_restart(reactor, args, io.StringIO())
        self.assertEqual(c.exception.code, EXIT_REMOTE)
        self.assertIn("machine_id", c.exception.message)
        self.assertIn("m-nosuch", c.exception.message)
        self.assertNotIn("\n", c.exception.message)
        # the refused operator call is in the audit trail
        op = await test_role_tokens._session(plane, "operator", plane.operator_token)
        self.addCleanup(client.close, op)
        (entry,) = await op.call("zwrm.audit.list", uri="zwrm.machine.restart")
        self.assertEqual((entry["args"], entry["result"]),
                         ({"machine_id": "m-nosuch"}, "zwrm.error.not_found"))
        self.assertEqual(await op.call("zwrm.drain.list"), [])

        viewer = await test_role_tokens._session(plane, "viewer", await self._create(plane, "viewer"))
        self.addCleanup(client.close, viewer)
        self.assertEqual(await viewer.call("zwrm.drain.list"), [])
        with self.assertRaises(ApplicationError) as c:
            await viewer.call("zwrm.machine.restart", "m-nosuch")
        self.assertEqual(c.exception.error, "wamp.error.not_authorized")
        with self.assertRaises(ApplicationError) as c:
            await op.call("zwrm.drain.list", limit=0)
        self.assertEqual(c.exception.error, "zwrm.error.invalid_argument")
