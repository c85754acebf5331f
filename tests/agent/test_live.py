"""
Live migration between two agents' procedures (L{zwrm.agent.live.LiveMigrations}) with real
QEMU under TCG on loopback, TLS with the hosts' certificates from one cluster CA: a guest
written to over HTTP while it moves, every acknowledged write on the target, the volume
verified against the source's frozen image, the source left paused; a RAM migration that does
not converge by the deadline, which leaves the source running untouched; post-copy. (The
target killed during the mirror, the RAM migration or at the switchover: the driver's
contract, tests/drivers/test_live.py.)
"""

import os
import shutil
import signal
import socket
import tempfile
import types

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.drivers.live_contract import QEMU_OWN_ABORT
from zwrm.agent.live import LiveMigrations
from zwrm.agent.volumes import VolumeStore
from zwrm.drivers.qemu import QemuDriver
from zwrm.errors import Corrupt, Unavailable
from zwrm.pki import HostCredentials
from zwrm.pki.ca import CertificateAuthority
from zwrm.testing import image


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(volumes):
    img = image.build()
    return {"kernel": img.kernel, "initrd": img.initrd, "disk": None,
            "cmdline": f"{img.cmdline} zwrm.vol=v1:/data", "vcpus": 1, "memory_mb": 128,
            "volumes": volumes, "forwards": [{"guest": 8080, "host": _free_port()}]}


async def _post(port, name, body, timeout=5.0):
    try:
        r = await treq.post(f"http://127.0.0.1:{port}/cgi-bin/write?{name}", body).addTimeout(
            timeout, reactor)
        return r.code == 200 and (await r.content()).strip() == b"ok"
    except Exception:
        return False


async def _get(port, name):
    r = await treq.get(f"http://127.0.0.1:{port}/cgi-bin/read?{name}").addTimeout(20, reactor)
    return await r.content()


@pytest.mark.qemu
class LiveAgentsTests(TestCase):
    timeout = 240

    async def setUp(self):
        await self._start_pair()

    async def _start_pair(self):
        """host-a and host-b (in a directory of their own), and m1 running on host-a."""
        self.dir = tempfile.mkdtemp(prefix="zwrm-live-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir, True)
        ca = CertificateAuthority.create()
        self.agents = {}
        for h in ("host-a", "host-b"):
            drv = QemuDriver(reactor, os.path.join(self.dir, h, "machines"), accel="tcg",
                             stop_timeout=5.0)
            self.addCleanup(self._destroy_all, drv)
            cert, key = ca.issue_host(h)
            creds = HostCredentials(ca.certificate_pem, cert, key)
            vols = VolumeStore(reactor, os.path.join(self.dir, h, "volumes"))
            self.agents[h] = LiveMigrations(reactor, h, drv, vols, lambda c=creds: c,
                                            lambda: "127.0.0.1")
        self.a, self.b = self.agents["host-a"], self.agents["host-b"]
        await self.a.volumes.create("v1", 64)
        spec = _spec([{"id": "v1", "path": self.a.volumes.existing_path("v1")}])
        self.a.volumes.claim("v1", "m1")
        await self.a.driver.start(dict(spec, id="m1"))
        self.src_port = spec["forwards"][0]["host"]
        for _ in range(1800):
            if image.READY_LINE in await self.a.driver.console("m1"):
                break
            await deferLater(reactor, 0.1, lambda: None)
        else:
            self.fail("the source never became ready")

    async def _destroy_all(self, drv):
        for mid in drv.list():
            await drv.destroy(mid)

    async def prepare(self, postcopy=False, target_id="m1"):
        desc = self.a.describe("m1")
        self.assertEqual(desc["volumes"], {"v1": 64 * 1024 * 1024})
        self.assertTrue(desc["facts"]["live"], desc["facts"])
        # The machine spec as machine.start takes it (the target builds its driver spec).
        img = image.build()
        spec = {"image": {"kernel": img.kernel, "initrd": img.initrd, "disk": None,
                                      "cmdline": img.cmdline},
                "vcpus": 1, "memory_mb": 128, "service_port": 8080,
                "volumes": [{"id": "v1", "mount": "/data", "size_mb": 64}]}
        where = await self.b.prepare(target_id, spec, desc["volumes"], "host-a", postcopy=postcopy)
        self.assertIsInstance(where["host_port"], int)
        return where, where["host_port"]

    async def test_a_written_guest_moves_and_its_volume_verifies(self):
        self.assertTrue(await _post(self.src_port, "first", b"first write"))
        # The target's machine has another id (as a drain's replacement does).
        where, dst_port = await self.prepare(target_id="m2")
        acked, stop = {}, []

        async def writer():
            n = 0
            while not stop:
                body = f"write {n}".encode()
                if await _post(self.src_port, f"w-{n}", body, timeout=3.0):
                    acked[f"w-{n}"] = body
                n += 1

        writing = Deferred.fromCoroutine(writer())
        announced = []
        # As the drain does: held in sync (the guest runs, its writes reach both copies)
        # while the caller stores its decision, then the switchover.
        ready = await self.a.migrate(
            "m1", "host-b", where, {"mirror_speed": 32 * 1024 * 1024}, True,
            details=types.SimpleNamespace(progress=announced.append))
        self.assertTrue(ready["ready"])
        held_from = len(acked)
        await deferLater(reactor, 1.0, lambda: None)
        st = await self.a.status("m1")
        self.assertEqual((st["state"], st["hypervisor"]["runstate"]), ("ready", "running"))
        self.assertNotEqual(self.b.target_state("m2"), "resumed")
        self.assertGreater(len(acked), held_from, "no write acknowledged while held in sync")
        result = await self.a.switchover(
            "m1", details=types.SimpleNamespace(progress=announced.append))
        stop.append(True)
        await writing
        print(f"\nlive migration: QEMU-reported pause {result['downtime_ms']} ms, total "
              f"{result['elapsed']} s (mirror {result['mirror_seconds']} s), "
              f"{len(acked)} writes acknowledged during it")
        self.assertIsInstance(result["downtime_ms"], int)
        self.assertGreater(len(acked), 0)
        phases = [p["phase"] for p in announced]
        self.assertEqual((phases[0], phases[-1]), ("mirroring", "completed"))
        self.assertTrue(any(p["mirror"]["total"] for p in announced), announced)
        # The target resumed by itself (its machine: incoming -> resuming -> resumed).
        for _ in range(100):
            if self.b.target_state("m2") == "resumed":
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(self.b.target_state("m2"), "resumed")
        # Every acknowledged write is on the target, which takes new ones.
        self.assertEqual(await _get(dst_port, "first"), b"first write")
        for name, body in acked.items():
            self.assertEqual(await _get(dst_port, name), body, name)
        self.assertTrue(await _post(dst_port, "after", b"on the target"))
        # The volume: every block that differs from the source's frozen image is one the
        # target wrote since it resumed.
        frozen = await self.a.hashes("v1")
        verified = await self.b.verify("m2", "v1", frozen)
        self.assertTrue(verified["ok"], verified)
        self.assertGreater(verified["dirty_blocks"], 0)
        # A block of the target's copy that the guest did not write (the volume's last
        # 64 KiB) corrupted behind QEMU's back: the verification catches it, naming it.
        path = self.b.volumes.existing_path("v1")
        last = os.path.getsize(path) // 65536 - 1
        with open(path, "r+b") as f:
            f.seek(last * 65536 + 100)
            f.write(b"corrupted on the target")
        with self.assertRaises(Corrupt) as cm:
            await self.b.verify("m2", "v1", frozen)
        self.assertIn(f"[{last}]", cm.exception.message)
        # The source stays paused until it is destroyed.
        st = await self.a.status("m1")
        self.assertEqual((st["state"], st["hypervisor"]["runstate"]), ("completed", "postmigrate"))
        self.assertFalse(await _post(self.src_port, "late", b"x", timeout=2.0))
        await self.a.driver.destroy("m1")
        self.assertEqual(self.a.driver.list(), [])

    async def test_not_converging_by_the_deadline_gives_up_with_the_source_untouched(self):
        # A link too slow for the guest's memory (64 KiB/s for 128 MiB): the RAM migration
        # cannot finish; at the deadline it is cancelled and the source runs on.
        self.assertTrue(await _post(self.src_port, "before", b"before"))
        where, _port = await self.prepare()
        with self.assertRaises(Unavailable) as cm:
            await self.a.migrate("m1", "host-b", where, {
                "mirror_speed": 32 * 1024 * 1024, "max_bandwidth": 64 * 1024,
                "deadline": 3, "auto_converge": False})
        self.assertIn("did not converge within 3 s", cm.exception.message)
        st = await self.a.driver.migration_status("m1")
        self.assertEqual((st["runstate"], st["migration"], st["mirrors"]),
                         ("running", "cancelled", []))
        self.assertEqual(await _get(self.src_port, "before"), b"before")
        self.assertTrue(await _post(self.src_port, "after", b"after"))
        for _ in range(100):
            if "m1" not in self.b.incoming:
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertFalse(self.b.volumes.exists("v1"), "the target's blank copy is left")

    async def test_a_target_that_stops_answering_mid_mirror_rolls_back_and_writes_go_on(self):
        # The target's QEMU stops (SIGSTOP: its kernel still acknowledges, nothing answers)
        # while the mirror copies, and the guest writes (write-blocking: the write waits
        # for the target). The mirror copies nothing more; after the policy's stall_timeout
        # the source rolls back, its NBD connection shut down first, and the write
        # completes. (Before, it waited for the mirror deadline: 600 s.) QEMU 7.2's own
        # abort right after the cut (tests/drivers/live_contract.py, QEMU_OWN_ABORT) gets
        # another pair of hosts, up to twice.
        for attempt in range(3):
            if attempt:
                await self._start_pair()
            if not await self._stalled_mirror_rolls_back(last=attempt == 2):
                return

    async def _stalled_mirror_rolls_back(self, last):
        where, _port = await self.prepare()
        migrating = self.a.migrate("m1", "host-b", where, {"mirror_speed": 2 * 1024 * 1024,
                                                           "stall_timeout": 3})
        for _ in range(600):
            st = await self.a.driver.migration_status("m1")
            if any(m["offset"] > 0 for m in st["mirrors"]):
                break
            await deferLater(reactor, 0.1, lambda: None)
        else:
            self.fail(f"the mirror never copied: {st}")
        pid = self.b.driver.status("m1")["pid"]
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(os.kill, pid, signal.SIGCONT)
        writing = Deferred.fromCoroutine(_post(self.src_port, "during", b"during", timeout=60))
        try:
            await migrating.addTimeout(60, reactor)
        except Exception as e:
            failure = e
        else:
            self.fail("the migration to a target that stopped answering succeeded")
        written = await writing
        if not written or self.a.driver.status("m1")["state"] != "running":
            for _ in range(100):  # the source's end, if it ended (its reason comes with it)
                if self.a.driver.status("m1")["state"] != "running":
                    break
                await deferLater(reactor, 0.1, lambda: None)
            reason = self.a.driver.status("m1")["reason"] or ""
            if not last and QEMU_OWN_ABORT.search(reason):
                return reason
            self.fail(f"the rollback: {failure!r}; the write acknowledged: {written}; the "
                      f"source: {self.a.driver.status('m1')}")
        self.assertIsInstance(failure, Unavailable)
        self.assertIn("the mirrors copied nothing for 3 s", failure.message)
        st = await self.a.driver.migration_status("m1")
        self.assertEqual((st["runstate"], st["mirrors"]), ("running", []))
        self.assertEqual(await _get(self.src_port, "during"), b"during")
        self.assertTrue(await _post(self.src_port, "after", b"after"))
        return None

    async def test_postcopy_when_allowed_completes_past_the_deadline(self):
        # The same slow link, with post-copy allowed: at the deadline the migration switches
        # to post-copy (the mirrors complete at its pre-switchover), the target runs while
        # the rest of the RAM arrives, and every write is there.
        self.assertTrue(await _post(self.src_port, "before", b"before"))
        where, dst_port = await self.prepare(postcopy=True)
        result = await self.a.migrate("m1", "host-b", where, {
            "mirror_speed": 32 * 1024 * 1024, "max_bandwidth": 256 * 1024,
            "deadline": 3, "auto_converge": False, "postcopy": True})
        self.assertTrue(result["postcopy"])
        for _ in range(300):
            if self.b.target_state("m1") == "resumed":
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(self.b.target_state("m1"), "resumed")
        self.assertEqual(await _get(dst_port, "before"), b"before")
        verified = await self.b.verify("m1", "v1", await self.a.hashes("v1", 0, None, "blake3"))
        self.assertTrue(verified["ok"], verified)
