"""
Where an agent's join token comes from (L{zwrm.agent.tap}): a file or the environment,
never the command line; a configuration file holding the token must not be world-readable.
"""

import os

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

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
