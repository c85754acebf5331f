"""
The control plane's side of the cluster network, over the apps layer with real executors
(the apps tests' cluster: real store, registry, executors with the fake driver):
addresses at placement, released with the machine, the view pushed to agents, and the
published-port checks.
"""

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.control.test_apps import Cluster
from zwrm import errors
from zwrm.control.appspec import validate_spec
from zwrm.control.network import check_domain, check_publish


class PublishSpecTests(SynchronousTestCase):
    def test_forms(self):
        self.assertEqual(check_publish(["80:8080/http", "5432"]), [
            {"port": 80, "guest_port": 8080, "mode": "http"},
            {"port": 5432, "guest_port": 5432, "mode": "tcp"}])
        self.assertEqual(check_publish(None), [])

    def test_bad(self):
        for bad, words in ((["x"], "port"), (["80/udp"], "tcp or http"),
                           (["80", "80:81"], "twice"), (["70000"], "port"), ("80", "list")):
            with self.assertRaises(errors.InvalidArgument) as cm:
                check_publish(bad)
            self.assertIn(words, cm.exception.message)
        for domain in ("a b", "", "-5", "a=b=c", "x" * 300, "nan.", "*.example.com",
                       "shop..example.com", "shop_1.example.com", 7):
            with self.assertRaises(errors.InvalidArgument) as cm:
                check_publish(["80/http"], domain=domain)
            self.assertEqual((cm.exception.message, cm.exception.kwargs), (
                f"domain must be one DNS name such as shop.example.com (the Host its requests"
                f" name), not {domain!r}", {"argument": "domain"}))

    def test_a_domain_is_stored_in_lower_case(self):
        """
        The ingress compares a request's Host in lower case: a domain with capitals was
        stored as given, and its requests found no route (404).
        """
        spec = validate_spec({"image": "demo:1", "publish": ["80:8080/http"],
                              "domain": "Shop.Example.COM"})
        self.assertEqual(spec["domain"], "shop.example.com")
        self.assertEqual(check_domain("xn--bcher-kva.example"), "xn--bcher-kva.example")


class WiringTests(TestCase):
    async def test_addresses_view_and_release(self):
        c = await Cluster(self).start()
        await c.apps.create_app("web")
        await c.apps.deploy("web", c.spec(replicas=2, service_port=8080,
                                          publish=["80:8080/http"], domain="web.example",
                                          shutdown_delay=0))  # destroyed at once (a Clock)
        rows = await c.store.select("machines")
        nets = sorted(r["spec"]["network"]["address"] for r in rows)
        self.assertEqual(nets, ["10.80.1.2", "10.80.2.2"])
        self.assertTrue(all(r["spec"]["network"]["open_ports"] == [8080] for r in rows))
        # The machines' wire forms (zwrm.app.status, zwrm.machine.list) carry it.
        status = await c.apps.app_status("web")
        self.assertEqual(sorted(m["address"] for m in status["machines"]), nets)
        # The view every agent gets.
        view = await c.apps.network_view.view()
        self.assertEqual(sorted(h["address"] for h in view["hosts"]), ["10.0.0.1", "10.0.0.1"])
        self.assertEqual(sorted(m["address"] for m in view["members"]), nets)
        self.assertEqual(list(view["published"]), ["80"])
        route = view["published"]["80"]
        self.assertEqual(route["mode"], "http")
        self.assertEqual(sorted(b["host"] for b in route["routes"]["web.example"]), nets)
        # Machine events make the publisher push it (once per reactor turn).
        c.clock.advance(0)
        for _ in range(50):
            if c.apps.network_view.pushes:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertGreater(c.apps.network_view.pushes, 0)
        self.assertIn(("h-a", "network.update"), c.calls)
        # Destroyed: its address is free again.
        await c.apps.destroy_app("web")
        self.assertEqual((await c.apps.network.view())["members"], [])


class StatusShowsTheAddressTests(SynchronousTestCase):
    def test_app_status_table(self):
        import io

        from zwrm.cli.apps import format_app

        out = io.StringIO()
        format_app({"id": "a-1", "name": "web", "spec": {"image": "demo:1", "replicas": 2},
                    "volumes": [], "machines": [
                        {"id": "m-1", "replica": 0, "host_id": "h-a", "state": "running",
                         "health": "passing", "host_port": 41000, "address": "10.80.1.2"},
                        {"id": "m-2", "replica": 1, "host_id": "h-b", "state": "running",
                         "health": "passing", "host_port": 41001, "address": None}]}, out)
        lines = out.getvalue().splitlines()
        header = next(line for line in lines if line.startswith("ID"))
        self.assertIn("ADDRESS", header.split())
        row = next(line for line in lines if line.startswith("m-1"))
        self.assertEqual(row.split()[header.split().index("ADDRESS")], "10.80.1.2")
        row = next(line for line in lines if line.startswith("m-2"))
        self.assertEqual(row.split()[header.split().index("ADDRESS")], "-")
