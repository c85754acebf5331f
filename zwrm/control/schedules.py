"""
Snapshot schedules, kept and run by the control plane: every C{every} seconds each volume of
an app is snapshotted on its host (C{scheduled-<time>}), its oldest scheduled snapshots pruned
to C{keep}, and with C{replicate} the new snapshot copied to another host as a replica (its
oldest scheduled replicas there pruned to C{keep}), as C{zwrm volumes snapshot --app APP --keep N [--replicate]} does; so an
app's recovery point needs no timer outside the cluster (as Incus's C{snapshots.schedule} and
Proxmox VE's replication jobs).

A schedule is one row per app (C{snapshot_schedules}, L{zwrm.control.resources.volumes}): its
first run is at once, then one every C{every} seconds after the last began; runs a stopped
control plane missed are one run at its next start (not one per period). Up to
L{RUNS_AT_ONCE} schedules run at once (a slow copy of one app's volume holds no other app's
back), but on each host one volume at a time (a snapshot and its copy load the host's disk
and CPU, beside its machines; as Proxmox VE runs one replication job at a time per node).
A run goes through its app's volumes one after the other; a volume that cannot be
snapshotted or replicated now (its host drains or is away, another snapshot operation on it
is under way) is said in the run's C{last_error} and the others are taken all the same; the
next run tries again. Each run's
end is stored, then announced (C{snapshot_schedule_run} on C{zwrm.event.machine}); the
volumes' own events say what each step did. The control plane's C{/metrics} give, per volume,
the time of its newest snapshot and replica: the recovery point to alert on.
"""

from autobahn import wamp
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredLock,
    DeferredSemaphore,
    ensureDeferred,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from zwrm import errors
from zwrm.control.app_volumes import MAX_KEEP
from zwrm.control.appspec import check_name, error_text

PREFIX = "scheduled-"
"""The names of a schedule's snapshots: C{scheduled-YYYYMMDD-HHMMSS}; its C{keep} counts and
prunes only those (a snapshot taken by hand, C{before-upgrade}, is never pruned by it)."""
MIN_EVERY = 60.0
"""The shortest period: a minute."""
MAX_EVERY = 30 * 86400.0
"""The longest period: thirty days."""
RUNS_AT_ONCE = 4
"""Schedules run at once (each host still takes one volume at a time)."""


class SnapshotSchedules:
    """
    The schedules (C{zwrm.volume.schedule|schedules|unschedule}) and their runs.

    @ivar runs: how many runs ended since this object was made.
    """

    log = Logger()

    def __init__(self, clock, apps):
        """
        @param clock: an L{IReactorTime}: when runs are due.
        @param apps: the L{zwrm.control.apps.Apps} (its resource layer, C{apps.data}; its
            volumes' snapshots and replicas, C{apps.volumes}).
        """
        self._clock = clock
        self._apps = apps
        self._data = apps.data
        self._volumes = apps.volumes
        self._timer = None
        self._working = None  # the Deferred of the runs under way
        self._stopped = False
        self._host_locks = {}  # host id -> DeferredLock: one volume's step at a time there
        self.runs = 0

    # -- the operator's procedures ------------------------------------------------------

    @wamp.register("zwrm.volume.schedule")
    async def schedule(self, app, every, keep=None, replicate=False):
        """
        Snapshot every volume of C{app} every C{every} seconds (from 60 to 30 days), the
        first at once; with C{keep}, its last C{keep} snapshots are kept (and replicas on
        each host); with C{replicate}, each new snapshot is copied to another host (the one
        that keeps the volume's newest replica, else the scheduler's pick). Replaces the
        app's schedule if it has one.

        @return: the schedule's row.
        """
        check_name(app, "app name")
        if not isinstance(every, int | float) or isinstance(every, bool) or \
                not MIN_EVERY <= every <= MAX_EVERY:
            raise errors.InvalidArgument(
                f"every must be from {MIN_EVERY:g} to {MAX_EVERY:g} seconds, not {every!r}",
                argument="every")
        if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool)
                                 or not 1 <= keep <= MAX_KEEP):
            raise errors.InvalidArgument(f"keep must be a whole number from 1 to {MAX_KEEP}, "
                                         f"not {keep!r}", argument="keep")
        if not isinstance(replicate, bool):
            raise errors.InvalidArgument(f"replicate must be true or false, not {replicate!r}",
                                         argument="replicate")
        row = await self._data.apps.by_name(app)
        now = self._clock.seconds()
        old = await self._data.volumes.get_schedule(row["id"])
        schedule = {"id": row["id"], "app_id": row["id"], "every": float(every), "keep": keep,
                    "replicate": int(replicate), "next_at": now,
                    "last_at": old["last_at"] if old else None,
                    "last_error": old["last_error"] if old else None,
                    "created_at": old["created_at"] if old else now}
        await self._data.volumes.set_schedule(
            schedule, f"every {every:g}s" + (f", the last {keep} kept" if keep else "")
            + (", replicated" if replicate else ""))
        self._arm()
        return self._wire(schedule, row["name"])

    @wamp.register("zwrm.volume.schedules")
    async def schedules(self):
        """Every app's snapshot schedule, the next due first."""
        out = []
        for s in await self._data.volumes.find_schedules():
            app = await self._data.apps.by_id(s["app_id"])
            out.append(self._wire(s, app["name"] if app else None))
        return out

    @wamp.register("zwrm.volume.unschedule")
    async def unschedule(self, app):
        """Stop snapshotting C{app}'s volumes on a schedule (its snapshots stay)."""
        check_name(app, "app name")
        row = await self._data.apps.by_name(app)
        schedule = await self._data.volumes.get_schedule(row["id"])
        if schedule is None:
            raise errors.NotFound(f"app {app!r} has no snapshot schedule", argument="app")
        await self._data.volumes.delete_schedule(schedule, "unscheduled on request")
        self._arm()
        return self._wire(schedule, app)

    @staticmethod
    def _wire(row, app_name):
        return dict(row, app=app_name, replicate=bool(row["replicate"]))

    # -- running them -------------------------------------------------------------------

    def start(self):
        """Arm the timer for the next run due (at the control plane's start)."""
        self._stopped = False
        self._arm()

    def stop(self):
        """No run starts from now on (one under way ends its current volume's step)."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _arm(self):
        """Set the timer to the next run due (read from the store), unless one works."""
        if self._stopped or self._working is not None:
            return
        ensureDeferred(self._arm_from_store()).addErrback(
            lambda f: errors.log_failure(self.log, f, "snapshot schedules"))

    async def _arm_from_store(self):
        rows = await self._data.volumes.find_schedules()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not rows or self._stopped or self._working is not None:
            return
        delay = max(0.0, min(r["next_at"] for r in rows) - self._clock.seconds())
        self._timer = self._clock.callLater(delay, self._due)

    def _due(self):
        self._timer = None
        if self._stopped or self._working is not None:
            return
        self._working = ensureDeferred(self.run_due())
        self._working.addErrback(lambda f: errors.log_failure(self.log, f, "snapshot schedules"))

        def done(_):
            self._working = None
            self._arm()

        self._working.addBoth(done)

    async def run_due(self):
        """
        Run every schedule that is due now, up to L{RUNS_AT_ONCE} at once, the next due
        first. @return: how many.
        """
        now = self._clock.seconds()
        due = [row for row in await self._data.volumes.find_schedules()
               if row["next_at"] <= now]
        at_once = DeferredSemaphore(RUNS_AT_ONCE)
        started = []

        def one(row):
            if self._stopped:
                return None
            started.append(row["id"])
            d = ensureDeferred(self.run(row))
            d.addErrback(lambda f: errors.log_failure(
                self.log, f, "snapshot schedule of app {app}", app=row["app_id"]))
            return d

        await DeferredList([at_once.run(one, row) for row in due])
        return len(started)

    async def run(self, row):
        """
        One run of the schedule C{row}: each of its app's volumes snapshotted (and
        replicated), then the run's end stored and announced.
        """
        started = self._clock.seconds()
        app = await self._data.apps.by_id(row["app_id"])
        if app is None:
            await self._data.volumes.delete_schedule(row, "its app is gone")
            return
        failed = []
        volumes = await self._data.volumes.find(app_id=row["app_id"], order_by="name, replica")
        for volume in volumes:
            if self._stopped:
                break
            failed += await self._volume(volume, row)
        if self._stopped:  # (its store may be closed): the next start runs it again
            self.log.info("snapshot schedule of app {app}: the control plane stopped during "
                          "its run; it runs again at the next start", app=app["name"])
            return
        self.runs += 1
        error = "; ".join(failed) or None
        if error is None and not volumes:
            error = "the app has no volumes"
        # The next run: a period after this one began (one run, not one per missed period).
        next_at = max(started + row["every"], self._clock.seconds())
        fields = {"last_at": started, "last_error": error, "next_at": next_at}
        try:
            await self._data.volumes.schedule_ran(
                row, fields, f"{len(volumes) - len(failed)} of {len(volumes)} volume(s) taken")
        except errors.NotFound:
            pass  # unscheduled meanwhile
        if error is not None:
            self.log.warn("snapshot schedule of app {app}: {e}", app=app["name"], e=error)

    async def _volume(self, volume, row):
        """
        Snapshot (and replicate) one volume, once no other schedule's step works on its
        host. @return: what failed, as lines.
        """
        lock = self._host_locks.setdefault(volume["host_id"], DeferredLock())
        await lock.acquire()
        try:
            if self._stopped:
                return []
            return await self._volume_now(volume, row)
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._host_locks.pop(volume["host_id"], None)

    async def _volume_now(self, volume, row):
        keep = row["keep"]
        try:
            snap = await self._volumes.snapshot(volume, None, keep=keep, prefix=PREFIX)
        except Exception as e:
            return [f"{volume['id']}: not snapshotted: {self._said(e)}"]
        if not row["replicate"]:
            return []
        try:
            await self._volumes.replicate(volume, snap, None, keep=keep, prefix=PREFIX)
        except Exception as e:
            return [f"{volume['id']}: snapshot {snap['name']} taken, not replicated: "
                    f"{self._said(e)}"]
        return []

    def _said(self, e):
        """What failed (a L{errors.ZwrmError}'s message; anything else is a bug: logged)."""
        if isinstance(e, errors.ZwrmError):
            return e.message
        if not self._stopped:  # (else its store closed under it: the run is not stored)
            errors.log_failure(self.log, Failure(e), "a scheduled snapshot")
        return error_text(e)

    def idle(self):
        """A Deferred that fires once no run is under way (for tests and the stop)."""
        if self._working is None:
            d = Deferred()
            d.callback(None)
            return d
        d = Deferred()
        self._working.addBoth(lambda r: (d.callback(None), r)[1])
        return d

