"""
A real registry on a loopback port for tests, and small HTTP helpers around treq.
"""

import base64
import hashlib
import json

import treq
from twisted.internet import defer, reactor
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from zwrm.registry import TokenAuthorizer, make_registry_resource
from zwrm.registry.guard import registry_request_factory
from zwrm.web import Root

OPERATOR = "op-token"
AGENT_ID = "host-1"
AGENT_TOKEN = "host-1-secret"


def aio(f):
    """A coroutine test method, run as the Deferred trial waits for."""
    def wrapper(self, *a, **kw):
        return defer.Deferred.fromCoroutine(f(self, *a, **kw))

    wrapper.__name__ = f.__name__
    return wrapper


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def basic(user, password):
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def default_authorizer(anonymous=()):
    return TokenAuthorizer(
        tokens={OPERATOR: ("operator", ("pull", "push", "delete"))},
        basic={AGENT_ID: (AGENT_TOKEN, ("pull",))},
        anonymous=anonymous,
    )


class TrackingSite(Site):
    """A Site that can drop every open connection (for clean test teardown)."""

    def __init__(self, *a, **kw):
        Site.__init__(self, *a, **kw)
        self.open = {}

    def buildProtocol(self, addr):
        p = Site.buildProtocol(self, addr)
        lost = self.open[p] = defer.Deferred()
        original = p.connectionLost

        def connectionLost(reason):
            self.open.pop(p, None)
            try:
                return original(reason)
            finally:
                lost.callback(None)

        p.connectionLost = connectionLost
        return p

    def close_connections(self):
        waits = list(self.open.values())
        for p in list(self.open):
            transport = getattr(p, "transport", None) or getattr(
                getattr(p, "_channel", None), "transport", None
            )
            if transport is not None:
                transport.abortConnection()
        return defer.gatherResults(waits)


class RunningRegistry:
    """
    A registry served by a real Site on 127.0.0.1, torn down by the test's cleanups.
    """

    def __init__(self, testcase, root, authorize=None, guard=None, **kwargs):
        """
        @param guard: keyword arguments of L{registry_request_factory} (C{reactor} is the
            clock of its timeouts); the site always has the registry's guard.
        """
        self.root = root
        self.resource = make_registry_resource(
            reactor, root, authorize or default_authorizer(), **kwargs
        )
        site_root = Root()
        site_root.putChild(b"v2", self.resource)
        guard = dict(guard or {})
        self.site = TrackingSite(site_root, requestFactory=registry_request_factory(
            guard.pop("reactor", reactor), self.resource, **guard))
        self.site.displayTracebacks = False
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        testcase.addCleanup(self.site.close_connections)
        testcase.addCleanup(self.port.stopListening)
        testcase.addCleanup(self.pool.closeCachedConnections)

    async def request(self, method, path, body=None, headers=None, auth=OPERATOR):
        """
        @return: C{(response, body_bytes)}.
        """
        h = {}
        if auth is not None:
            h[b"Authorization"] = auth if isinstance(auth, bytes) else b"Bearer " + auth.encode()
        h.update(headers or {})
        url = path if path.startswith("http") else self.url + path
        resp = await treq.request(method, url, data=body, headers=h, pool=self.pool)
        content = await resp.content()
        return resp, content

    async def push_blob(self, name, data, auth=OPERATOR):
        d = digest_of(data)
        resp, body = await self.request(
            "POST", f"/v2/{name}/blobs/uploads/?digest={d}", data, auth=auth
        )
        assert resp.code == 201, (resp.code, body)
        return d

    async def push_manifest(self, name, ref, doc, media_type="application/vnd.oci.image.manifest.v1+json"):
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        resp, content = await self.request(
            "PUT", f"/v2/{name}/manifests/{ref}", body, headers={b"Content-Type": media_type}
        )
        return resp, content


def header(resp, name):
    values = resp.headers.getRawHeaders(name)
    return values[0] if values else None


def error_codes(body):
    return [e["code"] for e in json.loads(body)["errors"]]
