"""
Converging an app's machines to its spec: missing replicas placed and started, extra,
stale and down ones removed; scaling, destroying an app, and placing again the replicas
of a lost host (L{Converger.reschedule}, for the healer).

A request that fails changes nothing that was there.  A converge places every missing
replica (all or nothing) I{before} it removes a machine or stores the new spec: the
capacity of the machines it will remove is lent to the placement and given back if the
placement fails.  So a scale or deploy refused because a volume's host is unreachable
leaves the app's spec and its machines' records as they were, and when the host returns
its machines are restored to running (not stopped as unknown).

Concurrency.  The deploys, scales and destroys of one app run one at a time, in the order
they were called (L{Converger.in_app_order}: a lock per app, held for the whole converge,
starts included).  Those of different apps overlap: a converge holds the one placement
lock of the control plane only while it places its missing replicas (all or nothing) and
stores them as C{pending} machines with their reservations; the agents' C{machine.start}
calls run after it let go, so a slow host delays only the app that has a machine there.

A control plane that stops between storing a C{pending} machine and its agent's first
report leaves that machine C{pending}; after a restart its capacity stays reserved
(L{zwrm.control.placements.Placements.load}) and the app's next converge rolls it back
(failed, destroyed, placed again) unless its agent has reported it since.
"""

import math
from contextlib import asynccontextmanager

from twisted.internet.defer import Deferred, DeferredList

from zwrm import errors
from zwrm.control.appspec import same_version, shutdown_delay
from zwrm.control.replicas import in_key_order
from zwrm.control.resources.machines import LIVE


class Converger:
    """Converges apps to their specs, one app at a time."""

    def __init__(self, data, placements, replicas, volumes):
        """
        @param data: the control plane's resource layer.
        @param placements: the L{zwrm.control.placements.Placements}.
        @param replicas: the L{zwrm.control.replicas.Replicas}.
        @param volumes: the L{zwrm.control.app_volumes.AppVolumes} (an app destroyed with
            its volumes).
        """
        self._data = data
        self._placements = placements
        self._replicas = replicas
        self._volumes = volumes
        self._app_locks = {}  # app name -> DeferredLock: its deploys, scales, destroys in order
        self._awaited = {}  # machine id -> [Deferred]: work run while its app's lock awaits it

    def in_app_order(self, name, fn, *args):
        """
        Run C{fn(*args)} after every deploy, scale or destroy already under way for the
        app called C{name}.
        """
        return in_key_order(self._app_locks, name, fn, *args)

    def busy(self, name):
        """
        Whether a deploy, scale, destroy (or other work in its order) of the app called
        C{name} is under way or waiting.
        """
        return name in self._app_locks

    @asynccontextmanager
    async def awaiting(self, machine_ids):
        """
        The holder of an app's lock waits for its new machines C{machine_ids} to become
        healthy (a rolling update, L{zwrm.control.rollout.Rollout}): meanwhile the healer's
        restarts of those machines run at once (L{run_awaited}) instead of queueing behind
        the update that waits for them (they would run only after its deadline, with
        the machine down all along); when the wait ends, those under way are waited for,
        so that what the holder does next (removing the machines) never overlaps one.
        """
        for mid in machine_ids:
            self._awaited[mid] = []
        try:
            yield
        finally:
            running = [d for mid in machine_ids for d in self._awaited.pop(mid, ())]
            if running:
                await DeferredList(running)

    def run_awaited(self, machine_id, fn, *args):
        """
        Run C{fn(*args)} (a coroutine function) now if the holder of C{machine_id}'s app lock
        is waiting for it (L{awaiting}).

        @return: a Deferred of C{fn}'s result, or L{None} if nothing awaits C{machine_id}
            (then run it in the app's order: L{in_app_order}).
        """
        runs = self._awaited.get(machine_id)
        if runs is None:
            return None
        d = Deferred.fromCoroutine(fn(*args))
        ended = Deferred()
        runs.append(ended)

        def end(result):
            ended.callback(None)
            return result

        return d.addBoth(end)

    async def scale(self, app, replicas):
        """Converge the app row C{app} to its spec with C{replicas} replicas (its lock held)."""
        if app["spec"] is None:
            raise errors.Conflict(f"app {app['name']!r} was never deployed")
        spec = dict(app["spec"], replicas=replicas)
        unchanged = spec == app["spec"]  # the count it has: no new version (as a deploy)

        async def store_spec():
            if not unchanged:
                await self._data.apps.set_spec(app, spec, "scaled", replicas=replicas)

        await self.converge(app, spec, replace=False, store_spec=store_spec)

    async def destroy(self, app, volumes):
        """
        Destroy every machine of the app row C{app} and the app (its lock held); its volumes
        too only if C{volumes}.

        The destroy is stored first (the app's C{destroying}:
        L{zwrm.control.resources.apps.Apps.set_destroying}), and from then on it only goes
        forward: the healer neither restarts nor places again the app's machines, a deploy
        or scale is refused, and what a stop of the control plane or an unreachable host
        interrupts is carried out later (L{go_on}).  The
        machines that can be removed now are (a planned stop: out of the routes, the app's
        C{shutdown_delay}, then removed); one live on a host that cannot be reached waits
        for its host's return, or for its host to be found offline (it is failed then,
        and only its row goes: its host's agent is told to destroy it when it returns,
        L{zwrm.control.registry.HostRegistry.reconcile}).  A volume waits for its host.

        @return: C{{"machines": [...], "volumes": [...]}} destroyed.
        @raise zwrm.errors.Unavailable: a machine or volume is on a host that cannot be
            reached; what could be removed was, and the rest is removed once it can be.
        """
        await self._data.apps.set_destroying(app, volumes, shutdown_delay(app["spec"]))
        return await self._carry_out(app)

    async def go_on(self, name):
        """
        Carry on with the destroy of the app called C{name} (its lock held), stored
        C{destroying} by a destroy that did not end: a stop of the control plane cut it
        short, or a host it waits for could not be reached.

        @return: as L{destroy}'s, or L{None} if the app is gone or no longer destroying.
        """
        try:
            app = await self._data.apps.by_name(name)
        except errors.NotFound:
            return None
        if not app.get("destroying"):
            return None
        return await self._carry_out(app)

    def waiting(self, machines):
        """
        Those of C{machines} (rows) that a destroy cannot remove yet: live on a host that
        cannot be reached.
        """
        return [m for m in machines
                if m["state"] in LIVE and not self._replicas.executor_available(m["host_id"])]

    async def can_go_on(self, app):
        """
        Whether the destroy under way of the app row C{app} can do anything now: remove a
        machine, or (none left) delete a volume whose host can be reached, or end.
        """
        machines = await self._data.machines.find(app_id=app["id"])
        if machines:
            return len(self.waiting(machines)) < len(machines)
        if app["destroying"]["volumes"]:
            vols = await self._data.volumes.find(app_id=app["id"])
            return not vols or any(self._replicas.executor_available(v["host_id"])
                                   for v in vols)
        return True

    async def _carry_out(self, app):
        volumes = app["destroying"]["volumes"]
        machines = await self._data.machines.find(app_id=app["id"])
        for m in machines:
            if m["state"] == "stopping" and not self._replicas.executor_available(
                    m["host_id"]) and self._replicas.host_offline(m["host_id"]):
                # Out of the routes since before a restart of the control plane, on a host
                # found offline since: failed, as its host's running machines were, so
                # that only its row goes (its host, back, is told to destroy it).
                await self._replicas.set_machine(m, "host offline", state="failed")
        later = self.waiting(machines)
        # A planned stop: out of the routes, the app's shutdown_delay, then removed. Those
        # still out of the routes from before a restart wait what is left of their delay
        # (a record of a zwrm before delay_ends: all of it).
        gone = await self._replicas.retire([m for m in machines if m not in later],
                                           shutdown_delay(app["spec"]),
                                           ends=app["destroying"].get("delay_ends", math.inf))
        if later:
            hosts = sorted({m["host_id"] for m in later})
            raise errors.Unavailable(
                f"app {app['name']!r} is being destroyed: {len(gone)} machine(s) removed;"
                f" {', '.join(m['id'] for m in later)} on host(s) {', '.join(hosts)}, which"
                " cannot be reached, are removed once their host returns or is found offline")
        vols, far = [], []
        if volumes:
            for v in await self._data.volumes.find(app_id=app["id"]):
                if not self._replicas.executor_available(v["host_id"]):
                    far.append(v)
                    continue
                await self._volumes.destroy(v)
                vols.append(v["id"])
            if far:
                hosts = sorted({v["host_id"] for v in far})
                raise errors.Unavailable(
                    f"app {app['name']!r} is being destroyed: {len(gone)} machine(s) and"
                    f" {len(vols)} volume(s) removed; {', '.join(v['id'] for v in far)} on"
                    f" host(s) {', '.join(hosts)}, which cannot be reached, are deleted once"
                    " their host returns")
        elif await self._data.volumes.find(app_id=app["id"]):
            # The app stays, without a spec, so its volumes keep an owner.
            await self._data.apps.set_spec(app, None, "destroyed", volumes_kept=True)
            return {"machines": gone, "volumes": [], "app_kept_for_volumes": True}
        # its snapshot schedule with it (nothing of the app is left to snapshot)
        await self._data.apps.delete(app, await self._data.volumes.get_schedule(app["id"]),
                                     self._data.volumes)
        return {"machines": gone, "volumes": vols}

    async def reschedule(self, app_id, replicas, only_host=None):
        """
        Place replicas C{replicas} of the app C{app_id} again (their machines failed: their
        host was lost), elsewhere if need be, leaving its other replicas alone; in the
        app's order.  Replicas whose machine is no longer failed (on C{only_host}, if
        given) are skipped.

        @raise zwrm.errors.Unplaceable: one does not fit; nothing was changed.
        """
        app = await self._data.apps.by_id(app_id)
        if app is None:
            return
        return await self.in_app_order(app["name"], self._reschedule, app["name"],
                                       set(replicas), only_host)

    async def _reschedule(self, name, replicas, only_host):
        app = await self._data.apps.by_name(name)
        spec = app["spec"]
        if spec is None or app.get("destroying"):
            return
        rows = await self._data.machines.find(app_id=app["id"], states=("failed",))
        only = {m["spec"]["replica"] for m in rows
                if m["spec"]["replica"] in replicas and m["spec"]["replica"] < spec["replicas"]
                and (only_host is None or m["host_id"] == only_host)}
        if only:
            await self.converge(app, spec, replace=False, only=only)

    async def converge(self, app, spec, replace, store_spec=None, only=None):
        """
        Converge C{app}'s machines to C{spec} (the caller holds the app's lock).

        First, under the placement lock, place every missing replica (all or nothing),
        lending it the capacity of the machines that will go (extra, stale, failed, or
        stored by a control plane that restarted before their start was confirmed).  If
        that fails, the capacity is given back and nothing has changed.  Then remove the
        machines that go, call C{store_spec} (it stores the new spec), store the placed
        replicas as C{pending} machines holding their reservations, and start them on their
        hosts outside the placement lock.  With C{only} (a set of replica numbers), only
        those replicas are looked at.
        """
        placements, replicas = self._placements, self._replicas
        if only is None:
            rows = await self._data.machines.find(app_id=app["id"])
        else:  # those replicas' rows only (an app may have thousands)
            rows = await self._data.machines.find(app_id=app["id"], replicas=only)
        going, kept = [], set()
        for m in rows:
            if m["state"] not in LIVE and m["state"] not in ("failed", "stopped"):
                continue
            replica = m["spec"]["replica"]
            if only is not None and replica not in only:
                continue
            unconfirmed = m["state"] == "pending" and m["id"] in placements.unconfirmed
            stale = replace and not same_version(m["spec"].get("app_spec"), spec)
            down = m["state"] in ("failed", "stopped")  # replaced (a guest that powered off)
            if replica >= spec["replicas"] or stale or down or unconfirmed:
                going.append((m, unconfirmed))
            else:
                kept.add(replica)
        missing = [i for i in range(spec["replicas"])
                   if i not in kept and (only is None or i in only)]
        await placements.lock.acquire()
        try:
            lent = placements.lend([m for m, _ in going])
            try:
                planned = await placements.plan_all(app, spec, missing)
            except BaseException:
                placements.give_back(lent)
                raise
        finally:
            placements.lock.release()
        taken = []
        try:
            # A planned stop: the running ones go out of the routes for the shutdown_delay.
            taken = await replicas.take_out([m for m, unconfirmed in going if not unconfirmed],
                                            shutdown_delay(spec))
            for m, unconfirmed in going:
                if unconfirmed:
                    await replicas.set_machine(
                        m, "the control plane restarted before its start was confirmed",
                        state="failed")
                await replicas.remove_machine(m)
                lent.pop(m["id"], None)
        except BaseException:
            await replicas.put_back(taken)  # those not removed route again
            for _, placement, _ in planned:
                placements.release_placement(placement)
            placements.give_back(lent)
            raise
        stored = []
        try:
            if store_spec is not None:
                await store_spec()
            for replica, placement, volumes in planned:
                stored.append(await replicas.store_replica(app, spec, replica, placement,
                                                           volumes))
        except BaseException:
            for _, placement, _ in planned[len(stored):]:
                placements.release_placement(placement)
            raise
        await replicas.start_all(stored)
