"""
L{HostNetwork} in network namespaces, without guests: what an agent restart finds, and
what leaving removes.
"""

import ipaddress
import os
import shutil
import struct
import sys
import tempfile

import pytest
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from zwrm.agent.network import addressing
from zwrm.agent.network.commands import Runner
from zwrm.agent.network.host import HostNetwork
from zwrm.testing.disks import fill_disk, small_disk
from zwrm.testing.netns import TestNetwork

NET = {"address": "10.80.1.2", "prefix": 16, "gateway": "10.80.1.1", "mtu": 1450}

#: Run in a host's namespace: attach to TAP argv[1] as QEMU does (/dev/net/tun), write the
#: frame argv[2] (hex) 20 times, then the frames argv[3:] 20 times, then print the bridge's
#: forwarding database and the host's neighbours on it (while the TAP is held: the bridge
#: forgets what it learned on a port that goes down).
INJECT = r"""
import fcntl, os, struct, subprocess, sys, time
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", sys.argv[1].encode(), 0x0002 | 0x1000))
for frames in ([sys.argv[2]], sys.argv[3:]):
    for _ in range(20):
        for f in frames:
            os.write(fd, bytes.fromhex(f))
        time.sleep(0.025)
time.sleep(0.2)
for argv in (["bridge", "fdb", "show", "br", "zwbr0"], ["ip", "neigh", "show", "dev", "zwbr0"]):
    print(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    print("--")
"""


def _mac(text):
    return bytes.fromhex(text.replace(":", ""))


def _ip(text):
    return ipaddress.IPv4Address(text).packed


def _arp(src, sha, spa, tpa="10.80.1.1"):
    """An Ethernet frame from MAC C{src}: an ARP request for C{tpa} from C{sha}, C{spa}."""
    return (b"\xff" * 6 + _mac(src) + b"\x08\x06"
            + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1)
            + _mac(sha) + _ip(spa) + b"\0" * 6 + _ip(tpa)).hex()


def _udp(src, saddr, daddr="10.80.1.1"):
    """An Ethernet frame from MAC C{src} to the broadcast MAC: an IPv4 UDP packet."""
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, _ip(saddr), _ip(daddr))
    return (b"\xff" * 6 + _mac(src) + b"\x08\x00" + header
            + struct.pack(">HHHH", 9, 9, 8, 0)).hex()


@pytest.mark.multihost
class HostNetworkTests(TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="zwrm-hn-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.net = TestNetwork(["h1"])
        self.addCleanup(self.net.close)
        self.run = Runner(reactor, ["ip", "netns", "exec", self.net.namespace("h1")])

    def host(self, name):
        return HostNetwork(reactor, local_address=self.net.address("h1"), run=self.run,
                           state_dir=os.path.join(self.root, name))

    async def ifindex(self, dev):
        out = await self.run("ip", "-o", "link", "show", "dev", dev)
        return out.split(":")[0]

    async def test_restart_adopts_and_close_removes(self):
        cluster = ([{"host_id": "h2", "address": "10.99.250.2", "gateway": "10.80.2.1"}],
                   [{"address": "10.80.2.2", "app": "web", "host_id": "h2"}])
        first = self.host("a")
        nic = await first.add_machine("m1", "web", NET)
        await first.set_cluster(*cluster)
        before = await self.ifindex(nic["tap"])
        # A new agent process: the running machine keeps its TAP; nothing fails on what
        # is there already (bridge, overlay, FDB entries, rules).
        second = self.host("b")
        self.assertEqual(await second.add_machine("m1", "web", NET, recreate=False), nic)
        await second.set_cluster(*cluster)
        self.assertEqual(await self.ifindex(nic["tap"]), before)
        fdb = await self.run("bridge", "fdb", "show", "dev", "zwvx0")
        self.assertEqual(fdb.count("00:00:00:00:00:00 dst 10.99.250.2"), 1, fdb)
        self.assertIn("0a:58:0a:50:02:02 dst 10.99.250.2", fdb)
        rules = await self.run("nft", "list", "ruleset")
        self.assertIn('"' + nic["tap"] + '" . 10.80.1.2', rules)
        # A new start of the machine makes its TAP again.
        await second.add_machine("m1", "web", NET)
        self.assertNotEqual(await self.ifindex(nic["tap"]), before)
        await second.close()
        links = await self.run("ip", "-o", "link")
        for dev in ("zwbr0", "zwvx0", nic["tap"]):
            self.assertNotIn(dev, links)
        self.assertNotIn("zwrm", await self.run("nft", "list", "tables"))

    async def test_the_bridges_mac_is_its_own_whatever_its_ports(self):
        # A bridge without a MAC set takes the lowest of its ports': a TAP with a low MAC
        # would change it while there and again when it goes (a VM stopped or moved), and
        # guests would keep sending to the gateway's old MAC.
        host = self.host("a")
        self.addCleanup(lambda: defer.ensureDeferred(host.close()))
        nic = await host.add_machine("m1", "web", NET)
        mac = "0a:59:" + addressing.mac_for(self.net.address("h1"))[6:]

        async def bridge_mac():
            out = await self.run("ip", "-o", "link", "show", "dev", "zwbr0")
            return out.split("link/ether ")[1].split()[0]

        self.assertEqual(await bridge_mac(), mac)
        await self.run("ip", "link", "set", nic["tap"], "address", "02:00:00:00:00:01")
        self.assertEqual(await bridge_mac(), mac)
        await host.remove_machine("m1")
        self.assertEqual(await bridge_mac(), mac)
        await host.close()
        # A bridge an earlier agent made (upgrade): its MAC is kept as guests know it, and
        # set, so it no longer follows the ports.
        await self.run("ip", "link", "add", "zwbr0", "type", "bridge")
        before = await bridge_mac()  # the kernel's choice, not set
        again = self.host("b")
        self.addCleanup(lambda: defer.ensureDeferred(again.close()))
        nic = await again.add_machine("m1", "web", NET)
        self.assertEqual(await bridge_mac(), before)
        await self.run("ip", "link", "set", nic["tap"], "address", "02:00:00:00:00:01")
        self.assertEqual(await bridge_mac(), before)
        await again.remove_machine("m1")
        self.assertEqual(await bridge_mac(), before)

    async def test_a_guest_cannot_take_another_ones_mac_or_address(self):
        """
        Frames a guest writes into its TAP (as its QEMU does) with another VM's MAC as their
        source, or ARP naming another VM's MAC or address as its sender, are dropped before
        the bridge learns from them: the bridge never sends the other VM's frames to this
        guest's port, and the host never takes this guest for the other VM.  The guest's
        own frames pass, sent the same way first (so the checks are not vacuous).
        """
        host = self.host("a")
        self.addCleanup(lambda: defer.ensureDeferred(host.close()))
        victim = await host.add_machine("m1", "web", NET)
        guest = await host.add_machine("m2", "other", dict(NET, address="10.80.1.3"))
        me, them = guest["mac"], victim["mac"]
        out = await self.run(sys.executable, "-c", INJECT, guest["tap"],
                             _arp(me, me, "10.80.1.3"),  # its own: learned
                             _arp(them, them, "10.80.1.2"),  # as the other VM
                             _udp(them, "10.80.1.3"),  # from the other VM's MAC
                             _arp(me, me, "10.80.1.2"),  # the other VM's address
                             _arp(me, them, "10.80.1.3"))  # the other VM's MAC as sender
        fdb, neigh, _ = out.split("--")
        self.assertIn(f"{me} dev {guest['tap']} ", fdb)
        self.assertNotIn(them, fdb)
        self.assertIn(f"10.80.1.3 lladdr {me} ", neigh)
        self.assertNotIn("10.80.1.2 ", neigh)
        self.assertNotIn(them, neigh)

    async def test_a_machine_from_another_subnet_leaves_the_bridge_as_it_is(self):
        # A guest moved here live keeps its old host's subnet and gateway: the bridge keeps
        # this host's one gateway address (not the other host's: the same address twice on
        # one segment), and a new subnet from the view replaces the old address.
        host = self.host("a")
        self.addCleanup(lambda: defer.ensureDeferred(host.close()))
        await host.ensure_bridge({"gateway": "10.80.2.1", "prefix": 16})
        moved = dict(NET, address="10.80.1.7")  # gateway 10.80.1.1: the old host's
        await host.add_machine("m1", "web", moved)

        async def addresses():
            out = await self.run("ip", "-o", "-4", "addr", "show", "dev", "zwbr0")
            return [line.split()[3] for line in out.splitlines()]

        self.assertEqual(await addresses(), ["10.80.2.1/16"])
        self.assertEqual(host.gateway, "10.80.2.1")
        await host.ensure_bridge({"gateway": "10.80.3.1", "prefix": 16})
        self.assertEqual(await addresses(), ["10.80.3.1/16"])

    async def test_rules_apply_when_the_disk_is_full(self):
        """
        The ruleset goes to nft on its standard input: on a host whose data disk is full
        (here the state directory is a small tmpfs, filled) a machine still gets its rules
        and a change of the cluster still applies; only the operator's copy of the ruleset
        is missing.
        """
        state = os.path.join(self.root, "full")
        small_disk(self, state, "64k")
        fill_disk(state)
        host = HostNetwork(reactor, local_address=self.net.address("h1"), run=self.run,
                           state_dir=state)
        self.addCleanup(lambda: defer.ensureDeferred(host.close()))
        nic = await host.add_machine("m1", "web", NET)
        await host.set_cluster(
            [{"host_id": "h2", "address": "10.99.250.2", "gateway": "10.80.2.1"}],
            [{"address": "10.80.2.9", "app": "web", "host_id": "h2"}])
        rules = await self.run("nft", "list", "ruleset")
        self.assertIn('"' + nic["tap"] + '" . 10.80.1.2', rules)
        self.assertIn("10.80.2.9", rules)
        self.assertFalse(os.path.exists(os.path.join(state, "nftables.conf")))

    async def test_prepare_gives_a_disk_image_its_static_network_config(self):
        # The driver's NIC carries the cloud-init network-config the seed of a disk image
        # gets (docs/networking.md); a kernel image gets ip= on its command line instead.
        from zwrm.agent.network import addressing
        from zwrm.agent.network.agent import AgentNetwork

        agent = AgentNetwork(reactor, "h1", None, host_network=self.host("p"), dns_port=0)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(agent.close()))
        disk = await agent.prepare("m1", "web", NET, kernel=False)
        self.assertEqual(disk["cmdline"], "")
        self.assertEqual(disk["nic"]["network_config"],
                         addressing.cloud_init_network_config(NET))
        self.assertEqual(disk["nic"]["network_config"]["ethernets"]["eth0"]["addresses"],
                         ["10.80.1.2/16"])
        kernel = await agent.prepare("m1", "web", NET, kernel=True)
        self.assertIn("ip=10.80.1.2::10.80.1.1:255.255.0.0:", kernel["cmdline"])
