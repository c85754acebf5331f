"""
The cluster network end to end: a control plane and two agents with C{--network bridge},
each in its own network namespace, real guests, the CLI and the apps' users in a fourth.

 - two replicas of one app, one per host, find each other by DNS and talk over the overlay;
 - a VM of another app reaches neither of them, nor any host's services or loopback;
 - a client reaches the app through either host's published ports (tcp, forwarded by the
   kernel; http, through the proxy), and keeps getting answers (failed requests counted:
   goal zero) while host a1 is drained and while one replica is killed.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.network import guest
from tests.network.cluster import probe_all_script
from zwrm.testing.netns import TestNetwork
from zwrm.testing.processes import (
    ZWRM,
    AgentProcess,
    ControlPlaneProcess,
    free_port,
    kill_machines_under,
    poll,
)

SERVICE = 8999  # a service listening on every address of each agent's host
METRICS = 9102  # each agent's own endpoint (--metrics-listen) on its address
PUBLISHED = (80, 81)  # web's ports: tcp (forwarded by the kernel), http (the proxy)
TRIGGER = 8998  # opened in the client's namespace once web is up: the other app's signal

WEB_PROBE = """nc -ll -p 9090 -e echo web-private </dev/null >/dev/null 2>&1 &
sleep 2
n=0
while [ $n -lt 120 ]; do
  A=$(nslookup web.zwrm.internal 2>/dev/null | grep -A9 '^Name:' | grep '^Address' | awk '{print $NF}' | sort | tr '\\n' ' ')
  [ $(echo $A | wc -w) -ge 2 ] && break
  n=$((n+1)); sleep 1
done
echo "probe dns $(echo $A | wc -w)"
for a in $A; do
  if echo | nc -w 3 $a 9090 >/dev/null 2>&1; then echo "probe peer-$a reached"; else echo "probe peer-$a blocked"; fi
done
echo "probe done"
"""


class _InNamespace:
    """Mix-in: the process runs inside test host C{self.host} of C{self.net}."""

    def argv(self):
        return self.net.argv(self.host, super().argv())


class _ControlPlane(_InNamespace, ControlPlaneProcess):
    def __init__(self, net, data_dir, **kw):
        self.net, self.host = net, "cp"
        address = net.address("cp")
        port = free_port()
        super().__init__(reactor, data_dir, port=port, extra_args=[
            "--insecure-listen"], **kw)
        self.address = address
        self.url = f"ws://{address}:{port}/ws"

    def argv(self):
        argv = ControlPlaneProcess.argv(self)
        i = argv.index("--listen")
        argv[i + 1] = f"tcp:{self.port}:interface={self.address}"
        return self.net.argv(self.host, argv)


class _Agent(_InNamespace, AgentProcess):
    def __init__(self, net, host, data_dir, url, token):
        self.net, self.host = net, host
        super().__init__(reactor, data_dir, url, token, name=host, extra_args=[
            "--insecure", "--network", "bridge", "--address", net.address(host),
            "--accel", "tcg", "--metrics-listen",
            f"tcp:{METRICS}:interface={net.address(host)}"])


@pytest.mark.qemu
@pytest.mark.multihost
class ClusterNetworkTests(TestCase):
    timeout = 900

    async def cli(self, *args, check=True):
        out = await _run_env(self.net, "client", ZWRM + list(args),
                             {"ZWRM_API_URL": self.cp.url, "ZWRM_TOKEN": self.cp.operator_token},
                             check=check)
        return out

    async def machines(self, app):
        return json.loads(await self.cli("machines", "list", "--app", app, "--json"))

    async def test_overlay_dns_isolation_and_ingress(self):
        t0 = reactor.seconds()

        def phase(what):  # where the time goes (pytest -s shows it)
            print(f"[{reactor.seconds() - t0:6.1f} s] {what}", flush=True)

        root = tempfile.mkdtemp(prefix="zwrm-netcl-", dir="/tmp")
        self.addCleanup(shutil.rmtree, root, True)
        self.addCleanup(kill_machines_under, root)
        img = await deferToThread(guest.build)
        self.net = net = TestNetwork(["cp", "a1", "a2", "client"])
        self.addCleanup(net.close)
        self.cp = cp = _ControlPlane(net, os.path.join(root, "cp"))
        await cp.start()
        self.addCleanup(cp.stop)
        agents = []
        for h in ("a1", "a2"):
            a = _Agent(net, h, os.path.join(root, h), cp.url, cp.join_token)
            self.addCleanup(a.stop)
            agents.append(a)
            # A service listening on every address of the agent's host: no guest reaches it.
            svc = net.spawn(h, [sys.executable, "-m", "http.server", str(SERVICE), "--bind",
                                "0.0.0.0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.addCleanup(_end, svc)
        await DeferredList([ensureDeferred(a.start()) for a in agents],
                           fireOnOneErrback=True, consumeErrors=True)

        async def ready():
            hosts = json.loads(await self.cli("host", "list", "--json"))
            return len([h for h in hosts if h["state"] == "ready"]) == 2

        await poll(reactor, ready, 60, 1, "two ready hosts")
        phase("control plane and agents ready")
        base = ["--kernel", img.kernel, "--initrd", img.initrd, "--memory", "96",
                "--port", "8080", "--health-http", "/", "--health-interval", "1",
                "--health-grace", "240"]
        await self.cli("apps", "create", "web")
        # 80: a tcp port (the kernel forwards it); 81: http (the proxy).
        ms = json.loads(await self.cli(
            "deploy", "web", *base, "--replicas", "2", "--publish", "80:8080",
            "--publish", "81:8080/http", "--shutdown-delay", "2", "--cmdline",
            f"{img.cmdline} {guest.script_arg(WEB_PROBE)}", "--json"))["machines"]
        phase("web deployed")

        async def addressed():
            ms = await self.machines("web")
            return len([m for m in ms if m.get("address")]) == 2 and ms

        if len([m for m in ms if m.get("address")]) != 2:
            ms = await poll(reactor, addressed, 60, 1, "web's addresses")
        web_addrs = sorted(m["address"] for m in ms)
        # Both replicas' probes, as their consoles show them (one follower each).
        probes = [ensureDeferred(self.console_until(m["id"], "probe done", 400)) for m in ms]
        for d in probes:
            self.addCleanup(d.cancel)  # a no-op once it has fired
        # Another app boots alongside web; once web is up (the test opens TRIGGER in the
        # client's namespace then), it tries at once to reach every web VM (but the port
        # web publishes), every host service (the service above, the agents' own
        # endpoints, the control plane, the ingress) and DNS on the gateways.
        targets = [(f"web-{i}", a, 9090) for i, a in enumerate(web_addrs)]
        targets += [(f"web-open-{i}", a, 8080) for i, a in enumerate(web_addrs)]
        targets += [("cp", cp.address, cp.port), ("a1-ingress", net.address("a1"), 80),
                    ("a2-ingress", net.address("a2"), 80),
                    ("a1-ingress-http", net.address("a1"), 81),
                    ("a1-agent", net.address("a1"), METRICS),
                    ("a2-agent", net.address("a2"), METRICS),
                    ("a1-service", net.address("a1"), SERVICE),
                    ("a2-service", net.address("a2"), SERVICE),
                    ("gw1-service", "10.80.1.1", SERVICE), ("gw2-service", "10.80.2.1", SERVICE),
                    ("gw1-dns", "10.80.1.1", 53), ("gw2-dns", "10.80.2.1", 53)]
        await self.cli("apps", "create", "other")
        (other,) = json.loads(await self.cli(
            "deploy", "other", *base, "--json", "--cmdline", f"{img.cmdline} " + guest.script_arg(
                probe_all_script(targets, after=(net.address("client"), TRIGGER)))))["machines"]
        other_probe = ensureDeferred(self.console_until(other["id"], "probe done", 400))
        self.addCleanup(other_probe.cancel)
        phase("other deployed")
        # Both web replicas found both by DNS (which lists healthy replicas only) and
        # reached the other over the overlay.
        try:
            consoles = [c for _, c in await DeferredList(probes, fireOnOneErrback=True,
                                                         consumeErrors=True)]
        except Exception:
            for a in agents:
                print(a.log_tail(60))
            raise
        phase("web probes done")
        trigger = net.spawn("client", [sys.executable, "-m", "http.server", str(TRIGGER),
                                       "--bind", "0.0.0.0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(_end, trigger)

        async def web_passing():
            ms = await self.machines("web")
            return len([m for m in ms if m["health"] == "passing"]) == 2 and ms

        ms = await poll(reactor, web_passing, 60, 1, "two passing web replicas")
        self.assertEqual(len({m["host_id"] for m in ms}), 2)
        for console in consoles:
            res = guest.probe_results(console)
            self.assertEqual(res.pop("dns"), "2", res)
            self.assertEqual(sorted(set(res.values())), ["reached"], res)
            self.assertEqual(len(res), 2, res)
        self.assertEqual(sorted(k[len("peer-"):] for k in res), web_addrs)

        # The app through either host's published port, from the client's namespace.
        for h in ("a1", "a2"):
            for port in PUBLISHED:
                body = await self.fetch(f"http://{net.address(h)}:{port}/")
                self.assertIn("zwrm test image", body or "", (h, port))
            metrics = await self.fetch(f"http://{net.address(h)}:{METRICS}/metrics")
            self.assertIn("zwrm", metrics or "", f"{h}'s agent endpoint from outside")

        res = guest.probe_results(await other_probe)
        phase("other's probe done")
        want = {t[0]: "blocked" for t in targets}
        want.update({k: "reached" for k in want if k.startswith(("web-open-", "gw1-dns",
                                                                   "gw2-dns"))})
        self.assertEqual(res, want)

        # A client keeps getting answers through a2's port while host a1 is drained (its
        # web replica moves to a2), then through a1's port while one
        # replica is killed.  Failed requests are counted: goal zero.
        hosts = {h["name"]: h["id"] for h in json.loads(await self.cli("host", "list", "--json"))}

        await self.cli("destroy", "other")  # a2 has room for both web replicas only
        phase("other destroyed")

        async def drain():
            out = await self.cli("host", "drain", hosts["a1"], "--min-healthy", "2s",
                                 "--healthy-deadline", "6m", "--deadline", "12m", "--json")
            phase("drain completed")
            self.assertEqual(json.loads(out)["state"], "completed", out)

            async def moved():
                ms = await self.machines("web")
                return (len(ms) == 2 and all(m["host_id"] == hosts["a2"] for m in ms)
                        and all(m["health"] == "passing" for m in ms) and ms)

            return await poll(reactor, moved, 600, 2, "web drained to a2")

        results, ms = await self.under_load(net.address("a2"), drain)
        phase(f"a1 drained under load: {results}")
        self.assertEqual(results["failed"], 0, results)
        self.assertGreater(results["ok"], 10, results)

        async def kill():
            victim = ms[0]
            with open(_pidfile(root, victim["id"])) as f:
                os.kill(int(f.read().strip()), signal.SIGKILL)

            async def gone():
                m = [x for x in await self.machines("web") if x["id"] == victim["id"]]
                return not m or m[0]["state"] != "running" or m[0]["health"] != "passing"

            await poll(reactor, gone, 60, 1, "the killed replica noticed")

        results, _ = await self.under_load(net.address("a1"), kill)
        phase(f"a replica killed under load: {results}")
        self.assertEqual(results["failed"], 0, results)

    async def under_load(self, address, action, after=6):
        """
        Requests to C{address}, to each published port in turn, in a loop while C{action()}
        runs, and C{after} more.
        """
        results = {"ok": 0, "failed": 0}
        stop = []

        async def load():
            n = 0
            while not stop:
                n += 1
                port = PUBLISHED[n % len(PUBLISHED)]
                body = await self.fetch(f"http://{address}:{port}/", timeout=10)
                results["ok" if body and "zwrm test image" in body else "failed"] += 1
                await deferLater(reactor, 0.2, lambda: None)

        loop = ensureDeferred(load())
        try:
            await poll(reactor, lambda: results["ok"] >= 3, 60, 0.5, "requests before")
            out = await action()
            before = results["ok"]
            await poll(reactor, lambda: results["ok"] >= before + after, 120, 0.5,
                       "requests after")
        finally:
            stop.append(True)
            await loop
        return dict(results), out

    async def console_until(self, mid, text, timeout):
        """Machine C{mid}'s console once it shows C{text} (one C{zwrm logs -f})."""
        from twisted.internet import protocol

        got = Deferred()

        class Follow(protocol.ProcessProtocol):
            data = b""

            def outReceived(self, d):
                self.data += d
                if text.encode() in self.data and not got.called:
                    got.callback(self.data.decode(errors="replace"))

            def processEnded(self, reason):
                if not got.called:
                    got.errback(AssertionError(f"{mid}'s console ended without {text!r}: "
                                               f"{self.data[-3000:]!r}"))

        p = Follow()
        argv = self.net.argv("client", ZWRM + ["logs", mid, "-f"])
        reactor.spawnProcess(p, argv[0], argv, env=dict(
            os.environ, ZWRM_API_URL=self.cp.url, ZWRM_TOKEN=self.cp.operator_token))
        got.addTimeout(timeout, reactor)
        try:
            return await got
        except Exception:
            print(f"{mid}'s console: {p.data[-3000:]!r}")
            raise
        finally:
            if p.transport.pid is not None:
                p.transport.signalProcess("KILL")

    async def fetch(self, url, timeout=5):
        try:
            return await _run_env(self.net, "client", ["curl", "-sS", "-m", str(timeout), url], {})
        except Exception:
            return None


def _end(p):
    p.terminate()
    p.wait(10)


def _pidfile(root, mid):
    for dirpath, _dirs, files in os.walk(root):
        if "qemu.pid" in files and os.path.basename(dirpath) == mid:
            return os.path.join(dirpath, "qemu.pid")
    raise AssertionError(f"no qemu.pid for {mid} under {root}")


async def _run_env(net, host, argv, env, check=True):
    from twisted.internet import protocol
    from twisted.internet.defer import Deferred

    class P(protocol.ProcessProtocol):
        def __init__(self):
            self.out, self.err, self.done = [], [], Deferred()

        def outReceived(self, d):
            self.out.append(d)

        def errReceived(self, d):
            self.err.append(d)

        def processEnded(self, reason):
            self.done.callback(reason.value.exitCode)

    p = P()
    full = net.argv(host, argv)
    reactor.spawnProcess(p, full[0], full, env=dict(os.environ, **env))
    timer = reactor.callLater(120, lambda: p.transport.signalProcess("KILL"))
    code = await p.done
    if timer.active():
        timer.cancel()
    out = b"".join(p.out).decode(errors="replace")
    if code and check:
        raise RuntimeError(f"{argv[-3:]} exited {code}: {b''.join(p.err).decode()[-500:]}"
                           f"{out[-1500:]}")
    return out
