#!/usr/bin/env python3
"""
Generate docs/state-machines/*.dot from zwrm's Automat machines, or check them.

    .venv/bin/python scripts/state_diagrams.py            # write every diagram
    .venv/bin/python scripts/state_diagrams.py --check    # exit 1 if one differs

Each diagram is made from the machine's own transition table (every state x input, with
its outputs), so it cannot drift from the code: tests/test_state_diagrams.py runs this
script with --check.  The output is plain DOT text, sorted, with no timestamps, so it is
the same on every machine and needs no graphviz; render it with `dot -Tsvg` if you like.

A self-loop whose outputs only do nothing or refuse (outputs named _nothing... or
_conflict...) is dashed: the input does not apply in that state.

To add a machine: append it to MACHINES (diagram name, "module:Class", the comment lines).
"""

import argparse
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "docs", "state-machines")

MACHINES = [
    ("host", "zwrm.control.host:Host",
     ["The Host machine (zwrm/control/host.py). Generated from its transitions",
      "by scripts/state_diagrams.py; do not edit.",
      "Dashed self-loops are explicit no-ops or Conflict errors."]),
    ("migration", "zwrm.control.migration:Migration",
     ["The Migration machine (zwrm/control/migration.py). Generated from its transitions",
      "by scripts/state_diagrams.py; do not edit.",
      "Dashed self-loops do nothing (the input does not apply in that state).",
      "Fencing (docs/drain.md): the step of waiting_healthy pauses while the target is",
      "unreachable; the step of rolling_back waits (rollback_pending) until the target",
      "confirms the replacement is gone before it starts the original again."]),
    ("drain", "zwrm.control.migration:Drain",
     ["The Drain machine (zwrm/control/migration.py). Generated from its transitions",
      "by scripts/state_diagrams.py; do not edit.",
      "Dashed self-loops do nothing (the input does not apply in that state)."]),
    ("runner", "zwrm.control.migration:Runner",
     ["The Runner machine (zwrm/control/migration.py): how zwrm/control/drain.py works",
      "through one migration's outbox (store the phase, then run its step). Generated",
      "from its transitions by scripts/state_diagrams.py; do not edit.",
      "Dashed self-loops do nothing (the input does not apply in that state)."]),
    ("agent_connection", "zwrm.agent.connection:ConnectionLife",
     ["The agent's connection to the control plane (zwrm/agent/connection.py). Generated",
      "from its transitions by scripts/state_diagrams.py; do not edit.",
      "Dashed self-loops do nothing (the input does not apply in that state)."]),
    ("send_attempts", "zwrm.agent.transfer.attempts:SendAttempts",
     ["The attempts of one volume stream on the sending side",
      "(zwrm/agent/transfer/attempts.py). Generated from its transitions by",
      "scripts/state_diagrams.py; do not edit.",
      "Dashed self-loops do nothing (the input does not apply in that state)."]),
]
"""(diagram name, "module:Class" with a MethodicalMachine in C{_machine}, comment lines)."""


def _name(symbol):
    return symbol.method.__name__


def _quiet(outputs):
    return all(o.startswith(("_nothing", "_conflict")) for o in outputs)


def transitions(cls):
    """
    The transitions of the Automat machine of C{cls} (its C{_machine}), as sorted tuples
    C{(state, input, new state, (outputs...))} of names.

    Automat keeps the table in the machine's automaton; C{automat-visualize} reads it there
    too.
    """
    automaton = cls._machine._automaton
    out = []
    for state, symbol, new, outputs in automaton.allTransitions():
        out.append((_name(state), _name(symbol), _name(new), tuple(_name(o) for o in outputs)))
    return sorted(out)


def dot(name, cls, comments):
    """The DOT text of the machine of C{cls}."""
    lines = [f"// {c}" for c in comments]
    lines.append(f"digraph {name} {{")
    lines.append("  rankdir=LR;")
    initial = _name(cls._machine._automaton.initialState)
    lines.append(f"  {initial} [shape=doublecircle];")
    for state, symbol, new, outputs in transitions(cls):
        label = f"{symbol} / {', '.join(outputs) or '-'}"
        style = " style=dashed" if state == new and _quiet(outputs) else ""
        lines.append(f'  {state} -> {new} [label="{label}"{style}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def load(spec):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def generate(machines=MACHINES):
    """Every diagram: C{{file name: DOT text}}."""
    return {f"{name}.dot": dot(name, load(spec), comments) for name, spec, comments in machines}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a checked-in diagram differs")
    parser.add_argument("--out", default=OUT, help="the directory of the diagrams")
    args = parser.parse_args(argv)
    stale = []
    for filename, text in generate().items():
        path = os.path.join(args.out, filename)
        try:
            with open(path) as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current == text:
            continue
        if args.check:
            stale.append(path)
        else:
            with open(path, "w") as f:
                f.write(text)
            print(f"wrote {path}")
    if stale:
        for path in stale:
            print(f"{path} differs from its machine; run scripts/state_diagrams.py",
                  file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
