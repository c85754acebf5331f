"""
The cluster network view pushed to agents (L{zwrm.control.network.ViewPublisher}): kept in
memory from events, each host sent only what changed for it, one call in flight per host,
bursts coalesced.  Real store, host registry and IPAM; the agents' C{network.update} is a
recorder.
"""

import copy

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.control.helpers import FACTS, make_registry
from zwrm import errors
from zwrm.control.network import ClusterNetwork, ViewPublisher, check_publish

HOSTS = ("h-a", "h-b", "h-c")


class ViewHelpers:
    """A store, a registry of three hosts, the IPAM and a publisher whose calls are kept."""

    async def start(self, serves_ingress=None, hosts=HOSTS):
        self.clock, self.store, self.registry, _ = await make_registry(self)
        for i, host_id in enumerate(hosts):
            facts = dict(FACTS, name=host_id, address=f"192.0.2.{i + 1}")
            await self.registry.join(host_id, facts)
            await self.registry.register(host_id, facts)
        self.data = self.registry.data
        self.network = ClusterNetwork(self.store, self.clock)
        self.calls = []
        self.answers = {}  # host id -> Deferred its next call returns (else answered at once)
        self.view = ViewPublisher(self.clock, self.network, self.data, self.call,
                                  serves_ingress=serves_ingress)
        self.addCleanup(self.view.close)
        self.finds = 0
        find = self.data.machines.find

        def counting(*a, **kw):
            self.finds += 1
            return find(*a, **kw)

        self.data.machines.find = counting
        self.rows = {}

    def call(self, host_id, verb, view):
        self.calls.append((host_id, verb, copy.deepcopy(view)))
        return self.answers.pop(host_id, None) or defer.succeed({"members": 0})

    async def settle(self):
        """Run the publisher's pushes (due now or after its pause) until it is idle."""
        for _ in range(50):
            self.clock.advance(10)
            if self.view._pushing is not None:
                await self.view._pushing
            if not self.view.busy():
                return
        self.fail("the view publisher never went idle")

    async def add(self, mid, app, host_id, state="running", publish=(), health="passing",
                  domain=None):
        await self.network.attach(mid, f"a-{app}", host_id,
                                  open_ports=[p["guest_port"] for p in publish])
        spec = {"id": mid, "app": app, "replica": len([r for r in self.rows.values()
                                                       if r["spec"]["app"] == app]),
                "app_spec": {"publish": list(publish), "domain": domain}}
        row = {"id": mid, "app_id": f"a-{app}", "host_id": host_id, "state": state,
               "spec": spec, "health": {"status": health}, "created_at": 0,
               "updated_at": 0}
        self.rows[mid] = row
        await self.data.machines.add(row, "placed")

    def sent(self):
        out = {}
        for host_id, verb, view in self.calls:
            self.assertEqual(verb, "network.update")
            out.setdefault(host_id, []).append(view)
        self.calls = []
        return out

    @staticmethod
    def members(view):
        return sorted(m["machine_id"] for m in view["members"])


class ViewTests(ViewHelpers, TestCase):

    async def test_first_push_and_what_each_host_needs(self):
        await self.start()
        await self.add("m-w1", "web", "h-a")
        await self.add("m-w2", "web", "h-b")
        await self.add("m-d1", "db", "h-c")
        await self.settle()
        sent = self.sent()
        self.assertEqual(sorted(sent), list(HOSTS))
        self.assertEqual([len(v) for v in sent.values()], [1, 1, 1])
        self.assertEqual(self.members(sent["h-a"][0]), ["m-w1", "m-w2"])
        self.assertEqual(self.members(sent["h-b"][0]), ["m-w1", "m-w2"])
        self.assertEqual(self.members(sent["h-c"][0]), ["m-d1"])
        hosts = sent["h-a"][0]["hosts"]
        self.assertEqual([(h["host_id"], h["address"]) for h in hosts],
                         [("h-a", "192.0.2.1"), ("h-b", "192.0.2.2"), ("h-c", "192.0.2.3")])
        self.assertEqual([h["gateway"] for h in hosts], ["10.80.1.1", "10.80.2.1", "10.80.3.1"])
        member = [m for m in sent["h-a"][0]["members"] if m["machine_id"] == "m-w1"][0]
        self.assertEqual(member, {"machine_id": "m-w1", "app": "web", "replica": 0,
                                  "address": "10.80.1.2", "host_id": "h-a", "healthy": True,
                                  "open_ports": []})
        # The whole cluster's view, for operators and tests.
        whole = await self.view.view()
        self.assertEqual(self.members(whole), ["m-d1", "m-w1", "m-w2"])

    async def test_hosts_without_subnets_are_given_them_in_one_pass(self):
        """
        Hosts with an address and no subnet (every host when the cluster network is first
        set on a running cluster) get theirs in host id order, the set of them walked once
        per pass, not once per host (which cost minutes of CPU at 20,000 hosts).
        """
        hosts = tuple(f"h-{i:03d}" for i in range(200))
        await self.start(hosts=hosts)
        visits = [0]

        class Counting(set):
            def __iter__(self):
                for host_id in set.__iter__(self):
                    visits[0] += 1
                    yield host_id

        self.view._needs_subnet = Counting(self.view._needs_subnet)
        await self.add("m-w1", "web", "h-199")  # a first event: the first push
        await self.settle()
        sent = self.sent()
        self.assertEqual(sorted(sent), list(hosts))
        # h-199's machine gave it the first subnet; the others follow in host id order
        self.assertEqual([h["gateway"] for h in sent["h-000"][-1]["hosts"]],
                         [f"10.80.{i + 2}.1" for i in range(199)] + ["10.80.1.1"])
        self.assertLessEqual(visits[0], 3 * len(hosts))

    async def test_a_change_goes_only_to_the_hosts_that_need_it_from_memory(self):
        await self.start()
        await self.add("m-w1", "web", "h-a")
        await self.add("m-w2", "web", "h-b")
        await self.add("m-d1", "db", "h-c")
        await self.settle()
        self.sent()
        finds = self.finds
        await self.data.machines.set(self.rows["m-w1"], "crashed", state="failed")
        await self.settle()
        sent = self.sent()
        self.assertEqual(sorted(sent), ["h-a", "h-b"])  # h-c runs no web machine
        self.assertEqual(self.members(sent["h-b"][0]), ["m-w2"])
        self.assertEqual(self.finds, finds)  # a known machine's event: no store read
        # A health change (the same members) is sent too: DNS answers healthy ones only.
        await self.data.machines.set(self.rows["m-w2"], "health", health={"status": "failing"})
        await self.settle()
        sent = self.sent()
        self.assertEqual(sorted(sent), ["h-b"])  # h-a has no web machine left
        self.assertFalse(sent["h-b"][0]["members"][0]["healthy"])
        # A state change agents do not see (no address change, still unhealthy): nothing.
        await self.data.machines.set(self.rows["m-w2"], "stopping", state="stopping")
        await self.settle()
        self.assertEqual(self.sent(), {})
        # Gone: its address released, its row deleted; h-b keeps web's last member (none).
        await self.data.machines.delete(self.rows["m-w2"])
        await self.network.release("m-w2")
        await self.settle()
        sent = self.sent()
        self.assertEqual(sorted(sent), ["h-b"])
        self.assertEqual(sent["h-b"][0]["members"], [])

    async def test_published_app_everywhere_routes_only_on_ingress_hosts(self):
        await self.start(serves_ingress=lambda entry: entry.record["id"] != "h-c")
        await self.add("m-d1", "db", "h-c")
        await self.settle()
        self.sent()
        await self.add("m-w1", "web", "h-a", publish=[{"port": 80, "guest_port": 8080,
                                                       "mode": "tcp"}])
        await self.settle()
        sent = self.sent()
        self.assertEqual(sorted(sent), list(HOSTS))  # an open port: every host needs it
        self.assertEqual(self.members(sent["h-c"][0]), ["m-d1", "m-w1"])
        self.assertEqual(sent["h-c"][0]["published"], {})  # not an ingress host
        route = sent["h-b"][0]["published"]["80"]
        self.assertEqual(route, {"mode": "tcp", "routes": {"": [
            {"key": "m-w1", "host": "10.80.2.2", "port": 8080, "healthy": True}]}})

    async def test_a_change_is_sent_while_an_earlier_call_is_unanswered(self):
        await self.start(hosts=("h-a",))
        await self.add("m-w1", "web", "h-a")
        slow = self.answers["h-a"] = defer.Deferred()
        await self.settle_without_waiting_for_answers()
        self.assertEqual(len(self.sent()["h-a"]), 1)
        await self.add("m-w2", "web", "h-a")
        await self.data.machines.set(self.rows["m-w1"], "crashed", state="failed")
        await self.settle_without_waiting_for_answers()
        sent = self.sent()  # not held back behind the unanswered call: the latest view
        self.assertEqual(self.members(sent["h-a"][-1]), ["m-w2"])
        self.assertTrue(self.view.busy())
        slow.callback(None)
        await self.settle()
        self.assertFalse(self.view.busy())

    async def test_nothing_is_scheduled_once_closed(self):
        """
        A view answered after the publisher closed (the control plane stopping), with an
        answer that asks for the whole list again, schedules no push: nothing is left on
        the clock.
        """
        await self.start(hosts=("h-a",))
        await self.add("m-w1", "web", "h-a")
        await self.settle()
        self.sent()
        late = self.answers["h-a"] = defer.Deferred()
        await self.add("m-w2", "web", "h-a")
        await self.settle_without_waiting_for_answers()
        self.assertEqual(len(self.sent()["h-a"]), 1)
        self.view.close()
        late.errback(errors.StaleView("the view is of another list"))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.flushLoggedErrors()

    async def settle_without_waiting_for_answers(self):
        for _ in range(50):
            self.clock.advance(10)
            if self.view._pushing is not None:
                await self.view._pushing
            if not (self.view._pending is not None and self.view._pending.active()):
                return

    async def test_bursts_are_coalesced(self):
        await self.start()
        await self.add("m-w1", "web", "h-a")
        await self.add("m-w0", "web", "h-b")  # h-b's subnet (a new one changes every view)
        await self.settle()
        self.sent()
        # Several changes before the reactor turns: one view per host.
        rows = [dict(self.rows["m-w1"], id=f"m-x{i}", host_id="h-b") for i in range(5)]
        for i, row in enumerate(rows):
            await self.network.attach(row["id"], "a-web", "h-b")
            row["spec"] = dict(row["spec"], replica=i + 2)
        await defer.gatherResults([defer.ensureDeferred(self.data.machines.add(r, "placed"))
                                   for r in rows])
        await self.settle()
        sent = self.sent()
        self.assertEqual({h: len(v) for h, v in sent.items()}, {"h-a": 1, "h-b": 1})
        self.assertEqual(len(sent["h-a"][0]["members"]), 7)
        # After a push, the next one waits pause_ratio times what it took.
        self.view.pause_ratio = 1e9
        await self.data.machines.set(self.rows["m-w1"], "crashed", state="failed")
        self.clock.advance(0)
        self.assertIsNone(self.view._pushing)
        self.assertEqual(self.sent(), {})
        self.view._pending.cancel()
        self.view.pause_ratio = 4
        self.view._next_at = 0
        self.view._soon()
        await self.settle()
        self.assertEqual(sorted(self.sent()), ["h-a", "h-b"])

    async def test_a_removed_host_leaves_every_hosts_list(self):
        """
        A host removed from the cluster (C{zwrm host remove}: its row, then its subnet) is
        dropped from the hosts list of every other host, whose overlay forgets it; nothing
        more is sent to it.  Its removal event alone does it, and its subnet's release too.
        """
        await self.start()
        await self.add("m-w1", "web", "h-a")
        await self.add("m-w2", "web", "h-c")
        await self.settle()
        self.sent()
        for forget_subnet in (False, True):
            await self.registry.mark_offline("h-c")
            await self.data.hosts.remove("h-c", "removed by an operator")
            if forget_subnet:
                await self.network.forget_host("h-c")
            await self.settle()
            sent = self.sent()
            self.assertEqual(sorted(sent), ["h-a", "h-b"])
            for views in sent.values():
                self.assertEqual([h["host_id"] for h in views[-1]["hosts"]], ["h-a", "h-b"])
            # it joins again, as a new host: back in every list
            facts = dict(FACTS, name="h-c", address="192.0.2.3")
            await self.registry.join("h-c", facts)
            await self.registry.register("h-c", facts)
            await self.settle()
            sent = self.sent()
            self.assertEqual(sorted(sent), list(HOSTS))
            self.assertEqual([h["host_id"] for h in sent["h-a"][-1]["hosts"]], list(HOSTS))

    async def test_a_host_that_registers_again_gets_its_view(self):
        await self.start()
        await self.add("m-w1", "web", "h-a")
        await self.settle()
        self.sent()
        await self.registry.mark_offline("h-c")
        await self.settle()
        self.assertEqual(self.sent(), {})  # no executor: nothing sent
        await self.registry.register("h-c", dict(FACTS, name="h-c", address="192.0.2.3"))
        await self.settle()
        sent = self.sent()
        self.assertEqual(sorted(sent), ["h-c"])
        self.assertEqual(len(sent["h-c"][0]["hosts"]), 3)

    async def test_https_routes_by_domain(self):
        await self.start()
        # (with capitals, as a spec stored before domains were checked may have: the
        # ingress compares a request's Host in lower case)
        await self.add("m-w1", "web", "h-a", domain="Shop.Example.com",
                       publish=check_publish(["443:8080/https"], "shop.example.com"))
        await self.settle()
        route = self.sent()["h-b"][0]["published"]["443"]
        self.assertEqual(route["mode"], "https")
        self.assertEqual(list(route["routes"]), ["shop.example.com"])


class PublishTests(SynchronousTestCase):
    def test_https_needs_a_domain(self):
        self.assertEqual(check_publish(["443:8080/https"], "shop.example.com"),
                         [{"port": 443, "guest_port": 8080, "mode": "https"}])
        with self.assertRaises(errors.InvalidArgument) as cm:
            check_publish(["443:8080/https"])
        self.assertIn("443/https needs a domain", cm.exception.message)
        with self.assertRaises(errors.InvalidArgument) as cm:
            check_publish(["443/tls"], "shop.example.com")
        self.assertIn("tcp or http", cm.exception.message)
