"""
Which part of zwrm may import which: the agent loads no server code (control plane, CLI, the
registry's server side), the CLI loads neither the agent nor the control plane. Each check
imports the part in a fresh interpreter and lists what got loaded.
"""

import json
import subprocess
import sys

from twisted.trial import unittest

_REGISTRY_SERVER = ("zwrm.registry.resource", "zwrm.registry.store", "zwrm.registry.auth",
                    "zwrm.registry.guard")


def _loaded(*modules):
    code = ("import importlib, json, sys\n"
            f"for m in {list(modules)!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(n for n in sys.modules if n.startswith('zwrm'))))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120)
    return json.loads(out.stdout)


def _offending(loaded, forbidden):
    return [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]


class LayerTests(unittest.TestCase):
    def test_agent_loads_no_server_code(self):
        loaded = _loaded("zwrm.agent.service", "zwrm.agent.runtime", "zwrm.agent.executor",
                         "zwrm.agent.images", "zwrm.agent.transfer")
        self.assertIn("zwrm.agent.images", loaded)
        self.assertEqual(
            _offending(loaded, ("zwrm.control", "zwrm.cli", "zwrm.wamp.router") + _REGISTRY_SERVER),
            [])

    def test_cli_loads_neither_agent_nor_control_plane(self):
        loaded = _loaded("zwrm.cli.main", "zwrm.cli.client", "zwrm.cli.apps", "zwrm.cli.host",
                         "zwrm.cli.drain", "zwrm.cli.tokens", "zwrm.cli.images",
                         "zwrm.cli.console")
        self.assertIn("zwrm.cli.client", loaded)
        self.assertEqual(_offending(loaded, ("zwrm.agent", "zwrm.control") + _REGISTRY_SERVER),
                         [])

    def test_shared_modules_load_no_part(self):
        loaded = _loaded("zwrm.tokens", "zwrm.endpoints", "zwrm.sparse", "zwrm.healthspec",
                         "zwrm.hostfacts", "zwrm.sockets")
        self.assertEqual(_offending(loaded, ("zwrm.agent", "zwrm.control", "zwrm.cli",
                                             "zwrm.registry")), [])

    def test_control_plane_loads_no_more_agent_code(self):
        """
        The control plane loads neither the CLI nor agent code beyond what it still imports
        from there: the guest MTU (zwrm.agent.network.addressing); the health spec's check
        comes from zwrm.healthspec (zwrm.control.appspec). Nothing may be added to that list.
        """
        loaded = _loaded("zwrm.control.service", "zwrm.control.tap")
        self.assertIn("zwrm.control.drain", loaded)
        known = {"zwrm.agent", "zwrm.agent.network", "zwrm.agent.network.addressing"}
        self.assertEqual(_offending(loaded, ("zwrm.cli",)), [])
        self.assertEqual(sorted(set(_offending(loaded, ("zwrm.agent",))) - known), [])
