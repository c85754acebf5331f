"""
The web console's static resource (L{zwrm.console}): what it serves, with which content
types and security headers, and what it never serves (unknown paths, directories, files of
unknown types, paths outside its directory). In memory with C{DummyRequest}, plus one
request over a real socket to a started control plane, which mounts it at C{/}.
"""

import json
import os
import re

import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase
from twisted.web import resource
from twisted.web.error import UnsupportedMethod
from twisted.web.test.requesthelper import DummyRequest

from zwrm.console import STATIC, VENDOR_AUTOBAHN, Console, load, policy
from zwrm.control import appspec
from zwrm.control.service import ControlPlane
from zwrm.control.tap import Config
from zwrm.testing.processes import temp_dir
from zwrm.web import Root


def site_root(directory):
    root = Root()  # as the control plane's
    Console(directory).mount(root)
    return root


def get(root, path, method=b"GET", headers=None):
    """Render C{path} of C{root}; return the finished L{DummyRequest} and its body."""
    segments = path.lstrip(b"/").split(b"/")
    request = DummyRequest(segments)
    request.method = method
    request.uri = path
    for k, v in (headers or {}).items():
        request.requestHeaders.setRawHeaders(k, [v])
    request.requestHeaders.setRawHeaders(b"host", [b"cp.example:8080"])
    child = resource.getChildForRequest(root, request)
    body = child.render(request)
    if isinstance(body, bytes):
        request.write(body)
    return request, b"".join(request.written)


def header(request, name):
    values = request.responseHeaders.getRawHeaders(name)
    return values[0] if values else None


class StaticTests(TestCase):
    def setUp(self):
        self.dir = temp_dir(self)
        os.makedirs(os.path.join(self.dir, "vendor"))
        files = {"index.html": b"<!doctype html><p>console</p>", "app.js": b"export {};",
                 "app.css": b"body{}", "favicon.svg": b"<svg/>", VENDOR_AUTOBAHN: b"var autobahn;",
                 "notes.md": b"# not served", ".hidden.js": b"secret"}
        for name, body in files.items():
            with open(os.path.join(self.dir, name), "wb") as f:
                f.write(body)
        os.symlink("/etc/passwd", os.path.join(self.dir, "passwd.txt"))
        self.root = site_root(self.dir)

    def test_page_at_the_root(self):
        request, body = get(self.root, b"/")
        self.assertEqual(request.responseCode or 200, 200)
        self.assertEqual(body, b"<!doctype html><p>console</p>")
        self.assertEqual(header(request, b"content-type"), b"text/html; charset=utf-8")

    def test_content_types(self):
        for path, ctype in [(b"/console/app.js", b"text/javascript; charset=utf-8"),
                            (b"/console/app.css", b"text/css; charset=utf-8"),
                            (b"/console/favicon.svg", b"image/svg+xml"),
                            (b"/console/vendor/autobahn.min.js", b"text/javascript; charset=utf-8")]:
            request, body = get(self.root, path)
            self.assertEqual((request.responseCode or 200, header(request, b"content-type")),
                             (200, ctype), path)
            self.assertEqual(header(request, b"x-content-type-options"), b"nosniff")
            self.assertTrue(body)

    def test_security_headers(self):
        for path in (b"/", b"/console/app.js", b"/console/nothing.js"):
            request, _ = get(self.root, path)
            csp = header(request, b"content-security-policy")
            self.assertIsNotNone(csp, path)
            directives = dict(d.strip().split(b" ", 1) for d in csp.split(b";"))
            self.assertEqual(directives[b"default-src"], b"'none'")
            self.assertEqual(directives[b"script-src"], b"'self'")
            self.assertEqual(directives[b"style-src"], b"'self'")
            self.assertEqual(directives[b"frame-ancestors"], b"'none'")
            self.assertNotIn(b"unsafe", csp)
            self.assertEqual(directives[b"connect-src"],
                             b"'self' ws://cp.example:8080 wss://cp.example:8080")
            self.assertEqual(header(request, b"x-frame-options"), b"DENY")
            self.assertEqual(header(request, b"referrer-policy"), b"no-referrer")

    def test_a_strange_host_header_is_not_repeated(self):
        self.assertEqual(policy(b"evil.example; script-src *").count(b"script-src"), 1)
        self.assertIn(b"connect-src 'self';", policy(b"evil.example; script-src *"))
        self.assertIn(b"ws://[::1]:8080", policy(b"[::1]:8080"))

    def test_unknown_paths_are_404(self):
        for path in (b"/console/nothing.js", b"/console/notes.md", b"/console/.hidden.js",
                     b"/console/passwd.txt", b"/console/../index.html", b"/console/vendor/../app.js",
                     b"/console/%2e%2e/index.html", b"/console/index.html"):
            request, body = get(self.root, path)
            self.assertEqual(request.responseCode, 404, path)
            self.assertEqual(body, b"not found\n")
        request, _ = get(self.root, b"/nothing")
        self.assertEqual(request.responseCode, 404)

    def test_no_directory_listing(self):
        for path in (b"/console/", b"/console", b"/console/vendor", b"/console/vendor/"):
            request, body = get(self.root, path)
            self.assertEqual(request.responseCode, 404, path)
            self.assertNotIn(b"app.js", body)

    def test_only_get_and_head(self):
        request, body = get(self.root, b"/console/app.js", method=b"HEAD")
        self.assertEqual(header(request, b"content-type"), b"text/javascript; charset=utf-8")
        # the site answers 405 Method Not Allowed to this
        with self.assertRaises(UnsupportedMethod) as c:
            get(self.root, b"/console/app.js", method=b"POST")
        self.assertEqual(set(c.exception.allowedMethods), {b"GET", b"HEAD"})

    def test_etag(self):
        request, _ = get(self.root, b"/console/app.js")
        etag = header(request, b"etag")
        again, body = get(self.root, b"/console/app.js", headers={b"if-none-match": etag})
        self.assertEqual((again.responseCode, body), (304, b""))

    def test_files_are_read_once(self):
        with open(os.path.join(self.dir, "late.js"), "wb") as f:
            f.write(b"new")
        request, _ = get(self.root, b"/console/late.js")
        self.assertEqual(request.responseCode, 404)

    def test_incomplete_console_is_reported(self):
        os.remove(os.path.join(self.dir, VENDOR_AUTOBAHN))
        self.assertFalse(Console(self.dir).complete)

    def test_the_package_ships_its_page(self):
        files = load(STATIC)
        for name in (b"index.html", b"app.js", b"app.css"):
            self.assertIn(name, files)
        page = files[b"index.html"][1]
        self.assertNotIn(b"<script>", page)  # no inline script: the CSP would refuse it
        self.assertNotIn(b"style=", page)
        self.assertNotIn(b"http", page.replace(b"https:", b""))  # nothing from elsewhere

    def test_the_spec_fields_are_the_control_plane_s(self):
        """The Spec dialog clears the fields an edit leaves out: it knows them all."""
        with open(os.path.join(STATIC, "app.js")) as f:
            fields = re.search(r"const SPEC_FIELDS = \[(.*?)\];", f.read(), re.S).group(1)
        self.assertEqual(set(re.findall(r'"(\w+)"', fields)), appspec.SPEC_FIELDS)


class PinnedTests(TestCase):
    """autobahn-js comes from one exact npm version, checked by its sha512 (npm ci)."""

    def test_autobahn_browser_is_pinned(self):
        top = os.path.join(os.path.dirname(__file__), "..", "..", "console")
        with open(os.path.join(top, "package.json")) as f:
            wanted = json.load(f)["dependencies"]
        self.assertEqual(list(wanted), ["autobahn-browser"])
        self.assertRegex(wanted["autobahn-browser"], r"^\d+\.\d+\.\d+$")  # no range
        with open(os.path.join(top, "package-lock.json")) as f:
            lock = json.load(f)["packages"]
        entry = lock["node_modules/autobahn-browser"]
        self.assertEqual(entry["version"], wanted["autobahn-browser"])
        self.assertTrue(re.match(r"^sha512-[A-Za-z0-9+/]{86}==$", entry["integrity"]), entry)
        self.assertEqual(set(lock), {"", "node_modules/autobahn-browser"})  # nothing else


class MountedTests(TestCase):
    timeout = 60

    def test_control_plane_serves_the_console(self):
        return ensureDeferred(self._served())

    async def _served(self):
        tmp = temp_dir(self)
        plane = ControlPlane(reactor, Config(listen=["tcp:0:interface=127.0.0.1"],
                                             data_dir=os.path.join(tmp, "cp")))
        plane.startService()
        self.addCleanup(plane.stopService)
        await plane.started
        base = f"http://127.0.0.1:{plane.ports[0].getHost().port}"
        r = await treq.get(base + "/", persistent=False)
        self.assertEqual(r.code, 200)
        self.assertEqual(r.headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        self.assertIn("script-src 'self'", r.headers.getRawHeaders("content-security-policy")[0])
        self.assertIn(b"/console/app.js", await r.content())
        r = await treq.get(base + "/console/app.js", persistent=False)
        self.assertEqual(r.code, 200)
        await r.content()
        r = await treq.get(base + "/healthz", persistent=False)  # the other children stay
        self.assertEqual(r.code, 200)
        await r.content()
        r = await treq.get(base + "/console/", persistent=False)
        self.assertEqual(r.code, 404)
        await r.content()
