"""
Rolling updates (a spec's C{update}): replicas are replaced C{max_parallel} at a time, each
new machine healthy for C{min_healthy_time} before the old one goes; a failed update is
reverted (C{auto_revert}) and the old machines never stopped.

Time is the control side's L{task.Clock} (what C{min_healthy_time} counts); the executors
run the fake driver on the real reactor.
"""

from twisted.internet.defer import ensureDeferred, succeed
from twisted.trial.unittest import TestCase

from tests.control.test_apps import Cluster, caller, d
from tests.control.test_healing import poll
from zwrm import errors
from zwrm.control.apps import Apps, validate_spec
from zwrm.control.resources.machines import RESTART_DECISION_GRACE
from zwrm.scheduler import Scheduler, load_strategy


async def healthy_wait(c, seconds=10):
    """
    Wait (bounded) until the update waits C{seconds} on the Clock (for a new machine to stay
    healthy, or for a decision on one that failed): a machine seen running may not be waited
    on yet, and a Clock advanced before that wait began would never reach its end.
    """
    async def due():
        now = c.clock.seconds()
        return any(abs(call.getTime() - now - seconds) < 1e-6
                   for call in c.clock.getDelayedCalls())

    await poll(due, what=f"the {seconds:g} s healthy wait")


async def start_again(c):
    """
    The control plane starts again after its stop cancelled the update under way: a new
    L{Apps} over the same store, loaded.
    """
    c.clock.advance(10)  # (the update's wait would have ended now: it no longer runs)
    c.apps.network_view.close()
    c.apps = Apps(c.clock, c.store, c.registry, Scheduler(load_strategy("spread")), c.publish)
    await c.apps.load()


async def batch_healthy(c, running, what):
    """
    Wait (bounded) until C{await running()} (a batch's new machine runs), then let the
    update's 10 s healthy wait for it pass on the Clock.
    """
    await poll(running, what=what)
    await healthy_wait(c)
    c.clock.advance(10)


async def healthy_waits(c, n, seconds=10):
    """L{healthy_wait} for C{n} machines at once: C{n} waits due C{seconds} from now."""
    async def due():
        now = c.clock.seconds()
        return len([call for call in c.clock.getDelayedCalls()
                    if abs(call.getTime() - now - seconds) < 1e-6]) >= n

    await poll(due, what=f"{n} {seconds:g} s healthy waits")


class RollingTests(TestCase):
    async def cluster(self):
        c = await Cluster(self).start()
        await c.apps.create_app("web")
        await c.apps.deploy("web", c.spec(replicas=2))
        return c

    async def rows(self, c):
        return await c.store.select("machines", "app_id = (SELECT id FROM apps WHERE name = ?)",
                                    ["web"])

    async def fails_unrestarted(self, c, spec):
        """
        Deploy C{spec} to web, whose first new machine fails: with no healer here, no
        restart is due, and the update gives up once the healer's time to decide is over.
        """
        done = ensureDeferred(c.apps.deploy("web", spec))
        await healthy_wait(c, RESTART_DECISION_GRACE)
        self.assertFalse(done.called)  # a restart may yet be decided
        c.clock.advance(RESTART_DECISION_GRACE)
        return await done

    @d
    async def test_one_at_a_time_never_below_the_count(self):
        c = await self.cluster()
        old = {m["id"] for m in await c.machines("web")}
        done = ensureDeferred(c.apps.deploy(
            "web", {"memory_mb": 300, "update": {"min_healthy_time": 10}}))
        running_seen = []

        async def new_running(n):
            ms = await c.machines("web")
            running_seen.append(sum(1 for m in ms if m["state"] == "running"))
            fresh = [m for m in ms if m["id"] not in old and m["state"] == "running"]
            return len(fresh) == n

        await poll(lambda: new_running(1), what="the first new machine")
        self.assertEqual(len(await c.machines("web")), 3)  # one more, not one less
        self.assertFalse(done.called)
        await healthy_wait(c)
        c.clock.advance(10)
        await batch_healthy(c, lambda: new_running(2), "the second new machine")
        status = await done
        self.assertEqual(len(status["machines"]), 2)
        self.assertTrue(all(m["id"] not in old for m in status["machines"]))
        self.assertEqual(status["spec"]["memory_mb"], 300)
        self.assertGreaterEqual(min(running_seen), 2)

    @d
    async def test_a_batch_waits_for_its_machines_at_once(self):
        """Two at a time: both new machines stay healthy for one min_healthy_time, together."""
        c = await self.cluster()
        old = {m["id"] for m in await c.machines("web")}
        done = ensureDeferred(c.apps.deploy(
            "web", {"memory_mb": 300, "update": {"max_parallel": 2, "min_healthy_time": 10}}))
        await healthy_waits(c, 2)
        self.assertFalse(done.called)
        c.clock.advance(10)
        status = await done
        self.assertTrue(all(m["id"] not in old for m in status["machines"]))

    @d
    async def test_failed_update_is_reverted(self):
        c = await self.cluster()
        before = await c.apps.app_status("web")
        bad = dict(c.spec()["image"], kernel=c.kernel + ".missing")
        with self.assertRaises(errors.Unavailable) as cm:
            await self.fails_unrestarted(c, {"image": bad, "update": {"min_healthy_time": 1}})
        self.assertIn("reverted", cm.exception.message)
        after = await c.apps.app_status("web")
        self.assertEqual([(m["id"], m["state"]) for m in after["machines"]],
                         [(m["id"], "running") for m in before["machines"]])
        self.assertEqual(after["spec"]["image"], before["spec"]["image"])
        self.assertEqual(after["spec_version"], before["spec_version"] + 2)

    def rollout_events(self, c):
        return [(e["payload"]["state"], e["payload"]["replaced"], e["payload"]["total"])
                for t, e in c.published if t == "zwrm.event.app" and e["kind"] == "rollout"]

    @d
    async def test_progress_is_announced(self):
        c = await self.cluster()
        old = {m["id"] for m in await c.machines("web")}
        done = ensureDeferred(c.apps.deploy(
            "web", {"memory_mb": 300, "update": {"min_healthy_time": 10}}))
        await poll(lambda: succeed(bool(self.rollout_events(c))), what="started")
        started = [e for t, e in c.published if t == "zwrm.event.app"
                   and e["kind"] == "rollout"][0]["payload"]
        self.assertEqual((started["app"], started["version"], started["update"]["max_parallel"]),
                         ("web", 2, 1))
        for n in (1, 2):
            async def new_running(n=n):
                ms = await c.machines("web")
                return len([m for m in ms if m["id"] not in old and m["state"] == "running"]) >= n

            await batch_healthy(c, new_running, f"new machine {n}")
        await done
        self.assertEqual(self.rollout_events(c),
                         [("started", 0, 2), ("progress", 1, 2), ("completed", 2, 2)])

    @d
    async def test_a_revert_is_announced(self):
        c = await self.cluster()
        bad = dict(c.spec()["image"], kernel=c.kernel + ".missing")
        with self.assertRaises(errors.Unavailable) as cm:
            await self.fails_unrestarted(c, {"image": bad, "update": {"min_healthy_time": 1}})
        self.assertEqual(self.rollout_events(c), [("started", 0, 2), ("reverted", 0, 2)])
        last = [e for t, e in c.published if t == "zwrm.event.app"][-1]["payload"]
        self.assertEqual(last["reason"], cm.exception.message)

    def test_update_settings_are_checked(self):
        for bad, word in [({"max_parallel": -1}, "max_parallel"),
                          ({"min_healthy_time": -1}, "min_healthy_time"),
                          ({"auto_revert": "yes"}, "auto_revert"), ({"x": 1}, "x")]:
            e = self.assertRaises(errors.InvalidArgument, validate_spec,
                                  {"image": "x:1", "update": bad})
            self.assertIn(word, e.message)


class DefaultRollingTests(TestCase):
    """Every update rolls (issue 15): no C{update} in the spec means the defaults."""

    async def cluster(self, **facts):
        c = await Cluster(self).start(**facts)
        await c.apps.create_app("web")
        spec = c.spec(replicas=2)
        del spec["update"]  # the product's default, not the test cluster's
        await c.apps.deploy("web", spec)
        return c

    @d
    async def test_an_update_without_settings_rolls_one_at_a_time_after_10s(self):
        c = await self.cluster()
        old = {m["id"] for m in await c.machines("web")}
        done = ensureDeferred(c.apps.deploy("web", {"memory_mb": 300}))

        async def fresh_running(n):
            ms = await c.machines("web")
            return len([m for m in ms if m["id"] not in old and m["state"] == "running"]) == n

        await poll(lambda: fresh_running(1), what="the first new machine")
        self.assertEqual(len(await c.machines("web")), 3)  # one more, never one less
        await healthy_wait(c)
        c.clock.advance(9.5)  # min_healthy_time defaults to 10 s
        self.assertEqual(len(await c.machines("web")), 3)
        self.assertFalse(done.called)
        c.clock.advance(0.5)
        await poll(lambda: fresh_running(2), what="the second new machine")
        self.assertFalse(done.called)
        await healthy_wait(c)
        c.clock.advance(10)
        status = await done
        self.assertEqual(sorted(m["state"] for m in status["machines"]), ["running"] * 2)
        self.assertTrue(all(m["id"] not in old for m in status["machines"]))
        self.assertEqual((await c.apps.app_status("web"))["spec"].get("update"), None)

    @d
    async def test_max_parallel_0_replaces_every_machine_at_once(self):
        c = await self.cluster()
        old = {m["id"] for m in await c.machines("web")}
        status = await c.apps.deploy("web", {"memory_mb": 300, "update": {"max_parallel": 0}})
        self.assertEqual(len(status["machines"]), 2)
        self.assertTrue(all(m["id"] not in old for m in status["machines"]))

    @d
    async def test_a_new_state_that_does_not_fit_changes_nothing(self):
        c = await self.cluster()
        before = await c.apps.app_status("web")
        with self.assertRaises(errors.Unplaceable):
            await c.apps.deploy("web", {"memory_mb": 10 ** 6})
        after = await c.apps.app_status("web")
        self.assertEqual(after["spec_version"], before["spec_version"])
        self.assertEqual([(m["id"], m["state"]) for m in after["machines"]],
                         [(m["id"], m["state"]) for m in before["machines"]])

    @d
    async def test_no_room_beside_the_old_machine_replaces_it_in_place(self):
        # Each host has room for one machine of 3000 MiB (FACTS: 16 GiB... 4 vCPUs each).
        c = await self.cluster(vcpus=1)
        old = {m["id"] for m in await c.machines("web")}
        done = ensureDeferred(c.apps.deploy("web", {"memory_mb": 300}))

        async def fresh_running(n):
            ms = await c.machines("web")
            return len([m for m in ms if m["id"] not in old and m["state"] == "running"]) == n

        await poll(lambda: fresh_running(1), what="the first machine replaced in place")
        self.assertEqual(len(await c.machines("web")), 2)  # the old one went first
        await healthy_wait(c)
        c.clock.advance(10)
        await batch_healthy(c, lambda: fresh_running(2), "the second machine replaced in place")
        status = await done
        self.assertTrue(all(m["id"] not in old for m in status["machines"]))

    @d
    async def test_a_new_machine_never_healthy_fails_the_update_saying_what_its_check_said(self):
        c = await Cluster(self).start()
        await c.apps.create_app("web")
        await c.apps.deploy("web", c.spec(replicas=1, service_port=80, health={
            "type": "tcp", "interval": 2, "unhealthy_threshold": 3}))
        (old,) = await c.machines("web")
        done = ensureDeferred(c.apps.deploy("web", {"memory_mb": 300,
                                                    "update": {"healthy_deadline": 30}}))
        await healthy_wait(c, 30)  # the update waits for its new machine
        (new,) = [m for m in await c.machines("web") if m["id"] != old["id"]]
        await c.apps.machine_event({"machine_id": new["id"], "state": "running",
                                    "health": "failing",
                                    "reason": "health failing: port 80 refused the connection"},
                                   details=caller(new["host_id"]))
        # then stopped (as the healer does to restart it): its check's answer is still the one
        await c.apps.machine_event({"machine_id": new["id"], "state": "stopping",
                                    "health": "failing", "reason": "stop requested"},
                                   details=caller(new["host_id"]))
        c.clock.advance(30)
        with self.assertRaises(errors.Unavailable) as cm:
            await done
        self.assertIn(f"machine {new['id']} was not healthy within 30s (state stopping, health"
                      " failing; last check: health failing: port 80 refused the connection)",
                      cm.exception.message)


async def update_waiting(testcase):
    """
    web (2 replicas) in an update to 300 MiB, waiting for its first new machine (running
    beside the old ones) to stay healthy: C{(cluster, old machine ids, the deploy's
    Deferred, that new machine)}.
    """
    c = await DefaultRollingTests.cluster(testcase)
    old = {m["id"] for m in await c.machines("web")}
    deploy = ensureDeferred(c.apps.deploy("web", {"memory_mb": 300}))

    async def beside():
        ms = await c.machines("web")
        return [m for m in ms if m["id"] not in old and m["state"] == "running"]

    await poll(beside, what="the first new machine")
    await healthy_wait(c)
    (new,) = await beside()
    return c, old, deploy, new


class InterruptedRollingTests(TestCase):
    """
    A rolling update the control plane's stop interrupted is taken up at its next start
    (L{Apps.resume_rollouts}): the machine of the batch under way that had not finished its
    healthy wait is waited for again (its old one retired then), the old ones left are
    replaced, and the update ends.
    """

    async def interrupted(self):
        """web (2 replicas) stopped in its update: replica 0's new machine runs beside its
        old one, then a new L{Apps} over the same store (a control plane start)."""
        c, old, done, halfway = await update_waiting(self)
        done.cancel()  # as the stop cancels the work under way
        self.failureResultOf(done)
        await start_again(c)
        self.assertEqual(len(await c.machines("web")), 3)
        return c, old, halfway

    rows = RollingTests.rows

    def rollouts(self, c):
        return [(e["payload"]["state"], e["payload"]["replaced"], e["payload"]["total"])
                for t, e in c.published if t == "zwrm.event.app" and e["kind"] == "rollout"]

    @d
    async def test_an_interrupted_update_is_taken_up(self):
        c, old, halfway = await self.interrupted()
        resumed = ensureDeferred(c.apps.resume_rollouts())

        async def fresh_running(n):
            ms = await c.machines("web")
            return len([m for m in ms if m["id"] not in old | {halfway["id"]}
                        and m["state"] == "running"]) == n

        # replica 0's new machine, halfway through its wait, is waited for again (not made
        # again), its old one running meanwhile
        await healthy_wait(c)
        ids = {m["id"] for m in await c.machines("web")}
        self.assertEqual(ids, old | {halfway["id"]})
        self.assertFalse(await fresh_running(1))
        c.clock.advance(10)
        await batch_healthy(c, lambda: fresh_running(1), "replica 1's new machine")
        self.assertEqual(await resumed, ["web"])
        rows = await self.rows(c)
        self.assertEqual([(m["state"], m["spec"]["memory_mb"]) for m in rows],
                         [("running", 300)] * 2)
        self.assertIn(halfway["id"], [m["id"] for m in rows])
        self.assertEqual(self.rollouts(c)[-3:],
                         [("started", 0, 2), ("progress", 1, 2), ("completed", 2, 2)])
        started = [e for t, e in c.published if t == "zwrm.event.app"
                   and e["kind"] == "rollout"][-3]["payload"]
        self.assertIn("taken up again after a control plane stop", started["reason"])
        # taken up once: nothing is left to take up at the next start
        self.assertEqual(await c.apps.resume_rollouts(), [])

    @d
    async def test_an_update_stopped_after_its_last_batch_is_completed_once_healthy(self):
        c, old, halfway = await self.interrupted()
        for m in await c.machines("web"):  # as if both old machines had been replaced
            if m["id"] in old:
                await c.apps.replicas.remove_machine(await c.apps.data.machines.get(m["id"]))
        resumed = ensureDeferred(c.apps.resume_rollouts())
        # both new machines (replica 1's placed again) are waited for, at once
        await healthy_waits(c, 2)
        self.assertFalse(resumed.called)
        c.clock.advance(10)
        self.assertEqual(await resumed, ["web"])
        self.assertEqual(self.rollouts(c)[-1][0], "completed")
        # replica 1 placed again, of the new version
        self.assertEqual(sorted((m["spec"]["replica"], m["spec"]["memory_mb"])
                                for m in await self.rows(c)), [(0, 300), (1, 300)])

    async def interrupted_in_place(self):
        """
        web (2 replicas, no room beside its machines) stopped in its update while replica
        0's new machine, replaced in place, waited to stay healthy; then a new L{Apps}.
        """
        c = await DefaultRollingTests.cluster(self, vcpus=1)
        old = {m["id"] for m in await c.machines("web")}
        done = ensureDeferred(c.apps.deploy("web", {"memory_mb": 300}))

        async def new():
            return [m for m in await c.machines("web")
                    if m["id"] not in old and m["state"] == "running"]

        await poll(new, what="the first machine replaced in place")
        await healthy_wait(c)
        (replaced,) = await new()
        done.cancel()
        self.failureResultOf(done)
        await start_again(c)
        return c, old, replaced, new

    @d
    async def test_a_machine_replaced_in_place_is_waited_for_again(self):
        """
        Its wait was cut short: it is waited for again (healthy for min_healthy_time)
        before the old machine left is replaced.
        """
        c, old, replaced, new = await self.interrupted_in_place()
        resumed = ensureDeferred(c.apps.resume_rollouts())
        await healthy_wait(c)
        self.assertEqual(len([m for m in await c.machines("web") if m["id"] in old]), 1)
        c.clock.advance(10)

        async def both():
            return len(await new()) == 2

        await batch_healthy(c, both, "replica 1 replaced in place")
        self.assertEqual(await resumed, ["web"])
        self.assertEqual(self.rollouts(c)[-2:], [("started", 1, 2), ("completed", 2, 2)])
        self.assertEqual([(m["state"], m["spec"]["memory_mb"]) for m in await self.rows(c)],
                         [("running", 300)] * 2)

    async def fails_once_resumed(self, c, machine):
        """
        The update taken up again, C{machine} (a new one it waits for again) fails: its
        guest crashes (with no healer here, no restart is due), and the update is reverted.
        """
        resumed = ensureDeferred(c.apps.resume_rollouts())
        await healthy_wait(c)
        await c.apps.machine_event({"machine_id": machine["id"], "state": "failed",
                                    "reason": "qemu exited with status 1"},
                                   details=caller(machine["host_id"]))
        await healthy_wait(c, RESTART_DECISION_GRACE)
        c.clock.advance(RESTART_DECISION_GRACE)
        self.assertEqual(await resumed, ["web"])
        self.assertEqual(self.rollouts(c)[-1][0], "reverted")

    @d
    async def test_a_machine_replaced_in_place_never_healthy_reverts(self):
        """
        Its wait was cut short, and it fails: the update is reverted (announced so), not
        taken on to the next machine or announced completed with it failing.
        """
        c, old, replaced, new = await self.interrupted_in_place()
        await self.fails_once_resumed(c, replaced)

        async def previous_version():
            return [(m["state"], m["spec"]["memory_mb"]) for m in await self.rows(c)] == [
                ("running", 256)] * 2

        await poll(previous_version, what="the previous version again")

    @d
    async def test_a_machine_started_beside_its_old_one_never_healthy_reverts(self):
        """
        The new machine kept from the batch under way fails in its wait again: it is
        removed and the update reverted; the old machines, never stopped, run on.
        """
        c, old, halfway = await self.interrupted()
        await self.fails_once_resumed(c, halfway)
        rows = await self.rows(c)
        self.assertEqual(sorted((m["id"], m["state"], m["spec"]["memory_mb"]) for m in rows),
                         sorted((mid, "running", 256) for mid in old))

    @d
    async def test_nothing_to_take_up(self):
        c = await DefaultRollingTests.cluster(self)
        self.assertEqual(await c.apps.resume_rollouts(), [])


class SupersededRollingTests(TestCase):
    """
    A deploy of a new version, a rollback or a destroy supersedes a rolling update under
    way (as a new job version cancels a Nomad deployment): the fix for a bad update does
    not wait out its deadline.
    """

    waiting = update_waiting

    rows = RollingTests.rows
    rollouts = InterruptedRollingTests.rollouts

    @d
    async def test_a_later_deploy_supersedes_the_update(self):
        c, old, first, batch = await self.waiting()
        second = ensureDeferred(c.apps.deploy("web", {"memory_mb": 400}))
        with self.assertRaises(errors.Conflict) as cm:
            await first
        self.assertEqual(cm.exception.message,
                         "the update of web to version 2 was superseded by a later deploy (0 of"
                         " 2 machine(s) replaced; the new machines of its batch under way "
                         "removed)")
        self.assertEqual(self.rollouts(c)[-2:], [("started", 0, 2), ("failed", 0, 2)])

        async def fresh_running(n):
            return len([m for m in await self.rows(c) if m["state"] == "running"
                        and m["spec"]["memory_mb"] == 400]) == n

        await poll(lambda: fresh_running(1), what="version 3's first machine")
        self.assertNotIn(batch["id"], [m["id"] for m in await self.rows(c)])
        await healthy_wait(c)
        c.clock.advance(10)
        await batch_healthy(c, lambda: fresh_running(2), "version 3's second machine")
        status = await second
        self.assertEqual(status["spec_version"], 3)
        self.assertEqual({k: status["rollout"][k] for k in ("state", "version", "replaced")},
                         {"state": "completed", "version": 3, "replaced": 2})
        self.assertEqual([(m["state"], m["spec"]["memory_mb"]) for m in await self.rows(c)],
                         [("running", 400)] * 2)
        self.assertEqual(self.rollouts(c)[-3:],
                         [("started", 0, 2), ("progress", 1, 2), ("completed", 2, 2)])

    @d
    async def test_a_spec_that_is_refused_supersedes_nothing(self):
        c, old, first, batch = await self.waiting()
        with self.assertRaises(errors.InvalidArgument):
            await c.apps.deploy("web", {"memory_mb": -1})
        # the same version again: nothing to supersede, it waits for the update
        again = ensureDeferred(c.apps.deploy("web", {"memory_mb": 300}))
        self.assertFalse(first.called)
        c.clock.advance(10)
        await poll(lambda: succeed(len(self.rollouts(c)) >= 2), what="progress")
        await healthy_wait(c)
        c.clock.advance(10)
        await first
        await again
        self.assertEqual(self.rollouts(c)[-1], ("completed", 2, 2))
        self.assertEqual([m["spec"]["memory_mb"] for m in await self.rows(c)], [300, 300])

    @d
    async def test_a_rollback_supersedes_the_update(self):
        c, old, first, batch = await self.waiting()
        status = await c.apps.rollback("web")
        with self.assertRaises(errors.Conflict) as cm:
            await first
        self.assertIn("superseded by a rollback", cm.exception.message)
        # back to version 1's spec (version 3): the old machines never stopped
        self.assertEqual((status["spec_version"], status["spec"]["memory_mb"]), (3, 256))
        self.assertEqual({m["id"] for m in status["machines"]}, old)

    @d
    async def test_a_destroy_supersedes_the_update(self):
        c, old, first, batch = await self.waiting()
        await c.apps.destroy_app("web")
        with self.assertRaises(errors.Conflict):
            await first
        self.assertEqual(await self.rows(c), [])
