"""
The agent's image cache: pulls zwrm VM images from the control plane's registry, verifies
every byte against its digest, and keeps blobs on local disk with LRU eviction.

Layout under C{root}::

    blobs/sha256/<hex>   verified content (kernels, initrds, disks, configs, manifests)
    tmp/<hex>.<n>        downloads in progress (removed at start-up)

A download streams the response body to a temporary file while hashing it: batches of the
body go to two threads, one hashing and one writing (so neither hashing nor disk writes run
on the reactor thread, and they overlap each other and the reading; the connection is paused
while too much waits for them). The file is written with O_DIRECT where the file system
takes it, bypassing the page cache (L{zwrm.sparse.SparseFile}). Blocks of zeros are left as holes, so a
sparse raw disk is cached sparse. Only a file whose SHA-256 equals its
digest is fsynced and renamed into C{blobs/}; a mismatch discards it and fetches again, up to
C{max_attempts}. A connection that drops mid-body is resumed with an HTTP Range request
from the last byte received (up to C{max_resumes} times), continuing the same hash.

Eviction: when the cache grows past C{high_watermark * limit_bytes} it evicts least recently
used blobs until it is at or below C{low_watermark * limit_bytes}. It never evicts a pinned
blob (a machine on the host uses it, or an operation such as L{ImageCache.resolve} is in
flight) nor one used less than C{min_age} seconds ago. A download that cannot fit within
C{limit_bytes} even after eviction fails with L{ResourceExhausted} before it starts.

The last-use times live in memory; after a restart every blob counts as just used (it is
protected for C{min_age}), ordered among themselves by file modification time.

The registry's address is not fixed: L{ImageCache.follow_registry} points new pulls at
another registry (the control plane announced another C{registry_url}), and with
C{learn_registry} set, a manifest that cannot be had from the current registry (unreachable,
unknown there, credentials refused) makes the cache ask for the address again and, if it
changed, try there once: behind an external router a control plane restarted with another
C{registry_url} does not end the agents' sessions, so they learn it at their next pull.  A
download under way keeps the address it started with (its resumes too) and finishes or
fails as any download does; cached blobs stay valid, since they are named by digest.
"""

import hashlib
import inspect
import itertools
import os
from collections import Counter, deque

from treq.client import HTTPClient
from twisted.internet import defer, protocol, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from zope.interface import implementer

from zwrm.drivers import kernelimage
from zwrm.errors import (
    AuthenticationFailed,
    Corrupt,
    InvalidArgument,
    NotAuthorized,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from zwrm.interfaces import IImageCache
from zwrm.registry.client import auth_header
from zwrm.registry.image import MANIFEST_TYPE, parse_config, parse_manifest, parse_reference
from zwrm.sparse import SparseFile

#: Bytes gathered from the connection before they go to the hashing and writing threads.
BATCH = 4 * 1024 * 1024
#: The connection is paused while more than this waits to be hashed or written.
MAX_PENDING = 3 * BATCH
MANIFEST_ACCEPT = ", ".join(
    [
        MANIFEST_TYPE,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
MAX_MANIFEST = 4 * 1024 * 1024


def _check_digest(digest):
    if (
        not isinstance(digest, str)
        or not digest.startswith("sha256:")
        or len(digest) != 71
        or any(c not in "0123456789abcdef" for c in digest[7:])
    ):
        raise InvalidArgument(f"not a sha256 digest: {digest!r}")
    return digest[7:]


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Stage:
    """
    Runs C{work(batch)} in a thread for each batch handed to it, in order and one at a
    time; C{done(n)} (or C{failed(failure)}) is called on the reactor thread after each.
    """

    __slots__ = ("_in_thread", "_work", "_done", "_failed", "queue", "busy")

    def __init__(self, in_thread, work, done, failed):
        self._in_thread = in_thread
        self._work = work
        self._done = done
        self._failed = failed
        self.queue = deque()
        self.busy = False

    def put(self, batch):
        self.queue.append(batch)
        self._next()

    def _next(self):
        if self.busy or not self.queue:
            return
        self.busy = True
        batch = self.queue.popleft()
        self._in_thread(self._work, batch).addCallbacks(
            self._ok, self._ko, callbackArgs=(batch[1],))

    def _ok(self, _, n):
        self.busy = False
        self._done(n)
        self._next()

    def _ko(self, failure):
        self.busy = False
        self._failed(failure)


class _BlobSink(protocol.Protocol):
    """
    Receives a response body into the L{zwrm.sparse.SparseFile} C{blobfile} from file offset C{offset} on
    while hashing it with C{hasher}: batches of at least L{BATCH} bytes go to two threads,
    one hashing, one writing (so the two overlap each other and the next reads); the
    connection is paused while more than L{MAX_PENDING} bytes wait for either.

    C{done} fires with C{None} when the whole body was written and hashed, or fails with
    the reason the body ended early (bytes received before that are written and hashed:
    C{written} counts them).
    """

    def __init__(self, in_thread, blobfile, offset, hasher, clock, idle_timeout, max_bytes=None):
        self._file = blobfile
        self._offset = offset
        self._hasher = hasher
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._hashing = _Stage(in_thread, self._hash_sync, self._hashed, self._failed)
        self._writing = _Stage(in_thread, self._write_sync, self._wrote, self._failed)
        self._buf = []
        self._buffered = 0
        self._queued = 0  # bytes handed to the stages: hashed + written
        self._hashed_bytes = 0
        self._written_bytes = 0
        self._paused = False
        self._ended = None
        self._watchdog = None
        self._received = 0
        self._seen = 0
        self._max = max_bytes
        self.oversize = False
        self.written = 0
        self.error = None
        self.done = defer.Deferred()

    def connectionMade(self):
        self._arm()

    def _arm(self):
        # One timer per idle_timeout, not one reset per chunk: when it fires, the transfer
        # counts as stalled only if no byte arrived since it was armed.
        if self._idle_timeout and self._ended is None:
            self._seen = self._received
            self._watchdog = self._clock.callLater(self._idle_timeout, self._idle)

    def _idle(self):
        self._watchdog = None
        if self._ended is not None or self.transport is None:
            return
        if self._paused or self._received != self._seen:
            self._arm()  # paused for our own writes, or bytes arrived: not stalled
        else:
            self.transport.stopProducing()

    def dataReceived(self, data):
        if self.oversize or self.error is not None:
            return
        self._buf.append(data)
        self._buffered += len(data)
        self._received += len(data)
        if self._max is not None and self._received > self._max:
            # More than the manifest says: it cannot verify; stop instead of filling the disk.
            self.oversize = True
            self._buf = []
            self._buffered = 0
            self._hashing.queue.clear()
            self._writing.queue.clear()
            if self.transport is not None and self._ended is None:
                self.transport.stopProducing()
            return
        if self._buffered >= BATCH:
            self._hand_off()

    def _hand_off(self):
        chunks = self._buf
        n = self._buffered
        self._buf = []
        self._buffered = 0
        self._hashing.put((chunks, n))
        self._writing.put((self._offset + self._queued, n, chunks))
        self._queued += n
        if (self._queued - self._written_done() > MAX_PENDING and not self._paused
                and self._ended is None):
            self._paused = True
            self.transport.pauseProducing()

    def _written_done(self):
        return min(self._hashed_bytes, self._written_bytes)

    def _hash_sync(self, batch):
        update = self._hasher.update
        for chunk in batch[0]:
            update(chunk)  # hashlib lets go of the GIL for chunks over 2 KiB

    def _write_sync(self, batch):
        offset, n, chunks = batch
        self._file.write(chunks, offset)

    def _hashed(self, n):
        self._hashed_bytes += n
        self._progress()

    def _wrote(self, n):
        self._written_bytes += n
        self._progress()

    def _progress(self):
        self.written = self._written_done()
        if (self._paused and self._ended is None
                and self._queued - self.written <= MAX_PENDING // 2):
            self._paused = False
            self.transport.resumeProducing()
        self._maybe_finish()

    def _failed(self, failure):
        if self.error is None:
            self.error = failure
        self._buf = []
        self._buffered = 0
        self._hashing.queue.clear()
        self._writing.queue.clear()
        if self._ended is None and self.transport is not None:
            self.transport.stopProducing()
        self._maybe_finish()

    def connectionLost(self, reason):
        self._ended = reason
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        if self._buffered and self.error is None and not self.oversize:
            self._hand_off()
        self._maybe_finish()

    def _maybe_finish(self):
        if (self._ended is None or self.done.called or self._hashing.busy
                or self._writing.busy or self._hashing.queue or self._writing.queue):
            return
        if self.error is not None:
            self.done.errback(self.error)
        elif self._ended.check(ResponseDone) and not self.oversize:
            self.done.callback(None)
        else:
            self.done.errback(self._ended)


def _registry_base(registry_url):
    """C{registry_url} without a trailing C{/} or C{/v2/}; it must be an http(s) URL."""
    if not isinstance(registry_url, str) or not registry_url.startswith(("http://", "https://")):
        raise InvalidArgument(f"registry_url {registry_url!r} is not an http:// or https:// URL")
    base = registry_url.rstrip("/")
    if base.endswith("/v2"):
        base = base[:-3]
    return base


class _Entry:
    __slots__ = ("size", "last_used", "order")

    def __init__(self, size, last_used, order):
        self.size = size
        self.last_used = last_used
        self.order = order


@implementer(IImageCache)
class ImageCache:
    """
    The agent's content-addressed image cache.

    @param reactor: provides TCP, threads (for hashing and disk writes).
    @param root: the cache directory (created if missing).
    @param registry_url: the control plane's HTTP base URL, e.g.
        C{https://cp.example.com:8080} (a trailing C{/v2/} is accepted).
    @param credentials: C{(host_id, token)} for Basic auth, a str for a Bearer token, or
        L{None}.
    @param limit_bytes: the most the cache may hold.
    @param high_watermark: fraction of C{limit_bytes} above which eviction starts.
    @param low_watermark: fraction of C{limit_bytes} eviction brings the cache down to.
    @param min_age: seconds a blob is kept after its last use, whatever the pressure.
    @param clock: C{IReactorTime} for last-use times, retry back-off and the idle timeout
        (default: C{reactor}).
    @param http_client: a C{treq.HTTPClient} to use (e.g. one configured for TLS with the
        cluster CA); by default one over a persistent connection pool on C{reactor}.
    @param max_attempts: downloads of one blob that fail verification before giving up.
    @param max_resumes: interrupted transfers resumed (per attempt) before giving up.
    @param idle_timeout: seconds without bytes after which a transfer counts as dropped.
    @param learn_registry: L{None}, or a callable returning (a Deferred or coroutine of) the
        registry URL the control plane announces now, or L{None} (see the module docstring).
    @param direct_io: write downloads with C{O_DIRECT} where the file system takes it,
        bypassing the page cache (see L{zwrm.sparse.SparseFile}).
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        root,
        registry_url,
        credentials,
        limit_bytes,
        high_watermark=0.9,
        low_watermark=0.7,
        min_age=600.0,
        clock=None,
        http_client=None,
        max_attempts=3,
        max_resumes=5,
        idle_timeout=60.0,
        learn_registry=None,
        direct_io=True,
    ):
        if not 0 < low_watermark <= high_watermark <= 1:
            raise InvalidArgument(
                "image cache watermarks need 0 < low_watermark <= high_watermark <= 1"
            )
        if limit_bytes <= 0:
            raise InvalidArgument("image cache limit must be positive")
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self.root = os.path.abspath(root)
        self._base = _registry_base(registry_url)
        self.learn_registry = learn_registry
        self._auth = auth_header(credentials)
        self.limit = int(limit_bytes)
        self.high = int(limit_bytes * high_watermark)
        self.low = int(limit_bytes * low_watermark)
        self.min_age = min_age
        self.max_attempts = max_attempts
        self.max_resumes = max_resumes
        self.idle_timeout = idle_timeout
        self.direct_io = direct_io
        if http_client is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = 4
            http_client = HTTPClient(Agent(reactor, pool=self._pool))
        else:
            self._pool = None
        self._http = http_client
        self._blobs = {}
        self._pins = Counter()
        self._inflight = {}
        self._tags = {}
        self._order = 0
        self._seq = itertools.count()
        self._reserved = 0
        self.size = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._scan()

    @property
    def registry_url(self):
        """The registry base URL new pulls use (no trailing C{/v2})."""
        return self._base

    def follow_registry(self, registry_url):
        """
        Pull from C{registry_url} from now on.  Downloads under way finish (or fail)
        against the registry they started with; cached blobs stay (they are by digest).

        @return: whether the address changed.
        @raise InvalidArgument: C{registry_url} is not an http(s) URL.
        """
        base = _registry_base(registry_url)
        if base == self._base:
            return False
        self.log.info("image cache: registry {old} -> {new} for new pulls", old=self._base,
                      new=base)
        self._base = base
        return True

    async def _relearn(self):
        """
        Ask C{learn_registry} for the registry's address and follow it.

        @return: whether the address changed.
        """
        if self.learn_registry is None:
            return False
        try:
            url = self.learn_registry()
            if isinstance(url, defer.Deferred) or inspect.isawaitable(url):
                url = await url
            return bool(url) and self.follow_registry(url)
        except Exception as e:
            self.log.warn("image cache: could not learn the registry's address: {why}",
                          why=getattr(e, "message", None) or e)
            return False

    def _scan(self):
        blobdir = os.path.join(self.root, "blobs", "sha256")
        tmpdir = os.path.join(self.root, "tmp")
        os.makedirs(blobdir, exist_ok=True)
        os.makedirs(tmpdir, exist_ok=True)
        for name in os.listdir(tmpdir):
            os.unlink(os.path.join(tmpdir, name))
        found = []
        for name in os.listdir(blobdir):
            st = os.stat(os.path.join(blobdir, name))
            found.append((st.st_mtime, name, st.st_size))
        now = self._clock.seconds()
        for _, name, size in sorted(found):
            self._add("sha256:" + name, size, now)

    def _add(self, digest, size, now):
        self._order += 1
        self._blobs[digest] = _Entry(size, now, self._order)
        self.size += size

    def _in_thread(self, f, *args):
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def path(self, digest):
        """The local path of a blob (whether or not it is cached)."""
        return os.path.join(self.root, "blobs", "sha256", _check_digest(digest))

    def has(self, digest):
        """Whether the blob is in the cache."""
        return digest in self._blobs

    # --- pins and eviction ---------------------------------------------------------

    def pin(self, digest):
        """
        Keep C{digest} from eviction until a matching L{unpin}. Pins count: a blob pinned
        twice needs two unpins.
        """
        _check_digest(digest)
        self._pins[digest] += 1

    def unpin(self, digest):
        """
        Release one pin; the blob counts as used now (so it is kept C{min_age} more).
        """
        if self._pins[digest] <= 1:
            del self._pins[digest]
        else:
            self._pins[digest] -= 1
        self._touch(digest)
        self._maybe_evict()

    def _touch(self, digest):
        entry = self._blobs.get(digest)
        if entry is not None:
            self._order += 1
            entry.last_used = self._clock.seconds()
            entry.order = self._order

    def _evictable(self):
        now = self._clock.seconds()
        return sorted(
            (
                (e.last_used, e.order, d)
                for d, e in self._blobs.items()
                if not self._pins[d] and now - e.last_used >= self.min_age
            ),
        )

    def _evict_to(self, target):
        for _, _, digest in self._evictable():
            if self.size + self._reserved <= target:
                break
            entry = self._blobs.pop(digest)
            self.size -= entry.size
            self.evictions += 1
            try:
                os.unlink(self.path(digest))
            except FileNotFoundError:
                pass
            self.log.info("image cache evicted {digest} ({size} bytes)", digest=digest,
                          size=entry.size)

    def _maybe_evict(self):
        if self.size + self._reserved > self.high:
            self._evict_to(self.low)

    def evict(self):
        """
        Run eviction now (it also runs after every download and unpin): if the cache is
        above its high watermark, evict LRU blobs down to the low one.
        """
        self._maybe_evict()

    def _reserve(self, size):
        if self.size + self._reserved + size > self.high:
            self._evict_to(max(self.low - size, 0))
        if self.size + self._reserved + size > self.limit:
            raise ResourceExhausted(
                f"image cache full: {size} more bytes do not fit in {self.limit} "
                f"({self.size} cached, {self._reserved} being downloaded, the rest pinned "
                f"or used less than {self.min_age:g}s ago)"
            )
        self._reserved += size

    def stats(self):
        """
        @return: C{{"size", "limit", "high_watermark", "low_watermark", "hits", "misses",
            "blobs", "pinned", "evictions", "downloading"}} (bytes and counts), for
            C{zwrm host status}.
        """
        return {
            "size": self.size,
            "limit": self.limit,
            "high_watermark": self.high,
            "low_watermark": self.low,
            "hits": self.hits,
            "misses": self.misses,
            "blobs": len(self._blobs),
            "pinned": sum(1 for d, n in self._pins.items() if n > 0),
            "evictions": self.evictions,
            "downloading": len(self._inflight),
        }

    # --- pulling -------------------------------------------------------------------

    def _headers(self, extra=None):
        h = {}
        if self._auth is not None:
            h[b"Authorization"] = [self._auth]
        for k, v in (extra or {}).items():
            h[k] = [v]
        return h

    @staticmethod
    def _http_error(code, what):
        if code == 401:
            return AuthenticationFailed(f"the registry did not accept this agent's credentials ({what})")
        if code == 403:
            return NotAuthorized(f"this agent may not read {what}")
        if code == 404:
            return NotFound(f"{what} is not in the registry")
        return Unavailable(f"the registry answered {code} for {what}")

    async def fetch_blob(self, name, digest, size=None):
        """
        Make sure blob C{digest} of repository C{name} is in the cache, downloading it if
        needed; concurrent calls for one digest share one download.

        The caller holds a pin on the blob when this returns (release it with L{unpin}).

        @param size: the expected size from the manifest, if known (checked, and used to
            make room before the download).
        @return: the local path.
        """
        _check_digest(digest)
        self.pin(digest)
        try:
            if digest in self._blobs:
                self.hits += 1
                self._touch(digest)
                return self.path(digest)
            waiter = defer.Deferred()
            waiters = self._inflight.get(digest)
            if waiters is not None:
                waiters.append(waiter)
            else:
                self.misses += 1
                self._inflight[digest] = [waiter]
                d = defer.Deferred.fromCoroutine(self._download(name, digest, size))
                d.addBoth(self._downloaded, digest)
            return await waiter
        except BaseException:
            self.unpin(digest)
            raise

    def _downloaded(self, result, digest):
        waiters = self._inflight.pop(digest)
        for w in waiters:
            if isinstance(result, Failure):
                w.errback(result)
            else:
                w.callback(result)
        if isinstance(result, Failure):
            result.trap(Exception)  # handed to the waiters

    async def _download(self, name, digest, size):
        hexd = _check_digest(digest)
        url = f"{self._base}/v2/{name}/blobs/{digest}".encode()
        reserved = size or 0
        self._reserve(reserved)
        try:
            for attempt in range(1, self.max_attempts + 1):
                tmp = os.path.join(self.root, "tmp", f"{hexd}.{next(self._seq)}")
                try:
                    got_size, actual = await self._transfer(url, tmp, digest, size)
                except BaseException:
                    await self._in_thread(_unlink, tmp)
                    raise
                if actual == digest and (size is None or got_size == size):
                    break
                self.log.warn(
                    "image cache: {digest} from the registry failed verification (got "
                    "{actual}, {n} bytes); discarded, attempt {attempt}/{max}",
                    digest=digest, actual=actual, n=got_size, attempt=attempt,
                    max=self.max_attempts,
                )
                os.unlink(tmp)
            else:
                raise Corrupt(
                    f"blob {digest} failed verification {self.max_attempts} times; not used"
                )
            if not size:
                self._reserve(got_size)
                reserved = got_size
            dest = self.path(digest)

            def commit():
                with open(tmp, "rb+") as f:
                    f.truncate(got_size)  # trailing zeros were left as a hole
                    os.fsync(f.fileno())
                os.rename(tmp, dest)
                fd = os.open(os.path.dirname(dest), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

            await self._in_thread(commit)
            self._add(digest, got_size, self._clock.seconds())
        finally:
            self._reserved -= reserved
        self._maybe_evict()
        return dest

    async def _transfer(self, url, tmp, what, size=None):
        """
        Download C{url} into C{tmp}, resuming dropped connections with Range.

        @return: C{(size, "sha256:<hex>")} of what was received.
        """
        hasher = hashlib.sha256()
        f = await self._in_thread(SparseFile, tmp, self.direct_io)
        try:
            offset = 0
            resumes = 0
            while True:
                extra = {b"Range": f"bytes={offset}-".encode()} if offset else None
                try:
                    resp = await self._http.get(url, headers=self._headers(extra), unbuffered=True)
                except Exception as e:
                    resp = None
                    error = e
                if resp is not None:
                    if offset and resp.code == 200:
                        # The server ignored Range: start over.
                        await self._in_thread(f.restart)
                        hasher = hashlib.sha256()
                        offset = 0
                    elif resp.code == 206:
                        crange = resp.headers.getRawHeaders(b"content-range", [b""])[0]
                        if not crange.startswith(f"bytes {offset}-".encode()):
                            await resp.content()
                            raise Unavailable(f"the registry resumed {what} at the wrong offset")
                    elif resp.code == 416 and offset:
                        # Everything had arrived when the connection dropped; the digest
                        # check decides.
                        await resp.content()
                        break
                    elif resp.code != 200:
                        await resp.content()
                        raise self._http_error(resp.code, what)
                    sink = _BlobSink(
                        self._in_thread, f, offset, hasher, self._clock,
                        self.idle_timeout,
                        None if size is None else size - offset,
                    )
                    resp.deliverBody(sink)
                    try:
                        await sink.done
                        offset += sink.written
                        break
                    except Exception as e:
                        if sink.oversize:
                            return offset + sink.written + 1, "oversize"
                        if sink.error is not None:
                            raise ResourceExhausted(
                                f"cannot write {what} to the image cache: {sink.error.value}"
                            ) from None
                        offset += sink.written
                        error = e
                resumes += 1
                if resumes > self.max_resumes:
                    raise Unavailable(f"could not download {what}: {error}")
                self.log.info(
                    "image cache: transfer of {what} interrupted at {offset} ({error}); resuming",
                    what=what, offset=offset, error=error,
                )
                await task.deferLater(self._clock, min(0.1 * 2**resumes, 5.0), lambda: None)
            await self._in_thread(f.finish)
            return offset, "sha256:" + hasher.hexdigest()
        finally:
            await self._in_thread(f.close)

    async def _fetch_manifest(self, name, reference):
        """
        L{_get_manifest}; when the registry does not give it, learn the registry's address
        again and, if it changed, ask the new one (see the module docstring).
        """
        try:
            return await self._get_manifest(name, reference)
        except (Unavailable, NotFound, AuthenticationFailed, NotAuthorized) as e:
            old = self._base
            if not await self._relearn():
                raise
            self.log.info("image cache: {ref} not had from {old} ({why}); asking {new}",
                          ref=f"{name}:{reference}", old=old, why=e.message, new=self._base)
            return await self._get_manifest(name, reference)

    async def _get_manifest(self, name, reference):
        url = f"{self._base}/v2/{name}/manifests/{reference}".encode()
        try:
            resp = await self._http.get(url, headers=self._headers({b"Accept": MANIFEST_ACCEPT.encode()}))
        except Exception as e:
            raise Unavailable(f"the registry at {self._base} is not reachable: {e}") from None
        if resp.code != 200:
            await resp.content()
            raise self._http_error(resp.code, f"image {name}:{reference}")
        length = resp.length
        if isinstance(length, int) and length > MAX_MANIFEST:
            raise Corrupt(f"manifest of {name}:{reference} is larger than 4 MiB")
        body = await resp.content()
        return body

    async def _manifest(self, name, reference):
        """
        @return: C{(digest, body)} of the manifest, pinned (the caller unpins).
        """
        body = None
        if reference.startswith("sha256:"):
            digest = reference
            if digest in self._blobs:
                self.hits += 1
            else:
                self.misses += 1
                body = await self._fetch_manifest(name, digest)
                if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
                    raise Corrupt(f"manifest {digest} from the registry does not match its digest")
                await self._store_small(digest, body)
        else:
            try:
                body = await self._fetch_manifest(name, reference)
            except Unavailable:
                digest = self._tags.get((name, reference))
                if digest is None or digest not in self._blobs:
                    raise
                self.log.warn(
                    "registry unreachable; using cached {name}:{tag} = {digest}",
                    name=name, tag=reference, digest=digest,
                )
            else:
                digest = "sha256:" + hashlib.sha256(body).hexdigest()
                if await self._store_small(digest, body):
                    self.misses += 1
                else:
                    self.hits += 1
                self._tags[(name, reference)] = digest
        self.pin(digest)
        self._touch(digest)
        if body is None:
            try:
                body = await self._in_thread(self._read, self.path(digest))
            except BaseException:
                self.unpin(digest)
                raise
        return digest, body

    @staticmethod
    def _read(path):
        with open(path, "rb") as f:
            return f.read()

    async def _store_small(self, digest, body):
        """Store a small verified blob; @return: whether it was new."""
        if digest in self._blobs:
            return False
        tmp = os.path.join(self.root, "tmp", f"{digest[7:]}.m{next(self._seq)}")
        dest = self.path(digest)

        def write():
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, dest)

        await self._in_thread(write)
        if digest in self._blobs:
            return False
        self._add(digest, len(body), self._clock.seconds())
        return True

    async def resolve(self, ref, pin=False):
        """
        Make image C{ref} (C{NAME[:TAG]} or C{NAME@sha256:...}) available locally.

        Its manifest, config and layers are pulled as needed (in parallel) and verified;
        all of them are pinned while this runs. With C{pin=True} they stay pinned and the
        caller releases them with C{unpin} for each of the returned C{digests} (e.g. when
        the machine using them is destroyed).

        @return: a Deferred (this is a coroutine) firing with C{{"kernel", "initrd", "disk"}}
            (local paths or L{None}), C{"disk_format"} (C{"raw"}, C{"qcow2"}: the disk
            layer's media type; the driver checks it with qemu-img before QEMU sees it),
            C{"firmware"}, C{"cmdline"}, C{"service_port"}, C{"manifest"} (the
            manifest digest) and C{"digests"} (every blob of the image).
        @raise InvalidArgument: bad reference or not a zwrm image.
        @raise NotFound: unknown image. @raise Corrupt: verification kept failing.
        @raise Unavailable: registry unreachable. @raise ResourceExhausted: cache full.
        """
        name, reference = parse_reference(ref)
        held = []
        try:
            mdigest, body = await self._manifest(name, reference)
            held.append(mdigest)
            info = parse_manifest(body)
            roles = [r for r in ("config", "kernel", "initrd", "disk") if info[r] is not None]
            results = await defer.DeferredList(
                [
                    defer.Deferred.fromCoroutine(
                        self.fetch_blob(name, info[r]["digest"], info[r]["size"])
                    )
                    for r in roles
                ],
                consumeErrors=True,
            )
            paths = {}
            first_error = None
            for role, (ok, value) in zip(roles, results, strict=True):
                if ok:
                    held.append(info[role]["digest"])
                    paths[role] = value
                elif first_error is None:
                    first_error = value
            if first_error is not None:
                first_error.raiseException()
            config = parse_config(await self._in_thread(self._read, paths["config"]))
            if paths.get("kernel"):
                # An image stored before the registry checked its kernel layer: not given
                # to QEMU, which would run any file as an old zImage (kernelimage).
                await self._in_thread(kernelimage.inspect, paths["kernel"],
                                      f"image {ref}: its kernel layer {info['kernel']['digest']}")
            out = {
                "kernel": paths.get("kernel"),
                "initrd": paths.get("initrd"),
                "disk": paths.get("disk"),
                "disk_format": info["disk"]["format"] if info["disk"] else None,
                "firmware": config["firmware"],
                "cmdline": config["cmdline"],
                "service_port": config["service_port"],
                "manifest": mdigest,
                "digests": list(held),
            }
            if pin:
                held = []
            return out
        finally:
            for digest in held:
                self.unpin(digest)

    def close(self):
        """
        Close idle connections to the registry.

        @return: a Deferred that fires when they are closed.
        """
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return defer.succeed(None)

