"""
A QEMU Machine Protocol (QMP) client as a Twisted protocol.

QMP is line-delimited JSON over (here) a UNIX socket. The server greets with
C{{"QMP": {...}}}; the client must send C{qmp_capabilities} before any other command.
Each command gets exactly one reply, C{{"return": ...}} or C{{"error": {"class", "desc"}}},
carrying the C{id} the command was sent with; asynchronous events
(C{{"event": NAME, "data": {...}, "timestamp": {...}}}) can arrive at any time, also between
a command and its reply.

Every command is bounded (L{COMMAND_TIMEOUT} unless the caller says otherwise): QEMU answers
each one from its main loop, so one that goes unanswered means that loop is stuck (an NBD
peer that stopped answering, storage in uninterruptible sleep), and a caller that waited on
forever would hang with it (a drain, a stop, the agent's shutdown). The command then fails
with L{QMPError} C{Timeout}; the connection stays open, and a late reply is dropped.
"""

import json

from twisted.internet import defer
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

# Seconds a QMP command may go unanswered. QEMU answers from its main loop: the slowest
# commands zwrm sends (blockdev-add/-del of an NBD node, stop/cont draining I/O) take well
# under a second on a healthy host; a minute without an answer is a stuck QEMU.
COMMAND_TIMEOUT = 60.0


class QMPError(Exception):
    """
    QEMU answered a command with an error, or the connection ended before it answered.

    @ivar error_class: QMP's error class (e.g. C{"GenericError"}), or C{"Disconnected"}.
    @ivar desc: QMP's description.
    """

    def __init__(self, error_class, desc):
        Exception.__init__(self, f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class QMPProtocol(LineOnlyReceiver):
    """
    One QMP connection.

    @ivar ready: a Deferred that fires with the greeting (a dict) once capabilities are
        negotiated, or fails if the connection ends first.
    @ivar on_event: called with C{(name, data, timestamp)} for each asynchronous event.
    @ivar on_disconnect: called with the C{Failure} when the connection ends.
    @ivar reactor: provides C{IReactorTime}, for each command's bound; C{None}: unbounded.
    @ivar command_timeout: the default bound of a command, in seconds.
    """

    delimiter = b"\n"
    MAX_LENGTH = 16 * 1024 * 1024
    log = Logger()

    def __init__(self, on_event=None, on_disconnect=None, reactor=None,
                 command_timeout=COMMAND_TIMEOUT):
        self.on_event = on_event or (lambda name, data, timestamp: None)
        self.on_disconnect = on_disconnect or (lambda reason: None)
        self.reactor = reactor
        self.command_timeout = command_timeout
        self.ready = Deferred()
        self.greeting = None
        self.connected_ok = False
        self._pending = {}
        self._timers = {}
        self._timed_out = {}
        self._next_id = 1
        self._lost = None

    def lineReceived(self, line):
        line = line.strip()
        if not line:
            return
        try:
            msg = json.loads(line)
        except ValueError:
            self.log.warn("QMP: not JSON, ignored: {line!r}", line=line[:200])
            return
        if not isinstance(msg, dict):
            return
        if "QMP" in msg:
            self.greeting = msg["QMP"]
            d = self._send("qmp_capabilities", None)
            d.addCallbacks(self._negotiated, self._negotiation_failed)
        elif "event" in msg:
            try:
                self.on_event(msg["event"], msg.get("data", {}), msg.get("timestamp"))
            except Exception:
                self.log.failure("QMP event listener failed")
        elif "return" in msg or "error" in msg:
            cid = msg.get("id")
            d = self._pending.pop(cid, None) if isinstance(cid, int) else None
            timer = self._timers.pop(cid, None) if d is not None else None
            if timer is not None and timer.active():
                timer.cancel()
            if d is None:
                late = self._timed_out.pop(cid, None) if isinstance(cid, int) else None
                if late is not None:
                    self.log.info("QMP: {command} answered after it had timed out",
                                  command=late)
                else:
                    self.log.warn("QMP: reply to nothing, ignored: {msg!r}", msg=msg)
            elif "error" in msg:
                err = msg["error"] or {}
                d.errback(QMPError(err.get("class", "GenericError"), err.get("desc", "")))
            else:
                d.callback(msg["return"])

    def lineLengthExceeded(self, line):
        self.log.error("QMP: line of {n} bytes exceeds the limit; closing", n=len(line))
        self.transport.loseConnection()

    def _negotiated(self, _):
        self.connected_ok = True
        if not self.ready.called:
            self.ready.callback(self.greeting)

    def _negotiation_failed(self, f):
        if not self.ready.called:
            self.ready.errback(f)
        self.transport.loseConnection()

    def _send(self, command, arguments, timeout=None):
        if self._lost is not None:
            return fail(QMPError("Disconnected", "the QMP connection has ended"))
        cid = self._next_id
        self._next_id += 1
        msg = {"execute": command, "id": cid}
        if arguments:
            msg["arguments"] = arguments
        d = Deferred()
        self._pending[cid] = d
        timeout = self.command_timeout if timeout is None else timeout
        if self.reactor is not None and timeout:
            self._timers[cid] = self.reactor.callLater(timeout, self._expire, cid, command,
                                                       timeout)
        self.sendLine(json.dumps(msg).encode())
        return d

    def _expire(self, cid, command, timeout):
        self._timers.pop(cid, None)
        d = self._pending.pop(cid, None)
        if d is None:
            return
        # Remembered so that its reply, if it ever comes, is known for what it is. Bounded:
        # a QEMU this stuck has few commands outstanding, but a caller could keep trying.
        self._timed_out[cid] = command
        while len(self._timed_out) > 1024:
            del self._timed_out[next(iter(self._timed_out))]
        d.errback(QMPError("Timeout", f"QEMU did not answer {command} within {timeout:g} s"))

    def execute(self, command, arguments=None, timeout=None):
        """
        Run a QMP command.

        @param command: its name, e.g. C{"query-status"}.
        @param arguments: a dict, or C{None}.
        @param timeout: seconds to wait for the reply (C{None}: L{command_timeout}).
        @return: a Deferred firing with the command's C{return} value, or failing with
            L{QMPError} (C{Timeout} when unanswered within C{timeout}; C{Disconnected} when
            the connection ends before the reply).
        """
        if not self.connected_ok:
            return fail(QMPError("NotReady", "capabilities are not negotiated yet"))
        return self._send(command, arguments, timeout)

    def execute_with_fd(self, command, arguments, fd, timeout=None):
        """
        Run a QMP command that takes a file descriptor (C{getfd}, C{add-fd}): C{fd} is
        passed with it over the UNIX socket (C{SCM_RIGHTS}); QEMU gets its own copy.

        @return: as L{execute}.
        """
        if not self.connected_ok:
            return fail(QMPError("NotReady", "capabilities are not negotiated yet"))
        if self._lost is None:
            # Sent with the next byte written: the command's line.
            self.transport.sendFileDescriptor(fd)
        return self._send(command, arguments, timeout)

    def close(self):
        """
        End the connection. The commands still unanswered fail (C{Disconnected}) once it
        has ended; their bounds end now.
        """
        self._cancel_timers()
        if self.transport is not None:
            self.transport.loseConnection()

    def _cancel_timers(self):
        timers, self._timers = self._timers, {}
        for timer in timers.values():
            if timer.active():
                timer.cancel()

    def connectionLost(self, reason=ConnectionDone):
        self._lost = reason
        self._cancel_timers()
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(QMPError("Disconnected", "the QMP connection ended before the reply"))
        if not self.ready.called:
            self.ready.errback(QMPError("Disconnected", "the QMP connection ended during negotiation"))
        try:
            self.on_disconnect(reason)
        except Exception:
            self.log.failure("QMP disconnect listener failed")


async def connect(reactor, path, on_event=None, on_disconnect=None, timeout=10.0, interval=0.05,
                  command_timeout=COMMAND_TIMEOUT):
    """
    Connect to the QMP socket at C{path}, retrying while it does not exist yet (QEMU creates it
    shortly after it starts), and negotiate capabilities.

    @param reactor: provides C{IReactorUNIX} and C{IReactorTime}.
    @param timeout: seconds to keep retrying.
    @param command_timeout: the bound of each command sent on the connection (the
        protocol's L{QMPProtocol.command_timeout}).
    @return: (a coroutine of) the ready L{QMPProtocol}.
    @raise QMPError: C{Timeout} if no connection could be made, or no negotiation finished,
        within C{timeout}; C{Disconnected} (or QMP's own error class) if the server ended the
        connection, or refused C{qmp_capabilities}, before negotiation finished.
    """
    tries = max(1, int(timeout / interval))
    last = None
    for _ in range(tries):
        ep = UNIXClientEndpoint(reactor, path, timeout=timeout)
        try:
            proto = await ep.connect(
                Factory.forProtocol(lambda: QMPProtocol(on_event, on_disconnect, reactor,
                                                        command_timeout))
            )
        except ConnectError as e:
            last = e
            await deferLater(reactor, interval, lambda: None)
            continue
        try:
            await proto.ready.addTimeout(timeout, reactor)
        except QMPError as e:
            # The server closed the connection (e.g. QEMU exited: it listens on QMP before it
            # sets up the rest of the machine, and may then fail). Say so: it is no timeout.
            proto.close()
            raise QMPError(e.error_class, f"QMP at {path} failed to negotiate: {e.desc}") from None
        except defer.TimeoutError:
            proto.close()
            raise QMPError("Timeout", f"QMP at {path} did not negotiate within {timeout} s") from None
        except BaseException:
            proto.close()
            raise
        return proto
    raise QMPError("Timeout", f"no QMP server at {path} after {timeout} s: {last}")
