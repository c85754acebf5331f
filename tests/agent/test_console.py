"""
The console relay: readers attached to a machine's serial console get what the guest writes
(progressive results), writes reach the guest, a reader detaches by cancelling, and the end
of the console ends every attachment. Against a real UNIX socket standing in for QEMU's, and
against a real QEMU (TCG) booting the test image.
"""

import base64
import os
import shutil
import tempfile

import pytest
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.trial.unittest import TestCase

from zwrm.agent.console import ConsoleRelay
from zwrm.drivers.qemu import QemuDriver
from zwrm.errors import InvalidArgument, NotFound, Unavailable
from zwrm.testing import image


class _Guest(protocol.Protocol):
    def connectionMade(self):
        self.factory.clients.append(self)

    def dataReceived(self, data):
        self.factory.received += data
        if data.endswith(b"\r"):
            self.transport.write(b"echo: " + data)


def text(chunks):
    """What a reader was sent: each progressive result is base64 of its own (padded)."""
    return b"".join(base64.b64decode(c) for c in chunks)


async def poll(predicate, timeout=30.0, what="condition"):
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"{what} not reached within {timeout} s")


def b64(data):
    return base64.b64encode(data).decode()


class RelayTests(TestCase):
    async def serve(self):
        d = tempfile.mkdtemp(prefix="zwrm-con-", dir="/tmp")
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "console.sock")
        factory = protocol.Factory.forProtocol(_Guest)
        factory.clients, factory.received = [], b""
        port = await UNIXServerEndpoint(reactor, path).listen(factory)
        self.addCleanup(port.stopListening)
        return path, factory

    async def test_attach_write_detach(self):
        path, guest = await self.serve()
        relay = ConsoleRelay(reactor, lambda mid: path if mid == "m1" else (_ for _ in ()).throw(
            NotFound("no machine")))
        got1, got2 = [], []
        a1 = defer.Deferred.fromCoroutine(relay.attach("m1", got1.append))
        a2 = defer.Deferred.fromCoroutine(relay.attach("m1", got2.append))
        await poll(lambda: guest.clients, what="a connection")
        self.assertEqual(len(guest.clients), 1)  # one connection, shared
        self.assertEqual(await relay.write("m1", b64(b"ls\r")), 3)
        await poll(lambda: got1 and got2, what="output to both readers")
        self.assertEqual(text(got1), b"echo: ls\r")
        self.assertEqual(guest.received, b"ls\r")
        # Ctrl-] in the CLI cancels its call: that reader is gone, the other stays.
        a1.cancel()
        with self.assertRaises(defer.CancelledError):
            await a1
        guest.clients[0].transport.write(b"more")
        await poll(lambda: b"more" in text(got2), what="more output")
        self.assertNotIn(b"more", text(got1))
        # The console ends (the machine stopped): the attachment ends with it.
        guest.clients[0].transport.loseConnection()
        result = await a2
        self.assertEqual(result, {"machine_id": "m1", "ended": "the console closed"})
        self.assertEqual(relay._consoles, {})
        await task.deferLater(reactor, 0.05, lambda: None)  # both ends finish closing

    async def test_bad_input(self):
        path, guest = await self.serve()
        relay = ConsoleRelay(reactor, lambda mid: path)
        for data in ("not base64!", 5, b64(b"x" * 4097)):
            with self.assertRaises(InvalidArgument):
                await relay.write("m1", data)
        relay = ConsoleRelay(reactor, lambda mid: path + ".missing")
        with self.assertRaises(Unavailable) as cm:
            await relay.attach("m1", lambda t: None)
        self.assertIn("console cannot be reached", cm.exception.message)


@pytest.mark.qemu
class QemuConsoleTests(TestCase):
    timeout = 180

    async def test_attach_to_a_booting_guest(self):
        root = tempfile.mkdtemp(prefix="zwrm-qc-", dir="/tmp")
        self.addCleanup(shutil.rmtree, root, True)
        img = image.build()
        drv = QemuDriver(reactor, root, accel="tcg")
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self._destroy(drv)))
        with self.assertRaises(NotFound):
            drv.console_socket("m1")
        await drv.start({"id": "m1", "kernel": img.kernel, "initrd": img.initrd,
                         "cmdline": image.BASE_CMDLINE, "vcpus": 1, "memory_mb": 128,
                         "volumes": []})
        relay = ConsoleRelay(reactor, drv.console_socket)
        got = []
        attached = defer.Deferred.fromCoroutine(relay.attach("m1", got.append))
        await poll(lambda: image.READY_LINE.encode() in text(got), 150,
                   what="the guest's ready line through the relay")
        # The log has it too, attached or not.
        self.assertIn(image.READY_LINE, await drv.console("m1"))
        await drv.stop("m1", timeout=10)
        self.assertEqual((await attached)["ended"], "the console closed")
        with self.assertRaises(Unavailable):
            drv.console_socket("m1")

    async def _destroy(self, drv):
        for mid in drv.list():
            await drv.destroy(mid)
