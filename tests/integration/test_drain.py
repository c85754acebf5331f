"""
Host drains end to end, the cold path (C{--mode cold}: bulk copy while the VM runs, ACPI
stop, delta, verified commit, replacement healthy): a real C{zwrm-control}, two real
C{zwrm-agent} processes, QEMU (TCG) machines with a volume holding known data.

These are the cold path's tests: since the live drain, C{auto} moves these machines live
(tests/integration/test_live_drain.py), and the cold path's phases and faults (the
replacement waiting to be healthy, an undrain then) would never be reached.

Each scenario boots as few VMs as it can (a boot under TCG is most of a drain's time): one
cluster and one VM are drained there and back, the faults on the way.
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
from zwrm.testing.processes import poll

#: After the target host is marked offline, how long the test watches that the original is
#: not started again (before issue 14 a rollback started it at once: its QEMU would be
#: counted within a second or two; the control plane checks hosts every 2 s).
WATCH_OFFLINE = 10


@pytest.mark.qemu
@pytest.mark.multihost
class DrainTests(DrainTestMixin, TestCase):
    reactor = reactor
    timeout = 600

    async def page(self, machine):
        return await (await treq.get(f"http://127.0.0.1:{machine['host_port']}/")).text()

    def test_drain_a_host_with_a_volume(self):
        return self.with_logs(self._there_and_back)

    async def _there_and_back(self):
        """
        One VM with a volume, a client writing to it throughout (the QEMU processes using
        the volume counted at each round: never two):

         1. drained cold to the other host, whose agent is killed (-9) while the
            replacement waits to be healthy (case 1 of issue 14): the replacement's QEMU
            outlives it and serves on; the original is not started again while the target
            is offline; once its agent is back the move completes with every write that was
            acknowledged, the source empty and drained;
         2. drained back, and undrained while that replacement waits to be healthy (its
            original already stopped): that migration finishes, the drain is cancelled and
            the host is ready again, the data back on the first host.
        """
        cp, src, dst = await self.start_cluster(offline_after=10.0)
        [(m, vid)] = (await self.deploy(cp, src)).values()
        known = "known data before the drain"
        plan = await self.cli(cp, "host", "drain", src.host_id, "--mode", "cold", "--dry-run",
                              "--json")
        self.assertEqual([p["target"] for p in json.loads(plan)["plan"]], [dst.host_id])

        writer = Writer(reactor, cp, "web", m["host_port"], volume_id=vid, interval=0.5).start()
        try:
            # -- 1. there; the target's agent killed while the replacement waits ---------
            await self.cli(cp, "host", "drain", src.host_id, "--mode", "cold", "--detach",
                           "--min-healthy", "3s", "--healthy-deadline", "300s")
            await self.wait_phase(cp, src.host_id, ("waiting_healthy",))
            await writer.refresh()
            dst.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await poll(reactor, lambda: not dst.running, 20, what="target agent dead")

            async def offline():
                return (await self.hosts(cp))[dst.host_id]["state"] == "offline"

            await poll(reactor, offline, 120, interval=1.0, what="target marked offline")
            await deferLater(reactor, WATCH_OFFLINE, lambda: None)
            # the replacement's QEMU outlives its agent: it boots and serves on
            await poll(reactor, lambda: writer.acked_since(killed_at) > 0, 120, interval=0.5,
                       what="writes acknowledged by the replacement with its agent gone")
            self.assertEqual(writer.two_copies(), [], "two copies of the machine ran at once")
            s = await self.drain_status(cp, src.host_id)
            mg = s["migrations"][0]
            self.assertEqual((s["state"], mg["phase"], mg.get("waiting_for")),
                             ("running", "waiting_healthy", dst.host_id), s)
            self.assertEqual(mg["original_state"]["state"], "stopped", s)
            await dst.start()
            s = await self.wait_drain_ended(cp, src.host_id, 300)
            self.assertEqual(s["state"], "completed", s)
            [mg] = s["migrations"]
            self.assertEqual((mg["phase"], mg["target"], mg["error"]),
                             ("done", dst.host_id, None), s)
            self.assertGreater(mg["bytes_total"], 0)
            self.assertEqual(writer.two_copies(), [], "two copies of the machine ran at once")
            new = await self.wait_healthy(cp, "web")
            self.assertEqual((new["host_id"], new["state"]), (dst.host_id, "running"))
            app = await self.app_status(cp, "web")
            self.assertEqual([v["host_id"] for v in app["volumes"]], [dst.host_id])
            await self.check_writes(writer, new["host_port"])
            self.assertIn(known, await self.page(new))
            # the source is empty and drained; the volume lives only on the target
            self.assertEqual([n for n in os.listdir(os.path.join(src.data_dir, "volumes"))
                              if vid in n], [])
            self.assertTrue([n for n in os.listdir(os.path.join(dst.data_dir, "volumes"))
                             if vid in n])
            h = (await self.hosts(cp))[src.host_id]
            self.assertEqual((h["state"], h["machines"]), ("drained", 0))
            self.assertIn("done", await self.cli(cp, "host", "drain-status", src.host_id))
            self.assertIn("ready", await self.cli(cp, "host", "activate", src.host_id))

            # -- 2. back; undrained while the replacement waits to be healthy -------------
            await self.cli(cp, "host", "drain", dst.host_id, "--mode", "cold", "--detach",
                           "--min-healthy", "3s", "--healthy-deadline", "300s")
            await self.wait_phase(cp, dst.host_id, ("waiting_healthy",))
            self.assertIn("cancelling", await self.cli(cp, "host", "undrain", dst.host_id))
            s = await self.wait_drain_ended(cp, dst.host_id, 300)
            self.assertEqual((s["state"], s["host_state"]), ("cancelled", "ready"), s)
            self.assertEqual(s["migrations"][0]["phase"], "done", s)
            back = await self.wait_healthy(cp, "web")
            self.assertEqual((back["host_id"], back["state"]), (src.host_id, "running"))
        finally:
            await writer.stop()
        self.assertEqual(writer.two_copies(), [], "two copies of the machine ran at once")
        await self.check_writes(writer, back["host_port"])
        self.assertIn(known, await self.page(back))
        self.assertEqual([n for n in os.listdir(os.path.join(dst.data_dir, "volumes"))
                          if vid in n], [])
        self.assertEqual(len(qemus_using(vid)), 1)

    def test_two_vms_control_plane_killed_mid_drain(self):
        return self.with_logs(self._killed)

    async def _killed(self):
        """
        Two VMs with volumes on one host. The target agent dies (kill -9) as the drain
        starts: each migration rolls back, the VMs run on the source with their data, the
        host stays draining. The operator retries and the control plane is killed (-9) in
        the middle of it: on its restart the drain resumes and moves both.
        """
        cp, src, dst = await self.start_cluster(offline_after=20.0)

        def known(app):
            return f"{app} data before the drain ".encode() * 8

        await self.deploy(cp, src, apps=("web", "db"), known=known)

        # The agent is frozen before the drain is requested, so that it does nothing for the
        # drain before it dies: killed only after the CLI returned, on a loaded machine it
        # used to start a replacement first, which a rollback cannot remove from a dead host
        # and which then holds the volume copy the retry below needs (docs/drain.md,
        # "Limits").
        dst.freeze()
        await self.cli(cp, "host", "drain", src.host_id, "--mode", "cold", "--detach",
                       "--min-healthy", "3s", "--healthy-deadline", "300s")
        dst.signal(signal.SIGKILL)
        s = await self.wait_drain_ended(cp, src.host_id, 300)
        self.assertEqual(s["state"], "incomplete", s)
        self.assertEqual({m["phase"] for m in s["migrations"]} - {"rolled_back", "not_moved"},
                         set(), s)
        for app in ("web", "db"):
            [m] = (await self.app_status(cp, app))["machines"]
            self.assertEqual((m["host_id"], m["state"]), (src.host_id, "running"))
            self.assertIn(known(app).decode(), await self.page(m))
        self.assertEqual((await self.hosts(cp))[src.host_id]["state"], "draining")
        await self.restart_agent(cp, dst)

        # The operator retries, both at once; the control plane is killed (-9) in the middle
        # of it.
        await self.cli(cp, "host", "drain", src.host_id, "--mode", "cold", "--detach",
                       "--max-parallel", "2", "--min-healthy", "3s", "--healthy-deadline", "300s")
        await self.wait_phase(cp, src.host_id, ("waiting_healthy", "committing", "cleaning"))
        cp.signal(signal.SIGKILL)
        await poll(reactor, lambda: not cp.running, 20, what="control plane dead")
        await cp.start()

        s = await self.wait_drain_ended(cp, src.host_id, 400)
        self.assertEqual(s["state"], "completed", s)
        self.assertEqual([m["phase"] for m in s["migrations"]], ["done", "done"])
        for app in ("web", "db"):
            status = await self.app_status(cp, app)
            [m] = status["machines"]
            self.assertEqual((m["host_id"], m["state"]), (dst.host_id, "running"))
            self.assertEqual([v["host_id"] for v in status["volumes"]], [dst.host_id])
            self.assertIn(known(app).decode(), await self.page(m))
        self.assertEqual([n for n in os.listdir(os.path.join(src.data_dir, "volumes"))
                          if n.startswith("v-")], [])
