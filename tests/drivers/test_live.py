"""
The ILiveMigration contract, run against the QEMU driver (two real QEMUs under TCG on
loopback, with TLS) and the fake driver.
"""

import os
import signal
import socket
import subprocess

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.drivers.live_contract import make_live_tests
from zwrm.drivers.qemu import QemuDriver
from zwrm.testing import image


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


QemuLiveContractTests = pytest.mark.qemu(make_live_tests(QemuFixture))


class FakeFixture:
    ready_output = "fake: booted"

    @staticmethod
    def make(testcase, root):
        from zwrm.drivers.fake import FakeDriver, FakeHost

        return FakeDriver(reactor, root, host=FakeHost(powerdown_delay=0.05), stop_timeout=5.0)

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


FakeLiveContractTests = make_live_tests(FakeFixture)
