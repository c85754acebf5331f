"""
The IHypervisorDriver contract, run against the QEMU driver (real VMs under TCG) and the fake.
"""

import os
import signal
import subprocess

import pytest
from twisted.internet import reactor

from tests.drivers.contract import make_driver_tests
from zwrm.drivers.fake import FakeDriver, FakeHost
from zwrm.drivers.qemu import QemuDriver
from zwrm.testing import image
from zwrm.testing.disks import small_disk


class QemuFixture:
    boot_output = "zwrm: init starting"

    @staticmethod
    def make(testcase, root, boot_id=None):
        return QemuDriver(reactor, root, accel="tcg", stop_timeout=5.0, boot_id=boot_id)

    @staticmethod
    def spec(testcase, machine_id):
        img = image.build()
        return {"id": machine_id, "kernel": img.kernel, "initrd": img.initrd, "disk": None,
                "cmdline": img.cmdline, "vcpus": 1, "memory_mb": 128, "volumes": [],
                "forwards": []}

    @staticmethod
    def kill(driver, machine_id, pid):
        os.kill(pid, signal.SIGKILL)

    filled_output = "zwrm: selftest: filled (0)"

    @staticmethod
    def full_disk_spec(testcase, machine_id):
        # A 64 MiB ext4 volume (sparse) on a 16 MiB tmpfs; the guest writes 40 MiB to it.
        small = os.path.join(testcase.root, "small")
        small_disk(testcase, small, "16M")
        testcase.small = small
        path = os.path.join(small, "data.img")
        subprocess.run(["mkfs.ext4", "-q", "-F", path, "64M"], check=True)
        spec = QemuFixture.spec(testcase, machine_id)
        spec["volumes"] = [{"id": "data", "path": path}]
        spec["cmdline"] += " zwrm.vol=data:/data zwrm.selftest=fill"
        return spec

    @staticmethod
    def fill_disk(driver, machine_id):
        pass  # its guest does (zwrm.selftest=fill)

    @staticmethod
    def make_room(testcase):
        subprocess.run(["mount", "-o", "remount,size=256M", testcase.small], check=True)


class FakeFixture:
    boot_output = "fake: booted"
    hosts = {}

    @classmethod
    def make(cls, testcase, root, boot_id=None):
        host = cls.hosts.setdefault(root, FakeHost(powerdown_delay=0.05))
        return FakeDriver(reactor, root, host=host, stop_timeout=5.0, boot_id=boot_id or "boot-1")

    @staticmethod
    def spec(testcase, machine_id):
        kernel = os.path.join(testcase.root, "vmlinuz")
        with open(kernel, "wb") as f:
            f.write(b"kernel")
        return {"id": machine_id, "kernel": kernel, "initrd": None, "disk": None,
                "cmdline": "console=ttyS0", "vcpus": 1, "memory_mb": 128, "volumes": [],
                "forwards": [{"guest": 8080, "host": 18080}]}

    @staticmethod
    def kill(driver, machine_id, pid):
        driver.crash(machine_id)

    filled_output = "fake: resumed"

    @classmethod
    def full_disk_spec(cls, testcase, machine_id):
        spec = cls.spec(testcase, machine_id)
        path = os.path.join(testcase.root, "data.img")
        with open(path, "wb") as f:
            f.truncate(64 << 20)
        spec["volumes"] = [{"id": "data", "path": path}]
        testcase.fake_host = cls.hosts[testcase.root]
        return spec

    @staticmethod
    def fill_disk(driver, machine_id):
        driver.disk_full(machine_id)

    @staticmethod
    def make_room(testcase):
        testcase.fake_host.free_bytes = None


QemuContractTests = pytest.mark.qemu(make_driver_tests(QemuFixture))
FakeContractTests = make_driver_tests(FakeFixture)
