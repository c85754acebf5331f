"""
Property tests of placement (hypothesis).

 - The indexed search chooses exactly what an exhaustive scan of every host chooses,
   and fails with the same explanation, for both built-in strategies, under random
   hosts, requests, exclusions, pins, releases and host state changes.
 - No placement exceeds a host's capacity or ignores a constraint, an exclusion or a pin.
 - C{spread} keeps the per-host count within one of even across eligible equal hosts.
 - C{pack} never opens a new host while an open one fits.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from zwrm.errors import Unplaceable
from zwrm.scheduler import PlacementRequest, Scheduler
from zwrm.scheduler.strategies.pack import Pack
from zwrm.scheduler.strategies.spread import Spread

from .helpers import check_indexes, record

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

REGIONS = ["eu", "us"]
DCS = ["dc1", "dc2"]
STATES = ["ready", "ready", "ready", "draining", "offline"]

hosts_st = st.lists(
    st.fixed_dictionaries({
        "region": st.sampled_from(REGIONS + [""]),
        "datacenter": st.sampled_from(DCS + [None]),
        "state": st.sampled_from(STATES),
        "vcpus": st.integers(0, 8),
        "memory_mb": st.integers(0, 4) .map(lambda n: n * 1024),
        "disk_mb": st.sampled_from([0, 100, 1000]),
        "alloc_vcpus": st.integers(0, 2),
        "labels": st.sampled_from([{}, {"ssd": "true"}, {"ssd": "false"}, {"gpu": "yes"}]),
    }),
    min_size=0, max_size=12,
).map(lambda hs: [dict(h, id=f"h{i:02}", alloc_vcpus=min(h["alloc_vcpus"], h["vcpus"]))
                  for i, h in enumerate(hs)])

request_st = st.builds(
    PlacementRequest,
    vcpus=st.integers(1, 4),
    memory_mb=st.sampled_from([1, 256, 512, 1024, 3000]),
    disk_mb=st.sampled_from([0, 0, 50, 400]),
    region=st.sampled_from([None, None, "eu", "us"]),
    datacenter=st.sampled_from([None, None, "dc1", "dc2"]),
    pinned_host=st.sampled_from([None] * 6 + ["h00", "h03", "h99"]),
    constraints=st.sampled_from([{}, {}, {}, {"ssd": "true"}]),
)

exclude_st = st.sampled_from([(), (), (), ("h00",), ("h01", "h02"), ("h00", "h05", "h07")])

op_st = st.one_of(
    st.tuples(st.just("place"), request_st, exclude_st),
    st.tuples(st.just("release"), st.integers(0, 1000)),
    st.tuples(st.just("state"), st.integers(0, 11), st.sampled_from(STATES)),
    st.tuples(st.just("grow"), st.integers(0, 11), st.integers(0, 4)),
    st.tuples(st.just("remove"), st.integers(0, 11)),
)


def assert_respects(test, s, placement, request, exclude):
    host = s.host(placement.host_id)
    test.assertNotIn(host.id, exclude)
    test.assertEqual(host.state, "ready")
    if request.pinned_host is not None:
        test.assertEqual(host.id, request.pinned_host)
    if request.region is not None:
        test.assertEqual(host.region, request.region)
    if request.datacenter is not None:
        test.assertEqual(host.datacenter, request.datacenter)
    for k, v in request.constraints.items():
        test.assertEqual(host.labels.get(k), v)


def assert_within_capacity(test, s):
    for h in s.hosts():
        test.assertLessEqual(h.used_vcpus, h.vcpus)
        test.assertLessEqual(h.used_memory_mb, h.memory_mb)
        test.assertLessEqual(h.used_disk_mb, h.disk_mb)


class ExactnessTests(SynchronousTestCase):
    def run_ops(self, strategy, hosts, ops):
        hosts = [dict(h) for h in hosts]  # "grow" changes them; the inputs stay as drawn
        fast = Scheduler(strategy)
        slow = Scheduler(strategy, exhaustive=True)
        for h in hosts:
            fast.update_host(h)
            slow.update_host(h)
        for op in ops:
            if op[0] == "place":
                _, request, exclude = op
                outcomes = []
                for s in (fast, slow):
                    try:
                        outcomes.append(s.place(request, exclude))
                    except Unplaceable as e:
                        outcomes.append((e.message, e.kwargs))
                self.assertEqual(outcomes[0], outcomes[1])
                if not isinstance(outcomes[0], tuple):
                    assert_respects(self, fast, outcomes[0], request, exclude)
            elif op[0] == "release":
                for s in (fast, slow):
                    placed = s.placements()
                    if placed:
                        s.release(placed[op[1] % len(placed)])
            elif hosts and op[0] == "state":
                h = hosts[op[1] % len(hosts)]
                for s in (fast, slow):
                    if h["id"] in {x.id for x in s.hosts()}:
                        s.set_state(h["id"], op[2])
            elif hosts and op[0] == "remove":
                h = hosts[op[1] % len(hosts)]
                for s in (fast, slow):
                    if h["id"] in {x.id for x in s.hosts()}:
                        s.remove_host(h["id"])
            elif hosts and op[0] == "grow":
                # a host's capacity only grows: from what the scheduler has now (an earlier
                # grow included), never back to the drawn record's, below what is placed
                i = op[1] % len(hosts)
                h = hosts[i]
                known = {x.id: x.vcpus for x in fast.hosts()}
                h["vcpus"] = known.get(h["id"], h["vcpus"]) + op[2]
                for s in (fast, slow):
                    s.update_host(h)
            assert_within_capacity(self, fast)
            check_indexes(fast)
        self.assertEqual([(h.id, h.used_vcpus, h.used_memory_mb, h.used_disk_mb, h.machines)
                          for h in fast.hosts()],
                         [(h.id, h.used_vcpus, h.used_memory_mb, h.used_disk_mb, h.machines)
                          for h in slow.hosts()])

    def test_grow_never_shrinks(self):
        """
        A "grow" after an earlier grow whose vCPUs were placed keeps them (the strategy used
        to set the drawn capacity again, below what was placed: a false failure 1 run in 30).
        """
        hosts = [dict(id="h00", region="eu", datacenter="dc1", state="ready", vcpus=1,
                      memory_mb=4096, disk_mb=1000, alloc_vcpus=0, labels={})]
        request = PlacementRequest(vcpus=4, memory_mb=1)
        self.run_ops(Spread(), hosts, [("grow", 0, 4), ("place", request, ()), ("grow", 0, 0)])

    @SETTINGS
    @given(hosts_st, st.lists(op_st, max_size=40))
    def test_spread_exact(self, hosts, ops):
        """Indexed spread == exhaustive spread; every placement obeys the filters."""
        self.run_ops(Spread(), hosts, ops)

    @SETTINGS
    @given(hosts_st, st.lists(op_st, max_size=40))
    def test_pack_exact(self, hosts, ops):
        """Indexed pack == exhaustive pack; every placement obeys the filters."""
        self.run_ops(Pack(), hosts, ops)

    def test_small_blocks(self):
        """The same with index blocks of 2, so that searches cross many blocks."""
        from zwrm.scheduler import _Index

        self.patch(_Index, "LOAD", 2)
        self.patch(_Index, "GROUP", 2)

        @settings(max_examples=100, deadline=None)
        @given(hosts_st, st.lists(op_st, max_size=40), st.sampled_from([Spread(), Pack()]))
        def check(hosts, ops, strategy):
            self.run_ops(strategy, hosts, ops)

        check()


class SpreadTests(SynchronousTestCase):
    @SETTINGS
    @given(
        eligible=st.integers(1, 12),
        others=st.lists(st.sampled_from(["us", "draining", "excluded"]), max_size=6),
        shape=st.tuples(st.integers(1, 4), st.integers(1, 2048)),
        count=st.integers(0, 80),
        host_order=st.randoms(use_true_random=False),
    )
    def test_even(self, eligible, others, shape, count, host_order):
        """Per-host counts across eligible equal hosts stay within one of even."""
        recs = [record(f"e{i:02}", vcpus=16, memory_mb=16384) for i in range(eligible)]
        recs += [record(f"o{i:02}", vcpus=16, memory_mb=16384,
                        region="us" if kind == "us" else "eu",
                        state="draining" if kind == "draining" else "ready",
                        labels={"kind": kind})
                 for i, kind in enumerate(others)]
        host_order.shuffle(recs)
        s = Scheduler(Spread())
        for r in recs:
            s.update_host(r)
        excluded = [r["id"] for r in recs if r["labels"].get("kind") == "excluded"]
        request = PlacementRequest(*shape, region="eu")
        for _ in range(count):
            try:
                p = s.place(request, exclude=excluded)
            except Unplaceable:
                # Only when every eligible host is full.
                for h in s.hosts():
                    if h.id.startswith("e"):
                        self.assertTrue(h.free_vcpus < shape[0] or h.free_memory_mb < shape[1])
                break
            self.assertTrue(p.host_id.startswith("e"))
            counts = [h.machines for h in s.hosts() if h.id.startswith("e")]
            self.assertLessEqual(max(counts) - min(counts), 1)
        for h in s.hosts():
            if not h.id.startswith("e"):
                self.assertEqual(h.machines, 0)


class PackTests(SynchronousTestCase):
    @SETTINGS
    @given(
        hosts=st.lists(st.tuples(st.integers(1, 16), st.integers(1, 16)), min_size=1, max_size=10),
        requests=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), max_size=40),
        releases=st.lists(st.integers(0, 100), max_size=40),
    )
    def test_never_opens_while_open_fits(self, hosts, requests, releases):
        """A machine goes to an empty host only if no host in use fits it."""
        s = Scheduler(Pack())
        for i, (v, m) in enumerate(hosts):
            s.update_host(record(f"h{i:02}", vcpus=v, memory_mb=m * 512))
        for n, (v, m) in enumerate(requests):
            request = PlacementRequest(v, m * 512)
            open_fit = [h.id for h in s.hosts()
                        if h.machines and h.free_vcpus >= v and h.free_memory_mb >= m * 512]
            try:
                p = s.place(request)
            except Unplaceable:
                self.assertEqual(open_fit, [])
                continue
            if open_fit:
                self.assertIn(p.host_id, open_fit)
            assert_within_capacity(self, s)
            if n < len(releases) and releases[n] % 3 == 0:
                placed = s.placements()
                s.release(placed[releases[n] % len(placed)])

    def test_fills_before_opening(self):
        """Equal hosts: pack fills the first host completely before using the second."""
        s = Scheduler(Pack())
        for i in range(3):
            s.update_host(record(f"h{i}", vcpus=4, memory_mb=4096))
        got = [p.host_id for p in s.place_many(PlacementRequest(1, 1024), 9)]
        self.assertEqual(got, ["h0"] * 4 + ["h1"] * 4 + ["h2"])
