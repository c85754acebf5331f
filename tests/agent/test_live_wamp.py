"""
A real agent (AgentService with its HostRuntime) registers the live-migration procedures
under its own prefix beside its executor, and the control plane can call them over WAMP
(real control plane, real sockets); bad input is a zwrm error, not a traceback.
"""

import os

from autobahn.wamp.exception import ApplicationError
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from tests.agent.test_membership import start_host_agent, start_plane


class LiveProceduresOverWampTests(TestCase):
    timeout = 60

    def test_registered_and_callable(self):
        return ensureDeferred(self._test())

    async def _test(self):
        plane, tmp = await start_plane(self)
        agent = await start_host_agent(self, plane, os.path.join(tmp, "a1"))
        host_id = agent.identity.host_id
        facts = await plane.registry.call_executor(host_id, "live.facts")
        self.assertEqual((facts["live"], facts["cpu_model"], facts["machine_type"],
                          facts["network"]), (True, "qemu64", "pc-i440fx-7.2", "user"))
        with self.assertRaises(ApplicationError) as cm:
            await plane.registry.call_executor(host_id, "live.describe", "nope")
        self.assertEqual(cm.exception.error, "zwrm.error.not_found")
        with self.assertRaises(ApplicationError) as cm:
            await plane.registry.call_executor(host_id, "live.migrate", "m1", "h2", {},
                                               {"deadline": -1})
        self.assertEqual(cm.exception.error, "zwrm.error.invalid_argument")
        self.assertIn("deadline", cm.exception.args[0])
        st = await plane.registry.call_executor(host_id, "live.status", "m1")
        self.assertEqual((st["role"], st["hypervisor"]), (None, None))
