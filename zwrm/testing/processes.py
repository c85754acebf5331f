"""
Real zwrm processes for tests and benchmarks: C{twistd -n zwrm-control},
C{twistd -n zwrm-agent} and the C{zwrm} CLI, started with C{spawnProcess} and awaited
with bounded polls (never C{sleep}).

Everything listens on loopback.  Each process's output goes to a log file next to its
data directory, which a failing test can print (L{ZwrmProcess.log_tail}).

Example::

    cp = ControlPlaneProcess(reactor, tmp / "cp", check_interval=0.5, offline_after=2)
    await cp.start()
    agent = AgentProcess(reactor, tmp / "a1", cp.url, cp.join_token, name="a1")
    await agent.start()
    await poll(reactor, lambda: ..., timeout=30, what="agent ready")
"""

import json
import os
import signal
import socket
import sys

from twisted.internet import defer, process, protocol
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.task import LoopingCall, deferLater

from zwrm.testing.disks import small_disk

TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())"]
ZWRM = [sys.executable, "-c", "import sys; from zwrm.cli.main import main; sys.exit(main())"]


class PollTimeout(AssertionError):
    """A bounded poll ran out of time."""


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def poll(reactor, check, timeout, interval=0.2, what="condition"):
    """
    Call C{check()} (which may return a Deferred or coroutine) until it returns
    something true, and return that.

    @raise PollTimeout: if C{timeout} seconds pass first; the message names C{what}
        and the last value seen.
    """
    deadline = reactor.seconds() + timeout
    last = None
    while True:
        result = check()
        if isinstance(result, defer.Deferred) or hasattr(result, "__await__"):
            result = await result
        if result:
            return result
        last = result
        if reactor.seconds() >= deadline:
            raise PollTimeout(f"{what}: not within {timeout}s (last: {last!r})")
        await deferLater(reactor, interval, lambda: None)


class _Collect(protocol.ProcessProtocol):
    def __init__(self, log_path=None):
        self.ended = defer.Deferred()
        self.out = []
        self.err = []
        self._log = open(log_path, "ab") if log_path else None  # noqa: SIM115

    def outReceived(self, data):
        self.out.append(data)
        if self._log:
            self._log.write(data)
            self._log.flush()

    def errReceived(self, data):
        self.err.append(data)
        if self._log:
            self._log.write(data)
            self._log.flush()

    def processEnded(self, reason):
        if self._log:
            self._log.close()
        code = reason.value.exitCode if reason.check(ProcessDone) is None else 0
        self.ended.callback(code)


def reaped(reactor, ended, every=1.0):
    """
    C{ended} (a process protocol's Deferred that fires at its C{processEnded}), while
    the reactor's reaping is helped every C{every} seconds (C{reapAllProcesses}: a
    C{waitpid(WNOHANG)} for each child it spawned).

    Twisted reaps a child when its pipes close or when C{SIGCHLD} wakes the reactor. Once
    in CI (ci9) a test worker noticed no child's end for minutes (a CLI it had killed, then
    the agents it stopped), and the test hung until trial's timeout; a second here at
    most, whatever went missing.
    """
    helper = LoopingCall(process.reapAllProcesses)
    helper.clock = reactor
    helper.start(every, now=False)

    def done(result):
        if helper.running:
            helper.stop()
        return result

    return ended.addBoth(done)


class ZwrmProcess:
    """
    A long-running zwrm process.

    @ivar pid: its process id (while running).
    @ivar log_path: where its output goes.
    """

    def __init__(self, reactor, data_dir):
        self.reactor = reactor
        self.data_dir = os.path.abspath(os.fspath(data_dir))
        self.log_path = self.data_dir.rstrip("/") + ".log"
        self._proto = None
        self._transport = None

    def argv(self):
        raise NotImplementedError

    def spawn(self):
        """Start the process (returns at once)."""
        os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
        self._proto = _Collect(self.log_path)
        argv = self.argv()
        self._transport = self.reactor.spawnProcess(
            self._proto, argv[0], argv, env=dict(os.environ), path=os.path.dirname(self.log_path)
        )

    @property
    def pid(self):
        return self._transport.pid if self._transport is not None else None

    @property
    def running(self):
        return self._proto is not None and not self._proto.ended.called

    def signal(self, sig):
        """Send C{sig} (e.g. C{signal.SIGSTOP}) to the process."""
        os.kill(self.pid, sig)

    def freeze(self):
        """SIGSTOP: the process keeps its sockets but does nothing."""
        self.signal(signal.SIGSTOP)

    def thaw(self):
        """SIGCONT."""
        self.signal(signal.SIGCONT)

    async def stop(self, timeout=15):
        """SIGTERM, then SIGKILL after C{timeout} seconds; returns the exit code."""
        if not self.running:
            return None
        ended = self._proto.ended
        try:
            self._transport.signalProcess(signal.SIGCONT)
            self._transport.signalProcess("TERM")
        except ProcessExitedAlready:
            pass
        timer = self.reactor.callLater(timeout, self._kill)
        code = await reaped(self.reactor, ended)
        if timer.active():
            timer.cancel()
        return code

    def _kill(self):
        try:
            self._transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    def log_tail(self, lines=40):
        """The last C{lines} lines of the process's log."""
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


class ControlPlaneProcess(ZwrmProcess):
    """
    C{twistd -n zwrm-control} on 127.0.0.1.

    @ivar url: its WebSocket URL (once started).
    """

    def __init__(self, reactor, data_dir, port=None, heartbeat_interval=1.0,
                 check_interval=1.0, offline_after=3.0, grace=None, flush_interval=1.0,
                 extra_args=()):
        ZwrmProcess.__init__(self, reactor, data_dir)
        self.port = port or free_port()
        self.settings = {
            "heartbeat-interval": heartbeat_interval,
            "check-interval": check_interval,
            "offline-after": offline_after,
            "flush-interval": flush_interval,
        }
        if grace is not None:
            self.settings["grace"] = grace
        self.extra_args = list(extra_args)
        self.url = f"ws://127.0.0.1:{self.port}/ws"

    def argv(self):
        argv = TWISTD + ["-n", "--pidfile=", "zwrm-control", "--data-dir", self.data_dir,
                         "--listen", f"tcp:{self.port}:interface=127.0.0.1"]
        for k, v in self.settings.items():
            argv += [f"--{k}", str(v)]
        return argv + self.extra_args

    def _read(self, name):
        with open(os.path.join(self.data_dir, name)) as f:
            return f.read().strip()

    @property
    def operator_token(self):
        return self._read("operator.token")

    @property
    def join_token(self):
        return self._read("join.token")

    async def start(self, timeout=60):
        """Start and wait until it listens (it writes C{control.url} then)."""
        url_file = os.path.join(self.data_dir, "control.url")
        if os.path.exists(url_file):
            os.remove(url_file)
        self.spawn()

        def listening():
            if not self.running:
                raise RuntimeError(f"zwrm-control exited:\n{self.log_tail()}")
            return os.path.exists(url_file)

        await poll(self.reactor, listening, timeout, what="zwrm-control listening")
        return self


class AgentProcess(ZwrmProcess):
    """C{twistd -n zwrm-agent} joined to a control plane."""

    def __init__(self, reactor, data_dir, url, join_token, name=None, region="r1",
                 datacenter="dc1", extra_args=()):
        ZwrmProcess.__init__(self, reactor, data_dir)
        self.url = url
        self.join_token = join_token
        self.name = name or os.path.basename(self.data_dir.rstrip("/"))
        self.region = region
        self.datacenter = datacenter
        self.extra_args = list(extra_args)

    def argv(self):
        # the token goes in a private file, never on the command line
        token_file = self.data_dir.rstrip("/") + ".join-token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.join_token + "\n")
        return TWISTD + [
            "-n", "--pidfile=", "zwrm-agent", "--control-plane-url", self.url,
            "--join-token-file", token_file, "--data-dir", self.data_dir, "--name", self.name,
            "--region", self.region, "--datacenter", self.datacenter,
            "--retry-initial", "0.2", "--retry-max", "2",
        ] + self.extra_args

    @property
    def host_id(self):
        """The host id from the agent's data directory, or L{None}."""
        try:
            with open(os.path.join(self.data_dir, "host.json")) as f:
                return json.load(f)["host_id"]
        except (OSError, ValueError, KeyError):
            return None

    async def start(self, timeout=60):
        """Start and wait until it has a host id on disk."""
        self.spawn()
        await poll(self.reactor, lambda: self.host_id, timeout, what=f"agent {self.name} host id")
        return self


async def run_cli(reactor, args, url, token, timeout=60, env=None):
    """
    Run C{zwrm <args>} against C{url} with operator C{token}.

    @param env: more environment variables (e.g. C{ZWRM_CA_FILE} for C{wss://}).
    @return: C{(exit code, stdout text, stderr text)}.
    """
    proto = _Collect()
    env = dict(os.environ, ZWRM_API_URL=url, ZWRM_TOKEN=token, **(env or {}))
    argv = ZWRM + list(args)
    transport = reactor.spawnProcess(proto, argv[0], argv, env=env)
    timer = reactor.callLater(timeout, lambda: transport.signalProcess("KILL"))
    code = await reaped(reactor, proto.ended)
    if timer.active():
        timer.cancel()
    return code, b"".join(proto.out).decode(), b"".join(proto.err).decode()


async def host_list(reactor, cp):
    """C{zwrm host list --json} against C{cp}, parsed; raises on a non-zero exit."""
    code, out, err = await run_cli(reactor, ["host", "list", "--json"], cp.url, cp.operator_token)
    if code != 0:
        raise RuntimeError(f"zwrm host list failed ({code}): {err.strip().splitlines()[-1:]}")
    return json.loads(out)


def kill_machines_under(path):
    """
    Kill (SIGKILL) every QEMU process whose pid file (C{qemu.pid}, written by the qemu
    driver) lies under C{path}, checking its command line names that pid file first.

    Virtual machines outlive their agent by design (an agent restart must not stop them), so
    tests and benchmarks that start agents call this before removing their directory.

    @return: the pids killed.
    """
    killed = []
    for root, _dirs, files in os.walk(path):
        if "qemu.pid" not in files:
            continue
        pidfile = os.path.join(root, "qemu.pid")
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if pidfile.encode() in args:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    return killed


def temp_dir(testcase):
    """
    A fresh directory outside the checkout, removed after C{testcase}, once every QEMU
    process that agents started under it has been killed (kept, for its logs, when the
    environment sets C{ZWRM_KEEP_TEST_DIRS}).
    """
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="zwrm-test-")

    def cleanup():
        kill_machines_under(path)
        if not os.environ.get("ZWRM_KEEP_TEST_DIRS"):
            shutil.rmtree(path, True)

    testcase.addCleanup(cleanup)
    return path


async def start_vm_cluster(reactor, testcase, agents=2, offline_after=10.0, image_ref="demo:1",
                           data_disk_mib=None):
    """
    A real control plane and C{agents} real agents (QEMU under TCG) in a temporary directory,
    every agent ready, and the test image pushed to the control plane's registry as
    C{image_ref}.  Everything is stopped (and the VMs killed) after C{testcase}.

    @param data_disk_mib: give each agent's data directory a file system of its own of this
        many MiB (a tmpfs: L{zwrm.testing.disks}), as operators give hosts a data disk.
    @return: C{(control plane, [agents])}.
    """
    from twisted.internet.threads import deferToThread

    from zwrm.testing import image

    img = await deferToThread(image.build)
    tmp = temp_dir(testcase)
    cp = ControlPlaneProcess(reactor, f"{tmp}/cp", heartbeat_interval=1.0, check_interval=2.0,
                             offline_after=offline_after, grace=offline_after)
    testcase.addCleanup(cp.stop)
    await cp.start()
    started = [AgentProcess(reactor, f"{tmp}/a{i}", cp.url, cp.join_token, name=f"a{i}",
                            extra_args=["--accel", "tcg"]) for i in range(1, agents + 1)]
    for a in started:
        if data_disk_mib is not None:
            # Cleanups run last first: the agent stops, its machines are killed (their pid
            # files are under the data directory, which a lazy unmount hides from
            # temp_dir's cleanup), then it is unmounted.
            small_disk(testcase, a.data_dir, f"{data_disk_mib}M")
            testcase.addCleanup(kill_machines_under, a.data_dir)
        testcase.addCleanup(a.stop)
        await a.start()

    async def ready():
        hosts = await host_list(reactor, cp)
        return len(hosts) == agents and all(h["state"] == "ready" for h in hosts)

    await poll(reactor, ready, 60, what=f"{agents} agents ready")
    code, _out, err = await run_cli(
        reactor, ["images", "push", image_ref, "--kernel", img.kernel, "--initrd", img.initrd,
                  "--cmdline", img.cmdline, "--port", "8080", "-q"], cp.url, cp.operator_token)
    if code != 0:
        raise RuntimeError(f"zwrm images push failed ({code}): {err.strip()}")
    return cp, started
