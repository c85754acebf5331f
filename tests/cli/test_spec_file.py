"""
C{zwrm apps spec} writes an app's spec as TOML; C{zwrm deploy --file} deploys such a file as
the whole spec (a field it leaves out back to its default, but the replica count), the
options given beside it over it.  Read back and deployed unchanged, a spec is no new
version, its cloud-init secrets kept.
"""

import json
import os
import tomllib

from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.agent.test_membership import start_plane
from tests.cli.test_cli import d
from tests.cli.test_json_everywhere import zwrm
from zwrm.cli import client
from zwrm.cli.apps import SPEC_FIELDS, deploy_spec, spec_file_text
from zwrm.cli.client import EXIT_REMOTE, EXIT_USAGE, CliError
from zwrm.cli.main import build_parser
from zwrm.control import appspec
from zwrm.control.resources.apps import public_spec

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHv6vI1MiH8Ym4L0t9c7xC0t8y5m1y0gR6Xn2K4x5q7a ops"

RICH = {
    "image": {"kernel": "/boot/vmlinuz", "initrd": "/boot/initrd.img", "cmdline": "quiet"},
    "vcpus": 2, "memory_mb": 512, "replicas": 3, "region": "eu", "constraints": {"disk": "ssd"},
    "service_port": 8080,
    "health": {"type": "http", "path": "/healthz", "interval": 5, "unhealthy_threshold": 4},
    "publish": ["443:8080/https", "2222:22"], "domain": "shop.example.com",
    "volumes": [{"name": "data", "size_mb": 1024, "mount": "/data"}],
    "restart": {"policy": "on-failure", "max_restarts": 3},
    "update": {"max_parallel": 2, "min_healthy_time": 20}, "shutdown_delay": 15,
    "cloud_init": {"ssh_keys": [KEY], "user_data": "#cloud-config\npassword: hunter2\n",
                   "env": {"DB_PASSWORD": "hunter2", "MODE": "prod"}},
}


def parse(*argv):
    return build_parser().parse_args(list(argv))


class SpecFileTests(SynchronousTestCase):
    def write(self, text, name="web.toml"):
        path = os.path.join(self.mktemp(), name)
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_the_fields_are_the_control_plane_s(self):
        self.assertEqual(SPEC_FIELDS, appspec.SPEC_FIELDS)

    def test_a_spec_read_back_deploys_as_it_was(self):
        """
        Every field of a spec, through L{spec_file_text} (viewers' form: secrets as
        digests), the file and L{deploy_spec}, merged over the current spec as the control
        plane does: the same spec, and so no new version.
        """
        current = appspec.validate_spec(RICH)
        text = spec_file_text("web", 4, public_spec(current))
        self.assertNotIn("hunter2", text)
        self.assertTrue(text.startswith("# app web, spec version 4: zwrm deploy web --file"))
        given = deploy_spec(parse("deploy", "web", "--file", self.write(text)))
        self.assertEqual(appspec.validate_spec(appspec.merge_spec(current, given)), current)

    def test_a_field_left_out_is_its_default_but_the_replica_count(self):
        path = self.write('image = "web:2"\nmemory_mb = 512\nservice_port = 80\n'
                          '[health]\ntype = "tcp"\n')
        spec = deploy_spec(parse("deploy", "web", "-f", path))
        self.assertNotIn("replicas", spec)
        self.assertEqual((spec["image"], spec["memory_mb"], spec["health"]),
                         ("web:2", 512, {"type": "tcp"}))
        self.assertEqual({k for k, v in spec.items() if v is None},
                         SPEC_FIELDS - {"image", "memory_mb", "service_port", "health", "replicas"})
        current = appspec.validate_spec(RICH)
        new = appspec.validate_spec(appspec.merge_spec(current, spec))
        self.assertEqual((new["replicas"], new["volumes"], new["cloud_init"], new["region"]),
                         (3, [], None, None))
        for key in ("restart", "publish", "update", "shutdown_delay"):
            self.assertNotIn(key, new)

    def test_options_beside_it_win(self):
        path = self.write('image = "web:2"\nreplicas = 2\nmemory_mb = 512\n')
        spec = deploy_spec(parse("deploy", "web", "-f", path, "--image", "web:3",
                                 "--replicas", "4", "--env", "A=1"))
        self.assertEqual((spec["image"], spec["replicas"], spec["memory_mb"]), ("web:3", 4, 512))
        self.assertEqual(spec["cloud_init"]["env"], {"A": "1"})
        # an option's part of a table over the file's: its other keys stay
        path = self.write('image = "web:2"\n[cloud_init]\nssh_keys = ["%s"]\nenv = {A = "0"}\n'
                          '[update]\nmax_parallel = 2\nmin_healthy_time = 30\n' % KEY)
        spec = deploy_spec(parse("deploy", "web", "-f", path, "--env", "B=1",
                                 "--max-parallel", "3"))
        self.assertEqual(spec["cloud_init"], {"ssh_keys": [KEY], "env": {"B": "1"}})
        self.assertEqual(spec["update"], {"max_parallel": 3, "min_healthy_time": 30})
        # a file without an image, the image given beside it
        path = self.write("memory_mb = 512\n")
        self.assertEqual(deploy_spec(parse("deploy", "web", "-f", path, "--image", "web:3"))
                         ["image"], "web:3")

    def test_json(self):
        path = self.write(json.dumps({"image": "web:2", "replicas": 2}), "web.json")
        spec = deploy_spec(parse("deploy", "web", "-f", path))
        self.assertEqual((spec["image"], spec["replicas"]), ("web:2", 2))

    def test_mistakes_are_one_line_and_usage_errors(self):
        for text, extra, message in [
            ('imgae = "web:2"\n', (), "{path}: unknown field(s) imgae (a spec's fields are "
             + ", ".join(sorted(SPEC_FIELDS)) + ")"),
            ('image = "web:2"\nreplicas = two\n', (),
             "{path}: Invalid value (at line 2, column 12)"),
            ("memory_mb = 512\n", (),
             '{path} has no image: give image = "NAME:TAG" in it, or --image'),
            ('image = "web:2"\n', ("--clear", "health"),
             "--clear does not go with --file: a field the file leaves out is back to its "
             "default"),
            ("\xff", (), None),
        ]:
            path = self.write(text)
            if message is None:
                with open(path, "wb") as f:
                    f.write(b"\xff\xfe")
                message = f"spec file {path} is not UTF-8 text"
            e = self.assertRaises(CliError, deploy_spec, parse("deploy", "web", "-f", path, *extra))
            self.assertEqual((e.code, e.message), (EXIT_USAGE, message.format(path=path)))
        path = self.write("[1, 2]", "web.json")
        e = self.assertRaises(CliError, deploy_spec, parse("deploy", "web", "-f", path))
        self.assertEqual(e.message, f"{path}: a spec is a table of fields, not list")
        e = self.assertRaises(CliError, deploy_spec, parse("deploy", "web", "-f", "/nonexistent"))
        self.assertEqual(e.message, "spec file /nonexistent: No such file or directory")


class AgainstAControlPlaneTests(TestCase):
    timeout = 60

    @d
    async def test_read_back_edit_deploy(self):
        plane, tmp = await start_plane(self)
        self.patch(client.os, "environ", {"ZWRM_TOKEN": plane.operator_token})
        await zwrm(plane.url, "apps", "create", "web")
        await zwrm(plane.url, "deploy", "web", "--kernel", "/boot/vmlinuz",
                             "--replicas", "0", "--memory", "128", "--port", "80",
                             "--health-tcp", "--volume", "data:64:/data", "--env", "SECRET=s3")
        code, text = await zwrm(plane.url, "apps", "spec", "web")
        self.assertNotIn("s3", text)
        path = os.path.join(tmp, "web.toml")
        with open(path, "w") as f:
            f.write(text)
        code, out = await zwrm(plane.url, "deploy", "web", "--file", path, "--json")
        self.assertEqual(json.loads(out)["spec_version"], 1)  # the same spec: no new version

        spec = tomllib.loads(text)
        spec["memory_mb"] = 256
        del spec["health"]
        with open(path, "w") as f:
            f.write(json.dumps(spec))
        os.rename(path, path[:-4] + "json")
        code, out = await zwrm(plane.url, "deploy", "web", "-f", path[:-4] + "json", "--json")
        status = json.loads(out)
        self.assertEqual((status["spec_version"], status["spec"]["memory_mb"],
                          status["spec"]["health"]), (2, 256, None))
        self.assertEqual(status["spec"]["cloud_init"]["env"]["size"], len('{"SECRET": "s3"}'))

        code, out = await zwrm(plane.url, "apps", "spec", "web", "1", "--json")
        self.assertEqual(json.loads(out)["memory_mb"], 128)
        with self.assertRaises(CliError) as e:
            await zwrm(plane.url, "apps", "spec", "web", "7")
        self.assertEqual((e.exception.code, e.exception.message),
                         (EXIT_REMOTE, "app web has no spec version 7 (kept: 1, 2)"))
        await zwrm(plane.url, "apps", "create", "fresh")
        with self.assertRaises(CliError) as e:
            await zwrm(plane.url, "apps", "spec", "fresh")
        self.assertEqual(e.exception.message, "app fresh has no spec yet: deploy it first")
        # a viewer reads the current spec too (from the app's status: the history is the
        # operators')
        viewer = await zwrm(plane.url, "tokens", "create", "--role", "viewer")
        self.patch(client.os, "environ", {"ZWRM_TOKEN": viewer[1].strip(), "ZWRM_AUTHID": "viewer"})
        _, read = await zwrm(plane.url, "apps", "spec", "web")
        self.assertEqual(tomllib.loads(read), {k: v for k, v in spec.items() if k != "health"})
        self.assertTrue(read.startswith("# app web, spec version 2:"), read)
        self.patch(client.os, "environ", {"ZWRM_TOKEN": plane.operator_token})
        for plan in ((), ("--plan",)):  # an app to create first
            with self.assertRaises(CliError) as e:
                await zwrm(plane.url, "deploy", "web2", "-f", path[:-4] + "json", *plan)
            self.assertEqual(e.exception.message,
                             "no app 'web2': create it first (zwrm apps create web2)")
        # (zwrm status without an app lists them, as nomad status does)
        _, out = await zwrm(plane.url, "status")
        self.assertEqual([line.split()[0] for line in out.splitlines()], ["NAME", "fresh", "web"])
