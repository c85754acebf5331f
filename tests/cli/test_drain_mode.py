"""
C{zwrm host drain --mode live|cold|auto} and what C{zwrm host drain-status} shows of a live
move (issue 18): the option's parsing, its way to C{zwrm.host.drain} against a real control
plane over a real socket (a bad mode refused, naming C{mode}, nothing stored), and the
status lines.
"""

import io
import json
import sys

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.cli.test_cli import Args, d
from tests.cli.test_drain_follow import plane_with_an_agent
from zwrm.cli import client, main
from zwrm.cli import drain as cli_drain
from zwrm.cli.client import CliError

MiB = 1024 * 1024


def drain_args(**kw):
    args = dict(deadline="1h", max_parallel=1, healthy_deadline="5m", min_healthy="10s",
                poll="1s", dry_run=False, detach=True, json=True, mode="auto")
    args.update(kw)
    return Args(**args)


class ModeOptionTests(SynchronousTestCase):
    def test_default_and_choices(self):
        parser = main.build_parser()
        self.assertEqual(parser.parse_args(["host", "drain", "h-1"]).mode, "auto")
        for mode in ("live", "cold", "auto"):
            args = parser.parse_args(["host", "drain", "h-1", "--mode", mode])
            self.assertEqual((args.mode, args.func), (mode, cli_drain.host_drain))

    def test_live_options(self):
        parser = main.build_parser()
        args = parser.parse_args(["host", "drain", "h-1"])
        self.assertEqual((args.downtime_limit, args.live_deadline, args.postcopy),
                         (None, None, False))
        args = parser.parse_args(["host", "drain", "h-1", "--downtime-limit", "150",
                                  "--live-deadline", "2m", "--postcopy"])
        self.assertEqual((args.downtime_limit, args.live_deadline, args.postcopy),
                         (150.0, "2m", True))

    def test_a_bad_mode_is_a_one_line_usage_error(self):
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        e = self.assertRaises(SystemExit, main.build_parser().parse_args,
                              ["host", "drain", "h-1", "--mode", "warp"])
        self.assertEqual(e.code, client.EXIT_USAGE)
        lines = err.getvalue().strip().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertIn("--mode", lines[0])


class ModeCallTests(TestCase):
    timeout = 60

    @d
    async def test_the_mode_reaches_the_control_plane(self):
        plane, host_id = await plane_with_an_agent(self)
        sent = []
        call = cli_drain.call

        def recording_call(session, procedure, *args, **kwargs):
            sent.append((procedure, kwargs.get("mode")))
            options.append(kwargs)
            return call(session, procedure, *args, **kwargs)

        options = []
        self.patch(cli_drain, "call", recording_call)
        out = io.StringIO()
        rc = await cli_drain.host_drain(
            reactor, drain_args(api_url=plane.url, host_id=host_id, mode="live",
                                dry_run=True, downtime_limit=150.0, live_deadline="2m",
                                postcopy=True), out)
        self.assertEqual(rc, 0)
        self.assertEqual(sent, [("zwrm.host.drain", "live")])
        self.assertEqual((options[0]["downtime_limit"], options[0]["live_deadline"],
                          options[0]["postcopy"]), (150.0, 120.0, True))
        result = json.loads(out.getvalue())
        self.assertEqual((result["state"], result["mode"], result["plan"]),
                         ("dry_run", "live", []))
        # A mode the control plane does not know (a client that skips the parser's check):
        # refused, naming the argument; nothing is stored, the host stays ready.
        with self.assertRaises(CliError) as e:
            await cli_drain.host_drain(
                reactor, drain_args(api_url=plane.url, host_id=host_id, mode="warp"), out)
        self.assertIn("mode", e.exception.message)
        self.assertNotIn("Traceback", e.exception.message)
        self.assertIsNone(await plane.registry.data.drains.latest(host_id))
        self.assertEqual(plane.registry.entry(host_id).machine.state, "ready")


class StatusLineTests(SynchronousTestCase):
    def status(self, *migrations):
        return {"drain_id": "d-1", "host_id": "h-a", "state": "running",
                "host_state": "draining", "migrations": list(migrations)}

    def migration(self, **kw):
        m = {"machine_id": "m-1", "app": "db", "phase": "live_migrating", "target": "h-b",
             "volumes": ["v-1"], "bytes_sent": 16 * MiB, "bytes_total": 32 * MiB,
             "rate": 8 * MiB, "eta": 2.0, "error": None, "downtime": None, "mode": "live",
             "mode_reason": None, "live": None, "downtime_ms": None, "verified": None}
        m.update(kw)
        return m

    def line(self, m):
        out = io.StringIO()
        cli_drain.format_status(self.status(m), out)
        return out.getvalue().splitlines()[1]

    def test_a_live_move_in_flight(self):
        line = self.line(self.migration(live={
            "phase": "migrating", "elapsed": 3.2,
            "mirror": {"done": 32 * MiB, "total": 32 * MiB, "rate": 8 * MiB},
            "ram": {"transferred": 200 * MiB, "remaining": 12 * MiB, "total": 256 * MiB,
                    "mbps": 800.0, "passes": 3}}))
        self.assertIn("live_migrating (live)", line)
        self.assertIn("migrating: mirrored 32.0MiB of 32.0MiB at 8.0MiB/s", line)
        self.assertIn("RAM pass 3 (200.0MiB sent, 12.0MiB left)", line)
        line = self.line(self.migration(live={
            "phase": "switching", "mirror": {"done": 32 * MiB, "total": 32 * MiB, "rate": 0},
            "ram": {"passes": 4, "transferred": 1, "remaining": 0}}))
        self.assertIn("switching over", line)
        # its volumes go through QEMU's mirror, not the volume stream: no "sent 0B"
        line = self.line(self.migration(bytes_sent=0, rate=None, eta=None, live={
            "phase": "migrating", "mirror": {"done": 8 * MiB, "total": 32 * MiB, "rate": 0}}))
        self.assertNotIn("sent 0", line)
        self.assertIn("-> h-b  [migrating: mirrored 8.0MiB of 32.0MiB", line)

    def test_a_live_move_done_shows_the_pause_and_the_verification(self):
        line = self.line(self.migration(
            phase="done", downtime_ms=84, downtime=0.084,
            verified={"v-1": {"ok": True, "blocks": 512, "dirty_blocks": 3,
                              "differing_blocks": 1}}))
        self.assertIn("done (live)", line)
        self.assertIn("pause 84 ms (QEMU)", line)
        self.assertIn("verified 1/1", line)
        self.assertNotIn("downtime", line)

    def test_a_cold_move_says_why(self):
        line = self.line(self.migration(
            phase="bulk_copying", mode="cold",
            mode_reason="hosts h-a and h-b differ in cpu_model ('qemu64' and 'host')"))
        self.assertIn("bulk_copying (cold)", line)
        self.assertIn("(cold: hosts h-a and h-b differ in cpu_model", line)

    def test_the_plan_says_the_mode(self):
        out = io.StringIO()
        cli_drain.format_plan({"host_id": "h-a", "drain_id": None, "plan": [
            {"machine_id": "m-1", "app": "db", "volumes": ["v-1"], "target": "h-b",
             "reason": None, "mode": "live", "mode_reason": None},
            {"machine_id": "m-2", "app": "db", "volumes": ["v-2"], "target": "h-b",
             "reason": None, "mode": "cold", "mode_reason": "host h-b cannot migrate live"},
            {"machine_id": "m-3", "app": "web", "volumes": [], "target": "h-b",
             "reason": None, "mode": "cold", "mode_reason": "no volumes"}]}, out)
        lines = out.getvalue().splitlines()
        self.assertTrue(lines[1].endswith("-> h-b  [live]"), lines[1])
        self.assertTrue(lines[2].endswith("[cold: host h-b cannot migrate live]"), lines[2])
        self.assertTrue(lines[3].endswith("-> h-b"), lines[3])
