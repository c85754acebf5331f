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
from functools import partial

from OpenSSL import SSL
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from zwrm import errors
from zwrm.sockets import write_now

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

_VOLUME_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


class _OneProtocol(Factory):
    """
    Builds the one protocol instance it was given (a connection attempt's).
    """

    def __init__(self, proto):
        self._proto = proto

    def buildProtocol(self, addr):
        return self._proto


#: The most plaintext a TLS record carries.
_RECORD = 16384


class _OpenSSLCalls:
    """
    The three OpenSSL calls the stream's hot path makes itself, past pyOpenSSL's wrappers,
    through the binding pyOpenSSL uses (C{OpenSSL.SSL._ffi}, C{_lib}: not public API):

      - C{SSL_read} straight into a block's buffer, every whole record buffered in one
        Python call: pyOpenSSL's C{recv_into} reads into a temporary buffer and copies it,
        with about a dozen lines of Python per 16 KiB record;
      - C{SSL_clear_mode} of C{SSL_MODE_ENABLE_PARTIAL_WRITE}, which pyOpenSSL sets on every
        context: without it one C{send} encrypts a whole block into the memory BIO, where
        it is one call per 16 KiB record;
      - C{BIO_read} of the encrypted records into the sender's one reused buffer, from
        which they are sent (L{RecordWriter.flush}): C{bio_read} copies them into a new
        buffer and again into a new bytes object.

    The first two save about 0.3 CPU-s per GiB streamed (both ends), the third about as
    much again (docs/performance.md). Where this pyOpenSSL lacks any of them, L{fast_calls}
    is C{None} and the stream takes the public path (C{recv_into}, one C{send} per record,
    C{bio_read}), which is also the one for every error: a failed C{SSL_read} is made again
    through C{recv_into}, which raises what pyOpenSSL raises for it.
    """

    def __init__(self, ffi, lib):
        self._from_buffer = ffi.from_buffer
        self._read = lib.SSL_read
        self._bio_read = lib.BIO_read
        self._clear_mode = lib.SSL_clear_mode
        self._partial_write = lib.SSL_MODE_ENABLE_PARTIAL_WRITE

    def read_into(self, conn, view):
        """
        Decrypt the records of C{conn} that are buffered whole into the writable C{view},
        one C{SSL_read} per record, until it is full or none is left.

        @return: the bytes read (more than 0).
        @raise SSL.Error: (and its subclasses, C{WantReadError} when not one whole record is
            buffered) as C{conn.recv_into} does.
        """
        read, ssl, end = self._read, conn._ssl, len(view)
        at = n = 0
        with self._from_buffer("char[]", view, True) as p:
            while at < end:
                n = read(ssl, p + at, min(end - at, _RECORD))
                if n <= 0:
                    break
                at += n
        if at:
            return at  # (a record that failed, if one did, fails again on the next call)
        return conn.recv_into(view, min(end, _RECORD))

    def take_records(self, conn, view):
        """
        Move at most C{len(view)} bytes of the records C{conn} has encrypted (its outgoing
        memory BIO) into the writable C{view}: pyOpenSSL's C{bio_read} copies them twice,
        into a new buffer and then into a new bytes object.

        @return: the bytes moved, 0 when there are none.
        """
        with self._from_buffer("char[]", view, True) as p:
            n = self._bio_read(conn._from_ssl, p, len(view))
        return n if n > 0 else 0

    def whole_writes(self, conn):
        """
        Let one C{conn.send} write all it is given.
        """
        self._clear_mode(conn._ssl, self._partial_write)


def _fast_calls():
    try:
        from OpenSSL.SSL import _ffi, _lib

        calls = _OpenSSLCalls(_ffi, _lib)
    except (ImportError, AttributeError):
        return None
    conn = SSL.Connection(SSL.Context(SSL.TLS_METHOD))
    if not (hasattr(conn, "_ssl") and hasattr(conn, "_from_ssl")):
        return None
    return calls


#: L{_OpenSSLCalls}, or C{None} where this pyOpenSSL does not have them.
fast_calls = _fast_calls()


class _TLSProtocol(TLSMemoryBIOProtocol):
    """
    Twisted's TLS protocol (without its aggregation of small writes), decrypting the records
    of a block's body straight into the buffer the wrapped protocol gathers it in
    (L{_Framed.bodyView}): per 16 KiB record, one C{SSL_read} (L{fast_calls}, all the whole
    records buffered in one call of it; else C{recv_into}, one call per record), where
    Twisted's own path makes a bytes object and passes it through two protocols'
    C{dataReceived}. Outside a body, and on a protocol that gathers none, it is
    Twisted's path.
    """

    def dataReceived(self, data):
        body_view = getattr(self.wrappedProtocol, "bodyView", None)
        if body_view is None or body_view() is None:
            TLSMemoryBIOProtocol.dataReceived(self, data)
            return
        # In a body: the handshake is long over (a hello came before).
        conn = self.getHandle()
        conn.bio_write(data)
        proto = self.wrappedProtocol
        if fast_calls is None:
            def read_into(view):
                return conn.recv_into(view, min(len(view), _RECORD))
        else:
            read_into = partial(fast_calls.read_into, conn)
        while True:
            view = body_view()
            try:
                if view is not None:
                    proto.bodyFilled(read_into(view))
                else:
                    proto.dataReceived(conn.recv(2 * _RECORD))
            except SSL.WantReadError:
                break
            except SSL.Error:
                # The peer closed TLS, or the stream is broken: Twisted's own path meets the
                # same condition again and ends the connection as it should.
                self._flushReceiveBIO()
                return
        # Whatever OpenSSL has to answer (nothing, in a stream's steady state).
        while True:
            try:
                out = conn.bio_read(2 * _RECORD)
            except SSL.WantReadError:
                break
            self.transport.write(out)


def tls_factory(creator, is_client, wrapped, clock):
    """
    A TLS wrapping factory whose transports (L{_TLSProtocol}) write through at once, without
    Twisted's aggregation of small writes (L{BufferingTLSTransport}): the stream's own writes
    are large, and L{RecordWriter} writes records beside the TLS transport's own, in order.

    @param wrapped: the application's protocol factory, or a protocol instance (the one
        connection of a sender's attempt).
    """
    if not isinstance(wrapped, Factory):
        wrapped = _OneProtocol(wrapped)
    factory = TLSMemoryBIOFactory(creator, is_client, wrapped, clock=clock)
    factory.protocol = _TLSProtocol
    return factory


#: Encrypted bytes handed to the TCP transport per write by L{RecordWriter}: small enough for
#: the allocator to reuse its memory from write to write on the public path (a 1 MiB bytes per
#: block is mapped and page-faulted in anew each time), large enough to fill a send of
#: Twisted's TCP transport (it sends at most 128 KiB per call) in one or two writes. (With
#: L{fast_calls}, the size of the one reused buffer: 256 KiB measured no better.)
SEND_CHUNK = 64 * 1024


class RecordWriter:
    """
    Writes large buffers on a TLS transport made by L{tls_factory}, past Twisted's per-record
    path (which copies a slice, reads the memory BIO and writes to the TCP transport for every
    16 KiB record): buffers are encrypted straight from the caller's memory (one C{SSL_write}
    per buffer with L{fast_calls}, else per record, as pyOpenSSL enables partial writes; the
    GIL is released while OpenSSL encrypts) into the TLS connection's memory BIO, and
    L{flush} hands the records to the TCP transport L{SEND_CHUNK} bytes at a time (sent at
    once while it has nothing queued), for as long as the transport takes them.

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
        self._view = None  # the buffer L{flush} moves records through (with L{fast_calls})
        get_handle = getattr(transport, "getHandle", None)
        conn = get_handle() if get_handle is not None else None
        self._tcp = getattr(transport, "transport", None)
        self._conn = conn if isinstance(conn, SSL.Connection) and self._tcp is not None else None
        if self._conn is not None and fast_calls is not None:
            # One send per buffer. Twisted's own writes on this connection loop on what send
            # returns, and take whole writes as well.
            fast_calls.whole_writes(self._conn)

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
        Hand the encrypted records to the TCP transport until none are left or C{paused()}:
        with L{fast_calls}, L{SEND_CHUNK} bytes at a time through one reused buffer, each
        sent at once while Twisted has nothing queued (L{write_now}); else as new bytes
        objects through Twisted's C{write}.

        @return: C{True} when none are left.
        """
        conn, tcp = self._conn, self._tcp
        view = self._view
        if view is None and self._pending and fast_calls is not None:
            view = self._view = memoryview(bytearray(self._chunk))
        while self._pending:
            if paused():
                return False
            if view is not None:
                n = fast_calls.take_records(conn, view)
                if not n:
                    self._pending = False
                    break
                write_now(tcp, view[:n])
                continue
            try:
                chunk = conn.bio_read(self._chunk)
            except SSL.WantReadError:
                self._pending = False
                break
            tcp.write(chunk)
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


class _Body:
    """
    A block body being gathered: as a list of the pieces received, or into a buffer.
    """

    __slots__ = ("kind", "head", "need", "have", "parts", "buf", "view")

    def __init__(self, kind, head, need, buf):
        self.kind, self.head, self.need, self.have = kind, head, need, 0
        self.buf = buf
        self.view = memoryview(buf)[:need] if buf is not None else None
        self.parts = [] if buf is None else None


class _Framed(Protocol):
    """
    Splits the byte stream into frames and hands each to L{frameReceived}.

    @ivar limits: the largest payload accepted per frame kind; anything else is malformed.
    """

    limits = {}

    #: Frames whose payload is a short head followed by a long body (a block): the body is
    #: gathered into the buffer L{bodyBuffer} gives (the TLS layer, L{_TLSProtocol}, decrypts
    #: into it directly) and handed to L{bufferReceived}; without one, as the list of
    #: received pieces, handed to L{bodyReceived}, never joined.
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
                head_bytes = bytes(self._buf[_HEADER.size : start])
                self._body = _Body(kind, head_bytes, n - head, self.bodyBuffer(kind, n - head))
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
        body = self._body
        take = body.need - body.have
        n = min(len(data), take)
        if body.view is not None:
            body.view[body.have : body.have + n] = memoryview(data)[:n]
        elif n == len(data):
            if data:
                body.parts.append(data)
        else:
            body.parts.append(data[:n])
        body.have += n
        if body.have < body.need:
            return None
        self._bodyDone()
        if self._closing:
            return None
        return data[n:] if n < len(data) else b""

    def _bodyDone(self):
        body, self._body = self._body, None
        if body.view is not None:
            body.view.release()
            self._dispatch(self.bufferReceived, body.kind, body.head, body.buf, body.need)
        else:
            self._dispatch(self.bodyReceived, body.kind, body.head, body.parts, body.need)

    def bodyView(self):
        """
        @return: a writable view of what is still missing of the body being gathered into a
            buffer, or C{None} (no such body).
        """
        body = self._body
        if body is None or body.view is None or self._closing:
            return None
        return body.view[body.have :]

    def bodyFilled(self, n):
        """
        C{n} more bytes of the body were written into L{bodyView}'s view.
        """
        body = self._body
        body.have += n
        if body.have >= body.need:
            self._bodyDone()

    def bodyBuffer(self, kind, length):
        """
        @return: a writable buffer of at least C{length} bytes to gather a body of C{kind}
            into, or C{None} to gather it as a list of pieces.
        """
        return None

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

    def bufferReceived(self, kind, head, buf, length):
        """
        A body gathered into the buffer L{bodyBuffer} gave (its first C{length} bytes).
        """
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
