"""
C{zwrm.drain.list} (issue 21 item 1, the console's drains view): every drain, newest first,
the ones under way and the finished ones, with its host, state, host state and migrations
by phase, so a client need not call C{zwrm.host.drain_status} per host.  Read-only.
"""

from twisted.trial.unittest import TestCase

from tests.control.test_apps import d
from tests.control.test_drain import DrainCluster
from zwrm import errors


class DrainListTests(TestCase):
    timeout = 120

    @d
    async def test_current_and_recent_drains(self):
        c = await DrainCluster(self).start()
        self.assertEqual(await c.drains.list_drains(), [])
        await c.apps.create_app("web")
        (m,) = (await c.apps.deploy("web", c.spec()))["machines"]
        src = m["host_id"]
        dst = "h-b" if src == "h-a" else "h-a"
        first = await c.drains.drain(src, min_healthy=2, healthy_deadline=30, stop_timeout=5)
        await c.settle(c.drains.active[src].done)
        await c.drains.activate(src)
        # a second drain, of the machine's new host, still under way
        second = await c.drains.drain(dst, min_healthy=2, healthy_deadline=30, stop_timeout=5)
        drains = await c.drains.list_drains()
        self.assertEqual([(x["drain_id"], x["host_id"]) for x in drains],
                         [(second["drain_id"], dst), (first["drain_id"], src)])
        now, done = drains
        self.assertEqual((now["state"], now["host_state"], now["total"]),
                         ("running", "draining", 1))
        self.assertEqual(sum(now["migrations"].values()), 1)
        self.assertNotIn("done", now["migrations"])
        self.assertEqual((done["state"], done["host_state"], done["migrations"], done["total"]),
                         ("completed", "ready", {"done": 1}, 1))
        self.assertEqual([x["drain_id"] for x in await c.drains.list_drains(limit=1)],
                         [second["drain_id"]])
        await c.settle(c.drains.active[dst].done)
        self.assertEqual((await c.drains.list_drains())[0]["migrations"], {"done": 1})

    @d
    async def test_bad_limit(self):
        c = await DrainCluster(self).start()
        for bad in (0, 1001, "5", True):
            with self.assertRaises(errors.InvalidArgument) as cm:
                await c.drains.list_drains(limit=bad)
            self.assertIn("limit", cm.exception.message)
