"""
The drain runner over the resource layer: it waits for a replacement's health on the
machines resource's events (the target agent's C{machine.status} still decides), not by
polling the store; every change it makes is stored, then announced once.
"""

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.control.test_apps import d
from tests.control.test_drain import DrainCluster
from zwrm.control.drain import DRAIN_TOPIC


async def real_until(c, predicate, what, seconds=30.0):
    """A bounded poll in real time (the control plane's Clock does not move meanwhile)."""
    deadline = reactor.seconds() + seconds
    while not await predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"never: {what}")
        await deferLater(reactor, 0.01, lambda: None)


class HealthWaitTests(TestCase):
    timeout = 120

    async def deploy(self, c):
        await c.apps.create_app("web")
        spec = c.spec(service_port=8080, health={"type": "tcp", "interval": 0.1, "grace": 0})
        return (await c.apps.deploy("web", spec))["machines"][0]

    def count(self, c):
        """Count the store reads and the target agents' C{machine.status} calls."""
        reads, statuses = [], []
        get, call = c.store.get, c.registry.call_executor

        def counting_get(table, pk):
            reads.append((table, pk))
            return get(table, pk)

        def counting_call(host_id, verb, *args, **kwargs):
            if verb == "machine.status":
                statuses.append((host_id, args[0]))
            return call(host_id, verb, *args, **kwargs)

        c.store.get = counting_get
        c.registry.call_executor = counting_call
        return reads, statuses

    @d
    async def test_the_wait_follows_the_replacements_events(self):
        """
        The replacement passes, fails (its agent reports it), passes again: the move commits
        C{min_healthy} after it passed again, by the Clock.  Meanwhile the store is not
        polled (one read of the replacement) and its agent is asked only on its reports and
        once C{min_healthy} has passed, not every C{poll}.
        """
        c = await DrainCluster(self).start()
        m = await self.deploy(c)
        src = m["host_id"]
        dst = "h-b" if src == "h-a" else "h-a"
        reads, statuses = self.count(c)
        await c.drains.drain(src, min_healthy=40, healthy_deadline=300, poll=1,
                             stop_timeout=5)
        run = c.drains.active[src]
        mig = next(iter(run.migrations.values()))

        async def stored_health(status):
            """Whether the replacement's last announced state is running with C{status}."""
            new = mig.detail.get("replacement")
            last = [e["payload"] for t, e in c.published if t == "zwrm.event.machine"
                    and e["subject"] == new and e["kind"] == "state"]
            return (mig.machine.phase == "waiting_healthy" and bool(last)
                    and (last[-1]["state"], last[-1]["health"]) == ("running", status))

        for _ in range(3000):
            if await stored_health("passing"):
                break
            await c.step(most=1)
        else:
            raise AssertionError("the replacement never passed")
        new = mig.detail["replacement"]
        c.clock.advance(20)  # healthy, not yet long enough
        c.probes[dst] = "connection refused"
        await real_until(c, lambda: stored_health("failing"), "its agent reports it failing")
        c.clock.advance(30)  # failing: not toward min_healthy
        del c.probes[dst]
        await real_until(c, lambda: stored_health("passing"), "passing again")
        passed_again = c.clock.seconds()
        await c.settle(run.done)
        status = await c.drains.drain_status(src)
        self.assertEqual(status["state"], "completed", status["migrations"][0]["error"])
        committing = [e["ts"] for t, e in c.published if t == DRAIN_TOPIC
                      and e["payload"].get("phase") == "committing"]
        self.assertEqual(len(committing), 1)
        self.assertGreaterEqual(committing[0] - passed_again, 40)
        self.assertLessEqual(committing[0] - passed_again, 41)
        # No polling: over 90 s of the Clock (poll 1 s; a poll would make 90 of each) the
        # replacement's row is read once per report of its agent (by the apps layer, which
        # applies it) and its agent asked on those reports and once min_healthy passed.
        self.assertLessEqual(len([r for r in reads if r == ("machines", new)]), 20, reads)
        self.assertLessEqual(len([s for s in statuses if s == (dst, new)]), 20, statuses)


class ResumeTests(TestCase):
    timeout = 120

    @d
    async def test_a_resumed_drain_waits_for_its_hosts_events(self):
        """
        After a restart, a drain whose target has not reconnected yet runs no step; it goes
        on as soon as the target registers (its event), not after a fixed wait.
        """
        from zwrm.control.drain import Drains

        c = await DrainCluster(self).start()
        await c.apps.create_app("db")
        spec = c.spec()
        spec["volumes"] = [{"name": "data", "size_mb": 32, "mount": "/data"}]
        m = (await c.apps.deploy("db", spec))["machines"][0]
        src = m["host_id"]
        dst = "h-b" if src == "h-a" else "h-a"
        await c.drains.drain(src, min_healthy=5, healthy_deadline=120, stop_timeout=5)
        mig = next(iter(c.drains.active[src].migrations.values()))
        for _ in range(3000):
            if mig.machine.phase == "waiting_healthy":
                break
            await c.step()
        c.drains.stop()
        await c.registry.mark_offline(dst)  # not reconnected yet after the "restart"
        c.drains = Drains(c.clock, c.store, c.registry, c.apps, c.publish)
        self.assertEqual(await c.drains.resume(), 1)
        seen = len(c.published)
        for _ in range(30):
            await c.step(most=1)
        self.assertEqual([e for t, e in c.published[seen:] if t == DRAIN_TOPIC], [])
        back_at = c.clock.seconds()
        await c.registry.register(dst, dict(_facts(), name=dst))
        for _ in range(3000):
            if any(t == DRAIN_TOPIC and e["kind"] == "migration"
                   for t, e in c.published[seen:]):
                break
            await c.step()
        resumed = [e for t, e in c.published[seen:] if t == DRAIN_TOPIC
                   and e["kind"] == "migration"]
        self.assertEqual(resumed[0]["payload"]["reason"],
                         "resumed after a control-plane restart")
        self.assertEqual(resumed[0]["ts"], back_at)  # at its event, by the Clock
        await c.settle(c.drains.active[src].done)
        self.assertEqual((await c.drains.drain_status(src))["state"], "completed")


def _facts():
    from tests.control.helpers import FACTS
    return dict(FACTS)
