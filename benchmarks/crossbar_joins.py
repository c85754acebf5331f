#!/usr/bin/env python3
"""
What one agent's join costs behind Crossbar.io, phase by phase and process by process, against
the embedded router in the same run.

    .venv/bin/python benchmarks/crossbar_joins.py [--agents 40] [--window 1] [--proxies 2]
        [--crossbar-key-cache] [--only embedded|crossbar]

C{--agents} simulated agents (benchmarks/heartbeats.py's seeded hosts, ticket auth) connect,
C{--window} at a time (1: one after the other, so each phase's time is its own), each through
the phases a real agent goes through: TCP connect, WebSocket opening, HELLO -> CHALLENGE,
AUTHENTICATE -> WELCOME (behind Crossbar: the proxy worker calls the control component's
C{zwrm.crossbar.authenticate}, then opens its own connection to the router worker for the
session), registering C{machine.list}, C{ingress.certs} and C{network.update} under
C{zwrm.agent.<host id>.} (behind Crossbar: a dynamic authorizer call each), calling
C{zwrm.agent.register} (the control plane then calls those three), and two heartbeats.  It
prints each phase's median and longest time, and the CPU each process used over the joins
(from /proc), per join: the control plane, Crossbar's router worker and its proxy workers.
The set-up is benchmarks/heartbeats_crossbar.py's (C{--crossbar-key-cache} as there).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import heartbeats_crossbar as hc  # noqa: E402
from heartbeats import cpu_seconds, seed  # noqa: E402

PHASES = ("tcp", "websocket", "challenge", "welcome", "procedures", "registered", "heartbeat",
          "heartbeat2")


def agents(args):
    """--agents-process: connect the agents read from stdin; print their phase times."""
    from autobahn.twisted.wamp import ApplicationSession
    from autobahn.wamp.serializer import MsgPackSerializer
    from autobahn.wamp.types import ComponentConfig
    from twisted.internet import defer, endpoints, reactor, task

    from zwrm.wamp.transport import WampWebSocketClientFactory

    creds = json.loads(sys.stdin.readline())
    rows = []

    class Agent(ApplicationSession):
        def __init__(self, authid, ticket):
            ApplicationSession.__init__(self, ComponentConfig(realm="zwrm"))
            self._authid, self._ticket = authid, ticket
            self.at = {}
            self.ready = defer.Deferred()

        def onConnect(self):
            self.at["websocket"] = time.monotonic()
            self.join("zwrm", authmethods=["ticket"], authid=self._authid)

        def onChallenge(self, challenge):
            self.at["challenge"] = time.monotonic()
            return self._ticket

        async def onJoin(self, details):
            self.at["welcome"] = time.monotonic()
            prefix = f"zwrm.agent.{details.authid}."
            await self.register(lambda: [], prefix + "machine.list")
            await self.register(lambda certs: {"network": "user"}, prefix + "ingress.certs")
            await self.register(lambda view: {"network": "user"}, prefix + "network.update")
            self.at["procedures"] = time.monotonic()
            await self.call("zwrm.agent.register", {"agent_version": "bench"})
            self.at["registered"] = time.monotonic()
            await self.call("zwrm.agent.heartbeat", {})
            self.at["heartbeat"] = time.monotonic()
            await self.call("zwrm.agent.heartbeat", {})
            self.at["heartbeat2"] = time.monotonic()
            self.ready.callback(None)

    async def one(hid, cred):
        s = Agent(hid, cred)
        f = WampWebSocketClientFactory(lambda: s, url=f"ws://127.0.0.1:{args.port}/ws",
                                       serializers=[MsgPackSerializer()])
        f.noisy = False
        t0 = time.monotonic()
        try:
            await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", args.port,
                                               timeout=60).connect(f)
            s.at["tcp"] = time.monotonic()
            await s.ready.addTimeout(300, reactor)
        except Exception as e:
            rows.append({"error": repr(e)})
            return
        rows.append({k: v - t0 for k, v in s.at.items()})

    async def run():
        sem = defer.DeferredSemaphore(args.window)
        t = time.monotonic()
        await defer.gatherResults([sem.run(lambda h=h, c=c: defer.Deferred.fromCoroutine(one(h, c)))
                                   for h, c in creds])
        print("RESULT " + json.dumps({"seconds": time.monotonic() - t, "rows": rows}), flush=True)

    task.react(lambda _reactor: defer.Deferred.fromCoroutine(run()))


def connect(args, port, creds):
    p = subprocess.Popen([sys.executable, __file__, "--agents-process", "--port", str(port),
                          "--window", str(args.window)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(json.dumps(creds) + "\n", timeout=3600)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit("the agents' process failed")
    return json.loads(lines[0][7:])


def report(kind, result, cpu, window):
    rows = [r for r in result["rows"] if "error" not in r]
    errors = [r["error"] for r in result["rows"] if "error" in r]
    n = max(1, len(rows))
    print(f"{kind}: {len(rows)} agents joined ({len(errors)} failed) in {result['seconds']:.2f} s,"
          f" {window} at a time; CPU per join: "
          + ", ".join(f"{name} {1000 * seconds / n:.1f} ms" for name, seconds in cpu.items())
          + f"; uptime: {hc.uptime()}")
    previous = None
    for phase in PHASES:
        times = sorted(r[phase] - (r[previous] if previous else 0) for r in rows if phase in r)
        if times:
            print(f"  {(previous or 'start') + ' -> ' + phase:>26}: median"
                  f" {1000 * statistics.median(times):8.1f} ms, longest {1000 * times[-1]:8.1f} ms")
        previous = phase
    for e in errors[:3]:
        print(f"  failed: {e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=40)
    ap.add_argument("--window", type=int, default=1)
    ap.add_argument("--proxies", type=int, default=2)
    ap.add_argument("--crossbar-key-cache", action="store_true")
    ap.add_argument("--only", choices=("embedded", "crossbar"), default=None)
    ap.add_argument("--agents-process", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.agents_process:
        return agents(args)
    args.interval = 5.0  # for hc.start_control

    from tests.crossbar.router import CONTROL_TICKET_ENV, ensure_crossbar
    from zwrm.testing.processes import free_port

    tmp = tempfile.mkdtemp(prefix="zwrm-bench-joins-")
    creds = seed(os.path.join(tmp, "seed"), args.agents, address="")
    db = os.path.join(tmp, "seed", "zwrm.db")
    print(f"{args.agents} agents, {args.window} at a time; machine: {os.cpu_count()} cores;"
          f" uptime: {hc.uptime()}")
    if args.only in (None, "embedded"):
        cp, port = hc.start_control(tmp, "embedded", db, args)
        try:
            c0 = cpu_seconds(cp.pid)
            result = connect(args, port, creds)
            report("embedded", result,
                   {"control plane (router included)": cpu_seconds(cp.pid) - c0}, args.window)
        finally:
            hc.stop(cp)
    if args.only in (None, "crossbar"):
        exe = ensure_crossbar()
        client_port, control_port = free_port(), free_port()
        cbdir = os.path.join(tmp, "crossbar", ".crossbar")
        os.makedirs(cbdir)
        with open(os.path.join(cbdir, "config.json"), "w") as f:
            json.dump(hc.crossbar_config(client_port, control_port,
                                         os.path.join(tmp, "crossbar", "router.sock"),
                                         args.proxies), f)
        env = dict(os.environ, **{CONTROL_TICKET_ENV: "bench-control-ticket"})
        env.pop("PYTHONPATH", None)
        if args.crossbar_key_cache:
            site = os.path.join(tmp, "crossbar-site")
            os.makedirs(site)
            with open(os.path.join(site, "sitecustomize.py"), "w") as f:
                f.write(hc.KEY_CACHE)
            env["PYTHONPATH"] = site
        log = open(os.path.join(tmp, "crossbar.log"), "wb")  # noqa: SIM115
        router = subprocess.Popen([exe, "start", "--cbdir", cbdir, "--loglevel", "warn"],
                                  stdout=log, stderr=log, cwd=os.path.dirname(cbdir), env=env)
        try:
            hc.wait(lambda: hc.listening(client_port) and hc.listening(control_port), 300,
                    "Crossbar listening")
            with open(os.path.join(tmp, "ticket"), "w") as f:
                f.write("bench-control-ticket\n")
            with open(os.path.join(tmp, "control.toml"), "w") as f:
                f.write(f'[control]\nrouter_url = "ws://127.0.0.1:{control_port}/ws"\n'
                        f'router_ticket_file = "{tmp}/ticket"\n'
                        f'registry_url = "http://127.0.0.1:1"\n')
            cp, _http = hc.start_control(tmp, "crossbar", db, args,
                                         ["--config", os.path.join(tmp, "control.toml")])
            try:
                time.sleep(2)
                c0, x0 = cpu_seconds(cp.pid), hc.crossbar_cpu(router.pid)
                result = connect(args, client_port, creds)
                x1 = hc.crossbar_cpu(router.pid)
                report("crossbar" + (" (node key cached)" if args.crossbar_key_cache else ""),
                       result, {"control plane": cpu_seconds(cp.pid) - c0,
                                "Crossbar router worker": x1["router"] - x0["router"],
                                "proxy workers": x1["proxy"] - x0["proxy"],
                                "controller": x1["controller"] - x0["controller"]},
                       args.window)
            finally:
                hc.stop(cp)
        finally:
            hc.stop(router)
    print(f"logs in {tmp}")


if __name__ == "__main__":
    main()
