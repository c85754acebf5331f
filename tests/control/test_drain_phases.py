"""
The phase list of a drain's migrations and the states of a drain are defined once
(L{zwrm.drain_phases}): the Automat machines, the runner's steps, the drains resource, the
CLI and docs/drain.md all agree with it.
"""

import os
import re

from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.control.test_resources import d, make_data
from zwrm import drain_phases, errors
from zwrm.cli import drain as cli_drain
from zwrm.control import drain, migration
from zwrm.control.resources import drains as drains_resource

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def serialized_states(cls):
    return {s.serialized for s in cls._machine._automaton.states()}


def doc_table(heading):
    """The first column (in backquotes) of the rows of the docs/drain.md table C{heading}."""
    with open(os.path.join(ROOT, "docs", "drain.md")) as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {heading} |"))
    names = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        m = re.match(r"\| `([a-z_]+)`", line)
        if m:
            names.append(m.group(1))
    return names


class PhaseListTests(SynchronousTestCase):
    def test_the_machines_have_exactly_these_states(self):
        self.assertEqual(serialized_states(migration.Migration),
                         set(drain_phases.MIGRATION_PHASES))
        self.assertEqual(serialized_states(migration.Drain), set(drain_phases.DRAIN_STATES))
        self.assertIs(migration.MIGRATION_PHASES, drain_phases.MIGRATION_PHASES)
        self.assertIs(migration.DRAIN_TERMINAL, drain_phases.DRAIN_TERMINAL)

    def test_every_phase_with_a_step_has_one_and_no_other_does(self):
        self.assertEqual(set(drain.STEPS), set(drain_phases.MIGRATION_STEPPED))
        for phase, name in drain.STEPS.items():
            self.assertTrue(callable(getattr(drain.Drains, name, None)), phase)
        steps = {n for n in dir(drain.Drains) if n.startswith("_step_")}
        self.assertEqual(steps, set(drain.STEPS.values()))

    def test_the_cli_stops_following_on_the_terminal_states(self):
        self.assertEqual(tuple(cli_drain.TERMINAL), drain_phases.DRAIN_TERMINAL)

    def test_the_resource_refuses_an_unknown_phase_or_state(self):
        self.assertIs(drains_resource.MIGRATION_PHASES, drain_phases.MIGRATION_PHASES)
        self.assertIs(drains_resource.DRAIN_STATES, drain_phases.DRAIN_STATES)

    def test_the_docs_list_every_phase_and_state(self):
        self.assertEqual(doc_table("drain state"), list(drain_phases.DRAIN_STATES))
        phases = list(dict.fromkeys(doc_table("phase")))
        self.assertEqual(sorted(phases), sorted(drain_phases.REPORTED_PHASES))
        stored = [p for p in doc_table("stored phase") if p != "terminal"]
        self.assertEqual(stored, ["planned", *drain_phases.MIGRATION_STEPPED])


class ResourcePhaseTests(TestCase):
    async def started(self):
        clock, store, data, published = await make_data(self)
        drain_row = {"id": "d1", "host_id": "h-src", "state": "running", "options": {},
                     "created_at": 0.0, "updated_at": 0.0}
        mg = {"id": "mg1", "drain_id": "d1", "machine_id": "m1", "source_host": "h-src",
              "target_host": "h-dst", "phase": "planned", "bytes_sent": 0, "bytes_total": 0,
              "error": None, "updated_at": 0.0, "detail": {}}
        await data.drains.add(drain_row, [mg])
        return data, published, drain_row, mg

    @d
    async def test_an_unknown_phase_or_state_is_refused_and_changes_nothing(self):
        data, published, drain_row, mg = await self.started()
        with self.assertRaises(errors.InvalidArgument):
            await data.drains.save_migration(mg, phase="flying")
        with self.assertRaises(errors.InvalidArgument):
            await data.drains.set_state(drain_row, "flying")
        self.assertEqual((await data.drains.migrations("d1"))[0]["phase"], "planned")
        self.assertEqual((await data.drains.get("d1"))["state"], "running")
        self.assertEqual([e["kind"] for _, e in published], ["started"])

    @d
    async def test_a_phase_entered_again_after_a_restart_is_announced(self):
        data, published, drain_row, mg = await self.started()
        await data.drains.save_migration(mg, phase="bulk_copying")
        await data.drains.save_migration(mg, phase="bulk_copying")  # nothing new
        await data.drains.save_migration(mg, phase="bulk_copying", reason="resumed")
        events = [e["payload"] for _, e in published if e["kind"] == "migration"]
        self.assertEqual([(p["old"], p["phase"], p["reason"]) for p in events],
                         [("planned", "bulk_copying", None),
                          ("bulk_copying", "bulk_copying", "resumed")])


class ImportTests(SynchronousTestCase):
    def test_the_drain_service_loads_no_agent_code(self):
        """It mints transfer tokens with L{zwrm.tokens}, not the agent's transfer module."""
        import json
        import subprocess
        import sys

        code = ("import json, sys, zwrm.control.drain\n"
                "print(json.dumps(sorted(m for m in sys.modules if m.startswith('zwrm'))))")
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                             text=True, timeout=120, cwd=ROOT)
        loaded = json.loads(out.stdout)
        self.assertIn("zwrm.tokens", loaded)
        self.assertEqual([m for m in loaded if m.startswith(("zwrm.agent", "zwrm.cli"))], [])
