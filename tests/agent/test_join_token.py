"""
Where an agent's join token comes from (L{zwrm.agent.tap}): a file or the environment,
never the command line; a configuration file holding the token must not be world-readable.
"""

import os

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm.agent import tap

URL = "ws://127.0.0.1:8080/ws"


class JoinTokenOptionTests(SynchronousTestCase):
    def setUp(self):
        self.environ = {}
        self.patch(os, "environ", self.environ)
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def parse(self, *argv):
        o = tap.Options()
        o.parseOptions(["--control-plane-url", URL, *argv])
        return o.config

    def write(self, name, text, mode=0o600):
        path = os.path.join(self.dir, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def test_flag_refused(self):
        """--join-token=... is refused, naming the file option and the variable."""
        e = self.assertRaises(usage.UsageError, self.parse, "--join-token", "zwrm1.a.b.c")
        self.assertIn("--join-token-file", str(e))
        self.assertIn("ZWRM_JOIN_TOKEN", str(e))
        self.assertNotIn("zwrm1.a.b.c", str(e))

    def test_file(self):
        path = self.write("join-token", "  secret-token\n")
        self.assertEqual(self.parse("--join-token-file", path).join_token, "secret-token")
        config = self.write("agent.toml", f'[agent]\njoin_token_file = "{path}"\n', 0o644)
        self.assertEqual(self.parse("--config", config).join_token, "secret-token")

    def test_file_wins_over_environment(self):
        path = self.write("join-token", "from-file\n")
        self.environ[tap.JOIN_TOKEN_ENV] = "from-env"
        self.assertEqual(self.parse("--join-token-file", path).join_token, "from-file")
        self.assertEqual(self.parse().join_token, "from-env")

    def test_environment(self):
        self.assertIsNone(self.parse().join_token)
        self.environ[tap.JOIN_TOKEN_ENV] = " tok \n"
        self.assertEqual(self.parse().join_token, "tok")

    def test_bad_files(self):
        missing = os.path.join(self.dir, "nope")
        e = self.assertRaises(usage.UsageError, self.parse, "--join-token-file", missing)
        self.assertIn(f"cannot read the join token file {missing}", str(e))
        empty = self.write("empty", "\n")
        e = self.assertRaises(usage.UsageError, self.parse, "--join-token-file", empty)
        self.assertIn("is empty", str(e))
        public = self.write("public", "tok\n", 0o644)
        e = self.assertRaises(usage.UsageError, self.parse, "--join-token-file", public)
        self.assertIn("readable by every user", str(e))

    def test_inline_in_config(self):
        """join_token inline works in a private config file, and is refused in a public one."""
        private = self.write("private.toml", '[agent]\njoin_token = "tok"\n', 0o600)
        self.assertEqual(self.parse("--config", private).join_token, "tok")
        public = self.write("public.toml", '[agent]\njoin_token = "tok"\n', 0o644)
        e = self.assertRaises(usage.UsageError, self.parse, "--config", public)
        self.assertIn("join_token_file", str(e))
        self.assertIn("every user can read it", str(e))


class HostResetCommandTests(TestCase):
    """`zwrm host reset` (the real command) against a control plane on a loopback socket."""

    timeout = 120

    def test_reset(self):
        return ensureDeferred(self._reset())

    async def _reset(self):
        from tests.agent.test_membership import make_agent, start_plane
        from zwrm.testing.processes import run_cli

        plane, tmp = await start_plane(self)
        agent = make_agent(self, plane, os.path.join(tmp, "a1"))
        await agent.registered
        host_id = agent.identity.host_id
        code, out, err = await run_cli(reactor, ["host", "reset", host_id, "--ttl", "10m"],
                                       plane.url, plane.operator_token)
        self.assertEqual(code, 0, err)
        self.assertIn(f"host {host_id} may join again with a join token until", out)
        code, out, err = await run_cli(reactor, ["host", "reset", "h-nobody"], plane.url,
                                       plane.operator_token)
        self.assertEqual((code, err.strip()), (1, "zwrm: no host 'h-nobody'"))
        code, out, err = await run_cli(reactor, ["host", "reset", "bad id!"],
                                       plane.url, plane.operator_token)
        self.assertEqual(code, 1, err)
        self.assertIn("host_id", err)
