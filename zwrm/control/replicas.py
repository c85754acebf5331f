"""
The machines of apps, one at a time: stored (a new replica and its volumes), started on
their host, changed in order with their agents' reports, and removed.

Every change goes through an update method of the resource layer (the machines and
volumes resources), which stores it, then publishes one canonical event on
C{zwrm.event.machine}; each machine's reservation follows its state
(L{zwrm.control.placements.Placements.machine_changed}).

Machine reports are ordered: the changes of one machine apply in arrival order (a lock
per machine, taken before any await) and only from the machine's own host.

A planned stop (a rolling update's old machine, a scale down, a destroy, a drain's stop of
the original) first takes the machine out of the routes (L{Replicas.take_out}: stored as
C{stopping}, which the cluster network's view lists as not healthy, so the ingress sends
it no new connection and gives its open ones their C{drain_timeout}), waits the app's
C{shutdown_delay}, and only then stops it.  Crashes and host loss are not planned stops.
"""

from twisted.internet import task
from twisted.internet.defer import DeferredList, DeferredLock, ensureDeferred
from twisted.logger import Logger

from zwrm import errors
from zwrm.control.appspec import error_text, new_id, shutdown_delay
from zwrm.control.resources.machines import LIVE, placement_request, reported_health
from zwrm.control.resources.machines import STATES as MACHINE_STATES
from zwrm.drivers.cloudinit import hostname_for


class Replicas:
    """
    Machines: stored, started, changed in order, removed.

    @ivar network: the L{zwrm.control.network.ClusterNetwork} (a machine's address).
    """

    log = Logger()

    def __init__(self, clock, hosts, data, placements, network):
        """
        @param clock: an L{IReactorTime}.
        @param hosts: the L{zwrm.control.registry.HostRegistry} (whose executors can be
            called, and calls to them).
        @param data: the control plane's resource layer.
        @param placements: the L{zwrm.control.placements.Placements}.
        @param network: the L{zwrm.control.network.ClusterNetwork}.
        """
        self._clock = clock
        self._hosts = hosts
        self._data = data
        self._placements = placements
        self.network = network
        self._machine_locks = {}  # machine id -> DeferredLock: its changes apply in order
        self._stopping = set()  # ids of machines taken out of the routes, to be stopped

    async def call(self, host_id, verb, *args, **kwargs):
        """Call a host's executor; its errors come back as L{zwrm.errors} classes."""
        try:
            return await self._hosts.call_executor(host_id, verb, *args, **kwargs)
        except Exception as e:
            raise errors.from_wire(e) from None

    def executor_available(self, host_id):
        """Whether C{host_id}'s agent can be called now."""
        return self._hosts.executor_available(host_id)

    def host_offline(self, host_id):
        """Whether C{host_id} is offline (or gone)."""
        try:
            return self._hosts.state(host_id) == "offline"
        except errors.NotFound:
            return True

    # -- stored changes, then events --------------------------------------------------

    async def set_machine(self, row, reason, **fields):
        """
        Store C{fields} of a machine through the machines resource (one event), and keep
        its reservation in step: released when it stopped or failed, committed when it runs.
        """
        await self._data.machines.set(row, reason, **fields)
        self._placements.machine_changed(row)
        return row

    async def add_machine(self, row, reason, placement=None):
        """
        Store a new machine row (state C{pending}) through the machines resource (one
        event); with C{placement}, the machine holds that reservation from now on.
        """
        await self._data.machines.add(row, reason)
        if placement is not None:
            self._placements.adopt(row["id"], placement)
        return row

    async def store_replica(self, app, spec, replica, placement, existing):
        """
        Store replica C{replica} of C{app} under C{spec} as a C{pending} machine on its
        placement's host, holding C{placement}; its volumes not in C{existing} (name ->
        volume row) are stored as C{creating} there.
        """
        host_id = placement.host_id
        now = self._clock.seconds()
        vols = []
        for v in spec["volumes"]:
            row = existing.get(v["name"])
            if row is None:
                row = {"id": new_id("v"), "app_id": app["id"], "host_id": host_id,
                       "name": v["name"], "replica": replica, "size_mb": v["size_mb"],
                       "mount": v["mount"], "state": "creating", "created_at": now}
                await self._data.volumes.add(row)
            vols.append({"id": row["id"], "mount": v["mount"], "size_mb": row["size_mb"]})
        mid = new_id("m")
        mspec = {
            "id": mid, "app": app["name"], "replica": replica, "image": spec["image"],
            "vcpus": spec["vcpus"], "memory_mb": spec["memory_mb"],
            "region": spec["region"], "datacenter": spec["datacenter"],
            "constraints": spec["constraints"], "volumes": vols,
            "service_port": spec["service_port"], "health": spec["health"], "app_spec": spec,
            "cloud_init": spec.get("cloud_init"),
            "network": await self.network.attach(
                mid, app["id"], host_id, hostname=replica_hostname(app["name"], replica),
                open_ports=[p["guest_port"] for p in spec.get("publish") or []]),
        }
        row = {"id": mid, "app_id": app["id"], "host_id": host_id, "state": "pending",
               "spec": mspec, "health": {"status": "none"}, "created_at": now,
               "updated_at": now}
        return await self.add_machine(row, "placed", placement=placement)

    @staticmethod
    def agent_spec(mspec):
        """What a machine's agent is given of its spec (C{machine.start})."""
        out = {k: mspec[k] for k in ("id", "app", "image", "vcpus", "memory_mb", "volumes",
                                     "service_port", "health")}
        out["cloud_init"] = mspec.get("cloud_init")
        out["network"] = mspec.get("network")
        return out

    async def start_all(self, rows):
        """
        Start every stored machine in C{rows} on its host, all at once; wait for all.
        A start that fails marks its machine failed (releasing its reservation).
        """
        if not rows:
            return
        results = await DeferredList(
            [ensureDeferred(self.start_machine(row)) for row in rows], consumeErrors=True)
        for ok, result in results:
            if not ok:
                result.raiseException()

    async def start_machine(self, row):
        """
        Start the stored machine C{row} on its host (C{machine.start}) and apply the status
        its agent answers; a start that fails marks it failed (releasing its reservation).
        """
        self._stopping.discard(row["id"])  # started (again): its reports count
        try:
            spec = self.agent_spec(row["spec"])
            # Its own address on its host (a drain's replacement gets one of its target's).
            spec["network"] = await self.network.attach(
                row["id"], row["app_id"], row["host_id"],
                hostname=replica_hostname(spec["app"], row["spec"].get("replica")),
                open_ports=[p["guest_port"] for p in
                            (row["spec"].get("app_spec") or {}).get("publish") or []])
            status = await self.call(row["host_id"], "machine.start", spec)
        except Exception as e:
            reason = getattr(e, "args", [None])[0] if isinstance(e, errors.ZwrmError) else None
            reason = reason or error_text(e)
            await self.set_machine(row, f"could not start: {reason}", state="failed")
            return row
        await self._volumes_ready(row)
        await self._apply_status(row, status)
        return row

    async def _volumes_ready(self, row):
        for v in row["spec"]["volumes"]:
            vrow = await self._data.volumes.get(v["id"])
            if vrow is not None and vrow["state"] == "creating":
                await self._data.volumes.set_state(vrow, "ready")

    def _in_order(self, machine_id, fn, *args):
        """
        Run C{fn(*args)} after every change already under way for C{machine_id}: reports
        arrive in order, and applying them must keep it.
        """
        return in_key_order(self._machine_locks, machine_id, fn, *args)

    async def update_machine(self, machine_id, fn):
        """
        Run C{await fn(row)} with the fresh row of C{machine_id} (L{None} if it is gone),
        in order with the machine's reports and other changes.
        """
        async def fresh():
            return await fn(await self._data.machines.get(machine_id))

        return await self._in_order(machine_id, fresh)

    def _apply_status(self, row, status):
        """Apply an executor status or report to a stored machine (in order)."""
        return self._in_order(row["id"], self._apply_fresh, row, status)

    async def _apply_fresh(self, row, status):
        fresh = await self._data.machines.get(row["id"])
        if fresh is None:
            return row
        row.update(fresh)
        return await self._apply_locked(row, status)

    async def _apply_locked(self, row, status):
        state = status.get("state")
        if state not in MACHINE_STATES:
            return row
        health = reported_health(row.get("health"), status)
        if row["id"] in self._stopping:
            if state in ("stopped", "failed"):
                self._stopping.discard(row["id"])
            else:  # being stopped: its agent's "running" does not route it again
                state = row["state"]
        if state == row["state"] and health == row.get("health"):
            return row
        was = row["state"]
        await self.set_machine(row, status.get("reason") or state, state=state, health=health)
        if was in ("stopped", "failed") and state in ("starting", "running"):
            # Found running again by its agent (recovered after the agent restarted while
            # its host was offline, say), before any reconciliation: its capacity on its
            # host is taken again, as a reconciliation's does (it was given back).
            self._placements.restored(row)
        return row

    # -- reports from agents ----------------------------------------------------------

    async def machine_event(self, host_id, event):
        """
        Agent C{host_id} reports a change of one of its machines (C{event}: the
        executor's report, with C{machine_id} and C{state}); applied in order.
        """
        if not isinstance(event, dict) or not isinstance(event.get("machine_id"), str):
            raise errors.InvalidArgument("a machine event needs machine_id and state")
        return await self._in_order(event["machine_id"], self._machine_event, host_id, event)

    async def _machine_event(self, host_id, event):
        row = await self._data.machines.get(event["machine_id"])
        if row is None:
            if event.get("destroyed"):
                return None
            raise errors.NotFound(f"no machine {event['machine_id']!r}")
        if host_id is not None and row["host_id"] != host_id:
            raise errors.NotAuthorized(
                f"machine {row['id']} is recorded on {row['host_id']}, not {host_id}")
        if not event.get("destroyed"):
            await self._apply_locked(row, event)
        return None

    # -- removal ----------------------------------------------------------------------

    async def delay_for(self, row):
        """The C{shutdown_delay} of the app of machine C{row} (its current spec)."""
        app = await self._data.apps.by_id(row["app_id"])
        spec = (app or {}).get("spec") or (row.get("spec") or {}).get("app_spec")
        return shutdown_delay(spec)

    async def take_out(self, machines, delay, ends=None):
        """
        The first half of a planned stop: each of C{machines} (rows, updated in place)
        that is running is stored as C{stopping}, so the next cluster-network view lists
        its routes as not healthy (the ingress sends it no new connection and gives its
        open ones their C{drain_timeout}); then C{delay} seconds pass.  The caller then
        stops or removes them (L{remove_machine}), or gives them back (L{put_back}).
        Nothing is done for a C{delay} of 0.

        @param ends: for a destroy (it only goes forward), when the delay of those of
            C{machines} already C{stopping} (taken out by the destroy before a restart of
            the control plane) ends: they wait what is left of it, at most C{delay}.  A
            destroy's machines stay out of the routes if the wait is cancelled (a stop of
            the control plane): the next one goes on with the destroy.
        @return: the ids of the machines taken out.
        """
        ids = []
        if delay <= 0:
            return ids
        wait = 0.0
        if ends is not None and any(m["state"] == "stopping" for m in machines):
            wait = min(delay, max(0.0, ends - self._clock.seconds()))
        for m in machines:
            if m["state"] != "running":
                continue  # not routed to (starting, stopping, down)

            async def mark(row, m=m):
                if row is None or row["state"] != "running":
                    return None
                await self.set_machine(row, f"out of the routes; stopped in {delay:g}s",
                                       state="stopping")
                m.update(row)
                return row

            self._stopping.add(m["id"])
            if await self.update_machine(m["id"], mark) is None:
                self._stopping.discard(m["id"])
            else:
                ids.append(m["id"])
        if ids:
            wait = delay
        if wait > 0:
            try:
                await task.deferLater(self._clock, wait, lambda: None)
            except BaseException:
                if ends is None:
                    await self.put_back(ids)
                raise
        return ids

    def kept_out(self, machine_id):
        """
        Machine C{machine_id}, stored C{stopping} by a planned stop before a restart of
        the control plane, stays out of the routes until it is removed: its agent's
        reports do not route it again.
        """
        self._stopping.add(machine_id)

    async def put_back(self, ids):
        """
        Machines L{take_out} took out and that are not stopped after all (the request
        failed): C{running} again, back in the routes.
        """
        for mid in ids:
            if mid not in self._stopping:
                continue  # stopped or removed meanwhile
            self._stopping.discard(mid)

            async def back(row):
                if row is not None and row["state"] == "stopping":
                    await self.set_machine(row, "stop cancelled; back in the routes",
                                           state="running")

            try:
                await self.update_machine(mid, back)
            except Exception as e:
                self.log.warn("machine {id}: not put back: {e}", id=mid, e=error_text(e))

    async def restart(self, row, delay, before_start=None):
        """
        Restart the machine of row C{row} where it is: the same id on the same host, its
        volumes and root overlay kept (its agent's C{machine.stop}, then C{machine.start}
        of the same spec).  A running machine goes through a planned stop first: stored
        as C{stopping} (out of the routes, even for a C{delay} of 0, so the restart policy
        does not count it as an exit), C{delay} seconds, then a graceful stop; its
        capacity on the host is held all along (nothing takes its place while it is
        down).  A C{stopped} or C{failed} machine is only started, if its host has room.

        @param before_start: L{None}, or C{await before_start(row)} just before the start,
            which may raise to leave the machine stopped (the caller's checks again: a
            drain that began meanwhile moves it).
        @return: C{row}, updated in place (C{running}, or C{failed} if its start failed).
        @raise zwrm.errors.Conflict: it is being started or stopped (and nothing changed).
        @raise zwrm.errors.Unplaceable: a stopped machine's host has no room for it.
        @raise zwrm.errors.ZwrmError: the stop failed (the machine is put back in the
            routes, running, as it was).
        """
        mid, host = row["id"], row["host_id"]
        if row["state"] in ("stopped", "failed"):
            return await self._start_again(row)
        if row["state"] != "running":
            raise errors.Conflict(
                f"machine {mid} is {row['state']}; restart it once it runs", argument="machine_id")

        async def mark(fresh):
            if fresh is None or fresh["state"] != "running":
                raise errors.Conflict(f"machine {mid} is {fresh['state'] if fresh else 'gone'};"
                                      " not restarted", argument="machine_id")
            await self.set_machine(fresh, f"restart requested: out of the routes; stopped in "
                                          f"{delay:g}s", state="stopping")
            row.update(fresh)
            return fresh

        self._stopping.add(mid)
        try:
            await self.update_machine(mid, mark)
        except BaseException:
            self._stopping.discard(mid)
            raise
        # Its capacity on the host, held while it is down (its own is released when it
        # stops); adopted by the machine when it starts again.
        held = self._placements.restore(host, placement_request(row["spec"]))
        try:
            if delay > 0:
                await task.deferLater(self._clock, delay, lambda: None)
            status = await self.call(host, "machine.stop", mid)
        except BaseException:
            self._placements.release_placement(held)
            await self.put_back([mid])
            raise
        await self._apply_status(row, status)
        fresh = await self._data.machines.get(mid)
        if fresh is None:  # removed meanwhile (its host was reset)
            self._placements.release_placement(held)
            return row
        row.clear()
        row.update(fresh)
        self._placements.release(mid)  # if its stop was not stored as such
        if before_start is not None:
            try:
                await before_start(row)
            except BaseException:
                self._placements.release_placement(held)
                raise
        self._placements.adopt(mid, held)
        return await self.start_machine(row)

    async def _start_again(self, row):
        """Start the stopped or failed machine C{row} again on its host (L{restart})."""
        placement = await self._placements.place_now(
            placement_request(row["spec"], pinned_host=row["host_id"]))

        async def check(fresh):
            if fresh is None or fresh["state"] not in ("stopped", "failed"):
                return None
            return fresh

        fresh = await self.update_machine(row["id"], check)
        if fresh is None:
            self._placements.release_placement(placement)
            raise errors.Conflict(f"machine {row['id']} changed meanwhile; not restarted",
                                  argument="machine_id")
        row.clear()
        row.update(fresh)
        self._placements.adopt(row["id"], placement)
        return await self.start_machine(row)

    async def retire(self, machines, delay, ends=None):
        """
        A planned stop of C{machines} (rows): out of the routes (L{take_out}, with
        C{ends}), C{delay} seconds, then each removed (L{remove_machine}).

        @return: their ids.
        """
        await self.take_out(machines, delay, ends)
        gone = []
        try:
            for m in machines:
                gone.append(await self.remove_machine(m))
        except BaseException:
            await self.put_back([m["id"] for m in machines if m["id"] not in gone])
            raise
        return gone

    async def remove_machine(self, m):
        """
        Destroy the machine of row C{m} on its host, then delete its row (one event) and
        release its reservation.  A machine that is stopped or failed on a host that cannot
        be reached loses only its row (its host stops it when it returns: reconciliation).

        @raise zwrm.errors.Unavailable: it is live on a host that cannot be reached.
        """
        if m["state"] not in ("stopped", "failed") or self._hosts.executor_available(m["host_id"]):
            try:
                await self.call(m["host_id"], "machine.destroy", m["id"])
            except errors.NotFound:
                pass  # the agent no longer knows it: it is gone
            except errors.Unavailable:
                if m["state"] in LIVE:
                    raise errors.Unavailable(
                        f"machine {m['id']} is on host {m['host_id']}, which is not reachable; "
                        "it is destroyed when the host returns") from None
        self._stopping.discard(m["id"])
        await self._data.machines.delete(m)
        self._placements.release(m["id"])
        await self.network.release(m["id"])
        return m["id"]


def replica_hostname(app, replica):
    """
    The guest host name of replica C{replica} of app C{app}: C{<app>-<replica>}, a DNS
    label (at most 63 characters: a long app name is cut, the replica number kept).
    """
    suffix = f"-{replica}"
    return hostname_for(app[:63 - len(suffix)] + suffix)


async def in_key_order(locks, key, fn, *args):
    """
    Run C{fn(*args)} under the lock of C{key} in C{locks} (a dict of L{DeferredLock}s,
    made on first use and dropped when nobody waits), after every call already under way
    for C{key}.  The lock is taken before any await, so calls keep their order.
    """
    lock = locks.setdefault(key, DeferredLock())
    await lock.acquire()
    try:
        return await fn(*args)
    finally:
        lock.release()
        if not lock.locked and not lock.waiting:
            locks.pop(key, None)
