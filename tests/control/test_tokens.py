"""
The control plane's CA and join tokens (L{zwrm.control.tokens}), the C{zwrm.token.*}
procedures, join-token authentication and certificate signing at join.
"""

import os
import stat
import time

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tests.control.helpers import FACTS, make_registry
from zwrm import errors, pki
from zwrm.control.api import AgentAPI
from zwrm.control.auth import ControlAuthenticator
from zwrm.control.roles import roles
from zwrm.control.tokens import ControlPKI, TokenAPI, server_names
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
