"""
Deploy-to-healthy of a real Debian 12 cloud image, beside the same QEMU command line run by
hand; and the bytes an image takes in an agent's cache beside its allocated bytes.

    .venv/bin/python benchmarks/boot.py [--runs 1] [--form kernel|uefi] [--cache-dir DIR]

1. A real control plane and one agent (QEMU under TCG; L{zwrm.testing.processes}); the Debian
   image (L{zwrm.testing.debian}, built once and cached by its recipe's hash) is pushed as
   C{deb:12} (kernel + initrd + qcow2 disk) and as C{deb-uefi:12} (the disk alone, C{--firmware
   uefi}; deployed instead with C{--form uefi}). Then, C{--runs} times, alternating:

   - B{zwrm}: C{zwrm deploy bN --image deb:12 --volume data:64:/data --port 8080
     --health-http / --wait ...}: timed from the command until it returns with the machine
     running and its health check passing (the image is already in the agent's cache after
     the first run; the first run is reported apart, as the cold one). The QEMU command line
     the agent ran for the cold deploy is read from C{/proc/<pid>/cmdline}, and its seed kept.
   - B{baseline}: that command line by hand: the same QEMU arguments, with a fresh root
     overlay over the same cached base, a fresh 64 MiB ext4 volume, a copy of the seed, its
     own port; timed from the spawn until C{GET /} on the forwarded port answers 200.

   Which goes first alternates (zwrm in odd runs, by hand in even ones), so a load that
   changes during the benchmark favours neither. The medians are printed with their ratio
   (goal: at most 1.1x).

2. Cache bytes: the image is also pushed as a sparse raw disk (C{deb-raw:12}); for each form
   the blocks the agent's cache allocates for the image's blobs (C{st_blocks * 512}) are
   compared with the blocks the source files allocate (goal: at most 1.05x).
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Cleanups:
    def __init__(self):
        self.fns = []

    def addCleanup(self, f, *a):
        self.fns.append((f, a))

    async def run(self):
        from twisted.internet.defer import maybeDeferred

        for f, a in reversed(self.fns):
            try:
                await maybeDeferred(f, *a)
            except Exception as e:
                print(f"cleanup: {e}", file=sys.stderr)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def allocated(path):
    return os.stat(path).st_blocks * 512


async def http_ok(reactor, port):
    import treq

    try:
        r = await treq.get(f"http://127.0.0.1:{port}/", timeout=2)
        await r.content()
        return r.code == 200
    except Exception:
        return False


async def by_hand(reactor, argv, machine_dir, seed_src, base, work, timeout):
    """Run the agent's QEMU command line by hand on fresh copies; @return: seconds to 200."""
    from zwrm.testing.processes import poll

    os.makedirs(work)
    overlay = os.path.join(work, "root.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base,
                    overlay], check=True)
    vol = os.path.join(work, "vol.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", vol, "64M"], check=True, stdout=subprocess.DEVNULL)
    seed = os.path.join(work, "seed.iso")
    shutil.copyfile(seed_src, seed)
    if any("efivars.fd" in a for a in argv):
        # A UEFI machine: its own fresh variable store, as the agent gives a new machine.
        from zwrm.drivers import qemu

        shutil.copyfile(qemu.OVMF_VARS, os.path.join(work, qemu.EFI_VARS))
    port = free_port()
    out = []
    for a in argv:
        a = a.replace(os.path.join(machine_dir, "root.qcow2"), overlay)
        a = a.replace(os.path.join(machine_dir, "seed.iso"), seed)
        a = a.replace(machine_dir, work)
        if a.startswith("file=") and "id=vol0" in a:
            a = f"file={vol}," + a.split(",", 1)[1]
        if "hostfwd=tcp:127.0.0.1:" in a:
            head, _, rest = a.partition("hostfwd=tcp:127.0.0.1:")
            a = head + f"hostfwd=tcp:127.0.0.1:{port}" + rest[rest.index("-"):]
        out.append(a)
    t0 = time.monotonic()
    proc = subprocess.Popen(out, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(work, "qemu.log"), "wb"), cwd=work)
    try:
        await poll(reactor, lambda: http_ok(reactor, port), timeout, interval=0.5,
                   what="the hand-run VM's HTTP service")
        return time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()


def _digest(path):
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return "sha256:" + h.hexdigest()


async def cache_bytes(reactor, cp, img, raw, work):
    """Pull both forms into an agent's image cache (as agents do) and compare allocations."""
    from zwrm.agent.images import ImageCache
    from zwrm.registry.client import registry_url

    cache = ImageCache(reactor, os.path.join(work, "cache"), registry_url(cp.url),
                       cp.operator_token, limit_bytes=8 << 30)
    print("cache bytes per image (allocated blocks) against the image's allocated bytes:")
    try:
        for label, ref, disk in (("qcow2", "deb:12", img.disk), ("sparse raw", "deb-raw:12", raw)):
            out = await cache.resolve(ref)
            files = [img.kernel, img.initrd, disk]
            src = sum(allocated(p) for p in files)
            got = sum(allocated(cache.path(_digest(p))) for p in files)
            apparent = sum(os.path.getsize(p) for p in files)
            assert out["disk_format"] == ("qcow2" if label == "qcow2" else "raw")
            print(f"  {label:10s}: cache {got / 2**20:8.1f} MiB, source {src / 2**20:8.1f} MiB "
                  f"(apparent {apparent / 2**20:.0f} MiB): {got / src:.3f}x (goal <= 1.05x)",
                  flush=True)
    finally:
        await cache.close()


async def bench(reactor, args):
    from twisted.internet.threads import deferToThread

    from zwrm.testing import debian
    from zwrm.testing.processes import run_cli, start_vm_cluster

    print("building (or taking from the cache) the Debian image ...", flush=True)
    img = await deferToThread(debian.build, args.cache_dir)
    work = tempfile.mkdtemp(prefix="zwrm-boot-", dir=args.dir)
    cleanups = _Cleanups()
    cleanups.addCleanup(shutil.rmtree, work, True)
    try:
        cp, [agent] = await start_vm_cluster(reactor, cleanups, agents=1)

        async def cli(*a, timeout=1500):
            code, out, err = await run_cli(reactor, list(a), cp.url, cp.operator_token,
                                           timeout=timeout)
            if code != 0:
                raise RuntimeError(f"zwrm {' '.join(a)}: {err.strip()}")
            return out

        raw = os.path.join(work, "disk.raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", img.disk, raw], check=True)
        for ref, disk in (("deb:12", img.disk), ("deb-raw:12", raw)):
            await cli("images", "push", ref, "--kernel", img.kernel, "--initrd", img.initrd,
                      "--disk", disk, "--cmdline", img.cmdline, "--port", "8080", "-q")
        # The same disk alone, booted by OVMF and systemd-boot from its EFI system partition.
        await cli("images", "push", "deb-uefi:12", "--disk", img.disk, "--firmware", "uefi",
                  "--port", "8080", "-q")
        ref = "deb-uefi:12" if args.form == "uefi" else "deb:12"
        zwrm_s, hand_s = [], []

        async def deploy(run):
            app = f"b{run}"
            await cli("apps", "create", app)
            t0 = time.monotonic()
            out = await cli("deploy", app, "--image", ref, "--memory", "512", "--port",
                            "8080", "--health-http", "/", "--health-interval", "1",
                            "--health-grace", "1200", "--volume", "data:64:/data",
                            "--wait", "1400", "--json")
            took = time.monotonic() - t0
            [m] = json.loads(out)["machines"]
            mdir = os.path.join(agent.data_dir, "machines", m["id"])
            with open(os.path.join(mdir, "qemu.pid")) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode() for a in f.read().split(b"\0") if a]
            with open(os.path.join(mdir, "root.base.json")) as f:
                base = json.load(f)["base"]
            keep = os.path.join(work, f"m{run}")
            os.makedirs(keep)
            shutil.copyfile(os.path.join(mdir, "seed.iso"), os.path.join(keep, "seed.iso"))
            await cli("destroy", app, "--volumes", timeout=300)
            return took, (argv, mdir, os.path.join(keep, "seed.iso"), base)

        if args.cache_only:
            await cache_bytes(reactor, cp, img, raw, work)
            return
        cold, captured = await deploy(0)
        print(f"cold deploy (pulls the image): {cold:.1f} s", flush=True)
        # The by-hand runs boot the command line the agent ran for the cold deploy. The order
        # alternates (zwrm first in odd runs, by hand first in even ones), so a load that
        # rises or falls during the benchmark favours neither side.
        for run in range(1, args.runs + 1):
            hand_dir = os.path.join(work, f"hand{run}")
            if run % 2:
                took, _ = await deploy(run)
                hand = await by_hand(reactor, *captured, hand_dir, 1400)
            else:
                hand = await by_hand(reactor, *captured, hand_dir, 1400)
                took, _ = await deploy(run)
            zwrm_s.append(took)
            hand_s.append(hand)
            print(f"run {run}: zwrm deploy -> healthy {took:.1f} s; by hand -> HTTP 200 "
                  f"{hand:.1f} s ({'zwrm' if run % 2 else 'by hand'} first)", flush=True)
        z, h = statistics.median(zwrm_s), statistics.median(hand_s)
        print()
        print(f"Debian 12 cloud image ({args.form} form) under TCG, median of {args.runs}:")
        print(f"  zwrm deploy --wait (cached image, volume, cloud-init seed) -> healthy: {z:6.1f} s")
        print(f"  baseline: the same QEMU command line by hand -> GET / 200:             {h:6.1f} s")
        print(f"  ratio: {z / h:.2f}x (goal <= 1.1x); cold first deploy {cold:.1f} s")
        print()
        await cache_bytes(reactor, cp, img, raw, work)
    finally:
        await cleanups.run()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--cache-dir", default="/var/cache/zwrm-ci/images")
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--form", choices=("kernel", "uefi"), default="kernel",
                        help="deploy kernel + initrd + disk (deb:12), or the disk alone "
                             "under UEFI (deb-uefi:12)")
    parser.add_argument("--cache-only", action="store_true",
                        help="only part 2 (cache bytes), no deploys")
    args = parser.parse_args()
    from twisted.internet import defer, task

    task.react(lambda reactor: defer.ensureDeferred(bench(reactor, args)))


if __name__ == "__main__":
    main()
