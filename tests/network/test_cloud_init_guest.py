"""
A real disk-image guest (the Debian cloud image of L{zwrm.testing.debian}) on a bridged
host takes its allocated address from its cloud-init seed: static address, route,
resolver, search domain and MTU, with no DHCP server anywhere (the bridge serves none).

The host is a network namespace (L{tests.network.cluster}); the agent's side is the real
L{AgentNetwork.prepare} (disk image: no kernel C{ip=}), the seed is built by the QEMU driver.
"""

import pytest
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.network.cluster import TestCluster
from zwrm.agent.network.agent import AgentNetwork
from zwrm.testing import debian
from zwrm.testing.processes import poll


@pytest.mark.qemu
@pytest.mark.multihost
class CloudInitGuestTests(TestCase):
    timeout = 1500

    async def test_debian_guest_takes_its_address_from_the_seed(self):
        img = await deferToThread(debian.build)
        c = TestCluster(reactor, self, hosts=("h1",), others=())
        host = c.hosts["h1"]
        net = c.netspec(host, hostname="web-0", domain="zwrm.internal")
        agent = AgentNetwork(reactor, "h1", None, host_network=host.network, dns_port=0)
        prepared = await agent.prepare("m1", "web", net, kernel=False)
        self.assertEqual(prepared["cmdline"], "")  # the address is in the seed only
        c.vms["m1"] = (host, "web", net)
        await c.publish()
        # The guest writes what it got where its web service serves it (GET /data/NAME).
        report = ("#!/bin/sh\nmkdir -p /data\nip -o addr show dev eth0 > /data/addr\n"
                  "ip -o link show dev eth0 > /data/link\nip route > /data/route\n"
                  "cat /etc/resolv.conf > /data/resolv 2>&1\n"
                  "cat /etc/network/interfaces.d/* > /data/eni 2>&1\necho reported > /data/done\n")
        await host.driver.start({
            "id": "m1", "kernel": img.kernel, "initrd": img.initrd, "disk": img.disk,
            "cmdline": img.cmdline, "vcpus": 1, "memory_mb": 512,
            "cloud_init": {"user_data": report}, "nic": prepared["nic"]})
        url = f"http://{net['address']}:{img.service_port}"

        async def get(path):
            return await c.fetch("h1", url + path, timeout=5)

        async def reported():
            body = await get("/data/done")
            return body is not None and "reported" in body

        await poll(reactor, reported, 1200, 5, what=f"the guest's report at {url}")
        got = {k: await get("/data/" + k) for k in ("addr", "link", "route", "resolv", "eni")}
        self.assertIn(f"inet {net['address']}/16", got["addr"])
        self.assertIn("mtu 1450", got["link"])
        self.assertIn(f"default via {net['gateway']}", got["route"])
        self.assertIn(f"nameserver {net['dns']}", got["resolv"])
        self.assertIn("search zwrm.internal", got["resolv"])
        # No DHCP anywhere: the bridge serves none, and the guest asked for none.
        self.assertNotIn("dhcp", got["eni"])
