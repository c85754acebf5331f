"""
What the drain tests and benchmarks share (tests/integration/test_drain.py,
tests/integration/test_live_drain.py, benchmarks/drain.py, benchmarks/live_migration.py):

  - L{DrainTestMixin}: for a trial C{TestCase} driving a real cluster
    (L{zwrm.testing.processes.start_vm_cluster}): the CLI, apps with a volume pinned to a
    host deployed at once, drain-status, every acknowledged write read back, and the
    processes' logs added to a failure;
  - L{Writer}: a client that keeps writing to an app (a write counts once the guest
    C{sync}ed it), on every port the app was seen on, and that can note the QEMU
    processes using a volume at each round (never two);
  - L{Probe}: a GET every 20 ms on every port of an app, for the gap a client sees;
  - L{api}: a procedure called as the operator without the CLI (for polls);
  - L{qemus_using}, L{fill_volume}, L{executor_ports}, L{load}, L{quiet_log}.
"""

import glob
import json
import os
import subprocess
import tempfile
import time

import treq
from twisted.internet import defer, task

from zwrm.testing.processes import poll, run_cli, start_vm_cluster

MiB = 1024 * 1024

DRAIN_ENDED = ("completed", "incomplete", "cancelled")

_NOISE = ("_HTTP11ClientFactory", '"GET /v2/', '"HEAD /v2/', '"PUT /v2/', '"POST /v2/',
          "QMP event")


async def api(reactor, cp, procedure, *args, **kwargs):
    """
    Call C{procedure} of control plane C{cp} as its operator, from this process: what polls
    use instead of the CLI, whose start-up (about 0.8 s of CPU each) they would take from
    the VMs under test.  A WAMP error, a refused connection or no answer raise
    L{zwrm.cli.client.CliError}.
    """
    from zwrm.cli.client import call, close, connect

    session = await connect(reactor, {"url": cp.url, "token": cp.operator_token,
                                      "authid": "operator", "ca_file": None, "timeout": 30.0})
    try:
        return await call(session, procedure, *args, **kwargs)
    finally:
        await close(session)


def quiet_log(text, lines=150):
    """The last C{lines} lines of a process's log, without per-request noise."""
    return "\n".join([ln for ln in text.splitlines() if not any(n in ln for n in _NOISE)][-lines:])


def load():
    """The load averages, to print beside a figure (the machine is shared)."""
    return "load %.1f %.1f %.1f" % os.getloadavg()


def qemus_using(volume_id):
    """The pids of the QEMU processes whose command line names the volume."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args and b"qemu-system" in args[0] and any(volume_id.encode() in a for a in args):
            pids.append(int(pid))
    return pids


def fill_volume(path, data_mb, size_mb=None):
    """
    Make C{path} (an unused volume image: its size, or a new file of C{size_mb} MiB) an ext4
    file system holding C{data_mb} MiB of random data; private (0600). Blocking: call it in
    a thread from reactor code.
    """
    size = size_mb * MiB if size_mb is not None else os.path.getsize(path)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "filler.bin"), "wb") as f:
            for _ in range(data_mb):
                f.write(os.urandom(MiB))
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", d, path, f"{size // 1024}k"],
                       check=True, capture_output=True)
    os.chmod(path, 0o600)


def executor_ports(agent_dirs):
    """The forwarded ports of the machines the agents in C{agent_dirs} run (their records)."""
    ports = set()
    for d in agent_dirs:
        for path in glob.glob(os.path.join(d, "executor", "*.json")):
            try:
                with open(path) as f:
                    port = json.load(f).get("host_port")
            except (OSError, ValueError):
                continue
            if port:
                ports.add(port)
    return ports


class Writer:
    """
    A client writing to the app: C{POST /cgi-bin/write?w-N} to every port the app was seen
    on (refreshed from C{zwrm.app.status}); a write counts as acknowledged when the guest
    answered C{ok} (after its C{sync}).

    @ivar acked: write name -> (body, port) of every acknowledged write.
    @ivar ack_times: when each acknowledgement came (C{time.monotonic}).
    @ivar gap: the longest time between two acknowledgements.
    @ivar history: one C{(time, ports that acknowledged, QEMU processes using
        C{volume_id})} a round (the count is C{0} without a C{volume_id}).
    """

    def __init__(self, reactor, cp, app, port, volume_id=None, interval=0.1):
        self.reactor, self.cp, self.app = reactor, cp, app
        self.volume_id, self.interval = volume_id, interval
        self.ports = {port}
        self.acked = {}
        self.n = 0
        self.stopped = False
        self.last_ack = None
        self.gap = 0.0
        self.ack_times = []
        self.history = []

    def start(self):
        self.running = defer.ensureDeferred(self._run())
        return self

    async def stop(self):
        self.stopped = True
        await self.running

    async def refresh(self):
        """Learn the app's ports (from C{zwrm.app.status}; nothing while it cannot say)."""
        from zwrm.cli.client import CliError

        try:
            machines = (await api(self.reactor, self.cp, "zwrm.app.status", self.app))["machines"]
        except CliError:
            return
        self.ports |= {m["host_port"] for m in machines if m.get("host_port")}

    def acked_since(self, t):
        """How many writes were acknowledged after C{t}."""
        return len([x for x in self.ack_times if x > t])

    def two_copies(self):
        """The rounds in which two ports acknowledged writes or two QEMUs used the volume."""
        return [r for r in self.history if len(r[1]) > 1 or r[2] > 1]

    async def _run(self):
        while not self.stopped:
            served = []
            for port in sorted(self.ports):
                name = f"w-{self.n}"
                body = f"write {self.n} ".encode() * 4
                self.n += 1
                try:
                    r = await treq.post(f"http://127.0.0.1:{port}/cgi-bin/write?{name}", body,
                                        timeout=3)
                    ok = r.code == 200 and (await r.text()).strip() == "ok"
                except Exception:
                    ok = False
                if ok:
                    now = time.monotonic()
                    if self.last_ack is not None:
                        self.gap = max(self.gap, now - self.last_ack)
                    self.last_ack = now
                    self.acked[name] = (body, port)
                    self.ack_times.append(now)
                    served.append(port)
            qemus = len(qemus_using(self.volume_id)) if self.volume_id else 0
            self.history.append((time.monotonic(), served, qemus))
            if len(self.history) % 4 == 0:
                await self.refresh()
            await task.deferLater(self.reactor, self.interval, lambda: None)

    async def missing(self, port):
        """The acknowledged writes that do not read back from the VM at C{port}."""
        lost = []
        for name, (body, _port) in sorted(self.acked.items()):
            r = await treq.get(f"http://127.0.0.1:{port}/cgi-bin/read?{name}", timeout=20)
            if r.code != 200 or await r.content() != body:
                lost.append(name)
        return lost


class Probe:
    """
    A GET every 20 ms on every port of C{ports}, each request on its own (a paused VM holds
    its request until the timeout without delaying the others; at most 3 in flight a port),
    of a missing static file (busybox httpd answers 404 itself: no CGI, no fork, so the probe
    does not load the guest it measures).  C{learn}, if given, returns more ports (read every
    third tick: e.g. L{executor_ports}, as quickly as a client told by service discovery).
    """

    def __init__(self, reactor, ports, learn=None):
        self.reactor = reactor
        self.ports = set(ports)
        self.learn = learn
        self.answers = []
        self.stopped = False
        self.in_flight = {}

    async def _get(self, port):
        self.in_flight[port] = self.in_flight.get(port, 0) + 1
        try:
            r = await treq.get(f"http://127.0.0.1:{port}/probe").addTimeout(2.0, self.reactor)
            await r.content()
            if r.code in (200, 404):
                self.answers.append(time.monotonic())
        except Exception:
            pass
        finally:
            self.in_flight[port] -= 1

    async def run(self):
        pending, n = [], 0
        while not self.stopped:
            if self.learn is not None and n % 3 == 0:
                self.ports |= set(self.learn())
            n += 1
            for port in sorted(self.ports):
                if self.in_flight.get(port, 0) < 3:
                    pending.append(defer.Deferred.fromCoroutine(self._get(port)))
            await task.deferLater(self.reactor, 0.02, lambda: None)
        await defer.DeferredList(pending)

    def gap(self, since=0.0):
        """The longest time between two answers after C{since}."""
        times = sorted(t for t in self.answers if t >= since)
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


class DrainTestMixin:
    """
    For a trial C{TestCase} (set C{reactor}): a real cluster, apps with a volume, the CLI.

    @ivar processes: the cluster's processes, whose logs L{with_logs} adds to a failure.
    """

    processes = ()
    #: seconds between the apps' health checks (the agents' default, 5 s, would add half of
    #: it to every wait for a passing check)
    health_interval = 0.5

    async def cli(self, cp, *args, timeout=60, ok=(0,)):
        code, out, err = await run_cli(self.reactor, list(args), cp.url, cp.operator_token,
                                       timeout=timeout)
        self.assertIn(code, ok, f"zwrm {' '.join(args)} failed ({code}): {out} {err}")
        self.assertNotIn("Traceback", err)
        return out

    def with_logs(self, scenario):
        """Run C{scenario()}; if it fails, add the processes' logs to the failure."""
        async def run():
            try:
                await scenario()
            except Exception as e:
                logs = "".join(f"\n--- {os.path.basename(p.log_path)} (filtered):\n"
                               f"{quiet_log(p.log_tail(400))}" for p in self.processes)
                self.fail(f"{e.__class__.__name__}: {e}{logs}")

        return defer.ensureDeferred(run())

    async def api(self, cp, procedure, *args, **kwargs):
        """L{api}: a procedure of C{cp} called as its operator, without the CLI."""
        return await api(self.reactor, cp, procedure, *args, **kwargs)

    async def start_cluster(self, offline_after=10.0):
        """The control plane and two agents, every one ready: C{(cp, src, dst)}."""
        cp, agents = await start_vm_cluster(self.reactor, self, offline_after=offline_after)
        self.processes = [cp, *agents]
        return cp, agents[0], agents[1]

    async def deploy(self, cp, host, apps=("web",), volume_mb=16, data_mb=0, known=None):
        """
        Each app of C{apps} with one volume C{data} of C{volume_mb} MiB on C{host} (holding
        C{data_mb} MiB of random data), deployed at once with C{zwrm deploy} (one replica, an
        HTTP health check every L{health_interval}), running and healthy, with
        C{known(app)} (bytes) written to its C{index.txt}.

        @return: app -> C{(machine, volume id)}.
        """
        from twisted.internet.threads import deferToThread

        async def one(app):
            await self.api(cp, "zwrm.app.create", app)
            vol = await self.api(cp, "zwrm.volume.create", app, "data", volume_mb, "/data",
                                 host_id=host.host_id)
            if data_mb:
                [path] = glob.glob(os.path.join(host.data_dir, "volumes", vol["id"] + "*"))
                await deferToThread(fill_volume, path, data_mb)
            out = await self.cli(
                cp, "deploy", app, "--image", "demo:1", "--replicas", "1", "--memory", "256",
                "--port", "8080", "--health-http", "/", "--health-interval",
                str(self.health_interval), "--health-grace", "240",
                "--volume", f"data:{volume_mb}:/data", "--wait", "300", "--json", timeout=330)
            [m] = json.loads(out)["machines"]
            self.assertEqual(m["host_id"], host.host_id)
            body = known(app) if known else b"known data before the drain"
            r = await treq.post(f"http://127.0.0.1:{m['host_port']}/cgi-bin/write?index.txt",
                                body)
            self.assertEqual(r.code, 200, await r.text())
            return m, vol["id"]

        results = await defer.gatherResults(
            [defer.ensureDeferred(one(app)) for app in apps], consumeErrors=True)
        return dict(zip(apps, results, strict=True))

    async def app_status(self, cp, app):
        return await self.api(cp, "zwrm.app.status", app)

    async def drain_status(self, cp, host_id):
        return await self.api(cp, "zwrm.host.drain_status", host_id)

    async def hosts(self, cp):
        """host id -> its C{zwrm.host.list} entry."""
        return {h["id"]: h for h in await self.api(cp, "zwrm.host.list")}

    async def restart_agent(self, cp, agent, timeout=120):
        """
        Start C{agent} (stopped or killed) again and wait until it is back: registered, its
        executor callable, heartbeating (a host killed for less than C{offline_after} was
        never marked offline: its state alone says nothing).
        """
        await poll(self.reactor, lambda: not agent.running, 20, what=f"{agent.name} stopped")
        started = time.time()
        await agent.start()

        async def back():
            h = (await self.hosts(cp))[agent.host_id]
            return h["state"] != "offline" and (h["last_heartbeat"] or 0) > started

        await poll(self.reactor, back, timeout, interval=0.5, what=f"{agent.name} back")

    async def wait_phase(self, cp, host_id, phases, timeout=300, interval=0.5):
        """Wait until the drain's first migration is in one of C{phases} (fail if it ended)."""
        async def there():
            status = await self.drain_status(cp, host_id)
            if status["migrations"][0]["phase"] in phases:
                return True
            self.assertNotIn(status["state"], DRAIN_ENDED,
                             f"the drain ended before {'/'.join(phases)}: {status}")
            return False

        await poll(self.reactor, there, timeout, interval=interval,
                   what=f"migration in {'/'.join(phases)}")

    async def wait_drain_ended(self, cp, host_id, timeout=300, interval=0.5):
        """
        Wait until C{host_id}'s drain ended (a control plane that does not answer, being
        restarted, counts as not ended); @return: its drain-status.
        """
        from zwrm.cli.client import CliError

        async def ended():
            try:
                status = await self.drain_status(cp, host_id)
            except CliError:
                return False
            return status["state"] in DRAIN_ENDED and status

        return await poll(self.reactor, ended, timeout, interval=interval, what="drain ended")

    async def wait_healthy(self, cp, app, timeout=120):
        """Wait until C{app}'s one machine passes its health check; @return: the machine."""
        async def healthy():
            [x] = (await self.app_status(cp, app))["machines"]
            return x["health"] == "passing" and x

        return await poll(self.reactor, healthy, timeout, interval=0.5,
                          what=f"{app} healthy")

    async def check_writes(self, writer, port):
        """Every write C{writer} saw acknowledged reads back from the VM at C{port}."""
        self.assertGreater(len(writer.acked), 0)
        self.assertEqual(await writer.missing(port), [],
                         f"acknowledged writes lost ({len(writer.acked)} acked)")


__all__ = ["DRAIN_ENDED", "DrainTestMixin", "Probe", "Writer", "api", "executor_ports",
           "fill_volume", "load", "qemus_using", "quiet_log"]
