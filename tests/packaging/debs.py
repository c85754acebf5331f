"""
The .deb files for the packaging and acceptance tests, built once per source tree.

L{debs_dir} returns a directory holding C{zwrm_*.deb}, C{zwrm-control_*.deb} and
C{zwrm-agent_*.deb}:

 - C{$ZWRM_DEBS}, when set (a directory CI built with scripts/build-debs);
 - else C{<cache>/<hash>/}, where C{<cache>} is C{$ZWRM_DEB_CACHE} or
   C{/var/cache/zwrm-ci/debs} and C{<hash>} the SHA-256 of the files scripts/build-debs
   packs (tracked and new, not ignored), leaving out C{tests/}, C{benchmarks/} and
   C{newsfragments/}, which are not packaged.  A missing entry is built with
   scripts/build-debs (under a lock, so parallel test processes build it once) and moved
   into place whole; the three newest entries are kept.  Found once per process.
"""

import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("zwrm", "zwrm-control", "zwrm-agent")
NOT_PACKAGED = ("tests/", "benchmarks/", "newsfragments/")
KEEP = 3


class BuildFailed(AssertionError):
    """scripts/build-debs failed; the message holds the end of its output."""


def source_hash(root=ROOT):
    """The SHA-256 (hex) of the packaged sources: paths, executable bits and contents."""
    out = subprocess.run(
        ["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout
    h = hashlib.sha256()
    for name in sorted(set(out.decode().split("\0")) - {""}):
        path = os.path.join(root, name)
        if name.startswith(NOT_PACKAGED) or not os.path.isfile(path):
            continue
        h.update(name.encode() + b"\0" + (b"x" if os.access(path, os.X_OK) else b"-"))
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _complete(directory):
    return all(glob.glob(os.path.join(directory, f"{p}_*.deb")) for p in PACKAGES)


_memo = {}


def debs_dir(timeout=1800):
    """
    The directory of the three .deb files, building them if this source tree has none.
    Found once per process: a tree edited during the run does not build again.
    """
    if "dir" not in _memo:
        _memo["dir"] = _debs_dir(timeout)
    return _memo["dir"]


def _debs_dir(timeout):
    given = os.environ.get("ZWRM_DEBS")
    if given:
        if not _complete(given):
            raise AssertionError(f"$ZWRM_DEBS={given} lacks one of {PACKAGES}")
        return given
    cache = os.environ.get("ZWRM_DEB_CACHE", "/var/cache/zwrm-ci/debs")
    os.makedirs(cache, exist_ok=True)
    target = os.path.join(cache, source_hash())
    with open(os.path.join(cache, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(target):
            os.utime(target)
            return target
        work = tempfile.mkdtemp(prefix=".build-", dir=cache)
        try:
            result = subprocess.run(
                [os.path.join(ROOT, "scripts", "build-debs"), work],
                capture_output=True, text=True, timeout=timeout, check=False,
            )
            if result.returncode != 0 or not _complete(work):
                raise BuildFailed(
                    f"scripts/build-debs failed ({result.returncode}):\n"
                    f"{(result.stdout + result.stderr)[-4000:]}"
                )
            shutil.rmtree(target, ignore_errors=True)
            os.chmod(work, 0o755)  # apt's _apt user reads the files
            os.rename(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _prune(cache)
        return target


def _prune(cache):
    entries = [os.path.join(cache, n) for n in os.listdir(cache) if not n.startswith(".")]
    entries.sort(key=os.path.getmtime, reverse=True)
    for old in entries[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)


def deb(package):
    """The path of C{package}'s .deb file."""
    [path] = glob.glob(os.path.join(debs_dir(), f"{package}_*.deb"))
    return path
