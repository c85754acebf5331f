"""The health monitor keeps checking after a failure (issue 14), on a Clock."""

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from tests.control.helpers import FACTS, make_registry
from zwrm.control.monitor import HealthMonitor


async def two_hosts(testcase):
    """A registry (on a Clock) with hosts h1 and h2 joined and registered."""
    clock, store, reg, published = await make_registry(testcase)
    for hid in ("h1", "h2"):
        await reg.join(hid, dict(FACTS, name=hid))
        await reg.register(hid, {})
    clock.advance(0)
    return clock, reg


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
        clock, reg = await two_hosts(self)
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
            if clock.seconds() >= 10 and not failures:
                failures.append(True)
                raise RuntimeError("the registry is busy")
            return host_ids()

        reg.host_ids = flaky
        monitor.startService()
        self.addCleanup(monitor.stopService)
        await self._tick(clock, monitor, 10)  # listing the hosts fails (nothing armed)
        self.assertEqual((failures, reg.state("h1")), ([True], "ready"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        await self._tick(clock, monitor, 5)  # stale
        self.assertEqual(reg.state("h1"), "offline")
        self.assertTrue(monitor._loop.running)


class DeadlineTests(TestCase):
    """
    A host is offline C{offline_after} seconds after its last heartbeat, not up to a
    C{check_interval} later: the monitor arms one check for the first deadline to come
    when it comes before its next tick; while heartbeats come, it adds none.
    """

    def test_offline_at_its_deadline(self):
        return ensureDeferred(self._deadline())

    async def _deadline(self):
        clock, reg = await two_hosts(self)
        monitor = HealthMonitor(clock, reg, check_interval=15, offline_after=30, grace=0)
        checks = []
        monitor.after_check.append(lambda marked: checks.append((clock.seconds(), marked)))
        monitor.startService()
        self.addCleanup(monitor.stopService)
        for t in range(1, 47):
            clock.advance(1)
            reg.heartbeat("h2")
            if t <= 17:
                reg.heartbeat("h1")  # then silent: its deadline is 47
            await MonitorSurvivesFailuresTests._tick(self, clock, monitor, 0)
        self.assertEqual([t for t, _ in checks], [0, 15, 30, 45])  # the ticks only
        await MonitorSurvivesFailuresTests._tick(self, clock, monitor, 1)
        self.assertEqual((clock.seconds(), reg.state("h1")), (47, "ready"))
        self.assertAlmostEqual(monitor._due.getTime(), 47.01)  # armed at the tick of 45
        await MonitorSurvivesFailuresTests._tick(self, clock, monitor, 0.5)
        self.assertEqual((reg.state("h1"), reg.state("h2")), ("offline", "ready"))
        self.assertEqual([m for _, m in checks], [[], [], [], [], ["h1"]])  # (no tick yet)
        self.assertIsNone(monitor.next_deadline() and monitor._due)  # h2's is 75: a tick's
