"""
C{zwrm.image.*}: the built-in registry's images over WAMP, so that a WAMP client can see
and remove what C{zwrm images push} (or any OCI client) stored, without speaking the OCI
Distribution API. Pushing stays HTTP (C{/v2/}): images are large and streamed.

The registry's files are read in the reactor's thread pool, never on the reactor thread.
"""

import os

from autobahn import wamp
from twisted.internet.defer import fail
from twisted.internet.threads import deferToThreadPool

from zwrm import errors
from zwrm.drivers import diskimage, kernelimage
from zwrm.registry import image
from zwrm.registry.store import DIGEST_RE, StoreError

ROLES = ("kernel", "initrd", "disk")


class ImageAPI:
    """
    @param reactor: the reactor (its thread pool runs the file work).
    @param store: the registry's L{zwrm.registry.store.RegistryStore}.
    @param delete_enabled: whether images may be deleted (as the registry's own setting).
    """

    #: How long the collector leaves what nothing uses (seconds): a push uploads its blobs,
    #: then its manifest, and an image pushed but not yet tagged is not garbage.
    GC_GRACE = 86400.0

    def __init__(self, reactor, store, delete_enabled=True):
        self._reactor = reactor
        self._store = store
        self._delete_enabled = delete_enabled
        #: an async callable: the image references the cluster's app specs and machines
        #: name (set by the control plane); a manifest one names by digest is kept
        self.references = None

    def _in_thread(self, fn, *args):
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), fn, *args)

    def _describe(self, name, reference):
        try:
            digest, media_type, path = self._store.resolve(name, reference)
        except StoreError:
            raise errors.NotFound(f"no image {name}:{reference}") from None
        with open(path, "rb") as f:
            body = f.read()
        info = {"name": name, "digest": digest, "media_type": media_type,
                "tags": [], "size": None, "layers": {}}
        try:
            parsed = image.parse_manifest(body)
        except errors.InvalidArgument:
            info["kind"] = "other"  # an OCI artifact that is not a zwrm image
            return info
        info["kind"] = "zwrm"
        info["layers"] = {r: parsed[r] for r in ROLES if parsed[r]}
        info["size"] = sum(d["size"] for d in info["layers"].values())
        return info

    def _list(self, name):
        names = [name] if name is not None else self._store.repositories()
        out = []
        for n in names:
            for tag in self._store.tags(n):
                try:
                    info = self._describe(n, tag)
                except errors.NotFound:
                    continue  # removed meanwhile
                info["tag"] = tag
                out.append(info)
        return out

    def _info(self, ref):
        name, reference = image.parse_reference(ref)
        info = self._describe(name, reference)
        info["tags"] = [t for t in self._store.tags(name)
                        if self._store.resolve(name, t)[0] == info["digest"]]
        return info

    def _delete(self, ref):
        name, reference = image.parse_reference(ref)
        if ":" not in ref.split("/")[-1] and "@" not in ref:
            raise errors.InvalidArgument(f"say which tag or digest to delete: {ref}:TAG")
        try:
            self._store.delete_manifest(name, reference)
        except StoreError:
            raise errors.NotFound(f"no image {name}:{reference}") from None
        return {"image": ref, "deleted": True}

    def check_kernel(self, ref, digest):
        """
        Whether the kernel layer C{digest} of image C{ref} is one QEMU boots (an image
        stored before the registry checked its kernel layers may hold any file).

        @raise zwrm.errors.InvalidArgument: it is not, or it is missing.
        """
        def check():
            what = f"image {ref}: its kernel layer {digest}"
            try:
                kernelimage.inspect(self._store.blob_path(digest), what)
            except OSError as e:
                raise errors.InvalidArgument(f"{what} cannot be read: {e.strerror}") from None

        return self._in_thread(check)

    async def check_boot_disk(self, ref, disk):
        """
        Whether the disk layer C{disk} (C{{"digest", "format"}}) of image C{ref}, which
        has no kernel, has a boot sector for its firmware (L{diskimage.bootable}).

        @raise zwrm.errors.InvalidArgument: it has none, or it cannot be read.
        """
        what = f"image {ref}: its disk layer {disk['digest']}"
        try:
            head = await diskimage.boot_sectors(self._reactor, self._store.blob_path(
                disk["digest"]), disk.get("format") or "raw")
        except errors.InvalidArgument as e:
            raise errors.InvalidArgument(f"{what} cannot be read: {e.message}") from None
        if not diskimage.bootable(head):
            raise errors.InvalidArgument(
                f"{what} has no boot sector (no MBR boot signature, no GPT), and the image "
                "has no kernel: its firmware would boot nothing")

    @wamp.register("zwrm.image.list")
    def list(self, name=None):
        """
        Every tagged image, or those of repository C{name}: C{[{name, tag, digest,
        media_type, kind ("zwrm" or "other"), size, layers: {kernel, initrd, disk}}]}.
        """
        if name is not None:
            image.parse_reference(name)  # a readable error for a malformed name
        return self._in_thread(self._list, name)

    @wamp.register("zwrm.image.info")
    def info(self, ref):
        """
        One image by C{NAME[:TAG][@DIGEST]}: as in L{list}, with C{tags}, the tags that
        point at its manifest.

        @raise zwrm.errors.NotFound: no such image.
        """
        return self._in_thread(self._info, ref)

    @wamp.register("zwrm.image.gc")
    async def gc(self, dry_run=False, grace=None):
        """
        Remove what no image needs (L{zwrm.registry.store.RegistryStore.scan} and
        C{collect}), in every repository: manifests no tag, index or app spec points at,
        and blobs no remaining manifest uses, each older than C{grace} seconds (default
        L{GC_GRACE}); then the content no repository links.  With C{dry_run}, only what
        it would remove (C{bytes}: at most that much).

        @return: C{{"manifests": [{name, digest}], "blobs": [{name, digest}], "bytes",
            "dry_run", "changed"}} (C{changed}: repositories a push or a deploy by digest
            changed meanwhile, left for a later run).
        @raise zwrm.errors.NotAuthorized: deleting is turned off.
        """
        if not self._delete_enabled:
            raise errors.NotAuthorized("deleting images is turned off on this registry")
        grace = self.GC_GRACE if grace is None else float(grace)
        keep = await self._pinned()
        store = self._store

        def scan():
            plans = [store.scan(n, keep, grace) for n in store.repositories()]
            sizes = {}
            for p in plans:
                for d in p["manifests"] + p["blobs"]:
                    try:
                        sizes[d] = os.stat(store.blob_path(d)).st_blocks * 512
                    except OSError:
                        sizes[d] = 0
            return plans, sizes

        plans, sizes = await self._in_thread(scan)
        out = {"manifests": [], "blobs": [], "bytes": 0, "dry_run": bool(dry_run),
               "changed": []}
        if dry_run:
            for p in plans:
                for key in ("manifests", "blobs"):
                    out[key] += [{"name": p["name"], "digest": d} for d in p[key]]
            out["bytes"] = sum(sizes[d] for d in {d for p in plans
                                                  for d in p["manifests"] + p["blobs"]})
            return out
        trash = []
        # An app deployed by digest while the scan ran keeps its image (and that image's
        # repository keeps everything, until the next run).
        pinned = await self._pinned() - keep
        for p in plans:  # on the reactor thread, where pushes link what they stored
            if not p["manifests"] and not p["blobs"]:
                continue
            if pinned & set(p["manifests"]):
                out["changed"].append(p["name"])
                continue
            done = store.collect(p, grace)
            for key in ("manifests", "blobs"):
                out[key] += [{"name": p["name"], "digest": d} for d in done[key]]
            out["bytes"] += done["bytes"]
            if done.get("changed"):
                out["changed"].append(p["name"])
            trash += done["trash"]
        await self._in_thread(store.empty_trash, trash)
        return out

    def disk_usage(self):
        """The disk the registry's blobs take, in bytes (a Deferred; walked in a thread)."""
        return self._store.disk_usage()

    async def _pinned(self):
        """The manifest digests the cluster's apps and machines name (L{references})."""
        keep = set()
        for ref in (await self.references()) if self.references is not None else ():
            try:
                _, reference = image.parse_reference(ref)
            except errors.InvalidArgument:
                continue
            if DIGEST_RE.match(reference):
                keep.add(reference)
        return keep

    @wamp.register("zwrm.image.delete")
    def delete(self, ref):
        """
        Delete a tag (C{NAME:TAG}), or a manifest and every tag that points at it
        (C{NAME@sha256:...}); the blobs it used stay until L{gc} finds nothing uses them.

        @raise zwrm.errors.NotFound: no such image.
        @raise zwrm.errors.NotAuthorized: deleting is turned off.
        """
        if not self._delete_enabled:
            return fail(errors.NotAuthorized("deleting images is turned off on this registry"))
        return self._in_thread(self._delete, ref)
