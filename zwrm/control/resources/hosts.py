"""
The hosts resource: the C{hosts} table, each host's L{Host} machine and what is kept of
it in memory (L{HostEntry}), its wire form, and the update methods of host membership.

Events (C{zwrm.event.host}); the payload is always the host's wire form (L{wire}) with
C{host_id}, C{old} (the state before, or L{None}) and C{reason}:

 - C{joined}: a new host was admitted;
 - C{state}: its state changed (an input of its L{Host} machine: C{heartbeat_lost},
   C{agent_registered}, C{drain_requested}, ...), the executor flag with it;
 - C{registered}: its agent registered again without a state change (facts and the
   executor flag may have changed);
 - C{executor}: only whether its executor may be called changed;
 - C{disk}: its agent's heartbeats say its data disk is nearly full (under
   L{DISK_FULL_MB} free: nothing new is placed there) or has room again;
 - C{removed}: an operator removed it from the cluster (C{zwrm host remove}); its row is
   gone and its C{state} is C{removed}.

Not announced (they are not part of the wire form's meaning): the credential hash, the
heartbeat times (in memory, flushed in batches: L{Hosts.flush_heartbeats}) and the
allocation, which is the scheduler's figure written back for C{zwrm host list}
(L{Hosts.set_allocation}).
"""

import hashlib
import re
from contextlib import asynccontextmanager

from twisted.internet.defer import CancelledError, DeferredLock

from zwrm import errors
from zwrm.control.host import INPUTS, Host
from zwrm.control.resources import Resource, store_with_events, update_method
from zwrm.hostid import is_strict_host_id, strict_host_id

TOPIC = "zwrm.event.host"

WIRE_FIELDS = ("name", "region", "datacenter", "address", "labels", "vcpus", "memory_mb",
               "disk_mb", "alloc_vcpus", "alloc_memory_mb", "alloc_disk_mb",
               "agent_version", "joined_at", "fence_after")


#: Under this many MiB free on its data disk (its heartbeats' C{disk_free_mb}), a host
#: gets no new placements (as Kubernetes taints a node under disk pressure); the default of
#: the control plane's C{[health] min_free_disk_mb}.
DISK_FULL_MB = 256

TABLE = "hosts"
JSON_COLUMNS = ("labels",)
"""Columns stored as JSON text (the store encodes and decodes them)."""


def schema_v1(db):
    """The C{hosts} table, as schema version 1 of L{zwrm.control.store} made it."""
    db["hosts"].create(
        {
            "id": str,
            "name": str,
            "region": str,
            "datacenter": str,
            "address": str,
            "labels": str,
            "vcpus": int,
            "memory_mb": int,
            "disk_mb": int,
            "alloc_vcpus": int,
            "alloc_memory_mb": int,
            "alloc_disk_mb": int,
            "state": str,
            "state_before_offline": str,
            "last_heartbeat": float,
            "agent_version": str,
            "credential_hash": str,
            "joined_at": float,
        },
        pk="id",
        defaults={"alloc_vcpus": 0, "alloc_memory_mb": 0, "alloc_disk_mb": 0, "labels": "{}"},
    )


class HostEntry:
    """
    What the control plane holds about one host.

    @ivar record: the host's row (a dict, as stored).
    @ivar machine: its L{Host} machine.
    @ivar last_heartbeat: the clock time of its last heartbeat.
    @ivar executor: whether its executor may be called (registered and not offline).
    """

    def __init__(self, record, machine, last_heartbeat):
        self.record = record
        self.machine = machine
        self.last_heartbeat = last_heartbeat
        self.executor = False
        #: the WAMP session its agent registered from (L{None}: not known, or it ended)
        self.session_id = None
        self.reregistering = False
        self.stats = {}
        #: its heartbeats said its data disk is nearly full (L{DISK_FULL_MB})
        self.disk_full = False
        #: what its agent's registration said of the hosts list it holds (facts C{network}:
        #: C{{"hosts_serial", "hosts_digest"}}), until its first network view takes it
        self.network_held = None
        #: its agent's registrations since the control plane started, counted as each
        #: begins: a network view sent after it is for the new session, even before the
        #: registration is stored and announced
        self.sessions = 0

    def undo(self, saved, fields):
        """
        A function that undoes a change that could not be stored: it puts back the state
        C{saved} (L{Host.saved}, from before the change), and the row's C{fields} and the
        executor flags as they are now (before the change makes them).
        """
        missing = object()
        before = {k: self.record.get(k, missing) for k in fields}
        executor, reregistering = self.executor, self.reregistering

        def undo():
            self.machine.put_back(saved)
            for k, v in before.items():
                if v is missing:
                    self.record.pop(k, None)
                else:
                    self.record[k] = v
            self.executor, self.reregistering = executor, reregistering

        return undo

    @property
    def schedulable_state(self):
        """
        The state the scheduler is given: the host's state, but C{unreachable} for a
        C{ready} host whose executor cannot be called, and C{disk_full} for one whose data
        disk is nearly full.
        """
        state = self.machine.state
        if state == "ready" and not self.executor:
            return "unreachable"
        if state == "ready" and self.disk_full:
            return "disk_full"
        return state


def wire(entry):
    """
    The wire form of a host: C{id}, the facts and allocation of its row, C{state},
    C{state_before_offline}, C{executor} and C{disk_full} (its heartbeats say its data disk
    is nearly full: no new placements).
    """
    r = entry.record
    out = {"id": r["id"]}
    for k in WIRE_FIELDS:
        out[k] = r.get(k)
    out["labels"] = out["labels"] or {}
    for k in ("alloc_vcpus", "alloc_memory_mb", "alloc_disk_mb"):
        out[k] = out[k] or 0
    out["state"] = entry.machine.state
    out["state_before_offline"] = entry.machine.state_before_offline
    out["executor"] = entry.executor
    out["disk_full"] = entry.disk_full
    return out


def schema_v15(db):
    """
    Schema version 15: C{fence_after}, the seconds after which the host's agent stops its
    machines with volumes once it hears nothing from the control plane (0: it does not),
    as its agent reports it (L{zwrm.control.host_removal} waits that long before it
    recovers their volumes elsewhere).
    """
    db[TABLE].add_column("fence_after", float, not_null_default=0)


_QUOTED = re.compile(r'"([^"\\]*)"')
"""A string in a JSON text (one without escapes: a host id has none)."""


def schema_strict_ids(db):
    """
    Rename every host id that is not a strict WAMP URI component (C{h-0123...}, the form
    of older zwrm) to L{zwrm.hostid.strict_host_id} of it (C{h_0123...}), in the C{hosts}
    table and in every stored reference to it: any column of any table whose value is the
    old id (C{machines.host_id}, C{volumes.host_id}, C{drains.host_id},
    C{migrations.source_host|target_host}, C{net_subnets}, C{net_addresses},
    C{host_resets}, C{events.subject}, a host's default name, ...), and any string or key
    inside a JSON column (machine specs and health, app specs, drain options, migration
    details, event payloads) that is the old id.  Runs inside the store's migration
    transaction, so it happens whole or not at all.

    An old id whose strict form is taken (by another host, or by a second old id) gets the
    strict form with C{_} and 8 hex digits of the old id's SHA-256 appended.

    @return: C{{old: new}}.
    """
    if TABLE not in db.table_names():
        return {}
    ids = [r[0] for r in db.execute(f"SELECT id FROM {TABLE}").fetchall()]
    taken = {i for i in ids if is_strict_host_id(i)}
    renames = {}
    for old in sorted(i for i in ids if not is_strict_host_id(i)):
        new = strict_host_id(old) or "h"
        if new in taken:
            new = f"{new[:55]}_{hashlib.sha256(old.encode()).hexdigest()[:8]}"
        taken.add(new)
        renames[old] = new
    if not renames:
        return renames

    db.execute("CREATE TEMP TABLE _host_renames (old TEXT PRIMARY KEY, new TEXT)")
    db.conn.executemany("INSERT INTO _host_renames VALUES (?, ?)", list(renames.items()))

    def renamed(match):
        token = match.group(1)
        new = renames.get(token)
        return match.group(0) if new is None else f'"{new}"'

    for table in db.table_names():
        if table == "schema_version" or table.startswith("sqlite_") or table == "_host_renames":
            continue
        columns = [c.name for c in db[table].columns if c.type.upper() in ("TEXT", "STR", "")]
        for col in columns:
            # a column whose value is an old id
            db.execute(
                f'UPDATE "{table}" SET "{col}" = (SELECT new FROM _host_renames WHERE old = "{col}")'
                f' WHERE "{col}" IN (SELECT old FROM _host_renames)')
            # JSON text: every string (value or key) that is an old id; nothing else changes
            changes = []
            for rowid, value in db.execute(
                    f'SELECT rowid, "{col}" FROM "{table}" WHERE substr("{col}", 1, 1) IN (\'{{\', \'[\')'):
                text = _QUOTED.sub(renamed, value)
                if text != value:
                    changes.append((text, rowid))
            db.conn.executemany(f'UPDATE "{table}" SET "{col}" = ? WHERE rowid = ?', changes)
    db.execute("DROP TABLE _host_renames")
    return renames


class Hosts(Resource):
    """
    Every host the control plane knows.

    Reads are from memory (the entries); every update method stores first, then produces
    one event.
    """

    topic = TOPIC

    def __init__(self, clock, store, publish):
        Resource.__init__(self, clock, store, publish)
        self._entries = {}
        self._dirty = {}
        self._changing = {}  # host id -> DeferredLock, while a change of it is under way

    @asynccontextmanager
    async def _one_change(self, host_id):
        """
        One change of C{host_id}'s state at a time (L{apply_input}, L{registered}), each
        worked out from what the last one left; a lock only while changes are under way
        (none is kept per host).
        """
        lock = self._changing.get(host_id)
        if lock is None:
            lock = self._changing[host_id] = DeferredLock()
        await lock.acquire()
        try:
            yield
        finally:
            lock.release()
            if not lock.locked:  # no change waited for it
                self._changing.pop(host_id, None)

    # -- loading ----------------------------------------------------------------------

    async def load(self):
        """Read every host from the store; executors start deregistered."""
        for record in await self._store.select("hosts"):
            machine = Host.restore(record["id"], record["state"], record["state_before_offline"])
            self._entries[record["id"]] = HostEntry(
                record, machine, record["last_heartbeat"] or 0.0)
        return len(self._entries)

    # -- reads ------------------------------------------------------------------------

    def __contains__(self, host_id):
        return host_id in self._entries

    def __len__(self):
        return len(self._entries)

    def ids(self):
        """Every known host id."""
        return list(self._entries)

    def entries(self):
        """Every L{HostEntry}."""
        return list(self._entries.values())

    def get(self, host_id):
        """The L{HostEntry} of C{host_id}, or L{None}."""
        return self._entries.get(host_id)

    def entry(self, host_id):
        """
        The L{HostEntry} of C{host_id}.

        @raise zwrm.errors.NotFound: if there is no such host.
        """
        try:
            return self._entries[host_id]
        except KeyError:
            renamed = strict_host_id(host_id)
            if renamed != host_id and renamed in self._entries:  # an id of an older zwrm
                raise errors.NotFound(
                    f"no host {host_id!r}: host ids are strict now, it is {renamed!r}") from None
            raise errors.NotFound(f"no host {host_id!r}") from None

    def wire(self, host_id):
        """The wire form of C{host_id} (L{wire})."""
        return wire(self.entry(host_id))

    # -- update methods ---------------------------------------------------------------

    async def _produce(self, kind, entry, old, reason):
        return await self.produce_event(kind, entry.record["id"],
                                        self._payload(entry, old, reason))

    def _payload(self, entry, old, reason):
        return dict(wire(entry), host_id=entry.record["id"], old=old, reason=reason)

    async def _store_and_produce(self, kind, entry, fields, old, reason, change=None):
        """
        Store C{fields} of C{entry}'s row and its event, in one transaction; log the state's
        C{change}, if any; deliver the event.
        """
        host_id = entry.record["id"]
        event = await self._store.change_with_event(
            self._store.updating("hosts", host_id, fields), self.topic, kind, host_id,
            self._payload(entry, old, reason))
        if change is not None:
            self._log_change(host_id, change)
        self.deliver(event)

    @update_method
    async def add(self, record):
        """Store a new host's row (C{state} C{ready}) and its event C{joined}, together."""
        entry = HostEntry(record, Host(record["id"]), record["last_heartbeat"] or 0.0)
        event = await self._store.change_with_event(
            self._store.inserting("hosts", record), self.topic, "joined", record["id"],
            self._payload(entry, None, "joined"))
        self._entries[record["id"]] = entry
        self.deliver(event)
        return entry

    @update_method
    async def set_credential(self, host_id, credential_hash):
        """
        Store a host's new credential hash (not announced: a secret's hash); it is the
        host's once stored (one that cannot be stored leaves the old one in force).
        """
        entry = self.entry(host_id)
        await self._store.update("hosts", host_id, {"credential_hash": credential_hash})
        entry.record["credential_hash"] = credential_hash

    @update_method
    async def registered(self, host_id, facts):
        """
        The agent of C{host_id} registered: store its C{facts} (row fields) and its
        heartbeat time, feed C{agent_registered} to its machine, mark its executor
        callable; one event (C{state} if the state changed, else C{registered}).  If they
        cannot be stored, nothing changes (its executor stays as it was).
        """
        entry = self.entry(host_id)
        async with self._one_change(host_id):
            now = self._clock.seconds()
            entry.last_heartbeat = now
            fields = dict(facts, last_heartbeat=now)
            saved = entry.machine.saved()
            change = entry.machine.handle("agent_registered")
            if change is not None:
                fields.update(state=change.new,
                              state_before_offline=change.state_before_offline)
            undo = entry.undo(saved, fields)
            entry.record.update(fields)
            entry.executor = True
            entry.reregistering = False
            try:
                if change is not None:
                    await self._store_and_produce("state", entry, fields, change.old,
                                                  change.reason, change)
                else:
                    await self._store_and_produce("registered", entry, fields,
                                                  entry.machine.state, "agent_registered")
            except CancelledError:
                raise  # the write still runs in the store's thread: kept, as it will be
            except BaseException:
                undo()
                raise
            self._dirty.pop(host_id, None)
            return change

    @update_method
    async def apply_input(self, host_id, input_name, executor=None):
        """
        Feed C{input_name} to C{host_id}'s L{Host} machine; store, then announce (C{state})
        any change.  With C{executor} given, the executor flag is set with it (and a change
        of the flag alone is announced as C{executor}).

        @return: the L{zwrm.control.host.Change}, or L{None}.
        @raise zwrm.errors.NotFound: no such host.
        @raise zwrm.errors.Conflict: the input contradicts the state (nothing changes).
        @raise zwrm.errors.ResourceExhausted: the change could not be stored (the control
            plane's disk is full): nothing changes, in memory either.
        """
        if input_name not in INPUTS:
            raise errors.InvalidArgument(f"unknown host input {input_name!r}")
        entry = self.entry(host_id)
        async with self._one_change(host_id):
            saved = entry.machine.saved()
            change = entry.machine.handle(input_name)
            flag_changed = executor is not None and entry.executor != executor
            if change is None:
                if flag_changed:
                    entry.executor = executor
                    await self._produce("executor", entry, entry.machine.state, input_name)
                return None
            fields = {"state": change.new, "state_before_offline": change.state_before_offline}
            undo = entry.undo(saved, fields)
            entry.record.update(fields)
            if executor is not None:
                entry.executor = executor
            try:
                await self._store_and_produce("state", entry, fields, change.old,
                                              change.reason, change)
            except CancelledError:
                raise  # the write still runs in the store's thread: kept, as it will be
            except BaseException:
                undo()
                raise
            return change

    @update_method
    async def set_executor(self, host_id, executor, reason):
        """
        Whether C{host_id}'s executor may be called, alone (in memory: executors start
        deregistered); event C{executor} if it changed.
        """
        entry = self.entry(host_id)
        if entry.executor == executor:
            return None
        entry.executor = executor
        self.log.info("host {host_id}: {reason}", host_id=host_id, reason=reason)
        return await self._produce("executor", entry, entry.machine.state, reason)

    @update_method
    async def remove(self, host_id, reason, along=None, along_events=()):
        """
        Delete C{host_id}'s row (with its credential: its agent is refused from now on, and
        the id may join again as a new host); event C{removed}.

        @param along: L{None}, or C{along(db)}: what goes with the host (its volumes, its
            subnet: L{zwrm.control.host_removal}), stored in the same transaction, so that
            a removal that cannot be stored changes nothing.
        @param along_events: the events of C{along}, as L{store_with_events} takes them,
            delivered before C{removed}.
        @raise zwrm.errors.NotFound: no such host.
        """
        entry = self.entry(host_id)
        async with self._one_change(host_id):
            old = entry.machine.state
            payload = dict(wire(entry), host_id=host_id, state="removed", executor=False,
                           old=old, reason=reason)
            deleting = self._store.deleting("hosts", host_id)

            def change(db):
                if along is not None:
                    along(db)
                deleting(db)

            def stored(_):
                self._entries.pop(host_id, None)
                self._dirty.pop(host_id, None)
                self.log.info("host {host_id}: {old} -> removed ({reason})", host_id=host_id,
                              old=old, reason=reason)

            _, events = await store_with_events(
                self._store, change, [*along_events, (self, "removed", host_id, payload)],
                stored=stored)
            return events[-1]

    @update_method
    async def set_disk_full(self, host_id, full, free_mb, floor=DISK_FULL_MB):
        """
        Its heartbeats say C{host_id}'s data disk has C{free_mb} MiB free: nearly full
        (C{full}, under C{floor}: no new placements) or room again; announced as C{disk}
        when that flips.  In memory (the next heartbeat after a restart says it again).
        """
        entry = self._entries.get(host_id)
        if entry is None or entry.disk_full == full:
            return
        entry.disk_full = full
        reason = (f"its data disk is nearly full ({free_mb} MiB free, under {floor:g}):"
                  " no new placements" if full else
                  f"its data disk has room again ({free_mb} MiB free)")
        self.log.info("host {host_id}: {reason}", host_id=host_id, reason=reason)
        await self._produce("disk", entry, entry.machine.state, reason)

    @update_method
    async def certificate_renewed(self, host_id, expires):
        """
        The control plane signed a renewed host certificate for C{host_id}'s agent, valid
        until C{expires} (text); announced as C{certificate} (the record of issuance; the
        certificate itself is the agent's to keep).
        """
        entry = self.entry(host_id)
        reason = f"host certificate renewed, valid until {expires}"
        self.log.info("host {host_id}: {reason}", host_id=host_id, reason=reason)
        await self._produce("certificate", entry, entry.machine.state, reason)

    def set_allocation(self, host_id, alloc):
        """
        Store what the scheduler placed on C{host_id} (C{alloc_vcpus, alloc_memory_mb,
        alloc_disk_mb}), behind the change, in the store's order; not announced (the
        scheduler's own figure, shown by C{zwrm host list}).
        """
        entry = self._entries.get(host_id)
        if entry is None:
            return
        entry.record.update(alloc)
        self._store.update("hosts", host_id, alloc).addErrback(
            lambda f: errors.log_failure(self.log, f, "storing the allocation of {h}", h=host_id))

    # -- heartbeats (memory, then batches) --------------------------------------------

    def note_heartbeat(self, host_id):
        """Note a heartbeat in memory (written by L{flush_heartbeats}). @return: the entry."""
        entry = self.entry(host_id)
        now = self._clock.seconds()
        entry.last_heartbeat = now
        self._dirty[host_id] = now
        return entry

    def flush_heartbeats(self):
        """
        Write the heartbeat times that changed since the last flush, in one transaction.

        @return: a Deferred firing when they are stored.
        """
        beats, self._dirty = self._dirty, {}
        for hid, ts in beats.items():
            if hid in self._entries:
                self._entries[hid].record["last_heartbeat"] = ts
        return self._store.save_heartbeats(beats)

    def _log_change(self, host_id, change):
        self.log.info("host {host_id}: {old} -> {new} ({reason})", host_id=host_id,
                      old=change.old, new=change.new, reason=change.reason)
