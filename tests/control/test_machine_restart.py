"""
C{zwrm.machine.restart} (issue 21 item 1, the console's Restart): one machine restarted in
place, the same id on the same host with its volumes, as a planned stop (out of the routes,
the app's C{shutdown_delay}), then its agent's graceful C{machine.stop} and C{machine.start}
again; refused (nothing changed) for an unknown machine, a machine whose host is offline or
draining, one a drain moves, one being started or stopped; an operator's procedure, audited,
that a viewer may not call.

Time is the control side's L{task.Clock}; the executors run the fake driver on the real
reactor (the apps tests' cluster), as in test_apps_shutdown_delay.
"""

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.control.test_apps import d
from tests.control.test_apps_shutdown_delay import published_app, settle, state_of, timer_due
from tests.control.test_healing import poll
from zwrm import errors
from zwrm.control.audit import audited
from zwrm.control.roles import roles
from zwrm.wamp.auth import Principal, RoleBasedAuthorizer

VOLUME = [{"name": "data", "size_mb": 8, "mount": "/data"}]


def verbs(c, since, machine_id=None):
    """The executor verbs called since index C{since} of C{c.calls}."""
    return [verb for _, verb in c.calls[since:] if verb.startswith("machine.")]


def machine_states(c, machine_id, since=0):
    """The states announced for C{machine_id} on zwrm.event.machine, from C{since}."""
    return [e["payload"]["state"] for t, e in c.published[since:]
            if t == "zwrm.event.machine" and e["subject"] == machine_id
            and e["kind"] == "state"]


class RestartTests(TestCase):
    timeout = 60

    @d
    async def test_out_of_routes_delay_stop_start_same_machine(self):
        c = await published_app(self, replicas=1, delay=3, volumes=VOLUME)
        (m,) = await c.machines("web")
        host, vid = m["host_id"], m["volumes"][0]
        self.assertEqual(set(c.routed(m["id"]).values()), {True})
        calls, events = len(c.calls), len(c.published)
        done = ensureDeferred(c.apps.restart_machine(m["id"]))
        # 1. out of the routes: stored as stopping, every host's view lists it not healthy
        await poll(lambda: self._is(c, m["id"], "stopping"), what="stopping")
        await settle(c)
        self.assertEqual(set(c.routed(m["id"]).values()), {False})
        # 2. the app's shutdown_delay, with the machine still running on its host
        await timer_due(c, 3)
        c.clock.advance(2.9)
        await settle(c)
        self.assertEqual(verbs(c, calls), [])
        self.assertFalse(done.called)
        # 3. stopped (gracefully: machine.stop, never destroyed), 4. started again
        c.clock.advance(0.1)
        result = await done
        self.assertEqual(verbs(c, calls), ["machine.stop", "machine.start"])
        self.assertEqual((result["id"], result["host_id"], result["state"]),
                         (m["id"], host, "running"))
        self.assertEqual(result["volumes"], [vid])
        states = machine_states(c, m["id"], events)
        self.assertEqual(states[0], "stopping")
        self.assertIn("stopped", states)
        self.assertLess(states.index("stopping"), states.index("stopped"))
        self.assertEqual(states[-1], "running")
        # the same machine on its agent, its volume in place; back in the routes
        ex, _ = c.executors[host]
        self.assertEqual([(s["machine_id"], s["state"]) for s in ex.list_machines()],
                         [(m["id"], "running")])
        self.assertTrue(ex.volumes.exists(vid))
        await settle(c)
        self.assertEqual(set(c.routed(m["id"]).values()), {True})
        self.assertEqual([x["id"] for x in await c.machines("web")], [m["id"]])
        # its capacity stayed on its host: one machine's worth, not two
        hosts = {h["id"]: h for h in await c.registry.list()}
        self.assertEqual(hosts[host]["alloc_vcpus"], 1)

    @d
    async def test_without_delay_still_stored_stopping_first(self):
        c = await published_app(self, replicas=1, delay=0)
        (m,) = await c.machines("web")
        events = len(c.published)
        result = await c.apps.restart_machine(m["id"])
        self.assertEqual((result["id"], result["state"]), (m["id"], "running"))
        states = machine_states(c, m["id"], events)
        self.assertEqual(states[0], "stopping")  # the restart policy sees a planned stop
        self.assertEqual(states[-1], "running")

    @d
    async def test_a_failed_machine_is_started_again(self):
        c = await published_app(self, replicas=1, delay=0)
        (m,) = await c.machines("web")
        ex, procs = c.executors[m["host_id"]]
        await procs["machine.stop"](m["id"])
        await poll(lambda: self._is(c, m["id"], "stopped"), what="stopped")
        calls = len(c.calls)
        result = await c.apps.restart_machine(m["id"])
        self.assertEqual((result["id"], result["state"]), (m["id"], "running"))
        self.assertEqual(verbs(c, calls), ["machine.start"])

    @d
    async def test_a_failed_stop_puts_it_back(self):
        c = await published_app(self, replicas=1, delay=1)
        (m,) = await c.machines("web")
        _, procs = c.executors[m["host_id"]]

        def refuse(mid, timeout=None):
            raise errors.Unavailable("the hypervisor did not answer")

        procs["machine.stop"] = refuse
        done = ensureDeferred(c.apps.restart_machine(m["id"]))
        await timer_due(c, 1)
        c.clock.advance(1)
        with self.assertRaises(errors.Unavailable):
            await done
        self.assertEqual(await state_of(c, m["id"]), "running")
        await settle(c)
        self.assertEqual(set(c.routed(m["id"]).values()), {True})

    @d
    async def test_a_drain_begun_meanwhile_leaves_it_stopped(self):
        # Never two copies: the drain moves it, so the restart does not start it again.
        c = await published_app(self, replicas=1, delay=2)
        (m,) = await c.machines("web")
        calls = len(c.calls)
        done = ensureDeferred(c.apps.restart_machine(m["id"]))
        await timer_due(c, 2)
        await c.registry.transition(m["host_id"], "drain_requested")
        c.clock.advance(2)
        with self.assertRaises(errors.Conflict) as cm:
            await done
        self.assertIn("not started again", cm.exception.message)
        self.assertEqual(verbs(c, calls), ["machine.stop"])
        self.assertEqual(await state_of(c, m["id"]), "stopped")
        hosts = {h["id"]: h for h in await c.registry.list()}
        self.assertEqual(hosts[m["host_id"]]["alloc_vcpus"], 0)  # nothing held

    async def _is(self, c, machine_id, state):
        return await state_of(c, machine_id) == state


class RefusalTests(TestCase):
    timeout = 60

    async def unchanged(self, c, machine_id, exc, *words):
        """Restarting C{machine_id} raises C{exc} naming C{words}; nothing is called or stored."""
        calls, events, before = len(c.calls), len(c.published), await c.apps.data.machines.get(
            machine_id)
        with self.assertRaises(exc) as cm:
            await c.apps.restart_machine(machine_id)
        for w in words:
            self.assertIn(w, cm.exception.message)
        self.assertEqual(cm.exception.kwargs.get("argument"), "machine_id")
        self.assertEqual(verbs(c, calls), [])
        self.assertEqual(c.published[events:], [])
        self.assertEqual(await c.apps.data.machines.get(machine_id), before)

    @d
    async def test_unknown_machine(self):
        c = await published_app(self, replicas=1, delay=0)
        await self.unchanged(c, "m-nosuch", errors.NotFound, "machine_id", "m-nosuch")

    @d
    async def test_host_offline(self):
        c = await published_app(self, replicas=1, delay=0)
        (m,) = await c.machines("web")
        await c.registry.mark_offline(m["host_id"])
        await self.unchanged(c, m["id"], errors.Conflict, "offline", m["host_id"])

    @d
    async def test_host_draining(self):
        c = await published_app(self, replicas=1, delay=0)
        (m,) = await c.machines("web")
        await c.registry.transition(m["host_id"], "drain_requested")
        await self.unchanged(c, m["id"], errors.Conflict, "drained", m["host_id"])

    @d
    async def test_moved_by_a_drain(self):
        c = await published_app(self, replicas=1, delay=0)
        (m,) = await c.machines("web")
        # A drain under way that moves it (as its replacement, on a ready target)
        await c.apps.data.drains.add(
            {"id": "d-1", "host_id": "h-x", "state": "running", "options": {},
             "created_at": 0.0, "updated_at": 0.0},
            [{"id": "g-1", "drain_id": "d-1", "machine_id": "m-orig", "source_host": "h-x",
              "target_host": m["host_id"], "phase": "waiting_healthy", "bytes_sent": 0,
              "bytes_total": 0, "error": None, "updated_at": 0.0,
              "detail": {"replacement": m["id"]}}])
        await self.unchanged(c, m["id"], errors.Conflict, "drain", "h-x")

    @d
    async def test_being_stopped(self):
        c = await published_app(self, replicas=1, delay=0)
        (m,) = await c.machines("web")
        row = await c.apps.data.machines.get(m["id"])
        await c.apps.data.machines.set(row, "test", state="stopping")
        await self.unchanged(c, m["id"], errors.Conflict, "stopping")


class RoleAndAuditTests(SynchronousTestCase):
    def setUp(self):
        self.authorizer = RoleBasedAuthorizer(roles())

    def test_operator_only(self):
        self.assertTrue(self.authorizer.authorize(
            Principal("operator", "operator"), "zwrm.machine.restart", "call"))
        for who in (Principal("viewer", "viewer"), Principal("h_0123456789abcdef", "agent")):
            self.assertFalse(self.authorizer.authorize(who, "zwrm.machine.restart", "call"))

    def test_audited(self):
        self.assertTrue(audited("zwrm.machine.restart"))

    def test_drain_list_is_a_read_for_viewers_too(self):
        for who in (Principal("operator", "operator"), Principal("viewer", "viewer")):
            self.assertTrue(self.authorizer.authorize(who, "zwrm.drain.list", "call"))
        self.assertFalse(self.authorizer.authorize(
            Principal("h_0123456789abcdef", "agent"), "zwrm.drain.list", "call"))
        self.assertFalse(audited("zwrm.drain.list"))
