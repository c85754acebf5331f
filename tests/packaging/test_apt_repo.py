"""
install.sh --apt-repo with --apt-key: a local APT repository (file:) signed with a test key
is installed from when the key is the one given, and refused (apt-get update fails, install.sh
says so) when the repository is signed with another key.  The source line names the key with
signed-by= and never says trusted=yes.

apt's configuration and lists are the test's own: the commands run in a host of
zwrm.testing.netns with C{/etc/apt} (a copy without the machine's sources) and
C{/var/lib/apt/lists} bind-mounted, so the machine's APT sources are never changed.
The packages may be installed into the machine: like InstalledTests, this runs as root under
CI or with ZWRM_TEST_INSTALL=1.
"""

import glob
import hashlib
import os
import shutil
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.packaging.test_debs import _require_install, debs_dir
from zwrm.testing.netns import TestNetwork

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gpg(home, *args, **kw):
    return subprocess.run(["gpg", "--homedir", home, "--batch", "--quiet", *args],
                          check=True, capture_output=True, **kw).stdout


def _make_key(home, uid):
    os.makedirs(home, mode=0o700)
    _gpg(home, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
    return _gpg(home, "--armor", "--export", uid)


def _make_repo(path, debs, gpg_home, uid):
    """A flat-enough APT repository: pool/ and dists/bookworm/{InRelease,main/binary-amd64}."""
    os.makedirs(os.path.join(path, "pool"))
    for deb in debs:
        shutil.copy(deb, os.path.join(path, "pool"))
    index_dir = os.path.join(path, "dists", "bookworm", "main", "binary-amd64")
    os.makedirs(index_dir)
    packages = subprocess.run(["dpkg-scanpackages", "--multiversion", "pool"], cwd=path,
                              check=True, capture_output=True).stdout
    with open(os.path.join(index_dir, "Packages"), "wb") as f:
        f.write(packages)
    release = (
        "Origin: zwrm-test\nLabel: zwrm-test\nSuite: bookworm\nCodename: bookworm\n"
        "Date: Thu, 01 Jan 2026 00:00:00 UTC\nArchitectures: amd64 all\nComponents: main\n"
        f"SHA256:\n {hashlib.sha256(packages).hexdigest()} {len(packages)}"
        " main/binary-amd64/Packages\n"
    )
    signed = _gpg(gpg_home, "--local-user", uid, "--clearsign", input=release.encode())
    with open(os.path.join(path, "dists", "bookworm", "InRelease"), "wb") as f:
        f.write(signed)


class AptRepoTests(SynchronousTestCase):
    def setUp(self):
        _require_install()
        self.tmp = tempfile.mkdtemp(prefix="zwrm-apt-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        debs = [glob.glob(os.path.join(debs_dir(), f"{p}_*.deb"))[0]
                for p in ("zwrm", "zwrm-control", "zwrm-agent")]
        self.key = os.path.join(self.tmp, "zwrm.asc")
        with open(self.key, "wb") as f:
            f.write(_make_key(os.path.join(self.tmp, "gpg-good"), "zwrm test <good@zwrm.test>"))
        _make_key(os.path.join(self.tmp, "gpg-other"), "someone else <other@zwrm.test>")
        self.good = os.path.join(self.tmp, "good")
        _make_repo(self.good, debs, os.path.join(self.tmp, "gpg-good"), "good@zwrm.test")
        self.other = os.path.join(self.tmp, "other")
        _make_repo(self.other, debs, os.path.join(self.tmp, "gpg-other"), "other@zwrm.test")
        # apt's own configuration, without the machine's sources
        etc_apt = os.path.join(self.tmp, "etc-apt")
        shutil.copytree("/etc/apt", etc_apt, symlinks=True)
        for f in glob.glob(os.path.join(etc_apt, "sources.list.d", "*")) + [
                os.path.join(etc_apt, "sources.list")]:
            if os.path.lexists(f):
                os.unlink(f)
        lists = os.path.join(self.tmp, "lists")
        os.makedirs(os.path.join(lists, "partial"))
        # as apt keeps them: partial/ belongs to its sandbox user, who also reads the repository
        shutil.chown(os.path.join(lists, "partial"), "_apt", "root")
        os.chmod(os.path.join(lists, "partial"), 0o700)
        os.chmod(self.tmp, 0o755)
        self.net = TestNetwork(["apt"], binds={"apt": {"/etc/apt": etc_apt,
                                                        "/var/lib/apt/lists": lists}})
        self.addCleanup(self.net.close)
        self.etc_apt = etc_apt

    def install(self, repo):
        return self.net.run("apt", ["bash", os.path.join(ROOT, "install.sh"), "--control-plane",
                                    f"--apt-repo=file://{repo}", f"--apt-key={self.key}",
                                    "--no-start"], check=False, timeout=600)

    def test_signed_repository(self):
        result = self.install(self.good)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        with open(os.path.join(self.etc_apt, "sources.list.d", "zwrm.list")) as f:
            line = f.read().strip()
        self.assertEqual(line, f"deb [signed-by=/etc/apt/keyrings/zwrm.asc] file://{self.good}"
                               " bookworm main")
        keyring = os.path.join(self.etc_apt, "keyrings", "zwrm.asc")
        with open(keyring, "rb") as f, open(self.key, "rb") as g:
            self.assertEqual(f.read(), g.read())
        self.assertEqual(os.stat(keyring).st_mode & 0o777, 0o644)
        policy = self.net.run("apt", ["apt-cache", "policy", "zwrm-control"]).stdout
        self.assertIn(f"file:{self.good}", policy)

    def test_repository_signed_with_another_key(self):
        result = self.install(self.other)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn(f"install.sh: apt-get update failed for file://{self.other}", result.stderr)
        self.assertNotIn("trusted=yes", open(
            os.path.join(self.etc_apt, "sources.list.d", "zwrm.list")).read())
