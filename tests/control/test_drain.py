"""
Host drains: the two Automat machines (every state x every input, a restart in each state),
and the drain runner over real executors (fake hypervisor driver, real volume stores and
real volume streams over TLS on loopback), with the control plane's time on a Clock.
"""

import hashlib
import inspect
import json
import os
import sqlite3
import types
from itertools import product

from autobahn.wamp.exception import ApplicationError
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.control.test_apps import Cluster, d, procedures
from zwrm import errors, pki
from zwrm.agent.executor import Executor
from zwrm.agent.transfer import VolumeTransfers
from zwrm.agent.volumes import VolumeStore
from zwrm.control.drain import DRAIN_TOPIC, Drains
from zwrm.control.migration import (
    DRAIN_INPUTS,
    DRAIN_STATES,
    DRAIN_TERMINAL,
    MIGRATION_INPUTS,
    MIGRATION_PHASES,
    MIGRATION_TERMINAL,
    RUNNER_INPUTS,
    RUNNER_STATES,
    Drain,
    Migration,
    Runner,
)
from zwrm.drivers.fake import FakeDriver, FakeHost

MiB = 1024 * 1024


def feed(machine, name):
    fn = getattr(machine, name)
    if name in ("step_failed", "give_up", "fall_back", "moved"):
        return fn("why")
    return fn()


class MigrationMachineTests(SynchronousTestCase):
    def test_every_phase_handles_every_input(self):
        for phase, name in product(MIGRATION_PHASES, MIGRATION_INPUTS):
            m = Migration.restore(phase)
            feed(m, name)  # never raises: every state handles every input
            self.assertIn(m.phase, MIGRATION_PHASES)
            if phase in MIGRATION_TERMINAL:
                self.assertEqual((m.phase, m.outbox), (phase, []), (phase, name))

    def test_restart_in_each_phase_runs_its_step_again(self):
        for phase in MIGRATION_PHASES:
            m = Migration.restore(phase)
            m.restart()
            self.assertEqual(m.phase, phase)
            if phase in MIGRATION_TERMINAL or phase == "planned":
                self.assertEqual(m.outbox, [])
            else:
                self.assertEqual([(a, p) for a, p, _ in m.outbox], [("enter", phase)])

    def test_volume_path(self):
        m = Migration()
        m.start_copy()
        for _ in range(7):
            m.step_done()
        self.assertEqual([p for _, p, _ in m.outbox], [
            "bulk_copying", "stopping_source", "delta_copying", "starting_replacement",
            "waiting_healthy", "committing", "cleaning", "done"])

    def test_no_volume_path_starts_the_replacement_first(self):
        m = Migration()
        m.start_replacement()
        self.assertEqual(m.phase, "starting_replacement")

    def test_failure_before_commit_rolls_back_after_commit_does_not(self):
        for phase in ("bulk_copying", "stopping_source", "delta_copying",
                      "starting_replacement", "waiting_healthy", "committing"):
            m = Migration.restore(phase)
            m.step_failed("boom")
            self.assertEqual(m.phase, "rolling_back")
            self.assertEqual(m.outbox, [("enter", "rolling_back", "boom")])
            m.step_done()
            self.assertEqual(m.phase, "rolled_back")
        m = Migration.restore("cleaning")
        m.step_failed("agent gone")
        self.assertEqual(m.phase, "done")
        self.assertIn("agent gone", m.outbox[0][2])
        m = Migration.restore("rolling_back")
        m.step_failed("worse")
        self.assertEqual(m.phase, "failed")

    def test_cancel(self):
        expect = {"planned": "not_moved", "bulk_copying": "rolling_back",
                  "stopping_source": "stopping_source", "waiting_healthy": "waiting_healthy"}
        for phase, after in expect.items():
            m = Migration.restore(phase)
            m.cancel()
            self.assertEqual(m.phase, after)

    def test_give_up_only_before_start(self):
        m = Migration()
        m.give_up("deadline")
        self.assertEqual((m.phase, m.outbox), ("not_moved", [("enter", "not_moved", "deadline")]))
        m = Migration.restore("bulk_copying")
        m.give_up("deadline")
        self.assertEqual((m.phase, m.outbox), ("bulk_copying", []))

    def test_unknown_phase(self):
        self.assertRaises(ValueError, Migration.restore, "flying")


class DrainMachineTests(SynchronousTestCase):
    def test_every_state_handles_every_input(self):
        for state, name in product(DRAIN_STATES, DRAIN_INPUTS):
            m = Drain.restore(state)
            getattr(m, name)()
            self.assertIn(m.state, DRAIN_STATES)

    def test_restart_in_each_state(self):
        outs = {}
        for state in DRAIN_STATES:
            m = Drain.restore(state)
            m.restart()
            self.assertEqual(m.state, state)
            outs[state] = [a for a, _ in m.outbox]
        self.assertEqual(outs, {"running": ["launch"], "cancelling": ["cancel_all", "launch"],
                                "completed": [], "incomplete": [], "cancelled": []})

    def test_paths(self):
        m = Drain()
        m.start()
        m.migration_ended()
        m.all_moved()
        self.assertEqual(m.state, "completed")
        m = Drain()
        m.some_not_moved()
        self.assertEqual(m.state, "incomplete")
        m.cancel()
        self.assertEqual(m.state, "cancelled")
        m = Drain()
        m.deadline()
        self.assertEqual([a for a, _ in m.outbox], ["expire", "launch"])
        m.cancel()
        m.all_moved()
        self.assertEqual(m.state, "cancelled")
        for state in DRAIN_TERMINAL:
            self.assertIn(state, DRAIN_STATES)


class RunnerMachineTests(SynchronousTestCase):
    """The runner of one migration's outbox: its whole table, state x input."""

    # state -> input -> (new state, what it says to do)
    TABLE = {
        "idle": {"work": ("storing", "take"), "stop": ("stopped", "halt")},
        "storing": {"work": ("storing", "busy"), "stored_note": ("idle", "next"),
                    "stored_end": ("idle", "migration_ended"),
                    "stored_phase": ("stepping", "run_step"), "stop": ("stopped", "halt")},
        "stepping": {"work": ("stepping", "busy"), "step_succeeded": ("idle", "step_done"),
                     "step_failed": ("idle", "step_failed"),
                     "step_cancelled": ("stopped", "halt"),
                     "stop": ("stopped", "cancel_step")},
        "stopped": {name: ("stopped", "halt") for name in RUNNER_INPUTS},
    }

    def runner_in(self, state):
        r = Runner()
        path = {"idle": [], "storing": ["work"], "stepping": ["work", "stored_phase"],
                "stopped": ["stop"]}[state]
        for name in path:
            getattr(r, name)()
        self.assertEqual(r.state, state)
        return r

    def test_every_state_handles_every_input_as_the_table_says(self):
        self.assertEqual(set(self.TABLE), set(RUNNER_STATES))
        for state, name in product(RUNNER_STATES, RUNNER_INPUTS):
            r = self.runner_in(state)
            said = getattr(r, name)()
            expected = self.TABLE[state].get(name, (state, None))  # else: a no-op
            self.assertEqual((r.state, said), (expected[0], [expected[1]]), (state, name))

    def test_a_migration_worked_through(self):
        r = Runner()
        said = [r.work(), r.stored_phase(), r.work(), r.step_failed(), r.work(),
                r.stored_end(), r.work(), r.stored_note()]
        self.assertEqual([x for [x] in said], ["take", "run_step", "busy", "step_failed",
                                               "take", "migration_ended", "take", "next"])
        self.assertEqual(r.state, "idle")


class DrainCluster(Cluster):
    """L{Cluster} whose executors can move volumes, and a L{Drains} on the Clock."""

    ca = None

    async def start(self, hosts=("h-a", "h-b"), **facts):
        self.ca = pki.CertificateAuthority.create()
        self.transfers = {}
        self.probes = {}
        await Cluster.start(self, hosts, **facts)
        self.drains = Drains(self.clock, self.store, self.registry, self.apps, self.publish)
        return self

    async def add_host(self, host_id, **facts):
        await self.registry.join(host_id, dict(facts or {}, name=host_id) | _facts())
        await self.registry.register(host_id, dict(_facts(), name=host_id))
        root = os.path.join(self.dir, host_id)
        cert, key = self.ca.issue_host(host_id, names=("127.0.0.1",))
        creds = pki.HostCredentials(self.ca.certificate_pem, cert, key)
        store = VolumeStore(reactor, os.path.join(root, "vols"))
        transfers = VolumeTransfers(reactor, store, creds, retries=1, backoff=(0.01, 0.01))
        await transfers.listen()
        self.t.addCleanup(transfers.receiver.stopService)
        self.transfers[host_id] = transfers
        driver = FakeDriver(reactor, os.path.join(root, "machines"),
                            host=FakeHost(powerdown_delay=0.01))

        def probe(r, spec, port, host_id=host_id):
            return lambda: succeed(self.probes.get(host_id))  # None: passing

        ex = Executor(reactor, host_id, driver, store,
                      lambda event, h=host_id: self.report(h, event), data_dir=root,
                      transfers=transfers, health_probe=probe)
        self.t.addCleanup(ex.close)
        self.executors[host_id] = (ex, procedures(ex))

    #: whether the agents announce copy progress (L{False}: agents from before that)
    announces = True

    def call(self, procedure, *args, options=None, **kwargs):
        """
        L{Cluster.call}, with WAMP progressive results: a caller's C{on_progress} gets what
        the procedure passes to C{details.progress} (as it crossed the wire).
        """
        on_progress = getattr(options, "on_progress", None)
        if on_progress is not None and self.announces:
            verb = procedure.split(".", 3)[3]
            _, procs = self.executors[procedure.split(".")[2]]
            fn = procs[verb]
            if "details" in inspect.signature(fn).parameters:
                def wire(f):
                    if isinstance(f.value, errors.ZwrmError):
                        e = f.value
                        raise ApplicationError(e.uri, *e.args, **(e.kwargs or {}))
                    return f

                details = types.SimpleNamespace(
                    progress=lambda *a, **kw: on_progress(*json.loads(json.dumps(a)),
                                                          **json.loads(json.dumps(kw))))
                self.calls.append((procedure.split(".")[2], verb))
                args, kwargs = json.loads(json.dumps([args, kwargs]))
                return maybeDeferred(fn, *args, details=details, **kwargs).addCallbacks(
                    lambda r: json.loads(json.dumps(r)), wire)
        return Cluster.call(self, procedure, *args, **kwargs)

    def store_of(self, host_id):
        return self.executors[host_id][0].volumes

    def real_work(self):
        """
        Whether a real part is busy: a store query, a job in the reactor's thread pool
        (volume I/O, digests), a volume stream, a real timer due now (the fake hypervisors'
        power-downs, the senders' retries).
        """
        pools = (self.store._pool, reactor.getThreadPool())
        if any(p.working or p._queue.qsize() for p in pools):
            return True
        if any(t.receiver._connections for t in self.transfers.values()):
            return True
        if any(not p["finished"] for ex, _ in self.executors.values()
               for p in ex._outgoing.values()):
            return True
        now = reactor.seconds()
        return any(c.getTime() - now < 0.05 for c in reactor.getDelayedCalls())

    async def quiet(self, seconds=30.0):
        """
        Wait (a bounded poll of the real reactor) until the real parts are idle for three
        turns of the reactor in a row.
        """
        idle = 0
        deadline = reactor.seconds() + seconds
        while idle < 3:
            if reactor.seconds() > deadline:
                raise AssertionError(f"the real parts were still busy after {seconds}s")
            busy = self.real_work()
            idle = 0 if busy else idle + 1
            await deferLater(reactor, 0.001 if busy else 0, lambda: None)

    async def step(self, most=None):
        """
        Once the real parts are idle, move the control plane's Clock to its next timer
        (by C{most} seconds at most): the Clock moves only while the control plane waits
        for it, so the time it measures does not depend on how fast the machine is.
        @return: whether the Clock moved.
        """
        await self.quiet()
        calls = self.clock.getDelayedCalls()
        if not calls:
            await deferLater(reactor, 0.001, lambda: None)  # waiting for real work only
            return False
        left = max(0.0, min(c.getTime() for c in calls) - self.clock.seconds())
        self.clock.advance(left if most is None else min(left, most))
        return True

    async def settle(self, d, seconds=60.0):
        """Step the Clock until C{d} fires (within C{seconds} of real time)."""
        deadline = reactor.seconds() + seconds
        while not d.called:
            if reactor.seconds() > deadline:
                raise AssertionError(f"did not settle within {seconds}s")
            await self.step()


def corrupt_sends(c, host, which=lambda path: True):
    """
    Corrupt a block in flight in the streams C{host} sends of the files C{which(path)}
    picks: the sender's data frames for offset 0 are altered.
    """
    sender = c.transfers[host].sender
    real_send = sender.send

    def corrupting(host, port, token, path, target, **kw):
        from zwrm.agent import transfer

        if not which(path):
            return real_send(host, port, token, path, target, **kw)
        orig = transfer._SenderProtocol.frameData

        def bad(proto, offset, data):
            if offset == 0:
                data = b"\xff" + bytes(data)[1:]
            return orig(proto, offset, data)

        transfer._SenderProtocol.frameData = bad
        d = real_send(host, port, token, path, target, **kw)

        def restore(r):
            transfer._SenderProtocol.frameData = orig
            return r

        return d.addBoth(restore)

    sender.send = corrupting


def lose_target_after_the_delta(c, src, dst):
    """Host C{dst} is lost (unreachable) once C{src}'s delta copy to it is done."""
    _, procs = c.executors[src]
    send = procs["volume.send"]

    def send_then_lose_target(*a, **kw):
        result = send(*a, **kw)
        if kw.get("mode") == "delta":
            def lose(r):
                c.registry.entry(dst).executor = False
                return r
            result.addCallback(lose)
        return result

    procs["volume.send"] = send_then_lose_target


def lost_before(c, phase, host):
    """Host C{host} is lost (its agent gone, its VMs running on) right before C{phase}'s step."""
    step = getattr(c.drains, "_step_" + phase)

    async def lose_first(drain, run):
        await c.registry.mark_offline(host)
        return await step(drain, run)

    setattr(c.drains, "_step_" + phase, lose_first)


def _facts():
    from tests.control.helpers import FACTS
    return dict(FACTS)


async def drain_and_wait(c, host, **kw):
    """Drain C{host} until the drain ends. @return: (the call's answer, the drain's status)."""
    kw.setdefault("min_healthy", 2)
    kw.setdefault("healthy_deadline", 30)
    kw.setdefault("stop_timeout", 5)
    result = await c.drains.drain(host, **kw)
    run = c.drains.active.get(host)
    if run is not None:
        await c.settle(run.done)
    return result, await c.drains.drain_status(host)


async def restart(testcase, c, src):
    """The control plane dies (its drains stop) and a new one resumes; wait for the end."""
    c.drains.stop()
    c.drains = Drains(c.clock, c.store, c.registry, c.apps, c.publish)
    testcase.assertEqual(await c.drains.resume(), 1)
    await c.settle(c.drains.active[src].done)
    return await c.drains.drain_status(src)


async def crash_and_resume(testcase, c, src, phase, after):
    """
    Drain C{src}; the control plane dies right after storing C{phase} (before its step
    acts), or with C{after} right after the step acted (before the next phase is stored);
    a new one resumes. @return: the drain's status once it ended.
    """
    from twisted.internet.defer import CancelledError

    step = getattr(c.drains, "_step_" + phase)
    crashed = []

    async def crash(drain, run):
        if after:
            await step(drain, run)
        crashed.append(True)
        raise CancelledError()

    setattr(c.drains, "_step_" + phase, crash)
    await c.drains.drain(src, min_healthy=1, healthy_deadline=30, stop_timeout=5)
    for _ in range(3000):
        if crashed:
            break
        await c.step()
    where = f"crash {'after' if after else 'before'} {phase}"
    testcase.assertEqual((await c.store.select("migrations"))[0]["phase"], phase, where)
    return await restart(testcase, c, src)


def write_known(path, seed, offsets=(0, 5 * MiB, 17 * MiB)):
    """Write recognizable blocks into a volume image; @return: its SHA-256."""
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            f.write(hashlib.sha256(f"{seed}-{off}".encode()).digest() * 4096)
    return sha(path)


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


class DrainRunTests(TestCase):
    timeout = 120

    async def deploy(self, c, name="db", volumes=True, **kw):
        await c.apps.create_app(name)
        spec = c.spec(**kw)
        if volumes:
            spec["volumes"] = [{"name": "data", "size_mb": 32, "mount": "/data"}]
        status = await c.apps.deploy(name, spec)
        return status["machines"][0]

    def drain(self, c, host, **kw):
        return drain_and_wait(c, host, **kw)

    @d
    async def test_dry_run_plans_and_changes_nothing(self):
        c = await DrainCluster(self).start()
        m = await self.deploy(c, volumes=False)
        await self.deploy(c, "big", volumes=False, memory_mb=15000, replicas=1)
        src = m["host_id"]
        plan = await c.drains.drain(src, dry_run=True)
        self.assertEqual(plan["state"], "dry_run")
        by_machine = {p["machine_id"]: p for p in plan["plan"]}
        other = "h-b" if src == "h-a" else "h-a"
        self.assertEqual(by_machine[m["id"]]["target"], other)
        self.assertEqual(c.registry.entry(src).machine.state, "ready")
        self.assertEqual(await c.store.select("drains"), [])

    @d
    async def test_a_drain_that_cannot_be_stored_changes_nothing(self):
        """
        Its rows cannot be stored (the control plane's disk is full; here SQLite refuses
        them): the drain fails, and its host is ready again, its targets' reservations
        given back, nothing of it stored; the same drain then runs.
        """
        c = await DrainCluster(self).start()
        m = await self.deploy(c, volumes=False)
        src = m["host_id"]
        other = "h-b" if src == "h-a" else "h-a"
        used = c.apps.placements.scheduler.host(other).used_vcpus
        await c.store.run(lambda db: db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON drains"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        with self.assertRaises(sqlite3.IntegrityError):
            await c.drains.drain(src)
        await c.store.run(lambda db: db.execute("DROP TRIGGER refuse"))
        self.assertEqual(c.registry.entry(src).machine.state, "ready")
        self.assertEqual((await c.store.get("hosts", src))["state"], "ready")
        self.assertEqual(c.apps.placements.scheduler.host(other).used_vcpus, used)
        self.assertEqual(await c.store.select("drains"), [])
        self.assertNotIn(src, c.drains.active)
        await self.drain(c, src)
        self.assertEqual(c.registry.entry(src).machine.state, "drained")

    @d
    async def test_a_drain_not_stored_whose_host_cannot_be_made_ready_says_so(self):
        """The host's undrain cannot be stored either: one line says it stays draining."""
        c = await DrainCluster(self).start()
        m = await self.deploy(c, volumes=False)
        src = m["host_id"]
        transition = c.drains._hosts.transition

        async def full(host_id, input_name):
            if input_name == "undrain_requested":
                raise errors.ResourceExhausted("the control plane's disk is full")
            return await transition(host_id, input_name)

        c.drains._hosts.transition = full
        lines = []
        c.drains.log = Logger(observer=lambda e: lines.append(
            (e["log_level"].name, formatEvent(e), e.get("log_failure"))))
        await c.store.run(lambda db: db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON drains"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        with self.assertRaises(sqlite3.IntegrityError):
            await c.drains.drain(src)
        self.assertEqual(lines, [("error", f"host {src} stays draining, its drain not stored:"
                                           " the control plane's disk is full", None)])

    @d
    async def test_drain_moves_a_volume_byte_identical(self):
        c = await DrainCluster(self).start()
        m = await self.deploy(c)
        src = m["host_id"]
        dst = "h-b" if src == "h-a" else "h-a"
        vid = m["volumes"][0]
        before = write_known(c.store_of(src).path(vid), "v1")
        # The "VM" writes until it is stopped: a block changes after the bulk copy.
        ex, procs = c.executors[src]
        stop = procs["machine.stop"]
        expected = []

        def stop_after_a_write(mid, timeout=None):
            expected.append(write_known(c.store_of(src).path(vid), "late", offsets=(9 * MiB,)))
            return stop(mid, timeout)

        procs["machine.stop"] = stop_after_a_write
        result, status = await self.drain(c, src)
        self.assertEqual(result["plan"][0]["target"], dst)
        self.assertEqual(status["state"], "completed")
        mg = status["migrations"][0]
        self.assertEqual((mg["phase"], mg["error"]), ("done", None))
        self.assertGreater(mg["bytes_sent"], 0)
        self.assertIsNotNone(mg["downtime"])
        # the copy is byte-identical to the final image, including the late write
        self.assertNotEqual(expected[0], before)
        self.assertEqual(sha(c.store_of(dst).path(vid)), expected[0])
        # source empty; the machine and the volume (and its pin) are on the target
        self.assertFalse(c.store_of(src).exists(vid))
        self.assertEqual(ex.list_machines(), [])
        machines = await c.apps.list_machines()
        self.assertEqual([(x["host_id"], x["state"]) for x in machines], [(dst, "running")])
        self.assertEqual((await c.store.get("volumes", vid))["host_id"], dst)
        self.assertEqual(c.registry.entry(src).machine.state, "drained")
        # capacity moved with the machine: what `zwrm host list` shows, and what is stored
        hosts = {h["id"]: h for h in await c.registry.list()}
        self.assertEqual((hosts[src]["alloc_vcpus"], hosts[dst]["alloc_vcpus"]), (0, 1))
        self.assertEqual((await c.store.get("hosts", dst))["alloc_vcpus"], 1)
        phases = [e["payload"].get("phase") for t, e in c.published if t == DRAIN_TOPIC]
        self.assertIn("delta_copying", phases)
        # later deploys pin to the target
        c.registry.entry(src)  # still known
        await c.drains.activate(src)
        await c.apps.scale("db", 0)
        await c.apps.scale("db", 1)
        self.assertEqual([x["host_id"] for x in await c.apps.list_machines()], [dst])

    @d
    async def test_machine_without_volume_replacement_first(self):
        c = await DrainCluster(self).start()
        m = await self.deploy(c, volumes=False)
        src = m["host_id"]
        _, status = await self.drain(c, src)
        self.assertEqual(status["state"], "completed")
        machines = await c.apps.list_machines()
        self.assertEqual(len(machines), 1)
        self.assertNotEqual(machines[0]["host_id"], src)
        self.assertNotEqual(machines[0]["id"], m["id"])
        # the replacement ran before the original stopped
        states = [(e["subject"], e["payload"]["state"]) for t, e in c.published
                  if t == "zwrm.event.machine" and e["kind"] in ("state", "destroyed")]
        running = states.index((machines[0]["id"], "running"))
        stopping = states.index((m["id"], "stopping"))
        self.assertLess(running, stopping)

    @d
    async def test_no_target_is_reported_others_go_on(self):
        c = await DrainCluster(self).start()
        await c.apps.create_app("b")
        await c.apps.deploy("b", c.spec(constraints={"disk": "ssd"}))
        b = (await c.apps.app_status("b"))["machines"][0]
        src = b["host_id"]
        await c.apps.create_app("a")
        await c.apps.deploy("a", c.spec(replicas=2))
        a = next(x for x in await c.machines("a") if x["host_id"] == src)
        other = "h-b" if src == "h-a" else "h-a"
        # b can go nowhere else now: the other host's agent registers without the label
        # (the scheduler learns it from the host's event, as from any change of a host)
        await c.registry.register(other, dict(_facts(), name=other, labels={}))
        _, status = await self.drain(c, src)
        by = {x["machine_id"]: x for x in status["migrations"]}
        self.assertEqual(by[a["id"]]["phase"], "done")
        self.assertEqual(by[b["id"]]["phase"], "not_moved")
        self.assertIn("no target", by[b["id"]]["error"])
        self.assertEqual(status["state"], "incomplete")
        self.assertEqual(c.registry.entry(src).machine.state, "draining")

    @d
    async def test_replacement_never_healthy_rolls_back(self):
        c = await DrainCluster(self).start()
        m = await self.deploy(c, service_port=8080,
                              health={"type": "tcp", "interval": 0.1, "grace": 0})
        src = m["host_id"]
        dst = "h-b" if src == "h-a" else "h-a"
        vid = m["volumes"][0]
        before = write_known(c.store_of(src).path(vid), "v1")
        c.probes[dst] = "connection refused"
        _, status = await self.drain(c, src, healthy_deadline=5)
        mg = status["migrations"][0]
        self.assertEqual(mg["phase"], "rolled_back")
        self.assertIn("not healthy", mg["error"])
        self.assertEqual(status["state"], "incomplete")
        # the original runs again on the source with its data; nothing left on the target
        machines = await c.apps.list_machines()
        self.assertEqual([(x["id"], x["host_id"], x["state"]) for x in machines],
                         [(m["id"], src, "running")])
        self.assertEqual(sha(c.store_of(src).path(vid)), before)
        self.assertFalse(c.store_of(dst).exists(vid))
        self.assertEqual((await c.store.get("volumes", vid))["host_id"], src)
        self.assertEqual(c.registry.entry(src).machine.state, "draining")
        # it holds its capacity on the source again (given back when it stopped there)
        scheduler = c.apps.placements.scheduler
        self.assertEqual([(scheduler.host(h).machines, scheduler.host(h).used_memory_mb)
                          for h in (src, dst)], [(1, 256), (0, 0)])
        # the operator retries once the target is fixed
        del c.probes[dst]
        _, status = await self.drain(c, src)
        self.assertEqual(status["state"], "completed")
        self.assertEqual(sha(c.store_of(dst).path(vid)), before)

    async def down(self, c, m):
        """Make machine C{m} fail on its host (its process killed); @return: its row."""
        c.executors[m["host_id"]][0].driver.crash(m["id"])
        for _ in range(500):
            row = await c.apps.data.machines.get(m["id"])
            if row["state"] == "failed":
                return row
            await deferLater(reactor, 0.01, lambda: None)
        self.fail(f"machine {m['id']} not failed: {row['state']}")

    @d
    async def test_machine_that_is_down_moves_at_rest(self):
        """
        A machine with a volume that is down (failed, no restart due) moves too: its volume
        is copied and verified, the source's copy deleted, and its replacement is stored
        on the target as failed, never started. So the host holds nothing any more.
        """
        c = await DrainCluster(self).start()
        m = await self.deploy(c)
        src = m["host_id"]
        dst = "h-b" if src == "h-a" else "h-a"
        vid = m["volumes"][0]
        before = write_known(c.store_of(src).path(vid), "at rest")
        await self.down(c, m)
        plan = await c.drains.drain(src, dry_run=True, mode="live")  # not refused: cold
        item = plan["plan"][0]
        self.assertEqual((item["machine_id"], item["target"], item["down"], item["keep_down"],
                          item["mode"]), (m["id"], dst, "failed", "failed", "cold"))
        self.assertIn("stays failed", item["mode_reason"])
        _, status = await self.drain(c, src)
        self.assertEqual(status["state"], "completed")
        mg = status["migrations"][0]
        self.assertEqual((mg["phase"], mg["error"]), ("done", None))
        self.assertIsNone(mg["downtime"])
        self.assertEqual(sha(c.store_of(dst).path(vid)), before)
        self.assertFalse(c.store_of(src).exists(vid))
        self.assertEqual((await c.store.get("volumes", vid))["host_id"], dst)
        machines = await c.apps.list_machines()
        self.assertEqual([(x["id"], x["host_id"], x["state"]) for x in machines],
                         [(mg["replacement"], dst, "failed")])
        self.assertIsNone(machines[0]["address"])  # it holds none until it starts
        # never started on the target, and nothing of it is left on the source
        self.assertEqual(c.executors[dst][0].list_machines(), [])
        self.assertEqual(c.executors[src][0].list_machines(), [])
        self.assertNotIn((dst, "machine.start"), c.calls)
        self.assertEqual(c.registry.entry(src).machine.state, "drained")

    @d
    async def test_machine_down_with_a_restart_due_starts_on_the_target(self):
        """A machine that is down but whose restart was due (or held) starts on the target."""
        c = await DrainCluster(self).start()
        m = await self.deploy(c)
        src = m["host_id"]
        dst = "h-b" if src == "h-a" else "h-a"
        vid = m["volumes"][0]
        before = write_known(c.store_of(src).path(vid), "due")
        row = await self.down(c, m)
        for record in ({"count": 1, "next_at": c.clock.seconds() + 30},
                       {"count": 1, "next_at": None, "held": True}):
            health = dict(row["health"], restart=record)
            await c.apps.replicas.set_machine(row, "restart due", health=health)
            plan = await c.drains.drain(src, dry_run=True)
            item = plan["plan"][0]
            self.assertEqual((item["down"], item["keep_down"], item["mode"]),
                             ("failed", None, "cold"), record)
            self.assertIn("starts on the target", item["mode_reason"])
        _, status = await self.drain(c, src)
        mg = status["migrations"][0]
        self.assertEqual((status["state"], mg["phase"], mg["error"]),
                         ("completed", "done", None))
        self.assertEqual(sha(c.store_of(dst).path(vid)), before)
        self.assertFalse(c.store_of(src).exists(vid))
        machines = await c.apps.list_machines()
        self.assertEqual([(x["id"], x["host_id"], x["state"]) for x in machines],
                         [(mg["replacement"], dst, "running")])

    @d
    async def test_machine_at_rest_rolled_back_stays_down_where_it_was(self):
        """A move at rest that rolls back leaves the machine down on its source, not started."""
        c = await DrainCluster(self).start()
        m = await self.deploy(c)
        src = m["host_id"]
        dst = "h-b" if src == "h-a" else "h-a"
        vid = m["volumes"][0]
        before = write_known(c.store_of(src).path(vid), "kept")
        await self.down(c, m)
        # the commit (the volume row's move) fails: the migration rolls back after its
        # replacement was stored (at rest) on the target
        real = c.drains._step_committing
        stored = []

        async def refuse(drain, run):
            stored.append(await c.apps.data.machines.get(run.detail["replacement"]))
            raise errors.Unavailable("the store said no")

        c.drains._step_committing = refuse
        _, status = await self.drain(c, src)
        c.drains._step_committing = real
        self.assertEqual([r["state"] for r in stored], ["failed"])
        mg = status["migrations"][0]
        self.assertEqual(mg["phase"], "rolled_back")
        self.assertIn("the store said no", mg["error"])
        self.assertEqual(sha(c.store_of(src).path(vid)), before)
        self.assertFalse(c.store_of(dst).exists(vid))
        machines = await c.apps.list_machines()
        self.assertEqual([(x["id"], x["host_id"], x["state"]) for x in machines],
                         [(m["id"], src, "failed")])
        self.assertEqual([(x["id"], x["state"]) for x in c.executors[src][0].list_machines()],
                         [(m["id"], "failed")])  # not started again
        self.assertEqual(c.executors[dst][0].list_machines(), [])

    @d
    async def test_corrupt_copy_rolls_back(self):
        c = await DrainCluster(self).start()
        m = await self.deploy(c)
        src = m["host_id"]
        dst = "h-b" if src == "h-a" else "h-a"
        vid = m["volumes"][0]
        before = write_known(c.store_of(src).path(vid), "v1")
        corrupt_sends(c, src)
        _, status = await self.drain(c, src)
        mg = status["migrations"][0]
        self.assertEqual(mg["phase"], "rolled_back")
        self.assertIn("bulk_copying", mg["error"])
        self.assertIn("verification", mg["error"])
        self.assertEqual(sha(c.store_of(src).path(vid)), before)
        self.assertFalse(c.store_of(dst).exists(vid))
        machines = await c.apps.list_machines()
        self.assertEqual([(x["host_id"], x["state"]) for x in machines], [(src, "running")])

    @d
    async def test_target_agent_dies_mid_stream_rolls_back(self):
        c = await DrainCluster(self).start()
        m = await self.deploy(c)
        src = m["host_id"]
        dst = "h-b" if src == "h-a" else "h-a"
        vid = m["volumes"][0]
        before = write_known(c.store_of(src).path(vid), "v1")
        _, procs = c.executors[src]
        send = procs["volume.send"]

        def send_then_kill_target(*a, **kw):
            result = send(*a, **kw)
            c.transfers[dst].receiver.stopService()  # its endpoint goes away mid-stream
            return result

        procs["volume.send"] = send_then_kill_target
        _, status = await self.drain(c, src)
        mg = status["migrations"][0]
        self.assertEqual(mg["phase"], "rolled_back")
        self.assertIn("bulk_copying", mg["error"])
        machines = await c.apps.list_machines()
        self.assertEqual([(x["id"], x["host_id"], x["state"]) for x in machines],
                         [(m["id"], src, "running")])
        self.assertEqual(sha(c.store_of(src).path(vid)), before)
        self.assertFalse(c.store_of(dst).exists(vid))
        self.assertEqual(status["state"], "incomplete")

    @d
    async def test_target_agent_unreachable_after_the_bulk_rolls_back(self):
        c = await DrainCluster(self).start()
        m = await self.deploy(c)
        src = m["host_id"]
        dst = "h-b" if src == "h-a" else "h-a"
        vid = m["volumes"][0]
        before = write_known(c.store_of(src).path(vid), "v1")
        _, procs = c.executors[src]
        stop = procs["machine.stop"]

        def stop_and_lose_target(mid, timeout=None):
            c.registry.entry(dst).executor = False  # its agent's session is gone
            return stop(mid, timeout)

        procs["machine.stop"] = stop_and_lose_target
        _, status = await self.drain(c, src)
        mg = status["migrations"][0]
        self.assertEqual(mg["phase"], "rolled_back")
        self.assertIn("delta_copying", mg["error"])
        self.assertIn("not available", mg["error"])
        # the original runs again on the source, with its data
        row = await c.store.get("machines", m["id"])
        self.assertEqual((row["host_id"], row["state"]), (src, "running"))
        self.assertEqual(sha(c.store_of(src).path(vid)), before)
        self.assertEqual((await c.store.get("volumes", vid))["host_id"], src)

    @d
    async def test_deadline_leaves_unstarted_migrations_not_moved(self):
        c = await DrainCluster(self).start()
        await c.apps.create_app("a")
        await c.apps.deploy("a", c.spec(replicas=4))  # two on each host
        src = "h-a"
        _, status = await self.drain(c, src, deadline=1, min_healthy=5, max_parallel=1)
        phases = sorted(m["phase"] for m in status["migrations"])
        self.assertEqual(phases, ["done", "not_moved"])
        left = next(m for m in status["migrations"] if m["phase"] == "not_moved")
        self.assertIn("deadline", left["error"])
        self.assertEqual(status["state"], "incomplete")
        machines = await c.apps.list_machines()
        self.assertEqual({x["state"] for x in machines}, {"running"})
        self.assertEqual(sum(x["host_id"] == src for x in machines), 1)

    @d
    async def test_undrain_mid_drain(self):
        c = await DrainCluster(self).start()
        m1 = await self.deploy(c, "a", volumes=False)
        src = m1["host_id"]
        await c.apps.create_app("b")
        await c.apps.deploy("b", c.spec())
        await c.drains.drain(src, min_healthy=5)
        run = c.drains.active[src]
        undone = await c.drains.undrain(src)
        self.assertEqual(undone["state"], "cancelling")
        await c.settle(run.done)
        status = await c.drains.drain_status(src)
        self.assertEqual(status["state"], "cancelled")
        self.assertEqual(c.registry.entry(src).machine.state, "ready")
        # every machine runs somewhere
        machines = await c.apps.list_machines()
        self.assertEqual({x["state"] for x in machines}, {"running"})
        self.assertEqual(len(machines), 2)

    @d
    async def test_restart_mid_drain_resumes(self):
        c = await DrainCluster(self).start()
        m = await self.deploy(c)
        src = m["host_id"]
        dst = "h-b" if src == "h-a" else "h-a"
        vid = m["volumes"][0]
        before = write_known(c.store_of(src).path(vid), "v1")
        await c.drains.drain(src, min_healthy=30, healthy_deadline=120, stop_timeout=5)
        run = c.drains.active[src]
        mig = next(iter(run.migrations.values()))
        for _ in range(3000):
            if mig.machine.phase == "waiting_healthy":
                break
            await c.step()
        self.assertEqual(mig.machine.phase, "waiting_healthy")
        # the control plane "dies": its drains object goes away (timers stopped)
        c.drains.stop()
        stored = (await c.store.select("migrations"))[0]
        self.assertEqual(stored["phase"], "waiting_healthy")
        c.drains = Drains(c.clock, c.store, c.registry, c.apps, c.publish)
        self.assertEqual(await c.drains.resume(), 1)
        await c.settle(c.drains.active[src].done)
        status = await c.drains.drain_status(src)
        self.assertEqual(status["state"], "completed")
        self.assertEqual(sha(c.store_of(dst).path(vid)), before)
        self.assertFalse(c.store_of(src).exists(vid))

    @d
    async def test_crash_in_each_phase_resumes(self):
        """
        The control plane dies right after storing each phase (before its step acts), and
        right after each step acted (before the next phase is stored): a new control plane
        resumes, and the move completes with the data intact.
        """
        phases = ("bulk_copying", "stopping_source", "delta_copying", "starting_replacement",
                  "waiting_healthy", "committing", "cleaning")
        for phase, after in product(phases, (False, True)):
            c = await DrainCluster(self).start()
            m = await self.deploy(c)
            src = m["host_id"]
            dst = "h-b" if src == "h-a" else "h-a"
            vid = m["volumes"][0]
            before = write_known(c.store_of(src).path(vid), "v1")
            status = await crash_and_resume(self, c, src, phase, after)
            where = f"crash {'after' if after else 'before'} {phase}"
            self.assertEqual(status["state"], "completed", (where, status["migrations"][0]["error"]))
            self.assertEqual(sha(c.store_of(dst).path(vid)), before, where)
            self.assertFalse(c.store_of(src).exists(vid), where)
            machines = await c.apps.list_machines()
            self.assertEqual([(x["host_id"], x["state"]) for x in machines],
                             [(dst, "running")], where)

    @d
    async def test_second_drain_of_a_draining_host_is_refused(self):
        c = await DrainCluster(self).start()
        m = await self.deploy(c, volumes=False)
        src = m["host_id"]
        first = await c.drains.drain(src, min_healthy=5)
        with self.assertRaises(errors.Conflict) as caught:
            await c.drains.drain(src)
        self.assertIn(first["drain_id"], caught.exception.message)
        self.assertEqual(len(await c.store.select("drains")), 1)
        self.assertEqual(len(await c.store.select("migrations")), 1)
        await c.settle(c.drains.active[src].done)
        self.assertEqual((await c.drains.drain_status(src))["state"], "completed")

    @d
    async def test_drain_of_an_offline_host_is_refused(self):
        c = await DrainCluster(self).start()
        m = await self.deploy(c, volumes=False)
        src = m["host_id"]
        await c.registry.mark_offline(src)
        with self.assertRaises(errors.Conflict) as caught:
            await c.drains.drain(src)
        self.assertIn("offline", caught.exception.message)
        self.assertEqual(await c.store.select("drains"), [])
        self.assertEqual(c.registry.entry(src).machine.state, "offline")
        self.assertNotIn(src, c.drains.active)

    @d
    async def test_min_healthy_is_kept_before_the_commit(self):
        """
        The move commits only once the replacement has been healthy for C{min_healthy}
        seconds of the control plane's Clock (event times are the Clock's).
        """
        c = await DrainCluster(self).start()
        m = await self.deploy(c, volumes=False)
        src = m["host_id"]
        _, status = await self.drain(c, src, min_healthy=40, healthy_deadline=300, poll=1)
        self.assertEqual(status["state"], "completed")
        new = status["migrations"][0]["replacement"]
        running = [e["ts"] for t, e in c.published if t == "zwrm.event.machine"
                   and e["subject"] == new and e["payload"].get("state") == "running"]
        committing = [e["ts"] for t, e in c.published if t == DRAIN_TOPIC
                      and e["payload"].get("phase") == "committing"]
        self.assertEqual(len(committing), 1)
        self.assertGreaterEqual(committing[0] - running[0], 40)
        self.assertLessEqual(committing[0] - running[0], 40 + 1)  # within one poll

    # -- fencing: at most one copy runs, whatever the target does (issue 14) -------------

    async def until(self, c, predicate, what, limit=3000):
        for _ in range(limit):
            if await predicate():
                return
            await c.step()
        raise AssertionError(f"never: {what}")

    def copies(self, c, app="db"):
        """Where a machine of C{app} runs (or starts, or stops), by what the hosts say."""
        return sorted((h, m["machine_id"]) for h, (ex, _) in c.executors.items()
                      for m in ex.list_machines()
                      if m["app"] == app and m["state"] not in ("stopped", "failed"))

    async def outage(self, c, seconds=200):
        """
        C{seconds} of the control plane's time, timer by timer; @return: the most copies
        seen running after any of them.
        """
        most = 0
        end = c.clock.seconds() + seconds
        for _ in range(10000):
            if c.clock.seconds() >= end:
                return most
            await c.step(most=end - c.clock.seconds())
            most = max(most, len(self.copies(c)))
        raise AssertionError("the Clock did not move")

    async def back(self, c, host_id):
        await c.registry.register(host_id, dict(_facts(), name=host_id))

    @d
    async def test_target_lost_while_the_replacement_waits_keeps_one_copy(self):
        """
        Case 1 of issue 14: the target's agent is lost while the replacement waits to be
        healthy; its hypervisor runs on. The original is not started again (no second
        copy, for as long as the target is away, past the healthy deadline); drain-status
        says what it waits for; once the target is back the move completes with what the
        replacement wrote meanwhile.
        """
        c = await DrainCluster(self).start()
        m = await self.deploy(c, service_port=8080,
                              health={"type": "tcp", "interval": 0.1, "grace": 0})
        src, vid = m["host_id"], m["volumes"][0]
        dst = "h-b" if src == "h-a" else "h-a"
        write_known(c.store_of(src).path(vid), "v1")
        await c.drains.drain(src, min_healthy=30, healthy_deadline=60, stop_timeout=5)
        run = c.drains.active[src]
        mig = next(iter(run.migrations.values()))

        async def replacement_runs():
            return (mig.machine.phase == "waiting_healthy"
                    and [h for h, _ in self.copies(c)] == [dst])

        await self.until(c, replacement_runs, "replacement running")
        new = mig.detail["replacement"]
        await c.registry.mark_offline(dst)  # its agent is gone; the hypervisor is not
        self.assertEqual(await self.outage(c), 1)
        self.assertEqual(self.copies(c), [(dst, new)])
        status = await c.drains.drain_status(src)
        mg = status["migrations"][0]
        self.assertEqual((status["state"], mg["phase"], mg["waiting_for"]),
                         ("running", "waiting_healthy", dst))
        self.assertIn(f"waiting for {dst}", mg["error"])
        self.assertEqual(mg["original_state"]["state"], "stopped")

        def waits():  # announced: what the migration waits for is part of its state
            return [e["payload"]["reason"] for t, e in c.published
                    if t == DRAIN_TOPIC and e["kind"] == "migration"
                    and e["payload"]["old"] == e["payload"]["phase"] == "waiting_healthy"]

        self.assertEqual([r.split(" (")[0] for r in waits()], [f"waiting for {dst}"])
        # the replacement accepted a write while its agent was away
        written = write_known(c.store_of(dst).path(vid), "during the outage",
                              offsets=(3 * MiB,))
        await self.back(c, dst)
        await c.settle(run.done)
        status = await c.drains.drain_status(src)
        mg = status["migrations"][0]
        self.assertEqual((status["state"], mg["phase"], mg["waiting_for"]),
                         ("completed", "done", None))
        self.assertEqual(waits()[1:], [f"{dst} answered again"])
        self.assertEqual(self.copies(c), [(dst, new)])
        self.assertEqual(sha(c.store_of(dst).path(vid)), written)
        self.assertFalse(c.store_of(src).exists(vid))

    @d
    async def test_rollback_waits_until_the_target_confirms_the_replacement_is_gone(self):
        c = await DrainCluster(self).start()
        m = await self.deploy(c)
        src, vid = m["host_id"], m["volumes"][0]
        dst = "h-b" if src == "h-a" else "h-a"
        before = write_known(c.store_of(src).path(vid), "v1")
        _, procs = c.executors[dst]
        start = procs["machine.start"]

        def start_then_lost(spec):
            def lost(_):
                c.registry.entry(dst).executor = False  # the answer is lost with the agent
                raise errors.Unavailable("the agent's session is gone")

            return start(spec).addCallback(lost)

        procs["machine.start"] = start_then_lost
        await c.drains.drain(src, min_healthy=1, healthy_deadline=30, stop_timeout=5)
        run = c.drains.active[src]
        mig = next(iter(run.migrations.values()))

        async def rolling_back():
            return mig.machine.phase == "rolling_back" and mig.detail.get("waiting")

        await self.until(c, rolling_back, "rollback waiting")
        self.assertEqual(await self.outage(c), 1)
        self.assertEqual([h for h, _ in self.copies(c)], [dst])  # only the replacement
        status = await c.drains.drain_status(src)
        mg = status["migrations"][0]
        self.assertEqual((status["state"], mg["phase"], mg["waiting_for"]),
                         ("running", "rollback_pending", dst))
        self.assertIn("is gone before the original starts again", mg["error"])
        # the control plane restarts meanwhile: the new one waits as well
        c.drains.stop()
        c.drains = Drains(c.clock, c.store, c.registry, c.apps, c.publish)
        self.assertEqual(await c.drains.resume(), 1)
        run = c.drains.active[src]
        self.assertEqual(await self.outage(c), 1)
        self.assertEqual([h for h, _ in self.copies(c)], [dst])
        self.assertEqual((await c.drains.drain_status(src))["migrations"][0]["phase"],
                         "rollback_pending")
        await self.back(c, dst)
        await c.settle(run.done)
        status = await c.drains.drain_status(src)
        mg = status["migrations"][0]
        self.assertEqual((status["state"], mg["phase"], mg["waiting_for"], mg["leftovers"]),
                         ("incomplete", "rolled_back", None, []))
        self.assertEqual(self.copies(c), [(src, m["id"])])
        self.assertEqual(sha(c.store_of(src).path(vid)), before)
        self.assertFalse(c.store_of(dst).exists(vid))
        self.assertIsNone(await c.store.get("machines", mg["replacement"]))

    @d
    async def test_machine_without_volumes_does_not_wait_for_its_target(self):
        """
        Without volumes two copies may run (the replacement starts first, by design): a
        rollback whose target is lost does not wait for it; the replacement is stopped when
        its host returns.
        """
        c = await DrainCluster(self).start()
        m = await self.deploy(c, volumes=False)
        src = m["host_id"]
        dst = "h-b" if src == "h-a" else "h-a"
        _, procs = c.executors[dst]
        start = procs["machine.start"]

        def start_then_lost(spec):
            def lost(_):
                c.registry.entry(dst).executor = False
                raise errors.Unavailable("the agent's session is gone")

            return start(spec).addCallback(lost)

        procs["machine.start"] = start_then_lost
        _, status = await self.drain(c, src)
        mg = status["migrations"][0]
        self.assertEqual((status["state"], mg["phase"], mg["waiting_for"]),
                         ("incomplete", "rolled_back", None))
        self.assertEqual(mg["original_state"]["state"], "running")
        await self.back(c, dst)

        async def one_copy():
            return self.copies(c) == [(src, m["id"])]

        await self.until(c, one_copy, "the replacement stopped on its host's return")

    @d
    async def test_source_lost_mid_move_starts_again_where_it_was_once_back(self):
        """
        The source is lost after the machine with a volume was stopped there: the move
        rolls back but cannot start it again (failed); the machine, stopped by the drain and
        not by its operator, is recorded failed, so that its restart policy starts it on
        its source, with its data, once the host is back and in service.
        """
        from tests.control.test_healing import healer_for

        c = await DrainCluster(self).start()
        healer = await healer_for(c)
        m = await self.deploy(c)
        src, vid = m["host_id"], m["volumes"][0]
        dst = "h-b" if src == "h-a" else "h-a"
        before = write_known(c.store_of(src).path(vid), "v1")
        lost_before(c, "delta_copying", src)
        _, status = await self.drain(c, src)
        mg = status["migrations"][0]
        self.assertEqual((status["state"], mg["phase"]), ("incomplete", "failed"))
        row = await c.apps.data.machines.get(m["id"])
        self.assertEqual((row["host_id"], row["state"]), (src, "failed"))
        self.assertIn("its drain's rollback could not start it again", mg["error"] + str(
            await c.apps.data.machines.recent_events(m["id"])))
        self.assertFalse(c.store_of(dst).exists(vid))
        self.assertEqual(self.copies(c), [])
        await self.back(c, src)
        await c.registry.reconcile(src, c.executors[src][0].list_machines())
        # (held while its host is draining: the operator drains it again, which moves it at
        # rest, or, here, undrains it)
        await c.drains.undrain(src)

        async def runs_again():
            await healer.idle()
            return self.copies(c) == [(src, m["id"])]

        await self.until(c, runs_again, "the machine running again on its source")
        self.assertEqual(sha(c.store_of(src).path(vid)), before)

    @d
    async def test_source_lost_at_the_cleaning_its_copy_goes_once_back(self):
        """
        The source is lost once the move committed, before its copy of the volume is
        deleted: the move is done, the copy recorded as a leftover (drain-status says so)
        and deleted when the source is back; the moved volume is untouched.
        """
        c = await DrainCluster(self).start()
        m = await self.deploy(c)
        src, vid = m["host_id"], m["volumes"][0]
        dst = "h-b" if src == "h-a" else "h-a"
        before = write_known(c.store_of(src).path(vid), "v1")
        lost_before(c, "cleaning", src)
        _, status = await self.drain(c, src)
        mg = status["migrations"][0]
        self.assertEqual((status["state"], mg["phase"]), ("completed", "done"))
        self.assertEqual(mg["leftovers"], [{"host": src, "volume_id": vid}])
        self.assertIn(f"a copy of {vid} on {src}", mg["error"])
        self.assertTrue(c.store_of(src).exists(vid))
        await self.back(c, src)

        async def swept():
            return not c.store_of(src).exists(vid)

        await self.until(c, swept, "the source's copy deleted")
        self.assertEqual((await c.drains.drain_status(src))["migrations"][0]["leftovers"], [])
        self.assertEqual(sha(c.store_of(dst).path(vid)), before)
        self.assertEqual((await c.store.get("volumes", vid))["host_id"], dst)

    @d
    async def test_failed_says_where_the_machine_runs(self):
        """
        A rollback that fails is C{failed}; drain-status then says where the machine is
        and in what state (here: running fine on the source), and that the host stays
        draining.
        """
        c = await DrainCluster(self).start()
        m = await self.deploy(c)
        src = m["host_id"]
        _, procs = c.executors[src]

        def stream_breaks(*a, **kw):
            raise errors.Unavailable("the stream broke")

        def status_fails(*a, **kw):
            raise errors.Internal("the agent could not say")

        procs["volume.send"] = stream_breaks
        procs["machine.status"] = status_fails
        _, status = await self.drain(c, src)
        mg = status["migrations"][0]
        self.assertEqual((status["state"], status["host_state"], mg["phase"]),
                         ("incomplete", "draining", "failed"))
        self.assertIn("the agent could not say", mg["error"])
        self.assertIn(f"machine {m['id']} is running on {src}", mg["error"])
        self.assertEqual(mg["original_state"], {"host_id": src, "state": "running",
                                                "health": mg["original_state"]["health"]})

    @d
    async def test_copy_left_on_an_unreachable_target_is_deleted_when_it_returns(self):
        """
        The target is lost after the verified copy was committed there: the rollback starts
        the original again at once (no replacement was started), records the copy, and
        deletes it when the target returns, even after the app and its volumes were
        destroyed meanwhile.
        """
        c = await DrainCluster(self).start()
        m = await self.deploy(c)
        src, vid = m["host_id"], m["volumes"][0]
        dst = "h-b" if src == "h-a" else "h-a"
        lose_target_after_the_delta(c, src, dst)
        _, status = await self.drain(c, src)
        mg = status["migrations"][0]
        self.assertEqual((status["state"], mg["phase"], mg["replacement"]),
                         ("incomplete", "rolled_back", None))
        self.assertEqual(mg["leftovers"], [{"host": dst, "volume_id": vid}])
        self.assertIn(f"a copy of {vid} on {dst}", mg["error"])
        self.assertTrue(c.store_of(dst).exists(vid))
        self.assertEqual(self.copies(c), [(src, m["id"])])
        await c.apps.destroy_app("db", volumes=True)
        self.assertFalse(c.store_of(src).exists(vid))
        # Nothing polls while the target is away (no timer of the control plane runs): the
        # copy is deleted on the target's event when it returns.
        self.assertEqual([call for call in c.clock.getDelayedCalls()
                          if "LoopingCall" in repr(call) or "sweep" in repr(call)], [])
        c.clock.advance(10)
        await c.quiet()
        self.assertTrue(c.store_of(dst).exists(vid))  # the target is still away
        await self.back(c, dst)

        async def cleaned():
            return not c.store_of(dst).exists(vid)

        await self.until(c, cleaned, "copy deleted")
        status = await c.drains.drain_status(src)
        self.assertEqual(status["migrations"][0]["leftovers"], [])
        c.drains.stop()

    @d
    async def test_snapshot_copies_left_on_an_unreachable_target_go_when_it_returns(self):
        """
        As a volume's copy: the copies of its snapshots the rollback could not delete are
        recorded with it and deleted when the target returns (only those: another file of
        the volume's there, a replica, stays).
        """
        c = await DrainCluster(self).start()
        m = await self.deploy(c)
        src, vid = m["host_id"], m["volumes"][0]
        dst = "h-b" if src == "h-a" else "h-a"
        snap = await c.apps.snapshot_volume(vid, "one")
        rep = await c.apps.replicate_volume(vid, "one", dst)
        lose_target_after_the_delta(c, src, dst)
        _, status = await self.drain(c, src)
        mg = status["migrations"][0]
        self.assertEqual(mg["phase"], "rolled_back")
        self.assertEqual(mg["leftovers"], [{"host": dst, "volume_id": vid,
                                            "snapshots": [snap["id"]]}])
        held = lambda: sorted(s["id"] for s in c.store_of(dst).snapshots(vid))  # noqa: E731
        self.assertEqual(held(), sorted([snap["id"], rep["id"]]))
        await self.back(c, dst)

        async def cleaned():
            return not c.store_of(dst).exists(vid)

        await self.until(c, cleaned, "copy deleted")
        self.assertEqual(held(), [rep["id"]])
        self.assertEqual([r["id"] for r in await c.apps.list_replicas(vid)], [rep["id"]])
        c.drains.stop()

    @d
    async def test_errors(self):
        c = await DrainCluster(self).start()
        with self.assertRaises(errors.NotFound):
            await c.drains.drain("h-zz")
        with self.assertRaises(errors.InvalidArgument):
            await c.drains.drain("h-a", max_parallel=0)
        with self.assertRaises(errors.NotFound):
            await c.drains.drain_status("h-a")
        with self.assertRaises(errors.Conflict):
            await c.drains.undrain("h-a")
        _, status = await self.drain(c, "h-a")  # an empty host drains at once
        self.assertEqual(status["state"], "completed")
        with self.assertRaises(errors.Conflict):
            await c.drains.drain("h-a")
        self.assertEqual((await c.drains.activate("h-a"))["state"], "ready")



class CliFormatTests(SynchronousTestCase):
    def test_durations(self):
        from zwrm.cli.client import CliError
        from zwrm.cli.drain import _duration

        self.assertEqual([_duration(x) for x in ("90", "90s", "15m", "1h")],
                         [90, 90, 900, 3600])
        e = self.assertRaises(CliError, _duration, "5x")
        self.assertIn("bad duration", e.message)

    def test_status_and_plan_lines(self):
        import io

        from zwrm.cli.drain import format_plan, format_status

        out = io.StringIO()
        format_plan({"host_id": "h-a", "drain_id": None, "plan": [
            {"machine_id": "m-1", "app": "db", "volumes": ["v-1"], "target": "h-b",
             "reason": None},
            {"machine_id": "m-2", "app": "big", "volumes": [], "target": None,
             "reason": "no host has 900 GiB of memory"},
            {"machine_id": "m-3", "app": "pg", "volumes": ["v-2"], "snapshots": 2,
             "target": "h-b", "reason": None}]}, out)
        text = out.getvalue()
        self.assertIn("(dry run)", text)
        self.assertIn("m-1  db (1 volume(s))  -> h-b", text)
        self.assertIn("m-3  pg (1 volume(s), 2 snapshot(s))  -> h-b", text)
        self.assertIn("no target: no host has 900 GiB", text)
        out = io.StringIO()
        format_status({"drain_id": "d-1", "host_id": "h-a", "state": "running",
                       "host_state": "draining", "migrations": [
                           {"machine_id": "m-1", "app": "db", "phase": "bulk_copying",
                            "target": "h-b", "bytes_sent": 512 * MiB,
                            "bytes_total": 1024 * MiB, "rate": 100 * MiB, "eta": 5.0,
                            "error": None, "downtime": None}]}, out)
        line = out.getvalue().splitlines()[1]
        self.assertIn("bulk_copying", line)
        self.assertIn("sent 512.0MiB (image 1.0GiB)", line)
        self.assertIn("100.0MiB/s", line)
        self.assertIn("eta 5s", line)
