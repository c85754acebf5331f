"""
A drain follows a volume copy's progress from what the source agent announces (progressive
results of C{volume.send}), without calling C{volume.progress}; an agent from before the
announcements is read with C{volume.progress} after L{PROGRESS_FALLBACK_AFTER} seconds.
Real executors, volume stores and volume streams; the control plane's time on a Clock.
"""

from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.control import test_drain
from tests.control.test_apps import d
from tests.control.test_drain import DrainCluster
from zwrm.control.drain import PROGRESS_FALLBACK_AFTER


class WatchingCluster(DrainCluster):
    """
    L{DrainCluster} that records, after the drain handled each announcement, what the
    announcement said and what the migration's row then held.
    """

    def __init__(self, testcase):
        DrainCluster.__init__(self, testcase)
        self.seen = []  # (announced progress, migration's bytes_sent, detail's bytes_done)

    def call(self, procedure, *args, options=None, **kwargs):
        if options is not None and options.on_progress is not None:
            handler = options.on_progress

            def watched(p):
                handler(p)
                for drain in self.drains.active.values():
                    for run in drain.migrations.values():
                        if run.row["phase"] in ("bulk_copying", "delta_copying"):
                            self.seen.append((p, run.row["bytes_sent"],
                                              run.detail.get("bytes_done")))

            options.on_progress = watched
        return DrainCluster.call(self, procedure, *args, options=options, **kwargs)


class DrainProgressTests(TestCase):
    deploy = test_drain.DrainRunTests.deploy
    drain = test_drain.DrainRunTests.drain

    @d
    async def test_progress_comes_from_the_agents_announcements(self):
        c = await WatchingCluster(self).start()
        m = await self.deploy(c)
        src = m["host_id"]
        result, status = await self.drain(c, src)
        self.assertEqual(status["state"], "completed", status)
        self.assertNotIn((src, "volume.progress"), c.calls)
        # Each copy (bulk, then delta) announced its start and its end; after each
        # announcement the migration's row held what it said (offset by the copies before).
        modes = [p["mode"] for p, _, _ in c.seen]
        self.assertIn("bulk", modes)
        self.assertIn("delta", modes)
        bulk = [(p, sent, done) for p, sent, done in c.seen if p["mode"] == "bulk"]
        self.assertEqual(bulk[0][0]["sent"], 0)
        self.assertFalse(bulk[0][0]["finished"])
        final, sent, done = bulk[-1]
        self.assertTrue(final["finished"])
        self.assertGreater(final["sent"], 0)
        self.assertEqual((sent, done), (final["sent"], final["done"]))
        mg = status["migrations"][0]
        self.assertGreaterEqual(mg["bytes_sent"], final["sent"])

    @d
    async def test_an_agent_that_does_not_announce_is_read_after_a_while(self):
        c = await DrainCluster(self).start()
        c.announces = False  # the source's volume.send takes no progressive results
        m = await self.deploy(c)
        src = m["host_id"]
        ex, procs = c.executors[src]
        send = procs["volume.send"]
        read = procs["volume.progress"]
        mid = m["id"]
        during = []

        def progress(volume_id):
            if during:
                return read(volume_id)
            return {"volume_id": volume_id, "mode": "bulk", "sent": 7, "done": 9,
                    "total": 32 * 1024 * 1024, "finished": False, "started_at": 0.0}

        def slow_send(*args, **kwargs):
            # The copy takes a while on the control plane's Clock: the drain falls back to
            # reading volume.progress, and stores what it read.
            def go():
                run = c.drains.active[src].migrations[mid]
                during.append((c.clock.seconds(), run.row["bytes_sent"],
                               run.detail.get("bytes_done")))
                return send(*args, **kwargs)

            return deferLater(c.clock, PROGRESS_FALLBACK_AFTER + 2, go)

        procs["volume.send"] = slow_send
        procs["volume.progress"] = progress
        result, status = await self.drain(c, src)
        self.assertEqual(status["state"], "completed", status)
        self.assertIn((src, "volume.progress"), c.calls)
        # bulk copy: nothing before it, so the row holds what volume.progress said
        self.assertEqual(during[0][1:], (7, 9))
