"""
A disk-image guest's host name follows its spec: the control plane gives each machine
C{spec.network.hostname} (C{<app>-<replica>}); the executor puts it in the cloud-init
seed's C{meta-data} (C{local-hostname}) and user-data (C{hostname}), where it was the
machine id before.  A host name that is not a DNS label is refused at deploy (the agent's
spec check), naming the field.
"""

import json
import os
import shutil
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm.agent.executor import Executor, validate_machine
from zwrm.agent.network import addressing
from zwrm.agent.network.host import check_network
from zwrm.agent.volumes import VolumeStore
from zwrm.drivers import cloudinit
from zwrm.drivers.fake import FakeDriver, FakeHost
from zwrm.errors import InvalidArgument

NET = {"address": "10.80.3.7", "prefix": 16, "gateway": "10.80.3.1", "dns": "10.80.3.1",
       "mtu": 1450, "domain": "zwrm.internal", "hostname": "web-0"}
BAD = ("Web-0", "web_0", "-web", "web-", "a" * 64, "web.0", "")


def seed(machine_id, cfg, net=None):
    docs = cloudinit.documents(machine_id, cloudinit.with_hostname(cfg, net), (),
                               "0a:58:0a:50:03:07",
                               addressing.cloud_init_network_config(net) if net else None)
    meta = json.loads(docs["meta-data"])
    user = json.loads(docs["user-data"].decode().split("\n", 1)[1])
    return meta, user


class SeedHostnameTests(SynchronousTestCase):
    def test_the_network_hostname_is_the_guests(self):
        meta, user = seed("m-7f3a_x", cloudinit.validate({}), NET)
        self.assertEqual(meta, {"instance-id": "m-7f3a_x", "local-hostname": "web-0"})
        self.assertEqual(user["hostname"], "web-0")

    def test_without_one_the_machine_id_makes_it(self):
        meta, user = seed("m-7f3a_x", cloudinit.validate({}), dict(NET, hostname=None))
        self.assertEqual(meta["local-hostname"], "m-7f3a-x")
        meta, _ = seed("m-7f3a_x", cloudinit.validate({}))
        self.assertEqual(meta["local-hostname"], "m-7f3a-x")

    def test_a_cloud_init_hostname_wins(self):
        meta, _ = seed("m1", cloudinit.validate({"hostname": "own"}), NET)
        self.assertEqual(meta["local-hostname"], "own")

    def test_no_seed_stays_no_seed(self):
        self.assertIsNone(cloudinit.with_hostname(None, NET))

    def test_kernel_images_get_it_on_the_command_line(self):
        self.assertIn(":web-0:eth0:", addressing.kernel_ip_arg(check_network(NET)))

    def test_not_a_dns_label_is_refused(self):
        for bad in BAD:
            with self.assertRaises(InvalidArgument) as cm:
                check_network(dict(NET, hostname=bad))
            self.assertIn("network hostname must be a DNS label", cm.exception.message)
            if bad:
                with self.assertRaises(InvalidArgument):
                    cloudinit.with_hostname(cloudinit.validate({}), dict(NET, hostname=bad))
        self.assertEqual(check_network(dict(NET, hostname="a" * 63))["hostname"], "a" * 63)


class ExecutorSeedTests(TestCase):
    """The executor gives the driver the spec's host name in the seed config."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="zwrm-seed-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.disk = os.path.join(self.dir, "disk.qcow2")
        with open(self.disk, "wb") as f:
            f.write(b"disk")
        self.host = FakeHost(powerdown_delay=0.01)
        driver = FakeDriver(reactor, os.path.join(self.dir, "machines"), host=self.host)
        self.executor = Executor(reactor, "h1", driver,
                                 VolumeStore(reactor, os.path.join(self.dir, "v")),
                                 lambda e: succeed(None), data_dir=self.dir)
        self.addCleanup(self.executor.close)

    def spec(self, **net):
        return {"id": "m-9c1d", "app": "web", "vcpus": 1, "memory_mb": 128, "volumes": [],
                "image": {"kernel": None, "initrd": None, "disk": self.disk, "cmdline": ""},
                "service_port": None, "health": None, "network": dict(NET, **net)}

    async def test_the_seed_carries_the_spec_hostname(self):
        st = await self.executor.start_machine(self.spec())
        self.assertEqual(st["state"], "running")
        cfg = self.host.machines["m-9c1d"]["spec"]["cloud_init"]
        meta = json.loads(cloudinit.documents("m-9c1d", cfg)["meta-data"])
        self.assertEqual(meta["local-hostname"], "web-0")

    async def test_a_bad_hostname_is_refused_at_deploy(self):
        with self.assertRaises(InvalidArgument) as cm:
            validate_machine(self.spec(hostname="web_0"))
        self.assertIn("network hostname", cm.exception.message)
        with self.assertRaises(InvalidArgument):
            await self.executor.start_machine(self.spec(hostname="-x"))
        self.assertNotIn("m-9c1d", self.host.machines)
