"""
How the control plane wires its parts.

When the control plane carries on with the app destroys that did not end
(L{zwrm.control.service.ControlPlane._go_on_destroying}): at its start, after each health
check, and as soon as a host is reconciled (a host back: the destroys that waited for it,
or a restart's destroys cut short, go on at once rather than at the next check, up to 15 s
later); one pass at a time, and one more after it when asked for during it.

The partition guard's settle window (L{zwrm.control.healing.Healer}) is 1.5 heartbeat
intervals: hosts cut off at one moment are found offline as far apart as their last
heartbeats (an interval, its jitter 10 %).

A real control plane on loopback, over a real store; its apps layer's pass is replaced by
one the test ends when it likes.
"""

import os

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from zwrm.control.service import ControlPlane
from zwrm.control.tap import Config
from zwrm.testing.processes import temp_dir


class ServiceHooksTests(TestCase):
    timeout = 60

    async def plane(self, **kw):
        config = Config(listen=["tcp:0:interface=127.0.0.1"],
                        data_dir=os.path.join(temp_dir(self), "cp"), **kw)
        plane = ControlPlane(reactor, config)
        plane.startService()
        self.addCleanup(plane.stopService)
        await plane.started
        if plane._destroys is not None:  # (the start's own pass)
            await plane._destroys
        passes = []

        async def go_on_destroying():
            d = defer.Deferred()
            passes.append(d)
            return await d

        self.patch(plane.apps, "go_on_destroying", go_on_destroying)
        return plane, passes

    async def test_a_host_reconciled_starts_a_pass(self):
        plane, passes = await self.plane()
        for callback in plane.registry.on_reconciled:
            await callback("h_1")
        self.assertEqual(len(passes), 1)
        passes[0].callback([])
        self.assertIsNone(plane._destroys)

    async def test_none_once_it_stops(self):
        plane, passes = await self.plane()
        await plane.stopService()
        await plane._reconciled("h_1")  # (an agent's registration handled late)
        self.assertEqual(passes, [])

    async def test_asked_during_a_pass_one_more_after_it(self):
        plane, passes = await self.plane()
        plane._go_on_destroying()
        plane._go_on_destroying()  # (a health check during it)
        await plane._reconciled("h_1")  # (and a host back)
        self.assertEqual(len(passes), 1)  # one at a time
        passes[0].callback([])
        self.assertEqual(len(passes), 2)  # the one more, for both
        passes[1].callback([])
        self.assertEqual(len(passes), 2)
        self.assertIsNone(plane._destroys)


    async def test_the_healer_settles_for_one_and_a_half_heartbeats(self):
        plane, _ = await self.plane(heartbeat_interval=4.0)
        self.assertEqual(plane.healer.settle, 6.0)
