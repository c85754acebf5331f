"""
Property tests of drains (hypothesis): over random sequences of drains of random hosts,
each cut into right before a random phase's step by an undrain, a control-plane restart
(before or after the step), a guest's write, its machine's crash or restart, a scale, a
corrupted stream, targets whose machines never pass their health checks, or the loss of
the target or the source (back some timers later), and of activations, writes and scales
in between, on three hosts with a healer; cold moves, and live ones (L{LiveDrainPropertyTests}):

- a machine with a volume never runs twice, not for one turn of the Clock (checked at
  every step of every drain);
- its volume's data is never lost: the host its row names holds the bytes the guest wrote
  last; a copy on another host is a recorded leftover, and none is left once every host
  is back;
- the app without volumes never runs more copies than its replicas once a drain ended;
- each host's reserved capacity is that of the machines there that are not down;
- every drain ends (completed, incomplete or cancelled), and its host is drained,
  draining or ready;
- once every host is back in service, the machine with the volume runs again.

The sequences are drawn by hypothesis (generation phase); each runs against the real apps
layer, drains and healer over a real store, real executors (fake hypervisor) and real
volume streams over TLS, with the control plane's time on a L{task.Clock} moved only while
the real parts are idle (L{tests.control.test_drain.DrainCluster.step}).  As in
L{tests.control.test_healing_properties}, the examples are collected first, then played:
a failure prints the sequence.
"""

import json

from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.trial.unittest import TestCase

from tests.control.helpers import FACTS
from tests.control.test_apps import d
from tests.control.test_apps_destroy import restarted_and_loaded
from tests.control.test_drain import DrainCluster, corrupt_sends, sha, write_known
from tests.control.test_healing import healer_for
from tests.control.test_healing_properties import drawn
from tests.control.test_live_drain import LiveDrainCluster
from zwrm import errors
from zwrm.control.drain import Drains
from zwrm.drain_phases import DRAIN_TERMINAL

HOSTS = ("h-a", "h-b", "h-c")
#: The steps of a migration a drain is cut into (right before the step acts): cold moves,
#: and live ones (L{LiveDrainPropertyTests}).
PHASES = ("bulk_copying", "stopping_source", "delta_copying", "starting_replacement",
          "waiting_healthy", "committing", "cleaning", "rolling_back")
LIVE_PHASES = ("live_preparing", "live_migrating", "switching_over", "switched_over",
               "verifying", "committing", "cleaning", "rolling_back")
CUTS = ("none", "undrain", "restart_before", "restart_after", "write", "corrupt",
        "unhealthy_targets", "lose_target", "lose_source", "crash", "scale_down", "scale_up",
        "restart_db")
#: How many of the control plane's timers a lost host stays away (its agent gone, its
#: hypervisor running on), mid-drain.
AWAY = 30
#: Health checks polled by the agents (real time): a target's check failing fails the move.
HEALTH = {"service_port": 8080, "health": {"type": "tcp", "interval": 0.5, "grace": 0}}


def operations(phases):
    """What a sequence is made of: drains cut at one of C{phases}, and what comes between."""
    return st.one_of(
        st.tuples(st.just("drain"), st.sampled_from(HOSTS), st.sampled_from(phases),
                  st.sampled_from(CUTS)),
        st.tuples(st.just("activate"), st.sampled_from(HOSTS)),
        st.tuples(st.just("write"), st.integers(0, 9)),
        st.tuples(st.just("scale"), st.integers(0, 3)),
    )


class Model:
    def __init__(self, c, healer, volume_id, expected):
        self.c, self.h, self.volume_id = c, healer, volume_id
        self.expected = expected  # the SHA-256 of what the guest wrote last
        self.replicas = 2
        self.writes = 0

    def running_db(self):
        """The hosts whose hypervisor runs a machine with the volume (a drain moves it as a
        new machine: its replacement)."""
        return [h for h in HOSTS for m in self.c.executors[h][0].list_machines()
                if m["state"] == "running" and not m.get("migrated_to")  # (paused for good)
                and self.volume_id in [v["id"] for v in m["volumes"]]]

    async def write(self, trace):
        """The guest writes (only while it runs: a stopped machine writes nothing)."""
        [host] = self.running_db() or [None]
        if host is None:
            return
        self.writes += 1
        path = self.c.store_of(host).path(self.volume_id)
        self.expected = write_known(path, f"w{self.writes}", offsets=(self.writes % 3 * 9 << 20,))

    async def step(self, trace):
        await self.h.idle()
        await self.c.step()
        assert len(self.running_db()) <= 1, (trace, self.running_db())

    async def drain(self, host, phase, cut, trace):
        c = self.c
        sender = c.transfers[host].sender
        real_send = sender.send
        try:
            result = await c.drains.drain(host, min_healthy=2, healthy_deadline=5,
                                          stop_timeout=5)
        except errors.ZwrmError:
            return None  # (draining, drained or offline already: refused, nothing changed)
        if cut == "corrupt":
            corrupt_sends(c, host)
        elif cut == "unhealthy_targets":
            for other in HOSTS:
                if other != host:
                    c.probes[other] = "connection refused"
        crashed, lost = [], []
        drains = c.drains
        step = getattr(drains, "_step_" + phase)

        async def cut_in(drain, run):
            # once, right before the step acts (or, restart_after, right after it acted)
            del drains.__dict__["_step_" + phase]
            if cut == "undrain":
                await drains.undrain(host)
            elif cut == "write":
                await self.write(trace)
            elif cut in ("scale_down", "scale_up"):
                try:
                    await c.apps.scale("web", 1 if cut == "scale_down" else 3)
                except errors.ZwrmError:
                    pass
                self.replicas = (await c.apps.app_status("web"))["spec"]["replicas"]
            elif cut == "restart_db":  # an operator's zwrm machines restart (often refused)
                for m in await c.apps.list_machines(app="db"):
                    try:
                        await c.apps.restart_machine(m["id"])
                    except errors.ZwrmError:
                        pass
            elif cut == "crash":
                for h in self.running_db():  # its QEMU dies (killed, or the guest panicked)
                    for m in c.executors[h][0].list_machines():
                        if self.volume_id in [v["id"] for v in m["volumes"]]:
                            c.executors[h][0].driver.crash(m["id"])
            elif cut.startswith("lose_"):
                which = run.row["target_host"] if cut == "lose_target" else host
                if which is not None:
                    await c.registry.mark_offline(which)  # its agent is gone, its VMs run on
                    lost.append((which, steps))
            elif cut.startswith("restart_"):
                if cut == "restart_after":
                    await step(drain, run)
                crashed.append(True)
                raise CancelledError()  # the control plane dies here
            return await step(drain, run)

        setattr(drains, "_step_" + phase, cut_in)
        run = drains.active.get(host)
        steps = 0
        while run is not None and not run.done.called:
            if crashed:
                del crashed[:]
                await self.restart_control()
                run = c.drains.active.get(host)
                continue
            if lost and steps - lost[0][1] >= AWAY:
                await self.back(lost.pop()[0])
            await self.step(trace)
            steps += 1
            assert steps < 5000, (trace, "the drain did not end")
        for h, _ in lost:
            await self.back(h)
        drains.__dict__.pop("_step_" + phase, None)
        sender.send = real_send
        c.probes.clear()
        return result

    async def back(self, host):
        """A lost host's agent is back: it registers, and its machines are reconciled."""
        c = self.c
        await c.registry.register(host, dict(FACTS, name=host))
        await c.registry.reconcile(host, c.executors[host][0].list_machines())

    async def restart_control(self):
        """
        The control plane dies (its drains' and apps' timers with it) and starts again over
        the same store: its apps layer loaded, its agents reconciled, then its drains resumed.
        """
        c = self.c
        c.drains.stop()
        self.h.stop()
        await restarted_and_loaded(c, HOSTS)
        c.drains = Drains(c.clock, c.store, c.registry, c.apps, c.publish)
        await c.drains.resume()
        self.h = await healer_for(c)
        await self.h.resume()

    async def apply(self, op, trace):
        c = self.c
        kind = op[0]
        if kind == "drain":
            await self.drain(*op[1:], trace)
        elif kind == "activate":
            for how in (c.drains.undrain, c.drains.activate):  # (whichever applies)
                try:
                    await how(op[1])
                except errors.ZwrmError:
                    pass
        elif kind == "write":
            await self.write(trace)
        elif kind == "scale":
            try:
                await c.apps.scale("web", op[1])
            except errors.ZwrmError:
                pass
            self.replicas = (await c.apps.app_status("web"))["spec"]["replicas"]
        await self.h.idle()
        await c.quiet()

    async def leftovers(self):
        """The hosts recorded as keeping a copy of the volume to delete."""
        return {x["host"] for m in await self.c.store.select("migrations")
                for x in json.loads(m["detail"] or "{}").get("leftovers") or ()
                if x["volume_id"] == self.volume_id}

    async def check(self, trace):
        c = self.c
        assert len(self.running_db()) <= 1, (trace, self.running_db())
        [db] = await c.apps.list_machines(app="db")
        row = await c.store.get("volumes", self.volume_id)
        holders = [h for h in HOSTS if c.store_of(h).exists(self.volume_id)]
        # any other copy is a recorded leftover (its host was away), deleted once it is back
        assert row["host_id"] in holders, (trace, holders, row["host_id"])
        assert set(holders) - {row["host_id"]} <= await self.leftovers(), (trace, holders)
        assert db["host_id"] == row["host_id"], (trace, db, row)
        assert sha(c.store_of(row["host_id"]).path(self.volume_id)) == self.expected, trace
        web = sum(1 for h in HOSTS for m in c.executors[h][0].list_machines()
                  if m["state"] == "running" and m["app"] == "web")
        assert web <= self.replicas, (trace, web, self.replicas)
        for drain in await c.store.select("drains"):
            assert drain["state"] in DRAIN_TERMINAL, (trace, drain)
        # (a machine that is down holds no capacity: it takes it again to start)
        records = [m for m in await c.apps.list_machines()
                   if m["state"] not in ("stopped", "failed")]
        scheduler = c.apps.placements.scheduler
        for h in HOSTS:
            here = [(await c.apps.data.machines.get(m["id"]))["spec"]
                    for m in records if m["host_id"] == h]
            host = scheduler.host(h)
            assert (host.machines, host.used_memory_mb) == (
                len(here), sum(s["memory_mb"] for s in here)), (trace, h)
            assert c.registry.entry(h).machine.state in ("ready", "draining", "drained"), (
                trace, h)


FOUND = [
    # a volume's machine started again on its source by a rollback (its replacement never
    # healthy) did not take its capacity there again
    [("activate", "h-b"), ("drain", "h-a", "delta_copying", "unhealthy_targets")],
    # the source lost once the move committed: its copy was never deleted
    [("drain", "h-a", "cleaning", "lose_source")],
    # the source lost after the machine stopped there: it stayed stopped for good
    [("write", 0), ("drain", "h-a", "delta_copying", "lose_source")],
]


class DrainPropertyTests(TestCase):
    timeout = 600
    cluster = DrainCluster
    model = Model
    phases = PHASES
    found = FOUND
    examples = 16

    @d
    async def test_one_copy_no_data_lost(self):
        for ops in drawn(st.lists(operations(self.phases), min_size=1, max_size=6),
                         self.examples):
            await self.play(ops)

    @d
    async def test_found_before(self):
        """Sequences that failed once (drawn by hypothesis), played every time."""
        for ops in self.found:
            await self.play(ops)

    async def play(self, ops):
        c = await self.cluster(self).start(hosts=HOSTS)
        await c.apps.create_app("db")
        spec = c.spec(**HEALTH)
        spec["volumes"] = [{"name": "data", "size_mb": 32, "mount": "/data"}]
        [db] = (await c.apps.deploy("db", spec))["machines"]
        await c.apps.create_app("web")
        await c.apps.deploy("web", c.spec(replicas=2, **HEALTH))
        [volume_id] = db["volumes"]
        expected = write_known(c.store_of(db["host_id"]).path(volume_id), "w0")
        model = self.model(c, await healer_for(c), volume_id, expected)
        trace = []
        for op in ops:
            trace.append(op)
            await model.apply(op, trace)
            await model.check(trace)
        # every host back in service: the machine with the volume runs, with its data
        for h in HOSTS:
            await model.apply(("activate", h), trace)
        for _ in range(200):  # (restarts due after their backoff; leftovers swept)
            if model.running_db() and not await model.leftovers():
                break
            await model.step(trace)
        self.assertEqual([h for h in HOSTS if c.store_of(h).exists(volume_id)],
                         [(await c.store.get("volumes", volume_id))["host_id"]], trace)
        self.assertEqual(model.running_db(), [(await c.store.get("volumes", volume_id))["host_id"]],
                         trace)
        await model.check(trace)
        c.drains.stop()
        model.h.stop()
        for ex, _ in c.executors.values():
            ex.close()  # its health checks stop: the next sequence's cluster runs alone


class LiveModel(Model):
    """The guest writes through its (fake) hypervisor, whose dirty bitmap a live move reads."""

    async def write(self, trace):
        [host] = self.running_db() or [None]
        if host is None:
            return
        ex = self.c.executors[host][0]
        [m] = [m for m in ex.list_machines() if m["state"] == "running"
               and not m.get("migrated_to") and self.volume_id in [v["id"] for v in m["volumes"]]]
        self.writes += 1
        try:
            ex.driver.guest_write_file(m["id"], f"f{self.writes % 5}",
                                       bytes([self.writes % 256]) * 4096)
        except errors.Unavailable:
            return  # paused by the move: it writes nothing
        self.expected = sha(self.c.store_of(host).path(self.volume_id))


class LiveDrainPropertyTests(DrainPropertyTests):
    """The same, with agents that move machines live (the fake hypervisor's live migration)."""

    cluster = LiveDrainCluster
    model = LiveModel
    phases = LIVE_PHASES
    found = [
        # the guest writes after the switch-over: to the target (the source is paused for
        # good), which the verification accepts (its dirty bitmap has the block)
        [("activate", "h-b"), ("write", 4), ("drain", "h-a", "switched_over", "write")],
        [("drain", "h-a", "live_migrating", "lose_source"), ("write", 1)],
    ]
    examples = 10
