"""
How many hosts one control plane sustains at a 5 s heartbeat.

    .venv/bin/python benchmarks/heartbeats.py [--steps 500,1000,2000,4000,7000,10000]
        [--per-worker 500] [--interval 5] [--duration 20] [--budget 1.0]
        [--gc-policy freeze|python] [--keep-going] [--agent-procedures]

It seeds a fresh control plane's database with the largest host count (known
credentials; joining is not what is measured), starts a real C{twistd zwrm-control},
and then, for each step, starts worker processes that each open C{--per-worker} real WAMP
sessions over loopback (ticket auth as a host, role C{agent}), register, and heartbeat
every C{--interval} seconds with a random phase, timing every C{zwrm.agent.heartbeat}
round trip.  A step passes when every heartbeat sent in the measuring window was
answered within C{--budget} seconds.  It prints, per step, the heartbeat latencies, the
control plane's CPU use (utime+stime of its process over the window, from /proc), and
finally the largest passing host count.

It also reads the control plane's C{/metrics} around each window and prints what its
garbage-collection policy did (L{zwrm.gcpolicy}): the longest collection since it
started, the full collections in the window, the frozen objects.  C{--gc-policy python}
runs the control plane with CPython's collector as it comes, for comparison.

Baseline from the same run: the first step is small (100 hosts); its latency and CPU are
the floor the other steps compare with.

Note: the workers run on the same machine as the control plane, so on a small machine
they compete with it for CPU; the latency they measure includes their own delays (each
prints its longest pause in the window).  C{--cp-cpu N --agents-nice 10} gives the control
plane CPU C{N} as its one core, the workers taking what it leaves.  Every worker measures
the same window, from the driver's GO once all are connected.

    .venv/bin/python benchmarks/heartbeats.py --micro [--micro-hosts 200]
        [--micro-heartbeats 20000] [--profile FILE]

measures one heartbeat end to end in an in-process control plane without sockets (see
L{micro}): its CPU per heartbeat barely moves with the machine's load, so it is the
figure to compare changes with; C{--profile} writes a cProfile of it.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if not os.environ.get("PYTHONPATH"):  # PYTHONPATH=<export of a commit> measures that zwrm
    sys.path.insert(0, os.path.dirname(HERE))


# --- worker: many simulated agents in one process ------------------------------------


def worker(args):
    from autobahn.twisted.wamp import ApplicationSession
    from autobahn.wamp.serializer import MsgPackSerializer
    from autobahn.wamp.types import ComponentConfig
    from twisted.internet import defer, endpoints, reactor, task, threads

    # zwrm's client factory: autobahn's, without its per-message log formatting, so that the
    # simulated agents cost less of the machine the control plane shares with them
    from zwrm.wamp.transport import WampWebSocketClientFactory, WampWebSocketClientProtocol

    if args.lean_agents:
        import msgpack

    class LeanProtocol(WampWebSocketClientProtocol):
        """
        With --lean-agents, once its agent has registered, the connection's frames bypass
        autobahn: heartbeats go out as masked MsgPack CALL frames written to the socket, and
        the server's frames are cut here (RESULT and ERROR of a heartbeat are counted here,
        any other WAMP message goes to the session, a ping is answered).  The same bytes
        on the wire as autobahn's, at a fraction of the client's CPU.
        """

        lean = None  # the Sim, once its heartbeats bypass autobahn
        _rest = b""

        def dataReceived(self, data):
            sim = self.lean
            if sim is None:
                return super().dataReceived(data)
            frames, self._rest = _frames(self._rest + data if self._rest else data)
            for opcode, payload in frames:
                if opcode == 2:
                    m = msgpack.unpackb(payload, raw=False)
                    if m[0] == 50 and m[1] in sim.pending:  # RESULT
                        sim.answered(m[1])
                    elif m[0] == 8 and m[1] == 48 and m[2] in sim.pending:  # ERROR for a CALL
                        sim.refused(m[2])
                    elif self._session is not None:
                        for msg in self._serializer.unserialize(payload, True):
                            self._session.onMessage(msg)
                elif opcode == 9:  # ping
                    self.sendPong(payload)
                elif opcode == 8:  # close
                    failures[0] += 1
                    self.transport.loseConnection()

    if args.network_views:
        from autobahn.wamp.exception import ApplicationError

        try:
            from zwrm.agent.network.addressing import hosts_digest
        except ImportError:  # a zwrm before it (measured with PYTHONPATH): it ignores the digest
            def hosts_digest(hosts):
                return "0" * 64

    creds = json.loads(sys.stdin.readline())
    lists = {}  # --network-views: hosts serial -> (hosts by id or None, digest)
    views = [0]  # network views taken
    latencies = []
    joins = []  # seconds from each agent's TCP connect to its registration answered
    failures = [0]
    state = {"measuring": False, "registered": 0}
    host, port = args.host, args.port

    class Sim(ApplicationSession):
        def __init__(self, authid, ticket, held=None):
            ApplicationSession.__init__(self, ComponentConfig(realm="zwrm"))
            self._authid, self._ticket = authid, ticket
            self.held = tuple(held) if held else None  # (hosts serial, digest), --network-views
            self.ready = defer.Deferred()

        def onConnect(self):
            self.join("zwrm", authmethods=["ticket"], authid=self._authid)

        def onChallenge(self, challenge):
            return self._ticket

        def network_update(self, view):
            """
            With --network-views: take the view as a bridge-mode agent does (the hosts list
            kept, a delta only on the serial held) and answer with the serial held.  The
            lists are kept once per worker, by serial (one control plane per run: a serial
            is one list).
            """
            delta = view.get("hosts_delta")
            if delta is None:
                serial = view.get("hosts_serial")
                if serial not in lists:
                    hosts = {h["host_id"]: h for h in view.get("hosts", [])}
                    lists[serial] = (hosts, hosts_digest(hosts.values()))
                self.held = (serial, lists[serial][1])
            else:
                base, serial = delta["base"], delta["serial"]
                if self.held is None or self.held[0] != base:
                    raise ApplicationError("zwrm.error.stale_view", "hosts_delta base is not the"
                                           " serial held", hosts_serial=self.held and self.held[0])
                if serial not in lists:
                    if not delta["set"] and not delta["remove"]:
                        lists[serial] = (lists.get(base, (None,))[0], self.held[1])
                    elif lists.get(base, (None,))[0] is None:
                        raise ApplicationError("zwrm.error.stale_view", "list not kept here")
                    else:
                        hosts = dict(lists[base][0])
                        for h in delta["remove"]:
                            hosts.pop(h, None)
                        hosts.update((h["host_id"], h) for h in delta["set"])
                        lists[serial] = (hosts, hosts_digest(hosts.values()))
                self.held = (serial, lists[serial][1])
            views[0] += 1
            return {"members": len(view.get("members", [])), "published": [],
                    "hosts_serial": self.held[0]}

        async def onJoin(self, details):
            if args.network_views:
                prefix = f"zwrm.agent.{details.authid}."
                await self.register(lambda: [], prefix + "machine.list")
                await self.register(lambda certs: None, prefix + "ingress.certs")
                await self.register(self.network_update, prefix + "network.update")
            elif args.agent_procedures:
                # what the control plane calls on an agent that registers: its machines, the
                # ingress certificates and the network view (a user-mode agent declines those
                # two as a real one does)
                prefix = f"zwrm.agent.{details.authid}."
                await self.register(lambda: [], prefix + "machine.list")
                await self.register(lambda certs: {"network": "user"}, prefix + "ingress.certs")
                await self.register(lambda view: {"network": "user"}, prefix + "network.update")
            facts = {"agent_version": "bench"}
            if args.network_views and self.held is not None:
                # the list it held in the step before (its "agent" reconnects)
                facts["network"] = {"hosts_serial": self.held[0], "hosts_digest": self.held[1]}
            await self.call("zwrm.agent.register", facts)
            if args.lean_agents:
                self.pending, self._rid = {}, 2**40
                self._transport.lean = self
            joins.append(time.monotonic() - self.t0)
            state["registered"] += 1
            self.ready.callback(None)
            phase = random.uniform(0, args.interval)
            reactor.callLater(phase, self._start)

        def _start(self):
            self._loop = task.LoopingCall(self.beat)
            self._loop.start(args.interval, now=True)

        def beat(self):
            t0 = time.monotonic()
            measuring = state["measuring"]
            if args.lean_agents:
                self._rid += 1
                self.pending[self._rid] = (t0, measuring)
                self._transport.transport.write(_mask(msgpack.packb(
                    [48, self._rid, {}, "zwrm.agent.heartbeat", [{}]]), os.urandom(4)))
                return
            d = self.call("zwrm.agent.heartbeat", {})

            def ok(_):
                if measuring:  # sent in the window: counted however late it is answered
                    latencies.append(time.monotonic() - t0)

            def bad(f):
                if measuring:
                    failures[0] += 1

            d.addCallbacks(ok, bad)

        def answered(self, rid):
            t0, measuring = self.pending.pop(rid)
            if measuring:  # sent in the window: counted however late it is answered
                latencies.append(time.monotonic() - t0)

        def refused(self, rid):
            _, measuring = self.pending.pop(rid)
            if measuring:
                failures[0] += 1

        def onLeave(self, details):
            failures[0] += 1
            self.disconnect()

    sims = []

    async def run():
        sem = defer.DeferredSemaphore(50)
        url = f"ws://{host}:{port}/ws"

        async def one(hid, cred, held=None):
            s = Sim(hid, cred, held)
            sims.append(s)
            s.t0 = time.monotonic()
            f = WampWebSocketClientFactory(lambda: s, url=url, serializers=[MsgPackSerializer()])
            f.protocol = LeanProtocol
            f.noisy = False
            try:
                await endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=60).connect(f)
                await s.ready.addTimeout(120, reactor)
                return True
            except Exception:
                return False

        ds = [sem.run(lambda c=c: defer.Deferred.fromCoroutine(one(*c))) for c in creds]
        joined = await defer.gatherResults(ds)
        lost = joined.count(False)
        failures[0] += lost
        joins.sort()
        print(f"READY {lost} " + json.dumps({"joined": len(joins), "p50": percentile(joins, 50),
                                              "max": joins[-1] if joins else None}), flush=True)
        # every worker measures the same window: from the driver's GO, sent once all of them
        # are ready (before 2026-12-04 each measured from its own READY, so at 20,000 hosts
        # the first workers' windows held the last ones' 2,000 registrations each)
        await threads.deferToThread(sys.stdin.readline)
        # one full round so phases spread, then measure
        await task.deferLater(reactor, args.interval, lambda: None)
        state["measuring"] = True
        c0, w0 = sum(os.times()[:2]), time.monotonic()
        # this process's own pauses in the window: a heartbeat's latency includes them
        last, pause = [time.monotonic()], [0.0]

        def probe():
            now = time.monotonic()
            pause[0] = max(pause[0], now - last[0] - 0.1)
            last[0] = now

        prober = task.LoopingCall(probe)
        prober.start(0.1, now=False)
        await task.deferLater(reactor, args.duration, lambda: None)
        state["measuring"] = False
        prober.stop()
        cpu = (sum(os.times()[:2]) - c0) / (time.monotonic() - w0)
        # let the last calls of the window come back (they count if within budget)
        await task.deferLater(reactor, 2 * args.budget, lambda: None)
        for s in sims:  # --lean-agents: a heartbeat of the window still unanswered failed
            failures[0] += sum(1 for _, measuring in getattr(s, "pending", {}).values() if measuring)
        latencies.sort()
        result = json.dumps({"n": len(creds), "latencies": latencies,
                             "failures": failures[0], "cpu": cpu, "pause": pause[0],
                             "views": views[0],
                             "held": {s._authid: s.held for s in sims if s.held is not None}})
        if args.result_file:
            # a file, not stdout: a line of 100+ KB through the pipe reached the driver cut at
            # 64 KB when four workers wrote theirs at once (the 8,000-host steps)
            with open(args.result_file + ".part", "w") as f:
                f.write(result)
            os.rename(args.result_file + ".part", args.result_file)
            print("RESULT-FILE", flush=True)
        else:
            print("RESULT " + result, flush=True)

    def main(reactor):
        return defer.Deferred.fromCoroutine(run())

    task.react(main)


# --- the driver ----------------------------------------------------------------------


def cpu_seconds(pid, split=False):
    """utime + stime of C{pid}, seconds (with C{split}: the pair)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    user, system = int(fields[11]) / tck, int(fields[12]) / tck
    return (user, system) if split else user + system


def thread_cpu_seconds(pid):
    """utime + stime of C{pid}'s main thread (the reactor's), and of its other threads."""
    tck = os.sysconf("SC_CLK_TCK")
    main = other = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tck
        if int(tid) == pid:
            main += cpu
        else:
            other += cpu
    return main, other


def seed(data_dir, n, address="127.0.0.1", cidr=None):
    """
    A control-plane database with C{n} hosts whose credentials are known.

    @param cidr: with an address, the cluster network, each host's /24 of it stored as a
        cluster that has run would hold them (else the control plane allocates the subnets
        of all C{n} hosts when it starts, one store write each, while the first steps run).

    @param address: each host's address; C{""}: none, so the hosts are not on the cluster
        network's overlay (each host's network view lists every host with an address, and
        the default 10.80.0.0/16 has subnets for 255 hosts).
    """
    import sqlite_utils

    from zwrm.control.store import hash_secret, migrate

    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    db = sqlite_utils.Database(os.path.join(data_dir, "zwrm.db"))
    db.enable_wal()
    migrate(db)
    creds = []
    rows = []
    now = time.time()
    for i in range(n):
        hid, cred = f"h-bench{i:06d}", f"cred-{i}-{random.getrandbits(64):x}"
        creds.append((hid, cred))
        rows.append({"id": hid, "name": f"bench{i}", "region": "r", "datacenter": "d",
                     "address": address, "labels": "{}", "vcpus": 8, "memory_mb": 16384,
                     "disk_mb": 100000, "alloc_vcpus": 0, "alloc_memory_mb": 0,
                     "alloc_disk_mb": 0, "state": "ready", "last_heartbeat": now,
                     "agent_version": "bench", "credential_hash": hash_secret(cred),
                     "joined_at": now})
    db["hosts"].insert_all(rows, batch_size=1000)
    if address and cidr:
        import ipaddress

        net = ipaddress.ip_network(cidr)
        if n >= 1 << (24 - net.prefixlen):
            raise SystemExit(f"heartbeats: {cidr} has no /24 for each of {n} hosts")
        base = int(net.network_address)
        db["net_cluster"].upsert({"id": 1, "cidr": str(net), "host_prefix": 24}, pk="id")
        # the first /24 is never given out
        db["net_subnets"].insert_all(
            ({"id": f"{ipaddress.IPv4Address(base + ((i + 1) << 8))}/24", "host_id": hid,
              "created_at": now} for i, (hid, _) in enumerate(creds)), batch_size=1000)
    db.conn.close()
    return creds


def _niced(nice, cpus=None):
    """
    A C{preexec_fn} that lowers a child's priority by C{nice} and keeps it on C{cpus} (a
    set of CPU numbers), or L{None} when neither is asked for.
    """
    if not nice and not cpus:
        return None

    def preexec():
        if nice:
            os.nice(nice)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return preexec


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))
    return sorted_values[i]


def gc_metrics(port):
    """The control plane's C{zwrm_gc_*} figures from C{/metrics} (empty without a policy)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(("zwrm_gc_", "zwrm_reactor_pause", "zwrm_network_view")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def run_step(args, cp_pid, port, creds, probe=None):
    """
    One step: C{creds}' agents connect, then one measuring window.  C{probe}, if given, is
    called at the window's start and end; the result's C{"probe"} is the pair it returned.
    """
    m_start = gc_metrics(port)  # before the step's agents connect: the step's pauses are the difference
    connect_cpu0 = cpu_seconds(cp_pid)
    import tempfile

    workers, results = [], tempfile.mkdtemp(prefix="zwrm-bench-hb-results-")
    held = getattr(args, "held", None) or {}
    for i in range(0, len(creds), args.per_worker):
        chunk = [[h, c, held.get(h)] for h, c in creds[i:i + args.per_worker]]
        p = subprocess.Popen(
            [sys.executable, __file__, "--worker", "--port", str(port),
             "--interval", str(args.interval), "--duration", str(args.duration),
             "--budget", str(args.budget),
             "--result-file", os.path.join(results, f"worker-{i}.json")]
            + (["--agent-procedures"] if getattr(args, "agent_procedures", False) else [])
            + (["--network-views"] if getattr(args, "network_views", False) else [])
            + (["--lean-agents"] if getattr(args, "lean_agents", False) else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            preexec_fn=_niced(getattr(args, "agents_nice", 0), getattr(args, "agents_cpus", None)),
        )
        p.stdin.write(json.dumps(chunk) + "\n")
        p.stdin.flush()
        workers.append(p)
    t_start = time.monotonic()
    join_p50, join_max = [], []
    for p in workers:
        line = p.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError("a worker failed to start")
        ready = json.loads(line.split(" ", 2)[2])
        if ready["joined"]:
            join_p50.append(ready["p50"])
            join_max.append(ready["max"])
    connect_s = time.monotonic() - t_start
    connect_cpu_s = cpu_seconds(cp_pid) - connect_cpu0
    for p in workers:
        p.stdin.write("GO\n")
        p.stdin.flush()
    time.sleep(args.interval)
    gc0 = gc_metrics(port)
    p0 = probe() if probe is not None else None
    (u0, s0), t0 = cpu_seconds(cp_pid, split=True), time.monotonic()
    m0, o0 = thread_cpu_seconds(cp_pid)
    time.sleep(args.duration)
    (u1, s1), t1 = cpu_seconds(cp_pid, split=True), time.monotonic()
    m1, o1 = thread_cpu_seconds(cp_pid)
    p1 = probe() if probe is not None else None
    cpu0, cpu1 = u0 + s0, u1 + s1
    gc1 = gc_metrics(port)
    latencies, failures, worker_cpu, worker_pause, views = [], 0, 0.0, 0.0, 0
    held = {}
    for i, p in zip(range(0, len(creds), args.per_worker), workers, strict=True):
        for line in p.stdout:
            if line.startswith("RESULT-FILE"):
                path = os.path.join(results, f"worker-{i}.json")
                with open(path) as f:
                    r = json.load(f)
                os.unlink(path)
                latencies += r["latencies"]
                failures += r["failures"]
                worker_cpu += r["cpu"]
                worker_pause = max(worker_pause, r.get("pause", 0.0))
                views += r.get("views", 0)
                held.update(r.get("held") or {})
                break
        p.wait(timeout=60)
    os.rmdir(results)
    if getattr(args, "network_views", False):
        args.held = held  # the next step's agents come back holding these
    latencies.sort()
    expected = len(creds) * args.duration / args.interval
    return {
        "hosts": len(creds),
        "workers": len(workers),
        "connect_s": connect_s,
        # the control plane's CPU seconds while the step's agents connected and registered
        "connect_cpu_s": connect_cpu_s,
        # one agent's join (TCP connect to its registration answered), at most 50 at a time per
        # worker: the median of the workers' medians, and the longest
        "join_p50_s": sorted(join_p50)[len(join_p50) // 2] if join_p50 else float("nan"),
        "join_max_s": max(join_max, default=float("nan")),
        "heartbeats": len(latencies),
        "expected": expected,
        "failures": failures,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "max_ms": 1000 * (latencies[-1] if latencies else float("nan")),
        "cpu": (cpu1 - cpu0) / (t1 - t0),
        # over the heartbeats answered (the workers time theirs over the same window)
        "cpu_per_hb_ms": 1000 * (cpu1 - cpu0) / max(1, len(latencies)) * args.duration / (t1 - t0),
        # of which in the kernel (on loopback, send() also runs the receiving side's TCP)
        "sys_per_hb_ms": 1000 * (s1 - s0) / max(1, len(latencies)) * args.duration / (t1 - t0),
        # of which in threads other than the reactor's (the store's thread pool)
        "threads_per_hb_ms": 1000 * (o1 - o0) / max(1, len(latencies)) * args.duration / (t1 - t0),
        "worker_cpu": worker_cpu,
        "views": views,
        "full_lists": gc1.get("zwrm_network_view_full_lists_total", 0)
        - m_start.get("zwrm_network_view_full_lists_total", 0),
        "resumed": gc1.get("zwrm_network_view_resumed_total", 0)
        - m_start.get("zwrm_network_view_resumed_total", 0),
        # the longest any worker's reactor was late for a 0.1 s timer in the window: the
        # share of a heartbeat's latency that was the simulated agents' own
        "worker_pause_ms": 1000 * worker_pause,
        "window_s": t1 - t0,
        "probe": (p0, p1),
        "load": os.getloadavg()[0],
        "gc": bool(gc1),
        "gc_full": gc1.get("zwrm_gc_full_collections_total", 0)
        - gc0.get("zwrm_gc_full_collections_total", 0),
        "gc_frozen": gc1.get("zwrm_gc_frozen_objects", 0),
        "gc_max_ms": 1000 * max((v for k, v in gc1.items()
                                 if k.startswith("zwrm_gc_pause_max_seconds")), default=0),
        # the longest the control plane's reactor was late for a 0.1 s timer since it started
        # (any cause: a collection, or e.g. a burst of reconnections handled in one turn)
        "pause_max_ms": 1000 * gc1.get("zwrm_reactor_pause_max_seconds", float("nan")),
        # pauses longer than 0.25 s / 1 s from the step's start (its agents connecting) to the
        # window's end
        "pauses": "/".join(str(int(gc1.get(k, 0) - m_start.get(k, 0))) for k in (
            'zwrm_reactor_pauses_total{over_seconds="0.25"}', 'zwrm_reactor_pauses_total{over_seconds="1"}')),
        "ok": bool(latencies) and failures == 0 and latencies[-1] <= args.budget
        and len(latencies) >= 0.9 * expected,
    }


# --- --micro: one heartbeat end to end in an in-process control plane, without sockets ----


def _mask(payload, mask=b"abcd"):
    """A masked (client-to-server) binary WebSocket frame carrying C{payload}."""
    from zwrm.wamp.wire import unmask

    n = len(payload)
    head = bytes([0x82, 0x80 | n]) if n < 126 else bytes([0x82, 0x80 | 126, n >> 8, n & 0xFF])
    return head + mask + unmask(payload, mask)


def _frames(data):
    """
    The unmasked server frames in C{data} (bytes) as (opcode, payload) pairs, and the bytes
    left (an incomplete frame).
    """
    out, pos = [], 0
    while pos + 2 <= len(data):
        n = data[pos + 1] & 0x7F
        head = pos + 2
        if n == 126:
            n, head = int.from_bytes(data[pos + 2:pos + 4], "big"), pos + 4
        elif n == 127:
            n, head = int.from_bytes(data[pos + 2:pos + 10], "big"), pos + 10
        if head + n > len(data):
            break
        out.append((data[pos] & 0x0F, data[head:head + n]))
        pos = head + n
    return out, data[pos:]


def micro(args):
    """
    --micro: the control plane's CPU per heartbeat without sockets.  A real
    L{zwrm.control.service.ControlPlane} (its store, registry, embedded router, control
    session, schema checks, metrics and, with --gc-policy freeze, the collection policy)
    runs in this process on the real reactor, which this function turns by hand
    (C{reactor.iterate(0)}: one reactor turn each, as the running control plane takes).
    --micro-hosts agents connect through the router's own WebSocket protocol on
    StringTransports, authenticate with their tickets and register; then each heartbeat
    is one masked MsgPack CALL frame fed to one agent's connection, and the reactor is
    turned until its RESULT frame is written.  What it leaves out: the kernel (epoll,
    recv, send) and the HTTP wrapper around each read.  With --profile FILE it writes a
    cProfile of the heartbeat loop.
    """
    import cProfile
    import tempfile

    import msgpack
    from twisted.internet import reactor
    from twisted.internet.testing import StringTransport

    from zwrm.control.service import ControlPlane, _with_peer_certificate
    from zwrm.control.tap import Config
    from zwrm.wamp.transport import websocket_factory

    n_hosts = args.micro_hosts
    tmp = tempfile.mkdtemp(prefix="zwrm-bench-micro-")
    data_dir = os.path.join(tmp, "cp")
    creds = seed(data_dir, n_hosts)
    config = Config(listen=["tcp:0:interface=127.0.0.1"], data_dir=data_dir,
                    heartbeat_interval=args.interval, offline_after=86400.0, check_interval=15.0)
    plane = ControlPlane(reactor, config)
    if args.gc_policy == "freeze":
        from zwrm.gcpolicy import CollectionPolicy

        plane.gc_policy = CollectionPolicy(reactor, config.gc_interval, churn=args.gc_churn or 0.25)
        plane.gc_policy.setServiceParent(plane)
    reactor.startRunning(installSignalHandlers=False)
    plane.startService()

    def turn_until(cond, limit=60.0):
        deadline = time.monotonic() + limit
        while not cond():
            if time.monotonic() > deadline:
                raise SystemExit("micro: timed out waiting for the control plane")
            reactor.iterate(0)

    turn_until(lambda: plane.started.called)
    factory = websocket_factory(plane.router, serializers=("msgpack",))
    factory.protocol = _with_peer_certificate(factory.protocol)

    class T(StringTransport):
        def unregisterProducer(self):
            self.producer = None

    def replies(t):
        got, rest = _frames(t.value())
        t.clear()
        t.write(rest)
        return [msgpack.unpackb(p, raw=False) for _, p in got]

    def wait_reply(t):
        out = []
        turn_until(lambda: out.extend(replies(t)) or out)
        return out[0]

    agents = []
    for hid, cred in creds:
        p, t = factory.buildProtocol(None), T()
        p.makeConnection(t)
        p.dataReceived(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                       b"Sec-WebSocket-Protocol: wamp.2.msgpack\r\n\r\n")
        t.clear()
        p.dataReceived(_mask(msgpack.packb([1, "zwrm", {"roles": {"caller": {}, "callee": {}},
                                                        "authmethods": ["ticket"], "authid": hid}])))
        assert wait_reply(t)[0] == 4, "no CHALLENGE"
        p.dataReceived(_mask(msgpack.packb([5, cred, {}])))
        assert wait_reply(t)[0] == 2, "no WELCOME"
        p.dataReceived(_mask(msgpack.packb([48, 1, {}, "zwrm.agent.register", [{"agent_version": "bench"}]])))
        r = wait_reply(t)
        assert r[0] == 50, f"register failed: {r}"
        agents.append((p, t))
    n = args.micro_heartbeats
    beats = [_mask(msgpack.packb([48, 2 + i // n_hosts, {}, "zwrm.agent.heartbeat", [{}]])) for i in range(n)]
    for p, t in agents:  # one round first (warm caches), then measure
        p.dataReceived(_mask(msgpack.packb([48, 10**9, {}, "zwrm.agent.heartbeat", [{}]])))
        turn_until(lambda t=t: t.value())
        t.clear()
    profiler = cProfile.Profile() if args.profile else None
    turns = [0]
    iterate = reactor.iterate

    batch = max(1, n // 20)
    batches = []  # CPU seconds per heartbeat of each batch of n/20

    def run():
        c = time.process_time()
        for i in range(n):
            p, t = agents[i % n_hosts]
            p.dataReceived(beats[i])
            while not t.value():
                iterate(0)
                turns[0] += 1
            t.clear()
            if (i + 1) % batch == 0:
                c, was = time.process_time(), c
                batches.append((c - was) / batch)

    c0, w0 = time.process_time(), time.perf_counter()
    if profiler is not None:
        profiler.runcall(run)
    else:
        run()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    if profiler is not None:
        profiler.dump_stats(args.profile)
    best = min(batches) if batches else cpu / n
    print(f"micro: {n} heartbeats from {n_hosts} agents (MsgPack, in-process control plane, no sockets;"
          f" gc policy {args.gc_policy}; load {os.getloadavg()[0]:.1f}): {1e6 * cpu / n:.1f} µs of CPU"
          f" per heartbeat on average, {1e6 * best:.1f} µs in the best twentieth (the least disturbed"
          f" by other processes); {1e6 * wall / n:.1f} µs wall, {turns[0] / n:.2f} reactor turns each"
          + (f"; profile in {args.profile}" if profiler is not None else ""))
    print(json.dumps({"micro_us": 1e6 * cpu / n, "best_us": 1e6 * best, "turns": turns[0] / n}), flush=True)
    d = plane.stopService()
    turn_until(lambda: d.called, 30)
    sys.stderr.flush()
    os._exit(0)  # the store's thread pool is not a daemon, and the reactor never ran


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", default="100,500,1000,2000,4000,7000,10000")
    ap.add_argument("--per-worker", type=int, default=500)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--gc-policy", default="freeze", choices=["freeze", "python"],
                    help="the control plane's garbage-collection policy (default freeze)")
    ap.add_argument("--gc-churn", type=float, default=None,
                    help="the control plane's [gc] churn (0: no full collection after session churn;"
                         " default: the control plane's own)")
    ap.add_argument("--cluster-cidr", default="10.0.0.0/8",
                    help="the control plane's cluster network (default 10.0.0.0/8: a /24 for each"
                         " of up to 65,535 hosts; the control plane's own default, a /16, has"
                         " room for 255, and before 2026-12-03 19:55 every host beyond those"
                         " ran out of subnets in this benchmark)")
    ap.add_argument("--keep-going", action="store_true", help="run every step even after a failure")
    ap.add_argument("--seed", type=int, default=0,
                    help="hosts the control plane knows (default: the largest step); e.g. 20,000"
                         " known with a 19,900-host step where the open-files limit is 20,000")
    ap.add_argument("--cp-cpu", type=int, default=None,
                    help="pin the control plane (all its threads) to this CPU: its one core;"
                         " default: not pinned. On a small machine the scheduler shares the cores"
                         " fairly between the control plane and every worker process, so the"
                         " control plane gets a share that shrinks with the workers' count and load"
                         " (20-84%% of a core in the 20,000-host runs of 2026-12-03); with"
                         " --agents-nice it has its core whenever it has work")
    ap.add_argument("--agents-nice", type=int, default=0,
                    help="the worker processes' nice value (default 0; e.g. 10: the control plane"
                         " comes first on its core and they take what it leaves)")
    ap.add_argument("--agents-cpus", default=None, metavar="N[,N...]",
                    help="keep the worker processes on these CPUs (e.g. 1 with --cp-cpu 0: the"
                         " control plane's core is its own, and its CPU per heartbeat is not"
                         " inflated by the workers sharing its core and caches)")
    ap.add_argument("--lean-agents", action="store_true",
                    help="the simulated agents join and register through autobahn, then send their"
                         " heartbeats as MsgPack CALL frames written straight to the WebSocket and"
                         " read the RESULT frames themselves: the same bytes on the wire at a"
                         " fraction of the client's CPU, for host counts whose autobahn clients"
                         " would take the cores the control plane needs")
    ap.add_argument("--agent-procedures", action="store_true",
                    help="the simulated agents register machine.list, ingress.certs and"
                         " network.update, which the control plane calls when an agent registers,"
                         " and answer them as a user-mode agent does (default: they register"
                         " nothing; each of those calls fails with no_such_procedure)")
    ap.add_argument("--network-views", action="store_true",
                    help="the simulated agents register machine.list, ingress.certs and"
                         " network.update and take the control plane's network views as a"
                         " bridge-mode agent does: they keep the hosts list, answer with its"
                         " serial, and in a later step register again reporting the list they"
                         " hold (so a reconnect step measures the views a reconnect costs)")
    ap.add_argument("--micro", action="store_true",
                    help="only the control plane's CPU per heartbeat, in this process, without sockets")
    ap.add_argument("--micro-hosts", type=int, default=200, help="agents for --micro (default 200)")
    ap.add_argument("--micro-heartbeats", type=int, default=20000,
                    help="heartbeats --micro times (default 20000)")
    ap.add_argument("--profile", default=None, help="with --micro: write a cProfile of the heartbeats here")
    args = ap.parse_args()
    if args.lean_agents and (args.agent_procedures or args.network_views):
        # a lean agent takes over its connection's reads after its registration's RESULT; the
        # control plane's calls to an agent with procedures can follow in the same read, part
        # of a frame then left in autobahn's buffer
        ap.error("--lean-agents and --agent-procedures or --network-views cannot be used together")
    if args.cp_cpu is not None and args.cp_cpu not in os.sched_getaffinity(0):
        ap.error(f"--cp-cpu {args.cp_cpu}: not one of this process's CPUs"
                 f" ({', '.join(map(str, sorted(os.sched_getaffinity(0))))})")
    if args.agents_cpus is not None:
        try:
            args.agents_cpus = {int(c) for c in args.agents_cpus.split(",")}
        except ValueError:
            ap.error(f"--agents-cpus {args.agents_cpus}: not a list of CPU numbers")
        if not args.agents_cpus <= os.sched_getaffinity(0):
            ap.error(f"--agents-cpus: not all of this process's CPUs"
                     f" ({', '.join(map(str, sorted(os.sched_getaffinity(0))))})")
    if args.worker:
        return worker(args)
    if args.micro:
        return micro(args)

    import tempfile

    from zwrm.testing.processes import TWISTD, free_port

    steps = [int(s) for s in args.steps.split(",")]
    tmp = tempfile.mkdtemp(prefix="zwrm-bench-")
    data_dir = os.path.join(tmp, "cp")
    creds = seed(data_dir, max(max(steps), args.seed), cidr=args.cluster_cidr)
    # a socket per agent: the control plane raises its soft open-files limit to the hard one
    # (zwrm/rlimits.py); raise the hard one here (root) where it is too low for the largest step
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(steps) + 4096
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, need), need))
        except (ValueError, OSError) as e:
            print(f"open files: hard limit {hard} < {need} and not raised ({e}): the largest"
                  " steps will meet EMFILE", flush=True)
    port = free_port()
    log = open(os.path.join(tmp, "cp.log"), "wb")  # noqa: SIM115
    cp = subprocess.Popen(
        TWISTD + ["-n", "--pidfile=", "zwrm-control", "--data-dir", data_dir,
                  "--listen", f"tcp:{port}:interface=127.0.0.1",
                  "--heartbeat-interval", str(args.interval), "--check-interval", "15",
                  "--offline-after", "86400", "--gc-policy", args.gc_policy,
                  "--cluster-cidr", args.cluster_cidr]
        + (["--gc-churn", str(args.gc_churn)] if args.gc_churn is not None else []),
        stdout=log, stderr=log,
        preexec_fn=(lambda: os.sched_setaffinity(0, {args.cp_cpu})) if args.cp_cpu is not None else None,
    )
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(data_dir, "control.url")):
            if cp.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("zwrm-control did not start; see " + log.name)
            time.sleep(0.2)
        time.sleep(1)
        idle0, t0 = cpu_seconds(cp.pid), time.monotonic()
        time.sleep(3)
        idle = (cpu_seconds(cp.pid) - idle0) / (time.monotonic() - t0)
        print(f"zwrm-control pid {cp.pid}, {len(creds)} hosts seeded; idle CPU {100 * idle:.1f}%"
              f"; machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
        print(("control plane pinned to CPU %d" % args.cp_cpu if args.cp_cpu is not None
               else "control plane not pinned")
              + (f"; simulated agents at nice {args.agents_nice}" if args.agents_nice else "")
              + (f"; simulated agents on CPUs {sorted(args.agents_cpus)}" if args.agents_cpus else ""))
        print(f"heartbeat every {args.interval}s, window {args.duration}s, budget {args.budget}s;"
              f" gc policy {args.gc_policy}"
              + (f", churn {args.gc_churn:g}" if args.gc_churn is not None else "") +
              " (gc max ms: the longest collection since start;"
              " full gc: full collections by the policy in the window;"
              " pause ms: the longest the reactor was late for a 0.1 s timer since start, any cause;"
              " >.25s/>1s: pauses longer than that in the step, its agents' connecting included)")
        print("a step after the first reconnects its agents at once: the last step's sessions all"
              " closed, then every agent connects again (at most 50 at a time per worker)")
        print("cp ms/hb: the control plane's CPU per heartbeat answered (its CPU in the window, idle"
              " included, over the heartbeats answered in it), sys ms: of which in the kernel,"
              " thr ms: of which in threads other than the reactor's (the store's);"
              " max ms bounds its longest pause; ag pause ms: the longest any simulated agents'"
              " process was late for its own 0.1 s timer in the window (that much of a heartbeat's"
              " latency can be the agents' own); a heartbeat sent in the window counts however"
              " late its answer came (before 2026-12-04 one answered after the window was left out)")
        print(f"{'hosts':>6} {'hb/s':>6} {'answered':>9} {'fail':>5} {'p50 ms':>8} {'p99 ms':>8}"
              f" {'max ms':>8} {'cp CPU':>7} {'cp ms/hb':>8} {'sys ms':>7} {'thr ms':>7} {'agents CPU':>10} {'ag pause':>8} {'load':>5} {'gc max ms':>9}"
              f" {'full gc':>7} {'frozen':>8} {'pause ms':>9} {'>.25s/>1s':>9}  result")
        best, baseline, all_ok, last = 0, None, True, None
        for n in steps:
            r = run_step(args, cp.pid, port, creds[:n])
            baseline = baseline or r
            if r["ok"]:
                last = r
            print(f"{r['hosts']:>6} {r['hosts'] / args.interval:>6.0f} "
                  f"{r['heartbeats']:>5}/{r['expected']:<4.0f}"
                  f"{r['failures']:>5} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['max_ms']:>8.1f}"
                  f" {100 * r['cpu']:>6.1f}% {r['cpu_per_hb_ms']:>8.3f} {r['sys_per_hb_ms']:>7.3f}"
                  f" {r['threads_per_hb_ms']:>7.3f}"
                  f" {100 * r['worker_cpu']:>9.1f}% {r['worker_pause_ms']:>8.0f} {r['load']:>5.1f}"
                  + (f" {r['gc_max_ms']:>9.1f} {r['gc_full']:>7.0f} {r['gc_frozen']:>8.0f}"
                     f" {r['pause_max_ms']:>9.1f} {r['pauses']:>9}"
                     if r["gc"] else f" {'-':>9} {'-':>7} {'-':>8} {'-':>9} {'-':>9}") +
                  f"  {'ok' if r['ok'] else 'FAIL'}", flush=True)
            if args.network_views:
                print(f"       network views taken by the agents: {r['views']}; the control plane sent"
                      f" {r['full_lists']:.0f} whole hosts lists and resumed {r['resumed']:.0f}"
                      f" (its /metrics, from the step's start); connecting took {r['connect_s']:.1f} s"
                      f" and {r['connect_cpu_s']:.1f} s of the control plane's CPU", flush=True)
            if not r["ok"] and not args.keep_going:
                break
            all_ok = all_ok and r["ok"]
            if all_ok:
                best = n
        print(f"baseline ({baseline['hosts']} hosts): p50 {baseline['p50_ms']:.1f} ms,"
              f" control-plane CPU {100 * baseline['cpu']:.1f}%")
        if last:
            per_hb = last["cpu_per_hb_ms"] / 1000
            print(f"at {last['hosts']} hosts: {1000 * per_hb:.3f} ms of control-plane CPU per heartbeat, so one"
                  f" core answers at most {1 / per_hb:,.0f} heartbeats/s = {args.interval / per_hb:,.0f} hosts"
                  f" at a {args.interval:g} s heartbeat (at 100%; keep headroom for pauses)")
        print(f"largest host count sustained at {args.interval}s heartbeats, every heartbeat"
              f" answered within {args.budget}s: {best}")
    finally:
        cp.send_signal(signal.SIGTERM)
        try:
            cp.wait(timeout=30)
        except subprocess.TimeoutExpired:
            cp.kill()


if __name__ == "__main__":
    main()
