"""
C{zwrm console MACHINE}: attach to a machine's serial console through the control plane
(C{zwrm.machine.console}, operators only). What the guest writes is shown as it comes; what
you type goes to the guest (C{zwrm.machine.console_write}); Ctrl-] detaches (the guest and
its console go on). The terminal is in raw mode while attached and restored after.

C{zwrm logs -f MACHINE} follows the console read-only (L{follow}): the log's tail first, then
what the guest writes, until Ctrl-C or the machine stops.
"""

import base64
import os
import sys

from autobahn.wamp.types import CallOptions
from twisted.internet import defer, protocol, stdio

from zwrm.cli.client import CliError, call, close, connect, load_settings

DETACH = b"\x1d"  # Ctrl-]


class _Keyboard(protocol.Protocol):
    """Sends what is typed to the guest; Ctrl-] detaches."""

    def __init__(self, send, detach):
        self._send = send
        self._detach = detach

    def dataReceived(self, data):
        before, sep, _ = data.partition(DETACH)
        if before:
            self._send(before)
        if sep:
            self._detach()

    def connectionLost(self, reason):
        self._detach()  # stdin closed


def _decode(text):
    try:
        return base64.b64decode(text)
    except (ValueError, TypeError):
        return b""


async def _stream(reactor, args, write, keyboard, attaching=None):
    session = await connect(reactor, load_settings(args.api_url))
    try:
        if attaching is not None:
            # a machine that is not there is one line and exit 1, before the terminal is
            # taken or "attached" said
            await call(session, "zwrm.machine.status", args.machine_id)
            attaching()
        attached = session.call("zwrm.machine.console", args.machine_id,
                                options=CallOptions(on_progress=lambda t: write(_decode(t))))
        detached = []
        if keyboard:
            def send(data):
                for i in range(0, len(data), 4096):
                    d = call(session, "zwrm.machine.console_write", args.machine_id,
                             base64.b64encode(data[i:i + 4096]).decode())
                    defer.ensureDeferred(d).addErrback(lambda f: None)

            def detach():
                if not detached:
                    detached.append(True)
                    attached.cancel()

            keyboard(send, detach)
        try:
            result = await attached
        except defer.CancelledError:
            if detached:
                return "detached"
            raise
        except Exception as e:
            text = e.args[0] if getattr(e, "args", None) else str(e)
            raise CliError(f"console of {args.machine_id}: {text}", 3) from None
        return (result or {}).get("ended") or "the console closed"
    finally:
        await close(session)


async def console(reactor, args, out=None):
    """C{zwrm console MACHINE}."""
    fd = sys.stdin.fileno() if sys.stdin else None
    saved = []

    def attaching():
        if fd is not None and os.isatty(fd):
            import termios
            import tty

            saved.append(termios.tcgetattr(fd))
            tty.setraw(fd)
        sys.stderr.write(f"attached to the console of {args.machine_id}; Ctrl-] detaches\r\n")
        sys.stderr.flush()

    io = []

    def keyboard(send, detach):
        io.append(stdio.StandardIO(_Keyboard(send, detach), reactor=reactor))

    def write(data):
        if io:
            io[0].write(data)
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()

    try:
        how = await _stream(reactor, args, write, keyboard, attaching)
    finally:
        if saved:
            import termios

            termios.tcsetattr(fd, termios.TCSADRAIN, saved[0])
        for s in io:
            s.loseConnection()
    sys.stderr.write(f"\r\n{how}\r\n")
    return 0


async def follow(reactor, args, out=None):
    """C{zwrm logs -f MACHINE}: the log's tail, then the console as it comes."""
    out = out or sys.stdout
    session = await connect(reactor, load_settings(args.api_url))
    try:
        text = await call(session, "zwrm.machine.logs", args.machine_id, args.bytes)
    finally:
        await close(session)
    out.write(text)
    out.flush()
    buffer = getattr(out, "buffer", None)

    def write(data):
        if buffer is not None:
            buffer.write(data)
        else:
            out.write(data.decode("utf-8", "replace"))
        out.flush()

    # Interrupted (Ctrl-C, SIGTERM): the reactor's shutdown closes the connection, which is
    # then the end asked for (exit 0, as zwrm events -f), not a lost connection (exit 3).
    stopping = []
    trigger = reactor.addSystemEventTrigger("before", "shutdown", stopping.append, True)
    try:
        how = await _stream(reactor, args, write, None)
    except CliError:
        if stopping:
            return 0
        raise
    finally:
        if not stopping:  # (once fired, the reactor has let go of it)
            reactor.removeSystemEventTrigger(trigger)
    sys.stderr.write(f"\n{how}\n")
    return 0


def register(subparsers):
    """Add C{console} to the CLI's sub-commands."""
    p = subparsers.add_parser("console", help="attach to a machine's serial console (Ctrl-] detaches)")
    p.add_argument("machine_id")
    p.set_defaults(func=console)
    return p
