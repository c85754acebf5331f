"""
A real operating-system image end to end: a Debian 12 cloud image (systemd, cloud-init,
openssh-server, a small HTTP service), built with mmdebstrap and cached by its recipe's hash
(L{zwrm.testing.debian}), pushed as kernel + initrd + qcow2 disk, deployed with a volume, an
SSH key and an environment variable through a real control plane and agent (QEMU under TCG).
The health check passes, cloud-init installed the key and mounted the volume where the spec
says (by its virtio serial), the environment is the spec's, data written over HTTP lands on
the volume, and C{zwrm destroy --volumes} leaves nothing on the hosts. Hostile qcow2 disks
are refused at push.

The same disk booting alone as a UEFI image (C{--firmware uefi}: OVMF, a variable store of the
machine's own, systemd-boot from the disk's EFI system partition), its network from the
cloud-init seed, SSH with the key, the console's login prompt, and a live drain to the other
host with the volume and the UEFI variables are the acceptance suite's
(tests/acceptance/test_60_debian_image.py): each Debian boot under TCG takes a minute or more,
so each is made once.
"""

import json
import os
import subprocess

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.drivers.test_diskimage import hostile_images
from zwrm.drivers.live import RESERVE_FILE
from zwrm.testing import debian
from zwrm.testing.processes import poll, run_cli, start_vm_cluster, temp_dir


@pytest.mark.qemu
class DebianImageTests(TestCase):
    timeout = 2700

    def test_debian_cloud_image(self):
        return ensureDeferred(self._scenario())

    async def cli(self, cp, *args, timeout=60, ok=True):
        code, out, err = await run_cli(reactor, list(args), cp.url, cp.operator_token,
                                       timeout=timeout)
        self.assertNotIn("Traceback", err)
        if ok:
            self.assertEqual(code, 0, f"zwrm {' '.join(args)} failed ({code}): {err}")
            return out
        return code, out, err

    async def get(self, port, path):
        r = await treq.get(f"http://127.0.0.1:{port}{path}", persistent=False)
        return r.code, await r.text()

    async def deployed(self, cp):
        out = await self.cli(cp, "deploy", "web", "--image", "deb:12", "--memory", "512",
                             "--port", "8080", "--health-http", "/", "--health-grace", "900",
                             "--health-interval", "5", "--volume", "data:64:/data",
                             "--ssh-key", self.key, "--env", "GREETING=hello zwrm",
                             "--wait", "1200", "--json", timeout=1260)
        [m] = json.loads(out)["machines"]
        self.assertEqual((m["state"], m["health"]), ("running", "passing"))
        return m

    async def _scenario(self):
        img = await deferToThread(debian.build)
        cp, agents = await start_vm_cluster(reactor, self, agents=1)
        tmp = temp_dir(self)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "zwrm-test",
                        "-f", os.path.join(tmp, "id")], check=True)
        self.key = os.path.join(tmp, "id.pub")
        with open(self.key) as f:
            pubkey = f.read().strip()

        # Hostile disks never get in.
        for case, path in hostile_images(os.path.join(tmp, "hostile")).items():
            if case in ("ok", "raw"):
                continue
            code, _, err = await self.cli(cp, "images", "push", f"evil:{case}", "--disk", path,
                                          "-q", ok=False)
            self.assertNotEqual(code, 0, case)
            self.assertIn("refused", err, case)
            self.assertEqual(len(err.strip().splitlines()), 1, err)

        await self.cli(cp, "images", "push", "deb:12", "--kernel", img.kernel, "--initrd",
                       img.initrd, "--disk", img.disk, "--cmdline", img.cmdline, "--port",
                       "8080", "-q", timeout=600)
        await self.cli(cp, "apps", "create", "web")
        m = await self.deployed(cp)
        port = m["host_port"]
        code, body = await self.get(port, "/")
        self.assertEqual(code, 200)
        self.assertIn("zwrm-web ok", body)
        self.assertIn(pubkey, (await self.get(port, "/keys"))[1])
        mounts = (await self.get(port, "/mounts"))[1]
        self.assertIn(" /data ext4 ", mounts)
        self.assertIn("/dev/vda2 / ext4", mounts)  # the root disk is the first disk
        self.assertIn('GREETING="hello zwrm"', (await self.get(port, "/env"))[1])
        await self.write(cp, m, port, "note.txt", b"kept across machines")

        out = await self.cli(cp, "destroy", "web", "--volumes", "--json", timeout=300)
        self.assertEqual(len(json.loads(out)["machines"]), 1)
        for agent in agents:
            machines_dir = os.path.join(agent.data_dir, "machines")
            leftovers = os.listdir(machines_dir) if os.path.isdir(machines_dir) else []
            # (the room the driver keeps for migration records stays)
            self.assertEqual([n for n in leftovers if n != RESERVE_FILE], [], agent.host_id)

    async def write(self, cp, m, port, name, body):
        """POST a file onto the volume (the service may still be settling: bounded retries)."""
        answers = []

        async def posted():
            try:
                r = await treq.post(f"http://127.0.0.1:{port}/data/{name}", body, timeout=30,
                                    persistent=False)
                answers.append((r.code, await r.text()))
            except Exception as e:
                answers.append(repr(e))
                return False
            return answers[-1] == (200, "ok\n")

        try:
            await poll(reactor, posted, 120, interval=2, what="a write onto the volume")
        except AssertionError:
            logs = await self.cli(cp, "logs", m["id"])
            self.fail(f"writing {name} failed: {answers[-3:]}; console:\n{logs[-3000:]}")
        got = await self.get(port, f"/data/{name}")
        self.assertEqual(got, (200, body.decode()))
