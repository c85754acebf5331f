"""
A name checked by a regular expression is the whole text: each pattern ends with C{\\Z}, not
C{$}, which also matches before a final newline (a volume named C{"d\\n"} was taken by a
deploy, a cloud-init hostname C{"web\\n"} by a driver, a certificate's domain C{"a.example\\n"}
by C{zwrm certs add}).
"""

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

from tests.wamp.test_uris import source_trees
from zwrm import errors
from zwrm.agent.network.agent import CERT_DOMAIN_RE
from zwrm.agent.transfer.wire import _VOLUME_ID
from zwrm.console import policy
from zwrm.control import appspec
from zwrm.control.resources.certs import check_domain
from zwrm.drivers import cloudinit
from zwrm.drivers.spec import _MAC_RE, _TAP_RE
from zwrm.registry.resource import MEDIA_TYPE_RE, ROUTES
from zwrm.wamp.router import _uri_ok
from zwrm.wamp.uri import is_strict_uri


class TrailingNewlineTests(SynchronousTestCase):
    def test_a_deploy_s_volume_name(self):
        spec = {"image": "demo:1", "volumes": [{"name": "d", "mount": "/d"}]}
        self.assertEqual(appspec.validate_spec(spec)["volumes"][0]["name"], "d")
        with self.assertRaises(errors.InvalidArgument):
            appspec.validate_spec({"image": "demo:1", "volumes": [{"name": "d\n", "mount": "/d"}]})

    def test_cloud_init(self):
        cloudinit.validate({"env": {"A": "x"}, "hostname": "web"})
        for cfg in ({"env": {"A\n": "x"}}, {"hostname": "web\n"}):
            with self.assertRaises(errors.InvalidArgument, msg=repr(cfg)):
                cloudinit.validate(cfg)

    def test_a_certificate_s_domain(self):
        self.assertEqual(check_domain("A.example"), "a.example")
        with self.assertRaises(errors.InvalidArgument):
            check_domain("a.example\n")
        self.assertIsNone(CERT_DOMAIN_RE.match("a.example\n"))

    def test_uris(self):
        self.assertTrue(is_strict_uri("zwrm.host.list") and _uri_ok("zwrm.host.list"))
        self.assertFalse(is_strict_uri("zwrm.host.list\n"))
        self.assertFalse(is_strict_uri("zwrm.event.\n", "prefix"))
        self.assertFalse(_uri_ok("zwrm.host.list\n"))

    def test_the_rest(self):
        for pattern, good in [(_VOLUME_ID, "v-1"), (_TAP_RE, "zt0"),
                              (_MAC_RE, "52:54:00:12:34:56"),
                              (MEDIA_TYPE_RE, "application/vnd.oci.image.manifest.v1+json")]:
            self.assertIsNotNone(pattern.match(good))
            self.assertIsNone(pattern.match(good + "\n"), pattern.pattern)
        for _name, route in ROUTES:
            self.assertIsNone(route.match("app/tags/list\n"))
        # (a Host header the console's policy names: never one that ends a header line)
        self.assertNotIn(b"a.example", policy(b"a.example\n"))
        self.assertIn(b"ws://a.example", policy(b"a.example"))


class RuleTests(SynchronousTestCase):
    def test_no_pattern_ends_with_a_dollar(self):
        """Every pattern zwrm compiles ends with C{\\Z} where it means the end of the text."""
        found = []
        for path, tree in source_trees():
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "compile"
                        and getattr(node.func.value, "id", None) == "re" and node.args):
                    if ast.unparse(node.args[0]).rstrip("'\"").endswith("$"):
                        found.append(f"{os.path.relpath(path)}:{node.lineno}")
        self.assertEqual(found, [])
