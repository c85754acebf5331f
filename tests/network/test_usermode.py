"""
User-mode networking (C{--network user}) isolates the guest: tried from inside a real guest.

QEMU's user-mode network puts the host at 10.0.2.2, and without C{restrict=on} a guest
connecting there reaches the host's loopback (the control plane's /healthz answered from a
VM).  The driver always sets C{restrict=on}; only the explicit forwards reach the guest.
"""

import shutil
import tempfile

import pytest
from twisted.internet import protocol, reactor
from twisted.trial.unittest import TestCase

from tests.network import guest
from tests.network.helpers import answers
from zwrm.drivers.qemu import QemuDriver
from zwrm.testing.processes import free_port, poll

PROBE = """sleep 1
if nc -w 4 10.0.2.2 {port} </dev/null; then echo "probe nc reached"; else echo "probe nc blocked"; fi
if printf 'GET /healthz HTTP/1.0\r\n\r\n' | nc -w 4 10.0.2.2 {port}; then echo "probe http reached"; else echo "probe http blocked"; fi
echo "probe done"
"""


class _Count(protocol.Factory):
    """Counts the connections a listener on the host's loopback accepts."""

    def __init__(self):
        self.count = 0

    def buildProtocol(self, addr):
        self.count += 1
        p = protocol.Protocol()
        return p


@pytest.mark.qemu
class UserModeIsolationTests(TestCase):
    timeout = 240

    async def test_guest_cannot_reach_host_loopback_but_forward_works(self):
        img = await deferToThreadBuild()
        root = tempfile.mkdtemp(prefix="zwrm-net-", dir="/tmp")
        self.addCleanup(shutil.rmtree, root, True)
        counter = _Count()
        listener = reactor.listenTCP(0, counter, interface="127.0.0.1")
        self.addCleanup(listener.stopListening)
        port = listener.getHost().port
        fwd = free_port()
        drv = QemuDriver(reactor, root, accel="tcg")
        self.addCleanup(drv.close)
        cmdline = f"{img.cmdline} {guest.script_arg(PROBE.format(port=port))}"
        await drv.start({"id": "u1", "kernel": img.kernel, "initrd": img.initrd,
                         "cmdline": cmdline, "vcpus": 1, "memory_mb": 128,
                         "forwards": [{"guest": 8080, "host": fwd}]})
        self.addCleanup(drv.destroy, "u1")

        async def done():
            return "zwrm-run: probe done" in await drv.console("u1")

        try:
            await poll(reactor, done, 180, interval=0.5, what="the guest's probe")
        finally:
            console = await drv.console("u1")
        self.assertIn("zwrm-run: probe nc blocked", console, console[-2000:])
        self.assertIn("zwrm-run: probe http blocked", console, console[-2000:])
        self.assertEqual(counter.count, 0)
        # The explicit forward still reaches the guest's web server.
        await poll(reactor, lambda: answers(reactor, "127.0.0.1", fwd), 60, interval=0.5,
                   what="the forwarded guest port")


def deferToThreadBuild():
    from twisted.internet.threads import deferToThread

    return deferToThread(guest.build)

