"""
C{zwrm-control backup|restore}: a running control plane with hosts, apps and tokens is
backed up, the backup restored into a fresh data directory, and a control plane started
there knows everything; bad input and a running control plane are refused, changing nothing.
"""

import hashlib
import json
import os
import sqlite3
import stat
import sys

from twisted.internet import reactor, utils
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm.agent.service import AgentService
from zwrm.agent.tap import AgentConfig
from zwrm.control import backup
from zwrm.control.service import lock_data_dir
from zwrm.testing.processes import ControlPlaneProcess, free_port, run_cli, temp_dir

ZWRM_CONTROL = ["-c", "import sys; from zwrm.control.backup import main; sys.exit(main())"]


async def zwrm_control(*args):
    out, err, code = await utils.getProcessOutputAndValue(
        sys.executable, [*ZWRM_CONTROL, *args], env=dict(os.environ), path=os.getcwd())
    return code, out.decode(), err.decode()


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


class BackupRestoreTests(TestCase):
    timeout = 180

    def test_backup_running_restore_fresh(self):
        return ensureDeferred(self._round_trip())

    async def _cli(self, cp, *args):
        code, out, err = await run_cli(reactor, list(args), cp.url, cp.operator_token)
        self.assertEqual(code, 0, err)
        return json.loads(out) if "--json" in args else out

    async def _round_trip(self):
        tmp = temp_dir(self)
        port = free_port()
        config = os.path.join(tmp, "control.toml")
        with open(config, "w") as f:
            f.write(f'[control]\ndata_dir = "{tmp}/cp"\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n')
        cp = ControlPlaneProcess(reactor, os.path.join(tmp, "cp"), port=port)
        self.addCleanup(lambda: ensureDeferred(cp.stop()))
        await cp.start()

        # state: a host, an app, a join token
        agent = AgentService(reactor, AgentConfig(
            url=cp.url, join_token=cp.join_token, data_dir=os.path.join(tmp, "a1"), name="a1",
            retry_initial=0.05, retry_max=0.2))
        agent.startService()
        self.addCleanup(agent.stopService)
        await agent.registered
        await self._cli(cp, "apps", "create", "web")
        created = await self._cli(cp, "tokens", "create", "--description", "rack-7", "--json")

        # a backup while it runs
        out = os.path.join(tmp, "backups", "zwrm-backup.db")
        os.makedirs(os.path.dirname(out))
        code, stdout, err = await zwrm_control("backup", "--config", config, out)
        self.assertEqual(code, 0, err)
        self.assertIn("backed up", stdout)
        self.assertEqual(_mode(out), 0o600)
        self.assertEqual(backup.check_backup(out), backup.check_backup(os.path.join(cp.data_dir,
                                                                                   "zwrm.db")))

        # a restore into the running control plane's directory is refused, changing nothing
        before = sorted(os.listdir(cp.data_dir))
        code, stdout, err = await zwrm_control("restore", "--config", config, out)
        self.assertEqual(code, 1)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("refusing to restore: another zwrm-control", err)
        self.assertEqual(sorted(os.listdir(cp.data_dir)), before)

        # into a fresh directory, then a control plane there knows everything
        fresh = os.path.join(tmp, "fresh")
        code, stdout, err = await zwrm_control("restore", "--data-dir", fresh, out)
        self.assertEqual(code, 0, err)
        self.assertEqual(_mode(fresh), 0o700)
        for root, _dirs, files in os.walk(fresh):
            for name in files:
                self.assertEqual(_mode(os.path.join(root, name)) & 0o077, 0, name)
        with open(os.path.join(cp.data_dir, "pki", "ca.pem")) as f, \
                open(os.path.join(fresh, "pki", "ca.pem")) as g:
            self.assertEqual(f.read(), g.read())
        await agent.stopService()
        await cp.stop()
        cp2 = ControlPlaneProcess(reactor, fresh)
        self.addCleanup(lambda: ensureDeferred(cp2.stop()))
        await cp2.start()
        self.assertEqual(cp2.operator_token, cp.operator_token)
        hosts = await self._cli(cp2, "host", "list", "--json")
        self.assertEqual([h["name"] for h in hosts], ["a1"])
        apps = await self._cli(cp2, "apps", "list", "--json")
        self.assertEqual([a["name"] for a in apps], ["web"])
        tokens = await self._cli(cp2, "tokens", "list", "--json")
        self.assertIn((created["id"], "rack-7"), [(t["id"], t["description"]) for t in tokens])


class RefusalTests(SynchronousTestCase):
    """Bad input or a locked data directory: a readable refusal, nothing replaced."""

    def setUp(self):
        self.tmp = temp_dir(self)
        self.data_dir = os.path.join(self.tmp, "cp")
        os.makedirs(self.data_dir)
        self.db = os.path.join(self.data_dir, "zwrm.db")
        import sqlite_utils

        from zwrm.control.store import migrate

        db = sqlite_utils.Database(self.db)
        migrate(db)
        db.conn.execute("INSERT INTO apps (id, name, spec, created_at) VALUES ('a', 'old', '{}', 0)")
        db.conn.commit()
        db.conn.close()
        self.before = _digest(self.db)

    def assertRefused(self, source, text):
        e = self.assertRaises(backup.BackupError, backup.restore_sync, self.data_dir, source)
        self.assertIn(text, e.message)
        self.assertEqual(_digest(self.db), self.before)
        self.assertEqual(sorted(os.listdir(self.data_dir)), ["control.lock", "zwrm.db"]
                         if os.path.exists(os.path.join(self.data_dir, "control.lock"))
                         else ["zwrm.db"])

    def file(self, name, content):
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_bad_input(self):
        self.assertRefused(os.path.join(self.tmp, "none.db"), "does not exist")
        self.assertRefused(self.file("garbage.db", b"not sqlite at all" * 10), "is not a SQLite")
        other = os.path.join(self.tmp, "other.db")
        conn = sqlite3.connect(other)
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
        conn.close()
        self.assertRefused(other, "is not a zwrm database: no table schema_version")
        newer = os.path.join(self.tmp, "newer.db")
        backup.backup_sync(self.data_dir, newer)
        conn = sqlite3.connect(newer)
        conn.execute("UPDATE schema_version SET version = 999")
        conn.commit()
        conn.close()
        self.assertRefused(newer, "has schema version 999, newer than this zwrm knows")
        with open(newer, "r+b") as f:  # damage a page in the middle
            f.seek(4096 + 100)
            f.write(b"\xff" * 2000)
        self.assertRefused(newer, "")

    def test_refused_while_locked(self):
        good = os.path.join(self.tmp, "good.db")
        backup.backup_sync(self.data_dir, good)
        fd = lock_data_dir(self.data_dir)
        self.addCleanup(os.close, fd)
        self.assertRefused(good, "refusing to restore: another zwrm-control")

    def test_restore_keeps_the_old(self):
        good = os.path.join(self.tmp, "good.db")
        backup.backup_sync(self.data_dir, good)
        version, restored, kept = backup.restore_sync(self.data_dir, good, stamp="T")
        self.assertEqual(kept, [os.path.join(self.data_dir, "zwrm.db.before-restore-T")])
        self.assertEqual(_digest(kept[0]), self.before)
        conn = sqlite3.connect(self.db)
        self.assertEqual(conn.execute("SELECT name FROM apps").fetchall(), [("old",)])
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        conn.close()
        self.assertNotIn(backup.FILES_TABLE, tables)
        self.assertEqual(_mode(self.db), 0o600)

    def test_restored_files_belong_to_the_directory_owner(self):
        """As root (the usual `sudo zwrm-control restore`), files go to the directory's owner."""
        good = os.path.join(self.tmp, "good.db")
        backup.backup_sync(self.data_dir, good)
        owner = os.getuid()
        if owner == 0:
            owner = 65534  # nobody: the control plane's own user in this test
            os.chown(self.data_dir, owner, owner)
        _version, restored, kept = backup.restore_sync(self.data_dir, good, stamp="T")
        for path in [*restored, os.path.join(self.data_dir, "control.lock")]:
            self.assertEqual(os.stat(path).st_uid, owner, path)
        self.assertEqual(set(os.listdir(self.data_dir)),
                         {"zwrm.db", "zwrm.db.before-restore-T", "control.lock"})
