"""
C{tcp} published ports forwarded by the kernel (nftables DNAT, L{HostNetwork.set_forwards}),
driven through L{AgentNetwork.update} as the control plane's view drives it.

Two hosts and a client, each a network namespace on a test switch; a "guest" namespace on
each host's bridge (a veth where the VM's TAP would be) runs a line server that answers with
its name.  Host h1 publishes the app:

 - connections from another namespace, from another host and from h1 itself reach the
   healthy replicas, round robin, the one on h2 over the overlay;
 - a replica whose health check fails gets no new connection;
 - a replica that leaves the routes keeps its open connection until C{drain_timeout},
   then it is cut; new connections go to the others;
 - a connection a dead replica never answered goes to another replica at the client's
   next SYN once the replica leaves the routes (killed replicas cost no request);
 - guests do not reach the published port of their host;
 - C{http} ports and ports without a healthy replica stay with the proxy.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.network.helpers import veth_guest
from zwrm.agent.network.agent import AgentNetwork
from zwrm.agent.network.commands import Runner
from zwrm.agent.network.host import HostNetwork
from zwrm.testing.netns import TestNetwork
from zwrm.testing.processes import free_port, poll

GUEST_PORT = 7000

SERVER = r"""
import socketserver, sys
name = sys.argv[1].encode()
class H(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(name + b" " + line)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("0.0.0.0", int(sys.argv[2])), H).serve_forever()
"""

ONCE = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])),
                                 timeout=float(sys.argv[3]) if sys.argv[3:] else 2)
    s.sendall(b"hi\n")
    print(s.recv(100).decode().split()[0])
except Exception as e:
    print("error", type(e).__name__)
"""

# One connection kept open; each line on stdin is sent and the answer printed.
HOLD = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
print("connected", flush=True)
for line in sys.stdin:
    try:
        s.sendall(line.encode())
        d = s.recv(100)
        print(d.decode().split()[0] if d else "closed", flush=True)
    except Exception as e:
        print("error", type(e).__name__, flush=True)
"""


class CanForwardTests(SynchronousTestCase):
    """Which C{tcp} ports the kernel may forward (the others stay with the proxy)."""

    def host(self, address="10.99.1.2", ready=True):
        hn = HostNetwork(reactor, local_address=address, state_dir=tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, hn.state_dir, True)
        hn._ready, hn.cidr = ready, "10.80.0.0/16"
        return hn

    def test_can_forward(self):
        ok = [("10.80.1.2", 8080), ("10.80.2.2", 8080)]
        self.assertTrue(self.host().can_forward(ok))
        self.assertFalse(self.host().can_forward([]))
        self.assertFalse(self.host(ready=False).can_forward(ok))
        self.assertFalse(self.host(address=None).can_forward(ok))
        self.assertFalse(self.host(address="127.0.0.1").can_forward(ok))
        for bad in (("127.0.0.1", 8080), ("10.81.0.2", 8080), ("web.example", 80),
                    ("10.80.1.3", 0)):
            self.assertFalse(self.host().can_forward(ok + [bad]), bad)


class ConntrackTests(SynchronousTestCase):
    """What is asked of C{conntrack}, and an agent without the tool."""

    def test_commands_and_a_missing_tool(self):
        from zwrm.agent.network import host as _host

        ran = []

        async def run(*argv, check=True):
            ran.append(argv)
            return ""

        hn = HostNetwork(reactor, local_address="10.99.1.2", run=run,
                         state_dir=tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, hn.state_dir, True)
        self.patch(_host.shutil, "which", lambda name: "/usr/sbin/" + name)
        self.successResultOf(defer.ensureDeferred(
            hn._conntrack_delete(80, "10.80.1.2", 8080, "SYN_SENT")))
        self.assertEqual(ran, [("conntrack", "-D", "-p", "tcp", "--orig-dst", "10.99.1.2",
                                "--orig-port-dst", 80, "--reply-src", "10.80.1.2",
                                "--reply-port-src", 8080, "--state", "SYN_SENT")])
        self.patch(_host.shutil, "which", lambda name: None)
        self.successResultOf(defer.ensureDeferred(hn._conntrack_delete(80, "10.80.1.2", 8080)))
        self.assertEqual(len(ran), 1)
        self.assertTrue(hn._no_conntrack)


@pytest.mark.multihost
class KernelIngressTests(TestCase):
    timeout = 120

    async def setUp(self):
        self.root = tempfile.mkdtemp(prefix="zwrm-kin-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.net = net = TestNetwork(["h1", "h2", "client"])
        self.addCleanup(net.close)
        self.hosts, self.guests, self.runs = {}, {}, {}
        for i, h in enumerate(("h1", "h2"), 1):
            run = Runner(reactor, ["ip", "netns", "exec", net.namespace(h)])
            hn = HostNetwork(reactor, local_address=net.address(h), run=run,
                             state_dir=os.path.join(self.root, h), drain_timeout=3.0)
            self.addCleanup(lambda hn=hn: defer.Deferred.fromCoroutine(hn.close()))
            spec = {"address": f"10.80.{i}.2", "prefix": 16, "gateway": f"10.80.{i}.1",
                    "mtu": 1450}
            nic = await hn.add_machine(f"g{i}", "web", spec)
            gns = f"{net.namespace(h)}-g"
            self.addCleanup(subprocess.run, ["ip", "netns", "delete", gns])
            await veth_guest(reactor, run, gns, nic, spec)
            srv = subprocess.Popen(["ip", "netns", "exec", gns, sys.executable, "-c", SERVER,
                                    f"g{i}", str(GUEST_PORT)])
            self.addCleanup(lambda p=srv: (p.kill(), p.wait()))
            self.hosts[h], self.guests[f"g{i}"], self.runs[h] = hn, (gns, spec["address"]), run
        views = [{"host_id": h, "address": net.address(h), "gateway": f"10.80.{i}.1"}
                 for i, h in enumerate(("h1", "h2"), 1)]
        members = [{"address": a, "app": "web", "host_id": h, "open_ports": [GUEST_PORT]}
                   for h, (_, a) in zip(("h1", "h2"), self.guests.values(), strict=True)]
        for hn in self.hosts.values():
            await hn.set_cluster(views, members)
        self.view = {"hosts": views, "prefix": 16, "members": [
            dict(m, machine_id=g, replica=i, healthy=True)
            for i, (g, m) in enumerate(zip(self.guests, members, strict=True))]}
        # h1's agent side: the proxy listens on 127.0.0.1 of this process (it is not in
        # h1's namespace); the kernel forwards on h1's address.
        self.agent = AgentNetwork(reactor, "h1", None, host_network=self.hosts["h1"],
                                  dns_port=0, drain_timeout=3.0)
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.agent.close()))
        self.port = free_port()
        for g, (_, addr) in self.guests.items():
            await poll(reactor, lambda a=addr, g=g: self.once("h1", a, GUEST_PORT, g), 20, 0.2,
                       f"{g}'s server")

    async def once(self, ns, address, port, want=None, timeout=2):
        out = (await Runner(reactor, ["ip", "netns", "exec", self.ns(ns)])(
            sys.executable, "-c", ONCE, address, port, timeout)).strip()
        return out == want if want else out

    def ns(self, name):
        return self.guests[name][0] if name in self.guests else self.net.namespace(name)

    async def publish(self, healthy=("g1", "g2"), mode="tcp", extra=None):
        routes = [{"key": g, "host": a, "port": GUEST_PORT, "healthy": g in healthy}
                  for g, (_, a) in self.guests.items()]
        published = {str(self.port): {"mode": mode, "routes": {"": routes}}}
        published.update(extra or {})
        await self.agent.update(dict(self.view, published=published))

    async def test_published_port_from_everywhere_round_robin_and_health(self):
        await self.publish()
        self.assertEqual(self.hosts["h1"].forwards,
                         {self.port: [("10.80.1.2", GUEST_PORT), ("10.80.2.2", GUEST_PORT)]})
        h1 = self.net.address("h1")
        for client in ("client", "h2", "h1"):  # another machine, another host, the host
            got = [await self.once(client, h1, self.port) for _ in range(4)]
            self.assertEqual(sorted(set(got)), ["g1", "g2"], (client, got))
        # g2's health check fails: no new connection reaches it.
        await self.publish(healthy=("g1",))
        got = [await self.once("client", h1, self.port) for _ in range(4)]
        self.assertEqual(got, ["g1"] * 4)
        # Guests do not reach their host's published port (nor does the proxy answer).
        self.assertTrue((await self.once("g1", h1, self.port)).startswith("error"))
        # No healthy replica: nothing forwarded (the proxy has the port; it answers no one
        # outside this process here).
        await self.publish(healthy=())
        self.assertEqual(self.hosts["h1"].forwards, {})
        self.assertTrue((await self.once("client", h1, self.port)).startswith("error"))
        await self.publish()
        self.assertEqual(len(self.hosts["h1"].forwards[self.port]), 2)

    async def test_http_ports_stay_with_the_proxy(self):
        other = free_port()
        routes = [{"key": "g1", "host": "10.80.1.2", "port": GUEST_PORT, "healthy": True}]
        await self.publish(extra={str(other): {"mode": "http", "routes": {"": routes}}})
        self.assertEqual(sorted(self.hosts["h1"].forwards), [self.port])
        self.assertEqual(self.agent.ingress.ports(), sorted([self.port, other]))
        rules = await self.runs["h1"]("nft", "list", "chain", "inet", "zwrm", "ingress")
        self.assertIn(f"tcp dport {self.port} ", rules)
        self.assertNotIn(f"tcp dport {other} ", rules)

    async def hold(self):
        """A connection to h1's published port kept open: C{say()} sends a line, returns
        the name of the replica that answered (or C{closed}, C{error ...})."""
        hold = subprocess.Popen(self.net.argv("client", [sys.executable, "-c", HOLD,
                                                         self.net.address("h1"),
                                                         str(self.port)]),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.addCleanup(lambda: (hold.kill(), hold.wait()))

        async def say():
            hold.stdin.write("x\n")
            hold.stdin.flush()
            return (await deferToThread(hold.stdout.readline)).strip()

        self.assertEqual((await deferToThread(hold.stdout.readline)).strip(), "connected")
        return say

    async def test_a_replica_leaving_keeps_its_connection_until_the_drain_timeout(self):
        h1 = self.net.address("h1")
        await self.publish(healthy=("g2",))
        say = await self.hold()
        self.assertEqual(await say(), "g2")
        # g2 leaves (stopped, drained, moved): new connections go to g1 at once; the open
        # one goes on being served by g2 ...
        left = reactor.seconds()
        await self.publish(healthy=("g1",))
        self.assertEqual([await self.once("client", h1, self.port) for _ in range(3)],
                         ["g1"] * 3)
        self.assertEqual(await say(), "g2")
        self.assertLess(reactor.seconds() - left, 3.0, "too slow to tell before the timeout")
        # ... until drain_timeout (3 s): then it is cut.
        await poll(reactor, lambda: defer.succeed(reactor.seconds() - left > 3.5), 10, 0.2,
                   "the drain timeout")
        self.assertNotEqual(await say(), "g2")

    async def test_a_connection_a_dead_replica_never_answered_goes_to_another(self):
        h1 = self.net.address("h1")
        await self.publish(healthy=("g2",))
        await Runner(reactor, ["ip", "netns", "exec", self.ns("g2")])(
            "ip", "link", "set", "eth0", "down")  # g2 is killed: its SYNs go unanswered
        pending = defer.ensureDeferred(self.once("client", h1, self.port, timeout=8))
        await poll(reactor, lambda: self.conntrack_has("10.80.2.2"), 5, 0.05, "the SYN to g2")
        left = reactor.seconds()
        await self.publish(healthy=("g1",))  # its agent noticed; the view follows
        self.assertEqual(await pending, "g1")
        # At the client's next SYN (1 s after the first), not a later one (3 s after).
        self.assertLess(reactor.seconds() - left, 2.9)

    async def conntrack_has(self, address):
        out = await self.runs["h1"]("conntrack", "-L", "-p", "tcp", "--reply-src", address,
                                    check=False)
        return address in out

    async def test_a_kernel_that_refuses_the_forwarding_keeps_isolation_and_the_proxy(self):
        hn = self.hosts["h1"]
        good = hn._forward_rules
        self.patch(hn, "_forward_rules",
                   lambda: good() + (["tcp dport 1 numgen nonsense"] if hn.forwards else []))
        await self.publish()
        self.assertEqual(hn.forwards, {})
        self.assertFalse(hn.kernel_forwarding)
        self.assertFalse(hn.can_forward([("10.80.1.2", GUEST_PORT)]))
        rules = await self.runs["h1"]("nft", "list", "ruleset")
        self.assertIn("chain guest_out", rules)  # isolation applied
        self.assertNotIn("dnat ip to", rules)
        self.assertEqual(self.agent.ingress.ports(), [self.port])  # the proxy has the port

    async def test_an_agent_restart_keeps_open_connections_and_forwards_again(self):
        h1 = self.net.address("h1")
        await self.publish(healthy=("g1",))
        say = await self.hold()
        self.assertEqual(await say(), "g1")
        # The agent process ends (its proxy with it); a new one's HostNetwork writes its
        # rules without the forwarding until the control plane's view comes; open
        # connections go on meanwhile.
        await defer.gatherResults(self.agent.ingress.close())
        hn = HostNetwork(reactor, local_address=h1, run=self.runs["h1"],
                         state_dir=os.path.join(self.root, "h1-again"), drain_timeout=3.0)
        await hn.add_machine("g1", "web", {"address": "10.80.1.2", "prefix": 16,
                                           "gateway": "10.80.1.1", "mtu": 1450}, recreate=False)
        self.assertNotIn("dnat ip to", await self.runs["h1"]("nft", "list", "ruleset"))
        self.assertEqual(await say(), "g1")
        self.agent = AgentNetwork(reactor, "h1", None, host_network=hn, dns_port=0,
                                  drain_timeout=3.0)
        await self.publish(healthy=("g1", "g2"))
        self.assertEqual(sorted({await self.once("client", h1, self.port) for _ in range(4)}),
                         ["g1", "g2"])
        self.assertEqual(await say(), "g1")
