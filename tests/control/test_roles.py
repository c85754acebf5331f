"""
The role table: the serial console is an operator's (issue 17 item 4: "authorized per
operator"); a viewer sees state but never a guest's console or its log.
"""

from twisted.trial.unittest import SynchronousTestCase

from zwrm.control.roles import roles
from zwrm.wamp.auth import Principal, RoleBasedAuthorizer

CONSOLE = ("zwrm.machine.console", "zwrm.machine.logs")


class ConsoleRoleTests(SynchronousTestCase):
    def setUp(self):
        self.authorizer = RoleBasedAuthorizer(roles())

    def test_operator_may_attach(self):
        for procedure in CONSOLE:
            self.assertTrue(self.authorizer.authorize(
                Principal("operator", "operator"), procedure, "call"), procedure)

    def test_viewer_and_agents_may_not(self):
        for who in (Principal("viewer", "viewer"), Principal("viewer-1f2e", "viewer"),
                    Principal("h_0123456789abcdef", "agent"), Principal("join", "joining")):
            for procedure in CONSOLE:
                self.assertFalse(self.authorizer.authorize(who, procedure, "call"),
                                 (who.authid, procedure))

    def test_viewer_still_sees_machines(self):
        viewer = Principal("viewer", "viewer")
        for procedure in ("zwrm.machine.list", "zwrm.machine.status"):
            self.assertTrue(self.authorizer.authorize(viewer, procedure, "call"), procedure)
