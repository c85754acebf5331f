"""
The OCI Distribution API (v1.1 of the spec, without the optional referrers API) as a
C{twisted.web} resource, to be mounted at C{/v2/} on the control plane's site.

Every request is first authorized (C{authorize(request, action)}, action one of C{"pull"},
C{"push"}, C{"delete"}); then it is routed on the path below C{/v2/}. Errors are JSON bodies
of the form C{{"errors": [{"code": ..., "message": ..., "detail": ...}]}} with the spec's
codes and status codes.
"""

import hashlib
import json
import os
import re
from urllib.parse import quote

from twisted.application.internet import TimerService
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web import resource, server, static

from zwrm.drivers import diskimage, kernelimage
from zwrm.errors import (
    AuthenticationFailed,
    InvalidArgument,
    NotAuthorized,
    Unavailable,
    disk_full,
)
from zwrm.registry.image import KERNEL_TYPE, QCOW2_TYPE
from zwrm.registry.store import (
    DIGEST_RE,
    RegistryStore,
    StoreError,
    check_name,
    check_tag,
    parse_digest,
)

MANIFEST_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
MAX_MANIFEST = 4 * 1024 * 1024
#: How deep a manifest's JSON may nest (real ones nest 4 levels).
MAX_MANIFEST_DEPTH = 32
#: The most ranges one Range header may ask for (more is refused with 416).
MAX_RANGES = 8
MAX_RANGE_HEADER = 512
_RANGE_RE = re.compile(r"^bytes=\s*(\d*-\d*)(\s*,\s*\d*-\d*)*\s*\Z")
MEDIA_TYPE_RE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
    r"(\s*;.*)?\Z"
)

STATUS = {
    "BLOB_UNKNOWN": 404,
    "BLOB_UPLOAD_INVALID": 400,
    "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_BLOB_UNKNOWN": 400,
    "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "SIZE_INVALID": 400,
    "TAG_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
    "RANGE_INVALID": 416,
}

_NAME = r"(?P<name>[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*)"
ROUTES = [
    ("base", re.compile(r"^\Z")),
    ("catalog", re.compile(r"^_catalog\Z")),
    ("tags", re.compile(rf"^{_NAME}/tags/list\Z")),
    ("manifest", re.compile(rf"^{_NAME}/manifests/(?P<reference>[^/]+)\Z")),
    ("uploads", re.compile(rf"^{_NAME}/blobs/uploads/?\Z")),
    ("upload", re.compile(rf"^{_NAME}/blobs/uploads/(?P<uuid>[0-9a-f-]+)\Z")),
    ("blob", re.compile(rf"^{_NAME}/blobs/(?P<digest>[^/]+)\Z")),
]
# (route, method) -> (action, handler method name)
DISPATCH = {
    ("base", b"GET"): ("pull", "_base"),
    ("base", b"HEAD"): ("pull", "_base"),
    ("catalog", b"GET"): ("pull", "_catalog"),
    ("tags", b"GET"): ("pull", "_tags"),
    ("manifest", b"GET"): ("pull", "_get_manifest"),
    ("manifest", b"HEAD"): ("pull", "_get_manifest"),
    ("manifest", b"PUT"): ("push", "_put_manifest"),
    ("manifest", b"DELETE"): ("delete", "_delete_manifest"),
    ("uploads", b"POST"): ("push", "_start_upload"),
    ("upload", b"GET"): ("push", "_upload_status"),
    ("upload", b"PATCH"): ("push", "_patch_upload"),
    ("upload", b"PUT"): ("push", "_put_upload"),
    ("upload", b"DELETE"): ("push", "_cancel_upload"),
    ("blob", b"GET"): ("pull", "_get_blob"),
    ("blob", b"HEAD"): ("pull", "_get_blob"),
    ("blob", b"DELETE"): ("delete", "_delete_blob"),
}


class _Error(StoreError):
    def __init__(self, code, message, status=None, detail=None, headers=()):
        StoreError.__init__(self, code, message, detail)
        self.status = status or STATUS.get(code, 400)
        self.headers = dict(headers)


class RegistryResource(resource.Resource):
    """
    The registry under C{/v2/}.

    @param reactor: the reactor (thread pool for hashing and fsync).
    @param root_dir: directory of the on-disk store (see L{zwrm.registry.store}).
    @param authorize: C{authorize(request, action)} returning the principal, a Deferred or
        a coroutine of it (or raising); failing with
        L{AuthenticationFailed} gives 401 UNAUTHORIZED with a C{WWW-Authenticate} challenge,
        with L{NotAuthorized} 403 DENIED.
    @param realm: the realm named in the Basic challenge.
    @param delete_enabled: whether DELETE of manifests, tags and blobs is allowed.
    @param clock: C{IReactorTime} for upload session ages (default: C{reactor}).
    @param upload_ttl: seconds an untouched upload session is kept (default 15 minutes;
        sessions are dropped at every request and by L{expiry_service}).
    @param check_disk: C{check_disk(reactor, path, fmt, what)} (a coroutine) checks a qcow2
        disk layer named by a pushed manifest (default L{zwrm.drivers.diskimage.inspect});
        it raises L{InvalidArgument} to refuse the manifest.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, reactor, root_dir, authorize, realm="zwrm", delete_enabled=True,
                 clock=None, upload_ttl=900.0, check_disk=None):
        resource.Resource.__init__(self)
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._check_disk = check_disk or diskimage.inspect
        self.store = RegistryStore(reactor, root_dir, clock=clock, upload_ttl=upload_ttl)
        self._authorize = authorize
        self._realm = realm
        self.delete_enabled = delete_enabled

    @property
    def realm(self):
        """The realm of the Basic challenge."""
        return self._realm

    def authorize(self, request, action):
        """
        Authorize C{request} for C{action} from its headers alone.

        @return: a Deferred firing with the principal, or failing with
            L{AuthenticationFailed} or L{NotAuthorized}.
        """
        return defer.maybeDeferred(self._authorize, request, action)

    def action_for(self, method, path):
        """
        The action (C{"pull"}, C{"push"}, C{"delete"}) a request needs, from its method and
        its path below C{/v2/} (bytes); L{None} if no endpoint takes it (the request then
        gets its error from the resource).
        """
        try:
            route, _ = self._route(path.decode("utf-8"))
        except (StoreError, UnicodeDecodeError):
            return None
        entry = DISPATCH.get((route, method))
        return entry[0] if entry is not None else None

    def expiry_service(self, interval=300.0):
        """
        A service that drops upload sessions idle for longer than the store's C{upload_ttl}
        every C{interval} seconds (so abandoned uploads go within C{upload_ttl + interval}
        even when nobody uploads); the control plane adds it to its services.
        """
        svc = TimerService(interval, self.store.expire_uploads)
        svc.clock = self._clock
        return svc

    def render(self, request):
        request.setHeader(b"Docker-Distribution-API-Version", b"registry/2.0")
        finished = []
        request.notifyFinish().addBoth(finished.append)
        d = defer.Deferred.fromCoroutine(self._handle(request, finished))
        d.addErrback(lambda f: self.log.failure("registry request failed", f))
        return server.NOT_DONE_YET

    async def _handle(self, request, finished):
        try:
            path = "/".join(p.decode("utf-8") for p in request.postpath)
            route, match = self._route(path)
            try:
                action, handler = DISPATCH[(route, request.method)]
            except KeyError:
                raise _Error(
                    "UNSUPPORTED",
                    f"{request.method.decode()} is not supported on this endpoint",
                    headers={"Allow": ", ".join(m.decode() for r, m in DISPATCH if r == route)},
                ) from None
            self.store.expire_uploads()
            if action == "delete" and not self.delete_enabled:
                raise _Error("UNSUPPORTED", "deletes are disabled on this registry")
            try:
                await defer.maybeDeferred(self._authorize, request, action)
            except AuthenticationFailed as e:
                raise _Error(
                    "UNAUTHORIZED",
                    e.message or "authentication required",
                    headers={"WWW-Authenticate": f'Basic realm="{self._realm}"'},
                ) from None
            except NotAuthorized as e:
                raise _Error("DENIED", e.message or "access denied") from None
            args = match.groupdict()
            if "name" in args:
                check_name(args["name"])
            await getattr(self, handler)(request, **args)
        except StoreError as e:
            if finished:
                return
            status = getattr(e, "status", None) or STATUS.get(e.code, 400)
            for k, v in getattr(e, "headers", {}).items():
                request.setHeader(k, v)
            err = {"code": e.code, "message": e.message}
            if e.detail is not None:
                err["detail"] = e.detail
            self._json(request, {"errors": [err]}, status)
        except Exception as e:
            if disk_full(e):
                # The control plane's disk, not a fault: said, without a traceback. An upload
                # keeps what it had before this request, so it goes on once there is room.
                self.log.error("registry request {method} {uri}: the disk is full",
                               method=request.method, uri=request.uri)
                err, status = f"the registry's disk is full ({e.strerror or e})", 507
            else:
                self.log.failure("registry request {method} {uri} failed",
                                 method=request.method, uri=request.uri)
                err, status = "internal error", 500
            if not finished:
                self._json(request, {"errors": [{"code": "UNKNOWN", "message": err}]}, status)

    def _route(self, path):
        for route, pattern in ROUTES:
            m = pattern.match(path)
            if m:
                return route, m
        if re.search(r"/(blobs|manifests|tags)/", path):
            raise _Error("NAME_INVALID", f"invalid repository name in {path!r}")
        raise _Error("NAME_UNKNOWN", f"no such endpoint: /v2/{path}", status=404)

    # --- responses -----------------------------------------------------------------

    @staticmethod
    def _finish(request, status, body=b"", headers=(), content_type=None):
        request.setResponseCode(status)
        for k, v in dict(headers).items():
            request.setHeader(k, v)
        if content_type:
            request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Content-Length", str(len(body)).encode())
        if body:
            request.write(body)
        request.finish()

    def _json(self, request, obj, status=200, headers=()):
        self._finish(request, status, json.dumps(obj).encode(), headers, b"application/json")

    @staticmethod
    def _query(request, key):
        values = request.args.get(key.encode())
        return values[0].decode() if values else None

    @staticmethod
    def _upload_headers(upload):
        end = max(upload.size - 1, 0)
        return {
            "Location": f"/v2/{upload.name}/blobs/uploads/{upload.uuid}",
            "Range": f"0-{end}",
            "Docker-Upload-UUID": upload.uuid,
        }

    @staticmethod
    def _blob_headers(name, digest):
        return {"Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": digest}

    def _paginate(self, request, items, base_url, key, extra):
        n = self._query(request, "n")
        last = self._query(request, "last")
        if last is not None:
            items = [i for i in items if i > last]
        headers = {}
        if n is not None:
            try:
                n = int(n)
            except ValueError:
                raise _Error("UNSUPPORTED", f"n must be an integer, not {n!r}", status=400) from None
            if n < 0:
                raise _Error("UNSUPPORTED", "n must not be negative", status=400)
            if len(items) > n and n > 0:
                headers["Link"] = f'<{base_url}?n={n}&last={quote(items[n - 1])}>; rel="next"'
            items = items[:n]
        self._json(request, {**extra, key: items}, headers=headers)

    # --- endpoints -----------------------------------------------------------------

    async def _base(self, request):
        self._json(request, {})

    async def _catalog(self, request):
        self._paginate(request, self.store.repositories(), "/v2/_catalog", "repositories", {})

    async def _tags(self, request, name):
        if not self.store.repository_exists(name):
            raise _Error("NAME_UNKNOWN", f"repository {name} is not known")
        self._paginate(
            request, self.store.tags(name), f"/v2/{name}/tags/list", "tags", {"name": name}
        )

    @staticmethod
    def _check_range(request):
        value = request.getHeader(b"range")
        if value is None:
            return
        value = value.decode("latin-1")
        if (len(value) > MAX_RANGE_HEADER or value.count(",") >= MAX_RANGES
                or not _RANGE_RE.match(value)):
            raise _Error(
                "RANGE_INVALID",
                f"Range must be bytes=FIRST-LAST with at most {MAX_RANGES} ranges "
                f"({MAX_RANGE_HEADER} characters)",
                headers={"Content-Range": "bytes */*"},
            )

    async def _get_blob(self, request, name, digest):
        parse_digest(digest)
        self._check_range(request)
        if self.store.has_blob(name, digest) is None:
            raise _Error("BLOB_UNKNOWN", f"blob {digest} is not in {name}")
        request.setHeader(b"Docker-Content-Digest", digest.encode())
        request.setHeader(b"Cache-Control", b"max-age=31536000")
        f = static.File(self.store.blob_path(digest), defaultType="application/octet-stream")
        f.type = "application/octet-stream"
        f.encoding = None
        body = f.render(request)
        if body is not server.NOT_DONE_YET:
            request.write(body)
            request.finish()

    async def _delete_blob(self, request, name, digest):
        parse_digest(digest)
        self.store.delete_blob(name, digest)
        self._finish(request, 202)

    async def _start_upload(self, request, name):
        mount = self._query(request, "mount")
        source = self._query(request, "from")
        if mount is not None and source is not None:
            parse_digest(mount)
            check_name(source)
            try:
                await self._authorize_pull_from(request, source)
                size = self.store.mount(name, mount, source)
            except _Error:
                size = None
            if size is not None:
                self._finish(request, 201, headers=self._blob_headers(name, mount))
                return
        digest = self._query(request, "digest")
        upload = self.store.start_upload(name)
        if digest is not None:
            # Monolithic upload in one POST.
            try:
                parse_digest(digest)
                await self.store.append(upload, request.content, self._content_length(request))
                await self.store.finish_upload(upload, digest)
            finally:
                self.store.cancel_upload(upload)
            self._finish(request, 201, headers=self._blob_headers(name, digest))
            return
        self._finish(request, 202, headers=self._upload_headers(upload))

    async def _authorize_pull_from(self, request, source):
        # A mount reads from another repository: the caller must be allowed to pull.
        try:
            await defer.maybeDeferred(self._authorize, request, "pull")
        except (AuthenticationFailed, NotAuthorized):
            raise _Error("DENIED", f"may not read {source}") from None

    @staticmethod
    def _content_length(request):
        value = request.getHeader(b"content-length")
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise _Error("BLOB_UPLOAD_INVALID", "malformed Content-Length") from None

    async def _upload_status(self, request, name, uuid):
        upload = self.store.get_upload(name, uuid)
        self._finish(request, 204, headers=self._upload_headers(upload))

    async def _cancel_upload(self, request, name, uuid):
        upload = self.store.get_upload(name, uuid)
        self.store.cancel_upload(upload)
        self._finish(request, 204)

    async def _append(self, request, upload):
        length = None
        content_range = request.getHeader(b"content-range")
        if content_range is not None:
            m = re.match(r"^(?:bytes[ =])?(\d+)-(\d+)(?:/\S+)?$", content_range.decode().strip())
            if not m:
                raise _Error("BLOB_UPLOAD_INVALID", f"malformed Content-Range {content_range!r}")
            start, end = int(m.group(1)), int(m.group(2))
            if start != upload.size or end < start:
                raise _Error(
                    "BLOB_UPLOAD_INVALID",
                    f"chunk {start}-{end} does not continue the upload at {upload.size}",
                    status=416,
                    headers=self._upload_headers(upload),
                )
            length = end - start + 1
        declared = self._content_length(request)
        if length is not None and declared is not None and declared != length:
            raise _Error(
                "BLOB_UPLOAD_INVALID",
                f"Content-Range says {length} bytes, Content-Length {declared}",
                status=416,
                headers=self._upload_headers(upload),
            )
        await self.store.append(upload, request.content, length if length is not None else declared)

    async def _patch_upload(self, request, name, uuid):
        upload = self.store.get_upload(name, uuid)
        await self._append(request, upload)
        self._finish(request, 202, headers=self._upload_headers(upload))

    async def _put_upload(self, request, name, uuid):
        upload = self.store.get_upload(name, uuid)
        digest = self._query(request, "digest")
        if digest is None:
            raise _Error("DIGEST_INVALID", "the digest query parameter is required")
        parse_digest(digest)
        await self._append(request, upload)
        await self.store.finish_upload(upload, digest)
        self._finish(request, 201, headers=self._blob_headers(name, digest))

    async def _get_manifest(self, request, name, reference):
        digest, media_type, path = self.store.resolve(name, reference)
        with open(path, "rb") as f:
            body = f.read()
        self._finish(
            request,
            200,
            body,
            {"Docker-Content-Digest": digest, "ETag": f'"{digest}"'},
            media_type.encode(),
        )

    async def _delete_manifest(self, request, name, reference):
        self.store.delete_manifest(name, reference)
        self._finish(request, 202)

    async def _put_manifest(self, request, name, reference):
        tag = None
        if not DIGEST_RE.match(reference):
            check_tag(reference)
            tag = reference
        else:
            parse_digest(reference)
        content_type = (request.getHeader(b"content-type") or b"").decode().split(";")[0].strip()
        if content_type not in MANIFEST_TYPES:
            raise _Error(
                "MANIFEST_INVALID",
                f"unsupported manifest media type {content_type or '(none)'!r}",
                status=415,
                detail={"supported": sorted(MANIFEST_TYPES)},
            )
        body = request.content.read(MAX_MANIFEST + 1)
        if len(body) > MAX_MANIFEST:
            raise _Error("MANIFEST_INVALID", "manifest larger than 4 MiB", status=413)
        if body.count(b"[") + body.count(b"{") > MAX_MANIFEST_DEPTH:
            # Maybe deep: scan it in a thread (a few MiB of brackets take a while).
            await threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                            _check_depth, body)
        doc = self._validate_manifest(name, body, content_type)
        # What it was checked against stays until it is linked (the collector skips it).
        release = self.store.hold(
            [d["digest"] for d in [doc.get("config") or {}, *(doc.get("layers") or ()),
                                   *(doc.get("manifests") or ())] if "digest" in d]
            + [f"sha256:{hashlib.sha256(body).hexdigest()}"] + ([] if tag else [reference]))
        try:
            await self._check_layers(doc)
            alg = "sha256"
            if tag is None:
                alg, _ = parse_digest(reference)
                actual = f"{alg}:{hashlib.new(alg, body).hexdigest()}"
                if actual != reference:
                    raise _Error(
                        "DIGEST_INVALID", f"manifest has digest {actual}, not {reference}"
                    )
            digest = await self.store.put_bytes(name, body, alg)
            self.store.link_manifest(name, digest, content_type, tag)
        finally:
            release()
        self._finish(
            request,
            201,
            headers={"Location": f"/v2/{name}/manifests/{digest}", "Docker-Content-Digest": digest},
        )

    async def _check_layers(self, doc):
        # A kernel layer must be a kernel QEMU boots (see zwrm.drivers.kernelimage), and a
        # qcow2 disk layer self-contained: no backing file, no external data file (see
        # zwrm.drivers.diskimage). Checked here, before anything can pull the image.
        # (doc: the manifest as _validate_manifest parsed it)
        for desc in doc.get("layers") or ():
            if desc.get("mediaType") == KERNEL_TYPE:
                digest = desc["digest"]
                try:
                    await threads.deferToThreadPool(
                        self._reactor, self._reactor.getThreadPool(), kernelimage.inspect,
                        self.store.blob_path(digest), f"kernel layer {digest}")
                except InvalidArgument as e:
                    raise _Error("MANIFEST_INVALID", e.message,
                                 detail={"digest": digest}) from None
                except OSError as e:
                    raise _Error("UNKNOWN", f"cannot read kernel layer {digest}: {e.strerror}",
                                 status=503) from None
                continue
            if desc.get("mediaType") != QCOW2_TYPE:
                continue
            digest = desc["digest"]
            try:
                await self._check_disk(self._reactor, self.store.blob_path(digest), "qcow2",
                                       f"disk layer {digest}")
            except InvalidArgument as e:
                raise _Error("MANIFEST_INVALID", e.message, detail={"digest": digest}) from None
            except Unavailable as e:
                raise _Error("UNKNOWN", f"cannot check disk layer {digest}: {e.message}",
                             status=503) from None

    def _validate_manifest(self, name, body, content_type):
        """The manifest C{body} parsed, once checked. @raise _Error: what is wrong."""
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _Error("MANIFEST_INVALID", "manifest is not valid JSON") from None
        except RecursionError:
            raise _Error("MANIFEST_INVALID", "manifest is nested too deep") from None
        if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
            raise _Error("MANIFEST_INVALID", "manifest must be a JSON object with schemaVersion 2")
        declared = doc.get("mediaType")
        if declared is not None and declared != content_type:
            raise _Error(
                "MANIFEST_INVALID",
                f"manifest mediaType {declared!r} does not match Content-Type {content_type!r}",
            )
        if content_type in INDEX_TYPES:
            entries = doc.get("manifests")
            if not isinstance(entries, list):
                raise _Error("MANIFEST_INVALID", "an index needs a manifests list")
            for desc in entries:
                digest, _ = self._descriptor(desc)
                try:
                    self.store.resolve(name, digest)
                except StoreError:
                    raise _Error(
                        "MANIFEST_BLOB_UNKNOWN",
                        f"manifest {digest} is not in {name}",
                        detail={"digest": digest},
                    ) from None
            return doc
        layers = doc.get("layers")
        if not isinstance(layers, list) or "config" not in doc:
            raise _Error("MANIFEST_INVALID", "an image manifest needs config and layers")
        for desc in [doc["config"], *layers]:
            digest, size = self._descriptor(desc)
            have = self.store.has_blob(name, digest)
            if have is None:
                raise _Error(
                    "MANIFEST_BLOB_UNKNOWN",
                    f"blob {digest} is not in {name}",
                    detail={"digest": digest},
                )
            if have != size:
                raise _Error(
                    "MANIFEST_INVALID",
                    f"blob {digest} has {have} bytes, the manifest says {size}",
                )
        return doc

    @staticmethod
    def _descriptor(desc):
        if not isinstance(desc, dict):
            raise _Error("MANIFEST_INVALID", "a descriptor must be a JSON object")
        media_type = desc.get("mediaType")
        if not isinstance(media_type, str) or not MEDIA_TYPE_RE.match(media_type):
            raise _Error("MANIFEST_INVALID", f"descriptor media type {media_type!r} is invalid")
        digest = desc.get("digest")
        try:
            parse_digest(digest)
        except StoreError:
            raise _Error("MANIFEST_INVALID", f"descriptor digest {digest!r} is invalid") from None
        size = desc.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _Error("MANIFEST_INVALID", f"descriptor size {size!r} is invalid")
        return digest, size


def _check_depth(body, limit=MAX_MANIFEST_DEPTH):
    """
    @raise _Error: C{MANIFEST_INVALID} if the JSON in C{body} nests arrays or objects more
        than C{limit} deep (checked on the bytes, before any parser recurses).
    """
    depth = 0
    in_string = escaped = False
    for c in body:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # quote
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                raise _Error("MANIFEST_INVALID",
                             f"manifest is nested more than {limit} levels deep")
        elif c in (0x5D, 0x7D):
            depth -= 1


def make_registry_resource(reactor, root_dir, authorize, **kwargs):
    """
    Build the registry for mounting at C{/v2/}::

        root.putChild(b"v2", make_registry_resource(reactor, path, authorize))

    @see: L{RegistryResource} for the arguments.
    """
    os.makedirs(root_dir, exist_ok=True)
    return RegistryResource(reactor, root_dir, authorize, **kwargs)
