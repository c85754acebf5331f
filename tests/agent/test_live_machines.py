"""
The live-migration machines of the agent (L{zwrm.agent.live.SourceMigration} and
L{TargetMigration}): every state x every input, against an owner that records what the
machine asks of it. The whole migration with real QEMU is tests/agent/test_live.py.
"""

import importlib.util
import os

from twisted.trial.unittest import SynchronousTestCase

from zwrm.agent.live import DIAGRAMS, SourceMigration, TargetMigration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def state_diagrams():
    spec = importlib.util.spec_from_file_location(
        "state_diagrams", os.path.join(ROOT, "scripts", "state_diagrams.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Owner:
    def __init__(self, cls):
        self.calls = []
        self.machine = cls(self)

    def __getattr__(self, name):
        if not name.startswith("_"):
            raise AttributeError(name)
        return lambda *args: self.calls.append(name.lstrip("_"))


SOURCE_INPUTS = {
    "mirrors_ready": lambda m: m.mirrors_ready(),
    "go": lambda m: m.go(),
    "pre_switchover": lambda m: m.pre_switchover(),
    "continued_ok": lambda m: m.continued_ok(),
    "switch_failed": lambda m: m.switch_failed("no"),
    "migration_completed": lambda m: m.migration_completed(),
    "failed": lambda m: m.failed("no"),
    "deadline": lambda m: m.deadline("late"),
    "go_postcopy": lambda m: m.go_postcopy(),
    "cancel": lambda m: m.cancel("asked"),
    "rollback_done": lambda m: m.rollback_done(),
}

SOURCE_PATHS = {
    "mirroring": [],
    "ready": ["mirrors_ready"],
    "migrating": ["mirrors_ready", "go"],
    "switching": ["mirrors_ready", "go", "pre_switchover"],
    "continued": ["mirrors_ready", "go", "pre_switchover", "continued_ok"],
    "completed": ["mirrors_ready", "go", "pre_switchover", "continued_ok",
                  "migration_completed"],
    "rolling_back": ["cancel"],
    "rolled_back": ["cancel", "rollback_done"],
    "uncertain": ["mirrors_ready", "go", "pre_switchover", "continued_ok", "failed"],
}

# state -> input -> (next state, the owner's calls)
SOURCE_TABLE = {
    "mirroring": {
        "mirrors_ready": ("ready", ["at_ready"]),
        "failed": ("rolling_back", ["rollback"]),
        "deadline": ("rolling_back", ["rollback"]),
        "cancel": ("rolling_back", ["rollback"]),
    },
    # In sync, waiting for the caller's go (its stored decision): nothing of the RAM sent.
    "ready": {
        "go": ("migrating", ["start_migration"]),
        "failed": ("rolling_back", ["rollback"]),
        "deadline": ("rolling_back", ["rollback"]),
        "cancel": ("rolling_back", ["rollback"]),
    },
    "migrating": {
        "pre_switchover": ("switching", ["switchover"]),
        "failed": ("rolling_back", ["rollback"]),
        "deadline": ("rolling_back", ["rollback"]),
        "go_postcopy": ("migrating", ["postcopy"]),
        "cancel": ("rolling_back", ["rollback"]),
    },
    "switching": {
        "continued_ok": ("continued", []),
        "switch_failed": ("rolling_back", ["rollback"]),
        "migration_completed": ("completed", ["finish"]),
        "failed": ("rolling_back", ["rollback"]),
    },
    "continued": {
        "migration_completed": ("completed", ["finish"]),
        "failed": ("uncertain", ["hold"]),
    },
    "completed": {},
    "rolling_back": {"rollback_done": ("rolled_back", ["fail"])},
    "rolled_back": {},
    "uncertain": {},
}

TARGET_INPUTS = {
    "migration_completed": lambda m: m.migration_completed(),
    "resume_done": lambda m: m.resume_done(),
    "resume_failed": lambda m: m.resume_failed("no"),
    "machine_ended": lambda m: m.machine_ended("killed"),
    "abort": lambda m: m.abort("asked"),
}

TARGET_PATHS = {
    "incoming": [],
    "resuming": ["migration_completed"],
    "resumed": ["migration_completed", "resume_done"],
    "stuck": ["migration_completed", "resume_failed"],
    "ended": ["machine_ended"],
}

TARGET_TABLE = {
    "incoming": {
        "migration_completed": ("resuming", ["resume"]),
        "machine_ended": ("ended", ["cleanup"]),
        "abort": ("ended", ["destroy"]),
    },
    "resuming": {
        "resume_done": ("resumed", ["resumed"]),
        "resume_failed": ("stuck", ["stuck"]),
    },
    "resumed": {},
    "stuck": {},
    "ended": {},
}


class TableTests(SynchronousTestCase):
    def check(self, cls, inputs, paths, table):
        for state, path in paths.items():
            for name, feed in inputs.items():
                owner = Owner(cls)
                for step in path:
                    inputs[step](owner.machine)
                self.assertEqual(owner.machine.state, state)
                owner.calls.clear()
                feed(owner.machine)
                want = table[state].get(name, (state, []))
                self.assertEqual((owner.machine.state, owner.calls), want,
                                 f"{state} x {name}")

    def test_source(self):
        self.assertEqual(sorted(SOURCE_PATHS), sorted(SOURCE_TABLE))
        self.check(SourceMigration, SOURCE_INPUTS, SOURCE_PATHS, SOURCE_TABLE)

    def test_target(self):
        self.check(TargetMigration, TARGET_INPUTS, TARGET_PATHS, TARGET_TABLE)


class DiagramTests(SynchronousTestCase):
    def test_the_checked_in_diagrams_are_the_machines(self):
        for filename, text in state_diagrams().generate(DIAGRAMS).items():
            path = os.path.join(ROOT, "docs", "state-machines", filename)
            with open(path) as f:
                self.assertEqual(f.read(), text, f"{path} differs: regenerate it with "
                                 "scripts/state_diagrams.py (zwrm.agent.live.DIAGRAMS)")
