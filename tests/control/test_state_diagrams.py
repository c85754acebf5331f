"""
The checked-in diagrams (docs/state-machines/*.dot) are what scripts/state_diagrams.py
generates from the Automat machines: the script runs as a real process with --check.
"""

import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "state_diagrams.py")
DIAGRAMS = os.path.join(ROOT, "docs", "state-machines")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


class DiagramTests(TestCase):
    def test_checked_in_diagrams_are_generated(self):
        result = run("--check")
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_a_diagram_that_differs_is_found_and_rewritten(self):
        out = tempfile.mkdtemp(prefix="zwrm-dot-")
        self.addCleanup(shutil.rmtree, out, True)
        shutil.copy(os.path.join(DIAGRAMS, "host.dot"), out)
        path = os.path.join(out, "host.dot")
        with open(path) as f:
            good = f.read()
        edited = good.replace("drain_requested / started_drain", "drain_requested / x")
        self.assertNotEqual(edited, good)
        with open(path, "w") as f:
            f.write(edited)
        result = run("--check", "--out", out)
        self.assertEqual(result.returncode, 1)
        self.assertIn("host.dot differs from its machine", result.stderr)
        self.assertEqual(run("--out", out).returncode, 0)
        with open(path) as f:
            self.assertEqual(f.read(), good)

    def test_every_transition_is_drawn(self):
        from zwrm.control.host import INPUTS, STATES

        with open(os.path.join(DIAGRAMS, "host.dot")) as f:
            edges = [line for line in f if "->" in line]
        # every state (offline split by the state it returns to) x every input
        self.assertEqual(len(edges), (len(STATES) - 1 + 3) * len(INPUTS))

    def test_the_drain_machines_are_drawn_with_every_transition(self):
        from zwrm.control.migration import (
            DRAIN_INPUTS,
            DRAIN_STATES,
            MIGRATION_INPUTS,
            MIGRATION_PHASES,
            RUNNER_INPUTS,
            RUNNER_STATES,
        )

        for name, states, inputs in (("migration", MIGRATION_PHASES, MIGRATION_INPUTS),
                                     ("drain", DRAIN_STATES, DRAIN_INPUTS),
                                     ("runner", RUNNER_STATES, RUNNER_INPUTS)):
            with open(os.path.join(DIAGRAMS, f"{name}.dot")) as f:
                edges = [line for line in f if "->" in line]
            self.assertEqual(len(edges), len(states) * len(inputs), name)
