"""The control plane's IPAM (L{zwrm.control.network}) on a real SQLite store."""

import ipaddress

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tests.control.test_store import tmpdir
from zwrm import errors
from zwrm.control.network import ClusterNetwork, check_cidr
from zwrm.control.store import Store


class IpamTests(TestCase):
    async def store(self, path=None):
        s = Store(reactor, path or tmpdir(self))
        await s.start()
        self.addCleanup(s.stop)
        return s

    async def test_subnet_per_host_address_per_machine(self):
        net = ClusterNetwork(await self.store(), Clock())
        a = await net.attach("m1", "app1", "h1", hostname="web-0", open_ports=[80, 80])
        self.assertEqual(a, {"address": "10.80.1.2", "prefix": 16, "gateway": "10.80.1.1",
                             "dns": "10.80.1.1", "mtu": 1450, "domain": "zwrm.internal",
                             "hostname": "web-0", "open_ports": [80]})
        self.assertEqual((await net.attach("m2", "app1", "h1"))["address"], "10.80.1.3")
        self.assertEqual((await net.attach("m3", "app2", "h2"))["address"], "10.80.2.2")
        self.assertEqual(await net.host_subnet("h2"), "10.80.2.0/24")
        # The same machine on the same host keeps its address.
        self.assertEqual((await net.attach("m1", "app1", "h1"))["address"], "10.80.1.2")
        # Moved to another host: an address of that host's subnet.
        self.assertEqual((await net.attach("m1", "app1", "h2"))["address"], "10.80.2.3")
        await net.release("m1")
        self.assertIsNone(await net.address("m1"))
        self.assertEqual((await net.attach("m4", "app1", "h2"))["address"], "10.80.2.3")
        view = await net.view()
        self.assertEqual([h["host_id"] for h in view["hosts"]], ["h1", "h2"])
        self.assertEqual(sorted(m["machine_id"] for m in view["members"]), ["m2", "m3", "m4"])

    async def test_stored_across_restarts(self):
        path = tmpdir(self)
        s = await self.store(path)
        net = ClusterNetwork(s, Clock())
        await net.attach("m1", "a", "h1")
        await net.attach("m2", "a", "h2")
        await s.stop()
        s2 = await self.store(path)
        net2 = ClusterNetwork(s2, Clock())
        self.assertEqual(await net2.address("m2"), "10.80.2.2")
        self.assertEqual((await net2.attach("m3", "a", "h1"))["address"], "10.80.1.3")
        self.assertEqual(await net2.host_subnet("h3"), "10.80.3.0/24")

    async def test_concurrent_attaches_get_distinct_addresses(self):
        net = ClusterNetwork(await self.store(), Clock())
        specs = await gatherResults(
            [ensureDeferred(net.attach(f"m{i}", "a", f"h{i % 3}")) for i in range(30)])
        addrs = [s["address"] for s in specs]
        self.assertEqual(len(set(addrs)), 30)
        for s in specs:
            self.assertIn(ipaddress.IPv4Address(s["address"]), ipaddress.IPv4Network("10.80.0.0/16"))
            self.assertNotEqual(s["address"], s["gateway"])

    async def test_finding_a_free_subnet_does_not_walk_the_taken_ones(self):
        # A host joining a cluster of 200 costs SQLite no more work than one joining a
        # cluster of 20 (SQLite's VM steps, counted every 50: its progress handler); the
        # walk over every subnet taken made 10,000 joining hosts cost minutes of the store's
        # thread.
        s = await self.store()
        net = ClusterNetwork(s, Clock())
        steps = {}
        for i in range(1, 201):
            if i not in (20, 200):
                await net.host_subnet(f"h{i}")
                continue
            counter = []
            await s.run(lambda db, c=counter: db.conn.set_progress_handler(
                lambda: c.append(1), 50))
            self.assertEqual(await net.host_subnet(f"h{i}"), f"10.80.{i}.0/24")
            await s.run(lambda db: db.conn.set_progress_handler(None, 0))
            steps[i] = len(counter)
        # (Counted in units of 50 steps; what does not depend on the hosts, sqlite-utils'
        # look at the schema for its insert, moves both by a unit or so. The walk measured
        # {20: 14, 200: 56}.)
        self.assertLessEqual(steps[200], steps[20] + 5, steps)
        # A subnet freed below the others is the next one given out.
        await net.forget_host("h7")
        self.assertEqual(await net.host_subnet("h-new"), "10.80.7.0/24")
        self.assertEqual(await net.host_subnet("h-newer"), "10.80.201.0/24")

    async def test_exhaustion_is_a_clear_error_and_changes_nothing(self):
        net = ClusterNetwork(await self.store(), Clock(), cidr="10.9.0.0/28", host_prefix=29)
        # /28 in /29s: the first is reserved, one left with 5 guest addresses.
        got = [await net.attach(f"m{i}", "a", "h1") for i in range(5)]
        self.assertEqual(got[-1]["address"], "10.9.0.14")
        with self.assertRaises(errors.ResourceExhausted) as cm:
            await net.attach("m9", "a", "h1")
        self.assertIn("no free address", cm.exception.message)
        with self.assertRaises(errors.ResourceExhausted) as cm:
            await net.attach("m10", "a", "h2")
        self.assertIn("no free /29 subnet", cm.exception.message)
        self.assertEqual(len((await net.view())["members"]), 5)
        await net.forget_host("h1")
        self.assertEqual((await net.attach("m10", "a", "h2"))["address"], "10.9.0.10")

    def test_bad_cidr(self):
        for cidr, prefix, words in (("8.8.0.0/16", 24, "not a private"),
                                    ("10.80.0.0/16", 16, "host subnet prefix"),
                                    ("nonsense", 24, "IPv4 network")):
            with self.assertRaises(errors.InvalidArgument) as cm:
                check_cidr(cidr, prefix)
            self.assertIn(words, cm.exception.message)
