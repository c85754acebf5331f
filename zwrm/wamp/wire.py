"""
WAMP messages as plain lists on the router's hot path.

The router parses the messages it routes most (CALL, YIELD, PUBLISH) straight from
the decoded list and writes the ones it sends most (INVOCATION, RESULT, EVENT) as
lists, without building C{autobahn.wamp.message} objects; everything else still goes
through autobahn's message classes (L{to_message}).  The wire format is autobahn's:

 - JSON: compact, UTF-8, binary strings as C{"\\u0000" + base64} (autobahn's
   convention).  Encoded and decoded with C{orjson} (about 3-5x faster than the
   standard library on WAMP-sized messages), falling back to the standard library for
   what C{orjson} refuses (integers beyond 64 bits, NaN, lone surrogates), so that
   anything the standard library accepts is still accepted;
 - MsgPack: C{msgpack} with C{use_bin_type=True} / C{raw=False}, as autobahn;
 - CBOR: C{cbor2}, as autobahn.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct

import cbor2
import msgpack
import orjson
from autobahn.wamp.exception import ProtocolError
from autobahn.wamp.serializer import Serializer

# type code -> autobahn message class
MESSAGE_CLASSES = dict(Serializer.MESSAGE_TYPE_MAP)


def to_message(m):
    """
    The autobahn message object for the decoded message C{m} (a list), with the same
    checks and errors (L{ProtocolError}) as autobahn's serializers.
    """
    if type(m) is not list:
        raise ProtocolError(f"invalid type {type(m)} for WAMP message")
    if not m:
        raise ProtocolError("missing message type in WAMP message")
    kind = m[0]
    if type(kind) is not int:
        raise ProtocolError(f"invalid type {type(kind)} for WAMP message type")
    klass = MESSAGE_CLASSES.get(kind)
    if klass is None:
        raise ProtocolError(f"invalid WAMP message type {kind}")
    return klass.parse(m)


def _app_payload(rest):
    """(args, kwargs, payload) from what follows a message's details."""
    if not rest:
        return None, None, None
    first = rest[0]
    if type(first) in (str, bytes):
        return None, None, first
    return first, (rest[1] if len(rest) > 1 else None), None


def router_message(m):
    """
    The autobahn message object for a list the router built itself (in-process sessions
    take objects): INVOCATION, RESULT, EVENT and PUBLISHED are made directly from their
    fields, without re-checking what the router just wrote; others go through
    L{to_message}.
    """
    kind = m[0]
    if kind == 68:
        args, kwargs, payload = _app_payload(m[4:])
        return _Invocation(m[1], m[2], args, kwargs, payload, **m[3])
    if kind == 50:
        args, kwargs, payload = _app_payload(m[3:])
        return _Result(m[1], args, kwargs, payload, **m[2])
    if kind == 36:
        args, kwargs, payload = _app_payload(m[4:])
        return _Event(m[1], m[2], args, kwargs, payload, **m[3])
    if kind == 17:
        return _Published(m[1], m[2])
    return to_message(m)


_Invocation, _Result, _Event, _Published = (MESSAGE_CLASSES[k] for k in (68, 50, 36, 17))


# --- JSON ----------------------------------------------------------------------------------


def _json_default(obj):
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return "\x00" + base64.b64encode(bytes(obj)).decode("ascii")
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


class _StdlibEncoder(json.JSONEncoder):
    def default(self, obj):
        return _json_default(obj)


_stdlib_dumps = _StdlibEncoder(separators=(",", ":"), ensure_ascii=False).encode


def json_dumps(obj):
    """C{obj} as compact UTF-8 JSON bytes, binary as autobahn encodes it."""
    try:
        return orjson.dumps(obj, default=_json_default)
    except (TypeError, orjson.JSONEncodeError):
        # e.g. an integer beyond 64 bits or a non-string key: the standard library
        # writes what autobahn would
        return _stdlib_dumps(obj).encode("utf-8")


def stacked_unsent_bytes(transport):
    """
    Bytes written to a Twisted transport (or a stack of wrapping transports, e.g.
    TLS) and not yet sent to the network.
    """
    n = 0
    t = transport
    for _ in range(4):
        if t is None:
            break
        buf = getattr(t, "dataBuffer", None)
        if buf is not None:
            try:
                n += len(buf) - getattr(t, "offset", 0) + getattr(t, "_tempDataLen", 0)
            except TypeError:
                pass
        t = getattr(t, "transport", None)
    return n


def debinary(obj):
    """autobahn's JSON convention: a string that starts with NUL is base64 of bytes."""
    if isinstance(obj, str):
        if obj[:1] == "\x00":
            return base64.b64decode(obj[1:], validate=True)
        return obj
    if isinstance(obj, list):
        return [debinary(x) for x in obj]
    if isinstance(obj, dict):
        return {k: debinary(v) for k, v in obj.items()}
    return obj


def json_loads(payload):
    """
    Decode one JSON WAMP message (bytes); binary strings become bytes.

    @raise ProtocolError: not JSON, or a malformed binary string.
    """
    try:
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            obj = json.loads(payload)  # what orjson refuses but the standard library reads
        if b"\\u0000" in payload:
            obj = debinary(obj)
    except (ValueError, UnicodeDecodeError, binascii.Error, TypeError, RecursionError) as e:
        raise ProtocolError(f"invalid serialization of WAMP message: {type(e).__name__} {e}") from e
    return obj


# --- MsgPack and CBOR -----------------------------------------------------------------------


def msgpack_dumps(obj):
    return msgpack.packb(obj, use_bin_type=True)


def msgpack_loads(payload):
    try:
        return msgpack.unpackb(payload, raw=False)
    except Exception as e:
        raise ProtocolError(f"invalid serialization of WAMP message: {type(e).__name__} {e}") from e


def cbor_dumps(obj):
    return cbor2.dumps(obj)


def cbor_loads(payload):
    try:
        return cbor2.loads(payload)
    except Exception as e:
        raise ProtocolError(f"invalid serialization of WAMP message: {type(e).__name__} {e}") from e


class Codec:
    """
    How one serializer turns lists into bytes and back.

    @ivar name: C{"json"}, C{"msgpack"} or C{"cbor"}.
    @ivar binary: whether its WebSocket frames are binary.
    """

    __slots__ = ("name", "binary", "dumps", "loads")

    def __init__(self, name, binary, dumps, loads):
        self.name = name
        self.binary = binary
        self.dumps = dumps
        self.loads = loads


CODECS = {
    "json": Codec("json", False, json_dumps, json_loads),
    "msgpack": Codec("msgpack", True, msgpack_dumps, msgpack_loads),
    "cbor": Codec("cbor", True, cbor_dumps, cbor_loads),
}


def codec_for(serializer):
    """The L{Codec} for an autobahn serializer instance (C{None} for others, e.g. batched)."""
    sid = getattr(serializer, "SERIALIZER_ID", None)
    return CODECS.get(sid)


# --- WebSocket frames -----------------------------------------------------------------------

_H16 = struct.Struct("!BBH")
_H64 = struct.Struct("!BBQ")


def ws_frame(payload, binary):
    """One unmasked, final WebSocket data frame (server to client) carrying C{payload}."""
    op = 0x82 if binary else 0x81
    n = len(payload)
    if n < 126:
        return bytes((op, n)) + payload
    if n < 65536:
        return _H16.pack(op, 126, n) + payload
    return _H64.pack(op, 127, n) + payload


def unmask(payload, mask):
    """C{payload} XOR the repeated 4-byte C{mask} (one big-integer XOR, no per-frame objects)."""
    n = len(payload)
    if not n:
        return b""
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


__all__ = ["CODECS", "Codec", "MESSAGE_CLASSES", "codec_for", "json_dumps", "json_loads", "router_message",
           "to_message", "unmask", "ws_frame"]
