"""The store: migrations, WAL, rows, events, tokens, batched heartbeats."""

import sqlite_utils
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm import errors
from zwrm.control.store import MIGRATIONS, Store, hash_secret, migrate


def d(f):
    def wrapper(self):
        return ensureDeferred(f(self))

    wrapper.__name__ = f.__name__
    return wrapper


def tmpdir(testcase):
    """A fresh directory outside the checkout, removed after the test."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="zwrm-test-")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path + "/db"


class MigrateTests(SynchronousTestCase):
    def test_creates_every_table(self):
        db = sqlite_utils.Database(memory=True)
        self.assertEqual(migrate(db), len(MIGRATIONS))
        for table in ("hosts", "apps", "machines", "volumes", "drains", "migrations",
                      "tokens", "events", "schema_version"):
            self.assertIn(table, db.table_names())
        self.assertIn("state_before_offline", db["hosts"].columns_dict)

    def test_idempotent_and_appendable(self):
        """Running again does nothing; an appended migration runs once."""
        db = sqlite_utils.Database(memory=True)
        migrate(db)
        migrate(db)
        calls = []
        extra = MIGRATIONS + [lambda db: calls.append(1) or db["extra"].create({"id": int})]
        self.assertEqual(migrate(db, extra), len(MIGRATIONS) + 1)
        migrate(db, extra)
        self.assertEqual(calls, [1])

    def test_newer_database_refused(self):
        db = sqlite_utils.Database(memory=True)
        migrate(db, MIGRATIONS + [lambda db: None])
        self.assertRaises(RuntimeError, migrate, db)


class StoreTests(TestCase):
    @d
    async def test_file_wal_and_rows(self):
        path = tmpdir(self)
        store = Store(reactor, path)
        self.assertEqual(await store.start(), len(MIGRATIONS))
        self.addCleanup(store.stop)
        mode = await store.run(lambda db: db.execute("PRAGMA journal_mode").fetchone()[0])
        self.assertEqual(mode, "wal")
        await store.insert("apps", {"id": "a1", "name": "web", "spec": {"x": 1}, "created_at": 1.0})
        self.assertEqual((await store.get("apps", "a1"))["spec"], {"x": 1})
        await store.update("apps", "a1", {"spec": {"x": 2}})
        self.assertEqual((await store.select("apps"))[0]["spec"], {"x": 2})
        self.assertIsNone(await store.get("apps", "nope"))
        # a row deleted since it was read: a zwrm error, not sqlite_utils' (a traceback)
        with self.assertRaises(errors.NotFound) as cm:
            await store.update("machines", "m-gone", {"state": "running"})
        self.assertEqual(cm.exception.args[0], "no machine 'm-gone'")

    @d
    async def test_a_full_disk_is_resource_exhausted_and_changes_nothing(self):
        path = tmpdir(self)
        store = Store(reactor, path)
        await store.start()
        self.addCleanup(store.stop)
        await store.insert("apps", {"id": "a1", "name": "web", "spec": {}, "created_at": 1.0})

        def fill(db):
            # SQLite's own "database or disk is full" (SQLITE_FULL): the file may not grow
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            db.execute(f"PRAGMA max_page_count = {pages}")

        await store.run(fill)
        big = {"x": "y" * 200_000}
        with self.assertRaises(errors.ResourceExhausted) as cm:
            await store.insert("apps", {"id": "a2", "name": "db", "spec": big, "created_at": 2.0})
        self.assertEqual(cm.exception.message,
                         f"the control plane's disk is full: its database ({path}) cannot grow")
        with self.assertRaises(errors.ResourceExhausted):
            await store.update("apps", "a1", {"spec": big})
        self.assertEqual([a["id"] for a in await store.select("apps")], ["a1"])
        self.assertEqual((await store.get("apps", "a1"))["spec"], {})
        # other errors are not the disk's
        with self.assertRaises(Exception) as cm:
            await store.run(lambda db: db.execute("SELECT nothing FROM nowhere"))
        self.assertNotIsInstance(cm.exception, errors.ResourceExhausted)
        # room again: the same change is made
        await store.run(lambda db: db.execute("PRAGMA max_page_count = 1073741823"))
        await store.update("apps", "a1", {"spec": big})
        self.assertEqual((await store.get("apps", "a1"))["spec"], big)

    @d
    async def test_events_and_tokens(self):
        store = Store(reactor, ":memory:", now=lambda: 100.0)
        await store.start()
        self.addCleanup(store.stop)
        e1 = await store.add_event("zwrm.event.host", "state", "h1", {"state": "ready"})
        e2 = await store.add_event("zwrm.event.host", "state", "h1", {"state": "offline"})
        self.assertEqual((e1["ts"], e2["id"]), (100.0, e1["id"] + 1))
        recent = await store.recent_events("h1")
        self.assertEqual([e["payload"]["state"] for e in recent], ["offline", "ready"])
        await store.add_token("op", "operator", "s3cret")
        row = await store.find_token("operator", "s3cret")
        self.assertEqual(row["secret_hash"], hash_secret("s3cret"))
        self.assertNotIn("s3cret", repr(row))
        self.assertIsNone(await store.find_token("operator", "wrong"))
        self.assertIsNone(await store.find_token("join", "s3cret"))
        await store.add_token("old", "join", "expired", expires_at=50.0)
        self.assertIsNone(await store.find_token("join", "expired"))

    @d
    async def test_save_heartbeats_batch(self):
        store = Store(reactor, ":memory:")
        await store.start()
        self.addCleanup(store.stop)
        for i in range(3):
            await store.insert("hosts", {"id": f"h{i}", "state": "ready", "last_heartbeat": 0.0})
        await store.save_heartbeats({"h0": 5.0, "h2": 7.0})
        rows = {r["id"]: r["last_heartbeat"] for r in await store.select("hosts")}
        self.assertEqual(rows, {"h0": 5.0, "h1": 0.0, "h2": 7.0})
        await store.save_heartbeats({})
