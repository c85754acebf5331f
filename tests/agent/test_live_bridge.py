"""
A live migration on the cluster network (bridge networking) with real QEMU under TCG, two
hosts in network namespaces (tests/network/cluster.py), each with its agent's executor,
network and live-migration procedures: C{live.prepare} makes the target's TAP for the
address the guest keeps (its MAC comes from it); the source's TAP goes once the migration
completed, so the source host reaches the guest on the target before any new cluster view;
every write the guest acknowledged over the cluster network is on the target.
"""

import os
import shutil
import tempfile

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import TestCase

from tests.network.cluster import TestCluster
from zwrm.agent.executor import Executor
from zwrm.agent.live import LiveMigrations
from zwrm.agent.network import addressing
from zwrm.agent.network.agent import AgentNetwork
from zwrm.agent.network.commands import Runner
from zwrm.agent.volumes import VolumeStore
from zwrm.pki import HostCredentials
from zwrm.pki.ca import CertificateAuthority
from zwrm.testing.processes import poll


@pytest.mark.qemu
@pytest.mark.multihost
class LiveBridgeTests(TestCase):
    timeout = 600

    async def test_the_guest_keeps_its_address_on_the_target(self):
        c = TestCluster(reactor, self, hosts=("h1", "h2"), others=())
        img = await c.build_image()
        data = tempfile.mkdtemp(prefix="zwrm-live-br-", dir="/tmp")
        self.addCleanup(shutil.rmtree, data, True)
        ca = CertificateAuthority.create()
        ex, live, run = {}, {}, {}
        for name, host in c.hosts.items():
            net = AgentNetwork(reactor, name, host.address, host_network=host.network,
                               dns_port=0)
            self.addCleanup(lambda n=net: Deferred.fromCoroutine(n.close()))
            vols = VolumeStore(reactor, os.path.join(data, name, "volumes"))
            ex[name] = Executor(reactor, name, host.driver, vols, lambda e: succeed(None),
                                data_dir=os.path.join(data, name), network=net)
            self.addCleanup(ex[name].close)
            cert, key = ca.issue_host(name)
            creds = HostCredentials(ca.certificate_pem, cert, key)
            live[name] = LiveMigrations(reactor, name, host.driver, vols,
                                        lambda c=creds: c, lambda a=host.address: a,
                                        state_dir=os.path.join(data, name, "live"),
                                        executor=ex[name])
            run[name] = Runner(reactor, ["ip", "netns", "exec", c.net.namespace(name)])

        async def destroy_all():
            for h in c.hosts.values():
                for mid in h.driver.list():
                    await h.driver.destroy(mid)

        self.addCleanup(destroy_all)
        h1, h2 = c.hosts["h1"], c.hosts["h2"]
        netspec = c.netspec(h1, hostname="web-0")
        address = netspec["address"]
        spec = {"id": "m1", "app": "web",
                "image": {"kernel": img.kernel, "initrd": img.initrd, "disk": None,
                          "cmdline": img.cmdline},
                "vcpus": 1, "memory_mb": 128, "service_port": 8080,
                "volumes": [{"id": "v1", "mount": "/data", "size_mb": 16}],
                "network": netspec}
        await ex["h1"].start_machine(spec)
        c.vms["m1"] = (h1, "web", netspec)
        await c.publish()

        async def write(on, name, body):
            try:
                out = await run[on]("curl", "-sS", "-m", "5", "--data-binary", body,
                                    f"http://{address}:8080/cgi-bin/write?{name}")
            except Exception:
                return False
            return out.strip() == "ok"

        async def read(on, name):
            return await run[on]("curl", "-sS", "-m", "10",
                                 f"http://{address}:8080/cgi-bin/read?{name}")

        await poll(reactor, lambda: write("h1", "first", "first write"), 300, interval=1.0,
                   what="the guest answering on its address")
        # Reached from the other host over the overlay too (its bridge is made below).
        desc = live["h1"].describe("m1")
        where = await live["h2"].prepare("m2", dict(spec, id="m2"), desc["volumes"], "h1")
        dspec = h2.driver.status("m2")
        self.assertEqual(dspec["state"], "running")  # started paused, incoming
        # The cluster view as the control plane pushes it (h2's overlay now has a bridge;
        # the view still puts the VM on h1).
        await c.publish()
        acked = {}
        result = await live["h1"].migrate("m1", "h2", where, {"mirror_speed": 32 * 2 ** 20})
        print(f"\nlive migration on the bridge: QEMU-reported pause {result['downtime_ms']} ms")

        async def resumed():
            return ex["h2"].has_machine("m2")

        await poll(reactor, resumed, 60, what="the target adopted")
        # The source host reaches the guest at its address on h2 at once (no new cluster
        # view yet): the source's TAP went when the migration completed, and with it what
        # h1's bridge had learned of the guest's MAC there, so h1 floods over the overlay.
        # (QEMU's announce-self RARP frames do not get out of the target's TAP: the bridge
        # rules let only IPv4 and ARP out of a guest.)
        for n in range(3):
            self.assertTrue(await write("h1", f"after-{n}", f"after {n}"), n)
            acked[f"after-{n}"] = f"after {n}"
        self.assertEqual(await read("h2", "first"), "first write")
        for name, body in acked.items():
            self.assertEqual(await read("h2", name), body, name)
        # The source's TAP went when its migration completed (its guest never runs there
        # again); the target's machine is its executor's.
        links = await run["h1"]("ip", "-o", "link")
        self.assertNotIn(addressing.tap_name("m1"), links)
        self.assertIn(addressing.tap_name("m2"), await run["h2"]("ip", "-o", "link"))
        st = ex["h2"].machine_status("m2")
        self.assertEqual((st["state"], st["live_migration"]), ("running", None))
        # (Seen and not solved: a second or two after the move, connections from h1 to the
        # guest on h2 time out, while h2 reaches it; see the issue 18 report.)
