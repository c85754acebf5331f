"""
Removing a host (L{zwrm.control.host_removal}): over the apps layer, a real store and the
agents' real executors (fake hypervisors), as tests/control/test_apps.py builds them.
"""

import os
import sqlite3

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from tests.control.helpers import FACTS
from tests.control.test_apps import Cluster, d
from tests.control.test_healing import poll
from zwrm import errors
from zwrm.control.drain import Drains
from zwrm.control.host_removal import HostRemoval
from zwrm.control.resources.hosts import TOPIC as HOST_TOPIC
from zwrm.control.tokens import ControlPKI

VOLUME = [{"name": "data", "mount": "/data"}]


class HostRemovalTests(TestCase):
    async def cluster(self, hosts=("h-a", "h-b")):
        c = await Cluster(self).start(hosts=hosts)
        c.drains = Drains(c.clock, c.store, c.registry, c.apps, c.publish)
        self.addCleanup(c.drains.stop)
        c.dropped = []
        c.removal = HostRemoval(c.registry, c.apps, c.drains,
                                drop_session=lambda h, why: c.dropped.append((h, why)))
        return c

    async def app_on(self, c, name, host_id, **spec):
        """Deploy C{name} (one replica) and return its machine, which is on C{host_id}."""
        await c.apps.create_app(name)
        others = [h for h in c.registry.host_ids() if h != host_id]
        for h in others:  # place it there: the other hosts are drained meanwhile
            await c.registry.transition(h, "drain_requested")
            await c.registry.transition(h, "drain_finished")
        await c.apps.deploy(name, c.spec(**spec))
        for h in others:
            await c.registry.transition(h, "activate_requested")
        (m,) = await c.machines(name)
        self.assertEqual(m["host_id"], host_id)
        await poll(lambda: self.state_is(c, name, "running"), what=f"{name} running")
        return m

    def refused(self, c, host_id, error=errors.Conflict, **kw):
        """C{c.removal.remove(host_id, **kw)} fails with C{error}. @return: the error."""
        return self.assertFailure(ensureDeferred(c.removal.remove(host_id, **kw)), error)

    async def state_is(self, c, app, state):
        return [m["state"] for m in await c.machines(app)] == [state]

    async def hosts_table(self, c):
        return sorted(r["id"] for r in await c.store.select("hosts"))

    @d
    async def test_a_host_that_is_not_offline_is_refused(self):
        c = await self.cluster()
        e = await self.refused(c, "h-a", errors.Conflict)
        self.assertIn("h-a is ready, not offline", e.message)
        self.assertIn("Drain it (`zwrm host drain`), then stop its agent", e.message)
        await c.registry.transition("h-a", "drain_requested")
        await c.registry.transition("h-a", "drain_finished")
        e = await self.refused(c, "h-a", errors.Conflict)
        self.assertIn("h-a is drained, not offline", e.message)
        self.assertEqual(await self.hosts_table(c), ["h-a", "h-b"])
        self.assertEqual(c.dropped, [])
        await self.refused(c, "h-x", errors.NotFound)

    @d
    async def test_an_offline_host_goes_and_its_replica_is_placed_again(self):
        c = await self.cluster()
        lost = await self.app_on(c, "web", "h-a")
        await c.registry.mark_offline("h-a")
        before = len(c.published)

        result = await c.removal.remove("h-a")

        self.assertEqual(result, {"host_id": "h-a", "volumes_forgotten": [],
                                  "replicas_forgotten": [], "volumes_recovered": [],
                                  "rescheduled": [{"app": "web", "replicas": [0]}],
                                  "not_placed": []})
        self.assertEqual(await self.hosts_table(c), ["h-b"])
        self.assertNotIn("h-a", c.registry)
        self.assertIsNone(c.registry.credential_hash("h-a"))  # its agent is refused
        self.assertEqual([h["id"] for h in await c.registry.list()], ["h-b"])
        self.assertRaises(errors.NotFound, c.apps.placements.scheduler.host, "h-a")
        removed = [e for t, e in c.published[before:] if t == HOST_TOPIC]
        self.assertEqual([(e["kind"], e["subject"], e["payload"]["state"],
                           e["payload"]["old"], e["payload"]["executor"]) for e in removed],
                         [("removed", "h-a", "removed", "offline", False)])
        self.assertEqual(c.dropped, [("h-a", "host removed from the cluster")])
        (m,) = await c.machines("web")
        self.assertEqual(m["host_id"], "h-b")
        self.assertNotEqual(m["id"], lost["id"])
        await poll(lambda: self.state_is(c, "web", "running"), what="the new replica")
        # the id may join again, as a new host
        joined = await c.registry.join("h-a", dict(FACTS, name="h-a"))
        self.assertEqual(joined["host_id"], "h-a")
        self.assertEqual(c.registry.state("h-a"), "ready")

    @d
    async def test_volumes_are_kept_unless_given_up(self):
        c = await self.cluster()
        m = await self.app_on(c, "db", "h-a", volumes=VOLUME)
        (vol,) = await c.apps.list_volumes("db")
        await c.registry.mark_offline("h-a")

        e = await self.refused(c, "h-a", errors.Conflict)
        self.assertIn(f"h-a holds volumes {vol['id']}: their data is only there", e.message)
        self.assertIn("--forget-volumes", e.message)
        self.assertEqual(await self.hosts_table(c), ["h-a", "h-b"])
        self.assertEqual([v["id"] for v in await c.apps.list_volumes("db")], [vol["id"]])
        self.assertEqual([(x["id"], x["state"]) for x in await c.machines("db")],
                         [(m["id"], "failed")])
        self.assertEqual(c.dropped, [])

        result = await c.removal.remove("h-a", forget_volumes=True)
        self.assertEqual(result["volumes_forgotten"], [vol["id"]])
        self.assertEqual(result["rescheduled"], [{"app": "db", "replicas": [0]}])
        self.assertEqual(await self.hosts_table(c), ["h-b"])
        (new,) = await c.apps.list_volumes("db")
        self.assertEqual(new["host_id"], "h-b")
        self.assertNotEqual(new["id"], vol["id"])
        await poll(lambda: self.state_is(c, "db", "running"), what="db on h-b")
        gone = [e for t, e in c.published if e.get("kind") == "volume_destroyed"]
        self.assertEqual([e["subject"] for e in gone], [vol["id"]])
        self.assertIn("h-a was removed", gone[0]["payload"]["reason"])

    @d
    async def test_a_destroy_that_waits_for_its_host_ends_with_its_removal(self):
        """
        The destroy of an app with its volumes waits for a lost host's volume; the host is
        removed with its volumes given up: nothing of the app is placed again (it is
        going), and the destroy's next pass ends it.
        """
        c = await self.cluster()
        await self.app_on(c, "db", "h-a", volumes=VOLUME)
        c.registry.entry("h-a").executor = False
        with self.assertRaises(errors.Unavailable):
            await c.apps.destroy_app("db", volumes=True)
        await c.registry.mark_offline("h-a")
        result = await c.removal.remove("h-a", forget_volumes=True)
        self.assertEqual((result["rescheduled"], result["not_placed"]), ([], []))
        self.assertEqual(await c.apps.list_volumes("db"), [])
        self.assertEqual(await c.apps.go_on_destroying(), ["db"])
        self.assertEqual(await c.apps.list_apps(), [])

    @d
    async def test_one_removal_at_a_time(self):
        c = await self.cluster()
        await c.registry.mark_offline("h-a")
        first = ensureDeferred(c.removal.remove("h-a"))
        e = await self.refused(c, "h-a")
        self.assertEqual(e.message, "host h-a is being removed already")
        self.assertEqual((await first)["host_id"], "h-a")
        await self.refused(c, "h-a", errors.NotFound)

    @d
    async def test_a_machine_recorded_live_there_is_refused(self):
        c = await self.cluster()
        m = await self.app_on(c, "web", "h-a")
        await c.registry.mark_offline("h-a")
        row = await c.apps.data.machines.get(m["id"])
        await c.apps.data.machines.set(row, "a start under way", state="pending")
        e = await self.refused(c, "h-a", errors.Conflict)
        self.assertIn(f"machines {m['id']} (pending) are recorded on host h-a", e.message)
        self.assertEqual(await self.hosts_table(c), ["h-a", "h-b"])

    @d
    async def test_a_drain_under_way_is_refused(self):
        c = await self.cluster()
        await self.app_on(c, "web", "h-a")
        await c.drains.drain("h-a", min_healthy=1, healthy_deadline=30, stop_timeout=5)
        await c.registry.mark_offline("h-a")
        self.assertIn("h-a", c.drains.active)
        e = await self.refused(c, "h-a", errors.Conflict)
        self.assertIn("h-a's drain is under way", e.message)
        self.assertEqual(await self.hosts_table(c), ["h-a", "h-b"])

    @d
    async def test_its_subnet_and_addresses_are_freed(self):
        c = await self.cluster()
        await c.apps.network.configure("10.240.0.0/16")
        m = await self.app_on(c, "web", "h-a")
        net = c.apps.network
        self.assertIsNotNone(await net.address(m["id"]))
        subnets = await c.store.select("net_subnets")
        self.assertIn("h-a", [s["host_id"] for s in subnets])
        await c.registry.mark_offline("h-a")
        await c.removal.remove("h-a")
        self.assertNotIn("h-a", [s["host_id"] for s in await c.store.select("net_subnets")])
        self.assertEqual([a["host_id"] for a in await c.store.select("net_addresses")], ["h-b"])

    @d
    async def test_a_removal_that_cannot_be_stored_changes_nothing(self):
        """
        What goes with a host (the volumes given up, its permission to join again, its
        subnet and addresses) is stored with its row's deletion, in one transaction: a
        removal that cannot be stored (the control plane's disk full; here SQLite refuses
        the host row's deletion, the last of them) leaves every one of them, in the store
        and in memory, and the same removal goes through once it can be stored.
        """
        c = await self.cluster()
        data_dir = self.mktemp()
        os.makedirs(data_dir)
        c.removal._pki = pki = ControlPKI(c.clock, c.store, data_dir)
        await pki.start()
        await c.apps.network.configure("10.240.0.0/16")
        await c.apps.network.load()  # the memory the control plane's views read
        m = await self.app_on(c, "db", "h-a", volumes=VOLUME)
        (vol,) = await c.apps.list_volumes("db")
        await c.registry.mark_offline("h-a")
        await pki.allow_rejoin("h-a")
        net = c.apps.network

        async def seen():
            return (await self.hosts_table(c), "h-a" in c.registry,
                    [v["id"] for v in await c.store.select("volumes")],
                    [r["host_id"] for r in await c.store.select("host_resets")],
                    sorted(s["host_id"] for s in await c.store.select("net_subnets")),
                    sorted(a["host_id"] for a in await c.store.select("net_addresses")),
                    sorted(net.subnets), m["id"] in net.addresses)

        before, published = await seen(), len(c.published)
        self.assertEqual(before, (["h-a", "h-b"], True, [vol["id"]], ["h-a"], ["h-a"], ["h-a"],
                                  ["h-a"], True))
        await c.store.run(lambda db: db.execute(
            "CREATE TRIGGER refuse BEFORE DELETE ON hosts"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        with self.assertRaises(sqlite3.IntegrityError):
            await c.removal.remove("h-a", forget_volumes=True)
        self.assertEqual(await seen(), before)
        self.assertEqual(len(c.published), published)
        self.assertEqual(c.dropped, [])

        await c.store.run(lambda db: db.execute("DROP TRIGGER refuse"))
        result = await c.removal.remove("h-a", forget_volumes=True)
        self.assertEqual(result["volumes_forgotten"], [vol["id"]])
        hosts, known, volumes, resets, subnets, _, in_memory, address = await seen()
        self.assertEqual((hosts, known, resets, in_memory, address),
                         (["h-b"], False, [], ["h-b"], False))
        self.assertNotIn(vol["id"], volumes)
        self.assertNotIn("h-a", subnets)
        kinds = [(e["kind"], e["subject"]) for _, e in c.published[published:]
                 if e.get("kind") in ("volume_destroyed", "removed")]
        self.assertEqual(kinds, [("volume_destroyed", vol["id"]), ("removed", "h-a")])
