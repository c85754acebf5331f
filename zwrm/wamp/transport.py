"""
Transports for the router: WebSocket and RawSocket listeners (plain or TLS, any
Twisted endpoint string) and an in-memory transport pair for in-process sessions and
unit tests.

A WebSocket listener serves WAMP at C{ws[s]://host:port/ws} with the subprotocols
C{wamp.2.json}, C{wamp.2.msgpack} and C{wamp.2.cbor}; a RawSocket listener speaks
WAMP-over-RawSocket with the same serializers.
"""

from __future__ import annotations

import binascii
import json
import struct
from collections import deque

import txaio
from autobahn.exception import PayloadExceededError
from autobahn.twisted import rawsocket as _rawsocket
from autobahn.twisted import websocket as _websocket
from autobahn.twisted.resource import WebSocketResource
from autobahn.wamp.exception import ProtocolError, SerializationError, TransportLost
from autobahn.wamp.interfaces import ITransport
from autobahn.wamp.serializer import (
    CBORSerializer,
    JsonObjectSerializer,
    JsonSerializer,
    MsgPackSerializer,
    Serializer,
)
from autobahn.wamp.types import TransportDetails
from autobahn.websocket.protocol import WebSocketProtocol
from OpenSSL import SSL
from twisted.internet import defer, tcp
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.protocols.basic import StringTooLongError
from twisted.web.server import Site

from zwrm.endpoints import tls_error_text
from zwrm.sockets import write_now
from zwrm.wamp.wire import (
    codec_for,
    debinary,
    router_message,
    stacked_unsent_bytes,
    to_message,
    unmask,
    ws_frame,
)
from zwrm.web import Root

log = Logger()


class FastJsonObjectSerializer(JsonObjectSerializer):
    """
    autobahn's JSON object serializer, but parsing with the C scanner.  autobahn's
    decoder swaps in the pure-Python scanner to spot binary strings, which makes
    parsing about four times slower; here binary strings (NUL + base64) are converted
    after parsing, and only when the payload contains one.
    """

    def unserialize(self, payload):
        if self._batched:
            return JsonObjectSerializer.unserialize(self, payload)
        try:
            obj = json.loads(payload)
            if b"\\u0000" in payload:
                obj = debinary(obj)
        except (ValueError, UnicodeDecodeError, binascii.Error) as e:
            raise ProtocolError(f"invalid JSON: {e}") from e
        return [obj]


class FastJsonSerializer(JsonSerializer):
    """L{JsonSerializer} with L{FastJsonObjectSerializer} (same wire format)."""

    def __init__(self, batched=False):
        Serializer.__init__(self, FastJsonObjectSerializer(batched=batched))
        if batched:
            self.SERIALIZER_ID = "json.batched"


SERIALIZERS = {"json": FastJsonSerializer, "msgpack": MsgPackSerializer, "cbor": CBORSerializer}


def make_serializers(names):
    """Autobahn serializer instances for C{names} (C{"json"}, C{"msgpack"}, C{"cbor"})."""
    out = []
    for name in names:
        if name not in SERIALIZERS:
            raise ValueError(f"unknown WAMP serializer {name!r}; known: {sorted(SERIALIZERS)}")
        out.append(SERIALIZERS[name]())
    return out


def unsent_bytes(transport):
    """
    Bytes written to a Twisted transport (or a stack of wrapping transports, e.g.
    TLS) and not yet sent to the network.
    """
    t = transport
    while isinstance(t, policies.ProtocolWrapper):  # e.g. the control plane's plain-only listener
        t = t.transport
    if type(t) is tcp.Server and not t.TLS:
        return len(t.dataBuffer) - t.offset + t._tempDataLen
    return stacked_unsent_bytes(transport)


def _malformed(session, e):
    if session is not None and hasattr(session, "protocol_violation"):
        session.protocol_violation(f"malformed message: {e}")
        return True
    return False


class _QuietWebSocketMixin:
    """
    autobahn's WebSocket protocols format a log line (with terminal colours) for
    every read, write and WAMP message even when that log level is off; that costs
    more than routing the message.  These overrides do the same work without it.
    """

    def dataReceived(self, data):
        self._dataReceived(data)

    def connectionLost(self, reason):
        if isinstance(reason.value, SSL.Error):
            # autobahn logs a failed TLS connection at error level ("SSL error: ..."), and
            # only logs: the client's owner says why in its own words (the agent's warning
            # with its retry), and on a listener it is the peer's mistake, not the
            # server's: one info line.
            if self.factory.isServer:
                log.info("TLS with {peer} failed: {why}", peer=self.peer,
                         why=tls_error_text(reason.value) or "no reason given")
            self._connectionLost(reason)
        else:
            super().connectionLost(reason)
        # autobahn cancels its other timers when the connection is lost, but not the
        # closing-handshake timer (nor a client's wait for the server to drop TCP): a
        # peer that goes away mid-close would leave them pending
        for name in ("closeHandshakeTimeoutCall", "serverConnectionDropTimeoutCall"):
            call = getattr(self, name, None)
            if call is not None:
                setattr(self, name, None)
                try:
                    call.cancel()
                except Exception:
                    pass  # already fired or cancelled

    def sendData(self, data, sync=False, chopsize=None):
        if sync or chopsize or self.send_queue or self.state != WebSocketProtocol.STATE_OPEN:
            return super().sendData(data, sync, chopsize)
        self.transport.write(data)
        if self.logOctets:
            self.logTxOctets(data, False)

    def send(self, msg):
        if self._session is None:
            raise TransportLost()
        try:
            payload, is_binary = self._serializer.serialize(msg)
        except Exception as e:
            raise SerializationError(f"WAMP message serialization error: {e}") from e
        self.sendMessage(payload, is_binary)

    def onMessage(self, payload, isBinary):
        session = self._session
        if session is None:
            return
        try:
            msgs = self._serializer.unserialize(payload, isBinary)
        except Exception as e:
            if not _malformed(session, e):
                self._bailout(1002, f"WAMP Protocol Error ({e})")
            return
        for msg in msgs:
            if self._session is None:
                break
            try:
                self._session.onMessage(msg)
            except ProtocolError as e:
                self._bailout(1002, f"WAMP Protocol Error ({e})")
                return


_OPEN = WebSocketProtocol.STATE_OPEN


class _HeldWrites:
    """
    What a server protocol sends while a network read is handled (the router's
    L{LocalDelivery} scope: the answers to what was read, events it published) is held
    and sent when that read has been handled, all of it in one C{send()} straight to the
    socket (L{write_now}); other writes go through Twisted's transport.
    """

    _held = None  # bytes held until the end of the read being handled
    _held_len = 0

    def _write(self, data):
        """Write C{data}: held until the end of the read being handled, if one is."""
        held = self._held
        if held is not None:
            held.append(data)
            self._held_len += len(data)
            return
        delivery = getattr(self.factory, "local_delivery", None)
        if delivery is not None and delivery.after_scope(self._send_held):
            self._held = [data]
            self._held_len = len(data)
            return
        self.transport.write(data)

    def _send_held(self):
        held = self._held
        if held is None:
            return
        self._drop_held()
        write_now(self.transport, held[0] if len(held) == 1 else b"".join(held))

    def _drop_held(self):
        self._held = None
        self._held_len = 0


class WampWebSocketServerProtocol(_HeldWrites, _QuietWebSocketMixin,
                                 _websocket.WampWebSocketServerProtocol):
    """
    Autobahn's WAMP-over-WebSocket server protocol, except that a message that does
    not parse ends the session with ABORT C{wamp.error.protocol_violation} instead
    of a bare close, and with a lean path for the common case:

     - incoming: whole, masked, unfragmented text or binary frames (of the
       negotiated kind, with a 7- or 16-bit length) are cut out of the received bytes,
       unmasked with one integer XOR and decoded to a list that goes to the router's
       L{RouterSession.on_list}, with no per-frame objects.  Anything else (control
       frames, fragments, partial frames, large or invalid frames) goes to autobahn's
       frame parser from that byte on, so its checks and close codes are unchanged;
     - outgoing: message lists (L{send_list}) are serialized once (shared between
       the subscribers of one event) and written as one unmasked frame.

    Frames sent while a network read is handled (the router's L{LocalDelivery} scope:
    the answers to what was read, events it published) are held and sent when that
    read has been handled, all of one connection's in one C{send()} straight to the
    socket (L{write_now}); a heartbeat is read and answered in one reactor turn.  Other
    writes go through Twisted's transport, which sends them in the next turn.
    """

    _codec = None
    _traffic = False  # data frames came on the lean path since the last auto-ping was due

    def _connectionMade(self):
        # autobahn copies the factory's options onto the protocol and pretty-prints them
        # all for a debug line that is never emitted: about 2 ms per connection, 20 s of
        # CPU when 10,000 agents reconnect.  Copy them here and let it print nothing.
        for name in type(self).CONFIG_ATTRS:
            if not hasattr(self, name):
                setattr(self, name, getattr(self.factory, name))
        self.CONFIG_ATTRS = ()
        super()._connectionMade()

    def onOpen(self):
        self._codec = codec_for(self._serializer)
        super().onOpen()

    def connectionLost(self, reason):
        self._drop_held()
        super().connectionLost(reason)
        # autobahn resolves is_closed with the protocol itself: a reference cycle that
        # would keep every closed connection for the cycle collector
        if self.is_closed.called:
            self.is_closed = defer.succeed(None)

    def sendData(self, data, sync=False, chopsize=None):
        if self._held is not None:  # the frames held for this read go first
            self._send_held()
        super().sendData(data, sync, chopsize)

    def dropConnection(self, abort=False):
        if self._held is not None:
            if abort:
                self._drop_held()
            else:
                self._send_held()
        super().dropConnection(abort)

    def dataReceived(self, data):
        delivery = self.factory.local_delivery
        if delivery is None:
            self._receive(data)
            return
        delivery.enter()  # in-process sessions' answers go out in this turn (LocalDelivery)
        try:
            self._receive(data)
        finally:
            delivery.leave()

    def _receive(self, data):
        if (self._codec is not None and self.state == _OPEN and self.current_frame is None
                and not self.inside_message and not self.data):
            data = self._fast_frames(data)
            if not data:
                return
        self._dataReceived(data)

    def _fast_frames(self, data):
        """Handle the leading plain frames of C{data}; return the bytes left for autobahn."""
        codec = self._codec
        first = 0x82 if codec.binary else 0x81
        limit = self.maxMessagePayloadSize or 0
        frame_limit = self.maxFramePayloadSize or 0
        if frame_limit and (not limit or frame_limit < limit):
            limit = frame_limit
        pos = 0
        n = len(data)
        while pos + 6 <= n:
            if data[pos] != first:
                break
            b1 = data[pos + 1]
            if not b1 & 0x80:
                break  # unmasked: autobahn fails the connection
            length = b1 & 0x7F
            if length < 126:
                head = pos + 6
            elif length == 126:
                if pos + 8 > n:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < 126:
                    break
                head = pos + 8
            else:
                break
            end = head + length
            if end > n or (limit and length > limit):
                break
            payload = unmask(data[head:end], data[head - 4:head])
            if not codec.binary:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    break  # autobahn closes with 1007
            pos = end
            self._wamp_payload(payload)
            if self.state != _OPEN:
                break
        if pos:
            self._traffic = True
        return data[pos:] if pos else data

    def _sendAutoPing(self):
        # autobahn's autoPingRestartOnAnyTraffic (its default) for the frames of the lean
        # path, which autobahn's parser never sees: a connection that sent data frames
        # since its last ping is alive, so it is pinged one interval later instead of now
        # (agents send a heartbeat every 5 s: with a 30 s ping, 1,000 hosts would
        # otherwise cost 33 pings and pongs a second, each a write, a read and a timer)
        if self._traffic and self.autoPingRestartOnAnyTraffic and self.state == _OPEN:
            self._traffic = False
            self.autoPingPendingCall = self.factory._batched_timer.call_later(
                self.autoPingInterval, self._sendAutoPing)
            return
        self._traffic = False
        super()._sendAutoPing()

    def _wamp_payload(self, payload):
        session = self._session
        if session is None:
            return
        try:
            m = self._codec.loads(payload)
        except Exception as e:
            if not _malformed(session, e):
                self._bailout(1002, f"WAMP Protocol Error ({e})")
            return
        on_list = getattr(session, "on_list", None)
        if on_list is not None:
            on_list(m)
            return
        try:
            msg = to_message(m)
        except Exception as e:
            if not _malformed(session, e):
                self._bailout(1002, f"WAMP Protocol Error ({e})")
            return
        session.onMessage(msg)

    def onMessage(self, payload, isBinary):
        codec = self._codec
        if codec is None:
            return super().onMessage(payload, isBinary)
        if self._session is None:
            return
        if isBinary != codec.binary:
            e = ProtocolError(f"invalid serialization of WAMP message (binary {isBinary}, "
                              f"but expected {codec.binary})")
            if not _malformed(self._session, e):
                self._bailout(1002, f"WAMP Protocol Error ({e})")
            return
        self._wamp_payload(payload)

    def send(self, msg):
        if self._codec is None:
            return super().send(msg)
        self.send_list(msg.marshal())

    def send_list(self, m, cache=None):
        """Send the WAMP message list C{m}; C{cache} shares the frame between sessions."""
        if self._session is None:
            raise TransportLost()
        codec = self._codec
        plain = self.state == _OPEN and not self.send_queue and self._perMessageCompress is None
        if plain and cache is not None:
            frame = cache.get(codec)
            if frame is not None:
                self._write(frame)
                return
        try:
            payload = codec.dumps(m)
        except Exception as e:
            raise SerializationError(f"WAMP message serialization error: {e}") from e
        if not plain:
            self.sendMessage(payload, codec.binary)
            return
        frame = ws_frame(payload, codec.binary)
        if cache is not None:
            cache[codec] = frame
        self._write(frame)

    def unsent_bytes(self):
        """Bytes written to this connection and not yet on the network."""
        return unsent_bytes(self.transport) + self._held_len


class WampWebSocketClientProtocol(_QuietWebSocketMixin, _websocket.WampWebSocketClientProtocol):
    """autobahn's WAMP-over-WebSocket client protocol without the per-message log formatting."""


class WampWebSocketClientFactory(_websocket.WampWebSocketClientFactory):
    """
    A WAMP-over-WebSocket client factory (for agents, the CLI and benchmarks):
    C{WampWebSocketClientFactory(session_factory, url=..., serializers=[...])}.
    """

    protocol = WampWebSocketClientProtocol


class WampWebSocketServerFactory(_websocket.WampWebSocketServerFactory):
    protocol = WampWebSocketServerProtocol
    local_delivery = None  # the router's LocalDelivery (websocket_factory sets it)


class WampRawSocketServerProtocol(_HeldWrites, _rawsocket.WampRawSocketServerProtocol):
    """
    Autobahn's WAMP-over-RawSocket server protocol with the same ABORT on a
    malformed message, and the WebSocket protocol's writes: messages sent while a read
    is handled are held until its end and sent in one C{send()} (L{write_now}).
    """

    def sendString(self, string):
        if len(string) >= 2 ** (8 * self.prefixLength):
            raise StringTooLongError(
                f"Try to send {len(string)} bytes whereas maximum is {2 ** (8 * self.prefixLength)}")
        self._write(struct.pack(self.structFormat, len(string)) + string)

    def close(self):
        self._send_held()
        _rawsocket.WampRawSocketServerProtocol.close(self)

    def abort(self):
        self._drop_held()
        _rawsocket.WampRawSocketServerProtocol.abort(self)

    def connectionMade(self):
        _rawsocket.WampRawSocketServerProtocol.connectionMade(self)
        # RawSocket has no ping: let TCP keepalive find dead peers
        for option in ("setTcpNoDelay", "setTcpKeepAlive"):
            if hasattr(self.transport, option):
                try:
                    getattr(self.transport, option)(True)
                except Exception:
                    pass

    def connectionLost(self, reason):
        self._drop_held()
        _rawsocket.WampRawSocketServerProtocol.connectionLost(self, reason)
        # autobahn resolves is_closed with the protocol itself: a reference cycle that
        # would keep every closed connection (and its TCP transport) for the cycle collector
        if self.is_closed.called:
            self.is_closed = defer.succeed(None)

    _codec = None

    def dataReceived(self, data):
        delivery = getattr(self.factory, "local_delivery", None)
        if delivery is None:
            return _rawsocket.WampRawSocketServerProtocol.dataReceived(self, data)
        delivery.enter()  # in-process sessions' answers go out in this turn (LocalDelivery)
        try:
            return _rawsocket.WampRawSocketServerProtocol.dataReceived(self, data)
        finally:
            delivery.leave()

    def stringReceived(self, payload):
        session = self._session
        if session is None:
            return
        codec = self._codec
        if codec is None:
            codec = self._codec = codec_for(self._serializer)
        on_list = getattr(session, "on_list", None)
        if codec is None or on_list is None:
            try:
                msgs = self._serializer.unserialize(payload)
            except Exception as e:
                if not _malformed(session, e):
                    self.abort()
                return
            for msg in msgs:
                if self._session is None:
                    break
                self._session.onMessage(msg)
            return
        try:
            m = codec.loads(payload)
        except Exception as e:
            if not _malformed(session, e):
                self.abort()
            return
        on_list(m)

    def send_list(self, m, cache=None):
        """Send the WAMP message list C{m} (serialized without a message object)."""
        if self._session is None:
            raise TransportLost()
        codec = self._codec
        if codec is None:
            codec = self._codec = codec_for(self._serializer)
            if codec is None:
                return self.send(to_message(m))
        payload = cache.get(codec) if cache is not None else None
        if payload is None:
            try:
                payload = codec.dumps(m)
            except Exception as e:
                raise SerializationError(f"WAMP message serialization error: {e}") from e
            if cache is not None:
                cache[codec] = payload
        if 0 < (self._max_len_send or 0) < len(payload):
            raise PayloadExceededError(
                f"message of {len(payload)} bytes exceeds the peer's limit of {self._max_len_send}")
        self.sendString(payload)

    def unsent_bytes(self):
        """Bytes written to this connection and not yet on the network."""
        return unsent_bytes(self.transport) + self._held_len


    def send(self, msg):
        if self._session is None:
            raise TransportLost()
        try:
            payload, _ = self._serializer.serialize(msg)
        except Exception as e:
            raise SerializationError(f"WAMP message serialization error: {e}") from e
        if 0 < (self._max_len_send or 0) < len(payload):
            raise PayloadExceededError(
                f"message of {len(payload)} bytes exceeds the peer's limit of {self._max_len_send}")
        self.sendString(payload)


class WampRawSocketServerFactory(_rawsocket.WampRawSocketServerFactory):
    protocol = WampRawSocketServerProtocol
    local_delivery = None  # the router's LocalDelivery (rawsocket_factory sets it)


def websocket_factory(router, url=None, serializers=("json", "msgpack", "cbor")):
    """
    A WAMP-over-WebSocket server factory for C{router}.  Mount it as a
    C{twisted.web} resource with C{autobahn.twisted.resource.WebSocketResource},
    or listen with it directly.
    """
    factory = WampWebSocketServerFactory(
        router.session_factory,
        url=url,
        serializers=make_serializers(serializers),
        reactor=router.reactor,
    )
    size = router.limits.max_message_size
    factory.setProtocolOptions(
        maxFramePayloadSize=size,
        maxMessagePayloadSize=size,
        openHandshakeTimeout=30,
        autoPingInterval=30,
        autoPingTimeout=30,
        failByDrop=False,
    )
    factory.local_delivery = getattr(router, "local_delivery", None)
    return factory


def rawsocket_factory(router, serializers=("json", "msgpack", "cbor")):
    """A WAMP-over-RawSocket server factory for C{router}."""
    factory = WampRawSocketServerFactory(router.session_factory, serializers=make_serializers(serializers))
    factory.setProtocolOptions(maxMessagePayloadSize=max(512, min(router.limits.max_message_size, 2**24)))
    factory.local_delivery = getattr(router, "local_delivery", None)
    return factory


class RouterWebSocketResource(WebSocketResource):
    """
    The router's WebSocket as a C{twisted.web} resource (mount it wherever the router is
    served on a web tree: C{root.putChild(b"ws", RouterWebSocketResource(websocket_factory(router)))}).

    autobahn's resource, except that once the WebSocket protocol has taken the connection
    over, the HTTP channel lets go of the request it came in: the channel and the
    request point at each other (C{channel.requests}, C{request.channel}) and nothing else
    ever will, so without this every closed connection would wait for the cycle collector
    (about 50 objects per closed session behind the control plane's site).
    """

    def render(self, request):
        result = super().render(request)
        channel = request.channel
        if channel is not None and channel.transport is None:  # taken over
            channel.requests = []
        return result


def websocket_site(router, path="/ws", serializers=("json", "msgpack", "cbor")):
    """A C{twisted.web} Site serving the router's WebSocket at C{path}."""
    root = Root()
    root.putChild(path.strip("/").encode("ascii"),
                  RouterWebSocketResource(websocket_factory(router, serializers=serializers)))
    return Site(root)


def listen(reactor, router, description, kind="websocket", path="/ws"):
    """
    Listen for WAMP clients on the Twisted server endpoint C{description}
    (e.g. C{"tcp:8080:interface=127.0.0.1"} or
    C{"ssl:8443:privateKey=key.pem:certKey=cert.pem:interface=127.0.0.1"}).

    @param kind: C{"websocket"} (served at C{path}, or at any path if C{path} is
        C{None}) or C{"rawsocket"}.
    @return: Deferred firing with the C{IListeningPort}.
    """
    if kind == "websocket":
        factory = websocket_site(router, path) if path and path.strip("/") else websocket_factory(router)
    elif kind == "rawsocket":
        factory = rawsocket_factory(router)
    else:
        return defer.fail(ValueError(f"unknown transport kind {kind!r}: use 'websocket' or 'rawsocket'"))
    try:
        endpoint = serverFromString(reactor, description)
    except Exception as e:
        return defer.fail(ValueError(f"bad listener endpoint {description!r}: {e}"))
    return endpoint.listen(factory)


def listener_service(reactor, router, description, kind="websocket", path="/ws"):
    """
    A C{twisted.application} service that listens like L{listen} while it runs (for
    C{makeService}); the endpoint string is checked now, so a bad one is an error at
    configuration time.
    """
    from twisted.application.internet import StreamServerEndpointService

    if kind == "websocket":
        factory = websocket_site(router, path) if path and path.strip("/") else websocket_factory(router)
    elif kind == "rawsocket":
        factory = rawsocket_factory(router)
    else:
        raise ValueError(f"unknown transport kind {kind!r}: use 'websocket' or 'rawsocket'")
    try:
        endpoint = serverFromString(reactor, description)
    except Exception as e:
        raise ValueError(f"bad listener endpoint {description!r}: {e}") from e
    service = StreamServerEndpointService(endpoint, factory)
    service._raiseSynchronously = True
    return service


# --- in-memory transports -----------------------------------------------------------------


class _LocalSerializer:
    SERIALIZER_ID = "local"
    RAWSOCKET_SERIALIZER_ID = 0
    MIME_TYPE = "application/x-python-objects"


class MemoryTransport:
    """
    One end of a L{MemoryTransportPair}: the transport a handler sends through.
    """

    def __init__(self, pair, side):
        self._pair = pair
        self._side = side  # 0: router side, 1: client side
        self.handler = None
        self.is_closed = txaio.create_future()
        self.paused = False  # for tests: hold messages to this end's handler
        self._serializer = pair.serializer or _LocalSerializer()
        self._transport_details = TransportDetails(
            channel_type=TransportDetails.CHANNEL_TYPE_FUNCTION,
            channel_framing=TransportDetails.CHANNEL_FRAMING_NATIVE,
            channel_serializer=TransportDetails.CHANNEL_SERIALIZER_NONE,
            peer="memory",
            is_server=side == 0,
        )
        self.transport = None

    @property
    def transport_details(self):
        return self._transport_details

    def isOpen(self):
        return not self._pair.closed

    def send(self, msg):
        if self._pair.closed:
            raise TransportLost()
        self._pair._send(1 - self._side, msg)

    def send_list(self, m, cache=None):
        """Send a WAMP message given as a list (see L{RouterSession.send_list})."""
        if self._pair.closed:
            raise TransportLost()
        self._pair._send_list(1 - self._side, m)

    def send_bytes(self, payload, is_binary=False):
        """Deliver raw serialized bytes to the other end (for tests)."""
        self._pair._enqueue(1 - self._side, ("bytes", (payload, is_binary)))

    def unsent_bytes(self):
        """Bytes (or message count, unserialized) waiting for the other end."""
        return self._pair.backlog(1 - self._side)

    def close(self):
        if self._pair.closed:
            raise TransportLost()
        self._pair.close()

    def abort(self):
        if not self._pair.closed:
            self._pair.close()


ITransport.register(MemoryTransport)


class _ClosedPair:
    """What the ends of a closed L{MemoryTransportPair} point to (see C{_flush})."""

    closed = True

    def _enqueue(self, side, item):
        pass

    def backlog(self, side):
        return 0

    def close(self):
        pass


_CLOSED_PAIR = _ClosedPair()


class LocalDelivery:
    """
    When the messages of in-process sessions (L{MemoryTransportPair}s) are delivered.

    A message is never delivered while its sender, or the handler it goes to, is on the
    stack.  Outside a network read it waits for a later reactor turn (C{callLater(0)}),
    as before.  During one (L{scope}: the router's WebSocket and RawSocket protocols
    enter it around C{dataReceived}) it waits only until that read has been handled:
    the scope's end delivers it, and whatever the handlers send meanwhile, in order.
    So a call from an agent to the control plane's in-process session (INVOCATION in,
    YIELD back, RESULT out) is answered in the turn that read it, without the two
    extra reactor turns (timer heap, C{epoll_wait}) that C{callLater(0)} costs each
    way.  At most L{MAX_PER_SCOPE} deliveries run at one scope's end (sessions that
    call each other without end cannot keep the reactor from its other work); the
    rest go to a later turn.

    @ivar deferred_flushes: deliveries that went to a later reactor turn.
    @ivar scoped_flushes: deliveries run at the end of a read.
    """

    MAX_PER_SCOPE = 256

    def __init__(self, reactor):
        self.reactor = reactor
        self._depth = 0
        self._pending = deque()
        self._after = []
        self.deferred_flushes = 0
        self.scoped_flushes = 0

    def after_scope(self, call):
        """
        Inside a scope: call C{call()} when the outermost one ends, after its deliveries,
        and return C{True} (the WebSocket protocol sends the frames it held then).
        Outside any: C{False}, and nothing is done.
        """
        if not self._depth:
            return False
        self._after.append(call)
        return True

    def schedule(self, flush):
        """Call C{flush()} at the end of the current scope, or in a later reactor turn."""
        if self._depth:
            self._pending.append(flush)
        else:
            self.deferred_flushes += 1
            self.reactor.callLater(0, self.run, flush)

    def run(self, flush):
        """Call C{flush()} inside a scope (and what it schedules at the scope's end)."""
        self._depth += 1
        try:
            flush()
        finally:
            self._leave()

    def enter(self):
        """Begin a scope (a network read is being handled)."""
        self._depth += 1

    def leave(self):
        """End a scope; the outermost one delivers what waited for it."""
        self._leave()

    def _leave(self):
        if self._depth > 1 or not (self._pending or self._after):
            self._depth -= 1
            return
        pending = self._pending
        n = 0
        try:
            while pending and n < self.MAX_PER_SCOPE:
                n += 1
                flush = pending.popleft()
                try:
                    flush()
                except Exception:
                    log.failure("memory transport: delivery failed")
        finally:
            self._depth -= 1
            self.scoped_flushes += n
            while pending:  # the rest in a later turn, in order
                self.deferred_flushes += 1
                self.reactor.callLater(0, self.run, pending.popleft())
            if self._after:
                after, self._after = self._after, []
                for call in after:
                    try:
                        call()
                    except Exception:
                        log.failure("memory transport: a write held for the end of a read failed")


class MemoryTransportPair:
    """
    Two connected L{MemoryTransport}s.  Every message is delivered later, in order, so
    neither side is ever re-entered: in a later reactor turn (C{callLater(0, ...)}), or
    at the end of the network read being handled (see L{LocalDelivery}).

    @param serializer: if given (an autobahn serializer), messages are serialized
        and parsed on the way, as on a real connection.
    @param delivery: the L{LocalDelivery} that schedules deliveries (the router's, for
        its attached sessions; by default one of its own: a later reactor turn).
    """

    def __init__(self, reactor, serializer=None, delivery=None):
        self.reactor = reactor
        self.serializer = serializer
        self.closed = False
        self.ends = (MemoryTransport(self, 0), MemoryTransport(self, 1))
        self._queue = deque()
        self._held = (deque(), deque())
        self._scheduled = False
        self._delivery = delivery if delivery is not None else LocalDelivery(reactor)

    def connect(self, server_handler, client_handler):
        """Open both handlers (the server's first)."""
        self.ends[0].handler = server_handler
        self.ends[1].handler = client_handler
        server_handler.onOpen(self.ends[0])
        client_handler.onOpen(self.ends[1])

    def _send(self, side, msg):
        if self.serializer is not None:
            try:
                payload, is_binary = self.serializer.serialize(msg)
            except Exception as e:
                raise SerializationError(f"WAMP message serialization error: {e}") from e
            self._enqueue(side, ("bytes", (payload, is_binary)))
        else:
            self._enqueue(side, ("msg", msg))

    def _send_list(self, side, m):
        codec = codec_for(self.serializer) if self.serializer is not None else None
        if codec is None:
            if self.serializer is None and getattr(self.ends[side].handler, "on_list", None) is not None:
                # a handler that takes lists (the router's session, a LocalCallee): no objects
                self._enqueue(side, ("list", m))
            else:
                self._send(side, router_message(m))
            return
        try:
            payload = codec.dumps(m)
        except Exception as e:
            raise SerializationError(f"WAMP message serialization error: {e}") from e
        self._enqueue(side, ("bytes", (payload, codec.binary)))

    def _enqueue(self, side, item):
        end = self.ends[side]
        if end.paused:
            self._held[side].append(item)
            return
        self._queue.append((side, item))
        self._schedule()

    def _schedule(self):
        if not self._scheduled:
            self._scheduled = True
            self._delivery.schedule(self._flush)

    def backlog(self, side):
        n = 0
        for kind, value in self._held[side]:
            n += len(value[0]) if kind == "bytes" else 1
        return n

    def resume(self, side):
        """Release messages held for a paused end."""
        end = self.ends[side]
        end.paused = False
        held = self._held[side]
        while held:
            self._queue.append((side, held.popleft()))
        self._schedule()

    def close(self):
        if self.closed:
            return
        self.closed = True
        for side in (0, 1):
            self._queue.append((side, ("close", None)))
        self._schedule()

    def _flush(self):
        self._scheduled = False
        n = len(self._queue)
        for _ in range(n):
            side, (kind, value) = self._queue.popleft()
            handler = self.ends[side].handler
            if handler is None:
                continue
            try:
                if kind == "close":
                    self.ends[side].handler = None
                    if not self.ends[side].is_closed.called:
                        self.ends[side].is_closed.callback(None)
                    handler.onClose(True)
                elif kind == "msg":
                    handler.onMessage(value)
                elif kind == "list":
                    handler.on_list(value)
                else:
                    self._deliver_bytes(side, handler, value)
            except Exception:
                log.failure("memory transport: handler failed")
        if self._queue:
            self._schedule()
        elif self.closed and self.ends[0].handler is None and self.ends[1].handler is None:
            # both ends are told: let go of each other, so that nothing of a closed
            # connection waits for the cycle collector
            for end in self.ends:
                end._pair = _CLOSED_PAIR

    def _deliver_bytes(self, side, handler, value):
        payload, is_binary = value
        serializer = self.serializer or JsonSerializer()
        codec = codec_for(serializer)
        on_list = getattr(handler, "on_list", None)
        if codec is not None and on_list is not None:
            # as the WebSocket and RawSocket transports do: decode to a list for the router
            try:
                if is_binary != codec.binary:
                    raise ProtocolError(f"invalid serialization of WAMP message (binary {is_binary}, "
                                        f"but expected {codec.binary})")
                m = codec.loads(payload)
            except Exception as e:
                if not _malformed(handler, e):
                    self.close()
                return
            on_list(m)
            return
        try:
            msgs = serializer.unserialize(payload, is_binary)
        except Exception as e:
            if not _malformed(handler, e):
                self.close()
            return
        for msg in msgs:
            if self.ends[side].handler is None:
                break
            handler.onMessage(msg)
