"""
A drain's stop of the original is a planned stop (issue 16 item 4): a machine without
volumes is taken out of the routes (C{stopping}) once its replacement is healthy, and
stopped on its host only after the app's C{shutdown_delay}.  The drain harness moves the
control plane's Clock only while it waits, so the delay is measured on that Clock.
"""

from twisted.trial.unittest import TestCase

from tests.control import test_drain
from tests.control.test_apps import d
from tests.control.test_drain import DrainCluster


class Timed(DrainCluster):
    """The drain cluster, with the Clock time of each stop and destroy, and of each state."""

    async def start(self, *a, **kw):
        await DrainCluster.start(self, *a, **kw)
        self.when = []  # (clock time, what, machine id)
        self.apps.data.machines.subscribe(self._event)
        return self

    def _event(self, event):
        p = event.get("payload") or {}
        if event.get("kind") == "state":
            self.when.append((self.clock.seconds(), p.get("state"), event["subject"]))

    def call(self, procedure, *args, **kwargs):
        verb = procedure.split(".", 3)[3]
        if verb in ("machine.stop", "machine.destroy"):
            self.when.append((self.clock.seconds(), verb, args[0]))
        return DrainCluster.call(self, procedure, *args, **kwargs)

    def first(self, what, machine_id):
        return min(t for t, w, m in self.when if w == what and m == machine_id)


class DrainShutdownDelayTests(TestCase):
    timeout = 120

    @d
    async def test_the_original_leaves_the_routes_then_waits_then_stops(self):
        c = await Timed(self).start()
        m = await test_drain.DrainRunTests.deploy(self, c, volumes=False, shutdown_delay=4)
        _, status = await test_drain.DrainRunTests.drain(self, c, m["host_id"])
        self.assertEqual(status["state"], "completed")
        (rep,) = await c.apps.list_machines()
        self.assertNotEqual(rep["id"], m["id"])
        out = c.first("stopping", m["id"])
        self.assertLessEqual(c.first("running", rep["id"]), out)  # the replacement first
        self.assertGreaterEqual(c.first("machine.stop", m["id"]) - out, 4)

    @d
    async def test_no_delay_no_wait(self):
        c = await Timed(self).start()
        m = await test_drain.DrainRunTests.deploy(self, c, volumes=False)  # no routes: delay 0
        _, status = await test_drain.DrainRunTests.drain(self, c, m["host_id"])
        self.assertEqual(status["state"], "completed")
        self.assertEqual(c.first("machine.stop", m["id"]), c.first("machine.destroy", m["id"]))
