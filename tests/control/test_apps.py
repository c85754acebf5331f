"""
Apps, machines and volumes: deploy, scale, destroy, pinning and agent reports.

The control side is real (SQLite store, host registry, scheduler with the spread strategy);
each host's executor is the real L{Executor} over a real L{VolumeStore} (mkfs.ext4) and the
fake hypervisor driver, which passes the same driver contract tests as the QEMU driver.
Calls to executors go through a JSON round trip and turn zwrm errors into plain WAMP
C{ApplicationError}s, as the router would.
"""

import json
import os
import shutil
import tempfile
from types import SimpleNamespace

from autobahn.wamp.exception import ApplicationError
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, maybeDeferred
from twisted.trial.unittest import TestCase

from tests.control.helpers import FACTS, make_registry
from zwrm import errors
from zwrm.agent.executor import Executor
from zwrm.agent.volumes import VolumeStore
from zwrm.control.apps import Apps, validate_spec
from zwrm.drivers.fake import FakeDriver, FakeHost
from zwrm.scheduler import Scheduler, load_strategy
from zwrm.testing.image import kernel_bytes


def d(f):
    def wrapper(self):
        return ensureDeferred(f(self))

    wrapper.__name__ = f.__name__
    return wrapper


def caller(authid):
    """What autobahn passes as C{details} to a procedure called by C{authid}."""
    return SimpleNamespace(caller_authid=authid)


def procedures(obj):
    """The C{@wamp.register} procedures of C{obj}, by URI."""
    out = {}
    for name in dir(obj):
        fn = getattr(obj, name, None)
        for pattern in getattr(fn, "_wampuris", []) or []:
            out[pattern.uri()] = fn
    return out


class Cluster:
    """Two or three hosts with real executors, and the control plane's apps layer."""

    def __init__(self, testcase):
        self.t = testcase
        self.dir = tempfile.mkdtemp(prefix="zwrm-apps-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        self.kernel = os.path.join(self.dir, "vmlinuz")
        with open(self.kernel, "wb") as f:
            f.write(kernel_bytes())
        self.executors = {}
        self.calls = []

    async def start(self, hosts=("h-a", "h-b"), **facts):
        self.clock, self.store, self.registry, self.published = await make_registry(
            self.t, call=self.call)
        self.apps = Apps(self.clock, self.store, self.registry,
                         Scheduler(load_strategy("spread")), self.publish)
        for host_id in hosts:
            await self.add_host(host_id, **facts)
        return self

    def publish(self, topic, event):
        self.published.append((topic, event))

    async def add_host(self, host_id, **facts):
        await self.registry.join(host_id, dict(FACTS, name=host_id, **facts))
        await self.registry.register(host_id, dict(FACTS, name=host_id, **facts))
        root = os.path.join(self.dir, host_id)
        driver = FakeDriver(reactor, os.path.join(root, "machines"),
                            host=FakeHost(powerdown_delay=0.01))
        ex = Executor(reactor, host_id, driver, VolumeStore(reactor, os.path.join(root, "vols")),
                      lambda event, h=host_id: self.report(h, event), data_dir=root)
        self.t.addCleanup(ex.close)
        self.executors[host_id] = (ex, procedures(ex))

    def report(self, host_id, event):
        event = json.loads(json.dumps(event))
        return ensureDeferred(self.apps.machine_event(
            event, details=caller(host_id)))

    def call(self, procedure, *args, **kwargs):
        _, host_id, verb = procedure.split(".", 2)[0], *procedure[len("zwrm.agent."):].split(".", 1)
        self.calls.append((host_id, verb))
        ex, procs = self.executors[host_id]
        args, kwargs = json.loads(json.dumps([args, kwargs]))

        def wire(f):
            e = f.value
            if isinstance(e, errors.ZwrmError):
                raise ApplicationError(e.uri, *e.args, **(e.kwargs or {}))
            return f

        return maybeDeferred(procs[verb], *args, **kwargs).addCallbacks(
            lambda r: json.loads(json.dumps(r)), wire)

    def spec(self, **kw):
        spec = {"image": {"kernel": self.kernel, "initrd": None, "disk": None, "cmdline": ""},
                "vcpus": 1, "memory_mb": 256, "replicas": 1,
                # Redeploys replace every machine at once (the clock is a Clock); rolling
                # updates, the default, are tested in test_apps_rolling.
                "update": {"max_parallel": 0}}
        spec.update(kw)
        return spec

    async def machines(self, app):
        return (await self.apps.app_status(app))["machines"]


class SpecTests(TestCase):
    def test_validation_names_the_field(self):
        for bad, word in [
            ({}, "image"),
            ({"image": "x:1", "vcpus": 0}, "vcpus"),
            ({"image": "x:1", "replicas": -1}, "replicas"),
            ({"image": "x:1", "color": "red"}, "color"),
            ({"image": "x:1", "health": {"type": "http"}}, "service_port"),
            ({"image": "x:1", "volumes": [{"name": "d", "mount": "rel"}]}, "mount"),
            ({"image": "x:1", "volumes": [{"name": "d", "mount": "/d"}] * 2}, "twice"),
            ({"image": "x:1", "region": ""}, "region"),
        ]:
            e = self.assertRaises(errors.InvalidArgument, validate_spec, bad)
            self.assertIn(word, e.message)

    def test_defaults(self):
        spec = validate_spec({"image": "x:1", "volumes": [{"name": "data", "mount": "/data"}]})
        self.assertEqual((spec["vcpus"], spec["memory_mb"], spec["replicas"]), (1, 256, 1))
        self.assertEqual(spec["volumes"], [{"name": "data", "mount": "/data", "size_mb": 64}])


class AppTests(TestCase):
    @d
    async def test_deploy_spreads_and_runs(self):
        c = await Cluster(self).start()
        await c.apps.create_app("web")
        status = await c.apps.deploy("web", c.spec(replicas=2))
        ms = status["machines"]
        self.assertEqual(sorted(m["host_id"] for m in ms), ["h-a", "h-b"])
        self.assertEqual({m["state"] for m in ms}, {"running"})
        # stored before announced: every published machine event is in the event log
        logged = {e["id"] for e in await c.store.select("events")}
        machine_events = [e for t, e in c.published if t == "zwrm.event.machine"]
        self.assertTrue(machine_events)
        self.assertTrue(all(e["id"] in logged for e in machine_events))
        states = [e["payload"]["state"] for e in machine_events if e["subject"] == ms[0]["id"]]
        self.assertEqual(states[:2], ["pending", "starting"])
        self.assertEqual(states[-1], "running")
        apps = await c.apps.list_apps()
        self.assertEqual(apps[0]["machines"], {"running": 2})
        # the hosts' allocation is stored (what `zwrm host list` shows)
        hosts = {h["id"]: h for h in await c.registry.list()}
        self.assertEqual([hosts[h]["alloc_vcpus"] for h in ("h-a", "h-b")], [1, 1])
        self.assertEqual((await c.store.get("hosts", "h-a"))["alloc_memory_mb"], 256)
        await c.apps.scale("web", 1)
        self.assertEqual(sum(h["alloc_vcpus"] for h in await c.registry.list()), 1)

    @d
    async def test_create_conflict_and_unknown_app(self):
        c = await Cluster(self).start()
        await c.apps.create_app("web")
        with self.assertRaises(errors.Conflict):
            await c.apps.create_app("web")
        with self.assertRaises(errors.NotFound):
            await c.apps.deploy("nope", c.spec())
        with self.assertRaises(errors.InvalidArgument):
            await c.apps.create_app("Bad Name")

    @d
    async def test_machines_of_one_host(self):
        """
        Listing one host's machines: a host with none lists none; a host the cluster does not
        know is not found, naming the argument (a typo is not an empty host).
        """
        c = await Cluster(self).start()
        await c.apps.create_app("web")
        await c.apps.deploy("web", c.spec(replicas=1))
        [m] = await c.apps.list_machines(host_id=None)
        other = "h-b" if m["host_id"] == "h-a" else "h-a"
        self.assertEqual([x["id"] for x in await c.apps.list_machines(host_id=m["host_id"])],
                         [m["id"]])
        self.assertEqual(await c.apps.list_machines(host_id=other), [])
        with self.assertRaises(errors.NotFound) as cm:
            await c.apps.list_machines(host_id="h-typo")
        self.assertEqual((cm.exception.kwargs, cm.exception.message),
                         ({"argument": "host_id"}, "no host 'h-typo'"))

    @d
    async def test_unplaceable_says_why_and_starts_nothing(self):
        c = await Cluster(self).start()
        await c.apps.create_app("big")
        with self.assertRaises(errors.Unplaceable) as cm:
            await c.apps.deploy("big", c.spec(memory_mb=10 ** 6))
        self.assertIn("memory", cm.exception.message)
        with self.assertRaises(errors.Unplaceable) as cm:
            await c.apps.deploy("big", c.spec(region="us-west"))
        self.assertIn("region", cm.exception.message)
        self.assertEqual(await c.machines("big"), [])
        self.assertEqual([v for _, v in c.calls if v == "machine.start"], [])

    @d
    async def test_batch_is_all_or_nothing_and_capacity_is_kept(self):
        c = await Cluster(self).start()
        await c.apps.create_app("a")
        await c.apps.create_app("b")
        # FACTS: 8 vCPUs per host, two hosts.
        await c.apps.deploy("a", c.spec(vcpus=4, replicas=3))
        with self.assertRaises(errors.Unplaceable):
            await c.apps.deploy("b", c.spec(vcpus=4, replicas=2))
        self.assertEqual(await c.machines("b"), [])
        await c.apps.deploy("b", c.spec(vcpus=4, replicas=1))
        with self.assertRaises(errors.Unplaceable):
            await c.apps.scale("b", 2)

    @d
    async def test_scale_down_keeps_volumes_and_scale_up_pins_to_them(self):
        c = await Cluster(self).start()
        await c.apps.create_app("db")
        vol = [{"name": "data", "size_mb": 8, "mount": "/data"}]
        status = await c.apps.deploy("db", c.spec(replicas=2, volumes=vol))
        first = {m["replica"]: m["host_id"] for m in status["machines"]}
        self.assertEqual(len(status["volumes"]), 2)
        for v in status["volumes"]:
            self.assertEqual(v["state"], "ready")
            self.assertEqual(v["host_id"], first[v["replica"]])
            ex, _ = c.executors[v["host_id"]]
            self.assertTrue(ex.volumes.exists(v["id"]))
        await c.apps.scale("db", 1)
        self.assertEqual(len(await c.machines("db")), 1)
        self.assertEqual(len(await c.apps.list_volumes("db")), 2)
        # each with its app's name, of one app or of all
        self.assertEqual([v["app"] for v in await c.apps.list_volumes("db")], ["db", "db"])
        self.assertEqual([v["app"] for v in await c.apps.list_volumes()], ["db", "db"])
        # Fill replica 1's host for everything but a pinned placement: it must still go there.
        await c.apps.scale("db", 2)
        again = {m["replica"]: m["host_id"] for m in await c.machines("db")}
        self.assertEqual(again, first)

    @d
    async def test_pinned_host_gone_is_unplaceable(self):
        c = await Cluster(self).start()
        await c.apps.create_app("db")
        vol = [{"name": "data", "size_mb": 8, "mount": "/data"}]
        status = await c.apps.deploy("db", c.spec(volumes=vol))
        host = status["machines"][0]["host_id"]
        await c.apps.scale("db", 0)
        await c.registry.mark_offline(host)
        with self.assertRaises(errors.Unplaceable) as cm:
            await c.apps.scale("db", 1)
        self.assertIn("pin", cm.exception.message)

    @d
    async def test_destroy_machine_and_app(self):
        c = await Cluster(self).start()
        await c.apps.create_app("web")
        status = await c.apps.deploy("web", c.spec(replicas=2,
                                     volumes=[{"name": "d", "size_mb": 4, "mount": "/d"}]))
        mid = status["machines"][0]["id"]
        await c.apps.destroy_machine(mid)
        with self.assertRaises(errors.NotFound):
            await c.apps.machine_status(mid)
        with self.assertRaises(errors.Conflict):
            await c.apps.destroy_volume(status["machines"][1]["volumes"][0])
        result = await c.apps.destroy_app("web")
        self.assertTrue(result["app_kept_for_volumes"])
        self.assertEqual(len(await c.apps.list_volumes("web")), 2)
        result = await c.apps.destroy_app("web", volumes=True)
        self.assertEqual(len(result["volumes"]), 2)
        for ex, _ in c.executors.values():
            self.assertEqual(ex.volumes.list(), [])
        with self.assertRaises(errors.NotFound):
            await c.apps.app_status("web")

    @d
    async def test_agent_reports_only_its_own_machines(self):
        c = await Cluster(self).start()
        await c.apps.create_app("web")
        status = await c.apps.deploy("web", c.spec())
        m = status["machines"][0]
        other = "h-b" if m["host_id"] == "h-a" else "h-a"
        with self.assertRaises(errors.NotAuthorized):
            await c.apps.machine_event(
                {"machine_id": m["id"], "state": "failed"},
                details=caller(other))
        with self.assertRaises(errors.InvalidArgument):
            await c.apps.machine_event("junk", details=caller(other))
        self.assertEqual((await c.apps.machine_status(m["id"]))["state"], "running")

    @d
    async def test_crash_reported_releases_capacity_and_redeploy_replaces(self):
        c = await Cluster(self).start(hosts=("h-a",))
        await c.apps.create_app("web")
        status = await c.apps.deploy("web", c.spec(vcpus=8))
        m = status["machines"][0]
        ex, _ = c.executors["h-a"]
        ex.driver.crash(m["id"])
        for _ in range(50):
            if (await c.apps.machine_status(m["id"]))["state"] == "failed":
                break
            await deferLater(0.01)
        self.assertEqual((await c.apps.machine_status(m["id"]))["state"], "failed")
        # capacity is back: the converge replaces the failed replica on the full host
        status = await c.apps.scale("web", 1)
        states = sorted(x["state"] for x in status["machines"])
        self.assertEqual(states, ["running"])
        self.assertNotEqual(status["machines"][0]["id"], m["id"])

    @d
    async def test_restart_restores_capacity(self):
        c = await Cluster(self).start(hosts=("h-a",))
        await c.apps.create_app("web")
        await c.apps.deploy("web", c.spec(vcpus=8))
        fresh = Apps(c.clock, c.store, c.registry, Scheduler(load_strategy("spread")), c.publish)
        self.assertEqual(await fresh.load(), 1)
        await fresh.create_app("other")
        with self.assertRaises(errors.Unplaceable):
            await fresh.deploy("other", c.spec(vcpus=1))


    @d
    async def test_a_long_app_name_gives_valid_distinct_host_names(self):
        c = await Cluster(self).start()
        name = "a" * 62 + "z"  # the longest app name
        await c.apps.create_app(name)
        await c.apps.deploy(name, c.spec(replicas=2))
        rows = await c.store.select("machines")
        names = sorted(r["spec"]["network"]["hostname"] for r in rows)
        self.assertEqual(names, ["a" * 61 + "-0", "a" * 61 + "-1"])


def deferLater(seconds):
    from twisted.internet.task import deferLater as _dl

    return _dl(reactor, seconds, lambda: None)
