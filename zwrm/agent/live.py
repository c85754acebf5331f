"""
Live migration on the agent: the procedures C{zwrm.agent.<host_id>.live.*} and the two
machines that drive a migration locally, by the hypervisor's events.

A live migration moves a running machine and its local volumes to another host with a pause
of milliseconds (docs/live-migration.md). The control plane (a later step: its drain) calls,
in order:

 1. source C{live.describe(machine_id)}: the volumes' sizes and the driver's facts;
 2. target C{live.prepare(machine_id, spec, volumes, source)}: blank volumes of those sizes,
    the machine started paused, waiting (L{zwrm.interfaces.ILiveMigration.start_incoming});
    answers where it listens. From then on the target's L{TargetMigration} waits for the
    incoming migration to complete, then stops its NBD server, starts the verification's
    dirty bitmap and resumes the guest, by itself;
 3. source C{live.migrate(machine_id, target_host, target, policy, hold=True)}, with
    progressive results: the source's L{SourceMigration} mirrors the volumes and answers
    once every mirror is in sync (C{ready}: the guest runs, its writes reach both copies);
    the caller stores its decision to switch over, then calls source
    C{live.switchover(machine_id)}: the RAM migration starts, and at C{pre-switchover}
    (the guest paused) the source completes the mirrors and continues, by itself: no
    control-plane round trip and no poll sits inside the pause. The result is the figures
    (the pause QEMU reports, the total time, ...). Without C{hold}, C{live.migrate} goes
    on at once and answers the figures;
 4. source C{live.hashes(volume_id, first, count, algorithm)} of its frozen image and target
    C{live.verify(machine_id, volume_id, hashes)}: every block where the target's volume
    differs from the source's frozen image must lie in the target's dirty bitmap. The block
    hash is BLAKE3 when both agents list it in C{live.facts}' C{verify_hashes}, else
    SHA-256 (agents before BLAKE3 know only that, and name none).

Convergence (C{policy}): the downtime limit (default 300 ms) is QEMU's; auto-converge (on by
default) lets QEMU slow the guest's CPUs only when it dirties memory faster than the link
(QEMU 7.2 accepts the capability only before the migration starts, so it is set from the
start and acts only when needed); past C{deadline} seconds of RAM migration the migration
switches to post-copy if C{postcopy} is allowed, else gives up: the migration and the
mirrors are cancelled and the source runs on, untouched. Any failure before the source
continues past C{pre-switchover} rolls back the same way. A failure after it (the stream
broke while the device state was sent) leaves the source paused and the outcome unknown
here: the caller asks the target (C{live.status}) whether it resumed, and only then cancels
(resumes) the source or destroys it.
"""

import json
import os

from autobahn import wamp
from autobahn.wamp.types import RegisterOptions
from automat import MethodicalMachine
from twisted.internet.defer import Deferred, ensureDeferred, fail, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger

from zwrm.agent.blockmap import (
    DEFAULT,
    PREFERRED,
    block_count,
    data_blocks,
    data_extents,
    file_blockmap,
    hole_hashes,
    read_block,
)
from zwrm.agent.executor import check_algorithm, driver_spec, free_port, validate_machine
from zwrm.agent.transfer.progress import ProgressThrottle
from zwrm.drivers.live import DOWNTIME_LIMIT_MS, MIRROR_SPEED, VERIFY_BLOCK
from zwrm.drivers.spec import check_id
from zwrm.errors import (
    Conflict,
    Corrupt,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    ZwrmError,
    disk_full,
)
from zwrm.files import write_atomically
from zwrm.interfaces import ILiveMigration
from zwrm.wamp.procedures import cancellable

log = Logger()

#: Bytes of each block hash C{live.hashes} returns (a truncated BLAKE3 or SHA-256).
HASH_BYTES = 16

#: The block hashes this agent's C{live.hashes} and C{live.verify} know, the fastest first
#: (C{live.facts}' C{verify_hashes}). An agent that does not list them knows only SHA-256
#: (L{DEFAULT}) and names no hash in its answers.
VERIFY_HASHES = PREFERRED

#: A migration's policy, with its defaults.
DEFAULT_POLICY = {
    "downtime_limit_ms": DOWNTIME_LIMIT_MS,  # QEMU's downtime limit
    "deadline": 120.0,  # seconds of RAM migration before post-copy or giving up
    "mirror_deadline": 600.0,  # seconds for every mirror to be in sync
    "stall_timeout": 60.0,  # seconds the mirror or the RAM migration may move nothing
    "auto_converge": True,  # QEMU may throttle the guest when it outpaces the link
    "postcopy": False,  # switch to post-copy at the deadline instead of giving up
    "mirror_speed": MIRROR_SPEED,  # bytes/s of the mirror until in sync
    "max_bandwidth": None,  # bytes/s of the RAM migration (QEMU's default if None)
    "switchover_timeout": 30.0,  # seconds the mirrors' final sync may take
    "ready_timeout": 300.0,  # with hold: seconds in sync waiting for live.switchover
}

#: How often the progress of a migration is read (outside the pause only).
PROGRESS_INTERVAL = 0.5


def check_policy(policy):
    """@return: the policy with defaults. @raise InvalidArgument: naming the bad key."""
    if policy is None:
        policy = {}
    if not isinstance(policy, dict):
        raise InvalidArgument("policy must be a dict")
    unknown = sorted(set(policy) - set(DEFAULT_POLICY))
    if unknown:
        raise InvalidArgument(f"unknown policy key(s): {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(DEFAULT_POLICY))}")
    out = dict(DEFAULT_POLICY, **policy)
    for key in ("downtime_limit_ms", "deadline", "mirror_deadline", "mirror_speed",
                "switchover_timeout", "max_bandwidth", "ready_timeout", "stall_timeout"):
        v = out[key]
        if v is None and key == "max_bandwidth":
            continue
        if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
            raise InvalidArgument(f"policy {key} must be a positive number, not {v!r}")
    for key in ("auto_converge", "postcopy"):
        if not isinstance(out[key], bool):
            raise InvalidArgument(f"policy {key} must be true or false")
    out["downtime_limit_ms"] = int(out["downtime_limit_ms"])
    out["mirror_speed"] = int(out["mirror_speed"])
    return out


# --- the machines ----------------------------------------------------------------------


class SourceMigration:
    """
    The source side of one live migration. Its outputs act through the owner's hooks
    (L{_Outgoing}); the owner feeds the hypervisor's events back as inputs, through the
    reactor (never from inside an output).

    C{mirroring} -> C{ready} (every mirror in sync: guest writes reach both copies; the
    machine runs) -> C{go} (the caller stored its decision to switch over; at once
    without C{hold}) -> C{migrating} (the RAM migration, RAM passes) -> C{switching}
    (C{pre-switchover}: the mirrors' final sync, then continue) -> C{completed}. Before
    the source continued, a failure, a cancel or giving up -> C{rolling_back} ->
    C{rolled_back} (the source runs on). After it, a failure -> C{uncertain} (the source
    stays paused: only the target knows whether it resumed).
    """

    _machine = MethodicalMachine()

    def __init__(self, owner):
        self._owner = owner

    @property
    def state(self):
        return self._save()

    @_machine.serializer()
    def _save(self, state):
        return state

    @_machine.state(initial=True, serialized="mirroring")
    def mirroring(self):
        "The volumes are copied into the target's exports; guest writes go to both."

    @_machine.state(serialized="ready")
    def ready(self):
        "Every mirror is in sync (guest writes reach both); waiting for the go to switch over."

    @_machine.state(serialized="migrating")
    def migrating(self):
        "The RAM migration runs (paused before its switchover); RAM passes."

    @_machine.state(serialized="switching")
    def switching(self):
        "Paused at pre-switchover: the mirrors' final sync, then the migration continues."

    @_machine.state(serialized="continued")
    def continued(self):
        "The source continued past pre-switchover: the device state goes to the target."

    @_machine.state(serialized="completed")
    def completed(self):
        "The migration completed: the source stays paused, the target holds the machine."

    @_machine.state(serialized="rolling_back")
    def rolling_back(self):
        "The migration and the mirrors are being cancelled; the source resumes."

    @_machine.state(serialized="rolled_back")
    def rolled_back(self):
        "The source runs on, untouched."

    @_machine.state(serialized="uncertain")
    def uncertain(self):
        "Failed after the source continued: it stays paused; the target decides."

    @_machine.input()
    def mirrors_ready(self):
        "Every mirror is in sync."

    @_machine.input()
    def go(self):
        "The caller decided the switchover (stored it): start the RAM migration."

    @_machine.input()
    def pre_switchover(self):
        "The migration paused before its switchover."

    @_machine.input()
    def continued_ok(self):
        "The mirrors completed and the migration continued."

    @_machine.input()
    def switch_failed(self, why):
        "A mirror's final sync failed, before the source continued."

    @_machine.input()
    def migration_completed(self):
        "QEMU says the migration completed."

    @_machine.input()
    def failed(self, why):
        "A step failed, a mirror or the migration failed, the target went away."

    @_machine.input()
    def deadline(self, why):
        "The deadline passed without post-copy to switch to: give up."

    @_machine.input()
    def go_postcopy(self):
        "The deadline passed and post-copy is allowed."

    @_machine.input()
    def cancel(self, why):
        "The caller cancels the migration."

    @_machine.input()
    def rollback_done(self):
        "The cancel finished; the source runs."

    @_machine.output()
    def _at_ready(self):
        self._owner._at_ready()

    @_machine.output()
    def _start_migration(self):
        self._owner._start_migration()

    @_machine.output()
    def _switchover(self):
        self._owner._switchover()

    @_machine.output()
    def _postcopy(self):
        self._owner._postcopy()

    @_machine.output()
    def _rollback(self, why):
        self._owner._rollback(why)

    @_machine.output()
    def _finish(self):
        self._owner._finish()

    @_machine.output()
    def _fail(self):
        self._owner._fail()

    @_machine.output()
    def _hold(self, why):
        self._owner._hold(why)

    @_machine.output()
    def _nothing(self):
        return None

    @_machine.output()
    def _nothing_why(self, why):
        return None

    mirroring.upon(mirrors_ready, enter=ready, outputs=[_at_ready])
    mirroring.upon(go, enter=mirroring, outputs=[_nothing])
    mirroring.upon(pre_switchover, enter=mirroring, outputs=[_nothing])
    mirroring.upon(continued_ok, enter=mirroring, outputs=[_nothing])
    mirroring.upon(switch_failed, enter=mirroring, outputs=[_nothing_why])
    mirroring.upon(migration_completed, enter=mirroring, outputs=[_nothing])
    mirroring.upon(failed, enter=rolling_back, outputs=[_rollback])
    mirroring.upon(deadline, enter=rolling_back, outputs=[_rollback])
    mirroring.upon(go_postcopy, enter=mirroring, outputs=[_nothing])
    mirroring.upon(cancel, enter=rolling_back, outputs=[_rollback])
    mirroring.upon(rollback_done, enter=mirroring, outputs=[_nothing])

    # In sync, the guest running: nothing sent of its RAM yet, so a failure, a cancel or
    # the end of the wait (policy ready_timeout) rolls back as freely as in mirroring.
    ready.upon(mirrors_ready, enter=ready, outputs=[_nothing])
    ready.upon(go, enter=migrating, outputs=[_start_migration])
    ready.upon(pre_switchover, enter=ready, outputs=[_nothing])
    ready.upon(continued_ok, enter=ready, outputs=[_nothing])
    ready.upon(switch_failed, enter=ready, outputs=[_nothing_why])
    ready.upon(migration_completed, enter=ready, outputs=[_nothing])
    ready.upon(failed, enter=rolling_back, outputs=[_rollback])
    ready.upon(deadline, enter=rolling_back, outputs=[_rollback])
    ready.upon(go_postcopy, enter=ready, outputs=[_nothing])
    ready.upon(cancel, enter=rolling_back, outputs=[_rollback])
    ready.upon(rollback_done, enter=ready, outputs=[_nothing])

    migrating.upon(mirrors_ready, enter=migrating, outputs=[_nothing])
    migrating.upon(go, enter=migrating, outputs=[_nothing])
    migrating.upon(pre_switchover, enter=switching, outputs=[_switchover])
    migrating.upon(continued_ok, enter=migrating, outputs=[_nothing])
    migrating.upon(switch_failed, enter=migrating, outputs=[_nothing_why])
    migrating.upon(migration_completed, enter=migrating, outputs=[_nothing])
    migrating.upon(failed, enter=rolling_back, outputs=[_rollback])
    migrating.upon(deadline, enter=rolling_back, outputs=[_rollback])
    migrating.upon(go_postcopy, enter=migrating, outputs=[_postcopy])
    migrating.upon(cancel, enter=rolling_back, outputs=[_rollback])
    migrating.upon(rollback_done, enter=migrating, outputs=[_nothing])

    # The pause: the switchover is under way; a cancel or the deadline waits for it.
    switching.upon(mirrors_ready, enter=switching, outputs=[_nothing])
    switching.upon(go, enter=switching, outputs=[_nothing])
    switching.upon(pre_switchover, enter=switching, outputs=[_nothing])
    switching.upon(continued_ok, enter=continued, outputs=[_nothing])
    switching.upon(switch_failed, enter=rolling_back, outputs=[_rollback])
    # QEMU may say "completed" before the continue's answer arrives.
    switching.upon(migration_completed, enter=completed, outputs=[_finish])
    switching.upon(failed, enter=rolling_back, outputs=[_rollback])
    switching.upon(deadline, enter=switching, outputs=[_nothing_why])
    switching.upon(go_postcopy, enter=switching, outputs=[_nothing])
    switching.upon(cancel, enter=switching, outputs=[_nothing_why])
    switching.upon(rollback_done, enter=switching, outputs=[_nothing])

    continued.upon(mirrors_ready, enter=continued, outputs=[_nothing])
    continued.upon(go, enter=continued, outputs=[_nothing])
    continued.upon(pre_switchover, enter=continued, outputs=[_nothing])
    continued.upon(continued_ok, enter=continued, outputs=[_nothing])
    continued.upon(switch_failed, enter=continued, outputs=[_nothing_why])
    continued.upon(migration_completed, enter=completed, outputs=[_finish])
    continued.upon(failed, enter=uncertain, outputs=[_hold])
    continued.upon(deadline, enter=continued, outputs=[_nothing_why])
    continued.upon(go_postcopy, enter=continued, outputs=[_nothing])
    continued.upon(cancel, enter=continued, outputs=[_nothing_why])
    continued.upon(rollback_done, enter=continued, outputs=[_nothing])

    for _state in (completed, rolled_back, uncertain):
        for _input in (mirrors_ready, go, pre_switchover, continued_ok, migration_completed,
                       go_postcopy, rollback_done):
            _state.upon(_input, enter=_state, outputs=[_nothing])
        for _input in (switch_failed, failed, deadline, cancel):
            _state.upon(_input, enter=_state, outputs=[_nothing_why])

    rolling_back.upon(mirrors_ready, enter=rolling_back, outputs=[_nothing])
    rolling_back.upon(go, enter=rolling_back, outputs=[_nothing])
    rolling_back.upon(pre_switchover, enter=rolling_back, outputs=[_nothing])
    rolling_back.upon(continued_ok, enter=rolling_back, outputs=[_nothing])
    rolling_back.upon(switch_failed, enter=rolling_back, outputs=[_nothing_why])
    rolling_back.upon(migration_completed, enter=rolling_back, outputs=[_nothing])
    rolling_back.upon(failed, enter=rolling_back, outputs=[_nothing_why])
    rolling_back.upon(deadline, enter=rolling_back, outputs=[_nothing_why])
    rolling_back.upon(go_postcopy, enter=rolling_back, outputs=[_nothing])
    rolling_back.upon(cancel, enter=rolling_back, outputs=[_nothing_why])
    rolling_back.upon(rollback_done, enter=rolled_back, outputs=[_fail])
    del _state, _input


class TargetMigration:
    """
    The target side of one live migration (owner: L{_Incoming}).

    C{incoming} -> C{resuming} (QEMU says the incoming migration completed: NBD server
    stopped, dirty bitmap started, C{cont}) -> C{resumed}. The machine ending first
    (the source cancelled, or it was killed) -> C{ended} (its blank volumes deleted);
    C{abort} -> C{ended} (destroyed first). A failed resume -> C{stuck} (paused; reported).
    """

    _machine = MethodicalMachine()

    def __init__(self, owner):
        self._owner = owner

    @property
    def state(self):
        return self._save()

    @_machine.serializer()
    def _save(self, state):
        return state

    @_machine.state(initial=True, serialized="incoming")
    def incoming(self):
        "Paused, receiving the volumes and the RAM."

    @_machine.state(serialized="resuming")
    def resuming(self):
        "The migration completed; the NBD server stops and the guest resumes."

    @_machine.state(serialized="resumed")
    def resumed(self):
        "The guest runs here."

    @_machine.state(serialized="stuck")
    def stuck(self):
        "The resume failed: the machine is paused here."

    @_machine.state(serialized="ended")
    def ended(self):
        "The machine ended before it resumed; its blank volumes are deleted."

    @_machine.input()
    def migration_completed(self):
        "QEMU says the incoming migration completed."

    @_machine.input()
    def resume_done(self):
        "The guest resumed."

    @_machine.input()
    def resume_failed(self, why):
        "The resume failed."

    @_machine.input()
    def machine_ended(self, why):
        "The machine's process ended."

    @_machine.input()
    def abort(self, why):
        "The caller gives up on this migration."

    @_machine.output()
    def _resume(self):
        self._owner._resume()

    @_machine.output()
    def _resumed(self):
        self._owner._resumed()

    @_machine.output()
    def _stuck(self, why):
        self._owner._stuck(why)

    @_machine.output()
    def _cleanup(self, why):
        self._owner._cleanup(why)

    @_machine.output()
    def _destroy(self, why):
        self._owner._destroy(why)

    @_machine.output()
    def _nothing(self):
        return None

    @_machine.output()
    def _nothing_why(self, why):
        return None

    incoming.upon(migration_completed, enter=resuming, outputs=[_resume])
    incoming.upon(resume_done, enter=incoming, outputs=[_nothing])
    incoming.upon(resume_failed, enter=incoming, outputs=[_nothing_why])
    incoming.upon(machine_ended, enter=ended, outputs=[_cleanup])
    incoming.upon(abort, enter=ended, outputs=[_destroy])

    resuming.upon(migration_completed, enter=resuming, outputs=[_nothing])
    resuming.upon(resume_done, enter=resumed, outputs=[_resumed])
    resuming.upon(resume_failed, enter=stuck, outputs=[_stuck])
    resuming.upon(machine_ended, enter=resuming, outputs=[_nothing_why])
    resuming.upon(abort, enter=resuming, outputs=[_nothing_why])

    for _state in (resumed, stuck, ended):
        _state.upon(migration_completed, enter=_state, outputs=[_nothing])
        _state.upon(resume_done, enter=_state, outputs=[_nothing])
        _state.upon(resume_failed, enter=_state, outputs=[_nothing_why])
        _state.upon(machine_ended, enter=_state, outputs=[_nothing_why])
        _state.upon(abort, enter=_state, outputs=[_nothing_why])
    del _state


#: The machines' diagrams (docs/state-machines/), in the form of
#: scripts/state_diagrams.py's MACHINES; tests/agent/test_live_machines.py checks them.
DIAGRAMS = [
    ("live_source", "zwrm.agent.live:SourceMigration",
     ["The source side of a live migration (zwrm/agent/live.py). Generated from its",
      "transitions by scripts/state_diagrams.py; do not edit.",
      "Dashed self-loops do nothing (the input does not apply in that state)."]),
    ("live_target", "zwrm.agent.live:TargetMigration",
     ["The target side of a live migration (zwrm/agent/live.py). Generated from its",
      "transitions by scripts/state_diagrams.py; do not edit.",
      "Dashed self-loops do nothing (the input does not apply in that state)."]),
]


# --- the owners ------------------------------------------------------------------------


class _Outgoing:
    """One migration from this host: runs a L{SourceMigration}."""

    def __init__(self, live, machine_id, target_host, target, policy, announce, hold=False):
        self.live = live
        #: Wait at C{ready} for L{go} (the caller's stored decision to switch over).
        self.hold = hold
        self.reactor = live.reactor
        self.driver = live.driver
        self.machine_id = machine_id
        self.target_host = target_host
        self.target = target
        self.policy = policy
        self.machine = SourceMigration(self)
        #: C{("ok", figures)} or C{("error", exception)} once it ended.
        self.outcome = None
        self._outcome_waiters = []
        #: What C{live.migrate} with C{hold} answers once every mirror is in sync.
        self.ready_doc = None
        self._ready_waiters = []
        self.why = None
        self.started_at = self.reactor.seconds()
        self.ready_at = None
        self.ram_started_at = None
        self.paused_at = None
        self.postcopy = False
        self.ready = set()
        self.jobs = set()
        self.progress = {"machine_id": machine_id, "phase": "mirroring",
                         "mirror": {"done": 0, "total": 0, "rate": 0.0},
                         "ram": {"transferred": 0, "remaining": 0, "total": 0, "mbps": 0.0,
                                 "passes": 0},
                         "elapsed": 0.0, "finished": False}
        self._last_mirror = None
        # (when, bytes, phase) of the last reading in which the migration had moved more
        self._progressed = None
        self._throttle = ProgressThrottle(self.reactor, announce) if announce else None
        self._timers = []
        self._watchers = []
        self._poll = None
        self._unsubscribe = None
        self._unsubscribe_status = None
        self._tls = None

    # -- plumbing --

    def _soon(self, f, *args):
        """Feed an input later, never from inside an output (the eventual queue)."""
        self.reactor.callLater(0, f, *args)

    def _timer(self, delay, f, *args):
        call = self.reactor.callLater(delay, f, *args)
        self._timers.append(call)
        return call

    def _stop_timers(self):
        for call in self._timers:
            if call.active():
                call.cancel()
        self._timers = []

    def _stop_polling(self):
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None

    def _phase(self, phase):
        self.progress["phase"] = phase
        self._announce()

    def _announce(self):
        self.progress["elapsed"] = round(self.reactor.seconds() - self.started_at, 3)
        if self._throttle is not None:
            self._throttle.report(dict(self.progress))

    def status(self):
        return dict(self.progress, state=self.machine.state, why=self.why,
                    target=self.target_host)

    def follow(self, announce):
        """Announce the progress to C{announce} from now on (a new caller's channel)."""
        if self._throttle is not None:
            self._throttle.finish()
        self._throttle = ProgressThrottle(self.reactor, announce) if announce else None

    def wait_ready(self):
        """
        A Deferred firing with L{ready_doc} once every mirror is in sync (at once if so),
        or failing as the migration did if it ended before.
        """
        if self.ready_doc is not None:
            return succeed(dict(self.ready_doc))
        if self.outcome is not None:
            return self.wait_outcome()
        d = Deferred()
        self._ready_waiters.append(d)
        return d

    def wait_outcome(self):
        """A Deferred firing with the outcome: the figures, or the migration's error."""
        if self.outcome is not None:
            kind, value = self.outcome
            return succeed(dict(value)) if kind == "ok" else fail(value)
        d = Deferred()
        self._outcome_waiters.append(d)
        return d

    def _settle(self, kind, value):
        self.outcome = (kind, value)
        waiters = self._ready_waiters + self._outcome_waiters
        self._ready_waiters, self._outcome_waiters = [], []
        for d in waiters:
            if kind == "ok":
                d.callback(dict(value))
            else:
                d.errback(value)

    # -- start --

    def start(self):
        self._tls = self.live.tls_for(self.target_host)
        try:
            # The volumes' sizes: the mirror's total until QEMU's own figures are read.
            total = sum(self.live.describe(self.machine_id)["volumes"].values())
            self.progress["mirror"]["total"] = total
        except Exception:
            pass
        self._unsubscribe = self.driver.live_subscribe(self.machine_id, self._event)
        self._unsubscribe_status = self.driver.subscribe(self._machine_status)
        self._timer(self.policy["mirror_deadline"], self._soon, self.machine.deadline,
                    f"the mirrors were not in sync within {self.policy['mirror_deadline']} s")
        self._poll = LoopingCall(self._read_progress)
        self._poll.clock = self.reactor
        self._poll.start(PROGRESS_INTERVAL, now=False).addErrback(lambda f: None)
        self._announce()
        d = maybeDeferred(self.driver.start_mirror, self.machine_id, self.target, self._tls,
                          self.policy["mirror_speed"])
        d.addCallbacks(self._mirroring, lambda f: self._soon(self.machine.failed,
                                                             _message(f.value)))

    def _mirroring(self, started):
        self.jobs = set(started.get("jobs", ()))
        if self.jobs and self.jobs <= self.ready:
            self._soon(self.machine.mirrors_ready)

    def _event(self, name, data):
        if name == "BLOCK_JOB_READY":
            self.ready.add(data.get("device"))
            if self.jobs and self.jobs <= self.ready:
                self._soon(self.machine.mirrors_ready)
        elif name in ("BLOCK_JOB_ERROR", "BLOCK_JOB_CANCELLED") or (
                name == "BLOCK_JOB_COMPLETED" and data.get("error")):
            if self.machine.state in ("mirroring", "ready", "migrating"):
                self._soon(self.machine.failed,
                           f"mirror {data.get('device')}: {name} {data.get('error', '')}".strip())
        elif name == "MIGRATION_PASS":
            self.progress["ram"]["passes"] = data.get("pass", 0)
            self._announce()
        elif name == "MIGRATION":
            status = data.get("status")
            if status == "pre-switchover":
                # The guest is paused: from here to the continue, nothing but QMP commands.
                self.paused_at = self.reactor.seconds()
                self._stop_polling()
                self.machine.pre_switchover()
            elif status == "completed":
                self._soon(self.machine.migration_completed)
            elif status in ("failed", "cancelled"):
                self._soon(self.machine.failed, f"the migration {status}")
            elif status == "postcopy-active":
                self.postcopy = True

    def _machine_status(self, status):
        if status.get("id") == self.machine_id and status.get("state") != "running":
            self._soon(self.machine.failed, f"the machine {status.get('state')}: "
                                            f"{status.get('reason')}")

    def _read_progress(self):
        d = maybeDeferred(self.driver.migration_status, self.machine_id)

        def got(st):
            now = self.reactor.seconds()
            done = sum(m["offset"] for m in st["mirrors"])
            total = sum(m["len"] for m in st["mirrors"])
            if st["mirrors"]:
                rate = 0.0
                if self._last_mirror is not None and now > self._last_mirror[0]:
                    rate = (done - self._last_mirror[1]) / (now - self._last_mirror[0])
                self._last_mirror = (now, done)
                self.progress["mirror"] = {"done": done, "total": total,
                                           "rate": round(max(rate, 0.0), 1)}
            if st["migration"] not in ("none", "setup"):
                ram = st["ram"]
                self.progress["ram"] = {k: ram[k] for k in
                                        ("transferred", "remaining", "total", "mbps", "passes")}
            if st["mirrors"] and self.machine.state == "mirroring":
                self._stalled(now, done)
            elif self.machine.state == "migrating":
                self._stalled(now, (st["ram"] or {}).get("transferred") or 0)
            self._announce()

        return d.addCallbacks(got, lambda f: None)

    def _stalled(self, now, moved):
        """
        Give up on a migration that moved nothing for the policy's C{stall_timeout}
        seconds: the mirrors before they are in sync (C{moved}: the bytes they copied),
        or the RAM migration (the bytes it sent). A target that stops answering (its QEMU
        hung; a host gone from the network, until the connections' own timeouts) holds the
        guest's writes, which wait for the target (write-blocking), and the deadlines are
        minutes away. The rollback shuts the mirrors' connections down (the driver) and
        cancels the RAM migration, which frees them. Not in post-copy (the target runs).
        """
        phase = self.machine.state
        if phase not in ("mirroring", "migrating") or self.postcopy:
            self._progressed = None
            return
        if (self._progressed is None or self._progressed[2] != phase
                or moved > self._progressed[1]):
            self._progressed = (now, moved, phase)
        elif now - self._progressed[0] >= self.policy["stall_timeout"]:
            self._progressed = (now, moved, phase)
            what = "the mirrors copied" if phase == "mirroring" else "the RAM migration sent"
            self._soon(self.machine.failed,
                       f"{what} nothing for {self.policy['stall_timeout']:g} s "
                       "(the target stopped answering)")

    # -- outputs --

    def _at_ready(self):
        self.ready_at = self.reactor.seconds()
        self._stop_timers()
        # Every mirror is in sync: what is left is what the guest writes (to both).
        mirror = self.progress["mirror"]
        mirror["done"] = mirror["total"] = max(mirror["total"], mirror["done"])
        self._phase("ready")
        if not self.hold:
            self._soon(self.machine.go)
            return
        wait = self.policy["ready_timeout"]
        self._timer(wait, self.machine.deadline,
                    f"no switchover was asked within {wait} s of the mirrors being in sync")
        self.ready_doc = {"machine_id": self.machine_id, "target": self.target_host,
                          "ready": True, "mirror": dict(mirror),
                          "mirror_seconds": round(self.ready_at - self.started_at, 3),
                          "elapsed": round(self.ready_at - self.started_at, 3)}
        if self._throttle is not None:  # this answer ends the caller's progress
            self._throttle.finish(dict(self.progress))
            self._throttle = None
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(dict(self.ready_doc))

    def _start_migration(self):
        self.ram_started_at = self.reactor.seconds()
        self._stop_timers()
        self._phase("migrating")
        self._timer(self.policy["deadline"], self._at_deadline)
        p = self.policy
        d = maybeDeferred(self.driver.start_migration, self.machine_id, self.target, self._tls,
                          p["downtime_limit_ms"], p["auto_converge"], p["postcopy"],
                          p["max_bandwidth"])
        d.addErrback(lambda f: self._soon(self.machine.failed, _message(f.value)))

    def _at_deadline(self):
        if self.policy["postcopy"] and not self.postcopy:
            self.machine.go_postcopy()
        else:
            self.machine.deadline(f"the RAM migration did not converge within "
                                  f"{self.policy['deadline']} s (downtime limit "
                                  f"{self.policy['downtime_limit_ms']} ms)")

    def _postcopy(self):
        self.postcopy = True
        log.info("machine {id}: switching its migration to post-copy", id=self.machine_id)
        d = maybeDeferred(self.driver.start_postcopy, self.machine_id)
        d.addErrback(lambda f: self._soon(self.machine.failed, _message(f.value)))

    def _switchover(self):
        self.progress["phase"] = "switching"
        d = maybeDeferred(self.driver.complete_switchover, self.machine_id,
                          self.policy["switchover_timeout"])
        d.addCallbacks(lambda _: self._soon(self.machine.continued_ok),
                       lambda f: self._soon(self.machine.switch_failed, _message(f.value)))

    def _rollback(self, why):
        self.why = why
        self._stop_timers()
        self._stop_polling()
        self._phase("rolling_back")
        log.warn("machine {id}: live migration to {t} rolled back: {why}", id=self.machine_id,
                 t=self.target_host, why=why)
        d = maybeDeferred(self.driver.cancel_migration, self.machine_id)

        def failed(f):
            log.error("machine {id}: the rollback of its migration failed: {e}",
                      id=self.machine_id, e=_message(f.value))
            self.why = f"{why}; and the rollback failed: {_message(f.value)}"

        d.addErrback(failed)
        d.addBoth(lambda _: self._soon(self.machine.rollback_done))

    def when_done(self):
        """A Deferred firing with the outcome: C{completed}, C{rolled_back}, C{uncertain}."""
        d = Deferred()
        self._watchers.append(d)
        return d

    def _done(self, how):
        watchers, self._watchers = self._watchers, []
        for d in watchers:
            self.reactor.callLater(0, d.callback, how)
        self._stop_timers()
        self._stop_polling()
        for unsubscribe in (self._unsubscribe, self._unsubscribe_status):
            if unsubscribe is not None:
                unsubscribe()
        self.live._outgoing_done(self, how)

    def _finish(self):
        d = maybeDeferred(self.driver.migration_status, self.machine_id)

        def figures(st):
            self.progress["finished"] = True
            self.progress["phase"] = "completed"
            # Every mirror completed (its final sync at the switchover): all was copied.
            mirror = self.progress["mirror"]
            mirror["done"] = mirror["total"] = max(mirror["total"], mirror["done"])
            now = self.reactor.seconds()
            self.progress["ram"] = {k: st["ram"][k] for k in
                                    ("transferred", "remaining", "total", "mbps", "passes")}
            result = {"machine_id": self.machine_id, "target": self.target_host,
                      "downtime_ms": st["downtime_ms"], "total_ms": st["total_ms"],
                      "setup_ms": st["setup_ms"],
                      "elapsed": round(now - self.started_at, 3),
                      "mirror_seconds": round((self.ready_at or now) - self.started_at, 3),
                      "ram": self.progress["ram"], "mirror": self.progress["mirror"],
                      "postcopy": self.postcopy}
            if self._throttle is not None:
                self._throttle.finish(dict(self.progress))
            self._done("completed")
            self._settle("ok", result)

        def failed(f):
            self._done("completed")
            self._settle("ok", {"machine_id": self.machine_id, "target": self.target_host,
                                "downtime_ms": None, "note": _message(f.value)})

        d.addCallbacks(figures, failed)

    def _fail(self):
        self.progress["finished"] = True
        if self._throttle is not None:
            self._throttle.finish(dict(self.progress))
        self._done("rolled_back")
        try:
            state = self.driver.status(self.machine_id)["state"]
        except Exception:
            state = "gone"
        where = "the machine runs on here" if state == "running" else f"the machine is {state}"
        self._settle("error", Unavailable(
            f"machine {self.machine_id}: live migration to {self.target_host} rolled back "
            f"({self.why}); {where}"))

    def _hold(self, why):
        self.why = why
        self.progress["finished"] = True
        if self._throttle is not None:
            self._throttle.finish(dict(self.progress))
        self._done("uncertain")
        log.error("machine {id}: its migration to {t} failed after the switchover began "
                  "({why}); it stays paused here: ask {t} whether it resumed",
                  id=self.machine_id, t=self.target_host, why=why)
        self._settle("error", Conflict(
            f"machine {self.machine_id}: the migration to {self.target_host} failed after the "
            f"switchover began ({why}); the machine stays paused here: ask the target "
            "(live.status) whether it resumed before resuming (live.cancel) or destroying it"))


class _Incoming:
    """One migration to this host: runs a L{TargetMigration}."""

    def __init__(self, live, machine_id, source, volume_ids, digests, spec=None,
                 host_port=None, health=None):
        self.live = live
        #: the guest's health at the source (C{passing} or not): where its check here starts
        self.health = health
        #: The machine spec (as machine.start takes it) the executor adopts once it resumed.
        self.spec = spec
        self.host_port = host_port
        self.reactor = live.reactor
        self.driver = live.driver
        self.machine_id = machine_id
        self.source = source
        self.volume_ids = volume_ids
        self.digests = digests
        self.machine = TargetMigration(self)
        self.why = None
        self.resumed_at = None
        self.destroyed = None
        self._unsubscribe = []

    def watch(self):
        self._unsubscribe.append(self.driver.live_subscribe(self.machine_id, self._event))
        self._unsubscribe.append(self.driver.subscribe(self._status))

    def _event(self, name, data):
        if name == "MIGRATION" and data.get("status") == "completed":
            self.reactor.callLater(0, self.machine.migration_completed)

    def _status(self, status):
        if status.get("id") == self.machine_id and status.get("state") != "running":
            self.reactor.callLater(0, self.machine.machine_ended,
                                   status.get("reason") or status.get("state"))

    def status(self):
        return {"machine_id": self.machine_id, "state": self.machine.state, "why": self.why,
                "source": self.source}

    def _resume(self):
        d = maybeDeferred(self.driver.finish_incoming, self.machine_id)
        d.addCallbacks(lambda _: self.reactor.callLater(0, self.machine.resume_done),
                       lambda f: self.reactor.callLater(0, self.machine.resume_failed,
                                                        _message(f.value)))

    def _resumed(self):
        self.resumed_at = self.reactor.seconds()
        self._forget()
        self.live._incoming_resumed(self)
        log.info("machine {id}: resumed here after its live migration from {s}",
                 id=self.machine_id, s=self.source)

    def _stuck(self, why):
        self.why = why
        log.error("machine {id}: its incoming migration completed but it could not resume: "
                  "{why}", id=self.machine_id, why=why)

    def _forget(self):
        for u in self._unsubscribe:
            u()
        self._unsubscribe = []

    def _cleanup(self, why):
        self.why = why
        self._forget()
        self.live._incoming_ended(self)

    def _destroy(self, why):
        self.why = why
        self._forget()
        d = maybeDeferred(self.driver.destroy, self.machine_id)
        d.addErrback(lambda f: log.warn("machine {id}: destroy: {e}", id=self.machine_id,
                                        e=_message(f.value)))
        d.addBoth(lambda _: self.live._incoming_ended(self))
        self.destroyed = d


def _message(e):
    return e.message if isinstance(e, ZwrmError) else str(e)


# --- the procedures ------------------------------------------------------------------


class LiveMigrations:
    """
    The C{live.*} procedures of one agent (registered under C{zwrm.agent.<host_id>.}).

    @param reactor: the reactor.
    @param host_id: this host's id.
    @param driver: the hypervisor driver (an L{ILiveMigration} provider for live moves).
    @param volumes: the L{zwrm.agent.volumes.VolumeStore}.
    @param credentials: C{credentials()} -> the host's L{zwrm.pki.HostCredentials} or None.
    @param listen: C{listen()} -> the address the target's listeners use (the agent's
        advertised address: the one its volume endpoint uses).
    @param images: the image cache (C{resolve(ref, pin=True)}, C{unpin(digest)}) or None.
    @param state_dir: where each incoming migration is recorded (C{<machine id>.json}: its
        source, blank volumes and machine spec) until it resumed or ended, so that a new
        agent process can still cancel it and delete its copies, or resume and adopt it;
        C{None}: in memory only.
    @param executor: the agent's L{zwrm.agent.executor.Executor}, or C{None} (tests of the
        procedures alone). With it, a source machine is held by its migration
        (L{Executor.hold}: no health checks, no reports, given back if it rolls back), and
        a target machine given as a machine spec becomes the executor's own once it
        resumed (L{Executor.adopt}); its bridge networking (TAP) is made by
        C{live.prepare}.
    """

    def __init__(self, reactor, host_id, driver, volumes, credentials, listen, images=None,
                 state_dir=None, executor=None, threads=None):
        self.reactor = reactor
        #: C{threads(f, *args)} -> Deferred: writes and fsyncs the records of incoming
        #: migrations off the reactor thread; default: the reactor's thread pool
        self._threads = threads or (
            lambda f, *a: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a))
        self.executor = executor
        if executor is not None:
            executor.live = self
        self.host_id = host_id
        self.driver = driver
        self.volumes = volumes
        self.credentials = credentials
        self.listen = listen
        self.images = images
        self.outgoing = {}
        self.incoming = {}
        self.finished = {}  # machine id -> the last outcome (for live.status)
        self.ended = {}  # machine id -> its last outgoing migration (live.switchover again)
        self.state_dir = state_dir
        if state_dir is not None:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)

    def _record_path(self, machine_id):
        return os.path.join(self.state_dir, f"{machine_id}.json")

    async def _store(self, machine_id, doc):
        """
        Record C{doc} for C{machine_id} (written and fsynced in a thread).

        @raise ResourceExhausted: the disk is full. @raise Unavailable: it cannot be written.
        """
        if self.state_dir is None:
            return
        try:
            await self._threads(write_atomically, self._record_path(machine_id),
                                json.dumps(doc), True)
        except OSError as e:
            what = f"host {self.host_id} cannot record the incoming migration of {machine_id}"
            if disk_full(e):
                raise ResourceExhausted(f"{what}: the disk is full") from None
            raise Unavailable(f"{what}: {e.strerror or e}") from None

    def _forget_record(self, machine_id):
        if self.state_dir is not None:
            try:
                os.unlink(self._record_path(machine_id))
            except FileNotFoundError:
                pass

    def _stored(self, machine_id):
        if self.state_dir is None:
            return None
        try:
            with open(self._record_path(machine_id)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    # -- helpers --

    def _live_driver(self):
        if not ILiveMigration.providedBy(self.driver):
            raise Unavailable(f"host {self.host_id}: its driver ({self.driver.name}) cannot "
                              "migrate machines live")
        return self.driver

    def tls_for(self, peer):
        creds = self.credentials()
        if creds is None:
            raise Unavailable(f"host {self.host_id} has no host certificate yet: no live "
                              "migration without TLS")
        return {"ca": creds.ca_pem.decode(), "cert": creds.cert_pem.decode(),
                "key": creds.key_pem.decode(), "peer": peer}

    def _outgoing_done(self, out, how):
        self.outgoing.pop(out.machine_id, None)
        self.ended[out.machine_id] = out
        self.finished[out.machine_id] = dict(out.status(), role="source", state=how)
        if self.executor is None:
            return
        if how == "rolled_back":
            self.executor.release(out.machine_id, f"its live migration to {out.target_host} "
                                                  f"was rolled back ({out.why}); it runs here")
        elif how == "completed":
            self.executor.migrated(out.machine_id, out.target_host)
        # uncertain: held, paused, until the caller cancels (resumes) or destroys it

    def receiving(self, machine_id):
        """Whether a machine of that id is arriving here and has not resumed yet."""
        if machine_id in self.incoming:
            return self.incoming[machine_id].machine.state in ("incoming", "resuming", "stuck")
        record = self._stored(machine_id)
        return record is not None and record.get("role") == "target"

    def _incoming_resumed(self, inc):
        # The machine is this host's now: no longer a migration (its volumes stay claimed).
        self.incoming.pop(inc.machine_id, None)
        self.finished[inc.machine_id] = dict(inc.status(), state="resumed", role="target")
        self._adopt(inc.machine_id, inc.spec, inc.host_port, inc.digests, health=inc.health)
        self._forget_record(inc.machine_id)

    def _adopt(self, machine_id, spec, host_port, digests, restore_network=False,
               health=None):
        """The executor takes the resumed machine as its own (its pins with it)."""
        if self.executor is None or spec is None:
            return None
        d = self.executor.adopt(dict(spec, id=machine_id), host_port, digests,
                                restore_network=restore_network,
                                reason="running here after a live migration", health=health)

        def failed(f):
            log.error("machine {id}: resumed here after its live migration, but the executor "
                      "could not adopt it: {e}", id=machine_id, e=_message(f.value))
            return None

        return d.addErrback(failed)

    def target_state(self, machine_id):
        """The state of the latest migration of C{machine_id} to this host, or C{None}."""
        inc = self.incoming.get(machine_id)
        if inc is not None:
            return inc.machine.state
        return (self.finished.get(machine_id) or {}).get("state")

    def _incoming_ended(self, inc):
        self.incoming.pop(inc.machine_id, None)
        self.finished[inc.machine_id] = dict(inc.status(), role="target")
        self._forget_record(inc.machine_id)
        for vid in inc.volume_ids:
            self.volumes.release(vid, inc.machine_id)
            try:
                d = self.volumes.delete(vid, snapshots="keep")
            except Exception as e:
                log.warn("volume {v}: the blank copy of an incoming migration could not be "
                         "deleted: {e}", v=vid, e=_message(e))
            else:
                d.addErrback(lambda f, v=vid: log.warn(
                    "volume {v}: the deletion of the blank copy of an incoming migration "
                    "may not be on disk: {e}", v=v, e=_message(f.value)))
        if self.images is not None:
            for d in inc.digests:
                self.images.unpin(d)
        self._release_network(inc.machine_id, inc.spec)

    def _release_network(self, machine_id, spec):
        net = self.executor.network if self.executor is not None else None
        if net is None or spec is None or spec.get("network") is None:
            return
        ensureDeferred(net.release(machine_id)).addErrback(
            lambda f: log.warn("machine {id}: its network was not removed: {e}",
                               id=machine_id, e=f.getErrorMessage()))

    # -- procedures --

    @wamp.register("live.facts")
    @cancellable
    def facts(self):
        """
        @return: C{{"live": bool, "reason", "cpu_model", "machine_type", "accel",
            "network"}}: the driver's L{ILiveMigration.migration_facts} (C{live} false with a
            reason where the driver cannot migrate) and the agent's VM networking
            (C{"user"} or C{"bridge"}: a machine on the cluster network keeps its address
            across a live move), C{"prepare_health": True}: its C{live.prepare} takes
            the guest's C{health} (agents before it refuse the argument), C{"hold":
            True}: its C{live.migrate} takes C{hold} (agents before it refuse it; those
            since C{prepare_health} take it without saying so), and C{"verify_hashes"}:
            the block hashes its C{live.hashes} and C{live.verify} know (L{VERIFY_HASHES};
            agents before it know only C{"sha256"}).
        """
        network = "user"
        if self.executor is not None and self.executor.network is not None:
            network = "bridge"
        own = {"network": network, "prepare_health": True, "hold": True,
               "verify_hashes": list(VERIFY_HASHES)}
        if not ILiveMigration.providedBy(self.driver):
            return dict({"live": False, "reason": f"the {self.driver.name} driver cannot "
                         "migrate live", "cpu_model": None, "machine_type": None,
                         "accel": None}, **own)
        return dict(self.driver.migration_facts(), **own)

    @wamp.register("live.describe")
    @cancellable
    def describe(self, machine_id):
        """
        What a target needs to prepare for machine C{machine_id}: C{{"volumes": {volume id:
        size in bytes}, "facts": ...}}.

        @raise NotFound: no such machine here.
        """
        check_id(machine_id)
        spec = self._driver_spec(machine_id)
        return {"volumes": {v["id"]: os.path.getsize(v["path"]) for v in spec["volumes"]},
                "facts": self.facts()}

    def _driver_spec(self, machine_id):
        status = self.driver.status(machine_id)  # NotFound for an unknown machine
        path = os.path.join(os.path.dirname(status["console"]), "spec.json")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            spec = getattr(self.driver, "host", None)
            if spec is not None:  # the fake driver keeps its specs in memory
                return spec.machines[machine_id]["spec"]
            raise NotFound(f"machine {machine_id}: its spec is not recorded") from None

    @wamp.register("live.prepare")
    @cancellable
    def prepare(self, machine_id, spec, volumes, source, postcopy=False, health=None):
        """
        Target: prepare to receive machine C{machine_id} live from host C{source}.

        @param spec: the machine spec as C{machine.start} takes it (C{{"image", "vcpus",
            "memory_mb", "volumes": [{"id", "mount", "size_mb"}], "service_port",
            "cloud_init", ...}}): the image is resolved here (pinned while the machine is
            being received), the service port forwarded from a free local port, as for a
            start. (Or a driver-level spec with local paths: tests.)
        @param volumes: C{{volume id: size in bytes}} (from the source's C{live.describe}).
        @param postcopy: accept a post-copy migration (the source's policy allows it).
        @param health: the guest's health where it runs (C{"passing"}, C{"starting"},
            C{"failing"}, C{"none"} or L{None}: not known): once it resumed here its health
            check starts from C{passing} if it was, so its routes do not drop it for the
            first checks here (L{zwrm.agent.health.HealthCheck}).
        @return: C{{"host", "nbd_port", "migration_port", "exports"}} for the source, and
            C{host_port}: where the machine's service port is forwarded here (or None).
        @raise Conflict: a volume is here already. @raise Unavailable: no live migration
            here (driver, no certificate).
        """
        return ensureDeferred(self._prepare(machine_id, spec, volumes, source, postcopy,
                                            health))

    async def _prepare(self, machine_id, spec, volumes, source, postcopy=False, health=None):
        check_id(machine_id)
        check_id(source, "source host id")
        if health not in (None, "passing", "starting", "failing", "none"):
            raise InvalidArgument("health must be passing, starting, failing, none or null, "
                                  f"not {health!r}")
        drv = self._live_driver()
        if not isinstance(spec, dict):
            raise InvalidArgument("spec must be a machine spec")
        if not isinstance(volumes, dict) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0
                for s in volumes.values()):
            raise InvalidArgument("volumes must map each volume id to its size in bytes")
        if machine_id in self.incoming:
            raise Conflict(f"machine {machine_id} is being received already")
        for vid in volumes:
            check_id(vid, "volume id")
            if self.volumes.exists(vid):
                raise Conflict(f"volume {vid} is on this host already")
        machine = None
        if "image" in spec:
            # The machine spec as machine.start takes it: built here as the executor does.
            machine = validate_machine(dict(spec, id=machine_id))
        listed = [v.get("id") for v in spec.get("volumes") or ()]
        if sorted(listed) != sorted(volumes):
            raise InvalidArgument("spec.volumes and volumes name different volumes")
        tls = self.tls_for(source)
        created, digests, networked, host_port, started = [], [], False, None, False
        try:
            if machine is not None:
                spec, digests, networked, host_port = await self._driver_spec_for(machine)
            vols = []
            for v in spec.get("volumes") or ():
                path = self.volumes.path(v["id"])
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.ftruncate(fd, volumes[v["id"]])
                finally:
                    os.close(fd)
                created.append(v["id"])
                self.volumes.claim(v["id"], machine_id)
                vols.append(dict(v, path=path))
            dspec = dict(spec, id=machine_id, volumes=vols)
            if not isinstance(postcopy, bool):
                raise InvalidArgument("postcopy must be true or false")
            where = await drv.start_incoming(dspec, self.listen(), tls, postcopy=postcopy)
            started = True
            forwards = dspec.get("forwards") or ()
            if host_port is None and forwards:
                host_port = forwards[0]["host"]
            await self._store(machine_id, {"role": "target", "source": source,
                                           "volumes": created, "machine": machine,
                                           "host_port": host_port, "digests": digests,
                                           "health": health})
        except BaseException:
            if started:
                # Not recorded, so not known to a restarted agent either: it goes now.
                try:
                    await maybeDeferred(drv.destroy, machine_id)
                except Exception as e:
                    log.warn("machine {id}: destroy of the unrecorded incoming machine: {e}",
                             id=machine_id, e=_message(e))
            if self.images is not None:
                for d in digests:
                    self.images.unpin(d)
            if networked:
                self._release_network(machine_id, machine)
            for vid in created:
                self.volumes.release(vid, machine_id)
                try:
                    os.unlink(self.volumes.path(vid))
                except OSError:
                    pass
            raise
        inc = _Incoming(self, machine_id, source, created, digests, machine, host_port, health)
        self.incoming[machine_id] = inc
        self.finished.pop(machine_id, None)
        inc.watch()
        return dict(where, host_port=host_port)

    async def _driver_spec_for(self, machine):
        """
        The driver spec of a machine spec (as C{machine.start} takes it), built by the
        executor's own L{zwrm.agent.executor.driver_spec}: the image resolved here (pinned),
        the volumes mounted by their virtio serial, the service port forwarded from a free
        local port, or, for a machine on the cluster network (bridge networking), its TAP
        made on this host's bridge first (the NIC in the spec: its MAC comes from its
        address, which the guest keeps) and its service port forwarded to its address.

        @return: C{(spec, image digests pinned, whether its network was made, host_port)}
            (where its service port is reached here, or None).
        """
        image, digests = machine["image"], []
        if not isinstance(image, dict):
            if self.images is None:
                raise InvalidArgument(f"image {image!r} is a reference, but this agent has no "
                                      "image cache")
            image = await self.images.resolve(image, pin=True)
            digests = list(image.get("digests", []))
        mid = machine["id"]
        net = None
        network = self.executor.network if self.executor is not None else None
        forwards, host_port = [], None
        try:
            if machine["network"] is not None and network is not None:
                net = await network.prepare(mid, machine["app"], machine["network"],
                                            machine["service_port"],
                                            bool(image.get("kernel")))
                host_port = net["host_port"]
            elif machine["service_port"] is not None:
                host_port = free_port()
                forwards.append({"guest": machine["service_port"], "host": host_port})
            volumes = [{"id": v["id"], "mount": v["mount"]} for v in machine["volumes"]]
            spec = driver_spec(mid, machine, image, volumes, forwards, net)
        except BaseException:
            if self.images is not None:
                for d in digests:
                    self.images.unpin(d)
            if net is not None:
                self._release_network(mid, machine)
            raise
        return spec, digests, net is not None, host_port

    @wamp.register("live.migrate", options=RegisterOptions(details_arg="details"))
    @cancellable
    def migrate(self, machine_id, target_host, target, policy=None, hold=False, details=None):
        """
        Source: move machine C{machine_id} live to host C{target_host}, whose
        C{live.prepare} answered C{target}.

        A caller that asks for progressive results is told how it goes (at most one every
        0.5 s, none during the pause): C{{"machine_id", "phase" (mirroring, ready,
        migrating, switching, rolling_back, completed), "mirror": {"done", "total",
        "rate"}, "ram": {"transferred", "remaining", "total", "mbps", "passes"},
        "elapsed", "finished"}}.

        @param policy: see L{DEFAULT_POLICY}.
        @param hold: answer once every mirror is in sync (C{{"ready": True, "mirror",
            "mirror_seconds", "elapsed"}}) and wait there, the machine running and its
            writes reaching both copies, for L{switchover} (the caller first stores its
            decision to switch over), L{cancel}, or C{policy["ready_timeout"]} (then it
            rolls back). Without it the RAM migration follows at once.
        @return: C{{"downtime_ms" (the pause QEMU reports), "total_ms", "setup_ms",
            "elapsed", "mirror_seconds", "ram", "mirror", "postcopy"}} once the migration
            completed (the source is then paused for good).
        @raise Unavailable: it was rolled back (the reason says why): the machine runs on
            here, untouched. @raise Conflict: it failed after the switchover began (see the
            module docstring), or a migration of it is under way (with C{hold}, to the same
            target and not yet told to switch over, the call follows that one instead).
        """
        try:
            check_id(machine_id)
            check_id(target_host, "target host id")
            policy = check_policy(policy)
            if not isinstance(hold, bool):
                raise InvalidArgument("hold must be true or false")
            self._live_driver()
            out = self.outgoing.get(machine_id)
            if (out is not None and hold and out.hold and out.target_host == target_host
                    and out.machine.state in ("mirroring", "ready")):
                # Asked again (the caller restarted before the switchover was decided):
                # the same migration, followed from here; nothing starts twice.
                out.follow(getattr(details, "progress", None))
                return out.wait_ready()
            if out is not None:
                raise Conflict(f"machine {machine_id} is being migrated already")
            last = self.finished.get(machine_id) or {}
            if last.get("role") == "source" and last.get("state") in ("completed",
                                                                       "uncertain"):
                # Paused for good (or until the target says whether it resumed): never
                # a second migration of it.
                raise Conflict(f"machine {machine_id}: its migration to "
                               f"{last.get('target')} {last['state']}; it stays paused "
                               "here")
            self.driver.status(machine_id)
            # From here the migration holds the machine: the executor neither checks nor
            # reports its health (it pauses at the switchover) until it is given back.
            held = self.executor is not None and self.executor.hold(
                machine_id, f"being moved live to {target_host}")
        except Exception as e:
            d = Deferred()
            d.errback(e)
            return d
        announce = getattr(details, "progress", None)
        out = _Outgoing(self, machine_id, target_host, target, policy, announce, hold)
        self.outgoing[machine_id] = out
        self.finished.pop(machine_id, None)
        self.ended.pop(machine_id, None)
        try:
            out.start()
            return out.wait_ready() if hold else out.wait_outcome()
        except Exception as e:
            self.outgoing.pop(machine_id, None)
            if held:
                self.executor.release(machine_id, f"its live migration did not start: "
                                                  f"{_message(e)}")
            raise

    @wamp.register("live.switchover", options=RegisterOptions(details_arg="details"))
    @cancellable
    def switchover(self, machine_id, details=None):
        """
        Source: go on with a migration that C{live.migrate(..., hold=True)} left in sync
        (the caller has stored its decision to switch over): the RAM migration, paused
        before its switchover, then the switchover, by the hypervisor's events as without
        C{hold}. Called again (the caller restarted), it starts nothing new: it follows the
        migration under way, or answers its outcome again.

        Progressive results as C{live.migrate}'s, from this call on.

        @return: C{live.migrate}'s figures once it completed (the source paused for good).
        @raise Unavailable: it was rolled back (before the source continued past its
            C{pre-switchover}: the target cannot hold the machine); it runs on here.
        @raise Conflict: it failed after the switchover began (ask the target), or its
            mirrors are not in sync yet. @raise NotFound: no migration of it here (this
            agent restarted since: ask C{live.status}).
        """
        try:
            check_id(machine_id)
            out = self.outgoing.get(machine_id)
            if out is None:
                out = self.ended.get(machine_id)
                if out is None:
                    raise NotFound(f"machine {machine_id}: no live migration of it here "
                                   "(this agent may have restarted): ask live.status")
                return out.wait_outcome()
            if out.machine.state == "mirroring":
                raise Conflict(f"machine {machine_id}: its mirrors are not in sync yet "
                               "(wait for live.migrate's answer)")
        except Exception as e:
            return fail(e)
        out.follow(getattr(details, "progress", None))
        d = out.wait_outcome()
        out.machine.go()  # a no-op once it went
        return d

    @wamp.register("live.cancel")
    @cancellable
    def cancel(self, machine_id):
        """
        Give up a migration of C{machine_id}: on the source, roll it back (it runs on);
        on the target, destroy the incoming machine and its blank volumes (not once it
        resumed: C{Conflict}). A source left paused by a failed switchover (C{uncertain})
        is resumed: call this only once the target said it did not resume.

        @return: a Deferred firing with C{{"cancelled": True}}.
        """
        check_id(machine_id)
        out = self.outgoing.get(machine_id)
        if out is not None:
            # During the pause (switching) a cancel waits for the outcome: the answer says it.
            def outcome(how):
                if how == "completed":
                    raise Conflict(f"machine {machine_id}: its migration completed before the "
                                   "cancel: the target holds it")
                if how == "uncertain":
                    raise Conflict(f"machine {machine_id}: {out.why}: ask the target")
                return {"cancelled": True}

            d = out.when_done().addCallback(outcome)
            out.machine.cancel("cancelled by the caller")
            return d
        inc = self.incoming.get(machine_id)
        if inc is not None:
            if inc.machine.state in ("resuming", "resumed", "stuck"):
                raise Conflict(f"machine {machine_id} resumed here: it is no longer a "
                               "migration to cancel")
            inc.machine.abort("cancelled by the caller")
            return maybeDeferred(lambda: inc.destroyed).addCallback(
                lambda _: {"cancelled": True})
        last = self.finished.get(machine_id) or {}
        if last.get("role") == "target" and last.get("state") == "ended":
            # It ended by itself (its stream broke): its copies are deleted already; what
            # the driver keeps of the failed machine goes now.
            d = maybeDeferred(self.driver.destroy, machine_id)
            return d.addCallback(lambda _: {"cancelled": True, "already": True})
        return ensureDeferred(self._cancel_untracked(machine_id))

    async def _cancel_untracked(self, machine_id):
        """
        A cancel of a migration this agent process did not start (it restarted since): a
        target recorded in C{state_dir} that has not resumed is destroyed and its blank
        volumes deleted; a source's migration is rolled back.
        """
        drv = self._live_driver()
        record = self._stored(machine_id)
        if record is not None and record.get("role") == "target":
            try:
                st = await drv.migration_status(machine_id)
            except (NotFound, Conflict):
                st = None  # it ended (recover() ends an incoming that had not completed)
            if st is not None and st["runstate"] == "running":
                self._forget_record(machine_id)
                raise Conflict(f"machine {machine_id} resumed here: it is no longer a "
                               "migration to cancel")
            await drv.destroy(machine_id)
            for vid in record.get("volumes") or ():
                self.volumes.release(vid, machine_id)
                if self.volumes.exists(vid) and self.volumes.in_use(vid) is None:
                    await self.volumes.delete(vid, snapshots="keep")
            if self.images is not None:
                for dg in record.get("digests") or ():
                    self.images.unpin(dg)
            self._release_network(machine_id, record.get("machine"))
            self._forget_record(machine_id)
            return {"cancelled": True}
        await drv.cancel_migration(machine_id)
        if self.executor is not None:
            self.executor.release(machine_id, "its live migration was cancelled; it runs here")
        return {"cancelled": True}

    @wamp.register("live.resume")
    @cancellable
    def resume(self, machine_id):
        """
        Target: resume a machine whose incoming migration completed but that did not resume
        (the agent restarted in between: C{recover} keeps such a machine paused). The
        caller has recorded that the machine switched over (the source is paused for good).

        @return: a Deferred firing with C{{"resumed": True, "already": bool}}.
        @raise Conflict: its incoming migration is not complete.
        """
        check_id(machine_id)
        inc = self.incoming.get(machine_id)
        if inc is not None and inc.machine.state in ("incoming", "resuming"):
            raise Conflict(f"machine {machine_id} resumes by itself once its migration "
                           f"completes (it is {inc.machine.state})")
        record = self._stored(machine_id) or {}
        d = maybeDeferred(self._live_driver().finish_incoming, machine_id)

        async def resumed(result):
            machine = record.get("machine")
            if (machine is not None and self.executor is not None
                    and not self.executor.has_machine(machine_id)):
                # This agent process did not prepare it: its pins and its forward were the
                # previous process's; the executor takes it with them made again.
                if self.images is not None:
                    for dg in record.get("digests") or ():
                        self.images.pin(dg)
                await self._adopt(machine_id, machine, record.get("host_port"),
                                  record.get("digests") or [], restore_network=True,
                                  health=record.get("health"))
            self._forget_record(machine_id)
            return result

        return d.addCallback(lambda result: ensureDeferred(resumed(result)))

    @wamp.register("live.status")
    @cancellable
    def status(self, machine_id):
        """
        @return: C{{"role": "source"|"target"|None, "state": the machine's state (or the
            last outcome's), "why", ...}} and the hypervisor's C{migration_status}.
        """
        return ensureDeferred(self._status(machine_id))

    async def _status(self, machine_id):
        check_id(machine_id)
        out = {"role": None, "state": None}
        if machine_id in self.outgoing:
            out.update(self.outgoing[machine_id].status(), role="source")
        elif machine_id in self.incoming:
            out.update(self.incoming[machine_id].status(), role="target")
        elif machine_id in self.finished:
            out.update(self.finished[machine_id])
        try:
            out["hypervisor"] = await self._live_driver().migration_status(machine_id)
        except (NotFound, Conflict):
            out["hypervisor"] = None
        return out

    @wamp.register("live.hashes")
    @cancellable
    def hashes(self, volume_id, first=0, count=None, algorithm=DEFAULT):
        """
        Source: the block hashes of a volume (its frozen image, once the migration
        completed): C{{"size", "block", "blocks", "first", "count", "hashes": bytes,
        "hash"}} (L{HASH_BYTES} per block) of blocks C{first} to C{first + count} (all by
        default). A large volume is read in pages whose C{hashes} the caller joins for
        C{live.verify}.

        @param algorithm: the block hash, one of L{VERIFY_HASHES} (C{"sha256"} by default,
            what a caller of the version before expects), named in the answer's C{hash}.
        """
        check_id(volume_id, "volume id")
        for name, v in (("first", first), ("count", count)):
            if v is None and name == "count":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InvalidArgument(f"{name} must be a block number, not {v!r}")
        check_algorithm(algorithm)
        path = self.volumes.existing_path(volume_id)
        return deferToThread(_hashes, path, first, count, algorithm)

    @wamp.register("live.verify")
    @cancellable
    def verify(self, machine_id, volume_id, hashes):
        """
        Target: check the volume against the source's frozen image: every block where they
        differ must lie in the dirty bitmap kept since the guest resumed here.

        @param hashes: the source's C{live.hashes(volume_id, first, count, algorithm)}: the
            blocks C{first} to C{first + count} (a page: a large volume is verified in
            several calls, each message well under the router's size limits), or all of
            them; its C{hash} names their algorithm (C{"sha256"} when absent: a source of
            the version before), which this host hashes its own blocks with.
        @return: C{{"ok": True, "first", "blocks", "dirty_blocks", "differing_blocks"}} of
            the blocks compared.
        @raise Corrupt: a block differs outside the bitmap (logged as an error, with the
            blocks): the target's copy is not the source's.
        """
        return ensureDeferred(self._verify(machine_id, volume_id, hashes))

    async def _verify(self, machine_id, volume_id, hashes):
        check_id(machine_id)
        check_id(volume_id, "volume id")
        if not isinstance(hashes, dict) or not isinstance(hashes.get("hashes"), bytes | str):
            raise InvalidArgument("hashes must be the source's live.hashes answer")
        src = hashes["hashes"]
        if isinstance(src, str):
            try:
                src = bytes.fromhex(src)
            except ValueError:
                raise InvalidArgument("hashes.hashes must be hexadecimal") from None
        if hashes.get("block") != VERIFY_BLOCK:
            raise InvalidArgument(f"hashes.block must be {VERIFY_BLOCK}")
        algorithm = check_algorithm(hashes.get("hash", DEFAULT), "hashes.hash")
        first = hashes.get("first", 0)
        count = hashes.get("count", len(src) // HASH_BYTES)
        for name, v in (("first", first), ("count", count)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InvalidArgument(f"hashes.{name} must be a block number, not {v!r}")
        if len(src) != count * HASH_BYTES:
            raise InvalidArgument(
                f"hashes.hashes must hold {HASH_BYTES} bytes for each of its {count} blocks"
            )
        path = self.volumes.existing_path(volume_id)
        drv = self._live_driver()
        result = None
        for _attempt in range(2):
            # The image first, the bitmap after: the bitmap only grows, so a block written
            # while the image is read is in the bitmap read after it.
            mine = await deferToThread(_hashes, path, first, count, algorithm)
            extents = await drv.dirty_extents(machine_id, volume_id)
            result = _compare(src, hashes, mine, extents)
            if result["ok"]:
                break
        if not result["ok"]:
            log.error("VERIFICATION FAILED: machine {id} volume {v} on {h}: {n} block(s) of "
                      "{b} bytes differ from the source's frozen image outside the dirty "
                      "bitmap (first: {first})", id=machine_id, v=volume_id, h=self.host_id,
                      n=len(result["bad_blocks"]), b=VERIFY_BLOCK,
                      first=result["bad_blocks"][:10])
            raise Corrupt(f"machine {machine_id} volume {volume_id}: "
                          f"{len(result['bad_blocks'])} block(s) differ from the source's "
                          f"frozen image outside the target's dirty bitmap (blocks "
                          f"{result['bad_blocks'][:10]}); keep the source's image")
        return result


def _hashes(path, first=0, count=None, name=DEFAULT):
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        n = block_count(size, VERIFY_BLOCK)
        first = min(first, n)
        stop = n if count is None else min(n, first + count)
        hashes = hole_hashes(size, VERIFY_BLOCK, name)[first:stop]
        for index in data_blocks(data_extents(fd, size), size, VERIFY_BLOCK):
            if first <= index < stop:
                hashes[index - first] = read_block(fd, index, size, VERIFY_BLOCK, name)[1]
    finally:
        os.close(fd)
    return {"size": size, "block": VERIFY_BLOCK, "blocks": n, "first": first,
            "count": stop - first, "hashes": b"".join(h[:HASH_BYTES] for h in hashes),
            "hash": name}


def _compare(src, theirs, mine, extents):
    """
    Compare the source's page of block hashes (C{src}, the raw bytes of C{theirs}, its
    C{live.hashes} answer) with this host's hashes of the same blocks (C{mine}, L{_hashes}).
    """
    first = mine["first"]
    if (theirs.get("size") != mine["size"] or theirs.get("first", 0) != first
            or len(src) != len(mine["hashes"])):
        return {"ok": False, "bad_blocks": ["size"], "first": first, "blocks": 0,
                "dirty_blocks": 0, "differing_blocks": 0}
    n = len(src) // HASH_BYTES
    a = [src[i * HASH_BYTES:(i + 1) * HASH_BYTES] for i in range(n)]
    b = [mine["hashes"][i * HASH_BYTES:(i + 1) * HASH_BYTES] for i in range(n)]
    bad = compare_blocks(a, b, extents, first=first)
    differing = sum(1 for x, y in zip(a, b, strict=True) if x != y)
    dirty = sum(1 for i in range(first, first + n) if _covered(i, VERIFY_BLOCK, extents))
    return {"ok": not bad, "bad_blocks": bad, "first": first, "blocks": n,
            "dirty_blocks": dirty, "differing_blocks": differing}


def _covered(index, block, extents):
    start, end = index * block, (index + 1) * block
    return any(o < end and start < o + n for o, n in extents)


def compare_blocks(source_hashes, target_hashes, extents, block=VERIFY_BLOCK, first=0):
    """
    The blocks where the target's image differs from the source's frozen image and that
    the target's dirty bitmap (C{extents}) does not cover.

    @param first: the index of the first block of both lists (a page of a volume).
    @return: a list of block indices (empty: the verification passes).
    """
    if len(source_hashes) != len(target_hashes):
        return list(range(first, first + max(len(source_hashes), len(target_hashes))))
    return [i for i, (a, b) in enumerate(zip(source_hashes, target_hashes, strict=True), first)
            if a != b and not _covered(i, block, extents)]


async def verify_images(reactor, source_path, target_path, extents, block=VERIFY_BLOCK):
    """Compare two local images (tests, benchmarks); see L{compare_blocks}."""
    (size_a, a), (size_b, b) = await deferToThread(
        lambda: (file_blockmap(source_path, block), file_blockmap(target_path, block)))
    bad = compare_blocks(a, b, extents, block) if size_a == size_b else ["size"]
    return {"ok": not bad, "bad_blocks": bad[:100], "blocks": len(a),
            "dirty_blocks": sum(1 for i in range(len(b)) if _covered(i, block, extents)),
            "size": size_b}


__all__ = ["LiveMigrations", "SourceMigration", "TargetMigration", "check_policy",
           "verify_images", "compare_blocks"]
