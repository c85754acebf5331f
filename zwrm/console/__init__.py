"""
The web console: static files the control plane serves at C{/} (docs/console.md).

The page (C{static/index.html}) and its assets (C{/console/app.js}, C{/console/app.css},
C{/console/vendor/autobahn.min.js}) are read once, when the resource is made, from the
package's C{static} directory; only files with a known type are served, each with its
content type, and every response (404s too) carries a Content-Security-Policy that allows
no inline script, no other origin and no framing.  Nothing else is served: no directory
listing, no path outside the directory, no file that was not there at start-up.

The browser talks WAMP over the control plane's C{/ws} with the operator's or viewer's token
as its ticket; the page itself holds no secret and needs none to be fetched.

C{vendor/autobahn.min.js} is autobahn-js's browser build, put there by
C{scripts/build-console} from the npm package pinned in C{console/package-lock.json} (never
from a CDN); without it the page says so.
"""

import hashlib
import os
import re

from twisted.logger import Logger
from twisted.web import resource

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
"""Where the console's files are (shipped in the package: setup.cfg's package_data)."""

VENDOR_AUTOBAHN = "vendor/autobahn.min.js"
"""The bundled autobahn-js, relative to L{STATIC} (made by C{scripts/build-console})."""

TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".png": b"image/png",
    ".svg": b"image/svg+xml",
    ".txt": b"text/plain; charset=utf-8",
}
"""The content type of each kind of file served; other files are never served."""

_HOST = re.compile(rb"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?\Z|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?\Z")
"""A Host header that may be repeated in the policy's C{connect-src}."""


def policy(host=None):
    """
    The Content-Security-Policy of every console response: scripts, styles, images and
    connections only from the control plane itself (the WebSocket included: C{ws:} and
    C{wss:} of C{host}, for browsers whose C{'self'} does not cover them), nothing inline,
    no plugins, no base or form targets, no framing.

    @param host: the request's Host header (bytes), or L{None}.
    """
    connect = b"'self'"
    if host and _HOST.match(host):
        connect += b" ws://" + host + b" wss://" + host
    return (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
            b" connect-src " + connect + b"; base-uri 'none'; form-action 'none';"
            b" frame-ancestors 'none'")


def secure_headers(request):
    """Set the console's security headers on C{request}."""
    request.setHeader(b"content-security-policy", policy(request.getHeader(b"host")))
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"x-frame-options", b"DENY")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"cache-control", b"no-cache")


def load(directory=STATIC):
    """
    The servable files under C{directory}: C{{relative path (bytes, "/"-separated):
    (content type, body, etag)}}, read now.  Files of unknown types, hidden files and
    symbolic links are left out.
    """
    files = {}
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = os.path.join(root, name)
            ctype = TYPES.get(os.path.splitext(name)[1])
            if name.startswith(".") or ctype is None or os.path.islink(path):
                continue
            with open(path, "rb") as f:
                body = f.read()
            rel = os.path.relpath(path, directory).replace(os.sep, "/").encode()
            etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'
            files[rel] = (ctype, body, etag)
    return files


class NotFound(resource.Resource):
    """A 404 with the console's headers (no listing, no detail)."""

    isLeaf = True

    def render(self, request):
        secure_headers(request)
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"not found\n"


class StaticFiles(resource.Resource):
    """
    The files of L{load}, by path below where it is mounted: C{GET} and C{HEAD} only
    (other methods get 405), C{If-None-Match} answered with 304.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, files, prefix=b""):
        """
        @param files: from L{load}.
        @param prefix: prepended to the request's remaining path (C{b"index.html"} for
            the page at C{/}).
        """
        resource.Resource.__init__(self)
        self.files = files
        self.prefix = prefix

    def render_GET(self, request):
        name = self.prefix or b"/".join(request.postpath)
        found = self.files.get(name)
        if found is None:
            return NotFound().render(request)
        ctype, body, etag = found
        secure_headers(request)
        request.setHeader(b"content-type", ctype)
        request.setHeader(b"etag", etag)
        if request.getHeader(b"if-none-match") == etag:
            request.setResponseCode(304)
            return b""
        return body

    def render_HEAD(self, request):
        return self.render_GET(request)


class Console:
    """
    The console's two resources: the page (C{/}) and its assets (C{/console/...}).

    @ivar files: what L{load} read.
    """

    log = Logger()

    def __init__(self, directory=STATIC):
        self.files = load(directory) if os.path.isdir(directory) else {}
        self.complete = b"index.html" in self.files and VENDOR_AUTOBAHN.encode() in self.files

    def mount(self, root):
        """Put the console at C{/} and C{/console/} of the site's C{root}."""
        if not self.complete:
            self.log.warn(
                "the web console at / is incomplete ({missing} missing): run"
                " scripts/build-console before installing zwrm",
                missing=VENDOR_AUTOBAHN if b"index.html" in self.files else "index.html")
        root.putChild(b"", StaticFiles(self.files, prefix=b"index.html"))
        assets = {k: v for k, v in self.files.items() if k != b"index.html"}
        root.putChild(b"console", StaticFiles(assets))
