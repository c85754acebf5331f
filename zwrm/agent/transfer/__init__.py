"""
Volume streams: copy a sparse volume image from one agent to another over TLS.

The target agent runs a L{VolumeReceiver} (a TLS endpoint, loopback unless configured).
The control plane mints a one-time token (L{zwrm.tokens.mint_token}) for a volume and gives it
to both agents: the target calls L{VolumeReceiver.expect}, the source calls
L{VolumeSender.send}. Only the allocated blocks of the image travel (C{SEEK_DATA}/C{SEEK_HOLE}),
framed as (offset, data), produced by a push producer that honours the transport's
backpressure and reads the file in threads.  The target writes into a sparse temporary file
next to the volume, hashes every block as it writes it, checks the image digest
(L{zwrm.agent.blockmap}) sent at the end, fsyncs, and only then hands the file to the volume
store (C{VolumeStore.adopt}).

A dropped connection is retried by the sender and resumes at the offset the receiver reports.
A copy made while the VM runs (C{mode="bulk", commit=False}) is completed after the VM stopped
by a delta (C{mode="delta", commit=True}): the receiver sends its block hashes and the sender
sends only the blocks that differ.  The protocol is described in docs/volume-streams.md.

By responsibility:

  - L{zwrm.agent.transfer.wire}: frame kinds, their encoding, the framing protocol;
  - L{zwrm.agent.transfer.receiver}: L{VolumeReceiver} and L{IncomingTransfer};
  - L{zwrm.agent.transfer.sender}: L{VolumeSender} and its retries;
  - L{zwrm.agent.transfer.transfers}: L{VolumeTransfers}, both ends over an agent's volume
    store;
  - L{zwrm.agent.transfer.progress}: L{ProgressThrottle}, a stream's progress announced to
    the caller of C{volume.send} at a bounded rate.
"""

from zwrm.agent.transfer.receiver import (
    RECEIVE_HIGH_WATER,
    RECEIVE_LOW_WATER,
    WRITEBACK_EVERY,
    IncomingTransfer,
    VolumeReceiver,
)
from zwrm.agent.transfer.sender import READ_AHEAD, VolumeSender, _SenderProtocol
from zwrm.agent.transfer.transfers import VolumeTransfers
from zwrm.agent.transfer.wire import (
    BLOCKMAP,
    DATA,
    DONE,
    END,
    ERROR,
    HELLO,
    PROTOCOL_VERSION,
    READY,
    ZERO,
)
from zwrm.tokens import mint_token

__all__ = [
    "BLOCKMAP",
    "DATA",
    "DONE",
    "END",
    "ERROR",
    "HELLO",
    "PROTOCOL_VERSION",
    "READ_AHEAD",
    "READY",
    "RECEIVE_HIGH_WATER",
    "RECEIVE_LOW_WATER",
    "WRITEBACK_EVERY",
    "ZERO",
    "IncomingTransfer",
    "VolumeReceiver",
    "VolumeSender",
    "VolumeTransfers",
    "_SenderProtocol",
    "mint_token",
]
