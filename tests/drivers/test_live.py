"""
The ILiveMigration contract, run against the QEMU driver (two real QEMUs under TCG on
loopback, with TLS) and the fake driver.
"""

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.drivers.live_contract import (
    VOLUME_SIZE,
    Events,
    make_live_tests,
    switch_over,
    tls_for,
)
from zwrm.drivers import live
from zwrm.drivers.fake import FakeDriver, FakeHost
from zwrm.drivers.qemu import QemuDriver
from zwrm.drivers.qmp import QMPError
from zwrm.errors import Unavailable
from zwrm.pki.ca import CertificateAuthority
from zwrm.testing import debian, image
from zwrm.testing.disks import fill_disk, free_bytes, small_disk


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_drivers(testcase, prefix, where):
    """
    Two QEMU drivers (hosts C{"a"} and C{"b"}) under a new directory of C{where}; their
    machines are destroyed and the directory removed when the test ends.

    @return: the directory and C{{"a": driver, "b": driver}}.
    """
    root = tempfile.mkdtemp(prefix=prefix, dir=where)
    testcase.addCleanup(shutil.rmtree, root, True)
    drivers = {h: QemuDriver(reactor, os.path.join(root, h), accel="tcg", stop_timeout=5.0)
               for h in ("a", "b")}

    async def cleanup():
        for drv in drivers.values():
            for mid in list(drv.list()):
                await drv.destroy(mid)

    testcase.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
    return root, drivers


class QemuFixture:
    ready_output = "zwrm: ready"

    @staticmethod
    def make(testcase, root):
        return QemuDriver(reactor, root, accel="tcg", stop_timeout=5.0)

    @staticmethod
    def spec(testcase, machine_id, volume_path):
        img = image.build()
        return {"id": machine_id, "kernel": img.kernel, "initrd": img.initrd, "disk": None,
                "cmdline": f"{img.cmdline} zwrm.vol=v1:/data", "vcpus": 1, "memory_mb": 128,
                "volumes": [{"id": "v1", "path": volume_path}],
                "forwards": [{"guest": 8080, "host": _free_port()}]}

    @staticmethod
    def make_volume(testcase, path, size):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", path, str(size // 1024) + "k"], check=True,
                       capture_output=True)

    @staticmethod
    def _base(driver, machine_id):
        return f"http://127.0.0.1:{driver.status(machine_id)['forwards'][0]['host']}"

    @classmethod
    async def write(cls, testcase, driver, machine_id, name, data):
        last = None
        for _ in range(100):
            try:
                r = await treq.post(f"{cls._base(driver, machine_id)}/cgi-bin/write?{name}",
                                    data).addTimeout(20, reactor)
                body = await r.content()
                if r.code == 200 and body.strip() == b"ok":
                    return name
                last = (r.code, body)
            except Exception as e:  # the guest may still be starting its server
                last = e
            await deferLater(reactor, 0.2, lambda: None)
        raise AssertionError(f"write of {name} never acknowledged: {last}")

    @classmethod
    async def read(cls, testcase, driver, machine_id, name):
        r = await treq.get(f"{cls._base(driver, machine_id)}/cgi-bin/read?{name}").addTimeout(
            20, reactor)
        return await r.content()

    @staticmethod
    def kill(driver, machine_id):
        os.kill(driver.status(machine_id)["pid"], signal.SIGKILL)

    @staticmethod
    def hang(testcase, driver, machine_id):
        pid = driver.status(machine_id)["pid"]
        os.kill(pid, signal.SIGSTOP)
        testcase.addCleanup(os.kill, pid, signal.SIGCONT)


QemuLiveContractTests = pytest.mark.qemu(make_live_tests(QemuFixture))


class FakeFixture:
    ready_output = "fake: booted"
    hosts = {}

    @classmethod
    def make(cls, testcase, root):
        # The same root is the same host (after an agent restart).
        host = cls.hosts.setdefault(root, FakeHost(powerdown_delay=0.05))
        return FakeDriver(reactor, root, host=host, stop_timeout=5.0)

    @staticmethod
    def spec(testcase, machine_id, volume_path):
        kernel = os.path.join(testcase.root, "vmlinuz")
        with open(kernel, "wb") as f:
            f.write(b"kernel")
        return {"id": machine_id, "kernel": kernel, "initrd": None, "disk": None,
                "cmdline": "console=ttyS0", "vcpus": 1, "memory_mb": 128,
                "volumes": [{"id": "v1", "path": volume_path}], "forwards": []}

    @staticmethod
    def make_volume(testcase, path, size):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"ext4 superblock" * 100)
            f.truncate(size)

    @staticmethod
    async def write(testcase, driver, machine_id, name, data):
        return driver.guest_write_file(machine_id, name, data)

    @staticmethod
    async def read(testcase, driver, machine_id, name):
        return driver.guest_read_file(machine_id, name)

    @staticmethod
    def kill(driver, machine_id):
        driver.crash(machine_id)

    @staticmethod
    def hang(testcase, driver, machine_id):
        driver.hang(machine_id)


FakeLiveContractTests = make_live_tests(FakeFixture)


def _pages_that_differ(a, b):
    """The 4 KiB pages in which files C{a} and C{b} differ (blocking: run in a thread)."""
    out, n = [], 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if not x and not y:
                return out
            if x != y:
                out += [n + i // 4096 for i in range(0, max(len(x), len(y)), 4096)
                        if x[i:i + 4096] != y[i:i + 4096]]
            n += (1 << 20) // 4096


@pytest.mark.qemu
class LiveRamTests(TestCase):
    """
    The guest's RAM arrives whole. A Debian guest moves six times while it boots (its
    kernel busy writing memory); after each move, before the target resumes, the target's
    RAM is the paused source's, page for page.

    QEMU 7.2 under TCG loses such writes when the RAM is a multiple of 256 KiB
    (L{zwrm.drivers.qemu.memory_arg}); Debian guests panicked after a live drain in CI.
    With that size this test failed in 3 of 3 runs (and in 4 of 8 with three moves), with
    6-16 pages that differed after a move from the third on. It checks the real thing by
    chance, not by construction: L{ArgvTests} in tests/drivers/test_disks.py pins the size.
    """

    timeout = 600

    async def test_the_target_resumes_with_the_source_s_ram(self):
        deb = await deferToThread(debian.build)
        root, drivers = two_drivers(self, "zwrm-liveram-", "/tmp")
        ports = {"a": _free_port(), "b": _free_port()}

        def spec(host):
            return {"id": "m1", "kernel": deb.kernel, "initrd": deb.initrd, "disk": deb.disk,
                    "disk_format": "qcow2", "cmdline": deb.cmdline, "vcpus": 1,
                    "memory_mb": 512, "forwards": [{"guest": deb.service_port, "host": ports[host]}],
                    "volumes": [{"id": "v1", "path": os.path.join(root, host, "vol.img")}]}

        QemuFixture.make_volume(self, os.path.join(root, "a", "vol.img"), VOLUME_SIZE)
        await drivers["a"].start(spec("a"))
        await deferLater(reactor, 8, lambda: None)
        moves = []
        for n, (s, d) in enumerate([("a", "b"), ("b", "a")] * 3):
            src, dst = drivers[s], drivers[d]
            vol = os.path.join(root, d, "vol.img")
            os.makedirs(os.path.dirname(vol), exist_ok=True)
            with open(vol, "wb") as f:
                f.truncate(0)
                f.truncate(VOLUME_SIZE)
            where = await dst.start_incoming(spec(d), "127.0.0.1", None)
            sev, dev = Events(), Events()
            src.live_subscribe("m1", sev)
            dst.live_subscribe("m1", dev)
            await src.start_mirror("m1", where, None, speed=50 * 1024 * 1024)
            for job in ("zwrm-mirror-root", "zwrm-mirror-vol0"):
                await sev.wait(lambda n, d, job=job: n == "BLOCK_JOB_READY"
                               and d.get("device") == job)
            # A busy host while the RAM moves, as in a CI run: three spinning processes per CPU,
            # for these few seconds.
            hogs = [subprocess.Popen(["sh", "-c", "while :; do :; done"])
                    for _ in range(3 * (os.cpu_count() or 1))]
            try:
                await src.start_migration("m1", where, None, downtime_limit_ms=300)
                await sev.wait(lambda n, d: n == "MIGRATION"
                               and d.get("status") == "pre-switchover")
                await src.complete_switchover("m1")
                await dev.wait(lambda n, d: n == "MIGRATION" and d.get("status") == "completed")
                await sev.wait(lambda n, d: n == "MIGRATION" and d.get("status") == "completed")
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
            # Both paused now: the source after its move, the target before it resumes.
            dumps = {}
            for h, drv in ((s, src), (d, dst)):
                dumps[h] = os.path.join(root, f"ram-{n}-{h}")
                await drv._machines["m1"].qmp.execute("pmemsave", {
                    "val": 0, "size": 512 * 1024 * 1024, "filename": dumps[h]})
            differ = await deferToThread(_pages_that_differ, dumps[s], dumps[d])
            for path in dumps.values():
                os.unlink(path)
            moves.append(differ[:16])
            self.assertEqual((await dst.finish_incoming("m1"))["resumed"], True)
            await src.destroy("m1")
        self.assertEqual(moves, [[]] * 6)
        # And the guest goes on: it boots to its HTTP service after its three moves.
        last = None
        for _ in range(360):
            try:
                r = await treq.get(f"http://127.0.0.1:{ports[d]}/", persistent=False).addTimeout(
                    10, reactor)
                last = r.code
                await r.content()
                if r.code == 200:
                    break
            except Exception as e:  # still booting
                last = e
            await deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(last, 200, await dst.console("m1"))
        self.assertNotIn("Kernel panic", await dst.console("m1"))


@pytest.mark.qemu
class SparseMirrorTests(TestCase):
    """
    A volume's holes cross as holes, not as zeros at the mirror's speed: QEMU writes a
    hole's zeros to the target with unmap only when the target's NBD node may discard; else
    it sends them as data, counted against the speed limit. An 8 GiB volume holding a few
    MiB, at 16 MiB/s: in sync within seconds (512 s of zeros otherwise), the target's copy
    as sparse as the source.
    """

    timeout = 180
    SIZE = 8 << 30

    async def test_a_sparse_volume_is_in_sync_at_once_and_stays_sparse(self):
        root, drivers = two_drivers(self, "zwrm-sparse-", "/var/tmp")
        vols = {h: os.path.join(root, h, "vol.img") for h in drivers}
        os.makedirs(os.path.dirname(vols["a"]), exist_ok=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1",
                        vols["a"], f"{self.SIZE >> 10}k"], check=True, capture_output=True)
        os.makedirs(os.path.dirname(vols["b"]), exist_ok=True)
        with open(vols["b"], "wb") as f:
            f.truncate(self.SIZE)
        await drivers["a"].start(QemuFixture.spec(self, "m1", vols["a"]))
        where = await drivers["b"].start_incoming(QemuFixture.spec(self, "m1", vols["b"]),
                                                  "127.0.0.1", None)
        events = Events()
        drivers["a"].live_subscribe("m1", events)
        started = time.monotonic()
        await drivers["a"].start_mirror("m1", where, None, speed=16 * 1024 * 1024)
        await events.wait(lambda n, d: n == "BLOCK_JOB_READY"
                          and d.get("device") == "zwrm-mirror-vol0", timeout=90)
        took = time.monotonic() - started
        allocated = {h: os.stat(v).st_blocks * 512 for h, v in vols.items()}
        print(f"\n8 GiB volume ({allocated['a'] >> 20} MiB allocated) in sync after {took:.1f} s"
              f" at 16 MiB/s; the target's copy {allocated['b'] >> 20} MiB allocated")
        self.assertLess(took, 60)
        self.assertLess(allocated["b"], allocated["a"] + (64 << 20))


@pytest.mark.qemu
class PausedOnAFullDiskTests(TestCase):
    """
    A machine paused on its host's full disk (the source driver's root and the machine's
    volume on a tmpfs that something else filled but for 16 MiB, its guest writing 40 MiB to
    the volume: C{zwrm.selftest=fill}; then the last free bytes taken too) moves live, with
    TLS, to a host with room: its migration's records are written in the room the driver
    kept in reserve, the target arrives in the source's C{io-error} state, resumes, and the
    write that waited completes there (the guest says so, and the file reads back whole from
    the target); the source stays paused for good (C{postmigrate}), also once its disk has
    room again, and its driver keeps room in reserve again from then on.
    """

    timeout = 300

    async def test_it_moves_live_and_its_write_completes_on_the_target(self):
        root = tempfile.mkdtemp(prefix="zwrm-livefull-", dir="/tmp")
        self.addCleanup(shutil.rmtree, root, True)
        small = os.path.join(root, "small")
        small_disk(self, small, "96M")
        src = QemuDriver(reactor, os.path.join(small, "a"), accel="tcg", stop_timeout=5.0)
        dst = QemuDriver(reactor, os.path.join(root, "b"), accel="tcg", stop_timeout=5.0)
        self.assertTrue(src.reserve.held())
        src.disk_room_interval = 0.2

        async def cleanup():
            for drv in (src, dst):
                for mid in list(drv.list()):
                    await drv.destroy(mid)

        self.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))

        def spec(volume):
            out = QemuFixture.spec(self, "m1", volume)
            out["cmdline"] += " zwrm.selftest=fill"
            return out

        vol_a, vol_b = os.path.join(small, "vol.img"), os.path.join(root, "b", "vol.img")
        QemuFixture.make_volume(self, vol_a, VOLUME_SIZE)
        os.makedirs(os.path.dirname(vol_b), exist_ok=True)
        with open(vol_b, "wb") as f:
            f.truncate(VOLUME_SIZE)
        fill_disk(small, leave=16 << 20)
        await src.start(spec(vol_a))
        for _ in range(1200):
            if src.status("m1")["paused"] == "disk-full":
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(src.status("m1")["paused"], "disk-full")
        fill_disk(small)  # the last free bytes (the guest's write left some) taken as well
        self.assertEqual(free_bytes(small), 0)

        ca = CertificateAuthority.create()
        where = await dst.start_incoming(spec(vol_b), "127.0.0.1",
                                         tls_for(ca, "host-b", "host-a"))
        await switch_over(src, dst, where, tls_for(ca, "host-a", "host-b"),
                          speed=200 * 1024 * 1024)
        self.assertEqual((await dst.migration_status("m1"))["runstate"], "io-error")
        self.assertFalse(src.reserve.held())  # its room took the records
        self.assertEqual((await dst.finish_incoming("m1"))["resumed"], True)

        for _ in range(1200):
            if QemuFixture.ready_output in await dst.console("m1"):
                break
            await deferLater(reactor, 0.1, lambda: None)
        console = await dst.console("m1")
        self.assertIn("zwrm: selftest: filled (0)", console)
        self.assertNotIn("I/O error", console)
        fill = await QemuFixture.read(self, dst, "m1", "fill")
        self.assertEqual((len(fill), fill.count(0)), (40 << 20, 40 << 20))
        self.assertIsNone(dst.status("m1")["paused"])
        # The source: paused for good, even with room again.
        subprocess.run(["mount", "-o", "remount,size=256M", small], check=True)
        await deferLater(reactor, 1.0, lambda: None)
        self.assertEqual((await src.migration_status("m1"))["runstate"], "postmigrate")
        # Its next migration record takes the reserve's room back first.
        src._record(src._machines["m1"], note="after")
        self.assertTrue(src.reserve.held())


@pytest.mark.qemu
class QemuListenerTests(TestCase):
    timeout = 120

    async def test_a_taken_port_is_retried(self):
        # The first port each listener picks is taken (another process listens there):
        # QEMU's bind fails with EADDRINUSE and the next port is used.
        root = tempfile.mkdtemp(prefix="zwrm-live-", dir="/tmp")
        self.addCleanup(shutil.rmtree, root, True)
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        taken = busy.getsockname()[1]
        picks = []

        def free_port(host):
            picks.append(host)
            return taken if len(picks) in (1, 3) else real_free_port(host)

        real_free_port = live.free_port
        self.patch(live, "free_port", free_port)
        drv = QemuDriver(reactor, root, accel="tcg")
        vol = os.path.join(root, "v.img")
        with open(vol, "wb") as f:
            f.truncate(4 * 1024 * 1024)
        spec = QemuFixture.spec(self, "m1", vol)
        where = await drv.start_incoming(spec, "127.0.0.1")
        self.addCleanup(drv.destroy, "m1")
        self.assertEqual(len(picks), 4)
        self.assertNotIn(taken, (where["nbd_port"], where["migration_port"]))
        self.assertEqual(where["exports"], {"v1": "vol0"})
        st = await drv.migration_status("m1")
        self.assertEqual(st["runstate"], "inmigrate")


    async def test_listeners_use_the_configured_address(self):
        # Another address than 127.0.0.1 (still loopback: tests send nothing elsewhere).
        root = tempfile.mkdtemp(prefix="zwrm-live-", dir="/tmp")
        self.addCleanup(shutil.rmtree, root, True)
        drv = QemuDriver(reactor, root, accel="tcg")
        vol = os.path.join(root, "v.img")
        with open(vol, "wb") as f:
            f.truncate(4 * 1024 * 1024)
        where = await drv.start_incoming(QemuFixture.spec(self, "m1", vol), "127.0.0.2")
        self.addCleanup(drv.destroy, "m1")
        self.assertEqual(where["host"], "127.0.0.2")
        for port in (where["nbd_port"], where["migration_port"]):
            with socket.create_connection(("127.0.0.2", port), timeout=5):
                pass
            with self.assertRaises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()


    async def test_an_address_not_of_this_host_fails_and_leaves_nothing(self):
        # 192.0.2.1 (TEST-NET-1) is no address of this host (nor of QEMU's network
        # namespace): QEMU's bind fails; the error names the address, nothing is left.
        root = tempfile.mkdtemp(prefix="zwrm-live-", dir="/tmp")
        self.addCleanup(shutil.rmtree, root, True)
        drv = QemuDriver(reactor, root, accel="tcg")
        vol = os.path.join(root, "v.img")
        with open(vol, "wb") as f:
            f.truncate(4 * 1024 * 1024)
        with self.assertRaises(Unavailable) as cm:
            await drv.start_incoming(QemuFixture.spec(self, "m1", vol), "192.0.2.1")
        self.assertIn("the NBD server on 192.0.2.1", cm.exception.message)
        self.assertIn("Cannot assign requested address", cm.exception.message)
        self.assertEqual(drv.list(), [])
        self.assertFalse(os.path.exists(os.path.join(root, "m1")))


@pytest.mark.qemu
class NbdConnectionTests(TestCase):
    """
    The source's NBD connections are the driver's, given to QEMU: a target that stops
    answering (its host gone from the network, its QEMU hung) cannot freeze the source.
    """

    timeout = 300

    async def source(self):
        """A running source (its guest ready) with a volume."""
        self.root = tempfile.mkdtemp(prefix="zwrm-live-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.ca = CertificateAuthority.create()
        src = QemuFixture.make(self, os.path.join(self.root, "a"))

        async def cleanup():
            for mid in list(src.list()):
                await src.destroy(mid)

        self.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
        vol = os.path.join(self.root, "a", "vol.img")
        QemuFixture.make_volume(self, vol, VOLUME_SIZE)
        await src.start(QemuFixture.spec(self, "m1", vol))
        for _ in range(1800):
            if QemuFixture.ready_output in await src.console("m1"):
                break
            await deferLater(reactor, 0.1, lambda: None)
        return src

    async def assert_source_runs_alone(self, src):
        """No mirror, no NBD node left; QMP answers, the guest runs and takes writes."""
        q = src._machines["m1"].qmp
        self.assertEqual(await q.execute("query-block-jobs"), [])
        nodes = [n["node-name"] for n in await q.execute("query-named-block-nodes")]
        self.assertEqual([n for n in nodes if n.startswith("zwrm-nbd")], [], nodes)
        self.assertEqual(src._nbd_sockets.get("m1"), None)
        st = await src.migration_status("m1")
        self.assertEqual((st["runstate"], st["mirrors"]), ("running", []))
        await QemuFixture.write(self, src, "m1", "still", b"the source serves\n")

    async def test_a_target_that_never_answers_the_handshake_is_given_up(self):
        # A listener that never answers (its kernel accepts the connection: the host is
        # there, its QEMU hangs). QEMU 7.2 reads the NBD handshake on its main thread: on
        # a connection of its own the source's guest and QMP froze for as long as TCP
        # kept it (for ever: nothing is sent). The driver shuts its copy down after
        # nbd_open_timeout.
        src = await self.source()
        src.nbd_open_timeout = 2.0
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        self.addCleanup(silent.close)
        target = {"host": "127.0.0.1", "nbd_port": silent.getsockname()[1],
                  "migration_port": _free_port(), "exports": {"v1": "vol0"}}
        started = reactor.seconds()
        with self.assertRaises(Unavailable) as cm:
            await src.start_mirror("m1", target, tls_for(self.ca, "host-a", "host-b"),
                                   speed=1024 * 1024).addTimeout(60, reactor)
        self.assertLess(reactor.seconds() - started, 20)
        self.assertIn("NBD server did not answer within 2 s", cm.exception.message)
        await self.assert_source_runs_alone(src)

    async def test_a_target_port_that_refuses_fails_at_once(self):
        src = await self.source()
        target = {"host": "127.0.0.1", "nbd_port": _free_port(),
                  "migration_port": _free_port(), "exports": {"v1": "vol0"}}
        with self.assertRaises(Unavailable) as cm:
            await src.start_mirror("m1", target, None).addTimeout(60, reactor)
        self.assertIn("connecting to the target's NBD export vol0 at 127.0.0.1:", cm.exception.message)
        self.assertIn("refused", cm.exception.message)
        await self.assert_source_runs_alone(src)


class NbdSocketTests(SynchronousTestCase):
    def test_the_connection_gives_up_on_a_peer_that_is_gone(self):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        self.addCleanup(server.close)
        s = live.nbd_socket("127.0.0.1", server.getsockname()[1], os.getpid(),
                            timeout=5, user_timeout=12)
        self.addCleanup(s.close)
        self.assertIsNone(s.gettimeout())  # blocking, for QEMU
        opt = s.getsockopt
        self.assertEqual(opt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT), 12000)
        self.assertTrue(opt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
        self.assertEqual((opt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                          opt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                          opt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)), (3, 3, 3))
        self.assertTrue(opt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    def test_a_refused_connection_raises(self):
        with self.assertRaises(OSError):
            live.nbd_socket("127.0.0.1", _free_port(), os.getpid(), timeout=5)


class NbdNamespaceTests(TestCase):
    """The driver's NBD connection and network namespaces of the tests' own."""

    timeout = 60

    async def listener(self, tag, after_accept):
        """
        A process in a new network namespace (removed after the test) listening on its
        loopback; once it accepted a connection it runs C{after_accept} (Python, with
        C{c} the connection).

        @return: C{(namespace, process, port)}.
        """
        ns = f"zwrm-nbd-{tag}-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", ns])
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        script = ("import socket, time\n"
                  "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1)\n"
                  "print(s.getsockname()[1], flush=True)\n"
                  f"c, _ = s.accept(); {after_accept}\n")
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", script],
                                  stdout=subprocess.PIPE, text=True)
        self.addCleanup(server.wait, 10)
        self.addCleanup(server.kill)
        return ns, server, int(await deferToThread(server.stdout.readline))

    async def test_the_connection_is_made_in_qemu_s_network_namespace(self):
        # QEMU may run in another network namespace than the agent (the hosts of
        # tests/agent/test_live_bridge.py): the connection QEMU gets is made in QEMU's.
        # A process in a namespace of this test's listens on that namespace's loopback;
        # given its pid, connect_nbd reaches it.
        _ns, server, port = await self.listener("ns", "c.sendall(b'hello'); c.recv(1)")
        sock = await live.connect_nbd(reactor, "127.0.0.1", port, server.pid, timeout=5)
        self.addCleanup(sock.close)
        self.assertEqual(sock.recv(5), b"hello")
        # This process's thread is still in its own namespace.
        self.assertEqual(os.stat("/proc/thread-self/ns/net").st_ino,
                         os.stat("/proc/self/ns/net").st_ino)
        self.assertNotEqual(os.stat(f"/proc/{server.pid}/ns/net").st_ino,
                            os.stat("/proc/self/ns/net").st_ino)

    async def test_a_peer_that_vanishes_is_dropped_within_the_user_timeout(self):
        # A host gone from the network: its packets are no longer delivered (here the
        # loopback of a namespace of the test's, taken down). Data sent on the connection
        # stays unacknowledged, and the kernel drops the connection after user_timeout
        # (ETIMEDOUT), where TCP's retransmissions alone would take about 15 minutes:
        # QEMU's next read or write on it fails.
        ns, server, port = await self.listener("ut", "time.sleep(60)")
        sock = await live.connect_nbd(reactor, "127.0.0.1", port, server.pid, timeout=5,
                                      user_timeout=2)
        self.addCleanup(sock.close)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "down"], check=True)

        def send_and_wait():
            started = time.monotonic()
            sock.sendall(b"NBD request" * 100)
            sock.settimeout(20)
            try:
                sock.recv(16)
            except OSError as e:
                return e.errno, time.monotonic() - started
            return None, time.monotonic() - started

        err, took = await deferToThread(send_and_wait)
        self.assertEqual(err, errno.ETIMEDOUT)
        self.assertLess(took, 10)


class DirtyMapTests(SynchronousTestCase):
    def test_dirty_ranges_are_the_ones_without_data(self):
        entries = [{"start": 0, "length": 65536, "data": True},
                   {"start": 65536, "length": 65536, "data": False},
                   {"start": 131072, "length": 65536, "data": False},
                   {"start": 196608, "length": 1 << 20, "data": True},
                   {"start": 1245184, "length": 1 << 20, "data": False}]
        self.assertEqual(live.parse_dirty_map(entries, 1245184 + 4096),
                         [[65536, 131072], [1245184, 4096]])

    def test_taken_port_errors(self):
        self.assertTrue(live._taken(QMPError("GenericError",
                                             "Failed to bind socket: Address already in use")))
        self.assertFalse(live._taken(QMPError("GenericError", "Permission denied")))


class FreePortTests(SynchronousTestCase):
    def test_an_address_of_another_network_namespace(self):
        # QEMU may listen in another network namespace than the agent's process (its
        # address is not here): a port is still chosen; QEMU's bind says if it is taken.
        port = live.free_port("192.0.2.1")  # TEST-NET-1: not an address of this host
        self.assertTrue(1 <= port <= 65535)
        self.assertTrue(1 <= live.free_port("127.0.0.1") <= 65535)
