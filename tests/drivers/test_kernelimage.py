"""
A kernel is checked before it is stored: a Linux bzImage, a PVH ELF kernel and a Multiboot
kernel are taken, anything else is refused with a message naming the file. The contract with
QEMU itself: every file the check takes, the real C{qemu-system-x86_64} loads; and a file
the check refuses would have booted into garbage (QEMU loads 200 KiB of random bytes as an
old zImage) or failed the machine at its start.
"""

import glob
import os
import struct
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from zwrm.drivers import kernelimage
from zwrm.errors import InvalidArgument
from zwrm.testing.image import kernel_bytes


def multiboot():
    """A Multiboot (version 1) kernel with the a.out kludge: loaded at 1 MiB, then C{hlt}."""
    magic, flags = 0x1BADB002, 0x00010000
    checksum = -(magic + flags) & 0xFFFFFFFF
    head = struct.pack("<8I", magic, flags, checksum, 0x100000, 0x100000, 0, 0, 0x100020)
    return head + b"\xf4" * 4096


def elf64(note_type=18):
    """
    An x86-64 ELF kernel: one loadable segment of C{hlt} at 1 MiB and one note, the PVH
    entry point (C{Xen}, type 18) unless C{note_type} says another.
    """
    name, desc = b"Xen\0", struct.pack("<I", 0x100000)
    note = struct.pack("<3I", len(name), len(desc), note_type) + name + desc
    phoff, phnum, code_off, code = 64, 2, 0x1000, b"\xf4" * 16
    notes_off = phoff + 56 * phnum
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, 0x100000, phoff, 0, 0, 64, 56, phnum, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, code_off, 0x100000, 0x100000, len(code), len(code),
                       0x1000)
    notes = struct.pack("<IIQQQQQQ", 4, 4, notes_off, 0, 0, len(note), len(note), 4)
    out = ehdr + load + notes + note
    return out + bytes(code_off - len(out)) + code


def host_kernel():
    """The host's own Debian kernel (linux-image-amd64), a real bzImage."""
    found = sorted(glob.glob("/boot/vmlinuz-*"))
    if not found:
        raise RuntimeError("no /boot/vmlinuz-*: install linux-image-amd64")
    with open(found[-1], "rb") as f:
        return f.read()


TAKEN = {
    "bzImage": ("bzImage", host_kernel),
    "header only": ("bzImage", kernel_bytes),
    "multiboot": ("multiboot", multiboot),
    "elf-pvh": ("elf-pvh", elf64),
}
REFUSED = {
    "random": lambda: os.urandom(200_000),
    "small": lambda: os.urandom(100),
    "empty": lambda: b"",
    "text": lambda: b"#!/bin/sh\necho not a kernel\n" * 100,
    "elf without PVH note": lambda: elf64(note_type=1),
    "bzImage cut short": lambda: host_kernel()[:0x200],
    "multiboot, bad checksum": lambda: multiboot()[:8] + b"\0\0\0\0" + multiboot()[12:],
}


class KernelImageTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="zwrm-kernel-", dir="/tmp")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", self.dir], check=True))

    def write(self, name, data):
        path = os.path.join(self.dir, name.replace(" ", "-").replace(",", ""))
        with open(path, "wb") as f:
            f.write(data)
        return path

    def qemu_loads(self, path):
        """Whether QEMU's x86 loader takes C{path} (the machine is made, paused, then quit)."""
        done = subprocess.run(
            ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-display", "none",
             "-nodefaults", "-S", "-kernel", path, "-monitor", "stdio"],
            input=b"quit\n", capture_output=True, timeout=60)
        return done.returncode == 0, done.stderr.decode(errors="replace")

    def test_kernels_taken_and_loaded_by_qemu(self):
        for case, (expected, make) in TAKEN.items():
            path = self.write(case, make())
            self.assertEqual(kernelimage.inspect(path, f"--kernel {path}"), expected, case)
            loaded, err = self.qemu_loads(path)
            self.assertTrue(loaded, f"{case}: {err}")

    def test_anything_else_refused_naming_the_file(self):
        for case, make in REFUSED.items():
            path = self.write(case, make())
            with self.assertRaises(InvalidArgument, msg=case) as raised:
                kernelimage.inspect(path, f"--kernel {path}")
            self.assertIn(f"--kernel {path} is not an x86 kernel QEMU can boot",
                          raised.exception.message)

    def test_qemu_boots_garbage_the_check_refuses(self):
        """Why the check is there: QEMU takes random bytes as an old zImage, and says nothing."""
        path = self.write("random", os.urandom(200_000))
        self.assertEqual(self.qemu_loads(path), (True, ""))
        with open(path, "rb") as f:
            self.assertIsNone(kernelimage.kernel_format(f))
