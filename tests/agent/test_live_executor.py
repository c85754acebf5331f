"""
The executor and the live migrations together (fake driver on a L{task.Clock}): the
source machine held by its migration (no health checks, no reports, given back when it
rolls back, paused for good and destroyed with its record and volume claim once moved),
the target's machine adopted by its executor once it resumed (its record, health checks,
reports, host_port, machine.* on it), the driver spec built by the executor's own helper,
and bridge networking (the target's TAP made before its start, released when it ends).
The same with real QEMU and a control plane: tests/integration/test_live_drain.py.
"""

import json
import os

from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.agent.fakes import FakeImages
from tests.agent.live_helpers import SIZE, TwoHosts
from zwrm.agent.executor import Executor
from zwrm.agent.live import LiveMigrations
from zwrm.agent.network import addressing
from zwrm.agent.volumes import VolumeStore
from zwrm.drivers.fake import FakeDriver
from zwrm.errors import Conflict, InvalidArgument, NotFound, Unavailable

NET = {"address": "10.80.1.2", "prefix": 16, "gateway": "10.80.1.1", "mtu": 1450,
       "hostname": "web-0"}


class RecordingNetwork:
    """
    Stands in for L{zwrm.agent.network.agent.AgentNetwork} at the executor's seam: what
    C{prepare} answers is computed by the real addressing functions; calls are recorded.
    (The real one in network namespaces: tests/network.)
    """

    def __init__(self):
        self.calls = []
        self.next_port = 31000

    async def prepare(self, machine_id, app, net, service_port=None, kernel=True,
                      host_port=None, adopt=False):
        self.calls.append(("prepare", machine_id, net["address"], adopt))
        if host_port is None:
            self.next_port += 1
            host_port = self.next_port
        return {"nic": {"tap": addressing.tap_name(machine_id),
                        "mac": addressing.mac_for(net["address"])},
                "cmdline": addressing.kernel_ip_arg(net) if kernel else "",
                "host_port": host_port}

    async def release(self, machine_id):
        self.calls.append(("release", machine_id))

    def save_pending(self):
        self.calls.append(("save_pending",))


class Probe:
    """A health probe whose answer the test sets (None: healthy)."""

    def __init__(self):
        self.answer = None
        self.calls = 0

    def __call__(self, reactor, spec, port):
        def probe():
            self.calls += 1
            return succeed(self.answer)

        return probe


class Agents(TwoHosts):
    """Two agents (executor + live migrations) on one clock; host-a runs m1 with v1."""

    def __init__(self, testcase, bridge=False):
        TwoHosts.__init__(self, testcase, Clock(), "zwrm-live-ex-")
        self.t = testcase
        self.events = {}
        self.probes = {}
        self.networks = {}
        self.ex, self.live, self.images = {}, {}, {}
        for h in ("host-a", "host-b"):
            drv, vols, creds = self.host(h)
            self.events[h] = []
            self.probes[h] = Probe()
            self.networks[h] = RecordingNetwork() if bridge else None
            self.images[h] = FakeImages(self.kernel)
            ex = Executor(self.clock, h, drv, vols, self._reporter(h), images=self.images[h],
                          data_dir=os.path.join(self.dir, h), health_probe=self.probes[h],
                          network=self.networks[h])
            testcase.addCleanup(ex.close)
            self.ex[h] = ex
            self.live[h] = self.live_for(h, drv, vols, creds, images=self.images[h],
                                         executor=ex)
        # The source's volume exists (an ext4 image in production; bytes here).
        self.write_volume(self.ex["host-a"].volumes.path("v1"))
        self.settle(self.ex["host-a"].start_machine(self.spec("m1", bridge)))
        self.clock.advance(1)  # the first health check passes

    def restarted(self, h, probe, images=None):
        """
        A new agent process on host C{h}: the old executor closed, a new fake driver of
        the same host and a new executor over the same data directory, its reports kept.

        @return: C{(driver, executor, reports)} (nothing recovered yet).
        """
        old = self.ex[h]
        old.close()
        drv = FakeDriver(self.clock, old.driver.root, host=old.driver.host,
                         network=old.driver.network)
        events = []
        new = Executor(self.clock, h, drv, VolumeStore(reactor, old.volumes.root),
                       lambda e: events.append(e) or succeed(None),
                       images=images or FakeImages(self.kernel),
                       data_dir=os.path.join(self.dir, h), health_probe=probe)
        self.t.addCleanup(new.close)
        return drv, new, events

    def _reporter(self, h):
        def report(event):
            self.events[h].append(event)
            return succeed(None)

        return report

    def spec(self, mid, bridge=False):
        spec = {"id": mid, "app": "web", "image": "demo:1", "vcpus": 1, "memory_mb": 128,
                "volumes": [{"id": "v1", "mount": "/data", "size_mb": 4}],
                "service_port": 8080,
                "health": {"type": "http", "path": "/", "interval": 1, "timeout": 1,
                           "grace": 5}}
        if bridge:
            spec["network"] = NET
        return spec

    def prepare(self, new_id="m2", bridge=False, **kw):
        desc = self.live["host-a"].describe("m1")
        return self.settle(self.live["host-b"].prepare(new_id, self.spec(new_id, bridge),
                                                       desc["volumes"], "host-a", **kw))

    def reports(self, h, mid):
        return [(e["state"], e["health"]) for e in self.events[h] if e["machine_id"] == mid]


class SourceHeldTests(SynchronousTestCase):
    def test_moved_source_is_held_then_destroyed_with_its_claim(self):
        agents = Agents(self)
        a, b = agents.ex["host-a"], agents.ex["host-b"]
        self.assertEqual(a.machine_status("m1")["health"], "passing")
        where = agents.prepare()
        agents.events["host-a"].clear()
        agents.probes["host-a"].answer = "connection refused"  # it pauses at the switchover
        calls = agents.probes["host-a"].calls
        result = agents.settle(agents.live["host-a"].migrate(
            "m1", "host-b", where, {"mirror_speed": SIZE}))
        self.assertIsInstance(result["downtime_ms"], int)
        agents.clock.advance(30)
        # Held from live.migrate on: no probe ran, nothing was reported, not failed.
        self.assertEqual(agents.probes["host-a"].calls, calls)
        self.assertEqual(agents.reports("host-a", "m1"), [])
        st = a.machine_status("m1")
        self.assertEqual((st["state"], st["migrated_to"]), ("running", "host-b"))
        self.assertIn("moved live to host-b", st["live_migration"])
        with open(os.path.join(agents.dir, "host-a", "executor", "m1.json")) as f:
            self.assertEqual(json.load(f)["migrated_to"], "host-b")
        # A stop of the paused source is a hard stop at once (no guest to power down).
        stopped = agents.settle(a.stop_machine("m1", timeout=300), steps=100)
        self.assertEqual(stopped["state"], "stopped")
        with self.assertRaises(Conflict):  # never two copies: its guest runs on host-b
            agents.settle(a.start_machine(agents.spec("m1")))
        # Destroyed: its record and its volume's claim go; the volume can then be deleted.
        self.assertEqual(a.volumes.in_use("v1"), "m1")
        agents.settle(a.destroy_machine("m1"))
        self.assertIsNone(a.volumes.in_use("v1"))
        self.assertFalse(os.path.exists(os.path.join(agents.dir, "host-a", "executor",
                                                     "m1.json")))
        self.assertEqual(agents.settle(a.delete_volume("v1")), {"volume_id": "v1", "deleted": True})
        self.assertEqual(agents.events["host-a"][-1]["destroyed"], True)
        del b

    def test_rolled_back_source_is_given_back(self):
        agents = Agents(self)
        a = agents.ex["host-a"]
        where = agents.prepare()
        d = agents.live["host-a"].migrate("m1", "host-b", where, {"mirror_speed": SIZE // 8})
        agents.clock.advance(0.2)
        self.assertIsNotNone(a.machine_status("m1")["live_migration"])
        with self.assertRaises(Conflict):  # held: no stop behind the migration's back
            a.stop_machine("m1")
        agents.events["host-a"].clear()
        agents.settle(agents.live["host-b"].cancel("m2"))  # the target goes away
        with self.assertRaises(Unavailable):
            agents.settle(d)
        st = a.machine_status("m1")
        self.assertEqual((st["state"], st["live_migration"], st["migrated_to"]),
                         ("running", None, None))
        self.assertIn("rolled back", agents.events["host-a"][0]["reason"])
        calls = agents.probes["host-a"].calls
        agents.clock.advance(3)
        self.assertGreater(agents.probes["host-a"].calls, calls)  # health checked again
        # The same guest: its health goes on from passing (the app's routes keep it).
        self.assertEqual(agents.reports("host-a", "m1")[0], ("running", "passing"))
        self.assertEqual(a.machine_status("m1")["health"], "passing")
        self.assertFalse(agents.ex["host-b"].volumes.exists("v1"))

    def test_a_moved_source_stays_held_after_an_agent_restart(self):
        agents = Agents(self)
        where = agents.prepare()
        agents.settle(agents.live["host-a"].migrate("m1", "host-b", where,
                                                    {"mirror_speed": SIZE}))
        probe = Probe()
        drv, new, events = agents.restarted("host-a", probe)
        agents.settle(new.recover())
        agents.clock.advance(10)
        st = new.machine_status("m1")
        self.assertEqual((st["state"], st["migrated_to"]), ("running", "host-b"))
        self.assertEqual((probe.calls, events), (0, []))
        self.assertEqual(new.volumes.in_use("v1"), "m1")
        agents.settle(new.destroy_machine("m1"))
        self.assertIsNone(new.volumes.in_use("v1"))


    def test_a_source_whose_migration_was_under_way_is_given_back_after_a_restart(self):
        # The source's agent goes during the mirror; the new process's driver rolls the
        # migration back (recover()), and its executor takes the machine back: health
        # checked and reported again, not held.
        agents = Agents(self)
        where = agents.prepare()
        agents.live["host-a"].migrate("m1", "host-b", where, {"mirror_speed": SIZE // 8})
        agents.clock.advance(0.2)
        old = agents.ex["host-a"]
        self.assertIsNotNone(old.machine_status("m1")["live_migration"])
        out = agents.live["host-a"].outgoing.pop("m1")
        out._stop_timers()
        out._stop_polling()
        for unsubscribe in (out._unsubscribe, out._unsubscribe_status):
            unsubscribe()
        probe = Probe()
        drv, new, events = agents.restarted("host-a", probe)
        agents.settle(drv.recover())
        agents.settle(new.recover())
        agents.clock.advance(3)
        st = new.machine_status("m1")
        self.assertEqual((st["state"], st["live_migration"], st["health"]),
                         ("running", None, "passing"))
        self.assertGreater(probe.calls, 0)
        self.assertEqual(events[0]["state"], "running")


class TargetAdoptedTests(SynchronousTestCase):
    def test_the_resumed_target_is_the_executors_own(self):
        agents = Agents(self)
        b = agents.ex["host-b"]
        where = agents.prepare()
        self.assertFalse(b.has_machine("m2"))
        with self.assertRaises(NotFound):  # not the executor's while it arrives
            b.machine_status("m2")
        agents.live["host-a"].driver.guest_write_file("m1", "before", b"before")
        agents.settle(agents.live["host-a"].migrate("m1", "host-b", where,
                                                    {"mirror_speed": SIZE}))
        agents.clock.advance(1)
        st = b.machine_status("m2")
        self.assertEqual((st["state"], st["host_port"], st["app"]),
                         ("running", where["host_port"], "web"))
        self.assertEqual(agents.reports("host-b", "m2")[0], ("running", "starting"))
        agents.clock.advance(2)
        self.assertEqual(agents.reports("host-b", "m2")[-1], ("running", "passing"))
        self.assertGreater(agents.probes["host-b"].calls, 0)
        self.assertEqual(agents.events["host-b"][0]["host_port"], where["host_port"])
        self.assertIn("after a live migration", agents.events["host-b"][0]["reason"])
        # Its record is the executor's (an agent restart finds it), its claim too.
        with open(os.path.join(agents.dir, "host-b", "executor", "m2.json")) as f:
            self.assertEqual(json.load(f)["spec"]["volumes"][0]["id"], "v1")
        self.assertEqual(b.volumes.in_use("v1"), "m2")
        self.assertEqual(b.driver.guest_read_file("m2", "before"), b"before")
        # The image pins are the executor's: they go with the machine.
        pins = dict(agents.images["host-b"].pins)
        self.assertEqual(set(pins.values()), {1})
        self.assertEqual(os.listdir(os.path.join(agents.dir, "host-b", "live")), [])
        # A health failure is reported as for any machine.
        agents.probes["host-b"].answer = "refused"
        agents.clock.advance(3)
        self.assertEqual(agents.reports("host-b", "m2")[-1], ("running", "failing"))
        agents.settle(b.destroy_machine("m2"))
        self.assertEqual(set(agents.images["host-b"].pins.values()), {0})
        self.assertIsNone(b.volumes.in_use("v1"))

    def test_a_guest_passing_at_the_source_goes_on_passing_here(self):
        # live.prepare(health="passing"): the target's check starts from passing, so the
        # first report keeps the guest in the app's routes, and a first probe that fails
        # (a guest busy after its resume) changes nothing within the grace.
        agents = Agents(self)
        b = agents.ex["host-b"]
        self.assertEqual(agents.live["host-b"].facts()["prepare_health"], True)
        where = agents.prepare(health="passing")
        agents.probes["host-b"].answer = "connection refused"
        agents.settle(agents.live["host-a"].migrate("m1", "host-b", where,
                                                    {"mirror_speed": SIZE}))
        agents.clock.advance(1)
        self.assertEqual(agents.reports("host-b", "m2"), [("running", "passing")])
        self.assertEqual(b.machine_status("m2")["health"], "passing")
        agents.probes["host-b"].answer = None
        agents.clock.advance(3)
        self.assertEqual(agents.reports("host-b", "m2"), [("running", "passing")])

    def test_a_bad_health_is_refused(self):
        agents = Agents(self)
        with self.assertRaises(InvalidArgument) as e:
            agents.prepare(health="great")
        self.assertIn("health", str(e.exception))
        self.assertFalse(agents.ex["host-b"].volumes.exists("v1"))

    def test_machine_destroy_before_the_resume_cancels_the_incoming_migration(self):
        # The control plane's fence (machine.destroy of the replacement on its target)
        # works on a machine still arriving: it is destroyed with its blank copies.
        agents = Agents(self)
        b = agents.ex["host-b"]
        agents.prepare()
        self.assertTrue(b.volumes.exists("v1"))
        got = agents.settle(b.destroy_machine("m2"))
        self.assertEqual(got, {"machine_id": "m2", "destroyed": True})
        self.assertFalse(b.volumes.exists("v1"))
        self.assertEqual(b.driver.list(), [])
        self.assertEqual(set(agents.images["host-b"].pins.values()), {0})
        with self.assertRaises(NotFound):
            agents.settle(b.destroy_machine("m2"))

    def test_a_target_resumed_by_a_new_agent_process_is_adopted(self):
        agents = Agents(self)
        where = agents.prepare(health="passing")
        # The target's agent goes away before the switchover; the source completes.
        agents.live["host-b"].incoming.pop("m2")._forget()
        agents.settle(agents.live["host-a"].migrate("m1", "host-b", where,
                                                    {"mirror_speed": SIZE}))
        images = FakeImages(agents.kernel)
        drv, ex, events = agents.restarted("host-b", agents.probes["host-b"], images)
        live = LiveMigrations(agents.clock, "host-b", drv, ex.volumes,
                              agents.live["host-b"].credentials, lambda: "127.0.0.1",
                              images=images, state_dir=agents.live["host-b"].state_dir,
                              executor=ex)
        agents.settle(drv.recover())
        agents.settle(ex.recover())
        self.assertFalse(ex.has_machine("m2"))
        self.assertEqual(agents.settle(live.resume("m2")), {"resumed": True, "already": False})
        st = ex.machine_status("m2")
        self.assertEqual((st["state"], st["host_port"]), ("running", where["host_port"]))
        # with the health the source had (live.prepare's, kept in the migration's record)
        self.assertEqual((events[0]["state"], events[0]["health"]), ("running", "passing"))
        self.assertEqual(ex.volumes.in_use("v1"), "m2")
        self.assertEqual(set(images.pins.values()), {1})


class BridgeTests(SynchronousTestCase):
    def test_the_targets_tap_is_made_before_its_start_and_keeps_the_address(self):
        agents = Agents(self, bridge=True)
        net_b = agents.networks["host-b"]
        self.assertEqual(agents.live["host-b"].facts()["network"], "bridge")
        where = agents.prepare(bridge=True)
        self.assertEqual(net_b.calls, [("prepare", "m2", "10.80.1.2", False)])
        dspec = agents.ex["host-b"].driver.host.machines["m2"]["spec"]
        # The NIC on its TAP, with the MAC of the address the guest keeps (the same as
        # the source's), the kernel's ip= and the spec's host name, as a start makes.
        src = agents.ex["host-a"].driver.host.machines["m1"]["spec"]
        self.assertEqual(dspec["nic"]["mac"], addressing.mac_for("10.80.1.2"))
        self.assertEqual(dspec["nic"]["mac"], src["nic"]["mac"])
        self.assertEqual(dspec["nic"]["tap"], addressing.tap_name("m2"))
        self.assertEqual(dspec["cmdline"], src["cmdline"])
        self.assertEqual(dspec["forwards"], [])
        self.assertEqual(where["host_port"], net_b.next_port)
        agents.settle(agents.live["host-a"].migrate("m1", "host-b", where,
                                                    {"mirror_speed": SIZE}))
        agents.clock.advance(1)
        st = agents.ex["host-b"].machine_status("m2")
        self.assertEqual((st["state"], st["host_port"]), ("running", where["host_port"]))
        # The source's TAP goes once it moved (its guest never runs there again).
        self.assertEqual(agents.networks["host-a"].calls[-1], ("release", "m1"))
        agents.settle(agents.ex["host-b"].destroy_machine("m2"))
        self.assertEqual(net_b.calls[-1], ("release", "m2"))

    def test_a_cancelled_target_releases_its_tap(self):
        agents = Agents(self, bridge=True)
        agents.prepare(bridge=True)
        agents.settle(agents.live["host-b"].cancel("m2"))
        agents.clock.advance(1)
        self.assertEqual(agents.networks["host-b"].calls[-1], ("release", "m2"))
