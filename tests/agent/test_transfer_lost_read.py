"""
A block read that fails after the sender's connection went (its TLS layer torn down
already: Twisted's TLS transport cannot be aborted again): nothing more is done with it.
CI saw it once (test_resume_after_dropped_connection, 2026-12-03): the read failed
after the cut, the sender aborted the dead connection, and the AttributeError from
twisted.protocols.tls ended the test.
"""

from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from zwrm.agent.transfer.sender import _Item, _SenderProtocol


class _Send:
    path = "/var/lib/zwrm/volumes/vol-1.img"

    def __init__(self):
        self.buffers, self.errors = [], []

    def putBuffer(self, buf):
        self.buffers.append(buf)

    def localError(self, err):
        self.errors.append(err)

    def readDone(self):
        pass


class _GoneTransport:
    """Twisted's TLS transport after connectionLost: aborting it raises."""

    def abortConnection(self):
        raise AttributeError("'NoneType' object has no attribute 'shutdown'")


class _Transport:
    aborted = 0

    def abortConnection(self):
        self.aborted += 1


class LostReadTests(SynchronousTestCase):
    def protocol(self, transport):
        send = _Send()
        proto = _SenderProtocol(send)
        proto.transport = transport
        item = _Item(3, True, True)
        item.buf = bytearray(16)
        proto._inflight.append(item)
        proto._reads = 1
        return proto, send, item

    def test_a_read_failing_after_the_connection_went_is_dropped(self):
        proto, send, item = self.protocol(_GoneTransport())
        proto._stopped = True
        proto._readFailed(Failure(OSError(9, "Bad file descriptor")), item)
        self.assertEqual((proto._reads, send.errors, len(send.buffers)), (0, [], 1))

    def test_a_read_failing_on_a_live_connection_ends_it(self):
        transport = _Transport()
        proto, send, item = self.protocol(transport)
        proto._readFailed(Failure(OSError(5, "Input/output error")), item)
        self.assertEqual(transport.aborted, 1)
        [err] = send.errors
        self.assertIn("cannot read volume image", str(err))
        self.assertIn("Input/output error", str(err))
        self.assertTrue(proto._stopped)
