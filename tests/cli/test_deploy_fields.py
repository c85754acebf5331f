"""`zwrm deploy` sends only the fields it is given (a redeploy keeps the others); --clear."""

from twisted.trial.unittest import SynchronousTestCase

from zwrm.cli.apps import _spec, format_app
from zwrm.cli.client import CliError
from zwrm.cli.main import build_parser


def parse(*argv):
    return build_parser().parse_args(list(argv))


class DeployFieldsTests(SynchronousTestCase):
    def test_left_out_fields_are_not_sent(self):
        spec = _spec(parse("deploy", "web", "--image", "demo:2"))
        self.assertEqual(spec, {"image": "demo:2"})

    def test_a_redeploy_without_an_image_keeps_it(self):
        spec = _spec(parse("deploy", "web", "--env", "A=1", "--memory", "300"))
        self.assertNotIn("image", spec)
        self.assertEqual(spec["memory_mb"], 300)
        with self.assertRaises(CliError) as cm:
            _spec(parse("deploy", "web", "--image", "demo:2", "--kernel", "/boot/vmlinuz"))
        self.assertEqual(cm.exception.message,
                         "give --image NAME:TAG or --kernel/--disk paths, not both")

    def test_clear_and_restart_policy(self):
        spec = _spec(parse("deploy", "web", "--image", "demo:2", "--clear", "volumes",
                           "--clear", "port", "--restart", "on-failure", "--max-restarts", "3",
                           "--port", "80", "--health-tcp", "--unhealthy-threshold", "5"))
        self.assertIsNone(spec["volumes"])
        self.assertIsNone(spec["service_port"])
        self.assertEqual(spec["restart"], {"policy": "on-failure", "max_restarts": 3})
        self.assertEqual(spec["health"]["unhealthy_threshold"], 5)

    def test_status_shows_restarts(self):
        import io

        out = io.StringIO()
        format_app({"id": "a-1", "name": "web", "spec": {"image": "demo:1", "replicas": 1},
                    "volumes": [],
                    "machines": [{"id": "m-1", "replica": 0, "host_id": "h-a", "state": "failed",
                                  "health": "none", "host_port": None, "restarts": 2,
                                  "restart_reason": "QEMU was killed by signal 9",
                                  "next_restart_at": 0.0}]}, out)
        text = out.getvalue()
        self.assertIn("RESTARTS", text)
        self.assertIn("m-1: QEMU was killed by signal 9", text)

    def test_status_shows_a_paused_machine(self):
        import io

        out = io.StringIO()
        format_app({"id": "a-1", "name": "web", "spec": {"image": "demo:1", "replicas": 1},
                    "volumes": [],
                    "machines": [{"id": "m-1", "replica": 0, "host_id": "h-a",
                                  "state": "running", "paused": "disk-full",
                                  "health": "failing", "host_port": 20001, "restarts": 0}]},
                   out)
        text = out.getvalue()
        self.assertIn("running (paused: disk-full)", text)
        self.assertIn("m-1: paused: a write to one of its disks waits for room on its host's"
                      " disk; it resumes by itself once there is room", text)


    def test_status_shows_the_version_and_its_last_update(self):
        import io

        app = {"id": "a-1", "name": "web", "spec": {"image": "demo:1", "replicas": 2},
               "spec_version": 6, "volumes": [], "machines": [],
               "rollout": {"state": "progress", "version": 6, "replaced": 1, "total": 2,
                           "reason": "1 of 2 machine(s) replaced", "at": 1796576372.5}}
        out = io.StringIO()
        format_app(app, out)
        self.assertIn("version   6\nupdate    under way (2026-12-06 16:59:32 UTC): 1 of 2 "
                      "machine(s) replaced\n\nmachines (0):", out.getvalue())
        app["rollout"].update(state="failed", reason="the update of web to version 6 was "
                              "superseded by a later deploy")
        out = io.StringIO()
        format_app(app, out)
        self.assertIn("update    failed (2026-12-06 16:59:32 UTC): the update of web to "
                      "version 6 was superseded by a later deploy\n", out.getvalue())

    def test_status_shows_a_destroy_under_way(self):
        import io

        app = {"id": "a-1", "name": "web", "spec": {"image": "demo:1", "replicas": 2},
               "spec_version": 6, "volumes": [], "machines": [],
               "destroying": {"volumes": True, "since": 1796576372.5}}
        out = io.StringIO()
        format_app(app, out)
        self.assertIn("version   6\ndestroy   under way since 2026-12-06 16:59:32 UTC"
                      " (volumes too)\n\nmachines (0):", out.getvalue())
        app["destroying"]["volumes"] = False
        out = io.StringIO()
        format_app(app, out)
        self.assertIn("(volumes kept)", out.getvalue())
        # its machines out of the routes: until when (a destroy that went on after a
        # restart of the control plane waits only what is left of the delay)
        app["destroying"]["delay_ends"] = 1796576402.5
        app["machines"] = [
            {"id": f"m-{i}", "state": state, "host_id": "h_1", "replica": i, "health": None,
             "host_port": None} for i, state in ((1, "stopping"), (2, "running"))]
        out = io.StringIO()
        format_app(app, out)
        self.assertIn("destroy   under way since 2026-12-06 16:59:32 UTC (volumes kept); 1"
                      " machine(s) out of the routes, removed after 17:00:02 UTC"
                      " (shutdown_delay)\n", out.getvalue())


class RollbackArgsTests(SynchronousTestCase):
    def test_parse(self):
        args = parse("rollback", "web", "3")
        self.assertEqual((args.app, args.version), ("web", 3))
        self.assertIsNone(parse("rollback", "web").version)
        self.assertEqual(parse("apps", "history", "web").name, "web")


class PlanFormatTests(SynchronousTestCase):
    def test_format(self):
        import io

        from zwrm.cli.apps import format_plan

        out = io.StringIO()
        format_plan({"app": "web", "version": 2, "changed": True,
                     "diff": {"memory_mb": {"old": 256, "new": 512}},
                     "create": [{"replica": 2, "host_id": "h-b"}],
                     "replace": [{"machine_id": "m-1", "replica": 0, "host_id": "h-a",
                                  "state": "running", "to_host": "h-b"}],
                     "destroy": [], "keep": [], "unplaceable": None}, out)
        text = out.getvalue()
        self.assertIn("memory_mb: 256 -> 512", text)
        self.assertIn("move     m-1 (replica 0, running) on h-a -> h-b", text)
        self.assertIn("create   replica 2 on h-b", text)
        self.assertTrue(parse("deploy", "web", "--image", "x:1", "--plan").plan)


class RollingArgsTests(SynchronousTestCase):
    def test_update_settings(self):
        spec = _spec(parse("deploy", "web", "--image", "x:1", "--rolling"))
        self.assertEqual(spec["update"], {})
        spec = _spec(parse("deploy", "web", "--image", "x:1", "--max-parallel", "2",
                           "--no-auto-revert"))
        self.assertEqual(spec["update"], {"max_parallel": 2, "auto_revert": False})
        self.assertIsNone(_spec(parse("deploy", "web", "--image", "x:1", "--clear",
                                      "rolling"))["update"])

    def test_shutdown_delay(self):
        spec = _spec(parse("deploy", "web", "--image", "x:1", "--shutdown-delay", "2.5"))
        self.assertEqual(spec["shutdown_delay"], 2.5)
        self.assertNotIn("shutdown_delay", _spec(parse("deploy", "web", "--image", "x:1")))
        self.assertIsNone(_spec(parse("deploy", "web", "--image", "x:1", "--clear",
                                      "shutdown-delay"))["shutdown_delay"])
