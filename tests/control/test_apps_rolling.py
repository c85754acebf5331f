"""
Rolling updates (a spec's C{update}): replicas are replaced C{max_parallel} at a time, each
new machine healthy for C{min_healthy_time} before the old one goes; a failed update is
reverted (C{auto_revert}) and the old machines never stopped.

Time is the control side's L{task.Clock} (what C{min_healthy_time} counts); the executors
run the fake driver on the real reactor.
"""

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from tests.control.test_apps import Cluster, d
from tests.control.test_healing import poll
from zwrm import errors
from zwrm.control.apps import validate_spec


class RollingTests(TestCase):
    async def cluster(self):
        c = await Cluster(self).start()
        await c.apps.create_app("web")
        await c.apps.deploy("web", c.spec(replicas=2))
        return c

    async def rows(self, c):
        return await c.store.select("machines", "app_id = (SELECT id FROM apps WHERE name = ?)",
                                    ["web"])

    @d
    async def test_one_at_a_time_never_below_the_count(self):
        c = await self.cluster()
        old = {m["id"] for m in await c.machines("web")}
        done = ensureDeferred(c.apps.deploy(
            "web", {"memory_mb": 300, "update": {"min_healthy_time": 10}}))
        running_seen = []

        async def new_running(n):
            ms = await c.machines("web")
            running_seen.append(sum(1 for m in ms if m["state"] == "running"))
            fresh = [m for m in ms if m["id"] not in old and m["state"] == "running"]
            return len(fresh) == n

        await poll(lambda: new_running(1), what="the first new machine")
        self.assertEqual(len(await c.machines("web")), 3)  # one more, not one less
        self.assertFalse(done.called)
        c.clock.advance(10)
        await poll(lambda: new_running(2), what="the second new machine")
        c.clock.advance(10)
        status = await done
        self.assertEqual(len(status["machines"]), 2)
        self.assertTrue(all(m["id"] not in old for m in status["machines"]))
        self.assertEqual(status["spec"]["memory_mb"], 300)
        self.assertGreaterEqual(min(running_seen), 2)

    @d
    async def test_failed_update_is_reverted(self):
        c = await self.cluster()
        before = await c.apps.app_status("web")
        bad = dict(c.spec()["image"], kernel=c.kernel + ".missing")
        with self.assertRaises(errors.Unavailable) as cm:
            await c.apps.deploy("web", {"image": bad, "update": {"min_healthy_time": 1}})
        self.assertIn("reverted", cm.exception.message)
        after = await c.apps.app_status("web")
        self.assertEqual([(m["id"], m["state"]) for m in after["machines"]],
                         [(m["id"], "running") for m in before["machines"]])
        self.assertEqual(after["spec"]["image"], before["spec"]["image"])
        self.assertEqual(after["spec_version"], before["spec_version"] + 2)

    def test_update_settings_are_checked(self):
        for bad, word in [({"max_parallel": 0}, "max_parallel"),
                          ({"min_healthy_time": -1}, "min_healthy_time"),
                          ({"auto_revert": "yes"}, "auto_revert"), ({"x": 1}, "x")]:
            e = self.assertRaises(errors.InvalidArgument, validate_spec,
                                  {"image": "x:1", "update": bad})
            self.assertIn(word, e.message)
