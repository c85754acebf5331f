"""Names, addresses and the network spec check (pure functions)."""

from twisted.trial.unittest import SynchronousTestCase

from zwrm.agent.network import addressing
from zwrm.agent.network.host import check_network
from zwrm.errors import InvalidArgument

NET = {"address": "10.80.3.7", "prefix": 16, "gateway": "10.80.3.1", "dns": "10.80.3.1",
       "mtu": 1450, "hostname": "web-0", "domain": "zwrm.internal"}


class AddressingTests(SynchronousTestCase):
    def test_tap_names_fit_linux(self):
        names = {addressing.tap_name(f"m-{i}" * 10) for i in range(100)}
        self.assertEqual(len(names), 100)
        self.assertTrue(all(len(n) <= 15 and n.startswith("zt") for n in names))

    def test_mac_from_address(self):
        self.assertEqual(addressing.mac_for("10.80.3.7"), "0a:58:0a:50:03:07")

    def test_kernel_ip_arg(self):
        self.assertEqual(addressing.kernel_ip_arg(NET),
                         "ip=10.80.3.7::10.80.3.1:255.255.0.0:web-0:eth0:off:10.80.3.1 "
                         "zwrm.mtu=1450")

    def test_cloud_init_network_config(self):
        cfg = addressing.cloud_init_network_config(NET)
        eth = cfg["ethernets"]["eth0"]
        self.assertEqual(cfg["version"], 2)
        self.assertEqual(eth["match"], {"macaddress": "0a:58:0a:50:03:07"})
        self.assertEqual(eth["addresses"], ["10.80.3.7/16"])
        self.assertEqual(eth["gateway4"], "10.80.3.1")
        self.assertNotIn("routes", eth)
        self.assertEqual(eth["nameservers"], {"addresses": ["10.80.3.1"],
                                              "search": ["zwrm.internal"]})
        self.assertEqual(eth["mtu"], 1450)

    def test_app_marks(self):
        self.assertEqual(addressing.app_mark("web"), addressing.app_mark("web"))
        self.assertNotEqual(addressing.app_mark("web"), addressing.app_mark("db"))
        self.assertGreater(addressing.app_mark("x"), 0)

    def test_check_network(self):
        self.assertEqual(check_network(NET)["open_ports"], [])
        for bad, words in (({"address": "10.81.0.1"}, "is not in 10.80.0.0/16"),
                           ({"address": "nope"}, "network address"),
                           ({"prefix": 40}, "prefix"), ({"mtu": 70000}, "mtu"),
                           ({"hostname": "a b"}, "hostname"),
                           ({"open_ports": [0]}, "open_ports")):
            with self.assertRaises(InvalidArgument) as cm:
                check_network(dict(NET, **bad))
            self.assertIn(words, cm.exception.message)
