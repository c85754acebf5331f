"""
C{zwrm tokens}: argument handling, output, and the procedure contract, with the procedures
answered by the real L{zwrm.pki.JoinTokens} over an in-memory SQLite store.
"""

import io

import sqlite_utils
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from zwrm import pki
from zwrm.cli import main as cli_main
from zwrm.cli import tokens as cli
from zwrm.cli.client import EXIT_USAGE, CliError
from zwrm.pki import join_tokens


class Procedures:
    """The zwrm.token.* procedures as the control plane offers them, on JoinTokens."""

    def __init__(self, tokens):
        self.tokens = tokens
        self.calls = []

    async def __call__(self, reactor, args, procedure, *a, **kw):
        self.calls.append((procedure, a, kw))
        if procedure == "zwrm.token.create":
            token = self.tokens.create(**kw)
            return {"token": str(token), "id": token.id, "expires_at": token.expires}
        if procedure == "zwrm.token.list":
            return self.tokens.list()
        if procedure == "zwrm.token.revoke":
            return self.tokens.revoke(*a)
        raise AssertionError(procedure)


def run(coro):
    return SynchronousTestCase().successResultOf(defer.Deferred.fromCoroutine(coro))


class TokensCommandTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        db = sqlite_utils.Database(memory=True)
        join_tokens.schema_v7(db)
        self.tokens = pki.JoinTokens(db, "ab" * 32, self.clock)
        self.procedures = Procedures(self.tokens)
        self.parser = cli_main.build_parser()

    def command(self, *argv):
        args = self.parser.parse_args(list(argv))
        out = io.StringIO()
        code = run(args.func(None, args, out=out, session_call=self.procedures))
        return code, out.getvalue()

    def test_create_prints_the_token_once(self):
        code, out = self.command("tokens", "create", "--ttl", "30m", "--description", "rack 4")
        self.assertEqual(code, 0)
        token = pki.JoinToken.parse(out.strip())
        self.assertEqual(token.ca_fingerprint, "ab" * 32)
        self.assertEqual(
            self.procedures.calls,
            [("zwrm.token.create", (), {"ttl": 1800.0, "description": "rack 4"})],
        )
        self.assertEqual(self.tokens.check(out.strip()), token.id)

    def test_list_and_revoke(self):
        _, text = self.command("tokens", "create")
        token = pki.JoinToken.parse(text.strip())
        code, out = self.command("tokens", "revoke", str(token))
        self.assertEqual((code, out), (0, f"revoked {token.id}\n"))
        code, out = self.command("tokens", "list")
        lines = out.splitlines()
        self.assertEqual(
            lines[0].split(),
            ["ID", "STATE", "EXPIRES", "(UTC)", "CREATED", "(UTC)", "USED", "DESCRIPTION"],
        )
        self.assertEqual(lines[1].split()[:2], [token.id, "revoked"])
        self.assertNotIn(token.secret, out)
        code, out = self.command("tokens", "list", "--json")
        self.assertIn('"state": "revoked"', out)

    def test_bad_ttl(self):
        for bad in ("0", "-5", "1y", "soon"):
            e = self.assertRaises(CliError, cli.parse_ttl, bad)
            self.assertEqual(e.code, EXIT_USAGE)
            self.assertIn("give a positive duration", e.message)
        self.assertEqual(
            [cli.parse_ttl(t) for t in ("90", "90s", "2m", "1.5h", "7d")],
            [90, 90, 120, 5400, 604800],
        )

    def test_bad_revoke_id(self):
        args = self.parser.parse_args(["tokens", "revoke", "nope"])
        d = defer.Deferred.fromCoroutine(
            args.func(None, args, out=io.StringIO(), session_call=self.procedures)
        )
        e = self.failureResultOf(d, CliError).value
        self.assertEqual(e.message, "'nope' is not a token id (6 characters a-z, 0-9)")
        self.assertEqual(self.procedures.calls, [])
