"""
A QEMU Machine Protocol (QMP) client as a Twisted protocol.

QMP is line-delimited JSON over (here) a UNIX socket. The server greets with
C{{"QMP": {...}}}; the client must send C{qmp_capabilities} before any other command.
Each command gets exactly one reply, C{{"return": ...}} or C{{"error": {"class", "desc"}}},
carrying the C{id} the command was sent with; asynchronous events
(C{{"event": NAME, "data": {...}, "timestamp": {...}}}) can arrive at any time, also between
a command and its reply.
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
    """

    delimiter = b"\n"
    MAX_LENGTH = 16 * 1024 * 1024
    log = Logger()

    def __init__(self, on_event=None, on_disconnect=None):
        self.on_event = on_event or (lambda name, data, timestamp: None)
        self.on_disconnect = on_disconnect or (lambda reason: None)
        self.ready = Deferred()
        self.greeting = None
        self.connected_ok = False
        self._pending = {}
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
            d = self._pending.pop(msg.get("id"), None)
            if d is None:
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

    def _send(self, command, arguments):
        if self._lost is not None:
            return fail(QMPError("Disconnected", "the QMP connection has ended"))
        cid = self._next_id
        self._next_id += 1
        msg = {"execute": command, "id": cid}
        if arguments:
            msg["arguments"] = arguments
        d = Deferred()
        self._pending[cid] = d
        self.sendLine(json.dumps(msg).encode())
        return d

    def execute(self, command, arguments=None):
        """
        Run a QMP command.

        @param command: its name, e.g. C{"query-status"}.
        @param arguments: a dict, or C{None}.
        @return: a Deferred firing with the command's C{return} value, or failing with
            L{QMPError} (also when the connection ends before the reply).
        """
        if not self.connected_ok:
            return fail(QMPError("NotReady", "capabilities are not negotiated yet"))
        return self._send(command, arguments)

    def execute_with_fd(self, command, arguments, fd):
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
        return self._send(command, arguments)

    def close(self):
        """End the connection."""
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason=ConnectionDone):
        self._lost = reason
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(QMPError("Disconnected", "the QMP connection ended before the reply"))
        if not self.ready.called:
            self.ready.errback(QMPError("Disconnected", "the QMP connection ended during negotiation"))
        try:
            self.on_disconnect(reason)
        except Exception:
            self.log.failure("QMP disconnect listener failed")


async def connect(reactor, path, on_event=None, on_disconnect=None, timeout=10.0, interval=0.05):
    """
    Connect to the QMP socket at C{path}, retrying while it does not exist yet (QEMU creates it
    shortly after it starts), and negotiate capabilities.

    @param reactor: provides C{IReactorUNIX} and C{IReactorTime}.
    @param timeout: seconds to keep retrying.
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
                Factory.forProtocol(lambda: QMPProtocol(on_event, on_disconnect))
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
