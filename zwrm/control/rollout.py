"""
Deploying a spec: checked, stored, and rolled out.

Every update rolls (issue 15), with the defaults unless the spec's C{update} says
otherwise (L{zwrm.control.appspec.UPDATE_DEFAULTS}): the running machines of an older
version are replaced C{max_parallel} at a time (0: all at once, a plain converge), each
new machine healthy for C{min_healthy_time} within C{healthy_deadline} before the next
batch; a failed update is reverted (C{auto_revert}).  See L{Rollout.rolling}.

An update the control plane's stop interrupted (its last C{rollout} event C{started} or
C{progress}) is taken up again at the next start (L{Rollout.resume}).  A later deploy,
rollback or destroy of the app supersedes an update under way (L{Rollout.supersede}), as a
new job version cancels a Nomad deployment: the fix for a bad update need not wait out its
C{healthy_deadline}.
"""

from twisted.internet.defer import Deferred, DeferredList, FirstError
from twisted.python.failure import Failure

from zwrm import errors
from zwrm.control.appspec import (
    UPDATE_DEFAULTS,
    merge_spec,
    same_version,
    shutdown_delay,
    validate_spec,
)


class Superseded(errors.Conflict):
    """A rolling update was stopped for a later deploy, rollback or destroy of its app."""


class Rollout:
    """Deploys (a rolling update when running machines change version)."""

    def __init__(self, data, placements, replicas, converger, images):
        """
        @param data: the control plane's resource layer.
        @param placements: the L{zwrm.control.placements.Placements}.
        @param replicas: the L{zwrm.control.replicas.Replicas}.
        @param converger: the L{zwrm.control.converge.Converger}.
        @param images: the L{zwrm.control.appspec.ImageCheck}.
        """
        self._data = data
        self._placements = placements
        self._replicas = replicas
        self._converger = converger
        self._images = images
        self._under_way = {}  # app id -> Deferred that stops its rolling update (supersede)

    def updating(self, app_id):
        """Whether a rolling update of the app C{app_id} is under way."""
        return app_id in self._under_way

    def supersede(self, app_id, by):
        """
        Stop the rolling update of the app C{app_id} under way, if any, for C{by} (what
        supersedes it, e.g. C{"a later deploy"}): it stops waiting for its batch's new
        machines, removes them, is announced C{failed} ("superseded by ...") and its deploy
        fails with L{Superseded}; the app's lock is then free for what superseded it.  It
        is not reverted: what comes next decides the app's version.

        @return: whether there was one.
        """
        stop = self._under_way.get(app_id)
        if stop is None or stop.called:
            return False
        stop.callback(by)
        return True

    async def check(self, app, given, merge=True):
        """C{given} as L{deploy} would take it (merged, checked): the spec, or raises."""
        spec = validate_spec(merge_spec(app["spec"], given) if merge else given)
        await self._images.check(spec)
        return spec

    async def deploy(self, app, given, merge=True, **extra):
        """
        Deploy C{given} (over the current spec if C{merge}) to the app row C{app} (its lock
        held): checked, stored, converged; a rolling update if running machines change
        version.  C{extra} goes into the C{deployed} event.
        """
        if app["spec"] is None and given.get("image") is None:
            raise errors.InvalidArgument(
                f"app {app['name']!r} has no version yet: its first deploy needs an image "
                "(spec field image: NAME:TAG, or local paths)")
        spec = await self.check(app, given, merge)
        # The same spec again (a spec file applied twice) is no new version: the history
        # keeps the versions that differ, and a rollback goes to one.  It still converges.
        unchanged = spec == app["spec"] and not app.get("destroying") and not extra

        async def store_spec():
            if not unchanged:
                await self._data.apps.set_spec(app, spec, "deployed", **extra)

        # Every update rolls (issue 15), with the defaults unless the spec says otherwise;
        # max_parallel 0 replaces every machine at once.
        update = spec.get("update") or UPDATE_DEFAULTS
        if update["max_parallel"] and app["spec"] is not None:
            stale = [m for m in await self._data.machines.find(app_id=app["id"],
                                                               states=("running",))
                     if m["spec"]["replica"] < spec["replicas"]
                     and not same_version(m["spec"].get("app_spec"), spec)]
            if stale:
                return await self.rolling(app, dict(app["spec"]), spec, stale, store_spec)
        await self._converger.converge(app, spec, replace=True, store_spec=store_spec)

    @staticmethod
    async def _until_stopped(stop, wait):
        """
        Await C{wait} (a coroutine that only waits: cancelling it changes nothing), unless
        C{stop} (L{supersede}'s Deferred, or L{None}) fires first: then C{wait} is
        cancelled and L{Superseded} raised.
        """
        waiting = Deferred.fromCoroutine(wait)
        first = Deferred()

        def settle(which, value):
            if not first.called:
                first.callback((which, value))
            return None if which == "wait" else value  # (the wait's outcome is taken)

        waiting.addBoth(lambda outcome: settle("wait", outcome))
        if stop is not None:
            stop.addCallback(lambda by: settle("stop", by))
        which, value = await first
        if which == "stop":
            waiting.cancel()
            raise Superseded(value)
        if isinstance(value, Failure):
            value.raiseException()
        return value

    async def interrupted(self, app):
        """
        The last C{rollout} event of C{app} (a row) if it says an update is under way
        (C{started}, C{progress}): one a control plane stop interrupted, when no update
        runs in this one.  Else L{None}.
        """
        last = await self._data.apps.last_rollout(app)
        if last is not None and last.get("state") in ("started", "progress"):
            return last
        return None

    async def resume(self, app, last):
        """
        Take up the update of C{app} (a row; its lock held) that a control plane stop
        interrupted (C{last}: its last C{rollout} event's payload, L{interrupted}).

        A new machine that runs (or starts) beside an old one of its replica was in the
        batch under way: it had not yet been healthy for C{min_healthy_time} (or its old
        one would be gone), so it is waited for again, as one replaced in place is, and its
        old one retired once it has been (out of the routes for the spec's
        C{shutdown_delay}, then removed); it is not made again (Kubernetes' and Nomad's
        updates keep theirs too).  One still C{pending} (its start may never have reached
        its agent) is retired and its replica replaced again.  The old machines left are
        then replaced as L{rolling} does (announced C{started} again, saying it resumed),
        with the spec they run as the one a failure reverts to.  With none left, the
        update is announced C{completed}.

        @return: whether there was anything to take up.
        @raise zwrm.errors.Unavailable: the update failed (as L{rolling}).
        """
        spec, version = app["spec"], app.get("spec_version")
        update = (spec or {}).get("update") or UPDATE_DEFAULTS
        if spec is None or last.get("version") != version:
            # a later deploy or rollback (stored, then stopped before it rolled) replaced it
            await self._data.apps.rollout(
                app, "failed", f"the update of {app['name']} to version {last.get('version')} "
                "was interrupted by a control plane stop, and its spec has since changed",
                version=last.get("version"), replaced=last.get("replaced", 0),
                total=last.get("total", 0), update=last.get("update") or update)
            return True
        machines = await self._data.machines.find(app_id=app["id"])
        old = [m for m in machines if m["state"] == "running"
               and not same_version(m["spec"].get("app_spec"), spec)]
        old_replicas = {m["spec"]["replica"] for m in old}
        halfway = [m for m in machines if m["state"] in ("pending", "starting", "running")
                   and m["spec"]["replica"] in old_replicas
                   and same_version(m["spec"].get("app_spec"), spec)]
        kept = [m for m in halfway if m["state"] in ("starting", "running")] \
            if update["max_parallel"] else []
        # (a planned stop: one that runs may be in the routes already)
        await self._replicas.retire([m for m in halfway if m not in kept],
                                    shutdown_delay(spec))
        stale = [m for m in old if m["spec"]["replica"] < spec["replicas"]]
        kept_replicas = {m["spec"]["replica"] for m in kept}
        kept_old = [m for m in stale if m["spec"]["replica"] in kept_replicas]
        stale = [m for m in stale if m["spec"]["replica"] not in kept_replicas]
        if not update["max_parallel"]:
            await self._converger.converge(app, spec, replace=True)
            total = last.get("total", 0)
            await self._data.apps.rollout(
                app, "completed", f"version {version} rolled out: {total} machine(s) replaced "
                "(taken up after a control plane stop)", version=version, replaced=total,
                total=total, update=update)
            return True
        if stale or kept_old:
            old_spec = dict((stale or kept_old)[0]["spec"].get("app_spec") or spec)
        else:  # the spec a failure reverts to: the version before
            versions = {v["version"]: v["spec"]
                        for v in await self._data.apps.spec_versions(app["id"])}
            old_spec = dict(versions.get(version - 1) or spec)
        await self.rolling(app, old_spec, spec, stale, None, resumed=True,
                           replaced=max(0, last.get("total", 0) - len(stale) - len(kept_old)),
                           kept_old=kept_old)
        return True

    async def rolling(self, app, old_spec, spec, stale, store_spec, resumed=False, replaced=0,
                      kept_old=()):
        """
        A rolling update (the spec's C{update}: C{max_parallel}, C{min_healthy_time},
        C{healthy_deadline}, C{auto_revert}): the new spec is stored, the replicas that do
        not run an old version are converged at once, then the running old ones are
        replaced C{max_parallel} at a time.  A replica without volumes gets its new machine
        first (on any host) and loses the old one only once the new one has been healthy
        for C{min_healthy_time} within C{healthy_deadline}; one with volumes is replaced in
        place (its volumes pin it).  If a new machine does not become healthy, the update
        stops: its new machines are removed and, with C{auto_revert}, the previous version
        is deployed again (the old machines not yet replaced never stopped).

        @param resumed: it is taken up after a control plane stop (L{resume}), which had
            C{replaced} machines replaced (counted in what is announced); C{kept_old}: the
            old machines whose new one it had started (retired once their new ones have
            been healthy for C{min_healthy_time}).
        @raise zwrm.errors.Unavailable: the update failed (saying whether it was reverted).
        @raise Superseded: a later deploy, rollback or destroy stopped it (L{supersede}).
        """
        placements = self._placements
        update = spec.get("update") or UPDATE_DEFAULTS
        stale.sort(key=lambda m: m["spec"]["replica"])
        old_replicas = {m["spec"]["replica"] for m in stale}
        # The whole new state must fit (as a converge checks) before anything changes.
        await placements.lock.acquire()
        try:
            lent = placements.lend(stale)
            try:
                for _, placement, _ in await placements.plan_all(app, spec,
                                                                 sorted(old_replicas)):
                    placements.unplace(placement)
            finally:
                placements.give_back(lent)
        finally:
            placements.lock.release()
        if store_spec is not None:
            await store_spec()
        version, total = app["spec_version"], replaced + len(kept_old) + len(stale)

        def announce(state, reason, done):
            return self._data.apps.rollout(app, state, reason, version=version,
                                           replaced=done, total=total, update=update)

        if resumed:
            started = (f"rolling update to version {version} taken up again after a control "
                       f"plane stop: {replaced} of {total} machine(s) replaced, "
                       f"{update['max_parallel']} at a time (its new machines healthy for "
                       f"{update['min_healthy_time']:g}s first)")
        else:
            started = (f"rolling update to version {version}: {total} machine(s), "
                       f"{update['max_parallel']} at a time")
        stop = self._under_way[app["id"]] = Deferred()
        try:
            await announce("started", started, replaced)
            await self._roll(app, old_spec, spec, stale, update, announce, stop, resumed,
                             replaced, kept_old)
        finally:
            if self._under_way.get(app["id"]) is stop:
                del self._under_way[app["id"]]

    async def _roll(self, app, old_spec, spec, stale, update, announce, stop, resumed=False,
                    before=0, kept_old=()):
        """
        L{rolling}'s batches, once announced C{started}; C{stop}: L{supersede}'s.  Taken up
        after a control plane stop (C{resumed}), the machines of the new version are waited
        for first as a batch is: one replaced in place, or started beside its old one
        (C{kept_old}, retired then), when the stop cut its wait short is healthy before the
        update goes on (or ends).  C{before}: machines the update had replaced before that
        stop.
        """
        converge = self._converger.converge
        version, total = app["spec_version"], before + len(kept_old) + len(stale)
        old_replicas = {m["spec"]["replica"] for m in list(stale) + list(kept_old)}
        rest = set(range(max(spec["replicas"], old_spec["replicas"]))) - old_replicas
        if rest:
            await converge(app, spec, replace=True, only=rest)
        n = update["max_parallel"]
        steps = [(0, None)] if resumed else []
        steps += [(start, stale[start:start + n]) for start in range(0, len(stale), n)]
        for start, batch in steps:
            start += before
            try:
                if stop.called:
                    raise Superseded(stop.result)
                if batch is None:
                    await self._wait_new(await self._new_machines(app, spec), update, stop)
                    if kept_old:
                        await self._retire_fresh(kept_old, spec)
                        before += len(kept_old)
                        if before < total:
                            await announce("progress", f"{before} of {total} machine(s)"
                                                       " replaced", before)
                    continue
                await self._replace_batch(app, spec, batch, update, stop)
            except Superseded as e:
                message = (f"the update of {app['name']} to version {version} was superseded "
                           f"by {e.message} ({start} of {total} machine(s) replaced; the new "
                           "machines of its batch under way removed)")
                await announce("failed", message, start)
                raise Superseded(message) from None
            except errors.ZwrmError as e:
                reason = e.message
                if update["auto_revert"]:
                    revert = dict(old_spec)
                    await self._data.apps.set_spec(app, revert, "deployed", reverted=True,
                                                   reason_detail=reason)
                    try:
                        await converge(app, revert, replace=True)
                    finally:
                        message = (f"the update of {app['name']} failed ({reason}); reverted "
                                   f"to the previous version (now version "
                                   f"{app['spec_version']})")
                        await announce("reverted", message, start)
                    raise errors.Unavailable(message) from None
                message = f"the update of {app['name']} stopped ({reason})"
                await announce("failed", message, start)
                raise errors.Unavailable(message) from None
            done = start + len(batch)
            if done < total:
                await announce("progress", f"{done} of {total} machine(s) replaced", done)
        await announce("completed", f"version {version} rolled out: {total} machine(s) "
                                    "replaced", total)

    async def _replace_batch(self, app, spec, batch, update, stop=None):
        """
        Replace the old machines of C{batch} (see L{rolling}); C{stop} (L{supersede}'s
        Deferred) ends the wait for the new ones with L{Superseded}.
        """
        placements, replicas = self._placements, self._replicas
        surge = [m for m in batch if not m["spec"]["volumes"]]
        in_place = [m for m in batch if m["spec"]["volumes"]]
        new_rows = []
        if surge:
            await placements.lock.acquire()
            try:
                planned = await placements.plan_all(app, spec,
                                                    [m["spec"]["replica"] for m in surge])
            except errors.Unplaceable:
                planned = None  # no room beside the old machines: replaced in place
            finally:
                placements.lock.release()
            if planned is None:
                surge, in_place = [], batch
                planned = []
            for replica, placement, volumes in planned:
                new_rows.append(await replicas.store_replica(app, spec, replica, placement,
                                                             volumes))
        if in_place:
            for m in in_place:
                await self._converger.converge(app, spec, replace=True,
                                               only={m["spec"]["replica"]})
            numbers = {m["spec"]["replica"] for m in in_place}
            new_rows += [r for r in await self._data.machines.find(app_id=app["id"])
                         if r["spec"]["replica"] in numbers and r["id"] not in
                         {m["id"] for m in in_place}]
        if surge:
            await replicas.start_all(new_rows[:len(surge)])
        await self._wait_new(new_rows, update, stop)
        await self._retire_fresh(surge, spec)

    async def _retire_fresh(self, machines, spec):
        """
        The old C{machines} whose new ones are healthy, as they are stored now (those gone
        meanwhile left out): a planned stop, out of the routes for the app's
        C{shutdown_delay}, then removed.
        """
        old = []
        for m in machines:
            fresh = await self._data.machines.get(m["id"])
            if fresh is not None:
                old.append(fresh)
        await self._replicas.retire(old, shutdown_delay(spec))

    async def _new_machines(self, app, spec):
        """The machines of C{app} that run C{spec} or are starting it."""
        return [m for m in await self._data.machines.find(app_id=app["id"])
                if m["state"] in ("pending", "starting", "running")
                and same_version(m["spec"].get("app_spec"), spec)]

    async def _wait_new(self, new_rows, update, stop=None):
        """
        Wait for each of C{new_rows} to be healthy for C{min_healthy_time} within
        C{healthy_deadline} (all at once: a batch, or the machines a resumed update waits
        for, takes one C{min_healthy_time}); if one is not, they are removed and its error
        raised.
        """
        try:
            # a new machine its restart policy restarts meanwhile (it failed, or its health
            # check did) is restarted at once, not after this wait (zwrm.control.converge)
            async with self._converger.awaiting([row["id"] for row in new_rows]):
                await self._until_stopped(stop, self._all_healthy(new_rows, update))
        except errors.ZwrmError:
            for row in new_rows:
                fresh = await self._data.machines.get(row["id"])
                if fresh is not None:
                    await self._replicas.remove_machine(fresh)
            raise

    async def _all_healthy(self, rows, update):
        waits = [Deferred.fromCoroutine(self._data.machines.wait_healthy(
            row["id"], update["healthy_deadline"], update["min_healthy_time"],
            through_restarts=True)) for row in rows]
        try:
            await DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)
        except FirstError as e:
            for wait in waits:
                wait.cancel()
            e.subFailure.raiseException()
