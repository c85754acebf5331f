"""
Apps that stay up: restart policies, rescheduling after host loss, and the partition guard.

The L{Healer} follows the machines and hosts resources' events (it never polls) and acts
through the apps layer's services (L{zwrm.control.apps.Apps}: its C{replicas},
C{placements} and C{converger}): every change it makes is stored, then announced, by the
machines resource like any other.

Restart policy (an app spec's C{restart}, see L{validate_restart})::

    {"policy": "always" | "on-failure" | "never", "max_restarts": 10, "interval": 1800,
     "initial_backoff": 5, "max_backoff": 300, "reset_after": 600}

 - A machine that stops on its own (its guest powered off: C{stopped}) or dies (its QEMU
   crashed or was killed: C{failed}) while its host is reachable is started again on its
   host after a backoff: C{initial_backoff} doubled at each restart up to C{max_backoff}.
   The backoff starts again from C{initial_backoff} after the machine ran healthy for
   C{reset_after} seconds.  C{on-failure} restarts only C{failed} machines (and unhealthy
   ones), C{never} none.  At most C{max_restarts} restarts within C{interval} seconds:
   then the machine stays down and says why.
 - Liveness: a running machine whose health check stays C{failing} for
   C{unhealthy_threshold} (a key of the app's C{health}, default 3) check intervals is
   stopped, then restarted under the same policy.
 - A machine stopped by the control plane (it went through C{stopping}: a drain, a
   scale-down, a converge) is never restarted by the policy.

What the policy did is stored on the machine (its health's C{restart}: count, reason, next
attempt time; see L{zwrm.control.resources.machines}) and so shows in C{zwrm.event.machine}
and C{zwrm status}.

Host loss.  When the health monitor has marked hosts offline (L{Healer.check_done}, called
after each check), the replicas without volumes of each lost host are placed and started
elsewhere after C{reschedule_after} seconds; replicas with volumes wait for their host
(they are pinned to their data) and say so.  The stale copies of rescheduled replicas have
no record any more: when their host returns, its reconciliation stops them
(L{zwrm.control.registry.HostRegistry.reconcile}), so an app never has more records than
replicas.

Partition guard.  When more than C{partition_threshold} of the hosts of a datacenter are
offline once at least two of them were lost together (found offline within C{settle}
seconds of each other: hosts cut off at once are found offline at their own deadlines, as
far apart as their last heartbeats), nothing is rescheduled there:
the guard publishes a C{partition} event on C{zwrm.event.host} (subject C{dc:<name>}) and
logs it.  Once hosts return and the share is at or below the threshold again, the held
hosts are rescheduled one per C{eviction_interval} seconds (the Kubernetes node-lifecycle
numbers: 55 %, 10 s); a held host that returned meanwhile is simply dropped.
"""

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, ensureDeferred
from twisted.logger import Logger

from zwrm import errors
from zwrm.control import fields
from zwrm.control.resources.machines import placement_request

POLICIES = ("always", "on-failure", "never")
RESTART_DEFAULTS = {"policy": "always", "max_restarts": 10, "interval": 1800.0,
                    "initial_backoff": 5.0, "max_backoff": 300.0, "reset_after": 600.0}
UNHEALTHY_THRESHOLD = 3
HELD_RETRY = 30.0
"""Seconds between attempts of a restart held back for lack of room on the machine's host
(a machine with volumes cannot go elsewhere).  It is also tried at once when room may have
come: a reservation there given back (a machine there stopped or removed), the host's drain
cancelled."""
RESCHEDULE_CONCURRENCY = 4  # apps rescheduled at once after a host loss
EXITS_FROM = ("pending", "starting", "running")
"""A machine that goes C{stopped}/C{failed} from one of these exited on its own."""


def _app_of(row):
    return (row.get("spec") or {}).get("app") or row.get("app_id")


def validate_restart(spec):
    """
    Check an app's restart policy (or L{None}: the defaults); return it with every key.

    @raise zwrm.errors.InvalidArgument: naming the field that is wrong.
    """
    if isinstance(spec, str):
        spec = {"policy": spec}
    if spec is not None and not isinstance(spec, dict):
        raise errors.InvalidArgument("restart must be a policy name or a mapping")
    out = fields.settings(spec, RESTART_DEFAULTS, "restart")
    if out["policy"] not in POLICIES:
        raise errors.InvalidArgument(
            f"restart policy must be one of {', '.join(POLICIES)}, not {out['policy']!r}")
    n = out["max_restarts"]
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 10000:
        raise errors.InvalidArgument(f"restart max_restarts must be from 0 to 10000, not {n!r}")
    out["interval"] = fields.seconds(out["interval"], "restart interval", 1, 7 * 86400)
    out["initial_backoff"] = fields.seconds(out["initial_backoff"], "restart initial_backoff", 0, 3600)
    out["max_backoff"] = fields.seconds(out["max_backoff"], "restart max_backoff", 0, 86400)
    out["reset_after"] = fields.seconds(out["reset_after"], "restart reset_after", 0, 86400)
    if out["max_backoff"] < out["initial_backoff"]:
        raise errors.InvalidArgument("restart max_backoff must not be below initial_backoff")
    return out


def backoff(policy, step):
    """The delay before restart number C{step} (0 first) under C{policy}."""
    return min(policy["initial_backoff"] * (2 ** min(step, 32)), policy["max_backoff"])


def unhealthy_after(health):
    """Seconds a check must keep failing before its machine is restarted, or L{None}."""
    if not health:
        return None
    n = health.get("unhealthy_threshold", UNHEALTHY_THRESHOLD)
    return n * health.get("interval", 5)


def decide(policy, state, restart, now, healthy_since=None):
    """
    What the policy does about a machine that just went C{state} (C{stopped} or
    C{failed}, or C{unhealthy}): a pure function, for the tests and the L{Healer}.

    @param restart: the machine's stored restart record (C{count, times, step, ...}).
    @param healthy_since: when it last became healthy, if it still was until now.
    @return: C{(delay, record)}: C{delay} in seconds, or L{None} (no restart), and the
        restart record to store (C{next_at} set when a restart is due).
    """
    record = dict(restart or {})
    record.pop("held", None)  # this exit is decided anew
    record.setdefault("count", 0)
    times = [t for t in record.get("times", []) if now - t < policy["interval"]]
    record["times"] = times
    step = record.get("step", 0)
    if healthy_since is not None and now - healthy_since >= policy["reset_after"]:
        step = 0
    record["step"] = step
    if policy["policy"] == "never" or (policy["policy"] == "on-failure" and state == "stopped"):
        record["next_at"] = None
        record["reason"] = f"not restarted (restart policy {policy['policy']})"
        return None, record
    if len(times) >= policy["max_restarts"]:
        record["next_at"] = None
        record["reason"] = (f"not restarted: {len(times)} restarts within "
                            f"{policy['interval']:g}s (max_restarts {policy['max_restarts']})")
        return None, record
    delay = backoff(policy, step)
    record["next_at"] = now + delay
    return delay, record


class Healer:
    """
    Restart policies, rescheduling after host loss and the partition guard, for one
    control plane's L{zwrm.control.apps.Apps}.

    @ivar partitioned: C{{datacenter: [held host ids]}} while a partition holds there.
    """

    log = Logger()

    def __init__(self, clock, apps, reschedule_after=0.0, partition_threshold=0.55,
                 eviction_interval=10.0, settle=0.0):
        """
        @param settle: seconds the decision on a lost host waits for more hosts of its
            datacenter to be lost (hosts cut off at the same moment are found offline at
            their own deadlines, as far apart as their last heartbeats: up to a heartbeat
            interval); those lost meanwhile are decided with it, as one loss.  Counted in
            C{reschedule_after}.
        """
        self._clock = clock
        self.settle = settle
        self._settling = {}  # datacenter -> [host ids lost, waiting for its decision]
        self._settle_calls = {}  # datacenter -> DelayedCall of that decision
        self._lost_at = {}  # host id -> when it was found lost (for reschedule_after)
        self._replicas = apps.replicas
        self._placements = apps.placements
        self._converger = apps.converger
        self._data = apps.data
        self.reschedule_after = reschedule_after
        self.partition_threshold = partition_threshold
        self.eviction_interval = eviction_interval
        self._timers = {}  # machine id -> DelayedCall of its restart
        self._liveness = {}  # machine id -> DelayedCall of its liveness verdict
        self._healthy_since = {}  # machine id -> clock time it became healthy
        self._deciding = set()  # machine ids whose exit is being decided
        self._last_healthy = {}  # machine id -> when it became healthy, before it exited
        self._lost = []  # hosts marked offline since the last check_done
        self._waiting = {}  # host id -> DelayedCall of its rescheduling
        self._retry = set()  # hosts whose replicas could not all be placed
        # hosts on which a machine exited while they could not be called (their agent's
        # session had ended) but were not offline: restarted once their agent registers again
        self._uncalled = set()
        self._held = {}  # machine id -> its host, of restarts held for room there
        self.partitioned = {}
        self._partition_since = {}  # datacenter -> when its partition began (POSIX time)
        self._evicting = {}  # datacenter -> DelayedCall of the next eviction
        self._tasks = set()
        self._unsubscribe = [self._data.machines.subscribe(self._machine_event),
                             self._data.hosts.subscribe(self._host_event),
                             self._placements.on_release(self._room_given_back)]

    async def resume(self):
        """
        After a control plane start: set the timers of the restarts that were due (their
        C{next_at} is stored on the machine); one already late runs at once.  An exit that
        was stored but not decided (the control plane stopped in between: the machine's
        newest event is still that exit) is decided now.  A running machine stored with
        its health check failing is watched again (restarted if it still fails after its
        C{unhealthy_threshold} intervals).

        @return: how many restarts were scheduled, exits decided or liveness watches set.
        """
        n = 0
        now = self._clock.seconds()
        for row in await self._data.machines.find(states=("failed", "stopped")):
            mid = row["id"]
            if mid in self._timers or mid in self._deciding:
                continue
            restart = (row.get("health") or {}).get("restart") or {}
            next_at = restart.get("next_at")
            if next_at is not None:
                if restart.get("held"):
                    self._held[mid] = row["host_id"]
                self._later(self._timers, mid, max(0.0, next_at - now), self._restart, mid)
                n += 1
            else:
                reason = await self._undecided_exit(row)
                if reason is not None:
                    self._deciding.add(mid)
                    self._spawn(self._exited(mid, row["state"], reason),
                                f"restart policy of {mid}")
                    n += 1
        for row in await self._data.machines.find(states=("running",)):
            # failing when the control plane stopped: watched again (no new report comes
            # while its health stays as it is)
            if (row.get("health") or {}).get("status") == "failing":
                self._spawn(self._watch_liveness(row["id"]), f"liveness of {row['id']}")
                n += 1
        return n

    async def _undecided_exit(self, row):
        """
        The reason of C{row}'s exit if its newest event is that exit (state C{stopped} or
        C{failed} from one of L{EXITS_FROM}): the decision on it, stored with an event of
        its own, never was. L{None} for a machine stopped on purpose (from C{stopping}) or
        whose exit was decided.
        """
        liveness = ((row.get("health") or {}).get("restart") or {}).get("liveness")
        if liveness:
            return liveness  # stopped by its liveness check: decided as failed (L{_schedule})
        last = await self._data.machines.last_event(row["id"])
        if last is None or last["kind"] != "state":
            return None
        p = last["payload"] or {}
        if p.get("old") in EXITS_FROM and p.get("state") == row["state"]:
            return p.get("reason") or row["state"]
        return None

    def stop(self):
        """Stop following events and cancel every timer."""
        for u in self._unsubscribe:
            u()
        for calls in (self._timers, self._liveness, self._waiting, self._evicting,
                      self._settle_calls):
            for call in calls.values():
                if call.active():
                    call.cancel()
            calls.clear()

    # -- plumbing -----------------------------------------------------------------------

    def _spawn(self, coro, what):
        d = Deferred.fromCoroutine(coro)
        self._tasks.add(d)

        def done(result):
            self._tasks.discard(d)
            return result

        d.addBoth(done)
        d.addErrback(lambda f: errors.log_failure(self.log, f, "healing: {what}", what=what))
        return d

    async def idle(self):
        """Wait until no work started by an event or a timer is under way (for tests)."""
        while self._tasks:
            for d in list(self._tasks):
                await _observe(d)

    def _later(self, table, key, delay, fn, *args):
        old = table.pop(key, None)
        if old is not None and old.active():
            old.cancel()

        def fire():
            table.pop(key, None)
            self._spawn(fn(*args), f"{fn.__name__} {key}")

        table[key] = self._clock.callLater(delay, fire)

    def _cancel(self, table, key):
        call = table.pop(key, None)
        if call is not None and call.active():
            call.cancel()

    # -- machine events: the restart policy -------------------------------------------

    def _machine_event(self, event):
        p = event["payload"]
        mid = event["subject"]
        if event["kind"] == "destroyed":
            self._held.pop(mid, None)
            self._cancel(self._timers, mid)
            self._cancel(self._liveness, mid)
            self._healthy_since.pop(mid, None)
            return
        if event["kind"] != "state":
            return
        state = p.get("state")
        if state == "running":
            if p.get("health") in ("passing", "none", None):
                self._healthy_since.setdefault(mid, self._clock.seconds())
            else:
                self._healthy_since.pop(mid, None)
            if p.get("health") == "failing":
                if mid not in self._liveness:
                    self._spawn(self._watch_liveness(mid), f"liveness of {mid}")
            else:
                self._cancel(self._liveness, mid)
            return
        self._cancel(self._liveness, mid)
        since = self._healthy_since.pop(mid, None)
        if state in ("stopped", "failed") and p.get("old") in EXITS_FROM:
            if since is not None:
                self._last_healthy[mid] = since
            if mid not in self._timers and mid not in self._deciding:
                self._deciding.add(mid)
                self._spawn(self._exited(mid, state, p.get("reason") or state),
                            f"restart policy of {mid}")

    async def _wanted(self, row):
        """
        The app row and its restart policy if C{row}'s app still wants this machine (its
        replica is in the spec, it is not stale, and the app is not being destroyed),
        else L{None}.
        """
        spec = row.get("spec") or {}
        try:
            app = await self._data.apps.by_name(spec.get("app"))
        except errors.NotFound:
            return None
        aspec = app.get("spec")
        if aspec is None or app.get("destroying") or spec.get("replica", 0) >= aspec["replicas"]:
            return None  # (a destroy under way: it only goes forward)
        if _same_version(spec.get("app_spec")) != _same_version(aspec):
            return None  # stale: the app's next converge replaces it
        try:
            return app, validate_restart(aspec.get("restart"))
        except errors.InvalidArgument:
            return app, dict(RESTART_DEFAULTS)

    def decide_exit(self, row):
        """
        Decide now on the exit of the machine C{row} (stored C{failed} or C{stopped}) as on
        one from a live state, though it was C{stopping}: a planned stop that a killed
        control plane never ended, whose machine its agent no longer runs
        (L{zwrm.control.registry.HostRegistry.cut_short}). Its request did not complete,
        so its restart policy brings it back.
        """
        mid = row["id"]
        if mid not in self._timers and mid not in self._deciding:
            self._deciding.add(mid)
            self._spawn(self._exited(mid, row["state"], "its planned stop was cut short"),
                        f"restart policy of {mid}")

    async def _exited(self, mid, state, reason):
        try:
            await self._exited_once(mid, state, reason)
        finally:
            self._deciding.discard(mid)

    async def _exited_once(self, mid, state, reason):
        row = await self._data.machines.get(mid)
        if row is None or row["state"] not in ("stopped", "failed"):
            return
        if not self._replicas.executor_available(row["host_id"]):
            # its host is gone (rescheduling or its return handles it) or its agent's session
            # ended (its next registration does: _host_event)
            self._uncalled.add(row["host_id"])
            return
        wanted = await self._wanted(row)
        if wanted is None:
            return
        _, policy = wanted
        await self._schedule(row, policy, state, reason)

    async def _schedule(self, row, policy, state, reason):
        """
        Decide on C{row}'s exit (in order with its reports) and set its restart timer.

        A machine its liveness check stopped (its restart record carries the mark
        L{_unhealthy} stored) is decided as failed and stored C{failed}, not the
        C{stopped} its agent reports, so that what comes to failed machines comes to it
        (rescheduled if its host is lost before its restart, restarted when that host
        returns).
        """
        mid = row["id"]
        since = self._last_healthy.pop(mid, None)

        async def store(row):
            if row is None:
                return None
            now = self._clock.seconds()
            health = dict(row.get("health") or {})
            before = health.get("restart") or {}
            # stopped by its liveness check (L{_unhealthy}), decided here or after a restart
            unhealthy = bool(before.get("liveness"))
            delay, record = decide(policy, "failed" if unhealthy else state, before, now, since)
            record.pop("liveness", None)
            if delay is not None:
                record["reason"] = reason
            health["restart"] = record
            note = (f"{reason}; restart in {delay:g}s" if delay is not None else
                    f"{reason}; {record['reason']}")
            fields = {"state": "failed"} if unhealthy and row["state"] == "stopped" else {}
            await self._replicas.set_machine(row, note, health=health, **fields)
            self.log.info("machine {id} of {app} on {host}: {note}", id=mid,
                          app=_app_of(row), host=row["host_id"], note=note)
            return delay

        delay = await self._replicas.update_machine(mid, store)
        if delay is not None:
            self._later(self._timers, mid, delay, self._restart, mid)

    async def _note(self, mid, reason, running=False, **record):
        """
        Store C{reason} (and C{record}'s keys) in C{mid}'s restart record, in order; only
        if it is still C{running} if that is asked.

        @return: the row, or L{None} (no such machine, or not running).
        """
        async def store(row):
            if row is None or (running and row["state"] != "running"):
                return None
            health = dict(row.get("health") or {})
            rec = dict(health.get("restart") or {}, reason=reason, **record)
            if rec == health.get("restart"):
                return row
            health["restart"] = rec
            return await self._replicas.set_machine(row, reason, health=health)

        return await self._replicas.update_machine(mid, store)

    async def _restart(self, mid):
        row = await self._data.machines.get(mid)
        if row is None:
            return
        now = self._converger.run_awaited(mid, self._restart_locked, mid)
        if now is not None:  # a rolling update that holds its app's lock waits for it
            await now
            return
        app_name = (row.get("spec") or {}).get("app")
        await self._converger.in_app_order(app_name, self._restart_locked, mid)

    async def _restart_locked(self, mid):
        self._held.pop(mid, None)
        row = await self._data.machines.get(mid)
        if row is None or row["state"] not in ("stopped", "failed"):
            return
        if not self._replicas.executor_available(row["host_id"]):
            # its host went away meanwhile: host loss (or its return) takes it from here;
            # so does its agent's next registration, if it was only its session that ended
            self._uncalled.add(row["host_id"])
            await self._note(mid, f"not restarted: host {row['host_id']} is unreachable",
                             next_at=None)
            return
        if await self._wanted(row) is None:
            await self._note(mid, "not restarted: its app no longer wants it", next_at=None)
            return
        replicas, placements = self._replicas, self._placements
        try:
            placement = await placements.place_now(
                placement_request(row["spec"], pinned_host=row["host_id"]))
        except errors.ZwrmError as e:
            placement = None
            no_room = e.message
        if placement is None:
            if not row["spec"].get("volumes"):
                await self._note(mid, f"no room on its host to restart: {no_room}",
                                 next_at=None)
                # a replica without volumes may go elsewhere
                await self._converger.reschedule(row["app_id"], [row["spec"]["replica"]])
                return
            # Held: tried again every HELD_RETRY seconds (stored: a control-plane restart
            # takes it up, L{resume}); a drain of its host starts it on its target
            # (zwrm.control.drain.DOWN).
            retry_at = self._clock.seconds() + HELD_RETRY
            await self._note(mid, f"no room on its host to restart: {no_room}; trying again "
                             f"every {HELD_RETRY:g}s", next_at=retry_at, held=True)
            self._held[mid] = row["host_id"]
            self._later(self._timers, mid, HELD_RETRY, self._restart, mid)
            return

        async def count(row):
            if row is None or row["state"] not in ("stopped", "failed"):
                return None
            now = self._clock.seconds()
            health = dict(row.get("health") or {})
            record = dict(health.get("restart") or {})
            record["count"] = record.get("count", 0) + 1
            record["times"] = list(record.get("times", [])) + [now]
            record["step"] = record.get("step", 0) + 1
            record["next_at"] = None
            record.pop("held", None)
            record.pop("liveness", None)
            record["last_at"] = now
            health["restart"] = record
            return await replicas.set_machine(
                row, f"restarting ({record['count']}): {record.get('reason')}", health=health)

        row = await replicas.update_machine(mid, count)
        if row is None:
            placements.release_placement(placement)
            return
        self.log.info("machine {id} of {app}: restarting it on {host} (restart {n})", id=mid,
                      app=_app_of(row), host=row["host_id"], n=row["health"]["restart"]["count"])
        placements.adopt(mid, placement)
        await replicas.start_machine(row)
        if (row["state"] == "failed" and mid not in self._timers
                and mid not in self._deciding):
            # Its start failed before its agent took it (the call, or the agent's refusal),
            # stored as failed from stopped or failed: an exit like any other to its policy
            # (a start its agent took and that failed is reported as an exit already).
            last = await self._data.machines.last_event(mid)
            reason = ((last or {}).get("payload") or {}).get("reason") or "could not start"
            self._deciding.add(mid)
            self._spawn(self._exited(mid, "failed", reason), f"restart policy of {mid}")

    async def _watch_liveness(self, mid):
        row = await self._data.machines.get(mid)
        if row is None:
            return
        after = unhealthy_after((row.get("spec") or {}).get("health"))
        if after is None or mid in self._liveness:
            return
        self._later(self._liveness, mid, after, self._unhealthy, mid, after)

    async def _unhealthy(self, mid, after):
        row = await self._data.machines.get(mid)
        if row is None or row["state"] != "running" or (row.get("health") or {}).get(
                "status") != "failing":
            return
        wanted = await self._wanted(row)
        if wanted is None:
            return
        _, policy = wanted
        if policy["policy"] == "never":
            return
        if (row.get("health") or {}).get("paused"):
            # Its hypervisor holds it until its host's disk has room (zwrm.drivers.diskfull):
            # a restart would lose what its guest has not written and meet the same disk.
            # Its resume is a new event, which watches its health again.
            self.log.info("machine {id} of {app} on {host}: health check failing while it is"
                          " paused ({why}): not restarted", id=mid, app=_app_of(row),
                          host=row["host_id"], why=row["health"]["paused"])
            return
        reason = f"health check failing for {after:g}s"
        if not self._replicas.executor_available(row["host_id"]):
            # its agent is not connected (a control plane that just started, a session
            # ended): looked at again as long later (its host, found offline, fails it)
            self._later(self._liveness, mid, after, self._unhealthy, mid, after)
            return
        # Stored before the stop: a control plane stopped after its agent reported the stop
        # and before the decision below finds it (L{_undecided_exit}) and decides then.
        if await self._note(mid, f"{reason}: stopping it to restart it", running=True,
                            liveness=reason) is None:
            return  # it exited meanwhile: that exit is decided as such
        self.log.info("machine {id} of {app} on {host}: {reason}: stopping it to restart it",
                      id=mid, app=_app_of(row), host=row["host_id"], reason=reason)
        try:
            await self._replicas.call(row["host_id"], "machine.stop", mid)
        except errors.ZwrmError as e:
            # Tried again while it stays running and failing (its agent reports no change
            # of health that would start another watch): never left failing for good.
            note = f"{reason}, but it could not be stopped: {e.message}; trying again in {after:g}s"
            self.log.warn("machine {id} of {app} on {host}: {note}", id=mid, app=_app_of(row),
                          host=row["host_id"], note=note)
            await self._note(mid, note, running=True, liveness=None)  # (one that died: decided)
            self._later(self._liveness, mid, after, self._unhealthy, mid, after)
            return
        row = await self._data.machines.get(mid)
        if row is not None:
            await self._schedule(row, policy, "failed", reason)

    # -- host events: rescheduling and the partition guard ----------------------------

    def _host_event(self, event):
        p = event["payload"]
        host_id = event["subject"]
        if (p.get("executor") and p.get("state") not in ("offline", "removed")
                and host_id in self._uncalled):
            # its agent registered again (it was never offline): what exited meanwhile
            self._uncalled.discard(host_id)
            self._later(self._waiting, f"back:{host_id}", 1.0, self._host_back, host_id)
        if event["kind"] == "removed":
            self._uncalled.discard(host_id)
            self._lost_at.pop(host_id, None)
        if event["kind"] != "state":
            return
        if p.get("state") == "offline" and p.get("old") != "offline":
            self._lost.append(host_id)
        elif p.get("old") == "offline" and p.get("state") != "offline":
            self._cancel(self._waiting, host_id)
            self._retry.discard(host_id)
            self._lost_at.pop(host_id, None)
            self._check_partitions()
            # machines that stayed down on it (their QEMU died with the host) restart
            self._later(self._waiting, f"back:{host_id}", 1.0, self._host_back, host_id)
        elif p.get("state") == "ready" and p.get("old") in ("draining", "drained"):
            # its drain cancelled, or it was activated: room for the restarts held there
            self._later(self._waiting, f"room:{host_id}", 0.0, self._room_on, host_id)

    def _offline(self, host_id):
        entry = self._data.hosts.get(host_id)
        return entry is None or entry.machine.state == "offline"

    def _datacenter(self, host_id):
        entry = self._data.hosts.get(host_id)
        return (entry.record.get("datacenter") or "") if entry is not None else ""

    def _share_offline(self, dc):
        hosts = [e for e in self._data.hosts.entries() if (e.record.get("datacenter") or "") == dc]
        if not hosts:
            return 0.0
        return sum(1 for e in hosts if e.machine.state == "offline") / len(hosts)

    def check_done(self, marked=None):
        """
        The health monitor finished a check (C{marked}: the hosts it marked offline; the
        hosts' own events say the same).  Decide, per datacenter, between rescheduling
        the lost hosts' replicas and holding them (a partition).
        """
        lost, self._lost = self._lost, []
        now = self._clock.seconds()
        by_dc = {}
        for host_id in lost:
            if self._offline(host_id):
                self._lost_at[host_id] = now
                by_dc.setdefault(self._datacenter(host_id), []).append(host_id)
        if self.settle > 0:
            # decided together with the hosts of their datacenter lost in the next
            # `settle` seconds (_settled)
            for dc, hosts in sorted(by_dc.items()):
                settling = self._settling.setdefault(dc, [])
                settling.extend(h for h in hosts if h not in settling)
                if dc not in self._settle_calls:
                    self._settle_calls[dc] = self._clock.callLater(
                        self.settle, self._settled, dc)
            by_dc = {}
        for host_id in sorted(self._retry):  # (lost before: their settling is over)
            if host_id not in lost and self._offline(host_id):
                hosts = by_dc.setdefault(self._datacenter(host_id), [])
                if host_id not in hosts:
                    hosts.append(host_id)
        self._retry.clear()
        for dc, hosts in sorted(by_dc.items()):
            self._decide(dc, hosts)

    def _settled(self, dc):
        """The settle window of the first host of C{dc} lost ended: decide on all of them."""
        self._settle_calls.pop(dc, None)
        hosts = [h for h in self._settling.pop(dc, []) if self._offline(h)]
        if hosts:
            self._decide(dc, hosts)

    def _decide(self, dc, hosts):
        """
        Hosts C{hosts} of datacenter C{dc}, lost together: hold them (a partition), or
        reschedule their replicas once C{reschedule_after} has passed since their loss.
        """
        share = self._share_offline(dc)
        if dc in self.partitioned or (len(hosts) >= 2 and share > self.partition_threshold):
            self._hold(dc, hosts, share)
            return
        now = self._clock.seconds()
        for host_id in hosts:
            waited = now - self._lost_at.get(host_id, now)
            self._later(self._waiting, host_id, max(0.0, self.reschedule_after - waited),
                        self._reschedule_host, host_id)

    def _hold(self, dc, hosts, share):
        new = dc not in self.partitioned
        held = self.partitioned.setdefault(dc, [])
        for h in hosts:
            if h not in held:
                held.append(h)
            self._cancel(self._waiting, h)
        if new:
            self._partition_since[dc] = self._clock.seconds()
            self.log.warn(
                "partition: {share:.0%} of the hosts of datacenter {dc!r} are offline;"
                " nothing is rescheduled there until they return", share=share, dc=dc)
            self._spawn(self._data.hosts.produce_event(
                "partition", f"dc:{dc}",
                {"datacenter": dc, "state": "partitioned", "offline_share": share,
                 "held_hosts": sorted(held), "threshold": self.partition_threshold}),
                "publishing a partition")

    def partitions(self):
        """
        The datacenters where the partition guard holds rescheduling now
        (C{zwrm.cluster.partitions}), by name.

        @return: C{[{datacenter, since, offline_share, held_hosts, threshold, evicting}]}:
            C{held_hosts} are the hosts still offline whose replicas are not placed
            elsewhere yet;
            C{evicting} is true once enough hosts are back and the held ones are
            rescheduled one per C{eviction_interval}.
        """
        return [{"datacenter": dc, "since": self._partition_since.get(dc),
                 "offline_share": self._share_offline(dc),
                 "held_hosts": sorted(x for x in held if self._offline(x)),
                 "threshold": self.partition_threshold, "evicting": dc in self._evicting}
                for dc, held in sorted(self.partitioned.items())]

    def _check_partitions(self):
        for dc in list(self.partitioned):
            if dc in self._evicting:
                continue
            if self._share_offline(dc) <= self.partition_threshold:
                self._evicting[dc] = self._clock.callLater(
                    self.eviction_interval, self._evict_one, dc)

    def _evict_one(self, dc):
        self._evicting.pop(dc, None)
        held = self.partitioned.get(dc, [])
        if self._share_offline(dc) > self.partition_threshold:
            return  # partitioned again: wait for the next return
        while held and not self._offline(held[0]):
            held.pop(0)  # it came back: its machines were restored
        if held:
            self._spawn(self._reschedule_host(held.pop(0)), f"evicting from {dc}")
        if held:
            self._evicting[dc] = self._clock.callLater(
                self.eviction_interval, self._evict_one, dc)
        else:
            del self.partitioned[dc]
            self._partition_since.pop(dc, None)
            self.log.info("partition of datacenter {dc!r} over", dc=dc)
            self._spawn(self._data.hosts.produce_event(
                "partition", f"dc:{dc}", {"datacenter": dc, "state": "over",
                                          "held_hosts": [], "threshold": self.partition_threshold}),
                "publishing the end of a partition")

    async def _reschedule_host(self, host_id):
        """Place the stateless replicas of the lost C{host_id} elsewhere."""
        if not self._offline(host_id):
            return
        rows = await self._data.machines.find(host_id=host_id, states=("failed",))
        by_app = {}
        for row in rows:
            if row["spec"].get("volumes"):
                await self._note(row["id"], f"waiting for host {host_id}: its volumes live there",
                                 next_at=None)
                continue
            by_app.setdefault(row["app_id"], []).append(row["spec"]["replica"])

        async def one(app_id, replicas):
            try:
                await self._converger.reschedule(app_id, replicas, only_host=host_id)
            except errors.Unplaceable as e:
                self.log.warn("host {host} lost: replicas {r} of {app} not placed: {e}",
                              host=host_id, r=replicas, app=app_id, e=e.message)
                self._retry.add(host_id)

        # A few apps at a time: one app's store round trips overlap another's work (the
        # apps layer keeps each app's changes in order and places under one lock).
        limit = DeferredSemaphore(RESCHEDULE_CONCURRENCY)
        results = await DeferredList(
            [limit.run(lambda a=a, r=r: ensureDeferred(one(a, r)))
             for a, r in sorted(by_app.items())], consumeErrors=True)
        for ok, result in results:
            if not ok:
                result.raiseException()

    async def _host_back(self, host_id):
        if self._offline(host_id) or not self._replicas.executor_available(host_id):
            return
        for row in await self._data.machines.find(host_id=host_id, states=("failed", "stopped")):
            mid = row["id"]
            if mid in self._timers or mid in self._deciding:
                continue
            if (row.get("health") or {}).get("restart", {}).get("next_at") is not None:
                continue
            if row["state"] == "stopped":
                # stopped on purpose, it stays so; an exit (the guest powered off) reported
                # while the agent could not be called is decided now, as it would have been
                reason = await self._undecided_exit(row)
                if reason is not None and mid not in self._deciding:
                    self._deciding.add(mid)
                    await self._exited(mid, "stopped", reason)
                continue
            wanted = await self._wanted(row)
            if wanted is None:
                continue
            await self._schedule(row, wanted[1], row["state"], f"its host {host_id} came back")

    def _room_given_back(self, host_id):
        """A reservation on C{host_id} was given back: its held restarts are tried now."""
        if host_id in self._held.values():
            self._later(self._waiting, f"room:{host_id}", 0.0, self._room_on, host_id)

    async def _room_on(self, host_id):
        """Try now (not in up to L{HELD_RETRY} s) the restarts held for room on C{host_id}."""
        for mid in [m for m, h in self._held.items() if h == host_id]:
            del self._held[mid]  # those still held are found below
        for row in await self._data.machines.find(host_id=host_id, states=("stopped", "failed")):
            if ((row.get("health") or {}).get("restart") or {}).get("held"):
                self._held[row["id"]] = host_id
                self._later(self._timers, row["id"], 0.0, self._restart, row["id"])


def _same_version(spec):
    """A spec without its replica count (a scale does not make machines stale)."""
    return {k: v for k, v in (spec or {}).items() if k != "replicas"}


def _observe(d):
    out = Deferred()

    def fire(result):
        out.callback(None)
        return result

    d.addBoth(fire)
    return out
