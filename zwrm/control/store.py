"""
The control plane's store: one SQLite database, reached through sqlite-utils.

Every call into SQLite runs on one dedicated thread (a one-thread
L{twisted.python.threadpool.ThreadPool}, as Buildbot's database pool does), so the
reactor thread never waits for the disk, and all writes are ordered: they run in the
order they were submitted, and their Deferreds fire in that order.

The database is in WAL mode.  Its schema is versioned: L{MIGRATIONS} is a list of
functions, each taking a L{sqlite_utils.Database}; the table C{schema_version} records
how many have run.  Other parts append migrations; they never edit an earlier one.

Heartbeats are not written one by one: the host registry keeps each host's last
heartbeat in memory and calls L{Store.save_heartbeats} with a batch (see
L{zwrm.control.registry}).
"""

import json
import sqlite3
import time

import sqlite_utils
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from zwrm import errors
from zwrm.control.resources import apps, certs, drains, hosts, machines, volumes
from zwrm.pki import join_tokens
from zwrm.tokens import hash_secret


def _v1(db):
    """
    Schema version 1: every domain's tables.  Those of a resource are made by its module
    (L{zwrm.control.resources}), which owns them.
    """
    hosts.schema_v1(db)
    apps.schema_v1(db)
    machines.schema_v1(db)
    volumes.schema_v1(db)
    drains.schema_v1(db)
    db["tokens"].create(
        {
            "id": str,
            "kind": str,
            "secret_hash": str,
            "expires_at": float,
            "revoked": int,
            "created_at": float,
        },
        pk="id",
        defaults={"revoked": 0},
    )
    db["tokens"].create_index(["secret_hash"])
    db.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, ts FLOAT, topic TEXT,"
        " kind TEXT, subject TEXT, payload TEXT)"
    )
    db["events"].create_index(["subject"])


def _v2(db):
    """Schema version 2: a volume belongs to one replica of its app (the replica it pins)."""
    volumes.schema_v2(db)


def _v3(db):
    """
    Schema version 3: what a drain's migration must remember to resume after a restart
    (replacement machine, transfer tokens, timings), as JSON text (L{zwrm.control.drain}).
    """
    drains.schema_v3(db)


def _v4(db):
    """
    Schema version 4: the cluster network (L{zwrm.control.network}): a subnet of the
    cluster CIDR per host, an address per machine.
    """
    db["net_subnets"].create({"id": str, "host_id": str, "created_at": float}, pk="id")
    db["net_subnets"].create_index(["host_id"], unique=True)
    db["net_addresses"].create(
        {"id": str, "machine_id": str, "host_id": str, "app_id": str, "created_at": float},
        pk="id",
    )
    db["net_addresses"].create_index(["machine_id"], unique=True)


def _v5(db):
    """Schema version 5: apps keep every spec they were given (L{apps.schema_v5})."""
    apps.schema_v5(db)


def _v6(db):
    """Schema version 6: the ingress's TLS certificates (L{certs.schema_v6})."""
    certs.schema_v6(db)


def _v7(db):
    """
    Schema version 7: the join tokens' table (L{join_tokens.schema_v7}), until then made
    outside the migrations by L{zwrm.pki.JoinTokens}.
    """
    join_tokens.schema_v7(db)


def _v8(db):
    """
    Schema version 8: host ids are strict WAMP URI components (C{h-<hex>} becomes
    C{h_<hex>}, in the hosts table and every stored reference: L{hosts.schema_strict_ids}).
    """
    hosts.schema_strict_ids(db)


def _v9(db):
    """Schema version 9: the audit trail of operators' calls (L{audit.schema_v9})."""
    from zwrm.control import audit

    audit.schema_v9(db)


def _v10(db):
    """
    Schema version 10: the host resets' table (L{tokens.schema_host_resets}), until then
    made outside the migrations by L{zwrm.control.tokens.ControlPKI.start}.
    """
    from zwrm.control import tokens

    tokens.schema_host_resets(db)


def _v11(db):
    """Schema version 11: an app's destroy under way is stored (L{apps.schema_v11})."""
    apps.schema_v11(db)


def _v12(db):
    """Schema version 12: the volumes' snapshots (L{volumes.schema_v12})."""
    volumes.schema_v12(db)


def _v13(db):
    """Schema version 13: the volumes' replicas on other hosts (L{volumes.schema_v13})."""
    volumes.schema_v13(db)


def _v14(db):
    """Schema version 14: the snapshot schedules of apps (L{volumes.schema_v14})."""
    volumes.schema_v14(db)


def _v15(db):
    """Schema version 15: the hosts' C{fence_after} (L{hosts.schema_v15})."""
    hosts.schema_v15(db)


MIGRATIONS = [_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8, _v9, _v10, _v11, _v12, _v13, _v14,
              _v15]
"""Schema migrations, in order; append, never edit."""

JSON_COLUMNS = {
    hosts.TABLE: hosts.JSON_COLUMNS,
    apps.TABLE: apps.JSON_COLUMNS,
    apps.SPECS_TABLE: apps.SPECS_JSON_COLUMNS,
    machines.TABLE: machines.JSON_COLUMNS,
    drains.TABLE: drains.JSON_COLUMNS,
    "events": ("payload",),
}


def migrate(db, migrations=None):
    """
    Bring C{db} to the newest schema version.

    @param db: a L{sqlite_utils.Database}.
    @param migrations: the migrations (default L{MIGRATIONS}).
    @return: the schema version now in force.
    """
    migrations = MIGRATIONS if migrations is None else migrations
    if "schema_version" not in db.table_names():
        db["schema_version"].create({"version": int})
        db["schema_version"].insert({"version": 0})
    version = db.execute("SELECT version FROM schema_version").fetchone()[0]
    if version > len(migrations):
        raise RuntimeError(
            f"the database has schema version {version}, newer than this zwrm knows"
            f" ({len(migrations)})"
        )
    for n in range(version, len(migrations)):
        with db.conn:
            db.conn.execute("BEGIN")
            migrations[n](db)
            db.conn.execute("UPDATE schema_version SET version = ?", [n + 1])
    return len(migrations)


def _decode(table, row):
    if row is None:
        return None
    row = dict(row)
    for col in JSON_COLUMNS.get(table, ()):
        if isinstance(row.get(col), str):
            row[col] = json.loads(row[col])
    return row


def _encode(table, row):
    row = dict(row)
    for col in JSON_COLUMNS.get(table, ()):
        if col in row and not isinstance(row[col], str | type(None)):
            row[col] = json.dumps(row[col], sort_keys=True)
    return row


class Store:
    """
    The control plane's SQLite database, used from the reactor thread.

    Every method returns a L{Deferred}; the work runs on the store's own thread.

    @ivar path: the database file, or C{":memory:"}.
    """

    def __init__(self, reactor, path, now=time.time):
        """
        @param reactor: the reactor whose thread the results come back to.
        @param path: the database file (created if missing) or C{":memory:"}.
        @param now: the wall clock used for timestamps (seconds since the epoch).
        """
        self._reactor = reactor
        self.path = str(path)
        self._now = now
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="zwrm-store")
        self._db = None

    # -- life cycle -------------------------------------------------------------------

    def start(self):
        """
        Start the store's thread, open the database and migrate it.

        @return: a Deferred that fires with the schema version.
        """
        self._pool.start()
        return self.run(self._open)

    def stop(self):
        """
        Close the database and stop the thread.

        @return: a Deferred that fires when the thread has stopped.
        """

        if not self._pool.started:
            from twisted.internet.defer import succeed

            return succeed(None)

        def close(db):
            db.conn.close()

        d = self.run(close)

        def stop(result):
            self._pool.stop()
            return result

        return d.addBoth(stop)

    def _open(self, _):
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db = sqlite_utils.Database(conn)
        if self.path != ":memory:":
            db.enable_wal()
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        self._db = db
        return migrate(db)

    def run(self, fn, *args, **kwargs):
        """
        Run C{fn(db, *args, **kwargs)} on the store's thread.

        This is the way other parts add their own queries.

        A database that cannot grow (the disk is full: SQLite's C{SQLITE_FULL}) fails with
        L{errors.ResourceExhausted}, which callers answer as it is, without a traceback;
        SQLite has rolled back the statement, and a transaction C{fn} opened with
        C{with db.conn} is rolled back as it leaves.

        @param fn: a callable taking a L{sqlite_utils.Database} first.
        @return: a Deferred firing with C{fn}'s result.
        """
        return deferToThreadPool(self._reactor, self._pool, self._call, fn, args, kwargs)

    def _call(self, fn, args, kwargs):
        try:
            return fn(self._db, *args, **kwargs)
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
                raise
            raise errors.ResourceExhausted(
                f"the control plane's disk is full: its database ({self.path}) cannot grow"
            ) from None

    # -- generic rows -----------------------------------------------------------------

    def get(self, table, pk):
        """The row of C{table} with primary key C{pk} (JSON decoded), or L{None}."""

        def get(db):
            rows = list(db[table].rows_where("id = ?", [pk]))
            return _decode(table, rows[0]) if rows else None

        return self.run(get)

    def select(self, table, where=None, args=(), order_by=None, limit=None):
        """The rows of C{table} matching C{where} (JSON decoded), as a list of dicts."""

        def select(db):
            if table not in db.table_names():
                return []
            return [
                _decode(table, r)
                for r in db[table].rows_where(where, list(args), order_by=order_by, limit=limit)
            ]

        return self.run(select)

    def insert(self, table, row):
        """Insert C{row} into C{table} (JSON columns encoded)."""
        d = self.run(self.inserting(table, row))
        d.addCallback(lambda _: None)
        return d

    def upsert(self, table, row):
        """Insert or update C{row} of C{table} by its C{id}."""
        return self.run(self.upserting(table, row))

    def update(self, table, pk, fields):
        """
        Update the given C{fields} of the row C{pk} of C{table}.

        @raise zwrm.errors.NotFound: (as a failed Deferred) if there is no such row (it
            may have been deleted since it was read).
        """
        return self.run(self.updating(table, pk, fields))

    # -- changes for L{change_with_events}: functions of the database, run in the
    # transaction it holds

    @staticmethod
    def inserting(table, row):
        """The change that inserts C{row} into C{table}."""
        return lambda db: db[table].insert(_encode(table, row))

    @staticmethod
    def upserting(table, row):
        """The change that inserts or replaces C{row} of C{table} (by its C{id})."""
        return lambda db: db[table].upsert(_encode(table, row), pk="id")

    @staticmethod
    def updating(table, pk, fields):
        """
        The change that updates C{fields} of row C{pk} of C{table}.

        @raise zwrm.errors.NotFound: (when run) no such row.
        """
        def update(db):
            try:
                db[table].update(pk, _encode(table, fields))
            except sqlite_utils.db.NotFoundError:
                raise errors.NotFound(f"no {table[:-1]} {pk!r}") from None

        return update

    @staticmethod
    def deleting(table, pk):
        """The change that deletes row C{pk} of C{table} (if it is there)."""
        return lambda db: db[table].delete_where("id = ?", [pk])

    def change_with_event(self, change, topic, kind, subject, payload):
        """
        Run C{change(db)} (a row's insert, update or delete) and append its event, in one
        transaction: whatever stops the control plane in between (a power cut), the change
        is stored with its event or not at all (and an agent's report of it, unanswered,
        comes again).

        @return: a Deferred firing with the event (as L{add_event}'s).
        """
        d = self.change_with_events(change, [(topic, kind, subject, payload)])
        d.addCallback(lambda result: result[1][0])
        return d

    def change_with_events(self, change, events):
        """
        Run C{change(db)} and append C{events}, in one transaction (L{change_with_event}).

        @param change: a function of the database, run in the store's thread, inside the
            transaction (it must not begin or commit one of its own).
        @param events: a list of C{(topic, kind, subject, payload)}, or a function of what
            C{change} returned that gives that list (a payload may hold what only the
            change knows, e.g. the version it stored).
        @return: a Deferred firing with C{(change's result, [event, ...])}, the events as
            L{add_event}'s.
        """
        ts = self._now()  # read here, on the reactor's thread (a test's Clock)

        def run(db):
            with db.conn:
                db.conn.execute("BEGIN")
                result = change(db)
                stored = []
                for topic, kind, subject, payload in (
                        events(result) if callable(events) else events):
                    event = {"ts": ts, "topic": topic, "kind": kind, "subject": subject,
                             "payload": payload}
                    row = db["events"].insert(_encode("events", event))
                    stored.append(dict(event, id=row.last_pk))
            return result, stored

        return self.run(run)

    def update_with_event(self, table, pk, fields, topic, kind, subject, payload):
        """
        Update the given C{fields} of row C{pk} of C{table} and append its event, in one
        transaction (L{change_with_event}).

        @return: a Deferred firing with the event (as L{add_event}'s).
        @raise zwrm.errors.NotFound: (as a failed Deferred) no such row; nothing stored.
        """
        return self.change_with_event(self.updating(table, pk, fields), topic, kind, subject,
                                      payload)

    def insert_with_event(self, table, row, topic, kind, subject, payload):
        """Insert C{row} into C{table} and append its event, in one transaction."""
        return self.change_with_event(self.inserting(table, row), topic, kind, subject, payload)

    def delete_with_event(self, table, pk, topic, kind, subject, payload):
        """Delete row C{pk} of C{table} (if it is there) and append its event, in one
        transaction."""
        return self.change_with_event(self.deleting(table, pk), topic, kind, subject, payload)

    # -- domain helpers ----------------------------------------------------------------

    def save_heartbeats(self, beats):
        """
        Persist many hosts' last heartbeats in one transaction.

        @param beats: a dict mapping host id to wall-clock time of its last heartbeat.
        """
        items = [(ts, hid) for hid, ts in beats.items()]

        def save(db):
            with db.conn:
                db.conn.execute("BEGIN")
                db.conn.executemany("UPDATE hosts SET last_heartbeat = ? WHERE id = ?", items)

        return self.run(save) if items else self.run(lambda db: None)

    def add_event(self, topic, kind, subject, payload):
        """
        Append an event to the event log.

        @return: a Deferred firing with the event as a dict (with its C{id} and C{ts}).
        """
        event = {
            "ts": self._now(),
            "topic": topic,
            "kind": kind,
            "subject": subject,
            "payload": payload,
        }

        def add(db):
            row = db["events"].insert(_encode("events", event))
            return dict(event, id=row.last_pk)

        return self.run(add)

    def recent_events(self, subject, limit=20):
        """The last C{limit} events about C{subject}, newest first."""
        return self.select(
            "events", "subject = ?", [subject], order_by="id desc", limit=limit
        )

    def add_token(self, token_id, kind, secret, expires_at=None):
        """Store a token's hash under C{token_id} with C{kind} (operator, viewer, join)."""
        return self.upsert(
            "tokens",
            {
                "id": token_id,
                "kind": kind,
                "secret_hash": hash_secret(secret),
                "expires_at": expires_at,
                "revoked": 0,
                "created_at": self._now(),
            },
        )

    def find_token(self, kind, secret):
        """
        The unrevoked, unexpired token of C{kind} whose secret is C{secret}, or L{None}.
        """
        now = self._now()

        def find(db):
            rows = list(
                db["tokens"].rows_where(
                    "kind = ? AND secret_hash = ? AND revoked = 0"
                    " AND (expires_at IS NULL OR expires_at > ?)",
                    [kind, hash_secret(secret), now],
                )
            )
            return rows[0] if rows else None

        return self.run(find)
