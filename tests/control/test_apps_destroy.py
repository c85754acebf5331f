"""
An app's destroy only goes forward (L{zwrm.control.converge.Converger.destroy}): it is
stored first (the app's C{destroying}), a stop of the control plane in its middle or a
host that cannot be reached only delays it, the healer neither restarts nor places again
the app's machines meanwhile, and a deploy or scale of the app is refused.  A machine
destroyed while its host was unreachable (only its row could go) is destroyed on its host
when the host returns, which frees its volumes (L{LeftoverTests}).

Time is the control side's L{task.Clock}; the executors run the fake driver on the real
reactor (the apps tests' cluster), over a real store.
"""

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from tests.control.helpers import FACTS
from tests.control.test_apps import Cluster, d
from tests.control.test_healing import healer_for, poll, settle
from zwrm import errors
from zwrm.control.apps import Apps
from zwrm.scheduler import Scheduler, load_strategy

DELAY = 30


def restarted(c):
    """
    The control plane, killed, starts again over the same store and hosts: a new apps
    layer (the old one's work is cancelled, as by a kill: nothing of it runs on).
    """
    c.apps.network_view.close()
    c.apps = Apps(c.clock, c.store, c.registry, Scheduler(load_strategy("spread")), c.publish)
    return c.apps


async def restarted_and_loaded(c, hosts):
    """
    L{restarted}, then what a control plane's start does: the old apps layer's hooks gone,
    the new one loaded, the reachable agents of C{hosts} reconciled.
    """
    old = c.apps
    restarted(c)
    for hooks in (c.registry.on_restored, c.registry.on_reconciled):
        hooks[:] = [f for f in hooks
                    if getattr(f, "__self__", None) not in (old.placements, old.volumes)]
    await c.apps.load()
    for host_id in hosts:
        if c.registry.state(host_id) != "offline":
            await c.registry.reconcile(host_id, c.executors[host_id][0].list_machines())
    return c.apps


class DestroyTests(TestCase):

    async def two(self, hosts=("h-a", "h-b"), **spec):
        c = await Cluster(self).start(hosts=hosts)
        await c.apps.create_app("web")
        await c.apps.deploy("web", c.spec(replicas=2, shutdown_delay=DELAY, **spec))
        ms = await c.machines("web")
        self.assertEqual(len({m["host_id"] for m in ms}), 2)
        return c, ms

    def running_on(self, c):
        return sorted(m["id"] for host in c.executors
                      for m in c.executors[host][0].list_machines() if m["state"] == "running")

    async def ended(self, c, work):
        """Let C{work} (a destroy) through its shutdown delay on the Clock."""
        async def done():
            c.clock.advance(DELAY)
            return work.called

        await poll(done, what="the destroy")
        return await work

    @d
    async def test_stored_before_its_first_stop(self):
        """
        The destroy is stored (and announced) before its machines are taken out of the
        routes; the app's status and list show it while its shutdown delay runs, and a
        scale meanwhile is refused at once; a pass of L{Apps.go_on_destroying} leaves it
        to its call.
        """
        c, ms = await self.two()
        work = ensureDeferred(c.apps.destroy_app("web"))
        await poll(lambda: self._stopping(c, 2), what="the machines taken out")
        kinds = [e["kind"] for topic, e in c.published if topic == "zwrm.event.app"]
        self.assertEqual(kinds[-1], "destroying")
        status = await c.apps.app_status("web")
        self.assertEqual(status["destroying"], {"volumes": False, "since": c.clock.seconds(),
                                                "delay_ends": c.clock.seconds() + DELAY})
        (listed,) = await c.apps.list_apps()
        self.assertTrue(listed["destroying"])
        # a scale is refused at once, not after the destroy's delay (its turn)
        scale = ensureDeferred(c.apps.scale("web", 3))

        async def answered():
            return scale.called

        await poll(answered, what="the scale's answer")
        self.failureResultOf(scale, errors.Conflict)
        # a pass over the destroys under way leaves this one to its call: no wait
        self.assertEqual(await c.apps.go_on_destroying(), [])
        result = await self.ended(c, work)
        self.assertEqual(sorted(result["machines"]), sorted(m["id"] for m in ms))
        self.assertEqual(await c.apps.list_apps(), [])
        self.assertEqual(self.running_on(c), [])

    async def killed_in_its_delay(self, c, advance=0.0, meanwhile=None):
        """
        web's destroy, its machines stored C{stopping}; C{advance} seconds into its delay
        the control plane is killed (its work cancelled, nothing put back) and starts
        again over the same store (loaded); C{meanwhile()} runs while it is down.
        """
        work = ensureDeferred(c.apps.destroy_app("web"))
        await poll(lambda: self._stopping(c, 2), what="the machines taken out")
        c.clock.advance(advance)
        apps = c.apps
        restarted(c)
        work.addErrback(lambda f: None)
        apps.replicas.put_back = lambda ids: ensureDeferred(_nothing())  # killed: no put-back
        work.cancel()
        if meanwhile is not None:
            await meanwhile()
        await c.apps.load()

    async def _stopping(self, c, n):
        return sum(m["state"] == "stopping" for m in await c.machines("web")) == n

    @d
    async def test_a_destroy_cut_short_by_a_stop_goes_on_after_the_start(self):
        """
        The control plane is killed 10 s into the destroy's shutdown delay: its machines
        are stored C{stopping}, their agents still run them.  The next one finds the app
        C{destroying}; the machines stay out of the routes (their agents' lists and
        reports do not put them back: they would take new connections only to be taken
        out again), and the destroy goes on with what is left of the delay (20 s, not
        all of it again): the app and its machines are gone, none was restarted.
        """
        c, ms = await self.two()
        await self.killed_in_its_delay(c, advance=10)
        h = await healer_for(c)
        self.assertEqual(await c.apps.resume_rollouts(wait=0), [])
        for host, (ex, _) in c.executors.items():
            await c.registry.reconcile(host, ex.list_machines())
        # its agent reports it running (a health change, say): still out of the routes
        await c.apps.replicas.machine_event(ms[0]["host_id"], {"machine_id": ms[0]["id"],
                                                               "state": "running"})
        await settle(c, h)
        self.assertEqual({m["state"] for m in await c.machines("web")}, {"stopping"})
        with self.assertRaises(errors.Conflict) as e:
            await c.apps.scale("web", 3)
        self.assertEqual(e.exception.message,
                         "app 'web' is being destroyed: once it is gone, create it again")
        going = ensureDeferred(c.apps.go_on_destroying())

        async def waiting():
            return c.clock.getDelayedCalls() and not going.called

        await poll(waiting, what="the rest of the delay")
        c.clock.advance(DELAY - 10 - 1)
        await settle(c, h)
        self.assertFalse(going.called)
        self.assertEqual(len(self.running_on(c)), 2)
        c.clock.advance(1)
        await poll(lambda: _called(going), what="the destroy's end")
        self.assertEqual(await going, ["web"])
        self.assertEqual(await c.apps.list_apps(), [])
        self.assertEqual(self.running_on(c), [])

    @d
    async def test_one_kept_out_on_a_host_found_offline_goes_with_the_destroy(self):
        """
        Killed in the delay; one machine's host never comes back and is found offline:
        that machine, kept out of the routes, is failed and its row goes with the destroy,
        which ends (it waited for the host for good); its host, back later, is told to
        destroy it.
        """
        c, ms = await self.two()
        await self.killed_in_its_delay(c)
        far, near = ms
        c.registry.entry(far["host_id"]).executor = False  # its agent never came back
        ex, _ = c.executors[near["host_id"]]
        await c.registry.reconcile(near["host_id"], ex.list_machines())
        await c.registry.mark_offline(far["host_id"])
        going = ensureDeferred(c.apps.go_on_destroying())
        self.assertEqual(await self.ended(c, going), ["web"])
        self.assertEqual(await c.apps.list_apps(), [])
        self.assertEqual(self.running_on(c), [far["id"]])  # (on its lost host)
        await c.registry.register(far["host_id"], dict(FACTS, name=far["host_id"]))
        ex, _ = c.executors[far["host_id"]]
        result = await c.registry.reconcile(far["host_id"], ex.list_machines())
        self.assertEqual(result["removed"], [far["id"]])
        await poll(lambda: _empty(self.running_on(c)), what="its destroy on its host")

    @d
    async def test_a_stop_in_its_delay_leaves_its_machines_out_of_the_routes(self):
        """
        A stop of the control plane (its work cancelled) in the destroy's delay does not
        put the machines back in the routes, as it does a scale-down's: a destroy only goes
        forward, and the next control plane goes on with it.
        """
        c, ms = await self.two()
        work = ensureDeferred(c.apps.destroy_app("web"))
        await poll(lambda: self._stopping(c, 2), what="the machines taken out")
        work.cancel()
        self.failureResultOf(work)
        await poll(lambda: _called(work), what="the cancellation")
        self.assertEqual({m["state"] for m in await c.machines("web")}, {"stopping"})

    @d
    async def test_a_machine_stopped_in_the_cut_short_destroy_is_not_restarted(self):
        """
        Killed after an agent stopped one machine and before its row went: the next
        control plane leaves both out of the routes, and nothing restarts the one its
        agent no longer runs: the app is being destroyed.  The destroy goes on.
        """
        c, ms = await self.two()
        c.report = lambda host_id, event: None  # killed: no report reaches it

        async def stopped_meanwhile():
            await c.executors[ms[0]["host_id"]][0].stop_machine(ms[0]["id"])

        await self.killed_in_its_delay(c, meanwhile=stopped_meanwhile)
        h = await healer_for(c)
        c.registry.on_cut_short.append(h.decide_exit)
        del c.report
        for host, (ex, _) in c.executors.items():
            await c.registry.reconcile(host, ex.list_machines())
        await settle(c, h)
        c.clock.advance(600)
        await settle(c, h)
        states = {m["id"]: (m["state"], m["restarts"]) for m in await c.machines("web")}
        self.assertEqual(states, {ms[0]["id"]: ("stopping", 0), ms[1]["id"]: ("stopping", 0)})
        self.assertEqual(self.running_on(c), [ms[1]["id"]])
        going = ensureDeferred(c.apps.go_on_destroying())
        self.assertEqual(await self.ended(c, going), ["web"])
        self.assertEqual(self.running_on(c), [])

    @d
    async def test_a_host_out_of_reach_delays_it_and_nothing_comes_back(self):
        """
        One machine's host cannot be reached: the destroy removes the other, says what
        waits, and the app stays C{destroying}.  The host is found offline: its machine
        is failed, and not placed again elsewhere (the app is going); the next pass of
        L{Apps.go_on_destroying} ends the destroy.  Until then a deploy is refused.
        """
        c, ms = await self.two(hosts=("h-a", "h-b", "h-c"))  # (a host left free)
        h = await healer_for(c)
        far = ms[0]
        c.registry.entry(far["host_id"]).executor = False  # its agent's session is gone
        work = ensureDeferred(c.apps.destroy_app("web"))
        with self.assertRaises(errors.Unavailable) as e:
            await self.ended(c, work)
        self.assertEqual(
            e.exception.message,
            f"app 'web' is being destroyed: 1 machine(s) removed; {far['id']} on host(s)"
            f" {far['host_id']}, which cannot be reached, are removed once their host"
            " returns or is found offline")
        self.assertEqual([m["id"] for m in await c.machines("web")], [far["id"]])
        with self.assertRaises(errors.Conflict):
            await c.apps.deploy("web", c.spec(replicas=1))
        # nothing can be removed yet: the pass leaves it
        self.assertEqual(await c.apps.go_on_destroying(), [])
        await c.registry.mark_offline(far["host_id"])
        h.check_done([far["host_id"]])
        c.clock.advance(600)
        await settle(c, h)
        (m,) = await c.machines("web")
        self.assertEqual((m["id"], m["state"]), (far["id"], "failed"))
        self.assertEqual(self.running_on(c), [far["id"]])  # (on its lost host)
        self.assertEqual(await c.apps.go_on_destroying(), ["web"])
        self.assertEqual(await c.apps.list_apps(), [])

    @d
    async def test_its_volumes_go_once_their_host_is_back(self):
        """
        A destroy with its volumes while one host cannot be reached: found offline, its
        machine's row goes; its volume waits for the host.  The host returns with the
        machine (stopped) still on it: its agent is told to destroy it (the log says it
        was destroyed), which frees the volume, and the next pass deletes the volume and
        ends the destroy.
        """
        c, ms = await self.two(volumes=[{"name": "data", "mount": "/data"}])
        h = await healer_for(c)
        far = ms[0]
        host = far["host_id"]
        c.registry.entry(host).executor = False
        with self.assertRaises(errors.Unavailable):
            await self.ended(c, ensureDeferred(c.apps.destroy_app("web", volumes=True)))
        await c.registry.mark_offline(host)
        h.check_done([host])
        await settle(c, h)
        self.assertEqual(await c.apps.go_on_destroying(), [])  # its row and the other volume go
        with self.assertRaises(errors.Unavailable) as e:  # its volume waits for its host
            await c.apps.converger.go_on("web")
        self.assertIn("0 machine(s) and 0 volume(s) removed;", e.exception.message)
        status = await c.apps.app_status("web")
        self.assertEqual((status["machines"], [v["host_id"] for v in status["volumes"]]),
                         ([], [host]))
        ex = c.executors[host][0]
        await ex.stop_machine(far["id"])  # (its host restarted, say)
        await c.registry.register(host, dict(FACTS, name=host))
        result = await c.registry.reconcile(host, ex.list_machines())
        self.assertEqual(result["removed"], [far["id"]])
        self.assertEqual(ex.list_machines(), [])
        self.assertEqual(await c.apps.go_on_destroying(), ["web"])
        self.assertEqual(await c.apps.list_apps(), [])
        self.assertEqual(ex.volumes.list(), [])

    @d
    async def test_volumes_kept_then_deployed_again(self):
        """
        A destroy that keeps the volumes and goes on after a stop ends as one that did
        not stop: the app stays, without a spec, no longer destroying; a deploy brings
        it back on its volumes.
        """
        c, ms = await self.two(volumes=[{"name": "data", "mount": "/data"}])
        vols = sorted(v["id"] for v in (await c.apps.app_status("web"))["volumes"])
        await self.killed_in_its_delay(c)
        for host, (ex, _) in c.executors.items():
            await c.registry.reconcile(host, ex.list_machines())
        going = ensureDeferred(c.apps.go_on_destroying())
        self.assertEqual(await self.ended(c, going), ["web"])
        status = await c.apps.app_status("web")
        self.assertEqual((status["spec"], status["destroying"], status["machines"]),
                         (None, None, []))
        self.assertEqual(sorted(v["id"] for v in status["volumes"]), vols)
        await c.apps.deploy("web", c.spec(replicas=2, volumes=[{"name": "data",
                                                                "mount": "/data"}]))
        self.assertEqual(len(self.running_on(c)), 2)

    @d
    async def test_asked_again_it_takes_the_volumes_given_last(self):
        """A destroy that waits, asked again with its volumes: they go too."""
        c, ms = await self.two(volumes=[{"name": "data", "mount": "/data"}])
        far = ms[0]
        c.registry.entry(far["host_id"]).executor = False
        with self.assertRaises(errors.Unavailable):
            await self.ended(c, ensureDeferred(c.apps.destroy_app("web")))
        self.assertEqual((await c.apps.app_status("web"))["destroying"]["volumes"], False)
        c.registry.entry(far["host_id"]).executor = True
        result = await self.ended(c, ensureDeferred(c.apps.destroy_app("web", volumes=True)))
        self.assertEqual((result["machines"], len(result["volumes"])), ([far["id"]], 2))
        self.assertEqual(await c.apps.list_apps(), [])


    @d
    async def test_asked_twice_the_second_ends_with_the_first(self):
        """
        A destroy asked again while the first waits out its delay: the second's turn
        comes once the app is gone, and it has nothing left to do (it does not fail
        with "no app").  An app made since under the same name is not touched.
        """
        c, ms = await self.two()
        first = ensureDeferred(c.apps.destroy_app("web"))
        await poll(lambda: self._stopping(c, 2), what="the machines taken out")

        def waiting(n):
            async def check():  # (a destroy looks its app up before it queues)
                return len(c.apps.converger._app_locks["web"].waiting) == n
            return check

        second = ensureDeferred(c.apps.destroy_app("web"))
        await poll(waiting(1), what="the second destroy queued")
        hold = Deferred()  # other work of the app's, in its order before the third
        held = ensureDeferred(c.apps.converger.in_app_order("web", lambda: hold))
        third = ensureDeferred(c.apps.destroy_app("web"))
        await poll(waiting(3), what="the third destroy queued")
        self.assertEqual(sorted((await self.ended(c, first))["machines"]),
                         sorted(m["id"] for m in ms))
        self.assertEqual(await second, {"machines": [], "volumes": []})
        await c.apps.create_app("web")
        deploy = ensureDeferred(c.apps.deploy("web", c.spec()))  # (in its order: last)
        hold.callback(None)
        await held
        self.assertEqual(await third, {"machines": [], "volumes": []})
        await deploy
        self.assertEqual([a["name"] for a in await c.apps.list_apps()], ["web"])
        self.assertEqual(len(self.running_on(c)), 1)

    @d
    async def test_a_change_queued_behind_a_destroy_leaves_an_app_made_since_alone(self):
        """
        A scale asked before the app's destroy began, queued behind it: when its turn
        comes the app it was asked of is gone and another was made under its name; the
        scale is refused (Conflict) and changes nothing of the new app.
        """
        c, ms = await self.two()

        def waiting(n):
            async def check():
                return len(c.apps.converger._app_locks["web"].waiting) == n
            return check

        holds = [Deferred(), Deferred()]
        first = ensureDeferred(c.apps.converger.in_app_order("web", lambda: holds[0]))
        destroy = ensureDeferred(c.apps.destroy_app("web"))
        await poll(waiting(1), what="the destroy queued")
        second = ensureDeferred(c.apps.converger.in_app_order("web", lambda: holds[1]))
        scale = ensureDeferred(c.apps.scale("web", 3))
        await poll(waiting(3), what="the scale queued")
        holds[0].callback(None)
        await first
        await self.ended(c, destroy)
        made = await c.apps.create_app("web")
        deploy = ensureDeferred(c.apps.deploy("web", c.spec(replicas=1)))  # (after the scale)
        holds[1].callback(None)
        await second
        with self.assertRaises(errors.Conflict) as e:
            await scale
        self.assertIn("made again", e.exception.message)
        await deploy
        status = await c.apps.app_status("web")
        self.assertEqual((status["id"], status["spec"]["replicas"], len(status["machines"])),
                         (made["id"], 1, 1))

async def _empty(items):
    return not items


async def _called(d):
    return d.called


async def _nothing():
    return None


class LeftoverTests(TestCase):
    """A machine removed while its host was unreachable, and what its host keeps."""

    @d
    async def test_a_replica_scaled_down_while_its_host_was_lost_gives_back_its_volume(self):
        """
        Replica 1's host is lost (its machine failed); the app is scaled down to 1 (only
        the machine's row can go).  The host returns with the machine still running: it
        is destroyed there (the log says it was), its volume kept and free, so scaling up
        again starts replica 1 on it with its data.  (Before, the machine was only stopped
        and kept its claim: the new machine failed, "volume ... is used by machine ...".)
        """
        c = await Cluster(self).start(hosts=("h-a", "h-b"))
        h = await healer_for(c)
        await c.apps.create_app("db")
        await c.apps.deploy("db", c.spec(replicas=2, volumes=[{"name": "data",
                                                               "mount": "/data"}]))
        (m1,) = [m for m in await c.machines("db") if m["replica"] == 1]
        host = m1["host_id"]
        await c.registry.mark_offline(host)
        h.check_done([host])
        await settle(c, h)
        await c.apps.scale("db", 1)
        self.assertEqual([m["replica"] for m in await c.machines("db")], [0])
        ex = c.executors[host][0]
        self.assertEqual([m["id"] for m in ex.list_machines()], [m1["id"]])  # (it ran on)
        await c.registry.register(host, dict(FACTS, name=host))
        result = await c.registry.reconcile(host, ex.list_machines())
        self.assertEqual(result["removed"], [m1["id"]])
        self.assertEqual(ex.list_machines(), [])
        (vol,) = [v for v in (await c.apps.app_status("db"))["volumes"] if v["replica"] == 1]
        self.assertEqual(vol["host_id"], host)
        await c.apps.scale("db", 2)
        (n1,) = [m for m in await c.machines("db") if m["replica"] == 1]
        self.assertEqual((n1["host_id"], n1["state"]), (host, "running"))
        self.assertNotEqual(n1["id"], m1["id"])
        self.assertEqual([v["id"] for v in ex.machine_status(n1["id"])["volumes"]], [vol["id"]])
