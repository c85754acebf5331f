"""
Disk images are checked with qemu-img before anything opens them: hostile qcow2 files (a
backing file, relative or absolute, an external data file) are refused, and the declared
format must be the real one. Real qemu-img, real files.
"""

import json
import os
import shutil
import subprocess
import tempfile

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm.drivers import diskimage
from zwrm.errors import InvalidArgument


def qemu_img(*args):
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def hostile_images(d):
    """
    @return: C{{case: path}} of qcow2 images that refer to something outside themselves,
        plus C{"ok"}: a self-contained one and C{"raw"}: a raw one.
    """
    os.makedirs(d, exist_ok=True)
    secret = os.path.join(d, "host.json")
    with open(secret, "w") as f:
        f.write('{"token": "secret"}')
    out = {}
    out["backing-relative"] = os.path.join(d, "rel.qcow2")
    qemu_img("create", "-u", "-f", "qcow2", "-b", "../../../host.json", "-F", "raw",
             out["backing-relative"], "1M")
    out["backing-absolute"] = os.path.join(d, "abs.qcow2")
    qemu_img("create", "-u", "-f", "qcow2", "-b", secret, "-F", "raw", out["backing-absolute"],
             "1M")
    out["backing-json"] = os.path.join(d, "json.qcow2")
    qemu_img("create", "-u", "-f", "qcow2", "-b",
             'json:{"driver":"raw","file":{"driver":"file","filename":"' + secret + '"}}',
             "-F", "raw", out["backing-json"], "1M")
    out["data-file"] = os.path.join(d, "data.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={secret}.data,data_file_raw=on",
             out["data-file"], "1M")
    out["ok"] = os.path.join(d, "ok.qcow2")
    qemu_img("create", "-f", "qcow2", out["ok"], "4M")
    out["raw"] = os.path.join(d, "disk.raw")
    qemu_img("create", "-f", "raw", out["raw"], "2M")
    return out


class CheckInfoTests(SynchronousTestCase):
    def test_backing_file_refused(self):
        info = {"format": "qcow2", "virtual-size": 1, "backing-filename": "../x"}
        with self.assertRaises(InvalidArgument) as cm:
            diskimage.check_info(info, "disk")
        self.assertIn("backing file '../x'", cm.exception.message)

    def test_data_file_refused(self):
        info = {"format": "qcow2", "virtual-size": 1,
                "format-specific": {"type": "qcow2", "data": {"data-file": "/etc/shadow"}}}
        with self.assertRaises(InvalidArgument) as cm:
            diskimage.check_info(info, "disk")
        self.assertIn("external data file", cm.exception.message)

    def test_other_formats_refused(self):
        for fmt in ("vmdk", "vdi", None):
            with self.assertRaises(InvalidArgument):
                diskimage.check_info({"format": fmt, "virtual-size": 1}, "disk")

    def test_declared_format_must_match(self):
        with self.assertRaises(InvalidArgument) as cm:
            diskimage.check_info({"format": "raw", "virtual-size": 1}, "disk", "qcow2")
        self.assertIn("declared qcow2 but it is raw", cm.exception.message)

    def test_self_contained(self):
        self.assertEqual(
            diskimage.check_info({"format": "qcow2", "virtual-size": 5, "actual-size": 3}, "d"),
            {"format": "qcow2", "virtual_size": 5, "actual_size": 3},
        )


class InspectTests(TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="zwrm-di-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.images = hostile_images(self.dir)

    async def test_hostile_refused(self):
        for case in ("backing-relative", "backing-absolute", "backing-json", "data-file"):
            for fmt in ("qcow2", None):
                with self.assertRaises(InvalidArgument, msg=case) as cm:
                    await diskimage.inspect(reactor, self.images[case], fmt, what=case)
                self.assertIn("refused", cm.exception.message)
                self.assertIn(case, cm.exception.message)

    async def test_self_contained_accepted(self):
        info = await diskimage.inspect(reactor, self.images["ok"], "qcow2")
        self.assertEqual((info["format"], info["virtual_size"]), ("qcow2", 4 * 1024 * 1024))
        info = await diskimage.inspect(reactor, self.images["raw"])
        self.assertEqual(info["format"], "raw")

    async def test_not_what_it_claims(self):
        # A raw file declared qcow2 (its magic bytes are not trusted, qemu-img decides).
        with self.assertRaises(InvalidArgument) as cm:
            await diskimage.inspect(reactor, self.images["raw"], "qcow2", what="layer x")
        self.assertIn("layer x: not a valid qcow2 image", cm.exception.message)
        # A qcow2 with a backing file declared raw is opened as raw: harmless bytes.
        info = await diskimage.inspect(reactor, self.images["backing-absolute"], "raw")
        self.assertEqual(info["format"], "raw")

    async def test_missing_file(self):
        with self.assertRaises(InvalidArgument):
            await diskimage.inspect(reactor, os.path.join(self.dir, "nope"), "raw")

    async def test_unsupported_format_argument(self):
        with self.assertRaises(InvalidArgument):
            await diskimage.inspect(reactor, self.images["ok"], "vmdk")

    async def test_boot_sectors_are_the_guest_s_view(self):
        """
        A disk's first 1 KiB as a guest sees it (a qcow2's, not its file's bytes): an MBR's
        boot signature or a GPT header is what a firmware boots from; an empty disk or a
        file system has neither.
        """
        mbr = os.path.join(self.dir, "mbr.raw")
        with open(mbr, "wb") as f:
            f.truncate(1 << 20)
            f.seek(510)
            f.write(b"\x55\xaa")
        mbr_qcow2 = os.path.join(self.dir, "mbr.qcow2")
        qemu_img("convert", "-f", "raw", "-O", "qcow2", mbr, mbr_qcow2)
        ext4 = os.path.join(self.dir, "root.ext4")
        with open(ext4, "wb") as f:
            f.truncate(8 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", ext4], check=True, capture_output=True)
        for path, fmt, expected in ((mbr, "raw", True), (mbr_qcow2, "qcow2", True),
                                    (self.images["ok"], "qcow2", False), (ext4, "raw", False)):
            head = await diskimage.boot_sectors(reactor, path, fmt)
            self.assertEqual(len(head), 1024)
            self.assertEqual(diskimage.bootable(head), expected, path)
        self.assertTrue(diskimage.bootable(bytes(512) + b"EFI PART" + bytes(504)))
        with self.assertRaises(InvalidArgument):
            await diskimage.boot_sectors(reactor, self.images["raw"], "qcow2")

    def test_json_output_is_what_check_info_reads(self):
        out = subprocess.run(["qemu-img", "info", "--output=json", self.images["data-file"]],
                             check=True, capture_output=True).stdout
        self.assertIn("data-file", json.loads(out)["format-specific"]["data"])
