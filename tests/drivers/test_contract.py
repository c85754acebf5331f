"""
The IHypervisorDriver contract, run against the QEMU driver (real VMs under TCG) and the fake.
"""

import os
import signal

import pytest
from twisted.internet import reactor

from tests.drivers.contract import make_driver_tests
from zwrm.drivers.fake import FakeDriver, FakeHost
from zwrm.drivers.qemu import QemuDriver
from zwrm.testing import image


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


QemuContractTests = pytest.mark.qemu(make_driver_tests(QemuFixture))
FakeContractTests = make_driver_tests(FakeFixture)
