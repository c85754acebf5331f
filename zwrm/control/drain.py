"""
Host drains: the operator's C{zwrm.host.drain}, C{zwrm.host.drain_status},
C{zwrm.host.undrain} and C{zwrm.host.activate}, and the runner that moves every machine of a
draining host elsewhere (see docs/drain.md and L{zwrm.control.migration} for the machines).

Each drain is a row of C{drains}; each machine it moves a row of C{migrations} whose C{phase}
is the L{Migration} machine's state and whose C{detail} (JSON) holds what its steps need to
be run again after a restart: the replacement's machine id, the transfer tokens, the
receiver's address, timings. A phase is stored before its step runs; every step is
idempotent, so after a control-plane restart L{Drains.resume} feeds C{restart} to every
migration in flight, which runs its stored phase's step again (or rolls back).

The replacement is a new machine (a new machine id) with the same spec; the volumes keep
their ids. Progress events go to C{zwrm.event.drain}. Once the machines have moved, the
replicas of other hosts' volumes kept on the host are moved too (L{Drains._move_replicas});
one that cannot move stays, and the drain completes all the same.

This is a service over the resource layer (L{zwrm.control.resources}): it reads and changes
drains, migrations, machines and volumes only through their resources' reads and update
methods (each change stored, then announced once), and machines' lives (placement, start,
removal) only through the apps layer's services (L{zwrm.control.apps.Apps}: its
C{placements} and C{replicas}).  It learns about
hosts and machines from their events: the scheduler follows the hosts resource, and a
replacement's health is waited for on the machines resource's events.
"""

import uuid

from autobahn import wamp
from autobahn.wamp.types import CallOptions
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from zwrm import errors
from zwrm.control.live_drain import Divert, LiveSteps, snapshot_ids
from zwrm.control.migration import Drain, Migration, Runner
from zwrm.control.resources.drains import TOPIC as DRAIN_TOPIC
from zwrm.control.resources.machines import LIVE, placement_request, volumes_size
from zwrm.drain_phases import (
    DRAIN_MODES,
    DRAIN_TERMINAL,
    MIGRATION_ERROR_PHASES,
    MIGRATION_STEPPED,
    MIGRATION_TERMINAL,
    ROLLBACK_PENDING,
)
from zwrm.tokens import mint_token

STEPS = {phase: f"_step_{phase}" for phase in MIGRATION_STEPPED}
"""The runner's step of each phase that has one (a method of L{Drains}; see docs/drain.md)."""
PROGRESS_FALLBACK_AFTER = 10.0
"""Seconds of a volume copy without an announcement of its progress after which the drain
reads it with C{volume.progress} (an agent from before the announcements)."""

DOWN = ("stopped", "failed")
"""States of a machine that is down. With volumes, a drain moves it too: its volumes are
copied and verified, and its replacement is stored on the target in the same state, never
started ("at rest"); unless a restart of it was due (or held back for lack of room on the
draining host): then it is started on the target, as a running machine's replacement is."""

DEFAULTS = {"deadline": 3600.0, "max_parallel": 1, "healthy_deadline": 300.0,
            "min_healthy": 10.0, "stop_timeout": 30.0, "poll": 1.0}


def _number(options, key, low, high):
    v = options.get(key, DEFAULTS[key])
    if not isinstance(v, int | float) or isinstance(v, bool) or not low <= v <= high:
        raise errors.InvalidArgument(f"{key} must be a number from {low} to {high}, not {v!r}")
    return v


def _do(results):
    """What a L{Runner} input says to do (its one output's result)."""
    return results[0] if results else None


def _text(e):
    if isinstance(e, errors.ZwrmError):
        return e.message
    args = getattr(e, "args", ())
    return str(args[0]) if args else e.__class__.__name__


def _kept_down(run):
    """
    C{stopped} or C{failed} if C{run} moves a machine at rest (see L{DOWN}): it was down
    with no restart due when the drain was planned, and the drain did not have to stop it
    (had something started it since, it moves as a running machine does). Else L{None}.
    """
    return run.detail.get("keep_down") if run.detail.get("stopped_at") is None else None


class _Run:
    """One migration in memory: its row, its machine, its outbox and its runner."""

    def __init__(self, row):
        self.row = row
        self.detail = row.get("detail") or {}
        self.outbox = []
        self.machine = Migration.restore(row["phase"], self.outbox)
        self.runner = Runner()  # how its outbox is worked through (idle, storing, ...)
        self.placement = None
        self.step = None  # the Deferred of the step under way


class _DrainRun:
    def __init__(self, row, migrations):
        self.row = row
        self.outbox = []
        self.machine = Drain.restore(row["state"], self.outbox)
        self.migrations = migrations  # machine id -> _Run, in plan order
        self.working = False
        self.deadline_call = None
        self.done = Deferred()


class Drains(LiveSteps):
    """
    Drains of hosts, run by the control plane (the live phases' steps: L{LiveSteps}).

    @ivar active: host id -> the drain under way there.
    """

    log = Logger()

    def __init__(self, clock, store, hosts, apps, publish):
        """
        @param clock: an L{IReactorTime} (all waits and polls use it).
        @param store: unused: every row is read and changed through the resource layer
            (kept for callers that pass it).
        @param hosts: the L{zwrm.control.registry.HostRegistry}.
        @param apps: the L{zwrm.control.apps.Apps} (machines' placement, C{apps.placements};
            their start and removal, C{apps.replicas}; its resource layer, C{apps.data},
            holds every row this service reads or changes).
        @param publish: unused: events are published by the resource layer (kept for
            callers that pass it).
        """
        self._clock = clock
        self._hosts = hosts
        self._placements = apps.placements
        self._replicas = apps.replicas
        self._data = apps.data
        self._drains = self._data.drains
        self._machines = self._data.machines
        self._volumes = self._data.volumes
        # A snapshot or restore of a volume on a host whose drain is being planned or runs
        # is refused: the drain moves the snapshots there are when it is planned (one under
        # way then refuses the drain, in _start_drain).
        apps.volumes.draining = lambda host_id: (host_id in self.active
                                                 or host_id in self._starting)
        self._apps_volumes = apps.volumes
        self.active = {}
        #: host id -> (drain id, {replica id: what became of it}) of the replicas its
        #: latest drain moved or tried to move (this process's; drain_status)
        self.replica_moves = {}
        self._starting = set()  # hosts whose drain is being planned (zwrm.host.drain)
        self._stopped = False
        # Cleaning leftovers (copies a rollback could not delete on an unreachable target):
        self._sweep_unsubscribe = None  # ends the hosts subscription, while there are some
        self._sweep_retry = None  # a retry, while a reachable host kept one (a failed call)
        self._sweeping = self._sweep_again = False
        self._leftover_hosts = set()
        self._host_waits = set()  # Deferreds of _next_host_event under way

    def _reachable(self, host_id):
        return host_id in self._hosts and self._hosts.executor_available(host_id)

    def moving_to(self, host_id):
        """
        The hosts whose drains under way have a migration to C{host_id} that has not ended
        (it may yet copy there, start there or roll back there): that host cannot go.
        """
        return sorted({source for source, d in self.active.items()
                       for r in d.migrations.values()
                       if r.row["target_host"] == host_id
                       and r.machine.phase not in MIGRATION_TERMINAL})

    # -- stored changes, then events ---------------------------------------------------

    async def _save_migration(self, run, reason=None, **fields):
        """Store C{fields} of C{run}'s migration (the drains resource announces a phase)."""
        await self._drains.save_migration(run.row, reason=reason, **fields)

    async def _save_detail(self, run, **items):
        run.detail.update(items)
        await self._save_migration(run, detail=run.detail)

    def _call(self, host_id, verb, *args, **kwargs):
        """Call a host's executor (its errors as L{zwrm.errors} classes)."""
        return self._replicas.call(host_id, verb, *args, **kwargs)

    def _sleep(self, seconds):
        return task.deferLater(self._clock, seconds, lambda: None)

    def _next_host_event(self, host_ids, timeout=None):
        """
        A Deferred that fires with C{True} at the next event of the hosts resource about
        one of C{host_ids} (it joined, registered, went offline, its executor came or
        went), or with C{False} after C{timeout} seconds (never, if L{None}).  Cancelling
        it (L{stop}) ends the wait.
        """
        host_ids = {host_ids} if isinstance(host_ids, str) else set(host_ids)
        timer = []

        def end():
            unsubscribe()
            self._host_waits.discard(d)
            if timer and timer[0].active():
                timer[0].cancel()

        def fire(result):
            if not d.called:
                end()
                d.callback(result)

        d = Deferred(lambda _: end())
        unsubscribe = self._data.hosts.subscribe(
            lambda event: fire(True) if event["subject"] in host_ids else None)
        self._host_waits.add(d)
        if timeout is not None:
            timer.append(self._clock.callLater(max(0.0, timeout), fire, False))
        return d

    async def _ask(self, run, host, verb, *args, why, poll=1.0):
        """
        Call C{verb} on C{host}; while the host cannot be reached, wait for it (the
        migration records what it waits for): a rollback's fence and a live move are
        resolved only by what the agents say.  Other errors are raised.
        """
        while True:
            if self._stopped:
                raise CancelledError()
            try:
                if not self._reachable(host):
                    raise errors.Unavailable(f"host {host} is not available")
                result = await self._call(host, verb, *args)
            except errors.Unavailable:
                await self._set_waiting(run, host, why)
                if self._reachable(host):
                    await self._sleep(poll)  # it counts as reachable; a call failed: again
                else:
                    await self._next_host_event(host)
                continue
            await self._set_waiting(run, None)
            return result

    # -- operator procedures -----------------------------------------------------------

    def _host(self, host_id):
        if not isinstance(host_id, str) or not host_id:
            raise errors.InvalidArgument("a host id is needed")
        if host_id not in self._hosts:
            raise errors.NotFound(f"no host {host_id!r}")
        return self._hosts.entry(host_id)

    @wamp.register("zwrm.host.drain")
    async def drain(self, host_id, deadline=None, max_parallel=None, dry_run=False,
                    healthy_deadline=None, min_healthy=None, stop_timeout=None, poll=None,
                    mode=None, downtime_limit=None, live_deadline=None, postcopy=False):
        """
        Start draining C{host_id}: mark it draining and move each of its machines to a host the
        scheduler picks (region and datacenter kept).

        @param deadline: seconds (default 3600); migrations not started by then are not moved.
        @param max_parallel: migrations at a time (default 1).
        @param dry_run: only return the plan; change nothing.
        @param healthy_deadline: seconds a replacement has to pass its health check (300).
        @param min_healthy: seconds it must keep passing before the move commits (10).
        @param stop_timeout: seconds of ACPI power-down before a hard stop (30).
        @param poll: seconds between reads of copy progress, and before asking again a
            target that counts as reachable but did not answer (1); a replacement's health
            is followed on its events.
        @param mode: C{auto} (default: live where both hosts' agents say they can, with
            equal CPU model and machine type, else cold; cold too when a live attempt gives
            up), C{live} (refused, changing nothing, when a machine with volumes cannot
            move live) or C{cold}.
        @param downtime_limit: a live move's longest pause, in milliseconds (the agents'
            default, 300, if not given): QEMU switches over once the rest fits in it.
        @param live_deadline: seconds of RAM migration a live move may take (the agents'
            default, 120); then it gives up (the machine runs on; C{auto} moves it cold),
            or switches to post-copy with C{postcopy}.
        @param postcopy: allow post-copy at the deadline (the target then runs while the
            rest of the RAM arrives: losing the target then loses the machine).
        @return: C{{"drain_id", "host_id", "state", "plan": [{"machine_id", "app",
            "volumes", "snapshots", "target", "reason", "mode", "mode_reason", "down",
            "keep_down"}]}}
            (C{drain_id} is C{None} for a dry run; C{down} is the state, C{stopped} or
            C{failed}, of a machine with volumes that is down, else L{None}; C{keep_down}
            is that state too when it stays down on the target, L{None} when it starts
            there: a restart was due, or held back for lack of room).
        @raise NotFound: no such host. @raise Conflict: a drain is under way there, or the
            host is offline or drained, or (C{mode} live) a machine cannot move live, or
            a snapshot or restore of a volume there is under way.
        """
        entry = self._host(host_id)
        given = {"deadline": deadline, "max_parallel": max_parallel,
                 "healthy_deadline": healthy_deadline, "min_healthy": min_healthy,
                 "stop_timeout": stop_timeout, "poll": poll}
        options = {k: v for k, v in given.items() if v is not None}
        options = {
            "deadline": _number(options, "deadline", 1, 7 * 86400),
            "max_parallel": int(_number(options, "max_parallel", 1, 64)),
            "healthy_deadline": _number(options, "healthy_deadline", 1, 86400),
            "min_healthy": _number(options, "min_healthy", 0, 3600),
            "stop_timeout": _number(options, "stop_timeout", 0, 3600),
            "poll": _number(options, "poll", 0.05, 60),
        }
        mode = "auto" if mode is None else mode
        if mode not in DRAIN_MODES:
            raise errors.InvalidArgument(
                f"mode must be one of {', '.join(DRAIN_MODES)}, not {mode!r}", argument="mode")
        options["mode"] = mode
        for key, value, low, high in (("downtime_limit", downtime_limit, 1, 60000),
                                      ("live_deadline", live_deadline, 1, 86400)):
            if value is not None:
                if not isinstance(value, int | float) or isinstance(value, bool) or \
                        not low <= value <= high:
                    raise errors.InvalidArgument(
                        f"{key} must be a number from {low} to {high}, not {value!r}",
                        argument=key)
                options[key] = value
        if not isinstance(postcopy, bool):
            raise errors.InvalidArgument(f"postcopy must be true or false, not {postcopy!r}",
                                         argument="postcopy")
        if postcopy:
            options["postcopy"] = True
        if host_id in self.active or host_id in self._starting:
            raise errors.Conflict(f"host {host_id} is already being drained "
                                  f"({self._drain_id_of(host_id)}); see drain-status")
        state = entry.machine.state
        if state == "offline":
            raise errors.Conflict(f"host {host_id} is offline; its machines cannot be copied")
        if state == "drained":
            raise errors.Conflict(f"host {host_id} is already drained; activate it first")
        self._starting.add(host_id)
        try:
            return await self._start_drain(host_id, state, options, dry_run)
        finally:
            self._starting.discard(host_id)

    def _drain_id_of(self, host_id):
        drain = self.active.get(host_id)
        return drain.row["id"] if drain is not None else "being planned"

    async def _start_drain(self, host_id, state, options, dry_run):
        mode = options["mode"]
        # The volumes' snapshots move with them (each migration copies its volumes'); one
        # being made or restored now would not be copied whole: the drain waits for it.
        snapshots = {}
        for s in await self._volumes.find_snapshots(host_id=host_id):
            if s["state"] != "ready":
                raise errors.Conflict(
                    f"a snapshot or restore of volume {s['volume_id']} on host {host_id} is "
                    "under way: drain once it is done (zwrm volumes snapshots)")
            snapshots.setdefault(s["volume_id"], []).append(s["id"])
        copying = {r["volume_id"] for r in await self._volumes.find_replicas()
                   if r["state"] != "ready"}
        for r in await self._volumes.find_replicas(host_id=host_id):
            if r["state"] != "ready":  # (the drain moves the replicas there are)
                raise errors.Conflict(
                    f"a replica of volume {r['volume_id']} is being copied to host {host_id}:"
                    " drain once it is done (zwrm volumes replicas)")
        for vol in await self._volumes.find(host_id=host_id) if copying else ():
            if vol["id"] in copying:
                raise errors.Conflict(
                    f"a replica of volume {vol['id']} on host {host_id} is being copied: "
                    "drain once it is done (zwrm volumes replicas)")
        machines = await self._machines.find(host_id=host_id, states=LIVE,
                                             order_by="created_at")
        # Then the machines that are down (stopped, failed) and have volumes: their data
        # must leave the host too (L{DOWN}: at rest, or started on the target if a restart
        # was due). Without volumes nothing of theirs is on the host.
        machines += [m for m in await self._machines.find(host_id=host_id, states=DOWN,
                                                          order_by="created_at")
                     if m["spec"].get("volumes")]
        plan = self._plan(host_id, machines, keep=not dry_run)
        for p, _ in plan:
            p["snapshots"] = sum(len(snapshots.get(v, ())) for v in p["volumes"])
        try:
            # The replicas there move once the machines have (where each would go now).
            replicas = await self._replica_plan(host_id)
            # Snapshots move only between agents that stream them (a version before does
            # not): refused here, with nothing changed.
            hosts = {p["target"] for p, _ in plan if p["snapshots"] and p["target"]}
            if hosts:
                await self._apps_volumes.need_snapshot_streams(
                    hosts | {host_id}, "move volume snapshots (a drain moves them with their "
                                       "volumes; or delete them)")
            # The mode of each machine (its agents asked); in live mode a machine that
            # cannot move live refuses the whole drain here, with nothing changed.
            await self._choose_modes(host_id, plan, mode)
            if dry_run:
                return {"drain_id": None, "host_id": host_id, "state": "dry_run",
                        "mode": mode, "plan": [p for p, _ in plan], "replicas": replicas}
            if state == "ready":
                await self._hosts.transition(host_id, "drain_requested")
            # else: draining already, after an incomplete drain: the operator's retry.
        except BaseException:
            if not dry_run:
                for _, placement in plan:
                    if placement is not None:
                        self._placements.unplace(placement)
            raise
        now = self._clock.seconds()
        row = {"id": f"d-{uuid.uuid4().hex[:12]}", "host_id": host_id, "state": "running",
               "options": options, "created_at": now, "updated_at": now}
        runs = {}
        for p, placement in plan:
            m = {"id": f"mg-{uuid.uuid4().hex[:12]}", "drain_id": row["id"],
                 "machine_id": p["machine_id"], "source_host": host_id,
                 "target_host": p["target"], "phase": "planned", "bytes_sent": 0,
                 "bytes_total": 0, "error": None, "updated_at": now,
                 "detail": {"app": p["app"], "volumes": p["volumes"], "mode": p["mode"],
                            "mode_reason": p["mode_reason"], "keep_down": p["keep_down"],
                            "snapshots": {v: snapshots[v] for v in p["volumes"]
                                          if v in snapshots}}}
            run = _Run(m)
            run.placement = placement
            runs[p["machine_id"]] = run
        drain = _DrainRun(row, runs)
        # The drain and its migrations in one transaction, with one event (started).
        try:
            await self._drains.add(row, [r.row for r in runs.values()],
                                   plan=[p for p, _ in plan])
        except CancelledError:
            # The control plane stops: whether it was stored is not known here; its next
            # start resumes a stored drain, and a host left draining takes a drain again.
            raise
        except Exception:
            # Not stored (the control plane's disk is full): nothing of it stays, neither
            # the targets' reservations nor the host's draining state it was given above.
            for _, placement in plan:
                if placement is not None:
                    self._placements.unplace(placement)
            if state == "ready":
                try:
                    await self._hosts.transition(host_id, "undrain_requested")
                except Exception:
                    errors.log_failure(self.log, Failure(), "host {host_id} stays draining,"
                                       " its drain not stored", host_id=host_id)
            raise
        self.active[host_id] = drain
        self._arm_deadline(drain)
        for p, _ in plan:
            if p["target"] is None:
                runs[p["machine_id"]].machine.give_up(f"no target: {p['reason']}")
                self._kick(drain, runs[p["machine_id"]])
        drain.machine.start()
        self._kick_drain(drain)
        return {"drain_id": row["id"], "host_id": host_id, "state": "running",
                "mode": mode, "plan": [p for p, _ in plan], "replicas": replicas}

    async def _replica_plan(self, host_id):
        """
        The replicas on C{host_id} a drain moves, each with the host it would go to now
        (C{target}), or L{None} and why not (C{reason}): C{[{"replica", "volume_id",
        "name", "target", "reason"}]}.
        """
        out = []
        for r in await self._volumes.find_replicas(host_id=host_id):
            item = {"replica": r["id"], "volume_id": r["volume_id"], "name": r["name"],
                    "target": None, "reason": None}
            volume = await self._volumes.get(r["volume_id"])
            try:
                if volume is None:
                    raise errors.NotFound(f"no volume {r['volume_id']!r}")
                item["target"] = await self._apps_volumes.move_target(volume, r, {host_id})
            except errors.ZwrmError as e:
                item["reason"] = e.message
            out.append(item)
        return out

    def _plan(self, host_id, machines, keep):
        """
        Choose a target for each machine (all placed first, so each accounts for the ones
        before it). @return: C{[(plan_item, placement or None)]}.
        """
        placements = self._placements  # its host index follows the hosts resource's events
        out = []
        for m in machines:
            spec = m["spec"]
            vols = [v["id"] for v in spec.get("volumes", [])]
            # The target holds all its volumes (copied there): their disk is reserved.
            request = placement_request(spec, disk_mb=volumes_size(spec))
            down = m["state"] if m["state"] in DOWN else None
            restart = (m.get("health") or {}).get("restart") or {}
            due = restart.get("next_at") is not None or restart.get("held")
            item = {"machine_id": m["id"], "app": spec.get("app"), "volumes": vols,
                    "target": None, "reason": None, "down": down,
                    "keep_down": down if down and not due else None}
            try:
                placement = placements.place(request, exclude={host_id})
                item["target"] = placement.host_id
            except errors.Unplaceable as e:
                placement = None
                item["reason"] = e.message
            out.append((item, placement))
        if not keep:
            for _, p in out:
                if p is not None:
                    placements.unplace(p)
        return out

    @wamp.register("zwrm.host.drain_status")
    async def drain_status(self, host_id):
        """
        The latest drain of C{host_id}: its state and, per machine, the phase, bytes sent
        of total, rate (bytes/s), ETA (s) and any error.

        @raise NotFound: no such host, or it was never drained.
        """
        self._host(host_id)
        d = await self._drains.latest(host_id)
        if d is None:
            raise errors.NotFound(f"host {host_id} was never drained")
        now = self._clock.seconds()
        active = self.active.get(host_id)
        migrations = []
        for m in await self._drains.migrations(d["id"]):
            run = active.migrations.get(m["machine_id"]) if active is not None else None
            if run is not None:
                m = dict(run.row)
            detail = m.get("detail") or {}
            rate = eta = None
            started = detail.get("copy_started_at")
            if started is not None and m["bytes_sent"]:
                elapsed = (detail.get("copy_finished_at") or now) - started
                if elapsed > 0:
                    rate = m["bytes_sent"] / elapsed
                    left = max(0, (m["bytes_total"] or 0) - (detail.get("bytes_done") or 0))
                    eta = left / rate if rate else None
            live = (detail.get("live") if m["phase"] in ("live_migrating", "switching_over")
                    else None)
            if live is not None:
                mirror = live.get("mirror") or {}
                rate = mirror.get("rate") or None
                left = max(0, (mirror.get("total") or 0) - (mirror.get("done") or 0))
                eta = left / rate if rate and live.get("phase") == "mirroring" else None
            phase, error = m["phase"], m["error"]
            waiting = detail.get("waiting")
            original = await self._where(m["machine_id"])
            replacement = await self._where(detail.get("replacement"))
            leftovers = detail.get("leftovers") or []
            if waiting is not None and phase not in MIGRATION_TERMINAL:
                if phase == "rolling_back":
                    phase = ROLLBACK_PENDING
                note = f"waiting for {waiting['host']} (unreachable) {waiting['why']}"
                error = f"{error}; {note}" if error else note
            if phase == "failed" and original is not None:
                error = (f"{error}; machine {m['machine_id']} is {original['state']} on "
                         f"{original['host_id']}")
            if leftovers:
                note = ", ".join(f"a copy of {x['volume_id']} on {x['host']}" for x in leftovers)
                note = f"left behind (deleted when its host is back): {note}"
                error = f"{error}; {note}" if error else note
            migrations.append({
                "machine_id": m["machine_id"], "app": detail.get("app"),
                "source": m["source_host"], "target": m["target_host"], "phase": phase,
                "replacement": detail.get("replacement"), "volumes": detail.get("volumes", []),
                "bytes_sent": m["bytes_sent"], "bytes_total": m["bytes_total"],
                "rate": rate, "eta": eta, "error": error,
                "downtime": detail.get("downtime"),
                "mode": detail.get("mode"), "mode_reason": detail.get("mode_reason"),
                "live": live, "downtime_ms": detail.get("downtime_ms"),
                "verified": detail.get("verified"),
                "waiting_for": waiting["host"] if waiting is not None else None,
                "original_state": original, "replacement_state": replacement,
                "leftovers": leftovers,
            })
        return {"drain_id": d["id"], "host_id": host_id, "state": d["state"],
                "host_state": self._hosts.entry(host_id).machine.state,
                "options": d["options"], "created_at": d["created_at"],
                "updated_at": d["updated_at"], "migrations": migrations,
                "replicas": await self._replicas_status(host_id, d)}

    @wamp.register("zwrm.drain.list")
    async def list_drains(self, limit=100):
        """
        Every drain, newest first (those under way and the recent ones, at most C{limit}):
        its host and state, the host's state, and how many of its migrations are in each
        phase (the live phase for the drains under way).  Read-only.
        """
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
            raise errors.InvalidArgument(f"limit must be from 1 to 1000, not {limit!r}",
                                         argument="limit")
        rows = (await self._drains.find(order_by="created_at DESC"))[:limit]
        out = []
        for d in rows:
            active = self.active.get(d["host_id"])
            runs = active.migrations if active is not None and active.row["id"] == d["id"] else {}
            phases = {}
            migrations = await self._drains.migrations(d["id"])
            for m in migrations:
                run = runs.get(m["machine_id"])
                phase = run.row["phase"] if run is not None else m["phase"]
                phases[phase] = phases.get(phase, 0) + 1
            host = self._hosts.entry(d["host_id"]).machine.state if d["host_id"] in self._hosts \
                else None
            out.append({"drain_id": d["id"], "host_id": d["host_id"], "state": d["state"],
                        "host_state": host, "created_at": d["created_at"],
                        "updated_at": d["updated_at"], "migrations": phases,
                        "total": len(migrations)})
        return out

    async def _where(self, machine_id):
        """C{{"host_id", "state", "health"}} of a stored machine, or C{None}."""
        if machine_id is None:
            return None
        row = await self._machines.get(machine_id)
        if row is None:
            return None
        return {"host_id": row["host_id"], "state": row["state"],
                "health": (row.get("health") or {}).get("status")}

    @wamp.register("zwrm.host.undrain")
    async def undrain(self, host_id):
        """
        Cancel a drain: nothing new starts, migrations in flight finish or roll back, then the
        host is ready again.

        @return: C{{"host_id", "state"}} (C{cancelling} while migrations finish).
        @raise Conflict: the host is not draining.
        """
        entry = self._host(host_id)
        drain = self.active.get(host_id)
        if drain is None:
            state = await self._hosts.transition(host_id, "undrain_requested")
            for r in await self._drains.find(host_id=host_id, states=("incomplete",)):
                await self._drains.set_state(r, "cancelled", reason="undrained")
            return {"host_id": host_id, "state": state}
        drain.machine.cancel()
        self._kick_drain(drain)
        return {"host_id": host_id, "state": "cancelling",
                "host_state": entry.machine.state}

    @wamp.register("zwrm.host.activate")
    async def activate(self, host_id):
        """
        Return a drained host to service. @raise Conflict: it is draining (undrain it).
        """
        self._host(host_id)
        state = await self._hosts.transition(host_id, "activate_requested")
        return {"host_id": host_id, "state": state}

    # -- restart -----------------------------------------------------------------------

    async def resume(self):
        """
        After a control-plane start: take up every drain that was running or cancelling;
        each migration in flight runs its stored phase's step again.

        @return: how many drains were resumed.
        """
        n = 0
        for row in await self._drains.find(states=("running", "cancelling")):
            runs = {}
            for m in await self._drains.migrations(row["id"]):
                runs[m["machine_id"]] = _Run(m)
            drain = _DrainRun(row, runs)
            self.active[row["host_id"]] = drain
            ensureDeferred(self._resume(drain)).addErrback(
                lambda f, i=row["id"]: errors.log_failure(self.log, f, "resuming drain {id}", id=i))
            n += 1
        if await self._drains.with_leftovers():
            self._sweep_soon()
        return n

    async def _resume(self, drain, wait=120.0):
        # Agents reconnect after a control-plane restart: give the hosts involved time to
        # come back before running steps that call them (else every step would fail).
        hosts = {drain.row["host_id"]} | {
            r.row["target_host"] for r in drain.migrations.values() if r.row["target_host"]}
        end = self._clock.seconds() + wait
        while not all(self._reachable(h) for h in hosts) and not self._stopped:
            left = end - self._clock.seconds()
            if left <= 0:
                break
            try:
                await self._next_host_event(hosts, left)
            except CancelledError:
                return  # stopped
        if self._stopped:
            return
        self._arm_deadline(drain)
        for run in drain.migrations.values():
            if run.row["phase"] in MIGRATION_STEPPED:
                run.machine.restart()
                self._kick(drain, run)
        drain.machine.restart()
        self._kick_drain(drain)

    def stop(self):
        """
        Stop acting (the control plane stops; drains resume at its next start): timers are
        cancelled, steps under way are cancelled, and nothing more is taken from an outbox.
        """
        self._stopped = True
        self._stop_sweeping()
        for wait in list(self._host_waits):
            wait.cancel()
        for drain in self.active.values():
            if drain.deadline_call is not None and drain.deadline_call.active():
                drain.deadline_call.cancel()
            for run in drain.migrations.values():
                if _do(run.runner.stop()) == "cancel_step" and run.step is not None:
                    run.step.cancel()

    # -- the drain's outbox ------------------------------------------------------------

    def _arm_deadline(self, drain):
        options = drain.row["options"]
        left = drain.row["created_at"] + options["deadline"] - self._clock.seconds()

        def expired():
            drain.deadline_call = None
            drain.machine.deadline()
            self._kick_drain(drain)

        drain.deadline_call = self._clock.callLater(max(0, left), expired)

    def _kick_drain(self, drain):
        if not drain.working:
            ensureDeferred(self._work_drain(drain)).addErrback(
                lambda f: errors.log_failure(self.log, f, "drain {id}", id=drain.row["id"]))

    async def _work_drain(self, drain):
        drain.working = True
        try:
            while drain.outbox and not self._stopped:
                action, state = drain.outbox.pop(0)
                await self._drain_action(drain, action, state)
        finally:
            drain.working = False

    async def _drain_action(self, drain, action, state):
        host_id = drain.row["host_id"]
        runs = list(drain.migrations.values())
        if action == "launch":
            phases = [r.machine.phase for r in runs]
            in_flight = [p for p in phases if p not in MIGRATION_TERMINAL and p != "planned"]
            if state == "running":
                waiting = [r for r in runs if r.machine.phase == "planned"]
                room = drain.row["options"]["max_parallel"] - len(in_flight)
                for run in waiting[:max(0, room)]:
                    if run.detail.get("volumes") and run.detail.get("mode") == "live":
                        run.machine.start_live()
                    elif run.detail.get("volumes"):
                        run.machine.start_copy()
                    else:
                        run.machine.start_replacement()
                    self._kick(drain, run)
                if waiting or in_flight:
                    return
            elif in_flight:
                return
            if state == "running" and drain.machine.state == "running":
                # (not a launch queued before the one that ended it: that one moved them)
                await self._move_replicas(drain)
            if all(r.machine.phase == "done" for r in runs):
                drain.machine.all_moved()
            else:
                drain.machine.some_not_moved()
            return
        if action == "cancel_all":
            for run in runs:
                run.machine.cancel()
                self._kick(drain, run)
            # With nothing in flight, no migration will end to finish the drain: check now.
            await self._drain_action(drain, "launch", "cancelling")
            return
        if action == "expire":
            for run in runs:
                run.machine.give_up("the drain's deadline passed before it started")
                self._kick(drain, run)
            return
        # "enter": store the drain's new state (announced), then act on the host.
        await self._drains.set_state(drain.row, state)
        if state in DRAIN_TERMINAL:
            try:
                if state == "completed":
                    await self._hosts.transition(host_id, "drain_finished")
                elif state == "cancelled":
                    await self._hosts.transition(host_id, "undrain_requested")
            except errors.ZwrmError as e:
                self.log.warn("host {h}: {e}", h=host_id, e=e.message)
            if drain.deadline_call is not None and drain.deadline_call.active():
                drain.deadline_call.cancel()
            if self.active.get(host_id) is drain:
                del self.active[host_id]
            drain.done.callback(state)

    async def _move_replicas(self, drain, busy_for=300.0):
        """
        Once the drain's machines have moved: move each ready replica on its host to
        another host (L{zwrm.control.app_volumes.AppVolumes.move_replica}: copied,
        verified, then deleted there), one at a time. One that cannot move (no other host
        may keep it, a copy failed) stays, with why (C{drain_status}'s C{replicas}); its
        host's removal then gives it up. A volume busy with another snapshot operation is
        waited for, at most C{busy_for} seconds.
        """
        host_id, drain_id = drain.row["host_id"], drain.row["id"]
        moves = {}
        self.replica_moves[host_id] = (drain_id, moves)
        for r in await self._volumes.find_replicas(host_id=host_id):
            if r["state"] != "ready" or self._stopped:
                continue
            item = moves[r["id"]] = {"replica": r["id"], "volume_id": r["volume_id"],
                                     "name": r["name"], "state": "moving", "target": None,
                                     "reason": None}
            waited = 0.0
            while self._apps_volumes.busy(r["volume_id"]) and waited < busy_for \
                    and not self._stopped:
                await self._sleep(1.0)
                waited += 1.0
            try:
                kept = await self._apps_volumes.move_replica(r, why=f"drain {drain_id}")
            except Exception as e:
                if self._stopped:  # (its store may be closed: the drain resumes at the next
                    # start, whose reconciliation settles a copy left creating)
                    self.log.info("drain {d}: replica {r} not moved: the control plane "
                                  "stopped", d=drain_id, r=r["id"])
                    return
                if not isinstance(e, errors.ZwrmError):
                    errors.log_failure(self.log, Failure(), "drain {d}: moving replica {r}",
                                       d=drain_id, r=r["id"])
                item.update(state="left", reason=_text(e))
                self.log.warn("drain {d}: replica {r} of volume {v} stays on {h}: {e}",
                              d=drain_id, r=r["id"], v=r["volume_id"], h=host_id, e=_text(e))
            else:
                item.update(state="moved", target=kept["host_id"], replica=kept["id"])
            if self._stopped:
                return  # (its store may be closed)
            await self._drains.replica_moved(
                drain.row, dict(item, replica=r["id"],
                                copy=item["replica"] if item["state"] == "moved" else None))

    async def _replicas_status(self, host_id, drain):
        """
        C{drain_status}'s C{replicas}: those this process's run of the drain C{drain}
        (a row) moved or tried to (run by an earlier process: those its moves made, still
        kept where they went), and the others still on the host (C{waiting} while the
        drain runs, else C{left}).
        """
        drain_id, moves = self.replica_moves.get(host_id, (None, {}))
        if drain_id == drain["id"]:
            items = [dict(m) for m in moves.values()]
        else:
            # Another process ran it (a control plane started since): those it moved are
            # the replicas made by its moves (their rows say so), where they still are.
            made = f"moved from {host_id} (drain {drain['id']})"
            items = [{"replica": r["id"], "volume_id": r["volume_id"], "name": r["name"],
                      "state": "moved", "target": r["host_id"], "reason": None}
                     for r in await self._volumes.find_replicas()
                     if r.get("reason") == made and r["state"] == "ready"]
        seen = {m["replica"] for m in items} | set(moves if drain_id == drain["id"] else ())
        # why those an earlier process could not move stayed (its announcements)
        ended = {} if drain_id == drain["id"] else await self._drains.replica_outcomes(
            drain["id"])
        for r in await self._volumes.find_replicas(host_id=host_id):
            if r["id"] not in seen:
                why = (ended.get(r["id"]) or {}).get("reason")
                items.append({"replica": r["id"], "volume_id": r["volume_id"],
                              "name": r["name"], "target": None, "reason": why,
                              "state": "waiting" if drain["state"] in ("running",)
                              else "left"})
        return items

    # -- each migration's outbox -------------------------------------------------------

    def _kick(self, drain, run):
        if run.runner.state == "idle" and run.outbox:
            ensureDeferred(self._work(drain, run)).addErrback(
                lambda f: errors.log_failure(self.log, f, "migration {id}", id=run.row["id"]))

    async def _work(self, drain, run):
        """
        Work through C{run}'s outbox, one item at a time, as its L{Runner} says: store the
        item (a phase is stored, then announced), then run the phase's step (L{STEPS}) and
        feed its result to the migration's machine.
        """
        runner = run.runner
        while run.outbox:
            if _do(runner.work()) != "take":
                return  # busy (that loop takes it) or stopped
            action, phase, reason = run.outbox.pop(0)
            try:
                if action == "note":
                    await self._save_migration(run, error=reason)
                else:
                    fields = {"phase": phase}
                    if reason is not None and phase in MIGRATION_ERROR_PHASES:
                        fields["error"] = reason
                    # Stored, then announced (event migration), before its step acts.
                    await self._save_migration(run, reason=reason, **fields)
            except BaseException:
                runner.stop()  # nothing more is acted on (resumed at the next start)
                raise
            if action == "note":
                runner.stored_note()
                continue
            if phase in MIGRATION_TERMINAL:
                if _do(runner.stored_end()) != "migration_ended":
                    return  # stopped: stored; the drain goes on after the next start
                if run.placement is not None and phase != "done":
                    self._release(run)
                drain.machine.migration_ended()
                self._kick_drain(drain)
                continue
            if _do(runner.stored_phase()) != "run_step":
                return  # stopped: stored; its step runs after the next start
            run.step = ensureDeferred(getattr(self, STEPS[phase])(drain, run))
            try:
                await run.step
            except CancelledError:
                runner.step_cancelled()
                return  # the control plane is stopping; resumed at its next start
            except Divert as e:  # a live move fell back to cold, or moved after all
                if _do(runner.step_failed()) == "step_failed":
                    if e.input == "fall_back" and drain.machine.state == "cancelling":
                        run.machine.step_failed(f"{phase}: {e.reason}; the drain was "
                                                "cancelled, so it is not moved cold")
                    else:
                        getattr(run.machine, e.input)(e.reason)
            except Exception as e:
                if not isinstance(e, errors.ZwrmError):
                    self.log.failure("migration {id}: step {phase}", id=run.row["id"],
                                     phase=phase)
                if _do(runner.step_failed()) == "step_failed":
                    run.machine.step_failed(f"{phase}: {_text(e)}")
            else:
                if _do(runner.step_succeeded()) == "step_done":
                    run.machine.step_done()
            finally:
                run.step = None

    def _release(self, run):
        try:
            self._placements.release_placement(run.placement)
        except Exception:
            self.log.failure("releasing the placement of {m}", m=run.row["machine_id"])
        run.placement = None

    # -- the steps (each idempotent: a restart runs the stored phase's step again) -------

    async def _original(self, run):
        row = await self._machines.get(run.row["machine_id"])
        if row is None:
            raise errors.NotFound(f"machine {run.row['machine_id']} is gone")
        return row

    async def _target_has(self, target, volume_id):
        try:
            await self._call(target, "volume.info", volume_id)
            return True
        except errors.NotFound:
            return False

    async def _step_bulk_copying(self, drain, run):
        source, target = run.row["source_host"], run.row["target_host"]
        total = 0
        sizes = {}
        for vid in run.detail["volumes"]:
            info = await self._call(source, "volume.info", vid)
            sizes[vid] = info["size_bytes"]
            total += info.get("allocated_bytes") or 0
            total += sum(s["allocated_bytes"] for s in await self._snapshots_to_copy(run, vid))
        await self._save_detail(run, copy_started_at=self._clock.seconds(), bytes_done=0)
        await self._save_migration(run, bytes_total=total, bytes_sent=0)
        sent_before = 0
        done_before = 0
        endpoints = {}
        for vid in run.detail["volumes"]:
            # copies an earlier rollback left there
            await self._clean_copy(target, vid, snapshot_ids(run, vid))
            sent_before, done_before = await self._copy_snapshots(
                run, vid, sent_before, done_before, drain.row["options"]["poll"])
            token = await self._fresh_token(run, "tokens", vid)
            where = await self._call(target, "volume.receive", token, vid, sizes[vid],
                                     source=source)
            endpoints[vid] = [where["host"], where["port"]]
            await self._save_detail(run, endpoints=dict(run.detail.get("endpoints") or {},
                                                        **{vid: endpoints[vid]}))
            result = await self._send_watching(
                run, source, vid, where["host"], where["port"], token, target, "bulk",
                sent_before, done_before, drain.row["options"]["poll"])
            sent_before += result.get("sent", 0)
            done_before += result.get("allocated", 0)
        await self._save_detail(run, copy_finished_at=self._clock.seconds(),
                                bytes_done=done_before)
        await self._save_migration(run, bytes_sent=sent_before)

    async def _fresh_token(self, run, field, key):
        """
        A new transfer token for C{key} (a volume, or one of its snapshots), stored in the
        migration's C{field} before it is used; the one an earlier run of the step stored
        there is cancelled on the target first (with its partial copy).
        """
        old = (run.detail.get(field) or {}).get(key)
        if old is not None:
            try:
                await self._call(run.row["target_host"], "volume.cancel_receive", old)
            except errors.ZwrmError:
                pass
        token = mint_token()
        await self._save_detail(run, **{field: dict(run.detail.get(field) or {}, **{key: token})})
        return token

    async def _snapshots_to_copy(self, run, vid):
        """
        The snapshots of volume C{vid} the migration moves (those it was planned with),
        as its source lists them (C{volume.snapshots}: their sizes).

        @raise NotFound: one of them is not on the source.
        """
        wanted = (run.detail.get("snapshots") or {}).get(vid) or []
        if not wanted:
            return []
        held = {s["id"]: s for s in
                await self._call(run.row["source_host"], "volume.snapshots", vid)}
        missing = [sid for sid in wanted if sid not in held]
        if missing:
            raise errors.NotFound(f"snapshots {', '.join(missing)} of volume {vid} are not on "
                                  f"{run.row['source_host']}")
        return [held[sid] for sid in wanted]

    async def _copy_snapshots(self, run, vid, sent, done, poll_every):
        """
        Copy the snapshots of volume C{vid} to the migration's target, before the volume:
        one stream each, verified as a volume's is and adopted at once into the volume's
        snapshot directory there (a snapshot never changes: no delta). Each token is
        stored before it is used; a rollback cancels them and deletes the copies with the
        volume's (L{_clean_copy}). The rows follow at the commit
        (L{zwrm.control.resources.drains.DrainsResource.commit_volumes}).

        @return: C{(sent, done)} plus what these streams sent and the data they copied.
        """
        source, target = run.row["source_host"], run.row["target_host"]
        for snap in await self._snapshots_to_copy(run, vid):
            token = await self._fresh_token(run, "snapshot_tokens", f"{vid}/{snap['id']}")
            where = await self._call(target, "volume.receive", token, vid, snap["size_bytes"],
                                     source=source, snapshot=snap["id"])
            result = await self._send_watching(run, source, vid, where["host"], where["port"],
                                               token, target, "bulk", sent, done, poll_every,
                                               snapshot=snap["id"])
            if not result.get("committed"):
                raise errors.Corrupt(f"snapshot {snap['id']} of volume {vid}: the target did "
                                     "not commit its copy")
            sent += result.get("sent", 0)
            done += result.get("allocated", 0)
        return sent, done

    async def _send_watching(self, run, source, vid, host, port, token, target, mode,
                             sent_before, done_before, poll_every, snapshot=None):
        """
        Send one volume (or its snapshot C{snapshot}, committed at once); the progress the
        source announces (progressive results of C{volume.send},
        L{zwrm.agent.transfer.progress}) goes into the migration row.

        An agent from before the announcements says nothing while it copies: if nothing
        was heard after L{PROGRESS_FALLBACK_AFTER} seconds, its C{volume.progress} is read
        every C{poll_every} seconds instead, until it announces or the copy ends (not for
        a snapshot: every agent that sends them announces).
        """
        fallback = []  # the LoopingCall reading volume.progress, once it runs
        heard = []

        def record(p):
            run.detail["bytes_done"] = done_before + (p.get("done") or 0)
            run.row["bytes_sent"] = sent_before + (p.get("sent") or 0)

        def announced(*args, **kwargs):
            p = args[0] if args else kwargs
            if not isinstance(p, dict):
                return
            if not heard:
                heard.append(True)
                stop_fallback()
            record(p)

        async def poll():
            try:
                p = await self._call(source, "volume.progress", vid)
            except errors.ZwrmError:
                return
            if not heard and not d.called:  # an answer after the copy ended is stale
                record(p)

        def start_fallback():
            if heard or d.called:
                return
            self.log.info("drain: {host} does not announce copy progress; reading it every "
                          "{poll}s", host=source, poll=poll_every)
            loop = task.LoopingCall(lambda: ensureDeferred(poll()))
            loop.clock = self._clock
            fallback.append(loop)
            loop.start(poll_every, now=True)

        def stop_fallback():
            if timer.active():
                timer.cancel()
            while fallback:
                loop = fallback.pop()
                if loop.running:
                    loop.stop()

        timer = self._clock.callLater(PROGRESS_FALLBACK_AFTER, start_fallback)
        if snapshot is not None:
            timer.cancel()
            kw = {"commit": True, "snapshot": snapshot}
        else:
            kw = {"commit": mode == "delta"}
        d = ensureDeferred(self._call(source, "volume.send", vid, host, port, token, target,
                                      mode=mode, options=CallOptions(on_progress=announced),
                                      **kw))
        try:
            return await d
        finally:
            stop_fallback()

    async def _step_stopping_source(self, drain, run):
        row = await self._original(run)
        if row["state"] in ("stopped", "failed"):
            return
        self.log.info("drain: stopping machine {id}", id=row["id"])
        # A planned stop: out of the routes for the app's shutdown_delay first.
        taken = await self._replicas.take_out([row], await self._replicas.delay_for(row))
        if run.detail.get("stopped_at") is None:
            await self._save_detail(run, stopped_at=self._clock.seconds())
        try:
            await self._call(run.row["source_host"], "machine.stop", row["id"],
                             timeout=drain.row["options"]["stop_timeout"])
        except BaseException:
            await self._replicas.put_back(taken)
            raise

    async def _step_delta_copying(self, drain, run):
        source, target = run.row["source_host"], run.row["target_host"]
        sent = run.row["bytes_sent"]
        for vid in run.detail["volumes"]:
            if await self._target_has(target, vid):
                continue  # committed by an earlier run of this step
            token = run.detail["tokens"][vid]
            host, port = run.detail["endpoints"][vid]
            result = await self._send_watching(run, source, vid, host, port, token, target,
                                               "delta", sent, run.detail.get("bytes_done", 0),
                                               drain.row["options"]["poll"])
            sent += result.get("sent", 0)
            if not result.get("committed"):
                raise errors.Corrupt(f"volume {vid}: the target did not commit its copy")
            digests = dict(run.detail.get("digests") or {}, **{vid: result.get("digest")})
            await self._save_detail(run, digests=digests)
        await self._save_migration(run, bytes_sent=sent)

    async def _step_starting_replacement(self, drain, run):
        original = await self._original(run)
        target = run.row["target_host"]
        for vid in run.detail["volumes"]:
            if not await self._target_has(target, vid):
                raise errors.NotFound(f"volume {vid} is not on {target}; not starting there")
        new_id = run.detail.get("replacement")
        if new_id is None:
            # Stored before it is acted on: from now on a rollback must have the target
            # confirm that this machine is gone before the original starts again.
            new_id = f"m-{uuid.uuid4().hex[:12]}"
            await self._save_detail(run, replacement=new_id)
        existing = await self._machines.get(new_id)
        rest = _kept_down(run)
        if rest is not None:
            if existing is None:
                state = original["state"] if original["state"] in DOWN else rest
                await self._add_kept_down(drain, run, original, new_id, state)
            return
        if existing is not None and existing["state"] in LIVE:
            return
        if existing is not None and existing["state"] == "failed":
            raise errors.Unavailable(f"replacement {new_id} failed on {target}")
        if run.placement is None:  # after a restart: account for it on the target again
            run.placement = self._placements.restore(
                target, placement_request(original["spec"]))
        if existing is None:
            now = self._clock.seconds()
            spec = dict(original["spec"], id=new_id)
            row = {"id": new_id, "app_id": original["app_id"], "host_id": target,
                   "state": "pending", "spec": spec, "health": {"status": "none"},
                   "created_at": now, "updated_at": now}
            # Stored (event state, pending) with its reservation, then started.
            await self._replicas.add_machine(row, f"replacement of {original['id']} (drain)",
                                         placement=run.placement)
        else:
            row = existing
            self._placements.adopt(new_id, run.placement)
        run.placement = None  # the apps layer releases it with the machine from now on
        await self._replicas.start_machine(row)
        if row["state"] == "failed":
            raise errors.Unavailable(f"the replacement could not start on {target}")

    async def _add_kept_down(self, drain, run, original, new_id, state):
        """
        Store the replacement of C{original}, a machine that is down, on the migration's
        target in C{state} (C{stopped} or C{failed}), never started: the same spec and
        restart record (no restart was due when the drain was planned). Its reservation is
        given back: a machine that is down holds none, nor an address (it gets one of its
        host's when it starts).
        """
        target = run.row["target_host"]
        now = self._clock.seconds()
        health = dict(original.get("health") or {}, status="none")
        if health.get("restart"):
            health["restart"] = dict(health["restart"], next_at=None)
            health["restart"].pop("held", None)
        row = {"id": new_id, "app_id": original["app_id"], "host_id": target,
               "state": state, "health": health,
               "spec": {k: v for k, v in dict(original["spec"], id=new_id).items()
                        if k != "network"},
               "created_at": now, "updated_at": now}
        if run.placement is not None:
            self._release(run)
        await self._replicas.add_machine(
            row, f"replacement of {original['id']} ({state}, moved at rest by drain "
                 f"{drain.row['id']} from {run.row['source_host']}); not started")

    async def _wait_healthy(self, machine_id, deadline, min_healthy, poll, host=None,
                            run=None, pause=True):
        """
        Wait until C{machine_id} is running with a passing health check (or running, when it
        has none) for C{min_healthy} seconds on end. @return: when it first passed.

        It waits on the machines resource's events (L{Machines.wait_healthy}), never polls
        the store.  With C{host} (a replacement's target), what counts is what that host's
        agent says (L{Executor.machine_status}), not the stored row, which is stale while
        the host is unreachable (marked failed once it is offline; still passing before
        that): each event of the machine or of C{host} has the agent asked again
        (L{_HealthWait}).  While the host is unreachable the wait is paused (with C{pause};
        for a machine with volumes), not failed: the replacement may still run there (its
        hypervisor outlives its agent), so the original must not start again
        (docs/drain.md, "Fencing"); the time does not count toward C{deadline}, and the
        migration records that it waits for C{host}. Without C{pause} an unreachable host
        fails the wait.  Time is the service's clock's.

        @raise Unavailable: not so by C{deadline} seconds, or it failed.
        @raise NotFound: it is gone.
        """
        if host is None:
            return await self._machines.wait_healthy(machine_id, deadline, min_healthy)
        wait = _HealthWait(self, machine_id, host, deadline, min_healthy, poll, run, pause)
        return await wait.run()

    async def _set_waiting(self, run, host, why=None):
        """Record (or clear, with C{host=None}) that C{run} waits for an unreachable host."""
        if run is None:
            return
        now = self._clock.seconds()
        old = run.detail.get("waiting")
        if host is None:
            if old is not None:
                run.detail["waiting"] = None
                await self._drains.set_waiting(run.row, run.detail,
                                               f"{old['host']} answered again")
            return
        if old is None or old.get("host") != host or old.get("why") != why:
            since = old["since"] if old is not None and old.get("host") == host else now
            run.detail["waiting"] = {"host": host, "since": since, "why": why}
            await self._drains.set_waiting(run.row, run.detail,
                                           f"waiting for {host} (unreachable) {why}")

    async def _step_waiting_healthy(self, drain, run):
        if _kept_down(run) is not None:
            return  # never started: nothing to wait for
        opts = drain.row["options"]
        first = await self._wait_healthy(run.detail["replacement"], opts["healthy_deadline"],
                                         opts["min_healthy"], opts["poll"],
                                         host=run.row["target_host"], run=run,
                                         pause=bool(run.detail.get("volumes")))
        stopped = run.detail.get("stopped_at")
        if stopped is not None:
            await self._save_detail(run, downtime=max(0.0, first - stopped))

    async def _step_committing(self, drain, run):
        # The volumes move to the target (and with them the pin) with the migration's
        # phase, in one transaction; then each move is announced (volume_moved).
        # Replicas of them on the target become snapshots there (never a replica on its
        # volume's host), but for those of a snapshot that moved there too: those go (their
        # files at the cleaning; stored first, so that a restart deletes them too).
        target = run.row["target_host"]
        convert, redundant = [], []
        for vid in run.detail["volumes"]:
            moved = set(snapshot_ids(run, vid))
            for r in await self._volumes.find_replicas(volume_id=vid, host_id=target):
                (redundant if r["snapshot_id"] in moved else convert).append(r)
        if redundant:
            await self._save_detail(run, redundant_replicas=sorted(
                {(r["volume_id"], r["id"]) for r in redundant}
                | {tuple(x) for x in run.detail.get("redundant_replicas") or ()}))
        await self._drains.commit_volumes(run.row, list(run.detail["volumes"]),
                                          replicas=convert, redundant=redundant)

    async def _step_cleaning(self, drain, run):
        source = run.row["source_host"]
        row = await self._machines.get(run.row["machine_id"])
        if row is not None and run.detail.get("switched_over_at") is not None:
            # Moved live: the original is paused for good (nothing to drain or power down).
            await self._replicas.remove_machine(row)
        elif row is not None:
            # A planned stop: out of the routes for the app's shutdown_delay first.
            taken = await self._replicas.take_out([row], await self._replicas.delay_for(row))
            if taken or (row["state"] in LIVE and row["state"] != "stopping"):
                try:  # no volumes: it still runs; power it down cleanly first
                    await self._call(source, "machine.stop", row["id"],
                                     timeout=drain.row["options"]["stop_timeout"])
                except errors.ZwrmError as e:
                    self.log.warn("stopping {id}: {e}", id=row["id"], e=e.message)
            await self._replicas.remove_machine(row)
        away = []
        for vid in run.detail["volumes"]:
            # The volume's snapshots first (its host refuses to delete a volume that has
            # some): their copies on the target are theirs now.
            try:
                await self._delete_snapshot_copies(source, vid)
                await self._call(source, "volume.delete", vid)
            except errors.NotFound:
                pass
            except errors.Unavailable:
                # The source went away: its copy (the volume is the target's now) is
                # deleted when it is back, as a rollback's leftovers are.
                away.append({"host": source, "volume_id": vid,
                             **({"snapshots": snapshot_ids(run, vid)}
                                if snapshot_ids(run, vid) else {})})
        if away:
            old = [x for x in run.detail.get("leftovers") or [] if x not in away]
            await self._save_detail(run, leftovers=old + away)
            self.log.warn("cleaning: copies of {v} left on {s} (unreachable) are deleted when "
                          "it is back", v=", ".join(x["volume_id"] for x in away), s=source)
            self._sweep_soon()
        # The target's replicas of snapshots that moved there (their rows went at the commit).
        for vid, rid in run.detail.get("redundant_replicas") or ():
            try:
                await self._call(run.row["target_host"], "volume.snapshot_delete", vid, rid)
            except errors.NotFound:
                pass

    async def _delete_snapshot_copies(self, host, vid):
        """Delete every snapshot of volume C{vid} that C{host} holds."""
        for snap in await self._call(host, "volume.snapshots", vid):
            try:
                await self._call(host, "volume.snapshot_delete", vid, snap["id"])
            except errors.NotFound:
                pass

    async def _step_rolling_back(self, drain, run):
        """
        Undo a migration that did not commit. The original is started again on the source
        only once no replacement can run: if a replacement was ever started (its id is
        stored before its start is asked), the target must confirm that it is gone
        (destroyed, or unknown there); while the target is unreachable this step waits for
        it (C{rollback_pending} in drain-status). Copies of the volumes the target cannot
        delete now are recorded as leftovers and deleted when it is back. A machine moved
        at rest (L{_kept_down}) stays down on the source: its replacement never ran, and
        it is not started.
        """
        source, target = run.row["source_host"], run.row["target_host"]
        opts = drain.row["options"]
        new_id = run.detail.get("replacement")
        if new_id is not None and target is not None and run.detail.get("live_prepare_asked"):
            # A live attempt: both agents say where the machine is; the target's incoming
            # machine is cancelled first, and if it resumed there the machine has moved.
            if await self._live_resolve(run, opts["poll"]):
                raise Divert("moved", f"{target} holds machine {new_id}: it moved live; "
                             "the source is never resumed")
            await self._save_detail(run, live_prepare_asked=None)
        rest = _kept_down(run)
        if new_id is not None and target is not None:
            if run.detail.get("volumes") and rest is None:
                await self._fence_replacement(run, target, new_id, opts["poll"])
            else:
                await self._drop_replacement(new_id, target)
        if run.placement is not None:
            self._release(run)
        if target is not None and self._reachable(target):
            for token in [*(run.detail.get("tokens") or {}).values(),
                          *(run.detail.get("snapshot_tokens") or {}).values()]:
                try:
                    await self._call(target, "volume.cancel_receive", token)
                except errors.ZwrmError:
                    pass  # done or expired; a staged copy dies with its token or its agent
        leftovers = []
        for vid in run.detail.get("volumes", []) if target is not None else []:
            vrow = await self._volumes.get(vid)
            if vrow is not None and vrow["host_id"] == target:
                continue  # committed: that copy is the volume
            snaps = snapshot_ids(run, vid)
            if not await self._clean_copy(target, vid, snaps):
                leftovers.append({"host": target, "volume_id": vid,
                                  **({"snapshots": snaps} if snaps else {})})
        old = [x for x in run.detail.get("leftovers") or [] if x not in leftovers]
        await self._save_detail(run, leftovers=old + leftovers)
        if leftovers:
            self.log.warn("rollback: copies of {v} left on {t} (unreachable) are deleted when "
                          "it is back", v=", ".join(x["volume_id"] for x in leftovers), t=target)
            self._sweep_soon()
        original = await self._original(run)
        if rest is not None:
            return  # it was down, and stays so where it was
        try:
            st = await self._call(source, "machine.status", original["id"])
            on_host = st["state"]
        except errors.NotFound:
            on_host = "stopped"
        except errors.Unavailable as e:
            # Its source went away: it cannot be started again now. Stopped by this drain,
            # not by its operator, it is recorded failed, so that its restart policy starts
            # it where its volumes are once the host is back (no replacement runs: above).
            if original["state"] == "stopped":
                await self._replicas.set_machine(
                    original, f"its drain's rollback could not start it again: {e.message}",
                    state="failed")
            raise
        if on_host in ("stopped", "failed"):
            # Its capacity on the source, given back when it stopped, is taken again before
            # it starts (a start that fails gives it back).
            self._placements.restored(original)
            await self._replicas.start_machine(original)
        await self._wait_healthy(original["id"], opts["healthy_deadline"], 0, opts["poll"])

    async def _fence_replacement(self, run, target, new_id, poll):
        """
        Return only once C{target} confirmed that replacement C{new_id} does not run there
        (its agent destroyed it, or never had it); until then wait for the target, however
        long it stays away. Then its row goes (with its reservation).
        """
        why = (f"to confirm that replacement {new_id} is gone before the original starts "
               f"again on {run.row['source_host']}")
        while True:
            try:
                await self._ask(run, target, "machine.destroy", new_id, why=why, poll=poll)
            except errors.NotFound:
                pass  # its agent does not know it: it does not run there
            rep = await self._machines.get(new_id)
            try:
                if rep is not None:
                    await self._replicas.remove_machine(rep)
                return
            except errors.Unavailable:
                await self._sleep(poll)  # lost again in between: ask it again

    async def _drop_replacement(self, new_id, target):
        """
        A replacement without volumes may run beside its original (it starts first, by
        design): destroy it if its target answers; else forget it, so that its host stops
        it as unknown when it returns.
        """
        rep = await self._machines.get(new_id)
        if rep is None:
            return
        try:
            await self._replicas.remove_machine(rep)
        except errors.Unavailable:
            self.log.warn("rollback: replacement {id} on {t} is stopped when its host returns",
                          id=new_id, t=target)
            # Stored and announced (failed, its reservation released), then forgotten.
            await self._replicas.set_machine(
                rep, f"rollback: host {target} unreachable; stopped when it returns",
                state="failed")
            await self._replicas.remove_machine(rep)

    async def _clean_copy(self, host, vid, snapshots=()):
        """
        Delete the copy of volume C{vid} on C{host}, and those of its snapshots
        C{snapshots} (ids: a migration's), unless it is the volume (recorded on C{host}).
        Other snapshot files of the volume there (replicas, L{zwrm.control.app_volumes})
        are left alone.

        @return: C{True} if no such copy is left there, C{False} if C{host} could not say.
        """
        vrow = await self._volumes.get(vid)
        if vrow is not None and vrow["host_id"] == host:
            return True
        try:
            for sid in snapshots:
                try:
                    await self._call(host, "volume.snapshot_delete", vid, sid)
                except errors.NotFound:
                    pass
            if await self._target_has(host, vid):
                # (a replica of the volume there stays: it is not the copy's)
                await self._call(host, "volume.delete", vid, keep_snapshots=True)
                self.log.info("deleted the copy of volume {v} left on {h}", v=vid, h=host)
            return True
        except errors.NotFound:
            return True
        except errors.ZwrmError as e:
            self.log.warn("copy of {v} on {h} not deleted yet: {e}", v=vid, h=host, e=e.message)
            return False

    # -- leftovers of rollbacks whose target was unreachable -------------------------

    SWEEP_RETRY = 5.0
    """Seconds before trying again a leftover whose host is reachable but did not delete it."""

    def _sweep_soon(self):
        """
        Clean recorded leftovers now, then again at each event of a host that holds one (it
        came back), and after L{SWEEP_RETRY} seconds while a reachable host kept one (a
        call that failed, or a copy a migration under way still used); until none is left.
        """
        if self._stopped:
            return
        if self._sweep_unsubscribe is None:
            self._sweep_unsubscribe = self._data.hosts.subscribe(self._leftover_host_event)
        if self._sweeping:
            self._sweep_again = True
            return
        self._sweeping = True
        ensureDeferred(self._sweep()).addErrback(
            lambda f: errors.log_failure(self.log, f, "cleaning leftovers"))

    def _leftover_host_event(self, event):
        if event["subject"] in self._leftover_hosts and self._reachable(event["subject"]):
            self._sweep_soon()

    def _stop_sweeping(self):
        if self._sweep_unsubscribe is not None:
            self._sweep_unsubscribe()
            self._sweep_unsubscribe = None
        if self._sweep_retry is not None and self._sweep_retry.active():
            self._sweep_retry.cancel()
        self._sweep_retry = None

    async def sweep_leftovers(self):
        """Clean the recorded leftovers on every reachable host. @return: how many are left."""
        left = 0
        hosts = set()
        for row in await self._drains.with_leftovers():
            busy = {(r.row["target_host"], v) for d in self.active.values()
                    for r in d.migrations.values()
                    if r.machine.phase not in MIGRATION_TERMINAL and r.row["id"] != row["id"]
                    for v in r.detail.get("volumes", [])}
            keep = []
            for x in row["detail"]["leftovers"]:
                if (x["host"], x["volume_id"]) in busy:
                    continue  # a migration under way there cleans (or needs) it itself
                if not self._reachable(x["host"]) or not await self._clean_copy(
                        x["host"], x["volume_id"], x.get("snapshots") or []):
                    keep.append(x)
                    hosts.add(x["host"])
            if keep != row["detail"]["leftovers"]:
                run = self._run_of(row["id"])
                if run is not None:
                    await self._save_detail(run, leftovers=keep)
                else:
                    await self._drains.save_migration(
                        row, detail=dict(row["detail"], leftovers=keep))
            left += len(keep)
        self._leftover_hosts = hosts
        return left

    def _run_of(self, migration_id):
        for d in self.active.values():
            for r in d.migrations.values():
                if r.row["id"] == migration_id:
                    return r
        return None

    async def _sweep(self):
        try:
            while True:
                self._sweep_again = False
                left = await self.sweep_leftovers()
                if not self._sweep_again or self._stopped:
                    break
        finally:
            self._sweeping = False
        if self._stopped:
            return
        if left == 0:
            self._stop_sweeping()
        elif any(self._reachable(h) for h in self._leftover_hosts) and (
                self._sweep_retry is None or not self._sweep_retry.active()):
            self._sweep_retry = self._clock.callLater(self.SWEEP_RETRY, self._sweep_soon)


class _HealthWait:
    """
    The wait of L{Drains._wait_healthy} for a replacement on C{host}: the target's agent is
    asked (C{machine.status}) at the start, on every event of the machine (its agent's
    reports: state and health changes) and of C{host} (it went away, came back), and when
    the machine has been healthy for C{min_healthy}; what it answers is the truth.  While
    C{host} cannot be reached the wait is paused: its deadline stops; the agent is asked
    again on the host's next event, or after C{poll} seconds if the host still counts as
    reachable (a call that failed on its way).
    """

    def __init__(self, drains, machine_id, host, deadline, min_healthy, poll, run, pause):
        self._drains = drains
        self._clock = drains._clock
        self.machine_id, self.host, self.run_ = machine_id, host, run
        self.deadline, self.min_healthy, self.poll, self.pause = (
            deadline, min_healthy, poll, pause)
        self.done = Deferred()
        self.left = deadline  # of the deadline: paused time does not count
        self.armed_at = None
        self.expired = False
        self.since = self.first = None
        self.last = (None, None)  # (state, health) of the agent's last answer
        self.has_check = False
        self.timers = {}  # "deadline", "healthy", "retry" -> IDelayedCall
        self.checking = self.again = False

    async def run(self):
        drains = self._drains
        unsubscribe = [drains._machines.subscribe(self._machine_event),
                       drains._data.hosts.subscribe(self._host_event)]
        try:
            row = await drains._machines.get(self.machine_id)
            if row is None:
                raise errors.NotFound(f"machine {self.machine_id} is gone")
            self.has_check = bool(row["spec"].get("health"))
            self._arm_deadline()
            self._check()
            return await self.done
        finally:
            for u in unsubscribe:
                u()
            for name in list(self.timers):
                self._cancel(name)

    # -- triggers ---------------------------------------------------------------------

    def _machine_event(self, event):
        if event["subject"] != self.machine_id:
            return
        if event["kind"] == "destroyed":
            return self._fail(errors.NotFound(f"machine {self.machine_id} is gone"))
        self._check()

    def _host_event(self, event):
        if event["subject"] == self.host:
            self._check()

    def _later(self, name, seconds, fn):
        self._cancel(name)

        def fire():
            self.timers.pop(name, None)
            fn()

        self.timers[name] = self._clock.callLater(max(0.0, seconds), fire)

    def _cancel(self, name):
        call = self.timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def _arm_deadline(self):
        if "deadline" not in self.timers and not self.expired and not self.done.called:
            self.armed_at = self._clock.seconds()
            self._later("deadline", self.left, self._expire)

    def _stop_deadline(self):
        if "deadline" in self.timers:
            self.left -= self._clock.seconds() - self.armed_at
            self._cancel("deadline")

    def _expire(self):
        self.expired, self.left = True, 0.0
        self._check()  # healthy long enough at this very moment still counts

    def _fail(self, exc):
        if not self.done.called:
            self.done.errback(exc)

    # -- asking the agent -------------------------------------------------------------

    def _check(self):
        """Ask the agent (again, once the question under way is answered)."""
        if self.done.called:
            return
        if self.checking:
            self.again = True
            return
        self.checking = True
        ensureDeferred(self._checks()).addErrback(lambda f: self._fail(f.value))

    async def _checks(self):
        try:
            while not self.done.called:
                self.again = False
                await self._check_once()
                if not self.again:
                    break
        finally:
            self.checking = False

    async def _check_once(self):
        drains, mid, host = self._drains, self.machine_id, self.host
        try:
            st = await drains._call(host, "machine.status", mid)
        except errors.NotFound:
            return self._fail(errors.NotFound(f"machine {mid} is not on {host} any more"))
        except errors.Unavailable as e:
            if self.done.called:
                return None  # over (cancelled: the control plane stops) meanwhile
            if not self.pause:
                return self._fail(e)
            self.since = None
            self._cancel("healthy")
            self._stop_deadline()
            await drains._set_waiting(
                self.run_, host, f"replacement {mid} may still run there; the "
                "original stays stopped until it answers")
            if drains._reachable(host):  # else: asked again on the host's next event
                self._later("retry", self.poll, self._check)
            return None
        if self.done.called:
            return None  # over (cancelled: the control plane stops) meanwhile
        self._cancel("retry")
        self._arm_deadline()
        await drains._set_waiting(self.run_, None)
        state, health = self.last = (st["state"], st.get("health"))
        if state == "failed":
            return self._fail(errors.Unavailable(f"machine {mid} failed"))
        now = self._clock.seconds()
        if state == "running" and (health == "passing" or not self.has_check):
            if self.since is None:
                self.since = now
                self.first = now if self.first is None else self.first
            if now - self.since >= self.min_healthy:
                if not self.done.called:
                    self.done.callback(self.first)
                return None
            if "healthy" not in self.timers:
                self._later("healthy", self.since + self.min_healthy - now, self._check)
        else:
            self.since = None
            self._cancel("healthy")
        if self.expired:
            self._fail(errors.Unavailable(
                f"machine {mid} was not healthy within {self.deadline:g}s "
                f"(state {state}, health {health})"))
        return None


__all__ = ["Drains", "DRAIN_TOPIC"]
