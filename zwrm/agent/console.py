"""
Interactive serial consoles, relayed over WAMP.

QEMU serves each machine's serial console on a UNIX socket (C{console.sock}, see
L{zwrm.drivers.qemu}); it takes one client at a time. L{ConsoleRelay} holds at most one
connection per machine and shares it: every attached reader gets what the guest writes, as
progressive results of its C{machine.console.attach} call (base64 text, since WAMP's JSON
carries no bytes), and C{machine.console.write} sends keystrokes to the guest. A reader
detaches by cancelling its call (the CLI does on Ctrl-]); the connection to QEMU is closed
when the last reader has gone. The call ends with C{{"machine_id", "ended"}} when the machine's
console goes away (it stopped).

The console log (C{zwrm logs}) is independent: QEMU appends everything the guest writes to
C{console.log} whether or not anyone is attached.
"""

import base64

from twisted.internet import defer, protocol
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.logger import Logger

from zwrm.errors import InvalidArgument, Unavailable

log = Logger()

#: The most one write may carry (bytes, before base64).
MAX_WRITE = 4096


class _Connection(protocol.Protocol):
    def __init__(self, console):
        self.console = console

    def dataReceived(self, data):
        self.console.output(data)

    def connectionLost(self, reason):
        self.console.lost()


class _MachineConsole:
    """One machine's console connection and its readers."""

    def __init__(self, relay, machine_id):
        self.relay = relay
        self.machine_id = machine_id
        self.readers = {}  # id -> (progress, done Deferred)
        self.protocol = None
        self.connecting = None

    def output(self, data):
        text = base64.b64encode(data).decode("ascii")
        for progress, _ in list(self.readers.values()):
            try:
                progress(text)
            except Exception as e:
                log.info("console of {id}: a reader could not be sent output: {e}",
                         id=self.machine_id, e=e)

    def lost(self):
        self.protocol = None
        readers, self.readers = self.readers, {}
        self.relay._consoles.pop(self.machine_id, None)
        for _, done in readers.values():
            if not done.called:
                done.callback("the console closed")

    def close_if_unused(self):
        if not self.readers and self.protocol is not None:
            self.protocol.transport.loseConnection()


class ConsoleRelay:
    """
    @param reactor: provides UNIX-socket connections.
    @param socket_path: C{socket_path(machine_id)} -> the console socket of a running
        machine (L{zwrm.drivers.qemu.QemuDriver.console_socket}); raises
        L{zwrm.errors.NotFound} or L{Unavailable}.
    """

    def __init__(self, reactor, socket_path):
        self._reactor = reactor
        self._socket_path = socket_path
        self._consoles = {}
        self._ids = 0

    async def _console(self, machine_id):
        mc = self._consoles.get(machine_id)
        if mc is not None and mc.protocol is not None:
            return mc
        path = self._socket_path(machine_id)
        if mc is None:
            mc = self._consoles[machine_id] = _MachineConsole(self, machine_id)
        if mc.connecting is not None:
            # One connection attempt, however many attach at once.
            waiter = defer.Deferred()
            mc.connecting.append(waiter)
            await waiter
            return mc
        mc.connecting = []
        try:
            mc.protocol = await connectProtocol(
                UNIXClientEndpoint(self._reactor, path, timeout=5), _Connection(mc))
        except Exception as e:
            self._consoles.pop(machine_id, None)
            error = Unavailable(f"machine {machine_id}: its console cannot be reached: {e}")
            waiters, mc.connecting = mc.connecting, None
            for w in waiters:
                w.errback(error)
            raise error from None
        waiters, mc.connecting = mc.connecting, None
        for w in waiters:
            w.callback(None)
        return mc

    async def attach(self, machine_id, progress):
        """
        Relay the console of C{machine_id} to C{progress(base64_text)} until the console
        closes (the result says why) or the caller cancels (detach).
        """
        mc = await self._console(machine_id)
        self._ids += 1
        rid = self._ids
        done = defer.Deferred()
        mc.readers[rid] = (progress, done)
        try:
            ended = await done
        finally:
            mc.readers.pop(rid, None)
            mc.close_if_unused()
        return {"machine_id": machine_id, "ended": ended}

    async def write(self, machine_id, data):
        """Send C{data} (base64 text of at most L{MAX_WRITE} bytes) to the guest's console."""
        if not isinstance(data, str):
            raise InvalidArgument("data must be base64 text")
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError:
            raise InvalidArgument("data must be base64 text") from None
        if len(raw) > MAX_WRITE:
            raise InvalidArgument(f"data must be at most {MAX_WRITE} bytes a write")
        mc = await self._console(machine_id)
        mc.protocol.transport.write(raw)
        if not mc.readers:
            mc.close_if_unused()
        return len(raw)
