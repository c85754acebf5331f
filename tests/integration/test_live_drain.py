"""
Live drains end to end (issue 18): a real C{zwrm-control}, two real C{zwrm-agent}
processes, QEMU under TCG, the test image with a volume; C{zwrm host drain --mode live}
moves the running VM while a client keeps writing to it (each write acknowledged only once
the guest C{sync}ed it), and:

 - every acknowledged write is on the target, the moved volume is verified against the
   source's frozen image, the source's QEMU and volume are gone, the pause is QEMU's;
 - the target host lost during the mirror (its agent and its QEMU killed): the migration
   rolls back, the VM runs on at the source with every acknowledged write, never two
   copies; the target's leftovers are cleaned when its agent is back;
 - the control plane killed mid-migration: resolved on its restart (the move completes,
   or it is rolled back and done again), with every acknowledged write where the VM runs.

The agent side with QEMU alone: tests/agent/test_live.py; the driver's faults:
tests/drivers/test_live.py.
"""

import json
import os
import signal
import subprocess
import tempfile
import time

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from zwrm.testing.processes import (
    host_list,
    kill_machines_under,
    poll,
    run_cli,
    start_vm_cluster,
)

MiB = 1024 * 1024


def _quiet(text, lines=150):
    noise = ("_HTTP11ClientFactory", '"GET /v2/', '"HEAD /v2/', '"PUT /v2/', '"POST /v2/',
             "QMP event")
    return "\n".join([ln for ln in text.splitlines() if not any(n in ln for n in noise)][-lines:])


def qemus_using(volume_id):
    """The pids of the QEMU processes whose command line names the volume."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args and b"qemu-system" in args[0] and any(volume_id.encode() in a for a in args):
            pids.append(int(pid))
    return pids


def fill_volume(path, data_mb):
    """Make the (unused) volume image an ext4 file system of its size holding random data."""
    size = os.path.getsize(path)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "filler.bin"), "wb") as f:
            for _ in range(data_mb):
                f.write(os.urandom(MiB))
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", d, path, f"{size // 1024}k"],
                       check=True, capture_output=True)


class Writer:
    """
    A client writing to the app: C{POST /cgi-bin/write?w-N} to every port the app was seen
    on (refreshed from C{zwrm status}); a write counts as acknowledged when the guest
    answered C{ok} (after its C{sync}). Records the longest time between two
    acknowledgements (the client-observed gap).
    """

    def __init__(self, testcase, cp, app, port):
        self.t, self.cp, self.app = testcase, cp, app
        self.ports = {port}
        self.acked = {}
        self.n = 0
        self.stopped = False
        self.last_ack = None
        self.gap = 0.0
        self.rounds = 0
        self.ack_times = []

    def start(self):
        self.running = ensureDeferred(self._run())
        return self

    async def stop(self):
        self.stopped = True
        await self.running

    async def refresh(self):
        code, out, _ = await run_cli(reactor, ["status", self.app, "--json"], self.cp.url,
                                     self.cp.operator_token, timeout=20)
        if code == 0:
            for m in json.loads(out)["machines"]:
                if m.get("host_port"):
                    self.ports.add(m["host_port"])

    async def _run(self):
        while not self.stopped:
            for port in sorted(self.ports):
                name = f"w-{self.n}"
                body = f"write {self.n} ".encode() * 4
                self.n += 1
                try:
                    r = await treq.post(f"http://127.0.0.1:{port}/cgi-bin/write?{name}", body,
                                        timeout=3)
                    ok = r.code == 200 and (await r.text()).strip() == "ok"
                except Exception:
                    ok = False
                if ok:
                    now = time.monotonic()
                    if self.last_ack is not None:
                        self.gap = max(self.gap, now - self.last_ack)
                    self.last_ack = now
                    self.acked[name] = (body, port)
                    self.ack_times.append(now)
            self.rounds += 1
            if self.rounds % 4 == 0:
                await self.refresh()
            await deferLater(reactor, 0.1, lambda: None)


@pytest.mark.qemu
@pytest.mark.multihost
class LiveDrainTests(TestCase):
    timeout = 900

    async def cli(self, cp, *args, timeout=60, ok=(0,)):
        code, out, err = await run_cli(reactor, list(args), cp.url, cp.operator_token,
                                       timeout=timeout)
        self.assertIn(code, ok, f"zwrm {' '.join(args)} failed ({code}): {out} {err}")
        self.assertNotIn("Traceback", err)
        return out

    def _with_logs(self, scenario):
        async def run():
            self.processes = []
            try:
                await scenario()
            except Exception as e:
                logs = "".join(f"\n--- {os.path.basename(p.log_path)} (filtered):\n"
                               f"{_quiet(p.log_tail(400))}" for p in self.processes)
                self.fail(f"{e.__class__.__name__}: {e}{logs}")

        return ensureDeferred(run())

    async def cluster(self, data_mb=0, volume_mb=16):
        """The cluster, app C{web} with one volume on the first agent, running and healthy."""
        cp, agents = await start_vm_cluster(reactor, self, offline_after=10.0)
        self.processes = [cp, *agents]
        src, dst = agents
        await self.cli(cp, "apps", "create", "web")
        await self.cli(cp, "volumes", "create", "web", "data", "--size", str(volume_mb),
                       "--mount", "/data", "--host", src.host_id)
        vols = json.loads(await self.cli(cp, "volumes", "list", "--app", "web", "--json"))
        vid = vols[0]["id"]
        if data_mb:
            [name] = [n for n in os.listdir(os.path.join(src.data_dir, "volumes"))
                      if n.startswith(vid)]
            await deferToThread(fill_volume, os.path.join(src.data_dir, "volumes", name),
                                data_mb)
        out = await self.cli(
            cp, "deploy", "web", "--image", "demo:1", "--replicas", "1", "--memory", "256",
            "--port", "8080", "--health-http", "/", "--health-grace", "240",
            "--volume", f"data:{volume_mb}:/data", "--wait", "300", "--json", timeout=330)
        [m] = json.loads(out)["machines"]
        self.assertEqual(m["host_id"], src.host_id)
        r = await treq.post(f"http://127.0.0.1:{m['host_port']}/cgi-bin/write?index.txt",
                            b"known data before the drain")
        self.assertEqual(r.code, 200, await r.text())
        return cp, src, dst, m, vid

    async def drain_status(self, cp, host):
        return json.loads(await self.cli(cp, "host", "drain-status", host, "--json"))

    async def check_writes(self, writer, port):
        """Every acknowledged write reads back from the VM at C{port}."""
        self.assertGreater(len(writer.acked), 0)
        missing = []
        for name, (body, _port) in sorted(writer.acked.items()):
            r = await treq.get(f"http://127.0.0.1:{port}/cgi-bin/read?{name}", timeout=20)
            if r.code != 200 or await r.content() != body:
                missing.append(name)
        self.assertEqual(missing, [], f"acknowledged writes lost ({len(writer.acked)} acked)")

    # -- the move ----------------------------------------------------------------------

    def test_live_drain_keeps_every_acknowledged_write(self):
        return self._with_logs(self._moved)

    async def _moved(self):
        cp, src, dst, m, vid = await self.cluster()
        plan = json.loads(await self.cli(cp, "host", "drain", src.host_id, "--dry-run",
                                         "--mode", "live", "--json"))
        self.assertEqual([(p["target"], p["mode"]) for p in plan["plan"]],
                         [(dst.host_id, "live")], plan)
        writer = Writer(self, cp, "web", m["host_port"]).start()
        await deferLater(reactor, 2, lambda: None)
        started = time.monotonic()
        try:
            out = await self.cli(cp, "host", "drain", src.host_id, "--mode", "live", "--json",
                                 timeout=500)
            ended = time.monotonic()
        finally:
            await writer.stop()
        during = [t for t in writer.ack_times if started < t < ended]
        self.assertGreater(len(during), 0, "no write was acknowledged during the drain")
        status = json.loads(out)
        self.assertEqual(status["state"], "completed", status)
        [mg] = status["migrations"]
        self.assertEqual((mg["phase"], mg["target"], mg["mode"], mg["error"]),
                         ("done", dst.host_id, "live", None), mg)
        self.assertIsInstance(mg["downtime_ms"], int)
        self.assertTrue(mg["verified"][vid]["ok"], mg)
        print(f"\nlive drain: QEMU-reported pause {mg['downtime_ms']} ms, drain "
              f"{ended - started:.1f} s, {len(writer.acked)} writes acknowledged "
              f"({len(during)} during the drain)")
        # drain-status shows the mode, the pause and the last live progress
        text = await self.cli(cp, "host", "drain-status", src.host_id)
        self.assertIn("live", text)

        app = json.loads(await self.cli(cp, "status", "web", "--json"))
        [new] = app["machines"]
        self.assertEqual((new["host_id"], new["state"]), (dst.host_id, "running"))
        self.assertEqual([v["host_id"] for v in app["volumes"]], [dst.host_id])
        # The target's executor owns it: healthy, reported, and the writes are all there.
        async def healthy():
            [x] = json.loads(await self.cli(cp, "status", "web", "--json"))["machines"]
            return x["health"] == "passing"

        await poll(reactor, healthy, 120, interval=1.0, what="moved machine healthy")
        await self.check_writes(writer, new["host_port"])
        r = await treq.get(f"http://127.0.0.1:{new['host_port']}/cgi-bin/read?index.txt")
        self.assertEqual(await r.content(), b"known data before the drain")
        # the source: its QEMU and its volume are gone; only one QEMU uses the volume
        self.assertEqual(len(qemus_using(vid)), 1)
        src_vols = os.path.join(src.data_dir, "volumes")
        self.assertEqual([n for n in os.listdir(src_vols) if vid in n], [])
        self.assertEqual([n for n in os.listdir(os.path.join(src.data_dir, "executor"))
                          if n.endswith(".json")], [])
        hosts = {h["id"]: h for h in await host_list(reactor, cp)}
        self.assertEqual((hosts[src.host_id]["state"], hosts[src.host_id]["machines"]),
                         ("drained", 0))

    # -- the target host lost during the mirror -----------------------------------------

    def test_target_host_lost_during_the_mirror(self):
        return self._with_logs(self._target_lost)

    async def _target_lost(self):
        # 320 MiB of data: the mirror (100 MiB/s at most) takes seconds.
        cp, src, dst, m, vid = await self.cluster(data_mb=320, volume_mb=512)
        writer = Writer(self, cp, "web", m["host_port"]).start()
        try:
            await self.cli(cp, "host", "drain", src.host_id, "--mode", "live", "--detach")

            async def mirroring():
                mg = (await self.drain_status(cp, src.host_id))["migrations"][0]
                live = mg.get("live") or {}
                return (mg["phase"] == "live_migrating" and live.get("phase") == "mirroring")

            await poll(reactor, mirroring, 300, interval=0.2, what="the mirror under way")
            # The target host goes: its agent and its QEMU die.
            dst.signal(signal.SIGKILL)
            kill_machines_under(dst.data_dir)
            killed_at = time.monotonic()
            await poll(reactor, lambda: not dst.running, 20, what="target agent dead")

            # The mirror fails, the source rolls back and runs on: new writes are
            # acknowledged there while the target is away (the control plane waits for
            # it to confirm that its copy is gone before the drain ends).
            def acked_after(t, n):
                return len([x for x in writer.ack_times if x > t]) >= n

            await poll(reactor, lambda: acked_after(killed_at, 3), 300, interval=0.5,
                       what="writes acknowledged by the source after the target died")
        finally:
            await writer.stop()
        # never two copies; the VM runs on at the source with every acknowledged write
        self.assertEqual(len(qemus_using(vid)), 1)
        app = json.loads(await self.cli(cp, "status", "web", "--json"))
        # (the replacement's row stays until its host confirms it is gone)
        [vm] = [x for x in app["machines"] if x["id"] == m["id"]]
        self.assertEqual((vm["host_id"], vm["state"]), (src.host_id, "running"), app)
        await self.check_writes(writer, m["host_port"])
        # The target comes back: the blank copy it received is deleted, nothing of the
        # machine is left there.
        await dst.start()

        async def ended():
            s = await self.drain_status(cp, src.host_id)
            return s["state"] in ("completed", "incomplete", "cancelled")

        await poll(reactor, ended, 300, interval=1.0, what="drain ended")

        async def target_clean():
            vols = os.path.join(dst.data_dir, "volumes")
            return not [n for n in os.listdir(vols) if vid in n] or [
                v for v in json.loads(await self.cli(cp, "volumes", "list", "--json"))
                if v["id"] == vid and v["host_id"] == dst.host_id]

        await poll(reactor, target_clean, 120, interval=1.0, what="the target's copy cleaned")
        s = await self.drain_status(cp, src.host_id)
        [mg] = s["migrations"]
        if mg["phase"] == "done":
            # auto/cold retried after the target returned: then it moved, cold
            [vm] = json.loads(await self.cli(cp, "status", "web", "--json"))["machines"]
            self.assertEqual(vm["host_id"], dst.host_id)
        else:
            self.assertIn(mg["phase"], ("rolled_back", "not_moved"), s)

    # -- the control plane killed mid-migration -----------------------------------------

    def test_control_plane_killed_mid_migration(self):
        return self._with_logs(self._cp_killed)

    async def _cp_killed(self):
        cp, src, dst, m, vid = await self.cluster(data_mb=160, volume_mb=256)
        writer = Writer(self, cp, "web", m["host_port"]).start()
        try:
            await self.cli(cp, "host", "drain", src.host_id, "--mode", "live", "--detach")

            async def migrating():
                mg = (await self.drain_status(cp, src.host_id))["migrations"][0]
                return mg["phase"] == "live_migrating"

            await poll(reactor, migrating, 300, interval=0.2, what="live_migrating")
            cp.signal(signal.SIGKILL)
            await poll(reactor, lambda: not cp.running, 20, what="control plane dead")
            await deferLater(reactor, 2, lambda: None)
            await cp.start()

            async def ended():
                try:
                    s = await self.drain_status(cp, src.host_id)
                except AssertionError:
                    return False
                return s["state"] in ("completed", "incomplete", "cancelled")

            await poll(reactor, ended, 500, interval=1.0, what="drain resolved after restart")
            await deferLater(reactor, 3, lambda: None)
        finally:
            await writer.stop()
        s = await self.drain_status(cp, src.host_id)
        self.assertEqual(s["state"], "completed", s)
        [mg] = s["migrations"]
        self.assertEqual(mg["phase"], "done", mg)
        app = json.loads(await self.cli(cp, "status", "web", "--json"))
        [vm] = app["machines"]
        self.assertEqual((vm["host_id"], vm["state"]), (dst.host_id, "running"), app)
        self.assertEqual(len(qemus_using(vid)), 1)
        await self.check_writes(writer, vm["host_port"])

    # -- the target's agent killed (its QEMU lives) mid-migration ---------------------------

    def test_target_agent_restarted_mid_migration(self):
        return self._with_logs(self._target_agent_restarted)

    async def _target_agent_restarted(self):
        # The agent only (kill -9; its QEMU runs on, as after an agent crash): the migration
        # goes on between the QEMUs, the target's machine waits paused (nobody resumes it),
        # the source stays paused; the new agent process finds it paused and complete, the
        # control plane has it resumed (live.resume) and the executor adopts it.
        cp, src, dst, m, vid = await self.cluster(data_mb=160, volume_mb=256)
        writer = Writer(self, cp, "web", m["host_port"]).start()
        try:
            await self.cli(cp, "host", "drain", src.host_id, "--mode", "live", "--detach")

            async def migrating():
                mg = (await self.drain_status(cp, src.host_id))["migrations"][0]
                return mg["phase"] == "live_migrating"

            await poll(reactor, migrating, 300, interval=0.2, what="live_migrating")
            dst.signal(signal.SIGKILL)
            await poll(reactor, lambda: not dst.running, 20, what="target agent dead")
            await deferLater(reactor, 5, lambda: None)
            self.assertLessEqual(len(qemus_using(vid)), 2)
            await dst.start()

            async def ended():
                s = await self.drain_status(cp, src.host_id)
                return s["state"] in ("completed", "incomplete", "cancelled")

            await poll(reactor, ended, 500, interval=1.0, what="drain resolved")
            await deferLater(reactor, 3, lambda: None)
        finally:
            await writer.stop()
        s = await self.drain_status(cp, src.host_id)
        self.assertEqual(s["state"], "completed", s)
        [mg] = s["migrations"]
        self.assertEqual((mg["phase"], mg["mode"]), ("done", "live"), mg)
        app = json.loads(await self.cli(cp, "status", "web", "--json"))
        [vm] = app["machines"]
        self.assertEqual((vm["host_id"], vm["state"]), (dst.host_id, "running"), app)
        self.assertEqual(len(qemus_using(vid)), 1)
        # the new agent process adopted it: it reports its health, machine.* knows it
        async def healthy():
            [x] = json.loads(await self.cli(cp, "status", "web", "--json"))["machines"]
            return x["health"] == "passing"

        await poll(reactor, healthy, 120, interval=1.0, what="adopted machine healthy")
        await self.check_writes(writer, vm["host_port"])
