"""
The resource layer (L{zwrm.control.resources}): every update method stores its change and
one event whose payload is the resource's wire form, in one transaction; local subscribers
see each event after it is stored; L{Machines.wait_healthy} follows events, with time from a
Clock.

Real SQLite store (in memory).
"""

import sqlite3

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from zwrm import errors
from zwrm.control.resources import Data, update_methods
from zwrm.control.resources import certs as certs_mod
from zwrm.control.resources import hosts as hosts_mod
from zwrm.control.resources import machines as machines_mod
from zwrm.control.resources.machines import placement_request, volumes_size
from zwrm.control.store import Store


def d(f):
    def wrapper(self):
        return ensureDeferred(f(self))

    wrapper.__name__ = f.__name__
    return wrapper


async def make_data(testcase):
    clock = Clock()
    store = Store(reactor, ":memory:", now=clock.seconds)
    await store.start()
    testcase.addCleanup(store.stop)
    published = []
    data = Data(clock, store, lambda topic, event: published.append((topic, event)))
    return clock, store, data, published


def machine_row(mid="m1", state="pending", health=None, spec=None):
    spec = spec if spec is not None else {
        "app": "web", "replica": 0, "vcpus": 1, "memory_mb": 64, "volumes": [{"id": "v1"}]}
    return {"id": mid, "app_id": "a1", "host_id": "h1", "state": state, "spec": spec,
            "health": health or {"status": "none"}, "created_at": 0.0, "updated_at": 0.0}


def host_record(host_id="h1"):
    """A new host's row, as the registry makes one when it joins."""
    return {"id": host_id, "name": "w1", "region": "eu", "datacenter": "dc1",
            "address": "", "labels": {}, "vcpus": 4, "memory_mb": 1024, "disk_mb": 10,
            "alloc_vcpus": 0, "alloc_memory_mb": 0, "alloc_disk_mb": 0,
            "state": "ready", "state_before_offline": None, "last_heartbeat": 0.0,
            "agent_version": "1", "credential_hash": "x", "joined_at": 0.0}


class StoredThenPublished:
    """A subscriber that reads the subject's row from the store when an event arrives."""

    def __init__(self, store, table):
        self.store, self.table, self.rows = store, table, []

    def __call__(self, event):
        self.rows.append(self.store.get(self.table, event["subject"]))


class MachineResourceTests(TestCase):
    @d
    async def test_one_event_shape_for_every_change(self):
        clock, store, data, published = await make_data(self)
        seen = StoredThenPublished(store, "machines")
        data.machines.subscribe(seen)
        row = machine_row()
        await data.machines.add(row, "placed")
        clock.advance(5)
        await data.machines.set(row, "started", state="running",
                                health={"status": "passing", "host_port": 8080})
        await data.machines.delete(row)
        await data.machines.note_stray("unknown_machine", "m9", "h1")
        events = [e for _, e in published]
        self.assertEqual([e["kind"] for e in events],
                         ["state", "state", "destroyed", "unknown_machine"])
        keys = set(machines_mod.wire(row)) | {"machine_id", "old", "reason"}
        for e in events[:3]:
            self.assertEqual(set(e["payload"]), keys)
        self.assertEqual(set(events[3]["payload"]), keys | {"action"})
        self.assertEqual([(e["payload"]["old"], e["payload"]["state"]) for e in events[:3]],
                         [(None, "pending"), ("pending", "running"), ("running", "destroyed")])
        self.assertEqual(events[1]["payload"]["health"], "passing")  # the status, one schema
        self.assertEqual(events[1]["payload"]["host_port"], 8080)
        # each change was stored before the subscribers heard of it
        stored = [await r for r in seen.rows]
        self.assertEqual([r and r["state"] for r in stored[:3]], ["pending", "running", None])
        logged = {e["id"] for e in await store.select("events")}
        self.assertTrue(all(e["id"] in logged for e in events))

    @d
    async def test_a_change_and_its_event_are_stored_together_or_not_at_all(self):
        """
        A machine's change and its event are one transaction: if the event cannot be
        stored (here SQLite refuses it; a power cut between the two is the same), the change
        is not stored either, and nobody hears of it.  (Stored without its event, a
        machine's failure was never acted on: the healer follows events, and the agent's
        report of it, sent again, found nothing to change.)
        """
        clock, store, data, published = await make_data(self)
        row = machine_row(state="running")
        await data.machines.add(row, "placed")
        await store.run(lambda db: db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON events"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        with self.assertRaises(sqlite3.IntegrityError):
            await data.machines.set(row, "QEMU was killed by signal 9", state="failed")
        self.assertEqual((await data.machines.get("m1"))["state"], "running")
        self.assertEqual([e["payload"]["state"] for _, e in published], ["running"])
        await store.run(lambda db: db.execute("DROP TRIGGER refuse"))
        await data.machines.set(row, "QEMU was killed by signal 9", state="failed")
        self.assertEqual((await data.machines.get("m1"))["state"], "failed")
        [last, *_] = await store.recent_events("m1")
        self.assertEqual((last["payload"]["old"], last["payload"]["state"]), ("running", "failed"))
        self.assertEqual(published[-1][1]["id"], last["id"])

    @d
    async def test_a_machine_added_or_deleted_with_its_event_or_not_at_all(self):
        """The same for a new machine's row and for its deletion."""
        clock, store, data, published = await make_data(self)
        row = machine_row(state="running")
        await store.run(lambda db: db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON events"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        with self.assertRaises(sqlite3.IntegrityError):
            await data.machines.add(row, "placed")
        self.assertIsNone(await data.machines.get("m1"))
        await store.run(lambda db: db.execute("DROP TRIGGER refuse"))
        await data.machines.add(row, "placed")
        await store.run(lambda db: db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON events"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        with self.assertRaises(sqlite3.IntegrityError):
            await data.machines.delete(row)
        self.assertEqual((await data.machines.get("m1"))["state"], "running")
        self.assertEqual([e["kind"] for _, e in published], ["state"])
        await store.run(lambda db: db.execute("DROP TRIGGER refuse"))
        await data.machines.delete(row)
        self.assertIsNone(await data.machines.get("m1"))
        [last, *_] = await store.recent_events("m1")
        self.assertEqual((last["kind"], last["payload"]["old"]), ("destroyed", "running"))
        self.assertEqual(published[-1][1]["id"], last["id"])

    @d
    async def test_a_failing_subscriber_stops_nothing(self):
        clock, store, data, published = await make_data(self)
        seen = []

        def broken(event):
            raise RuntimeError("boom")

        data.machines.subscribe(broken)
        unsubscribe = data.machines.subscribe(seen.append)
        await data.machines.add(machine_row(), "placed")
        self.assertEqual(len(seen), 1)
        self.assertEqual(len(published), 1)
        unsubscribe()
        await data.machines.add(machine_row("m2"), "placed")
        self.assertEqual(len(seen), 1)
        self.assertEqual(len(published), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    @d
    async def test_reads(self):
        """Finding by replica number, a machine's recent events; an app by id."""
        clock, store, data, published = await make_data(self)
        for n in range(3):
            await data.machines.add(machine_row(f"m{n}", spec={"app": "web", "replica": n}),
                                    "placed")
        found = await data.machines.find(app_id="a1", replicas={0, 2})
        self.assertEqual(sorted(m["id"] for m in found), ["m0", "m2"])
        self.assertEqual(await data.machines.find(replicas=set()), [])
        self.assertEqual([e["subject"] for e in await data.machines.recent_events("m1")],
                         ["m1"])
        self.assertIsNone(await data.apps.by_id("a-none"))

    def test_update_methods_are_marked(self):
        data = Data(Clock(), None, lambda t, e: None)
        self.assertEqual(update_methods(data.machines), ["add", "delete", "note_stray", "set"])
        self.assertEqual(update_methods(data.hosts),
                         ["add", "apply_input", "certificate_renewed", "registered", "remove",
                          "set_credential", "set_disk_full", "set_executor"])
        self.assertIn("set_spec", update_methods(data.apps))
        self.assertEqual(update_methods(data.volumes),
                         ["add", "add_replica", "add_snapshot", "creation_failed", "delete",
                          "delete_replica", "delete_schedule", "delete_snapshot",
                          "replica_failed", "replica_made", "restored", "schedule_ran",
                          "set_schedule", "set_state", "snapshot_failed", "snapshot_made"])
        self.assertEqual(update_methods(data.drains),
                         ["add", "commit_volumes", "replica_moved", "save_migration", "set_state",
                          "set_waiting"])


class ChangeWithItsEventTests(TestCase):
    """
    Every resource stores a change and its event in one transaction: when the event cannot
    be stored (SQLite refuses it here; a power cut between the two is the same), no table
    changes and nobody hears of it; then the same call, allowed, stores both and publishes
    the stored event.
    """

    async def refused_then_stored(self, store, published, call, events=1):
        def tables(db):
            names = [r[0] for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT LIKE 'sqlite_%' ORDER BY name")]
            return {n: sorted(map(repr, db.execute(f"SELECT * FROM [{n}]").fetchall()))
                    for n in names}

        before, heard = await store.run(tables), len(published)
        await store.run(lambda db: db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON events"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        with self.assertRaises(sqlite3.IntegrityError):
            await call()
        await store.run(lambda db: db.execute("DROP TRIGGER refuse"))
        self.assertEqual(await store.run(tables), before)
        self.assertEqual(len(published), heard)
        result = await call()
        stored = await store.select("events", order_by="id")
        self.assertEqual([e["id"] for _, e in published[heard:]],
                         [e["id"] for e in stored[-events:]])
        self.assertEqual(len(published), heard + events)
        return result

    @d
    async def test_hosts_apps_volumes_drains_and_certificates(self):
        clock, store, data, published = await make_data(self)
        once = self.refused_then_stored
        record = host_record()
        await once(store, published, lambda: data.hosts.add(record))
        self.assertIn("h1", data.hosts)
        await once(store, published, lambda: data.hosts.registered("h1", {"vcpus": 8}))

        app = {"id": "a1", "name": "web", "spec": None, "created_at": 0.0}
        await once(store, published, lambda: data.apps.add(app))
        await once(store, published, lambda: data.apps.set_spec(app, {"replicas": 1}))
        self.assertEqual((app["spec_version"], published[-1][1]["payload"]["spec_version"]),
                         (1, 1))

        vol = {"id": "v1", "app_id": "a1", "host_id": "h1", "name": "data", "replica": 0,
               "size_mb": 8, "mount": "/data", "state": "creating", "created_at": 0.0}
        await once(store, published, lambda: data.volumes.add(vol))
        await once(store, published, lambda: data.volumes.set_state(vol, "ready"))
        self.assertEqual(vol["state"], "ready")
        sched = {"id": "a1", "app_id": "a1", "every": 3600.0, "keep": None, "replicate": 0,
                 "next_at": 0.0, "last_at": None, "last_error": None, "created_at": 0.0}
        await once(store, published, lambda: data.volumes.set_schedule(sched, "every 3600s"))
        await once(store, published, lambda: data.volumes.schedule_ran(
            sched, {"last_at": 0.0, "last_error": None, "next_at": 3600.0}, "1 of 1"))
        self.assertEqual(sched["next_at"], 3600.0)
        await once(store, published, lambda: data.volumes.delete_schedule(sched, "unscheduled"))

        drain = {"id": "d1", "host_id": "h1", "state": "running", "options": {},
                 "created_at": 0.0, "updated_at": 0.0}
        mg = {"id": "mg1", "drain_id": "d1", "machine_id": "m1", "source_host": "h1",
              "target_host": "h2", "phase": "planned", "bytes_sent": 0, "bytes_total": 0,
              "error": None, "updated_at": 0.0, "detail": {"volumes": ["v1"]}}
        await once(store, published, lambda: data.drains.add(drain, [mg]))
        await once(store, published,
                   lambda: data.drains.save_migration(mg, phase="bulk_copying"))
        await once(store, published, lambda: data.drains.set_waiting(
            mg, {"volumes": ["v1"], "waiting": {"host": "h2"}}, "waiting for h2"))
        await once(store, published, lambda: data.drains.commit_volumes(mg, ["v1"]),
                   events=2)
        self.assertEqual([(t, e["kind"]) for t, e in published[-2:]],
                         [("zwrm.event.drain", "migration"),
                          ("zwrm.event.machine", "volume_moved")])
        await once(store, published, lambda: data.drains.set_state(drain, "completed"))

        await once(store, published, lambda: data.volumes.delete(vol))
        app2 = {"id": "a2", "name": "db", "spec": None, "created_at": 0.0}
        await once(store, published, lambda: data.apps.add(app2))
        await once(store, published, lambda: data.apps.delete(app2))
        # an app's destroy deletes its schedule with its row, in one transaction
        await once(store, published, lambda: data.volumes.set_schedule(sched, "every 3600s"))
        await once(store, published, lambda: data.apps.delete(app, sched, data.volumes),
                   events=2)
        self.assertEqual([(t, e["kind"]) for t, e in published[-2:]],
                         [("zwrm.event.machine", "snapshot_schedule_destroyed"),
                          ("zwrm.event.app", "destroyed")])
        self.assertEqual(await store.select("snapshot_schedules"), [])
        await once(store, published, lambda: data.hosts.remove("h1", "retired"))
        self.assertNotIn("h1", data.hosts)

        certs = certs_mod.Certs(clock, store, lambda t, e: published.append((t, e)))
        info = {"names": ["www.example.test"], "subject": "s", "issuer": "i",
                "not_before": "a", "not_after": "b", "fingerprint": "f"}
        await once(store, published, lambda: certs.put("www.example.test", "C", "K", info))
        await once(store, published, lambda: certs.remove("www.example.test"))


class PlacementRequestTests(TestCase):
    def test_one_translation(self):
        spec = {"vcpus": 2, "memory_mb": 512, "region": "eu", "datacenter": None,
                "constraints": {"disk": "ssd"},
                "volumes": [{"id": "v1", "size_mb": 8}, {"id": "v2", "size_mb": 4}]}
        r = placement_request(spec, pinned_host="h1", disk_mb=volumes_size(spec))
        self.assertEqual((r.vcpus, r.memory_mb, r.disk_mb, r.region, r.datacenter,
                          r.pinned_host, r.constraints),
                         (2, 512, 12, "eu", None, "h1", {"disk": "ssd"}))
        self.assertEqual(placement_request(spec).disk_mb, 0)
        with self.assertRaises(errors.InvalidArgument):
            placement_request(dict(spec, vcpus=0))


class WaitHealthyTests(TestCase):
    async def waiting(self, deadline=60, min_healthy=10, health_check=True):
        clock, store, data, published = await make_data(self)
        spec = {"app": "web", "replica": 0, "volumes": [],
                "health": {"type": "tcp"} if health_check else None}
        row = machine_row(spec=spec, state="starting")
        await data.machines.add(row, "placed")
        waiting = ensureDeferred(data.machines.wait_healthy("m1", deadline, min_healthy))
        await store.run(lambda db: None)  # its read of the row
        return clock, data, row, waiting

    @d
    async def test_healthy_for_min_healthy_on_end(self):
        clock, data, row, waiting = await self.waiting()
        clock.advance(1)
        await data.machines.set(row, "up", state="running", health={"status": "passing"})
        clock.advance(9)
        await data.machines.set(row, "check", health={"status": "failing"})
        clock.advance(5)
        await data.machines.set(row, "check", health={"status": "passing"})  # at 15
        clock.advance(9.9)
        self.assertFalse(waiting.called)
        clock.advance(0.1)
        self.assertEqual(self.successResultOf(waiting), 1)  # when it first passed
        self.assertEqual(clock.getDelayedCalls(), [])

    @d
    async def test_running_without_a_check_is_enough(self):
        clock, data, row, waiting = await self.waiting(min_healthy=0, health_check=False)
        self.assertFalse(waiting.called)
        clock.advance(2)
        await data.machines.set(row, "up", state="running")
        self.assertEqual(self.successResultOf(waiting), 2)

    @d
    async def test_failed_gone_or_too_late(self):
        clock, data, row, waiting = await self.waiting()
        await data.machines.set(row, "crashed", state="failed")
        self.failureResultOf(waiting, errors.Unavailable)

        clock, data, row, waiting = await self.waiting()
        await data.machines.delete(row)
        self.failureResultOf(waiting, errors.NotFound)

        clock, data, row, waiting = await self.waiting(deadline=30)
        clock.advance(29)
        self.assertFalse(waiting.called)
        clock.advance(1)
        f = self.failureResultOf(waiting, errors.Unavailable)
        self.assertIn("within 30s", f.value.message)
        self.assertEqual(clock.getDelayedCalls(), [])

    @d
    async def test_too_late_through_restarts_says_why_it_last_exited(self):
        """A machine that fails at each start: the message gives its last exit's reason."""
        clock, store, data, published = await make_data(self)
        row = machine_row(spec={"app": "web", "replica": 0, "volumes": [], "health": None},
                          state="starting")
        await data.machines.add(row, "placed")
        waiting = ensureDeferred(data.machines.wait_healthy("m1", 30, 10, through_restarts=True))
        await store.run(lambda db: None)
        why = "image old/vm:1: its kernel layer sha256:ab is not an x86 kernel QEMU can boot"
        await data.machines.set(row, why, state="failed", health={"status": "none", "restart": {
            "count": 2, "reason": why, "next_at": clock.seconds() + 60}})
        clock.advance(30)
        f = self.failureResultOf(waiting, errors.Unavailable)
        self.assertEqual(f.value.message,
                         f"machine m1 was not healthy within 30s (state failed, health none; "
                         f"restarted 2 time(s); last exit: {why})")

    @d
    async def test_no_such_machine(self):
        clock, store, data, published = await make_data(self)
        with self.assertRaises(errors.NotFound):
            await data.machines.wait_healthy("m-none", 10, 0)
        self.assertEqual(data.machines._subscribers, [])


class HostResourceTests(TestCase):
    @d
    async def test_host_events_carry_the_wire_form(self):
        clock, store, data, published = await make_data(self)
        record = host_record()
        seen = StoredThenPublished(store, "hosts")
        data.hosts.subscribe(seen)
        await data.hosts.add(record)
        await data.hosts.registered("h1", {"vcpus": 8})
        await data.hosts.apply_input("h1", "heartbeat_lost", executor=False)
        await data.hosts.apply_input("h1", "heartbeat_lost")  # no change: no event
        await data.hosts.set_credential("h1", "y")  # a secret's hash: no event
        events = [e for _, e in published]
        self.assertEqual([e["kind"] for e in events], ["joined", "registered", "state"])
        keys = set(hosts_mod.wire(data.hosts.entry("h1"))) | {"host_id", "old", "reason"}
        for e in events:
            self.assertEqual(set(e["payload"]), keys)
            self.assertNotIn("credential_hash", e["payload"])
        self.assertEqual([(e["payload"]["state"], e["payload"]["executor"]) for e in events],
                         [("ready", False), ("ready", True), ("offline", False)])
        self.assertEqual(events[1]["payload"]["vcpus"], 8)
        stored = [await r for r in seen.rows]
        self.assertEqual([(r["state"], r["vcpus"]) for r in stored],
                         [("ready", 4), ("ready", 8), ("offline", 8)])


class HostChangeNotStoredTests(TestCase):
    """
    A host's change that cannot be stored (the control plane's disk is full; here SQLite
    refuses its event) changes nothing, in memory either: its state, row and executor flag
    stay as they were, and the same change is made once it can be stored.
    """

    @d
    async def test_a_state_or_a_registration_not_stored_changes_nothing(self):
        clock, store, data, published = await make_data(self)
        record = host_record()
        await data.hosts.add(record)
        entry = data.hosts.entry("h1")

        async def refused(call):
            await store.run(lambda db: db.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON events"
                " BEGIN SELECT RAISE(ABORT, 'refused'); END"))
            try:
                with self.assertRaises(sqlite3.IntegrityError):
                    await call()
            finally:
                await store.run(lambda db: db.execute("DROP TRIGGER refuse"))

        def seen():
            return (entry.machine.state, entry.record["state"], entry.record["vcpus"],
                    entry.executor, len(published))

        await refused(lambda: data.hosts.registered("h1", {"vcpus": 8}))
        self.assertEqual(seen(), ("ready", "ready", 4, False, 1))
        await data.hosts.registered("h1", {"vcpus": 8})
        self.assertEqual(seen(), ("ready", "ready", 8, True, 2))
        await refused(lambda: data.hosts.apply_input("h1", "drain_requested"))
        self.assertEqual(seen(), ("ready", "ready", 8, True, 2))
        await refused(lambda: data.hosts.apply_input("h1", "heartbeat_lost", executor=False))
        self.assertEqual(seen(), ("ready", "ready", 8, True, 2))
        self.assertEqual((await store.get("hosts", "h1"))["state"], "ready")
        await data.hosts.apply_input("h1", "drain_requested")
        self.assertEqual(seen(), ("draining", "draining", 8, True, 3))
        self.assertEqual((await store.get("hosts", "h1"))["state"], "draining")

        # a new credential (a host joining again) is the host's once stored
        await store.run(lambda db: db.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON hosts"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        with self.assertRaises(sqlite3.IntegrityError):
            await data.hosts.set_credential("h1", "y")
        await store.run(lambda db: db.execute("DROP TRIGGER refuse"))
        self.assertEqual(entry.record["credential_hash"], "x")
        await data.hosts.set_credential("h1", "y")
        self.assertEqual(entry.record["credential_hash"], "y")
        self.assertEqual((await store.get("hosts", "h1"))["credential_hash"], "y")
        self.assertEqual(data.hosts._changing, {})  # no lock kept once changes are done


class AppSpecVersionTests(TestCase):
    @d
    async def test_every_spec_is_kept_as_a_version(self):
        clock, store, data, published = await make_data(self)
        row = {"id": "a1", "name": "web", "spec": None, "created_at": 0.0}
        await data.apps.add(row)
        self.assertEqual(published[-1][1]["payload"]["spec_version"], 0)
        await data.apps.set_spec(row, {"replicas": 1}, "deployed")
        clock.advance(1)
        await data.apps.set_spec(row, {"replicas": 3}, "scaled", replicas=3)
        await data.apps.set_spec(row, None, "destroyed", volumes_kept=True)
        self.assertEqual([e["payload"]["spec_version"] for _, e in published], [0, 1, 2, 2])
        self.assertEqual([(v["version"], v["spec"], v["created_at"])
                          for v in await data.apps.spec_versions("a1")],
                         [(1, {"replicas": 1}, 0.0), (2, {"replicas": 3}, 1.0)])
        stored = await data.apps.by_name("web")
        self.assertEqual((stored["spec"], stored["spec_version"]), (None, 2))

    def test_the_migration_keeps_deployed_specs_as_version_1(self):
        import sqlite3

        import sqlite_utils

        from zwrm.control.store import MIGRATIONS, migrate

        db = sqlite_utils.Database(sqlite3.connect(":memory:", isolation_level=None))
        migrate(db, MIGRATIONS[:4])
        db["apps"].insert({"id": "a1", "name": "web", "spec": '{"replicas": 2}',
                           "created_at": 5.0})
        db["apps"].insert({"id": "a2", "name": "new", "spec": None, "created_at": 6.0})
        migrate(db)
        self.assertEqual(
            [(r["id"], r["spec_version"]) for r in db["apps"].rows_where(order_by="id")],
            [("a1", 1), ("a2", 0)])
        self.assertEqual(list(db["app_specs"].rows),
                         [{"app_id": "a1", "version": 1, "spec": '{"replicas": 2}',
                           "created_at": 5.0}])


class DrainResourceTests(TestCase):
    async def started(self):
        clock, store, data, published = await make_data(self)
        await store.insert("volumes", {"id": "v1", "app_id": "a1", "host_id": "h-src",
                                       "name": "data", "replica": 0, "size_mb": 8,
                                       "mount": "/data", "state": "ready", "created_at": 0.0})
        drain = {"id": "d1", "host_id": "h-src", "state": "running",
                 "options": {"max_parallel": 1}, "created_at": 0.0, "updated_at": 0.0}
        mg = {"id": "mg1", "drain_id": "d1", "machine_id": "m1", "source_host": "h-src",
              "target_host": "h-dst", "phase": "planned", "bytes_sent": 0, "bytes_total": 0,
              "error": None, "updated_at": 0.0, "detail": {"volumes": ["v1"]}}
        await data.drains.add(drain, [mg], plan=[{"machine_id": "m1", "target": "h-dst"}])
        return clock, store, data, published, drain, mg

    @d
    async def test_stored_then_announced(self):
        clock, store, data, published, drain, mg = await self.started()
        self.assertEqual(published[-1][1]["kind"], "started")
        self.assertEqual(published[-1][1]["payload"]["plan"][0]["target"], "h-dst")
        self.assertEqual((await data.drains.get("d1"))["options"], {"max_parallel": 1})
        [stored] = await data.drains.migrations("d1")
        self.assertEqual(stored["detail"], {"volumes": ["v1"]})

        clock.advance(1)
        await data.drains.save_migration(mg, phase="bulk_copying")
        await data.drains.save_migration(mg, bytes_sent=10, detail={"volumes": ["v1"], "x": 1})
        kinds = [e["kind"] for _, e in published]
        self.assertEqual(kinds, ["started", "migration"])  # progress is not announced
        e = published[-1][1]
        self.assertEqual((e["payload"]["old"], e["payload"]["phase"], e["payload"]["target"]),
                         ("planned", "bulk_copying", "h-dst"))
        self.assertNotIn("detail", e["payload"])
        [stored] = await data.drains.migrations("d1")
        self.assertEqual((stored["bytes_sent"], stored["detail"]["x"]), (10, 1))

        await data.drains.set_state(drain, "completed")
        e = published[-1][1]
        self.assertEqual((e["kind"], e["payload"]["old"], e["payload"]["state"]),
                         ("state", "running", "completed"))
        self.assertEqual((await data.drains.find(host_id="h-src"))[0]["state"], "completed")

    @d
    async def test_commit_moves_the_volumes_and_the_phase_together(self):
        clock, store, data, published, drain, mg = await self.started()
        seen = StoredThenPublished(store, "volumes")
        data.volumes.subscribe(seen)
        await data.drains.commit_volumes(mg, ["v1"])
        self.assertEqual((await store.get("volumes", "v1"))["host_id"], "h-dst")
        self.assertEqual((await data.drains.migrations("d1"))[0]["phase"], "committing")
        kinds = [(t, e["kind"]) for t, e in published]
        self.assertEqual(kinds[-2:], [("zwrm.event.drain", "migration"),
                                      ("zwrm.event.machine", "volume_moved")])
        self.assertEqual(published[-1][1]["payload"]["from"], "h-src")
        self.assertEqual((await seen.rows[0])["host_id"], "h-dst")

    @d
    async def test_a_commit_that_fails_moves_nothing(self):
        clock, store, data, published, drain, mg = await self.started()
        with self.assertRaises(errors.NotFound):
            await data.drains.commit_volumes(mg, ["v1", "v-gone"])
        self.assertEqual((await store.get("volumes", "v1"))["host_id"], "h-src")
        self.assertEqual((await data.drains.migrations("d1"))[0]["phase"], "planned")
        self.assertEqual(mg["phase"], "planned")
        self.assertEqual([e["kind"] for _, e in published], ["started"])
