"""
The machines resource: the C{machines} table, a machine's wire form, its update methods,
the one translation of a machine (or app) spec into a L{PlacementRequest}, and waits on
a machine's events.

A machine row: C{id, app_id, host_id, state, spec, health, created_at, updated_at}.
C{health} is one schema everywhere: C{{"status": "none" | "passing" | "failing" | ...,
"host_port": int (optional), "restart": {...} (optional)}}.  A machine that is not
running has no health: storing it C{stopped} or C{failed} sets its status to C{none} (a
dead machine is never C{passing}).  C{restart} is what the restart policy
(L{zwrm.control.healing}) keeps of the machine: C{count} (restarts so far), C{reason}
(of the last exit or restart), C{next_at} (clock time of the next attempt, or L{None}),
C{times} (recent restart times), C{step} (the backoff step).  It is kept in the health
column so that no schema change is needed; the wire form flattens it.

Events (C{zwrm.event.machine}); the payload is always the machine's wire form
(L{wire}) with C{machine_id}, C{old} (the state before, or L{None}) and C{reason}:

 - C{state}: stored for the first time (C{old} L{None}) or its state or health changed;
 - C{destroyed}: its row was deleted (C{state} C{destroyed});
 - C{unknown_machine}, C{duplicate_machine}: an agent runs a machine that has no record,
   or that is recorded elsewhere or stopped (the control plane stops it; or destroys it,
   C{action} C{destroyed}, when the log says it was destroyed while its host was
   unreachable); the payload has the same keys, with what is known (C{action}: what was
   done).
"""

from twisted.internet.defer import Deferred

from zwrm import errors
from zwrm.control.resources import Resource, update_method
from zwrm.scheduler import PlacementRequest

TOPIC = "zwrm.event.machine"
LIVE = ("pending", "starting", "running", "stopping")
STATES = ("pending", "starting", "running", "stopping", "stopped", "failed")


TABLE = "machines"
RESTART_DECISION_GRACE = 2.0
"""Seconds a wait through restarts (L{Machines.wait_healthy}) gives the healer to decide on a
machine that failed: a restart due (C{next_restart_at}) keeps it waiting, else it fails."""
JSON_COLUMNS = ("spec", "health")
"""Columns stored as JSON text (the store encodes and decodes them)."""


def schema_v1(db):
    """The C{machines} table, as schema version 1 of L{zwrm.control.store} made it."""
    db["machines"].create(
        {
            "id": str,
            "app_id": str,
            "host_id": str,
            "state": str,
            "spec": str,
            "health": str,
            "created_at": float,
            "updated_at": float,
        },
        pk="id",
    )
    db["machines"].create_index(["host_id"])
    db["machines"].create_index(["app_id"])


def wire(row):
    """
    The wire form of a machine row: C{id, app_id, app, replica, host_id, state, health
    (the status), paused (null, or why its hypervisor holds a running machine:
    C{"disk-full"}), host_port, address (on the cluster network, bridge networking; else
    null), volumes (ids), restarts, restart_reason, next_restart_at, created_at,
    updated_at}.
    """
    health = row.get("health") or {}
    spec = row.get("spec") or {}
    restart = health.get("restart") or {}
    return {"id": row["id"], "app_id": row.get("app_id"), "app": spec.get("app"),
            "replica": spec.get("replica"), "host_id": row.get("host_id"),
            "state": row.get("state"), "health": health.get("status"),
            "paused": health.get("paused") if row.get("state") == "running" else None,
            "host_port": health.get("host_port"),
            "address": (spec.get("network") or {}).get("address"),
            "volumes": [v["id"] for v in spec.get("volumes", [])],
            "restarts": restart.get("count", 0), "restart_reason": restart.get("reason"),
            "next_restart_at": restart.get("next_at"),
            "created_at": row.get("created_at"), "updated_at": row.get("updated_at")}


def volumes_size(spec):
    """The disk, in MiB, of all the volumes of a machine spec."""
    return sum(v.get("size_mb", 0) for v in spec.get("volumes") or [])


def placement_request(spec, pinned_host=None, disk_mb=0):
    """
    The one translation of a machine spec (or an app's deployed spec: the same keys) into
    a L{PlacementRequest}: its vCPUs, memory, region, datacenter and constraints.

    @param pinned_host: the host its volumes pin it to, if any.
    @param disk_mb: the disk the placement reserves: the volumes still to be created
        there (a converge), all its volumes (a drain's target: L{volumes_size}), or 0 (a
        machine that runs already, whose volumes exist).
    @raise zwrm.errors.InvalidArgument: a field is out of range.
    """
    return PlacementRequest(
        vcpus=spec["vcpus"], memory_mb=spec["memory_mb"], disk_mb=disk_mb,
        region=spec.get("region"), datacenter=spec.get("datacenter"),
        pinned_host=pinned_host, constraints=spec.get("constraints") or {},
    )



def reported_health(health, status):
    """
    A machine row's C{health} with what its agent's C{status} (a report, or its entry in
    C{machine.list}) says: its check's status, its forwarded port, and whether its
    hypervisor holds it paused (only while it runs).

    @return: a new dict.
    """
    health = dict(health or {})
    if status.get("health") is not None:
        health["status"] = status["health"]
    if status.get("host_port") is not None:
        health["host_port"] = status["host_port"]
    if status.get("state") == "running" and status.get("paused"):
        # Its hypervisor holds it (a write waits for room on its host's disk).
        health["paused"] = status["paused"]
    else:
        health.pop("paused", None)
    return health

class Machines(Resource):
    """The machines of the cluster: rows, update methods, events."""

    topic = TOPIC

    # -- reads ------------------------------------------------------------------------

    def get(self, machine_id):
        """The row of C{machine_id}, or L{None} (a Deferred)."""
        return self._store.get("machines", machine_id)

    async def find(self, app_id=None, host_id=None, states=None, ids=None, order_by=None,
                   replicas=None):
        """The rows matching every criterion given (C{replicas}: replica numbers)."""
        where, args = [], []
        if app_id is not None:
            where.append("app_id = ?")
            args.append(app_id)
        if host_id is not None:
            where.append("host_id = ?")
            args.append(host_id)
        if states is not None:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        if ids is not None:
            if not ids:
                return []
            where.append(f"id IN ({','.join('?' * len(ids))})")
            args.extend(ids)
        if replicas is not None:
            if not replicas:
                return []
            where.append("json_extract(spec, '$.replica') IN "
                         f"({','.join('?' * len(replicas))})")
            args.extend(sorted(replicas))
        return await self._store.select("machines", " AND ".join(where) or None, args,
                                        order_by=order_by)

    def recent_events(self, machine_id, limit=20):
        """The last C{limit} events about machine C{machine_id}, newest first (a Deferred)."""
        return self._store.recent_events(machine_id, limit)

    def count_by_host(self):
        """How many machines each host has, as C{{host_id: n}} (a Deferred)."""

        def count(db):
            if "machines" not in db.table_names():
                return {}
            rows = db.execute(
                "SELECT host_id, count(*) FROM machines"
                " WHERE state NOT IN ('destroyed', 'deleted') GROUP BY host_id"
            ).fetchall()
            return dict(rows)

        return self._store.run(count)

    async def last_event(self, machine_id):
        """The newest stored event about machine C{machine_id}, or L{None} (none kept)."""
        events = await self._store.recent_events(machine_id, limit=1)
        return events[0] if events else None

    async def was_destroyed(self, machine_id):
        """Whether the event log has C{machine_id}'s C{destroyed} event (its row went)."""
        rows = await self._store.select("events", "subject = ? AND topic = ? AND kind = ?",
                                        [machine_id, TOPIC, "destroyed"], limit=1)
        return bool(rows)

    # -- update methods ---------------------------------------------------------------

    async def _produce(self, kind, row, old, reason, **extra):
        payload = dict(self._payload(row, old, reason), **extra)
        return await self.produce_event(kind, row["id"], payload)

    def _payload(self, row, old, reason):
        return dict(wire(row), machine_id=row["id"], old=old, reason=reason)

    @update_method
    async def add(self, row, reason):
        """Store a new machine row; event C{state} (C{old} L{None}); in one transaction."""
        event = await self._store.insert_with_event(
            "machines", row, self.topic, "state", row["id"], self._payload(row, None, reason))
        self.deliver(event)
        return row

    @update_method
    async def set(self, row, reason, **fields):
        """
        Store C{fields} of the machine C{row} (C{updated_at} too) and update C{row} in place;
        event C{state}.

        @raise zwrm.errors.NotFound: the row was deleted meanwhile.
        """
        fields["updated_at"] = self._clock.seconds()
        if fields.get("state", row.get("state")) in ("stopped", "failed"):
            health = dict(fields.get("health", row.get("health")) or {})
            if health.get("status", "none") != "none":
                health["status"] = "none"  # never stale: a dead machine is not passing
                fields["health"] = health
        old = row.get("state")
        changed = dict(row, **fields)
        payload = self._payload(changed, old, reason)
        # the change and its event in one transaction: never one without the other
        event = await self._store.update_with_event("machines", row["id"], fields,
                                                    self.topic, "state", row["id"], payload)
        row.update(fields)
        self.deliver(event)
        return row

    @update_method
    async def delete(self, row, reason="destroyed"):
        """Delete the machine's row; event C{destroyed}; in one transaction."""
        gone = dict(row, state="destroyed", updated_at=self._clock.seconds())
        event = await self._store.delete_with_event(
            "machines", row["id"], self.topic, "destroyed", row["id"],
            self._payload(gone, row.get("state"), reason))
        self.deliver(event)
        return row["id"]

    @update_method
    async def note_stray(self, kind, machine_id, host_id, row=None, action="stopped"):
        """
        Record that C{host_id} runs C{machine_id}, which has no record (C{kind}
        C{unknown_machine}) or is recorded elsewhere or stopped (C{duplicate_machine}).
        """
        if row is None:
            row = {"id": machine_id, "host_id": host_id}
        base = dict(row, host_id=host_id)
        return await self._produce(kind, base, row.get("state"), kind, action=action)

    # -- waits ------------------------------------------------------------------------

    async def wait_healthy(self, machine_id, deadline, min_healthy=0.0, through_restarts=False):
        """
        Wait until C{machine_id} is running with a passing health check (or running, when
        its spec has none) for C{min_healthy} seconds on end, following its events (no
        polling of the store).

        @param through_restarts: a machine that fails is waited for through the restart its
            policy gives it (a rolling update's new machine, as Nomad's deployments and
            Kubernetes' rollouts wait through a crash within their deadline); it fails the
            wait only when no restart is due L{RESTART_DECISION_GRACE} seconds after it
            failed.  Else (a drain's replacement) a failure ends the wait at once.
        @return: the clock time it first passed.
        @raise zwrm.errors.NotFound: it is gone (now or meanwhile).
        @raise zwrm.errors.Unavailable: it failed, or was not so by C{deadline} seconds.
        """
        clock = self._clock
        done = Deferred()
        seen = {"state": None, "health": None, "since": None, "first": None, "timer": None,
                "evented": False, "has_check": False, "next_at": None, "why": None,
                "deciding": None}

        def finish(result):
            if not done.called:
                done.callback(result)

        def fail(exc):
            if not done.called:
                done.errback(exc)

        def healthy_long_enough():
            seen["timer"] = None
            finish(seen["first"])

        def not_restarted():
            seen["deciding"] = None
            why = f": {seen['why']}" if seen["why"] else ""
            fail(errors.Unavailable(f"machine {machine_id} failed{why}"))

        def look():
            state, health = seen["state"], seen["health"]
            if state == "destroyed":
                return fail(errors.NotFound(f"machine {machine_id} is gone"))
            deciding = seen["deciding"]
            if state == "failed" and not through_restarts:
                return fail(errors.Unavailable(f"machine {machine_id} failed"))
            if state == "failed" and seen["next_at"] is None:
                if deciding is None:  # the healer's decision comes in a later event
                    seen["deciding"] = clock.callLater(RESTART_DECISION_GRACE, not_restarted)
            elif deciding is not None:
                seen["deciding"] = None
                deciding.cancel()
            ok = state == "running" and (health == "passing" or not seen["has_check"])
            now = clock.seconds()
            if ok:
                if seen["since"] is None:
                    seen["since"] = now
                    seen["first"] = seen["first"] if seen["first"] is not None else now
                    if min_healthy <= 0:
                        return finish(seen["first"])
                    seen["timer"] = clock.callLater(min_healthy, healthy_long_enough)
            else:
                seen["since"] = None
                if seen["timer"] is not None and seen["timer"].active():
                    seen["timer"].cancel()
                seen["timer"] = None

        def on_event(event):
            if event["subject"] != machine_id or event["kind"] not in ("state", "destroyed"):
                return
            p = event["payload"]
            seen["state"], seen["health"] = p.get("state"), p.get("health")
            if p.get("state") == "running" and p.get("health") == "failing" and p.get("reason"):
                seen["failing"] = p["reason"]  # what its check answered, for the message
            seen["restarts"] = p.get("restarts") or 0
            seen["next_at"], seen["why"] = p.get("next_restart_at"), p.get("restart_reason")
            seen["evented"] = True
            if seen["read"]:
                look()

        def too_late():
            why = [f"state {seen['state']}, health {seen['health']}"]
            if seen.get("restarts"):
                why.append(f"restarted {seen['restarts']} time(s)")
            if seen.get("failing"):
                why.append(f"last check: {seen['failing']}")
            elif seen.get("why"):  # why it last failed or stopped (its restart's reason)
                why.append(f"last exit: {seen['why']}")
            fail(errors.Unavailable(
                f"machine {machine_id} was not healthy within {deadline:g}s ({'; '.join(why)})"))

        seen["read"] = False
        unsubscribe = self.subscribe(on_event)  # before the read: nothing is missed
        overall = None
        try:
            row = await self.get(machine_id)
            if row is None:
                raise errors.NotFound(f"machine {machine_id} is gone")
            seen["has_check"] = bool((row.get("spec") or {}).get("health"))
            if not seen["evented"]:  # an event delivered meanwhile is newer than the row
                seen["state"] = row["state"]
                seen["health"] = (row.get("health") or {}).get("status")
                restart = (row.get("health") or {}).get("restart") or {}
                seen["next_at"], seen["why"] = restart.get("next_at"), restart.get("reason")
            seen["read"] = True
            overall = clock.callLater(deadline, too_late)
            look()
            return await done
        finally:
            unsubscribe()
            if overall is not None and overall.active():
                overall.cancel()
            for timer in (seen["timer"], seen["deciding"]):
                if timer is not None and timer.active():
                    timer.cancel()
