"""
zwrm's main job, end to end: a real C{zwrm-control} and two real C{zwrm-agent} processes on
loopback; the test image pushed to the control plane's registry with C{zwrm images push};
an app with a volume deployed with C{zwrm deploy} as two QEMU (TCG) machines that the agents
pull, boot and health-check; data written through a VM's HTTP service; C{zwrm host list}
showing the allocation; C{zwrm destroy} cleaning up.
"""

import json

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from zwrm.testing.processes import host_list, poll, run_cli, start_vm_cluster


@pytest.mark.qemu
@pytest.mark.multihost
class DeployTests(TestCase):
    timeout = 420

    def test_push_deploy_write_destroy(self):
        return ensureDeferred(self._scenario())

    async def cli(self, cp, *args, timeout=60):
        code, out, err = await run_cli(reactor, list(args), cp.url, cp.operator_token,
                                       timeout=timeout)
        self.assertEqual(code, 0, f"zwrm {' '.join(args)} failed ({code}): {err}")
        self.assertNotIn("Traceback", err)
        return out

    async def _scenario(self):
        cp, agents = await start_vm_cluster(reactor, self)
        ids = sorted(a.host_id for a in agents)

        await self.cli(cp, "apps", "create", "web")
        out = await self.cli(
            cp, "deploy", "web", "--image", "demo:1", "--replicas", "2", "--memory", "256",
            "--port", "8080", "--health-http", "/", "--health-grace", "240",
            "--volume", "data:16:/data", "--wait", "300", "--json", timeout=330)
        app = json.loads(out)
        machines = app["machines"]
        self.assertEqual(sorted(m["host_id"] for m in machines), ids)  # spread
        self.assertEqual({(m["state"], m["health"]) for m in machines}, {("running", "passing")})
        self.assertEqual(sorted(v["host_id"] for v in app["volumes"]), ids)

        # Write through one VM's HTTP service onto its volume, read it back in its page.
        m = machines[0]
        base = f"http://127.0.0.1:{m['host_port']}"
        r = await treq.post(f"{base}/cgi-bin/write?index.txt", b"hello from zwrm")
        self.assertEqual(r.code, 200, await r.text())
        page = await (await treq.get(f"{base}/")).text()
        self.assertIn("hello from zwrm", page)

        hosts = {h["id"]: h for h in await host_list(reactor, cp)}
        for hid in ids:
            self.assertEqual(hosts[hid]["machines"], 1)
            self.assertEqual(hosts[hid]["alloc_vcpus"], 1)
            self.assertEqual(hosts[hid]["alloc_memory_mb"], 256)
        table = await self.cli(cp, "host", "list")
        self.assertIn("1/", table)

        # Each agent pulled the image (kernel, initrd) into its cache; heartbeats report it.
        async def cache_stats():
            status = json.loads(await self.cli(cp, "host", "status", ids[0], "--json"))
            return status["stats"].get("image_cache")

        cache = await poll(reactor, cache_stats, 30, what="image cache stats in host status")
        self.assertGreaterEqual(cache["misses"], 2)
        self.assertGreater(cache["size"], 1024 * 1024)
        text = await self.cli(cp, "host", "status", ids[0])
        self.assertIn("misses", text)

        logs = await self.cli(cp, "logs", m["id"])
        self.assertIn("zwrm: ready", logs)

        out = await self.cli(cp, "destroy", "web", "--volumes", "--json", timeout=120)
        gone = json.loads(out)
        self.assertEqual(len(gone["machines"]), 2)
        self.assertEqual(len(gone["volumes"]), 2)
        hosts = await host_list(reactor, cp)
        self.assertEqual([h["machines"] for h in hosts], [0, 0])
        self.assertEqual([h["alloc_vcpus"] for h in hosts], [0, 0])
