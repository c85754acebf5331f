"""
Apps' volumes made and deleted on their own (C{zwrm.volume.*}): a volume created before
an app's first deploy, on the host the scheduler picks by disk, pins that replica there;
a volume is deleted only on request, never while a live machine uses it.

Snapshots: whole copies of a volume on its host, taken while its machine runs (a point in
time, through the hypervisor) or while it is down; a restore puts a snapshot's data back
into the volume while no machine runs with it, and keeps what the volume held as another
snapshot (C{before-restore-...}), so a restore loses nothing. Each is stored (C{creating})
before its host is asked, so a drain that starts meanwhile sees it and is refused until it
is done; one snapshot operation at a time per volume. A drain moves a volume's snapshots
with it (L{zwrm.control.drain.Drains}).

Replicas: a snapshot copied to another host (streamed between the agents as a drain moves
snapshots, verified), so that the volume survives the loss of its host: a host removed
with C{recover_volumes} has each of its volumes made again on the host of its newest
replica (L{zwrm.control.host_removal}). A drain of a host moves its replicas to other
hosts (L{AppVolumes.move_replica}); those no other host may keep go with its removal.
"""

import time

from autobahn.wamp.types import CallOptions

from zwrm import errors
from zwrm.control.appspec import check_name, error_text, new_id, whole_number
from zwrm.control.resources.machines import LIVE, placement_request
from zwrm.drivers.cloudinit import check_mount
from zwrm.tokens import mint_token

#: The names of the snapshots a restore keeps of what the volume held (never pruned).
RESTORE_PREFIX = "before-restore-"
#: The most snapshots C{keep} may ask for.
MAX_KEEP = 1000


class AppVolumes:
    """Create, list and delete apps' volumes."""

    def __init__(self, clock, data, placements, replicas, host_state=None, room_mb=None):
        """
        @param clock: an L{IReactorTime}.
        @param data: the control plane's resource layer.
        @param placements: the L{zwrm.control.placements.Placements} (a new volume's host).
        @param replicas: the L{zwrm.control.replicas.Replicas} (executor calls).
        @param host_state: C{host_state(host_id)}: a host's state (snapshots are refused
            while it drains).
        @param room_mb: C{room_mb(host_id)}: the MiB a copy may take on a host's data disk
            (L{zwrm.control.registry.HostRegistry.room_mb}), or L{None}: not known.
        """
        self._clock = clock
        self._data = data
        self._placements = placements
        self._replicas = replicas
        #: C{host_state(host_id) -> str} (the host registry's), or L{None}
        self.host_state = host_state
        self._room_mb = room_mb
        #: C{draining(host_id) -> bool}: whether a drain of the host is being planned or
        #: runs (set by L{zwrm.control.drain.Drains})
        self.draining = lambda host_id: False
        self._busy = {}  # volume id -> the snapshot operation under way
        #: host id -> {replica id: bytes of that copy still to land on the host}: what the
        #: copies under way will take there beyond what its agent last reported free
        self._incoming = {}

    async def create(self, app, name, size_mb, mount, replica=0, region=None,
                     datacenter=None, host_id=None):
        """
        Create volume C{name} for replica C{replica} of the app row C{app}: the scheduler
        picks its host (by disk), or C{host_id} if given.
        """
        check_name(name, "volume name")
        size_mb = whole_number({"size_mb": size_mb}, "size_mb", 2, 16 * 1024 * 1024, 64)
        check_mount(mount, repr(name))
        if await self._data.volumes.find(app_id=app["id"], name=name, replica=replica):
            raise errors.Conflict(f"app {app['name']!r} has a volume {name!r} for replica {replica}")
        # only a host with the disk is wanted: machines reserve their vCPUs and memory later
        request = placement_request({"vcpus": 1, "memory_mb": 1, "region": region,
                                     "datacenter": datacenter},
                                    pinned_host=host_id, disk_mb=size_mb)
        placement = self._placements.place(request)
        self._placements.unplace(placement)
        row = {"id": new_id("v"), "app_id": app["id"], "host_id": placement.host_id,
               "name": name, "replica": replica, "size_mb": size_mb, "mount": mount,
               "state": "creating", "created_at": self._clock.seconds()}
        await self._data.volumes.add(row)
        try:
            await self._replicas.call(row["host_id"], "volume.create", row["id"], size_mb)
        except Exception as e:
            await self._data.volumes.creation_failed(row, error_text(e))
            raise
        await self._data.volumes.set_state(row, "ready")
        return row

    async def destroy(self, row):
        """
        Delete the volume of row C{row} and its data.

        @raise zwrm.errors.Conflict: while a live machine uses it.
        """
        await self._not_used(row)
        with self.operation(row, "destroyed"):
            gone = f"volume {row['id']} was destroyed"
            for rep in await self._data.volumes.find_replicas(volume_id=row["id"]):
                await self._delete_replica(rep, gone, strict=False)
            for snap in reversed(await self._data.volumes.find_snapshots(volume_id=row["id"])):
                await self._delete_snapshot(row, snap, gone)
            try:
                await self._replicas.call(row["host_id"], "volume.delete", row["id"])
            except errors.NotFound:
                pass
            await self._data.volumes.delete(row)

    async def live_user(self, row):
        """The row of the live machine that uses the volume C{row}, or L{None}."""
        for m in await self._data.machines.find(app_id=row["app_id"]):
            if m["state"] in LIVE and any(v["id"] == row["id"] for v in m["spec"]["volumes"]):
                return m
        return None

    async def _not_used(self, row, what="destroyed"):
        """@raise zwrm.errors.Conflict: while a live machine uses the volume C{row}."""
        m = await self.live_user(row)
        if m is not None:
            how = "" if what == "destroyed" else (
                ": restart it around the restore (--restart), or scale replica "
                f"{row['replica']} of its app away first")
            raise errors.Conflict(f"volume {row['id']} is used by machine {m['id']} "
                                  f"({m['state']}){how}", argument="volume_id")

    # -- snapshots ----------------------------------------------------------------------

    def busy(self, volume_id):
        """Whether a snapshot operation on volume C{volume_id} is under way (L{operation})."""
        return volume_id in self._busy

    def operation(self, row, doing):
        """A context: the volume C{row} is being C{doing}; a second operation is refused."""
        busy = self._busy
        vid = row["id"]
        if vid in busy:
            raise errors.Conflict(f"volume {vid} is being {busy[vid]}; try again once that is "
                                  "done", argument="volume_id")

        class Operation:
            def __enter__(self):
                busy[vid] = doing

            def __exit__(self, *exc):
                busy.pop(vid, None)

        return Operation()

    def _host_usable(self, row):
        """
        @raise zwrm.errors.Conflict: the volume's host is draining or drained, or a drain
            of it is being planned.
        """
        state = "ready"
        if self.host_state is not None:
            try:
                state = self.host_state(row["host_id"])
            except errors.NotFound:
                state = "removed"
        if state == "ready" and self.draining(row["host_id"]):
            state = "draining"
        if state in ("draining", "drained", "removed"):
            raise errors.Conflict(f"volume {row['id']} is on host {row['host_id']}, which is "
                                  f"{state}", argument="volume_id")

    def _stamp(self):
        return time.strftime("%Y%m%d-%H%M%S", time.gmtime(self._clock.seconds()))

    async def _free_name(self, volume_id, base):
        taken = {s["name"] for s in await self._data.volumes.find_snapshots(volume_id=volume_id)}
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        return name

    def _snapshot_row(self, volume, name, reason):
        return {"id": new_id("s"), "volume_id": volume["id"], "app_id": volume["app_id"],
                "host_id": volume["host_id"], "name": name, "state": "creating", "live": False,
                "size_bytes": 0, "allocated_bytes": 0, "reason": reason,
                "created_at": self._clock.seconds()}

    async def snapshot(self, volume, name=None, keep=None, prefix=None):
        """
        Make a snapshot of the volume row C{volume}, named C{name} (default: the time,
        C{YYYYMMDD-HHMMSS} UTC, after C{prefix} if given).

        @param keep: once it is made, delete the volume's oldest snapshots until C{keep}
            are left (a restore's C{before-restore-...} ones are neither deleted nor
            counted): what a scheduled snapshot (a systemd timer, cron) passes to keep
            the last C{keep}.
        @param prefix: then only the snapshots whose names start with it are counted and
            deleted for C{keep} (a schedule's: L{zwrm.control.schedules}).
        @return: the snapshot's row, with C{pruned}: the rows deleted for C{keep}.
        @raise zwrm.errors.Conflict: the name is taken, the volume is not ready, its host
            drains, or another snapshot operation on it is under way.
        """
        if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool)
                                 or not 1 <= keep <= MAX_KEEP):
            raise errors.InvalidArgument(f"keep must be a whole number from 1 to {MAX_KEEP}, "
                                         f"not {keep!r}", argument="keep")
        if name is not None:
            check_name(name, "snapshot name")
            if await self._data.volumes.find_snapshots(volume_id=volume["id"], name=name):
                raise errors.Conflict(f"volume {volume['id']} has a snapshot {name!r} already",
                                      argument="name")
        if volume["state"] != "ready":
            raise errors.Conflict(f"volume {volume['id']} is {volume['state']}",
                                  argument="volume_id")
        self._host_usable(volume)
        with self.operation(volume, "snapshotted"):
            name = name or await self._free_name(volume["id"], (prefix or "") + self._stamp())
            row = self._snapshot_row(volume, name, "taken on request")
            await self._data.volumes.add_snapshot(row)
            try:
                # A drain that began while the row was stored did not see it: it goes on.
                self._host_usable(volume)
                info = await self._replicas.call(volume["host_id"], "volume.snapshot",
                                                 volume["id"], row["id"])
            except Exception as e:
                await self._data.volumes.snapshot_failed(row, error_text(e))
                try:  # a copy the host made though its answer was lost: its id is new
                    await self._replicas.call(volume["host_id"], "volume.snapshot_delete",
                                              volume["id"], row["id"])
                except Exception:
                    pass
                raise
            row = await self._data.volumes.snapshot_made(row, info)
            pruned = []
            if keep is not None:
                kept = [s for s in await self._data.volumes.find_snapshots(volume_id=volume["id"])
                        if s["state"] == "ready" and not s["name"].startswith(RESTORE_PREFIX)
                        and s["name"].startswith(prefix or "")]
                for old in kept[:-keep]:
                    await self._delete_snapshot(volume, old,
                                                f"pruned: the last {keep} snapshot(s) are kept")
                    pruned.append(old)
            return dict(row, pruned=pruned)

    async def restore(self, volume, snapshot):
        """
        Put the data of C{snapshot} (a row of C{volume}'s) back into C{volume}; what it
        held is kept as a new snapshot, C{before-restore-<time>}.

        @return: C{{"volume", "snapshot", "kept"}}: the rows.
        @raise zwrm.errors.Conflict: a live machine uses the volume, the snapshot is not
            ready, the volume's host drains, or another snapshot operation is under way.
        """
        if snapshot["volume_id"] != volume["id"]:
            raise errors.InvalidArgument(f"snapshot {snapshot['id']} is not of volume "
                                         f"{volume['id']}", argument="snapshot")
        if snapshot["state"] != "ready":
            raise errors.Conflict(f"snapshot {snapshot['name']} of volume {volume['id']} is "
                                  f"{snapshot['state']}", argument="snapshot")
        await self._not_used(volume, "restored")
        self._host_usable(volume)
        with self.operation(volume, "restored"):
            name = await self._free_name(volume["id"], f"{RESTORE_PREFIX}{self._stamp()}")
            kept = self._snapshot_row(volume, name,
                                      f"what the volume held before {snapshot['name']} was "
                                      "restored")
            await self._data.volumes.add_snapshot(kept)
            try:
                self._host_usable(volume)  # (a drain that began meanwhile: see snapshot)
                got = await self._replicas.call(volume["host_id"], "volume.restore",
                                                volume["id"], snapshot["id"], kept["id"])
            except Exception as e:
                got = await self._restore_failed(volume, kept, e)
            await self._data.volumes.restored(volume, snapshot, kept, got["kept"])
            return {"volume": volume, "snapshot": snapshot, "kept": kept}

    async def _restore_failed(self, volume, kept, e):
        """
        A restore's call failed with C{e}: its host says whether it was done all the same
        (its answer lost: C{kept} exists there, holding the volume's data before), so that
        the kept data is never lost track of.

        @return: C{{"kept": its info}} if it was done. @raise: C{e} if it was not (the row
            of C{kept} removed), or if the host cannot say (the row stays C{creating},
            settled when the host is reconciled: L{settle_snapshots}).
        """
        try:
            held = await self._replicas.call(volume["host_id"], "volume.snapshots",
                                             volume["id"])
        except Exception:
            raise e from None
        for info in held:
            if info["id"] == kept["id"]:
                return {"kept": info}
        await self._data.volumes.snapshot_failed(kept, error_text(e))
        raise e

    async def settle_snapshots(self, host_id):
        """
        Settle the snapshots stored C{creating} on C{host_id} that no request of this
        process is making (a control plane that stopped during the copy left them): made
        if the host has its file (with its sizes; a restore's kept data: the restore was
        done), else removed (C{volume_snapshot_failed}).
        """
        pending = [s for s in await self._data.volumes.find_snapshots(host_id=host_id)
                   if s["state"] == "creating" and s["volume_id"] not in self._busy]
        if not pending:
            return
        held = {s["id"]: s for s in await self._replicas.call(host_id, "volume.snapshots")}
        for snap in pending:
            if snap["volume_id"] in self._busy:
                continue  # a request of this process began with it meanwhile
            if snap["id"] in held:
                await self._data.volumes.snapshot_made(snap, dict(held[snap["id"]],
                                                                  live=snap["live"]))
            else:
                await self._data.volumes.snapshot_failed(
                    snap, "its host has no such copy: the control plane stopped while it "
                          "was being made")

    async def delete_snapshot(self, volume, snapshot):
        """
        Delete C{snapshot} (a row of C{volume}'s) and its data.

        @raise zwrm.errors.Conflict: another snapshot operation on the volume is under way.
        """
        with self.operation(volume, "changed"):
            await self._delete_snapshot(volume, snapshot, "deleted on request")

    async def _delete_snapshot(self, volume, snapshot, reason):
        try:
            await self._replicas.call(volume["host_id"], "volume.snapshot_delete",
                                      volume["id"], snapshot["id"])
        except errors.NotFound:
            pass
        await self._data.volumes.delete_snapshot(snapshot, reason)

    # -- replicas -----------------------------------------------------------------------

    async def need_snapshot_streams(self, host_ids, what):
        """
        @raise zwrm.errors.Conflict: the agent of one of C{host_ids} is of a version that
            cannot stream snapshots (no C{snapshot_streams} in its C{host.facts}): the
            message says C{what} it cannot do, and to upgrade it. A host that cannot be
            asked passes (what follows fails on it).
        """
        old = []
        for h in sorted(set(host_ids)):
            try:
                facts = await self._replicas.call(h, "host.facts")
            except errors.ZwrmError:
                continue
            if not facts.get("snapshot_streams"):
                old.append(h)
        if old:
            raise errors.Conflict(f"the agent of host {', '.join(old)} is of a version that "
                                  f"cannot {what}: upgrade it first")

    def _short_of_room(self, host_id, data_bytes):
        """
        Why C{host_id} cannot take a copy of C{data_bytes} of data, by what its agent last
        reported free on its data disk (less the room kept free, less what the copies
        under way to it have still to write there: L{_landing}); L{None} if it can, or if
        that is not known.
        """
        room = self._room_mb(host_id) if self._room_mb is not None else None
        need = -(-data_bytes // (1 << 20))
        coming = -(-sum(self._incoming.get(host_id, {}).values()) // (1 << 20))
        if room is None or need <= room - coming:
            return None
        under_way = f", less {coming} MiB of copies under way to it" if coming else ""
        return (f"host {host_id} has {max(room - coming, 0)} MiB to spare on its data disk "
                f"(what it reported free, less the room kept free{under_way}); the copy "
                f"needs {need} MiB")

    def _landing(self, host_id, key, data_bytes):
        """
        A context: a copy C{key} of C{data_bytes} of data to C{host_id} is under way; what
        it has still to write there counts against the host's room (L{_short_of_room})
        until it ends, so that two copies begun at once cannot both count on the same
        free space.  Its value, C{landed(done)}, takes the C{done} bytes written there
        off (its agent's next heartbeat reports them as used).

        @raise zwrm.errors.ResourceExhausted: (on entry) the host has not the room.
        """
        incoming = self._incoming
        short = self._short_of_room(host_id, data_bytes)
        if short is not None:
            raise errors.ResourceExhausted(short, argument="host_id")

        def landed(done):
            if key in incoming.get(host_id, {}) and isinstance(done, int):
                incoming[host_id][key] = max(data_bytes - done, 0)

        class Landing:
            def __enter__(self):
                incoming.setdefault(host_id, {})[key] = data_bytes
                return landed

            def __exit__(self, *exc):
                copies = incoming.get(host_id, {})
                copies.pop(key, None)
                if not copies:
                    incoming.pop(host_id, None)

        return Landing()

    def _hosts_short_of_room(self, data_bytes):
        """The hosts the scheduler knows that have not the room for C{data_bytes} of data."""
        if self._room_mb is None:
            return set()
        return {h for h in self._data.hosts.ids() if self._short_of_room(h, data_bytes)}

    async def replica_host(self, volume, snapshot):
        """
        The host for a new replica of C{volume}'s C{snapshot} when none is named: the one
        that keeps its newest replica, if it is ready (a schedule's copies stay together);
        else a ready host the scheduler picks for the snapshot's data (not the volume's).

        @raise zwrm.errors.Unplaceable: no other host has the room.
        """
        data = snapshot["allocated_bytes"]
        for r in reversed(await self._data.volumes.find_replicas(volume_id=volume["id"])):
            if r["state"] == "ready" and r["host_id"] != volume["host_id"]:
                if self._ready(r["host_id"]) and not self._short_of_room(r["host_id"], data):
                    return r["host_id"]
                break
        return self._host_for_data(data, {volume["host_id"]} | self._hosts_short_of_room(data))

    def _host_for_data(self, data_bytes, exclude):
        """
        A ready host, none of C{exclude}, for a replica of C{data_bytes} of data: the one
        the scheduler picks for a small machine (a host with room for a machine, where a
        volume recovered from it can start); when every such host is short of vCPUs or
        memory, the ready host with the most disk left to allocate (a replica is data
        only: it takes neither).

        @raise zwrm.errors.Unplaceable: no host has the disk (the message says which has
            the most), or none may be used (the scheduler's message says why).
        """
        need = -(-data_bytes // (1 << 20))
        request = placement_request({"vcpus": 1, "memory_mb": 1}, disk_mb=need)
        try:
            placement = self._placements.place(request, exclude=exclude)
        except errors.Unplaceable:
            others = [h for h in self._placements.scheduler.hosts()
                      if h.id not in exclude and h.state == "ready" and self._ready(h.id)]
            if not others:
                raise  # (none: the scheduler's message says why each was passed over)
            best = max(others, key=lambda h: (h.free_disk_mb, h.id))
            if best.free_disk_mb < need:
                raise errors.Unplaceable(
                    f"no host has {need} MiB of disk left to allocate for it (the most: "
                    f"{best.free_disk_mb} MiB, on {best.id})") from None
            return best.id
        self._placements.unplace(placement)
        return placement.host_id

    async def replicate(self, volume, snapshot, host_id, keep=None, progress=None,
                        prefix=None):
        """
        Copy C{snapshot} (a ready row of C{volume}'s) to host C{host_id}, another ready
        host (L{None}: L{replica_host}), as a replica: the volume's host streams it to
        that host's agent (TLS between them, every block hashed, the copy verified), which
        keeps it beside its own volumes' snapshots.

        @param keep: once it is made, delete the volume's oldest replicas on C{host_id}
            until C{keep} are left.
        @param progress: L{None}, or C{progress(sent=, done=, total=)} with each of the
            sending agent's announcements (bytes).
        @param prefix: then only the replicas whose names start with it are counted and
            deleted for C{keep} (a schedule's).
        @return: the replica's row, with C{pruned}: the rows deleted for C{keep}.
        @raise zwrm.errors.Conflict: the host is the volume's, or not ready; it has a
            replica of this snapshot already; the volume's host drains; or another
            snapshot operation on the volume is under way.
        """
        if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool)
                                 or not 1 <= keep <= MAX_KEEP):
            raise errors.InvalidArgument(f"keep must be a whole number from 1 to {MAX_KEEP}, "
                                         f"not {keep!r}", argument="keep")
        if snapshot["volume_id"] != volume["id"]:
            raise errors.InvalidArgument(f"snapshot {snapshot['id']} is not of volume "
                                         f"{volume['id']}", argument="snapshot")
        if host_id is None:
            host_id = await self.replica_host(volume, snapshot)
        if not isinstance(host_id, str) or not host_id:
            raise errors.InvalidArgument("a host to copy it to is needed", argument="host_id")
        if host_id == volume["host_id"]:
            raise errors.Conflict(f"volume {volume['id']} is on host {host_id}: a replica is "
                                  "kept on another host", argument="host_id")
        try:
            state = self.host_state(host_id) if self.host_state is not None else "ready"
        except errors.NotFound:
            raise errors.NotFound(f"no host {host_id!r}", argument="host_id") from None
        if state != "ready":
            raise errors.Conflict(f"host {host_id} is {state}: replicas go to a ready host",
                                  argument="host_id")
        short = self._short_of_room(host_id, snapshot["allocated_bytes"])
        if short is not None:
            raise errors.ResourceExhausted(short, argument="host_id")
        if snapshot["state"] != "ready":
            raise errors.Conflict(f"snapshot {snapshot['name']} of volume {volume['id']} is "
                                  f"{snapshot['state']}", argument="snapshot")
        if await self._data.volumes.find_replicas(snapshot_id=snapshot["id"], host_id=host_id):
            raise errors.Conflict(f"host {host_id} has a replica of snapshot "
                                  f"{snapshot['name']} of volume {volume['id']} already",
                                  argument="snapshot")
        self._host_usable(volume)
        await self.need_snapshot_streams([volume["host_id"], host_id], "copy snapshots")
        rid = new_id("r")
        with self.operation(volume, "replicated"), \
                self._landing(host_id, rid, snapshot["allocated_bytes"]) as landed:
            row = {"id": rid, "volume_id": volume["id"], "app_id": volume["app_id"],
                   "host_id": host_id, "snapshot_id": snapshot["id"], "name": snapshot["name"],
                   "state": "creating", "size_bytes": snapshot["size_bytes"],
                   "allocated_bytes": 0, "taken_at": snapshot["created_at"],
                   "reason": f"a copy of snapshot {snapshot['name']} from "
                             f"{volume['host_id']}",
                   "created_at": self._clock.seconds()}
            await self._data.volumes.add_replica(row)
            row = await self._stream_replica(row, volume["host_id"], snapshot["id"],
                                             snapshot["size_bytes"],
                                             lambda: self._host_usable(volume), progress,
                                             landed)
            pruned = []
            if keep is not None:
                held = [r for r in await self._data.volumes.find_replicas(
                    volume_id=volume["id"], host_id=host_id) if r["state"] == "ready"
                    and r["name"].startswith(prefix or "")]
                for old in held[:-keep]:
                    await self._delete_replica(
                        old, f"pruned: the last {keep} replica(s) on {host_id} are kept")
                    pruned.append(old)
            return dict(row, pruned=pruned)

    async def _stream_replica(self, row, source, file_id, size, check=None, progress=None,
                              landed=None):
        """
        Make the replica C{row} (stored C{creating} on its host): host C{source} streams
        its file C{file_id} of the volume (a snapshot there, or a replica) to the
        replica's host (TLS between the agents, every block hashed, the copy verified),
        then the row is made C{ready} with the sizes its host lists.  A failure removes
        the row, cancels the transfer and deletes any copy, then raises.

        @param check: L{None}, or a callable run before the copy (it may raise).
        @param progress: L{None}, or C{progress(sent=, done=, total=)} (L{replicate}).
        @param landed: L{None}, or C{landed(done)} with the bytes written on the replica's
            host so far, as announced (L{_landing}).
        @return: the ready row.
        """
        host_id, vid = row["host_id"], row["volume_id"]
        token = mint_token()
        options = {}
        if progress is not None or landed is not None:
            def announced(p=None, *args, **kwargs):
                if not isinstance(p, dict):
                    return
                if landed is not None:
                    landed(p.get("done"))
                if progress is not None:
                    progress(**{k: p.get(k) for k in ("sent", "done", "total")})

            options["options"] = CallOptions(on_progress=announced)
        try:
            if check is not None:
                check()  # (a drain that began meanwhile: see snapshot)
            where = await self._replicas.call(host_id, "volume.receive", token, vid, size,
                                              source=source, snapshot=row["id"])
            sent = await self._replicas.call(
                source, "volume.send", vid, where["host"], where["port"], token, host_id,
                mode="bulk", commit=True, snapshot=file_id, **options)
            if not sent.get("committed"):
                raise errors.Corrupt(f"host {host_id} did not keep the copy")
            info = await self._replica_info(row)
        except Exception as e:
            await self._data.volumes.replica_failed(row, error_text(e))
            for verb, args in (("volume.cancel_receive", (token,)),
                               ("volume.snapshot_delete", (vid, row["id"]))):
                try:  # a partial copy, or one made though the answer was lost
                    await self._replicas.call(host_id, verb, *args)
                except Exception:
                    pass
            raise
        return await self._data.volumes.replica_made(row, info)

    async def move_replica(self, replica, exclude=(), why="moved"):
        """
        Move the ready replica C{replica} off its host: copied to another ready host
        (L{move_target}) as a new replica of the same snapshot, verified, and only then
        deleted where it was.  If another ready host that may keep it has a replica of
        that snapshot already (a move whose end was not stored), it is only deleted.

        @param exclude: hosts it must not go to (besides the volume's and its own).
        @param why: what the events' reasons say of the move (e.g. the drain's id).
        @return: the row that keeps its data now.
        @raise zwrm.errors.Unplaceable: no host may keep it (nothing changed).
        @raise zwrm.errors.Conflict: another snapshot operation on the volume is under way,
            or the replica changed meanwhile (nothing changed).
        """
        volume = await self._data.volumes.get(replica["volume_id"])
        if volume is None:
            raise errors.NotFound(f"no volume {replica['volume_id']!r}")
        with self.operation(volume, "replicated"):
            fresh = await self._data.volumes.get_replica(replica["id"])
            if fresh is None or fresh["state"] != "ready" or \
                    fresh["host_id"] != replica["host_id"]:
                raise errors.Conflict(f"replica {replica['id']} changed meanwhile")
            source = fresh["host_id"]
            exclude = set(exclude) | {source, volume["host_id"]}
            for other in await self._data.volumes.find_replicas(snapshot_id=fresh["snapshot_id"]):
                if other["state"] == "ready" and other["host_id"] not in exclude \
                        and self._ready(other["host_id"]):
                    await self._delete_replica(
                        fresh, f"{why}: host {other['host_id']} has a copy ({other['id']})")
                    return other
            target = await self.move_target(volume, fresh, exclude)
            await self.need_snapshot_streams([source, target], "move replicas")
            row = dict(fresh, id=new_id("r"), host_id=target, state="creating",
                       allocated_bytes=0, reason=f"moved from {source} ({why})",
                       created_at=self._clock.seconds())
            with self._landing(target, row["id"], fresh["allocated_bytes"]) as landed:
                await self._data.volumes.add_replica(row)
                row = await self._stream_replica(row, source, fresh["id"], fresh["size_bytes"],
                                                 landed=landed)
            await self._delete_replica(fresh, f"moved to {target} as {row['id']} ({why})")
            return row

    def _ready(self, host_id):
        try:
            return self.host_state is None or self.host_state(host_id) == "ready"
        except errors.NotFound:
            return False

    async def move_target(self, volume, replica, exclude):
        """
        Where L{move_replica} puts C{replica} (a row of C{volume}'s): the host of the
        volume's newest other ready replica, if it is ready, not in C{exclude} and has
        none of this snapshot (a volume's copies stay together); else a ready host the
        scheduler picks for its data, none of C{exclude}, the volume's host or those
        with a replica of the snapshot.

        @raise zwrm.errors.Unplaceable: no host has the room.
        """
        has = {r["host_id"] for r in await self._data.volumes.find_replicas(
            snapshot_id=replica["snapshot_id"])}
        exclude = (set(exclude) | has | {volume["host_id"]}
                   | self._hosts_short_of_room(replica["allocated_bytes"]))
        for r in reversed(await self._data.volumes.find_replicas(volume_id=volume["id"])):
            if r["state"] == "ready" and r["host_id"] not in exclude and self._ready(r["host_id"]):
                return r["host_id"]
        try:
            return self._host_for_data(replica["allocated_bytes"], exclude)
        except errors.Unplaceable as e:
            raise errors.Unplaceable(f"no host may keep replica {replica['id']} of volume "
                                     f"{volume['id']} (not its volume's, {volume['host_id']};"
                                     f" not one with a copy of its snapshot): {e.message}"
                                     ) from None

    async def _replica_info(self, row):
        """The replica's file as its host lists it. @raise NotFound: it has none."""
        for info in await self._replicas.call(row["host_id"], "volume.snapshots",
                                              row["volume_id"]):
            if info["id"] == row["id"]:
                return info
        raise errors.NotFound(f"host {row['host_id']} has no copy of replica {row['id']}")

    async def settle_replicas(self, host_id):
        """
        Settle the replicas stored C{creating} on C{host_id} that no request of this
        process is making (a control plane that stopped during the copy left them): made
        if the host has the copy, else removed.
        """
        pending = [r for r in await self._data.volumes.find_replicas(host_id=host_id)
                   if r["state"] == "creating" and r["volume_id"] not in self._busy]
        if not pending:
            return
        held = {s["id"]: s for s in await self._replicas.call(host_id, "volume.snapshots")}
        for rep in pending:
            if rep["volume_id"] in self._busy:
                continue
            if rep["id"] in held:
                await self._data.volumes.replica_made(rep, held[rep["id"]])
            else:
                await self._data.volumes.replica_failed(
                    rep, "its host has no such copy: the control plane stopped while it was "
                         "being made")

    async def delete_replica(self, volume, replica):
        """
        Delete C{replica} (a row of C{volume}'s) and its data on its host.

        @raise zwrm.errors.Conflict: the volume's host drains, or another snapshot
            operation on the volume is under way.
        @raise zwrm.errors.Unavailable: its host cannot be asked (nothing changed).
        """
        self._host_usable(volume)  # a drain of its host may make it a snapshot
        with self.operation(volume, "changed"):
            await self._delete_replica(replica, "deleted on request")

    async def _delete_replica(self, replica, reason, strict=True):
        """
        Delete C{replica}'s copy on its host, then its row. Not C{strict} (the volume is
        destroyed): a host that cannot be asked keeps the file, which nothing lists any
        more, and the row goes all the same.
        """
        try:
            await self._replicas.call(replica["host_id"], "volume.snapshot_delete",
                                      replica["volume_id"], replica["id"])
        except errors.NotFound:
            pass
        except errors.ZwrmError as e:
            if strict:
                raise
            reason = f"{reason}; its copy is left on {replica['host_id']}: {e.message}"
        await self._data.volumes.delete_replica(replica, reason)
