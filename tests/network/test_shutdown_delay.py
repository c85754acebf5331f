"""
Connection draining on a planned stop, for real (issue 16 item 4): a control plane and two
agents with C{--network bridge} in their own network namespaces, a client in a fourth.  The
app's two replicas serve a slow endpoint (SLOW_SECONDS per request) on a published port;
requests are under way on both replicas when the app is scaled down to one.  The replica that goes leaves
the routes first and is stopped only after the app's C{shutdown_delay}, so every request
under way is answered: none fails.
"""

import json
import os
import shutil
import tempfile

import pytest
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.network import guest
from tests.network import test_cluster as cluster
from zwrm.testing.netns import TestNetwork
from zwrm.testing.processes import kill_machines_under, poll

SLOW = """mkdir -p /slow/cgi-bin
cat > /slow/cgi-bin/slow <<'EOF'
#!/bin/sh
[ -n "$QUERY_STRING" ] && echo "slow-start" > /dev/console
sleep "${QUERY_STRING:-0}"
echo "Content-Type: text/plain"
echo ""
echo "slow-ok"
EOF
chmod +x /slow/cgi-bin/slow
busybox httpd -p 8081 -h /slow
echo "slow ready"
"""
REQUESTS = 6
#: how long each request under way takes: longer than noticing that they all started
#: (a few CLI calls) and asking for the scale-down, so that they are still under way then
SLOW_SECONDS = 15
#: the app's shutdown_delay: longer than a request, so that every request under way ends
#: before its replica is stopped
DELAY = 20


@pytest.mark.qemu
@pytest.mark.multihost
class PlannedStopTests(TestCase):
    timeout = 900

    async def cli(self, *args, check=True):
        return await cluster._run_env(
            self.net, "client", cluster.ZWRM + list(args),
            {"ZWRM_API_URL": self.cp.url, "ZWRM_TOKEN": self.cp.operator_token}, check=check)

    async def machines(self):
        return json.loads(await self.cli("machines", "list", "--app", "web", "--json"))

    async def started(self, ms):
        n = 0
        for m in ms:
            n += (await self.cli("logs", m["id"], check=False) or "").count("slow-start")
        return n

    async def slow(self, address, seconds=SLOW_SECONDS):
        try:
            return await cluster._run_env(self.net, "client", [
                "curl", "-sS", "-m", "60", f"http://{address}:82/cgi-bin/slow?{seconds}"], {})
        except Exception as e:
            return f"failed: {e}"

    async def test_scale_down_lets_the_requests_under_way_finish(self):
        root = tempfile.mkdtemp(prefix="zwrm-stopdelay-", dir="/tmp")
        self.addCleanup(shutil.rmtree, root, True)
        self.addCleanup(kill_machines_under, root)
        img = await deferToThread(guest.build)
        self.net = net = TestNetwork(["cp", "a1", "a2", "client"])
        self.addCleanup(net.close)
        self.cp = cp = cluster._ControlPlane(net, os.path.join(root, "cp"))
        await cp.start()
        self.addCleanup(cp.stop)
        for h in ("a1", "a2"):
            a = cluster._Agent(net, h, os.path.join(root, h), cp.url, cp.join_token)
            await a.start()
            self.addCleanup(a.stop)

        async def ready():
            hosts = json.loads(await self.cli("host", "list", "--json"))
            return len([h for h in hosts if h["state"] == "ready"]) == 2

        await poll(reactor, ready, 60, 1, "two ready hosts")
        await self.cli("apps", "create", "web")
        await self.cli("deploy", "web", "--kernel", img.kernel, "--initrd", img.initrd,
                       "--memory", "96", "--port", "8080", "--health-http", "/",
                       "--health-interval", "1", "--health-grace", "240", "--replicas", "2",
                       "--publish", "82:8081", "--shutdown-delay", str(DELAY),
                       "--cmdline", f"{img.cmdline} {guest.script_arg(SLOW)}")

        async def passing():
            ms = await self.machines()
            return len([m for m in ms if m["health"] == "passing"]) == 2 and ms

        ms = await poll(reactor, passing, 400, 2, "two passing replicas")
        self.assertEqual(len({m["host_id"] for m in ms}), 2)
        address = net.address("a1")
        await poll(reactor, lambda: self._slow_ok(address), 120, 1, "the endpoint (at once)")
        # Requests under way on both replicas (the port's connections go round robin).
        requests = [ensureDeferred(self.slow(address)) for _ in range(REQUESTS)]
        await poll(reactor, lambda: self._started(ms, REQUESTS), 60, 0.5,
                   "every request under way")
        # They are still under way as the replica that goes leaves the routes (else this
        # would prove nothing).
        ended = [d.result for d in requests if d.called]
        self.assertEqual(ended, [], "requests that ended before the scale-down")
        out = await self.cli("scale", "web", "1", "--json")  # returns after the delay
        self.assertEqual(len(json.loads(out)["machines"]), 1)
        answers = [r for _, r in await DeferredList(requests)]
        self.assertEqual([a.strip() for a in answers], ["slow-ok"] * REQUESTS, answers)

    async def _slow_ok(self, address):
        return "slow-ok" in await self.slow(address, 0)

    async def _started(self, ms, n):
        return await self.started(ms) >= n
