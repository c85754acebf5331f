"""
The ingress against going direct, and the overlay against the same namespaces without zwrm.

    .venv/bin/python benchmarks/ingress.py [--requests 3000] [--concurrency 8] [--seconds 5]
                                           [--rounds 3] [--skip-overlay] [--loopback]
                                           [--compare-proxy PROXY_PY] [--profile FILE]

Needs root (network namespaces, L{zwrm.testing.netns}); C{--loopback} runs only the
proxy on 127.0.0.1 (C{tcp} and C{http} modes, with the CPU per request), without root.
C{--compare-proxy OLD_PROXY_PY} adds a row with another version of the proxy (same run);
C{--profile FILE} writes a cProfile of the proxy's process.

1. B{Ingress}: host C{h1} (a namespace) with zwrm's L{zwrm.agent.network.host.HostNetwork}
   (bridge, rules) and a "guest" namespace on its bridge (a veth where the VM's TAP would be:
   TCG would measure the emulator, not the network) running a small HTTP server (Twisted)
   that stands in for a replica.  The same load (C{--requests} HTTP/1.0 GETs,
   C{--concurrency} clients, a new connection each, as a load balancer's clients do), from
   h1 itself, alternating in the same run:

    - C{direct}: to the guest's address;
    - C{kernel}: to h1's address and a published C{tcp} port, forwarded by the kernel
      (L{HostNetwork.set_forwards}: nftables DNAT, what C{tcp} ports get);
    - C{proxy (http)}: to h1's address and an C{http} port served by
      L{zwrm.agent.network.proxy.Ingress} (its own process; what C{http}/C{https} ports get);

   and C{kernel, client ns}: the published port from a third namespace (another machine).
   Printed: requests/s, p50 and p99 latency of each, the throughput ratio to direct (goal
   >= 0.8x) and the p99 added (goal <= 1 ms on loopback-class links).

2. B{Overlay}: two host namespaces on a test switch (L{zwrm.testing.netns}), each with a
   zwrm L{zwrm.agent.network.host.HostNetwork} (bridge, VXLAN overlay, nftables rules), and
   a "guest" namespace on each bridge.  TCP throughput guest-to-guest over the overlay,
   against the same two host namespaces talking directly over the switch, same run.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SERVER = r"""
import sys
from twisted.internet import reactor
from twisted.web import resource, server
class P(resource.Resource):
    isLeaf = True
    def render_GET(self, request):
        return b"x" * 512
p = reactor.listenTCP(0, server.Site(P()), interface="127.0.0.1")
print(p.getHost().port, flush=True)
reactor.run()
"""

SERVER_ANY = SERVER.replace('interface="127.0.0.1"', 'interface="0.0.0.0"').replace(
    "listenTCP(0,", "listenTCP(int(sys.argv[1]),")

INGRESS = r"""
import os, signal, sys
from twisted.internet import reactor
module = os.environ.get("ZWRM_BENCH_PROXY")
if module:  # another version of the proxy (--compare-proxy), for a same-run comparison
    import importlib.util
    spec = importlib.util.spec_from_file_location("other_proxy", module)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    Ingress = other.Ingress
else:
    from zwrm.agent.network.proxy import Ingress
port, backend = int(sys.argv[1]), int(sys.argv[2])
interface, host, mode = (sys.argv + ["127.0.0.1", "127.0.0.1", "tcp"][len(sys.argv) - 3:])[3:6]
ing = Ingress(reactor, interface=interface)
ing.set_routes({port: {"mode": mode, "routes": {None: [
    {"key": "a", "host": host, "port": backend, "healthy": True}]}}})
signal.signal(signal.SIGTERM, lambda *a: reactor.callFromThread(reactor.stop))
profile = os.environ.get("ZWRM_BENCH_PROFILE")
print("ready", flush=True)
if profile:  # --profile: cProfile of the proxy's process, written when it is stopped
    import cProfile
    cProfile.run("reactor.run()", profile)
else:
    reactor.run()
"""
GUEST_PORT = 8080
PUBLISHED = 8000  # kernel-forwarded
PROXIED = 8001  # the proxy


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def one_request(port, host="127.0.0.1"):
    t = time.perf_counter()
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    if b" 200 " not in data.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"bad answer: {data[:80]!r}")
    return time.perf_counter() - t


def load(port, requests, concurrency, host="127.0.0.1"):
    lat = []
    lock = threading.Lock()
    left = [requests]

    def worker():
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            d = one_request(port, host)
            with lock:
                lat.append(d)

    start = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    took = time.perf_counter() - start
    lat.sort()
    return {"rps": len(lat) / took, "p50": lat[len(lat) // 2] * 1000,
            "p99": lat[int(len(lat) * 0.99)] * 1000}


def _load_in(ns, host, port, requests, concurrency):
    """L{load} run in namespace C{ns} (its own process): its figures."""
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__),
                          "--part", "load", "--host", host, "--port", str(port),
                          "--requests", str(requests), "--concurrency", str(concurrency)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _wait_port(ns, host, port, what):
    for _ in range(100):
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                            f"import socket; socket.create_connection(('{host}', {port}), 1)"],
                           capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} does not answer")


def _print_rows(rows, direct="direct"):
    def med(rs, k):
        return statistics.median(r[k] for r in rs)

    base = rows[direct]
    for name, rs in rows.items():
        line = (f"   {name:17} {med(rs, 'rps'):8.0f} req/s   p50 {med(rs, 'p50'):6.2f} ms   "
                f"p99 {med(rs, 'p99'):6.2f} ms")
        if name != direct:
            line += (f"   {med(rs, 'rps') / med(base, 'rps'):.2f}x, p99 "
                     f"{med(rs, 'p99') - med(base, 'p99'):+.2f} ms")
        print(line)
    print("   (goals: >= 0.8x the throughput of direct, <= 1 ms added p99)")


def _load_average():
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def ingress_bench(requests, concurrency, rounds=3, profile=None, compare=None):
    """
    Section 1 in namespaces (root): direct, kernel forwarding and the proxy.

    @param profile: write a cProfile of the proxy's process there.
    @param compare: the path of another version of C{proxy.py}: one more row, its http
        port (C{PROXIED + 1}).
    """
    from twisted.internet import defer, task

    from zwrm.testing.netns import TestNetwork

    root = tempfile.mkdtemp(prefix="zwrm-bench-ing-")
    net = TestNetwork(["h1", "client"])
    h1, gns = net.address("h1"), net.namespace("h1") + "-g"
    procs = []

    async def setup(reactor):
        from tests.network.helpers import veth_guest
        from zwrm.agent.network.commands import Runner
        from zwrm.agent.network.host import HostNetwork

        run = Runner(reactor, ["ip", "netns", "exec", net.namespace("h1")])
        hn = HostNetwork(reactor, local_address=h1, run=run, state_dir=os.path.join(root, "h1"))
        spec = {"address": "10.80.1.2", "prefix": 16, "gateway": "10.80.1.1", "mtu": 1450}
        nic = await hn.add_machine("g1", "bench", spec)
        await veth_guest(reactor, run, gns, nic, spec)
        await hn.set_forwards({PUBLISHED: [("10.80.1.2", GUEST_PORT)]})

    try:
        try:
            task.react(lambda r: defer.ensureDeferred(setup(r)))
        except SystemExit as e:
            if e.code:
                raise
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        procs.append(subprocess.Popen(["ip", "netns", "exec", gns, sys.executable, "-c",
                                       SERVER_ANY, str(GUEST_PORT)], stdout=subprocess.PIPE))
        penv = dict(env, ZWRM_BENCH_PROFILE=profile) if profile else env
        procs.append(subprocess.Popen(["ip", "netns", "exec", net.namespace("h1"), sys.executable,
                                       "-c", INGRESS, str(PROXIED), str(GUEST_PORT), h1,
                                       "10.80.1.2", "http"], stdout=subprocess.PIPE, env=penv))
        ns = net.namespace("h1")
        _wait_port(ns, "10.80.1.2", GUEST_PORT, "the replica")
        _wait_port(ns, h1, PROXIED, "the proxy")
        targets = {"direct": (ns, "10.80.1.2", GUEST_PORT), "kernel (tcp)": (ns, h1, PUBLISHED),
                   "proxy (http)": (ns, h1, PROXIED),
                   "kernel, client ns": (net.namespace("client"), h1, PUBLISHED)}
        if compare:
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", INGRESS, str(PROXIED + 1),
                 str(GUEST_PORT), h1, "10.80.1.2", "http"], stdout=subprocess.PIPE,
                env=dict(penv, ZWRM_BENCH_PROXY=os.path.abspath(compare),
                         **({"ZWRM_BENCH_PROFILE": profile + ".other"} if profile else {}))))
            _wait_port(ns, h1, PROXIED + 1, "the other proxy")
            targets["other proxy (http)"] = (ns, h1, PROXIED + 1)
        for t in targets.values():
            _load_in(*t, 200, concurrency)  # warm up
        rows = {k: [] for k in targets}
        before = _load_average()
        for _ in range(rounds):
            for k, t in targets.items():
                rows[k].append(_load_in(*t, requests, concurrency))
        print("1. ingress (HTTP/1.0, new connection per request, "
              f"{requests} requests x {rounds} rounds, concurrency {concurrency}, medians; "
              "clients on h1 but 'kernel, client ns': another namespace)")
        print(f"   {before} at the start, {_load_average()} at the end")
        _print_rows(rows)
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        subprocess.run(["ip", "netns", "delete", gns], capture_output=True)
        net.close()


def loopback_bench(requests, concurrency, rounds=3):
    """
    The proxy on 127.0.0.1, in C{tcp} mode (a pipe per connection) and C{http} mode (kept
    connections to the replica), against the replica directly: the proxy's own cost where
    a direct connection is as cheap as it gets.  Also the CPU each process spends per
    request (from /proc).
    """
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    srv = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    backend = int(srv.stdout.readline())
    procs = [srv]
    targets = {"direct": (backend, None)}
    try:
        for mode in ("tcp", "http"):
            port = free_port()
            ing = subprocess.Popen([sys.executable, "-c", INGRESS, str(port), str(backend),
                                    "127.0.0.1", "127.0.0.1", mode],
                                   stdout=subprocess.PIPE, text=True, env=env)
            procs.append(ing)
            assert ing.stdout.readline().strip() == "ready"
            targets[f"proxy ({mode})"] = (port, ing)
        rows = {k: [] for k in targets}
        cpu = {k: [] for k in targets}
        for port, _ in targets.values():
            load(port, 200, concurrency)  # warm up
        before = _load_average()
        for _ in range(rounds):
            for k, (port, ing) in targets.items():
                c0 = (_cpu(srv.pid), _cpu(ing.pid) if ing else 0.0)
                rows[k].append(load(port, requests, concurrency))
                c1 = (_cpu(srv.pid), _cpu(ing.pid) if ing else 0.0)
                cpu[k].append([1e6 * (b - a) / requests for a, b in zip(c0, c1, strict=True)])
    finally:
        for p in procs:
            p.terminate()
            p.wait()
    print("1. ingress on 127.0.0.1 (the proxy; HTTP/1.0, new connection per request, "
          f"{requests} requests x {rounds} rounds, concurrency {concurrency}, medians)")
    print(f"   {before} at the start, {_load_average()} at the end")
    _print_rows(rows)
    for k, cs in cpu.items():
        print(f"   CPU per request, {k:12}: replica {statistics.median(c[0] for c in cs):4.0f} us"
              + (f", proxy {statistics.median(c[1] for c in cs):4.0f} us" if k != "direct" else ""))


def _cpu(pid):
    """User + system CPU seconds of process C{pid} so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _throughput(net, server_host, client_host, address, seconds, server_argv_prefix=None,
                client_argv_prefix=None):
    """MB/s of one TCP stream from client to server (python sockets, 64 KiB writes)."""
    port = 5201
    srv_code = (f"import socket,time\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,"
                f"socket.SO_REUSEADDR,1);s.bind(('{address}',{port}));s.listen(1)\n"
                "c,_=s.accept();n=0;t=time.time()\nwhile True:\n d=c.recv(1<<20)\n"
                " if not d: break\n n+=len(d)\nprint(n/(time.time()-t)/1e6)\n")
    cli_code = (f"import socket,time\ns=socket.create_connection(('{address}',{port}),timeout=10)\n"
                f"b=b'x'*65536;e=time.time()+{seconds}\nwhile time.time()<e: s.sendall(b)\n"
                "s.close()\n")
    srv = subprocess.Popen(server_argv_prefix + [sys.executable, "-c", srv_code],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    subprocess.run(client_argv_prefix + [sys.executable, "-c", cli_code], check=True)
    out = srv.communicate(timeout=seconds + 30)[0]
    return float(out.strip())


async def _overlay_setup(net, root):
    from twisted.internet import reactor

    from zwrm.agent.network.commands import Runner
    from zwrm.agent.network.host import HostNetwork

    hosts = {}
    for i, h in enumerate(("h1", "h2"), 1):
        run = Runner(reactor, ["ip", "netns", "exec", net.namespace(h)])
        hn = HostNetwork(reactor, local_address=net.address(h), run=run,
                         state_dir=os.path.join(root, h))
        spec = {"address": f"10.80.{i}.2", "prefix": 16, "gateway": f"10.80.{i}.1", "mtu": 1450}
        nic = await hn.add_machine(f"g{i}", "bench", spec)
        hosts[h] = (hn, run, nic, spec)
    members = [{"address": s["address"], "app": "bench", "host_id": h}
               for h, (_, _, _, s) in hosts.items()]
    views = [{"host_id": h, "address": net.address(h), "gateway": s["gateway"]}
             for h, (_, _, _, s) in hosts.items()]
    for hn, _run, _nic, _spec in hosts.values():
        await hn.set_cluster(views, members)
    return hosts


def overlay_bench(seconds):
    from twisted.internet import defer, task

    from zwrm.testing.netns import TestNetwork

    root = tempfile.mkdtemp(prefix="zwrm-bench-net-")
    net = TestNetwork(["h1", "h2"])
    guests = {}
    try:
        result = {}

        async def main(reactor):
            hosts = await _overlay_setup(net, root)
            # A guest namespace per host on the TAP's place: the TAP is replaced by a veth.
            for h, (_hn, run, nic, spec) in hosts.items():
                g = f"{net.namespace(h)}-g"
                subprocess.run(["ip", "netns", "add", g], check=True)
                guests[h] = g
                await run("ip", "link", "del", nic["tap"])
                await run("ip", "link", "add", nic["tap"], "mtu", "1450", "type", "veth",
                          "peer", "name", "eth0", "netns", g)
                await run("ip", "link", "set", nic["tap"], "master", "zwbr0", "up")
                gx = ["ip", "netns", "exec", g]
                subprocess.run(gx + ["ip", "link", "set", "eth0", "address", nic["mac"], "mtu",
                                     "1450", "up"], check=True)
                subprocess.run(gx + ["ip", "addr", "add", f"{spec['address']}/16", "dev", "eth0"],
                               check=True)
                subprocess.run(gx + ["ip", "link", "set", "lo", "up"], check=True)
            result["hosts"] = hosts

        task.react(lambda r: defer.ensureDeferred(main(r)))
    except SystemExit:
        pass
    try:
        g1 = ["ip", "netns", "exec", guests["h1"]]
        g2 = ["ip", "netns", "exec", guests["h2"]]
        n1 = ["ip", "netns", "exec", net.namespace("h1")]
        n2 = ["ip", "netns", "exec", net.namespace("h2")]
        over, direct = [], []
        for _ in range(3):
            over.append(_throughput(net, "g2", "g1", "10.80.2.2", seconds, g2, g1))
            direct.append(_throughput(net, "h2", "h1", net.address("h2"), seconds, n2, n1))
        o, d = statistics.median(over), statistics.median(direct)
        print(f"2. overlay (one TCP stream, {seconds} s x 3, medians)")
        print(f"   guest-to-guest over zwrm's overlay {o:8.0f} MB/s")
        print(f"   the two hosts directly             {d:8.0f} MB/s")
        print(f"   ratio {o / d:.2f}x")
    finally:
        for g in guests.values():
            subprocess.run(["ip", "netns", "delete", g])
        net.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="loads of each target (medians)")
    ap.add_argument("--skip-overlay", action="store_true")
    ap.add_argument("--loopback", action="store_true",
                    help="only the proxy on 127.0.0.1 against direct (no root needed)")
    ap.add_argument("--profile", metavar="FILE",
                    help="write a cProfile of the http proxy's process to FILE (pstats; "
                    "the --compare-proxy one's to FILE.other)")
    ap.add_argument("--compare-proxy", metavar="PROXY_PY",
                    help="another version of zwrm/agent/network/proxy.py: one more row")
    ap.add_argument("--part", choices=["ingress", "overlay", "load"], help=argparse.SUPPRESS)
    ap.add_argument("--host", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part == "load":
        print(json.dumps(load(args.port, args.requests, args.concurrency, args.host)))
        return
    if args.part == "ingress":
        return ingress_bench(args.requests, args.concurrency, args.rounds, args.profile,
                             args.compare_proxy)
    if args.part == "overlay":
        return overlay_bench(args.seconds)
    if args.loopback:
        return loopback_bench(args.requests, args.concurrency, args.rounds)
    # Each part sets up its namespaces with its own reactor run: its own process.
    me = [sys.executable, os.path.abspath(__file__), "--requests", str(args.requests),
          "--concurrency", str(args.concurrency), "--seconds", str(args.seconds),
          "--rounds", str(args.rounds)]
    for flag, value in (("--profile", args.profile), ("--compare-proxy", args.compare_proxy)):
        if value:
            me += [flag, os.path.abspath(value)]
    subprocess.run(me + ["--part", "ingress"], check=True)
    if not args.skip_overlay:
        subprocess.run(me + ["--part", "overlay"], check=True)


if __name__ == "__main__":
    _ = asyncio
    main()
