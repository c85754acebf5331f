"""
A small OCI registry client on treq, used by C{zwrm images} (and tests and benchmarks) to
push zwrm VM images and to list and delete them.
"""

import base64
import hashlib
import json
import os
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.internet import defer, ssl, threads
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from zwrm.drivers import diskimage, kernelimage
from zwrm.errors import (
    AuthenticationFailed,
    Conflict,
    InvalidArgument,
    NotAuthorized,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from zwrm.registry import image

HASH_CHUNK = 1024 * 1024


def registry_url(url):
    """
    The registry's base URL for a control plane URL: the same host and port, HTTP(S) for
    WS(S) (C{wss://h:p/ws} -> C{https://h:p}; an http(s) URL keeps its scheme). Agents and
    the CLI use it to find C{/v2/}.

    @raise InvalidArgument: for anything that is not a ws/wss/http/https URL.
    """
    parts = urlsplit(url or "")
    scheme = {"ws": "http", "wss": "https", "http": "http", "https": "https"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise InvalidArgument(
            f"control plane URL {url!r} is not a ws://, wss://, http:// or https:// URL"
        )
    return f"{scheme}://{parts.netloc}"


@implementer(IPolicyForHTTPS)
class TrustCA:
    """
    HTTPS policy trusting one CA (the cluster CA), as the agent's C{wss://} connection does.

    @param ca_pem: the CA certificate, PEM bytes.
    """

    def __init__(self, ca_pem):
        self._root = ssl.Certificate.loadPEM(ca_pem)

    def creatorForNetloc(self, hostname, port):
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._root)


def make_http_client(reactor, ca_file=None, persistent=True):
    """
    A C{treq.HTTPClient} for talking to the control plane's registry: over https it trusts
    C{ca_file} (PEM of the cluster CA) if given, else the platform's trust store.

    Use it for L{zwrm.agent.images.ImageCache} (C{http_client=}) and L{RegistryClient}.

    @return: C{(client, pool)}; close idle connections with C{pool.closeCachedConnections()}.
    @raise InvalidArgument: if C{ca_file} cannot be read as a PEM certificate.
    """
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    if ca_file:
        try:
            with open(ca_file, "rb") as f:
                policy = TrustCA(f.read())
        except (OSError, ssl.SSL.Error, ValueError) as e:
            raise InvalidArgument(f"cannot read the CA certificate {ca_file}: {e}") from None
        agent = Agent(reactor, contextFactory=policy, pool=pool)
    else:
        agent = Agent(reactor, pool=pool)
    return HTTPClient(agent), pool


def auth_header(credentials):
    """
    @param credentials: a token (Bearer), C{(authid, token)} (Basic) or L{None}.
    @return: the Authorization header value, or L{None}.
    """
    if credentials is None:
        return None
    if isinstance(credentials, str):
        return b"Bearer " + credentials.encode()
    user, token = credentials
    return b"Basic " + base64.b64encode(f"{user}:{token}".encode())


def _hash_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_CHUNK):
            h.update(block)
        size = f.tell()
    return "sha256:" + h.hexdigest(), size


class _Progress:
    """A file wrapper that reports bytes read (FileBodyProducer reads it)."""

    def __init__(self, f, callback):
        self._f = f
        self._callback = callback

    def read(self, n=-1):
        data = self._f.read(n)
        if data:
            self._callback(len(data))
        return data

    def seek(self, *a):
        return self._f.seek(*a)

    def tell(self):
        return self._f.tell()

    def close(self):
        self._f.close()


class RegistryClient:
    """
    @param reactor: the reactor (thread pool for hashing files).
    @param base_url: the registry's base URL, e.g. C{https://cp:8080} (C{/v2} optional).
    @param credentials: see L{auth_header}.
    @param http_client: a C{treq.HTTPClient} (e.g. configured with the cluster CA); by
        default one with its own connection pool (see L{close}).
    """

    def __init__(self, reactor, base_url, credentials, http_client=None):
        self._reactor = reactor
        base = base_url.rstrip("/")
        if base.endswith("/v2"):
            base = base[:-3]
        self.base = base
        self._auth = auth_header(credentials)
        self._pool = None
        if http_client is None:
            http_client, self._pool = make_http_client(reactor)
        self._http = http_client

    def close(self):
        """Close idle connections; @return: a Deferred."""
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return defer.succeed(None)

    def _headers(self, extra=None):
        h = {}
        if self._auth is not None:
            h[b"Authorization"] = [self._auth]
        for k, v in (extra or {}).items():
            h[k] = [v]
        return h

    async def _request(self, method, path, data=None, headers=None, ok=(200,)):
        url = path if path.startswith("http") else self.base + path
        try:
            resp = await self._http.request(
                method, url.encode(), data=data, headers=self._headers(headers)
            )
        except Exception as e:
            raise Unavailable(f"the registry at {self.base} is not reachable: {e}") from None
        body = await resp.content()
        if resp.code not in ok:
            raise self._error(resp.code, body, path)
        return resp, body

    @staticmethod
    def _error(code, body, what):
        try:
            errors = json.loads(body)["errors"]
            message = "; ".join(f"{e['code']}: {e.get('message', '')}" for e in errors)
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {code}"
        if code == 401:
            return AuthenticationFailed(f"the registry refused the credentials ({message})")
        if code == 403:
            return NotAuthorized(f"not allowed: {message}")
        if code == 404:
            return NotFound(message)
        if code in (400, 413, 415, 416):
            return InvalidArgument(message)
        if code == 409:
            return Conflict(message)
        if code == 507:  # Insufficient Storage: the registry's disk is full
            return ResourceExhausted(f"the registry cannot store {what}: {message}")
        return Unavailable(f"the registry failed on {what}: {message}")

    async def check(self):
        """Check the registry is reachable and the credentials are accepted."""
        await self._request("GET", "/v2/")

    async def blob_exists(self, name, digest):
        url = f"{self.base}/v2/{name}/blobs/{digest}".encode()
        try:
            resp = await self._http.head(url, headers=self._headers())
        except Exception as e:
            raise Unavailable(f"the registry at {self.base} is not reachable: {e}") from None
        await resp.content()
        if resp.code in (401, 403):
            raise self._error(resp.code, b"", "HEAD blob")
        return resp.code == 200

    async def push_bytes(self, name, data):
        """Upload small content in one request; @return: its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not await self.blob_exists(name, digest):
            await self._request(
                "POST",
                f"/v2/{name}/blobs/uploads/?digest={digest}",
                data=data,
                headers={b"Content-Type": b"application/octet-stream"},
                ok=(201,),
            )
        return digest

    async def push_file(self, name, path, progress=None):
        """
        Upload a file as a blob (hashed in a thread first; skipped if the registry has it).
        The body is streamed from disk, never held in memory.

        @param progress: called with the number of bytes sent so far, repeatedly.
        @return: C{(digest, size)}.
        """
        digest, size = await threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), _hash_file, path
        )
        if await self.blob_exists(name, digest):
            if progress:
                progress(size)
            return digest, size
        resp, _ = await self._request("POST", f"/v2/{name}/blobs/uploads/", ok=(202,))
        location = resp.headers.getRawHeaders(b"location", [b""])[0].decode()
        if not location:
            raise Unavailable("the registry did not say where to upload")
        sep = "&" if "?" in location else "?"
        sent = [0]

        def count(n):
            sent[0] += n
            if progress:
                progress(sent[0])

        with open(path, "rb") as f:
            await self._request(
                "PUT",
                f"{location}{sep}digest={digest}",
                data=FileBodyProducer(_Progress(f, count)),
                headers={b"Content-Type": b"application/octet-stream"},
                ok=(201,),
            )
        return digest, size

    async def put_manifest(self, name, reference, body, media_type=image.MANIFEST_TYPE):
        """@return: the manifest's digest as the registry reports it."""
        resp, _ = await self._request(
            "PUT",
            f"/v2/{name}/manifests/{reference}",
            data=body,
            headers={b"Content-Type": media_type.encode()},
            ok=(201,),
        )
        return resp.headers.getRawHeaders(b"docker-content-digest", [b""])[0].decode()

    async def get_manifest(self, name, reference):
        """@return: C{(digest, media_type, body)}."""
        resp, body = await self._request(
            "GET",
            f"/v2/{name}/manifests/{reference}",
            headers={b"Accept": image.MANIFEST_TYPE.encode()},
        )
        digest = resp.headers.getRawHeaders(b"docker-content-digest", [b""])[0].decode()
        media = resp.headers.getRawHeaders(b"content-type", [b""])[0].decode()
        return digest, media, body

    async def _paged(self, path, key):
        items = []
        while path:
            resp, body = await self._request("GET", path)
            items.extend(json.loads(body).get(key) or [])
            link = resp.headers.getRawHeaders(b"link", [b""])[0].decode()
            path = link.split(";")[0].strip().strip("<>") if link else None
        return items

    async def repositories(self):
        return await self._paged("/v2/_catalog?n=1000", "repositories")

    async def tags(self, name):
        return await self._paged(f"/v2/{name}/tags/list?n=1000", "tags")

    async def delete(self, name, reference):
        """Delete a tag, or a manifest (and its tags) by digest."""
        await self._request("DELETE", f"/v2/{name}/manifests/{reference}", ok=(202,))


async def push_image(
    client, ref, kernel=None, initrd=None, disk=None, cmdline="", service_port=None,
    progress=None, firmware=None, reactor=None,
):
    """
    Push a zwrm VM image (see docs/images.md).

    A kernel is checked first to be one QEMU boots (L{zwrm.drivers.kernelimage}), and a
    disk with C{qemu-img info} (L{zwrm.drivers.diskimage.inspect}): its format (raw or
    qcow2) decides the layer's media type, and a qcow2 with a backing file or an external
    data file is refused before anything is sent; so is a disk pushed alone (no kernel)
    without a boot sector (L{zwrm.drivers.diskimage.bootable}).

    @param client: a L{RegistryClient}.
    @param ref: C{NAME[:TAG]}.
    @param progress: C{progress(done_bytes, total_bytes)}, called as bytes are sent.
    @param firmware: C{"bios"} or C{"uefi"} for a self-booting disk (default bios).
    @param reactor: runs C{qemu-img} (default: the client's reactor).
    @return: the manifest digest.
    """
    name, tag = image.parse_reference(ref)
    if tag.startswith("sha256:"):
        raise InvalidArgument("push to a tag (NAME:TAG), not a digest")
    files = [(role, p) for role, p in (("kernel", kernel), ("initrd", initrd), ("disk", disk)) if p]
    if not kernel and not disk:
        raise InvalidArgument("an image needs --kernel or --disk")
    for role, p in files:
        if not os.path.isfile(p):
            raise InvalidArgument(f"--{role} {p}: no such file")
    config = image.make_config(cmdline, service_port, firmware)
    reactor = reactor or client._reactor
    if kernel:
        await threads.deferToThreadPool(reactor, reactor.getThreadPool(), kernelimage.inspect,
                                        kernel, f"--kernel {kernel}")
    if disk:
        info = await diskimage.inspect(reactor, disk, what=f"--disk {disk}")
        files = [(f"disk:{info['format']}" if r == "disk" else r, p) for r, p in files]
        if not kernel and not diskimage.bootable(
                await diskimage.boot_sectors(reactor, disk, info["format"])):
            raise InvalidArgument(
                f"--disk {disk} has no boot sector (no MBR boot signature, no GPT): a disk "
                "pushed alone is booted by its firmware; if it is a root file system, push its"
                " kernel with it (--kernel, --initrd, --cmdline 'root=/dev/vda ...')")
    total = sum(os.path.getsize(p) for _, p in files) + len(config)
    done_before = [0]

    def report(n):
        if progress:
            progress(done_before[0] + n, total)

    layers = []
    for role, p in files:
        digest, size = await client.push_file(name, p, report)
        done_before[0] += size
        layers.append((role, digest, size, os.path.basename(p)))
    cdigest = await client.push_bytes(name, config)
    done_before[0] += len(config)
    report(0)
    manifest = image.make_manifest((cdigest, len(config)), layers)
    return await client.put_manifest(name, tag, manifest)
