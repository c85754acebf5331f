"""
The two state machines of a host drain (issue 7): L{Migration}, one per machine moved, and
L{Drain}, one per drain. Both are Automat machines whose every state handles every input;
their outputs never act: they append what is to be done to an outbox that the drain runner
(L{zwrm.control.drain}) works through one item at a time, storing each new phase before it
acts on it.

A migration's phases (the C{phase} column of the C{migrations} table)::

    planned --start_copy--> bulk_copying -> stopping_source -> delta_copying
            \\                                                      |
             --start_replacement--------------------> starting_replacement
                                                                    |
                                                  waiting_healthy <-'
                                                         |
                                                    committing -> cleaning -> done

    any phase before committing --step_failed--> rolling_back -> rolled_back
                                                              \\-> failed (rollback failed)
    planned --give_up / cancel--> not_moved

A live move (docs/live-migration.md) of a machine with volumes::

    planned --start_live--> live_preparing -> live_migrating -> switching_over
        -> switched_over -> verifying -> committing
    live_preparing, live_migrating, switching_over --fall_back--> bulk_copying (the cold
        path: the live attempt rolled back before the source continued; it runs on)
    live_preparing, live_migrating, switching_over --step_failed--> rolling_back
    live_migrating, switching_over, rolling_back --moved--> switched_over (the target
        holds the machine after all)
    switched_over, verifying --step_failed--> failed (the source is never resumed)

C{switching_over} is the stored decision to switch over, taken while the machine still
runs on the source (its mirrors in sync) and before the source's agent is told to go on:
so it is stored before the target can resume.  From it on, the control plane never
resumes the source by itself (docs/drain.md, "Live drains").

C{step_done} moves to the next phase; C{restart} (after a control-plane restart) runs the
stored phase's step again (every step is idempotent); C{cancel} (an undrain) stops a
migration that has not started, rolls back one that is still copying while its machine runs,
and lets one whose machine already stopped finish. Terminal phases ignore every input.
"""

from automat import MethodicalMachine

from zwrm.drain_phases import (  # the phase list, defined once
    DRAIN_STATES,
    DRAIN_TERMINAL,
    MIGRATION_PHASES,
    MIGRATION_TERMINAL,
)

MIGRATION_INPUTS = ("start_copy", "start_replacement", "start_live", "step_done",
                    "step_failed", "fall_back", "moved", "cancel", "give_up", "restart")

DRAIN_INPUTS = ("start", "migration_ended", "all_moved", "some_not_moved", "cancel",
                "deadline", "restart")


class Migration:
    """
    The life of one machine's move. Outputs append C{(action, phase, reason)} to
    C{outbox}: C{("enter", phase, reason)} (store the phase, then run its step) or
    C{("note", phase, reason)} (store the reason only).

    @ivar outbox: a list the runner empties.
    """

    _machine = MethodicalMachine()

    def __init__(self, outbox=None):
        self.outbox = [] if outbox is None else outbox

    @classmethod
    def restore(cls, phase, outbox=None):
        """A machine in the stored C{phase} (one of L{MIGRATION_PHASES})."""
        if phase not in MIGRATION_PHASES:
            raise ValueError(f"unknown migration phase {phase!r}")
        m = cls(outbox)
        m._restore(phase)
        return m

    @property
    def phase(self):
        return self._save()

    @_machine.serializer()
    def _save(self, state):
        return state

    @_machine.unserializer()
    def _restore(self, state):
        return state

    # -- inputs -------------------------------------------------------------------------

    @_machine.input()
    def start_copy(self):
        "Start moving a machine that has volumes: bulk copy while it runs."

    @_machine.input()
    def start_replacement(self):
        "Start moving a machine without volumes: the replacement first."

    @_machine.input()
    def start_live(self):
        "Start moving a machine that has volumes live (both hosts can)."

    @_machine.input()
    def step_done(self):
        "The current phase's step succeeded."

    @_machine.input()
    def fall_back(self, reason):
        "The live attempt gave up, rolled back (the machine runs on at the source): go cold."

    @_machine.input()
    def moved(self, reason):
        "The target holds the machine after all (it resumed there): never resume the source."

    @_machine.input()
    def step_failed(self, reason):
        "The current phase's step failed."

    @_machine.input()
    def cancel(self):
        "The drain was cancelled (undrain)."

    @_machine.input()
    def give_up(self, reason):
        "It will not be moved (no target, or the drain's deadline passed before it started)."

    @_machine.input()
    def restart(self):
        "The control plane restarted; act on the stored phase again."

    # -- states -------------------------------------------------------------------------

    @_machine.state(initial=True, serialized="planned")
    def planned(self):
        "Waiting for its turn."

    @_machine.state(serialized="live_preparing")
    def live_preparing(self):
        "The target prepares to receive the running machine (blank volumes, paused QEMU)."

    @_machine.state(serialized="live_migrating")
    def live_migrating(self):
        "The volumes are mirrored and the RAM migrated while the machine runs."

    @_machine.state(serialized="switching_over")
    def switching_over(self):
        "Decided and stored: the source migrates the RAM and switches over, by itself."

    @_machine.state(serialized="switched_over")
    def switched_over(self):
        "The target holds the machine; the source is paused for good."

    @_machine.state(serialized="verifying")
    def verifying(self):
        "The target's volumes are checked against the source's frozen images."

    @_machine.state(serialized="bulk_copying")
    def bulk_copying(self):
        "Its volumes are copied while it still runs."

    @_machine.state(serialized="stopping_source")
    def stopping_source(self):
        "The original is powered down (ACPI, then a hard stop)."

    @_machine.state(serialized="delta_copying")
    def delta_copying(self):
        "The blocks changed since the bulk copy are sent; the copy is verified and committed."

    @_machine.state(serialized="starting_replacement")
    def starting_replacement(self):
        "The replacement is started on the target."

    @_machine.state(serialized="waiting_healthy")
    def waiting_healthy(self):
        "Waiting for the replacement's health check to pass for the minimum time."

    @_machine.state(serialized="committing")
    def committing(self):
        "The machine and its volumes are recorded on the target."

    @_machine.state(serialized="cleaning")
    def cleaning(self):
        "The original and the source volumes are destroyed."

    @_machine.state(serialized="done")
    def done(self):
        "Moved."

    @_machine.state(serialized="rolling_back")
    def rolling_back(self):
        "The replacement and the partial copies are destroyed; the original runs again."

    @_machine.state(serialized="rolled_back")
    def rolled_back(self):
        "Not moved; the original runs on the source."

    @_machine.state(serialized="not_moved")
    def not_moved(self):
        "Never started (no target, deadline, undrain)."

    @_machine.state(serialized="failed")
    def failed(self):
        "The rollback failed too: the operator must look."

    # -- outputs ------------------------------------------------------------------------

    def _put(self, action, phase, reason=None):
        self.outbox.append((action, phase, reason))

    @_machine.output()
    def _nothing(self):
        pass

    @_machine.output()
    def _nothing_because(self, reason):
        pass

    @_machine.output()
    def _again(self):
        self._put("enter", self.phase, "resumed after a control-plane restart")

    @_machine.output()
    def _note_failure_after_commit(self, reason):
        self._put("note", "cleaning", f"cleanup failed (the move is committed): {reason}")

    @_machine.output()
    def _to_rolling_back_cancelled(self):
        self._put("enter", "rolling_back", "drain cancelled")

    @_machine.output()
    def _to_not_moved_cancelled(self):
        self._put("enter", "not_moved", "drain cancelled before it started")

    # One output per target phase, for inputs without and with a reason.
    def _enter(phase, _machine=_machine):  # noqa: N805 (class-body helper)
        def out(self):
            self._put("enter", phase)
        out.__name__ = f"_to_{phase}"
        return _machine.output()(out)

    def _enter_because(phase, _machine=_machine):  # noqa: N805
        def out(self, reason):
            self._put("enter", phase, reason)
        out.__name__ = f"_to_{phase}_because"
        return _machine.output()(out)

    _to_bulk = _enter("bulk_copying")
    _to_live_preparing = _enter("live_preparing")
    _to_live_migrating = _enter("live_migrating")
    _to_switching_over = _enter("switching_over")
    _to_switched_over = _enter("switched_over")
    _to_verifying = _enter("verifying")
    _to_bulk_because = _enter_because("bulk_copying")
    _to_switched_over_because = _enter_because("switched_over")
    _to_stopping = _enter("stopping_source")
    _to_delta = _enter("delta_copying")
    _to_starting = _enter("starting_replacement")
    _to_waiting = _enter("waiting_healthy")
    _to_committing = _enter("committing")
    _to_cleaning = _enter("cleaning")
    _to_done = _enter("done")
    _to_rolled_back = _enter("rolled_back")
    _to_rolling_back = _enter_because("rolling_back")
    _to_failed = _enter_because("failed")
    _to_not_moved = _enter_because("not_moved")
    _to_done_after_cleanup_failure = _enter_because("done")
    del _enter, _enter_because

    # -- transitions: every state x every input ----------------------------------------

    planned.upon(start_copy, enter=bulk_copying, outputs=[_to_bulk])
    planned.upon(start_replacement, enter=starting_replacement, outputs=[_to_starting])
    planned.upon(start_live, enter=live_preparing, outputs=[_to_live_preparing])
    planned.upon(step_done, enter=planned, outputs=[_nothing])
    planned.upon(step_failed, enter=planned, outputs=[_nothing_because])
    planned.upon(fall_back, enter=planned, outputs=[_nothing_because])
    planned.upon(moved, enter=planned, outputs=[_nothing_because])
    planned.upon(cancel, enter=not_moved, outputs=[_to_not_moved_cancelled])
    planned.upon(give_up, enter=not_moved, outputs=[_to_not_moved])
    planned.upon(restart, enter=planned, outputs=[_nothing])

    # In flight, before the commit: a failure rolls back (after the switchover of a live
    # move it fails: the source is never resumed); a restart runs the step again.  An
    # undrain rolls back a bulk copy and lets every other phase finish (a live move takes
    # seconds; one that falls back to cold during an undrain is rolled back instead).
    for _state, _next, _out, _on_cancel, _on_fail in (
        (live_preparing, live_migrating, _to_live_migrating, "finish", "rollback"),
        (live_migrating, switching_over, _to_switching_over, "finish", "rollback"),
        (switching_over, switched_over, _to_switched_over, "finish", "rollback"),
        (switched_over, verifying, _to_verifying, "finish", "fail"),
        (verifying, committing, _to_committing, "finish", "fail"),
        (bulk_copying, stopping_source, _to_stopping, "rollback", "rollback"),
        (stopping_source, delta_copying, _to_delta, "finish", "rollback"),
        (delta_copying, starting_replacement, _to_starting, "finish", "rollback"),
        (starting_replacement, waiting_healthy, _to_waiting, "finish", "rollback"),
        (waiting_healthy, committing, _to_committing, "finish", "rollback"),
        (committing, cleaning, _to_cleaning, "finish", "rollback"),
    ):
        _state.upon(start_copy, enter=_state, outputs=[_nothing])
        _state.upon(start_replacement, enter=_state, outputs=[_nothing])
        _state.upon(start_live, enter=_state, outputs=[_nothing])
        _state.upon(step_done, enter=_next, outputs=[_out])
        if _on_fail == "rollback":
            _state.upon(step_failed, enter=rolling_back, outputs=[_to_rolling_back])
        else:
            _state.upon(step_failed, enter=failed, outputs=[_to_failed])
        if _on_cancel == "rollback":
            _state.upon(cancel, enter=rolling_back, outputs=[_to_rolling_back_cancelled])
        else:
            _state.upon(cancel, enter=_state, outputs=[_nothing])
        if _state in (live_preparing, live_migrating, switching_over):
            _state.upon(fall_back, enter=bulk_copying, outputs=[_to_bulk_because])
        else:
            _state.upon(fall_back, enter=_state, outputs=[_nothing_because])
        if _state in (live_migrating, switching_over):
            _state.upon(moved, enter=switched_over, outputs=[_to_switched_over_because])
        else:
            _state.upon(moved, enter=_state, outputs=[_nothing_because])
        _state.upon(give_up, enter=_state, outputs=[_nothing_because])
        _state.upon(restart, enter=_state, outputs=[_again])

    # After the commit the machine has moved: a failed cleanup is noted, never rolled back.
    cleaning.upon(start_copy, enter=cleaning, outputs=[_nothing])
    cleaning.upon(start_replacement, enter=cleaning, outputs=[_nothing])
    cleaning.upon(start_live, enter=cleaning, outputs=[_nothing])
    cleaning.upon(fall_back, enter=cleaning, outputs=[_nothing_because])
    cleaning.upon(moved, enter=cleaning, outputs=[_nothing_because])
    cleaning.upon(step_done, enter=done, outputs=[_to_done])
    cleaning.upon(step_failed, enter=done, outputs=[_note_failure_after_commit,
                                                    _to_done_after_cleanup_failure])
    cleaning.upon(cancel, enter=cleaning, outputs=[_nothing])
    cleaning.upon(give_up, enter=cleaning, outputs=[_nothing_because])
    cleaning.upon(restart, enter=cleaning, outputs=[_again])

    rolling_back.upon(start_copy, enter=rolling_back, outputs=[_nothing])
    rolling_back.upon(start_replacement, enter=rolling_back, outputs=[_nothing])
    rolling_back.upon(start_live, enter=rolling_back, outputs=[_nothing])
    rolling_back.upon(fall_back, enter=rolling_back, outputs=[_nothing_because])
    # A live move's rollback found that the target resumed the machine: it moved.
    rolling_back.upon(moved, enter=switched_over, outputs=[_to_switched_over_because])
    rolling_back.upon(step_done, enter=rolled_back, outputs=[_to_rolled_back])
    rolling_back.upon(step_failed, enter=failed, outputs=[_to_failed])
    rolling_back.upon(cancel, enter=rolling_back, outputs=[_nothing])
    rolling_back.upon(give_up, enter=rolling_back, outputs=[_nothing_because])
    rolling_back.upon(restart, enter=rolling_back, outputs=[_again])

    for _state in (done, rolled_back, not_moved, failed):
        _state.upon(start_copy, enter=_state, outputs=[_nothing])
        _state.upon(start_replacement, enter=_state, outputs=[_nothing])
        _state.upon(start_live, enter=_state, outputs=[_nothing])
        _state.upon(step_done, enter=_state, outputs=[_nothing])
        _state.upon(step_failed, enter=_state, outputs=[_nothing_because])
        _state.upon(fall_back, enter=_state, outputs=[_nothing_because])
        _state.upon(moved, enter=_state, outputs=[_nothing_because])
        _state.upon(cancel, enter=_state, outputs=[_nothing])
        _state.upon(give_up, enter=_state, outputs=[_nothing_because])
        _state.upon(restart, enter=_state, outputs=[_nothing])
    del _state, _next, _out, _on_cancel, _on_fail


class Drain:
    """
    The life of one drain. Outputs append C{(action, state)} to C{outbox}:
    C{("launch", state)} (start migrations up to the parallel limit, or finish),
    C{("cancel_all", state)}, C{("expire", state)} (migrations not started are not moved),
    C{("enter", state)} (store the new state and act on the host: drained, ready, or left
    draining).
    """

    _machine = MethodicalMachine()

    def __init__(self, outbox=None):
        self.outbox = [] if outbox is None else outbox

    @classmethod
    def restore(cls, state, outbox=None):
        if state not in DRAIN_STATES:
            raise ValueError(f"unknown drain state {state!r}")
        d = cls(outbox)
        d._restore(state)
        return d

    @property
    def state(self):
        return self._save()

    @_machine.serializer()
    def _save(self, state):
        return state

    @_machine.unserializer()
    def _restore(self, state):
        return state

    @_machine.input()
    def start(self):
        "The plan is stored: go."

    @_machine.input()
    def migration_ended(self):
        "A migration reached a terminal phase."

    @_machine.input()
    def all_moved(self):
        "Every migration ended and every machine moved."

    @_machine.input()
    def some_not_moved(self):
        "Every migration ended; some machines did not move."

    @_machine.input()
    def cancel(self):
        "The operator undrained the host."

    @_machine.input()
    def deadline(self):
        "The drain's deadline passed."

    @_machine.input()
    def restart(self):
        "The control plane restarted."

    @_machine.state(initial=True, serialized="running")
    def running(self):
        "Migrations run, up to the parallel limit."

    @_machine.state(serialized="cancelling")
    def cancelling(self):
        "Undrained: nothing new starts; in-flight migrations finish or roll back."

    @_machine.state(serialized="completed")
    def completed(self):
        "Every machine moved: the host is drained."

    @_machine.state(serialized="incomplete")
    def incomplete(self):
        "Some machines did not move: the host stays draining."

    @_machine.state(serialized="cancelled")
    def cancelled(self):
        "Undrained: the host is ready again."

    def _put(self, action, state):
        self.outbox.append((action, state))

    @_machine.output()
    def _nothing(self):
        pass

    @_machine.output()
    def _launch(self):
        self._put("launch", "running")

    @_machine.output()
    def _check_cancelled(self):
        self._put("launch", "cancelling")

    @_machine.output()
    def _cancel_all(self):
        self._put("cancel_all", "cancelling")

    @_machine.output()
    def _expire(self):
        self._put("expire", "running")

    @_machine.output()
    def _to_completed(self):
        self._put("enter", "completed")

    @_machine.output()
    def _to_incomplete(self):
        self._put("enter", "incomplete")

    @_machine.output()
    def _to_cancelled(self):
        self._put("enter", "cancelled")

    @_machine.output()
    def _to_cancelling(self):
        self._put("enter", "cancelling")

    running.upon(start, enter=running, outputs=[_launch])
    running.upon(migration_ended, enter=running, outputs=[_launch])
    running.upon(all_moved, enter=completed, outputs=[_to_completed])
    running.upon(some_not_moved, enter=incomplete, outputs=[_to_incomplete])
    running.upon(cancel, enter=cancelling, outputs=[_to_cancelling, _cancel_all])
    running.upon(deadline, enter=running, outputs=[_expire, _launch])
    running.upon(restart, enter=running, outputs=[_launch])

    cancelling.upon(start, enter=cancelling, outputs=[_nothing])
    cancelling.upon(migration_ended, enter=cancelling, outputs=[_check_cancelled])
    cancelling.upon(all_moved, enter=cancelled, outputs=[_to_cancelled])
    cancelling.upon(some_not_moved, enter=cancelled, outputs=[_to_cancelled])
    cancelling.upon(cancel, enter=cancelling, outputs=[_nothing])
    cancelling.upon(deadline, enter=cancelling, outputs=[_nothing])
    cancelling.upon(restart, enter=cancelling, outputs=[_cancel_all, _check_cancelled])

    # An incomplete drain left the host draining: undrain returns it to ready.
    incomplete.upon(cancel, enter=cancelled, outputs=[_to_cancelled])
    for _state, _skip in ((completed, None), (incomplete, "cancel"), (cancelled, None)):
        for _name in ("start", "migration_ended", "all_moved", "some_not_moved", "cancel",
                      "deadline", "restart"):
            if _name != _skip:
                _state.upon(locals()[_name], enter=_state, outputs=[_nothing])
    del _state, _skip, _name


RUNNER_STATES = ("idle", "storing", "stepping", "stopped")
RUNNER_INPUTS = ("work", "stored_note", "stored_end", "stored_phase", "step_succeeded",
                 "step_failed", "step_cancelled", "stop")


class Runner:
    """
    How the drain runner (L{zwrm.control.drain}) works through one migration's outbox: one
    item at a time, it stores the item (a phase is stored, then announced), then runs the
    stored phase's step and feeds its result to the L{Migration}; once the control plane
    stops, nothing more is taken (the stored phase runs again at the next start).

    Each input returns, as its outputs' results, what the runner is to do now:
    C{["take"]} (take the next outbox item), C{["busy"]} (an item is under way: the loop
    acting on it takes the next one), C{["next"]}, C{["migration_ended"]} (tell the
    drain), C{["run_step"]}, C{["step_done"]} / C{["step_failed"]} (feed the migration),
    C{["cancel_step"]}, C{["halt"]} (stop acting), or C{[None]} (the input does not apply).
    A store that fails stops the runner too (nothing unstored is acted on; the stored
    phase runs again at the next start).  Not stored: a restarted control plane makes a
    new runner per migration.
    """

    _machine = MethodicalMachine()

    @property
    def state(self):
        return self._save()

    @_machine.serializer()
    def _save(self, state):
        return state

    @_machine.input()
    def work(self):
        "The outbox has an item to act on."

    @_machine.input()
    def stored_note(self):
        "A note (a cleanup that failed after the commit) was stored."

    @_machine.input()
    def stored_end(self):
        "A terminal phase was stored and announced."

    @_machine.input()
    def stored_phase(self):
        "A phase with a step was stored and announced."

    @_machine.input()
    def step_succeeded(self):
        "The phase's step returned."

    @_machine.input()
    def step_failed(self):
        "The phase's step raised."

    @_machine.input()
    def step_cancelled(self):
        "The phase's step was cancelled (the control plane stops)."

    @_machine.input()
    def stop(self):
        "The control plane stops."

    @_machine.state(initial=True, serialized="idle")
    def idle(self):
        "Nothing under way: the next outbox item may be taken."

    @_machine.state(serialized="storing")
    def storing(self):
        "An outbox item is being stored (a phase: stored, then announced)."

    @_machine.state(serialized="stepping")
    def stepping(self):
        "The stored phase's step runs."

    @_machine.state(serialized="stopped")
    def stopped(self):
        "The control plane stops: nothing more is taken or run."

    def _say(what, _machine=_machine):  # noqa: N805 (class-body helper)
        def out(self):
            return what
        out.__name__ = f"_{what}"
        return _machine.output()(out)

    _take = _say("take")
    _busy = _say("busy")
    _next = _say("next")
    _migration_ended = _say("migration_ended")
    _run_step = _say("run_step")
    _step_done = _say("step_done")
    _step_failed = _say("step_failed")
    _cancel_step = _say("cancel_step")
    _halt = _say("halt")
    del _say

    @_machine.output()
    def _nothing(self):
        return None

    idle.upon(work, enter=storing, outputs=[_take])
    storing.upon(work, enter=storing, outputs=[_busy])
    stepping.upon(work, enter=stepping, outputs=[_busy])
    storing.upon(stored_note, enter=idle, outputs=[_next])
    storing.upon(stored_end, enter=idle, outputs=[_migration_ended])
    storing.upon(stored_phase, enter=stepping, outputs=[_run_step])
    stepping.upon(step_succeeded, enter=idle, outputs=[_step_done])
    stepping.upon(step_failed, enter=idle, outputs=[_step_failed])
    stepping.upon(step_cancelled, enter=stopped, outputs=[_halt])
    idle.upon(stop, enter=stopped, outputs=[_halt])
    storing.upon(stop, enter=stopped, outputs=[_halt])
    stepping.upon(stop, enter=stopped, outputs=[_cancel_step])
    # Inputs that do not apply in a state: explicit no-ops.
    for _state, _names in (
        (idle, ("stored_note", "stored_end", "stored_phase", "step_succeeded", "step_failed",
                "step_cancelled")),
        (storing, ("step_succeeded", "step_failed", "step_cancelled")),
        (stepping, ("stored_note", "stored_end", "stored_phase")),
    ):
        for _name in _names:
            _state.upon(locals()[_name], enter=_state, outputs=[_nothing])
    for _name in RUNNER_INPUTS:
        stopped.upon(locals()[_name], enter=stopped, outputs=[_halt])
    del _state, _names, _name


__all__ = ["RUNNER_INPUTS", "RUNNER_STATES", "Runner", "DRAIN_INPUTS", "DRAIN_STATES", "DRAIN_TERMINAL", "MIGRATION_INPUTS",
           "MIGRATION_PHASES", "MIGRATION_TERMINAL", "Drain", "Migration"]
