"""
The volumes resource: the C{volumes} table (C{id, app_id, host_id, name, replica,
size_mb, mount, state, created_at}), whose rows are also their wire form, and its update
methods.

Events (on C{zwrm.event.machine}, where clients have always found them); the payload is
always the volume's row with C{volume_id} and C{reason}:

 - C{volume}: stored for the first time, or its state changed (C{creating} -> C{ready});
 - C{volume_failed}: its creation failed on its host and the row was removed;
 - C{volume_moved}: a drain committed it on another host (C{from}: the host before);
 - C{volume_destroyed}: deleted with its data.

Snapshots (the C{volume_snapshots} table, C{id, volume_id, app_id, host_id, name, state,
live, size_bytes, allocated_bytes, reason, created_at}): whole copies of a volume kept on
its host (L{zwrm.agent.volumes.VolumeStore.snapshot}); their events, with the snapshot's
row, C{snapshot_id}, C{volume_id} and C{reason}:

 - C{volume_snapshot}: stored (C{creating}, before its host copies) or ready;
 - C{volume_snapshot_failed}: its host could not make it and the row was removed;
 - C{volume_snapshot_destroyed}: deleted with its data;
 - C{volume_restored} (subject and payload: the volume's, with C{snapshot_id} restored and
   C{kept}, the snapshot now holding what the volume held).

Replicas (the C{volume_replicas} table, C{id, volume_id, app_id, host_id, snapshot_id,
name, state, size_bytes, allocated_bytes, taken_at, reason, created_at}): copies of a
volume's snapshots kept on other hosts (C{host_id}), each a snapshot file there
(C{<volumes>/snapshots/<volume>/<replica id>.img}), from which the volume is recovered
when its host is lost (L{zwrm.control.host_removal}); C{snapshot_id} and C{name} are the
snapshot's it copies, C{taken_at} when that was taken. Their events, with the replica's
row, C{replica_id}, C{volume_id} and C{reason}:

 - C{volume_replica}: stored (C{creating}, before the copy) or ready;
 - C{volume_replica_failed}: the copy failed and the row was removed;
 - C{volume_replica_destroyed}: deleted with its data (or forgotten with its host);
 - C{volume_recovered} (subject and payload: the volume's, with C{from}, the lost host,
   and C{replica}, the row it was recovered from, now one of its snapshots).

Snapshot schedules (the C{snapshot_schedules} table, C{id} (the app's id), C{app_id,
every, keep, replicate, next_at, last_at, last_error, created_at}): every C{every} seconds
each volume of the app is snapshotted (and replicated) by the control plane
(L{zwrm.control.schedules}). Their events, subject the app's id, with the row and
C{reason}: C{snapshot_schedule} (set), C{snapshot_schedule_run} (what a run did:
C{last_error} is L{None} when every volume was taken), C{snapshot_schedule_destroyed}.
"""

from zwrm.control.resources import Resource, update_method

TOPIC = "zwrm.event.machine"


TABLE = "volumes"
JSON_COLUMNS = ()
"""Columns stored as JSON text (none)."""
SNAPSHOTS_TABLE = "volume_snapshots"
REPLICAS_TABLE = "volume_replicas"
SCHEDULES_TABLE = "snapshot_schedules"


def schema_v1(db):
    """The C{volumes} table, as schema version 1 of L{zwrm.control.store} made it."""
    db["volumes"].create(
        {
            "id": str,
            "app_id": str,
            "host_id": str,
            "name": str,
            "size_mb": int,
            "mount": str,
            "state": str,
            "created_at": float,
        },
        pk="id",
    )


def schema_v2(db):
    """Schema version 2: a volume belongs to one replica of its app (the replica it pins)."""
    db["volumes"].add_column("replica", int, not_null_default=0)
    db["volumes"].create_index(["app_id", "name", "replica"], unique=True)


def schema_v12(db):
    """Schema version 12: the volumes' snapshots."""
    db[SNAPSHOTS_TABLE].create(
        {
            "id": str,
            "volume_id": str,
            "app_id": str,
            "host_id": str,
            "name": str,
            "state": str,
            "live": int,
            "size_bytes": int,
            "allocated_bytes": int,
            "reason": str,
            "created_at": float,
        },
        pk="id",
    )
    db[SNAPSHOTS_TABLE].create_index(["volume_id", "name"], unique=True)
    db[SNAPSHOTS_TABLE].create_index(["host_id"])


def schema_v13(db):
    """Schema version 13: the replicas of the volumes' snapshots on other hosts."""
    db[REPLICAS_TABLE].create(
        {
            "id": str,
            "volume_id": str,
            "app_id": str,
            "host_id": str,
            "snapshot_id": str,
            "name": str,
            "state": str,
            "size_bytes": int,
            "allocated_bytes": int,
            "taken_at": float,
            "reason": str,
            "created_at": float,
        },
        pk="id",
    )
    db[REPLICAS_TABLE].create_index(["volume_id"])
    db[REPLICAS_TABLE].create_index(["host_id"])


def schema_v14(db):
    """
    Schema version 14: the snapshot schedules of apps' volumes (one per app; its id is
    the app's id).
    """
    db[SCHEDULES_TABLE].create(
        {
            "id": str,
            "app_id": str,
            "every": float,
            "keep": int,
            "replicate": int,
            "next_at": float,
            "last_at": float,
            "last_error": str,
            "created_at": float,
        },
        pk="id",
    )


def replica_as_snapshot(db, replica, reason):
    """
    In a transaction on C{db}: make C{replica} (a row) a snapshot of its volume, which now
    lives on the replica's host (a drain moved it there, or it was recovered there): its
    file is one of the volume's snapshots there already. It keeps its id and the name of
    the snapshot it copied (with C{-2}, C{-3}... if the volume has a snapshot of that name).

    @return: the snapshot's row.
    """
    taken = {r[0] for r in db.execute(f"SELECT name FROM {SNAPSHOTS_TABLE} WHERE volume_id = ?",
                                      [replica["volume_id"]])}
    name, n = replica["name"], 1
    while name in taken:
        n += 1
        name = f"{replica['name'][:58]}-{n}"
    row = {"id": replica["id"], "volume_id": replica["volume_id"], "app_id": replica["app_id"],
           "host_id": replica["host_id"], "name": name, "state": "ready", "live": False,
           "size_bytes": replica["size_bytes"], "allocated_bytes": replica["allocated_bytes"],
           "reason": reason, "created_at": replica["taken_at"]}
    db[SNAPSHOTS_TABLE].insert(row)
    db[REPLICAS_TABLE].delete(replica["id"])
    return row


def wire(row):
    """The wire form of a volume: its row."""
    return dict(row)


class Volumes(Resource):
    """The volumes of the cluster: rows, update methods, events."""

    topic = TOPIC

    # -- reads ------------------------------------------------------------------------

    def get(self, volume_id):
        """The row of C{volume_id}, or L{None} (a Deferred)."""
        return self._store.get("volumes", volume_id)

    async def find(self, app_id=None, name=None, replica=None, order_by=None, host_id=None):
        """The rows matching every criterion given."""
        where, args = [], []
        for col, value in (("app_id", app_id), ("name", name), ("replica", replica),
                           ("host_id", host_id)):
            if value is not None:
                where.append(f"{col} = ?")
                args.append(value)
        return await self._store.select("volumes", " AND ".join(where) or None, args,
                                        order_by=order_by)

    def get_snapshot(self, snapshot_id):
        """The row of snapshot C{snapshot_id}, or L{None} (a Deferred)."""
        return self._store.get(SNAPSHOTS_TABLE, snapshot_id)

    async def find_snapshots(self, volume_id=None, name=None, app_id=None, host_id=None):
        """The snapshots matching every criterion given, oldest first."""
        where, args = [], []
        for col, value in (("volume_id", volume_id), ("name", name), ("app_id", app_id),
                           ("host_id", host_id)):
            if value is not None:
                where.append(f"{col} = ?")
                args.append(value)
        rows = await self._store.select(SNAPSHOTS_TABLE, " AND ".join(where) or None, args,
                                        order_by="created_at, rowid")
        for r in rows:
            r["live"] = bool(r["live"])
        return rows

    def get_replica(self, replica_id):
        """The row of replica C{replica_id}, or L{None} (a Deferred)."""
        return self._store.get(REPLICAS_TABLE, replica_id)

    async def find_replicas(self, volume_id=None, app_id=None, host_id=None, snapshot_id=None):
        """The replicas matching every criterion given, oldest data first."""
        where, args = [], []
        for col, value in (("volume_id", volume_id), ("app_id", app_id),
                           ("host_id", host_id), ("snapshot_id", snapshot_id)):
            if value is not None:
                where.append(f"{col} = ?")
                args.append(value)
        return await self._store.select(REPLICAS_TABLE, " AND ".join(where) or None, args,
                                        order_by="taken_at, created_at, rowid")

    def get_schedule(self, app_id):
        """The snapshot schedule of app C{app_id}, or L{None} (a Deferred)."""
        return self._store.get(SCHEDULES_TABLE, app_id)

    def find_schedules(self):
        """Every snapshot schedule, the next due first (a Deferred)."""
        return self._store.select(SCHEDULES_TABLE, order_by="next_at, id")

    # -- update methods ---------------------------------------------------------------

    async def _produce(self, kind, row, reason, **extra):
        return await self.produce_event(kind, row["id"], self._payload(row, reason, **extra))

    def _payload(self, row, reason, **extra):
        return dict(wire(row), volume_id=row["id"], reason=reason, **extra)

    async def _store_and_produce(self, change, kind, row, reason):
        """Store C{change} and the event of C{row} in one transaction; deliver it."""
        await self.store_with_event(change, kind, row["id"], self._payload(row, reason))

    @update_method
    async def add(self, row):
        """Store a new volume row with its event C{volume}."""
        await self._store_and_produce(self._store.inserting("volumes", row), "volume", row,
                                      "created")
        return row

    @update_method
    async def set_state(self, row, state, reason=None):
        """Store the volume's new C{state} (C{row} is updated in place); event C{volume}."""
        if row.get("state") == state:
            return row
        await self._store_and_produce(
            self._store.updating("volumes", row["id"], {"state": state}), "volume",
            dict(row, state=state), reason or state)
        row["state"] = state
        return row

    @update_method
    async def creation_failed(self, row, reason):
        """Remove the row of a volume its host could not create; event C{volume_failed}."""
        await self._store_and_produce(self._store.deleting("volumes", row["id"]),
                                      "volume_failed", dict(row, state="failed"), reason)

    @update_method
    async def delete(self, row, reason="destroyed"):
        """Delete the volume's row (its data is gone); event C{volume_destroyed}."""
        await self.store_with_event(self._store.deleting("volumes", row["id"]),
                                    "volume_destroyed", row["id"],
                                    self.destroyed_payload(row, reason))

    def destroyed_payload(self, row, reason):
        """
        The payload of event C{volume_destroyed}: C{row}'s volume is gone (L{delete}; a
        host's removal deletes the volumes it gives up with the host's row,
        L{zwrm.control.host_removal}).
        """
        return self._payload(dict(row, state="destroyed"), reason)

    def moved_payload(self, row, source_host, reason="drain"):
        """
        The payload of event C{volume_moved}: the volume C{row} now lives on another host
        (a drain stores the move with its migration's phase and these events:
        L{zwrm.control.resources.drains.Drains.commit_volumes}).
        """
        return self._payload(row, reason, **{"from": source_host})

    # -- snapshots --------------------------------------------------------------------

    def snapshot_payload(self, row, reason):
        """The payload of a snapshot's events: its row with C{snapshot_id} and C{reason}."""
        return dict(row, snapshot_id=row["id"], reason=reason)

    @update_method
    async def add_snapshot(self, row):
        """Store a new snapshot row (C{creating}) with its event C{volume_snapshot}."""
        await self.store_with_event(self._store.inserting(SNAPSHOTS_TABLE, row),
                                    "volume_snapshot", row["volume_id"],
                                    self.snapshot_payload(row, "creating"))
        return row

    @update_method
    async def snapshot_made(self, row, info):
        """
        Store that the host made the snapshot (C{info}: its C{size_bytes},
        C{allocated_bytes}, C{live}; C{row} is updated in place); event C{volume_snapshot}.
        """
        fields = {"state": "ready", "size_bytes": info["size_bytes"],
                  "allocated_bytes": info["allocated_bytes"], "live": bool(info.get("live"))}
        new = dict(row, **fields)
        await self.store_with_event(self._store.updating(SNAPSHOTS_TABLE, row["id"], fields),
                                    "volume_snapshot", row["volume_id"],
                                    self.snapshot_payload(new, "ready"))
        row.update(fields)
        return row

    @update_method
    async def snapshot_failed(self, row, reason):
        """Remove the row of a snapshot its host could not make; event C{volume_snapshot_failed}."""
        await self.store_with_event(self._store.deleting(SNAPSHOTS_TABLE, row["id"]),
                                    "volume_snapshot_failed", row["volume_id"],
                                    self.snapshot_payload(dict(row, state="failed"), reason))

    @update_method
    async def delete_snapshot(self, row, reason="destroyed"):
        """Delete the snapshot's row (its data is gone); event C{volume_snapshot_destroyed}."""
        await self.store_with_event(self._store.deleting(SNAPSHOTS_TABLE, row["id"]),
                                    "volume_snapshot_destroyed", row["volume_id"],
                                    self.snapshot_payload(dict(row, state="destroyed"),
                                                           reason))

    @update_method
    async def restored(self, volume, snapshot, kept, info):
        """
        Store that C{volume} holds C{snapshot}'s data again and that snapshot row C{kept}
        (C{creating} until now) holds what it held (C{info}: its sizes); event
        C{volume_restored}.
        """
        fields = {"state": "ready", "size_bytes": info["size_bytes"],
                  "allocated_bytes": info["allocated_bytes"]}
        payload = self._payload(volume, "restored", snapshot_id=snapshot["id"],
                                snapshot=snapshot["name"], kept=dict(kept, **fields))
        await self.store_with_event(self._store.updating(SNAPSHOTS_TABLE, kept["id"], fields),
                                    "volume_restored", volume["id"], payload)
        kept.update(fields)
        return kept

    # -- replicas ---------------------------------------------------------------------

    def replica_payload(self, row, reason):
        """The payload of a replica's events: its row with C{replica_id} and C{reason}."""
        return dict(row, replica_id=row["id"], reason=reason)

    @update_method
    async def add_replica(self, row):
        """Store a new replica row (C{creating}) with its event C{volume_replica}."""
        await self.store_with_event(self._store.inserting(REPLICAS_TABLE, row),
                                    "volume_replica", row["volume_id"],
                                    self.replica_payload(row, "creating"))
        return row

    @update_method
    async def replica_made(self, row, info):
        """
        Store that the replica's host holds its verified copy (C{info}: its C{size_bytes},
        C{allocated_bytes}; C{row} is updated in place); event C{volume_replica}.
        """
        fields = {"state": "ready", "size_bytes": info["size_bytes"],
                  "allocated_bytes": info["allocated_bytes"]}
        await self.store_with_event(self._store.updating(REPLICAS_TABLE, row["id"], fields),
                                    "volume_replica", row["volume_id"],
                                    self.replica_payload(dict(row, **fields), "ready"))
        row.update(fields)
        return row

    @update_method
    async def replica_failed(self, row, reason):
        """Remove the row of a replica that was not made; event C{volume_replica_failed}."""
        await self.store_with_event(self._store.deleting(REPLICAS_TABLE, row["id"]),
                                    "volume_replica_failed", row["volume_id"],
                                    self.replica_payload(dict(row, state="failed"), reason))

    @update_method
    async def delete_replica(self, row, reason="destroyed"):
        """Delete the replica's row (its data is gone); event C{volume_replica_destroyed}."""
        await self.store_with_event(self._store.deleting(REPLICAS_TABLE, row["id"]),
                                    "volume_replica_destroyed", row["volume_id"],
                                    self.replica_destroyed_payload(row, reason))

    def replica_destroyed_payload(self, row, reason):
        """The payload of event C{volume_replica_destroyed} (also a host removal's)."""
        return self.replica_payload(dict(row, state="destroyed"), reason)

    # -- snapshot schedules -------------------------------------------------------------

    @update_method
    async def set_schedule(self, row, reason):
        """Store (or replace) an app's snapshot schedule; event C{snapshot_schedule}."""
        await self.store_with_event(self._store.upserting(SCHEDULES_TABLE, row),
                                    "snapshot_schedule", row["app_id"],
                                    dict(row, reason=reason))
        return row

    @update_method
    async def schedule_ran(self, row, fields, reason):
        """
        Store what a run of the schedule C{row} did (C{fields}: C{last_at}, C{last_error},
        C{next_at}; C{row} is updated in place); event C{snapshot_schedule_run}.
        """
        await self.store_with_event(self._store.updating(SCHEDULES_TABLE, row["id"], fields),
                                    "snapshot_schedule_run", row["app_id"],
                                    dict(row, **fields, reason=reason))
        row.update(fields)
        return row

    @update_method
    async def delete_schedule(self, row, reason):
        """Delete an app's snapshot schedule; event C{snapshot_schedule_destroyed}."""
        await self.store_with_event(self._store.deleting(SCHEDULES_TABLE, row["id"]),
                                    "snapshot_schedule_destroyed", row["app_id"],
                                    self.schedule_destroyed_payload(row, reason))

    @staticmethod
    def schedule_destroyed_payload(row, reason):
        """The payload of event C{snapshot_schedule_destroyed}: the schedule C{row}."""
        return dict(row, reason=reason)

    def recovered_payload(self, row, lost_host, replica, reason):
        """
        The payload of event C{volume_recovered}: the volume C{row} (its new host's) was
        made from C{replica} after C{lost_host} was removed (L{zwrm.control.host_removal}).
        """
        return self._payload(row, reason, replica=dict(replica), **{"from": lost_host})
