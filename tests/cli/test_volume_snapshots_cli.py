"""
C{zwrm volumes snapshot|snapshots|restore|delete-snapshot} against a real control plane and
a real agent (a real volume store) over real sockets.
"""

import io
import json
import os
import sqlite3

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.agent.test_membership import start_host_agent, start_plane
from tests.cli.test_cli import d
from tests.cli.test_json_everywhere import zwrm
from zwrm.cli import client, host_remove
from zwrm.cli.client import EXIT_REMOTE, EXIT_TIMEOUT, CliError
from zwrm.control.service import ControlPlane
from zwrm.testing.processes import poll
from zwrm.wamp import progress


async def cluster(testcase, agents=1):
    """
    A real control plane and C{agents} real agents (their executors registered), the CLI
    given the operator's token (in the returned environment), and an app C{db}.

    @return: C{(plane, agents, their host ids, the CLI's environment)}.
    """
    plane, tmp = await start_plane(testcase)
    started = [await start_host_agent(testcase, plane, os.path.join(tmp, f"a{i + 1}"))
               for i in range(agents)]
    hosts = [a.identity.host_id for a in started]
    environ = {"ZWRM_TOKEN": plane.operator_token}
    testcase.patch(client.os, "environ", environ)
    for h in hosts:
        await poll(reactor, lambda h=h: plane.registry.executor_available(h), 10, 0.05,
                   what="the agents' executors registered")
    await zwrm(plane.url, "apps", "create", "db")
    return plane, started, hosts, environ


async def new_volume(plane, name="data", host=None):
    """C{zwrm volumes create db NAME} (8 MiB, on C{host} if given): its id."""
    _, out = await zwrm(plane.url, "volumes", "create", "db", name, "--size", "8", "--mount",
                        f"/{name}", *(("--host", host) if host else ()), "--json")
    return json.loads(out)["id"]


class VolumeSnapshotCommandTests(TestCase):
    timeout = 60

    @d
    async def test_snapshot_list_restore_delete(self):
        plane, _, [host_id], _ = await cluster(self)
        vid = await new_volume(plane)

        _, out = await zwrm(plane.url, "volumes", "snapshot", vid, "--name", "before-upgrade")
        self.assertRegex(out, rf"^snapshot before-upgrade \(s-[0-9a-f]{{12}}\) of volume {vid} "
                              rf"on {host_id}: \d+\.\d MiB of data, taken at rest\n$")
        _, out = await zwrm(plane.url, "volumes", "snapshot", vid, "--json")
        second = json.loads(out)
        self.assertRegex(second["name"], r"^\d{8}-\d{6}$")

        _, out = await zwrm(plane.url, "volumes", "snapshots", vid)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["NAME", "ID", "VOLUME", "HOST", "CREATED",
                                            "SIZE(MiB)", "DATA(MiB)", "TAKEN", "STATE"])
        self.assertEqual([line.split()[0] for line in lines[1:]],
                         ["before-upgrade", second["name"]])
        self.assertIn("8.0", lines[1].split())
        self.assertEqual(lines[1].split()[-3:], ["at", "rest", "ready"])
        _, out = await zwrm(plane.url, "volumes", "snapshots", "--app", "db", "--json")
        self.assertEqual(len(json.loads(out)), 2)

        _, out = await zwrm(plane.url, "volumes", "restore", vid, "before-upgrade")
        self.assertRegex(out, rf"^restored volume {vid} from snapshot before-upgrade; what it "
                              r"held is kept as snapshot before-restore-\d{8}-\d{6}\n$")
        kept = out.split()[-1]

        _, out = await zwrm(plane.url, "volumes", "delete-snapshot", vid, kept, "--json")
        self.assertEqual(json.loads(out)["snapshot"][:2], "s-")
        with self.assertRaises(CliError) as e:
            await zwrm(plane.url, "volumes", "delete-snapshot", vid, kept)
        self.assertEqual((e.exception.code, e.exception.message),
                         (EXIT_REMOTE, f"volume {vid} has no snapshot {kept!r}"))
        with self.assertRaises(CliError) as e:
            await zwrm(plane.url, "volumes", "snapshot", vid, "--name", "before-upgrade")
        self.assertEqual(e.exception.message,
                         f"volume {vid} has a snapshot 'before-upgrade' already")

        # a scheduled snapshot keeps the last N (a restore's kept data is not counted)
        _, out = await zwrm(plane.url, "volumes", "snapshot", vid, "--name", "nightly",
                            "--keep", "1")
        self.assertEqual(out.splitlines()[1], "deleted 2 older snapshot(s) to keep 1: "
                                              f"before-upgrade, {second['name']}")
        _, out = await zwrm(plane.url, "volumes", "snapshots", vid, "--json")
        self.assertEqual([s["name"] for s in json.loads(out)], ["nightly"])

        _, out = await zwrm(plane.url, "volumes", "destroy", vid)
        self.assertEqual(out, f"destroyed volume {vid}\n")
        _, out = await zwrm(plane.url, "volumes", "snapshots", "--json")
        self.assertEqual(json.loads(out), [])


class VolumeReplicaCommandTests(TestCase):
    timeout = 60

    @d
    async def test_replicate_list_delete(self):
        plane, agents, [first, second], _ = await cluster(self, 2)
        vid = await new_volume(plane, host=first)

        # a scheduled snapshot that also keeps a copy on another host
        _, out = await zwrm(plane.url, "volumes", "snapshot", vid, "--name", "nightly",
                            "--replicate-to", second, "--keep", "3")
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith("snapshot nightly (s-"), out)
        self.assertRegex(lines[1], rf"^replica r-[0-9a-f]{{12}} of snapshot nightly of volume "
                                   rf"{vid} on {second}: \d+\.\d MiB of data, verified$")
        rid = lines[1].split()[1]

        _, out = await zwrm(plane.url, "volumes", "replicas", vid)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["ID", "VOLUME", "HOST", "SNAPSHOT", "TAKEN",
                                            "COPIED", "DATA(MiB)", "STATE"])
        self.assertEqual([lines[1].split()[i] for i in (0, 1, 2, 3, -1)],
                         [rid, vid, second, "nightly", "ready"])
        _, out = await zwrm(plane.url, "volumes", "replicas", "--app", "db", "--json")
        self.assertEqual([r["id"] for r in json.loads(out)], [rid])

        # bad requests: one line each, nothing changed
        for args, message in (
                (("replicate", vid, "nightly", "--to", first),
                 f"volume {vid} is on host {first}: a replica is kept on another host"),
                (("replicate", vid, "nightly", "--to", second),
                 f"host {second} has a replica of snapshot nightly of volume {vid} already"),
                (("replicate", vid, "nope", "--to", second),
                 f"volume {vid} has no snapshot 'nope'"),
                (("delete-replica", vid, "r-nope"), f"volume {vid} has no replica 'r-nope'")):
            with self.assertRaises(CliError) as e:
                await zwrm(plane.url, "volumes", *args)
            self.assertEqual((e.exception.code, e.exception.message), (EXIT_REMOTE, message))

        _, out = await zwrm(plane.url, "volumes", "delete-replica", vid, rid)
        self.assertEqual(out, f"deleted replica {rid} of volume {vid}\n")
        _, out = await zwrm(plane.url, "volumes", "replicas", "--json")
        self.assertEqual(json.loads(out), [])

        # its host lost for good: removed, the volume made again from its replica
        _, out = await zwrm(plane.url, "volumes", "replicate", vid, "nightly")  # (the other)
        self.assertIn(f" of snapshot nightly of volume {vid} on {second}: ", out)
        await agents[0].stopService()
        await plane.registry.mark_offline(first)
        with self.assertRaises(CliError) as e:
            await zwrm(plane.url, "host", "remove", first)
        self.assertIn("--recover-volumes", e.exception.message)
        _, out = await zwrm(plane.url, "host", "remove", first, "--recover-volumes")
        self.assertRegex(out, rf"^host {first} removed\n  volume {vid} recovered on {second} "
                              r"from its replica of snapshot nightly \(taken \d{4}-\d\d-\d\d "
                              r"\d\d:\d\d:\d\d UTC\)\n$")
        _, out = await zwrm(plane.url, "volumes", "list", "--json")
        self.assertEqual([(v["id"], v["host_id"]) for v in json.loads(out)], [(vid, second)])

    @d
    async def test_a_drain_says_where_the_replicas_on_its_host_go(self):
        plane, _, [first, second, third], _ = await cluster(self, 3)
        vid = await new_volume(plane, host=first)
        _, out = await zwrm(plane.url, "volumes", "snapshot", vid, "--name", "nightly",
                            "--replicate-to", second, "--json")
        rid = json.loads(out)["replica"]["id"]

        _, out = await zwrm(plane.url, "host", "drain", second, "--dry-run")
        self.assertEqual(out.splitlines()[1:], [
            "  no machines to move",
            f"  replica {rid}  nightly of {vid}  -> {third}"])
        _, out = await zwrm(plane.url, "host", "drain", second)
        last = out.splitlines()[-2:]
        self.assertTrue(last[0].endswith(": completed (host drained)"), out)
        self.assertRegex(last[1], rf"^  replica r-[0-9a-f]{{12}}  nightly of {vid}  moved  -> "
                                  rf"{third}$")
        _, out = await zwrm(plane.url, "volumes", "replicas", vid, "--json")
        self.assertEqual([(r["id"], r["host_id"]) for r in json.loads(out)],
                         [(last[1].split()[1], third)])

    @d
    async def test_every_volume_of_an_app_snapshotted_and_replicated(self):
        plane, _, [first, second], _ = await cluster(self, 2)
        vids = [await new_volume(plane, "data", first), await new_volume(plane, "logs", second)]
        code, out = await zwrm(plane.url, "volumes", "snapshot", "--app", "db", "--name",
                               "nightly", "--replicate")
        self.assertEqual(code, 0)
        lines = out.splitlines()
        self.assertEqual([line.split()[0] for line in lines], ["snapshot", "replica"] * 2)
        self.assertEqual([line.split()[1] for line in lines[::2]], ["nightly"] * 2)
        _, out = await zwrm(plane.url, "volumes", "replicas", "--app", "db", "--json")
        self.assertEqual(sorted((r["volume_id"], r["host_id"]) for r in json.loads(out)),
                         sorted([(vids[0], second), (vids[1], first)]))
        # one replica refused (the volume is on that host): the other made, exit 1
        code, out = await zwrm(plane.url, "volumes", "snapshot", "--app", "db", "--name",
                               "second", "--replicate-to", second)
        self.assertEqual(code, 1)
        self.assertIn(f"volume {vids[1]} (logs, replica 0): snapshot second taken, not "
                      f"replicated: volume {vids[1]} is on host {second}", out)
        self.assertIn(f"of snapshot second of volume {vids[0]} on {second}: ", out)
        for argv in (("snapshot",), ("snapshot", vids[0], "--app", "db")):
            with self.assertRaises(CliError) as e:
                await zwrm(plane.url, "volumes", *argv)
            self.assertEqual(e.exception.message, "give a volume id or --app APP (not both)")
        with self.assertRaises(CliError) as e:
            await zwrm(plane.url, "volumes", "snapshot", "--app", "nope")
        self.assertEqual(e.exception.code, EXIT_REMOTE)

    @d
    async def test_a_schedule_kept_and_run_by_the_control_plane(self):
        plane, _, [first, second], _ = await cluster(self, 2)
        vid = await new_volume(plane, host=first)
        _, out = await zwrm(plane.url, "volumes", "schedule", "db", "--every", "1h",
                            "--keep", "24", "--replicate")
        self.assertEqual(out, "app db: its volumes snapshotted every 1h, the last 24 kept, "
                              "replicated; the first run now (zwrm volumes schedules)\n")

        async def ran():
            _, out = await zwrm(plane.url, "volumes", "schedules", "--json")
            return json.loads(out)[0]["last_at"] is not None

        await poll(reactor, ran, 10, 0.1, what="the first run")
        _, out = await zwrm(plane.url, "volumes", "schedules")
        header, row = out.splitlines()
        self.assertEqual(header.split(), ["APP", "SCHEDULE", "LAST", "RUN", "NEXT", "RUN",
                                          "LAST", "RESULT"])
        self.assertTrue(row.startswith("db   every 1h, the last 24 kept, replicated  "), row)
        self.assertTrue(row.endswith("  ok"), row)
        _, out = await zwrm(plane.url, "volumes", "snapshots", vid, "--json")
        [snap] = json.loads(out)
        self.assertTrue(snap["name"].startswith("scheduled-"), snap)
        _, out = await zwrm(plane.url, "status", "db")  # the app's status says it too
        self.assertRegex(out.splitlines()[-1], r"^snapshots: every 1h, the last 24 kept, "
                                               r"replicated; last run \d{4}-\d\d-\d\d "
                                               r"\d\d:\d\d:\d\d UTC: ok$")
        _, out = await zwrm(plane.url, "volumes", "replicas", vid, "--json")
        self.assertEqual([(r["name"], r["host_id"]) for r in json.loads(out)],
                         [(snap["name"], second)])
        with self.assertRaises(CliError) as e:
            await zwrm(plane.url, "volumes", "schedule", "db", "--every", "soon")
        self.assertEqual(e.exception.message, "bad period 'soon': use e.g. 15m, 1h or 1d")
        for bad in ("10s", "31d"):
            with self.assertRaises(CliError) as e:
                await zwrm(plane.url, "volumes", "schedule", "db", "--every", bad)
            self.assertEqual((e.exception.message, e.exception.code),
                             (f"--every {bad}: a schedule runs at most once a minute and at"
                              " least once in 30 days (e.g. 15m, 1h or 1d)", 2))
        _, out = await zwrm(plane.url, "volumes", "unschedule", "db")
        self.assertEqual(out, "app db: no longer snapshotted on a schedule (its snapshots stay)\n")
        _, out = await zwrm(plane.url, "volumes", "schedules", "--json")
        self.assertEqual(json.loads(out), [])

    @d
    async def test_a_schedule_outlives_its_control_plane(self):
        plane, _, _, _ = await cluster(self, 0)
        await zwrm(plane.url, "volumes", "schedule", "db", "--every", "1h")

        async def ran(url):
            _, out = await zwrm(url, "volumes", "schedules", "--json")
            rows = json.loads(out)
            return rows and rows[0]["last_at"] is not None and rows[0]

        row = await poll(reactor, lambda: ran(plane.url), 10, 0.1, what="the first run")
        self.assertEqual(row["last_error"], "the app has no volumes")
        await plane.stopService()
        # stopped past its next run: the control plane started again runs it at once
        db = sqlite3.connect(os.path.join(plane.config.data_dir, "zwrm.db"))
        with db:
            db.execute("UPDATE snapshot_schedules SET next_at = 0, last_at = NULL")
        db.close()
        again = ControlPlane(reactor, plane.config)
        again.startService()
        self.addCleanup(again.stopService)  # (its next run's timer, armed: cancelled)
        await again.started
        url = f"ws://127.0.0.1:{again.ports[0].getHost().port}/ws"
        row = await poll(reactor, lambda: ran(url), 10, 0.1, what="the missed run")
        self.assertGreater(row["next_at"], row["last_at"] + 3500)


class LongCopyTests(TestCase):
    timeout = 60

    @d
    async def test_a_copy_outlasting_the_timeout_goes_on_while_the_plane_says_it_works(self):
        """
        The CLI's timeout bounds how long the control plane stays silent about a copy
        (progressive results every few seconds), not how long the copy takes.
        """
        plane, _, _, env = await cluster(self)
        vid = await new_volume(plane)
        snapshot = plane.apps.volumes.snapshot

        async def slow(*a, **kw):  # a volume with more data: 2 s of copying
            await deferLater(reactor, 2.0, lambda: None)
            return await snapshot(*a, **kw)

        self.patch(plane.apps.volumes, "snapshot", slow)
        env["ZWRM_TIMEOUT"] = "1"
        self.patch(client, "_flags", {})  # (no --timeout, no deploy --wait of another test)
        self.patch(progress, "INTERVAL", 0.25)
        _, out = await zwrm(plane.url, "volumes", "snapshot", vid, "--name", "long")
        self.assertTrue(out.startswith("snapshot long (s-"), out)

        self.patch(progress, "INTERVAL", 60.0)  # silent: the CLI gives up, the copy goes on
        with self.assertRaises(CliError) as e:
            await zwrm(plane.url, "volumes", "snapshot", vid, "--name", "silent")
        self.assertEqual((e.exception.code, e.exception.message), (
            EXIT_TIMEOUT, "the control plane said nothing of zwrm.volume.snapshot within 1 s"))
        del env["ZWRM_TIMEOUT"]

        async def made():
            _, out = await zwrm(plane.url, "volumes", "snapshots", vid, "--json")
            return [s["name"] for s in json.loads(out) if s["state"] == "ready"] == [
                "long", "silent"]

        await poll(reactor, made, 10, 0.1, what="the silent one made all the same")


class UnrecordedCommandTests(TestCase):
    timeout = 60

    @d
    async def test_host_status_lists_them_and_host_clean_deletes_them(self):
        plane, [agent], [host], _ = await cluster(self)
        kept = await new_volume(plane)
        # a volume the cluster does not record (as a host removed and joined again keeps
        # its old ones), seen when the agent comes back
        await agent.runtime.volumes.create("v-0123456789ab", 8)
        await agent.stopService()
        agent.startService()
        await agent.registered

        async def listed():
            _, out = await zwrm(plane.url, "host", "status", host)
            return "not recorded by the cluster" in out and out

        out = await poll(reactor, listed, 10, 0.1, what="the stale volume listed")
        self.assertIn("kept there, not recorded by the cluster (zwrm host clean deletes them):\n"
                      "  volume v-0123456789ab  ", out)
        self.assertNotIn(kept, out.split("not recorded by the cluster")[1])
        _, out = await zwrm(plane.url, "host", "clean", host)
        self.assertEqual(out, f"host {host}: deleted 1 volume(s) (v-0123456789ab)\n")
        self.assertFalse(agent.runtime.volumes.exists("v-0123456789ab"))
        self.assertTrue(agent.runtime.volumes.exists(kept))
        _, out = await zwrm(plane.url, "host", "status", host, "--json")
        self.assertEqual(json.loads(out)["unrecorded"],
                         {"volumes": [], "snapshots": [], "machines": []})
        _, out = await zwrm(plane.url, "host", "clean", host)
        self.assertEqual(out, f"host {host}: deleted nothing\n")
        with self.assertRaises(CliError) as e:
            await zwrm(plane.url, "host", "clean", "h_0000000000000000")
        self.assertEqual(e.exception.code, EXIT_REMOTE)


class RemovalLinesTests(SynchronousTestCase):
    def test_what_a_removal_did_a_line_each(self):
        out = io.StringIO()
        host_remove.format_removal({
            "host_id": "h-a", "volumes_forgotten": ["v-2"],
            "replicas_forgotten": [{"replica_id": "r-1", "volume_id": "v-9", "host_id": "h-a"},
                                   {"replica_id": "r-2", "volume_id": "v-8", "host_id": "h-a"},
                                   {"replica_id": "r-3", "volume_id": "v-2", "host_id": "h-c"}],
            "volumes_recovered": [{"volume_id": "v-1", "host_id": "h-b", "replica_id": "r-4",
                                   "snapshot": "nightly", "taken_at": 0.0}],
            "rescheduled": [{"app": "db", "replicas": [0, 1]}], "not_placed": []}, out)
        self.assertEqual(out.getvalue().splitlines(), [
            "host h-a removed",
            "  volume v-1 recovered on h-b from its replica of snapshot nightly (taken"
            " 1970-01-01 00:00:00 UTC)",
            "  volume v-2 forgotten (its data was only on that host)",
            "  2 replica(s) it kept of volumes v-8, v-9 gone with it (zwrm volumes replicas:"
            " replicate them again elsewhere)",
            "  db: replicas 0, 1 placed again"])
