"""
The scheduler core: hard filters, reservations, explanations of failures.

Each filter is tested with the indexed search and with the exhaustive reference, and
with both built-in strategies where the order matters.
"""

from twisted.trial.unittest import SynchronousTestCase

from zwrm.errors import InvalidArgument, NotFound, Unplaceable
from zwrm.scheduler import PlacementRequest, Scheduler
from zwrm.scheduler.strategies.pack import Pack
from zwrm.scheduler.strategies.spread import Spread

from .helpers import check_indexes, record, scheduler

R = PlacementRequest


class FilterTests:
    """Mixed into a TestCase with C{exhaustive} set."""

    exhaustive = False

    def make(self, hosts, strategy=None):
        s = scheduler(strategy, hosts, exhaustive=self.exhaustive)
        self.addCleanup(check_indexes, s)
        return s

    def assertUnplaceable(self, s, request, message, exclude=()):
        e = self.assertRaises(Unplaceable, s.place, request, exclude)
        self.assertEqual(e.uri, "zwrm.error.unplaceable")
        self.assertEqual(e.message, message)
        return e

    def test_not_ready(self):
        """Draining, drained and offline hosts are never chosen."""
        s = self.make([record("a", state="draining"), record("b", state="drained"),
                       record("c", state="offline"), record("d")])
        self.assertEqual(s.place(R(1, 100)).host_id, "d")
        s.set_state("d", "draining")
        self.assertUnplaceable(s, R(1, 100), "0/4 hosts fit: 4 not ready")
        s.set_state("b", "ready")
        self.assertEqual(s.place(R(1, 100)).host_id, "b")

    def test_disk_full(self):
        """A host whose data disk is nearly full is never chosen, and the reason says so."""
        s = self.make([record("a", state="disk_full"), record("b")])
        self.assertEqual(s.place(R(1, 100)).host_id, "b")
        s.set_state("b", "disk_full")
        e = self.assertUnplaceable(s, R(1, 100), "0/2 hosts fit: 2 data disk full")
        self.assertEqual(e.kwargs["filtered"], {"disk_full": 2})
        s.set_state("a", "ready")
        self.assertEqual(s.place(R(1, 100)).host_id, "a")

    def test_region(self):
        s = self.make([record("a", region="us"), record("b", region="eu"), record("c", region="us")])
        self.assertEqual({s.place(R(1, 100, region="eu")).host_id for _ in range(3)}, {"b"})
        self.assertUnplaceable(s, R(1, 100, region="ap"), "0/3 hosts fit: 3 wrong region")

    def test_datacenter(self):
        s = self.make([record("a", datacenter="dc1"), record("b", datacenter="dc2"),
                       record("c", region="us", datacenter="dc2")])
        self.assertEqual({s.place(R(1, 100, datacenter="dc2", region="eu")).host_id
                          for _ in range(3)}, {"b"})
        self.assertEqual({s.place(R(1, 100, datacenter="dc2")).host_id for _ in range(4)},
                         {"b", "c"})
        self.assertUnplaceable(s, R(1, 100, region="us", datacenter="dc1"),
                               "0/3 hosts fit: 2 wrong region, 1 wrong datacenter")

    def test_required_labels(self):
        s = self.make([record("a"), record("b", labels={"ssd": "true"}),
                       record("c", labels={"ssd": "false"})])
        self.assertEqual({s.place(R(1, 100, constraints={"ssd": "true"})).host_id
                          for _ in range(3)}, {"b"})
        self.assertEqual(s.place(R(1, 100, constraints=["ssd=false"])).host_id, "c")
        self.assertUnplaceable(s, R(1, 100, constraints={"gpu": "a100"}),
                               "0/3 hosts fit: 3 missing required labels")

    def test_vcpus(self):
        s = self.make([record("a", vcpus=2), record("b", vcpus=4)])
        self.assertEqual(s.place(R(3, 100)).host_id, "b")
        self.assertEqual(s.place(R(1, 100)).host_id, "a")
        e = self.assertUnplaceable(s, R(2, 100), "0/2 hosts fit: 2 insufficient vcpus")
        self.assertEqual(e.kwargs, {"hosts": 2, "filtered": {"insufficient_vcpus": 2}})

    def test_memory(self):
        s = self.make([record("a", memory_mb=1024), record("b", memory_mb=4096)])
        self.assertEqual(s.place(R(1, 2048)).host_id, "b")
        self.assertEqual(s.place(R(1, 2048)).host_id, "b")
        self.assertUnplaceable(s, R(1, 2048), "0/2 hosts fit: 2 insufficient memory")
        self.assertEqual(s.place(R(1, 1024)).host_id, "a")

    def test_disk(self):
        s = self.make([record("a", disk_mb=0), record("b", disk_mb=500)])
        self.assertEqual(s.place(R(1, 10, disk_mb=300)).host_id, "b")
        self.assertUnplaceable(s, R(1, 10, disk_mb=300), "0/2 hosts fit: 2 insufficient disk")
        self.assertEqual(s.place(R(1, 10, disk_mb=200)).host_id, "b")

    def test_existing_allocation(self):
        """Capacity in use according to the host record counts."""
        s = self.make([record("a", vcpus=4, alloc_vcpus=3), record("b", vcpus=4, alloc_vcpus=2)])
        self.assertEqual(s.place(R(2, 10)).host_id, "b")
        self.assertUnplaceable(s, R(2, 10), "0/2 hosts fit: 2 insufficient vcpus")

    def test_pin(self):
        """A pinned machine goes to its host whatever the strategy says, or nowhere."""
        for strategy in (Spread(), Pack()):
            s = self.make(["a", "b", "c"], strategy)
            for _ in range(3):
                self.assertEqual(s.place(R(1, 100, pinned_host="b")).host_id, "b")
            s.set_state("b", "draining")
            self.assertUnplaceable(s, R(1, 100, pinned_host="b"),
                                   "0/3 hosts fit: 2 not the pinned host, 1 not ready")
        self.assertUnplaceable(
            s, R(1, 100, pinned_host="zz"),
            "0/3 hosts fit: 3 not the pinned host (the pinned host 'zz' is not registered)")
        self.assertUnplaceable(s, R(1, 100, pinned_host="a", region="us"),
                               "0/3 hosts fit: 2 not the pinned host, 1 wrong region")
        self.assertUnplaceable(s, R(100, 100, pinned_host="a"),
                               "0/3 hosts fit: 2 not the pinned host, 1 insufficient vcpus")

    def test_exclusion(self):
        """Excluded hosts are never chosen, and the explanation counts them first."""
        s = self.make(["a", "b", "c"])
        for _ in range(4):
            self.assertEqual(s.place(R(1, 100), exclude=["a", "c"]).host_id, "b")
        self.assertUnplaceable(s, R(1, 100, region="us"),
                               "0/3 hosts fit: 2 excluded, 1 wrong region", exclude=("a", "b"))
        self.assertEqual(s.place(R(1, 100), exclude={"b"}).host_id, "a")

    def test_explanation_counts_first_failing_filter(self):
        s = self.make([record("a", state="offline"), record("b", region="us"),
                       record("c", datacenter="dc9"), record("d", vcpus=1),
                       record("e", memory_mb=10), record("f", disk_mb=1),
                       record("g", labels={"x": "1"}), record("h", labels={"x": "2"}, vcpus=1)])
        e = self.assertUnplaceable(
            s, R(2, 100, disk_mb=5, region="eu", datacenter="dc1", constraints={"x": "2"}),
            "0/8 hosts fit: 1 not ready, 1 wrong region, 1 wrong datacenter, "
            "4 missing required labels, 1 insufficient vcpus", exclude=())
        self.assertEqual(e.kwargs["filtered"], {
            "not_ready": 1, "wrong_region": 1, "wrong_datacenter": 1,
            "missing_labels": 4, "insufficient_vcpus": 1})

    def test_no_hosts(self):
        s = self.make([])
        self.assertUnplaceable(s, R(1, 1), "0/0 hosts fit: no hosts are registered")

    def test_strategy_order_with_filters(self):
        """The strategy ranks only what passed: spread skips the full host, pack fills."""
        s = self.make(["a", "b", "c"], Pack())
        self.assertEqual([p.host_id for p in s.place_many(R(2, 100), 5)],
                         ["a", "a", "a", "a", "b"])
        self.assertEqual(s.place(R(1, 100), exclude=["b"]).host_id, "c")
        s = self.make(["a", "b", "c"], Spread())
        self.assertEqual([p.host_id for p in s.place_many(R(2, 100), 5)],
                         ["a", "b", "c", "a", "b"])


class IndexedFilterTests(FilterTests, SynchronousTestCase):
    exhaustive = False


class ExhaustiveFilterTests(FilterTests, SynchronousTestCase):
    exhaustive = True


class ReservationTests(SynchronousTestCase):
    def test_batch_accounts_for_itself(self):
        """Replicas of one batch see each other's reservations."""
        s = scheduler(Pack(), [record("a", vcpus=4), record("b", vcpus=4)])
        placed = s.place_many(R(2, 100), 4)
        self.assertEqual([p.host_id for p in placed], ["a", "a", "b", "b"])
        self.assertEqual(s.host("a").free_vcpus, 0)

    def test_batch_all_or_nothing(self):
        """A batch that does not fit reserves nothing and says how far it got."""
        s = scheduler(Spread(), [record("a", vcpus=4), record("b", vcpus=4)])
        e = self.assertRaises(Unplaceable, s.place_many, R(3, 100), 3)
        self.assertEqual(
            e.message, "only 2 of 3 replicas fit; then 0/2 hosts fit: 2 insufficient vcpus")
        self.assertEqual(e.kwargs["placed"], 2)
        self.assertEqual(e.kwargs["replicas"], 3)
        self.assertEqual(s.placements(), [])
        self.assertEqual([h.free_vcpus for h in s.hosts()], [4, 4])
        check_indexes(s)

    def test_concurrent_deploys_never_oversubscribe(self):
        """Two deploys interleaving their placements share the capacity exactly."""
        s = scheduler(Spread(), [record("a", vcpus=4, memory_mb=1000),
                                 record("b", vcpus=4, memory_mb=1000)])
        one, two = R(1, 300), R(2, 100)
        got = []
        for _ in range(3):
            for req in (one, two):
                try:
                    got.append(s.place(req))
                except Unplaceable:
                    pass
        for h in s.hosts():
            self.assertGreaterEqual(h.free_vcpus, 0)
            self.assertGreaterEqual(h.free_memory_mb, 0)
            self.assertEqual(h.used_vcpus, sum(p.vcpus for p in got if p.host_id == h.id))
        # a: 1+1+1 vCPUs and 900 MiB, full for both shapes; b: 2+2 vCPUs, full.
        self.assertEqual([(h.used_vcpus, h.used_memory_mb) for h in s.hosts()],
                         [(3, 900), (4, 200)])
        self.assertEqual(len(got), 5)

    def test_release_gives_back(self):
        s = scheduler(Spread(), [record("a", vcpus=2)])
        p = s.place(R(2, 100))
        self.assertRaises(Unplaceable, s.place, R(1, 100))
        self.assertTrue(s.release(p))
        self.assertFalse(s.release(p))
        self.assertEqual(s.host("a").free_vcpus, 2)
        self.assertEqual(s.host("a").machines, 0)
        self.assertEqual(s.place(R(1, 100)).host_id, "a")
        check_indexes(s)

    def test_commit(self):
        """A committed placement keeps its capacity until released."""
        s = scheduler(Spread(), [record("a", vcpus=2)])
        p = s.place(R(2, 100))
        self.assertFalse(s.is_committed(p))
        s.commit(p)
        self.assertTrue(s.is_committed(p))
        self.assertEqual(s.host("a").free_vcpus, 0)
        s.release(p)
        self.assertFalse(s.is_committed(p))
        self.assertRaises(NotFound, s.commit, p)

    def test_restore(self):
        """A machine found running is accounted for on its host, even a full one."""
        s = scheduler(Spread(), [record("a", vcpus=2, state="offline"), record("b", vcpus=2)])
        p = s.restore("a", R(2, 100))
        self.assertTrue(s.is_committed(p))
        s.set_state("a", "ready")
        self.assertEqual(s.place(R(1, 100)).host_id, "b")
        self.assertRaises(NotFound, s.restore, "zz", R(1, 1))

    def test_update_host_keeps_placements(self):
        """New capacity from a host record keeps what was placed there."""
        s = scheduler(Spread(), [record("a", vcpus=4, alloc_vcpus=1)])
        s.place(R(2, 100))
        s.update_host(record("a", vcpus=8, alloc_vcpus=2, labels={"ssd": "true"}))
        h = s.host("a")
        self.assertEqual((h.used_vcpus, h.free_vcpus, h.machines), (4, 4, 1))
        self.assertEqual(s.place(R(1, 1, constraints={"ssd": "true"})).host_id, "a")
        check_indexes(s)

    def test_update_host_unchanged(self):
        """Feeding the same record again (as a registry sync does) changes nothing."""
        s = scheduler(Pack(), [record("a", vcpus=4, alloc_vcpus=1), record("b", vcpus=4)])
        s.place(R(1, 1))
        s.place(R(1, 1, region="eu"))
        before = [(h.id, h.used_vcpus, h.machines, h._entry) for h in s.hosts()]
        for _ in range(3):
            s.update_host(record("a", vcpus=4, alloc_vcpus=1))
            s.update_host(record("b", vcpus=4))
        self.assertEqual([(h.id, h.used_vcpus, h.machines, h._entry) for h in s.hosts()], before)
        self.assertEqual(s.place(R(1, 1)).host_id, "a")
        check_indexes(s)

    def test_update_host_moves_scopes(self):
        s = scheduler(Spread(), [record("a", region="eu"), record("b", region="us")])
        self.assertEqual(s.place(R(1, 1, region="us")).host_id, "b")
        s.update_host(record("a", region="us"))
        s.set_state("b", "drained")
        self.assertEqual(s.place(R(1, 1, region="us")).host_id, "a")
        self.assertRaises(Unplaceable, s.place, R(1, 1, region="eu"))
        check_indexes(s)

    def test_host_without_region(self):
        """A host with no region or datacenter serves only unconstrained requests."""
        s = scheduler(Pack(), [record("a", region="", datacenter=None), record("b", vcpus=1)])
        self.assertEqual(s.place(R(1, 1, region="eu")).host_id, "b")
        self.assertEqual(s.place(R(1, 1)).host_id, "a")
        self.assertEqual(s.place(R(1, 1)).host_id, "a")
        check_indexes(s)
        e = self.assertRaises(Unplaceable, s.place, R(1, 1, region="eu"))
        self.assertEqual(e.message, "0/2 hosts fit: 1 wrong region, 1 insufficient vcpus")
        s.set_state("a", "drained")
        s.set_state("a", "ready")
        check_indexes(s)

    def test_remove_host(self):
        s = scheduler(Spread(), ["a", "b"])
        p = s.place(R(1, 1))
        s.remove_host("a")
        self.assertEqual(s.place(R(1, 1)).host_id, "b")
        self.assertFalse(s.release(p))
        self.assertRaises(NotFound, s.remove_host, "a")
        self.assertRaises(NotFound, s.set_state, "a", "ready")
        self.assertRaises(NotFound, s.host, "a")
        check_indexes(s)

    def test_deterministic_ties(self):
        """Equal keys break by host id, whatever order the hosts arrived in."""
        for order in (["c", "a", "b"], ["b", "c", "a"]):
            s = scheduler(Spread(), order)
            self.assertEqual([p.host_id for p in s.place_many(R(1, 1), 3)], ["a", "b", "c"])


class ValidationTests(SynchronousTestCase):
    def test_request(self):
        for kw in ({"vcpus": 0, "memory_mb": 1}, {"vcpus": 1, "memory_mb": 0},
                   {"vcpus": 1.5, "memory_mb": 1}, {"vcpus": True, "memory_mb": 1},
                   {"vcpus": 1, "memory_mb": 1, "disk_mb": -1},
                   {"vcpus": 1, "memory_mb": 1, "region": ""},
                   {"vcpus": 1, "memory_mb": 1, "pinned_host": 3},
                   {"vcpus": 1, "memory_mb": 1, "constraints": ["ssd"]},
                   {"vcpus": 1, "memory_mb": 1, "constraints": 7},
                   {"vcpus": 1, "memory_mb": 1, "preferences": {"a": 1}}):
            e = self.assertRaises(InvalidArgument, R, **kw)
            self.assertEqual(e.uri, "zwrm.error.invalid_argument")

    def test_host_record(self):
        s = Scheduler(Spread())
        e = self.assertRaises(InvalidArgument, s.update_host, {"id": "a"})
        self.assertEqual(e.message, "host record lacks 'region'")
        self.assertRaises(InvalidArgument, s.update_host, record("a", vcpus=-1))
        self.assertRaises(InvalidArgument, s.update_host, record("a", labels={"x": 1}))
        self.assertRaises(InvalidArgument, s.update_host, None)
        self.assertEqual(s.hosts(), [])

    def test_replicas(self):
        s = scheduler(Spread(), ["a"])
        self.assertRaises(InvalidArgument, s.place_many, R(1, 1), 0)

    def test_exclude(self):
        """A bare string is not taken for a list of one-letter host ids."""
        s = scheduler(Spread(), ["a"])
        e = self.assertRaises(InvalidArgument, s.place, R(1, 1), "a")
        self.assertEqual(e.message, "exclude must be a list of host ids")
        self.assertRaises(InvalidArgument, s.place_many, R(1, 1), 2, [1])
        self.assertEqual(s.placements(), [])
