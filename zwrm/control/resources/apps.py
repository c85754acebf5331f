"""
The apps resource: the C{apps} table (C{id, name, spec, spec_version, destroying,
created_at}) and its spec versions (C{app_specs}), an app's wire form and its update
methods.

C{spec} is the deployed spec (L{zwrm.control.apps.validate_spec}'s normal form), or
L{None} for an app never deployed, or destroyed while its volumes are kept.
C{destroying} is L{None}, or C{{"volumes": bool, "since": time, "delay_ends": time}}: a
destroy was asked and has not ended yet (it is stored before its first machine stops, and
goes on after a restart of the control plane or once the hosts it waits for can be
reached); C{delay_ends} is when the shutdown_delay of the machines it takes out of the
routes at once ends (a destroy that goes on after a restart waits only what is left of it).

Events (C{zwrm.event.app}); the payload is always the app's wire form (L{wire}) with
C{app_id}, C{app} (its name) and C{reason}:

 - C{created}: a new, empty app;
 - C{deployed}: a new spec was stored (its next C{spec_version});
 - C{scaled}: its replica count changed (C{replicas}; a new spec version too);
 - C{destroying}: a destroy was asked (C{destroying}); it is carried out from now on;
 - C{destroyed}: its row was deleted, or its spec cleared (C{volumes_kept} true);
 - C{rollout}: a rolling update's progress (L{Apps.rollout}): C{state} C{started},
   C{progress}, C{completed}, C{failed} or C{reverted}, with C{version} (the spec version
   being rolled out), C{replaced} and C{total} (old machines replaced so far, of), and
   the update's settings (C{update}); the event log keeps it, no row changes.
"""

import hashlib
import json

from zwrm import errors
from zwrm.control.resources import Resource, store_with_events, update_method
from zwrm.control.resources.volumes import SCHEDULES_TABLE

TOPIC = "zwrm.event.app"


TABLE = "apps"
JSON_COLUMNS = ("spec", "destroying")
"""Columns stored as JSON text (the store encodes and decodes them)."""
SPECS_TABLE = "app_specs"
SPECS_JSON_COLUMNS = ("spec",)


def schema_v1(db):
    """The C{apps} table, as schema version 1 of L{zwrm.control.store} made it."""
    db["apps"].create(
        {"id": str, "name": str, "spec": str, "created_at": float}, pk="id"
    )
    db["apps"].create_index(["name"], unique=True)


def schema_v5(db):
    """
    Spec versions: every spec an app was given is kept in C{app_specs} (C{app_id, version,
    spec, created_at}), and C{apps.spec_version} is the version in force (0: none yet).
    An app deployed before has its spec as version 1.
    """
    db[SPECS_TABLE].create(
        {"app_id": str, "version": int, "spec": str, "created_at": float},
        pk=("app_id", "version"),
    )
    db["apps"].add_column("spec_version", int, not_null_default=0)
    db.execute("UPDATE apps SET spec_version = 1 WHERE spec IS NOT NULL")
    db.execute(
        "INSERT INTO app_specs (app_id, version, spec, created_at)"
        " SELECT id, 1, spec, created_at FROM apps WHERE spec IS NOT NULL"
    )


def schema_v11(db):
    """C{apps.destroying}: the destroy asked and not ended yet (L{None}: none)."""
    db["apps"].add_column("destroying", str)


SECRET_FIELDS = ("user_data", "env")
"""The cloud-init fields that viewers see as their digest (L{secret_digest})."""


def secret_digest(value):
    """C{{sha256, size}} of a secret (a str, or a mapping as canonical JSON), or L{None}."""
    if value is None or value == {} or value == "":
        return None
    data = (value if isinstance(value, str) else json.dumps(value, sort_keys=True)).encode()
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def public_spec(spec):
    """
    What viewers may see of a spec (an app's, or a machine's agent spec): its cloud-init
    C{user_data} and C{env} are replaced by their SHA-256 and size (only the agent that
    runs a machine gets them); public SSH keys stay.
    """
    if not isinstance(spec, dict):
        return spec
    out = dict(spec)
    ci = out.get("cloud_init")
    if isinstance(ci, dict):
        ci = dict(ci)
        for key in SECRET_FIELDS:
            if key in ci:
                ci[key] = secret_digest(ci[key])
        out["cloud_init"] = ci
    if isinstance(out.get("app_spec"), dict):
        out["app_spec"] = public_spec(out["app_spec"])
    return out


def wire(row):
    """
    The wire form of an app: C{id, name, spec, spec_version, destroying, created_at}
    (C{spec_version} counts the specs it was given: 0 before its first deploy; C{spec}
    without its secrets: L{public_spec}; C{destroying}: L{None}, or the destroy under way,
    C{{volumes, since}}).
    """
    return {"id": row["id"], "name": row["name"], "spec": public_spec(row.get("spec")),
            "spec_version": row.get("spec_version") or 0,
            "destroying": row.get("destroying"), "created_at": row.get("created_at")}


class Apps(Resource):
    """The apps of the cluster: rows, update methods, events."""

    topic = TOPIC

    # -- reads ------------------------------------------------------------------------

    async def by_name(self, name):
        """The row of the app called C{name}. @raise zwrm.errors.NotFound: none."""
        rows = await self._store.select("apps", "name = ?", [name])
        if not rows:
            raise errors.NotFound(f"no app {name!r}")
        return rows[0]

    async def by_id(self, app_id):
        """The row of the app C{app_id}, or L{None}."""
        rows = await self._store.select("apps", "id = ?", [app_id])
        return rows[0] if rows else None

    async def exists(self, name):
        """Whether an app is called C{name}."""
        return bool(await self._store.select("apps", "name = ?", [name]))

    def all(self):
        """Every app row, by name (a Deferred)."""
        return self._store.select("apps", order_by="name")

    def destroying(self):
        """The rows of the apps whose destroy is under way, by name (a Deferred)."""
        return self._store.select("apps", "destroying IS NOT NULL", order_by="name")

    def spec_versions(self, app_id):
        """Every spec C{app_id} was given, oldest first: C{[{version, spec, created_at}]}."""
        return self._store.select(SPECS_TABLE, "app_id = ?", [app_id], order_by="version")

    # -- update methods ---------------------------------------------------------------

    async def _produce(self, kind, row, reason, **extra):
        return await self.produce_event(kind, row["id"], self._payload(row, reason, **extra))

    def _payload(self, row, reason, **extra):
        return dict(wire(row), app_id=row["id"], app=row["name"], reason=reason, **extra)

    @update_method
    async def add(self, row):
        """Store a new app row with its event C{created}."""
        await self.store_with_event(self._store.inserting("apps", row), "created", row["id"],
                                    self._payload(row, "created"))
        return row

    @update_method
    async def set_spec(self, row, spec, kind="deployed", **extra):
        """
        Store C{spec} as the app's spec (C{row} is updated in place), as its next spec
        version (kept in C{app_specs}); event C{kind} (C{deployed}, C{scaled}, or
        C{destroyed} when C{spec} is L{None}: no version is added then).  A destroy
        under way ends with it (C{destroying} cleared).
        """
        now = self._clock.seconds()
        app_id = row["id"]

        def store(db):
            version = db.execute("SELECT spec_version FROM apps WHERE id = ?",
                                 [app_id]).fetchone()
            if version is None:
                raise errors.NotFound(f"no app {row['name']!r}")
            version = version[0] or 0
            encoded = json.dumps(spec, sort_keys=True) if spec is not None else None
            if spec is not None:
                version += 1
                db[SPECS_TABLE].insert({"app_id": app_id, "version": version,
                                        "spec": encoded, "created_at": now})
            db["apps"].update(app_id, {"spec": encoded, "spec_version": version,
                                       "destroying": None})
            return version

        # the version is the store's to give: the payload takes it from the change
        payload = self._payload(dict(row, spec=spec, destroying=None), kind, **extra)
        row["spec_version"] = await self.store_with_event(
            store, kind, app_id, lambda version: dict(payload, spec_version=version))
        row["spec"] = spec
        row["destroying"] = None
        return row

    @update_method
    async def set_destroying(self, row, volumes, delay=0.0):
        """
        Store that the app is being destroyed, its volumes too if C{volumes} (C{row} is
        updated in place), its machines out of the routes for C{delay} seconds from now
        (its C{delay_ends}); event C{destroying}.  A destroy asked again replaces it.
        """
        now = self._clock.seconds()
        destroying = {"volumes": bool(volumes), "since": now, "delay_ends": now + delay}
        await self.store_with_event(self._store.updating("apps", row["id"],
                                                         {"destroying": destroying}),
                                    "destroying", row["id"],
                                    self._payload(dict(row, destroying=destroying), "destroying"))
        row["destroying"] = destroying
        return row

    @update_method
    async def rollout(self, row, state, reason, **extra):
        """
        Announce a rolling update's progress (C{state}: C{started}, C{progress},
        C{completed}, C{failed}, C{reverted}); event C{rollout}, kept in the event log.
        """
        await self._produce("rollout", row, reason, state=state, **extra)
        return row

    async def last_rollout(self, row):
        """
        The payload of the app's last C{rollout} event (L{rollout}) with C{at}, the time
        it was stored; or L{None}.
        """
        rows = await self._store.select("events", "subject = ? AND kind = ?",
                                        [row["id"], "rollout"], order_by="id desc", limit=1)
        return dict(rows[0]["payload"], at=rows[0]["ts"]) if rows else None

    @update_method
    async def delete(self, row, schedule=None, volumes=None):
        """
        Delete the app's row; event C{destroyed}.  With C{schedule} (its row of the
        snapshot schedules, kept by C{volumes}, the L{Volumes} resource), that schedule
        too, in the same transaction (event C{snapshot_schedule_destroyed} first): a
        failure deletes neither.
        """
        if schedule is None:
            await self.store_with_event(self._store.deleting("apps", row["id"]), "destroyed",
                                        row["id"], self._payload(row, "destroyed"))
            return
        drop_schedule = self._store.deleting(SCHEDULES_TABLE, schedule["id"])
        drop_app = self._store.deleting("apps", row["id"])

        def change(db):
            drop_schedule(db)
            drop_app(db)

        await store_with_events(self._store, change, [
            (volumes, "snapshot_schedule_destroyed", row["id"],
             volumes.schedule_destroyed_payload(schedule, f"app {row['name']} destroyed")),
            (self, "destroyed", row["id"], self._payload(row, "destroyed"))])
