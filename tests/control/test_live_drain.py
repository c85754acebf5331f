"""
Live drains, control-plane side (issue 18): the choice of mode, the order of the live phases
(each stored before it is acted on), the fallback to the cold path, the failure branches and
the resolution after a control-plane restart.

The agents are real (L{zwrm.agent.executor.Executor} and L{zwrm.agent.live.LiveMigrations})
over the fake hypervisor driver, whose live migration (L{zwrm.drivers.fake_live}) passes the
same contract tests as QEMU's; the control plane's time is a Clock (L{DrainCluster}).
"""

import os

from autobahn.wamp.exception import ApplicationError
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.control.test_apps import d, procedures
from tests.control.test_drain import (
    DrainCluster,
    crash_and_resume,
    drain_and_wait,
    restart,
    sha,
    write_known,
)
from zwrm import errors, pki
from zwrm.agent.live import HASH_BYTES, LiveMigrations
from zwrm.control import live_drain
from zwrm.control.live_drain import live_refusal
from zwrm.control.migration import Migration
from zwrm.drivers.fake_live import FakeNetwork
from zwrm.testing.processes import poll
from zwrm.wamp.router import RouterLimits

LIVE_PATH = ["live_preparing", "live_migrating", "switching_over", "switched_over",
             "verifying", "committing", "cleaning", "done"]
COLD_TAIL = ["bulk_copying", "stopping_source", "delta_copying", "starting_replacement",
             "waiting_healthy", "committing", "cleaning", "done"]


def _wire(f):
    e = f.value
    if isinstance(e, errors.ZwrmError):
        raise ApplicationError(e.uri, *e.args, **(e.kwargs or {}))
    return f


class LiveDrainCluster(DrainCluster):
    """L{DrainCluster} whose agents also have their C{live.*} procedures."""

    async def start(self, hosts=("h-a", "h-b"), **facts):
        self.net = FakeNetwork()
        self.lives = {}
        await DrainCluster.start(self, hosts, **facts)
        self.phase_at = []  # (host, verb, the migration's stored phase when it was called)
        return self

    async def add_host(self, host_id, **facts):
        await DrainCluster.add_host(self, host_id, **facts)
        ex, procs = self.executors[host_id]
        ex.driver.network = self.net
        cert, key = self.ca.issue_host(host_id, names=("127.0.0.1",))
        creds = pki.HostCredentials(self.ca.certificate_pem, cert, key)
        live = LiveMigrations(reactor, host_id, ex.driver, ex.volumes, lambda: creds,
                              lambda: "127.0.0.1",
                              state_dir=os.path.join(self.dir, host_id, "live"), executor=ex)
        self.lives[host_id] = live
        procs.update(procedures(live))

    def stored_phase(self):
        for drain in self.drains.active.values():
            for run in drain.migrations.values():
                return run.row["phase"]
        return None

    def call(self, procedure, *args, options=None, **kwargs):
        host, verb = procedure.split(".")[2], procedure.split(".", 3)[3]
        if verb.startswith("live.") or verb in ("machine.destroy", "volume.delete"):
            self.phase_at.append((host, verb, self.stored_phase()))
        if verb == "live.hashes":  # bytes: as they cross the wire (not JSON here)
            self.calls.append((host, verb))
            return maybeDeferred(self.executors[host][1][verb], *args, **kwargs).addErrback(
                _wire)
        return DrainCluster.call(self, procedure, *args, options=options, **kwargs)

    def wrap(self, host, verb, make):
        """Replace procedure C{verb} of C{host} with C{make(original)}."""
        procs = self.executors[host][1]
        procs[verb] = make(procs[verb])

    def before(self, host, verb, fn):
        """Call C{fn(*args)} each time C{verb} of C{host} is called, before it runs."""
        def make(original):
            def f(*args, details=None, **kwargs):
                fn(*args)
                if details is None:
                    return original(*args, **kwargs)
                return original(*args, details=details, **kwargs)
            return f
        self.wrap(host, verb, make)

    def verbs(self, *names):
        return [(h, v) for h, v, _ in self.phase_at if v in names]


async def addresses(c, *machine_ids):
    """The stored address rows of C{machine_ids}: C{(address, host)} or L{None} each."""
    out = []
    for mid in machine_ids:
        rows = await c.store.select("net_addresses", "machine_id = ?", [mid])
        out.append((rows[0]["id"], rows[0]["host_id"]) if rows else None)
    return out


async def real_until(predicate, what, seconds=30.0):
    """A bounded poll in real time (the agents' fake migrations run on the real reactor)."""
    deadline = reactor.seconds() + seconds
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"never: {what}")
        await deferLater(reactor, 0.01, lambda: None)


async def live_setup(testcase, shutdown_delay=None, health=None, **kw):
    """
    A cluster of two hosts, and an app with one volume whose data is known (with
    C{health}, a health check of that spec on port 80, passing).
    """
    c = await LiveDrainCluster(testcase).start(**kw)
    await c.apps.create_app("db")
    spec = c.spec(volumes=[{"name": "data", "size_mb": 32, "mount": "/data"}])
    if shutdown_delay is not None:
        spec["shutdown_delay"] = shutdown_delay
    if health is not None:
        spec.update(service_port=80, health=health)
    m = (await c.apps.deploy("db", spec))["machines"][0]
    if health is not None:
        async def passing():
            return (await c.store.get("machines", m["id"]))["health"]["status"] == "passing"
        await poll(reactor, passing, 10, interval=0.01, what="the machine passing")
    src = m["host_id"]
    dst = "h-b" if src == "h-a" else "h-a"
    vid = m["volumes"][0]
    before = write_known(c.store_of(src).path(vid), "v1")
    return c, m, src, dst, vid, before


class LiveDrainTests(TestCase):
    timeout = 120

    def setup(self, **kw):
        return live_setup(self, **kw)

    def drain(self, c, host, **kw):
        kw.setdefault("min_healthy", 1)
        return drain_and_wait(c, host, **kw)

    def phases(self, c):
        """The phases announced (each is stored first), in order."""
        return [e["payload"]["phase"] for _, e in c.published
                if e.get("kind") == "migration" and e["payload"]["phase"]
                != e["payload"].get("old")]

    async def assert_moved(self, c, m, src, dst, vid, before):
        self.assertEqual(sha(c.store_of(dst).path(vid)), before)
        self.assertFalse(c.store_of(src).exists(vid))
        machines = await c.apps.list_machines()
        self.assertEqual([(x["host_id"], x["state"]) for x in machines], [(dst, "running")])
        self.assertEqual((await c.store.get("volumes", vid))["host_id"], dst)
        self.assertEqual(c.registry.entry(src).machine.state, "drained")

    # -- the live path -----------------------------------------------------------------

    @d
    async def test_auto_moves_live_each_phase_stored_before_it_acts(self):
        c, m, src, dst, vid, before = await self.setup()
        result, status = await self.drain(c, src)
        self.assertEqual([(p["mode"], p["mode_reason"]) for p in result["plan"]],
                         [("live", None)])
        self.assertEqual(self.phases(c), LIVE_PATH)
        self.assertEqual(status["state"], "completed")
        mg = status["migrations"][0]
        self.assertEqual((mg["phase"], mg["error"], mg["mode"]), ("done", None, "live"))
        self.assertIsInstance(mg["downtime_ms"], int)
        self.assertTrue(mg["verified"][vid]["ok"])
        await self.assert_moved(c, m, src, dst, vid, before)
        # Each call was made with its phase stored (and announced) before it.
        at = {(h, v): p for h, v, p in c.phase_at}
        self.assertEqual(at[(dst, "live.prepare")], "live_preparing")
        self.assertEqual(at[(src, "live.migrate")], "live_migrating")
        self.assertEqual(at[(src, "live.switchover")], "switching_over")
        self.assertEqual(at[(dst, "live.status")], "switched_over")
        self.assertEqual(at[(src, "live.hashes")], "verifying")
        self.assertEqual(at[(dst, "live.verify")], "verifying")
        self.assertEqual(at[(src, "machine.destroy")], "cleaning")
        self.assertEqual(at[(src, "volume.delete")], "cleaning")
        # The source was never resumed or cancelled; the target's executor owns the machine.
        self.assertEqual(c.verbs("live.cancel", "live.resume"), [])
        new_id = mg["replacement"]
        self.assertEqual(c.executors[dst][0].machine_status(new_id)["state"], "running")
        self.assertEqual(c.executors[src][0].list_machines(), [])

    @d
    async def test_the_machine_keeps_its_address_which_moves_at_the_switchover(self):
        """
        The guest keeps its address (bridge networking: it is in its memory): the target
        is given the original's network spec; the stored address row moves to the
        replacement on the target only once switched_over is stored, and the cleaning of
        the original frees nothing of it.
        """
        from twisted.internet.defer import ensureDeferred

        c, m, src, dst, vid, before = await self.setup()
        [(address, host)] = await addresses(c, m["id"])
        self.assertEqual(host, src)
        seen, specs = {}, []

        def at(verb):
            def look(*args):
                run = next(iter(c.drains.active[src].migrations.values()))
                seen[verb] = ensureDeferred(addresses(c, m["id"], run.detail["replacement"]))
                if verb == "live.prepare":
                    specs.append(args[1])
            return look

        c.before(dst, "live.prepare", at("live.prepare"))
        c.before(src, "live.migrate", at("live.migrate"))
        c.before(src, "live.switchover", at("live.switchover"))
        c.before(src, "live.hashes", at("live.hashes"))
        _, status = await self.drain(c, src)
        new_id = status["migrations"][0]["replacement"]
        self.assertEqual(specs[0]["network"]["address"], address)
        self.assertEqual(await seen["live.prepare"], [(address, src), None])
        self.assertEqual(await seen["live.migrate"], [(address, src), None])
        self.assertEqual(await seen["live.switchover"], [(address, src), None])
        self.assertEqual(await seen["live.hashes"], [None, (address, dst)])
        self.assertEqual(await addresses(c, m["id"], new_id), [None, (address, dst)])
        net = c.drains._replicas.network
        self.assertEqual(net.addresses[new_id][:2], (address, dst))
        self.assertNotIn(m["id"], net.addresses)

    @d
    async def test_moving_an_address_is_stored_announced_and_idempotent(self):
        c, m, src, dst, vid, before = await self.setup()
        net = c.drains._replicas.network
        await net.load()  # as the control plane's start does: kept in memory too
        [(address, _)] = await addresses(c, m["id"])
        heard = []
        net.subscribe(lambda kind, key: heard.append((kind, key)))
        self.assertEqual(await net.move_address(m["id"], "m-new", dst), address)
        self.assertEqual(heard, [("address", m["id"]), ("address", "m-new")])
        self.assertEqual(await addresses(c, m["id"], "m-new"), [None, (address, dst)])
        self.assertIsNone(await net.move_address(m["id"], "m-new", dst))  # moved already
        self.assertEqual(len(heard), 2)
        # A later start of the replacement on that host keeps the address.
        spec = await net.attach("m-new", m["app_id"], dst)
        self.assertEqual(spec["address"], address)

    @d
    async def test_the_routes_never_lack_the_guest_at_the_switchover(self):
        """
        At the switchover the replacement is stored running before it takes the guest's
        address, and the original leaves the routes (stopping) only after that: every view
        of the app in between has the guest in it (in acceptance, the kernel's forward of a
        published port went "to nothing" for a second at each live drain before).
        """
        c, m, src, dst, vid, before = await self.setup()
        net = c.drains._replicas.network
        await net.load()
        seen = []  # in the order stored and announced
        net.subscribe(lambda kind, key: seen.append((kind, key)))
        c.apps.data.machines.subscribe(
            lambda e: seen.append((e["payload"]["state"], e["payload"]["machine_id"])))
        # The target agent's own reports (its adopted machine running) come after the
        # drain's steps, as they may over the network.
        held, report = [], c.report
        c.report = lambda h, e: held.append((h, e)) if h == dst else report(h, e)
        _, status = await self.drain(c, src)
        c.report = report
        for h, e in held:
            await report(h, e)
        new_id = status["migrations"][0]["replacement"]
        order = [x for x in seen if x in (("running", new_id), ("address", new_id),
                                          ("stopping", m["id"]))]
        self.assertEqual(order, [("running", new_id), ("address", new_id),
                                 ("stopping", m["id"])])

    @d
    async def test_the_replacement_is_stored_before_the_target_is_asked(self):
        c, m, src, dst, vid, before = await self.setup()
        rows = []
        c.before(dst, "live.prepare",
                 lambda machine_id, *args: rows.append(c.apps.data.machines.get(machine_id)))
        await self.drain(c, src)
        row = await rows[0]
        self.assertEqual((row["host_id"], row["state"]), (dst, "pending"))

    @d
    async def test_the_paused_source_leaves_the_routes_at_the_switchover(self):
        c, m, src, dst, vid, before = await self.setup()
        states = []
        c.before(src, "live.hashes",
                 lambda *args: states.append(c.apps.data.machines.get(m["id"])))
        _, status = await self.drain(c, src)
        row = await states[0]
        self.assertEqual(row["state"], "stopping")
        self.assertEqual(status["migrations"][0]["replacement_state"]["state"], "running")

    @d
    async def test_cleaning_destroys_the_moved_source_at_once(self):
        """
        After a live move the cleaning destroys the paused source at once, whatever its
        row says by then (here: running again, as a late report of its agent could make
        it): it is not put back out of the routes for the app's shutdown_delay (its guest
        runs on the target) nor powered down (machine.stop: no guest to power down here);
        its record goes, the source agent forgets it and its volume is deleted there.
        """
        c, m, src, dst, vid, before = await live_setup(self, shutdown_delay=30)
        step = c.drains._step_cleaning
        took = []

        async def cleaning(drain, run):
            row = await c.apps.data.machines.get(m["id"])
            await c.drains._replicas.set_machine(row, "a late report (test)",
                                                 state="running")
            started = c.clock.seconds()
            await step(drain, run)
            took.append(c.clock.seconds() - started)

        c.drains._step_cleaning = cleaning
        _, status = await self.drain(c, src)
        self.assertEqual(status["state"], "completed")
        self.assertEqual(took, [0.0])  # no shutdown_delay waited for
        self.assertEqual([v for h, v in c.calls if h == src and v == "machine.stop"], [])
        self.assertEqual(c.verbs("machine.destroy", "volume.delete"),
                         [(src, "machine.destroy"), (src, "volume.delete")])
        self.assertIsNone(await c.store.get("machines", m["id"]))
        self.assertEqual(c.executors[src][0].list_machines(), [])
        self.assertFalse(c.store_of(src).exists(vid))
        await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_progress_is_kept_for_drain_status(self):
        c, m, src, dst, vid, before = await self.setup()
        seen = []

        def migrate(original):
            def f(*args, details=None):
                def look(result):
                    run = next(iter(c.drains.active[src].migrations.values()))
                    seen.append((dict(run.detail["live"]), run.row["bytes_total"]))
                    return result
                return original(*args, details=details).addCallback(look)
            return f

        c.wrap(src, "live.switchover", migrate)
        await self.drain(c, src)
        live, total = seen[0]
        self.assertEqual(live["phase"], "completed")  # the agent's last progress
        self.assertGreaterEqual(live["ram"]["passes"], 1)
        self.assertEqual(total, 32 * 1024 * 1024)  # the volumes' sizes (live.describe)
        mg = (await c.drains.drain_status(src))["migrations"][0]
        self.assertEqual((mg["bytes_sent"], mg["bytes_total"]), (total, total))

    @d
    async def test_drain_status_shows_the_live_progress(self):
        c, m, src, dst, vid, before = await self.setup()
        host = c.executors[src][0].driver.host
        host.live_converges = False  # RAM passes go on until it is allowed to converge
        await c.drains.drain(src, min_healthy=1, healthy_deadline=30)
        run = next(iter(c.drains.active[src].migrations.values()))
        def announced():
            live = run.detail.get("live") or {}
            return ((live.get("ram") or {}).get("passes", 0) >= 2
                    and (live.get("mirror") or {}).get("total"))

        # RAM passes are announced as they happen; the mirror's figures at each progress
        # reading (every 0.5 s of the agent's time).
        await real_until(announced, "RAM passes and the mirror's figures announced")
        mg = (await c.drains.drain_status(src))["migrations"][0]
        self.assertEqual((mg["phase"], mg["mode"]), ("switching_over", "live"))
        self.assertEqual(mg["live"]["phase"], "migrating")
        self.assertEqual(mg["live"]["mirror"]["total"], 32 * 1024 * 1024)
        self.assertEqual(mg["live"]["mirror"]["done"], 32 * 1024 * 1024)
        self.assertGreaterEqual(mg["live"]["ram"]["passes"], 2)
        self.assertEqual(mg["bytes_total"], 32 * 1024 * 1024)
        host.live_converges = True
        await c.settle(c.drains.active[src].done)
        mg = (await c.drains.drain_status(src))["migrations"][0]
        self.assertEqual((mg["phase"], mg["live"]), ("done", None))
        self.assertIsInstance(mg["downtime_ms"], int)

    # -- the choice of mode ----------------------------------------------------------

    def facts(self, c, host, **change):
        def make(original):
            return lambda: dict(original(), **change)
        c.wrap(host, "live.facts", make)

    @d
    async def test_different_cpu_models_go_cold_in_auto(self):
        c, m, src, dst, vid, before = await self.setup()
        self.facts(c, dst, cpu_model="other")
        result, status = await self.drain(c, src)
        self.assertEqual(result["plan"][0]["mode"], "cold")
        self.assertIn("differ in cpu_model", result["plan"][0]["mode_reason"])
        self.assertEqual(self.phases(c), COLD_TAIL)
        self.assertEqual(status["migrations"][0]["mode"], "cold")
        await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_live_mode_is_refused_up_front_changing_nothing(self):
        for change, words in (({"machine_type": "pc-q35-9.9"}, "differ in machine_type"),
                              ({"live": False, "reason": "cpu_model host"},
                               "cannot migrate live: cpu_model host"),
                              ({"network": "bridge"}, "differ in VM networking")):
            c, m, src, dst, vid, before = await self.setup()
            self.facts(c, dst, **change)
            hosts_before = await c.registry.list()
            with self.assertRaises(errors.Conflict) as e:
                await c.drains.drain(src, mode="live")
            self.assertIn(words, e.exception.message)
            self.assertIn(dst, e.exception.message)
            self.assertEqual(await c.store.select("drains"), [])
            self.assertEqual(await c.store.select("migrations"), [])
            self.assertEqual(c.registry.entry(src).machine.state, "ready")
            self.assertEqual(await c.registry.list(), hosts_before)  # no room held
            self.assertNotIn(src, c.drains.active)

    @d
    async def test_mode_cold_and_agents_without_live(self):
        c, m, src, dst, vid, before = await self.setup()
        [(address, _)] = await addresses(c, m["id"])
        result, _ = await self.drain(c, src, mode="cold")
        self.assertEqual(result["plan"][0]["mode"], "cold")
        self.assertEqual(self.phases(c), COLD_TAIL)
        self.assertEqual(c.verbs("live.prepare", "live.migrate"), [])
        # A cold move: the replacement has an address of its own on the target; the
        # original's was released with its row (no address is kept by a gone machine).
        [new] = await c.apps.list_machines()
        [(new_address, host)] = await addresses(c, new["id"])
        self.assertEqual(await addresses(c, m["id"]), [None])
        self.assertEqual(host, dst)
        self.assertNotIn(m["id"], c.drains._replicas.network.addresses)
        self.assertEqual([r["machine_id"] for r in await c.store.select("net_addresses")],
                         [new["id"]])
        # An agent from before live.* counts as "cannot": auto goes cold.
        c, m, src, dst, vid, before = await self.setup()
        del c.executors[dst][1]["live.facts"]
        result = await c.drains.drain(src, dry_run=True)
        self.assertEqual(result["plan"][0]["mode"], "cold")
        self.assertIn(f"host {dst} cannot migrate live", result["plan"][0]["mode_reason"])

    @d
    async def test_a_bad_mode_is_refused_naming_mode(self):
        c, m, src, dst, vid, before = await self.setup()
        with self.assertRaises(errors.InvalidArgument) as e:
            await c.drains.drain(src, mode="warp")
        self.assertIn("mode", e.exception.message)
        self.assertEqual(e.exception.kwargs.get("argument"), "mode")
        self.assertEqual(await c.store.select("drains"), [])
        self.assertEqual(c.registry.entry(src).machine.state, "ready")

    @d
    async def test_the_operators_policy_reaches_both_agents(self):
        c, m, src, dst, vid, before = await self.setup()
        asked = {}

        def record(verb):
            return lambda *args: asked.__setitem__(verb, args)

        c.before(dst, "live.prepare", record("prepare"))
        c.before(src, "live.migrate", record("migrate"))
        _, status = await self.drain(c, src, downtime_limit=150, live_deadline=30,
                                     postcopy=True)
        self.assertEqual(status["state"], "completed")
        self.assertEqual(asked["prepare"][4], True)  # the target accepts post-copy
        self.assertEqual(asked["migrate"][3], {"downtime_limit_ms": 150, "deadline": 30.0,
                                               "postcopy": True})
        # Without them: the agents' defaults.
        c, m, src, dst, vid, before = await self.setup()
        asked.clear()
        c.before(dst, "live.prepare", record("prepare"))
        c.before(src, "live.migrate", record("migrate"))
        await self.drain(c, src)
        self.assertEqual((asked["prepare"][4], asked["migrate"][3]), (False, None))

    @d
    async def test_the_guests_health_goes_with_it(self):
        # The original's stored health reaches the target's live.prepare (its check starts
        # from it: tests/agent/test_live_executor.py), and the moved machine's row stays
        # passing: the app's routes keep the guest through the move.
        c, m, src, dst, vid, before = await self.setup(health={"type": "tcp", "interval": 1})
        asked = []

        def make(original):
            def f(*args, **kwargs):
                asked.append(kwargs.get("health"))
                return original(*args, **kwargs)
            return f

        c.wrap(dst, "live.prepare", make)
        reported = []
        report = c.report

        def record(host_id, event):
            if host_id == dst:
                reported.append((event["machine_id"], event["state"], event["health"]))
            return report(host_id, event)

        c.report = record
        _, status = await self.drain(c, src)
        self.assertEqual(status["state"], "completed")
        self.assertEqual(asked, ["passing"])
        [row] = [r for r in await c.apps.list_machines() if r["host_id"] == dst]
        self.assertEqual(row["health"], "passing")
        # The target's agent never said "starting" of it (which takes it out of the routes).
        self.assertEqual({(s, h) for _, s, h in reported if _ == row["id"]},
                         {("running", "passing")})
        # A target whose agent does not say it takes the health is not given it.
        c, m, src, dst, vid, before = await self.setup(health={"type": "tcp", "interval": 1})
        asked.clear()
        self.facts(c, dst, prepare_health=None)
        c.wrap(dst, "live.prepare", make)
        await self.drain(c, src)
        self.assertEqual(asked, [None])

    @d
    async def test_volumes_are_verified_with_blake3_where_both_agents_know_it(self):
        c, m, src, dst, vid, before = await self.setup()
        asked = []
        c.before(src, "live.hashes", lambda *args: asked.append(args[3:]))
        _, status = await self.drain(c, src)
        self.assertEqual(status["state"], "completed")
        verified = status["migrations"][0]["verified"][vid]
        self.assertEqual((verified["ok"], verified["hash"]), (True, "blake3"))
        self.assertEqual(set(asked), {("blake3",)})

    @d
    async def test_an_agent_of_the_version_before_is_verified_with_sha256(self):
        """
        Either agent of the version before (its live.facts names no hashes; as a source,
        its live.hashes takes no algorithm and names none; as a target, its live.verify
        ignores a page's hash and compares SHA-256 of the whole volume with what it is
        sent, as agents before pages did): the drain verifies with SHA-256, and the copy
        verifies. Such a target gets the whole volume in one call; a source of the version
        before is asked in pages (pages made small here: 64 blocks of hashes, 128 per call).
        """
        self.patch(live_drain, "LIVE_HASH_PAGE", 64)
        self.patch(live_drain, "LIVE_VERIFY_PAGE", 128)

        def old_hashes(original):
            def hashes(volume_id, first=0, count=None, **kw):
                def unnamed(answer):
                    answer = dict(answer)
                    del answer["hash"]
                    return answer
                return original(volume_id, first, count, **kw).addCallback(unnamed)
            return hashes

        def old_verify(original):
            def verify(machine_id, volume_id, hashes, **kw):
                whole = {k: v for k, v in hashes.items() if k not in ("hash", "first", "count")}
                return original(machine_id, volume_id, whole, **kw)
            return verify

        for old, calls in (("source", [(0, 128), (128, 128), (256, 128), (384, 128)]),
                           ("target", [(0, 512)])):
            c, m, src, dst, vid, before = await self.setup()
            host = src if old == "source" else dst
            self.facts(c, host, verify_hashes=None)
            if old == "source":
                c.wrap(host, "live.hashes", old_hashes)
            else:
                c.wrap(host, "live.verify", old_verify)
            sent = []
            c.before(dst, "live.verify", lambda mid, vid, hashes, sent=sent: sent.append(
                (hashes["first"], len(hashes["hashes"]) // 32)))
            _, status = await self.drain(c, src)
            self.assertEqual(status["state"], "completed", old)
            verified = status["migrations"][0]["verified"][vid]
            self.assertEqual((verified["ok"], verified["hash"], verified["blocks"]),
                             (True, "sha256", 512), old)
            self.assertEqual(sent, calls, old)
            self.assertEqual(c.verbs("live.hashes").count((src, "live.hashes")), 8, old)
            await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_bad_live_options_are_refused_naming_them(self):
        c, m, src, dst, vid, before = await self.setup()
        for kw, name in (({"downtime_limit": 0}, "downtime_limit"),
                         ({"live_deadline": "soon"}, "live_deadline"),
                         ({"postcopy": "yes"}, "postcopy")):
            with self.assertRaises(errors.InvalidArgument) as e:
                await c.drains.drain(src, **kw)
            self.assertEqual(e.exception.kwargs.get("argument"), name)
            self.assertIn(name, e.exception.message)
        self.assertEqual(await c.store.select("drains"), [])
        self.assertEqual(c.registry.entry(src).machine.state, "ready")

    @d
    async def test_dry_run_says_the_mode(self):
        c, m, src, dst, vid, before = await self.setup()
        plan = await c.drains.drain(src, dry_run=True)
        self.assertEqual(plan["plan"][0]["mode"], "live")
        self.assertEqual(await c.store.select("drains"), [])

    # -- failures ---------------------------------------------------------------------

    def rolled_back(self, c, src):
        """live.migrate fails as a rolled-back migration does (the machine runs on)."""
        def make(original):
            def f(machine_id, *args, details=None):
                return fail(errors.Unavailable(f"machine {machine_id}: live migration rolled "
                                               "back (test); the machine runs on here"))
            return f
        c.wrap(src, "live.migrate", make)

    @d
    async def test_rolled_back_falls_back_to_cold_in_auto(self):
        c, m, src, dst, vid, before = await self.setup()
        self.rolled_back(c, src)
        _, status = await self.drain(c, src)
        self.assertEqual(self.phases(c), LIVE_PATH[:2] + COLD_TAIL)
        mg = status["migrations"][0]
        self.assertEqual((mg["phase"], mg["mode"]), ("done", "cold"))
        self.assertIn("rolled back (test)", mg["mode_reason"])
        # The target's incoming machine was cancelled before the cold path began.
        self.assertEqual(c.phase_at[[v for _, v, _ in c.phase_at].index("live.cancel")],
                         (dst, "live.cancel", "live_migrating"))
        self.assertEqual(c.lives[dst].incoming, {})
        await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_rolled_back_in_live_mode_rolls_back(self):
        c, m, src, dst, vid, before = await self.setup()
        [address] = await addresses(c, m["id"])
        self.rolled_back(c, src)
        _, status = await self.drain(c, src, mode="live")
        # The original keeps its address; the replacement never had one.
        self.assertEqual([(r["id"], r["machine_id"], r["host_id"])
                          for r in await c.store.select("net_addresses")],
                         [(address[0], m["id"], src)])
        self.assertEqual(self.phases(c), LIVE_PATH[:2] + ["rolling_back", "rolled_back"])
        self.assertEqual(status["state"], "incomplete")
        self.assertIn("rolled back (test)", status["migrations"][0]["error"])
        machines = await c.apps.list_machines()
        self.assertEqual([(x["id"], x["host_id"], x["state"]) for x in machines],
                         [(m["id"], src, "running")])
        self.assertFalse(c.store_of(dst).exists(vid))  # the blank copy is gone
        self.assertEqual(sha(c.store_of(src).path(vid)), before)

    async def snapshot(self, c, vid):
        """A snapshot of the running machine's volume. @return: its id and its data's."""
        snap = await c.apps.snapshot_volume(vid, "kept")
        store = c.store_of(snap["host_id"])
        return snap["id"], sha(store.snapshot_info(vid, snap["id"])["path"])

    @d
    async def test_a_live_move_takes_the_volumes_snapshots(self):
        c, m, src, dst, vid, before = await self.setup()
        sid, data = await self.snapshot(c, vid)
        _, status = await self.drain(c, src)
        mg = status["migrations"][0]
        self.assertEqual((mg["phase"], mg["mode"]), ("done", "live"))
        await self.assert_moved(c, m, src, dst, vid, before)
        self.assertEqual([(s["id"], sha(s["path"])) for s in c.store_of(dst).snapshots()],
                         [(sid, data)])
        self.assertEqual(c.store_of(src).snapshots(), [])
        self.assertEqual((await c.apps.data.volumes.get_snapshot(sid))["host_id"], dst)
        # copied before the target was asked to prepare
        self.assertLess(c.calls.index((src, "volume.send")), c.calls.index((dst, "live.prepare")))

    @d
    async def test_a_live_move_rolled_back_leaves_no_snapshot_copy(self):
        c, m, src, dst, vid, before = await self.setup()
        sid, data = await self.snapshot(c, vid)
        self.rolled_back(c, src)
        _, status = await self.drain(c, src, mode="live")
        self.assertEqual(status["migrations"][0]["phase"], "rolled_back")
        self.assertFalse(c.store_of(dst).exists(vid))  # the blank copy is gone, and with
        self.assertEqual(c.store_of(dst).snapshots(), [])  # it the snapshot's copy
        self.assertEqual([(s["id"], sha(s["path"])) for s in c.store_of(src).snapshots()],
                         [(sid, data)])
        self.assertEqual((await c.apps.data.volumes.get_snapshot(sid))["host_id"], src)

    @d
    async def test_prepare_refused_falls_back_to_cold(self):
        c, m, src, dst, vid, before = await self.setup()

        def make(original):
            return lambda *a, **k: fail(errors.Unavailable("no live migration here (test)"))

        c.wrap(dst, "live.prepare", make)
        _, status = await self.drain(c, src)
        self.assertEqual(self.phases(c), LIVE_PATH[:1] + COLD_TAIL)
        self.assertIn("no live migration here", status["migrations"][0]["mode_reason"])
        await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_uncertain_and_the_target_resumed_is_switched_over(self):
        c, m, src, dst, vid, before = await self.setup()

        def make(original):
            def f(*args, details=None):
                def uncertain(_):
                    raise errors.Conflict("failed after the switchover began (test)")
                return original(*args, details=details).addCallback(uncertain)
            return f

        c.wrap(src, "live.switchover", make)
        _, status = await self.drain(c, src)
        self.assertEqual(self.phases(c), LIVE_PATH)
        self.assertEqual(c.verbs("live.cancel"), [])  # neither side cancelled
        await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_uncertain_and_the_target_did_not_resume_cancels_both(self):
        c, m, src, dst, vid, before = await self.setup()

        def migrate(original):
            def f(*a, details=None):
                # It stays held in sync: neither continued nor rolled back by its agent.
                original(*a, details=details).addErrback(lambda _: None)
                return fail(errors.Conflict("uncertain (test)"))
            return f

        def status(original):  # the source says it continued past pre-switchover
            def f(machine_id):
                return maybeDeferred(original, machine_id).addCallback(
                    lambda st: dict(st, role="source", state="uncertain"))
            return f

        cancelled = []

        def cancel(original):
            def f(machine_id):
                cancelled.append(machine_id)
                return {"cancelled": True}
            return f

        c.wrap(src, "live.switchover", migrate)
        c.wrap(src, "live.status", status)
        c.wrap(src, "live.cancel", cancel)
        _, st = await self.drain(c, src)
        # The target is cancelled first (it did not resume), then the source resumes.
        self.assertEqual(c.verbs("live.cancel"), [(dst, "live.cancel"), (src, "live.cancel")])
        self.assertEqual(cancelled, [m["id"]])
        self.assertEqual(self.phases(c), LIVE_PATH[:3] + COLD_TAIL)
        await self.assert_moved(c, m, src, dst, vid, before)

    async def lost_at_switchover(self, c, src, host, error):
        """
        Drain C{src}; once the switchover completed, C{host} is lost and live.switchover
        fails with C{error}.  @return: the drain, once its migration waits for a host.
        """
        def make(original):
            def f(*args, details=None):
                def lost(_):
                    c.registry.entry(host).executor = False
                    raise error
                return original(*args, details=details).addCallback(lost)
            return f

        c.wrap(src, "live.switchover", make)
        await c.drains.drain(src, min_healthy=1, healthy_deadline=30)
        run = c.drains.active[src]
        mig = next(iter(run.migrations.values()))
        for _ in range(3000):
            if mig.detail.get("waiting"):
                break
            await c.step()
        return run

    @d
    async def test_an_unreachable_target_is_waited_for_never_guessed(self):
        """
        The switchover's outcome is uncertain and the target's agent is lost with it: the
        control plane waits for the target (drain-status says so), however long, and never
        resumes or cancels the source meanwhile; once the target is back and says it runs
        the machine, the move completes.
        """
        from tests.control.test_drain import _facts

        c, m, src, dst, vid, before = await self.setup()
        run = await self.lost_at_switchover(
            c, src, dst, errors.Conflict("failed after the switchover began (test)"))
        end = c.clock.seconds() + 600
        for _ in range(1000):  # the Clock's timers for 600 s, or none left (it waits)
            if c.clock.seconds() >= end or not await c.step(most=end - c.clock.seconds()):
                break
        mg = (await c.drains.drain_status(src))["migrations"][0]
        self.assertEqual((mg["phase"], mg["waiting_for"]), ("switching_over", dst))
        self.assertIn("to learn where machine", mg["error"])
        self.assertEqual(c.verbs("live.cancel", "live.resume"), [])
        await c.registry.register(dst, dict(_facts(), name=dst))
        await c.settle(run.done)
        status = await c.drains.drain_status(src)
        self.assertEqual(status["state"], "completed")
        self.assertEqual(self.phases(c), LIVE_PATH)
        self.assertEqual(c.verbs("live.cancel"), [])
        await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_a_source_lost_at_the_switchover_is_not_waited_for_to_switch_over(self):
        """
        The source's host is lost as the switchover completes (live.switchover's answer
        with it): the target says it holds the machine, so switched_over is stored (and
        the address moves) without waiting for the source; the verification then waits
        for the source (its frozen image), and the move completes once it is back.
        """
        from tests.control.test_drain import _facts

        c, m, src, dst, vid, before = await self.setup()
        run = await self.lost_at_switchover(
            c, src, src, errors.Unavailable("the connection was lost (test)"))
        mg = (await c.drains.drain_status(src))["migrations"][0]
        self.assertEqual((mg["phase"], mg["waiting_for"]), ("verifying", src))
        new_id = mg["replacement"]
        self.assertEqual((await addresses(c, new_id))[0][1], dst)
        self.assertEqual(c.verbs("live.cancel", "live.resume"), [])
        await c.registry.register(src, dict(_facts(), name=src))
        await c.settle(run.done)
        status = await c.drains.drain_status(src)
        self.assertEqual(status["state"], "completed", status["migrations"][0]["error"])
        self.assertEqual(self.phases(c), LIVE_PATH)
        await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_a_target_that_completed_but_waits_paused_is_resumed(self):
        c, m, src, dst, vid, before = await self.setup()
        drv = c.executors[dst][0].driver
        finish = drv.finish_incoming
        failures = []

        def finish_once_failing(machine_id, *args, **kwargs):
            if not failures:
                failures.append(machine_id)
                return fail(errors.Unavailable("resume failed (test)"))
            return finish(machine_id, *args, **kwargs)

        drv.finish_incoming = finish_once_failing
        _, status = await self.drain(c, src)
        self.assertEqual(failures, [status["migrations"][0]["replacement"]])
        self.assertEqual(c.verbs("live.resume"), [(dst, "live.resume")])
        self.assertEqual(self.phases(c), LIVE_PATH)
        await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_verification_failure_is_loud_and_deletes_nothing(self):
        c, m, src, dst, vid, before = await self.setup()

        def hashes(original):
            def f(volume_id, *args):
                # A byte changed behind the guest's back on the target (not in its bitmap).
                with open(c.store_of(dst).path(volume_id), "r+b") as fh:
                    fh.seek(5 * 1024 * 1024 + 7)
                    b = fh.read(1)
                    fh.seek(5 * 1024 * 1024 + 7)
                    fh.write(bytes([b[0] ^ 0xFF]))
                return original(volume_id, *args)
            return f

        c.wrap(src, "live.hashes", hashes)
        _, status = await self.drain(c, src)
        self.flushLoggedErrors()
        mg = status["migrations"][0]
        self.assertEqual(self.phases(c), LIVE_PATH[:5] + ["failed"])
        self.assertEqual(status["state"], "incomplete")
        self.assertIn("VERIFICATION FAILED", mg["error"])
        self.assertFalse(mg["verified"][vid]["ok"])
        # Nothing deleted: the source's frozen image and its paused machine stay.
        self.assertEqual(sha(c.store_of(src).path(vid)), before)
        self.assertIn(m["id"], [x["machine_id"] for x in c.executors[src][0].list_machines()])
        self.assertEqual(c.verbs("volume.delete", "machine.destroy"), [])
        self.assertIsNotNone(await c.store.get("machines", m["id"]))

    async def drain_in_pages(self, corrupt_block=None):
        """
        Drain with pages made small (64 blocks of hashes, 128 verified per call), with
        C{corrupt_block} of the target's copy changed behind its guest's back just before the
        last page's hashes are asked for.

        @return: the cluster, what L{live_setup} returned but the cluster (the machine,
            source, target, volume id and the volume's digest before), and the migration's
            status; the pages verified (C{first}, C{count}, the hashes in each) are checked
            here.
        """
        self.patch(live_drain, "LIVE_HASH_PAGE", 64)
        self.patch(live_drain, "LIVE_VERIFY_PAGE", 128)
        c, m, src, dst, vid, before = await self.setup()
        pages = []

        def seen(machine_id, volume_id, hashes):
            pages.append((hashes["first"], hashes["count"], len(hashes["hashes"]) // 32))

        c.before(dst, "live.verify", seen)
        if corrupt_block is not None:
            def hashes(original):
                def f(volume_id, *args):
                    if args and args[0] == 448:  # the last page's blocks are asked for
                        with open(c.store_of(dst).path(volume_id), "r+b") as fh:
                            fh.seek(corrupt_block * 65536 + 3)
                            fh.write(b"changed on the target, not by its guest")
                    return original(volume_id, *args)
                return f

            c.wrap(src, "live.hashes", hashes)
        _, status = await self.drain(c, src)
        # 32 MiB: 512 blocks of 64 KiB, in pages of 128 (two pages of hashes each).
        self.assertEqual(pages, [(0, 128, 128), (128, 128, 128), (256, 128, 128),
                                 (384, 128, 128)])
        self.assertEqual(c.verbs("live.hashes").count((src, "live.hashes")), 8)
        return c, (m, src, dst, vid, before), status["migrations"][0]

    @d
    async def test_a_large_volume_is_verified_in_pages(self):
        """
        A volume larger than a page (LIVE_VERIFY_PAGE blocks; here made small) is verified in
        several calls, each with the source's hashes of its own blocks only (each message
        bounded, where one call would be as large as the volume's hashes); their counts add
        up.
        """
        c, (m, src, dst, vid, before), mg = await self.drain_in_pages()
        self.assertEqual(mg["phase"], "done")
        self.assertEqual(mg["verified"][vid]["blocks"], 512)
        self.assertTrue(mg["verified"][vid]["ok"])
        await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_a_block_that_differs_in_a_later_page_is_caught(self):
        c, (m, src, dst, vid, before), mg = await self.drain_in_pages(corrupt_block=500)
        self.flushLoggedErrors()
        self.assertEqual(mg["phase"], "failed")
        self.assertIn("VERIFICATION FAILED", mg["error"])
        self.assertIn("[500]", mg["error"])
        self.assertFalse(mg["verified"][vid]["ok"])
        self.assertEqual(sha(c.store_of(src).path(vid)), before)
        self.assertEqual(c.verbs("volume.delete", "machine.destroy"), [])

    def test_a_page_of_verification_fits_the_routers_limits(self):
        """
        A page's hashes, as hexadecimal in C{live.verify}'s message, stay within what the
        router lets wait toward a session without cutting it off, and within its message
        size.
        """
        limits = RouterLimits()
        hexed = live_drain.LIVE_VERIFY_PAGE * HASH_BYTES * 2
        self.assertLessEqual(hexed + 4096, limits.max_message_size)
        self.assertLessEqual(hexed + 4096, 4 * limits.max_outgoing_queue)

    @d
    async def test_a_rollback_that_finds_the_target_holding_the_machine_keeps_the_move(self):
        """
        A step fails after the migration completed (here: a fault of the control plane's
        own): the rollback asks both agents first; the target runs the machine, so it
        moved, and the source is never resumed.
        """
        c, m, src, dst, vid, before = await self.setup()
        step = c.drains._step_switching_over

        async def fails_after(drain, run):
            await step(drain, run)
            raise RuntimeError("a fault after the migration (test)")

        c.drains._step_switching_over = fails_after
        _, status = await self.drain(c, src, mode="live")
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(self.phases(c), LIVE_PATH[:3] + ["rolling_back"] + LIVE_PATH[3:])
        self.assertEqual(c.verbs("live.cancel"), [])
        self.assertEqual(status["state"], "completed")
        await self.assert_moved(c, m, src, dst, vid, before)

    def undrain_at_migrate(self, c, src, rolled_back=False):
        """The operator undrains just as live.migrate is asked."""
        from twisted.internet.defer import ensureDeferred

        undrained = []

        def make(original):
            def f(machine_id, *args, details=None):
                undrained.append(ensureDeferred(c.drains.undrain(src)))
                if rolled_back:
                    return fail(errors.Unavailable("rolled back (test)"))
                return original(machine_id, *args, details=details)
            return f

        c.wrap(src, "live.migrate", make)
        return undrained

    @d
    async def test_an_undrain_lets_a_live_move_finish(self):
        c, m, src, dst, vid, before = await self.setup()
        undrained = self.undrain_at_migrate(c, src)
        _, status = await self.drain(c, src)
        self.assertEqual((await undrained[0])["state"], "cancelling")
        self.assertEqual(self.phases(c), LIVE_PATH)
        self.assertEqual(status["state"], "cancelled")
        self.assertEqual(c.registry.entry(src).machine.state, "ready")
        self.assertEqual(sha(c.store_of(dst).path(vid)), before)
        machines = await c.apps.list_machines()
        self.assertEqual([(x["host_id"], x["state"]) for x in machines], [(dst, "running")])

    @d
    async def test_an_undrain_does_not_fall_back_to_cold(self):
        c, m, src, dst, vid, before = await self.setup()
        undrained = self.undrain_at_migrate(c, src, rolled_back=True)
        _, status = await self.drain(c, src)
        await undrained[0]
        self.assertEqual(self.phases(c), LIVE_PATH[:2] + ["rolling_back", "rolled_back"])
        self.assertEqual(status["state"], "cancelled")
        self.assertIn("the drain was cancelled", status["migrations"][0]["error"])
        machines = await c.apps.list_machines()
        self.assertEqual([(x["id"], x["host_id"]) for x in machines], [(m["id"], src)])
        self.assertFalse(c.store_of(dst).exists(vid))

    # -- control-plane restarts --------------------------------------------------------

    def lost_answer(self, c, src, verb="live.migrate"):
        """C{verb} runs, but its first answer never reaches the control plane."""
        lost = []

        def make(original):
            def f(*args, details=None):
                if lost:
                    return original(*args, details=details)
                lost.append(args)
                original(*args, details=details).addErrback(lambda _: None)
                return Deferred()
            return f
        c.wrap(src, verb, make)

    def restart(self, c, src):
        return restart(self, c, src)

    def source_state(self, c, src, mid):
        out = c.lives[src].outgoing.get(mid)
        return out.machine.state if out is not None else None

    @d
    async def test_restart_after_the_migration_completed_is_switched_over(self):
        c, m, src, dst, vid, before = await self.setup()
        self.lost_answer(c, src, "live.switchover")
        await c.drains.drain(src, min_healthy=1, healthy_deadline=30)
        await real_until(lambda: c.lives[src].finished.get(m["id"], {}).get("state")
                         == "completed", "the migration completed")
        self.assertEqual((await c.store.select("migrations"))[0]["phase"], "switching_over")
        status = await self.restart(c, src)
        self.assertEqual(status["state"], "completed")
        self.assertEqual([p for p in self.phases(c) if p != "switching_over"],
                         [p for p in LIVE_PATH if p != "switching_over"])
        self.assertEqual(c.verbs("live.cancel"), [])
        # The new control plane asked again and got the figures of the migration.
        self.assertEqual(c.verbs("live.switchover"), [(src, "live.switchover")] * 2)
        self.assertIsInstance(status["migrations"][0]["downtime_ms"], int)
        await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_restart_while_in_sync_follows_the_same_migration(self):
        """
        No switchover was decided (live_migrating stored) and the source is in sync,
        waiting: the new control plane's live.migrate answers for that same migration
        (nothing starts twice, nothing is cancelled) and the move goes on live.
        """
        c, m, src, dst, vid, before = await self.setup()
        self.lost_answer(c, src)
        await c.drains.drain(src, min_healthy=1, healthy_deadline=30)
        await real_until(lambda: self.source_state(c, src, m["id"]) == "ready",
                         "the mirrors are in sync")
        out = c.lives[src].outgoing[m["id"]]
        status = await self.restart(c, src)
        self.assertEqual(c.verbs("live.cancel"), [])
        self.assertEqual(c.verbs("live.migrate"), [(src, "live.migrate")] * 2)
        self.assertIs(c.lives[src].ended[m["id"]], out)  # the one migration
        mg = status["migrations"][0]
        self.assertEqual((status["state"], mg["mode"]), ("completed", "live"), mg["error"])
        await self.assert_moved(c, m, src, dst, vid, before)

    async def gave_up_then_restarted(self, c, m, src):
        """
        Drain C{src}: live_migrating stored, the control plane away, the source's agent
        gives up by itself; a new control plane resumes. @return: the drain's status.
        """
        self.policy(c, src, ready_timeout=0.2)
        self.lost_answer(c, src)
        await c.drains.drain(src, min_healthy=1, healthy_deadline=30)
        await real_until(lambda: c.lives[src].finished.get(m["id"], {}).get("state")
                         == "rolled_back", "the source rolled back by itself")
        return await self.restart(c, src)

    @d
    async def test_restart_after_the_source_gave_up_cancels_the_target_then_goes_cold(self):
        """
        live_migrating stored, the control plane away; the source's agent gave up by
        itself meanwhile (in sync, no switchover asked within ready_timeout): the new
        control plane cancels the target's machine and moves the machine cold.
        """
        c, m, src, dst, vid, before = await self.setup()
        status = await self.gave_up_then_restarted(c, m, src)
        self.assertEqual(c.verbs("live.cancel"), [(dst, "live.cancel")])
        self.assertEqual(c.verbs("live.switchover"), [])
        mg = status["migrations"][0]
        self.assertEqual((status["state"], mg["mode"]), ("completed", "cold"), mg["error"])
        self.assertIn("control plane restarted", mg["mode_reason"])
        await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_a_live_move_cancelled_after_a_restart_goes_cold_with_its_snapshots(self):
        """
        As above, the volume with a snapshot the drain copied to the target before its
        blank copy: after the target's cancel, the cold move deletes that copy by its id
        and copies it again, and the machine moves cold with its snapshot, held once.
        """
        c, m, src, dst, vid, before = await self.setup()
        sid, data = await self.snapshot(c, vid)
        status = await self.gave_up_then_restarted(c, m, src)
        self.assertEqual(c.verbs("live.cancel"), [(dst, "live.cancel")])
        mg = status["migrations"][0]
        self.assertEqual((status["state"], mg["mode"]), ("completed", "cold"), mg["error"])
        await self.assert_moved(c, m, src, dst, vid, before)
        self.assertEqual([(s["id"], sha(s["path"])) for s in c.store_of(dst).snapshots()],
                         [(sid, data)])

    @d
    async def test_restart_mid_switchover_follows_it_and_never_cancels(self):
        """
        The switchover was decided (switching_over stored) and the RAM migration runs when
        the control plane dies: the new one asks live.switchover again, which starts
        nothing and answers once the migration completed; nothing is cancelled.
        """
        c, m, src, dst, vid, before = await self.setup()
        host = c.executors[src][0].driver.host
        host.live_converges = False  # RAM passes go on until it is allowed to converge
        self.lost_answer(c, src, "live.switchover")
        await c.drains.drain(src, min_healthy=1, healthy_deadline=30)
        await real_until(lambda: self.source_state(c, src, m["id"]) == "migrating",
                         "the RAM migration runs")
        self.assertEqual((await c.store.select("migrations"))[0]["phase"], "switching_over")
        # The next live.switchover (the new control plane's) is followed to the end.
        c.before(src, "live.switchover", lambda *a: setattr(host, "live_converges", True))
        status = await self.restart(c, src)
        mg = status["migrations"][0]
        self.assertEqual((status["state"], mg["mode"]), ("completed", "live"), mg["error"])
        self.assertEqual(c.verbs("live.cancel", "live.resume"), [])
        self.assertIsInstance(mg["downtime_ms"], int)
        await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_the_target_resumes_only_after_switching_over_is_stored(self):
        """
        Issue 18 item 3: the decision is recorded before the target resumes, and before
        the source's RAM migration starts, with no round trip in the pause.
        """
        c, m, src, dst, vid, before = await self.setup()
        seen = {}
        tdrv, sdrv = c.executors[dst][0].driver, c.executors[src][0].driver
        finish, start = tdrv.finish_incoming, sdrv.start_migration

        def resumed(machine_id, *args, **kwargs):
            seen["resume"] = c.stored_phase()
            return finish(machine_id, *args, **kwargs)

        def ram(machine_id, *args, **kwargs):
            seen["ram"] = c.stored_phase()
            return start(machine_id, *args, **kwargs)

        tdrv.finish_incoming, sdrv.start_migration = resumed, ram
        _, status = await self.drain(c, src)
        self.assertEqual(status["state"], "completed")
        self.assertEqual(seen, {"ram": "switching_over", "resume": "switching_over"})
        self.assertEqual(self.phases(c), LIVE_PATH)

    def policy(self, c, src, **keys):
        """The drain's live.migrate carries a policy with C{keys} (seconds, on the agents)."""
        def make(original):
            def f(machine_id, target_host, target, policy, *args, details=None):
                policy = dict(policy or {}, **keys)
                return original(machine_id, target_host, target, policy, *args,
                                details=details)
            return f
        c.wrap(src, "live.migrate", make)

    @d
    async def test_the_source_gives_up_in_sync_while_the_control_plane_is_away(self):
        """
        The control plane dies with switching_over stored, before it asked the source to go
        on; the source's agent waits ready_timeout in sync, then rolls back by itself (no
        RAM was sent: the target cannot hold the machine).  The new control plane learns it
        from live.switchover and both agents, cancels the target's machine, never the
        source, and moves the machine cold (auto).
        """
        c, m, src, dst, vid, before = await self.setup()
        self.policy(c, src, ready_timeout=0.2)

        async def away(drain, run):  # switching_over stored; nothing asked until it gave up
            await real_until(lambda: c.lives[src].finished.get(m["id"], {}).get("state")
                             == "rolled_back", "the source rolled back by itself")

        c.drains._step_switching_over = away
        status = await crash_and_resume(self, c, src, "switching_over", True)
        mg = status["migrations"][0]
        self.assertEqual((status["state"], mg["mode"]), ("completed", "cold"), mg["error"])
        self.assertIn("no switchover was asked within 0.2 s", mg["mode_reason"])
        self.assertEqual(c.verbs("live.cancel"), [(dst, "live.cancel")])
        self.assertEqual([p for p in self.phases(c) if p != "switching_over"],
                         LIVE_PATH[:2] + COLD_TAIL)
        await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_a_switchover_that_does_not_converge_goes_cold_or_rolls_back(self):
        """
        After the decision the source's agent gives up (the RAM migration did not converge
        within its deadline): it rolled back before it continued, so the machine runs on at
        the source; the control plane cancels only the target, then goes cold (auto) or
        rolls back (live).
        """
        for mode, tail in (("auto", COLD_TAIL), ("live", ["rolling_back", "rolled_back"])):
            c, m, src, dst, vid, before = await self.setup()
            c.executors[src][0].driver.host.live_converges = False
            self.policy(c, src, deadline=0.2)
            _, status = await self.drain(c, src, mode=mode)
            mg = status["migrations"][0]
            self.assertEqual(self.phases(c), LIVE_PATH[:3] + tail, mode)
            self.assertIn("did not converge", mg["mode_reason"] or mg["error"], mode)
            self.assertEqual(c.verbs("live.cancel"), [(dst, "live.cancel")], mode)
            self.assertFalse(c.lives[dst].incoming, mode)
            if mode == "auto":
                await self.assert_moved(c, m, src, dst, vid, before)
            else:
                self.assertEqual(status["state"], "incomplete")
                machines = await c.apps.list_machines()
                self.assertEqual([(x["id"], x["host_id"], x["state"]) for x in machines],
                                 [(m["id"], src, "running")])
                self.assertFalse(c.store_of(dst).exists(vid))

    @d
    async def test_an_agent_that_takes_hold_without_saying_so_holds(self):
        """
        A source agent whose live.facts names prepare_health but not hold (they took hold
        before they said so) is given hold: the switchover is stored before it goes on.
        """
        c, m, src, dst, vid, before = await self.setup()
        self.facts(c, src, hold=None)
        _, status = await self.drain(c, src)
        self.assertEqual(status["state"], "completed")
        self.assertEqual(self.phases(c), LIVE_PATH)
        self.assertEqual(c.verbs("live.switchover"), [(src, "live.switchover")])

    @d
    async def test_an_agent_that_does_not_hold_moves_it_all_the_way(self):
        """
        A source agent from before live.switchover (its live.migrate as it was then: no
        hold, which it would refuse; its live.facts names neither hold nor what came
        after) is not given hold and migrates all the way: its answer is the figures, so
        the target holds the machine: switched_over.
        """
        c, m, src, dst, vid, before = await self.setup()

        def make(original):
            def f(machine_id, target_host, target, policy=None, details=None):
                return original(machine_id, target_host, target, policy, details=details)
            return f

        c.wrap(src, "live.migrate", make)
        self.facts(c, src, hold=None, prepare_health=None, verify_hashes=None)
        _, status = await self.drain(c, src)
        mg = status["migrations"][0]
        self.assertEqual((status["state"], mg["mode"]), ("completed", "live"))
        self.assertEqual(self.phases(c), [p for p in LIVE_PATH if p != "switching_over"])
        self.assertIsInstance(mg["downtime_ms"], int)
        self.assertEqual(c.verbs("live.cancel", "live.switchover"), [])
        await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_a_lost_switchover_answer_is_asked_again(self):
        """
        live.switchover fails (its call or its answer lost) before it reached the source
        (still in sync, waiting), or after it started the RAM migration: the source's
        live.status says it is under way, so live.switchover is asked again (it starts
        nothing twice: it goes on, or answers when that migration ends); nothing is
        cancelled and the machine moves live.
        """
        for started in (False, True):
            c, m, src, dst, vid, before = await self.setup()
            host = c.executors[src][0].driver.host
            host.live_converges = not started
            calls = []

            def make(original, started=started, calls=calls, host=host):
                def f(*args, details=None):
                    calls.append(args)
                    if len(calls) == 1 and not started:
                        return fail(errors.Unavailable("the call was lost (test)"))
                    d = original(*args, details=details)
                    if len(calls) == 1:
                        d.addErrback(lambda _: None)
                        return fail(errors.Unavailable("the connection was lost (test)"))
                    host.live_converges = True
                    return d
                return f

            c.wrap(src, "live.switchover", make)
            _, status = await self.drain(c, src)
            self.assertEqual(len(calls), 2, started)
            self.assertEqual((status["state"], status["migrations"][0]["mode"]),
                             ("completed", "live"), started)
            self.assertEqual(c.verbs("live.cancel"), [], started)
            self.assertEqual(self.phases(c), LIVE_PATH, started)
            await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_a_rollback_after_the_decision_follows_the_source_never_cancels_it(self):
        """
        The switching_over step fails (a fault of the control plane's own) while the
        source's RAM migration runs: the rollback asks both agents first and, the
        switchover being decided, follows the source's migration to its end (live.switchover
        again) instead of cancelling it; it completed, so the machine moved.
        """
        c, m, src, dst, vid, before = await self.setup()
        host = c.executors[src][0].driver.host
        host.live_converges = False

        async def fails(drain, run):
            await c.drains._save_detail(run, switchover_decided_at=c.clock.seconds())
            c.lives[src].switchover(m["id"]).addErrback(lambda _: None)
            await real_until(lambda: self.source_state(c, src, m["id"]) == "migrating",
                             "the RAM migration runs")
            raise RuntimeError("a fault after the go (test)")

        c.drains._step_switching_over = fails
        c.before(src, "live.switchover", lambda *a: setattr(host, "live_converges", True))
        _, status = await self.drain(c, src, mode="live")
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(self.phases(c), LIVE_PATH[:3] + ["rolling_back"] + LIVE_PATH[3:])
        self.assertEqual(c.verbs("live.cancel"), [])
        self.assertEqual(c.verbs("live.switchover"), [(src, "live.switchover")])
        self.assertEqual(status["state"], "completed")
        await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_a_source_agent_restarted_after_the_decision_is_asked_and_resolved(self):
        """
        The source's agent restarts between the decision and live.switchover (in sync,
        not told to go on): its new process's driver rolled the migration back (the
        machine runs on) and it knows nothing of it (live.switchover: not found).  The
        control plane asks both agents, cancels the target's machine and moves it cold;
        the source is never cancelled by it.
        """
        c, m, src, dst, vid, before = await self.setup()
        live, ex = c.lives[src], c.executors[src][0]

        def restarted(machine_id, *args):
            out = live.outgoing.pop(machine_id)
            out._stop_timers()
            out._stop_polling()
            for unsubscribe in (out._unsubscribe, out._unsubscribe_status):
                unsubscribe()
            ex.driver._live_recover(machine_id)  # as recover() does: rolled back, it runs
            ex.release(machine_id, "its migration was rolled back by recover() (test)")

        c.before(src, "live.switchover", restarted)
        _, status = await self.drain(c, src)
        mg = status["migrations"][0]
        self.assertEqual((status["state"], mg["mode"]), ("completed", "cold"), mg["error"])
        self.assertIn("no live migration of it here", mg["mode_reason"])
        self.assertEqual(c.verbs("live.cancel"), [(dst, "live.cancel")])
        self.assertEqual(self.phases(c), LIVE_PATH[:3] + COLD_TAIL)
        await self.assert_moved(c, m, src, dst, vid, before)

    @d
    async def test_both_restarted_after_the_switchover_is_switched_over(self):
        """
        The migration completed, but its answer was lost and both the control plane and
        the source's agent restarted: the new agent knows nothing of it (live.switchover:
        not found), its QEMU says postmigrate: the machine moved; the source is never
        resumed or cancelled.
        """
        c, m, src, dst, vid, before = await self.setup()
        self.lost_answer(c, src, "live.switchover")
        await c.drains.drain(src, min_healthy=1, healthy_deadline=30)
        live = c.lives[src]
        await real_until(lambda: live.finished.get(m["id"], {}).get("state") == "completed",
                         "the migration completed")
        live.ended.clear()  # a new agent process: it remembers nothing
        live.finished.clear()
        status = await self.restart(c, src)
        mg = status["migrations"][0]
        self.assertEqual((status["state"], mg["mode"]), ("completed", "live"), mg["error"])
        self.assertEqual(c.verbs("live.cancel", "live.resume"), [])
        await self.assert_moved(c, m, src, dst, vid, before)


class LiveCrashTests(TestCase):
    timeout = 300

    @d
    async def test_crash_in_each_live_phase_resumes(self):
        """
        The control plane dies right after storing each live phase (before its step acts),
        and right after each step acted (before the next phase is stored): a new control
        plane resumes, and the machine moves live, its volume verified and intact.
        """
        from itertools import product

        for phase, after in product(LIVE_PATH[:5], (False, True)):
            c, m, src, dst, vid, before = await live_setup(self)
            [(address, _)] = await addresses(c, m["id"])
            status = await crash_and_resume(self, c, src, phase, after)
            where = f"crash {'after' if after else 'before'} {phase}"
            mg = status["migrations"][0]
            self.assertEqual(await addresses(c, m["id"], mg["replacement"]),
                             [None, (address, dst)], where)
            self.assertEqual((status["state"], mg["mode"]), ("completed", "live"),
                             (where, mg["error"]))
            self.assertTrue(mg["verified"][vid]["ok"], where)
            self.assertEqual(sha(c.store_of(dst).path(vid)), before, where)
            self.assertFalse(c.store_of(src).exists(vid), where)
            machines = await c.apps.list_machines()
            self.assertEqual([(x["host_id"], x["state"]) for x in machines],
                             [(dst, "running")], where)
            self.assertEqual(c.lives[dst].incoming, {}, where)


class ModeChoiceTests(SynchronousTestCase):
    def test_live_refusal(self):
        ok = {"live": True, "cpu_model": "qemu64", "machine_type": "pc-i440fx-7.2",
              "network": "user"}
        self.assertIsNone(live_refusal("a", "b", ok, dict(ok)))
        self.assertIn("host b cannot migrate live: -cpu host",
                      live_refusal("a", "b", ok, {"live": False, "reason": "-cpu host"}))
        self.assertIn("differ in cpu_model",
                      live_refusal("a", "b", ok, dict(ok, cpu_model="x86-64-v2")))
        self.assertIn("differ in VM networking (bridge and user)",
                      live_refusal("a", "b", dict(ok, network="bridge"), ok))
        bridge = dict(ok, network="bridge")
        self.assertIsNone(live_refusal("a", "b", bridge, dict(bridge)))

    def test_live_path_of_the_machine(self):
        m = Migration()
        m.start_live()
        for _ in range(7):
            m.step_done()
        self.assertEqual([p for _, p, _ in m.outbox], LIVE_PATH)

    def test_failures_before_and_after_the_switchover(self):
        for phase in ("live_preparing", "live_migrating", "switching_over"):
            m = Migration.restore(phase)
            m.step_failed("boom")
            self.assertEqual(m.phase, "rolling_back")
            m = Migration.restore(phase)
            m.fall_back("rolled back")
            self.assertEqual((m.phase, m.outbox), ("bulk_copying", [
                ("enter", "bulk_copying", "rolled back")]))
            m = Migration.restore(phase)
            m.cancel()  # an undrain lets a live move finish
            self.assertEqual((m.phase, m.outbox), (phase, []))
        for phase in ("switched_over", "verifying"):
            m = Migration.restore(phase)
            m.step_failed("boom")  # never rolled back: the source is never resumed
            self.assertEqual(m.phase, "failed")
            m = Migration.restore(phase)
            m.fall_back("no")
            self.assertEqual((m.phase, m.outbox), (phase, []))
        m = Migration.restore("rolling_back")
        m.moved("the target resumed it")
        self.assertEqual(m.phase, "switched_over")
        for phase in ("bulk_copying", "committing", "done", "planned"):
            m = Migration.restore(phase)
            m.fall_back("x")
            m.moved("x")
            self.assertEqual(m.phase, phase)
