"""
Running a short-lived helper program (mkfs.ext4, a QEMU probe) without blocking the reactor.
"""

import os

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol


class ProcessResult:
    """
    How a helper program ended.

    @ivar code: its exit code, or C{None} if a signal ended it.
    @ivar signal: the signal number that ended it, or C{None}.
    @ivar output: its stdout and stderr, interleaved (bytes, at most 64 KiB, the end).
    @ivar timed_out: whether it was killed because it ran past its timeout.
    """

    def __init__(self, code, signal, output, timed_out):
        self.code = code
        self.signal = signal
        self.output = output
        self.timed_out = timed_out

    def last_line(self):
        """The last non-empty line of its output, for error messages."""
        lines = [x.strip() for x in self.output.decode("utf-8", "replace").splitlines()]
        lines = [x for x in lines if x]
        return lines[-1] if lines else ""

    def __repr__(self):
        return f"<ProcessResult code={self.code} signal={self.signal} timed_out={self.timed_out}>"


class _Collect(ProcessProtocol):
    LIMIT = 64 * 1024

    def __init__(self):
        self.ended = Deferred()
        self.output = b""
        self.timed_out = False

    def childDataReceived(self, fd, data):
        self.output = (self.output + data)[-self.LIMIT:]

    def processEnded(self, reason):
        if reason.check(ProcessDone):
            code, sig = 0, None
        else:
            code, sig = reason.value.exitCode, reason.value.signal
        self.ended.callback(ProcessResult(code, sig, self.output, self.timed_out))


def run(reactor, argv, timeout=60.0, env=None, path=None):
    """
    Run C{argv} to its end.

    @param reactor: provides C{IReactorProcess} and C{IReactorTime}.
    @param argv: the program (C{argv[0]}, found on C{PATH} if not absolute) and its arguments.
    @param timeout: seconds after which it is killed (C{SIGKILL}); the result says so.
    @return: a Deferred firing with a L{ProcessResult}; it fails with C{OSError} only if the
        program cannot be found.
    """
    exe = argv[0]
    if not os.path.isabs(exe):
        for d in (env or os.environ).get("PATH", os.defpath).split(os.pathsep) + ["/sbin", "/usr/sbin"]:
            cand = os.path.join(d, exe)
            if os.access(cand, os.X_OK):
                exe = cand
                break
        else:
            raise FileNotFoundError(f"{argv[0]} is not installed (not found on PATH)")
    proto = _Collect()
    env = dict(os.environ if env is None else env)
    env.setdefault("LC_ALL", "C")
    transport = reactor.spawnProcess(proto, exe, [exe] + list(argv[1:]), env=env, path=path)

    def kill():
        proto.timed_out = True
        try:
            transport.signalProcess("KILL")
        except Exception:
            pass

    call = reactor.callLater(timeout, kill)

    def done(result):
        if call.active():
            call.cancel()
        return result

    return proto.ended.addBoth(done)
