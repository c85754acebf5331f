"""
The executor's volume-move procedures (C{volume.receive}, C{volume.send},
C{volume.progress}, C{volume.cancel_receive}, C{volume.digest}) between two executors with
real volume stores and real TLS volume streams on loopback.
"""

import hashlib
import os
import shutil
import tempfile

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from zwrm import errors, pki
from zwrm.agent.blockmap import file_digest
from zwrm.agent.executor import Executor
from zwrm.agent.transfer import VolumeTransfers, mint_token
from zwrm.agent.volumes import VolumeStore
from zwrm.drivers.fake import FakeDriver, FakeHost

MiB = 1024 * 1024


class VolumeProcedureTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="zwrm-exv-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        ca = pki.CertificateAuthority.create()
        self.ex = {}
        for h in ("h-src", "h-dst"):
            cert, key = ca.issue_host(h, names=("127.0.0.1",))
            store = VolumeStore(reactor, os.path.join(self.dir, h, "vols"))
            tr = VolumeTransfers(reactor, store, pki.HostCredentials(ca.certificate_pem, cert, key),
                                 retries=1, backoff=(0.01, 0.01))
            yield tr.listen()
            self.addCleanup(tr.receiver.stopService)
            driver = FakeDriver(reactor, os.path.join(self.dir, h, "machines"),
                                host=FakeHost(powerdown_delay=0.01))
            ex = Executor(reactor, h, driver, store, lambda e: defer.succeed(None),
                          data_dir=os.path.join(self.dir, h), transfers=tr)
            self.addCleanup(ex.close)
            self.ex[h] = ex

    @defer.inlineCallbacks
    def test_receive_send_digest(self):
        src, dst = self.ex["h-src"], self.ex["h-dst"]
        yield src.create_volume("v-1", 8)
        path = src.volumes.path("v-1")
        with open(path, "r+b") as f:
            f.seek(3 * MiB)
            f.write(hashlib.sha256(b"x").digest() * 1000)
        size = src.volume_info("v-1")["size_bytes"]
        token = mint_token()
        where = dst.receive_volume(token, "v-1", size, source="h-src")
        self.assertEqual(where["host"], "127.0.0.1")
        result = yield src.send_volume("v-1", where["host"], where["port"], token, "h-dst",
                                       mode="bulk", commit=True)
        self.assertTrue(result["committed"])
        progress = src.volume_progress("v-1")
        self.assertTrue(progress["finished"])
        self.assertEqual(progress["total"], result["allocated"])
        theirs = yield dst.volume_digest("v-1")
        self.assertEqual(theirs, file_digest(path, name="blake3"))
        self.assertEqual(theirs, result["digest"])
        self.assertEqual((yield dst.volume_digest("v-1", "sha256")), file_digest(path))
        for bad in ("md5", None, ["blake3"]):
            e = self.assertRaises(errors.InvalidArgument, dst.volume_digest, "v-1", bad)
            self.assertIn("algorithm must be one of blake3, sha256", e.message)
        # never overwritten
        with self.assertRaises(errors.Conflict):
            dst.receive_volume(mint_token(), "v-1", size)

    @defer.inlineCallbacks
    def test_bulk_then_delta_and_cancel(self):
        src, dst = self.ex["h-src"], self.ex["h-dst"]
        yield src.create_volume("v-2", 8)
        size = src.volume_info("v-2")["size_bytes"]
        token = mint_token()
        where = dst.receive_volume(token, "v-2", size, source="h-src")
        yield src.send_volume("v-2", "127.0.0.1", where["port"], token, "h-dst",
                              mode="bulk", commit=False)
        self.assertFalse(dst.volumes.exists("v-2"))  # staged, not committed
        with open(src.volumes.path("v-2"), "r+b") as f:
            f.seek(5 * MiB)
            f.write(b"late" * 1000)
        r = yield src.send_volume("v-2", "127.0.0.1", where["port"], token, "h-dst",
                                  mode="delta", commit=True)
        self.assertTrue(r["committed"])
        self.assertLessEqual(r["sent"], 2 * MiB)
        self.assertEqual(
            (yield dst.volume_digest("v-2")), file_digest(src.volumes.path("v-2"), name="blake3")
        )
        # a cancelled receive leaves nothing
        yield src.create_volume("v-3", 4)
        t3 = mint_token()
        dst.receive_volume(t3, "v-3", src.volume_info("v-3")["size_bytes"])
        yield dst.cancel_receive(t3)
        self.assertFalse(dst.volumes.exists("v-3"))
        with self.assertRaises(errors.NotFound):
            yield dst.cancel_receive(t3)

    def test_errors(self):
        src = self.ex["h-src"]
        self.assertRaises(errors.NotFound, src.volume_progress, "v-9")
        self.assertRaises(errors.NotFound, src.volume_digest, "v-9")
        self.assertRaises(errors.InvalidArgument, src.receive_volume, mint_token(), "v-9", 0)
        self.assertRaises(errors.InvalidArgument, src.send_volume, "v-9", "127.0.0.1", 1,
                          "t", "h-dst", mode="sideways")
        bare = Executor(reactor, "h-x", FakeDriver(reactor, os.path.join(self.dir, "x")),
                        src.volumes, lambda e: None, data_dir=os.path.join(self.dir, "x"))
        self.addCleanup(bare.close)
        e = self.assertRaises(errors.Unavailable, bare.receive_volume, mint_token(), "v-9", 10)
        self.assertIn("host certificate", e.message)
