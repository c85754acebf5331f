"""
Downtime of a VM moved by a host drain, beside the raw boot-to-healthy time of the same image
on the same cluster, in the same run.

    .venv/bin/python benchmarks/drain.py [--runs 2]

A real C{zwrm-control} and two C{zwrm-agent} processes on loopback (QEMU, TCG), the test
image (L{zwrm.testing.image}) pushed and warmed on both hosts, one app with a 16 MiB volume and
an HTTP health check (interval 0.2 s). Each run, alternating:

 - B{baseline} (raw boot-to-healthy): C{zwrm scale app 0}, then C{zwrm scale app 1} (the volume
   pins it to the host it is on, the image is cached there); timed from the scale call until
   C{zwrm status} shows the machine running with health C{passing} (polled every 0.2 s).
 - B{drain}: C{zwrm host drain <its host> --min-healthy 1s --poll 0.2s}; the downtime is the
   one the control plane records: from the stop of the original (ACPI power-down) to the
   replacement's first passing health check (checked every 0.2 s). It includes the delta
   copy, the target's verification and commit, and the replacement's boot. Then the host is
   activated again, so the next run drains the other way.

Goal (issue 7): the downtime within 1.2x the raw boot-to-healthy time.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from twisted.internet import defer, task

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from zwrm.testing import image  # noqa: E402
from zwrm.testing.processes import (  # noqa: E402
    AgentProcess,
    ControlPlaneProcess,
    host_list,
    kill_machines_under,
    poll,
    run_cli,
)


async def cli(reactor, cp, *args, timeout=120):
    code, out, err = await run_cli(reactor, list(args), cp.url, cp.operator_token,
                                   timeout=timeout)
    if code != 0:
        raise RuntimeError(f"zwrm {' '.join(args)} failed ({code}): {err.strip()}")
    return out


async def status(reactor, cp, app):
    return json.loads(await cli(reactor, cp, "status", app, "--json"))


async def main(reactor, runs):
    img = image.build()
    tmp = tempfile.mkdtemp(prefix="zwrm-bench-drain-")
    procs = []
    try:
        cp = ControlPlaneProcess(reactor, f"{tmp}/cp", heartbeat_interval=1.0,
                                 check_interval=2.0, offline_after=20.0, grace=20.0)
        procs.append(cp)
        await cp.start()
        agents = [AgentProcess(reactor, f"{tmp}/a{i}", cp.url, cp.join_token, name=f"a{i}",
                               extra_args=["--accel", "tcg"]) for i in (1, 2)]
        for a in agents:
            procs.append(a)
            await a.start()

        async def ready():
            hosts = await host_list(reactor, cp)
            return len(hosts) == 2 and all(h["state"] == "ready" for h in hosts)

        await poll(reactor, ready, 60, what="agents ready")
        await cli(reactor, cp, "images", "push", "demo:1", "--kernel", img.kernel, "--initrd",
                  img.initrd, "--cmdline", img.cmdline, "--port", "8080", "-q")
        deploy = ["--image", "demo:1", "--memory", "256", "--port", "8080", "--health-http", "/",
                  "--health-interval", "0.2", "--health-grace", "240", "--wait", "300"]
        # warm the image cache of both hosts
        await cli(reactor, cp, "apps", "create", "warm")
        await cli(reactor, cp, "deploy", "warm", "--replicas", "2", *deploy, timeout=330)
        await cli(reactor, cp, "destroy", "warm")
        await cli(reactor, cp, "apps", "create", "bench")
        await cli(reactor, cp, "deploy", "bench", "--replicas", "1",
                  "--volume", "data:16:/data", *deploy, timeout=330)

        raw, down = [], []
        for n in range(runs):
            # baseline: boot to healthy on the host it is on
            await cli(reactor, cp, "scale", "bench", "0")
            t0 = time.monotonic()
            await cli(reactor, cp, "scale", "bench", "1")

            async def healthy():
                ms = (await status(reactor, cp, "bench"))["machines"]
                return bool(ms) and ms[0]["state"] == "running" and ms[0]["health"] == "passing"

            await poll(reactor, healthy, 300, interval=0.2, what="healthy")
            raw.append(time.monotonic() - t0)
            host = (await status(reactor, cp, "bench"))["machines"][0]["host_id"]
            out = await cli(reactor, cp, "host", "drain", host, "--min-healthy", "1s",
                            "--poll", "0.2s", "--json", timeout=400)
            s = json.loads(out)
            if s["state"] != "completed":
                raise RuntimeError(f"drain {s['state']}: {s['migrations']}")
            down.append(s["migrations"][0]["downtime"])
            print(f"run {n + 1}: raw boot-to-healthy {raw[-1]:.2f} s, "
                  f"drain downtime {down[-1]:.2f} s "
                  f"(copied {s['migrations'][0]['bytes_sent']} bytes)", flush=True)
            await cli(reactor, cp, "host", "activate", host)
        r, d = statistics.median(raw), statistics.median(down)
        print(f"raw boot-to-healthy (baseline): median {r:.2f} s over {runs} runs")
        print(f"drain downtime per VM:          median {d:.2f} s over {runs} runs")
        print(f"ratio downtime / baseline: {d / r:.2f}x (goal <= 1.2x)")
    finally:
        for p in reversed(procs):
            await p.stop()
        kill_machines_under(tmp)
        shutil.rmtree(tmp, True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, args.runs)))
