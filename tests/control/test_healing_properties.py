"""
Property tests of self-healing (hypothesis): over random sequences of host losses and
returns, machine crashes, failing health checks, scales, redeploys, machine and
control-plane restarts and clock ticks, an app never has more machines running on
reachable hosts than its replica count, never more records than replicas, and once every
host is back it converges to exactly its replica count, all running, each host's reserved
capacity that of the machines there.

The sequences are drawn by hypothesis (generation phase); each runs against the real apps
layer and healer over a real store and real executors (fake hypervisor), with the control
plane's time on a L{task.Clock}.  (Trial runs the Deferreds; hypothesis cannot await, so
the drawn examples are collected first, then played: there is no shrinking, and a failure
prints the sequence.)
"""

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from tests.control.helpers import FACTS
from tests.control.test_apps import Cluster, caller, d
from tests.control.test_apps_destroy import restarted_and_loaded
from tests.control.test_healing import driver, healer_for, settle
from zwrm import errors

HOSTS = ("h-a", "h-b", "h-c")
OPS = st.one_of(
    st.tuples(st.just("lose"), st.sampled_from(HOSTS)),
    st.tuples(st.just("back"), st.sampled_from(HOSTS)),
    st.tuples(st.just("crash"), st.integers(0, 3)),
    st.tuples(st.just("crash_db"), st.just(0)),
    st.tuples(st.just("scale"), st.integers(0, 4)),
    st.tuples(st.just("deploy"), st.sampled_from([256, 300])),
    st.tuples(st.just("tick"), st.sampled_from([1, 5, 10, 60])),
    st.tuples(st.just("unhealthy"), st.integers(0, 3)),
    st.tuples(st.just("restart_control"), st.just(0)),
    st.tuples(st.just("restart_machine"), st.integers(0, 3)),
)

HEALTH = {"service_port": 80, "health": {"type": "tcp", "interval": 2}}


def drawn(strategy, n):
    """C{n} examples of C{strategy}, drawn by hypothesis's generator."""
    out = []

    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(x):
        out.append(x)

    collect()
    return out


class Model:
    def __init__(self, c, h):
        self.c, self.h = c, h
        self.replicas = 2
        self.db_id = None  # the volume replica's machine (never moves)

    def running_on_reachable(self, db=False):
        """Copies of web's (or db's) machines running on hosts that are not offline."""
        n = 0
        for host_id in HOSTS:
            if self.c.registry.state(host_id) == "offline":
                continue
            n += sum(1 for m in self.c.executors[host_id][0].list_machines()
                     if m["state"] == "running" and (m["id"] == self.db_id) == db)
        return n

    async def apply(self, op):
        c, h = self.c, self.h
        kind, arg = op
        if kind == "lose" and c.registry.state(arg) != "offline":
            await c.registry.mark_offline(arg)
            h.check_done([arg])
            c.clock.advance(0)
        elif kind == "back" and c.registry.state(arg) == "offline":
            await c.registry.register(arg, dict(FACTS, name=arg))
            await c.registry.reconcile(arg, c.executors[arg][0].list_machines())
        elif kind == "crash_db":
            for m in await c.machines("db"):
                if m["state"] == "running" and c.registry.state(m["host_id"]) != "offline":
                    driver(c, m["host_id"]).crash(m["id"])
        elif kind == "crash":
            for m in await c.machines("web"):
                if m["replica"] == arg and m["state"] == "running" \
                        and c.registry.state(m["host_id"]) != "offline":
                    driver(c, m["host_id"]).crash(m["id"])
        elif kind == "scale":
            try:
                await c.apps.scale("web", arg)
                self.replicas = arg
            except errors.ZwrmError:
                pass
            self.replicas = (await c.apps.app_status("web"))["spec"]["replicas"]
        elif kind == "deploy":
            try:
                await c.apps.deploy("web", c.spec(replicas=self.replicas, memory_mb=arg,
                                                  **HEALTH))
            except errors.ZwrmError:
                pass
        elif kind == "unhealthy":
            # its check fails from now on (until it is started again): liveness stops it
            # (replica 3: db's machine)
            for m in await c.machines("db" if arg == 3 else "web"):
                if (arg == 3 or m["replica"] == arg) and m["state"] == "running" \
                        and c.registry.state(m["host_id"]) != "offline":
                    await c.apps.machine_event(
                        {"machine_id": m["id"], "state": "running", "health": "failing",
                         "reason": "health failing"}, details=caller(m["host_id"]))
        elif kind == "restart_machine":
            # an operator's zwrm machines restart (replica 3: db's machine); refused when
            # its host is offline or it is being started or stopped
            app = "db" if arg == 3 else "web"
            for m in await c.machines(app):
                if arg == 3 or m["replica"] == arg:
                    try:
                        await c.apps.restart_machine(m["id"])
                    except errors.ZwrmError:
                        pass
        elif kind == "restart_control":
            # the control plane stops (its healer's timers with it) and starts again over
            # the same store: its apps layer loaded, the reachable agents reconciled, then
            # its healer resumes
            self.h.stop()
            await restarted_and_loaded(c, HOSTS)
            self.h = h = await healer_for(c)
            await h.resume()
        elif kind == "tick":
            c.clock.advance(arg)
            h.check_done([])
            c.clock.advance(0)
        await settle(c, h)

    async def check(self, trace):
        db = await self.c.machines("db")
        assert len(db) <= 1, (trace, db)  # a replica with a volume: never two copies
        records = await self.c.machines("web")
        assert len(records) <= self.replicas, (trace, records)
        assert len({m["replica"] for m in records}) == len(records), (trace, records)
        assert self.running_on_reachable() <= self.replicas, trace
        assert self.running_on_reachable(db=True) <= 1, trace


FOUND = [
    # a replica stopped by liveness on a host lost before its restart stayed stopped
    [("back", "h-a"), ("unhealthy", 2), ("crash_db", 0), ("unhealthy", 1), ("unhealthy", 1),
     ("tick", 60), ("lose", "h-b"), ("crash_db", 0), ("lose", "h-a"), ("tick", 60)],
]


class PropertyTests(TestCase):
    timeout = 600

    @d
    async def test_never_more_than_replicas_and_converges(self):
        for ops in drawn(st.lists(OPS, max_size=10), 20):
            await self.play(ops)

    @d
    async def test_found_before(self):
        """Sequences that failed once (drawn by hypothesis), played every time."""
        for ops in FOUND:
            await self.play(ops)

    async def play(self, ops):
        c = await Cluster(self).start(hosts=HOSTS)
        h = await healer_for(c)
        await c.apps.create_app("web")
        await c.apps.deploy("web", c.spec(replicas=2, **HEALTH))
        await c.apps.create_app("db")
        await c.apps.deploy("db", c.spec(volumes=[{"name": "data", "mount": "/data"}],
                                         **HEALTH))
        [db] = await c.machines("db")
        model = Model(c, h)
        model.db_id = db["id"]
        trace = []
        for op in ops:
            trace.append(op)
            await model.apply(op)
            await model.check(trace)
        # every host back, time passes: exactly the replica count runs
        for host_id in HOSTS:
            await model.apply(("back", host_id))
        for _ in range(12):
            await model.apply(("tick", 60))
            ms = await c.machines("web")
            dbs = await c.machines("db")
            if (len(ms) == model.replicas and all(m["state"] == "running" for m in ms)
                    and [m["state"] for m in dbs] == ["running"]
                    and model.running_on_reachable() == model.replicas
                    and model.running_on_reachable(db=True) == 1):
                break
        ms = await c.machines("web")
        dbs = await c.machines("db")
        self.assertEqual([(m["id"], m["host_id"], m["state"]) for m in dbs],
                         [(db["id"], db["host_id"], "running")], trace)
        self.assertEqual(([m["state"] for m in ms], model.running_on_reachable()),
                         (["running"] * model.replicas, model.replicas), trace)
        # and each host's reserved capacity is that of the machines running there: none
        # leaked by a restart, a loss or a return, none missing
        scheduler = c.apps.placements.scheduler
        for host_id in HOSTS:
            here = [(await c.apps.data.machines.get(m["id"]))["spec"]
                    for m in ms + dbs if m["host_id"] == host_id]
            host = scheduler.host(host_id)
            self.assertEqual((host.machines, host.used_memory_mb),
                             (len(here), sum(spec["memory_mb"] for spec in here)),
                             (host_id, trace))
        model.h.stop()
