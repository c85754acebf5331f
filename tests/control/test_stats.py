"""Heartbeat stats: kept in memory, bounded, shown in a host's status."""

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from tests.control.helpers import FACTS, make_registry
from zwrm.control.registry import MAX_STATS
from zwrm.control.resources.hosts import DISK_FULL_MB
from zwrm.testing.processes import poll


class HeartbeatStatsTests(TestCase):
    def test_stats_reach_status_bounded(self):
        async def scenario():
            clock, store, reg, _ = await make_registry(self)
            await reg.join("h-one", FACTS)
            cache = {"size": 10, "limit": 100, "hits": 3, "misses": 2, "nested": {"x": 1}}
            junk = {f"k{i}": i for i in range(MAX_STATS * 2)}
            reg.heartbeat("h-one", dict({"image_cache": cache}, **junk))
            status = await reg.status("h-one")
            self.assertEqual(status["stats"]["image_cache"],
                             {"size": 10, "limit": 100, "hits": 3, "misses": 2})
            self.assertLessEqual(len(status["stats"]), MAX_STATS)
            # a heartbeat without stats keeps the last ones; bad stats are ignored
            reg.heartbeat("h-one")
            reg.heartbeat("h-one", "not a mapping")
            self.assertEqual((await reg.status("h-one"))["stats"]["image_cache"]["hits"], 3)

        return ensureDeferred(scenario())

    def test_a_nearly_full_data_disk_takes_the_host_out_of_placement(self):
        """
        A heartbeat whose C{disk_free_mb} is under L{DISK_FULL_MB} makes the host
        C{disk_full} for the scheduler (its public state stays C{ready}), stored and
        announced as one C{disk} event; room again flips it back, once.
        """
        async def scenario():
            clock, store, reg, published = await make_registry(self)
            await reg.join("h-one", FACTS)
            await reg.register("h-one", FACTS)
            entry = reg.entry("h-one")
            self.assertEqual(entry.schedulable_state, "ready")

            def disk_events():
                return [e for _, e in published if e["kind"] == "disk"]

            for _ in range(3):  # one flip, however many heartbeats say it
                reg.heartbeat("h-one", {"disk_free_mb": DISK_FULL_MB - 1})
            clock.advance(0)
            await poll(reactor, disk_events, 10, what="the disk event")
            self.assertEqual(entry.schedulable_state, "disk_full")
            self.assertEqual(reg.state("h-one"), "ready")
            [event] = disk_events()
            self.assertEqual(event["payload"]["reason"],
                             f"its data disk is nearly full ({DISK_FULL_MB - 1} MiB free, under"
                             f" {DISK_FULL_MB}): no new placements")
            stored = await store.recent_events("h-one")
            self.assertEqual(stored[0]["kind"], "disk")  # stored, then announced

            reg.heartbeat("h-one", {"disk_free_mb": DISK_FULL_MB})
            reg.heartbeat("h-one", {"disk_free_mb": "lots"})  # not a number: ignored
            clock.advance(0)
            await poll(reactor, lambda: len(disk_events()) == 2, 10, what="room again")
            self.assertEqual(entry.schedulable_state, "ready")
            self.assertEqual(disk_events()[1]["payload"]["reason"],
                             f"its data disk has room again ({DISK_FULL_MB} MiB free)")

        return ensureDeferred(scenario())

    def test_the_floor_is_a_setting(self):
        """C{min_free_disk_mb}: the operator's floor; 0 never holds a host back."""
        async def scenario():
            clock, store, reg, published = await make_registry(self, min_free_disk_mb=1024)
            await reg.join("h-one", FACTS)
            await reg.register("h-one", FACTS)
            reg.heartbeat("h-one", {"disk_free_mb": 1000})
            clock.advance(0)
            await poll(reactor, lambda: [e for _, e in published if e["kind"] == "disk"], 10,
                       what="the disk event")
            self.assertEqual(reg.entry("h-one").schedulable_state, "disk_full")
            self.assertIn("(1000 MiB free, under 1024)", [
                e for _, e in published if e["kind"] == "disk"][0]["payload"]["reason"])

            clock, store, reg, published = await make_registry(self, min_free_disk_mb=0)
            await reg.join("h-one", FACTS)
            await reg.register("h-one", FACTS)
            reg.heartbeat("h-one", {"disk_free_mb": 0})
            clock.advance(0)
            await reg.flush_heartbeats()  # (a store round trip: a flip would have been stored)
            self.assertEqual([e for _, e in published if e["kind"] == "disk"], [])
            self.assertEqual(reg.entry("h-one").schedulable_state, "ready")

        return ensureDeferred(scenario())
