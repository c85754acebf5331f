"""
What a host keeps that the cluster does not record: volumes, snapshot files and machine
records its agent holds that no row names for that host.

They come from a host removed and joined again (its old volumes, recovered elsewhere or
given up, and its old machines: the removal deletes nothing on the host), from a volume
destroyed or a replica deleted while its host could not be asked, or from a control-plane
database restored from a backup older than them. They take room, and a stale volume or
snapshot file refuses a copy with the same id (a drain or a recovery back onto that host).

zwrm never deletes them on its own (they may be the only copy of something an operator
wants back): C{zwrm.host.status} lists them (its agent asked then), the first
reconciliation of a host that joined as a new host logs them (L{Unrecorded.look}: what a
removed host kept of its life before), and the operator's C{zwrm.host.clean} deletes them
(L{Unrecorded.clean}). (Not at every reconciliation: a control plane that thousands of
agents reconnect to asks each only for its machines.) What is under way is never listed: the copies a drain
under way moves onto the host or off it, those a rollback left behind (the drain deletes
them), and the volumes of a snapshot operation, replica or recovery under way (their rows
follow the copy).
"""

from twisted.logger import Logger

from zwrm import errors
from zwrm.control.appspec import error_text


class Unrecorded:
    """
    Lists and deletes what hosts keep that the cluster does not record.

    @ivar found: host id -> what was found there last (L{find}'s form).
    """

    log = Logger()

    def __init__(self, registry, apps):
        """
        @param registry: the L{zwrm.control.registry.HostRegistry} (its executors; each
            reconciliation of a host calls L{look}).
        @param apps: the L{zwrm.control.apps.Apps} (its resource layer, C{apps.data}; its
            volumes' operations, C{apps.volumes}).
        """
        self._registry = registry
        self._data = apps.data
        self._volumes = apps.volumes
        self.found = {}
        registry.on_reconciled.append(self._reconciled)

    async def _call(self, host_id, verb, *args, **kwargs):
        try:
            return await self._registry.call_executor(host_id, verb, *args, **kwargs)
        except Exception as e:
            raise errors.from_wire(e) from None

    async def _reconciled(self, host_id):
        if host_id in self._registry.joined_anew:
            self._registry.joined_anew.discard(host_id)
            await self.look(host_id)

    async def look(self, host_id):
        """
        List what C{host_id} keeps unrecorded (L{find}), and log it when it changed.

        @return: what L{find} found, or L{None} if its agent could not say (its version
            lists no snapshots, or it went away: logged at most as one line).
        """
        try:
            found = await self.find(host_id)
        except errors.ZwrmError as e:
            self.log.info("host {host_id}: what it keeps was not listed: {e}",
                          host_id=host_id, e=e.message)
            return None
        old = self.found.get(host_id)
        self.found[host_id] = found
        if any(found.values()) and _ids(found) != _ids(old or {}):
            self.log.warn(
                "host {host_id} keeps what the cluster does not record: {what}; zwrm host "
                "status {host_id} lists them, zwrm host clean {host_id} deletes them",
                host_id=host_id, what=describe(found))
        return found

    async def find(self, host_id):
        """
        What C{host_id}'s agent keeps that no row records there, nothing under way included.

        @return: C{{"volumes": [{id, allocated_bytes}], "snapshots": [{id, volume_id,
            allocated_bytes}], "machines": [{id, state}]}}.
        """
        volumes = await self._call(host_id, "volume.list")
        files = await self._call(host_id, "volume.snapshots")
        machines = await self._call(host_id, "machine.list")
        data = self._data
        known_volumes = {v["id"] for v in await data.volumes.find(host_id=host_id)}
        known_files = ({s["id"] for s in await data.volumes.find_snapshots(host_id=host_id)}
                       | {r["id"] for r in await data.volumes.find_replicas(host_id=host_id)})
        known_machines = {m["id"] for m in await data.machines.find(host_id=host_id)}
        moving = await self._moving(host_id)
        known_volumes |= moving["volumes"]
        known_files |= moving["snapshots"]
        known_machines |= moving["machines"]
        return {
            "volumes": [{"id": v["id"], "allocated_bytes": v.get("allocated_bytes")}
                        for v in volumes if v["id"] not in known_volumes
                        and not self._volumes.busy(v["id"])],
            "snapshots": [{"id": s["id"], "volume_id": s["volume_id"],
                           "allocated_bytes": s.get("allocated_bytes")}
                          for s in files if s["id"] not in known_files
                          and not self._volumes.busy(s["volume_id"])],
            "machines": [{"id": m["id"], "state": m.get("state")}
                         for m in machines if m["id"] not in known_machines],
        }

    async def _moving(self, host_id):
        """The ids a drain under way moves onto C{host_id} or off it, and its leftovers."""
        out = {"volumes": set(), "snapshots": set(), "machines": set()}
        drains = self._data.drains
        migrations = []
        for d in await drains.find(states=("running", "cancelling")):
            migrations += [m for m in await drains.migrations(d["id"])
                           if host_id in (m["source_host"], m["target_host"])]
        migrations += await drains.with_leftovers()
        for m in migrations:
            detail = m.get("detail") or {}
            out["volumes"].update(detail.get("volumes") or ())
            for ids in (detail.get("snapshots") or {}).values():
                out["snapshots"].update(ids)
            out["machines"].update(x for x in (m["machine_id"], detail.get("replacement")) if x)
            for left in detail.get("leftovers") or ():
                out["volumes"].add(left.get("volume_id"))
                out["snapshots"].update(left.get("snapshots") or ())
        return out

    async def clean(self, host_id):
        """
        Delete what C{host_id} keeps unrecorded (L{find}, read again now): its machine
        records that are down (a running one is left: the reconciliation stopped it, or
        stops it), then the snapshot files, then the volumes (their recorded snapshot
        files and replicas beside them kept).

        @return: C{{"host_id", "deleted": {volumes, snapshots, machines}, "kept":
            [{id, kind, reason}]}}.
        @raise zwrm.errors.NotFound: no such host.
        @raise zwrm.errors.Conflict: the host is not ready (its agent must be there and
            nothing moving), or a drain of it is under way.
        """
        state = self._registry.state(host_id)
        if state not in ("ready", "drained"):
            raise errors.Conflict(f"host {host_id} is {state}: clean it once it is ready "
                                  "or drained", argument="host_id")
        if not self._registry.executor_available(host_id):
            raise errors.Unavailable(f"host {host_id}'s agent cannot be reached",
                                     argument="host_id")
        found = await self.find(host_id)
        deleted = {"volumes": [], "snapshots": [], "machines": []}
        kept = []

        async def delete(kind, item, verb, *args, **kwargs):
            try:
                await self._call(host_id, verb, *args, **kwargs)
            except errors.NotFound:
                pass  # gone already
            except errors.ZwrmError as e:
                kept.append({"id": item["id"], "kind": kind, "reason": e.message})
                return
            deleted[kind].append(item["id"])

        for m in found["machines"]:
            if m["state"] not in ("stopped", "failed"):
                kept.append({"id": m["id"], "kind": "machines",
                             "reason": f"it is {m['state']} (stopped when the host is "
                                       "reconciled; clean again then)"})
                continue
            await delete("machines", m, "machine.destroy", m["id"])
        for s in found["snapshots"]:
            await delete("snapshots", s, "volume.snapshot_delete", s["volume_id"], s["id"])
        for v in found["volumes"]:
            await delete("volumes", v, "volume.delete", v["id"], keep_snapshots=True)
        if any(deleted.values()):
            self.log.info("host {host_id}: deleted what the cluster did not record: {what}",
                          host_id=host_id, what=describe(deleted, counts=True))
        try:
            self.found[host_id] = await self.find(host_id)
        except errors.ZwrmError as e:
            self.log.warn("host {host_id}: not listed again: {e}", host_id=host_id,
                          e=error_text(e))
        return {"host_id": host_id, "deleted": deleted, "kept": kept}

    def forget(self, host_id):
        """The host was removed: nothing of it is listed any more."""
        self.found.pop(host_id, None)


def _ids(found):
    return {k: sorted(x["id"] if isinstance(x, dict) else x for x in v)
            for k, v in found.items()}


def describe(found, counts=False):
    """C{"2 volume(s) (v-1, v-2), 1 machine record(s) (m-1)"}, or C{"nothing"}."""
    names = (("volumes", "volume(s)"), ("snapshots", "snapshot file(s)"),
             ("machines", "machine record(s)"))
    parts = []
    for key, name in names:
        items = found.get(key) or []
        if items:
            ids = [x["id"] if isinstance(x, dict) else x for x in items]
            parts.append(f"{len(ids)} {name}" if counts else
                         f"{len(ids)} {name} ({', '.join(ids)})")
    return ", ".join(parts) or "nothing"
