"""
Contract tests for L{zwrm.interfaces.IAuthenticator} and L{IAuthorizer}: every
implementation (the control plane's, the static one for tests) must pass them.

Use: subclass with C{twisted.trial.unittest.SynchronousTestCase} and define
C{make_authenticator()} returning C{(authenticator, creds)} where C{creds} has the keys
C{"ticket"}: C{(authid, ticket, Principal)}, C{"wampcra"}: C{(authid, secret bytes,
Principal)} and C{"cryptosign"}: C{(authid or None, pubkey hex, Principal)}; a method the
implementation does not offer maps to C{None}, and the contract then checks that the
method refuses every caller.  Deferreds must have fired by the time the method returns or
after C{self.settle(d)} (override it to pump a clock, or to wait a bounded time for a real
store's thread).  Every test asserts something in every branch.
"""

from zope.interface.verify import verifyObject

from zwrm.errors import AuthenticationFailed
from zwrm.interfaces import IAuthenticator, IAuthorizer
from zwrm.wamp.auth import AUTHMETHODS, Principal


class AuthenticatorContract:
    realm = "zwrm"

    def make_authenticator(self):
        raise NotImplementedError

    def settle(self, d):
        """Let the authenticator's Deferred C{d} fire (override to advance a clock)."""

    def _result(self, d):
        self.settle(d)
        return self.successResultOf(d)

    def _failure(self, d):
        self.settle(d)
        f = self.failureResultOf(d, AuthenticationFailed)
        self.assertTrue(f.value.message)
        return f

    def setUp(self):
        self.authn, self.creds = self.make_authenticator()

    def test_provides_interface(self):
        self.assertTrue(verifyObject(IAuthenticator, self.authn))

    def test_authmethods(self):
        methods = list(self.authn.authmethods())
        self.assertEqual(len(methods), len(set(methods)))
        self.assertLessEqual(set(methods), set(AUTHMETHODS))
        for method in ("ticket", "wampcra", "cryptosign"):
            self.assertEqual(method in methods, self.creds.get(method) is not None, method)

    def test_ticket(self):
        if self.creds.get("ticket") is None:
            self._failure(self.authn.authenticate_ticket(self.realm, "anyone", "anything"))
            return
        authid, ticket, principal = self.creds["ticket"]
        got = self._result(self.authn.authenticate_ticket(self.realm, authid, ticket))
        self.assertIsInstance(got, Principal)
        self.assertEqual(got, principal)

    def test_ticket_wrong(self):
        authid, ticket, _ = self.creds.get("ticket") or ("anyone", "anything", None)
        f = self._failure(self.authn.authenticate_ticket(self.realm, authid, ticket + "x"))
        self.assertTrue(f.value.message)
        self._failure(self.authn.authenticate_ticket(self.realm, authid + "-nobody", ticket))
        self._failure(self.authn.authenticate_ticket(self.realm, authid, ""))

    def test_wampcra(self):
        if self.creds.get("wampcra") is None:
            self._failure(self.authn.wampcra_secret(self.realm, "anyone"))
            return
        authid, secret, principal = self.creds["wampcra"]
        got_secret, got = self._result(self.authn.wampcra_secret(self.realm, authid))
        self.assertEqual(got_secret, secret)
        self.assertIsInstance(got_secret, bytes)
        self.assertEqual(got, principal)
        self._failure(self.authn.wampcra_secret(self.realm, authid + "-nobody"))

    def test_cryptosign(self):
        if self.creds.get("cryptosign") is None:
            self._failure(self.authn.cryptosign_principal(self.realm, None, "ab" * 32))
            self._failure(self.authn.cryptosign_principal(self.realm, "anyone", "ab" * 32))
            return
        authid, pubkey, principal = self.creds["cryptosign"]
        self.assertEqual(self._result(self.authn.cryptosign_principal(self.realm, authid, pubkey)), principal)
        other = "%064x" % (int(pubkey, 16) ^ 1)
        self._failure(self.authn.cryptosign_principal(self.realm, authid, other))


class _S:
    def __init__(self, authid, authrole):
        self.authid, self.authrole, self.authextra, self.session_id = authid, authrole, {}, 1


class AuthorizerContract:
    """
    Define C{make_authorizer()} returning C{(authorizer, allowed, denied)}: lists of
    C{(authid, authrole, uri, action)} that must be allowed / denied.
    """

    def make_authorizer(self):
        raise NotImplementedError

    def test_provides_interface(self):
        authz, _, _ = self.make_authorizer()
        self.assertTrue(verifyObject(IAuthorizer, authz))

    def test_decisions(self):
        authz, allowed, denied = self.make_authorizer()
        for authid, role, uri, action in allowed:
            self.assertIs(bool(authz.authorize(_S(authid, role), uri, action)), True, (authid, role, uri, action))
        for authid, role, uri, action in denied:
            self.assertIs(bool(authz.authorize(_S(authid, role), uri, action)), False, (authid, role, uri, action))

    def test_unknown_role_denied(self):
        authz, allowed, _ = self.make_authorizer()
        for authid, _role, uri, action in allowed:
            self.assertFalse(authz.authorize(_S(authid, "no-such-role"), uri, action))
