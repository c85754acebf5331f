"""
A zwrm-control whose start fails exits non-zero (so systemd's Restart=on-failure acts), also
when the start fails before the reactor runs: here, a data directory another control plane
holds (its lock is taken at once).
"""

import os

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from zwrm.control.service import lock_data_dir
from zwrm.testing.processes import ControlPlaneProcess, poll, temp_dir


class FailedStartTests(TestCase):
    timeout = 240

    def test_locked_data_dir_exits_1(self):
        return ensureDeferred(self._locked())

    async def _locked(self):
        data_dir = os.path.join(temp_dir(self), "cp")
        os.makedirs(data_dir, mode=0o700)
        fd = lock_data_dir(data_dir)
        self.addCleanup(os.close, fd)
        plane = ControlPlaneProcess(reactor, data_dir)
        self.addCleanup(plane.stop)
        plane.spawn()
        await poll(reactor, lambda: not plane.running, 180, what="zwrm-control to exit")
        code = await plane._proto.ended
        self.assertEqual(code, 1, plane.log_tail())
        self.assertIn("could not start", plane.log_tail())
