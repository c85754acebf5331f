"""
The embedded WAMP router: one realm, sessions, a broker and a dealer.

The router speaks WAMP v2 (basic profile plus the advanced features it announces in
WELCOME) over any autobahn transport: the WebSocket and RawSocket factories in
L{zwrm.wamp.transport} and the in-memory pair used by L{Router.attach} and the unit
tests.  A transport calls the handler made by L{Router.session_factory}
(L{RouterSession}) with parsed C{autobahn.wamp.message} objects; the handler sends
its replies through C{transport.send}.

Policies:
 - Authentication is done by an L{IAuthenticator}; anonymous sessions are refused
   unless it offers C{"anonymous"}.
 - Every CALL, REGISTER, PUBLISH and SUBSCRIBE is checked with the L{IAuthorizer}.
 - Callers and publishers are always disclosed to callees and subscribers
   (C{caller}, C{caller_authid}, C{caller_authrole}; the same for publishers).
 - Slow consumers: when more than C{RouterLimits.max_outgoing_queue} bytes wait
   unsent toward a session, EVENTs to it are dropped (counted in
   L{RouterSession.dropped_events}); when four times that much waits (RESULTs and
   INVOCATIONs are never dropped), the session is disconnected.  What waits is counted
   before each message is added, so one large RESULT or INVOCATION (a long listing, a
   volume's hashes) does not cut its session off by itself; a session that does not read
   is cut off at the next message.
 - Protocol violations (a malformed or unknown message, a message out of order, a
   router-to-client message sent by a client) end that session with ABORT
   C{wamp.error.protocol_violation}; other sessions are not affected.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import txaio
from autobahn.wamp import message
from autobahn.wamp.exception import ApplicationError, ProtocolError, SerializationError
from autobahn.wamp.role import RoleBrokerFeatures, RoleDealerFeatures
from autobahn.wamp.types import TransportDetails
from twisted.internet import defer
from twisted.logger import Logger

from zwrm.errors import AuthenticationFailed
from zwrm.wamp.auth import Principal, verify_cryptosign, wampcra_signature, wildcard_match
from zwrm.wamp.wire import stacked_unsent_bytes, to_message

log = Logger()

PROTOCOL_VIOLATION = "wamp.error.protocol_violation"
DUPLICATE_REQUEST = "zwrm.error.invalid_argument"
_MAX_ID = 2**53

# message type codes on the hot path
_ERROR, _PUBLISH, _PUBLISHED, _EVENT = 8, 16, 17, 36
_CALL, _RESULT, _INVOCATION, _YIELD = 48, 50, 68, 70

# messages a client sends with a request id; 0 is not a request id (they start at 1)
_CLIENT_REQUESTS = (
    message.Publish, message.Subscribe, message.Unsubscribe, message.Call, message.Cancel,
    message.Register, message.Unregister, message.Yield, message.Error,
)

# loose URI rule (autobahn's, non-empty components), cached for URIs seen before
_LOOSE_URI = re.compile(r"^([^\s\.#]+\.)*([^\s\.#]+)\Z")
_uri_ok_cache = {}


def _uri_ok(uri):
    """C{True} if C{uri} (a str) is a valid WAMP URI for CALL and PUBLISH (loose rule)."""
    ok = _uri_ok_cache.get(uri)
    if ok is None:
        ok = _LOOSE_URI.match(uri) is not None
        if len(_uri_ok_cache) >= 4096:
            _uri_ok_cache.clear()
        _uri_ok_cache[uri] = ok
    return ok


def _with_payload(m, args, kwargs):
    """Append C{args} / C{kwargs} to message list C{m} as autobahn marshals them."""
    if kwargs:
        m.append(args)
        m.append(kwargs)
    elif args:
        m.append(args)
    return m


def _add_enc(details, enc):
    if enc is not None:
        algo, key, ser = enc
        if algo is not None:
            details["enc_algo"] = algo
        if key is not None:
            details["enc_key"] = key
        if ser is not None:
            details["enc_serializer"] = ser


def _result_list(request, args, kwargs, payload, enc, progress):
    details = {"progress": True} if progress else {}
    if payload:
        _add_enc(details, enc)
        return [_RESULT, request, details, payload]
    return _with_payload([_RESULT, request, details], args, kwargs)


def _reserved_pattern(uri, match):
    """C{True} if a registration of C{uri} with C{match} could match a C{wamp.} URI."""
    if match == "prefix":
        return uri.startswith("wamp.") or "wamp.".startswith(uri)
    if match == "wildcard":
        return uri.split(".", 1)[0] in ("", "wamp")
    return uri.startswith("wamp.")


def _args_of(msg):
    """A message object's args as a list (in-process sessions may give a tuple)."""
    args = msg.args
    return list(args) if type(args) is tuple else args


def _enc_of(msg):
    return (msg.enc_algo, msg.enc_key, msg.enc_serializer) if msg.payload else None


def _random_id():
    return random.randint(1, _MAX_ID)


@dataclass(frozen=True)
class RouterLimits:
    """
    Limits that protect the router from one session.

    @ivar max_message_size: largest message (bytes) a client may send; larger ones
        end its connection (WebSocket close 1009 / RawSocket length limit).
    @ivar max_pending_calls_per_session: CALLs one session may have in flight;
        more are answered with ERROR C{zwrm.error.resource_exhausted}.
    @ivar max_outgoing_queue: bytes that may wait unsent toward one session before
        EVENTs to it are dropped; four times this disconnects it.
    @ivar call_timeout: seconds after which a call with no result is canceled with
        ERROR C{wamp.error.timeout} (0: none, unless the caller gives a timeout).
    @ivar join_timeout: seconds a new connection has to complete HELLO (and
        authentication) before it is dropped with ABORT C{wamp.error.timeout} (0: no
        limit).
    """

    max_message_size: int = 4 * 1024 * 1024
    max_pending_calls_per_session: int = 1000
    max_outgoing_queue: int = 4 * 1024 * 1024
    call_timeout: float = 0
    join_timeout: float = 30


BROKER_FEATURES = dict(
    publisher_identification=True,
    publisher_exclusion=True,
    subscriber_blackwhite_listing=True,
    pattern_based_subscription=True,
    session_meta_api=True,
)
DEALER_FEATURES = dict(
    caller_identification=True,
    progressive_call_results=True,
    call_canceling=True,
    call_timeout=True,
    pattern_based_registration=True,
    session_meta_api=True,
)


def router_roles():
    """The roles and features the router announces in WELCOME."""
    return {
        "broker": RoleBrokerFeatures(**BROKER_FEATURES),
        "dealer": RoleDealerFeatures(**DEALER_FEATURES),
    }


# --- broker / dealer bookkeeping ---------------------------------------------------------


class _Subscription:
    __slots__ = ("id", "uri", "match", "subscribers")

    def __init__(self, id, uri, match):
        self.id = id
        self.uri = uri
        self.match = match
        self.subscribers = OrderedDict()  # session_id -> RouterSession


class _Registration:
    __slots__ = ("id", "uri", "match", "callee", "handler")

    def __init__(self, id, uri, match, callee=None, handler=None):
        self.id = id
        self.uri = uri
        self.match = match
        self.callee = callee  # RouterSession, or None for a router procedure
        self.handler = handler  # callable(caller, args, kwargs) for router procedures


class _PendingCall:
    __slots__ = (
        "caller",
        "call_request",
        "callee",
        "invocation_request",
        "receive_progress",
        "timer",
        "canceled",
        "procedure",
        "started",
    )

    def __init__(self, caller, call_request, callee, invocation_request, receive_progress):
        self.caller = caller
        self.call_request = call_request
        self.callee = callee
        self.invocation_request = invocation_request
        self.receive_progress = receive_progress
        self.timer = None
        self.canceled = False
        self.procedure = None
        self.started = None  # reactor time of the CALL, when the router's call_observer is set


class _PatternTable:
    """
    Exact, prefix and wildcard lookup of URIs to items with C{.uri} and C{.match}.
    """

    def __init__(self):
        self.exact = {}
        self.prefix = {}
        self.wildcard = {}  # number of components -> {pattern: item}

    def get(self, uri, match):
        if match == "exact":
            return self.exact.get(uri)
        if match == "prefix":
            return self.prefix.get(uri)
        return self.wildcard.get(uri.count(".") + 1, {}).get(uri)

    def add(self, item):
        if item.match == "exact":
            self.exact[item.uri] = item
        elif item.match == "prefix":
            self.prefix[item.uri] = item
        else:
            self.wildcard.setdefault(item.uri.count(".") + 1, {})[item.uri] = item

    def remove(self, item):
        if item.match == "exact":
            self.exact.pop(item.uri, None)
        elif item.match == "prefix":
            self.prefix.pop(item.uri, None)
        else:
            bucket = self.wildcard.get(item.uri.count(".") + 1)
            if bucket is not None:
                bucket.pop(item.uri, None)
                if not bucket:
                    del self.wildcard[item.uri.count(".") + 1]

    def all_matches(self, uri):
        """Every item matching C{uri} (broker semantics)."""
        found = []
        item = self.exact.get(uri)
        if item is not None:
            found.append(item)
        if self.prefix:
            if len(self.prefix) < len(uri):
                for p, item in self.prefix.items():
                    if uri.startswith(p):
                        found.append(item)
            else:
                for i in range(1, len(uri) + 1):
                    item = self.prefix.get(uri[:i])
                    if item is not None:
                        found.append(item)
        if self.wildcard:
            bucket = self.wildcard.get(uri.count(".") + 1)
            if bucket:
                for p, item in bucket.items():
                    if wildcard_match(p, uri):
                        found.append(item)
        return found

    def best_match(self, uri):
        """The single best item for C{uri} (dealer semantics): exact, then the
        longest prefix, then the wildcard with the most literal components."""
        item = self.exact.get(uri)
        if item is not None:
            return item
        if self.prefix:
            for i in range(len(uri), 0, -1):
                item = self.prefix.get(uri[:i])
                if item is not None:
                    return item
        if self.wildcard:
            bucket = self.wildcard.get(uri.count(".") + 1)
            if bucket:
                best, score = None, -1
                for p, item in bucket.items():
                    if wildcard_match(p, uri):
                        s = sum(1 for c in p.split(".") if c)
                        if s > score:
                            best, score = item, s
                return best
        return None


# --- the per-connection session handler ---------------------------------------------------


_STATE_NEW = "new"
_STATE_CHALLENGED = "challenged"
_STATE_JOINED = "joined"
_STATE_CLOSING = "closing"  # we sent GOODBYE, waiting for the reply
_STATE_CLOSED = "closed"


class RouterSession:
    """
    The router's side of one client connection (an autobahn ITransportHandler).

    @ivar session_id: the WAMP session id once joined, else C{None}.
    @ivar authid / authrole / authextra / authmethod: the joined identity.
    @ivar dropped_events: EVENTs not delivered because the session was too slow.
    """

    def __init__(self, router, principal=None):
        self._router = router
        self._transport = None
        self._trusted_principal = principal
        self._state = _STATE_NEW
        self._challenge = None  # (method, data) while challenged
        self.session_id = None
        self.authid = None
        self.authrole = None
        self.authextra = {}
        self.authmethod = None
        self.authprovider = None
        self.client_roles = {}
        self.dropped_events = 0
        self.subscriptions = set()
        self.registrations = set()
        self.calls = {}  # caller request id -> _PendingCall (as caller)
        self.invocations = {}  # invocation request id -> _PendingCall (as callee)
        self._next_request = 0
        self._close_timer = None
        self._join_timer = None
        self.joined_at = None

    # autobahn's transports log these two
    @property
    def _session_id(self):
        return self.session_id

    @property
    def _authid(self):
        return self.authid

    # ITransportHandler ---------------------------------------------------------------

    @property
    def transport(self):
        return self._transport

    def onOpen(self, transport):
        self._transport = transport
        timeout = self._router.limits.join_timeout
        if timeout and self._trusted_principal is None:
            self._join_timer = self._router.reactor.callLater(timeout, self._join_timed_out)

    def _join_timed_out(self):
        self._join_timer = None
        if self._state in (_STATE_NEW, _STATE_CHALLENGED) and self._transport is not None:
            self.abort("wamp.error.timeout", "the session did not join in time")

    def _cancel_join_timer(self):
        timer, self._join_timer = self._join_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def onClose(self, wasClean):
        self._cancel_close_timer()
        self._cancel_join_timer()
        state, self._state = self._state, _STATE_CLOSED
        self._challenge = None
        if state in (_STATE_JOINED, _STATE_CLOSING) and self.session_id is not None:
            self._router._detach(self)
        self._transport = None

    def onMessage(self, msg):
        try:
            self._dispatch(msg)
        except ProtocolError as e:
            self.protocol_violation(str(e))
        except Exception:
            log.failure("router: internal error handling {msg!r}", msg=type(msg).__name__)
            self.protocol_violation("internal router error")

    def on_list(self, m):
        """
        A decoded message (a list) from a transport that parses messages itself.  CALL,
        YIELD and PUBLISH with plain options are routed straight from the list; every
        other message is checked and parsed by autobahn (L{to_message}) first.
        """
        if self._state == _STATE_JOINED and type(m) is list and m:
            kind = m[0]
            if type(kind) is int:
                fast = self._router._fast.get(kind)
                if fast is not None:
                    try:
                        if fast(self, m):
                            return
                    except ProtocolError as e:
                        self.protocol_violation(str(e))
                        return
                    except Exception:
                        log.failure("router: internal error handling message type {kind}", kind=kind)
                        self.protocol_violation("internal router error")
                        return
        try:
            msg = to_message(m)
        except Exception as e:
            self.protocol_violation(f"malformed message: {e}")
            return
        self.onMessage(msg)

    # sending -------------------------------------------------------------------------

    def send(self, msg):
        t = self._transport
        if t is None:
            return False
        if (self._router.limits.max_outgoing_queue and not isinstance(msg, message.Event)
                and self._check_backlog(hard_only=True)):
            return False
        try:
            t.send(msg)
        except SerializationError as e:
            # e.g. an in-process callee returned something this client's serializer
            # cannot carry: the caller gets an error, the connection stays
            log.info("router: cannot serialize {kind} for session {sid}: {e}",
                     kind=type(msg).__name__, sid=self.session_id, e=e)
            if isinstance(msg, message.Result):
                self.send(message.Error(message.Call.MESSAGE_TYPE, msg.request, ApplicationError.INVALID_PAYLOAD,
                                        args=[f"the result could not be serialized: {e}"]))
            return False
        except Exception as e:
            log.info("router: could not send to session {sid}: {e}", sid=self.session_id, e=e)
            self._drop(f"send failed: {e}")
            return False
        return True

    def send_list(self, m, cache=None):
        """
        Send the message list C{m} (serialized by the transport without building a
        message object).  C{cache}, a dict shared by the sends of one message to many
        sessions, lets transports with the same serializer reuse the bytes.
        """
        t = self._transport
        if t is None:
            return False
        if (m[0] != _EVENT and self._router.limits.max_outgoing_queue
                and self._check_backlog(hard_only=True)):
            return False
        try:
            t.send_list(m, cache)
        except SerializationError as e:
            log.info("router: cannot serialize message type {kind} for session {sid}: {e}",
                     kind=m[0], sid=self.session_id, e=e)
            if m[0] == _RESULT:
                self.send_list([_ERROR, _CALL, m[1], {}, ApplicationError.INVALID_PAYLOAD,
                                [f"the result could not be serialized: {e}"]])
            return False
        except Exception as e:
            log.info("router: could not send to session {sid}: {e}", sid=self.session_id, e=e)
            self._drop(f"send failed: {e}")
            return False
        return True

    def send_event(self, ev, cache=None):
        """Send an EVENT (a message list), or drop it if the session is too slow."""
        if self._check_backlog():
            self.dropped_events += 1
            return False
        return self.send_list(ev, cache)

    def unsent_bytes(self):
        """Bytes sent to this session's transport and not yet on the network."""
        t = self._transport
        own = getattr(t, "unsent_bytes", None)
        if own is not None:
            return own()
        return stacked_unsent_bytes(getattr(t, "transport", None))

    def _check_backlog(self, hard_only=False):
        """True if events should be dropped; disconnects a hopelessly slow session."""
        limit = self._router.limits.max_outgoing_queue
        if not limit:
            return False
        pending = self.unsent_bytes()
        if pending > 4 * limit:
            log.warn(
                "router: session {sid} ({authid}) has {n} bytes unsent; disconnecting it",
                sid=self.session_id,
                authid=self.authid,
                n=pending,
            )
            self._drop("too slow")
            return True
        return (not hard_only) and pending > limit

    def _drop(self, why):
        """Leave the realm now and cut the connection without a closing handshake."""
        was, self._state = self._state, _STATE_CLOSED
        if was in (_STATE_JOINED, _STATE_CLOSING) and self.session_id is not None:
            self._router._detach(self)
        self._close_transport(abort=True)

    def _cancel_close_timer(self):
        timer, self._close_timer = self._close_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _close_transport(self, abort=False):
        self._cancel_close_timer()
        t = self._transport
        if t is None:
            return
        try:
            if abort:
                tcp = getattr(t, "transport", None)
                if tcp is not None and hasattr(tcp, "abortConnection"):
                    tcp.abortConnection()
                else:
                    t.abort()
            else:
                t.close()
        except Exception:
            pass

    def abort(self, reason, text):
        """Send ABORT and close the transport; leave the realm if joined."""
        self._cancel_join_timer()
        self.send(message.Abort(reason, text))
        was = self._state
        self._state = _STATE_CLOSED
        if was in (_STATE_JOINED, _STATE_CLOSING) and self.session_id is not None:
            self._router._detach(self)
        self._close_transport()

    def protocol_violation(self, text):
        log.info(
            "router: protocol violation by session {sid} ({authid}): {text}",
            sid=self.session_id,
            authid=self.authid,
            text=text,
        )
        self.abort(PROTOCOL_VIOLATION, text)

    def kill(self, reason_text, reason="wamp.close.killed"):
        """End a joined session: GOODBYE with C{reason}, leave, close."""
        if self._state != _STATE_JOINED:
            self._close_transport()
            return
        self.send(message.Goodbye(reason, reason_text))
        self._state = _STATE_CLOSING
        self._router._detach(self)
        # the client answers GOODBYE; close the connection then, or after a grace period
        self._close_timer = self._router.reactor.callLater(5, self._close_transport, True)

    def new_request_id(self):
        self._next_request = self._next_request % (_MAX_ID - 1) + 1
        return self._next_request

    # dispatch ------------------------------------------------------------------------

    def _dispatch(self, msg):
        state = self._state
        if state == _STATE_JOINED:
            handler = self._router._handlers.get(type(msg))
            if handler is not None:
                if msg.request == 0 and isinstance(msg, _CLIENT_REQUESTS):
                    raise ProtocolError(f"request id 0 in {type(msg).__name__.upper()} (request ids start at 1)")
                handler(self, msg)
            elif isinstance(msg, message.Goodbye):
                self.send(message.Goodbye("wamp.close.goodbye_and_out"))
                self._state = _STATE_NEW
                self._router._detach(self)
            elif isinstance(msg, message.Abort):
                self._state = _STATE_CLOSED
                self._router._detach(self)
                self._close_transport()
            else:
                raise ProtocolError(f"unexpected {type(msg).__name__} in an established session")
        elif state == _STATE_NEW:
            if isinstance(msg, message.Hello):
                self._on_hello(msg)
            elif isinstance(msg, message.Abort):
                self._state = _STATE_CLOSED
                self._close_transport()
            else:
                raise ProtocolError(f"{type(msg).__name__} before HELLO")
        elif state == _STATE_CHALLENGED:
            if isinstance(msg, message.Authenticate) and self._challenge is not None:
                self._on_authenticate(msg)
            elif isinstance(msg, message.Abort):
                self._state = _STATE_CLOSED
                self._close_transport()
            else:
                raise ProtocolError(f"{type(msg).__name__} while waiting for AUTHENTICATE")
        elif state == _STATE_CLOSING:
            if isinstance(msg, (message.Goodbye, message.Abort)):
                self._state = _STATE_CLOSED
                self._close_transport()
            # anything else after we said GOODBYE is ignored
        # _STATE_CLOSED: ignore everything

    # authentication ------------------------------------------------------------------

    def _on_hello(self, msg):
        router = self._router
        self.client_roles = msg.roles or {}
        if self._trusted_principal is not None:
            self._welcome(self._trusted_principal, "trusted")
            return
        if msg.realm != router.realm:
            self.abort("wamp.error.no_such_realm", f"no realm {msg.realm!r} on this router")
            return
        offered = router.authenticator.authmethods()
        wanted = msg.authmethods or ["anonymous"]
        method = next((m for m in wanted if m in offered), None)
        if method is None:
            self.abort(
                "wamp.error.no_auth_method",
                f"none of the authmethods {wanted} is accepted (offered: {list(offered)})",
            )
            return
        authid = msg.authid
        if method == "anonymous":
            self._welcome(Principal(authid=f"anonymous-{_random_id()}", authrole="anonymous"), method)
        elif method == "ticket":
            if not authid:
                self.abort("wamp.error.authentication_failed", "ticket authentication needs an authid")
                return
            self._challenge = ("ticket", authid)
            self._state = _STATE_CHALLENGED
            self.send(message.Challenge("ticket", {}))
        elif method == "wampcra":
            if not authid:
                self.abort("wamp.error.authentication_failed", "WAMP-CRA needs an authid")
                return
            self._state = _STATE_CHALLENGED
            self._challenge = ("pending", None)
            d = defer.maybeDeferred(router.authenticator.wampcra_secret, router.realm, authid)
            d.addCallbacks(self._wampcra_challenge, self._auth_failed, callbackArgs=(authid,))
            d.addErrback(self._auth_internal_error)
        elif method == "cryptosign":
            extra = msg.authextra or {}
            pubkey = extra.get("pubkey")
            if not isinstance(pubkey, str) or len(pubkey) != 64:
                self.abort("wamp.error.authentication_failed", "cryptosign needs authextra.pubkey (64 hex digits)")
                return
            self._state = _STATE_CHALLENGED
            self._challenge = ("pending", None)
            d = defer.maybeDeferred(router.authenticator.cryptosign_principal, router.realm, authid, pubkey)
            d.addCallbacks(self._cryptosign_challenge, self._auth_failed, callbackArgs=(pubkey,))
            d.addErrback(self._auth_internal_error)
        else:  # pragma: no cover - authmethods() returned something we do not know
            self.abort("wamp.error.no_auth_method", f"authmethod {method!r} is not implemented")

    def _wampcra_challenge(self, result, authid):
        if self._state != _STATE_CHALLENGED:
            return
        secret, principal = result
        challenge = json.dumps(
            {
                "authid": principal.authid,
                "authrole": principal.authrole,
                "authmethod": "wampcra",
                "authprovider": "zwrm",
                "nonce": os.urandom(16).hex(),
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                "session": _random_id(),
            },
            separators=(",", ":"),
        )
        self._challenge = ("wampcra", (wampcra_signature(secret, challenge), principal))
        self.send(message.Challenge("wampcra", {"challenge": challenge}))

    def _cryptosign_challenge(self, principal, pubkey):
        if self._state != _STATE_CHALLENGED:
            return
        challenge = os.urandom(32).hex()
        self._challenge = ("cryptosign", (pubkey, challenge, principal))
        self.send(message.Challenge("cryptosign", {"challenge": challenge, "channel_binding": None}))

    def _on_authenticate(self, msg):
        method, data = self._challenge
        router = self._router
        if method == "ticket":
            self._challenge = ("pending", None)
            d = defer.maybeDeferred(router.authenticator.authenticate_ticket, router.realm, data, msg.signature)
            d.addCallbacks(lambda p: self._welcome(p, "ticket"), self._auth_failed)
            d.addErrback(self._auth_internal_error)
        elif method == "wampcra":
            expected, principal = data
            if isinstance(msg.signature, str) and msg.signature == expected:
                self._welcome(principal, "wampcra")
            else:
                self.abort("wamp.error.authentication_failed", "WAMP-CRA signature not accepted")
        elif method == "cryptosign":
            pubkey, challenge, principal = data
            if isinstance(msg.signature, str) and verify_cryptosign(pubkey, challenge, msg.signature):
                self._welcome(principal, "cryptosign")
            else:
                self.abort("wamp.error.authentication_failed", "cryptosign signature not accepted")
        else:
            raise ProtocolError("AUTHENTICATE before the CHALLENGE was sent")

    def _auth_failed(self, failure):
        if self._state not in (_STATE_CHALLENGED, _STATE_NEW):
            return
        if failure.check(AuthenticationFailed):
            text = failure.value.message
        elif failure.check(ApplicationError):
            text = str(failure.value.args[0]) if failure.value.args else failure.value.error
        else:
            log.failure("router: authenticator failed", failure)
            text = "authentication failed (internal error)"
        self.abort("wamp.error.authentication_failed", text)

    def _auth_internal_error(self, failure):
        log.failure("router: error while authenticating", failure)
        if self._state != _STATE_CLOSED:
            self.abort("wamp.error.authentication_failed", "authentication failed (internal error)")

    def _welcome(self, principal, authmethod):
        if self._state == _STATE_CLOSED or self._transport is None:
            return
        if not isinstance(principal, Principal):
            raise TypeError(f"authenticator returned {principal!r}, not a Principal")
        self._challenge = None
        self._cancel_join_timer()
        self.authid = principal.authid
        self.authrole = principal.authrole
        self.authextra = dict(principal.authextra or {})
        self.authmethod = authmethod
        self.authprovider = "zwrm"
        self.session_id = self._router._new_session_id()
        self._state = _STATE_JOINED
        self.joined_at = time.time()
        self.send(
            message.Welcome(
                self.session_id,
                router_roles(),
                realm=self._router.realm,
                authid=self.authid,
                authrole=self.authrole,
                authmethod=authmethod,
                authprovider="zwrm",
                authextra=self.authextra,
            )
        )
        self._router._join(self)

    # details -------------------------------------------------------------------------

    def details(self):
        """The session's details as the meta API reports them."""
        t = getattr(self._transport, "transport_details", None)
        transport = {}
        if t is not None:
            try:
                transport = {
                    "type": TransportDetails.CHANNEL_TYPE_TO_STR.get(t.channel_type),
                    "framing": TransportDetails.CHANNEL_FRAMING_TO_STR.get(t.channel_framing),
                    "peer": t.peer,
                    "is_secure": bool(t.is_secure),
                    "serializer": getattr(getattr(self._transport, "_serializer", None), "SERIALIZER_ID", None),
                }
            except Exception:
                transport = {}
        return {
            "session": self.session_id,
            "authid": self.authid,
            "authrole": self.authrole,
            "authmethod": self.authmethod,
            "authprovider": self.authprovider,
            "authextra": self.authextra,
            "transport": transport,
        }

    def callee_feature(self, name):
        callee = self.client_roles.get("callee")
        return bool(callee is not None and getattr(callee, name, None))


# --- the router ---------------------------------------------------------------------------


@dataclass
class RouterStats:
    messages: int = 0
    calls: int = 0
    publications: int = 0
    events_sent: int = 0
    events_dropped: int = 0
    sessions_closed: int = 0
    errors: dict = field(default_factory=dict)


class Router:
    """
    A WAMP router for one realm.

    @param reactor: provides C{callLater} (L{twisted.internet.interfaces.IReactorTime}).
    @param authenticator: an L{IAuthenticator}.
    @param authorizer: an L{IAuthorizer}.
    @param realm: the only realm this router serves.
    @param limits: L{RouterLimits}.
    """

    def __init__(self, reactor, authenticator, authorizer, realm="zwrm", limits=RouterLimits()):
        self.reactor = reactor
        self.authenticator = authenticator
        self.authorizer = authorizer
        self.realm = realm
        self.limits = limits
        self._authorize_pattern = getattr(authorizer, "authorize_pattern", None)
        self._sessions = {}
        self._subscriptions = _PatternTable()
        self._subscriptions_by_id = {}
        self._registrations = _PatternTable()
        self._registrations_by_id = {}
        self._next_sub_id = 0
        self._next_reg_id = 0
        self.stats = RouterStats()
        #: C{call_observer(procedure, seconds)}, if set, learns how long each call routed to a
        #: callee took, from its CALL to its answer (result, error, timeout or cancel).
        self.call_observer = None
        self._handlers = {
            message.Subscribe: Router._on_subscribe,
            message.Unsubscribe: Router._on_unsubscribe,
            message.Publish: Router._on_publish,
            message.Register: Router._on_register,
            message.Unregister: Router._on_unregister,
            message.Call: Router._on_call,
            message.Cancel: Router._on_cancel,
            message.Yield: Router._on_yield,
            message.Error: Router._on_error,
        }
        self._handlers = {k: (lambda f: (lambda s, m: f(self, s, m)))(v) for k, v in self._handlers.items()}
        # message type code -> handler of the plain case straight from the list (see RouterSession.on_list)
        self._fast = {_CALL: self._fast_call, _YIELD: self._fast_yield, _PUBLISH: self._fast_publish}
        self._add_meta_procedures()
        from zwrm.wamp.transport import LocalDelivery

        #: when messages to and from attached (in-process) sessions are delivered: at the end
        #: of the network read being handled, else in a later reactor turn (see LocalDelivery)
        self.local_delivery = LocalDelivery(reactor)

    # sessions --------------------------------------------------------------------------

    def session_factory(self):
        """A new L{RouterSession}: pass this to a transport factory."""
        return RouterSession(self)

    def attach(self, session, authid, authrole, authextra=None):
        """
        Attach an in-process autobahn C{ApplicationSession} with that identity,
        bypassing authentication.  Messages between it and the router are delivered
        never reentrantly: at the end of the network read being handled, or else through
        the reactor (L{zwrm.wamp.transport.LocalDelivery}).

        @return: a Deferred that fires with C{session} once it has joined and its
            C{onJoin} has run, or fails if it could not join or its C{onJoin} failed
            (with that failure; the session stays joined, so the caller decides
            whether to C{leave()}).
        """
        from zwrm.wamp.transport import MemoryTransportPair

        rs = RouterSession(self, principal=Principal(authid, authrole, dict(authextra or {})))
        pair = MemoryTransportPair(self.reactor, delivery=self.local_delivery)
        d = defer.Deferred()

        failures = []
        on_join = session.onJoin

        def checked_on_join(details):
            result = txaio.as_future(on_join, details)
            result.addErrback(lambda f: failures.append(f) or f)
            return result

        session.onJoin = checked_on_join

        def ready(s):
            if not d.called:
                if failures:
                    d.errback(failures[0])
                else:
                    d.callback(session)

        def left(s, details):
            if not d.called:
                d.errback(ApplicationError(details.reason or "wamp.error.canceled", details.message or "left before joining"))

        session.on("ready", ready)
        session.on("leave", left)
        pair.connect(rs, session)
        return d

    def session_count(self):
        """The number of joined sessions."""
        return len(self._sessions)

    def sessions(self):
        return list(self._sessions.values())

    def get_session(self, session_id):
        return self._sessions.get(session_id)

    def kill_by_authid(self, authid, reason):
        """
        End every session with C{authid} (GOODBYE C{wamp.close.killed} with C{reason} as
        its message).  Clients do the same through the meta procedure
        C{wamp.session.kill_by_authid}.

        @return: the number of sessions ended.
        """
        return len(self._kill_by_authid(authid, reason))

    def _kill_by_authid(self, authid, reason, close_reason="wamp.close.killed", but=None):
        """End the sessions of C{authid} but C{but}; return their ids."""
        victims = [s for s in self._sessions.values() if s.authid == authid and s is not but]
        for s in victims:
            s.kill(reason, close_reason)
        return [s.session_id for s in victims]

    def _new_session_id(self):
        while True:
            sid = _random_id()
            if sid not in self._sessions:
                return sid

    def _join(self, session):
        self._sessions[session.session_id] = session
        self.publish_internal("wamp.session.on_join", [session.details()])

    def _detach(self, session):
        sid = session.session_id
        if self._sessions.get(sid) is not session:
            return
        del self._sessions[sid]
        self.stats.sessions_closed += 1
        # subscriptions
        for sub in list(session.subscriptions):
            self._drop_subscriber(sub, session)
        session.subscriptions.clear()
        # registrations and calls waiting on this callee
        for reg in list(session.registrations):
            self._remove_registration(reg)
        session.registrations.clear()
        for pc in list(session.invocations.values()):
            self._finish(pc)
            self._send_call_error(pc, ApplicationError.CANCELED, ["the callee left the realm"])
        session.invocations.clear()
        # calls this session made
        for pc in list(session.calls.values()):
            self._finish(pc)
            if pc.callee is not None and pc.callee.callee_feature("call_canceling"):
                pc.callee.send(message.Interrupt(pc.invocation_request, "killnowait", reason=ApplicationError.CANCELED))
        session.calls.clear()
        self.publish_internal("wamp.session.on_leave", [sid, session.authid, session.authrole])

    # authorization ---------------------------------------------------------------------

    def _allowed(self, session, uri, action, match="exact"):
        try:
            if match == "exact":
                return bool(self.authorizer.authorize(session, uri, action))
            if self._authorize_pattern is None:
                return False
            return bool(self._authorize_pattern(session, uri, action, match))
        except Exception:
            log.failure("router: authorizer failed on {action} {uri}", action=action, uri=uri)
            return False

    def _error(self, session, request_type, request, uri, text):
        session.send(message.Error(request_type, request, uri, args=[text]))

    # broker ----------------------------------------------------------------------------

    def _on_subscribe(self, session, msg):
        match = msg.match or "exact"
        topic = msg.topic
        if match == "prefix" and topic and not topic.endswith("."):
            # "zwrm.event" and "zwrm.event." are the same prefix subscription: every
            # topic below zwrm.event (components, not characters: not zwrm.events.x)
            topic += "."
        if not self._allowed(session, topic, "subscribe", match):
            self._error(session, message.Subscribe.MESSAGE_TYPE, msg.request, ApplicationError.NOT_AUTHORIZED,
                        f"{session.authrole!r} may not subscribe to {msg.topic!r}")
            return
        sub = self._subscriptions.get(topic, match)
        if sub is None:
            self._next_sub_id += 1
            sub = _Subscription(self._next_sub_id, topic, match)
            self._subscriptions.add(sub)
            self._subscriptions_by_id[sub.id] = sub
        sub.subscribers[session.session_id] = session
        session.subscriptions.add(sub)
        session.send(message.Subscribed(msg.request, sub.id))

    def _drop_subscriber(self, sub, session):
        sub.subscribers.pop(session.session_id, None)
        if not sub.subscribers:
            self._subscriptions.remove(sub)
            self._subscriptions_by_id.pop(sub.id, None)

    def _on_unsubscribe(self, session, msg):
        sub = self._subscriptions_by_id.get(msg.subscription)
        if sub is None or sub not in session.subscriptions:
            self._error(session, message.Unsubscribe.MESSAGE_TYPE, msg.request, ApplicationError.NO_SUCH_SUBSCRIPTION,
                        f"no subscription {msg.subscription}")
            return
        session.subscriptions.discard(sub)
        self._drop_subscriber(sub, session)
        session.send(message.Unsubscribed(msg.request))

    def _on_publish(self, session, msg):
        filters = None
        if (msg.exclude or msg.exclude_authid or msg.exclude_authrole or msg.eligible is not None
                or msg.eligible_authid is not None or msg.eligible_authrole is not None):
            filters = (
                set(msg.exclude or ()),
                set(msg.exclude_authid or ()),
                set(msg.exclude_authrole or ()),
                set(msg.eligible) if msg.eligible is not None else None,
                set(msg.eligible_authid) if msg.eligible_authid is not None else None,
                set(msg.eligible_authrole) if msg.eligible_authrole is not None else None,
            )
        self._publish(session, msg.request, msg.topic, _args_of(msg), msg.kwargs, msg.payload, _enc_of(msg),
                      bool(msg.acknowledge), msg.exclude_me, filters)

    _PUBLISH_OPTIONS = frozenset({"acknowledge", "exclude_me"})

    def _fast_publish(self, session, m):
        """PUBLISH straight from the list when its options are plain; else C{False}."""
        n = len(m)
        if n < 4 or n > 6:
            return False
        request, options, topic = m[1], m[2], m[3]
        if type(request) is not int or not 0 < request <= _MAX_ID or type(options) is not dict:
            return False
        acknowledge = exclude_me = None
        if options:
            if not options.keys() <= self._PUBLISH_OPTIONS:
                return False
            acknowledge = options.get("acknowledge")
            exclude_me = options.get("exclude_me")
            if (acknowledge is not None and type(acknowledge) is not bool) or (
                    exclude_me is not None and type(exclude_me) is not bool):
                return False
        if type(topic) is not str or not _uri_ok(topic):
            return False
        args = m[4] if n > 4 else None
        kwargs = m[5] if n > 5 else None
        if (args is not None and type(args) is not list) or (n > 5 and type(kwargs) is not dict):
            return False
        self._publish(session, request, topic, args, kwargs, None, None, bool(acknowledge), exclude_me, None)
        return True

    def _publish(self, session, request, topic, args, kwargs, payload, enc, acknowledge, exclude_me, filters):
        # topics under "wamp." are the router's own (meta events): nobody else publishes there
        if topic.startswith("wamp.") or not self._allowed(session, topic, "publish"):
            if acknowledge:
                self._error(session, message.Publish.MESSAGE_TYPE, request, ApplicationError.NOT_AUTHORIZED,
                            f"{session.authrole!r} may not publish to {topic!r}")
            return
        publication = self._deliver(topic, args, kwargs, payload, enc, session, exclude_me, filters)
        if acknowledge:
            session.send_list([_PUBLISHED, request, publication])

    def publish_internal(self, topic, args=None, kwargs=None):
        """Publish an event from the router itself (meta events)."""
        return self._deliver(topic, list(args) if type(args) is tuple else args, kwargs, None, None, None)

    def _deliver(self, topic, args, kwargs, payload, enc, publisher, exclude_me=None, filters=None):
        """
        Send EVENTs for a publication to every matching subscriber.  C{filters} is
        C{None} or (exclude, exclude_authid, exclude_authrole, eligible,
        eligible_authid, eligible_authrole), sets or C{None} for the eligible ones.
        """
        publication = _random_id()
        self.stats.publications += 1
        subs = self._subscriptions.all_matches(topic)
        if not subs:
            return publication
        own = None
        if publisher is not None and (exclude_me is None or exclude_me):
            own = publisher.session_id
        if filters is not None:
            exclude, exclude_authid, exclude_authrole, eligible, eligible_authid, eligible_authrole = filters
        stats = self.stats
        base = {}
        if publisher is not None:
            base = {"publisher": publisher.session_id, "publisher_authid": publisher.authid,
                    "publisher_authrole": publisher.authrole}
        for sub in subs:
            details = base
            if sub.match != "exact":
                details = dict(base)
                details["topic"] = topic
            if payload:
                details = dict(details)
                _add_enc(details, enc)
                ev = [_EVENT, sub.id, publication, details, payload]
            else:
                ev = _with_payload([_EVENT, sub.id, publication, details], args, kwargs)
            cache = {}
            for sid, receiver in list(sub.subscribers.items()):
                if sid == own:
                    continue
                if filters is not None:
                    if sid in exclude:
                        continue
                    if receiver.authid in exclude_authid or receiver.authrole in exclude_authrole:
                        continue
                    if eligible is not None and sid not in eligible:
                        continue
                    if eligible_authid is not None and receiver.authid not in eligible_authid:
                        continue
                    if eligible_authrole is not None and receiver.authrole not in eligible_authrole:
                        continue
                if receiver.send_event(ev, cache):
                    stats.events_sent += 1
                else:
                    stats.events_dropped += 1
        return publication

    # dealer ----------------------------------------------------------------------------

    def _on_register(self, session, msg):
        match = msg.match or "exact"
        rtype = message.Register.MESSAGE_TYPE
        if msg.invoke not in (None, "single"):
            self._error(session, rtype, msg.request, ApplicationError.INVALID_ARGUMENT,
                        f"invocation policy {msg.invoke!r} is not supported (only 'single')")
            return
        if _reserved_pattern(msg.procedure, match):
            # checked before the authorizer, so no role can take them, whatever its rules
            self._error(session, rtype, msg.request, ApplicationError.INVALID_URI,
                        "procedures under 'wamp.' are reserved for the router")
            return
        if not self._allowed(session, msg.procedure, "register", match):
            self._error(session, rtype, msg.request, ApplicationError.NOT_AUTHORIZED,
                        f"{session.authrole!r} may not register {msg.procedure!r}")
            return
        existing = self._registrations.get(msg.procedure, match)
        if existing is not None:
            if msg.force_reregister and existing.callee is not None:
                self._remove_registration(existing)
                existing.callee.registrations.discard(existing)
            else:
                self._error(session, rtype, msg.request, ApplicationError.PROCEDURE_ALREADY_EXISTS,
                            f"{msg.procedure!r} is already registered")
                return
        self._next_reg_id += 1
        reg = _Registration(self._next_reg_id, msg.procedure, match, callee=session)
        self._registrations.add(reg)
        self._registrations_by_id[reg.id] = reg
        session.registrations.add(reg)
        session.send(message.Registered(msg.request, reg.id))

    def _remove_registration(self, reg):
        self._registrations.remove(reg)
        self._registrations_by_id.pop(reg.id, None)
        if reg.callee is not None:
            # calls already invoked keep running; they end when the callee answers or leaves
            pass

    def _on_unregister(self, session, msg):
        reg = self._registrations_by_id.get(msg.registration)
        if reg is None or reg.callee is not session:
            self._error(session, message.Unregister.MESSAGE_TYPE, msg.request, ApplicationError.NO_SUCH_REGISTRATION,
                        f"no registration {msg.registration}")
            return
        self._remove_registration(reg)
        session.registrations.discard(reg)
        session.send(message.Unregistered(msg.request))

    def _on_call(self, session, msg):
        self._call(session, msg.request, msg.procedure, _args_of(msg), msg.kwargs, msg.payload, _enc_of(msg),
                   bool(msg.receive_progress), msg.timeout)

    def _fast_call(self, session, m):
        """CALL straight from the list when its options are empty; else C{False}."""
        n = len(m)
        if n < 4 or n > 6:
            return False
        request, options, procedure = m[1], m[2], m[3]
        if (type(request) is not int or not 0 < request <= _MAX_ID or type(options) is not dict or options
                or type(procedure) is not str or not _uri_ok(procedure)):
            return False
        args = m[4] if n > 4 else None
        kwargs = m[5] if n > 5 else None
        if (args is not None and type(args) is not list) or (n > 5 and type(kwargs) is not dict):
            return False
        self._call(session, request, procedure, args, kwargs, None, None, False, None)
        return True

    def _call(self, session, request, procedure, args, kwargs, payload, enc, receive_progress, timeout_ms):
        ctype = _CALL
        self.stats.calls += 1
        if request in session.calls:
            # the request id of a call still in flight: refuse this one, keep the session
            self._error(session, ctype, request, DUPLICATE_REQUEST,
                        f"request id {request} is already used by a call in flight")
            return
        if not self._allowed(session, procedure, "call"):
            self._error(session, ctype, request, ApplicationError.NOT_AUTHORIZED,
                        f"{session.authrole!r} may not call {procedure!r}")
            return
        reg = self._registrations.best_match(procedure)
        if reg is None:
            self._error(session, ctype, request, ApplicationError.NO_SUCH_PROCEDURE,
                        f"no procedure {procedure!r} is registered")
            return
        if reg.handler is not None:
            self._call_router_procedure(session, request, procedure, args, kwargs, reg)
            return
        limit = self.limits.max_pending_calls_per_session
        if limit and len(session.calls) >= limit:
            self._error(session, ctype, request, "zwrm.error.resource_exhausted",
                        f"too many calls in flight (limit {limit})")
            return
        callee = reg.callee
        inv_request = callee.new_request_id()
        pc = _PendingCall(session, request, callee, inv_request, receive_progress)
        if self.call_observer is not None:
            pc.procedure, pc.started = procedure, self.reactor.seconds()
        session.calls[request] = pc
        callee.invocations[inv_request] = pc
        timeout = self.limits.call_timeout or 0
        if timeout_ms:
            t = timeout_ms / 1000.0
            timeout = min(timeout, t) if timeout else t
        if timeout:
            pc.timer = self.reactor.callLater(timeout, self._timeout, pc)
        details = {"receive_progress": True} if receive_progress else {}
        details["caller"] = session.session_id
        details["caller_authid"] = session.authid
        details["caller_authrole"] = session.authrole
        if reg.match != "exact":
            details["procedure"] = procedure
        if payload:
            _add_enc(details, enc)
            callee.send_list([_INVOCATION, inv_request, reg.id, details, payload])
        else:
            callee.send_list(_with_payload([_INVOCATION, inv_request, reg.id, details], args, kwargs))

    def _finish(self, pc):
        """Forget a pending call on both sides (and tell the call observer how long it took)."""
        if pc.started is not None and self.call_observer is not None:
            self.call_observer(pc.procedure, self.reactor.seconds() - pc.started)
            pc.started = None
        pc.caller.calls.pop(pc.call_request, None)
        if pc.callee is not None:
            pc.callee.invocations.pop(pc.invocation_request, None)
        if pc.timer is not None and pc.timer.active():
            pc.timer.cancel()
        pc.timer = None

    def _send_call_error(self, pc, uri, args=None, kwargs=None):
        pc.caller.send(message.Error(message.Call.MESSAGE_TYPE, pc.call_request, uri, args=args, kwargs=kwargs))

    def _timeout(self, pc):
        pc.timer = None
        if pc.caller.calls.get(pc.call_request) is not pc:
            return
        self._finish(pc)
        if pc.callee.callee_feature("call_canceling"):
            pc.callee.send(message.Interrupt(pc.invocation_request, "killnowait", reason=ApplicationError.TIMEOUT))
        self._send_call_error(pc, ApplicationError.TIMEOUT, ["the call timed out"])

    def _on_cancel(self, session, msg):
        pc = session.calls.get(msg.request)
        if pc is None:
            return  # already answered: nothing to cancel
        mode = msg.mode or "killnowait"
        can_interrupt = pc.callee.callee_feature("call_canceling")
        if mode == "kill" and can_interrupt:
            # the caller gets its ERROR when the callee answers the INTERRUPT
            pc.canceled = True
            pc.callee.send(message.Interrupt(pc.invocation_request, "kill", reason=ApplicationError.CANCELED))
            return
        self._finish(pc)
        if mode != "skip" and can_interrupt:
            pc.callee.send(message.Interrupt(pc.invocation_request, "killnowait", reason=ApplicationError.CANCELED))
        self._send_call_error(pc, ApplicationError.CANCELED, ["the call was canceled"])

    def _on_yield(self, session, msg):
        self._yield(session, msg.request, _args_of(msg), msg.kwargs, msg.payload, _enc_of(msg), bool(msg.progress))

    def _fast_yield(self, session, m):
        """YIELD straight from the list when its options are empty; else C{False}."""
        n = len(m)
        if n < 3 or n > 5:
            return False
        request, options = m[1], m[2]
        if type(request) is not int or not 0 < request <= _MAX_ID or type(options) is not dict or options:
            return False
        args = m[3] if n > 3 else None
        kwargs = m[4] if n > 4 else None
        if (args is not None and type(args) is not list) or (n > 4 and type(kwargs) is not dict):
            return False
        self._yield(session, request, args, kwargs, None, None, False)
        return True

    def _yield(self, session, request, args, kwargs, payload, enc, progress):
        pc = session.invocations.get(request)
        if pc is None:
            return  # canceled or timed out: late results are dropped
        if progress:
            if pc.receive_progress and not pc.canceled:
                pc.caller.send_list(_result_list(pc.call_request, args, kwargs, payload, enc, True))
            return
        self._finish(pc)
        if pc.canceled:
            self._send_call_error(pc, ApplicationError.CANCELED, ["the call was canceled"])
            return
        pc.caller.send_list(_result_list(pc.call_request, args, kwargs, payload, enc, False))

    def _on_error(self, session, msg):
        if msg.request_type != message.Invocation.MESSAGE_TYPE:
            raise ProtocolError(f"ERROR for message type {msg.request_type} sent to the router")
        pc = session.invocations.get(msg.request)
        if pc is None:
            return
        self._finish(pc)
        if pc.canceled:
            self._send_call_error(pc, ApplicationError.CANCELED, ["the call was canceled"])
            return
        pc.caller.send(
            message.Error(message.Call.MESSAGE_TYPE, pc.call_request, msg.error, args=msg.args,
                          kwargs=msg.kwargs, payload=msg.payload, enc_algo=msg.enc_algo,
                          enc_key=msg.enc_key, enc_serializer=msg.enc_serializer)
        )

    # router procedures (session meta API) ---------------------------------------------

    def register_internal(self, uri, handler):
        """
        Register C{handler(caller_session, args, kwargs)} as procedure C{uri},
        answered by the router itself.  It returns a C{list} of result args or
        raises C{ApplicationError}.
        """
        self._next_reg_id += 1
        reg = _Registration(self._next_reg_id, uri, "exact", handler=handler)
        self._registrations.add(reg)
        self._registrations_by_id[reg.id] = reg

    def _call_router_procedure(self, session, request, procedure, args, kwargs, reg):
        try:
            result = reg.handler(session, list(args or ()), dict(kwargs or {}))
        except ApplicationError as e:
            session.send(message.Error(message.Call.MESSAGE_TYPE, request, e.error,
                                       args=list(e.args), kwargs=e.kwargs))
            return
        except Exception as e:
            self._error(session, message.Call.MESSAGE_TYPE, request, ApplicationError.INVALID_ARGUMENT,
                        f"{procedure}: {e}")
            return
        session.send_list(_with_payload([_RESULT, request, {}], result, None))

    def _add_meta_procedures(self):
        def _roles_filter(args, kwargs):
            roles = kwargs.get("filter_authroles", args[0] if args else None)
            if roles is not None and not (isinstance(roles, list) and all(isinstance(r, str) for r in roles)):
                raise ApplicationError(ApplicationError.INVALID_ARGUMENT, "filter_authroles must be a list of strings")
            return roles

        def count(caller, args, kwargs):
            roles = _roles_filter(args, kwargs)
            if roles is None:
                return [len(self._sessions)]
            return [sum(1 for s in self._sessions.values() if s.authrole in roles)]

        def list_(caller, args, kwargs):
            roles = _roles_filter(args, kwargs)
            return [[sid for sid, s in self._sessions.items() if roles is None or s.authrole in roles]]

        def get(caller, args, kwargs):
            sid = args[0] if args else kwargs.get("session_id")
            if not isinstance(sid, int) or isinstance(sid, bool):
                raise ApplicationError(ApplicationError.INVALID_ARGUMENT, "wamp.session.get needs a session id")
            s = self._sessions.get(sid)
            if s is None:
                raise ApplicationError(ApplicationError.NO_SUCH_SESSION, f"no session {sid}")
            return [s.details()]

        def kill_by_authid(caller, args, kwargs):
            # as Crossbar.io: (authid, reason=None, message=None) -> [session ids]; the
            # caller's own session is spared
            authid = args[0] if args else kwargs.get("authid")
            reason = kwargs.get("reason", args[1] if len(args) > 1 else None)
            text = kwargs.get("message", args[2] if len(args) > 2 else None)
            if not isinstance(authid, str) or not authid:
                raise ApplicationError(ApplicationError.INVALID_ARGUMENT,
                                       "wamp.session.kill_by_authid needs an authid (a string)")
            if reason is not None and not (isinstance(reason, str) and _uri_ok(reason)):
                raise ApplicationError(ApplicationError.INVALID_ARGUMENT,
                                       f"wamp.session.kill_by_authid: reason must be a URI, not {reason!r}")
            if text is not None and not isinstance(text, str):
                raise ApplicationError(ApplicationError.INVALID_ARGUMENT,
                                       "wamp.session.kill_by_authid: message must be a string")
            return [self._kill_by_authid(authid, text or "killed", reason or "wamp.close.killed",
                                         but=caller)]

        self.register_internal("wamp.session.count", count)
        self.register_internal("wamp.session.list", list_)
        self.register_internal("wamp.session.get", get)
        self.register_internal("wamp.session.kill_by_authid", kill_by_authid)


__all__ = ["Router", "RouterLimits", "RouterSession", "router_roles", "BROKER_FEATURES", "DEALER_FEATURES"]
