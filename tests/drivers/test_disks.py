"""
Images with a root disk boot under real QEMU (TCG): kernel + initrd + disk (the disk is the
root device, no bootindex clash), a self-booting disk through SeaBIOS and a UEFI one through
OVMF; the root disk is always the first disk and volumes are found by their virtio serial; each
machine has its own writable root overlay that survives stop/start and an agent restart, and
goes with the machine. The argument vector is checked without QEMU where that is enough.
"""

import json
import os
import shutil
import subprocess
import tempfile

import pytest
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.drivers.test_diskimage import hostile_images
from zwrm.drivers import qemu
from zwrm.drivers import spec as _spec
from zwrm.drivers.qemu import QemuDriver
from zwrm.errors import InvalidArgument
from zwrm.testing import image

pytestmark = pytest.mark.qemu

#: The message the boot sector below prints on COM1.
BOOT_SECTOR_LINE = "zwrm: boot sector ok"


def boot_sector_disk(path, size=1024 * 1024):
    """
    A raw disk whose MBR boot code writes L{BOOT_SECTOR_LINE} to COM1 and halts: proof
    that the firmware booted the disk (16-bit code, loaded at 0x7c00).
    """
    msg = (BOOT_SECTOR_LINE + "\r\n").encode() + b"\0"
    code = bytes.fromhex(
        "31c0"      # xor ax, ax
        "8ed8"      # mov ds, ax
        "baf803"    # mov dx, 0x3f8
        "be167c"    # mov si, 0x7c16 (msg)
        "fc"        # cld
        "ac"        # loop: lodsb
        "84c0"      # test al, al
        "7403"      # jz done
        "ee"        # out dx, al
        "ebf8"      # jmp loop
        "f4"        # done: hlt
        "ebfd"      # jmp done
    )
    assert len(code) == 0x16
    sector = (code + msg).ljust(510, b"\0") + b"\x55\xaa"
    with open(path, "wb") as f:
        f.write(sector)
        f.truncate(size)
    return path


class ArgvTests(SynchronousTestCase):
    def argv(self, **spec):
        root = tempfile.mkdtemp(prefix="zwrm-av-", dir="/tmp")
        self.addCleanup(shutil.rmtree, root, True)
        drv = QemuDriver(reactor, root, accel="tcg")
        full = {"id": "m1", "kernel": None, "initrd": None, "disk": None, "cmdline": "",
                "vcpus": 1, "memory_mb": 64, "volumes": []}
        full.update(spec)
        s = _spec.validate(full)
        if s["disk"] and not s["disk_format"]:
            s["disk_format"] = "raw"
        m = qemu._Machine("m1", os.path.join(root, "m1"))
        return drv._argv(m, s, "tcg")

    def devices(self, argv):
        return [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]

    def test_memory_under_tcg_is_not_a_multiple_of_256_kib(self):
        # QEMU 7.2 loses a TCG guest's writes in a live migration when its RAM is a
        # multiple of 256 KiB (qemu.memory_arg); KVM's RAM is exactly the spec's.
        argv = self.argv(kernel="/k", memory_mb=512)
        self.assertEqual(argv[argv.index("-m") + 1], "524296k")
        self.assertNotEqual((512 * 1024 + 8) % 256, 0)
        self.assertEqual(qemu.memory_arg(512, "kvm"), "512")
        self.assertEqual(qemu.memory_arg(64, "tcg"), "65544k")

    def test_kernel_initrd_disk(self):
        argv = self.argv(kernel="/k", initrd="/i", disk="/d", cmdline="console=ttyS0",
                         volumes=[{"id": "data", "path": "/v"}])
        self.assertEqual(argv[argv.index("-append") + 1], "console=ttyS0 root=/dev/vda")
        self.assertNotIn("bootindex", " ".join(argv))
        devs = self.devices(argv)
        self.assertEqual(devs[0], "virtio-blk-pci,drive=root")
        self.assertEqual(devs[1], "virtio-blk-pci,drive=vol0,serial=data")

    def test_root_on_the_command_line_is_kept(self):
        argv = self.argv(kernel="/k", disk="/d", cmdline="root=/dev/vda1 ro")
        self.assertEqual(argv[argv.index("-append") + 1], "root=/dev/vda1 ro")

    def test_self_booting_disk_is_first_and_boots(self):
        argv = self.argv(disk="/d", volumes=[{"id": "a" * 40, "path": "/v"}])
        devs = self.devices(argv)
        self.assertEqual(devs[0], "virtio-blk-pci,drive=root,bootindex=0")
        self.assertEqual(devs[1], f"virtio-blk-pci,drive=vol0,serial={_spec.volume_serial('a' * 40)}")
        self.assertNotIn("-kernel", argv)
        self.assertNotIn("-bios", argv)

    def test_uefi(self):
        argv = self.argv(disk="/d", firmware="uefi")
        self.assertNotIn("-bios", argv)
        flash = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive" and "pflash" in argv[i + 1]]
        self.assertEqual(flash[0], f"if=pflash,format=raw,unit=0,readonly=on,file={qemu.OVMF}")
        self.assertTrue(flash[1].startswith("if=pflash,format=raw,unit=1,file=/"), flash)
        self.assertTrue(flash[1].endswith("/m1/" + qemu.EFI_VARS), flash)
        self.assertNotIn("readonly", flash[1])

    def test_volume_serials(self):
        self.assertEqual(_spec.volume_serial("data"), "data")
        long = _spec.volume_serial("x" * 64)
        self.assertEqual(len(long), 20)
        self.assertNotEqual(long, _spec.volume_serial("x" * 63))
        with self.assertRaises(InvalidArgument):
            _spec.validate({"id": "m", "kernel": "/k", "vcpus": 1, "memory_mb": 64,
                            "volumes": [{"id": "v", "path": "/a"}, {"id": "v", "path": "/b"}]})

    def test_bad_firmware_and_format(self):
        base = {"id": "m", "disk": "/d", "vcpus": 1, "memory_mb": 64}
        for extra in ({"firmware": "coreboot"}, {"disk_format": "vmdk"}, {"id": "m\n"}):
            with self.assertRaises(InvalidArgument):
                _spec.validate({**base, **extra})


class DiskBootTests(TestCase):
    timeout = 240

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="zwrm-db-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.drivers = []

    def driver(self):
        drv = QemuDriver(reactor, os.path.join(self.root, "machines"), accel="tcg",
                         stop_timeout=5.0)
        self.drivers.append(drv)
        if len(self.drivers) == 1:
            self.addCleanup(self._cleanup)
        return drv

    async def _cleanup(self):
        for drv in self.drivers:
            for mid in list(drv.list()):
                try:
                    await drv.destroy(mid)
                except Exception:
                    pass

    def path(self, name):
        return os.path.join(self.root, name)

    async def console_shows(self, drv, mid, text, timeout=120):
        async def check():
            return text in await drv.console(mid)

        waited = 0.0
        while not await check():
            if drv.status(mid)["state"] != "running" or waited > timeout:
                raise AssertionError(f"{text!r} not on the console of {mid} "
                                     f"({drv.status(mid)}):\n{(await drv.console(mid))[-3000:]}")
            await deferLater(reactor, 0.5, lambda: None)
            waited += 0.5

    async def test_kernel_initrd_disk_with_a_volume_by_serial(self):
        img = image.build()
        disk = self.path("root.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "16M"], check=True)
        vol = self.path("data.img")
        subprocess.run(["mkfs.ext4", "-q", "-F", vol, "8M"], check=True)
        drv = self.driver()
        st = await drv.start({
            "id": "m1", "kernel": img.kernel, "initrd": img.initrd, "disk": disk,
            "disk_format": "qcow2", "cmdline": image.BASE_CMDLINE + " zwrm.vol=data-1:/data",
            "vcpus": 1, "memory_mb": 128, "volumes": [{"id": "data-1", "path": vol}],
        })
        self.assertEqual(st["state"], "running")
        # The root disk is vda; the volume, second, is found by its serial.
        await self.console_shows(drv, "m1", "zwrm: mounted /dev/vdb at /data")
        overlay = os.path.join(drv.root, "m1", qemu.ROOT_OVERLAY)
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", overlay],
                                         check=True, capture_output=True).stdout)
        self.assertEqual(info["backing-filename"], disk)
        self.assertEqual(os.stat(overlay).st_mode & 0o777, 0o600)
        inode = os.stat(overlay).st_ino
        # Survives a stop/start...
        await drv.stop("m1", timeout=5)
        await drv.start(json.load(open(os.path.join(drv.root, "m1", "spec.json"))))
        self.assertEqual(os.stat(overlay).st_ino, inode)
        # ...and an agent restart...
        await drv.close()
        second = self.driver()
        await second.recover()
        await second.stop("m1", timeout=1)
        await second.start(json.load(open(os.path.join(drv.root, "m1", "spec.json"))))
        self.assertEqual(os.stat(overlay).st_ino, inode)
        # ...and goes with the machine.
        await second.destroy("m1")
        self.assertFalse(os.path.exists(overlay))

    async def test_self_booting_disk_seabios(self):
        disk = boot_sector_disk(self.path("boot.raw"))
        drv = self.driver()
        await drv.start({"id": "bios", "disk": disk, "disk_format": "raw", "vcpus": 1,
                         "memory_mb": 64, "volumes": []})
        await self.console_shows(drv, "bios", BOOT_SECTOR_LINE)
        with open(disk, "rb") as f:
            self.assertEqual(f.read(4), bytes.fromhex("31c08ed8"))  # the base is untouched

    async def test_uefi_disk_runs_ovmf(self):
        if not os.path.isfile(qemu.OVMF):
            self.skipTest(f"no OVMF firmware at {qemu.OVMF} (package ovmf)")
        disk = boot_sector_disk(self.path("uefi.raw"))
        drv = self.driver()
        await drv.start({"id": "uefi", "disk": disk, "disk_format": "raw", "firmware": "uefi",
                         "vcpus": 1, "memory_mb": 128, "volumes": []})
        # OVMF's boot manager reports on the serial console (it does not run MBR code).
        await self.console_shows(drv, "uefi", "BdsDxe", timeout=180)
        self.assertNotIn(BOOT_SECTOR_LINE, await drv.console("uefi"))
        # The machine's own writable variable store, private, from the template.
        st = os.stat(os.path.join(drv.root, "uefi", qemu.EFI_VARS))
        self.assertEqual((st.st_mode & 0o777, st.st_size), (0o600, os.path.getsize(qemu.OVMF_VARS)))

    async def test_hostile_qcow2_never_reaches_qemu(self):
        images = hostile_images(self.path("hostile"))
        drv = self.driver()
        for case in ("backing-relative", "backing-absolute", "backing-json", "data-file"):
            for fmt in ("qcow2", None):
                with self.assertRaises(InvalidArgument) as cm:
                    await drv.start({"id": "evil", "disk": images[case], "disk_format": fmt,
                                     "vcpus": 1, "memory_mb": 64, "volumes": []})
                self.assertIn("refused", cm.exception.message)
                self.assertFalse(os.path.exists(os.path.join(drv.root, "evil", "qemu.log")))

    async def test_new_base_new_overlay(self):
        a = boot_sector_disk(self.path("a.raw"))
        b = boot_sector_disk(self.path("b.raw"))
        drv = self.driver()
        spec = {"id": "m", "disk": a, "disk_format": "raw", "vcpus": 1, "memory_mb": 64,
                "volumes": []}
        await drv.start(spec)
        overlay = os.path.join(drv.root, "m", qemu.ROOT_OVERLAY)
        await drv.stop("m", timeout=0.5)
        await drv.start({**spec, "disk": b})
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", overlay],
                                         check=True, capture_output=True).stdout)
        self.assertEqual(info["backing-filename"], b)
