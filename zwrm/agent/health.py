"""
Health checks of machines' services, from the host through the forwarded service port.

A L{HealthCheck} runs a probe every C{interval} seconds. Its health is:
 - C{"starting"} until the first probe passes, while the grace period lasts;
 - C{"passing"} after a probe passed;
 - C{"failing"} after a probe failed, once the grace period is over.

Each change of health is passed to C{on_change(health, detail)}.

Probes are callables returning a Deferred that fires with C{None} when the service is
healthy and with a str saying what is wrong otherwise:
 - L{http_probe}: C{GET http://127.0.0.1:<port><path>}; any 2xx or 3xx answer passes.
 - L{tcp_probe}: a TCP connection opens and is not closed by the other end within a short
   settle time. (QEMU's user-mode network accepts a forwarded connection even when nothing
   listens in the guest, then closes it; the settle time tells the two apart.)
"""

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import Agent, ResponseNeverReceived

from zwrm.endpoints import connect_error_text
from zwrm.healthspec import HEALTH_TYPES, validate  # the spec's check, shared

log = Logger()

class _Settle(Protocol):
    """Notices the end of a connection (or of a response body), ignoring the data."""

    def __init__(self):
        self.closed = Deferred()

    def connectionLost(self, reason):
        if not self.closed.called:
            self.closed.callback(None)


def tcp_probe(reactor, host, port, timeout, settle=0.3):
    """A probe that passes if a TCP connection to C{host:port} opens and stays open C{settle} s."""

    async def probe():
        ep = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
        try:
            proto = await ep.connect(Factory.forProtocol(_Settle)).addTimeout(timeout, reactor)
        except (TimeoutError, CancelledError):
            return f"TCP connect to port {port} timed out after {timeout} s"
        except Exception as e:
            return f"TCP connect to port {port} failed: {connect_error_text(e)}"
        waited = Deferred()
        call = reactor.callLater(settle, lambda: waited.called or waited.callback("open"))
        proto.closed.addCallback(lambda _: waited.called or waited.callback("closed"))
        how = await waited
        if call.active():
            call.cancel()
        proto.transport.loseConnection()
        if how == "closed":
            return f"the connection to port {port} was closed at once (nothing listening?)"
        return None

    return lambda: ensureDeferred(probe())


def http_probe(reactor, host, port, path, timeout):
    """A probe that passes if C{GET http://host:port/path} answers 2xx or 3xx in time."""
    agent = Agent(reactor, connectTimeout=timeout)
    url = f"http://{host}:{port}{path}".encode()

    async def probe():
        try:
            d = agent.request(b"GET", url)
            d.addTimeout(timeout, reactor)
            response = await d
            # The answer's status is what counts; read the body (the server may end it by
            # closing the connection, without a length) and throw it away.
            sink = _Settle()
            response.deliverBody(sink)
            await sink.closed.addTimeout(timeout, reactor)
        except (TimeoutError, CancelledError):
            return f"GET {path} on port {port} timed out after {timeout} s"
        except ResponseNeverReceived as e:
            if any(r.check(CancelledError) for r in e.reasons):
                return f"GET {path} on port {port} timed out after {timeout} s"
            return f"GET {path} on port {port}: the connection closed without an answer"
        except Exception as e:
            return f"GET {path} on port {port} failed: {e.__class__.__name__}"
        if not 200 <= response.code < 400:
            return f"GET {path} on port {port} answered {response.code}"
        return None

    return lambda: ensureDeferred(probe())


def probe_for(reactor, spec, port, host="127.0.0.1"):
    """The probe a validated health C{spec} asks for, against C{host:port}."""
    if spec["type"] == "tcp":
        return tcp_probe(reactor, host, port, spec["timeout"])
    return http_probe(reactor, host, port, spec["path"], spec["timeout"])


class HealthCheck:
    """
    Runs C{probe} periodically and reports changes of health.

    @param clock: provides C{IReactorTime}.
    @param probe: a callable returning a Deferred of C{None} (healthy) or a str (why not).
    @param interval: seconds between probes (a probe never overlaps the next).
    @param grace: seconds after L{start} during which failures leave the health as it
        was, until a probe passes: C{starting}, or C{health}.
    @param on_change: called with C{(health, detail)} at each change.
    @param health: the health to start from: C{starting} (a machine just started), or
        C{passing} for a guest that was passing elsewhere and goes on running here (a live
        migration's target): it stays C{passing} unless a probe fails after the grace,
        before any probe here passed, or at all once one did.
    """

    def __init__(self, clock, probe, interval, grace, on_change, health="starting"):
        if health not in ("starting", "passing"):
            raise ValueError(f"a health check starts from starting or passing, not {health!r}")
        self.clock = clock
        self.probe = probe
        self.interval = interval
        self.grace = grace
        self.on_change = on_change
        self.health = health
        self.detail = ("waiting for the first check to pass" if health == "starting"
                       else "passing before it moved here; waiting for the first check")
        self._confirmed = False  # a probe passed since start
        self.started_at = None
        self._loop = None
        self._running = False
        self._inflight = None

    def start(self):
        """Start probing (the first probe runs at once)."""
        self.started_at = self.clock.seconds()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("health check loop failed", f)
        )

    def stop(self):
        """Stop probing; no further changes are reported."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._inflight is not None:
            self._inflight.cancel()

    def _tick(self):
        if self._running:
            return
        self._running = True
        d = self._inflight = self.probe()
        d.addErrback(lambda f: f"the check itself failed: {f.getErrorMessage()}")
        d.addCallback(self._result)
        return None

    def _result(self, problem):
        self._running = False
        self._inflight = None
        if self._loop is None:
            return
        if problem is None:
            self._confirmed = True
            self._change("passing", "ok")
        elif (not self._confirmed and self.health != "failing"
              and self.clock.seconds() - self.started_at < self.grace):
            self.detail = problem
        else:
            self._change("failing", problem)

    def _change(self, health, detail):
        changed = health != self.health
        self.health, self.detail = health, detail
        if changed:
            self.on_change(health, detail)


__all__ = ["HEALTH_TYPES", "HealthCheck", "http_probe", "probe_for", "tcp_probe", "validate"]
