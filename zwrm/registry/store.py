"""
The registry's on-disk storage: a content-addressed blob store, upload sessions, and the
per-repository index of blob links, manifests and tags.

Layout under C{root}::

    blobs/<algorithm>/<hex>                 content, named by its digest (blobs and manifests)
    uploads/<uuid>                          bytes of an upload in progress
    uploads/spool-<uuid>                    a request body being received (L{Spool})
    repositories/<name>/_blobs/<alg>/<hex>  empty file: the repository may serve that blob
    repositories/<name>/_manifests/<alg>/<hex>
                                            the manifest's media type: the repository holds it
    repositories/<name>/_tags/<tag>         the digest the tag points at
    trash/<uuid>                            content the collector removed, being deleted

Everything that reads or writes bulk bytes (copying an upload chunk, hashing, fsync) runs in
the reactor's thread pool; the rest is a handful of small metadata syscalls done on the
reactor thread. Blocks of zeros are not written but left as holes, so a sparse raw disk
takes on disk what its data takes. Content only becomes visible under C{blobs/} by an atomic C{rename} after it
was hashed, compared with the digest it claims, and fsynced, so a reader never sees a partial
or unverified blob.

A blob's request body is spooled under C{uploads/} (the registry's request factory asks for a
L{Spool}; twisted.web writes to it on the reactor thread as the body arrives); when it is the
whole of its upload, it is hashed where it lies and renamed into place instead of copied.

Upload sessions keep their running hash in memory; a restart of the control plane forgets
them (their files are removed at start-up) and clients start the upload again.

The collector (L{RegistryStore.scan}, then L{RegistryStore.collect}) removes what no tag
needs: manifests no tag, kept index or caller points at, and blob links no remaining manifest
uses, each older than a grace period (a push uploads its blobs before its manifest), then
the content no repository links. What a manifest push or an upload is about to link is
held (L{RegistryStore.hold}) and never collected; the removal itself runs on the reactor
thread, where pushes link, after checking that the repository did not change since its
scan; content is renamed into C{trash/} there and deleted from it in a thread.
"""

import collections
import hashlib
import json
import os
import re
import time
import uuid as uuidlib

from twisted.internet import threads

from zwrm.files import fsync_path
from zwrm.sparse import SPARSE_BLOCK, is_zero, write_sparse

ALGORITHMS = {"sha256": 64, "sha512": 128}
DIGEST_RE = re.compile(r"^(sha256|sha512):([a-f0-9]+)\Z")
NAME_RE = re.compile(
    r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*\Z"
)
# \Z, not $: "$" also matches before a trailing newline ("v1\n" is not a tag).
TAG_RE = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}\Z")
COPY_CHUNK = 1024 * 1024
class StoreError(Exception):
    """
    A request the store refuses; C{code} is the OCI distribution error code.

    @ivar code: e.g. C{"DIGEST_INVALID"}.
    @ivar message: one readable sentence.
    @ivar detail: optional JSON-serialisable detail.
    """

    def __init__(self, code, message, detail=None):
        Exception.__init__(self, code, message)
        self.code = code
        self.message = message
        self.detail = detail


def parse_digest(digest):
    """
    Split and check a digest string.

    @return: C{(algorithm, hex)}.
    @raise StoreError: C{DIGEST_INVALID} for a malformed or unsupported digest.
    """
    m = DIGEST_RE.match(digest or "")
    if m is None or len(m.group(2)) != ALGORITHMS[m.group(1)]:
        raise StoreError("DIGEST_INVALID", f"not a valid sha256/sha512 digest: {digest!r}")
    return m.group(1), m.group(2)


def check_name(name):
    """
    @raise StoreError: C{NAME_INVALID} unless C{name} is a valid repository name.
    """
    if not name or len(name) > 255 or NAME_RE.match(name) is None:
        raise StoreError("NAME_INVALID", f"invalid repository name: {name!r}")


def check_tag(tag):
    """
    @raise StoreError: C{TAG_INVALID} unless C{tag} is a valid tag.
    """
    if TAG_RE.match(tag or "") is None:
        raise StoreError("TAG_INVALID", f"invalid tag: {tag!r}")


def _hash_file(path, algorithm):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(COPY_CHUNK):
            h.update(block)
    return h.hexdigest()


class Upload:
    """
    One blob upload in progress.

    @ivar uuid: the session id used in the upload URL.
    @ivar name: the repository the upload belongs to.
    @ivar path: where its bytes are collected.
    @ivar size: how many bytes were received so far.
    @ivar busy: a chunk is being appended (a second concurrent chunk is refused).
    """

    def __init__(self, uuid, name, path, now=0.0):
        self.uuid = uuid
        self.last_active = now
        self.name = name
        self.path = path
        self.size = 0
        self.busy = False
        self.hashers = {"sha256": hashlib.sha256()}


class Spool:
    """
    A request body spooled to a file in the store's C{uploads/} directory (instead of
    Twisted's anonymous temporary file), so that a blob upload whose whole content is this
    body can become the upload's file by a rename instead of a copy (L{RegistryStore.append}).
    A file object otherwise; closing it removes the file unless it was adopted.
    """

    def __init__(self, path):
        self.path = path
        self._file = open(path, "w+b")  # noqa: SIM115 (closed by close())
        self.adopted = False

    def __getattr__(self, name):
        return getattr(self._file, name)

    def adopt(self, dest):
        """Make the (flushed) spool file C{dest}; closing it later leaves it there."""
        self._file.flush()
        os.rename(self.path, dest)
        self.adopted = True

    def close(self):
        self._file.close()
        if not self.adopted:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class RegistryStore:
    """
    Blobs, uploads, manifests and tags on disk.

    @param reactor: provides C{callInThread} (used through C{deferToThreadPool}).
    @param root: directory that holds the store; created if missing.
    @param clock: C{IReactorTime} for upload session ages (default: C{reactor}).
    @param upload_ttl: seconds after which an upload session nobody touched is dropped
        (checked whenever an upload starts).
    """

    def __init__(self, reactor, root, clock=None, upload_ttl=900.0):
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self.upload_ttl = upload_ttl
        self.root = os.path.abspath(root)
        self._uploads = {}
        self._held = collections.Counter()  # digest -> holds (hold(): kept from collect)
        for sub in ("blobs", "uploads", "repositories", "trash"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        # Upload sessions do not survive a restart: their hash state is in memory. Content
        # collected but not yet deleted is no blob any more.
        for sub in ("uploads", "trash"):
            for entry in os.listdir(os.path.join(self.root, sub)):
                os.unlink(os.path.join(self.root, sub, entry))

    def _in_thread(self, f, *args):
        return threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), f, *args
        )

    # --- blobs ---------------------------------------------------------------------

    def blob_path(self, digest):
        """The path content with C{digest} has (or would have) on disk."""
        alg, hexd = parse_digest(digest)
        return os.path.join(self.root, "blobs", alg, hexd)

    def _repo(self, name, *parts):
        return os.path.join(self.root, "repositories", *name.split("/"), *parts)

    def _link_path(self, name, digest):
        alg, hexd = parse_digest(digest)
        return self._repo(name, "_blobs", alg, hexd)

    def has_blob(self, name, digest):
        """
        @return: the blob's size if repository C{name} may serve it, else L{None}.
        """
        path = self.blob_path(digest)
        if not os.path.exists(self._link_path(name, digest)):
            return None
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return None

    def _link(self, name, digest):
        link = self._link_path(name, digest)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        with open(link, "wb"):
            pass

    def mount(self, name, digest, from_name):
        """
        Cross-repository mount: link a blob that C{from_name} holds into C{name}.

        @return: the blob's size, or L{None} if C{from_name} does not hold it (the caller
            then starts an ordinary upload, as the spec says).
        """
        size = self.has_blob(from_name, digest)
        if size is not None:
            self._link(name, digest)
        return size

    def delete_blob(self, name, digest):
        """
        Unlink a blob from a repository; the content goes when no repository links it.

        @raise StoreError: C{BLOB_UNKNOWN}.
        """
        link = self._link_path(name, digest)
        try:
            os.unlink(link)
        except FileNotFoundError:
            raise StoreError("BLOB_UNKNOWN", f"blob {digest} is not in {name}") from None
        if not self._linked_anywhere(digest):
            try:
                os.unlink(self.blob_path(digest))
            except FileNotFoundError:
                pass

    def _linked_anywhere(self, digest):
        alg, hexd = parse_digest(digest)
        for name in self.repositories():
            for kind in ("_blobs", "_manifests"):
                if os.path.exists(self._repo(name, kind, alg, hexd)):
                    return True
        return False

    async def _commit(self, src, digest, expected):
        """
        Move verified content at C{src} to its place in the blob store (fsynced, atomic).
        """
        if expected is not None and expected != digest:
            raise StoreError(
                "DIGEST_INVALID",
                f"content has digest {expected}, not the {digest} it was uploaded as",
            )
        dest = self.blob_path(digest)

        def move():
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(src, "rb+") as f:
                os.fsync(f.fileno())
            os.rename(src, dest)
            fsync_path(os.path.dirname(dest))

        await self._in_thread(move)

    # --- uploads -------------------------------------------------------------------

    def spool(self):
        """
        @return: a new L{Spool} for a request body (removed at close unless adopted; a
            restart removes everything left in C{uploads/}).
        """
        return Spool(os.path.join(self.root, "uploads", "spool-" + str(uuidlib.uuid4())))

    def start_upload(self, name):
        """
        @return: a new L{Upload} for repository C{name}.
        """
        uid = str(uuidlib.uuid4())
        path = os.path.join(self.root, "uploads", uid)
        with open(path, "wb"):
            pass
        self.expire_uploads()
        upload = Upload(uid, name, path, self._clock.seconds())
        self._uploads[uid] = upload
        return upload

    def expire_uploads(self):
        """Drop upload sessions idle for longer than C{upload_ttl}; @return: how many."""
        limit = self._clock.seconds() - self.upload_ttl
        stale = [u for u in self._uploads.values() if not u.busy and u.last_active < limit]
        for upload in stale:
            self.cancel_upload(upload)
        return len(stale)

    def get_upload(self, name, uid):
        """
        @raise StoreError: C{BLOB_UPLOAD_UNKNOWN} if there is no such session in C{name}.
        """
        upload = self._uploads.get(uid)
        if upload is None or upload.name != name:
            raise StoreError("BLOB_UPLOAD_UNKNOWN", f"no upload {uid} in {name}")
        upload.last_active = self._clock.seconds()
        return upload

    def cancel_upload(self, upload):
        """Forget an upload and remove its bytes."""
        self._uploads.pop(upload.uuid, None)
        try:
            os.unlink(upload.path)
        except FileNotFoundError:
            pass

    async def append(self, upload, source, length=None):
        """
        Append the bytes of file-like C{source} (from its current position) to C{upload},
        hashing them on the way, in a thread.

        @param length: if given, exactly this many bytes must be read, else the upload is
            refused with C{BLOB_UPLOAD_INVALID} and nothing is appended.
        @return: the number of bytes appended.
        """
        if upload.busy:
            raise StoreError("BLOB_UPLOAD_INVALID", "another chunk of this upload is in progress")
        upload.busy = True
        try:
            if upload.size == 0 and isinstance(source, Spool) and source.tell() == 0:
                n = await self._in_thread(self._adopt_sync, upload, source, length)
                if n is not None:
                    return n
                source.seek(0)
            return await self._in_thread(self._append_sync, upload, source, length)
        finally:
            upload.busy = False

    def _adopt_sync(self, upload, source, length):
        # The whole upload is the spooled body: hash it where it is and rename it into
        # place, instead of copying it. Holes are made only by copying (write_sparse), so
        # a body with a block of zeros is left to the copy (@return: None).
        hashers = [h.copy() for h in upload.hashers.values()]
        n = 0
        while True:
            block = source.read(COPY_CHUNK)
            if not block:
                break
            view = memoryview(block)
            for i in range(0, len(view), SPARSE_BLOCK):
                if is_zero(view[i:i + SPARSE_BLOCK]):
                    return None
            for h in hashers:
                h.update(block)
            n += len(block)
        if length is not None and n != length:
            raise StoreError("BLOB_UPLOAD_INVALID", f"chunk declared {length} bytes but {n} arrived")
        source.adopt(upload.path)
        upload.hashers = dict(zip(upload.hashers, hashers, strict=True))
        upload.size = n
        return n

    def _append_sync(self, upload, source, length):
        # Copy to the end of the upload file, but only count (and hash) the chunk once
        # it is complete: a short chunk is truncated away again.
        start = upload.size
        pending = [h.copy() for h in upload.hashers.values()]
        n = 0
        with open(upload.path, "r+b") as out:
            out.seek(start)
            try:
                while True:
                    block = source.read(COPY_CHUNK)
                    if not block:
                        break
                    write_sparse(out, block)
                    for h in pending:
                        h.update(block)
                    n += len(block)
            except OSError:
                out.truncate(start)  # (the disk is full, say): what was written goes again
                raise
            if length is not None and n != length:
                out.truncate(start)
                raise StoreError(
                    "BLOB_UPLOAD_INVALID",
                    f"chunk declared {length} bytes but {n} arrived",
                )
            out.truncate(start + n)
        upload.hashers = dict(zip(upload.hashers, pending, strict=True))
        upload.size = start + n
        return n

    async def finish_upload(self, upload, digest):
        """
        Verify the upload against C{digest} and commit it as a blob of its repository.

        On a digest mismatch the upload is discarded (nothing is committed) and
        C{DIGEST_INVALID} is raised.

        @return: the blob's size.
        """
        alg, _ = parse_digest(digest)
        if upload.busy:
            raise StoreError("BLOB_UPLOAD_INVALID", "a chunk of this upload is in progress")
        self._uploads.pop(upload.uuid, None)
        release = self.hold([digest])  # its content, committed before it is linked
        try:
            if alg in upload.hashers:
                actual = f"{alg}:{upload.hashers[alg].hexdigest()}"
            else:
                actual = f"{alg}:{await self._in_thread(_hash_file, upload.path, alg)}"
            try:
                await self._commit(upload.path, digest, actual)
            except BaseException:
                try:
                    os.unlink(upload.path)
                except FileNotFoundError:
                    pass
                raise
            self._link(upload.name, digest)
        finally:
            release()
        return upload.size

    async def put_bytes(self, name, data, algorithm="sha256"):
        """
        Store small content (a manifest) given in memory.

        @return: its digest with C{algorithm}.
        """
        digest = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
        if os.path.exists(self.blob_path(digest)):
            return digest
        tmp = os.path.join(self.root, "uploads", "m-" + str(uuidlib.uuid4()))
        with open(tmp, "wb") as f:
            f.write(data)
        await self._commit(tmp, digest, digest)
        return digest

    # --- manifests and tags --------------------------------------------------------

    def _manifest_link(self, name, digest):
        alg, hexd = parse_digest(digest)
        return self._repo(name, "_manifests", alg, hexd)

    def repository_exists(self, name):
        return os.path.isdir(self._repo(name, "_manifests")) or os.path.isdir(
            self._repo(name, "_blobs")
        )

    def link_manifest(self, name, digest, media_type, tag=None):
        """Record that C{name} holds manifest C{digest}; point C{tag} at it."""
        path = self._manifest_link(name, digest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(media_type)
        if tag is not None:
            tags = self._repo(name, "_tags")
            os.makedirs(tags, exist_ok=True)
            tmp = os.path.join(tags, "." + tag + ".tmp")
            with open(tmp, "w") as f:
                f.write(digest)
            os.rename(tmp, os.path.join(tags, tag))

    def resolve(self, name, reference):
        """
        @param reference: a tag or a digest.
        @return: C{(digest, media_type, path)} of the manifest.
        @raise StoreError: C{NAME_INVALID}, C{TAG_INVALID}, C{MANIFEST_UNKNOWN}.
        """
        check_name(name)
        if DIGEST_RE.match(reference):
            digest = reference
        else:
            check_tag(reference)
            try:
                with open(self._repo(name, "_tags", reference)) as f:
                    digest = f.read().strip()
            except FileNotFoundError:
                raise StoreError(
                    "MANIFEST_UNKNOWN", f"no manifest tagged {reference} in {name}"
                ) from None
        try:
            with open(self._manifest_link(name, digest)) as f:
                media_type = f.read().strip()
        except (FileNotFoundError, StoreError):
            raise StoreError("MANIFEST_UNKNOWN", f"no manifest {reference} in {name}") from None
        return digest, media_type, self.blob_path(digest)

    def delete_manifest(self, name, reference):
        """
        Delete a tag (reference is a tag) or a manifest and every tag pointing at it
        (reference is a digest).

        @raise StoreError: C{NAME_INVALID}, C{TAG_INVALID}, C{MANIFEST_UNKNOWN}.
        """
        if not DIGEST_RE.match(reference):
            check_tag(reference)
            try:
                os.unlink(self._repo(name, "_tags", reference))
            except FileNotFoundError:
                raise StoreError(
                    "MANIFEST_UNKNOWN", f"no manifest tagged {reference} in {name}"
                ) from None
            return
        digest, _, _ = self.resolve(name, reference)
        for tag in self.tags(name):
            with open(self._repo(name, "_tags", tag)) as f:
                if f.read().strip() == digest:
                    os.unlink(self._repo(name, "_tags", tag))
        os.unlink(self._manifest_link(name, digest))
        if not self._linked_anywhere(digest):
            try:
                os.unlink(self.blob_path(digest))
            except FileNotFoundError:
                pass

    def tags(self, name):
        """@return: the sorted tags of C{name}."""
        try:
            return sorted(t for t in os.listdir(self._repo(name, "_tags")) if not t.startswith("."))
        except FileNotFoundError:
            return []

    def repositories(self):
        """@return: the sorted names of all repositories."""
        base = os.path.join(self.root, "repositories")
        names = []
        for dirpath, dirnames, _ in os.walk(base):
            if "_blobs" in dirnames or "_manifests" in dirnames or "_tags" in dirnames:
                names.append(os.path.relpath(dirpath, base).replace(os.sep, "/"))
            dirnames[:] = [d for d in dirnames if not d.startswith("_")]
        return sorted(names)

    # --- the collector ---------------------------------------------------------------

    def hold(self, digests):
        """
        Keep content C{digests} (and their links) from L{collect} until the returned
        callable is called: what a manifest push checked, what an upload commits.
        """
        digests = list(digests)
        self._held.update(digests)

        def release():
            self._held.subtract(digests)
            for d in digests:
                if self._held[d] <= 0:
                    del self._held[d]

        return release

    def _links(self, name, kind):
        """C{{digest: mtime}} of repository C{name}'s C{_blobs} or C{_manifests} links."""
        out = {}
        for alg in ALGORITHMS:
            base = self._repo(name, kind, alg)
            try:
                entries = os.listdir(base)
            except FileNotFoundError:
                continue
            for hexd in entries:
                try:
                    out[f"{alg}:{hexd}"] = os.stat(os.path.join(base, hexd)).st_mtime
                except FileNotFoundError:
                    pass
        return out

    def _tag_map(self, name):
        tags = {}
        for tag in self.tags(name):
            try:
                with open(self._repo(name, "_tags", tag)) as f:
                    tags[tag] = f.read().strip()
            except FileNotFoundError:
                pass
        return tags

    def scan(self, name, keep=(), grace=86400.0, now=None):
        """
        What L{collect} may remove from repository C{name} (reads only; run it in a
        thread): C{{"name", "snapshot", "manifests", "blobs"}}, each a list of digests.

        Kept: manifests a tag points at, those in C{keep} (digests an app's spec names),
        those younger than C{grace} seconds, and the manifests of a kept index; blob links
        a kept manifest uses (its config and layers) or younger than C{grace}.  A manifest
        that cannot be read keeps everything (nothing of the repository is collected).
        """
        now = time.time() if now is None else now
        tags = self._tag_map(name)
        manifests = self._links(name, "_manifests")
        blobs = self._links(name, "_blobs")
        kept = {d for d in manifests
                if d in tags.values() or d in keep or now - manifests[d] < grace}
        used, todo = set(), list(kept)
        while todo:
            digest = todo.pop()
            try:
                with open(self.blob_path(digest), "rb") as f:
                    doc = json.loads(f.read(4 * 1024 * 1024 + 1))
                children = [d["digest"] for d in doc.get("manifests") or ()]
                if "config" in doc:
                    used.update(d["digest"] for d in [doc["config"], *(doc.get("layers") or ())])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return {"name": name, "snapshot": None, "manifests": [], "blobs": []}
            for child in children:
                if child in manifests and child not in kept:
                    kept.add(child)
                    todo.append(child)
        return {
            "name": name,
            # (a manifest pushed again, even by digest, links anew: its time changes)
            "snapshot": (sorted(tags.items()), sorted(manifests.items())),
            "manifests": sorted(d for d in manifests if d not in kept),
            "blobs": sorted(d for d, mtime in blobs.items()
                            if d not in used and d not in kept and now - mtime >= grace),
        }

    def collect(self, plan, grace=86400.0, now=None):
        """
        Remove what L{scan} found (C{plan}) on the reactor thread, unless the repository
        changed since (a tag, a manifest added, removed or pushed again: then nothing,
        until a later scan): each link not held (L{hold}) and still older than C{grace}, then the
        content no repository links any more, renamed into C{trash/}.

        @return: C{{"manifests", "blobs", "bytes", "trash", "changed"}}: the digests removed
            from the repository, the bytes of content freed, the trash paths to delete (in
            a thread: L{empty_trash}), and whether the repository changed since its scan.
        """
        now = time.time() if now is None else now
        name = plan["name"]
        out = {"manifests": [], "blobs": [], "bytes": 0, "trash": [], "changed": False}
        if plan["snapshot"] is None:
            return out
        if plan["snapshot"] != (sorted(self._tag_map(name).items()),
                                sorted(self._links(name, "_manifests").items())):
            out["changed"] = True
            return out
        for key, path_of in (("manifests", self._manifest_link), ("blobs", self._link_path)):
            for digest in plan[key]:
                path = path_of(name, digest)
                try:
                    if digest in self._held or now - os.stat(path).st_mtime < grace:
                        continue
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                out[key].append(digest)
        for digest in out["manifests"] + out["blobs"]:
            if digest in self._held or self._linked_anywhere(digest):
                continue
            trash = os.path.join(self.root, "trash", str(uuidlib.uuid4()))
            try:
                size = os.stat(self.blob_path(digest)).st_blocks * 512
                os.rename(self.blob_path(digest), trash)
            except FileNotFoundError:
                continue
            out["bytes"] += size
            out["trash"].append(trash)
        return out

    @staticmethod
    def empty_trash(paths):
        """Delete collected content (in a thread: a large file takes a while to free)."""
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def disk_usage(self):
        """
        @return: a Deferred firing with the disk the stored blobs take, in bytes (their
            allocated blocks: a sparse raw disk counts what its data takes); the tree is
            walked in a thread.
        """

        def walk():
            total = 0
            for dirpath, _, files in os.walk(os.path.join(self.root, "blobs")):
                for f in files:
                    try:
                        total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
                    except FileNotFoundError:
                        pass  # collected meanwhile
            return total

        return self._in_thread(walk)
