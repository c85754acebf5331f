"""
Volume snapshots and restores, beside copying the image by hand, measured in the same run.

    .venv/bin/python benchmarks/snapshots.py [--size-gib 4] [--data-gib 1] [--runs 3]

Builds a sparse ext4 image (C{mkfs.ext4 -d}) of C{--size-gib} GiB holding C{--data-gib} GiB of
random files in a L{VolumeStore}, then, C{--runs} times each, interleaved:

 - B{snapshot at rest}: L{VolumeStore.snapshot} (C{cp --sparse=always --reflink=auto}, the copy
   fsynced, then both files hashed block by block (BLAKE3) to verify it, renamed, the
   directory fsynced);
 - B{snapshot, running}: the same volume attached to a running QEMU machine (TCG, the test
   image's guest, idle), copied through the QEMU driver's C{blockdev-backup} job
   (L{zwrm.drivers.backup}) into the store's snapshot directory;
 - B{restore}: L{VolumeStore.restore} of the first snapshot (copied, fsynced, verified against
   the snapshot, renamed into place, the volume's data kept as another snapshot);
 - B{by hand} (the baseline): C{cp --sparse=always} of the image and C{sync} of the copy, what
   an operator copying a stopped VM's disk does, without verification.

All in allocated bytes of the image per second (its C{st_blocks}), medians of the runs, with
the allocated size of each kind of copy (a copy that fills the holes would show here). On a
file system with reflinks (XFS, Btrfs) C{cp --reflink=auto} shares the blocks and the copy at
rest is near-instant; this machine's is ext4 (no reflinks), so every byte is copied.

Everything is made in a temporary directory (C{--dir}, default under /var/tmp) and removed.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import defer, task  # noqa: E402

from zwrm.agent.volumes import VolumeStore  # noqa: E402
from zwrm.drivers.qemu import QemuDriver  # noqa: E402
from zwrm.testing import image as test_image  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from volumes import build_image  # noqa: E402  (benchmarks/volumes.py's image)

GiB = 1 << 30
MiB = 1 << 20


def allocated(path):
    return os.stat(path).st_blocks * 512


def drop_caches():
    """Each copy starts from the disk, not from the page cache another one filled."""
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def by_hand(src, dst):
    start = time.monotonic()
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    subprocess.run(["sync", dst], check=True)
    return time.monotonic() - start


async def timed(d):
    start = time.monotonic()
    await d
    return time.monotonic() - start


async def main(reactor, argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=4.0)
    p.add_argument("--data-gib", type=float, default=1.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default="/var/tmp")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="zwrm-bench-snapshots-", dir=args.dir)
    driver = None
    try:
        store = VolumeStore(reactor, os.path.join(work, "volumes"), reserve_mb=0)
        vid = "v-bench"
        os.rename(build_image(work, args.size_gib, args.data_gib), store.path(vid))
        os.chmod(store.path(vid), 0o600)
        data = allocated(store.path(vid))
        print(f"volume: {args.size_gib:g} GiB, {data / MiB:.0f} MiB allocated; "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")

        img = test_image.build()
        driver = QemuDriver(reactor, os.path.join(work, "machines"), accel="tcg")
        spec = {"id": "bench", "kernel": img.kernel, "initrd": img.initrd, "disk": None,
                "cmdline": img.cmdline, "vcpus": 1, "memory_mb": 128, "forwards": [],
                "volumes": [{"id": vid, "path": store.path(vid)}]}
        times = {"at rest": [], "running": [], "restore": [], "by hand": []}
        sizes = {}
        n = 0
        for run in range(args.runs):
            # at rest, and by hand, with no machine
            drop_caches()
            n += 1
            times["at rest"].append(await timed(store.snapshot(vid, f"s{n}")))
            sizes["at rest"] = allocated(store.snapshot_info(vid, f"s{n}")["path"])
            drop_caches()
            hand = os.path.join(work, f"hand-{run}.img")
            times["by hand"].append(by_hand(store.path(vid), hand))
            sizes["by hand"] = allocated(hand)
            os.unlink(hand)
            drop_caches()
            n += 1
            times["restore"].append(await timed(store.restore(vid, "s1", f"s{n}")))
            sizes["restore"] = allocated(store.path(vid))
            # running: the volume attached to a booted machine
            await driver.start(spec)
            drop_caches()
            n += 1
            target = f"s{n}"

            def backup(path):
                return driver.backup_volume("bench", vid, path)

            store.claim(vid, "bench")
            t = await timed(store.snapshot(vid, target, backup=backup))
            times["running"].append(t)
            sizes["running"] = allocated(store.snapshot_info(vid, target)["path"])
            await driver.stop("bench", timeout=30)
            await driver.destroy("bench")
            store.release(vid, "bench")
            for s in store.snapshots(vid):
                if s["id"] != "s1":
                    await store.delete_snapshot(vid, s["id"])
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))

        base = statistics.median(times["by hand"])
        print(f"\n{'':20} {'median s':>9} {'MiB/s':>8} {'x by hand':>10} {'copy MiB':>9}")
        for kind, ts in times.items():
            med = statistics.median(ts)
            print(f"{kind:20} {med:9.2f} {data / MiB / med:8.0f} {base / med:10.2f} "
                  f"{sizes[kind] / MiB:9.0f}")
        print(f"\nload after: {os.getloadavg()[0]:.2f}")
    finally:
        if driver is not None:
            for mid in driver.list():
                await driver.destroy(mid)
        shutil.rmtree(work, True)


if __name__ == "__main__":
    task.react(lambda r: defer.ensureDeferred(main(r, sys.argv[1:])))
