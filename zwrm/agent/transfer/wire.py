"""
The volume stream's wire format: frame kinds, their encoding and the framing protocol both
ends share (docs/volume-streams.md describes the protocol).

A frame is a 1-byte kind, a 4-byte big-endian payload length, the payload. Control frames
carry JSON objects; L{DATA} and L{ZERO} carry binary offsets (L{_OFFSET}, L{_ZERO}).
"""

import hashlib
import json
import re
import struct

from OpenSSL import SSL
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from zwrm import errors

log = Logger()

PROTOCOL_VERSION = 1

# Frame kinds.  A frame is a 1-byte kind, a 4-byte big-endian payload length, the payload.
HELLO = b"H"  # sender -> receiver, JSON {v, token, mode, size, commit[, digest]}
READY = b"R"  # receiver -> sender, JSON {offset, block_size, blocks}
BLOCKMAP = b"M"  # receiver -> sender (delta only): 32-byte hash of every block
DATA = b"D"  # sender -> receiver: 8-byte offset, then one block's bytes
ZERO = b"Z"  # sender -> receiver (delta only): 8-byte offset, 8-byte length
END = b"E"  # sender -> receiver, JSON {digest, commit}
DONE = b"K"  # receiver -> sender, JSON {digest, committed}
ERROR = b"X"  # either way, JSON {uri, message}; the sender of it then closes

_HEADER = struct.Struct(">cI")
_OFFSET = struct.Struct(">Q")
_ZERO = struct.Struct(">QQ")
_MAX_CONTROL = 64 * 1024

_VOLUME_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class _OneProtocol(Factory):
    """
    Builds the one protocol instance it was given (a connection attempt's).
    """

    def __init__(self, proto):
        self._proto = proto

    def buildProtocol(self, addr):
        return self._proto


def tls_factory(creator, is_client, wrapped, clock):
    """
    A TLS wrapping factory whose transports write through at once, without Twisted's
    aggregation of small writes (L{BufferingTLSTransport}): the stream's own writes are
    large, and L{write_bulk} writes records beside the TLS transport's own, in order.

    @param wrapped: the application's protocol factory, or a protocol instance (the one
        connection of a sender's attempt).
    """
    if not isinstance(wrapped, Factory):
        wrapped = _OneProtocol(wrapped)
    factory = TLSMemoryBIOFactory(creator, is_client, wrapped, clock=clock)
    factory.protocol = TLSMemoryBIOProtocol
    return factory


#: Encrypted bytes handed to the TCP transport per write by L{RecordWriter}: small enough for
#: the allocator to reuse its memory from write to write (a 1 MiB bytes per block is mapped
#: and page-faulted in anew each time), large enough to fill a send of Twisted's TCP
#: transport (it sends at most 128 KiB per call) in one or two writes.
SEND_CHUNK = 64 * 1024


class RecordWriter:
    """
    Writes large buffers on a TLS transport made by L{tls_factory}, past Twisted's per-record
    path (which copies a slice, reads the memory BIO and writes to the TCP transport for every
    16 KiB record): buffers are encrypted straight from the caller's memory (one C{SSL_write}
    per record, as pyOpenSSL enables partial writes; the GIL is released while OpenSSL
    encrypts) into the TLS connection's memory BIO, and L{flush} hands the records to the TCP
    transport L{SEND_CHUNK} bytes at a time, for as long as the transport takes them.

    Records are only ever taken from the BIO in order and written to the TCP transport, by
    L{flush} or by the TLS transport itself, so the stream stays in order; the caller must
    L{flush} everything before it writes through the TLS transport again (a control frame)
    or closes it.

    On any other transport (or a TLS connection no longer taking data) it writes through the
    transport's own C{write}.
    """

    def __init__(self, transport, chunk=SEND_CHUNK):
        self._transport = transport
        self._chunk = chunk
        self._pending = False
        get_handle = getattr(transport, "getHandle", None)
        conn = get_handle() if get_handle is not None else None
        self._tcp = getattr(transport, "transport", None)
        self._conn = conn if isinstance(conn, SSL.Connection) and self._tcp is not None else None

    def write(self, *buffers):
        """
        Encrypt C{buffers} (each gets records of its own); L{flush} sends them.
        """
        if self._conn is None or self._transport.disconnecting:
            for buf in buffers:
                self._transport.write(bytes(buf))
            return
        send = self._conn.send
        for buf in buffers:
            view = memoryview(buf)
            try:
                while view:
                    view = view[send(view) :]
            except SSL.Error:
                # Not taking data directly (being shut down): the ordinary path knows what to
                # do with the rest.
                self._pending = True
                self.flush(lambda: False)
                self._transport.write(bytes(view))
                return
        self._pending = True

    def flush(self, paused):
        """
        Hand the encrypted records to the TCP transport until none are left or C{paused()}.

        @return: C{True} when none are left.
        """
        conn, write = self._conn, self._tcp.write if self._tcp is not None else None
        while self._pending:
            if paused():
                return False
            try:
                chunk = conn.bio_read(self._chunk)
            except SSL.WantReadError:
                self._pending = False
                break
            write(chunk)
        return True


def _token_key(token):
    return hashlib.sha256(token.encode("utf-8")).digest()


def _encode(kind, obj):
    payload = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return _HEADER.pack(kind, len(payload)) + payload


def _error_payload(err):
    if isinstance(err, errors.ZwrmError):
        return {"uri": err.uri, "message": err.message}
    return {"uri": errors.Internal.uri, "message": "internal error in the volume receiver"}


def _error_from(msg):
    cls = errors.ALL.get(msg.get("uri"), errors.Internal)
    return cls(str(msg.get("message", "the peer reported an error")))


class _Framed(Protocol):
    """
    Splits the byte stream into frames and hands each to L{frameReceived}.

    @ivar limits: the largest payload accepted per frame kind; anything else is malformed.
    """

    limits = {}

    #: Frames whose payload is a short head followed by a long body (a block): the body is
    #: gathered as the list of received pieces, written with one C{pwritev}, never joined.
    heads = {DATA: _OFFSET.size}

    def connectionMade(self):
        self._buf = bytearray()
        self._body = None
        self._closing = False

    def dataReceived(self, data):
        if self._closing:
            return
        if self._body is not None:
            data = self._collect(data)
            if data is None:
                return
        self._buf += data
        while not self._closing and len(self._buf) >= _HEADER.size:
            kind, n = _HEADER.unpack_from(self._buf)
            limit = self.limits.get(kind)
            head = self.heads.get(kind, 0)
            if limit is None or n > limit or n < head:
                self.protocolError(
                    errors.Corrupt(
                        f"malformed volume stream: unexpected frame {kind!r} of {n} bytes"
                    )
                )
                return
            if head:
                start = _HEADER.size + head
                if len(self._buf) < start:
                    return
                self._body = (kind, bytes(self._buf[_HEADER.size : start]), n - head, [], 0)
                rest = bytes(self._buf[start:])
                del self._buf[:]
                rest = self._collect(rest)
                if rest is None:
                    return
                self._buf += rest
                continue
            end = _HEADER.size + n
            if len(self._buf) < end:
                return
            with memoryview(self._buf) as view:
                payload = view[_HEADER.size : end].tobytes()
            del self._buf[:end]
            self._dispatch(self.frameReceived, kind, payload)

    def _collect(self, data):
        """
        Add C{data} to the body being gathered.

        @return: what follows the body if it is now complete, else C{None}.
        """
        kind, head, need, parts, have = self._body
        take = need - have
        if len(data) < take:
            if data:
                parts.append(data)
            self._body = (kind, head, need, parts, have + len(data))
            return None
        if len(data) == take:
            parts.append(data)
            data = b""
        else:
            parts.append(data[:take])
            data = data[take:]
        self._body = None
        self._dispatch(self.bodyReceived, kind, head, parts, need)
        return None if self._closing else data

    def _dispatch(self, handler, *args):
        try:
            handler(*args)
        except errors.ZwrmError as e:
            self.protocolError(e)
        except Exception:
            log.failure("volume stream frame handling failed")
            self.protocolError(errors.Internal("internal error in the volume stream"))

    def bodyReceived(self, kind, head, parts, length):
        raise errors.Corrupt(f"malformed volume stream: unexpected frame {kind!r}")

    def sendFrame(self, kind, obj):
        self.transport.write(_encode(kind, obj))

    def protocolError(self, err):
        """
        Report C{err} to the peer and close.
        """
        if self._closing:
            return
        self._closing = True
        self.transport.write(_encode(ERROR, _error_payload(err)))
        self.transport.loseConnection()
        self.failed(err)

    def failed(self, err):
        pass

    def _json(self, payload):
        try:
            msg = json.loads(payload)
        except ValueError:
            raise errors.Corrupt("malformed volume stream: a control frame is not JSON") from None
        if not isinstance(msg, dict):
            raise errors.Corrupt("malformed volume stream: a control frame is not an object")
        return msg
