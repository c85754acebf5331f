"""
C{zwrm-control backup} and C{zwrm-control restore}: the control plane's state in one file.

    zwrm-control backup  [--config /etc/zwrm/control.toml | --data-dir DIR] OUT.db
    zwrm-control restore [--config /etc/zwrm/control.toml | --data-dir DIR] [--force] IN.db

A backup is a SQLite database: a copy of C{zwrm.db} made with SQLite's online backup API
(safe while the control plane runs: it reads one consistent snapshot and blocks no writer),
plus a table L{FILES_TABLE} holding the data directory's small files that are not in the
database (the cluster CA and server certificate in C{pki/}, the token files) and a table
L{META_TABLE} (when, from where, which schema version).  The image registry's blobs
(C{registry/}) are not in it: they are content-addressed files; copy that directory as it
is (or push the images again).  Backups are written mode 0600: they hold the CA key.

A restore refuses while a control plane uses the data directory (it holds
C{control.lock}; a listener that answers on a configured port also counts).  It checks the
input (a SQLite database that passes C{PRAGMA integrity_check}, with zwrm's tables and a
schema version this zwrm knows, older ones being migrated when the control plane starts),
copies it next to C{zwrm.db}, checks the copy again, and only then moves the old database
(with its C{-wal} and C{-shm}) aside as C{zwrm.db.before-restore-<time>} and puts the copy
in its place; restored files that differ from the ones there are kept as
C{<name>.before-restore-<time>} the same way.  New files are mode 0600 (directories 0700)
and owned by the data directory's owner.

SQLite work runs in a thread (L{twisted.internet.threads.deferToThread}), never on the
reactor thread.

Exit codes: 0 done; 1 refused or failed (one line says why); 2 bad arguments.
"""

import argparse
import os
import socket
import sqlite3
import sys
import time

from twisted.internet import defer, threads

from zwrm.files import fsync_path

DB_NAME = "zwrm.db"
FILES_TABLE = "zwrm_backup_files"
META_TABLE = "zwrm_backup_meta"
REQUIRED_TABLES = ("schema_version", "hosts", "apps", "machines", "volumes", "tokens")
SKIP_FILES = ("control.lock", "control.url")
"""Files of the data directory's top level that a backup leaves out (they belong to a run)."""


class BackupError(Exception):
    """A refused or failed backup or restore: one readable line."""

    def __init__(self, message):
        Exception.__init__(self, message)
        self.message = message


# --- what to copy ---------------------------------------------------------------------


def _small_files(data_dir):
    """
    The data directory's files kept in a backup, as C{(relative path, mode)}: the top
    level's regular files (tokens, ...) except the database and run files, and everything
    in C{pki/}.
    """
    found = []
    for name in sorted(os.listdir(data_dir)):
        path = os.path.join(data_dir, name)
        if (name.startswith(DB_NAME) or name in SKIP_FILES or ".before-restore-" in name
                or not os.path.isfile(path) or os.path.islink(path)):
            continue
        found.append(name)
    pki = os.path.join(data_dir, "pki")
    if os.path.isdir(pki):
        for name in sorted(os.listdir(pki)):
            if os.path.isfile(os.path.join(pki, name)):
                found.append(os.path.join("pki", name))
    return [(rel, os.stat(os.path.join(data_dir, rel)).st_mode & 0o777) for rel in found]


def _private_file(path):
    """Create C{path} empty with mode 0600 (replacing what is there)."""
    if os.path.lexists(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)


# --- backup -----------------------------------------------------------------------------


def backup_sync(data_dir, out):
    """
    Write a backup of C{data_dir} to C{out} (blocking: run it in a thread).

    @return: C{(schema version, number of files)}.
    @raise BackupError: no database, or it cannot be read or written.
    """
    db_path = os.path.join(data_dir, DB_NAME)
    if not os.path.isfile(db_path):
        raise BackupError(f"no control plane database at {db_path} (wrong --config or --data-dir?)")
    out = os.path.abspath(out)
    if os.path.isdir(out):
        raise BackupError(f"{out} is a directory: give a file name, e.g. {out}/zwrm-backup.db")
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        _private_file(tmp)
        src = sqlite3.connect(db_path, timeout=30)
        try:
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)  # one step: one consistent snapshot; WAL writers go on
                version = dst.execute("SELECT version FROM schema_version").fetchone()[0]
                files = _small_files(data_dir)
                with dst:
                    dst.execute(f"CREATE TABLE {FILES_TABLE} (path TEXT PRIMARY KEY, mode INTEGER,"
                                " content BLOB)")
                    dst.execute(f"CREATE TABLE {META_TABLE} (key TEXT PRIMARY KEY, value TEXT)")
                    for rel, mode in files:
                        with open(os.path.join(data_dir, rel), "rb") as f:
                            dst.execute(f"INSERT INTO {FILES_TABLE} VALUES (?, ?, ?)",
                                        (rel, mode, f.read()))
                    from zwrm import __version__

                    for k, v in [("created_at", time.time()), ("data_dir", data_dir),
                                 ("schema_version", version), ("zwrm_version", __version__)]:
                        dst.execute(f"INSERT INTO {META_TABLE} VALUES (?, ?)", (k, str(v)))
                check = dst.execute("PRAGMA integrity_check").fetchone()[0]
                if check != "ok":
                    raise BackupError(f"the copy failed its integrity check: {check}")
            finally:
                dst.close()
        finally:
            src.close()
        fsync_path(tmp)
        os.replace(tmp, out)
        return version, len(files)
    except sqlite3.Error as e:
        raise BackupError(f"cannot back up {db_path}: {e}") from None
    except OSError as e:
        raise BackupError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- restore ----------------------------------------------------------------------------


def _listening(listen):
    """The first configured TCP/SSL listener something answers on, or L{None}."""
    for description in listen or ():
        parts = description.split(":")
        if parts and parts[0] == "rawsocket":
            parts = parts[1:]
        if not parts or parts[0] not in ("tcp", "tcp6", "ssl") or len(parts) < 2:
            continue
        try:
            port = int(parts[1])
        except ValueError:
            continue
        if port == 0:
            continue
        host = "127.0.0.1"
        for p in parts[2:]:
            if p.startswith("interface="):
                host = p[len("interface="):].strip("[]") or host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        try:
            with socket.create_connection((host, port), timeout=1):
                return f"{host}:{port}"
        except OSError:
            continue
    return None


def check_backup(path):
    """
    Check that C{path} is a zwrm database (or backup) this zwrm can use.

    @return: its schema version.
    @raise BackupError: it is not.
    """
    from zwrm.control.store import MIGRATIONS

    if not os.path.isfile(path):
        raise BackupError(f"{path} does not exist")
    try:
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise BackupError(f"{path} is not a SQLite database (nor a zwrm backup)")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            check = conn.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise BackupError(f"{path} is damaged: {check}")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            missing = [t for t in REQUIRED_TABLES if t not in tables]
            if missing:
                raise BackupError(f"{path} is not a zwrm database: no table {', '.join(missing)}")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise BackupError(f"{path} is not a usable SQLite database: {e}") from None
    except OSError as e:
        raise BackupError(f"cannot read {path}: {e.strerror or e}") from None
    if row is None or not isinstance(row[0], int):
        raise BackupError(f"{path} has no schema version")
    if row[0] > len(MIGRATIONS):
        raise BackupError(f"{path} has schema version {row[0]}, newer than this zwrm knows"
                          f" ({len(MIGRATIONS)}): restore it with that zwrm version or newer")
    return row[0]


def _owner(data_dir):
    st = os.stat(data_dir)
    return st.st_uid, st.st_gid


def _chown(path, owner):
    if os.geteuid() == 0:
        os.chown(path, *owner)


def restore_sync(data_dir, source, listen=(), stamp=None):
    """
    Restore the backup C{source} into C{data_dir} (blocking: run it in a thread).

    @param listen: the control plane's listen descriptions (a listener that answers means
        it runs).
    @return: C{(schema version, restored file paths, kept old paths)}.
    @raise BackupError: refused (running, bad input) or failed; then nothing was replaced.
    """
    from zwrm.control.service import DataDirInUse, lock_data_dir

    source = os.path.abspath(source)
    stamp = stamp or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    version = check_backup(source)
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    try:
        lock = lock_data_dir(data_dir)
    except DataDirInUse as e:
        raise BackupError(f"refusing to restore: {e.message}; stop it first") from None
    except OSError as e:
        raise BackupError(f"cannot lock {data_dir}: {e.strerror or e}") from None
    try:
        # a restore run as root must not leave a lock file the control plane's user cannot open
        _chown(os.path.join(data_dir, "control.lock"), _owner(data_dir))
        busy = _listening(listen)
        if busy:
            raise BackupError(f"refusing to restore: something answers on {busy}, a listener of"
                              " this control plane's configuration; stop it first")
        return _restore_locked(data_dir, source, version, stamp)
    finally:
        os.close(lock)


def _restore_locked(data_dir, source, version, stamp):
    owner = _owner(data_dir)
    db_path = os.path.join(data_dir, DB_NAME)
    tmp = os.path.join(data_dir, f"{DB_NAME}.restore-{os.getpid()}")
    try:
        _private_file(tmp)
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)
                tables = {r[0] for r in dst.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                files = []
                if FILES_TABLE in tables:
                    files = dst.execute(f"SELECT path, mode, content FROM {FILES_TABLE}").fetchall()
                with dst:
                    dst.execute(f"DROP TABLE IF EXISTS {FILES_TABLE}")
                    dst.execute(f"DROP TABLE IF EXISTS {META_TABLE}")
                dst.execute("VACUUM")
                check = dst.execute("PRAGMA integrity_check").fetchone()[0]
                got = dst.execute("SELECT version FROM schema_version").fetchone()[0]
                if check != "ok" or got != version:
                    raise BackupError(f"the restored copy failed its check ({check}, schema {got})")
            finally:
                dst.close()
        finally:
            src.close()
        for rel, _mode, _content in files:
            norm = os.path.normpath(rel)
            if norm.startswith("..") or os.path.isabs(norm) or norm.startswith(DB_NAME):
                raise BackupError(f"the backup holds a file with a bad path {rel!r}")
        fsync_path(tmp)
        _chown(tmp, owner)
    except sqlite3.Error as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise BackupError(f"cannot restore from {source}: {e}") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

    # the copy is verified: now move the old database aside (with its WAL) and put it in place
    kept = []
    for suffix in ("", "-wal", "-shm"):
        old = db_path + suffix
        if os.path.exists(old):
            aside = f"{db_path}.before-restore-{stamp}{suffix}"
            os.replace(old, aside)
            kept.append(aside)
    os.replace(tmp, db_path)
    restored = [db_path]
    for rel, mode, content in files:
        path = os.path.join(data_dir, rel)
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700)
            _chown(directory, owner)
        if os.path.exists(path):
            with open(path, "rb") as f:
                if f.read() == content:
                    continue
            aside = f"{path}.before-restore-{stamp}"
            os.replace(path, aside)
            kept.append(aside)
        part = f"{path}.restore-{os.getpid()}"
        _private_file(part)
        with open(part, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(part, mode & 0o600 or 0o600)
        _chown(part, owner)
        os.replace(part, path)
        restored.append(path)
    return version, restored, kept


# --- the command ---------------------------------------------------------------------------


def _parser():
    parser = argparse.ArgumentParser(
        prog="zwrm-control",
        description="Back up and restore the zwrm control plane's state (see docs/operators.md,"
                    " 'Backup and restore').")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, text, arg in [
        ("backup", "copy the state to a file (safe while the control plane runs)", "OUT"),
        ("restore", "replace the state with a backup (the control plane must be stopped)", "IN"),
    ]:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", "-c", help="the control plane's TOML configuration"
                                              " (default /etc/zwrm/control.toml if it exists)")
        p.add_argument("--data-dir", "-d", help="the data directory (instead of the configuration's)")
        p.add_argument("file", metavar=arg, help="the backup file")
    return parser


def _settings(args):
    """C{(data_dir, listen)} from C{--data-dir} / C{--config}."""
    from twisted.python import usage

    from zwrm.control.tap import Config, load_config

    path = args.config
    if path is None and args.data_dir is None and os.path.exists("/etc/zwrm/control.toml"):
        path = "/etc/zwrm/control.toml"
    values = {}
    if path is not None:
        try:
            values = load_config(path)
        except usage.UsageError as e:
            raise BackupError(str(e)) from None
    config = Config(**values)
    data_dir = os.path.abspath(os.path.expanduser(args.data_dir or config.data_dir))
    return data_dir, config.listen


async def run(args, out=None):
    """Run one C{zwrm-control} command; @return: its exit code."""
    out = out or sys.stdout
    data_dir, listen = _settings(args)
    if args.command == "backup":
        version, n = await threads.deferToThread(backup_sync, data_dir, args.file)
        out.write(f"backed up {data_dir} (schema v{version}, {n} files) to"
                  f" {os.path.abspath(args.file)}\n")
        return 0
    version, restored, kept = await threads.deferToThread(
        restore_sync, data_dir, args.file, listen)
    out.write(f"restored {os.path.abspath(args.file)} (schema v{version}) into {data_dir}:"
              f" {len(restored)} files\n")
    if kept:
        out.write(f"the replaced files are kept as {', '.join(kept)}\n")
    return 0


def main(argv=None):
    """Entry point of the C{zwrm-control} console script."""
    from twisted.internet import task

    args = _parser().parse_args(argv)

    async def go(reactor):
        try:
            code = await run(args)
        except BackupError as e:
            sys.stderr.write(f"zwrm-control: {e.message}\n")
            code = 1
        except Exception as e:  # a bug: still one line
            sys.stderr.write(f"zwrm-control: internal error: {e.__class__.__name__}: {e}\n")
            code = 70
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(go(reactor)))


if __name__ == "__main__":
    main()
