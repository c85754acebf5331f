#!/usr/bin/env python3
"""
How many hosts one control component sustains at a 5 s heartbeat behind Crossbar.io, with the
agents' sessions spread over several Crossbar proxy workers, against the embedded router in
the same run.

    .venv/bin/python benchmarks/heartbeats_crossbar.py [--steps 100,1000,2000]
        [--crossbar-steps 500,1000] [--proxies 2] [--per-worker 500] [--interval 5]
        [--duration 20] [--budget 1.0] [--crossbar /opt/crossbar-venv/bin/crossbar]
        [--only embedded|crossbar] [--keep-going] [--crossbar-key-cache]
        [--no-agent-procedures]

The workload is benchmarks/heartbeats.py's (its worker processes and its step function):
simulated agents with real WAMP sessions (ticket auth as seeded hosts), registering, then
calling C{zwrm.agent.heartbeat} every C{--interval} seconds at a random phase; a step passes
when every heartbeat of the measuring window was answered within C{--budget} seconds.

Two set-ups, one after the other, each with a fresh copy of the same seeded database:

 - C{embedded}: C{twistd zwrm-control} with its own router (the baseline);
 - C{crossbar}: Crossbar.io with the configuration of docs/wamp-clients.md, changed as
   docs/scaling.md says for several workers: C{--proxies} proxy workers sharing the client
   port (they terminate the agents' WebSockets and authenticate them through zwrm's dynamic
   authenticator) in front of the one router worker, reached over a Unix socket
   (C{anonymous-proxy}); C{twistd zwrm-control} with C{router_url}.  Crossbar's router
   workers are not joined with rlinks: they lose the caller's authid (docs/scaling.md).

The simulated agents register C{machine.list}, C{ingress.certs} and C{network.update} (which
the control plane calls on every agent that registers) and answer them as a user-mode agent
does, so that registering costs what it costs a real agent, not a failed call each.

Per step it prints the latencies, the control plane's CPU, (crossbar) the CPU of Crossbar's
router worker and proxy workers in the measuring window, how long the step's agents took
to connect and one agent's join (TCP connect to registered), and C{uptime} after each row
(the machine may be shared).  C{--crossbar-key-cache} runs Crossbar with its node key read
once per process: as shipped, Crossbar.io 26.10.1's proxy workers read the key file and draw
its QR code twice for every session they forward (about two thirds of a proxy worker's CPU
per session).  Crossbar.io is never a dependency of zwrm: tests/crossbar/router.py
--install makes its virtualenv.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import heartbeats  # noqa: E402
from heartbeats import run_step, seed  # noqa: E402


def crossbar_cpu(pid):
    """
    User + system CPU seconds of Crossbar's processes, by kind: C{{"router", "proxy",
    "controller"}} (the controller C{pid} and its workers, from /proc).
    """
    out = {"router": 0.0, "proxy": 0.0, "controller": 0.0}
    try:
        out["controller"] = heartbeats.cpu_seconds(pid)
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        return out
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                cmdline = f.read()
            cpu = heartbeats.cpu_seconds(child)
        except (OSError, ValueError, IndexError):
            continue
        kind = "proxy" if b"ProxyController" in cmdline else "router"
        out[kind] += cpu
    return out


def uptime():
    """What C{uptime} prints (the machine is shared: every figure is printed beside it)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


KEY_CACHE = """\
# written by zwrm's benchmarks/heartbeats_crossbar.py --crossbar-key-cache: Crossbar.io 26.10.1's
# proxy workers read the node key file and draw its QR code (pyqrcode) twice for every session
# they forward (crossbar/worker/proxy.py, crossbar/common/key.py _read_node_key); this reads it
# once per process instead
try:
    import functools

    import crossbar.common.key as _key

    _key._read_node_key = functools.lru_cache(maxsize=None)(_key._read_node_key)
except Exception:
    pass
"""


def crossbar_config(client_port, control_port, socket_path, proxies):
    """docs/wamp-clients.md's configuration with C{proxies} proxy workers (see the docstring)."""
    from tests.crossbar.router import configure, sample_config

    config = configure(sample_config(), client_port, control_port)
    router = config["workers"][0]
    router["realms"][0]["roles"].append({"name": "authenticator", "permissions": [
        {"uri": "zwrm.crossbar.authenticate", "match": "exact",
         "allow": {"call": True, "register": False, "publish": False, "subscribe": False},
         "disclose": {"caller": True, "publisher": True}, "cache": True}]})
    control = [t for t in router["transports"] if t["endpoint"]["port"] == control_port]
    router["transports"] = control + [{
        "type": "rawsocket", "endpoint": {"type": "unix", "path": socket_path},
        "serializers": ["cbor", "msgpack", "json"],
        "auth": {"anonymous-proxy": {"type": "static"}}}]
    roles = ("joining", "agent", "operator", "viewer", "authenticator")
    for _ in range(proxies):
        config["workers"].append({
            "type": "proxy",
            "transports": [{
                "type": "web",
                "endpoint": {"type": "tcp", "port": client_port, "interface": "127.0.0.1",
                             "shared": True},
                "paths": {"ws": {
                    "type": "websocket", "serializers": ["json", "msgpack", "cbor"],
                    "auth": {"ticket": {"type": "dynamic",
                                        "authenticator": "zwrm.crossbar.authenticate",
                                        "authenticator-role": "authenticator"}}}}}],
            "routes": {"zwrm": {r: "router" for r in roles}},
            "connections": {"router": {"realm": "zwrm", "transport": {
                "type": "rawsocket", "endpoint": {"type": "unix", "path": socket_path},
                "serializer": "cbor"}}},
        })
    return config


def wait(check, timeout, what):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"benchmark: {what} not within {timeout} s")
        time.sleep(0.5)


def listening(port):
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def start_control(tmp, name, db, args, extra=()):
    from zwrm.testing.processes import TWISTD, free_port

    data_dir = os.path.join(tmp, f"cp-{name}")
    os.makedirs(data_dir, mode=0o700)
    shutil.copy(db, os.path.join(data_dir, "zwrm.db"))
    port = free_port()
    log = open(os.path.join(tmp, f"cp-{name}.log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        TWISTD + ["-n", "--pidfile=", "zwrm-control", "--data-dir", data_dir,
                  "--listen", f"tcp:{port}:interface=127.0.0.1",
                  "--heartbeat-interval", str(args.interval), "--check-interval", "15",
                  "--offline-after", "86400", *extra],
        stdout=log, stderr=log)
    wait(lambda: os.path.exists(os.path.join(data_dir, "control.url")) or proc.poll() is not None,
         180, f"zwrm-control ({name}) listening")
    if proc.poll() is not None:
        raise SystemExit(f"zwrm-control ({name}) exited; see {log.name}")
    return proc, port


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


HEADER = (f"{'router':>9} {'hosts':>6} {'answered':>13} {'fail':>4} {'p50 ms':>8} {'p99 ms':>8}"
          f" {'max ms':>8} {'cp CPU':>7} {'cp ms/hb':>8} {'cb CPU r+p':>12} {'cb ms/hb':>8}"
          f" {'connect s':>9} {'join ms':>8} {'load':>5}  result")


def run_steps(kind, args, steps, creds, cp, ws_port, http_port, router=None):
    """Each step against one set-up; a row per step, with C{uptime} after it."""
    # heartbeats.run_step reads /metrics on the port the agents use: here that is Crossbar's
    original = heartbeats.gc_metrics
    heartbeats.gc_metrics = lambda _port: original(http_port)
    probe = (lambda: crossbar_cpu(router.pid)) if router else None
    best, rows = 0, []
    try:
        for n in steps:
            r = run_step(args, cp.pid, ws_port, creds[:n], probe=probe)
            cb = "-"
            cb_hb = "-"
            if router:
                (c0, c1), w = r["probe"], r["window_s"]
                cb_router = (c1["router"] - c0["router"]) / w
                cb_proxy = (c1["proxy"] - c0["proxy"]) / w
                cb_all = sum(c1.values()) - sum(c0.values())
                cb = f"{100 * cb_router:.0f}+{100 * cb_proxy:.0f}%"
                cb_hb = (f"{1000 * cb_all / max(1, r['heartbeats']) * args.duration / w:.3f}")
                r.update(cb_router=cb_router, cb_proxy=cb_proxy)
            rows.append(r)
            print(f"{kind:>9} {r['hosts']:>6} {r['heartbeats']:>6}/{r['expected']:<6.0f}"
                  f"{r['failures']:>5} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['max_ms']:>8.1f}"
                  f" {100 * r['cpu']:>6.1f}% {r['cpu_per_hb_ms']:>8.3f} {cb:>12} {cb_hb:>8}"
                  f" {r['connect_s']:>9.1f} {1000 * r['join_p50_s']:>8.0f}"
                  f" {r['load']:>5.1f}  {'ok' if r['ok'] else 'FAIL'}", flush=True)
            print(f"{'':>9} uptime: {uptime()}", flush=True)
            if not r["ok"] and not args.keep_going:
                break
            if r["ok"] and all(x["ok"] for x in rows):
                best = n
    finally:
        heartbeats.gc_metrics = original
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="100,1000,2000")
    ap.add_argument("--proxies", type=int, default=2)
    ap.add_argument("--per-worker", type=int, default=500)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--crossbar", default=None, help="crossbar executable (default: installed"
                    " by tests/crossbar/router.py)")
    ap.add_argument("--only", choices=("embedded", "crossbar"), default=None)
    ap.add_argument("--crossbar-steps", default=None,
                    help="the Crossbar half's steps, if not --steps")
    ap.add_argument("--keep-going", action="store_true")
    ap.add_argument("--no-agent-procedures", dest="agent_procedures", action="store_false",
                    help="the simulated agents register no procedures (then the control plane's"
                         " calls on registration, machine.list, ingress.certs and network.update,"
                         " fail)")
    ap.add_argument("--crossbar-key-cache", action="store_true",
                    help="run Crossbar with its node key read once per process (a sitecustomize"
                         " on PYTHONPATH): as shipped, its proxy workers draw the key's QR code"
                         " twice per session they forward")
    args = ap.parse_args()

    from tests.crossbar.router import CONTROL_TICKET_ENV, ensure_crossbar
    from zwrm.testing.processes import free_port

    steps = [int(s) for s in args.steps.split(",")]
    cb_steps = [int(s) for s in args.crossbar_steps.split(",")] if args.crossbar_steps else steps
    tmp = tempfile.mkdtemp(prefix="zwrm-bench-cb-")
    # hosts without an address: not on the cluster network's overlay, whose view (every host
    # with an address, sent to each host whenever one joins) grows as n^2 in a joining burst;
    # this measures heartbeats (docs/scaling.md has the view's cost)
    creds = seed(os.path.join(tmp, "seed"), max(steps + cb_steps), address="")
    db = os.path.join(tmp, "seed", "zwrm.db")
    print(f"{max(steps + cb_steps)} hosts seeded; machine: {os.cpu_count()} cores; heartbeat"
          f" every {args.interval}s, window {args.duration}s, budget {args.budget}s;"
          f" {args.proxies} Crossbar proxy workers"
          + (", node key cached" if args.crossbar_key_cache else "")
          + f"; simulated agents {'answer' if args.agent_procedures else 'register no'}"
          " machine.list, ingress.certs and network.update")
    print(f"uptime: {uptime()}")
    print("cp: the control plane's process; cb CPU r+p: Crossbar's router worker + proxy workers"
          " (share of one core, in the window); cb ms/hb: all Crossbar processes' CPU per heartbeat"
          " answered; connect s: the step's agents connecting (at most 50 at a time per"
          f" {args.per_worker} agents); join ms: the median agent's TCP connect to registered")
    print(HEADER)
    results = {}
    if args.only in (None, "embedded"):
        cp, port = start_control(tmp, "embedded", db, args)
        try:
            results["embedded"] = run_steps("embedded", args, steps, creds, cp, port, port)
        finally:
            stop(cp)
    if args.only in (None, "crossbar"):
        exe = args.crossbar or ensure_crossbar()
        client_port, control_port = free_port(), free_port()
        cbdir = os.path.join(tmp, "crossbar", ".crossbar")
        os.makedirs(cbdir)
        ticket = "bench-control-ticket"
        with open(os.path.join(cbdir, "config.json"), "w") as f:
            json.dump(crossbar_config(client_port, control_port,
                                      os.path.join(tmp, "crossbar", "router.sock"),
                                      args.proxies), f)
        log = open(os.path.join(tmp, "crossbar.log"), "wb")  # noqa: SIM115
        env = dict(os.environ, **{CONTROL_TICKET_ENV: ticket})
        env.pop("PYTHONPATH", None)
        if args.crossbar_key_cache:
            site = os.path.join(tmp, "crossbar-site")
            os.makedirs(site)
            with open(os.path.join(site, "sitecustomize.py"), "w") as f:
                f.write(KEY_CACHE)
            env["PYTHONPATH"] = site  # the workers inherit the controller's environment
        router = subprocess.Popen([exe, "start", "--cbdir", cbdir, "--loglevel", "warn"],
                                  stdout=log, stderr=log, cwd=os.path.dirname(cbdir), env=env)
        try:
            wait(lambda: listening(client_port) and listening(control_port), 300,
                 "Crossbar listening")
            with open(os.path.join(tmp, "ticket"), "w") as f:
                f.write(ticket + "\n")
            with open(os.path.join(tmp, "control.toml"), "w") as f:
                f.write(f'[control]\nrouter_url = "ws://127.0.0.1:{control_port}/ws"\n'
                        f'router_ticket_file = "{tmp}/ticket"\n'
                        f'registry_url = "http://127.0.0.1:1"\n')
            cp, http_port = start_control(tmp, "crossbar", db, args,
                                          ["--config", os.path.join(tmp, "control.toml")])
            try:
                results["crossbar"] = run_steps("crossbar", args, cb_steps, creds, cp,
                                                client_port, http_port, router=router)
            finally:
                stop(cp)
        finally:
            stop(router)
    for kind, best in results.items():
        print(f"{kind}: largest host count sustained at {args.interval:g} s heartbeats, every"
              f" heartbeat answered within {args.budget:g} s: {best}")
    print(f"logs in {tmp}")


if __name__ == "__main__":
    main()
