"""The zwrm command: settings, parsing, output, one-line errors, against a real control plane."""

import io
import json
import os
import time

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.agent.test_membership import make_agent, start_plane
from zwrm import pki
from zwrm.cli import apps, client, host, host_remove, main
from zwrm.cli.client import CliError
from zwrm.testing.processes import poll, temp_dir


def d(f):
    def wrapper(self):
        return ensureDeferred(f(self))

    wrapper.__name__ = f.__name__
    return wrapper


HOST = {
    "id": "h-1", "name": "w1", "region": "eu", "datacenter": "dc1", "address": "10.0.0.1",
    "labels": {"a": "b"}, "state": "ready", "state_before_offline": None, "vcpus": 8,
    "memory_mb": 16384, "disk_mb": 1000, "alloc_vcpus": 2, "alloc_memory_mb": 512,
    "alloc_disk_mb": 0, "machines": 1, "heartbeat_age": 3.2, "last_heartbeat": 1.0,
    "agent_version": "0.1.0", "joined_at": 0.0, "executor": True,
}


class SettingsTests(SynchronousTestCase):
    def write(self, name, text, mode=0o600):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def setUp(self):
        self.dir = temp_dir(self)

    def test_precedence(self):
        path = self.write("config.toml", 'api_url = "ws://file:1/ws"\ntoken = "file-token"\n')
        s = client.load_settings(None, {}, path)
        self.assertEqual((s["url"], s["token"], s["authid"]), ("ws://file:1/ws", "file-token", "operator"))
        s = client.load_settings(None, {"ZWRM_API_URL": "ws://env:2/ws", "ZWRM_TOKEN": "t"}, path)
        self.assertEqual((s["url"], s["token"]), ("ws://env:2/ws", "t"))
        s = client.load_settings("ws://flag:3/ws", {"ZWRM_API_URL": "ws://env:2/ws"}, path)
        self.assertEqual(s["url"], "ws://flag:3/ws")

    def test_system_then_user_file(self):
        """/etc/zwrm/cli.toml, then ~/.zwrm/config.toml, a key in the user's file winning."""
        token = self.write("op.token", "secret-from-file\n")
        ca = self.write("ca.pem", pki.CertificateAuthority.create().certificate_pem.decode())
        system = self.write("cli.toml", f'url = "https://cp.example:8080"\nca_file = "{ca}"\n'
                                        f'token_file = "{token}"\ntimeout = 5\n')
        user = self.write("user.toml", 'token = "user-token"\n')
        self.patch(client, "SYSTEM_CONFIG", system)
        self.patch(client, "config_path", lambda: user)
        s = client.load_settings(None, {})
        self.assertEqual((s["url"], s["token"], s["ca_file"], s["timeout"]),
                         ("wss://cp.example:8080/ws", "user-token", ca, 5.0))
        os.remove(user)
        s = client.load_settings(None, {})
        self.assertEqual(s["token"], "secret-from-file")
        self.assertTrue(s["ca_pem"].startswith(b"-----BEGIN CERTIFICATE"))
        # $ZWRM_CONFIG names the one file to read
        other = self.write("other.toml", 'url = "http://10.0.0.1:9"\ntoken = "o"\n')
        s = client.load_settings(None, {"ZWRM_CONFIG": other})
        self.assertEqual((s["url"], s["token"], s["ca_file"]), ("ws://10.0.0.1:9/ws", "o", None))
        e = self.assertRaises(CliError, client.load_settings, None,
                              {"ZWRM_CONFIG": os.path.join(self.dir, "none.toml")})
        self.assertEqual(e.code, client.EXIT_CONFIG)
        self.assertIn("none.toml ($ZWRM_CONFIG) does not exist", e.message)

    def test_urls(self):
        for given, ws in [("https://cp.example:8080", "wss://cp.example:8080/ws"),
                          ("https://cp.example:8080/", "wss://cp.example:8080/ws"),
                          ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/ws"),
                          ("wss://[::1]:8443/ws", "wss://[::1]:8443/ws"),
                          ("ws://h:1", "ws://h:1/ws"), ("HTTPS://h:2/ws", "wss://h:2/ws")]:
            self.assertEqual(client.normalize_url(given), ws, given)
        for bad, text in [("ftp://h:1", "scheme 'ftp'"), ("cp.example:8080", "scheme 'cp.example'"),
                          ("http//nope", "no scheme"), ("https://", "no host"),
                          ("https://h:port", "bad port")]:
            e = self.assertRaises(CliError, client.normalize_url, bad)
            self.assertEqual(e.code, client.EXIT_URL, bad)
            self.assertIn(text, e.message)
        e = self.assertRaises(CliError, client.load_settings, "ftp://x:1", {"ZWRM_TOKEN": "t"}, "/none")
        self.assertEqual(e.code, client.EXIT_URL)

    def test_missing_files_name_the_path_and_setting(self):
        path = self.write("c.toml", f'url = "https://h:1"\ntoken_file = "{self.dir}/gone.token"\n')
        e = self.assertRaises(CliError, client.load_settings, None, {}, path)
        self.assertEqual((e.code, e.message), (
            client.EXIT_CONFIG,
            f"token file {self.dir}/gone.token (token_file, set in {path}) does not exist"))
        e = self.assertRaises(CliError, client.load_settings, None,
                              {"ZWRM_TOKEN": "t", "ZWRM_CA_FILE": f"{self.dir}/gone.pem"}, path)
        self.assertEqual((e.code, e.message), (
            client.EXIT_CONFIG,
            f"CA file {self.dir}/gone.pem (ca_file, from $ZWRM_CA_FILE) does not exist"))
        garbage = self.write("garbage.pem", "not a certificate")
        e = self.assertRaises(CliError, client.load_settings, None,
                              {"ZWRM_TOKEN": "t", "ZWRM_CA_FILE": garbage}, path)
        self.assertEqual(e.code, client.EXIT_CONFIG)
        self.assertIn("is not a PEM certificate", e.message)
        if os.geteuid() != 0:
            locked = self.write("locked.token", "x", mode=0)
            path = self.write("d.toml", f'token_file = "{locked}"\n')
            e = self.assertRaises(CliError, client.load_settings, None, {}, path)
            self.assertEqual(e.code, client.EXIT_CONFIG)
            self.assertIn(f"cannot read token file {locked} (token_file, set in {path})", e.message)

    def test_no_token_and_bad_file(self):
        e = self.assertRaises(CliError, client.load_settings, None, {}, "/nonexistent")
        self.assertEqual(e.code, client.EXIT_CONFIG)
        self.assertIn("ZWRM_TOKEN", e.message)
        path = self.write("bad.toml", "this is = = not toml")
        e = self.assertRaises(CliError, client.load_settings, None, {}, path)
        self.assertEqual(e.code, client.EXIT_CONFIG)
        path = self.write("typo.toml", 'ca-file = "x"\n')
        e = self.assertRaises(CliError, client.load_settings, None, {}, path)
        self.assertIn("unknown setting 'ca-file'", e.message)
        path = self.write("t.toml", 'token = "t"\ntimeout = -1\n')
        e = self.assertRaises(CliError, client.load_settings, None, {}, path)
        self.assertIn("timeout must be a positive number", e.message)


class ParserTests(SynchronousTestCase):
    def test_commands(self):
        parser = main.build_parser()
        args = parser.parse_args(["--api-url", "ws://x:1/ws", "host", "list", "--json"])
        self.assertEqual((args.api_url, args.json, args.func), ("ws://x:1/ws", True, host.host_list))
        args = parser.parse_args(["host", "status", "h-1"])
        self.assertEqual((args.host_id, args.func), ("h-1", host.host_status))

    def test_either_number(self):
        """
        A command naming a kind of object takes it singular or plural: the same subcommands.
        """
        parser = main.build_parser()
        for one, other in (("host", "hosts"), ("apps", "app"), ("machines", "machine"),
                           ("volumes", "volume"), ("tokens", "token"), ("images", "image"),
                           ("certs", "cert")):
            args = [vars(parser.parse_args([name, "list"])) for name in (one, other)]
            self.assertEqual([a.pop("command") for a in args], [one, other])
            self.assertEqual(args[0], args[1], other)

    def test_usage_error_is_one_line(self):
        err = io.StringIO()
        self.patch(main.sys, "stderr", err)
        import sys

        self.patch(sys, "stderr", err)
        e = self.assertRaises(SystemExit, main.build_parser().parse_args, ["host"])
        self.assertEqual(e.code, client.EXIT_USAGE)
        self.assertEqual(len(err.getvalue().strip().splitlines()), 1)


    def test_an_unknown_argument_points_at_its_command_s_help(self):
        import sys

        for argv, prog in ((["events", "--until", "5m"], "zwrm events"),
                           (["host", "drain", "h-1", "--bogus"], "zwrm host drain"),
                           (["--bogus", "apps", "list"], "zwrm"),
                           (["status", "web", "extra"], "zwrm status")):
            err = io.StringIO()
            self.patch(sys, "stderr", err)
            e = self.assertRaises(SystemExit, main.parse_args, main.build_parser(), argv)
            self.assertEqual(e.code, client.EXIT_USAGE)
            extra = " ".join(a for a in argv if a.startswith("--") or a in ("5m", "extra"))
            self.assertEqual(err.getvalue(), f"zwrm: unrecognized arguments: {extra} (see "
                                             f"{prog} --help)\n", argv)
        args = main.parse_args(main.build_parser(), ["host", "list", "--json"])
        self.assertEqual((args.json, args.func), (True, host.host_list))


class FormatTests(SynchronousTestCase):
    def test_list_table(self):
        out = io.StringIO()
        host.format_hosts([HOST], out)
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[0].split(), ["ID", "NAME", "REGION", "DATACENTER", "STATE", "VCPU",
                                            "MEMORY(MiB)", "MACHINES", "HEARTBEAT"])
        self.assertEqual(lines[1].split(), ["h-1", "w1", "eu", "dc1", "ready", "2/8", "512/16384",
                                            "1", "3s"])
        # its agent stopped (or restarting, or cut off), the host not offline yet
        out = io.StringIO()
        host.format_hosts([dict(HOST, executor=False), dict(HOST, executor=False,
                                                             state="offline")], out)
        lines = out.getvalue().splitlines()
        self.assertIn(" ready (agent not connected) ", lines[1])
        self.assertEqual(lines[2].split()[4], "offline")

    def test_status(self):
        out = io.StringIO()
        status = dict(HOST, machine_list=[{"id": "m1", "app_id": "a-1f", "app": "web",
                                           "state": "running"}],
                      events=[{"ts": 0, "kind": "state", "payload": {"state": "offline",
                                                                      "reason": "heartbeat_lost"}}])
        host.format_status(status, out)
        text = out.getvalue()
        self.assertIn("labels                a=b", text)
        self.assertIn("\nm1  web  running\n", text)  # the app by its name
        self.assertIn("offline (heartbeat_lost)", text)
        self.assertIn("disk                  0 of 1000 MiB allocated\n", text)  # no figure yet
        self.assertIn("host certificate      -\n", text)  # no heartbeat said yet
        self.assertIn("fence                 off (fence_after 0: power the host off before"
                      " zwrm host remove --recover-volumes)\n", text)
        out = io.StringIO()
        host.format_status(dict(status, fence_after=60.0), out)
        self.assertIn("fence                 its agent stops its machines with volumes 60 s"
                      " after the control plane last answered (fence_after)\n", out.getvalue())

    def test_volumes_of_every_app_name_their_apps(self):
        volume = {"id": "v-1", "app_id": "a-1f", "app": "db", "name": "data", "replica": 0,
                  "host_id": "h-1", "size_mb": 64, "mount": "/data", "state": "ready"}
        out = io.StringIO()
        apps.format_volumes([volume], out, apps=True)
        self.assertEqual([line.split() for line in out.getvalue().splitlines()],
                         [["ID", "APP", "NAME", "REPLICA", "HOST", "SIZE(MiB)", "MOUNT", "STATE"],
                          ["v-1", "db", "data", "0", "h-1", "64", "/data", "ready"]])
        out = io.StringIO()  # one app's (zwrm status APP, volumes list --app): no APP column
        apps.format_volumes([volume], out)
        self.assertEqual(out.getvalue().split()[:3], ["ID", "NAME", "REPLICA"])

    def test_status_a_paused_machine(self):
        out = io.StringIO()
        host.format_status(dict(HOST, events=[], machine_list=[
            {"id": "m1", "app_id": "a", "state": "running", "paused": "disk-full"},
            {"id": "m2", "app_id": "a", "state": "running", "paused": None}]), out)
        text = out.getvalue()
        self.assertIn("m1  a    running (paused: disk-full)", text)
        self.assertIn("  m1: paused: a write to one of its disks waits for room on its host's"
                      " disk; it resumes by itself once there is room\n", text)
        self.assertNotIn("m2: paused", text)

    def test_status_host_certificate(self):
        out = io.StringIO()
        expires = time.time() + 100.4 * 86400
        host.format_status(dict(HOST, machine_list=[], events=[],
                                stats={"host_certificate_expires_at": expires}), out)
        self.assertIn(
            "host certificate      valid until "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expires))} (100 days left;"
            " its agent renews it with a third left)\n", out.getvalue())

    def test_status_disk_free(self):
        status = dict(HOST, machine_list=[], events=[], stats={"disk_free_mb": 900})
        out = io.StringIO()
        host.format_status(status, out)
        self.assertIn("disk                  0 of 1000 MiB allocated, 900 MiB free\n",
                      out.getvalue())
        out = io.StringIO()
        host.format_status(dict(status, stats={"disk_free_mb": 3}, disk_full=True), out)
        self.assertIn("0 of 1000 MiB allocated, 3 MiB free (nearly full: no new placements)\n",
                      out.getvalue())


class WorkingLineTests(SynchronousTestCase):
    """What a copy's progress shows on a terminal (and nowhere else)."""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def test_a_line_every_few_seconds_on_a_terminal(self):
        err = self.Terminal()
        show = client.working("replicating", err)
        for p in ({"elapsed": 2.0}, {"elapsed": 5.0, "done": 3 << 20, "total": 8 << 20},
                  {"elapsed": 7.0, "done": 4 << 20, "total": 8 << 20}, {"elapsed": 10.0}):
            show(p)
        self.assertEqual(err.getvalue(), "replicating: 5 s, 3 of 8 MiB\nreplicating: 10 s\n")

    def test_nothing_in_a_log(self):
        err = io.StringIO()
        client.working("replicating", err)({"elapsed": 60.0})
        self.assertEqual(err.getvalue(), "")


class Args:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class LiveTests(TestCase):
    """The host commands against an in-process control plane over a real socket."""

    timeout = 60

    @d
    async def test_list_and_status(self):
        plane, tmp = await start_plane(self)
        agent = make_agent(self, plane, os.path.join(tmp, "a1"))
        await agent.registered
        env = {"ZWRM_TOKEN": plane.operator_token}
        self.patch(client.os, "environ", env)
        out = io.StringIO()
        await host.host_list(reactor, Args(api_url=plane.url, json=True), out)
        hosts = json.loads(out.getvalue())
        self.assertEqual([(h["name"], h["state"]) for h in hosts], [("a1", "ready")])
        out = io.StringIO()
        await host.host_status(reactor, Args(api_url=plane.url, json=False, host_id=hosts[0]["id"],
                                             events=20), out)
        self.assertIn("joined", out.getvalue())
        self.assertIn("\nrecent events (2):\n", out.getvalue())
        out = io.StringIO()  # --events N: its newest N
        await host.host_status(reactor, Args(api_url=plane.url, json=False, host_id=hosts[0]["id"],
                                             events=1), out)
        self.assertIn("\nrecent events (1):\n", out.getvalue())
        self.assertNotIn("joined", out.getvalue())
        with self.assertRaises(CliError) as e:
            await host.host_status(reactor, Args(api_url=plane.url, json=False, host_id="h-x",
                                                 events=20), out)
        self.assertEqual((e.exception.code, e.exception.message), (1, "no host 'h-x'"))
        env["ZWRM_TOKEN"] = "bad"
        with self.assertRaises(CliError) as e:
            await host.host_list(reactor, Args(api_url=plane.url, json=True), out)
        self.assertEqual(e.exception.code, client.EXIT_AUTH)
        env["ZWRM_TOKEN"] = plane.operator_token
        with self.assertRaises(CliError) as e:
            await host.host_list(reactor, Args(api_url="ws://127.0.0.1:1/ws", json=True), out)
        self.assertEqual(e.exception.code, client.EXIT_UNREACHABLE)
        self.assertIn("connection refused", e.exception.message)
        with self.assertRaises(CliError) as e:
            await host.host_list(reactor, Args(api_url="http//nope", json=True), out)
        self.assertEqual(e.exception.code, client.EXIT_URL)

    @d
    async def test_list_says_where_a_partition_holds(self):
        plane, tmp = await start_plane(self)
        agents = [make_agent(self, plane, os.path.join(tmp, n), name=n) for n in ("a1", "a2")]
        for agent in agents:
            await agent.registered
        ids = sorted(a.identity.host_id for a in agents)
        self.patch(client.os, "environ", {"ZWRM_TOKEN": plane.operator_token})
        out = io.StringIO()
        await host.host_list(reactor, Args(api_url=plane.url, json=False), out)
        self.assertNotIn("partition", out.getvalue())
        # both hosts of dc1 lost in one check of the monitor: the guard holds them
        for agent in agents:
            await agent.stopService()
        for host_id in ids:
            await plane.registry.mark_offline(host_id)
        plane.healer.check_done(ids)
        # (decided once its settle window, 1.5 heartbeat intervals, has passed)
        await poll(reactor, lambda: plane.healer.partitioned, 10, 0.05, "the partition held")
        out = io.StringIO()
        await host.host_list(reactor, Args(api_url=plane.url, json=False), out)
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                              time.gmtime(plane.healer.partitions()[0]["since"]))
        self.assertEqual(out.getvalue().split("\n\n", 1)[1], (
            f"datacenter dc1: partitioned since {since}: 100% of its hosts are offline"
            f" (threshold 55%); the replicas of the hosts held ({ids[0]}, {ids[1]}) are not"
            " placed elsewhere until enough hosts return\n"))
        out = io.StringIO()
        await host.host_list(reactor, Args(api_url=plane.url, json=True), out)
        self.assertEqual(len(json.loads(out.getvalue())), 2)  # the JSON is the hosts alone
        out = io.StringIO()
        await host.host_status(reactor, Args(api_url=plane.url, json=False, host_id=ids[0],
                                             events=20), out)
        self.assertIn(f"partition             its replicas are held: datacenter dc1 partitioned"
                      f" since {since} (zwrm host list)\n", out.getvalue())

    @d
    async def test_remove(self):
        plane, tmp = await start_plane(self)
        data_dir = os.path.join(tmp, "a1")
        agent = make_agent(self, plane, data_dir)
        await agent.registered
        host_id = agent.identity.host_id
        first_credential = agent.identity.credential
        self.patch(client.os, "environ", {"ZWRM_TOKEN": plane.operator_token})
        out = io.StringIO()
        args = Args(api_url=plane.url, json=False, host_id=host_id, forget_volumes=False,
                    recover_volumes=False)
        with self.assertRaises(CliError) as e:
            await host_remove.host_remove(reactor, args, out)
        self.assertEqual(e.exception.code, client.EXIT_REMOTE)
        self.assertIn(f"host {host_id} is ready, not offline", e.exception.message)
        self.assertNotIn("\n", e.exception.message)
        self.assertEqual(plane.registry.host_ids(), [host_id])
        # retired: its agent stopped, the host marked offline, then removed
        await agent.stopService()
        await plane.registry.mark_offline(host_id)
        self.assertEqual(await host_remove.host_remove(reactor, args, out), 0)
        self.assertEqual(out.getvalue(), f"host {host_id} removed\n")
        self.assertEqual(plane.registry.host_ids(), [])
        self.assertIsNone(await plane.store.get("hosts", host_id))
        # the same machine installed again joins as a new host, with a new credential
        agent2 = make_agent(self, plane, data_dir)
        await agent2.registered
        self.assertEqual((agent2.identity.host_id, plane.registry.state(host_id)),
                         (host_id, "ready"))
        self.assertNotEqual(agent2.identity.credential, first_credential)
        self.assertEqual(agent2.last_error,
                         f"the control plane at {plane.url} rejected our credential: unknown"
                         f" host '{host_id}' (it never joined, or was removed); join it with a"
                         " join token")

    @d
    async def test_run_reports_one_line(self):
        err = io.StringIO()
        self.patch(main.sys, "stderr", err)

        async def boom(reactor, args):
            raise CliError("it broke", 3)

        with self.assertRaises(SystemExit) as e:
            await main._run(reactor, Args(func=boom))
        self.assertEqual((e.exception.code, err.getvalue()), (3, "zwrm: it broke\n"))

        async def bug(reactor, args):
            raise KeyError("x")

        with self.assertRaises(SystemExit) as e:
            await main._run(reactor, Args(func=bug))
        self.assertEqual(e.exception.code, 70)
        self.assertNotIn("Traceback", err.getvalue())

    @d
    async def test_output_closed_early_is_silent(self):
        """
        Its reader gone (C{zwrm host list | head}): exit 141, as a command SIGPIPE ends, no
        line; stdout then goes nowhere (so the interpreter's last flush cannot fail).
        """
        err = io.StringIO()
        self.patch(main.sys, "stderr", err)
        read, write = os.pipe()
        os.close(read)
        out = os.fdopen(write, "w")
        self.addCleanup(out.close)
        self.patch(main.sys, "stdout", out)

        async def lister(reactor, args):
            out.write("ID  NAME\n" * 10000)
            out.flush()

        with self.assertRaises(SystemExit) as e:
            await main._run(reactor, Args(func=lister))
        self.assertEqual((e.exception.code, err.getvalue()), (141, ""))
        out.write("more\n")
        out.flush()  # (onto /dev/null now)
