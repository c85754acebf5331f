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
import time

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from zwrm.testing.drains import DrainTestMixin, Writer, qemus_using
from zwrm.testing.processes import kill_machines_under, poll


@pytest.mark.qemu
@pytest.mark.multihost
class LiveDrainTests(DrainTestMixin, TestCase):
    reactor = reactor
    timeout = 900

    async def cluster(self, data_mb=0, volume_mb=16):
        """The cluster, app C{web} with one volume on the first agent, running and healthy."""
        cp, src, dst = await self.start_cluster(offline_after=10.0)
        [(m, vid)] = (await self.deploy(cp, src, volume_mb=volume_mb,
                                        data_mb=data_mb)).values()
        return cp, src, dst, m, vid

    async def writing(self, writer, since=None, n=2, what="writes acknowledged"):
        """Wait until C{writer} saw C{n} writes acknowledged (after C{since})."""
        await poll(reactor, lambda: writer.acked_since(since or 0) >= n, 120, interval=0.2,
                   what=what)

    # -- the move ----------------------------------------------------------------------

    def test_live_drain_keeps_every_acknowledged_write(self):
        return self.with_logs(self._moved)

    async def _moved(self):
        cp, src, dst, m, vid = await self.cluster()
        plan = json.loads(await self.cli(cp, "host", "drain", src.host_id, "--dry-run",
                                         "--mode", "live", "--json"))
        self.assertEqual([(p["target"], p["mode"]) for p in plan["plan"]],
                         [(dst.host_id, "live")], plan)
        writer = Writer(reactor, cp, "web", m["host_port"]).start()
        await self.writing(writer, what="writes acknowledged before the drain")
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

        app = await self.app_status(cp, "web")
        [new] = app["machines"]
        self.assertEqual((new["host_id"], new["state"]), (dst.host_id, "running"))
        self.assertEqual([v["host_id"] for v in app["volumes"]], [dst.host_id])
        # The target's executor owns it: healthy, reported, and the writes are all there.
        await self.wait_healthy(cp, "web")
        await self.check_writes(writer, new["host_port"])
        r = await treq.get(f"http://127.0.0.1:{new['host_port']}/cgi-bin/read?index.txt")
        self.assertEqual(await r.content(), b"known data before the drain")
        # the source: its QEMU and its volume are gone; only one QEMU uses the volume
        self.assertEqual(len(qemus_using(vid)), 1)
        src_vols = os.path.join(src.data_dir, "volumes")
        self.assertEqual([n for n in os.listdir(src_vols) if vid in n], [])
        self.assertEqual([n for n in os.listdir(os.path.join(src.data_dir, "executor"))
                          if n.endswith(".json")], [])
        hosts = await self.hosts(cp)
        self.assertEqual((hosts[src.host_id]["state"], hosts[src.host_id]["machines"]),
                         ("drained", 0))

    # -- the target host lost during the mirror -----------------------------------------

    def test_target_host_lost_during_the_mirror(self):
        return self.with_logs(self._target_lost)

    async def _target_lost(self):
        # 320 MiB of data: the mirror (100 MiB/s at most) takes seconds.
        cp, src, dst, m, vid = await self.cluster(data_mb=320, volume_mb=512)
        writer = Writer(reactor, cp, "web", m["host_port"]).start()
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
            await self.writing(writer, killed_at, 3,
                               "writes acknowledged by the source after the target died")
        finally:
            await writer.stop()
        # never two copies; the VM runs on at the source with every acknowledged write
        self.assertEqual(len(qemus_using(vid)), 1)
        app = await self.app_status(cp, "web")
        # (the replacement's row stays until its host confirms it is gone)
        [vm] = [x for x in app["machines"] if x["id"] == m["id"]]
        self.assertEqual((vm["host_id"], vm["state"]), (src.host_id, "running"), app)
        await self.check_writes(writer, m["host_port"])
        # The target comes back: the blank copy it received is deleted, nothing of the
        # machine is left there.
        await dst.start()
        await self.wait_drain_ended(cp, src.host_id, 300)

        async def target_clean():
            vols = os.path.join(dst.data_dir, "volumes")
            return not [n for n in os.listdir(vols) if vid in n] or [
                v for v in await self.api(cp, "zwrm.volume.list")
                if v["id"] == vid and v["host_id"] == dst.host_id]

        await poll(reactor, target_clean, 120, interval=1.0, what="the target's copy cleaned")
        s = await self.drain_status(cp, src.host_id)
        [mg] = s["migrations"]
        if mg["phase"] == "done":
            # auto/cold retried after the target returned: then it moved, cold
            [vm] = (await self.app_status(cp, "web"))["machines"]
            self.assertEqual(vm["host_id"], dst.host_id)
        else:
            self.assertIn(mg["phase"], ("rolled_back", "not_moved"), s)

    # -- a process killed mid-migration ---------------------------------------------------

    def test_control_plane_killed_mid_migration(self):
        """
        The control plane killed (-9) while the VM moves, started again 2 s later: resolved
        on its restart (the move completes, or it is rolled back and done again).
        """
        return self.with_logs(lambda: self._killed_mid_migration(
            lambda cp, dst: cp, away=2, mode=None))

    def test_target_agent_restarted_mid_migration(self):
        """
        The target's agent only (kill -9; its QEMU runs on, as after an agent crash), for
        5 s: the migration goes on between the QEMUs, the target's machine waits paused
        (nobody resumes it), the source stays paused; the new agent process finds it paused
        and complete, the control plane has it resumed (live.resume) and the executor
        adopts it (it reports its health).
        """
        return self.with_logs(lambda: self._killed_mid_migration(
            lambda cp, dst: dst, away=5, mode="live"))

    async def _killed_mid_migration(self, victim, away, mode):
        """
        Kill (-9) C{victim(cp, dst)} once the live migration is under way; start it again
        after C{away} seconds: the drain completes (C{mode}, if given, that of the
        migration), the VM runs on the target, one QEMU uses its volume, it is healthy
        (its agent's executor owns it) and every acknowledged write is there.
        """
        cp, src, dst, m, vid = await self.cluster(data_mb=160, volume_mb=256)
        process = victim(cp, dst)
        writer = Writer(reactor, cp, "web", m["host_port"]).start()
        try:
            await self.cli(cp, "host", "drain", src.host_id, "--mode", "live", "--detach")
            await self.wait_phase(cp, src.host_id, ("live_migrating",), interval=0.2)
            process.signal(signal.SIGKILL)
            await poll(reactor, lambda: not process.running, 20, what="process dead")
            await deferLater(reactor, away, lambda: None)
            self.assertLessEqual(len(qemus_using(vid)), 2)
            await process.start()
            await self.wait_drain_ended(cp, src.host_id, 500)
            await self.writing(writer, time.monotonic(), 3,
                               "writes acknowledged after the drain")
        finally:
            await writer.stop()
        s = await self.drain_status(cp, src.host_id)
        self.assertEqual(s["state"], "completed", s)
        [mg] = s["migrations"]
        self.assertEqual((mg["phase"], mg["mode"] if mode else None), ("done", mode), mg)
        app = await self.app_status(cp, "web")
        [vm] = app["machines"]
        self.assertEqual((vm["host_id"], vm["state"]), (dst.host_id, "running"), app)
        self.assertEqual(len(qemus_using(vid)), 1)
        await self.wait_healthy(cp, "web")
        await self.check_writes(writer, vm["host_port"])
