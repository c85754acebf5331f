"""
What an agent may do, with its identity taken from its host certificate: the real role table
(zwrm.control.roles) and authorizer (zwrm.wamp.auth), and zwrm.pki's certificate checks.
An agent cannot call operator procedures, nor register (or call) another host's procedures,
and a certificate for another host id is refused with a clear message.
"""

from twisted.trial.unittest import SynchronousTestCase

from zwrm import pki
from zwrm.control.roles import roles
from zwrm.errors import AuthenticationFailed
from zwrm.wamp.auth import Principal, RoleBasedAuthorizer


class AgentAuthorityTests(SynchronousTestCase):
    def setUp(self):
        self.ca = pki.CertificateAuthority.create()
        self.authorizer = RoleBasedAuthorizer(roles())
        cert_pem, _ = self.ca.issue_host("w1")
        # The control plane takes the agent's authid from its verified certificate.
        self.agent = Principal(pki.host_id_of(cert_pem), "agent")

    def allowed(self, principal, uri, action, match="exact"):
        return self.authorizer.authorize_pattern(principal, uri, action, match)

    def test_agent_procedures(self):
        for uri in ("zwrm.agent.register", "zwrm.agent.heartbeat"):
            self.assertTrue(self.allowed(self.agent, uri, "call"), uri)
        self.assertTrue(self.allowed(self.agent, "zwrm.agent.w1.machine.start", "register"))

    def test_agent_cannot_call_operator_procedures(self):
        for uri in (
            "zwrm.host.list",
            "zwrm.host.drain",
            "zwrm.app.create",
            "zwrm.token.create",
            "zwrm.token.list",
            "zwrm.agent.join",
        ):
            self.assertFalse(self.allowed(self.agent, uri, "call"), uri)

    def test_agent_cannot_register_or_call_another_hosts_procedures(self):
        self.assertFalse(self.allowed(self.agent, "zwrm.agent.w2.machine.start", "register"))
        self.assertFalse(self.allowed(self.agent, "zwrm.agent.w2.machine.start", "call"))
        self.assertFalse(self.allowed(self.agent, "zwrm.agent.w1.machine.start", "call"))
        self.assertFalse(self.allowed(self.agent, "zwrm.agent.", "register", "prefix"))
        self.assertFalse(
            self.allowed(self.agent, "zwrm.agent..machine.start", "register", "wildcard")
        )
        self.assertFalse(self.allowed(self.agent, "zwrm.agent.w1", "register", "prefix"))

    def test_certificate_for_another_host_refused(self):
        cert_pem, _ = self.ca.issue_host("w2")
        e = self.assertRaises(AuthenticationFailed, pki.check_host_certificate, cert_pem, "w1")
        self.assertEqual(e.message, "the peer's certificate is for host 'w2', not for host 'w1'")
        self.assertEqual(e.uri, "zwrm.error.authentication_failed")

    def test_joining_agent_may_only_join(self):
        joining = Principal("join", "joining")
        self.assertTrue(self.allowed(joining, "zwrm.agent.join", "call"))
        for uri, action in (
            ("zwrm.agent.register", "call"),
            ("zwrm.host.list", "call"),
            ("zwrm.agent.join.x", "register"),
        ):
            self.assertFalse(self.allowed(joining, uri, action), uri)
