"""
The registry's guard on the HTTP connection: what must happen before (or instead of) reading a
request body.

C{twisted.web} reads a whole request body (spooling it to a temporary file) before a resource
sees the request. For the registry that is too late: an anonymous client could make the
control plane spool hundreds of MiB before its 401, or hold connections open with half-sent
headers or bodies. L{registry_request_factory} makes a C{Site} request factory whose requests:

 - must finish their headers within C{header_timeout} seconds of their first line, else the
   connection is dropped;
 - for a request with a body under C{/v2/} (POST, PUT, PATCH): are authorized from their headers
   alone, with the connection paused, as soon as the headers are in; a request that is
   refused gets its 401 (with the Basic challenge) or 403 at once and the connection is
   closed: its body is never read;
 - must then deliver their body within C{body_timeout} seconds, and never go
   C{body_idle_timeout} seconds without a byte, else the connection is dropped.

Every other request (C{/ws}, C{/healthz}, GETs) is an ordinary C{twisted.web} request but for
the header timeout.
"""

import json
from io import BytesIO

from twisted.logger import Logger
from twisted.web import server

from zwrm.errors import AuthenticationFailed, NotAuthorized, ZwrmError

log = Logger()

BODY_METHODS = (b"POST", b"PUT", b"PATCH")


def registry_request_factory(reactor, registry, prefix=b"/v2/", header_timeout=10.0,
                             body_timeout=3600.0, body_idle_timeout=30.0):
    """
    @param reactor: C{IReactorTime} for the timeouts.
    @param registry: the L{zwrm.registry.resource.RegistryResource} (its C{action_for} and
        C{authorize}).
    @param prefix: the path the registry is mounted at.
    @return: a request factory for C{Site(root, requestFactory=...)}.
    """

    class RegistryGuardedRequest(GuardedRequest):
        pass

    RegistryGuardedRequest.reactor = reactor
    RegistryGuardedRequest.registry = registry
    RegistryGuardedRequest.prefix = prefix
    RegistryGuardedRequest.header_timeout = header_timeout
    RegistryGuardedRequest.body_timeout = body_timeout
    RegistryGuardedRequest.body_idle_timeout = body_idle_timeout
    return RegistryGuardedRequest


class GuardedRequest(server.Request):
    """A request with the registry's guard (see the module docstring)."""

    reactor = None
    registry = None
    prefix = b"/v2/"
    header_timeout = 10.0
    body_timeout = 3600.0
    body_idle_timeout = 30.0

    def __init__(self, channel, *args, **kwargs):
        server.Request.__init__(self, channel, *args, **kwargs)
        self._guard_timers = []
        self._body_bytes = 0
        self._body_seen = 0
        self._refused = False
        self._arm(self.header_timeout, self._too_slow, "its headers")

    # --- timers ---------------------------------------------------------------------

    def _arm(self, seconds, f, *args):
        if seconds and self.reactor is not None:
            self._guard_timers.append(self.reactor.callLater(seconds, f, *args))

    def _disarm(self):
        timers, self._guard_timers = self._guard_timers, []
        for t in timers:
            if t.active():
                t.cancel()

    def _too_slow(self, what):
        log.info("registry: dropping a connection that did not send {what} in time", what=what)
        self._disarm()
        transport = getattr(self.channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def _idle_check(self):
        if self._body_bytes == self._body_seen:
            self._too_slow(f"any of its body for {self.body_idle_timeout:g} s")
            return
        self._body_seen = self._body_bytes
        self._arm(self.body_idle_timeout, self._idle_check)

    # --- the request's life ---------------------------------------------------------------

    def gotLength(self, length):
        self._disarm()
        server.Request.gotLength(self, length)
        channel = self.channel
        method = getattr(channel, "_command", None)
        path = getattr(channel, "_path", b"") or b""
        if (self.registry is None or method not in BODY_METHODS
                or not path.startswith(self.prefix) or length == 0):
            return
        self._arm(self.body_timeout, self._too_slow, "its whole body")
        self._arm(self.body_idle_timeout, self._idle_check)
        action = self.registry.action_for(method, path[len(self.prefix):].split(b"?")[0])
        if action is None:
            return  # the resource answers (404, 405) without reading more than it must
        if action == "push" and not isinstance(self.content, BytesIO):
            # A blob's bytes: spooled where the store can adopt them without a copy.
            self.content.close()
            self.content = self.registry.store.spool()
        channel.transport.pauseProducing()
        d = self.registry.authorize(self, action)
        d.addCallbacks(self._allowed, self._refuse)

    def _allowed(self, _):
        if not self._refused and getattr(self.channel, "transport", None) is not None:
            self.channel.transport.resumeProducing()

    def _refuse(self, failure):
        self._refused = True
        self._disarm()
        e = failure.value
        if isinstance(e, AuthenticationFailed):
            status, code = b"401 Unauthorized", "UNAUTHORIZED"
            extra = f'WWW-Authenticate: Basic realm="{self.registry.realm}"\r\n'.encode()
            message = e.message or "authentication required"
        elif isinstance(e, NotAuthorized):
            status, code, extra = b"403 Forbidden", "DENIED", b""
            message = e.message or "access denied"
        else:
            status, code, extra = b"503 Service Unavailable", "UNAVAILABLE", b""
            message = e.message if isinstance(e, ZwrmError) else "cannot check credentials"
            if not isinstance(e, ZwrmError):
                log.failure("registry: authorizing a request failed", failure)
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        # No "100 Continue" after this answer (HTTPChannel sends it after gotLength).
        self.requestHeaders.removeHeader(b"expect")
        transport = getattr(self.channel, "transport", None)
        if transport is None:
            return
        transport.write(
            b"HTTP/1.1 " + status + b"\r\n"
            b"Content-Type: application/json\r\n"
            b"Docker-Distribution-API-Version: registry/2.0\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"Connection: close\r\n\r\n" + body
        )
        # Nothing more is read from this connection; the body is never spooled.
        self.channel.dataReceived = lambda data: None
        transport.loseConnection()

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._body_bytes += len(data)
        server.Request.handleContentChunk(self, data)

    def requestReceived(self, command, path, version):
        self._disarm()
        if self._refused:
            return
        server.Request.requestReceived(self, command, path, version)

    def connectionLost(self, reason):
        self._disarm()
        server.Request.connectionLost(self, reason)

