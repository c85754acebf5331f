"""
Removing a host from the cluster: C{zwrm.host.remove(host_id, forget_volumes=False,
recover_volumes=False)}.

A host is removed once it is gone: retired (drained, then its agent stopped) or lost for
good.  So only an C{offline} host can be removed; a host that still heartbeats would only
join again (as Kubernetes' kubelet re-creates a deleted node and Nomad's client a purged
one).  What goes with it, stored in one transaction (a removal that cannot be stored, the
control plane's disk full, changes nothing), then announced:

 - with C{recover_volumes}, each of its volumes that has a replica on a ready host
   (L{zwrm.control.app_volumes}) is made again there from its newest replica (that host's
   agent copies the replica into the volume and verifies it, before anything is stored;
   a failure undoes the copies made and changes nothing): the volume's row moves there,
   and its replicas there become its snapshots (C{volume_recovered}); the data written
   since that replica's snapshot is lost with the host;
 - the volumes that live only on it (none recovered) and their snapshots, when the
   operator gives their data up (C{forget_volumes}); without it, a host holding such
   volumes is refused, and nothing changes; the replicas of forgotten volumes on other
   hosts go too;
 - the replicas it kept of other hosts' volumes;
 - its row and credential (C{zwrm.event.host} C{removed}): its agent is refused from then
   on, and the scheduler, the cluster network's hosts list (the other hosts' overlay
   peers) and the partition guard's count of its datacenter drop it; a reset's permission
   to join again goes too;
 - its subnet and its machines' addresses (L{zwrm.control.network.ClusterNetwork.forgetting}).

Then the replicas whose machines failed with it are placed again elsewhere, as the healer
does after a host loss (those whose volumes were recovered, on their volumes' new host),
also those whose volumes were given up (with new, empty volumes),
except those of an app being destroyed (whose destroy then goes on without the host);
the rows of machines that stopped there stay, as history, until their app's next deploy.

Refused, with nothing changed: a host that is not offline; one whose drain is under way,
or that a drain under way moves a machine to; one on which a machine is recorded pending,
starting, running or stopping.  The id may join again afterwards, as a new host, with a
join token.
"""

import time
from contextlib import ExitStack

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from zwrm import errors
from zwrm.control.registry import MAY_RUN_STATES
from zwrm.control.resources.volumes import REPLICAS_TABLE, SNAPSHOTS_TABLE, replica_as_snapshot
from zwrm.control.tokens import rejoin_forgetting

#: Seconds beyond a host's C{fence_after} before its volumes are recovered elsewhere:
#: its agent's stop of them (an ACPI power-down, then a hard stop: L{zwrm.agent.service.
#: FENCE_GRACE}) and a heartbeat's way.
FENCE_MARGIN = 15.0


def _listed(items, limit=5):
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


class HostRemoval:
    """C{zwrm.host.remove}: the checks, then the removal (see the module docstring)."""

    log = Logger()

    def __init__(self, registry, apps, drains, pki=None, drop_session=None):
        """
        @param registry: the L{zwrm.control.registry.HostRegistry}.
        @param apps: the L{zwrm.control.apps.Apps} (its C{network} and C{converger}).
        @param drains: the L{zwrm.control.drain.Drains} (drains under way).
        @param pki: the L{zwrm.control.tokens.ControlPKI} (a reset's permission), or L{None}.
        @param drop_session: C{drop_session(host_id, message)} ends the host's WAMP
            sessions, if any, or L{None}.
        """
        self._registry = registry
        self._data = registry.data
        self._apps = apps
        self._drains = drains
        self._pki = pki
        self._drop_session = drop_session
        self._removing = set()

    async def remove(self, host_id, forget_volumes=False, recover_volumes=False):
        """
        Remove the offline host C{host_id}.

        @param recover_volumes: make its volumes again from their newest replicas on other
            hosts (those without one are refused, unless C{forget_volumes}).
        @return: C{{"host_id", "volumes_forgotten": [volume ids], "replicas_forgotten":
            [{replica_id, volume_id, host_id}] (those it kept, and those of the volumes
            given up), "volumes_recovered": [{volume_id, host_id, replica_id, snapshot,
            taken_at}], "rescheduled": [{app, replicas}], "not_placed": [{app, replicas,
            error}]}}.
        @raise zwrm.errors.NotFound: no such host.
        @raise zwrm.errors.Conflict: it cannot go now (the message says why and what to do);
            nothing changed.
        """
        entry = self._registry.entry(host_id)
        if host_id in self._removing:
            raise errors.Conflict(f"host {host_id} is being removed already")
        self._removing.add(host_id)
        try:
            return await self._remove(host_id, entry, forget_volumes, recover_volumes)
        finally:
            self._removing.discard(host_id)

    async def _remove(self, host_id, entry, forget_volumes, recover_volumes):
        volumes = await self._check(host_id, entry, forget_volumes, recover_volumes)
        with ExitStack() as busy:
            if recover_volumes:
                # No snapshot or replica operation on them meanwhile (a replica deleted
                # between its copy and the store).
                for v in volumes:
                    busy.enter_context(self._apps.volumes.operation(v, "recovered"))
            recovery = await self._recovery(host_id, volumes) if recover_volumes else {}
            volumes = [v for v in volumes if v["id"] not in recovery]
            return await self._store_removal(host_id, volumes, recovery)

    async def _store_removal(self, host_id, volumes, recovery):
        given_up = f"host {host_id} was removed and the volume's data given up with it"
        network = self._apps.network
        vdata = self._data.volumes
        snapshots = await vdata.find_snapshots(host_id=host_id)
        forgotten = {v["id"] for v in volumes}
        # The replicas it kept, and those of the volumes given up (kept elsewhere).
        replicas = [r for r in await vdata.find_replicas()
                    if r["host_id"] == host_id or r["volume_id"] in forgotten]
        changes = [self._data.store.deleting(SNAPSHOTS_TABLE, s["id"]) for s in snapshots]
        changes += [self._data.store.deleting(REPLICAS_TABLE, r["id"]) for r in replicas]
        changes += [self._data.store.deleting("volumes", v["id"]) for v in volumes]
        recovered, converted = {}, {}
        for vol, rep, others in recovery.values():
            changes.append(self._recovering(host_id, vol, rep, others, recovered, converted))
        if self._pki is not None:
            changes.append(rejoin_forgetting(host_id))  # a reset's permission goes with it
        changes.append(network.forgetting(host_id))

        def along(db):
            for change in changes:
                change(db)

        try:
            await self._store(host_id, along, recovery, snapshots, replicas, volumes,
                              given_up, recovered, converted)
        except CancelledError:
            raise  # (the control plane stops) stored or not is not known: nothing undone
        except BaseException:
            await self._undo(recovery)  # not stored: the copies made go
            raise
        network.forgot(host_id)
        if self._drop_session is not None:
            self._drop_session(host_id, "host removed from the cluster")
        for r in replicas:  # the files of those kept elsewhere, of volumes given up
            if r["host_id"] != host_id:
                try:
                    await self._apps.replicas.call(r["host_id"], "volume.snapshot_delete",
                                                   r["volume_id"], r["id"])
                except errors.NotFound:
                    pass
                except errors.ZwrmError as e:
                    self.log.warn("the replica {r} of volume {v} given up is left on {h}: {e}",
                                  r=r["id"], v=r["volume_id"], h=r["host_id"], e=e.message)
        self.log.info("host {host_id} removed{v}{r}", host_id=host_id,
                      v=f" with volumes {_listed(v['id'] for v in volumes)}" if volumes else "",
                      r=f"; volumes {_listed(recovery)} recovered from their replicas"
                      if recovery else "")
        rescheduled, not_placed = await self._reschedule(host_id)
        return {"host_id": host_id, "volumes_forgotten": [v["id"] for v in volumes],
                "replicas_forgotten": [{"replica_id": r["id"], "volume_id": r["volume_id"],
                                        "host_id": r["host_id"]} for r in replicas],
                "volumes_recovered": [
                    {"volume_id": vid, "host_id": rep["host_id"], "replica_id": rep["id"],
                     "snapshot": rep["name"], "taken_at": rep["taken_at"]}
                    for vid, (_, rep, _) in recovery.items()],
                "rescheduled": rescheduled, "not_placed": not_placed}

    def _store(self, host_id, along, recovery, snapshots, replicas, volumes, given_up,
               recovered, converted):
        """The removal's one transaction and its events (L{_store_removal})."""
        vdata = self._data.volumes
        return self._data.hosts.remove(
            host_id, "removed by an operator", along=along,
            along_events=[(vdata, "volume_snapshot_destroyed", s["volume_id"],
                           vdata.snapshot_payload(dict(s, state="destroyed"), given_up
                                                  if s["volume_id"] not in recovery else
                                                  f"host {host_id} was removed; the volume "
                                                  "was recovered from its replica"))
                          for s in snapshots]
            + [(vdata, "volume_replica_destroyed", r["volume_id"],
                vdata.replica_destroyed_payload(
                    r, f"host {host_id} was removed" if r["host_id"] == host_id else given_up))
               for r in replicas]
            + [(vdata, "volume_destroyed", v["id"], vdata.destroyed_payload(v, given_up))
               for v in volumes]
            + [(vdata, "volume_recovered", vid,
                lambda _, vid=vid, rep=rep: vdata.recovered_payload(
                    recovered[vid], host_id, rep,
                    f"host {host_id} was removed: made again on {rep['host_id']} from its "
                    f"replica of snapshot {rep['name']}"))
               for vid, (_, rep, _) in recovery.items()]
            + [(vdata, "volume_snapshot", r["volume_id"],
                lambda _, rid=r["id"]: vdata.snapshot_payload(converted[rid],
                                                              converted[rid]["reason"]))
               for _, rep, others in recovery.values() for r in [*others, rep]])

    async def _recovery(self, host_id, volumes):
        """
        Make each of C{volumes} again on the host of its newest ready replica (a ready
        host), its agent copying the replica into the volume and verifying it. A failure
        deletes the volumes made so far and is raised: nothing changed.

        @return: C{{volume id: (volume row, replica row, the volume's other replicas on
            that host)}}, the volumes made again (those with a replica).
        """
        out = {}
        try:
            for vol in volumes:
                reps = [r for r in await self._data.volumes.find_replicas(volume_id=vol["id"])
                        if r["state"] == "ready" and r["host_id"] != host_id
                        and self._ready(r["host_id"])]
                if not reps:
                    continue
                rep = reps[-1]  # the newest data
                await self._apps.volumes.need_snapshot_streams(
                    [rep["host_id"]], "recover a volume from its replica")
                await self._apps.replicas.call(rep["host_id"], "volume.recover", vol["id"],
                                               rep["id"])
                others = [r for r in reps if r["host_id"] == rep["host_id"] and r is not rep]
                out[vol["id"]] = (vol, rep, others)
                self.log.info("volume {v} of lost host {h} recovered on {t} from its replica "
                              "of snapshot {s}", v=vol["id"], h=host_id, t=rep["host_id"],
                              s=rep["name"])
        except BaseException:
            await self._undo(out)
            raise
        return out

    def _ready(self, host_id):
        try:
            return self._registry.state(host_id) == "ready"
        except errors.NotFound:
            return False

    async def _undo(self, recovery):
        """Delete the volumes L{_recovery} made (their replicas stay)."""
        for vid, (_, rep, _) in recovery.items():
            try:
                await self._apps.replicas.call(rep["host_id"], "volume.delete", vid,
                                               keep_snapshots=True)
            except Exception as e:
                self.log.warn("volume {v} made on {h} from its replica is left there (its "
                              "recovery was not stored): {e}", v=vid, h=rep["host_id"],
                              e=getattr(e, "message", e))

    def _recovering(self, host_id, vol, rep, others, recovered, converted):
        """
        The change that moves volume C{vol} to its replica C{rep}'s host, its replicas
        there made its snapshots (C{recovered[volume id]}: its row, once done;
        C{converted[replica id]}: the snapshot rows).
        """
        def change(db):
            db["volumes"].update(vol["id"], {"host_id": rep["host_id"]})
            for r in [*others, rep]:  # oldest data first, as they were listed
                why = (f"recovered: the replica of snapshot {r['name']} the volume was made "
                       f"from after host {host_id} was lost" if r is rep else
                       f"a replica of snapshot {r['name']} on {rep['host_id']}, where the "
                       "volume was recovered")
                converted[r["id"]] = replica_as_snapshot(db, r, why)
            recovered[vol["id"]] = db["volumes"].get(vol["id"])
        return change

    async def _check(self, host_id, entry, forget_volumes, recover_volumes=False):
        """
        @return: the volumes on the host (to recover or forget).
        @raise errors.Conflict: see L{remove}.
        """
        state = entry.machine.state
        if state != "offline":
            how = ("Cancel its drain (`zwrm host undrain`) or let it finish" if state == "draining"
                   else "Drain it (`zwrm host drain`)" if state == "ready" else "")
            raise errors.Conflict(
                f"host {host_id} is {state}, not offline: only a host that is gone can be"
                f" removed. {how + ', then s' if how else 'S'}top its agent (systemctl stop"
                f" zwrm-agent) and remove it once `zwrm host list` shows it offline")
        if host_id in self._drains.active:
            raise errors.Conflict(
                f"host {host_id}'s drain is under way: cancel it first (`zwrm host undrain"
                f" {host_id}`)")
        sources = self._drains.moving_to(host_id)
        if sources:
            raise errors.Conflict(
                f"the drain of {_listed(sources)} is moving a machine to host {host_id}:"
                " remove it once that migration has ended (`zwrm host drain-status`)")
        live = await self._data.machines.find(host_id=host_id, states=MAY_RUN_STATES,
                                              order_by="id")
        if live:
            named = _listed("{} ({})".format(m["id"], m["state"]) for m in live)
            raise errors.Conflict(
                f"machines {named} are recorded on host {host_id}: wait until they are failed"
                " or destroy them first")
        volumes = await self._data.volumes.find(host_id=host_id, order_by="id")
        if recover_volumes and volumes:
            self._check_fenced(host_id, entry)
        if recover_volumes and not forget_volumes:
            alone = []
            for v in volumes:
                if not any(r["state"] == "ready" and self._ready(r["host_id"]) for r in
                           await self._data.volumes.find_replicas(volume_id=v["id"])):
                    alone.append(v["id"])
            if alone:
                raise errors.Conflict(
                    f"volumes {_listed(alone)} of host {host_id} have no replica on a ready"
                    " host: their data is only there. Bring the host back and drain it, or"
                    " add forget_volumes (`--forget-volumes`) to give that data up")
        elif volumes and not forget_volumes:
            newest, alone = [], []
            for v in volumes:
                reps = [r for r in await self._data.volumes.find_replicas(volume_id=v["id"])
                        if r["state"] == "ready" and self._ready(r["host_id"])]
                if reps:
                    r = reps[-1]  # the newest data, as a recovery takes it (_recovery)
                    taken = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                          time.gmtime(r["taken_at"] or 0))
                    newest.append(f"{v['id']} snapshot {r['name']} of {taken} on {r['host_id']}")
                else:
                    alone.append(v["id"])
            held = f"host {host_id} holds volumes {_listed(v['id'] for v in volumes)}"
            if not newest:
                raise errors.Conflict(
                    f"{held}: their data is only there (no replica on a ready host). Bring"
                    " the host back and drain it to move them, or remove it with"
                    " forget_volumes (`zwrm host remove --forget-volumes`) to give that"
                    " data up")
            only = f"; {_listed(alone)} none: its data is only there" if alone else ""
            raise errors.Conflict(
                f"{held}. Their newest replicas on ready hosts: {'; '.join(newest)}{only}."
                " Bring the host back and drain it to move them whole; recover them from"
                " those replicas, losing what was written since (`zwrm host remove"
                " --recover-volumes`" + (", with --forget-volumes to give up those without"
                                         " one" if alone else "")
                + "); or give their data up (`zwrm host remove --forget-volumes`)")
        return volumes

    def _check_fenced(self, host_id, entry):
        """
        A host whose agent fences (C{fence_after}: it stops its machines with volumes once
        it has heard nothing from the control plane for that long) has its volumes
        recovered elsewhere only once that, and L{FENCE_MARGIN} more, has passed since
        its last heartbeat: a host cut off from the control plane, not dead, has stopped
        them by then, so no two copies of a machine with volumes run at once.

        @raise errors.Conflict: not yet (the message says how long to wait).
        """
        fence_after = entry.record.get("fence_after") or 0
        if not fence_after:
            return  # it does not fence: removing it asserts that it is off (docs)
        silent = self._registry.silent_for(host_id)
        wait = fence_after + FENCE_MARGIN - silent
        if wait > 0:
            raise errors.Conflict(
                f"host {host_id}'s agent stops its machines with volumes {fence_after:g} s"
                f" after it last heard from the control plane (fence_after), and its last"
                f" heartbeat came {max(silent, 0):.0f} s ago: recover its volumes in"
                f" {wait:.0f} s, once they are stopped there for sure")

    async def _reschedule(self, host_id):
        """Place again the replicas whose machines failed on the removed host."""
        by_app = {}
        for m in await self._data.machines.find(host_id=host_id, states=("failed",)):
            by_app.setdefault(m["app_id"], set()).add(m["spec"]["replica"])
        rescheduled, not_placed = [], []
        for app_id, replicas in sorted(by_app.items()):
            app = await self._data.apps.by_id(app_id)
            if app is None or app["spec"] is None or app.get("destroying"):
                continue  # nothing to place again: it is gone, or going
            name = app["name"]
            try:
                await self._apps.converger.reschedule(app_id, sorted(replicas),
                                                      only_host=host_id)
            except errors.ZwrmError as e:
                self.log.warn("after removing host {host_id}: replicas {r} of {app} not placed"
                              " again: {e}", host_id=host_id, r=sorted(replicas), app=name,
                              e=e.message)
                not_placed.append({"app": name, "replicas": sorted(replicas), "error": e.message})
            else:
                rescheduled.append({"app": name, "replicas": sorted(replicas)})
        return rescheduled, not_placed
