"""
L{AgentNetwork.update} applies the control plane's views one at a time and ends with the
newest, however long an apply waits on the host's commands (the bridge's first setup after
an agent restart); it keeps the hosts list and takes changes to it (C{hosts_delta}) only on
the serial it holds.
"""

import copy
import os
import stat
import threading

from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm import errors
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
        self.clusters = []  # the other hosts of each view applied


    async def ensure_bridge(self, net):
        self.setups += 1
        if self.setups == 1:
            await self.first

    async def set_cluster(self, hosts, members):
        self.clusters.append([h["host_id"] for h in hosts])

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


class AgentHelpers:

    def setUp(self):
        self.host = SlowHost()
        self.network = AgentNetwork(MemoryReactorClock(), "h_1", None, host_network=self.host)
        self.network.dns_port = None
        self.network._start_dns = lambda net: None
        self.addCleanup(self.network.ingress.close)


class ViewOrderTests(AgentHelpers, SynchronousTestCase):

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

    def test_answers_come_in_the_order_of_the_views(self):
        """
        Views that queued behind a slow apply are answered in the order they came: the
        second applies the newest, and the ones after it answer at once, but only after
        it (the control plane takes an answer out of order for a list not held, and sends
        the whole list again).
        """
        order = []
        for i, healthy in enumerate((False, False, True, True)):
            d = self.network.update(view(healthy))
            d.addCallback(lambda result, i=i: order.append(i))
        self.assertEqual(order, [])
        self.host.first.callback(None)
        self.assertEqual(order, [0, 1, 2, 3])

    def test_a_failed_apply_is_answered_in_its_place(self):
        """A view whose apply fails gets that failure, in its turn; the views after it apply."""
        order = []
        failing = [True]

        async def set_forwards(table):
            if failing:
                failing.pop()
                raise errors.Unavailable("iptables failed")
            self.host.forwards.append(table)

        self.host.set_forwards = set_forwards
        ds = [self.network.update(view(h)) for h in (True, False, True)]
        for i, d in enumerate(ds):
            d.addBoth(lambda result, i=i: order.append((i, type(result).__name__)))
        self.host.first.callback(None)
        self.assertEqual(order, [(0, "Failure"), (1, "dict"), (2, "dict")])
        self.assertEqual(self.host.forwards, [{8080: [("10.80.1.2", 80)]}])


def entry(n, gateway=None):
    return {"host_id": f"h_{n}", "address": f"10.99.0.{n}",
            "gateway": gateway or f"10.80.{n}.1"}


def hosts_view(hosts=None, delta=None, serial=None):
    """A view without members or routes, with the whole list or a delta."""
    out = {"prefix": 24, "members": [], "published": {}}
    if delta is not None:
        out["hosts_delta"] = delta
    else:
        out["hosts"] = hosts
        if serial is not None:
            out["hosts_serial"] = serial
    return out


class HostsDeltaTests(AgentHelpers, SynchronousTestCase):
    """The hosts list, whole (C{hosts}, C{hosts_serial}) or changed (C{hosts_delta})."""

    def setUp(self):
        AgentHelpers.setUp(self)
        self.host.first.callback(None)  # no bridge setup to wait for

    def held(self):
        return [h["host_id"] for h in self.network._view["hosts"]]

    def test_a_delta_on_the_serial_held_changes_the_list(self):
        answer = self.successResultOf(self.network.update(
            hosts_view([entry(1), entry(2), entry(3)], serial=7)))
        self.assertEqual(answer["hosts_serial"], 7)
        answer = self.successResultOf(self.network.update(hosts_view(delta={
            "base": 7, "serial": 8, "set": [entry(4), entry(2, "10.80.9.1")],
            "remove": ["h_3"]})))
        self.assertEqual(answer, {"members": 0, "published": [], "hosts_serial": 8})
        self.assertEqual(self.held(), ["h_1", "h_2", "h_4"])
        self.assertEqual(self.network._view["hosts"][1]["gateway"], "10.80.9.1")
        self.assertEqual(self.host.clusters, [["h_2", "h_3"], ["h_2", "h_4"]])
        self.assertNotIn("hosts_delta", self.network._view)

    def test_a_delta_on_another_serial_is_refused_and_changes_nothing(self):
        self.successResultOf(self.network.update(hosts_view([entry(1), entry(2)], serial=7)))
        before = copy.deepcopy(self.network._view)
        for base in (6, 8):
            with self.assertRaises(errors.StaleView) as cm:
                self.network.update(hosts_view(delta={"base": base, "serial": 9,
                                                      "set": [entry(5)], "remove": []}))
            self.assertIn(f"base {base} is not the hosts list this agent holds (serial 7)",
                          cm.exception.message)
            self.assertEqual(cm.exception.kwargs, {"hosts_serial": 7})
        self.assertEqual(self.network._view, before)
        self.assertEqual(len(self.host.clusters), 1)
        # A list without a serial (a control plane before deltas): no delta applies to it.
        self.successResultOf(self.network.update(hosts_view([entry(1)])))
        self.assertIsNone(self.network._hosts_serial)
        self.assertRaises(errors.StaleView, self.network.update, hosts_view(
            delta={"base": 7, "serial": 8, "set": [], "remove": []}))
        self.assertEqual(self.held(), ["h_1"])

    def test_a_malformed_delta_names_its_field_and_changes_nothing(self):
        self.successResultOf(self.network.update(hosts_view([entry(1), entry(2)], serial=7)))
        before = copy.deepcopy(self.network._view)
        good = {"base": 7, "serial": 8, "set": [entry(3)], "remove": ["h_2"]}
        cases = [
            (["h_3"], "hosts_delta must be a dict, not list"),
            (dict(good, base="7"), "hosts_delta.base must be an integer, not str"),
            (dict(good, base=True), "hosts_delta.base must be an integer, not bool"),
            (dict(good, serial=None), "hosts_delta.serial must be an integer, not NoneType"),
            (dict(good, set={"h_3": entry(3)}), "hosts_delta.set must be a list, not dict"),
            (dict(good, set=[entry(3), {"address": "10.99.0.4"}]),
             'hosts_delta.set[1] must be a dict with a "host_id" string'),
            (dict(good, remove="h_2"), "hosts_delta.remove must be a list of host ids"),
            (dict(good, remove=[2]), "hosts_delta.remove must be a list of host ids"),
        ]
        for delta, message in cases:
            with self.assertRaises(errors.InvalidArgument) as cm:
                self.network.update(hosts_view(delta=delta))
            self.assertEqual(cm.exception.message, message)
        for view, message in [
                (hosts_view([entry(1)], serial="8"), "hosts_serial must be an integer, not str"),
                (hosts_view("h_1"), "hosts must be a list, not str"),
                (hosts_view([entry(1), "h_2"]), 'hosts[1] must be a dict with a "host_id" string')]:
            with self.assertRaises(errors.InvalidArgument) as cm:
                self.network.update(view)
            self.assertEqual(cm.exception.message, message)
        self.assertEqual(self.network._view, before)
        self.assertEqual(self.network._hosts_serial, 7)
        self.assertEqual(len(self.host.clusters), 1)
        self.successResultOf(self.network.update(hosts_view(delta=good)))
        self.assertEqual(self.held(), ["h_1", "h_3"])

    def test_deltas_of_views_skipped_still_count(self):
        """
        Views that arrive while an apply waits are skipped (the newest applied), but each
        one's delta is taken on arrival: the list ends with all of them.
        """
        self.host.first = defer.Deferred()
        self.host.setups = 0
        ds = [self.network.update(hosts_view([entry(1), entry(2)], serial=1)),
              self.network.update(hosts_view(delta={"base": 1, "serial": 2,
                                                    "set": [entry(3)], "remove": []})),
              self.network.update(hosts_view(delta={"base": 2, "serial": 3,
                                                    "set": [entry(4)], "remove": ["h_2"]}))]
        self.host.first.callback(None)
        self.assertEqual([self.successResultOf(d)["hosts_serial"] for d in ds], [1, 2, 3])
        self.assertEqual(self.host.clusters, [["h_2"], ["h_3", "h_4"]])


def threads(f, *args):
    """The agent's default for file writes: the (real) reactor's thread pool."""
    return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


class SavedHostsTests(TestCase):
    """
    The hosts list an agent holds is saved in its state directory a moment after it changes
    and when its executor closes (the agent stopping), so a restarted agent resumes it; it
    is written in a thread, not on the reactor's.
    """

    async def test_saved_when_the_executor_closes(self):
        from zwrm.agent.executor import Executor
        from zwrm.agent.volumes import VolumeStore
        from zwrm.drivers.fake import FakeDriver

        tmp = self.mktemp()
        state = os.path.join(tmp, "network")
        clock = MemoryReactorClock()
        network = AgentNetwork(clock, "h_1", None, host_network=SlowHost(), state_dir=state,
                               threads=threads)
        network._start_dns = lambda net: None
        self.addCleanup(network.ingress.close)
        ex = Executor(clock, "h_1", FakeDriver(clock, os.path.join(tmp, "m")),
                      VolumeStore(clock, os.path.join(tmp, "v")), lambda e: defer.succeed(None),
                      data_dir=tmp, network=network)
        network.update(dict(view(True), hosts_serial=4))
        path = os.path.join(state, "hosts.json")
        self.assertFalse(os.path.exists(path))  # not yet: changes that follow join it
        await ex.close()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        again = AgentNetwork(clock, "h_1", None, host_network=SlowHost(), state_dir=state)
        self.addCleanup(again.ingress.close)
        self.assertEqual(again.held(), network.held())
        self.assertEqual(again.held()["hosts_serial"], 4)

    def agent_on_the_reactor(self, state):
        """An agent network on the real reactor (its thread pool: the default)."""
        host = SlowHost()
        host.first.callback(None)
        network = AgentNetwork(reactor, "h_1", None, host_network=host, state_dir=state)
        network._start_dns = lambda net: None
        self.addCleanup(network.ingress.close)
        return network

    async def test_written_in_a_thread_in_order(self):
        """
        The default writes in the reactor's thread pool, not on the reactor's thread; a save
        begun while one is written follows it, with the list as it is then.
        """
        state = os.path.join(self.mktemp(), "network")
        network = self.agent_on_the_reactor(state)
        replaced = []
        real_replace = os.replace

        def replace(src, dst):
            replaced.append(threading.current_thread())
            return real_replace(src, dst)

        self.patch(os, "replace", replace)
        network.update(hosts_view([entry(1), entry(2)], serial=1))
        network._save_hosts()
        network.update(hosts_view(delta={"base": 1, "serial": 2, "set": [entry(3)],
                                         "remove": []}))
        await network.save_pending()
        self.assertEqual(len(replaced), 2)
        self.assertNotIn(threading.current_thread(), replaced)
        again = self.agent_on_the_reactor(state)
        self.assertEqual(again.held(), network.held())
        self.assertEqual(again.held()["hosts_serial"], 2)

    async def test_a_failed_write_is_a_warning(self):
        """
        A write that fails (here its directory is a file; a full disk alike) logs one
        warning and changes nothing; the stop that waits for it goes on.
        """
        state = self.mktemp()
        with open(state, "w") as f:
            f.write("not a directory")
        network = self.agent_on_the_reactor(state)
        logged = []
        self.patch(AgentNetwork, "log", type("L", (), {
            "warn": lambda self, fmt, **kw: logged.append(fmt.format(**kw))})())
        network.update(hosts_view([entry(1)], serial=1))
        self.assertIsNone(await network.save_pending())
        self.assertEqual(len(logged), 1)
        self.assertIn(f"the cluster's hosts list not saved in {state}/hosts.json", logged[0])
        with open(state) as f:
            self.assertEqual(f.read(), "not a directory")
