"""
The drains resource: the C{drains} and C{migrations} tables, their wire forms and their
update methods, for the drain runner (L{zwrm.control.drain}).

A drain row: C{id, host_id, state, options (JSON), created_at, updated_at}.  A migration
row: C{id, drain_id, machine_id, source_host, target_host, phase, bytes_sent, bytes_total,
error, updated_at, detail} where C{detail} is JSON text of what the migration must remember
to resume (the runner's own keys: replacement, tokens, volumes, leftovers, ...).

Events (C{zwrm.event.drain}):

 - C{started}: a drain and its planned migrations were stored; the payload is the drain's
   wire form with C{drain_id}, C{reason} and C{plan};
 - C{state}: the drain's state changed; the drain's wire form with C{drain_id}, C{old},
   C{reason};
 - C{migration}: a migration's phase changed, or it was entered again after a restart, or
   what the migration waits for changed (an unreachable host; C{old} is then its phase and
   C{reason} says what it waits for); the migration's wire form (without its detail) with
   C{migration_id}, C{old} (the phase before), C{reason}, and C{target}.

Committing a migration moves its volumes to the target and stores its phase in one
transaction (L{Drains.commit_volumes}), with its events: the phase's and each volume's move
(C{volume_moved} on C{zwrm.event.machine}, delivered by the volumes resource).  Every change
is stored with its event in one transaction.

The drain runner (L{zwrm.control.drain}) changes these rows only through these update
methods.  The phases and states are those of L{zwrm.drain_phases}; an unknown one is refused.
"""

import json

from zwrm import errors
from zwrm.control.resources import Resource, store_with_events, update_method
from zwrm.control.resources.volumes import REPLICAS_TABLE, SNAPSHOTS_TABLE, replica_as_snapshot
from zwrm.drain_phases import DRAIN_STATES, LIVE_PHASES, MIGRATION_PHASES

TOPIC = "zwrm.event.drain"
TABLE = "drains"
JSON_COLUMNS = ("options",)
"""Columns of C{drains} stored as JSON text (the store encodes and decodes them)."""
MIGRATIONS_TABLE = "migrations"

MIGRATION_FIELDS = ("id", "drain_id", "machine_id", "source_host", "target_host", "phase",
                    "bytes_sent", "bytes_total", "error", "updated_at")


def schema_v1(db):
    """The C{drains} and C{migrations} tables, as schema version 1 made them."""
    db["drains"].create(
        {
            "id": str,
            "host_id": str,
            "state": str,
            "options": str,
            "created_at": float,
            "updated_at": float,
        },
        pk="id",
    )
    db["migrations"].create(
        {
            "id": str,
            "drain_id": str,
            "machine_id": str,
            "source_host": str,
            "target_host": str,
            "phase": str,
            "bytes_sent": int,
            "bytes_total": int,
            "error": str,
            "updated_at": float,
        },
        pk="id",
    )


def schema_v3(db):
    """
    Schema version 3: what a drain's migration must remember to resume after a restart
    (replacement machine, transfer tokens, timings), as JSON text.
    """
    db["migrations"].add_column("detail", str)


def wire(row):
    """The wire form of a drain: C{id, host_id, state, options, created_at, updated_at}."""
    return {"id": row["id"], "host_id": row.get("host_id"), "state": row.get("state"),
            "options": row.get("options") or {}, "created_at": row.get("created_at"),
            "updated_at": row.get("updated_at")}


def migration_wire(row):
    """The wire form of a migration: its row without C{detail}."""
    return {k: row.get(k) for k in MIGRATION_FIELDS}


def _decoded(row):
    row = dict(row)
    detail = row.get("detail")
    row["detail"] = json.loads(detail) if isinstance(detail, str) and detail else (detail or {})
    return row


class Drains(Resource):
    """Drains and their migrations: rows, update methods, events."""

    topic = TOPIC

    def __init__(self, clock, store, publish, volumes=None):
        """
        @param volumes: the L{zwrm.control.resources.volumes.Volumes} that announces the
            volumes a commit moved.
        """
        Resource.__init__(self, clock, store, publish)
        self._volumes = volumes

    # -- reads ------------------------------------------------------------------------

    def get(self, drain_id):
        """The drain row C{drain_id}, or L{None} (a Deferred)."""
        return self._store.get(TABLE, drain_id)

    def find(self, host_id=None, states=None, order_by=None):
        """The drain rows matching every criterion given (a Deferred)."""
        where, args = [], []
        if host_id is not None:
            where.append("host_id = ?")
            args.append(host_id)
        if states is not None:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        return self._store.select(TABLE, " AND ".join(where) or None, args, order_by=order_by)

    async def latest(self, host_id):
        """The newest drain row of C{host_id}, or L{None}."""
        rows = await self._store.select(TABLE, "host_id = ?", [host_id],
                                        order_by="created_at DESC", limit=1)
        return rows[0] if rows else None

    async def migrations(self, drain_id):
        """The migrations of C{drain_id}, their C{detail} decoded."""
        rows = await self._store.select(MIGRATIONS_TABLE, "drain_id = ?", [drain_id],
                                        order_by="rowid")
        return [_decoded(r) for r in rows]

    async def live_replacements(self):
        """
        The ids of the replacements of the live moves under way (their migration in one of
        L{LIVE_PHASES}): a paused QEMU on the target that the move resumes, not a start
        that the agent is asked for (its executor lists it only once resumed).
        """
        rows = await self._store.select(
            MIGRATIONS_TABLE, f"phase IN ({','.join('?' * len(LIVE_PHASES))})",
            list(LIVE_PHASES))
        return {r["detail"].get("replacement") for r in map(_decoded, rows)} - {None}

    async def with_leftovers(self):
        """
        The migrations whose C{detail} records C{leftovers} (copies of volumes a rollback
        could not delete on an unreachable target, or a cleaning on an unreachable source),
        their C{detail} decoded.
        """
        rows = await self._store.select(MIGRATIONS_TABLE, "detail LIKE ?",
                                        ['%"leftovers": [{%'])
        return [r for r in map(_decoded, rows) if r["detail"].get("leftovers")]

    async def replica_outcomes(self, drain_id):
        """
        How the drain C{drain_id}'s moves of the replicas on its host ended, as announced
        (L{replica_moved}; those the event log still keeps): C{{replica id: item}}.
        """
        rows = await self._store.select("events", "subject = ? AND topic = ? AND kind = ?",
                                        [drain_id, TOPIC, "replica"], order_by="id")
        return {r["payload"]["replica"]["replica"]: r["payload"]["replica"] for r in rows}

    # -- update methods ---------------------------------------------------------------

    @update_method
    async def replica_moved(self, row, item):
        """
        Announce how the drain C{row}'s move of a replica on its host ended: C{item} is
        C{{replica, volume_id, name, state ("moved" or "left"), target, copy (the
        replica made on the target, or L{None}), reason}}; event
        C{replica}, stored first (a later control plane's C{drain_status} reads why a
        replica stayed from it).
        """
        why = (f"replica {item['replica']} moved to {item['target']}"
               if item["state"] == "moved" else f"replica {item['replica']} stays: {item['reason']}")
        payload = dict(wire(row), drain_id=row["id"], reason=why, replica=dict(item))
        return await self.produce_event("replica", row["id"], payload)

    @update_method
    async def add(self, row, migrations, plan=()):
        """
        Store a new drain and its migrations (C{detail} a dict) in one transaction; event
        C{started} (with the C{plan}).
        """
        drain = dict(row, options=json.dumps(row.get("options") or {}, sort_keys=True))
        rows = [dict(m, detail=json.dumps(m.get("detail") or {}, sort_keys=True))
                for m in migrations]

        def store(db):
            db[TABLE].insert(drain)
            for m in rows:
                db[MIGRATIONS_TABLE].insert(m)

        payload = dict(wire(row), drain_id=row["id"], reason="started", plan=list(plan))
        await self.store_with_event(store, "started", row["id"], payload)
        return row

    @update_method
    async def set_state(self, row, state, reason=None):
        """Store the drain's new C{state} (C{row} is updated in place); event C{state}."""
        if state not in DRAIN_STATES:
            raise errors.InvalidArgument(f"unknown drain state {state!r}")
        old = row.get("state")
        fields = {"state": state, "updated_at": self._clock.seconds()}
        payload = dict(wire(dict(row, **fields)), drain_id=row["id"], old=old,
                       reason=reason or state)
        await self.store_with_event(self._store.updating(TABLE, row["id"], fields), "state",
                                    row["id"], payload)
        row.update(fields)
        return row

    @update_method
    async def save_migration(self, row, reason=None, **fields):
        """
        Store C{fields} of the migration C{row} (C{detail} as a dict; C{row} is updated in
        place).  A change of C{phase}, or a phase entered again for a C{reason} (a step run
        again after a restart), is announced (event C{migration}); progress, errors and
        detail are not.
        """
        if "phase" in fields and fields["phase"] not in MIGRATION_PHASES:
            raise errors.InvalidArgument(f"unknown migration phase {fields['phase']!r}")
        old = row.get("phase")
        fields["updated_at"] = self._clock.seconds()
        stored = dict(fields)
        if "detail" in stored:
            stored["detail"] = json.dumps(stored["detail"] or {}, sort_keys=True)
        change = self._store.updating(MIGRATIONS_TABLE, row["id"], stored)
        if "phase" in fields and (fields["phase"] != old or reason is not None):
            await self.store_with_event(change, "migration", row["id"],
                                        self._phase_payload(dict(row, **fields), old, reason))
        else:
            await self._store.run(change)
        row.update(fields)
        return row

    @update_method
    async def set_waiting(self, row, detail, reason):
        """
        Store the migration's C{detail} whose C{waiting} (C{{host, since, why}}: the
        unreachable host it waits for, or L{None}) changed; event C{migration}, its phase
        unchanged (C{old} is the phase), with C{reason} (what it waits for, or that the
        host answered again).
        """
        now = self._clock.seconds()
        change = self._store.updating(MIGRATIONS_TABLE, row["id"], {
            "detail": json.dumps(detail or {}, sort_keys=True), "updated_at": now})
        await self.store_with_event(change, "migration", row["id"], self._phase_payload(
            dict(row, detail=detail, updated_at=now), row.get("phase"), reason))
        row.update(detail=detail, updated_at=now)
        return row

    @update_method
    async def commit_volumes(self, row, volume_ids, reason="committed", replicas=(),
                             redundant=()):
        """
        Move C{volume_ids} to the migration's target, with their snapshots, and store its
        phase C{committing}, in one transaction; then announce the phase (C{migration})
        and each volume's move (C{volume_moved}, by the volumes resource).

        @param replicas: the rows of the volumes' replicas on the target: there they
            become snapshots of their volumes (C{volume_snapshot}, L{replica_as_snapshot}).
        @param redundant: the rows of the volumes' replicas on the target whose snapshots
            moved there too: they are deleted (C{volume_replica_destroyed}; the caller
            deletes their files).
        @raise zwrm.errors.NotFound: a volume has no row.
        """
        target, source = row["target_host"], row["source_host"]
        now = self._clock.seconds()
        converted = {}

        def commit(db):
            moved = {}
            for rep in redundant:
                db.execute(f"DELETE FROM {REPLICAS_TABLE} WHERE id = ?", [rep["id"]])
            for rep in replicas:
                converted[rep["id"]] = replica_as_snapshot(
                    db, rep, f"the replica of snapshot {rep['name']} on {target}, where the "
                             "volume moved")
            for vid in volume_ids:
                if db.execute("SELECT 1 FROM volumes WHERE id = ?", [vid]).fetchone() is None:
                    raise errors.NotFound(f"no volume {vid!r}")
                db["volumes"].update(vid, {"host_id": target})
                moved[vid] = db["volumes"].get(vid)
                # Its snapshots moved with it (copied before it: Drains._copy_snapshots).
                db.execute(f"UPDATE {SNAPSHOTS_TABLE} SET host_id = ? WHERE volume_id = ?",
                           [target, vid])
            db[MIGRATIONS_TABLE].update(row["id"], {"phase": "committing",
                                                    "updated_at": now})
            return moved

        old = row.get("phase")
        events = []
        if old != "committing":
            events.append((self, "migration", row["id"], self._phase_payload(
                dict(row, phase="committing", updated_at=now), old, reason)))
        if self._volumes is not None:
            events.extend(
                (self._volumes, "volume_moved", vid,
                 lambda moved, vid=vid: self._volumes.moved_payload(moved[vid], source))
                for vid in volume_ids)
            events.extend(
                (self._volumes, "volume_snapshot", rep["volume_id"],
                 lambda _, rid=rep["id"]: self._volumes.snapshot_payload(
                     converted[rid], converted[rid]["reason"]))
                for rep in replicas)
            events.extend(
                (self._volumes, "volume_replica_destroyed", rep["volume_id"],
                 self._volumes.replica_destroyed_payload(
                     rep, f"the volume and snapshot {rep['name']} moved to {target}"))
                for rep in redundant)
        await store_with_events(self._store, commit, events)
        row.update(phase="committing", updated_at=now)
        return row

    def _phase_payload(self, row, old, reason):
        return dict(migration_wire(row), migration_id=row["id"], old=old,
                    reason=reason, target=row.get("target_host"))
