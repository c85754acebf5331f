"""The host registry and the health monitor, driven by a Clock."""

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.control.helpers import FACTS, make_registry
from zwrm import errors
from zwrm.control.monitor import HealthMonitor
from zwrm.control.registry import HOST_TOPIC, MACHINE_TOPIC
from zwrm.control.store import hash_secret


def d(f):
    def wrapper(self):
        return ensureDeferred(f(self))

    wrapper.__name__ = f.__name__
    return wrapper


async def add_machine(store, mid, host_id, state="running"):
    await store.insert(
        "machines",
        {"id": mid, "app_id": "a1", "host_id": host_id, "state": state, "spec": {},
         "health": {}, "created_at": 0.0, "updated_at": 0.0},
    )


def tmpdir(testcase):
    """A fresh directory outside the checkout, removed after the test."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="zwrm-test-")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path + "/db"


class RegistryTests(TestCase):
    @d
    async def test_join_stores_hashed_credential(self):
        clock, store, reg, published = await make_registry(self)
        result = await reg.join("h-one", FACTS)
        self.assertEqual(result["host_id"], "h-one")
        self.assertEqual(result["heartbeat_interval"], reg.heartbeat_interval)
        row = await store.get("hosts", "h-one")
        self.assertEqual(row["credential_hash"], hash_secret(result["credential"]))
        self.assertEqual((row["region"], row["vcpus"], row["state"]), ("eu-central", 8, "ready"))
        self.assertEqual(row["labels"], {"disk": "ssd"})
        self.assertEqual(published[0][0], HOST_TOPIC)
        # joining again keeps the host and changes the credential
        again = await reg.join("h-one", FACTS)
        self.assertNotEqual(again["credential"], result["credential"])
        self.assertEqual(len(reg), 1)
        self.assertEqual(reg.credential_hash("h-one"), hash_secret(again["credential"]))

    @d
    async def test_join_assigns_id_and_checks_input(self):
        clock, store, reg, published = await make_registry(self)
        result = await reg.join(None, {})
        self.assertRegex(result["host_id"], r"^h_[0-9a-f]{16}$")  # a strict URI component
        # an older agent's fresh h-<16 hex> id is admitted as h_<16 hex>
        old = await reg.join("h-0123456789abcdef", {})
        self.assertEqual(old["host_id"], "h_0123456789abcdef")
        with self.assertRaises(errors.InvalidArgument):
            await reg.join("bad id!", {})
        with self.assertRaises(errors.InvalidArgument):
            await reg.join("h-x", {"vcpus": "many"})
        with self.assertRaises(errors.NotFound):
            await reg.register("h-nobody", {})
        self.assertRaises(errors.NotFound, reg.heartbeat, "h-nobody")

    @d
    async def test_an_agent_gone_is_not_asked_for_its_machines_with_a_warning(self):
        """
        Reconciling asks the agent for its machines; an agent whose procedures are gone
        (restarting: no such procedure) is left to its next registration without a warning,
        any other failure is one warning.
        """
        from autobahn.wamp.exception import ApplicationError
        from twisted.internet.defer import fail

        failure = []
        clock, store, reg, published = await make_registry(
            self, call=lambda proc, *a: fail(failure[0]))
        await reg.join("h-one", FACTS)
        await reg.register("h-one", FACTS)
        warned = []
        self.patch(reg, "log", type("L", (), {
            "warn": lambda self, fmt, **kw: warned.append(fmt.format(**kw))})())
        failure.append(ApplicationError(ApplicationError.NO_SUCH_PROCEDURE, "no callee"))
        self.assertIsNone(await reg._fetch_and_reconcile("h-one", None))
        self.assertEqual(warned, [])
        failure[0] = ApplicationError("wamp.error.runtime_error", "it broke")
        self.assertIsNone(await reg._fetch_and_reconcile("h-one", None))
        self.assertEqual(len(warned), 1)
        self.assertEqual(warned, ["host h-one: could not list its machines: it broke"])

    @d
    async def test_register_updates_facts_and_enables_executor(self):
        clock, store, reg, published = await make_registry(self)
        await reg.join("h1", FACTS)
        self.assertFalse(reg.executor_available("h1"))
        self.assertEqual(reg.hosts.entry("h1").schedulable_state, "unreachable")
        result = await reg.register("h1", {"vcpus": 4, "agent_version": "0.2"})
        self.assertEqual(result["state"], "ready")
        self.assertTrue(reg.executor_available("h1"))
        self.assertEqual(reg.hosts.entry("h1").schedulable_state, "ready")
        row = await store.get("hosts", "h1")
        self.assertEqual((row["vcpus"], row["agent_version"], row["memory_mb"]), (4, "0.2", 16384))

    @d
    async def test_the_end_of_its_agents_session_deregisters_the_executor(self):
        clock, store, reg, published = await make_registry(self)
        await reg.join("h1", FACTS)
        await reg.register("h1", {}, session_id=101)
        del published[:]

        async def left(session_id):
            reg.session_left(session_id)
            clock.advance(0)
            await reg.sessions_noted()

        await left(999)  # another client's session
        self.assertTrue(reg.executor_available("h1"))
        # its agent registers again from a new session before the old one's end is seen
        await reg.register("h1", {}, session_id=102)
        await left(101)
        self.assertTrue(reg.executor_available("h1"))
        del published[:]
        await left(102)
        self.assertFalse(reg.executor_available("h1"))
        self.assertEqual(reg.hosts.entry("h1").schedulable_state, "unreachable")
        self.assertEqual(reg.state("h1"), "ready")  # until the monitor calls it offline
        self.assertEqual([(t, e["kind"], e["payload"]["executor"], e["payload"]["reason"])
                          for t, e in published],
                         [(HOST_TOPIC, "executor", False, "its agent's session ended")])
        await left(102)  # once
        self.assertEqual(len(published), 1)
        await reg.register("h1", {}, session_id=103)
        self.assertTrue(reg.executor_available("h1"))
        # its session ends and it registers again before the end is acted on: it stays
        reg.session_left(103)
        await reg.register("h1", {}, session_id=104)
        clock.advance(0)
        await reg.sessions_noted()
        self.assertTrue(reg.executor_available("h1"))

    @d
    async def test_a_host_that_joins_with_no_record_is_said_to_join_anew(self):
        """(What it keeps of a life before is listed: zwrm.control.unrecorded.)"""
        clock, store, reg, published = await make_registry(self)
        await reg.join("h1", FACTS)
        self.assertEqual(reg.joined_anew, {"h1"})
        reg.joined_anew.clear()
        await reg.join("h1", FACTS)  # its agent lost its credential: it has a record
        self.assertEqual(reg.joined_anew, set())

    @d
    async def test_a_session_that_ends_once_the_control_plane_stops_changes_nothing(self):
        """Its store closes next: the end of an agent's session is not stored then."""
        clock, store, reg, published = await make_registry(self)
        await reg.join("h1", FACTS)
        await reg.register("h1", {}, session_id=101)
        del published[:]
        reg.stop()
        await store.stop()
        reg.session_left(101)
        clock.advance(0)
        await reg.sessions_noted()
        self.assertEqual(published, [])
        self.assertEqual(self.flushLoggedErrors(), [])

    @d
    async def test_a_session_that_ended_before_its_registration_was_in(self):
        clock, store, reg, published = await make_registry(self)
        await reg.join("h1", FACTS)
        # the end is seen before the registration made from that session
        reg.session_left(301)
        clock.advance(0)
        await reg.register("h1", {}, session_id=301)
        clock.advance(0)
        await reg.sessions_noted()
        self.assertFalse(reg.executor_available("h1"))
        # ... or while the registration is being stored
        stored = Deferred()
        real = reg.hosts.registered

        async def slow(host_id, update):
            await stored
            return await real(host_id, update)

        self.patch(reg.hosts, "registered", slow)
        registering = Deferred.fromCoroutine(reg.register("h1", {}, session_id=302))
        reg.session_left(302)
        clock.advance(0)
        await reg.sessions_noted()
        stored.callback(None)
        await registering
        clock.advance(0)
        await reg.sessions_noted()
        self.assertFalse(reg.executor_available("h1"))
        # a registration from a live session is callable; ended ids are forgotten in time
        await reg.register("h1", {}, session_id=303)
        self.assertTrue(reg.executor_available("h1"))
        clock.advance(reg.ENDED_MEMORY + 1)
        reg.session_left(999)
        self.assertEqual(list(reg._ended), [999])

    @d
    async def test_many_sessions_ending_at_once_are_taken_a_chunk_a_turn(self):
        clock, store, reg, published = await make_registry(self)
        reg.LEFT_CHUNK = 3
        for i in range(7):
            await reg.join(f"h{i}", FACTS)
            await reg.register(f"h{i}", {}, session_id=200 + i)
        del published[:]
        for i in range(7):
            reg.session_left(200 + i)
        self.assertEqual(published, [])  # noted only
        turns = []
        while clock.getDelayedCalls():
            clock.advance(0)
            before = len(published)
            for _ in range(100):  # the chunk's store writes (a real store's thread)
                if len(published) - before == min(3, 7 - before):
                    break
                await deferLater(reactor, 0.01, lambda: None)
            turns.append(len(published) - before)
        await reg.sessions_noted()
        self.assertEqual(turns, [3, 3, 1])
        self.assertEqual(sum(reg.executor_available(f"h{i}") for i in range(7)), 0)

    @d
    async def test_heartbeats_are_batched(self):
        clock, store, reg, published = await make_registry(self)
        await reg.join("h1", FACTS)
        clock.advance(10)
        reg.heartbeat("h1")
        self.assertEqual(reg.last_heartbeat("h1"), 10)
        self.assertEqual((await store.get("hosts", "h1"))["last_heartbeat"], 0)
        await reg.flush_heartbeats()
        self.assertEqual((await store.get("hosts", "h1"))["last_heartbeat"], 10)

    @d
    async def test_list_and_status(self):
        clock, store, reg, published = await make_registry(self)
        await reg.join("h1", FACTS)
        await reg.join("h2", dict(FACTS, name="worker-0"))
        await add_machine(store, "m1", "h1")
        clock.advance(3)
        hosts = await reg.list()
        self.assertEqual([h["name"] for h in hosts], ["worker-0", "worker-1"])
        self.assertEqual(hosts[1]["machines"], 1)
        self.assertEqual(hosts[1]["heartbeat_age"], 3)
        status = await reg.status("h1")
        self.assertEqual([m["id"] for m in status["machine_list"]], ["m1"])
        # the machines' wire form: no spec (it may hold user-data and environment)
        self.assertNotIn("spec", status["machine_list"][0])
        self.assertEqual(status["machine_list"][0]["state"], "running")
        self.assertEqual(status["events"][0]["kind"], "joined")
        with self.assertRaises(errors.NotFound):
            await reg.status("h9")

    @d
    async def test_transition_stores_then_publishes(self):
        clock, store, reg, published = await make_registry(self)
        await reg.join("h1", FACTS)
        seen = []
        orig = reg._publish

        def publish(topic, event):
            # by the time of publishing, the store has the new state
            seen.append(store.get("hosts", "h1"))
            orig(topic, event)

        reg._publish = publish
        self.assertEqual(await reg.transition("h1", "drain_requested"), "draining")
        row = await seen[0]
        self.assertEqual(row["state"], "draining")
        self.assertEqual(published[-1][1]["payload"]["state"], "draining")
        with self.assertRaises(errors.Conflict):
            await reg.transition("h1", "drain_requested")
        with self.assertRaises(errors.InvalidArgument):
            await reg.transition("h1", "explode")


class MonitorTests(TestCase):
    async def cluster(self, check_interval=5, offline_after=10, grace=None, **kw):
        clock, store, reg, published = await make_registry(self, **kw)
        for hid in ("h1", "h2"):
            await reg.join(hid, dict(FACTS, name=hid))
            await reg.register(hid, {})
        clock.advance(0)  # reconciliation callLaters
        monitor = HealthMonitor(clock, reg, check_interval, offline_after, grace)
        return clock, store, reg, published, monitor

    @d
    async def test_marks_silent_host_offline(self):
        clock, store, reg, published, monitor = await self.cluster(grace=0)
        await add_machine(store, "m1", "h2", "running")
        await add_machine(store, "m2", "h2", "stopped")
        monitor.startService()
        self.addCleanup(monitor.stopService)
        for _t in range(1, 16):
            clock.advance(1)
            reg.heartbeat("h1")
            await monitor.check()
        self.assertEqual(reg.state("h1"), "ready")
        self.assertEqual(reg.state("h2"), "offline")
        self.assertFalse(reg.executor_available("h2"))
        self.assertEqual([h for h in reg.host_ids()
                          if reg.hosts.entry(h).schedulable_state == "ready"], ["h1"])
        self.assertEqual((await store.get("hosts", "h2"))["state"], "offline")
        self.assertEqual((await store.get("machines", "m1"))["state"], "failed")
        self.assertEqual((await store.get("machines", "m2"))["state"], "stopped")
        topics = [(t, e["payload"].get("state")) for t, e in published[-2:]]
        self.assertEqual(topics, [(HOST_TOPIC, "offline"), (MACHINE_TOPIC, "failed")])
        with self.assertRaises(errors.Unavailable):
            await reg.call_executor("h2", "machine.list")

    @d
    async def test_not_before_offline_after(self):
        """At exactly offline_after the host is still fine; one check later it is not."""
        clock, store, reg, published, monitor = await self.cluster(
            check_interval=1, offline_after=10, grace=0
        )
        monitor.startService()
        self.addCleanup(monitor.stopService)
        clock.advance(10)
        self.assertEqual(await monitor.check(), [])
        clock.advance(1)
        self.assertEqual(sorted(await monitor.check()), ["h1", "h2"])
        self.assertEqual(await monitor.check(), [])

    @d
    async def test_host_that_heartbeats_during_a_check_stays(self):
        """
        Marking one host offline waits on the store; a host that heartbeats meanwhile is
        not marked offline (nor its session killed) on the strength of the older list.
        """
        clock, store, reg, published, monitor = await self.cluster(grace=0)
        monitor.startService()
        self.addCleanup(monitor.stopService)
        clock.advance(10)  # the timer's check: nobody stale yet
        monitor._disarm()  # (not the check it armed for their deadline: this one, by hand)
        clock.advance(0.5)  # both stale now; the timer's next check is at 15
        first, other = reg.host_ids()[0], reg.host_ids()[1]
        mark = reg.mark_offline

        async def slow_mark(host_id):
            if host_id == first:
                reg.heartbeat(other)  # arrives while the first is being stored
            return await mark(host_id)

        reg.mark_offline = slow_mark
        self.assertEqual(await monitor.check(), [first])
        self.assertEqual((reg.state(first), reg.state(other)), ("offline", "ready"))

    @d
    async def test_grace_period_after_start(self):
        """Stored heartbeats are old after a restart; the hosts get a grace period."""
        clock, store, reg, published, monitor = await self.cluster(grace=20)
        clock.advance(1000)  # the control plane was down for a long time
        monitor.startService()
        self.addCleanup(monitor.stopService)
        clock.advance(19)
        self.assertEqual(await monitor.check(), [])
        clock.advance(2)
        self.assertEqual(sorted(await monitor.check()), ["h1", "h2"])

    @d
    async def test_heartbeat_brings_host_back_and_reconciles(self):
        calls = []

        def call(proc, *args):
            calls.append((proc, args))
            if proc.endswith("machine.list"):
                return succeed([{"id": "m1", "state": "running"},
                                {"id": "m3", "state": "running"},
                                {"id": "m4", "state": "running"},
                                {"id": "m5", "state": "stopped"},
                                {"id": "m6", "state": "running"},
                                {"id": "m7", "state": "stopped"}])
            return succeed(None)

        clock, store, reg, published, monitor = await self.cluster(grace=0, call=call)
        # m5 and m6 were destroyed while h2 was unreachable (only their rows could go)
        for mid in ("m5", "m6"):
            await add_machine(store, mid, "h2", "failed")
            await reg.data.machines.delete(await store.get("machines", mid))
        await add_machine(store, "m1", "h2", "running")   # will be failed, then restored
        await add_machine(store, "m2", "h2", "running")   # will be failed, not reported
        await add_machine(store, "m3", "h1", "running")   # rescheduled elsewhere: duplicate
        monitor.startService()
        self.addCleanup(monitor.stopService)
        clock.advance(11)
        await monitor.check()
        self.assertEqual(reg.state("h2"), "offline")
        reg.heartbeat("h2")
        self.assertEqual(reg.state("h2"), "offline")  # re-registration is eventual
        clock.advance(0)  # re-register
        await store.run(lambda db: None)
        for _ in range(20):
            clock.advance(0)
            await store.run(lambda db: None)
        self.assertEqual(reg.state("h2"), "ready")
        self.assertTrue(reg.executor_available("h2"))
        self.assertEqual((await store.get("machines", "m1"))["state"], "running")
        self.assertEqual((await store.get("machines", "m2"))["state"], "failed")
        self.assertIn(("zwrm.agent.h2.machine.stop", ("m3",)), calls)
        # m4 has no record, and the log does not say it was destroyed: stopped, kept
        self.assertIn(("zwrm.agent.h2.machine.stop", ("m4",)), calls)
        # m5 and m6 were: the rest of their destroy (their claims on volumes end); m7,
        # stopped with no record, is left as it is
        gone = [args for proc, args in calls if proc == "zwrm.agent.h2.machine.destroy"]
        self.assertEqual(set(gone), {("m5",), ("m6",)})  # (this fake agent lists them again)
        self.assertNotIn(("zwrm.agent.h2.machine.stop", ("m6",)), calls)
        self.assertFalse([c for c in calls if "m7" in c[1]])
        kinds = [e["kind"] for t, e in published if t == MACHINE_TOPIC]
        self.assertIn("unknown_machine", kinds)
        self.assertIn("duplicate_machine", kinds)
        actions = {e["payload"]["machine_id"]: e["payload"]["action"] for t, e in published
                   if t == MACHINE_TOPIC and e["kind"] == "unknown_machine"}
        self.assertEqual({k: actions[k] for k in ("m4", "m5", "m6")},
                         {"m4": "stopped", "m5": "destroyed", "m6": "destroyed"})

    @d
    async def test_reconcile_settles_planned_stops_a_killed_control_plane_left(self):
        """
        Machines stored stopping at the start (L{HostRegistry.cut_short}: a planned stop the
        process before never ended): running on their ready host, back in the routes; not
        running there, failed and handed to the restart policy (on_cut_short).  One
        stopping that was not so at the start (a stop under way now) is left alone.
        """
        clock, store, reg, published = await make_registry(self)
        await reg.join("h1", FACTS)
        for mid in ("m1", "m2", "m3"):
            await add_machine(store, mid, "h1", "stopping")
        reg.cut_short.update({"m1", "m2"})
        decided = []
        reg.on_cut_short.append(lambda row: decided.append(row["id"]))
        result = await reg.reconcile("h1", [{"id": "m1", "state": "running"},
                                            {"id": "m3", "state": "running"}])
        self.assertEqual((result["put_back"], result["failed"]), (["m1"], ["m2"]))
        self.assertEqual([(await store.get("machines", m))["state"] for m in ("m1", "m2", "m3")],
                         ["running", "failed", "stopping"])
        self.assertEqual(decided, ["m2"])
        self.assertEqual(reg.cut_short, set())

    @d
    async def test_planned_stops_on_a_host_found_offline_fail_with_it(self):
        """
        A machine stored stopping at the start, on a ready host that never comes back:
        found offline, the host fails it as its running machines, and the restart policy
        decides on it (it stayed stopping, its replica placed nowhere, until the host
        returned).  On a draining host it is left to its drain.
        """
        clock, store, reg, published = await make_registry(self)
        await reg.join("h1", FACTS)
        await reg.join("h2", dict(FACTS, name="w2"))
        await reg.hosts.apply_input("h2", "drain_requested")
        await add_machine(store, "m1", "h1", "stopping")
        await add_machine(store, "m2", "h2", "stopping")
        reg.cut_short.update({"m1", "m2"})
        decided = []
        reg.on_cut_short.append(lambda row: decided.append(row["id"]))
        self.assertEqual(await reg.mark_offline("h1"), ["m1"])
        self.assertEqual(await reg.mark_offline("h2"), [])
        self.assertEqual([(await store.get("machines", m))["state"] for m in ("m1", "m2")],
                         ["failed", "stopping"])
        self.assertEqual((decided, reg.cut_short), (["m1"], {"m2"}))

    @d
    async def test_planned_stops_on_a_draining_host_are_its_drains(self):
        """
        On a host that is not ready, a machine stopping since the start may be a live
        drain's original, paused for good: its drain ends it, reconciliation does not.
        """
        clock, store, reg, published = await make_registry(self)
        await reg.join("h1", FACTS)
        await reg.hosts.apply_input("h1", "drain_requested")
        await add_machine(store, "m1", "h1", "stopping")
        reg.cut_short.add("m1")
        result = await reg.reconcile("h1", [{"id": "m1", "state": "running"}])
        self.assertEqual((result["put_back"], result["failed"]), ([], []))
        result = await reg.reconcile("h1", [])
        self.assertEqual((result["put_back"], result["failed"]), ([], []))
        self.assertEqual((await store.get("machines", "m1"))["state"], "stopping")

    @d
    async def test_reconcile_results(self):
        clock, store, reg, published = await make_registry(self)
        await reg.join("h1", FACTS)
        await add_machine(store, "m1", "h1", "failed")
        await add_machine(store, "m2", "h1", "running")
        result = await reg.reconcile("h1", [{"id": "m1", "state": "running"},
                                            {"id": "mx", "state": "running"}])
        self.assertEqual(result, {"restored": ["m1"], "confirmed": [], "put_back": [],
                                  "failed": ["m2"], "duplicate": [], "unknown": ["mx"], "removed": []})
        with self.assertRaises(errors.InvalidArgument):
            await reg.reconcile("h1", "nonsense")

    @d
    async def test_reconcile_leaves_starts_and_stops_under_way(self):
        """
        A machine recorded on this host as pending (its start call is under way) or
        stopping, and reported running, is neither a duplicate nor stopped; one recorded
        stopped is.
        """
        clock, store, reg, published = await make_registry(self)
        await reg.join("h1", FACTS)
        await add_machine(store, "m1", "h1", "pending")
        await add_machine(store, "m2", "h1", "stopping")
        await add_machine(store, "m3", "h1", "stopped")
        result = await reg.reconcile("h1", [{"id": m, "state": "running"}
                                            for m in ("m1", "m2", "m3")])
        self.assertEqual(result, {"restored": [], "confirmed": [], "put_back": [], "failed": [],
                                  "duplicate": ["m3"], "unknown": [], "removed": []})
        self.assertEqual((await store.get("machines", "m1"))["state"], "pending")

    @d
    async def test_restart_keeps_state(self):
        path = tmpdir(self)
        clock, store, reg, published = await make_registry(self, path=path)
        await reg.join("h1", FACTS)
        await reg.transition("h1", "drain_requested")
        await reg.mark_offline("h1")
        await store.stop()
        self.addCleanup(lambda: None)
        clock2, store2, reg2, _ = await make_registry(self, path=path)
        self.assertEqual(reg2.state("h1"), "offline")
        self.assertEqual(reg2.entry("h1").machine.state_before_offline, "draining")
        await reg2.register("h1", {})
        self.assertEqual(reg2.state("h1"), "draining")


class MachineReportTests(TestCase):
    @d
    async def test_reconcile_accepts_executor_statuses(self):
        clock, store, reg, published = await make_registry(self)
        await reg.join("h1", FACTS)
        await add_machine(store, "m1", "h1", "failed")
        result = await reg.reconcile("h1", [{"machine_id": "m1", "state": "running"}])
        self.assertEqual(result["restored"], ["m1"])
