"""
The apps resource: the C{apps} table (C{id, name, spec, created_at}), an app's wire form
and its update methods.

C{spec} is the deployed spec (L{zwrm.control.apps.validate_spec}'s normal form), or
L{None} for an app never deployed, or destroyed while its volumes are kept.

Events (C{zwrm.event.app}); the payload is always the app's wire form (L{wire}) with
C{app_id}, C{app} (its name) and C{reason}:

 - C{created}: a new, empty app;
 - C{deployed}: a new spec was stored;
 - C{scaled}: its replica count changed (C{replicas});
 - C{destroyed}: its row was deleted, or its spec cleared (C{volumes_kept} true).
"""

from zwrm import errors
from zwrm.control.resources import Resource, update_method

TOPIC = "zwrm.event.app"


TABLE = "apps"
JSON_COLUMNS = ("spec",)
"""Columns stored as JSON text (the store encodes and decodes them)."""


def schema_v1(db):
    """The C{apps} table, as schema version 1 of L{zwrm.control.store} made it."""
    db["apps"].create(
        {"id": str, "name": str, "spec": str, "created_at": float}, pk="id"
    )
    db["apps"].create_index(["name"], unique=True)


def wire(row):
    """The wire form of an app: C{id, name, spec, created_at}."""
    return {"id": row["id"], "name": row["name"], "spec": row.get("spec"),
            "created_at": row.get("created_at")}


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

    async def exists(self, name):
        """Whether an app is called C{name}."""
        return bool(await self._store.select("apps", "name = ?", [name]))

    def all(self):
        """Every app row, by name (a Deferred)."""
        return self._store.select("apps", order_by="name")

    # -- update methods ---------------------------------------------------------------

    async def _produce(self, kind, row, reason, **extra):
        payload = dict(wire(row), app_id=row["id"], app=row["name"], reason=reason, **extra)
        return await self.produce_event(kind, row["id"], payload)

    @update_method
    async def add(self, row):
        """Store a new app row; event C{created}."""
        await self._store.insert("apps", row)
        await self._produce("created", row, "created")
        return row

    @update_method
    async def set_spec(self, row, spec, kind="deployed", **extra):
        """
        Store C{spec} as the app's spec (C{row} is updated in place); event C{kind}
        (C{deployed}, C{scaled}, or C{destroyed} when C{spec} is L{None}).
        """
        await self._store.update("apps", row["id"], {"spec": spec})
        row["spec"] = spec
        await self._produce(kind, row, kind, **extra)
        return row

    @update_method
    async def delete(self, row):
        """Delete the app's row; event C{destroyed}."""
        await self._store.run(lambda db: db["apps"].delete_where("id = ?", [row["id"]]))
        await self._produce("destroyed", row, "destroyed")
