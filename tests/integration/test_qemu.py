"""
End to end on one host: the executor with the real QEMU driver (TCG), real ext4 volumes and
real health checks boot the test image, serve HTTP, keep data on the volume across a stop and
a start, survive an agent restart, and notice a kill -9.

Two guest boots in all; each step builds on the previous one, so it is one test.
"""

import os
import shutil
import signal
import tempfile

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from zwrm.agent.executor import Executor
from zwrm.agent.volumes import VolumeStore
from zwrm.drivers import process
from zwrm.drivers.qemu import QemuDriver
from zwrm.testing import image


async def poll(predicate, timeout, what, interval=0.2):
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await deferLater(reactor, interval, lambda: None)
        waited += interval


@pytest.mark.qemu
class QemuExecutorIntegrationTests(TestCase):
    timeout = 300

    def setUp(self):
        self.img = image.build()
        self.dir = tempfile.mkdtemp(prefix="zwrm-it-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.events = []
        self.executors = []

    def agent(self):
        """What an agent process makes at start-up."""
        driver = QemuDriver(reactor, os.path.join(self.dir, "machines"), accel="tcg",
                            stop_timeout=20)
        store = VolumeStore(reactor, os.path.join(self.dir, "volumes"))
        ex = Executor(reactor, "h1", driver, store, self.report, data_dir=self.dir)
        self.executors.append(ex)
        return ex

    def report(self, event):
        self.events.append(event)
        return succeed(None)

    def last(self, mid="m1"):
        return [e for e in self.events if e["machine_id"] == mid][-1]

    async def get(self, port, path="/"):
        r = await treq.get(f"http://127.0.0.1:{port}{path}", timeout=10)
        return r.code, await r.text()

    async def wait_healthy(self, ex, what):
        await poll(lambda: ex.machine_status("m1")["health"] == "passing", 120, what)

    async def _cleanup(self):
        for ex in self.executors:
            ex.close()
            for mid in ex.driver.list():
                await ex.driver.destroy(mid)

    async def test_machine_lifecycle(self):
        self.addCleanup(lambda: Deferred.fromCoroutine(self._cleanup()))
        ex = self.agent()
        spec = {
            "id": "m1", "app": "web", "image": self.img.spec(), "vcpus": 1, "memory_mb": 256,
            "volumes": [{"id": "data1", "mount": "/data", "size_mb": 16}],
            "service_port": 8080,
            "health": {"type": "http", "path": "/", "interval": 0.5, "timeout": 2, "grace": 120},
        }
        st = await ex.start_machine(spec)
        self.assertEqual((st["state"], st["health"]), ("running", "starting"))
        port = st["host_port"]

        # 1. It boots, mounts its volume and passes the HTTP health check.
        await self.wait_healthy(ex, "first boot healthy")
        self.assertEqual(self.last()["health"], "passing")
        code, page = await self.get(port)
        self.assertEqual(code, 200)
        self.assertIn("boots: 1", page)
        self.assertIn("no index.txt on the volume", page)
        logs = await ex.machine_logs("m1")
        self.assertIn("zwrm: mounted /dev/vda at /data", logs)
        self.assertIn("zwrm: ready", logs)

        # 2. Write to the volume through the VM's HTTP service.
        r = await treq.post(f"http://127.0.0.1:{port}/cgi-bin/write?index.txt",
                            data=b"hello from the integration test\n", timeout=10)
        self.assertEqual((r.code, (await r.text()).strip()), (200, "ok"))
        self.assertIn("hello from the integration test", (await self.get(port))[1])

        # 3. Stop (ACPI power-down: the guest unmounts and powers off) and start again.
        st = await ex.stop_machine("m1")
        self.assertEqual((st["state"], st["reason"]), ("stopped", "stopped on request"))
        self.assertIn("power button pressed", await ex.machine_logs("m1"))
        vol = ex.volumes.info("data1")
        self.assertEqual((vol["size_mb"], vol["in_use_by"]), (16, "m1"))
        fsck = await process.run(reactor, ["e2fsck", "-fn", vol["path"]], timeout=60)
        self.assertEqual(fsck.code, 0, fsck.output)  # cleanly unmounted
        st = await ex.start_machine(spec)
        await self.wait_healthy(ex, "second boot healthy")
        code, page = await self.get(st["host_port"])
        self.assertIn("boots: 2", page)
        self.assertIn("hello from the integration test", page)  # the data survived

        # 4. The agent restarts; the VM keeps running and is found again.
        pid = ex.machine_status("m1")["pid"]
        ex.close()
        await ex.driver.close()
        self.events.clear()
        ex = self.agent()
        found = await ex.recover()
        self.assertEqual([(s["id"], s["state"]) for s in found], [("m1", "running")])
        self.assertEqual(ex.machine_status("m1")["pid"], pid)
        self.assertEqual(ex.volumes.in_use("data1"), "m1")
        await self.wait_healthy(ex, "healthy after the agent restart")
        self.assertIn("boots: 2", (await self.get(st["host_port"]))[1])

        # 5. kill -9 of QEMU is noticed at once and reported as failed.
        os.kill(pid, signal.SIGKILL)
        await poll(lambda: ex.machine_status("m1")["state"] == "failed", 10, "failed reported")
        self.assertEqual(self.last()["state"], "failed")

        # 6. Destroy: the machine goes, its volume stays and can then be deleted.
        await ex.destroy_machine("m1")
        self.assertEqual(ex.list_machines(), [])
        self.assertTrue(ex.volumes.exists("data1"))
        await ex.delete_volume("data1")
        self.assertFalse(ex.volumes.exists("data1"))
