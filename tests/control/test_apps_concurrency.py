"""
Deploys of different apps overlap; deploys of one app are ordered; a slow host delays only
the app that has a machine starting there.

The cluster is the one of L{tests.control.test_apps}: a real SQLite store, host registry,
scheduler and executors over the fake driver (which passes the driver contract tests).
The only thing added is a gate on the wire: a C{machine.start} call to a "slow" host waits,
before it reaches the executor, until the test lets it through (or fails it as the agent
would fail it), so the test decides when each slow start ends.
"""

import random

from autobahn.wamp.exception import ApplicationError
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from tests.control.test_apps import Cluster, d, deferLater
from zwrm import errors
from zwrm.control.apps import LIVE, Apps
from zwrm.scheduler import Scheduler, load_strategy


class Held:
    """One C{machine.start} call held at the gate."""

    def __init__(self, host_id, spec, gate):
        self.host_id = host_id
        self.machine_id = spec["id"]
        self.app = spec["app"]
        self.gate = gate
        self.released = False

    def release(self):
        """Let the call through to the host's executor."""
        self.released = True
        self.gate.callback(None)

    def fail(self, message="the hypervisor could not start it"):
        """Fail the call as the agent would (a zwrm error over the wire)."""
        self.released = True
        self.gate.errback(ApplicationError(errors.Unavailable.uri, message))


class GatedCluster(Cluster):
    """
    A L{Cluster} whose C{machine.start} calls to the hosts in C{slow} (or to every host
    while C{hold_all}) are held until the test releases them.
    """

    def __init__(self, testcase):
        super().__init__(testcase)
        self.slow = set()
        self.hold_all = False
        self.held = []

    def call(self, procedure, *args, **kwargs):
        host_id, verb = procedure[len("zwrm.agent."):].split(".", 1)
        if verb == "machine.start" and (self.hold_all or host_id in self.slow):
            gate = Deferred()
            self.held.append(Held(host_id, args[0], gate))
            gate.addCallback(lambda _: Cluster.call(self, procedure, *args, **kwargs))
            return gate
        return Cluster.call(self, procedure, *args, **kwargs)

    def waiting(self, app=None):
        """The held calls not yet released (of C{app}'s machines, if given)."""
        return [h for h in self.held if not h.released and (app is None or h.app == app)]

    async def add_labelled(self, host_id, speed):
        await self.add_host(host_id, labels={"speed": speed})


async def until(predicate, what, timeout=10.0):
    """Poll C{predicate} on the reactor until it is true; fail after C{timeout} seconds."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await deferLater(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def slow_and_fast(testcase):
    """h-slow (starts held) and h-fast, with apps a (on h-slow) and b (on h-fast)."""
    c = await GatedCluster(testcase).start(hosts=())
    await c.add_labelled("h-slow", "slow")
    await c.add_labelled("h-fast", "fast")
    c.slow.add("h-slow")
    await c.apps.create_app("a")
    await c.apps.create_app("b")
    return c


def on(c, speed, **kw):
    return c.spec(constraints={"speed": speed}, **kw)


class SlowHostTests(TestCase):
    @d
    async def test_other_app_deploys_while_a_start_is_held(self):
        """
        While app a's machine waits on a slow host, app b is placed, stored, started and
        running; a's machine is stored as pending with its reservation, and runs once its
        host answers.
        """
        c = await slow_and_fast(self)
        da = ensureDeferred(c.apps.deploy("a", on(c, "slow", vcpus=2)))
        await until(lambda: c.waiting("a"), "a's start to reach the slow host")
        db = ensureDeferred(c.apps.deploy("b", on(c, "fast")))
        await until(lambda: db.called, "b's deploy to finish while a's start is held")
        status = self.successResultOf(db)
        self.assertEqual([(m["host_id"], m["state"]) for m in status["machines"]],
                         [("h-fast", "running")])
        self.assertFalse(da.called)
        pending = await c.machines("a")
        self.assertEqual([(m["host_id"], m["state"]) for m in pending], [("h-slow", "pending")])
        self.assertEqual(c.apps.scheduler.host("h-slow").used_vcpus, 2)
        c.waiting("a")[0].release()
        status = await da
        self.assertEqual([(m["id"], m["state"]) for m in status["machines"]],
                         [(pending[0]["id"], "running")])

    @d
    async def test_failed_held_start_releases_its_reservation(self):
        """
        A start that fails after other apps were placed gives its capacity back, and the
        app's next converge can use it.
        """
        c = await slow_and_fast(self)
        da = ensureDeferred(c.apps.deploy("a", on(c, "slow", vcpus=8)))
        await until(lambda: c.waiting("a"), "a's start to reach the slow host")
        # h-slow is full: nothing else fits there while a's start is under way.
        await c.apps.create_app("c")
        dc = ensureDeferred(c.apps.deploy("c", on(c, "slow", vcpus=1)))
        await until(lambda: dc.called, "c's deploy to be refused while a's start is held")
        self.failureResultOf(dc, errors.Unplaceable)
        c.waiting("a")[0].fail()
        status = await da
        self.assertEqual([m["state"] for m in status["machines"]], ["failed"])
        self.assertEqual(c.apps.scheduler.host("h-slow").used_vcpus, 0)
        c.slow.clear()
        status = await c.apps.deploy("c", on(c, "slow", vcpus=1))
        self.assertEqual([m["state"] for m in status["machines"]], ["running"])


class SameAppOrderTests(TestCase):
    @d
    async def test_deploys_of_one_app_are_ordered_while_others_go_on(self):
        """
        A second deploy of app a waits for the first (held on a slow host) before it
        stores its spec or touches a machine; app b deploys meanwhile. Then the second
        deploy replaces the first's machine once that one runs.
        """
        c = await slow_and_fast(self)
        d1 = ensureDeferred(c.apps.deploy("a", on(c, "slow", memory_mb=256)))
        await until(lambda: c.waiting("a"), "a's first start to reach the slow host")
        first = c.waiting("a")[0]
        d2 = ensureDeferred(c.apps.deploy("a", on(c, "slow", memory_mb=512)))
        db = ensureDeferred(c.apps.deploy("b", on(c, "fast")))
        await until(lambda: db.called, "b's deploy to finish")
        self.successResultOf(db)
        self.assertFalse(d2.called)
        status = await c.apps.app_status("a")
        self.assertEqual(status["spec"]["memory_mb"], 256)  # the second spec is not stored yet
        self.assertEqual([m["id"] for m in status["machines"]], [first.machine_id])
        self.assertEqual(len(c.held), 1)
        first.release()
        await d1
        await until(lambda: c.waiting("a"), "the second deploy's start")
        second = c.waiting("a")[0]
        self.assertNotEqual(second.machine_id, first.machine_id)
        # the first machine ran before the second deploy destroyed it
        states = [e["payload"]["state"] for t, e in c.published
                  if t == "zwrm.event.machine" and e["subject"] == first.machine_id
                  and e["kind"] in ("state", "destroyed")]
        self.assertEqual(states[-2:], ["running", "destroyed"])
        second.release()
        status = await d2
        self.assertEqual([(m["id"], m["state"]) for m in status["machines"]],
                         [(second.machine_id, "running")])
        self.assertEqual(status["spec"]["memory_mb"], 512)
        self.assertEqual(c.apps.scheduler.host("h-slow").used_memory_mb, 512)

    @d
    async def test_scale_and_destroy_wait_for_the_deploy_under_way(self):
        """A scale and a destroy of app a wait for a's deploy; b's deploy does not."""
        c = await slow_and_fast(self)
        d1 = ensureDeferred(c.apps.deploy("a", on(c, "slow", replicas=1)))
        await until(lambda: c.waiting("a"), "a's start to reach the slow host")
        ds = ensureDeferred(c.apps.scale("a", 2))
        dx = ensureDeferred(c.apps.destroy_app("a"))
        db = ensureDeferred(c.apps.deploy("b", on(c, "fast")))
        await until(lambda: db.called, "b's deploy to finish")
        self.assertFalse(ds.called or dx.called)
        self.assertEqual((await c.apps.app_status("a"))["spec"]["replicas"], 1)
        c.waiting("a")[0].release()
        await d1
        await until(lambda: c.waiting("a"), "the scale's start")
        self.assertFalse(dx.called)
        c.waiting("a")[0].release()
        status = await ds
        self.assertEqual([m["state"] for m in status["machines"]], ["running", "running"])
        result = await dx
        self.assertEqual(len(result["machines"]), 2)
        with self.assertRaises(errors.NotFound):
            await c.apps.app_status("a")
        self.assertEqual(c.apps.scheduler.host("h-slow").used_vcpus, 0)
        ex, _ = c.executors["h-slow"]
        self.assertEqual(ex.list_machines(), [])


class InterleavingTests(TestCase):
    SCENARIOS = 12

    @d
    async def test_concurrent_deploys_never_oversubscribe(self):
        """
        Random scripts of deploys of several apps and of held starts ending (run or fail),
        in random order: every deploy is placed while the starts before it are still held;
        at every step no host has more placed than it holds; at the end the scheduler,
        the stored machines and the stored host allocations agree, and an unplaceable
        deploy stored no machine.
        """
        for seed in range(self.SCENARIOS):
            await self._scenario(random.Random(seed), seed)

    async def _scenario(self, rnd, seed):
        c = await GatedCluster(self).start(hosts=("h-a", "h-b"))
        c.hold_all = True
        capacity = {"vcpus": 8, "memory_mb": 16384}  # FACTS, per host
        names = [f"app{i}" for i in range(rnd.randint(3, 6))]
        specs = {}
        for name in names:
            await c.apps.create_app(name)
            specs[name] = c.spec(vcpus=rnd.randint(1, 5), replicas=rnd.randint(1, 3),
                                 memory_mb=rnd.choice([256, 4096, 8192]))
        script = [("deploy", n) for n in names] + [("end", None)] * 12
        rnd.shuffle(script)
        deploys = {}

        def settled():
            return all(dd.called or c.waiting(n) for n, dd in deploys.items())

        for action, name in script:
            if action == "deploy":
                deploys[name] = ensureDeferred(c.apps.deploy(name, specs[name]))
                deploys[name].addErrback(lambda f: f.trap(errors.Unplaceable) and f.value)
            else:
                held = c.waiting()
                if held:
                    h = rnd.choice(held)
                    h.release() if rnd.random() < 0.7 else h.fail()
            await until(settled, f"seed {seed}: every deploy placed while starts are held")
            await self._check_capacity(c, capacity, seed)
        while c.waiting():
            c.waiting()[0].release()
            await until(settled, f"seed {seed}: deploys to finish")
        await until(lambda: all(dd.called for dd in deploys.values()),
                    f"seed {seed}: every deploy to finish")
        for name, dd in deploys.items():
            result = self.successResultOf(dd)
            if isinstance(result, errors.Unplaceable):
                self.assertEqual(await c.machines(name), [], f"seed {seed}: {name}")
            else:
                self.assertEqual(len(result["machines"]), specs[name]["replicas"])
        await self._check_capacity(c, capacity, seed)

        async def agrees():
            rows = [m for m in await c.store.select("machines") if m["state"] in LIVE]
            stored = {h["id"]: h for h in await c.store.select("hosts")}
            for host in c.apps.scheduler.hosts():
                mine = [m["spec"] for m in rows if m["host_id"] == host.id]
                want = (sum(s["vcpus"] for s in mine), sum(s["memory_mb"] for s in mine))
                if (host.used_vcpus, host.used_memory_mb) != want:
                    return False
                if (stored[host.id]["alloc_vcpus"], stored[host.id]["alloc_memory_mb"]) != want:
                    return False
            return True

        for _ in range(200):
            if await agrees():
                break
            await deferLater(0.01)
        self.assertTrue(await agrees(), f"seed {seed}: the scheduler, machines and hosts agree")

    async def _check_capacity(self, c, capacity, seed):
        rows = [m for m in await c.store.select("machines") if m["state"] in LIVE]
        for host in c.apps.scheduler.hosts():
            mine = [m["spec"] for m in rows if m["host_id"] == host.id]
            for key, used in (("vcpus", host.used_vcpus), ("memory_mb", host.used_memory_mb)):
                self.assertLessEqual(used, capacity[key], f"seed {seed}: {host.id} {key}")
                self.assertLessEqual(sum(s[key] for s in mine), capacity[key],
                                     f"seed {seed}: {host.id} {key} of stored machines")


class RestartTests(TestCase):
    async def _restart_mid_start(self):
        """Deploy a on the slow host and restart the control plane while its start is held."""
        c = await slow_and_fast(self)
        ensureDeferred(c.apps.deploy("a", on(c, "slow", vcpus=8)))
        await until(lambda: c.waiting("a"), "a's start to reach the slow host")
        held = c.waiting("a")[0]
        c.apps = Apps(c.clock, c.store, c.registry, Scheduler(load_strategy("spread")),
                      c.publish)
        self.assertEqual(await c.apps.load(), 1)
        # its capacity stays reserved after the restart
        await c.apps.create_app("c")
        with self.assertRaises(errors.Unplaceable):
            await c.apps.deploy("c", on(c, "slow", vcpus=1))
        return c, held

    @d
    async def test_restart_rolls_back_an_unconfirmed_start(self):
        """
        A machine stored pending whose start no agent confirmed before the restart is
        rolled back by the app's next converge: failed, destroyed and placed again.
        """
        c, held = await self._restart_mid_start()
        c.slow.clear()
        status = await c.apps.scale("a", 1)
        self.assertEqual([m["state"] for m in status["machines"]], ["running"])
        self.assertNotEqual(status["machines"][0]["id"], held.machine_id)
        with self.assertRaises(errors.NotFound):
            await c.apps.machine_status(held.machine_id)
        self.assertEqual(c.apps.scheduler.host("h-slow").used_vcpus, 8)
        self.assertEqual(len(c.apps.scheduler.placements()), 1)

    @d
    async def test_restart_resumes_a_start_its_agent_confirms(self):
        """
        If the held start reaches the agent after the restart, the agent's reports move
        the machine on and the next converge keeps it.
        """
        c, held = await self._restart_mid_start()
        held.release()
        await until(lambda: c.executors["h-slow"][0].list_machines(), "the agent's machine")
        for _ in range(200):
            if (await c.apps.machine_status(held.machine_id))["state"] == "running":
                break
            await deferLater(0.01)
        status = await c.apps.scale("a", 1)
        self.assertEqual([(m["id"], m["state"]) for m in status["machines"]],
                         [(held.machine_id, "running")])
        self.assertEqual(c.apps.scheduler.host("h-slow").used_vcpus, 8)

    @d
    async def test_agent_back_without_the_machine_fails_it(self):
        """
        The agent registers again and does not list the machine stored pending before the
        restart: its start never reached the host. It is failed at once, its capacity
        given back when its restart policy decides (not at the app's next converge).
        """
        c, held = await self._restart_mid_start()
        result = await c.registry.reconcile("h-slow", [])
        self.assertEqual(result["failed"], [held.machine_id])
        status = await c.apps.machine_status(held.machine_id)
        self.assertEqual(status["state"], "failed")
        self.assertNotIn(held.machine_id, c.registry.unconfirmed)
        [last, *_] = await c.store.recent_events(held.machine_id)
        self.assertEqual(last["payload"]["reason"],
                         "its start never reached its host (the control plane stopped first)")

    @d
    async def test_a_live_move_s_replacement_is_the_drain_s_to_settle(self):
        """
        A machine stored pending as a live move's replacement (its migration in a live
        phase when the control plane stopped) is a paused QEMU on its target that the move
        resumes; the target's agent lists it only once resumed. Its list before that does
        not fail it: the drain, taken up again, settles it (as the integration test's
        control plane killed mid-migration showed: the moved machine failed and restarted).
        """
        c = await slow_and_fast(self)
        ensureDeferred(c.apps.deploy("a", on(c, "slow", vcpus=8)))
        await until(lambda: c.waiting("a"), "a's start to reach the slow host")
        held = c.waiting("a")[0]
        now = c.clock.seconds()
        await c.apps.data.drains.add(
            {"id": "d-000000000001", "host_id": "h-fast", "state": "running",
             "options": {}, "created_at": now, "updated_at": now},
            [{"id": "mg-000000000001", "drain_id": "d-000000000001",
              "machine_id": "m-000000000000", "source_host": "h-fast",
              "target_host": "h-slow", "phase": "live_migrating", "bytes_sent": 0,
              "bytes_total": 0, "error": None, "updated_at": now,
              "detail": {"mode": "live", "replacement": held.machine_id}}])
        c.apps = Apps(c.clock, c.store, c.registry, Scheduler(load_strategy("spread")),
                      c.publish)
        self.assertEqual(await c.apps.load(), 1)
        self.assertNotIn(held.machine_id, c.registry.unconfirmed)
        result = await c.registry.reconcile("h-slow", [])
        self.assertEqual(result["failed"], [])
        status = await c.apps.machine_status(held.machine_id)
        self.assertEqual(status["state"], "pending")

    @d
    async def test_agent_back_with_the_machine_confirms_it(self):
        """
        The agent registers again listing the machine stored pending before the restart
        as running (the answer to its start was lost): it is running at once, in the
        routes, its capacity held.
        """
        c, held = await self._restart_mid_start()
        result = await c.registry.reconcile(
            "h-slow", [{"id": held.machine_id, "state": "running", "host_port": 41000}])
        self.assertEqual(result["confirmed"], [held.machine_id])
        status = await c.apps.machine_status(held.machine_id)
        self.assertEqual(status["state"], "running")
        self.assertEqual(c.apps.scheduler.host("h-slow").used_vcpus, 8)
        self.assertNotIn(held.machine_id, c.registry.unconfirmed)
