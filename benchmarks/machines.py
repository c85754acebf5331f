"""
Machine start to healthy, and stop, through the executor and the QEMU driver (TCG), beside a
baseline from the same run.

    .venv/bin/python benchmarks/machines.py [--runs 3]

Each run, alternating:

 - B{zwrm}: an L{zwrm.agent.executor.Executor} with the QEMU driver (accel tcg) and a real
   volume store starts a machine of the test image (L{zwrm.testing.image}) with a 16 MiB
   volume and an HTTP health check (interval 0.2 s); timed from the C{machine.start} call
   until the health is C{passing}. Then C{machine.stop} (ACPI power-down) is timed until the
   machine is stopped.
 - B{baseline}: the same kernel, initramfs and a same-size volume (made with mkfs.ext4 by
   hand) started with the plain command line from the notes (C{qemu-system-x86_64 -accel tcg
   ...}) by C{subprocess.Popen}; timed until C{GET /} on the forwarded port answers 200
   (polled every 0.2 s); then the process is killed.

The medians of both and their ratio are printed. The executor adds QMP, the health check and
volume creation; the guest's boot dominates both.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from twisted.internet import defer, task
from twisted.internet.defer import succeed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from zwrm.agent.executor import (
    Executor,  # noqa: E402
    free_port,  # noqa: E402
)
from zwrm.agent.volumes import VolumeStore  # noqa: E402
from zwrm.drivers.qemu import QemuDriver  # noqa: E402
from zwrm.testing import image  # noqa: E402


async def sleep(reactor, seconds):
    await task.deferLater(reactor, seconds, lambda: None)


async def zwrm_run(reactor, img, tmp, n):
    ex = Executor(reactor, "bench", QemuDriver(reactor, os.path.join(tmp, "machines"),
                                               accel="tcg", stop_timeout=30),
                  VolumeStore(reactor, os.path.join(tmp, "volumes")), lambda e: succeed(None),
                  data_dir=tmp)
    mid = f"bench{n}"
    spec = {"id": mid, "image": img.spec(), "vcpus": 1, "memory_mb": 256,
            "volumes": [{"id": f"{mid}-v", "mount": "/data", "size_mb": 16}],
            "service_port": 8080,
            "health": {"type": "http", "interval": 0.2, "timeout": 2, "grace": 300}}
    t0 = time.monotonic()
    await ex.start_machine(spec)
    while ex.machine_status(mid)["health"] != "passing":
        if time.monotonic() - t0 > 300:
            raise SystemExit("the zwrm machine did not become healthy in 300 s")
        await sleep(reactor, 0.05)
    healthy = time.monotonic() - t0
    t1 = time.monotonic()
    await ex.stop_machine(mid)
    stopped = time.monotonic() - t1
    await ex.destroy_machine(mid)
    await ex.volumes.delete(f"{mid}-v")
    ex.close()
    return healthy, stopped


def baseline_run(img, tmp):
    vol = os.path.join(tmp, "baseline.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", vol, "16M"], check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-kernel", img.kernel, "-initrd",
         img.initrd, "-append", img.cmdline + " zwrm.vol=vda:/data",
         "-drive", f"file={vol},format=raw,if=virtio",
         "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:8080",
         "-device", "virtio-net-pci,netdev=n0", "-serial", "null", "-display", "none"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > 300:
                raise SystemExit("the baseline machine did not answer in 300 s")
            time.sleep(0.2)
        return time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
        os.unlink(vol)


async def main(reactor, args):
    img = image.build()
    tmp = tempfile.mkdtemp(prefix="zwrm-bm-", dir="/tmp")
    ours, stops, base = [], [], []
    try:
        for n in range(args.runs):
            healthy, stopped = await zwrm_run(reactor, img, tmp, n)
            ours.append(healthy)
            stops.append(stopped)
            # The baseline blocks this process (it is not zwrm): fine, nothing else runs.
            base.append(baseline_run(img, tmp))
            print(f"run {n + 1}: zwrm start->healthy {healthy:.2f} s, stop {stopped:.2f} s; "
                  f"baseline start->HTTP 200 {base[-1]:.2f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m_ours, m_base = statistics.median(ours), statistics.median(base)
    print(f"median zwrm start->healthy: {m_ours:.2f} s")
    print(f"median baseline start->HTTP 200: {m_base:.2f} s")
    print(f"ratio zwrm/baseline: {m_ours / m_base:.2f}")
    print(f"median zwrm stop (ACPI power-down until stopped): {statistics.median(stops):.2f} s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, args)))
