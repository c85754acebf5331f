"""
The control plane's CA and join tokens (L{zwrm.control.tokens}), the C{zwrm.token.*}
procedures, join-token authentication and certificate signing at join.
"""

import os
import stat
import time

import sqlite_utils
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.control.helpers import FACTS, make_registry
from zwrm import errors, pki
from zwrm.control.api import AgentAPI
from zwrm.control.auth import ControlAuthenticator
from zwrm.control.roles import roles
from zwrm.control.store import MIGRATIONS, migrate
from zwrm.control.tokens import RESETS_TABLE, ControlPKI, TokenAPI, server_names
from zwrm.wamp.auth import Principal, RoleBasedAuthorizer


class TokenTests(TestCase):
    async def _setup(self):
        self.clock = Clock()
        self.clock.advance(time.time())
        _, self.store, self.registry, _ = await make_registry(self, clock=self.clock)
        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir)
        self.pki = ControlPKI(self.clock, self.store, self.data_dir,
                              ["tcp:8080:interface=127.0.0.1", "ssl:8443:interface=10.1.2.3"])
        await self.pki.start()
        self.api = TokenAPI(self.pki)
        self.auth = ControlAuthenticator(self.store, self.registry, join_tokens=self.pki)

    async def test_ca_on_first_start(self):
        """
        The CA and the server certificate are created in <data_dir>/pki (keys 0600) and
        loaded, unchanged, on the next start; the certificate names the listeners.
        """
        await self._setup()
        directory = os.path.join(self.data_dir, "pki")
        for name in ("ca.pem", "ca.key", "server.pem", "server.key"):
            self.assertTrue(os.path.exists(os.path.join(directory, name)), name)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(directory, "ca.key")).st_mode), 0o600)
        with open(os.path.join(directory, "ca.pem"), "rb") as f:
            self.assertEqual(pki.fingerprint_of(f.read()), self.pki.fingerprint)
        self.assertIn("10.1.2.3", self.pki.names)
        again = ControlPKI(self.clock, self.store, self.data_dir)
        await again.start()
        self.assertEqual(again.fingerprint, self.pki.fingerprint)
        self.assertIn("10.1.2.3", again.names)  # kept from the certificate on disk

    def test_server_names(self):
        names = server_names(["ssl:8443:interface=0.0.0.0", "tcp:80:interface=192.0.2.7"])
        self.assertEqual(names[:3], ["localhost", "127.0.0.1", "::1"])
        self.assertIn("192.0.2.7", names)
        self.assertNotIn("0.0.0.0", names)

    async def test_join_token_file(self):
        """
        The join token file holds a zwrm1 token naming this CA; it is kept while valid and
        replaced once revoked or expired.
        """
        await self._setup()
        path = os.path.join(self.data_dir, "join.token")
        first = await self.pki.ensure_join_token(path)
        with open(path) as f:
            token = pki.JoinToken.parse(f.read())
        self.assertEqual(token.id, first)
        self.assertEqual(token.ca_fingerprint, self.pki.fingerprint)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(await self.pki.ensure_join_token(path), first)
        await self.pki.revoke(first)
        second = await self.pki.ensure_join_token(path)
        self.assertNotEqual(second, first)
        self.clock.advance(pki.DEFAULT_TOKEN_TTL + 1)
        self.assertNotIn(await self.pki.ensure_join_token(path), (first, second))

    async def test_create_list_revoke(self):
        await self._setup()
        made = await self.api.create(ttl=3600, description="rack 4")
        token = pki.JoinToken.parse(made["token"])
        self.assertEqual(token.id, made["id"])
        self.assertEqual(token.ca_fingerprint, self.pki.fingerprint)
        self.assertEqual(made["expires_at"], self.clock.seconds() + 3600)
        listed = await self.api.list()
        self.assertEqual([(t["id"], t["state"], t["description"]) for t in listed],
                         [(token.id, "valid", "rack 4")])
        self.assertNotIn("secret_hash", listed[0])
        self.assertNotIn(token.secret, repr(listed))
        await self.api.revoke(token.id)
        self.assertEqual((await self.api.list())[0]["state"], "revoked")
        self.clock.advance(3601)
        other = await self.api.create(ttl=10)
        states = {t["id"]: t["state"] for t in await self.api.list()}
        self.assertEqual(states, {token.id: "revoked", other["id"]: "valid"})

    async def test_bad_arguments(self):
        await self._setup()
        for ttl in (0, -5, "1h", True, None, 10 ** 12):
            with self.assertRaises(errors.InvalidArgument):
                await self.api.create(ttl=ttl)
        with self.assertRaises(errors.InvalidArgument):
            await self.api.create(ttl=60, description=["x"])
        with self.assertRaises(errors.NotFound):
            await self.api.revoke("abcdef")
        with self.assertRaises(errors.InvalidArgument):
            await self.api.revoke(None)

    async def test_authenticate_join_token(self):
        """
        A valid zwrm1 token joins with role `joining`; a revoked, expired, unknown, other-CA
        or malformed one is refused with a message that says why.
        """
        await self._setup()
        good = (await self.api.create(ttl=60))["token"]
        principal = await self.auth.authenticate_ticket("zwrm", "join", good)
        self.assertEqual((principal.authid, principal.authrole), ("join", "joining"))
        t = pki.JoinToken.parse(good)

        async def refused(ticket, words):
            with self.assertRaises(errors.AuthenticationFailed) as c:
                await self.auth.authenticate_ticket("zwrm", "join", ticket)
            self.assertIn(words, c.exception.message)
            self.assertNotIn(t.secret, c.exception.message)

        await refused(f"zwrm1.{t.id}.{t.secret}.{'ab' * 32}", "not this control plane's CA")
        await refused(f"zwrm1.zzzzzz.{t.secret}.{t.ca_fingerprint}", "not known")
        await refused(f"zwrm1.{t.id}.{t.secret[:-1]}", "malformed join token")
        revoked = (await self.api.create(ttl=60))["token"]
        await self.api.revoke(pki.JoinToken.parse(revoked).id)
        await refused(revoked, "was revoked")
        self.clock.advance(61)
        await refused(good, "expired at")

    async def test_join_signs_request(self):
        """
        zwrm.agent.join with a CSR returns a certificate for the host id, signed by the CA;
        a request for another host id is refused and the host is not admitted.
        """
        await self._setup()
        api = AgentAPI(self.registry, pki=self.pki)
        key_pem, csr_pem = pki.make_host_request("h-one")
        result = await api.join("h-one", dict(FACTS), csr=csr_pem.decode())
        credentials = pki.HostCredentials(
            result["ca"].encode(), result["certificate"].encode(), key_pem)
        self.assertEqual(credentials.host_id, "h-one")
        self.assertEqual(credentials.fingerprint, self.pki.fingerprint)
        self.assertTrue(result["credential"])

        _, other_csr = pki.make_host_request("h-other")
        with self.assertRaises(errors.InvalidArgument) as c:
            await api.join("h-two", dict(FACTS), csr=other_csr.decode())
        self.assertIn("not for host 'h-two'", c.exception.message)
        self.assertIsNone(self.registry.credential_hash("h-two"))
        with self.assertRaises(errors.InvalidArgument):
            await api.join("h-three", dict(FACTS), csr="not a request")

    def test_only_operators_manage_tokens(self):
        authorizer = RoleBasedAuthorizer(roles())
        for procedure in ("zwrm.token.create", "zwrm.token.list", "zwrm.token.revoke"):
            self.assertTrue(authorizer.authorize(Principal("operator", "operator"), procedure, "call"))
            for who in (Principal("h-1", "agent"), Principal("join", "joining"),
                        Principal("viewer", "viewer")):
                self.assertFalse(authorizer.authorize(who, procedure, "call"), (who, procedure))


class JoinExistingHostTests(TestCase):
    """A join token admits only new hosts (issue 14, item 3)."""

    async def _setup(self):
        self.clock = Clock()
        self.clock.advance(time.time())
        _, self.store, self.registry, _ = await make_registry(self, clock=self.clock)
        data_dir = self.mktemp()
        os.makedirs(data_dir)
        self.pki = ControlPKI(self.clock, self.store, data_dir)
        await self.pki.start()
        self.api = AgentAPI(self.registry, pki=self.pki)
        self.first = await self.api.join("h-one", dict(FACTS))

    async def test_existing_host_refused(self):
        """Anyone with a join token cannot take over a joined host's id: refused, nothing changes."""
        await self._setup()
        before = self.registry.credential_hash("h-one")
        _, csr = pki.make_host_request("h-one")
        for credential in (None, "wrong", ""):
            with self.assertRaises(errors.NotAuthorized) as c:
                await self.api.join("h-one", dict(FACTS), csr=csr.decode(), credential=credential)
            self.assertIn("zwrm host reset h-one", c.exception.message)
        self.assertEqual(self.registry.credential_hash("h-one"), before)

    async def test_with_credential(self):
        """The host's own credential proves it: a new credential (and certificate) is issued."""
        await self._setup()
        again = await self.api.join("h-one", dict(FACTS), credential=self.first["credential"])
        self.assertNotEqual(again["credential"], self.first["credential"])
        with self.assertRaises(errors.NotAuthorized):
            await self.api.join("h-one", dict(FACTS), credential=self.first["credential"])

    async def test_after_reset(self):
        """After zwrm.host.reset one join goes through, within the ttl only."""
        await self._setup()
        result = await self.api.reset("h-one", ttl=60)
        self.assertEqual(result["expires_at"], self.clock.seconds() + 60)
        again = await self.api.join("h-one", dict(FACTS))
        self.assertNotEqual(again["credential"], self.first["credential"])
        with self.assertRaises(errors.NotAuthorized):  # used up
            await self.api.join("h-one", dict(FACTS))
        await self.api.reset("h-one", ttl=60)
        self.clock.advance(61)
        with self.assertRaises(errors.NotAuthorized):  # expired
            await self.api.join("h-one", dict(FACTS))
        with self.assertRaises(errors.NotFound):
            await self.api.reset("h-nobody")

    async def test_concurrent_joins_of_one_id(self):
        """Two joins of one new id at once: the second is a conflict, not a second credential."""
        await self._setup()
        from twisted.internet import defer

        first = defer.ensureDeferred(self.api.join("h-two", dict(FACTS)))
        with self.assertRaises(errors.Conflict):
            await self.api.join("h-two", dict(FACTS))
        await first

    def test_only_operators_reset(self):
        authorizer = RoleBasedAuthorizer(roles())
        self.assertTrue(authorizer.authorize(Principal("operator", "operator"), "zwrm.host.reset", "call"))
        for who in (Principal("h-1", "agent"), Principal("join", "joining"), Principal("viewer", "viewer")):
            self.assertFalse(authorizer.authorize(who, "zwrm.host.reset", "call"), who)


class JoinTokenTableMigrationTests(SynchronousTestCase):
    """The join tokens' table is made by the store's migrations (schema version 7)."""

    def test_a_new_database_gets_the_table(self):
        db = sqlite_utils.Database(memory=True)
        self.assertEqual(migrate(db), len(MIGRATIONS))
        self.assertEqual(
            set(db[pki.JoinTokens.table_name].columns_dict),
            {"id", "secret_hash", "description", "created_at", "expires_at", "revoked", "used"},
        )
        self.assertEqual(db[pki.JoinTokens.table_name].pks, ["id"])
        tokens = pki.JoinTokens(db, "ab" * 32, Clock())
        token = tokens.create(ttl=60, description="rack 1")
        self.assertEqual(tokens.check(str(token)), token.id)

    def test_a_version_6_database_keeps_its_tokens(self):
        """
        A database of schema version 6 has the table already (JoinTokens made it, with the
        same columns): the migration keeps it and its tokens.
        """
        db = sqlite_utils.Database(memory=True)
        self.assertEqual(migrate(db, MIGRATIONS[:6]), 6)
        self.assertNotIn(pki.JoinTokens.table_name, db.table_names())
        db[pki.JoinTokens.table_name].create(
            {"id": str, "secret_hash": str, "description": str, "created_at": float,
             "expires_at": float, "revoked": float, "used": int},
            pk="id", not_null={"secret_hash", "created_at", "expires_at"}, defaults={"used": 0})
        clock = Clock()
        clock.advance(1000)
        made = pki.JoinToken.generate("ab" * 32, 2000.0)
        db[pki.JoinTokens.table_name].insert(
            {"id": made.id, "secret_hash": made.secret_hash, "description": "old",
             "created_at": 900.0, "expires_at": 2000.0, "revoked": None, "used": 0})
        self.assertEqual(migrate(db), len(MIGRATIONS))
        tokens = pki.JoinTokens(db, "ab" * 32, clock)
        self.assertEqual([t["id"] for t in tokens.list()], [made.id])
        self.assertEqual(tokens.check(str(made)), made.id)

    def test_no_table_without_the_migration(self):
        """JoinTokens no longer makes its table: without the store's migrations it says so."""
        db = sqlite_utils.Database(memory=True)
        e = self.assertRaises(RuntimeError, pki.JoinTokens, db, "ab" * 32, Clock())
        self.assertIn("migrations", str(e))
        self.assertNotIn(pki.JoinTokens.table_name, db.table_names())


class HostResetsTableMigrationTests(SynchronousTestCase):
    """The host resets' table is made by the store's migrations (schema version 10)."""

    def test_a_new_database_gets_the_table(self):
        db = sqlite_utils.Database(memory=True)
        self.assertEqual(migrate(db), len(MIGRATIONS))
        self.assertEqual(db[RESETS_TABLE].columns_dict, {"host_id": str, "expires_at": float})
        self.assertEqual(db[RESETS_TABLE].pks, ["host_id"])

    def test_a_version_9_database_keeps_its_resets(self):
        """
        A database of schema version 9 has the table already (ControlPKI.start made it, with
        the same columns): the migration keeps it and its rows.
        """
        db = sqlite_utils.Database(memory=True)
        self.assertEqual(migrate(db, MIGRATIONS[:9]), 9)
        self.assertNotIn(RESETS_TABLE, db.table_names())
        db[RESETS_TABLE].create({"host_id": str, "expires_at": float}, pk="host_id")
        db[RESETS_TABLE].insert({"host_id": "h_" + "a" * 16, "expires_at": 1234.0})
        self.assertEqual(migrate(db), len(MIGRATIONS))
        self.assertEqual(list(db[RESETS_TABLE].rows),
                         [{"host_id": "h_" + "a" * 16, "expires_at": 1234.0}])
