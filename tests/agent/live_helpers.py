"""
Two hosts' live-migration parts on one L{task.Clock}, shared by the unit tests of
L{zwrm.agent.live}: tests/agent/test_live_fake.py (the procedures alone) and
tests/agent/test_live_executor.py (with the agents' executors).
"""

import os
import shutil
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred

from zwrm.agent.live import LiveMigrations
from zwrm.agent.volumes import VolumeStore
from zwrm.drivers.fake import FakeDriver, FakeHost
from zwrm.drivers.fake_live import FakeNetwork
from zwrm.pki import HostCredentials
from zwrm.pki.ca import CertificateAuthority
from zwrm.testing.image import kernel_bytes

SIZE = 4 * 1024 * 1024
"""The size of the source's volume C{v1}."""


class TwoHosts:
    """
    host-a and host-b: a cluster CA, a kernel file, fake drivers that meet in one
    L{FakeNetwork}; L{host} makes each host's parts, L{live_for} its L{LiveMigrations}.
    """

    def __init__(self, testcase, clock, prefix="zwrm-live-"):
        self.clock = clock
        self.dir = tempfile.mkdtemp(prefix=prefix)
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        self.kernel = os.path.join(self.dir, "vmlinuz")
        with open(self.kernel, "wb") as f:
            f.write(kernel_bytes())
        self.ca = CertificateAuthority.create()
        self.fabric = FakeNetwork()

    def host(self, h, converges=True):
        """@return: host C{h}'s fake driver, volume store and host credentials."""
        fake = FakeHost()
        fake.live_converges = converges
        drv = FakeDriver(self.clock, os.path.join(self.dir, h, "machines"), host=fake,
                         network=self.fabric)
        # (on the clock: the directory's fsync runs at once, not in a thread)
        vols = VolumeStore(reactor, os.path.join(self.dir, h, "volumes"),
                           threads=maybeDeferred)
        cert, key = self.ca.issue_host(h)
        return drv, vols, HostCredentials(self.ca.certificate_pem, cert, key)

    def live_for(self, h, drv, vols, creds, **kwargs):
        """
        Host C{h}'s C{live.*} procedures (its migrations recorded under its directory; on the
        clock, each record is written at once, not in a thread).
        """
        kwargs.setdefault("threads", maybeDeferred)
        return LiveMigrations(self.clock, h, drv, vols, lambda: creds, lambda: "127.0.0.1",
                              state_dir=os.path.join(self.dir, h, "live"), **kwargs)

    @staticmethod
    def write_volume(path):
        """The source's volume: known bytes, then sparse up to L{SIZE}."""
        with open(path, "wb") as f:
            f.write(b"data" * 1000)
            f.truncate(SIZE)

    def settle(self, d, steps=20000, step=0.01):
        """Advance the clock until C{d} fires; @return: its result (its failure raised)."""
        out = []
        d.addBoth(out.append)
        for _ in range(steps):
            if out:
                break
            self.clock.advance(step)
        assert out, "did not fire"
        if hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]
