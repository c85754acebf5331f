"""
A host's subnet stays reserved while a machine holds an address of it (issue 18): a
machine moved live keeps its address, which lies in its first host's subnet; when that host
is forgotten the subnet must not be given to another host (whose bridge would take the
moved guest's gateway, and whose machines would share its subnet) until the last such
address is released.
"""

from twisted.trial.unittest import TestCase

from tests.control.test_network_view import ViewHelpers
from zwrm.control.network import RESERVED, ClusterNetwork


class ReservedSubnetTests(ViewHelpers, TestCase):
    async def subnets(self):
        return {r["id"]: r["host_id"] for r in await self.store.select("net_subnets")}

    async def moved_away(self, net):
        """m-1 gets an address on h-a, then moves live to h-b (as m-2) keeping it."""
        spec = await net.attach("m-1", "a-web", "h-a")
        self.assertEqual(spec["address"], "10.80.1.2")
        self.assertEqual(await net.host_subnet("h-b"), "10.80.2.0/24")
        self.assertEqual(await net.move_address("m-1", "m-2", "h-b"), "10.80.1.2")

    async def test_a_subnet_with_a_moved_address_is_not_given_to_another_host(self):
        await self.start()
        net = ClusterNetwork(self.store, self.clock)
        await net.load()
        await self.moved_away(net)
        await net.forget_host("h-a")
        self.assertEqual(await self.subnets(), {"10.80.1.0/24": RESERVED + "h-a",
                                                "10.80.2.0/24": "h-b"})
        # Another host gets another subnet; the moved machine keeps its address.
        self.assertEqual(await net.host_subnet("h-c"), "10.80.3.0/24")
        other = await net.attach("m-3", "a-web", "h-c")
        self.assertEqual((other["address"], other["gateway"]), ("10.80.3.2", "10.80.3.1"))
        self.assertEqual(await net.address("m-2"), "10.80.1.2")
        # Neither the view nor the in-memory index lists the reservation as a host's.
        view = await net.view()
        self.assertEqual([h["host_id"] for h in view["hosts"]], ["h-b", "h-c"])
        self.assertNotIn(RESERVED + "h-a", net.subnets)
        again = ClusterNetwork(self.store, self.clock)
        await again.load()
        self.assertEqual(again.subnets, {"h-b": "10.80.2.0/24", "h-c": "10.80.3.0/24"})
        # The moved machine is deleted: its address goes, and the reservation with it.
        await net.release("m-2")
        self.assertEqual(await self.subnets(), {"10.80.2.0/24": "h-b",
                                                "10.80.3.0/24": "h-c"})
        self.assertEqual(await net.host_subnet("h-d"), "10.80.1.0/24")

    async def test_forgetting_the_host_it_moved_to_frees_the_reservation(self):
        await self.start()
        net = ClusterNetwork(self.store, self.clock)
        await self.moved_away(net)
        await net.forget_host("h-a")
        await net.forget_host("h-b")
        self.assertEqual(await self.subnets(), {})
        self.assertEqual(await net.host_subnet("h-c"), "10.80.1.0/24")

    async def test_a_subnet_without_moved_addresses_is_freed_with_its_host(self):
        await self.start()
        net = ClusterNetwork(self.store, self.clock)
        await net.attach("m-1", "a-web", "h-a")
        await net.attach("m-2", "a-web", "h-b")
        await net.forget_host("h-a")
        self.assertEqual(await self.subnets(), {"10.80.2.0/24": "h-b"})
        self.assertEqual(await net.host_subnet("h-c"), "10.80.1.0/24")
