"""
Where machines go, and what they hold: the scheduler's host index (fed by the hosts
resource's events, never re-synced) and every machine's reservation in it.

Placements are reservations.  The scheduler reserves capacity when a replica is placed;
it is committed when the machine runs and released when it stops, fails or goes.  Every
converge places its missing replicas under one lock (L{Placements.lock}), all or
nothing (L{Placements.plan_all}), so concurrent converges see each other's reservations
and never oversubscribe a host.  The machines a converge will remove lend it their
capacity (L{Placements.lend}) and get it back (L{Placements.give_back}) if it fails.

Drains and the healer place through here too: L{Placements.place} (a drain's targets),
L{Placements.place_now} (under the lock), L{Placements.restore} (a reservation again after
a restart).
"""

from twisted.internet.defer import DeferredLock
from twisted.logger import Logger

from zwrm import errors
from zwrm.control.resources import subscription
from zwrm.control.resources.machines import LIVE, placement_request
from zwrm.scheduler import PlacementRequest


class Placements:
    """
    The scheduler's host index and the machines' reservations.

    @ivar scheduler: the L{zwrm.scheduler.Scheduler}.
    @ivar lock: a L{DeferredLock}: converges place and store their replicas one at a time.
    @ivar unconfirmed: ids of machines found C{pending} at L{load} (their start may never
        have reached their agent), but for a live move's replacement (its drain settles it).
    @ivar cut_short: ids of machines found C{stopping} at L{load} (a planned stop that
        never ended, or a live drain's original).
    """

    log = Logger()

    def __init__(self, scheduler, data):
        """
        @param scheduler: a L{zwrm.scheduler.Scheduler}.
        @param data: the control plane's resource layer (C{hosts}, C{machines},
            C{volumes}).
        """
        self.scheduler = scheduler
        self._data = data
        self.lock = DeferredLock()
        self.unconfirmed = set()
        self.cut_short = set()
        self._placements = {}  # machine id -> Placement
        self._synced = {}  # host id -> what the scheduler was last given of it
        self._on_release = []  # callbacks of host ids where a reservation was given back
        # Get, then subscribe: the scheduler's host index follows the hosts resource.
        for host_id in data.hosts.ids():
            self._give_host(host_id)
        self._unsubscribe = data.hosts.subscribe(self._host_event)

    # -- the scheduler's host index, fed by host events --------------------------------

    def _host_event(self, event):
        """A host event: give the scheduler what changed of that host (or forget it)."""
        if event["kind"] == "removed":
            self._synced.pop(event["subject"], None)
            try:
                self.scheduler.remove_host(event["subject"])
            except errors.NotFound:
                pass  # never schedulable (its facts were refused)
            return
        self._give_host(event["subject"])

    def _give_host(self, host_id):
        """
        Give the scheduler C{host_id} as the hosts resource has it; a host is C{ready} for
        the scheduler only while its executor can be called.  A host whose state and
        placement facts are those last given is skipped before any copy or validation.
        """
        entry = self._data.hosts.get(host_id)
        if entry is None:
            return
        state = entry.schedulable_state
        r = entry.record
        labels = r.get("labels")
        seen = (state, r.get("region"), r.get("datacenter"), r.get("vcpus"),
                r.get("memory_mb"), r.get("disk_mb"),
                tuple(labels.items()) if isinstance(labels, dict) else labels)
        if self._synced.get(host_id) == seen:
            return
        record = dict(r, state=state, alloc_vcpus=0, alloc_memory_mb=0, alloc_disk_mb=0)
        try:
            self.scheduler.update_host(record)
        except errors.InvalidArgument as e:
            self._synced.pop(host_id, None)
            self.log.warn("host {id} not schedulable: {e}", id=host_id, e=e)
        else:
            self._synced[host_id] = seen

    def sync_hosts(self):
        """
        Give the scheduler every known host again.

        Only at start-up (L{load}: hosts loaded after this object was made); from then on
        the scheduler follows the hosts resource's events.  Hosts that did not change
        since they were last given are skipped.
        """
        for host_id in self._data.hosts.ids():
            self._give_host(host_id)

    # -- start-up ---------------------------------------------------------------------

    async def load(self):
        """
        After a control plane start: account in the scheduler for every live machine.

        @return: how many placements were restored.
        """
        self.sync_hosts()  # hosts loaded after this object was made
        n = 0
        # A live move's replacement is pending until the move resumes it on its target,
        # whose agent lists it only then: the drain settles it, not the agent's list.
        moving = await self._data.drains.live_replacements()
        for row in await self._data.machines.find(states=LIVE):
            if row["state"] == "pending" and row["id"] not in moving:
                # Stored by a converge whose start may never have reached the agent.
                self.unconfirmed.add(row["id"])
            elif row["state"] == "stopping":
                # A planned stop the process before began and did not end (it was killed:
                # a stop of ours puts its machines back, zwrm.control.service.STOP_GRACE),
                # or a live drain's original, paused for good (its drain ends it).
                self.cut_short.add(row["id"])
            try:
                self._placements[row["id"]] = self.scheduler.restore(
                    row["host_id"], placement_request(row["spec"]))
                self._alloc_changed(row["host_id"])
                n += 1
            except errors.ZwrmError as e:
                self.log.warn("machine {id}: capacity not restored: {e}", id=row["id"], e=e)
        return n

    # -- placing ----------------------------------------------------------------------

    def place(self, request, exclude=()):
        """
        Place C{request} now (a reservation; the caller releases it, or has a machine
        L{adopt} it).  For a drain's targets (C{exclude}: the draining host).

        @raise zwrm.errors.Unplaceable: it fits nowhere.
        """
        return self.scheduler.place(request, exclude=exclude)

    async def place_now(self, request):
        """L{place} under the placement lock (after the converges placing now)."""
        await self.lock.acquire()
        try:
            return self.scheduler.place(request)
        finally:
            self.lock.release()

    def unplace(self, placement):
        """
        Give back a placement made only to see where a request fits (a plan, a check):
        the host's stored allocation never included it.
        """
        self.scheduler.release(placement)

    def restore(self, host_id, request):
        """Reserve C{request} on C{host_id} again (a placement made before a restart)."""
        return self.scheduler.restore(host_id, request)

    async def plan_all(self, app, spec, missing):
        """
        Place every replica in C{missing} (all or nothing); the caller holds the placement
        lock.

        @return: C{[(replica, placement, existing volumes)]}.
        @raise zwrm.errors.Unplaceable: if one does not fit; nothing stays reserved.
        """
        planned = []
        try:
            for replica in missing:
                planned.append(await self._plan(app, spec, replica))
        except errors.Unplaceable as e:
            for _, placement, _ in planned:
                self.scheduler.release(placement)
            raise errors.Unplaceable(
                f"replica {missing[len(planned)]} of {app['name']}: {e.message}", **e.kwargs
            ) from None
        except BaseException:
            for _, placement, _ in planned:
                self.scheduler.release(placement)
            raise
        return planned

    async def _plan(self, app, spec, replica):
        existing = {
            v["name"]: v for v in await self._data.volumes.find(app_id=app["id"], replica=replica)
        } if spec["volumes"] else {}
        pins = {v["host_id"] for v in existing.values()}
        if len(pins) > 1:
            raise errors.Unplaceable(
                f"its volumes live on different hosts ({', '.join(sorted(pins))})")
        new_disk = sum(v["size_mb"] for v in spec["volumes"] if v["name"] not in existing)
        request = placement_request(spec, pinned_host=pins.pop() if pins else None,
                                    disk_mb=new_disk)
        placement = self.scheduler.place(request)
        return replica, placement, existing

    # -- reservations held by machines ------------------------------------------------

    def machine_changed(self, row):
        """
        Keep the reservation of the machine C{row} (just stored) in step with its state:
        released when it stopped or failed, committed when it runs.
        """
        if row["state"] != "pending":
            self.unconfirmed.discard(row["id"])
        if row["state"] in ("stopped", "failed"):
            self.release(row["id"])
        elif row["state"] == "running":
            p = self._placements.get(row["id"])
            if p is not None and not self.scheduler.is_committed(p):
                self.scheduler.commit(p)

    def restored(self, row):
        """
        The machine C{row} (just stored) runs again on its host, found there when the host
        came back after it was marked failed, or is started again there (a drain's
        rollback): its capacity there is taken again (it was given back when it failed or
        stopped). Nothing if it holds it already.
        """
        self.unconfirmed.discard(row["id"])
        if row["id"] in self._placements:
            return
        try:
            self._placements[row["id"]] = self.scheduler.restore(
                row["host_id"], placement_request(row["spec"]))
        except errors.ZwrmError as e:
            self.log.warn("machine {id}: capacity not restored: {e}", id=row["id"], e=e)
            return
        self._alloc_changed(row["host_id"])

    def on_release(self, callback):
        """
        Call C{callback(host_id)} whenever a reservation on C{host_id} is given back (a
        machine stopped, failed or went; a plan dropped): room there, maybe.

        @return: a function of no arguments that ends these calls.
        """
        return subscription(self._on_release, callback)

    def _released(self, host_id):
        self._alloc_changed(host_id)
        for callback in list(self._on_release):
            try:
                callback(host_id)
            except Exception:
                self.log.failure("a callback of room given back on {host_id}", host_id=host_id)

    def release(self, machine_id):
        """Give back the reservation C{machine_id} holds, if any."""
        p = self._placements.pop(machine_id, None)
        if p is not None:
            self.scheduler.release(p)
            self._released(p.host_id)

    def adopt(self, machine_id, placement):
        """
        Account for C{machine_id} with a placement made elsewhere (a drain's target): it is
        released with the machine from now on, and the host's stored allocation includes it.
        """
        self._placements[machine_id] = placement
        self._alloc_changed(placement.host_id)

    def release_placement(self, placement):
        """Give back a placement that never became a machine (e.g. a drain's plan)."""
        if self.scheduler.release(placement):
            self._released(placement.host_id)

    def lend(self, machines):
        """
        Take the reservations of C{machines} (which a converge will remove) out of the
        scheduler, so that their replacements may use the capacity.

        @return: C{{machine_id: placement}}, for L{give_back}.
        """
        lent = {}
        for m in machines:
            p = self._placements.pop(m["id"], None)
            if p is not None:
                self.scheduler.release(p)
                self._alloc_changed(p.host_id)
                lent[m["id"]] = p
        return lent

    def give_back(self, lent):
        """Reserve again what L{lend} took, for the machines that were not removed."""
        for machine_id, p in lent.items():
            request = PlacementRequest(vcpus=p.vcpus, memory_mb=p.memory_mb, disk_mb=p.disk_mb)
            try:
                self._placements[machine_id] = self.scheduler.restore(p.host_id, request)
            except errors.ZwrmError as e:
                self.log.warn("machine {id}: capacity not given back: {e}", id=machine_id, e=e)
            self._alloc_changed(p.host_id)

    def _alloc_changed(self, host_id):
        """
        Store what the scheduler has placed on C{host_id} as the host's allocation (what
        C{zwrm host list} shows). Written behind the change, in the store's order.
        """
        try:
            h = self.scheduler.host(host_id)
        except errors.NotFound:
            return
        self._data.hosts.set_allocation(host_id, {
            "alloc_vcpus": h.used_vcpus, "alloc_memory_mb": h.used_memory_mb,
            "alloc_disk_mb": h.used_disk_mb})
