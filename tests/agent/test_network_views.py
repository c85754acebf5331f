"""
L{AgentNetwork.update} applies the control plane's views one at a time and ends with the
newest, however long an apply waits on the host's commands (the bridge's first setup after
an agent restart).
"""

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from zwrm.agent.network.agent import AgentNetwork


class SlowHost:
    """
    A host network whose first bridge setup waits until the test fires C{first}; it
    records the C{tcp} ports forwarded, in the order they were set.
    """

    kernel_forwarding = True

    def __init__(self):
        self.first = defer.Deferred()
        self.setups = 0
        self.forwards = []

    async def ensure_bridge(self, net):
        self.setups += 1
        if self.setups == 1:
            await self.first

    async def set_cluster(self, hosts, members):
        pass

    def can_forward(self, backends):
        return bool(backends)

    async def set_forwards(self, table):
        self.forwards.append(table)

    async def stop_forwarding(self):
        pass


def view(healthy):
    return {"prefix": 24,
            "hosts": [{"host_id": "h_1", "address": "10.99.0.1", "gateway": "10.80.1.1"}],
            "members": [],
            "published": {"8080": {"mode": "tcp", "routes": {"": [
                {"key": "m-1", "host": "10.80.1.2", "port": 80, "healthy": healthy}]}}}}


class ViewOrderTests(SynchronousTestCase):

    def setUp(self):
        self.host = SlowHost()
        self.network = AgentNetwork(MemoryReactorClock(), "h_1", None, host_network=self.host)
        self.network.dns_port = None
        self.network._start_dns = lambda net: None
        self.addCleanup(self.network.ingress.close)

    def test_the_newest_view_wins(self):
        """
        A view that arrives while the previous one still waits on the bridge is applied
        after it: the routes end as the newest view says (the replica healthy), not as the
        older one (unhealthy).
        """
        older = self.network.update(view(False))
        newer = self.network.update(view(True))
        self.assertNoResult(older)
        self.assertNoResult(newer)
        self.host.first.callback(None)
        self.successResultOf(older)
        self.successResultOf(newer)
        self.assertEqual(self.host.forwards[-1], {8080: [("10.80.1.2", 80)]})
        [route] = self.network.ingress._listeners[8080].routes.values()
        self.assertEqual([b.key for b in route.candidates()], ["m-1"])

    def test_views_between_are_skipped(self):
        """Three views while the first waits: the first and the newest are applied, once each."""
        ds = [self.network.update(view(h)) for h in (False, False, True)]
        self.host.first.callback(None)
        for d in ds:
            self.successResultOf(d)
        self.assertEqual(self.host.forwards, [{}, {8080: [("10.80.1.2", 80)]}])
