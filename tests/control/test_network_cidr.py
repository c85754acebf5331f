"""
The cluster CIDR setting (C{[network] cidr}, C{--cluster-cidr}) and edge hosts (issue 16):
the setting is checked at start-up (a private /8-/20 IPv4 network), recorded in the store,
and a change while addresses are allocated is refused, changing nothing; only hosts
labelled C{edge=true} serve published ports once one is, else every host does.
"""

import os

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.control.helpers import FACTS
from tests.control.test_network_view import ViewHelpers
from zwrm import errors
from zwrm.control.network import ClusterNetwork, check_cluster_cidr
from zwrm.control.tap import Options
from zwrm.testing.processes import temp_dir

PUBLISH = [{"port": 80, "guest_port": 8080, "mode": "tcp"}]


class SettingTests(SynchronousTestCase):
    def parse(self, *argv):
        o = Options()
        o.parseOptions(list(argv))
        return o.config

    def test_file_and_flag(self):
        path = os.path.join(temp_dir(self), "control.toml")
        with open(path, "w") as f:
            f.write('[network]\ncidr = "10.64.0.0/12"\n')
        self.assertEqual(self.parse().network_cidr, "10.80.0.0/16")
        self.assertEqual(self.parse("--config", path).network_cidr, "10.64.0.0/12")
        self.assertEqual(self.parse("--config", path, "--cluster-cidr", "172.20.0.0/16")
                         .network_cidr, "172.20.0.0/16")

    def test_bad_values_are_one_readable_line(self):
        for value, words in (("8.8.0.0/16", "not a private"), ("10.0.0.0/22", "/8 to /20"),
                             ("10.0.0.1/16", "IPv4 network"), ("fd00::/48", "IPv4 network"),
                             ("10.0.0.0/7", "private"), ("nonsense", "IPv4 network")):
            e = self.assertRaises(usage.UsageError, self.parse, "--cluster-cidr", value)
            self.assertIn("[network] cidr", str(e))
            self.assertIn(words, str(e))
            self.assertNotIn("Traceback", str(e))

    def test_check(self):
        self.assertEqual(str(check_cluster_cidr("192.168.0.0/20")), "192.168.0.0/20")
        self.assertEqual(str(check_cluster_cidr("10.0.0.0/8")), "10.0.0.0/8")


class ConfigureTests(ViewHelpers, TestCase):
    async def test_recorded_and_a_change_under_use_is_refused(self):
        await self.start()
        net = ClusterNetwork(self.store, self.clock)
        await net.configure("10.90.0.0/16")
        self.assertEqual(str(net.cidr), "10.90.0.0/16")
        spec = await net.attach("m-1", "a-web", "h-a")
        self.assertEqual(spec["address"], "10.90.1.2")
        self.assertEqual(spec["prefix"], 16)
        # A restart with the same setting is fine.
        again = ClusterNetwork(self.store, self.clock)
        await again.configure("10.90.0.0/16")
        # Another network while addresses are allocated: refused, nothing changes.
        other = ClusterNetwork(self.store, self.clock)
        with self.assertRaises(errors.Conflict) as cm:
            await other.configure("10.64.0.0/12")
        self.assertIn("10.90.0.0/16", cm.exception.message)
        self.assertIn("1 host subnets and 1 machine addresses", cm.exception.message)
        rows = await self.store.select("net_cluster")
        self.assertEqual([r["cidr"] for r in rows], ["10.90.0.0/16"])
        with self.assertRaises(errors.InvalidArgument):
            await other.configure("10.64.0.0/24")
        # Once every address is released (the hosts left), it may change.
        await net.forget_host("h-a")
        await other.configure("10.64.0.0/12")
        self.assertEqual((await other.attach("m-2", "a-web", "h-b"))["address"], "10.64.1.2")

    async def test_subnets_from_before_the_setting_are_the_default_networks(self):
        await self.start()
        net = ClusterNetwork(self.store, self.clock)  # not configured: the default
        await net.attach("m-1", "a-web", "h-a")
        with self.assertRaises(errors.Conflict) as cm:
            await ClusterNetwork(self.store, self.clock).configure("10.64.0.0/12")
        self.assertIn("10.80.0.0/16", cm.exception.message)
        await ClusterNetwork(self.store, self.clock).configure("10.80.0.0/16")


class EdgeTests(ViewHelpers, TestCase):
    async def start_labelled(self, edges):
        await self.start()
        for host_id in edges:
            facts = dict(FACTS, name=host_id, labels={"edge": "true"},
                         address=f"192.0.2.{'abc'.index(host_id[-1]) + 1}")
            await self.registry.register(host_id, facts)

    async def test_every_host_serves_published_ports_while_none_is_edge(self):
        await self.start_labelled([])
        await self.add("m-w1", "web", "h-a", publish=PUBLISH)
        await self.settle()
        sent = self.sent()
        self.assertEqual(sorted(h for h, v in sent.items() if v[-1]["published"]),
                         ["h-a", "h-b", "h-c"])

    async def test_only_edge_hosts_serve_published_ports(self):
        await self.start_labelled(["h-b"])
        await self.add("m-w1", "web", "h-a", publish=PUBLISH)
        await self.settle()
        sent = self.sent()
        self.assertEqual(sorted(h for h, v in sent.items() if v[-1]["published"]), ["h-b"])
        # every host still gets the app's members (open ports, DNS)
        self.assertEqual(self.members(sent["h-c"][-1]), ["m-w1"])
        # h-c labelled edge too (its agent restarted with the label): both serve them
        await self.registry.register("h-c", dict(FACTS, name="h-c", address="192.0.2.3",
                                                 labels={"edge": "true"}))
        await self.settle()
        sent = self.sent()
        self.assertEqual(sorted(h for h, v in sent.items() if v[-1]["published"]),
                         ["h-b", "h-c"])

