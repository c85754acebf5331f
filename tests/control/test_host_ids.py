"""
Host ids are strict WAMP URI components (C{h_<hex>}); the store's migration (schema version
8) renames the C{h-<hex>} ids of an older zwrm and every stored reference to them, and an
agent that comes back with its old id ends up under the new one, with its machines and
volumes (a real control plane, a real agent, real sockets).
"""

import json
import os
import stat

import sqlite_utils
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm import errors
from zwrm.agent.service import AgentService
from zwrm.agent.tap import AgentConfig
from zwrm.control.resources.hosts import schema_strict_ids
from zwrm.control.service import ControlPlane
from zwrm.control.store import MIGRATIONS, migrate
from zwrm.control.tap import Config
from zwrm.hostid import current_host_id, is_strict_host_id, new_host_id, strict_host_id
from zwrm.testing.processes import poll, temp_dir
from zwrm.tokens import hash_secret
from zwrm.wamp import is_strict_uri

OLD = "h-0123456789abcdef"
NEW = "h_0123456789abcdef"
OTHER_OLD = "h-fedcba9876543210"
OTHER_NEW = "h_fedcba9876543210"
KEPT = "h_1111111111111111"


def _old_database(path=None, credential="c"):
    """A database of schema version 7 (before strict ids) with two old-style hosts."""
    db = sqlite_utils.Database(path) if path else sqlite_utils.Database(memory=True)
    migrate(db, MIGRATIONS[:7])
    for host_id in (OLD, OTHER_OLD, KEPT):
        db["hosts"].insert({"id": host_id, "name": host_id if host_id != KEPT else "kept",
                            "labels": "{}", "state": "ready", "last_heartbeat": 1.0,
                            "credential_hash": hash_secret(credential), "joined_at": 1.0,
                            "vcpus": 4, "memory_mb": 4096, "disk_mb": 10000})
    db["apps"].insert({"id": "a-1", "name": "web", "spec_version": 1, "created_at": 1.0,
                       "spec": json.dumps({"name": "web", "constraints": {"host": OLD}})})
    db["machines"].insert({"id": "m-1", "app_id": "a-1", "host_id": OLD, "state": "running",
                           "spec": json.dumps({"replica": 0, "pinned_host": OLD, "vcpus": 1,
                                               "memory_mb": 256}),
                           "health": json.dumps({"host_port": 8080}),
                           "created_at": 1.0, "updated_at": 1.0})
    db["volumes"].insert({"id": "v-1", "app_id": "a-1", "host_id": OLD, "name": "data",
                          "size_mb": 64, "mount": "/data", "state": "ready", "replica": 0,
                          "created_at": 1.0})
    db["drains"].insert({"id": "d-1", "host_id": OLD, "state": "done",
                         "options": json.dumps({"targets": [OTHER_OLD]}),
                         "created_at": 1.0, "updated_at": 1.0})
    db["migrations"].insert({"id": "mg-1", "drain_id": "d-1", "machine_id": "m-1",
                             "source_host": OLD, "target_host": OTHER_OLD, "phase": "done",
                             "detail": json.dumps({"tokens": {OTHER_OLD: "t"},
                                                   "note": f"from {OLD}"}),
                             "updated_at": 1.0})
    db["net_subnets"].insert({"id": "10.0.1.0/24", "host_id": OLD, "created_at": 1.0})
    db["net_addresses"].insert({"id": "10.0.1.5", "machine_id": "m-1", "host_id": OLD,
                                "app_id": "a-1", "created_at": 1.0})
    db["events"].insert({"ts": 1.0, "topic": "zwrm.event.host", "kind": "joined",
                         "subject": OLD, "payload": json.dumps({"host_id": OLD, "id": OLD})})
    db["host_resets"].create({"host_id": str, "expires_at": float}, pk="host_id")
    db["host_resets"].insert({"host_id": OTHER_OLD, "expires_at": 9.0})
    return db


def _col(db, table, col, where="1"):
    return [r[0] for r in db.execute(f"SELECT {col} FROM {table} WHERE {where}").fetchall()]


class HostIdTests(SynchronousTestCase):
    def test_new_ids_are_strict(self):
        for _ in range(20):
            host_id = new_host_id()
            self.assertRegex(host_id, r"^h_[0-9a-f]{16}$")
            self.assertTrue(is_strict_uri(f"zwrm.agent.{host_id}.machine.start"))

    def test_old_ids(self):
        self.assertEqual(current_host_id(OLD), NEW)
        self.assertEqual(current_host_id("h-one"), "h-one")  # only what zwrm generated
        self.assertEqual(current_host_id(None), None)
        self.assertEqual(strict_host_id(OLD), NEW)
        self.assertEqual(strict_host_id("Host-1.a"), "host_1_a")
        self.assertEqual(strict_host_id(KEPT), KEPT)
        self.assertFalse(is_strict_host_id(OLD))
        self.assertTrue(is_strict_host_id(NEW))


class MigrationTests(SynchronousTestCase):
    def test_renames_every_reference(self):
        db = _old_database()
        self.assertEqual(migrate(db), len(MIGRATIONS))
        self.assertEqual(sorted(_col(db, "hosts", "id")), sorted([NEW, OTHER_NEW, KEPT]))
        # a host's default name was its id
        self.assertEqual(_col(db, "hosts", "name", f"id = '{NEW}'"), [NEW])
        self.assertEqual(_col(db, "hosts", "name", f"id = '{KEPT}'"), ["kept"])
        self.assertEqual(_col(db, "machines", "host_id"), [NEW])
        self.assertEqual(json.loads(_col(db, "machines", "spec")[0])["pinned_host"], NEW)
        self.assertEqual(json.loads(_col(db, "apps", "spec")[0])["constraints"], {"host": NEW})
        self.assertEqual(_col(db, "volumes", "host_id"), [NEW])
        self.assertEqual(_col(db, "drains", "host_id"), [NEW])
        self.assertEqual(json.loads(_col(db, "drains", "options")[0]), {"targets": [OTHER_NEW]})
        self.assertEqual(_col(db, "migrations", "source_host || ' ' || target_host"),
                         [f"{NEW} {OTHER_NEW}"])
        # keys are renamed; free text is not rewritten
        self.assertEqual(json.loads(_col(db, "migrations", "detail")[0]),
                         {"tokens": {OTHER_NEW: "t"}, "note": f"from {OLD}"})
        self.assertEqual(_col(db, "net_subnets", "host_id"), [NEW])
        self.assertEqual(_col(db, "net_addresses", "host_id"), [NEW])
        self.assertEqual(_col(db, "events", "subject"), [NEW])
        self.assertEqual(json.loads(_col(db, "events", "payload")[0]), {"host_id": NEW, "id": NEW})
        self.assertEqual(_col(db, "host_resets", "host_id"), [OTHER_NEW])
        # ids that are not host ids are kept, '-' and all
        self.assertEqual((_col(db, "machines", "id"), _col(db, "volumes", "id")), (["m-1"], ["v-1"]))
        # nothing names an old id any more
        for table in db.table_names():
            for row in db[table].rows:
                self.assertNotIn(OTHER_OLD, json.dumps(row), table)

    def test_taken_strict_id(self):
        """An old id whose strict form is taken keeps a distinct id, with a hash suffix."""
        db = sqlite_utils.Database(memory=True)
        migrate(db, MIGRATIONS[:7])
        for host_id in ("host_1", "Host-1", "host-1"):
            db["hosts"].insert({"id": host_id, "name": host_id, "labels": "{}"})
        renames = schema_strict_ids(db)
        ids = sorted(_col(db, "hosts", "id"))
        self.assertEqual(len(set(ids)), 3)
        self.assertIn("host_1", ids)
        for old, new in renames.items():
            self.assertTrue(is_strict_host_id(new), new)
            self.assertRegex(new, r"^host_1_[0-9a-f]{8}$", old)

    def test_nothing_to_rename(self):
        db = sqlite_utils.Database(memory=True)
        migrate(db)
        self.assertEqual(schema_strict_ids(db), {})


def d(f):
    def wrapper(self):
        return ensureDeferred(f(self))

    wrapper.__name__ = f.__name__
    return wrapper


class ComingBackTests(TestCase):
    timeout = 60

    @d
    async def test_agent_with_its_old_id(self):
        """
        A control plane whose database has host h-<hex> (with a machine and a volume) is
        upgraded; the host's agent comes back with its old id and credential: it is
        authenticated under h_<hex>, takes that id (host.json rewritten, 0600), registers
        its procedures under zwrm.agent.h_<hex>., and the machine and volume are still its.
        """
        tmp = temp_dir(self)
        cp_dir = os.path.join(tmp, "cp")
        os.makedirs(cp_dir, mode=0o700)
        _old_database(os.path.join(cp_dir, "zwrm.db"), credential="old-credential").conn.close()
        config = Config(listen=["tcp:0:interface=127.0.0.1"], data_dir=cp_dir,
                        heartbeat_interval=0.2, flush_interval=0.2)
        plane = ControlPlane(reactor, config)
        plane.startService()
        self.addCleanup(plane.stopService)
        await plane.started
        self.assertEqual(sorted(plane.registry.host_ids()), sorted([NEW, OTHER_NEW, KEPT]))
        # an operator who asks for the old id is told the new one
        with self.assertRaises(errors.NotFound) as c:
            await plane.registry.status(OLD)
        self.assertIn(f"it is {NEW!r}", c.exception.message)

        data_dir = os.path.join(tmp, "agent")
        os.makedirs(data_dir, mode=0o700)
        identity = os.path.join(data_dir, "host.json")
        with open(identity, "w") as f:
            json.dump({"host_id": OLD, "credential": "old-credential"}, f)
        os.chmod(identity, 0o600)
        agent = AgentService(reactor, AgentConfig(
            url=f"ws://127.0.0.1:{plane.ports[0].getHost().port}/ws", data_dir=data_dir,
            name="a1", retry_initial=0.05, retry_max=0.2))
        agent.startService()
        self.addCleanup(agent.stopService)
        result = await agent.registered
        self.assertEqual((result["host_id"], agent.identity.host_id), (NEW, NEW))
        with open(identity) as f:
            self.assertEqual(json.load(f), {"host_id": NEW, "credential": "old-credential"})
        self.assertEqual(stat.S_IMODE(os.stat(identity).st_mode), 0o600)
        # its procedures are under the new id (a strict URI) and callable
        info = await plane.registry.call_executor(NEW, "agent.info")
        self.assertEqual(info["name"], "a1")
        await poll(reactor, lambda: plane.registry.last_heartbeat(NEW) > 1.0, 10, 0.05,
                   what="a heartbeat under the new id")
        machine = await plane.store.get("machines", "m-1")
        volume = await plane.store.get("volumes", "v-1")
        self.assertEqual((machine["host_id"], volume["host_id"]), (NEW, NEW))
        # restarted, it is the same host under the new id (no rename, no join)
        await agent.stopService()
        agent2 = AgentService(reactor, agent.config)
        agent2.startService()
        self.addCleanup(agent2.stopService)
        await agent2.registered
        self.assertEqual(agent2.identity.host_id, NEW)
        self.assertEqual(sorted(plane.registry.host_ids()), sorted([NEW, OTHER_NEW, KEPT]))

    def test_unjoined_old_identity_is_renamed_locally(self):
        """An identity that never joined has nothing referring to it: it takes the new form."""
        from zwrm.agent.identity import Identity

        data_dir = temp_dir(self)
        with open(os.path.join(data_dir, "host.json"), "w") as f:
            json.dump({"host_id": OLD, "credential": None}, f)
        self.assertEqual(Identity(data_dir).load().host_id, NEW)
        with open(os.path.join(data_dir, "host.json")) as f:
            self.assertEqual(json.load(f)["host_id"], NEW)
        # one that joined keeps its id until the control plane says otherwise
        with open(os.path.join(data_dir, "host.json"), "w") as f:
            json.dump({"host_id": OLD, "credential": "c"}, f)
        self.assertEqual(Identity(data_dir).load().host_id, OLD)
