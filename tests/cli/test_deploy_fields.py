"""`zwrm deploy` sends only the fields it is given (a redeploy keeps the others); --clear."""

from twisted.trial.unittest import SynchronousTestCase

from zwrm.cli.apps import _spec, format_app
from zwrm.cli.main import build_parser


def parse(*argv):
    return build_parser().parse_args(list(argv))


class DeployFieldsTests(SynchronousTestCase):
    def test_left_out_fields_are_not_sent(self):
        spec = _spec(parse("deploy", "web", "--image", "demo:2"))
        self.assertEqual(spec, {"image": "demo:2"})

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


class RollbackArgsTests(SynchronousTestCase):
    def test_parse(self):
        args = parse("rollback", "web", "3")
        self.assertEqual((args.app, args.version), ("web", 3))
        self.assertIsNone(parse("rollback", "web").version)
        self.assertEqual(parse("apps", "history", "web").name, "web")
