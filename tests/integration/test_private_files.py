"""
Everything under the control plane's and the agent's data directories is private to their
user after a real deploy (issue 14, item 5): a real C{zwrm-control}, a real C{zwrm-agent}
and a QEMU (TCG) machine with a volume; then both trees are walked: every directory 0700,
every file (volume image, console log, machine spec and state, pid file, QMP socket, image
cache, store, keys, tokens) without any group or other permission bits.
"""

import json
import os
import stat

import pytest
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from zwrm.testing.processes import run_cli, start_vm_cluster


def loose(root):
    """C{[(path, mode)]} of what under C{root} (itself included) is not private."""
    found = []
    for directory, _dirs, files in os.walk(root):
        for path in [directory] + [os.path.join(directory, f) for f in files]:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode)
            if (stat.S_ISDIR(st.st_mode) and mode != 0o700) or mode & 0o077:
                found.append((os.path.relpath(path, os.path.dirname(root)), oct(mode)))
    return found


@pytest.mark.qemu
@pytest.mark.multihost
class PrivateFilesTests(TestCase):
    timeout = 420

    def test_data_directories_private_after_deploy(self):
        return ensureDeferred(self._scenario())

    async def cli(self, cp, *args, timeout=60):
        code, out, err = await run_cli(reactor, list(args), cp.url, cp.operator_token,
                                       timeout=timeout)
        self.assertEqual(code, 0, f"zwrm {' '.join(args)} failed ({code}): {err}")
        return out

    async def _scenario(self):
        cp, (agent,) = await start_vm_cluster(reactor, self, agents=1)
        await self.cli(cp, "apps", "create", "web")
        out = await self.cli(
            cp, "deploy", "web", "--image", "demo:1", "--replicas", "1", "--memory", "256",
            "--port", "8080", "--health-http", "/", "--health-grace", "240",
            "--volume", "data:16:/data", "--wait", "300", "--json", timeout=330)
        (machine,) = json.loads(out)["machines"]
        self.assertEqual(machine["state"], "running")
        names = {f for _d, _s, files in os.walk(agent.data_dir) for f in files}
        for expected in ("console.log", "spec.json", "qemu.pid", "host.json"):
            self.assertIn(expected, names)  # the walk sees what matters
        self.assertTrue(any(n.endswith(".img") for n in names), names)
        self.assertEqual(loose(cp.data_dir), [])
        self.assertEqual(loose(agent.data_dir), [])
        await self.cli(cp, "destroy", "web", "--volumes", timeout=120)
