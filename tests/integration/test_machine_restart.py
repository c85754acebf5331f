"""
C{zwrm machines restart} for real (issue 21 item 1, the console's Restart): a real
C{zwrm-control} and one real C{zwrm-agent}, the busybox test image booted under QEMU (TCG)
with a volume; data written through the VM's HTTP service; the machine restarted through the
CLI: the same machine id on the same host, powered off by ACPI (graceful) and booted again
(the image logs one line per boot on its volume), its data still there, healthy again.
"""

import json

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from zwrm.testing.processes import poll, run_cli, start_vm_cluster


@pytest.mark.qemu
class MachineRestartTests(TestCase):
    timeout = 600

    def test_restart_in_place(self):
        return ensureDeferred(self._scenario())

    async def cli(self, cp, *args, timeout=60, code=0):
        got, out, err = await run_cli(reactor, list(args), cp.url, cp.operator_token,
                                      timeout=timeout)
        self.assertEqual(got, code, f"zwrm {' '.join(args)} gave {got}: {err}")
        self.assertNotIn("Traceback", err)
        return out if code == 0 else err

    async def _scenario(self):
        cp, _agents = await start_vm_cluster(reactor, self, agents=1)
        await self.cli(cp, "apps", "create", "web")
        out = await self.cli(
            cp, "deploy", "web", "--image", "demo:1", "--replicas", "1", "--memory", "256",
            "--port", "8080", "--health-http", "/", "--health-grace", "240",
            "--volume", "data:16:/data", "--wait", "300", "--json", timeout=330)
        (m,) = json.loads(out)["machines"]
        self.assertEqual((m["state"], m["health"]), ("running", "passing"))
        base = f"http://127.0.0.1:{m['host_port']}"
        r = await treq.post(f"{base}/cgi-bin/write?index.txt", b"kept across the restart")
        self.assertEqual(r.code, 200, await r.text())
        page = await (await treq.get(f"{base}/")).text()
        self.assertIn("boots: 1<", page)

        err = await self.cli(cp, "machines", "restart", "m-nosuch", code=1)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("m-nosuch", err)

        out = await self.cli(cp, "--timeout", "300", "machines", "restart", m["id"], "--json",
                             timeout=330)
        after = json.loads(out)
        self.assertEqual((after["id"], after["host_id"], after["state"]),
                         (m["id"], m["host_id"], "running"))
        self.assertEqual(after["volumes"], m["volumes"])
        status = json.loads(await self.cli(cp, "machines", "status", m["id"], "--json"))
        states = [e["payload"].get("state") for e in reversed(status["events"])
                  if e["kind"] == "state"]
        tail = states[len(states) - 1 - states[::-1].index("stopping"):]
        self.assertEqual(tail[0], "stopping")
        self.assertIn("stopped", tail)
        self.assertEqual(tail[-1], "running")

        async def healthy_again():
            s = json.loads(await self.cli(cp, "machines", "status", m["id"], "--json"))
            return s["health"] == "passing" and s.get("host_port")

        port = await poll(reactor, healthy_again, 300, 1.0, what="the machine healthy again")
        page = await (await treq.get(f"http://127.0.0.1:{port}/")).text()
        self.assertIn("kept across the restart", page)
        self.assertIn("boots: 2<", page)  # booted again, on the same volume
        machines = json.loads(await self.cli(cp, "machines", "list", "--json"))
        self.assertEqual([x["id"] for x in machines], [m["id"]])
