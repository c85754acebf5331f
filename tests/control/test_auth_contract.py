"""
The control plane's authenticator (L{zwrm.control.auth.ControlAuthenticator}) passes the
authenticator contract of tests/wamp/contracts.py, over a real store (SQLite on its own
thread) and host registry: as a host with its credential, as the operator with its token,
and as a joining agent with a C{zwrm1.} join token.
"""

import inspect
import os
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.wamp.contracts import AuthenticatorContract
from zwrm.control.auth import ControlAuthenticator
from zwrm.control.registry import HostRegistry
from zwrm.control.store import Store
from zwrm.control.tokens import ControlPKI
from zwrm.wamp.auth import Principal


class _RealStore:
    """A real store and registry; C{wait} gives the store's thread a bounded time."""

    def wait(self, d, seconds=10.0):
        if inspect.iscoroutine(d):
            d = Deferred.fromCoroutine(d)
        end = time.monotonic() + seconds
        while not d.called and time.monotonic() < end:
            reactor.iterate(0.005)
        if not d.called:
            self.fail(f"the store did not answer in {seconds}s")
        return d

    def settle(self, d):
        self.wait(d)

    def build(self):
        self.clock = Clock()
        self.clock.advance(time.time())
        self.store = Store(reactor, ":memory:", now=self.clock.seconds)
        self.successResultOf(self.wait(self.store.start()))
        self.addCleanup(lambda: self.wait(self.store.stop()))
        self.registry = HostRegistry(self.clock, self.store, lambda topic, event: None)
        self.successResultOf(self.wait(self.registry.load()))


class HostCredentialContractTests(_RealStore, AuthenticatorContract, SynchronousTestCase):
    def make_authenticator(self):
        self.build()
        joined = self.successResultOf(self.wait(self.registry.join("h-one", {})))
        creds = {"ticket": ("h-one", joined["credential"], Principal("h-one", "agent", {})),
                 "wampcra": None, "cryptosign": None}
        return ControlAuthenticator(self.store, self.registry), creds


class HostWampcraContractTests(_RealStore, AuthenticatorContract, SynchronousTestCase):
    """With C{[wamp] auth_methods = ["ticket", "wampcra"]}: hosts may use WAMP-CRA, whose
    secret is the hex SHA-256 of their credential."""

    def make_authenticator(self):
        from zwrm.tokens import hash_secret

        self.build()
        joined = self.successResultOf(self.wait(self.registry.join("h_one", {})))
        principal = Principal("h_one", "agent", {})
        creds = {"ticket": ("h_one", joined["credential"], principal),
                 "wampcra": ("h_one", hash_secret(joined["credential"]).encode(), principal),
                 "cryptosign": None}
        return ControlAuthenticator(self.store, self.registry,
                                    authmethods=["ticket", "wampcra"]), creds

    def test_only_hosts(self):
        for authid in ("operator", "viewer", "join", "control"):
            self._failure(self.authn.wampcra_secret(self.realm, authid))


class OperatorTokenContractTests(_RealStore, AuthenticatorContract, SynchronousTestCase):
    def make_authenticator(self):
        self.build()
        self.successResultOf(self.wait(self.store.add_token("t1", "operator", "op-secret")))
        creds = {"ticket": ("operator", "op-secret", Principal("operator", "operator", {})),
                 "wampcra": None, "cryptosign": None}
        return ControlAuthenticator(self.store, self.registry), creds


class JoinTokenContractTests(_RealStore, AuthenticatorContract, SynchronousTestCase):
    def make_authenticator(self):
        self.build()
        data_dir = self.mktemp()
        os.makedirs(data_dir)
        control_pki = ControlPKI(self.clock, self.store, data_dir)
        self.successResultOf(self.wait(control_pki.start()))
        token = self.successResultOf(self.wait(control_pki.create(60, "contract")))
        creds = {"ticket": ("join", str(token), Principal("join", "joining", {"token": token.id})),
                 "wampcra": None, "cryptosign": None}
        return ControlAuthenticator(self.store, self.registry, join_tokens=control_pki), creds
