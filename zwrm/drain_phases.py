"""
The phases of a drain's migrations and the states of a drain, defined once.

The control plane's machines (L{zwrm.control.migration}), its runner (L{zwrm.control.drain}),
the drains resource (L{zwrm.control.resources.drains}), the CLI's drain-status rendering
(L{zwrm.cli.drain}) and docs/drain.md (checked by a test) all take them from here.  This
module imports nothing, so the CLI may import it without loading the control plane.
"""

MIGRATION_PHASES = (
    "planned", "live_preparing", "live_migrating", "switching_over", "switched_over",
    "verifying",
    "bulk_copying", "stopping_source", "delta_copying", "starting_replacement",
    "waiting_healthy", "committing", "cleaning", "done", "rolling_back", "rolled_back",
    "not_moved", "failed",
)
"""Every phase a migration is stored in (the C{phase} column of C{migrations})."""

LIVE_PHASES = ("live_preparing", "live_migrating", "switching_over", "switched_over",
               "verifying")
"""The phases of a live move (docs/live-migration.md), before the common C{committing}."""

DRAIN_MODES = ("auto", "live", "cold")
"""How a drain may move machines with volumes (C{zwrm.host.drain}'s C{mode}): C{auto} is
live where both hosts can, else cold (and cold when a live attempt gives up)."""

MIGRATION_TERMINAL = ("done", "rolled_back", "not_moved", "failed")
"""Phases a migration never leaves."""

MIGRATION_STEPPED = tuple(p for p in MIGRATION_PHASES
                          if p not in MIGRATION_TERMINAL and p != "planned")
"""Phases whose step the runner runs (C{Drains._step_<phase>}), in the order of a move."""

MIGRATION_ERROR_PHASES = ("rolling_back", "failed", "not_moved")
"""Phases entered for a reason that is stored as the migration's C{error}."""

ROLLBACK_PENDING = "rollback_pending"
"""Not stored: what drain-status says of C{rolling_back} while the target is unreachable."""

REPORTED_PHASES = MIGRATION_PHASES + (ROLLBACK_PENDING,)
"""Every phase drain-status may report."""

DRAIN_STATES = ("running", "cancelling", "completed", "incomplete", "cancelled")
"""Every state a drain is stored in (the C{state} column of C{drains})."""

DRAIN_TERMINAL = ("completed", "incomplete", "cancelled")
"""States a drain ends in (the CLI stops following it)."""

__all__ = ["MIGRATION_PHASES", "LIVE_PHASES", "DRAIN_MODES", "MIGRATION_TERMINAL", "MIGRATION_STEPPED",
           "MIGRATION_ERROR_PHASES", "ROLLBACK_PENDING", "REPORTED_PHASES",
           "DRAIN_STATES", "DRAIN_TERMINAL"]
