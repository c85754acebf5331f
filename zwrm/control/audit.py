"""
The audit trail: every operator action, stored with who did it and how it ended.

Every WAMP call that changes state (L{audited}: a procedure only the operator role may call,
other than the few that only read) made by a session of role C{operator} (or C{admin}) is
stored in the store's C{audit} table when it ends: its time, the caller's authid and role (as
the router disclosed them), the procedure, its arguments (secrets redacted: L{redact}) and its
result (C{ok}, or the error URI and message).  Calls the router refused (a viewer calling
C{zwrm.host.drain}) never reach the control plane and are not stored; calls refused by the
control plane (C{zwrm.error.invalid_argument}, C{not_found}, ...) are.

Only operators read it (C{zwrm.audit.list}, C{zwrm audit}), as only cluster administrators
read Kubernetes' audit log and only a management token reads Nomad's: the trail names who
did what, which a viewer (a dashboard, a read-only token) has no need to know.

It is bounded like the event history: the newest C{max_entries} younger than C{max_age}
(L{AuditLog.prune}, on the store's thread every L{PRUNE_INTERVAL} seconds).

The hook is L{AuditLog.wrap}, applied by L{zwrm.control.api.ControlSession} to each procedure
it registers (around its schema check), so that no procedure can be forgotten.
"""

import json
import re

from autobahn import wamp
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import RegisterOptions
from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.logger import Logger

from zwrm import errors
from zwrm.control import schema
from zwrm.control.resources.apps import public_spec

TABLE = "audit"

AUDITED_ROLES = ("operator", "admin")
"""The roles whose calls are stored."""

READS = frozenset({
    "zwrm.app.plan", "zwrm.app.history", "zwrm.machine.logs", "zwrm.image.info",
    "zwrm.token.list", "zwrm.audit.list", "zwrm.event.history", "zwrm.cluster.info",
})
"""Operator procedures that change nothing (not stored)."""

DEFAULT_MAX_ENTRIES = 100000
DEFAULT_MAX_AGE = 365 * 86400.0
PRUNE_INTERVAL = 3600.0
PRUNE_BATCH = 5000
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10000
MAX_STRING = 512
"""Longer argument strings (a certificate's PEM) are stored cut to this many characters."""

REDACTED = "<redacted>"

_DETAILS_ARG = "_zwrm_audit_details"


def schema_v9(db):
    """The C{audit} table (store schema version 9)."""
    db.execute(
        "CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, ts FLOAT, authid TEXT,"
        " role TEXT, procedure TEXT, args TEXT, result TEXT, message TEXT)")
    db["audit"].create_index(["ts"])


def audited(uri):
    """
    Whether calls of C{uri} are stored: a procedure the operator may call and a viewer may
    not, other than L{READS}.
    """
    procedure = schema.PROCEDURES.get(uri)
    if procedure is None:
        return not uri.startswith(("zwrm.agent.", "zwrm.crossbar."))
    return ("operator" in procedure.roles and "viewer" not in procedure.roles
            and uri not in READS)


def _cut(value):
    if isinstance(value, str) and len(value) > MAX_STRING:
        return value[:MAX_STRING] + f"... ({len(value)} characters)"
    if isinstance(value, dict):
        return {k: _cut(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_cut(v) for v in value]
    return value


def redact(uri, args, kwargs):
    """
    A call's arguments as a mapping by name, fit to store: an argument the schema marks
    secret (a certificate's key, a host credential) is L{REDACTED} (a token given by its id
    stays), an app spec loses its cloud-init C{user_data} and C{env} as a viewer's wire form
    does (L{public_spec}: their SHA-256 and size), console keystrokes only their size; long
    strings are cut (L{MAX_STRING}).
    """
    procedure = schema.PROCEDURES.get(uri)
    names = [a.name for a in procedure.args] if procedure is not None else []
    out = {}
    for i, value in enumerate(args):
        out[names[i] if i < len(names) else f"#{i}"] = value
    out.update(kwargs)
    secret = {a.name for a in procedure.args if a.secret} if procedure is not None else set()
    for name, value in list(out.items()):
        if name in secret:
            if not (name == "token_id" and isinstance(value, str)
                    and re.fullmatch(r"[A-Za-z0-9-]{1,32}", value)):  # an id, not the text
                out[name] = REDACTED
        elif name == "spec":
            out[name] = public_spec(value)
        elif uri == "zwrm.machine.console_write" and name == "data":
            out[name] = {"size": len(value) if isinstance(value, str) else None}
    return _cut(out)


def _row(row):
    row = dict(row)
    if isinstance(row.get("args"), str):
        row["args"] = json.loads(row["args"])
    return row


class AuditLog:
    """The stored audit trail (the C{audit} table) and the hook that fills it."""

    log = Logger()

    def __init__(self, clock, store, max_entries=DEFAULT_MAX_ENTRIES, max_age=DEFAULT_MAX_AGE):
        if not (isinstance(max_entries, int) and max_entries >= 1):
            raise ValueError(f"[audit] max_entries must be a positive integer, not {max_entries!r}")
        if not max_age > 0:
            raise ValueError(f"[audit] max_age must be a positive number of seconds, not {max_age!r}")
        self._clock = clock
        self._store = store
        self.max_entries = max_entries
        self.max_age = float(max_age)

    def record(self, authid, role, procedure, args, result, message=None):
        """
        Store one call.

        @return: a Deferred firing with the entry's id.
        """
        entry = {"ts": self._clock.seconds(), "authid": authid, "role": role,
                 "procedure": procedure, "args": json.dumps(args, sort_keys=True, default=repr),
                 "result": result, "message": message}

        def insert(db):
            return db[TABLE].insert(entry).last_pk

        return self._store.run(insert)

    def list(self, since=None, limit=DEFAULT_LIMIT, uri=None, authid=None):
        """
        The newest C{limit} entries at or after C{since} (POSIX time), oldest first; only
        calls of procedure C{uri}, by C{authid}, if given.

        @return: a Deferred firing with C{[{id, ts, authid, role, procedure, args, result,
            message}]}.
        """
        where, params = [], []
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        if uri is not None:
            where.append("procedure = ?")
            params.append(uri)
        if authid is not None:
            where.append("authid = ?")
            params.append(authid)

        def select(db):
            sql = ("SELECT id, ts, authid, role, procedure, args, result, message FROM audit"
                   + (" WHERE " + " AND ".join(where) if where else "")
                   + " ORDER BY id DESC LIMIT ?")
            cur = db.conn.execute(sql, params + [limit])
            cols = [c[0] for c in cur.description]
            rows = [_row(dict(zip(cols, r, strict=True))) for r in cur.fetchall()]
            rows.reverse()
            return rows

        return self._store.run(select)

    def prune(self):
        """
        Delete the oldest entries beyond C{max_entries} or older than C{max_age}, in batches.

        @return: a Deferred firing with the number deleted.
        """
        cutoff = self._clock.seconds() - self.max_age

        def delete(db):
            hi = db.conn.execute("SELECT MAX(id) FROM audit").fetchone()[0]
            if hi is None:
                return 0
            return db.conn.execute(
                "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE id <= ? OR ts < ?"
                " ORDER BY id LIMIT ?)", [hi - self.max_entries, cutoff, PRUNE_BATCH]).rowcount

        async def run():
            deleted = 0
            while True:
                n = await self._store.run(delete)
                deleted += n
                if n < PRUNE_BATCH:
                    return deleted

        return defer.Deferred.fromCoroutine(run())

    def service(self, interval=PRUNE_INTERVAL):
        """A L{TimerService} that prunes every C{interval} seconds."""

        def prune():
            return self.prune().addErrback(
                lambda f: errors.log_failure(self.log, f, "pruning the audit trail"))

        timer = TimerService(interval, prune)
        timer.clock = self._clock
        return timer

    # -- the hook ----------------------------------------------------------------------

    def wrap(self, uri, fn, options):
        """
        C{fn} (a registered procedure, C{uri}) storing each call of an audited role, and
        the register options it needs (the call's details: the caller's authid and role).

        @return: C{(fn, options)} to register.
        """
        if not audited(uri):
            return fn, options
        own = getattr(options, "details_arg", None)
        if own is None:
            fields = {k: getattr(options, k) for k in RegisterOptions.__slots__} if options else {}
            options = RegisterOptions(**dict(fields, details_arg=_DETAILS_ARG))
        name = own or _DETAILS_ARG

        def call(*args, **kwargs):
            details = kwargs.get(name) if own else kwargs.pop(name, None)
            role = getattr(details, "caller_authrole", None)
            if role not in AUDITED_ROLES:
                return fn(*args, **kwargs)
            authid = getattr(details, "caller_authid", None)
            shown = {k: v for k, v in kwargs.items() if k != own}
            try:
                stored_args = redact(uri, args, shown)
            except Exception:  # never fail a call for its audit entry
                self.log.failure("redacting the arguments of {uri}", uri=uri)
                stored_args = {"#": REDACTED}

            def store(result, message=None):
                d = self.record(authid, role, uri, stored_args, result, message)
                d.addErrback(lambda f: errors.log_failure(
                    self.log, f, "storing the audit entry of {uri}", uri=uri))

            def ok(value):
                store("ok")
                return value

            def failed(failure):
                e = failure.value
                if isinstance(e, ApplicationError):
                    store(e.error, str(e.args[0]) if e.args else None)
                elif isinstance(e, defer.CancelledError):
                    store("cancelled")
                else:
                    store(errors.Internal.uri)
                return failure

            return defer.maybeDeferred(fn, *args, **kwargs).addCallbacks(ok, failed)

        call.__name__ = getattr(fn, "__name__", "procedure")
        call.__doc__ = fn.__doc__
        return call, options


class AuditAPI:
    """C{zwrm.audit.list} (operator)."""

    def __init__(self, audit):
        self.audit = audit

    @wamp.register("zwrm.audit.list")
    def list(self, since=None, limit=DEFAULT_LIMIT, uri=None, authid=None):
        """
        The newest C{limit} audit entries at or after C{since}, oldest first (only calls of
        procedure C{uri}, by C{authid}, if given).
        """
        return self.audit.list(since, limit, uri, authid)
