"""
Strategy plugins: the contract every strategy must meet (built-in and the examples in
the top-level plugins/ directory, loaded from there as an operator's plugin directory),
the orders of spread and pack, and finding strategies by name.
"""

import os
import re

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import zwrm.plugins
from zwrm.errors import Unplaceable
from zwrm.interfaces import IPlacementStrategy, IRequestAwarePlacementStrategy
from zwrm.plugins import PluginError
from zwrm.scheduler import PlacementRequest, Scheduler, load_strategy

from .helpers import PLUGIN_DIR, check_indexes, record

R = PlacementRequest


def use_plugin_dir(test):
    """Add the example plugins/ directory for the length of C{test}."""
    d = os.path.abspath(PLUGIN_DIR)
    was = d in zwrm.plugins.__path__

    def undo():
        if not was and d in zwrm.plugins.__path__:
            zwrm.plugins.__path__.remove(d)

    test.addCleanup(undo)
    return d


def make_strategy_contract_tests(name, from_dir):
    """
    The tests every L{IPlacementStrategy} must pass, for the strategy called C{name}
    (found in the example plugin directory if C{from_dir}).
    """

    class Contract(SynchronousTestCase):
        def strategy(self):
            dirs = [use_plugin_dir(self)] if from_dir else []
            return load_strategy(name, dirs)

        def test_provides(self):
            s = self.strategy()
            self.assertTrue(verifyObject(IPlacementStrategy, s))
            if IRequestAwarePlacementStrategy.providedBy(s):
                self.assertTrue(verifyObject(IRequestAwarePlacementStrategy, s))
            self.assertEqual(s.name, name)
            self.assertRegex(s.name, re.compile(r"^[a-z][a-z0-9-]*$"))
            self.assertIsInstance(s.description, str)
            self.assertNotIn("\n", s.description)

        def test_keys_comparable_and_pure(self):
            """Keys of different hosts compare; the same host gives the same key."""
            sched = Scheduler(self.strategy())
            for i, (v, used, labels) in enumerate(
                [(4, 0, {}), (8, 3, {"ssd": "true"}), (2, 2, {}), (16, 1, {"a": "b"}), (0, 0, {})]
            ):
                sched.update_host(record(f"h{i}", vcpus=v, alloc_vcpus=used, labels=labels))
            sched.place(R(1, 1))
            hosts = sched.hosts()
            keys = [sched.strategy.key(h) for h in hosts]
            sorted(keys)
            self.assertEqual(keys, [sched.strategy.key(h) for h in hosts])

        def test_places_within_filters(self):
            """Placing with this strategy obeys the filters and the capacity."""
            sched = Scheduler(self.strategy())
            for i in range(6):
                sched.update_host(record(f"h{i}", region=["eu", "us"][i % 2], vcpus=3,
                                         labels={"ssd": "true"} if i < 3 else {}))
            placed = []
            while True:
                try:
                    placed.append(sched.place(R(1, 1, region="eu", preferences={"ssd": "true"}),
                                              exclude=["h0"]))
                except Unplaceable as e:
                    self.assertEqual(e.message, "0/6 hosts fit: 1 excluded, 3 wrong region, "
                                                "2 insufficient vcpus")
                    break
            self.assertEqual(sorted({p.host_id for p in placed}), ["h2", "h4"])
            self.assertEqual(len(placed), 6)
            check_indexes(sched)

    Contract.__name__ = Contract.__qualname__ = (
        "StrategyContract_" + name.replace("-", "_"))
    return Contract


SpreadContract = make_strategy_contract_tests("spread", False)
PackContract = make_strategy_contract_tests("pack", False)
LabelAffinityContract = make_strategy_contract_tests("label-affinity", True)
LeastRecentlyUsedContract = make_strategy_contract_tests("least-recently-used", True)


class FindTests(SynchronousTestCase):
    def test_builtins(self):
        self.assertEqual(load_strategy("spread").name, "spread")
        self.assertEqual(load_strategy("pack").name, "pack")

    def test_unknown(self):
        """An unknown name is an error that lists what exists."""
        e = self.assertRaises(PluginError, load_strategy, "nearest")
        # Other suites may have added plugin directories to this process.
        names = sorted(zwrm.plugins.available(IPlacementStrategy))
        self.assertIn("pack", names)
        self.assertIn("spread", names)
        self.assertEqual(
            str(e), "unknown placement strategy 'nearest'; available: " + ", ".join(names))

    def test_unknown_lists_plugin_dir(self):
        e = self.assertRaises(PluginError, load_strategy, "nearest", [use_plugin_dir(self)])
        self.assertTrue(str(e).startswith("unknown placement strategy 'nearest'; available: "))
        listed = str(e).split("available: ")[1].split(", ")
        for name in ("label-affinity", "least-recently-used", "pack", "spread"):
            self.assertIn(name, listed)

    def test_missing_dir(self):
        e = self.assertRaises(PluginError, load_strategy, "spread", ["/nonexistent/zwrm"])
        self.assertIn("/nonexistent/zwrm does not exist", str(e))


class ExamplePluginTests(SynchronousTestCase):
    def test_label_affinity_from_dir(self):
        """label-affinity, loaded from plugins/, prefers hosts with preferred labels."""
        strategy = load_strategy("label-affinity", [use_plugin_dir(self)])
        sched = Scheduler(strategy)
        sched.update_host(record("a", vcpus=2))
        sched.update_host(record("b", vcpus=2, labels={"ssd": "true", "zone": "1"}))
        sched.update_host(record("c", vcpus=2, labels={"ssd": "true"}))
        req = R(1, 1, preferences={"ssd": "true", "zone": "1"})
        self.assertEqual([p.host_id for p in sched.place_many(req, 5)],
                         ["b", "b", "c", "c", "a"])
        # Without preferences it spreads.
        sched = Scheduler(strategy)
        for h in "abc":
            sched.update_host(record(h))
        self.assertEqual([p.host_id for p in sched.place_many(R(1, 1), 4)], ["a", "b", "c", "a"])

    def test_least_recently_used_from_dir(self):
        """least-recently-used rotates over hosts by their latest placement."""
        strategy = load_strategy("least-recently-used", [use_plugin_dir(self)])
        sched = Scheduler(strategy)
        for h in "abc":
            sched.update_host(record(h, vcpus=4))
        first = sched.place_many(R(1, 1), 3)
        self.assertEqual([p.host_id for p in first], ["a", "b", "c"])
        sched.release(first[0])
        self.assertEqual([p.host_id for p in sched.place_many(R(1, 1), 4)],
                         ["a", "b", "c", "a"])


class OrderTests(SynchronousTestCase):
    def test_spread_prefers_fewest_machines_then_least_utilized(self):
        s = Scheduler(load_strategy("spread"))
        s.update_host(record("a", vcpus=8, alloc_vcpus=4))
        s.update_host(record("b", vcpus=8, alloc_vcpus=1))
        s.update_host(record("c", vcpus=8))
        self.assertEqual([p.host_id for p in s.place_many(R(1, 1), 3)], ["c", "b", "a"])

    def test_pack_prefers_most_utilized(self):
        s = Scheduler(load_strategy("pack"))
        s.update_host(record("a", vcpus=8, alloc_vcpus=2))
        s.update_host(record("b", vcpus=8, alloc_vcpus=6))
        s.update_host(record("c", vcpus=8))
        self.assertEqual([p.host_id for p in s.place_many(R(1, 1), 4)], ["b", "b", "a", "a"])
        self.assertEqual(s.place(R(4, 1)).host_id, "a")
        self.assertEqual(s.place(R(4, 1)).host_id, "c")
