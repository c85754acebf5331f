"""
The test image builder: what goes into the initramfs, and the cache.
(Booting it is tested by tests/drivers/test_contract.py and tests/integration/test_qemu.py.)
"""

import gzip
import os
import shutil
import stat
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from zwrm.testing import image


def read_cpio(data):
    """Parse a newc archive: name -> (mode, body, rdev major, rdev minor)."""
    out = {}
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701", data[pos:pos + 6]
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos: pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body, fields[9], fields[10])


class ImageBuilderTests(SynchronousTestCase):
    def setUp(self):
        self.cache = tempfile.mkdtemp(prefix="zwrm-img-")
        self.addCleanup(shutil.rmtree, self.cache, True)

    def test_contents_and_cache(self):
        img = image.build(self.cache)
        self.assertTrue(os.path.isfile(img.kernel))
        with gzip.open(img.initrd) as f:
            files = read_cpio(f.read())
        mode, init, _, _ = files["init"]
        self.assertTrue(stat.S_ISREG(mode) and mode & 0o111)
        self.assertIn(b"zwrm.vol=", init)
        self.assertIn(b"httpd -p 8080", init)
        self.assertTrue(stat.S_ISCHR(files["dev/console"][0]))
        self.assertEqual(files["dev/console"][2:], (5, 1))
        self.assertEqual(files["bin/sh"][1], b"busybox")  # applet symlinks
        modules = files["etc/modules"][1].decode().split()
        names = [os.path.basename(m) for m in modules]
        for m in ("virtio.ko", "virtio_pci.ko", "virtio_blk.ko", "virtio_net.ko", "jbd2.ko",
                  "ext4.ko", "button.ko", "evdev.ko"):
            self.assertIn(m, names)
        self.assertLess(names.index("virtio_ring.ko"), names.index("virtio_blk.ko"))
        self.assertLess(names.index("jbd2.ko"), names.index("ext4.ko"))
        for m in modules:
            self.assertTrue(files[f"lib/modules/{m}"][1].startswith(b"\x7fELF"), m)
        for cgi in ("www/cgi-bin/index.cgi", "www/cgi-bin/read", "www/cgi-bin/write"):
            self.assertTrue(files[cgi][0] & 0o111)
        # Built once: a second build reuses the cached files.
        before = os.stat(img.initrd).st_mtime_ns
        again = image.build(self.cache)
        self.assertEqual(again, img)
        self.assertEqual(os.stat(img.initrd).st_mtime_ns, before)
        self.assertEqual([n for n in os.listdir(self.cache) if n.startswith(".")], [])

    def test_spec_and_cmdline(self):
        img = image.TestImage("/k", "/i")
        self.assertEqual(img.spec(), {"kernel": "/k", "initrd": "/i", "disk": None,
                                      "cmdline": image.BASE_CMDLINE})
        self.assertEqual(image.volume_cmdline([("vda", "/data"), ("vdb", "/logs")]),
                         "zwrm.vol=vda:/data,vdb:/logs")
        self.assertEqual(image.volume_cmdline([]), "")
