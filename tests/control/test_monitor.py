"""The health monitor keeps checking after a failure (issue 14), on a Clock."""

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from tests.control.helpers import FACTS, make_registry
from zwrm.control.monitor import HealthMonitor


class MonitorSurvivesFailuresTests(TestCase):
    def test_one_failing_mark_offline_does_not_stop_the_monitor(self):
        return ensureDeferred(self._failing_mark())

    async def _tick(self, clock, monitor, seconds):
        """Advance the Clock by C{seconds}; wait for the check the timer started, if any."""
        clock.advance(seconds)
        running = monitor._checking
        if running is not None:
            done = Deferred()
            running.addBoth(lambda r: (done.callback(None), r)[1])
            await done

    async def _failing_mark(self):
        clock, store, reg, published = await make_registry(self)
        for hid in ("h1", "h2"):
            await reg.join(hid, dict(FACTS, name=hid))
            await reg.register(hid, {})
        clock.advance(0)
        monitor = HealthMonitor(clock, reg, check_interval=5, offline_after=10, grace=0)
        mark = reg.mark_offline
        failures = []

        async def flaky(host_id):
            if host_id == "h1" and not failures:
                failures.append(host_id)
                raise RuntimeError("the store is busy")
            return await mark(host_id)

        reg.mark_offline = flaky
        monitor.startService()
        self.addCleanup(monitor.stopService)
        await self._tick(clock, monitor, 10)  # not stale yet
        await self._tick(clock, monitor, 5)  # both stale: h1's mark fails, h2's works
        self.assertEqual(failures, ["h1"])
        self.assertEqual((reg.state("h1"), reg.state("h2")), ("ready", "offline"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        # the timer still runs: its next tick marks h1
        await self._tick(clock, monitor, 5)
        self.assertEqual(reg.state("h1"), "offline")
        self.assertTrue(monitor._loop.running)

    def test_a_failing_check_does_not_stop_the_monitor(self):
        return ensureDeferred(self._failing_check())

    async def _failing_check(self):
        clock, store, reg, published = await make_registry(self)
        await reg.join("h1", dict(FACTS, name="h1"))
        await reg.register("h1", {})
        clock.advance(0)
        monitor = HealthMonitor(clock, reg, check_interval=5, offline_after=10, grace=0)
        host_ids = reg.host_ids
        failures = []

        def flaky():
            if clock.seconds() >= 15 and not failures:
                failures.append(True)
                raise RuntimeError("the registry is busy")
            return host_ids()

        reg.host_ids = flaky
        monitor.startService()
        self.addCleanup(monitor.stopService)
        await self._tick(clock, monitor, 10)
        await self._tick(clock, monitor, 5)  # stale; listing the hosts fails
        self.assertEqual((failures, reg.state("h1")), ([True], "ready"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        await self._tick(clock, monitor, 5)
        self.assertEqual(reg.state("h1"), "offline")
        self.assertTrue(monitor._loop.running)
