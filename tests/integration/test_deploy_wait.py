"""
C{zwrm deploy --wait} follows a machine through the restart its policy gives it: a real
C{zwrm-control} and a real C{zwrm-agent}, the busybox test image under QEMU (TCG) with
C{zwrm.selftest=panic-once}: its kernel panics at its first boot (as a guest did on a loaded
host, "IO-APIC + timer doesn't work!") and boots the second time.  The deploy says the
failure in one line, with the kernel's own words from the console, waits through the
restart, and ends healthy; the agent's log has the console's last lines.
"""

import json

import pytest
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from zwrm.testing import image
from zwrm.testing.processes import run_cli, start_vm_cluster


@pytest.mark.qemu
class DeployWaitTests(TestCase):
    timeout = 600

    def test_a_machine_that_fails_once_at_boot_is_followed_to_healthy(self):
        return ensureDeferred(self._scenario())

    async def cli(self, cp, *args, timeout=60):
        code, out, err = await run_cli(reactor, list(args), cp.url, cp.operator_token,
                                       timeout=timeout)
        self.assertNotIn("Traceback", err)
        return code, out, err

    async def _scenario(self):
        cp, [agent] = await start_vm_cluster(reactor, self, agents=1)
        img = await deferToThread(image.build)
        code, _, err = await self.cli(
            cp, "images", "push", "demo:panic-once", "--kernel", img.kernel, "--initrd",
            img.initrd, "--cmdline", f"{img.cmdline} zwrm.selftest=panic-once", "--port",
            "8080", "-q")
        self.assertEqual(code, 0, err)
        await self.cli(cp, "apps", "create", "web")
        code, out, err = await self.cli(
            cp, "deploy", "web", "--image", "demo:panic-once", "--memory", "256", "--port", "8080",
            "--health-http", "/", "--health-grace", "240", "--volume", "data:16:/data",
            "--wait", "300", "--json", timeout=330)
        self.assertEqual(code, 0, err)
        (m,) = json.loads(out)["machines"]
        self.assertEqual((m["state"], m["health"], m["restarts"]), ("running", "passing", 1))
        self.assertRegex(
            err, rf"machine {m['id']} of web failed: the guest ended itself \(guest-reset\): "
                 r"Kernel panic - not syncing: sysrq triggered crash; restart 1 at "
                 r"\d\d:\d\d:\d\d UTC\n")
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        # It booted twice (one line per boot on its volume), the first time to panic.
        code, out, err = await self.cli(cp, "logs", m["id"])
        self.assertEqual(code, 0, err)
        self.assertIn("zwrm: selftest: panicking once", out)
        with open(agent.log_path) as f:
            agent_log = f.read()
        self.assertIn(f"machine {m['id']}: the guest ended itself (guest-reset): Kernel panic",
                      agent_log)
        self.assertIn("the last lines of its console:", agent_log)
