"""
Progressive results for the callers of long procedures (L{zwrm.wamp.progress}): what the
work says, and a word every few seconds while it says nothing; the procedures that copy a
volume's data give them (the CLI's timeout then bounds silence: tests/cli).
"""

import os

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.control import test_volume_replicas
from tests.control.test_apps import d
from tests.control.test_healing import poll
from zwrm.control.api import HostAPI
from zwrm.wamp.progress import INTERVAL, CallerProgress


class Details:
    """A call's details whose caller asked for progressive results."""

    def __init__(self):
        self.said = []

    def progress(self, *args, **kwargs):
        self.said.append(args[0])


class CallerProgressTests(SynchronousTestCase):
    def test_a_word_every_interval_and_what_the_work_says(self):
        clock, details = Clock(), Details()
        with CallerProgress(clock, details) as p:
            clock.advance(INTERVAL - 1)
            self.assertEqual(details.said, [])
            clock.advance(1)
            self.assertEqual(details.said, [{"elapsed": INTERVAL}])
            clock.advance(2)
            p.report(done=5, total=10)
            self.assertEqual(details.said[-1], {"done": 5, "total": 10, "elapsed": INTERVAL + 2})
            clock.advance(INTERVAL - 2)
            self.assertEqual(details.said[-1], {"done": 5, "total": 10, "elapsed": 2 * INTERVAL})
        clock.advance(10 * INTERVAL)  # ended: nothing more
        p.report(done=10)
        self.assertEqual(len(details.said), 3)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_caller_that_did_not_ask_or_went_away(self):
        clock = Clock()
        with CallerProgress(clock, None) as p:  # no details: nothing is sent, nothing runs
            p.report(done=1)
            self.assertEqual(clock.getDelayedCalls(), [])

        class Gone:
            calls = 0

            def progress(self, *a):
                self.calls += 1
                raise RuntimeError("the caller left")

        gone = Gone()
        with CallerProgress(clock, gone) as p:
            clock.advance(INTERVAL)
            p.report(done=1)  # not raised to the work, not tried again
            clock.advance(INTERVAL)
        self.assertEqual(gone.calls, 1)


class ProcedureProgressTests(TestCase):
    timeout = 120
    cluster = test_volume_replicas.ReplicaTests.cluster
    running = test_volume_replicas.ReplicaTests.running

    @d
    async def test_a_replica_s_copy_says_its_bytes(self):
        c = await self.cluster()
        with open(c.store_of(c.src).path(c.vid), "r+b") as f:
            f.write(os.urandom(1 << 20))
        snap = await c.apps.snapshot_volume(c.vid, "one")
        details = Details()
        await c.apps.replicate_volume(c.vid, "one", c.dst, details=details)
        self.assertTrue(details.said, "no progress")
        last = details.said[-1]
        self.assertLess(last["total"], snap["size_bytes"])  # the data, not the zeros
        self.assertGreaterEqual(last["total"], 1 << 20)
        self.assertEqual(last["done"], last["total"])
        self.assertGreaterEqual(last["sent"], 1 << 20)

    @d
    async def test_snapshot_restore_and_recovery_say_they_work(self):
        c = await self.cluster()
        await c.apps.snapshot_volume(c.vid, "one")
        work = {}

        def slow(name, obj):
            real = getattr(obj, name)

            async def wait(*a, **kw):
                work[name] = "waiting"
                await deferLater(c.clock, 2.5 * INTERVAL, lambda: None)
                work[name] = "done"
                return await real(*a, **kw)

            self.patch(obj, name, wait)

        slow("snapshot", c.apps.volumes)
        slow("restore", c.apps.volumes)
        slow("remove", c.removal)
        await c.apps.scale("db", 0)
        await c.registry.mark_offline(c.dst)
        for name, call in (
                ("snapshot", lambda dt: c.apps.snapshot_volume(c.vid, "two", details=dt)),
                ("restore", lambda dt: c.apps.restore_volume(c.vid, "one", details=dt)),
                ("remove", lambda dt: HostAPI(c.registry, c.removal).remove(c.dst,
                                                                            details=dt))):
            details = Details()
            done = ensureDeferred(call(details))

            async def waiting(name=name):
                return work.get(name) == "waiting"

            await poll(waiting, what=f"the {name} under way")
            c.clock.advance(INTERVAL)
            c.clock.advance(INTERVAL)
            self.assertEqual([p["elapsed"] for p in details.said], [INTERVAL, 2 * INTERVAL])
            c.clock.advance(INTERVAL)
            await done
        self.assertEqual(work, {"remove": "done", "restore": "done", "snapshot": "done"})
