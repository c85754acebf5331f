#!/usr/bin/env python3
"""
Benchmark of zwrm's embedded WAMP router, beside Crossbar.io when it is installed.

Workload (loopback WebSocket, JSON and MsgPack; every router and client in its own process):
 - RPC, one caller and one callee: calls/s sequentially and with 64 calls in flight,
   and the latency p50 / p99 of the sequential calls;
 - pub/sub, one publisher: events delivered per second to 1 and to 10 subscribers.

Beside each rate the router's own CPU time per call or per delivered event is printed
(user + system time of the router process and its children, from /proc: the threads'
on-CPU nanoseconds in schedstat, or utime + stime where that is missing), which does
not depend on how loaded the machine is as much as the rates do.

Usage:
    .venv/bin/python benchmarks/router.py [--quick] [--rounds 3] [--crossbar PATH/bin/crossbar]

``--micro`` measures only the router's CPU per message without sockets (a caller, a callee and
ten subscribers on StringTransports, one frame per read), which load elsewhere on the machine
barely moves; with ``--other DIR`` beside another checkout's zwrm package.

Rows are the medians of interleaved rounds (zwrm and Crossbar alternate, so load elsewhere
on the machine hits both); the load average is printed before and after.  Final figures
need a quiet machine.

Crossbar.io is never a dependency of zwrm: it runs from the cached virtualenv the tests use
(``python3 tests/crossbar/router.py --install`` makes it, as CI does; found as
tests/crossbar/router.py finds it, or given with ``--crossbar``).  Without it the script
prints zwrm's figures and says Crossbar is absent.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

# autobahn tries the optional UBJSON serializer (bjdata); a bjdata built against another
# NumPy prints a long traceback on import.  The benchmark does not use UBJSON: skip it.
sys.modules.setdefault("bjdata", None)

import txaio  # noqa: E402

txaio.use_twisted()

from autobahn.twisted.wamp import ApplicationSession  # noqa: E402
from autobahn.wamp.exception import ApplicationError  # noqa: E402
from autobahn.wamp.types import ComponentConfig, PublishOptions  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402

from zwrm.agent.executor import free_port  # noqa: E402

HERE = os.path.abspath(__file__)
DEFAULT_CROSSBAR = "/opt/crossbar-venv/bin/crossbar"


def default_crossbar():
    """
    The crossbar executable of the cached virtualenv the tests use (tests/crossbar/router.py:
    C{$ZWRM_CROSSBAR_VENV}, else /opt/crossbar-venv, else ~/.cache/zwrm/crossbar-venv),
    without installing anything; L{DEFAULT_CROSSBAR} if that cannot be found.
    """
    try:
        sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
        from tests.crossbar.router import venv_path
    except ImportError:
        return DEFAULT_CROSSBAR
    return os.path.join(venv_path(), "bin", "crossbar")
ALL = {"call", "register", "publish", "subscribe"}


# --- processes -------------------------------------------------------------------------


def wait_port(port, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def serve_zwrm(port):
    """Run zwrm's router alone in this process (a child of the benchmark)."""
    from twisted.internet import reactor

    from zwrm.wamp.auth import RoleBasedAuthorizer, Rule, StaticAuthenticator
    from zwrm.wamp.router import Router
    from zwrm.wamp.transport import listen

    router = Router(reactor, StaticAuthenticator(anonymous=True),
                    RoleBasedAuthorizer({"anonymous": [Rule("bench.", "prefix", ALL)]}))
    listen(reactor, router, f"tcp:{port}:interface=127.0.0.1")
    profile = os.environ.get("ZWRM_BENCH_PROFILE")
    if not profile:
        reactor.run()
        return
    # ZWRM_BENCH_PROFILE=out.prof: profile the router (cProfile) and write the stats on exit
    import cProfile
    import signal

    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
    cProfile.runctx("reactor.run(installSignalHandlers=False)", globals(), {"reactor": reactor}, profile)


def crossbar_config(port):
    perm = {"uri": "bench.", "match": "prefix",
            "allow": {"call": True, "register": True, "publish": True, "subscribe": True},
            "disclose": {"caller": True, "publisher": True}, "cache": True}
    return {
        "version": 2,
        "controller": {},
        "workers": [{
            "type": "router",
            "realms": [{"name": "zwrm", "roles": [{"name": "anonymous", "permissions": [perm]}]}],
            "transports": [{
                "type": "websocket",
                "endpoint": {"type": "tcp", "port": port, "interface": "127.0.0.1"},
                "serializers": ["json", "msgpack"],
                "auth": {"anonymous": {"type": "static", "role": "anonymous"}},
            }],
        }],
    }


_TICK = os.sysconf("SC_CLK_TCK")


def _children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def _cpu_of(pid):
    """
    CPU seconds (user + system) of one process: the sum of its threads' on-CPU time from
    C{/proc/<pid>/task/<tid>/schedstat} (nanoseconds), or, where that is missing,
    utime + stime from C{/proc/<pid>/stat} (in clock ticks of 10 ms, too coarse for a
    phase of a few hundred ms).
    """
    try:
        ns = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns += int(f.read().split()[0])
        if ns:
            return ns / 1e9
    except (OSError, IndexError, ValueError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def process_tree_cpu(pid):
    """User + system CPU seconds of C{pid} and all its live descendants (from /proc)."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            total += _cpu_of(p)
        except (OSError, IndexError, ValueError):
            continue
        todo.extend(_children(p))
    return total


class RouterProcess:
    def __init__(self, kind, crossbar=None, source=None):
        self.kind = kind
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix=f"bench-{kind}-")
        log = open(os.path.join(self.tmp, "router.log"), "wb")
        if kind.startswith("zwrm"):
            cmd = [sys.executable, HERE, "--serve-zwrm", str(self.port)]
            self.url = f"ws://127.0.0.1:{self.port}/ws"
        else:
            cbdir = os.path.join(self.tmp, ".crossbar")
            os.makedirs(cbdir)
            with open(os.path.join(cbdir, "config.json"), "w") as f:
                json.dump(crossbar_config(self.port), f)
            cmd = [crossbar, "start", "--cbdir", cbdir, "--loglevel", "warn"]
            self.url = f"ws://127.0.0.1:{self.port}/"
        env = dict(os.environ)
        if source:
            # another checkout's zwrm package (e.g. the previous commit), to measure a change
            env["PYTHONPATH"] = source + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp, env=env)
        try:
            wait_port(self.port, 300)  # Crossbar takes long to start on a loaded machine
        except BaseException:
            self.stop()  # never leave a router behind
            raise

    def cpu(self):
        """CPU seconds (user + system) used so far by the router and its descendants."""
        return process_tree_cpu(self.proc.pid)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- client sessions -------------------------------------------------------------------


class Session(ApplicationSession):
    def __init__(self, joined):
        ApplicationSession.__init__(self, ComponentConfig(realm="zwrm"))
        self._joined = joined

    def onJoin(self, details):
        if not self._joined.called:
            self._joined.callback(self)


@defer.inlineCallbacks
def connect(reactor, url, serializer):
    from zwrm.wamp.transport import WampWebSocketClientFactory, make_serializers

    joined = defer.Deferred()
    host, port = url.split("//")[1].split("/")[0].split(":")
    factory = WampWebSocketClientFactory(lambda: Session(joined), url=url,
                                         serializers=make_serializers([serializer]))
    yield TCP4ClientEndpoint(reactor, host, int(port)).connect(factory)
    session = yield joined.addTimeout(30, reactor)
    return session


def worker(reactor, role, url, serializer, n):
    """Child process: a callee, or n subscribers that report what they got."""

    @defer.inlineCallbacks
    def main():
        if role == "callee":
            s = yield connect(reactor, url, serializer)
            yield s.register(lambda *a, **kw: a[0] if a else None, "bench.echo")
            yield s.publish("bench.ready", "callee")
        else:
            for _ in range(n):
                s = yield connect(reactor, url, serializer)
                state = {"count": 0}

                def on_event(seq, total, payload, s=s, state=state):
                    state["count"] += 1
                    if seq == total - 1:
                        s.publish("bench.report", state["count"])
                        state["count"] = 0

                yield s.subscribe(on_event, "bench.events")
                yield s.publish("bench.ready", "subscriber")
        yield defer.Deferred()  # run until killed

    return main()


def spawn_worker(role, url, serializer, n=1):
    return subprocess.Popen([sys.executable, HERE, "--worker", role, url, serializer, str(n)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Collector:
    def __init__(self):
        self.items = []
        self.waiters = []

    def __call__(self, *args):
        self.items.append(args[0] if args else None)
        waiters, self.waiters = self.waiters, []
        for n, d in waiters:
            if len(self.items) >= n:
                d.callback(None)
            else:
                self.waiters.append((n, d))

    def wait_for(self, n, reactor, timeout=60):
        d = defer.Deferred()
        if len(self.items) >= n:
            d.callback(None)
        else:
            self.waiters.append((n, d))
        return d.addTimeout(timeout, reactor)


# --- the workload ----------------------------------------------------------------------


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


@defer.inlineCallbacks
def measure(reactor, url, serializer, sizes, cpu=lambda: 0.0):
    results = {}
    driver = yield connect(reactor, url, serializer)
    ready = Collector()
    reports = Collector()
    yield driver.subscribe(ready, "bench.ready")
    yield driver.subscribe(reports, "bench.report")
    procs = [spawn_worker("callee", url, serializer)]
    try:
        yield ready.wait_for(1, reactor)
        for _ in range(50):
            try:
                yield driver.call("bench.echo", 0)
                break
            except ApplicationError:
                yield task.deferLater(reactor, 0.1, lambda: None)

        # sequential calls and their latency; the callee's and the caller's (this process's)
        # CPU too: one call at a time, the round trip is the three processes' CPU summed
        lat = []
        c0, callee0, caller0 = cpu(), _cpu_of(procs[0].pid), _cpu_of(os.getpid())
        t0 = time.perf_counter()
        for i in range(sizes["seq"]):
            t = time.perf_counter()
            yield driver.call("bench.echo", i)
            lat.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - t0
        results["rpc_seq"] = sizes["seq"] / elapsed
        results["cpu_seq_us"] = (cpu() - c0) / sizes["seq"] * 1e6
        results["cpu_seq_callee_us"] = (_cpu_of(procs[0].pid) - callee0) / sizes["seq"] * 1e6
        results["cpu_seq_caller_us"] = (_cpu_of(os.getpid()) - caller0) / sizes["seq"] * 1e6
        results["rtt_seq_us"] = elapsed / sizes["seq"] * 1e6
        results["p50_ms"] = pct(lat, 50) * 1000
        results["p99_ms"] = pct(lat, 99) * 1000

        # 64 calls in flight
        total = sizes["par"]
        sent = [0]
        done = defer.Deferred()
        finished = [0]

        def one(_=None):
            if sent[0] >= total:
                return
            sent[0] += 1
            driver.call("bench.echo", sent[0]).addBoth(back)

        def back(r):
            finished[0] += 1
            if finished[0] == total:
                done.callback(None)
            else:
                one()

        c0 = cpu()
        t0 = time.perf_counter()
        for _ in range(64):
            one()
        yield done.addTimeout(120, reactor)
        results["rpc_64"] = total / (time.perf_counter() - t0)
        results["cpu_64_us"] = (cpu() - c0) / total * 1e6

        # events, 1 and 10 subscribers
        for nsubs, nevents in ((1, sizes["ev1"]), (10, sizes["ev10"])):
            ready.items.clear()
            reports.items.clear()
            per_proc = [nsubs] if nsubs == 1 else [nsubs // 2, nsubs - nsubs // 2]
            subs = [spawn_worker("subscriber", url, serializer, k) for k in per_proc]
            procs.extend(subs)
            yield ready.wait_for(nsubs, reactor)
            payload = "x" * 32
            window = []
            opts = PublishOptions(acknowledge=True)
            c0 = cpu()
            t0 = time.perf_counter()
            for seq in range(nevents):
                window.append(driver.publish("bench.events", seq, nevents, payload, options=opts))
                if len(window) >= 128:
                    yield defer.gatherResults(window)
                    window = []
            yield defer.gatherResults(window)
            yield reports.wait_for(nsubs, reactor, timeout=120)
            elapsed = time.perf_counter() - t0
            used = cpu() - c0
            delivered = sum(reports.items[:nsubs])
            results[f"ev_{nsubs}"] = delivered / elapsed
            results[f"cpu_ev_{nsubs}_us"] = used / max(1, delivered) * 1e6
            results[f"ev_{nsubs}_lost"] = nsubs * nevents - delivered
            for p in subs:
                p.kill()
                p.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        driver.leave()
    return results


def micro_child(n):
    """
    Router CPU per message without sockets (printed as JSON): a caller and a callee
    WebSocket connection on StringTransports, fed N CALL and YIELD frames (one frame per
    read), then N/4 PUBLISHes to 10 subscribers; process CPU time per call (CALL in,
    INVOCATION out, YIELD in, RESULT out) and per delivered event.  Load elsewhere on the
    machine barely moves these figures.
    """
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from zwrm.wamp.auth import RoleBasedAuthorizer, Rule, StaticAuthenticator
    from zwrm.wamp.router import Router
    from zwrm.wamp.transport import websocket_factory

    def frame(obj, mask=b"abcd"):
        p = json.dumps(obj, separators=(",", ":")).encode()
        return bytes([0x81, 0x80 | len(p)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(p))

    class T(StringTransport):
        def unregisterProducer(self):
            self.producer = None

    router = Router(Clock(), StaticAuthenticator(anonymous=True),
                    RoleBasedAuthorizer({"anonymous": [Rule("t.", "prefix", ALL)]}))
    factory = websocket_factory(router)

    def conn():
        p, t = factory.buildProtocol(None), T()
        p.makeConnection(t)
        p.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                       b"Sec-WebSocket-Protocol: wamp.2.json\r\n\r\n")
        p.dataReceived(frame([1, "zwrm", {"roles": {"caller": {}, "callee": {}, "publisher": {},
                                                    "subscriber": {}}}]))
        t.clear()
        return p, t

    caller, ct = conn()
    callee, et = conn()
    callee.dataReceived(frame([64, 1, {}, "t.echo"]))
    et.clear()
    calls = [frame([48, i, {}, "t.echo", [i]]) for i in range(1, n + 1)]
    yields = [frame([70, i, {}, [i]]) for i in range(1, n + 1)]  # the callee's invocation ids are 1..n
    t0 = time.process_time()
    for i in range(n):
        caller.dataReceived(calls[i])
        callee.dataReceived(yields[i])
        if i % 256 == 0:
            ct.clear()
            et.clear()
    per_call = (time.process_time() - t0) / n * 1e6
    subs = [conn() for _ in range(10)]
    for p, t in subs:
        p.dataReceived(frame([32, 1, {}, "t.topic"]))
        t.clear()
    pubs = [frame([16, i, {}, "t.topic", [i]]) for i in range(1, n // 4 + 1)]
    t0 = time.process_time()
    for i, fr in enumerate(pubs):
        caller.dataReceived(fr)
        if i % 64 == 0:
            for _, t in subs:
                t.clear()
    per_event = (time.process_time() - t0) / (len(pubs) * 10) * 1e6

    # a heartbeat's router part: a CALL over WebSocket to an in-process callee (the control
    # plane's own session, attached through the in-memory transport) and its RESULT back
    from autobahn.twisted.wamp import ApplicationSession
    from autobahn.wamp.types import ComponentConfig

    class Local(ApplicationSession):
        async def onJoin(self, details):
            await self.register(lambda *a, **kw: {}, "t.local")

    clock = router.reactor
    joined = router.attach(Local(ComponentConfig(realm="zwrm")), "local", "anonymous")
    for _ in range(20):
        clock.advance(0)
    assert joined.called, "the in-process session did not join"
    locals_ = [frame([48, i, {}, "t.local", [{"n": i}]]) for i in range(n + 1, 2 * n + 1)]
    t0 = time.process_time()
    for i in range(n):
        caller.dataReceived(locals_[i])
        clock.advance(0)  # INVOCATION to the in-process session
        clock.advance(0)  # its YIELD back to the router, RESULT out
        if i % 256 == 0:
            ct.clear()
    per_local = (time.process_time() - t0) / n * 1e6
    print(json.dumps({"call_us": per_call, "event10_us": per_event, "local_us": per_local}))


def micro(args):
    """--micro: L{micro_child} for zwrm (and --other), interleaved rounds, medians."""
    kinds = [("zwrm", None)] + ([("zwrm-other", args.other)] if args.other else [])
    got = {k: [] for k, _ in kinds}
    for _ in range(args.rounds):
        for kind, source in kinds:
            env = dict(os.environ)
            if source:
                env["PYTHONPATH"] = source + os.pathsep + env.get("PYTHONPATH", "")
            out = subprocess.run([sys.executable, HERE, "--micro-child", "20000"], env=env,
                                 capture_output=True, text=True, check=True).stdout
            got[kind].append(json.loads(out.strip().splitlines()[-1]))
    print("router CPU per message without sockets (JSON, StringTransport; medians of "
          f"{args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f})")
    print(f"  {'':44} " + " ".join(f"{k:>11}" for k, _ in kinds))
    for key, label in (("call_us", "µs per call (CALL, INVOCATION, YIELD, RESULT)"),
                       ("event10_us", "µs per event delivered (10 subscribers)"),
                       ("local_us", "µs per call to an in-process callee")):
        print(f"  {label:44} " + " ".join(f"{statistics.median(r.get(key, float('nan')) for r in got[k]):>11.1f}"
                                          for k, _ in kinds))
    print("  (the in-process row is a heartbeat's router part: CALL over WebSocket to the control plane's"
          " own session, its autobahn handling included, RESULT back)")


ROWS = [
    ("rpc_seq", "RPC calls/s, sequential", True),
    ("rpc_64", "RPC calls/s, 64 in flight", True),
    ("p50_ms", "RPC latency p50 (ms)", False),
    ("p99_ms", "RPC latency p99 (ms)", False),
    ("ev_1", "events/s delivered, 1 subscriber", True),
    ("ev_10", "events/s delivered, 10 subscribers", True),
    ("cpu_seq_us", "router CPU µs per call, sequential", False),
    ("cpu_64_us", "router CPU µs per call, 64 in flight", False),
    ("cpu_ev_1_us", "router CPU µs per event, 1 subscriber", False),
    ("cpu_ev_10_us", "router CPU µs per event, 10 subscribers", False),
    ("rtt_seq_us", "sequential: µs per round trip", False),
    ("cpu_seq_callee_us", "sequential: callee CPU µs per call", False),
    ("cpu_seq_caller_us", "sequential: caller CPU µs per call", False),
]


def fmt(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"


def report(all_results, kinds, have_crossbar):
    others = [k for k in kinds if k != "zwrm"]
    for serializer in ("json", "msgpack"):
        z = all_results[("zwrm", serializer)]
        print(f"\nWebSocket + {serializer}")
        header = f"  {'':40} {'zwrm':>10}"
        for k in others:
            header += f" {k:>11} {'zwrm/' + k:>14}"
        print(header)
        for key, label, higher in ROWS:
            line = f"  {label:40} {fmt(z[key]):>10}"
            for k in others:
                c = all_results[(k, serializer)]
                ratio = z[key] / c[key] if higher else c[key] / max(z[key], 1e-9)
                line += f" {fmt(c[key]):>11} {ratio:>13.2f}x"
            print(line)
        for k in kinds:
            lost = {n: v for n, v in all_results[(k, serializer)].items() if n.endswith("_lost") and v}
            if lost:
                print(f"  {k} events not delivered: {lost}")
        for k in kinds:
            r = all_results[(k, serializer)]
            clients = r["cpu_seq_callee_us"] + r["cpu_seq_caller_us"]
            print(
                f"  {k}, sequential: a round trip of {r['rtt_seq_us']:.0f} µs against"
                f" {r['cpu_seq_us'] + clients:.0f} µs of CPU in the three processes (router"
                f" {r['cpu_seq_us']:.0f}, clients {clients:.0f})"
            )
        if "crossbar" in others:
            z, c = all_results[("zwrm", serializer)], all_results[("crossbar", serializer)]
            clients = z["cpu_seq_callee_us"] + z["cpu_seq_caller_us"]
            # with these clients, the router CPU per call at which the round trip is half
            # Crossbar's (the round trip taken as the three processes' CPU summed)
            print(
                f"  sequential at 2x Crossbar needs a round trip of {c['rtt_seq_us'] / 2:.0f} µs:"
                f" zwrm's router at most {c['rtt_seq_us'] / 2 - clients:.0f} µs per call with"
                f" these clients (it took {z['cpu_seq_us']:.0f})"
            )
    print("\nratios: higher is better for zwrm (latency and CPU ratios are other/zwrm)")
    if not have_crossbar:
        print("Crossbar.io is absent (no baseline router): install it in its own virtualenv, "
              "with python3 tests/crossbar/router.py --install (what CI does; cached)")


def main(reactor, args):
    sizes = {"seq": 2000, "par": 20000, "ev1": 20000, "ev10": 5000}
    if args.quick:
        sizes = {k: v // 10 for k, v in sizes.items()}
    have_crossbar = bool(args.crossbar and os.access(args.crossbar, os.X_OK))
    kinds = ["zwrm"] + (["zwrm-other"] if args.other else []) + (["crossbar"] if have_crossbar else [])

    @defer.inlineCallbacks
    def run():
        rounds = {}
        load0 = os.getloadavg()
        # rounds interleave the routers, so a burst of load elsewhere on the machine
        # hits both; each row is the median of the rounds
        for rnd in range(args.rounds):
            for serializer in ("json", "msgpack"):
                for kind in kinds:
                    router = RouterProcess(kind, args.crossbar, args.other if kind == "zwrm-other" else None)
                    try:
                        print(f"round {rnd + 1}: measuring {kind} / {serializer} ...", file=sys.stderr)
                        r = yield measure(reactor, router.url, serializer, sizes, router.cpu)
                    finally:
                        router.stop()
                    rounds.setdefault((kind, serializer), []).append(r)
        results = {}
        for key, rs in rounds.items():
            results[key] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        report(results, kinds, have_crossbar)
        load1 = os.getloadavg()
        print(f"(medians of {args.rounds} interleaved rounds; sizes: {sizes}; load average "
              f"{load0[0]:.2f} before, {load1[0]:.2f} after, on {os.cpu_count()} cores)")

    return run()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-zwrm":
        serve_zwrm(int(sys.argv[2]))
        sys.exit(0)
    if len(sys.argv) > 2 and sys.argv[1] == "--micro-child":
        micro_child(int(sys.argv[2]))
        sys.exit(0)
    if len(sys.argv) > 5 and sys.argv[1] == "--worker":
        role, url, ser, n = sys.argv[2:6]
        task.react(lambda reactor: worker(reactor, role, url, ser, int(n)))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tenth of the work (a smoke run)")
    parser.add_argument("--crossbar", default=None,
                        help="the crossbar executable (default: the tests' cached virtualenv, see"
                             " tests/crossbar/router.py; '' for none)")
    parser.add_argument("--other", metavar="DIR",
                        help="also measure the zwrm package found in DIR (e.g. an export of the previous commit)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; rows are their medians")
    parser.add_argument("--micro", action="store_true",
                        help="only the router's CPU per message without sockets (see micro_child)")
    args = parser.parse_args()
    if args.crossbar is None:
        args.crossbar = default_crossbar()
    if args.micro:
        micro(args)
        sys.exit(0)
    task.react(lambda reactor: main(reactor, args))
