"""
Removing a host from the cluster: C{zwrm.host.remove(host_id, forget_volumes=False)}.

A host is removed once it is gone: retired (drained, then its agent stopped) or lost for
good.  So only an C{offline} host can be removed; a host that still heartbeats would only
join again (as Kubernetes' kubelet re-creates a deleted node and Nomad's client a purged
one).  What goes with it, stored in one transaction (a removal that cannot be stored, the
control plane's disk full, changes nothing), then announced:

 - the volumes that live only on it and their snapshots, when the operator gives their
   data up (C{forget_volumes}); without it, a host holding volumes is refused, and nothing changes;
 - its row and credential (C{zwrm.event.host} C{removed}): its agent is refused from then
   on, and the scheduler, the cluster network's hosts list (the other hosts' overlay
   peers) and the partition guard's count of its datacenter drop it; a reset's permission
   to join again goes too;
 - its subnet and its machines' addresses (L{zwrm.control.network.ClusterNetwork.forgetting}).

Then the replicas whose machines failed with it are placed again elsewhere, as the healer
does after a host loss, also those whose volumes were given up (with new, empty volumes),
except those of an app being destroyed (whose destroy then goes on without the host);
the rows of machines that stopped there stay, as history, until their app's next deploy.

Refused, with nothing changed: a host that is not offline; one whose drain is under way,
or that a drain under way moves a machine to; one on which a machine is recorded pending,
starting, running or stopping.  The id may join again afterwards, as a new host, with a
join token.
"""

from twisted.logger import Logger

from zwrm import errors
from zwrm.control.registry import MAY_RUN_STATES
from zwrm.control.resources.volumes import SNAPSHOTS_TABLE
from zwrm.control.tokens import rejoin_forgetting


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

    async def remove(self, host_id, forget_volumes=False):
        """
        Remove the offline host C{host_id}.

        @return: C{{"host_id", "volumes_forgotten": [volume ids], "rescheduled": [{app,
            replicas}], "not_placed": [{app, replicas, error}]}}.
        @raise zwrm.errors.NotFound: no such host.
        @raise zwrm.errors.Conflict: it cannot go now (the message says why and what to do);
            nothing changed.
        """
        entry = self._registry.entry(host_id)
        if host_id in self._removing:
            raise errors.Conflict(f"host {host_id} is being removed already")
        self._removing.add(host_id)
        try:
            return await self._remove(host_id, entry, forget_volumes)
        finally:
            self._removing.discard(host_id)

    async def _remove(self, host_id, entry, forget_volumes):
        volumes = await self._check(host_id, entry, forget_volumes)
        given_up = f"host {host_id} was removed and the volume's data given up with it"
        network = self._apps.network
        snapshots = await self._data.volumes.find_snapshots(host_id=host_id)
        changes = [self._data.store.deleting(SNAPSHOTS_TABLE, s["id"]) for s in snapshots]
        changes += [self._data.store.deleting("volumes", v["id"]) for v in volumes]
        if self._pki is not None:
            changes.append(rejoin_forgetting(host_id))  # a reset's permission goes with it
        changes.append(network.forgetting(host_id))

        def along(db):
            for change in changes:
                change(db)

        await self._data.hosts.remove(
            host_id, "removed by an operator", along=along,
            along_events=[(self._data.volumes, "volume_snapshot_destroyed", s["volume_id"],
                           self._data.volumes.snapshot_payload(dict(s, state="destroyed"),
                                                               given_up))
                          for s in snapshots]
            + [(self._data.volumes, "volume_destroyed", v["id"],
                self._data.volumes.destroyed_payload(v, given_up))
               for v in volumes])
        network.forgot(host_id)
        if self._drop_session is not None:
            self._drop_session(host_id, "host removed from the cluster")
        self.log.info("host {host_id} removed{v}", host_id=host_id,
                      v=f" with volumes {_listed(v['id'] for v in volumes)}" if volumes else "")
        rescheduled, not_placed = await self._reschedule(host_id)
        return {"host_id": host_id, "volumes_forgotten": [v["id"] for v in volumes],
                "rescheduled": rescheduled, "not_placed": not_placed}

    async def _check(self, host_id, entry, forget_volumes):
        """@return: the volumes on the host (to forget). @raise errors.Conflict: see L{remove}."""
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
        if volumes and not forget_volumes:
            raise errors.Conflict(
                f"host {host_id} holds volumes {_listed(v['id'] for v in volumes)}: their data"
                " is only there. Bring the host back and drain it to move them, or remove it"
                " with forget_volumes (`zwrm host remove --forget-volumes`) to give that data"
                " up")
        return volumes

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
