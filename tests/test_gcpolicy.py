"""
Tests for L{zwrm.gcpolicy}, against the real garbage collector (the policy's whole job
is what it does to the collector, so there is nothing to fake); time from a Clock.
"""

import gc
import weakref

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from zwrm.gcpolicy import CollectionPolicy, CollectionStats


class Node:
    """An object that can be part of a reference cycle."""

    def __init__(self):
        self.other = None


def cycle():
    """Two objects in a cycle; a weak reference to one of them."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a, weakref.ref(a)


class CollectionPolicyTests(SynchronousTestCase):
    def start(self, **kw):
        clock = Clock()
        policy = CollectionPolicy(clock, **kw)
        policy.startService()
        self.addCleanup(lambda: policy.running and policy.stopService())
        return clock, policy

    def test_start_freezes_and_stop_unfreezes(self):
        """
        Starting collects everything and freezes the survivors, and installs the timing
        callback; stopping unfreezes and removes it.
        """
        clock, policy = self.start()
        # (frozen objects freed since, e.g. by other threads, leave the count)
        self.assertGreater(gc.get_freeze_count(), 0.9 * policy.frozen)
        self.assertGreater(policy.frozen, 1000)
        self.assertEqual(policy.full_collections, 1)
        self.assertIn(policy.stats, gc.callbacks)
        policy.stopService()
        self.assertEqual(gc.get_freeze_count(), 0)
        self.assertNotIn(policy.stats, gc.callbacks)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_tick_collects_new_garbage_and_freezes_survivors(self):
        """
        A tick frees cycles made since the last one and freezes the objects that are
        still alive, so automatic collections no longer walk them.
        """
        clock, policy = self.start(interval=10)
        frozen = gc.get_freeze_count()
        garbage, ref = cycle()
        del garbage
        alive = [Node() for _ in range(1000)]
        clock.advance(10)
        self.assertIsNone(ref())
        self.assertEqual(policy.young_collections, 1)
        self.assertGreaterEqual(gc.get_freeze_count(), frozen + 900)  # other objects may die meanwhile
        young = {id(o) for g in range(3) for o in gc.get_objects(g)}
        self.assertFalse([o for o in alive if id(o) in young])

    def test_frozen_cycles_wait_for_a_full_collection(self):
        """
        A cycle that dies after it was frozen survives young ticks (they do not walk
        the frozen heap); once the frozen heap has grown by C{growth}, the next tick
        is a full collection, which frees it.
        """
        clock, policy = self.start(interval=10, growth=0.5, minimum=0)
        garbage, ref = cycle()
        clock.advance(10)  # now frozen
        del garbage
        clock.advance(10)
        self.assertIsNotNone(ref())
        self.assertEqual(policy.full_collections, 1)
        grow = [Node() for _ in range(policy.frozen_after_full)]
        clock.advance(10)  # freezes the growth; the frozen heap is now 1.5x or more
        if policy.full_collections == 1:
            self.assertTrue(policy.full_due())
            clock.advance(10)
        # (or that tick collected fully already: CPython's own full collections while the
        # growth was made froze part of it at once, and the policy counts what they freeze)
        self.assertEqual(policy.full_collections, 2)
        self.assertIsNone(ref())
        self.assertGreater(policy.last_full_seconds, 0)
        del grow

    def test_full_due(self):
        """
        A full collection is due when the frozen heap grew by more than C{growth} and by
        at least C{minimum} objects since the last full collection.
        """
        policy = CollectionPolicy(Clock(), growth=0.25, minimum=100)
        policy.frozen_after_full = 1000
        for frozen, due in [(1000, False), (1250, False), (1251, True), (900, False)]:
            policy.frozen = frozen
            self.assertEqual(bool(policy.full_due()), due, frozen)
        self.assertEqual(policy.full_due(), None)
        policy.frozen = 1251
        self.assertEqual(policy.full_due(), "frozen heap grew from 1000 to 1251 objects")
        policy.frozen_after_full, policy.frozen = 10, 90
        self.assertIsNone(policy.full_due())  # 8x, but fewer than the minimum

    def test_barren_growth_collections_back_off(self):
        """
        A full collection for growth that frees less than C{barren} of the heap doubles
        the growth the next one waits for, up to C{max_growth}; one that frees more sets
        it back. (A heap growing from nothing to 20,000 agent sessions had a full
        collection at every doubling, up to a second each, finding next to nothing.)
        """
        clock, policy = self.start(growth=0.5, max_growth=2, minimum=0, probe_interval=0)
        self.assertEqual(policy.growth_now, 0.5)
        policy.full("grew", growth=True)
        self.assertEqual(policy.growth_now, 1.0)
        self.assertIn("zwrm_gc_growth 1\n", "\n".join(policy.metrics()) + "\n")
        policy.full("grew", growth=True)
        policy.full("grew", growth=True)
        self.assertEqual(policy.growth_now, 2)  # no further than max_growth
        policy.full("closed", growth=False)  # churn's collections leave it alone
        self.assertEqual(policy.growth_now, 2)
        # due only after the doubled growth
        policy.frozen = policy.frozen_after_full * 2.5
        self.assertIsNone(policy.full_due())
        policy.frozen = policy.frozen_after_full * 3 + 1
        self.assertTrue(policy.full_due())
        # garbage that died frozen, more than 1% of the heap: found, and back to growth
        gc.disable()
        try:
            garbage = [cycle()[0] for _ in range(policy.frozen_after_full // 50 + 1)]
            gc.freeze()
            del garbage
        finally:
            gc.enable()
        policy.full("grew", growth=True)
        self.assertEqual(policy.growth_now, 0.5)

    def test_a_growth_tick_backs_off(self):
        """A tick that collects fully because the heap grew counts as a growth collection."""
        clock, policy = self.start(interval=10, growth=0.5, minimum=0, probe_interval=0)
        grow = [Node() for _ in range(policy.frozen_after_full)]
        clock.advance(10)  # freezes the growth
        clock.advance(10)
        self.assertEqual(policy.full_collections, 2)
        self.assertEqual(policy.growth_now, 1.0)
        del grow

    def test_churn(self):
        """
        With sessions watched, a full collection is due once C{churn} of the open
        sessions (and at least C{min_closed}) have closed since the last one; the full
        collection starts the count again.
        """
        clock, policy = self.start(churn=0.25, min_closed=100, growth=1000)
        counts = {"closed": 7, "open": 1000}
        policy.watch_sessions(lambda: counts["closed"], lambda: counts["open"])
        counts["closed"] += 250
        self.assertIsNone(policy.full_due())
        counts["closed"] += 1
        self.assertEqual(policy.full_due(), "251 sessions closed")
        clock.advance(policy.interval)
        self.assertEqual((policy.full_collections, policy.last_full_reason),
                         (2, "251 sessions closed"))
        self.assertIsNone(policy.full_due())
        counts["open"] = 10  # few sessions: min_closed holds
        counts["closed"] += 99
        self.assertIsNone(policy.full_due())
        counts["closed"] += 1
        self.assertEqual(policy.full_due(), "100 sessions closed")

    def test_churn_off(self):
        """C{churn=0}: no full collection for closed sessions, however many."""
        clock, policy = self.start(churn=0, min_closed=1, growth=1000)
        counts = {"closed": 0, "open": 10}
        policy.watch_sessions(lambda: counts["closed"], lambda: counts["open"])
        counts["closed"] += 10_000
        self.assertIsNone(policy.full_due())
        clock.advance(policy.interval)
        self.assertEqual(policy.full_collections, 1)  # the one at start

    def test_bad_settings(self):
        self.assertRaises(ValueError, CollectionPolicy, Clock(), interval=0)
        self.assertRaises(ValueError, CollectionPolicy, Clock(), growth=0)
        self.assertRaises(ValueError, CollectionPolicy, Clock(), churn=-1)

    def test_metrics(self):
        """The figures are Prometheus lines, one per generation where it applies."""
        clock, policy = self.start()
        gc.collect(0)
        text = "\n".join(policy.metrics())
        for name in ("zwrm_gc_collections_total", "zwrm_gc_pause_seconds_total",
                     "zwrm_gc_pause_max_seconds", "zwrm_gc_collected_total"):
            for g in range(3):
                self.assertIn(f'{name}{{generation="{g}"}} ', text)
        self.assertIn(f"zwrm_gc_frozen_objects {policy.frozen}\n", text)
        self.assertIn("zwrm_gc_full_collections_total 1\n", text)
        self.assertGreaterEqual(policy.stats.collections[0], 1)


class CollectionStatsTests(SynchronousTestCase):
    def test_times_each_collection(self):
        now = [0.0]
        stats = CollectionStats(timer=lambda: now[0])
        for gen, took, freed in [(0, 0.001, 3), (2, 0.5, 10), (2, 0.2, 0)]:
            stats("start", {"generation": gen})
            now[0] += took
            stats("stop", {"generation": gen, "collected": freed, "uncollectable": 0})
        self.assertEqual(stats.collections, [1, 0, 2])
        self.assertAlmostEqual(stats.pause_seconds[2], 0.7)
        self.assertAlmostEqual(stats.max_pause_seconds[2], 0.5)
        self.assertEqual(stats.collected, [3, 0, 10])

    def test_stop_without_start_is_ignored(self):
        """A callback installed mid-collection sees a stop first; it is not counted."""
        stats = CollectionStats(timer=lambda: 1.0)
        stats("stop", {"generation": 1, "collected": 5, "uncollectable": 0})
        self.assertEqual(stats.collections, [0, 0, 0])


class PauseProbeTests(SynchronousTestCase):
    def test_longest_reactor_pause(self):
        """
        The probe's timer notes how late it fires: a reactor held up for 0.75 s (the clock
        jumps) is a pause of 0.65 s at a 0.1 s probe; on-time ticks are none.
        """
        clock = Clock()
        policy = CollectionPolicy(clock, probe_interval=0.1)
        policy.startService()
        self.addCleanup(lambda: policy.running and policy.stopService())
        for _ in range(10):
            clock.advance(0.1)
        self.assertAlmostEqual(policy.max_pause_seconds, 0.0)
        clock.advance(0.75)
        self.assertAlmostEqual(policy.max_pause_seconds, 0.65)
        clock.advance(0.1)
        clock.advance(0.3)
        self.assertAlmostEqual(policy.max_pause_seconds, 0.65)  # the longest since the start
        self.assertIn("zwrm_reactor_pause_max_seconds 0.650000\n", "\n".join(policy.metrics()) + "\n")
        policy.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_survivors_of_a_full_collection_are_frozen_at_once(self):
        """
        What survives a full collection between ticks (CPython's automatic one, here
        started by hand) is frozen right away, so the next one does not walk it again;
        a young collection freezes nothing.
        """
        clock = Clock()
        policy = CollectionPolicy(clock, probe_interval=0)
        policy.startService()
        self.addCleanup(lambda: policy.running and policy.stopService())
        before = gc.get_freeze_count()
        survivors = [Node() for _ in range(5000)]
        gc.collect(0)
        self.assertEqual(policy.frozen_by_collector, 0)
        self.assertLess(gc.get_freeze_count(), before + len(survivors))
        gc.collect()
        self.assertEqual(policy.frozen_by_collector, 1)
        self.assertGreaterEqual(gc.get_freeze_count(), before + len(survivors))
        policy.stopService()
        gc.collect()
        self.assertEqual(policy.frozen_by_collector, 1)  # stopped: its hook is gone
        self.assertEqual(gc.get_freeze_count(), 0)
        del survivors


class _CountingGC:
    """The real C{gc} module, counting the calls to C{get_freeze_count}."""

    def __init__(self):
        self.freeze_counts = 0

    def __getattr__(self, name):
        return getattr(gc, name)

    def get_freeze_count(self):
        self.freeze_counts += 1
        return gc.get_freeze_count()


class FrozenCountTests(SynchronousTestCase):
    def start(self, **kw):
        clock, counting = Clock(), _CountingGC()
        policy = CollectionPolicy(clock, gc=counting, probe_interval=0, **kw)
        policy.startService()
        self.addCleanup(lambda: policy.running and policy.stopService())
        return clock, policy, counting

    def test_ticks_count_what_they_freeze_without_walking_the_frozen_heap(self):
        """
        A young tick counts what it freezes into C{frozen}; it never asks for the frozen
        heap's size (C{gc.get_freeze_count()} walks all of it: up to a second at 10,000
        sessions).
        """
        clock, policy, counting = self.start(interval=10)
        self.assertEqual(counting.freeze_counts, 1)  # the full collection at start
        kept = []
        for _ in range(5):
            before = policy.frozen
            kept.append([Node() for _ in range(1000)])
            clock.advance(10)
            self.assertGreaterEqual(policy.frozen, before + 1000)
        self.assertEqual(policy.young_collections, 5)
        self.assertEqual(counting.freeze_counts, 1)
        self.assertGreaterEqual(policy.frozen, gc.get_freeze_count())
        self.assertGreaterEqual(gc.get_freeze_count(), policy.frozen_after_full + 5000 - 1000)

    def test_growth_is_confirmed_by_an_exact_count(self):
        """
        Objects frozen and then freed by reference counting still count until a tick
        finds the frozen heap grown enough for a full collection; that tick counts
        exactly first, and does no full collection when they were freed.
        """
        clock, policy, counting = self.start(interval=10, growth=0.5, minimum=0)
        gc.disable()  # no automatic collection freezes part of them before the tick
        try:
            short_lived = [Node() for _ in range(policy.frozen_after_full)]
        finally:
            gc.enable()
        clock.advance(10)  # frozen
        del short_lived  # freed by reference counting, still counted
        self.assertTrue(policy.full_due())
        clock.advance(10)
        self.assertEqual(counting.freeze_counts, 2)  # the start's, and this tick's exact count
        self.assertEqual(policy.full_collections, 1)  # none due after all
        self.assertIsNone(policy.full_due())
        clock.advance(10)
        self.assertEqual((counting.freeze_counts, policy.full_collections), (2, 1))
