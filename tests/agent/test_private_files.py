"""
Files the agent creates are private however the process's umask is set: a volume image is
0600 in a 0700 directory even under umask 022; makeService sets the umask 077 that QEMU and
every other child inherit.  (tests/integration/test_private_files.py walks a real deploy.)
"""

import os
import shutil
import stat
import tempfile

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm.agent import tap
from zwrm.agent.volumes import VolumeStore


def _umask(testcase, mask):
    old = os.umask(mask)
    testcase.addCleanup(os.umask, old)


class VolumeModeTests(TestCase):
    async def test_volume_private_under_a_loose_umask(self):
        _umask(self, 0o022)
        parent = tempfile.mkdtemp(prefix="zwrm-vol-")
        self.addCleanup(shutil.rmtree, parent, True)
        root = os.path.join(parent, "volumes")
        store = VolumeStore(reactor, root)
        info = await store.create("v1", 8)
        self.assertEqual(stat.S_IMODE(os.stat(root).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(info["path"]).st_mode), 0o600)


class UmaskTests(SynchronousTestCase):
    def test_make_service_sets_private_umask(self):
        """makeService (agent and control plane) leaves the process with umask 077."""
        from zwrm.control import tap as control_tap

        for module, options in ((tap, tap.Options()), (control_tap, control_tap.Options())):
            _umask(self, 0o022)
            if module is tap:
                self.patch(os, "environ", {})
                options.parseOptions(["--control-plane-url", "ws://127.0.0.1:1/ws",
                                      "--data-dir", self.mktemp()])
            else:
                options.parseOptions(["--data-dir", self.mktemp()])
            module.makeService(options)
            self.assertEqual(os.umask(0o022), tap.PRIVATE_UMASK, module.__name__)
