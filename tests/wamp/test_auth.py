"""
Rules, the role-based authorizer and the static authenticator (with the contracts in
tests/wamp/contracts.py).
"""

from nacl.signing import SigningKey
from twisted.trial import unittest

from tests.wamp.contracts import AuthenticatorContract, AuthorizerContract
from zwrm.wamp.auth import (
    Principal,
    RoleBasedAuthorizer,
    Rule,
    StaticAuthenticator,
    verify_cryptosign,
    wampcra_signature,
    wildcard_match,
)

ALL = {"call", "register", "publish", "subscribe"}


class StaticAuthenticatorContractTests(AuthenticatorContract, unittest.SynchronousTestCase):
    def make_authenticator(self):
        key = SigningKey(b"k" * 32).verify_key.encode().hex()
        creds = {
            "ticket": ("op", "t0ken", Principal("op", "operator")),
            "wampcra": ("cra", b"secret", Principal("cra", "operator", {"x": 1})),
            "cryptosign": (None, key, Principal("h1", "agent")),
        }
        authn = StaticAuthenticator(
            tickets={"op": ("t0ken", creds["ticket"][2])},
            secrets={"cra": (b"secret", creds["wampcra"][2])},
            pubkeys={key: creds["cryptosign"][2]},
        )
        return authn, creds


class TicketOnlyContractTests(AuthenticatorContract, unittest.SynchronousTestCase):
    def make_authenticator(self):
        p = Principal("op", "operator")
        return StaticAuthenticator(tickets={"op": ("t", p)}), {"ticket": ("op", "t", p)}


class RoleBasedAuthorizerContractTests(AuthorizerContract, unittest.SynchronousTestCase):
    def make_authorizer(self):
        authz = RoleBasedAuthorizer({
            "agent": [Rule("zwrm.agent.{authid}.", "prefix", {"register"}),
                      Rule("zwrm.agent.register", "exact", {"call"})],
            "operator": [Rule("zwrm.host.", "prefix", {"call"}),
                         Rule("zwrm.event..changed", "wildcard", {"subscribe"})],
        })
        allowed = [
            ("h1", "agent", "zwrm.agent.h1.start", "register"),
            ("h1", "agent", "zwrm.agent.register", "call"),
            ("op", "operator", "zwrm.host.list", "call"),
            ("op", "operator", "zwrm.event.host.changed", "subscribe"),
        ]
        denied = [
            ("h1", "agent", "zwrm.agent.h2.start", "register"),
            ("h1", "agent", "zwrm.agent.h1.start", "call"),
            ("h1", "agent", "zwrm.agent.h1x.start", "register"),
            ("h1", "agent", "zwrm.agent.register.x", "call"),
            ("a.b", "agent", "zwrm.agent.a.b.start", "register"),
            ("op", "operator", "zwrm.host.list", "register"),
            ("op", "operator", "zwrm.app.list", "call"),
            ("op", "operator", "zwrm.event.host.x.changed", "subscribe"),
        ]
        return authz, allowed, denied


class RuleTests(unittest.SynchronousTestCase):
    def test_bad_rules(self):
        self.assertRaises(ValueError, Rule, "a", "regex", {"call"})
        self.assertRaises(ValueError, Rule, "a", "exact", {"call", "destroy"})
        self.assertRaises(TypeError, RoleBasedAuthorizer, {"r": ["zwrm."]})

    def test_pattern_requests(self):
        r = Rule("zwrm.event.", "prefix", {"subscribe"})
        self.assertTrue(r.covers("x", "zwrm.event.", "subscribe", "prefix"))
        self.assertTrue(r.covers("x", "zwrm.event.host", "subscribe", "prefix"))
        self.assertFalse(r.covers("x", "zwrm.", "subscribe", "prefix"))
        self.assertTrue(r.covers("x", "zwrm.event..changed", "subscribe", "wildcard"))
        self.assertFalse(r.covers("x", "zwrm..host", "subscribe", "wildcard"))
        exact = Rule("zwrm.event.host", "exact", {"subscribe"})
        self.assertFalse(exact.covers("x", "zwrm.event.host", "subscribe", "prefix"))
        wild = Rule("zwrm..x", "wildcard", {"subscribe"})
        self.assertTrue(wild.covers("x", "zwrm..x", "subscribe", "wildcard"))
        self.assertFalse(wild.covers("x", "zwrm...", "subscribe", "wildcard"))

    def test_no_implicit_trusted(self):
        authz = RoleBasedAuthorizer({"operator": [Rule("zwrm.", "prefix", ALL)]})

        class S:
            authid, authrole, authextra, session_id = "c", "trusted", {}, 1

        self.assertFalse(authz.authorize(S, "zwrm.host.list", "call"))

    def test_wildcard_match(self):
        self.assertTrue(wildcard_match("a..c", "a.b.c"))
        self.assertFalse(wildcard_match("a..c", "a.b.d"))
        self.assertFalse(wildcard_match("a..c", "a.b.c.d"))


class CryptoTests(unittest.SynchronousTestCase):
    def test_wampcra_signature_matches_autobahn(self):
        from autobahn.wamp.auth import compute_wcs

        self.assertEqual(wampcra_signature(b"k", "challenge"), compute_wcs(b"k", b"challenge").decode())

    def test_verify_cryptosign(self):
        key = SigningKey.generate()
        challenge = b"c" * 32
        sig = key.sign(challenge).signature.hex() + challenge.hex()
        pub = key.verify_key.encode().hex()
        self.assertTrue(verify_cryptosign(pub, challenge.hex(), sig))
        self.assertFalse(verify_cryptosign(pub, (b"d" * 32).hex(), sig))
        self.assertFalse(verify_cryptosign(pub, challenge.hex(), "zz"))
        self.assertFalse(verify_cryptosign("00", challenge.hex(), sig))
