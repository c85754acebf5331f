"""
The pause of a VM moved live between two hosts' agents, against a cold stop/copy/start of
the same VM, in the same run.

    .venv/bin/python benchmarks/live_migration.py [--runs 2] [--volume-mb 256] [--data-mb 64]

Two agents' live-migration procedures (L{zwrm.agent.live.LiveMigrations}) in this process,
each with its own QEMU driver (TCG) and volume store, TLS between the QEMUs with host
certificates from one cluster CA, on loopback. The test image (L{zwrm.testing.image}) with
one volume of C{--volume-mb} MiB holding C{--data-mb} MiB of random data. A client sends a
GET every 20 ms to each host's forwarded port (user-mode networking: the ports differ; a
missing static file, which the guest's httpd answers with 404 without forking), each request
on its own (a paused host holds its requests; at most 3 in flight per port); the longest
time between two answers is the client-observed gap. Each run:

 - B{live} (A -> B): C{live.prepare} on B, C{live.migrate} on A (mirror capped at 100 MiB/s,
   downtime limit 300 ms); figures: the pause QEMU reports (C{downtime}), the
   client-observed gap, the total time (prepare to resumed), the verification of the volume
   (C{live.hashes} + C{live.verify}) with BLAKE3 as a drain makes it and, as the baseline in
   the same run, with SHA-256 (an agent of the version before): wall time and CPU time of
   both agents; the source is then destroyed.
 - B{cold} (B -> A): stop the VM (ACPI power-down), copy its volume to A (C{cp
   --sparse=always}), start it on A; the downtime is from the stop to the first answer on
   A; the total the same (nothing is copied while it runs: the naive baseline; zwrm's cold
   drain copies in bulk first and stops only for the delta, see benchmarks/drain.py).

Goal (issue 18): pause <= 300 ms, client-observed gap <= 1 s, total time <= the cold move's.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import treq
from twisted.internet import defer, task

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from zwrm.agent.live import LiveMigrations  # noqa: E402
from zwrm.agent.volumes import VolumeStore  # noqa: E402
from zwrm.drivers.qemu import QemuDriver  # noqa: E402
from zwrm.pki import HostCredentials  # noqa: E402
from zwrm.pki.ca import CertificateAuthority  # noqa: E402
from zwrm.testing import image  # noqa: E402
from zwrm.testing.drains import Probe, fill_volume  # noqa: E402
from zwrm.testing.processes import free_port  # noqa: E402

MiB = 1024 * 1024


def spec(memory_mb, volumes, port):
    img = image.build()
    return {"kernel": img.kernel, "initrd": img.initrd, "disk": None,
            "cmdline": f"{img.cmdline} zwrm.vol=v1:/data", "vcpus": 1,
            "memory_mb": memory_mb, "volumes": volumes,
            "forwards": [{"guest": 8080, "host": port}]}


async def wait_ready(reactor, drv, mid, timeout=180):
    for _ in range(int(timeout * 10)):
        if image.READY_LINE in await drv.console(mid):
            return
        await task.deferLater(reactor, 0.1, lambda: None)
    raise RuntimeError(f"{mid} never became ready")


async def wait_http(reactor, port, timeout=180):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            r = await treq.get(f"http://127.0.0.1:{port}/").addTimeout(1, reactor)
            await r.content()
            if r.code == 200:
                return time.monotonic()
        except Exception:
            pass
        await task.deferLater(reactor, 0.02, lambda: None)
    raise RuntimeError(f"nothing answered on port {port}")


async def main(reactor, runs, volume_mb, data_mb, memory_mb):
    image.build()
    root = tempfile.mkdtemp(prefix="zwrm-bench-live-", dir="/tmp")
    ca = CertificateAuthority.create()
    agents = {}
    for h in ("host-a", "host-b"):
        drv = QemuDriver(reactor, os.path.join(root, h, "machines"), accel="tcg",
                         stop_timeout=30.0)
        cert, key = ca.issue_host(h)
        creds = HostCredentials(ca.certificate_pem, cert, key)
        vols = VolumeStore(reactor, os.path.join(root, h, "volumes"))
        agents[h] = LiveMigrations(reactor, h, drv, vols, lambda c=creds: c, lambda: "127.0.0.1")
    a, b = agents["host-a"], agents["host-b"]
    live, cold = [], []
    try:
        fill_volume(a.volumes.path("v1"), data_mb, size_mb=volume_mb)
        port = free_port()
        await a.driver.start(dict(spec(memory_mb, [{"id": "v1", "path": a.volumes.path("v1")}],
                                       port), id="m1"))
        await wait_ready(reactor, a.driver, "m1")
        # A live move keeps the machine's id; a cold one starts a new machine (as a drain's
        # replacement): a source whose live migration completed refuses another of that id.
        mid = "m1"
        src, dst = a, b
        for run in range(runs):
            # -- live: src -> dst --
            dst_port = free_port()
            probe = Probe(reactor, [port, dst_port])
            probing = defer.Deferred.fromCoroutine(probe.run())
            await task.deferLater(reactor, 0.5, lambda: None)
            t0 = time.monotonic()
            desc = src.describe(mid)
            where = await dst.prepare(mid, spec(memory_mb, [{"id": "v1"}], dst_port),
                                      desc["volumes"], src.host_id)
            result = await src.migrate(mid, dst.host_id, where,
                                       {"mirror_speed": 100 * MiB, "downtime_limit_ms": 300})
            while dst.target_state(mid) != "resumed":
                await task.deferLater(reactor, 0.01, lambda: None)
            total = time.monotonic() - t0
            await task.deferLater(reactor, 1.0, lambda: None)
            probe.stopped = True
            await probing
            # The verification as a drain makes it (BLAKE3), then as with an agent of the
            # version before (SHA-256): wall time and this process's CPU (both agents' hashing)
            timed = {}
            for name in ("blake3", "sha256"):
                w0, c0 = time.monotonic(), time.process_time()
                verified = await dst.verify(mid, "v1", await src.hashes("v1", 0, None, name))
                timed[name] = (time.monotonic() - w0, time.process_time() - c0)
                if not verified["ok"]:
                    break
            live.append({"pause_ms": result["downtime_ms"], "gap": probe.gap(), "total": total,
                         "mirror": result["mirror_seconds"], "verified": verified["ok"],
                         "verify": timed})
            print(f"run {run + 1} live {src.host_id} -> {dst.host_id}: QEMU pause "
                  f"{result['downtime_ms']} ms, client gap {probe.gap():.3f} s, total "
                  f"{total:.2f} s (mirror {result['mirror_seconds']:.2f} s), RAM passes "
                  f"{result['ram']['passes']}, verified {verified['ok']} "
                  f"({verified['dirty_blocks']} dirty blocks) in "
                  + ", ".join(f"{w:.3f} s ({c:.3f} CPU-s) with {n}" for n, (w, c) in timed.items()),
                  flush=True)
            await src.driver.destroy(mid)
            src.volumes.release("v1", mid)
            await src.volumes.delete("v1")
            port = dst_port
            # -- cold: dst -> src (stop, copy, start) --
            new_port = free_port()
            probe = Probe(reactor, [port, new_port])
            probing = defer.Deferred.fromCoroutine(probe.run())
            await task.deferLater(reactor, 0.5, lambda: None)
            t0 = time.monotonic()
            await dst.driver.stop(mid)
            await reactor_thread_copy(reactor, dst.volumes.path("v1"), src.volumes.path("v1"))
            await dst.driver.destroy(mid)
            dst.volumes.release("v1", mid)
            await dst.volumes.delete("v1")
            await src.driver.start(dict(spec(memory_mb, [{"id": "v1",
                                                          "path": src.volumes.path("v1")}],
                                             new_port), id=f"m{run + 2}"))
            mid = f"m{run + 2}"
            t1 = await wait_http(reactor, new_port)
            probe.stopped = True
            await probing
            cold.append({"downtime": t1 - t0, "gap": probe.gap()})
            print(f"run {run + 1} cold {dst.host_id} -> {src.host_id}: downtime "
                  f"{t1 - t0:.2f} s (client gap {probe.gap():.2f} s)", flush=True)
            port = new_port
            await wait_ready(reactor, src.driver, mid)
        med = statistics.median
        print(f"\nlive: QEMU pause median {med(r['pause_ms'] for r in live)} ms "
              f"(max {max(r['pause_ms'] for r in live)}), client gap median "
              f"{med(r['gap'] for r in live):.3f} s (max {max(r['gap'] for r in live):.3f}), "
              f"total median {med(r['total'] for r in live):.2f} s; all verified: "
              f"{all(r['verified'] for r in live)}")
        for name in ("blake3", "sha256"):
            ws = [r["verify"][name][0] for r in live if name in r["verify"]]
            cs = [r["verify"][name][1] for r in live if name in r["verify"]]
            if ws:
                print(f"verification with {name}: median {med(ws):.3f} s, {med(cs):.3f} CPU-s "
                      f"({med(cs) / (data_mb / 1024):.2f} CPU-s per GiB of data, both agents)")
        print(f"cold: downtime (= total) median {med(r['downtime'] for r in cold):.2f} s")
        print(f"volume {volume_mb} MiB with {data_mb} MiB of data, guest {memory_mb} MiB, "
              f"load {os.getloadavg()[0]:.2f}")
    finally:
        for h in agents.values():
            for mid in h.driver.list():
                await h.driver.destroy(mid)
        shutil.rmtree(root, ignore_errors=True)


def reactor_thread_copy(reactor, src, dst):
    from twisted.internet.threads import deferToThread

    return deferToThread(subprocess.run, ["cp", "--sparse=always", src, dst], check=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--volume-mb", type=int, default=256)
    parser.add_argument("--data-mb", type=int, default=64)
    parser.add_argument("--memory-mb", type=int, default=256)
    args = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(
        main(reactor, args.runs, args.volume_mb, args.data_mb, args.memory_mb)))
