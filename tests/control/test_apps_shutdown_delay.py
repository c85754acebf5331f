"""
Connection draining on planned stops (issue 16 item 4): a replica that a scale down, a
destroy, a rolling update or an operator's C{zwrm.machine.destroy} stops is first taken out
of the routes (stored as C{stopping}: the cluster network's view lists it as not healthy, so
the ingress sends it no new connection and gives its open ones their C{drain_timeout}), then
the app's C{shutdown_delay} passes, and only then is it destroyed on its host.

Time is the control side's L{task.Clock}; the executors run the fake driver on the real
reactor (the apps tests' cluster).  Every C{network.update} view sent to an agent is kept,
so a test can see what the ingress was told before the stop.
"""

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.control.test_apps import Cluster, d
from tests.control.test_healing import poll
from zwrm import errors
from zwrm.control.apps import validate_spec
from zwrm.control.appspec import SHUTDOWN_DELAY_DEFAULT, shutdown_delay

PUBLISH = ["80:8080/http"]


class ViewKeeping(Cluster):
    """The apps tests' cluster, keeping every view sent and when each machine was destroyed."""

    def __init__(self, testcase):
        super().__init__(testcase)
        self.views = []  # (host_id, view), in the order sent
        self.destroyed = {}  # machine id -> the number of views sent before its destroy

    async def start(self, *a, **kw):
        await super().start(*a, **kw)
        self.apps.network_view.pause_ratio = 0  # pushes due at once on the Clock
        return self

    def call(self, procedure, *args, **kwargs):
        verb = procedure.split(".", 3)[3]
        if verb == "network.update":
            self.views.append((procedure.split(".")[2], args[0]))
        elif verb == "machine.destroy":
            self.destroyed.setdefault(args[0], len(self.views))
        return super().call(procedure, *args, **kwargs)

    def routed(self, machine_id, views=None):
        """
        How the last view sent to each host routes C{machine_id}: C{{host: healthy}} (a
        host whose last view does not list it is left out).
        """
        last = {}
        for host, view in self.views if views is None else views:
            last[host] = view
        out = {}
        for host, view in last.items():
            for entry in view.get("published", {}).values():
                for routes in entry["routes"].values():
                    for r in routes:
                        if r["key"] == machine_id:
                            out[host] = r["healthy"]
        return out


async def published_app(t, replicas=2, delay=3, **kw):
    c = await ViewKeeping(t).start()
    await c.apps.create_app("web")
    spec = c.spec(replicas=replicas, service_port=8080, publish=PUBLISH, domain="web.example",
                  **kw)
    if delay is not None:
        spec["shutdown_delay"] = delay
    await c.apps.deploy("web", spec)
    await settle(c)
    return c


async def settle(c):
    """Let the view publisher send what is due (its pushes run on the Clock)."""
    async def idle():
        c.clock.advance(0)
        return not c.apps.network_view.busy()

    await poll(idle, what="the view publisher to be idle")


async def timer_due(c, seconds):
    """Wait (bounded) until the Clock holds a call due C{seconds} from now (a wait began)."""
    async def due():
        now = c.clock.seconds()
        return any(abs(call.getTime() - now - seconds) < 1e-6
                   for call in c.clock.getDelayedCalls())

    await poll(due, what=f"a {seconds:g} s wait on the Clock")


async def state_of(c, machine_id):
    row = await c.apps.data.machines.get(machine_id)
    return None if row is None else row["state"]


class SpecTests(SynchronousTestCase):
    def test_bounded_and_named(self):
        for bad in (-1, 3601, "5", True):
            with self.assertRaises(errors.InvalidArgument) as cm:
                validate_spec({"image": "x:1", "shutdown_delay": bad})
            self.assertIn("shutdown_delay", cm.exception.message)
        self.assertEqual(validate_spec({"image": "x:1", "shutdown_delay": 2})["shutdown_delay"],
                         2.0)

    def test_default_is_for_apps_with_routes(self):
        self.assertEqual(shutdown_delay({"image": "x:1"}), 0)
        self.assertEqual(shutdown_delay({"publish": [{"port": 80}]}), SHUTDOWN_DELAY_DEFAULT)
        self.assertEqual(shutdown_delay({"publish": [{"port": 80}], "shutdown_delay": 0.5}), 0.5)
        self.assertEqual(shutdown_delay(None), 0)


class PlannedStopTests(TestCase):
    async def going_out(self, c, machine_id, delay):
        """
        C{machine_id} is out of the routes (every host's last view lists it as not
        healthy), still not destroyed just before C{delay} passed, destroyed once it has.
        """
        await poll(lambda: self._state_is(c, machine_id, "stopping"), what="stopping")
        await settle(c)
        await timer_due(c, delay)  # the shutdown delay began
        routed = c.routed(machine_id)
        self.assertTrue(routed)
        self.assertEqual(set(routed.values()), {False})  # no new connections
        c.clock.advance(delay - 0.1)
        await settle(c)
        self.assertNotIn(machine_id, c.destroyed)
        self.assertEqual(await state_of(c, machine_id), "stopping")
        c.clock.advance(0.1)
        await poll(lambda: self._destroyed(c, machine_id), what="the destroy")
        # What the ingress knew when the machine was destroyed: not healthy.
        before = c.views[:c.destroyed[machine_id]]
        self.assertEqual(set(c.routed(machine_id, before).values()), {False})

    async def _state_is(self, c, machine_id, state):
        return await state_of(c, machine_id) == state

    async def _destroyed(self, c, machine_id):
        return machine_id in c.destroyed and await state_of(c, machine_id) is None

    @d
    async def test_scale_down_drains_first(self):
        c = await published_app(self)
        ms = await c.machines("web")
        going = next(m["id"] for m in ms if m["replica"] == 1)
        self.assertEqual(set(c.routed(going).values()), {True})
        done = ensureDeferred(c.apps.scale("web", 1))
        await self.going_out(c, going, 3)
        status = await done
        self.assertEqual([m["replica"] for m in status["machines"]], [0])

    @d
    async def test_a_report_while_draining_does_not_route_it_again(self):
        c = await published_app(self)
        going = next(m["id"] for m in await c.machines("web") if m["replica"] == 1)
        done = ensureDeferred(c.apps.scale("web", 1))
        await poll(lambda: self._state_is(c, going, "stopping"), what="stopping")
        row = await c.apps.data.machines.get(going)
        await c.report(row["host_id"], {"machine_id": going, "state": "running",
                                        "health": "passing", "reason": "health check"})
        await settle(c)
        self.assertEqual(await state_of(c, going), "stopping")
        self.assertEqual(set(c.routed(going).values()), {False})
        await timer_due(c, 3)
        c.clock.advance(3)
        await done

    @d
    async def test_destroy_drains_every_replica_at_once(self):
        c = await published_app(self)
        ids = sorted(m["id"] for m in await c.machines("web"))
        done = ensureDeferred(c.apps.destroy_app("web"))
        for mid in ids:
            await poll(lambda mid=mid: self._state_is(c, mid, "stopping"), what="stopping")
        await settle(c)
        await timer_due(c, 3)
        c.clock.advance(2.9)
        await settle(c)
        self.assertEqual([m for m in ids if m in c.destroyed], [])
        c.clock.advance(0.1)  # one delay for all, not one each
        result = await done
        self.assertEqual(sorted(result["machines"]), ids)
        for mid in ids:
            self.assertEqual(set(c.routed(mid, c.views[:c.destroyed[mid]]).values()), {False})

    @d
    async def test_machine_destroy_drains_first(self):
        c = await published_app(self, replicas=1)
        (m,) = await c.machines("web")
        done = ensureDeferred(c.apps.destroy_machine(m["id"]))
        await self.going_out(c, m["id"], 3)
        self.assertEqual(await done, m["id"])

    @d
    async def test_rolling_update_drains_the_old_machine(self):
        c = await published_app(self, replicas=1, update={"max_parallel": 1,
                                                          "min_healthy_time": 1})
        (old,) = await c.machines("web")
        done = ensureDeferred(c.apps.deploy("web", {"memory_mb": 300}))

        async def new_running():
            return any(m["id"] != old["id"] and m["state"] == "running"
                       for m in await c.machines("web"))

        await poll(new_running, what="the new machine")
        await timer_due(c, 1)
        c.clock.advance(1)  # min_healthy_time: the new one is in; the old one goes out
        await self.going_out(c, old["id"], 3)
        status = await done
        self.assertEqual([m["state"] for m in status["machines"]], ["running"])

    @d
    async def test_the_default_for_a_published_app(self):
        c = await published_app(self, delay=None)
        going = next(m["id"] for m in await c.machines("web") if m["replica"] == 1)
        done = ensureDeferred(c.apps.scale("web", 1))
        await self.going_out(c, going, SHUTDOWN_DELAY_DEFAULT)
        await done

    @d
    async def test_without_routes_nothing_waits(self):
        c = await ViewKeeping(self).start()
        await c.apps.create_app("db")
        await c.apps.deploy("db", c.spec(replicas=2))
        status = await c.apps.scale("db", 1)  # no clock advanced: no wait
        self.assertEqual(len(status["machines"]), 1)
