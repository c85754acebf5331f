"""Heartbeat stats: kept in memory, bounded, shown in a host's status."""

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from tests.control.helpers import FACTS, make_registry
from zwrm.control.registry import MAX_STATS


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
