"""
Validated deploys: every deploy is checked on the control plane (image reference syntax,
the image in the registry, resource shape, health, restart policy) before a machine is
touched; a rejected one changes nothing.  A redeploy keeps the fields it leaves out.

The registry is the real one (L{RegistryStore} in a temporary directory, read through the
control plane's L{ImageAPI}).
"""

import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.control.test_apps import Cluster, d
from zwrm import errors
from zwrm.control.images import ImageAPI
from zwrm.registry import image
from zwrm.registry.store import RegistryStore


class ValidationTests(TestCase):
    async def cluster(self):
        c = await Cluster(self).start()
        c.apps.images = ImageAPI(reactor, RegistryStore(reactor, os.path.join(c.dir, "reg")))
        await c.apps.create_app("web")
        await c.apps.deploy("web", c.spec(replicas=2))
        return c

    async def deploy_refused(self, name, role, data):
        """
        Deploy to web an image C{name}:1 of one layer (C{role}: C{data}) written into the
        registry's store as it is, unchecked (one a registry of before took): refused,
        and nothing changed.

        @return: the layer's digest and the refusal's message.
        """
        c = await self.cluster()
        before = await c.apps.app_status("web")
        store = c.apps.images._store
        config = image.make_config()
        cd = await store.put_bytes(name, config)
        digest = await store.put_bytes(name, data)
        manifest = image.make_manifest((cd, len(config)), [(role, digest, len(data), "f")])
        store.link_manifest(name, await store.put_bytes(name, manifest), image.MANIFEST_TYPE,
                            "1")
        with self.assertRaises(errors.InvalidArgument) as cm:
            await c.apps.deploy("web", {"image": f"{name}:1"})
        await self.unchanged(c, before)
        return digest, cm.exception.message

    async def unchanged(self, c, before):
        after = await c.apps.app_status("web")
        self.assertEqual(after["spec_version"], before["spec_version"])
        self.assertEqual(after["spec"], before["spec"])
        self.assertEqual([(m["id"], m["state"]) for m in after["machines"]],
                         [(m["id"], "running") for m in before["machines"]])

    @d
    async def test_bad_deploys_change_nothing(self):
        c = await self.cluster()
        before = await c.apps.app_status("web")
        starts = len([v for _, v in c.calls if v == "machine.start"])
        for spec, word in [
            ({"image": "demo:2"}, "not in the registry"),
            ({"image": "Demo::bad"}, "invalid image reference"),
            # (longer than a file name in the registry's store: an internal error before)
            ({"image": "x" * 300}, "its name is at most 255 characters, not 300"),
            ({"image": {"kernel": "relative/vmlinuz"}}, "absolute"),
            ({"image": {"initrd": "/x"}}, "kernel or a disk"),
            ({"service_port": 80, "health": {"type": "http", "interval": -1}}, "interval"),
            ({"vcpus": 0}, "vcpus"),
            # (no host could be in it: a host's region is at most 63 of these characters)
            ({"region": "us east"}, "region must be a name (at most 63 characters of A-Z a-z"),
            ({"region": ""}, "region must be a name (at most 63 characters"),
            ({"datacenter": "d" * 64}, "datacenter must be a name (at most 63 characters"),
            ({"constraints": {"disk type": "ssd"}}, "constraints: label key must be 1-63"),
            ({"constraints": {"disk": "s" * 256}}, "constraints: label disk: its value must be"),
            ({"restart": {"policy": "sometimes"}}, "restart policy"),
            ({"volumes": [{"name": "d", "mount": "d"}]}, "mount"),
            # (what the agent's driver refuses at each start: refused here at once)
            ({"volumes": [{"name": "d", "mount": "/my data"}]}, "no blanks, commas or colons"),
            ({"volumes": [{"name": "d", "mount": "/a,b"}]}, "no blanks, commas or colons"),
            ({"volumes": [{"name": "d", "mount": "/d" * 128}]}, "at most 255 characters"),
            # (a misspelt field was dropped without a word, its default taken)
            ({"volumes": [{"name": "d", "mount": "/d", "sise_mb": 8}]},
             "volume 'd': unknown field(s) sise_mb (a volume has name, mount and size_mb)"),
            ({"service_port": 80, "health": {"type": "http", "intervall": 10}},
             "unknown health field(s): intervall (a check has grace, interval, path, timeout,"
             " type, unhealthy_threshold)"),
            ({"image": {"kernel": "/k", "cmdline": "console=ttyS0\0x"}},
             "image cmdline must be one line of text"),
            ({"image": {"kernel": "/k", "cmdline": "a\nb"}}, "image cmdline must be one line"),
        ]:
            with self.assertRaises(errors.InvalidArgument) as cm:
                await c.apps.deploy("web", spec)
            self.assertIn(word, cm.exception.message)
            await self.unchanged(c, before)
        with self.assertRaises(errors.Unplaceable):
            await c.apps.deploy("web", {"memory_mb": 10 ** 6})
        await self.unchanged(c, before)
        self.assertEqual(len([v for _, v in c.calls if v == "machine.start"]), starts)

    @d
    async def test_a_volume_whose_mount_the_guest_cannot_take_is_refused(self):
        c = await self.cluster()
        for mount in ("/my data", "/a:b", "/x\n/etc", "relative", "/"):
            with self.assertRaises(errors.InvalidArgument) as cm:
                await c.apps.create_volume("web", "data", 8, mount)
            self.assertEqual(cm.exception.message, (
                f"volume 'data': mount must be an absolute path other than / (at most 255"
                f" characters; no blanks, commas or colons), not {mount!r}"))
        self.assertEqual(await c.store.select("volumes"), [])

    @d
    async def test_an_image_whose_kernel_is_not_one_is_refused(self):
        """
        An image stored before the registry checked kernel layers (any file as its kernel):
        a deploy of it is refused at once, naming the layer, and changes nothing. (It rolled
        out machines that failed at each start until the update's healthy_deadline, 5 min.)
        """
        kd, message = await self.deploy_refused("old/vm", "kernel", os.urandom(200_000))
        self.assertEqual(message, f"image old/vm:1: its kernel layer {kd} is not an x86 kernel "
                         "QEMU can boot: a Linux bzImage (vmlinuz), an ELF kernel with a PVH "
                         "entry point or a Multiboot kernel")

    @d
    async def test_a_disk_alone_without_a_boot_sector_is_refused(self):
        """
        An image of a disk alone stored before pushes were checked (a root file system
        without its kernel): a deploy of it is refused at once and changes nothing.
        """
        dd, message = await self.deploy_refused("old/disk", "disk:raw", bytes(64 << 10))
        self.assertEqual(message, f"image old/disk:1: its disk layer {dd} has no boot sector "
                         "(no MBR boot signature, no GPT), and the image has no kernel: its "
                         "firmware would boot nothing")

    @d
    async def test_redeploy_keeps_what_it_leaves_out(self):
        c = await self.cluster()
        await c.apps.deploy("web", c.spec(replicas=2, constraints={"disk": "ssd"},
                                          volumes=[{"name": "data", "mount": "/data"}]))
        status = await c.apps.deploy("web", {"memory_mb": 512})
        spec = status["spec"]
        self.assertEqual((spec["replicas"], spec["memory_mb"]), (2, 512))
        self.assertEqual([v["name"] for v in spec["volumes"]], ["data"])
        self.assertEqual(spec["constraints"], {"disk": "ssd"})
        # clearing is explicit
        status = await c.apps.deploy("web", {"constraints": None, "replicas": None})
        self.assertEqual((status["spec"]["constraints"], status["spec"]["replicas"]), ({}, 1))
        self.assertEqual(status["spec"]["memory_mb"], 512)
        self.assertEqual(len(status["machines"]), 1)


    @d
    async def test_a_first_deploy_needs_an_image(self):
        c = await self.cluster()
        await c.apps.create_app("new")
        with self.assertRaises(errors.InvalidArgument) as cm:
            await c.apps.deploy("new", {"replicas": 1, "memory_mb": 128})
        self.assertEqual(cm.exception.message, "app 'new' has no version yet: its first deploy "
                         "needs an image (spec field image: NAME:TAG, or local paths)")
        self.assertEqual((await c.apps.app_status("new"))["spec_version"], 0)
        # a redeploy without one keeps the current version's (zwrm deploy web --memory 300)
        status = await c.apps.deploy("web", {"memory_mb": 300})
        self.assertEqual(status["spec"]["image"], c.spec()["image"])


class HistoryTests(TestCase):
    @d
    async def test_history_and_rollback(self):
        c = await Cluster(self).start()
        await c.apps.create_app("web")
        await c.apps.deploy("web", c.spec(replicas=2, memory_mb=256))
        await c.apps.deploy("web", {"memory_mb": 512})
        await c.apps.scale("web", 1)
        versions = await c.apps.history("web")
        self.assertEqual([(v["version"], v["spec"]["memory_mb"], v["spec"]["replicas"],
                           v["current"]) for v in versions],
                         [(1, 256, 2, False), (2, 512, 2, False), (3, 512, 1, True)])
        status = await c.apps.rollback("web", 1)
        self.assertEqual((status["spec_version"], status["spec"]["memory_mb"],
                          status["spec"]["replicas"]), (4, 256, 2))
        self.assertEqual(len(status["machines"]), 2)
        status = await c.apps.rollback("web")  # the one before: version 3
        self.assertEqual((status["spec_version"], status["spec"]["replicas"]), (5, 1))
        with self.assertRaises(errors.NotFound):
            await c.apps.rollback("web", 99)
        with self.assertRaises(errors.InvalidArgument):
            await c.apps.rollback("web", 0)
        self.assertEqual((await c.apps.app_status("web"))["spec_version"], 5)


class SameSpecTests(TestCase):
    """
    A deploy whose spec is the current one (a spec file applied again, C{zwrm deploy
    --file}) is no new version; one read back from the app's status, its cloud-init
    secrets as their digests, deploys as it was.
    """

    def deployed_events(self, c):
        return [e for t, e in c.published if t == "zwrm.event.app" and e["kind"] == "deployed"]

    @d
    async def test_the_same_spec_again_is_no_new_version(self):
        c = await Cluster(self).start()
        await c.apps.create_app("web")
        await c.apps.deploy("web", c.spec(replicas=2))
        events = len(self.deployed_events(c))
        # the whole spec again, a field given as it is, local paths without their empty keys
        for given in (c.spec(replicas=2), {"memory_mb": 256},
                      {"image": {"kernel": c.kernel}}):
            status = await c.apps.deploy("web", given)
            self.assertEqual(status["spec_version"], 1, given)
        self.assertEqual([v["version"] for v in await c.apps.history("web")], [1])
        self.assertEqual(len(self.deployed_events(c)), events)
        # it still converges: a replica gone is placed again
        gone = (await c.machines("web"))[1]
        await c.apps.replicas.remove_machine(await c.apps.data.machines.get(gone["id"]))
        status = await c.apps.deploy("web", c.spec(replicas=2))
        self.assertEqual((status["spec_version"], len(status["machines"])), (1, 2))
        status = await c.apps.scale("web", 2)  # the count it has: no new version either
        self.assertEqual(status["spec_version"], 1)
        # a change is a new version, and a rollback goes to the one that differs
        await c.apps.deploy("web", {"memory_mb": 300})
        status = await c.apps.rollback("web")
        self.assertEqual((status["spec_version"], status["spec"]["memory_mb"]), (3, 256))

    @d
    async def test_a_spec_read_back_keeps_its_secrets(self):
        c = await Cluster(self).start()
        await c.apps.create_app("web")
        secret = {"ssh_keys": [], "user_data": "#cloud-config\npassword: hunter2\n",
                  "env": {"DB_PASSWORD": "hunter2"}}
        await c.apps.deploy("web", c.spec(cloud_init=secret))
        shown = (await c.apps.app_status("web"))["spec"]
        self.assertNotIn("hunter2", repr(shown))
        status = await c.apps.deploy("web", shown)
        self.assertEqual(status["spec_version"], 1)
        stored = (await c.apps.data.apps.by_name("web"))["spec"]["cloud_init"]
        self.assertEqual((stored["user_data"], stored["env"]), (secret["user_data"], secret["env"]))
        # a digest of something else is refused, and changes nothing
        wrong = dict(shown, cloud_init=dict(shown["cloud_init"],
                                            env={"sha256": "0" * 64, "size": 3}))
        with self.assertRaises(errors.InvalidArgument) as cm:
            await c.apps.deploy("web", wrong)
        self.assertEqual(cm.exception.message, "cloud_init env: 000000000000... is the digest "
                         "of no current env of this app: give the env itself")
        self.assertEqual((await c.apps.app_status("web"))["spec_version"], 1)
        # the text itself changes it
        status = await c.apps.deploy("web", {"cloud_init": dict(secret, env={"A": "1"})})
        self.assertEqual(status["spec_version"], 2)


class PlanTests(TestCase):
    @d
    async def test_plan_changes_nothing_and_says_what_would(self):
        c = await Cluster(self).start()
        await c.apps.create_app("web")
        await c.apps.deploy("web", c.spec(replicas=2))
        before = await c.apps.app_status("web")
        alloc = [h["alloc_memory_mb"] for h in await c.registry.list()]
        events = len(c.published)
        plan = await c.apps.plan("web", {"memory_mb": 512, "replicas": 3})
        self.assertEqual(plan["diff"], {"memory_mb": {"old": 256, "new": 512},
                                        "replicas": {"old": 2, "new": 3}})
        self.assertEqual((plan["version"], plan["changed"]), (2, True))
        self.assertEqual([r["machine_id"] for r in plan["replace"]],
                         [m["id"] for m in before["machines"]])
        self.assertTrue(all(r["to_host"] for r in plan["replace"]))
        self.assertEqual([x["replica"] for x in plan["create"]], [2])
        self.assertIsNone(plan["unplaceable"])
        plan = await c.apps.plan("web", {"replicas": 1})
        self.assertEqual([r["replica"] for r in plan["destroy"]], [1])
        self.assertEqual([r["replica"] for r in plan["keep"]], [0])
        plan = await c.apps.plan("web", {"memory_mb": 10 ** 6})
        self.assertIn("memory", plan["unplaceable"])
        with self.assertRaises(errors.InvalidArgument):
            await c.apps.plan("web", {"vcpus": 0})
        # nothing changed: spec, machines, reservations, no event
        self.assertEqual(await c.apps.app_status("web"), before)
        self.assertEqual([h["alloc_memory_mb"] for h in await c.registry.list()], alloc)
        self.assertEqual(len(c.published), events)
        await c.apps.deploy("web", {"replicas": 3, "memory_mb": 512})  # and it fits as planned
