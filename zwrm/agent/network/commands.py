"""Running the network tools (C{ip}, C{bridge}, C{nft}, C{sysctl}) off the reactor thread."""

from twisted.internet import defer, protocol
from twisted.logger import Logger

from zwrm.errors import Unavailable

log = Logger()


class CommandFailed(Unavailable):
    """A network command exited with an error; its message names the command and stderr."""


class _Collect(protocol.ProcessProtocol):
    def __init__(self, stdin):
        self.stdin = stdin
        self.out = []
        self.err = []
        self.done = defer.Deferred()

    def connectionMade(self):
        if self.stdin is not None:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)

    def processEnded(self, reason):
        code = getattr(reason.value, "exitCode", 0)
        self.done.callback((code, b"".join(self.out).decode(errors="replace"),
                            b"".join(self.err).decode(errors="replace")))


class Runner:
    """
    Runs commands with C{reactor.spawnProcess}.

    @param prefix: argv to put in front of every command (tests pass
        C{["ip", "netns", "exec", NS]} to act inside a host's network namespace).
    """

    def __init__(self, reactor, prefix=()):
        self.reactor = reactor
        self.prefix = list(prefix)

    async def __call__(self, *argv, stdin=None, check=True):
        """
        Run C{argv}; return its standard output.

        @param stdin: bytes to write to its standard input, or L{None}.
        @raise CommandFailed: if it exits with an error and C{check} is true.
        """
        full = self.prefix + [str(a) for a in argv]
        p = _Collect(stdin.encode() if isinstance(stdin, str) else stdin)
        try:
            self.reactor.spawnProcess(p, full[0], full, env=None)
        except OSError as e:
            raise CommandFailed(f"cannot run {argv[0]}: {e.strerror}") from None
        code, out, err = await p.done
        if code and check:
            raise CommandFailed(f"{' '.join(str(a) for a in argv)}: {err.strip() or f'exit {code}'}")
        return out
