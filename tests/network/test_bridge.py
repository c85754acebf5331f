"""
Bridge networking and the overlay, with real guests on two hosts (network namespaces).

 - each VM gets its address from its host's subnet, through the kernel command line;
 - two VMs of one app on two hosts reach each other over the VXLAN overlay;
 - a VM of another app reaches neither of them;
 - no guest reaches its host's services (bridge address, management address, loopback),
   nor another host's management address; egress to an outside address works (NAT).
"""

import pytest
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.network import guest
from tests.network.cluster import TestCluster, probe_all_script
from zwrm.testing.processes import poll

SERVICE = 8999  # a service of each host namespace, on all its addresses


@pytest.mark.qemu
@pytest.mark.multihost
class BridgeOverlayTests(TestCase):
    timeout = 600

    async def test_overlay_isolation_and_egress(self):
        c = TestCluster(reactor, self)
        await c.build_image()
        for name in ("h1", "h2"):
            c.listen(name, SERVICE)
        h1, h2 = c.hosts["h1"], c.hosts["h2"]
        out = c.net.address("out")
        # a1 probes its peer a2 (same app, other host) until it answers.
        a1 = await c.start_vm("h1", "a1", "web", script=guest.probe_script(
            [("a2", "10.80.2.2", 8080)], tries=90))
        a2 = await c.start_vm("h2", "a2", "web")
        self.assertEqual((a1, a2), ("10.80.1.2", "10.80.2.2"))
        # b1, another app on h1, boots alongside them and tries everything at once when
        # the outside's service opens, which it is once both web VMs answer: so what it
        # finds blocked is up.
        targets = [("web-local", a1, 8080), ("web-remote", a2, 8080),
                   ("gateway", h1.gateway, SERVICE), ("own-host", h1.address, SERVICE),
                   ("other-gateway", h2.gateway, SERVICE), ("other-host", h2.address, SERVICE),
                   ("loopback-via-gw", "127.0.0.1", SERVICE),
                   ("outside", out, SERVICE)]
        await c.start_vm("h1", "b1", "other", script=probe_all_script(
            targets, after=(out, SERVICE)))

        async def up(host, addr):
            return b"zwrm test image" in ((await c.fetch(host, f"http://{addr}:8080/")) or "").encode()

        # Hosts reach their own VMs and, over the overlay, the other host's.
        try:
            await poll(reactor, lambda: up("h1", a1), 240, 1, "a1 from h1")
            await poll(reactor, lambda: up("h2", a2), 240, 1, "a2 from h2")
            await poll(reactor, lambda: up("h1", a2), 30, 1, "a2 from h1 over the overlay")
        except Exception:
            print((await c.console("a1"))[-1000:], (await c.console("a2"))[-1000:])
            raise
        c.listen("out", SERVICE)  # b1's signal

        async def probed(mid):
            return "zwrm-run: probe done" in await c.console(mid)

        await poll(reactor, lambda: probed("a1"), 120, 1, "a1's probe")
        self.assertEqual(guest.probe_results(await c.console("a1")), {"a2": "reached"},
                         (await c.console("a1"))[-1500:])
        await poll(reactor, lambda: probed("b1"), 240, 1, "b1's probe")
        console = await c.console("b1")
        self.assertEqual(guest.probe_results(console), {
            "web-local": "blocked", "web-remote": "blocked", "gateway": "blocked",
            "own-host": "blocked", "other-gateway": "blocked", "other-host": "blocked",
            "loopback-via-gw": "blocked", "outside": "reached"}, console[-2500:])
