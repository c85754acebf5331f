"""
Apps, their machines and their volumes: the operator's C{zwrm.app.*}, C{zwrm.machine.*}
and C{zwrm.volume.*} procedures, and what agents report about machines.

An app is a name and a deployed spec::

    {"image": "name:tag" | {"kernel", "initrd", "disk", "cmdline"},
     "vcpus", "memory_mb", "replicas", "region", "datacenter",
     "service_port", "health": {"type", "path", "interval", "timeout", "grace"},
     "volumes": [{"name", "size_mb", "mount"}]}

Replica I{i} of an app is a machine; each volume of the spec gives replica I{i} its own
local volume (named C{<name>} with C{replica} I{i}), created on the host the scheduler
chose for that replica. From then on that volume pins the replica to its host, whatever the
strategy (a drain moves the volume, and with it the pin). Scaling down stops and destroys the
highest replicas but keeps their volumes: nothing is deleted unless the operator asks
(C{zwrm.volume.destroy}, or C{zwrm.app.destroy} with C{volumes=True}).

Every change goes through an update method of the resource layer
(L{zwrm.control.resources}: apps, machines, volumes), which stores it, then publishes one
canonical event on C{zwrm.event.machine} (machines and volumes) or C{zwrm.event.app}.
The scheduler learns about hosts from the hosts resource's events (L{Apps._host_event}),
not by being re-synced.

A request that fails changes nothing that was there.  A converge places every missing
replica (all or nothing) I{before} it removes a machine or stores the new spec: the
capacity of the machines it will remove is lent to the placement and given back if the
placement fails.  So a scale or deploy refused because a volume's host is unreachable
leaves the app's spec and its machines' records as they were, and when the host returns
its machines are restored to running (not stopped as unknown).

Concurrency.  The deploys, scales and destroys of one app run one at a time, in the order
they were called (a lock per app, held for the whole converge, starts included).  Those of
different apps overlap: a converge holds the one placement lock of the control plane only
while it places its missing replicas (all or nothing) and stores them as C{pending}
machines with their reservations; the agents' C{machine.start} calls run after it let go,
so a slow host delays only the app that has a machine there.  Every placement reserves its
capacity in the scheduler before the lock is released, so concurrent converges see each
other's reservations and never oversubscribe a host; a start that fails releases its
reservation, a machine that runs commits it.

A control plane that stops between storing a C{pending} machine and its agent's first
report leaves that machine C{pending}; after a restart its capacity stays reserved
(L{Apps.load}) and the app's next converge rolls it back (failed, destroyed, placed again)
unless its agent has reported it since (then it goes on as any other machine).
"""

import re
import uuid

from autobahn import wamp
from twisted.internet.defer import DeferredList, DeferredLock, ensureDeferred
from twisted.logger import Logger

from zwrm import errors
from zwrm.agent import health as agent_health
from zwrm.control import healing, network
from zwrm.control.resources.apps import TOPIC as APP_TOPIC
from zwrm.control.resources.apps import public_spec
from zwrm.control.resources.machines import LIVE, placement_request
from zwrm.control.resources.machines import STATES as MACHINE_STATES
from zwrm.control.resources.machines import TOPIC as MACHINE_TOPIC
from zwrm.control.resources.machines import wire as machine_wire
from zwrm.drivers import cloudinit
from zwrm.registry.image import parse_reference as parse_image_reference
from zwrm.scheduler import PlacementRequest

__all__ = ["APP_TOPIC", "MACHINE_TOPIC", "LIVE", "MACHINE_STATES", "Apps", "validate_spec",
           "placement_request"]
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def _check_name(name, what):
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise errors.InvalidArgument(
            f"{what} {name!r} is not valid: use 1-63 lower-case letters, digits and '-', "
            "starting with a letter or digit"
        )
    return name


def _int(spec, key, low, high, default):
    v = spec.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise errors.InvalidArgument(f"{key} must be a whole number from {low} to {high}, not {v!r}")
    return v


def validate_spec(spec):
    """
    Check a deployment spec; return a normalized copy.

    @raise zwrm.errors.InvalidArgument: naming the field that is wrong.
    """
    if not isinstance(spec, dict):
        raise errors.InvalidArgument("a deployment spec must be a mapping")
    known = {"image", "vcpus", "memory_mb", "replicas", "region", "datacenter",
             "service_port", "health", "volumes", "constraints", "cloud_init", "publish", "domain",
             "restart", "update"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise errors.InvalidArgument(f"unknown deployment field(s): {', '.join(unknown)}")
    image = spec.get("image")
    if not (isinstance(image, str) and image) and not isinstance(image, dict):
        raise errors.InvalidArgument("image must be an image reference (name:tag) or local paths")
    out = {
        "image": image,
        "vcpus": _int(spec, "vcpus", 1, 256, 1),
        "memory_mb": _int(spec, "memory_mb", 32, 1024 * 1024, 256),
        "replicas": _int(spec, "replicas", 0, 1000, 1),
        "region": spec.get("region"),
        "datacenter": spec.get("datacenter"),
        "service_port": spec.get("service_port"),
        "health": spec.get("health"),
        "constraints": spec.get("constraints") or {},
        "volumes": [],
        "cloud_init": cloudinit.validate(spec.get("cloud_init")),
    }
    if spec.get("publish") or spec.get("domain"):  # the ingress (zwrm.control.network)
        out["publish"] = network.check_publish(spec.get("publish"), spec.get("domain"))
        out["domain"] = spec.get("domain")
    for key in ("region", "datacenter"):
        if out[key] is not None and (not isinstance(out[key], str) or not out[key]):
            raise errors.InvalidArgument(f"{key} must be a name or null, not {out[key]!r}")
    port = out["service_port"]
    if port is not None and (not isinstance(port, int) or isinstance(port, bool)
                             or not 1 <= port <= 65535):
        raise errors.InvalidArgument(f"service_port must be a TCP port or null, not {port!r}")
    if out["health"] is not None:
        out["health"] = _check_health(out["health"])
    if out["health"] is not None and port is None:
        raise errors.InvalidArgument("a health check needs a service_port")
    if spec.get("restart") is not None:  # the restart policy (zwrm.control.healing)
        out["restart"] = healing.validate_restart(spec["restart"])
    if spec.get("update") is not None:  # a rolling update (Apps._rolling)
        out["update"] = _check_update(spec["update"])
    vols = spec.get("volumes") or []
    if not isinstance(vols, list):
        raise errors.InvalidArgument("volumes must be a list of {name, size_mb, mount}")
    seen = set()
    for v in vols:
        if not isinstance(v, dict):
            raise errors.InvalidArgument(f"each volume must be {{name, size_mb, mount}}, not {v!r}")
        name = _check_name(v.get("name"), "volume name")
        if name in seen:
            raise errors.InvalidArgument(f"volume {name!r} is listed twice")
        seen.add(name)
        mount = v.get("mount")
        if not isinstance(mount, str) or not mount.startswith("/") or mount == "/":
            raise errors.InvalidArgument(
                f"volume {name!r}: mount must be an absolute path other than /, not {mount!r}")
        out["volumes"].append({
            "name": name, "mount": mount, "size_mb": _int(v, "size_mb", 2, 16 * 1024 * 1024, 64),
        })
    # Placement-side checks (labels) are the scheduler's; fail now, not per replica.
    PlacementRequest(vcpus=out["vcpus"], memory_mb=out["memory_mb"], region=out["region"],
                     datacenter=out["datacenter"], constraints=out["constraints"])
    return out


def _check_health(health):
    """
    The health check of a spec, checked as its agent will check it, plus the control
    plane's C{unhealthy_threshold} (checks failing in a row before a restart, default 3).
    """
    threshold = health.get("unhealthy_threshold") if isinstance(health, dict) else None
    rest = {k: v for k, v in health.items() if k != "unhealthy_threshold"} \
        if isinstance(health, dict) else health
    out = agent_health.validate(rest)
    if threshold is not None:
        if not isinstance(threshold, int) or isinstance(threshold, bool) \
                or not 1 <= threshold <= 1000:
            raise errors.InvalidArgument(
                f"health unhealthy_threshold must be a whole number from 1 to 1000, "
                f"not {threshold!r}")
        out["unhealthy_threshold"] = threshold
    return out


UPDATE_DEFAULTS = {"max_parallel": 1, "min_healthy_time": 10.0, "healthy_deadline": 300.0,
                   "auto_revert": True}


def _check_update(update):
    """A spec's rolling-update settings, with every key (see L{Apps._rolling})."""
    if not isinstance(update, dict):
        raise errors.InvalidArgument("update must be a mapping")
    unknown = sorted(set(update) - set(UPDATE_DEFAULTS))
    if unknown:
        raise errors.InvalidArgument(f"unknown update field(s): {', '.join(unknown)}")
    out = dict(UPDATE_DEFAULTS, **{k: v for k, v in update.items() if v is not None})
    out["max_parallel"] = _int(out, "max_parallel", 0, 1000, 1)  # 0: all at once
    for key, high in (("min_healthy_time", 3600), ("healthy_deadline", 86400)):
        v = out[key]
        if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v <= high:
            raise errors.InvalidArgument(f"update {key} must be seconds from 0 to {high}, not {v!r}")
        out[key] = float(v)
    if out["healthy_deadline"] < out["min_healthy_time"]:
        raise errors.InvalidArgument("update healthy_deadline must not be below min_healthy_time")
    if not isinstance(out["auto_revert"], bool):
        raise errors.InvalidArgument("update auto_revert must be true or false")
    return out


def merge_spec(current, given):
    """
    A redeploy's spec: C{given}'s fields over the C{current} version's; a field C{given}
    as L{None} is cleared (back to its default), a field left out keeps its value.
    """
    out = dict(current or {})
    for key, value in given.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def same_version(a, b):
    """Whether a machine of spec C{a} may stay under spec C{b}: they differ at most in
    their replica count and how they are updated."""
    return {k: v for k, v in (a or {}).items() if k not in ("replicas", "update")} == \
        {k: v for k, v in (b or {}).items() if k not in ("replicas", "update")}


def _new_id(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Apps:
    """
    The apps, machines and volumes of the cluster, and their placement.

    @ivar scheduler: the L{zwrm.scheduler.Scheduler}; fed by the hosts resource's events.
    @ivar data: the L{zwrm.control.resources.Data} it works on (the host registry's).
    """

    log = Logger()

    def __init__(self, clock, store, hosts, scheduler, publish):
        """
        @param clock: an L{IReactorTime}.
        @param store: the L{zwrm.control.store.Store}.
        @param hosts: the L{zwrm.control.registry.HostRegistry} (host states, executors,
            and the resource layer, C{hosts.data}).
        @param scheduler: a L{zwrm.scheduler.Scheduler}.
        @param publish: C{publish(topic, event)}: unused when C{hosts} has a resource layer
            (its events are published by it); kept for callers that pass it.
        """
        self._clock = clock
        self._store = store
        self._hosts = hosts
        self.scheduler = scheduler
        self._publish = publish
        self.data = hosts.data
        self.images = None  # the registry's ImageAPI (info(ref)), to check deploys' images
        self.network = network.ClusterNetwork(store, clock)  # addresses; docs/networking.md
        self.network_view = network.ViewPublisher(clock, self.network, self.data, self._call)
        self._placements = {}  # machine id -> Placement
        self._placing = DeferredLock()  # converges place and store their replicas one at a time
        self._app_locks = {}  # app name -> DeferredLock: its deploys, scales, destroys in order
        self._machine_locks = {}  # machine id -> DeferredLock: its changes apply in order
        self._unconfirmed = set()  # ids of machines found pending at load
        self._synced = {}  # host id -> what the scheduler was last given of it
        # Get, then subscribe: the scheduler's host index follows the hosts resource.
        for host_id in self.data.hosts.ids():
            self._give_host(host_id)
        self._unsubscribe = self.data.hosts.subscribe(self._host_event)

    # -- the scheduler's host index, fed by host events --------------------------------

    def _host_event(self, event):
        """A host event: give the scheduler what changed of that host."""
        self._give_host(event["subject"])

    def _give_host(self, host_id):
        """
        Give the scheduler C{host_id} as the hosts resource has it; a host is C{ready} for
        the scheduler only while its executor can be called.  A host whose state and
        placement facts are those last given is skipped before any copy or validation.
        """
        entry = self.data.hosts.get(host_id)
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
        for host_id in self.data.hosts.ids():
            self._give_host(host_id)

    # -- start-up ---------------------------------------------------------------------

    async def load(self):
        """
        After a control plane start: account in the scheduler for every live machine.

        @return: how many placements were restored.
        """
        self.sync_hosts()  # hosts loaded after this object was made
        n = 0
        for row in await self.data.machines.find(states=LIVE):
            if row["state"] == "pending":
                # Stored by a converge whose start may never have reached the agent.
                self._unconfirmed.add(row["id"])
            try:
                self._placements[row["id"]] = self.scheduler.restore(
                    row["host_id"], placement_request(row["spec"]))
                self._alloc_changed(row["host_id"])
                n += 1
            except errors.ZwrmError as e:
                self.log.warn("machine {id}: capacity not restored: {e}", id=row["id"], e=e)
        return n

    # -- stored changes, then events --------------------------------------------------

    async def set_machine(self, row, reason, **fields):
        """
        Store C{fields} of a machine through the machines resource (one event), and keep
        its reservation in step: released when it stopped or failed, committed when it runs.
        """
        await self.data.machines.set(row, reason, **fields)
        if row["state"] != "pending":
            self._unconfirmed.discard(row["id"])
        if row["state"] in ("stopped", "failed"):
            self._release(row["id"])
        elif row["state"] == "running":
            p = self._placements.get(row["id"])
            if p is not None and not self.scheduler.is_committed(p):
                self.scheduler.commit(p)
        return row

    async def add_machine(self, row, reason, placement=None):
        """
        Store a new machine row (state C{pending}) through the machines resource (one
        event); with C{placement}, the machine holds that reservation from now on.
        """
        await self.data.machines.add(row, reason)
        if placement is not None:
            self.adopt_placement(row["id"], placement)
        return row

    def _release(self, machine_id):
        p = self._placements.pop(machine_id, None)
        if p is not None:
            self.scheduler.release(p)
            self._alloc_changed(p.host_id)

    def adopt_placement(self, machine_id, placement):
        """
        Account for C{machine_id} with a placement made elsewhere (a drain's target): it is
        released with the machine from now on, and the host's stored allocation includes it.
        """
        self._placements[machine_id] = placement
        self._alloc_changed(placement.host_id)

    def release_placement(self, placement):
        """Give back a placement that never became a machine (e.g. a drain's plan)."""
        if self.scheduler.release(placement):
            self._alloc_changed(placement.host_id)

    def _alloc_changed(self, host_id):
        """
        Store what the scheduler has placed on C{host_id} as the host's allocation (what
        C{zwrm host list} shows). Written behind the change, in the store's order.
        """
        try:
            h = self.scheduler.host(host_id)
        except errors.NotFound:
            return
        self.data.hosts.set_allocation(host_id, {
            "alloc_vcpus": h.used_vcpus, "alloc_memory_mb": h.used_memory_mb,
            "alloc_disk_mb": h.used_disk_mb})

    async def _call(self, host_id, verb, *args, **kwargs):
        """Call a host's executor; its errors come back as L{zwrm.errors} classes."""
        try:
            return await self._hosts.call_executor(host_id, verb, *args, **kwargs)
        except Exception as e:
            raise errors.from_wire(e) from None

    # -- lookups ----------------------------------------------------------------------

    async def _app(self, name):
        _check_name(name, "app name")
        return await self.data.apps.by_name(name)

    async def _machine(self, machine_id):
        if not isinstance(machine_id, str) or not machine_id:
            raise errors.InvalidArgument("a machine id is needed")
        row = await self.data.machines.get(machine_id)
        if row is None:
            raise errors.NotFound(f"no machine {machine_id!r}")
        return row

    # -- apps -------------------------------------------------------------------------

    @wamp.register("zwrm.app.create")
    async def create_app(self, name):
        """Create an empty app. @raise Conflict: if the name is taken."""
        _check_name(name, "app name")
        if await self.data.apps.exists(name):
            raise errors.Conflict(f"app {name!r} exists")
        row = {"id": _new_id("a"), "name": name, "spec": None, "created_at": self._clock.seconds()}
        await self.data.apps.add(row)
        return {"id": row["id"], "name": name}

    @wamp.register("zwrm.app.list")
    async def list_apps(self):
        """Every app with its replica count and machine counts by state."""
        apps = await self.data.apps.all()
        machines = await self.data.machines.find()
        out = []
        for a in apps:
            counts = {}
            for m in machines:
                if m["app_id"] == a["id"]:
                    counts[m["state"]] = counts.get(m["state"], 0) + 1
            spec = a["spec"] or {}
            out.append({"id": a["id"], "name": a["name"], "image": spec.get("image"),
                        "replicas": spec.get("replicas", 0), "machines": counts})
        return out

    @wamp.register("zwrm.app.status")
    async def app_status(self, name):
        """An app's spec (and its C{spec_version}), machines and volumes."""
        app = await self._app(name)
        machines = await self.data.machines.find(app_id=app["id"], order_by="created_at")
        volumes = await self.data.volumes.find(app_id=app["id"], order_by="name")
        return {"id": app["id"], "name": app["name"], "spec": public_spec(app["spec"]),
                "spec_version": app.get("spec_version") or 0,
                "machines": [machine_wire(m) for m in machines],
                "volumes": volumes}

    @wamp.register("zwrm.app.deploy")
    async def deploy(self, name, spec):
        """
        Store C{spec} as the app's spec and converge its machines to it: machines of an
        older spec are replaced, missing replicas placed and started, extra ones removed.

        @return: the app's status after the machines were started (not yet healthy: follow
            C{zwrm.event.machine} or poll C{zwrm.app.status}).
        @raise zwrm.errors.Unplaceable: if a replica fits nowhere; nothing was changed
            (the spec and the machines are as they were).
        """
        if not isinstance(spec, dict):
            raise errors.InvalidArgument("a deployment spec must be a mapping")
        _check_name(name, "app name")
        await self._in_app_order(name, self._deploy, name, spec)
        return await self.app_status(name)

    async def check_image(self, spec):
        """
        Check that the image a spec boots from is there: a registry reference must name an
        image of the control plane's registry with a kernel or a disk; local paths must be
        absolute, with a kernel or a disk.

        @raise zwrm.errors.InvalidArgument: saying what is missing.
        """
        image = spec["image"]
        if isinstance(image, dict):
            unknown = sorted(set(image) - {"kernel", "initrd", "disk", "cmdline"})
            if unknown:
                raise errors.InvalidArgument(f"image: unknown field(s) {', '.join(unknown)}")
            for key in ("kernel", "initrd", "disk"):
                path = image.get(key)
                if path is not None and (not isinstance(path, str) or not path.startswith("/")):
                    raise errors.InvalidArgument(f"image {key} must be an absolute path, not {path!r}")
            if not image.get("kernel") and not image.get("disk"):
                raise errors.InvalidArgument("image needs a kernel or a disk")
            return
        parse_image_reference(image)
        if self.images is None:
            return
        try:
            info = await self.images.info(image)
        except errors.NotFound:
            raise errors.InvalidArgument(f"image {image} is not in the registry") from None
        layers = info.get("layers") or {}
        if info.get("kind") != "zwrm" or not (layers.get("kernel") or layers.get("disk")):
            raise errors.InvalidArgument(
                f"image {image} is not a bootable zwrm image (it has no kernel or disk)")

    async def _deploy(self, name, given, merge=True, reason="deployed", **extra):
        app = await self._app(name)
        spec = validate_spec(merge_spec(app["spec"], given) if merge else given)
        await self.check_image(spec)

        async def store_spec():
            await self.data.apps.set_spec(app, spec, "deployed", **extra)

        # Every update rolls (issue 15), with the defaults unless the spec says otherwise;
        # max_parallel 0 replaces every machine at once.
        update = spec.get("update") or UPDATE_DEFAULTS
        if update["max_parallel"] and app["spec"] is not None:
            stale = [m for m in await self.data.machines.find(app_id=app["id"], states=("running",))
                     if m["spec"]["replica"] < spec["replicas"]
                     and not same_version(m["spec"].get("app_spec"), spec)]
            if stale:
                return await self._rolling(app, dict(app["spec"]), spec, stale, store_spec)
        await self._converge(app, spec, replace=True, store_spec=store_spec)

    async def _rolling(self, app, old_spec, spec, stale, store_spec):
        """
        A rolling update (the spec's C{update}: C{max_parallel}, C{min_healthy_time},
        C{healthy_deadline}, C{auto_revert}): the new spec is stored, the replicas that do
        not run an old version are converged at once, then the running old ones are
        replaced C{max_parallel} at a time.  A replica without volumes gets its new machine
        first (on any host) and loses the old one only once the new one has been healthy
        for C{min_healthy_time} within C{healthy_deadline}; one with volumes is replaced in
        place (its volumes pin it).  If a new machine does not become healthy, the update
        stops: its new machines are removed and, with C{auto_revert}, the previous version
        is deployed again (the old machines not yet replaced never stopped).

        @raise zwrm.errors.Unavailable: the update failed (saying whether it was reverted).
        """
        update = spec.get("update") or UPDATE_DEFAULTS
        stale.sort(key=lambda m: m["spec"]["replica"])
        old_replicas = {m["spec"]["replica"] for m in stale}
        # The whole new state must fit (as a converge checks) before anything changes.
        await self._placing.acquire()
        try:
            lent = self._lend(stale)
            try:
                for _, placement, _ in await self._plan_all(app, spec, sorted(old_replicas)):
                    self.scheduler.release(placement)
            finally:
                self._give_back(lent)
        finally:
            self._placing.release()
        await store_spec()
        rest = set(range(max(spec["replicas"], old_spec["replicas"]))) - old_replicas
        if rest:
            await self._converge(app, spec, replace=True, only=rest)
        n = update["max_parallel"]
        for start in range(0, len(stale), n):
            batch = stale[start:start + n]
            try:
                await self._replace_batch(app, spec, batch, update)
            except errors.ZwrmError as e:
                reason = e.message
                if update["auto_revert"]:
                    revert = dict(old_spec)
                    await self.data.apps.set_spec(app, revert, "deployed", reverted=True,
                                                  reason_detail=reason)
                    await self._converge(app, revert, replace=True)
                    raise errors.Unavailable(
                        f"the update of {app['name']} failed ({reason}); reverted to the "
                        f"previous version (now version {app['spec_version']})") from None
                raise errors.Unavailable(
                    f"the update of {app['name']} stopped ({reason})") from None

    async def _replace_batch(self, app, spec, batch, update):
        """Replace the old machines of C{batch} (see L{_rolling})."""
        surge = [m for m in batch if not m["spec"]["volumes"]]
        in_place = [m for m in batch if m["spec"]["volumes"]]
        new_rows = []
        if surge:
            await self._placing.acquire()
            try:
                planned = await self._plan_all(app, spec, [m["spec"]["replica"] for m in surge])
            except errors.Unplaceable:
                planned = None  # no room beside the old machines: replaced in place
            finally:
                self._placing.release()
            if planned is None:
                surge, in_place = [], batch
                planned = []
            for replica, placement, volumes in planned:
                new_rows.append(await self._store_replica(app, spec, replica, placement, volumes))
        if in_place:
            for m in in_place:
                await self._converge(app, spec, replace=True, only={m["spec"]["replica"]})
            replicas = {m["spec"]["replica"] for m in in_place}
            new_rows += [r for r in await self.data.machines.find(app_id=app["id"])
                         if r["spec"]["replica"] in replicas and r["id"] not in
                         {m["id"] for m in in_place}]
        if surge:
            await self._start_all(new_rows[:len(surge)])
        try:
            for row in new_rows:
                await self.data.machines.wait_healthy(
                    row["id"], update["healthy_deadline"], update["min_healthy_time"])
        except errors.ZwrmError:
            for row in new_rows:
                fresh = await self.data.machines.get(row["id"])
                if fresh is not None:
                    await self.remove_machine(fresh)
            raise
        for m in surge:
            fresh = await self.data.machines.get(m["id"])
            if fresh is not None:
                await self.remove_machine(fresh)

    @wamp.register("zwrm.app.plan")
    async def plan(self, name, spec):
        """
        What C{zwrm.app.deploy(name, spec)} would do, changing nothing (as C{nomad job
        plan}): the checked spec's C{diff} against the current version (C{{field: {old,
        new}}}, secrets as digests), the replicas it would C{create}, the machines it would
        C{replace} (with C{to_host}: a different host is a move), C{destroy} or C{keep},
        and C{unplaceable} (the reason, or L{None}).

        @raise zwrm.errors.InvalidArgument: the spec is refused (as deploy would).
        """
        if not isinstance(spec, dict):
            raise errors.InvalidArgument("a deployment spec must be a mapping")
        _check_name(name, "app name")
        return await self._in_app_order(name, self._plan_deploy, name, spec)

    async def _plan_deploy(self, name, given):
        app = await self._app(name)
        new = validate_spec(merge_spec(app["spec"], given))
        await self.check_image(new)
        old_pub, new_pub = public_spec(app["spec"] or {}), public_spec(new)
        diff = {k: {"old": old_pub.get(k), "new": new_pub.get(k)}
                for k in sorted(set(old_pub) | set(new_pub)) if old_pub.get(k) != new_pub.get(k)}
        rows = await self.data.machines.find(app_id=app["id"], order_by="created_at")
        going, kept, keep, destroy = [], set(), [], []
        for m in rows:
            if m["state"] not in LIVE and m["state"] not in ("failed", "stopped"):
                continue
            replica = m["spec"]["replica"]
            entry = {"machine_id": m["id"], "replica": replica, "host_id": m["host_id"],
                     "state": m["state"]}
            if replica >= new["replicas"]:
                destroy.append(entry)
                going.append(m)
            elif not same_version(m["spec"].get("app_spec"), new) \
                    or m["state"] in ("failed", "stopped"):
                going.append(m)
            else:
                kept.add(replica)
                keep.append(entry)
        missing = [i for i in range(new["replicas"]) if i not in kept]
        unplaceable, placed = None, {}
        await self._placing.acquire()
        try:
            lent = self._lend(going)
            try:
                planned = await self._plan_all(app, new, missing)
                placed = {replica: p.host_id for replica, p, _ in planned}
                for _, p, _ in planned:
                    self.scheduler.release(p)
            except errors.Unplaceable as e:
                unplaceable = e.message
            finally:
                self._give_back(lent)
        finally:
            self._placing.release()
        replace, by_replica = [], {}
        for m in going:
            if m["spec"]["replica"] < new["replicas"]:
                by_replica[m["spec"]["replica"]] = m
                replace.append({"machine_id": m["id"], "replica": m["spec"]["replica"],
                                "host_id": m["host_id"], "state": m["state"],
                                "to_host": placed.get(m["spec"]["replica"])})
        create = [{"replica": i, "host_id": placed.get(i)} for i in missing if i not in by_replica]
        return {"app": name, "version": (app.get("spec_version") or 0) + (1 if diff else 0),
                "changed": bool(diff), "diff": diff, "create": create, "replace": replace,
                "destroy": destroy, "keep": keep, "unplaceable": unplaceable}

    @wamp.register("zwrm.app.history")
    async def history(self, name):
        """
        Every spec version of an app, oldest first: C{[{version, spec, created_at,
        current}]} (specs without their secrets).
        """
        app = await self._app(name)
        current = app.get("spec_version") or 0
        return [{"version": v["version"], "spec": public_spec(v["spec"]),
                 "created_at": v["created_at"],
                 "current": v["version"] == current and app["spec"] is not None}
                for v in await self.data.apps.spec_versions(app["id"])]

    @wamp.register("zwrm.app.rollback")
    async def rollback(self, name, version=None):
        """
        Deploy spec version C{version} of an app again (default: the one before the
        current one), as a new version; checked and converged as any deploy.

        @raise zwrm.errors.NotFound: no such app or version.
        """
        _check_name(name, "app name")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)
                                    or version < 1):
            raise errors.InvalidArgument(f"version must be a spec version (1 or more), not {version!r}")
        await self._in_app_order(name, self._rollback, name, version)
        return await self.app_status(name)

    async def _rollback(self, name, version):
        app = await self._app(name)
        versions = {v["version"]: v["spec"] for v in await self.data.apps.spec_versions(app["id"])}
        if version is None:
            version = (app.get("spec_version") or 0) - 1
            if app["spec"] is not None and version < 1:
                raise errors.NotFound(f"app {name!r} has no version before its current one")
        if version not in versions:
            raise errors.NotFound(f"app {name!r} has no spec version {version}")
        await self._deploy(name, versions[version], merge=False, rolled_back_to=version)

    @wamp.register("zwrm.app.scale")
    async def scale(self, name, replicas):
        """
        Change an app's replica count and converge. @raise InvalidArgument, NotFound.
        @raise zwrm.errors.Unplaceable: a replica fits nowhere; nothing was changed.
        """
        if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= 1000:
            raise errors.InvalidArgument(f"replicas must be from 0 to 1000, not {replicas!r}")
        _check_name(name, "app name")
        await self._in_app_order(name, self._scale, name, replicas)
        return await self.app_status(name)

    async def _scale(self, name, replicas):
        app = await self._app(name)
        if app["spec"] is None:
            raise errors.Conflict(f"app {name!r} was never deployed")
        spec = dict(app["spec"], replicas=replicas)

        async def store_spec():
            await self.data.apps.set_spec(app, spec, "scaled", replicas=replicas)

        await self._converge(app, spec, replace=False, store_spec=store_spec)

    @wamp.register("zwrm.app.destroy")
    async def destroy_app(self, name, volumes=False):
        """
        Destroy every machine of an app and the app; its volumes too only if C{volumes}.

        @return: C{{"machines": [...], "volumes": [...]}} destroyed.
        """
        _check_name(name, "app name")
        return await self._in_app_order(name, self._destroy_app, name, volumes)

    async def _destroy_app(self, name, volumes):
        app = await self._app(name)
        machines = await self.data.machines.find(app_id=app["id"])
        gone = [await self.remove_machine(m) for m in machines]
        vols = []
        if volumes:
            for v in await self.data.volumes.find(app_id=app["id"]):
                await self._destroy_volume(v)
                vols.append(v["id"])
        elif await self.data.volumes.find(app_id=app["id"]):
            # The app stays, without a spec, so its volumes keep an owner.
            await self.data.apps.set_spec(app, None, "destroyed", volumes_kept=True)
            return {"machines": gone, "volumes": [], "app_kept_for_volumes": True}
        await self.data.apps.delete(app)
        return {"machines": gone, "volumes": vols}

    def _in_app_order(self, name, fn, *args):
        """
        Run C{fn(*args)} after every deploy, scale or destroy already under way for the
        app called C{name}.
        """
        return _in_key_order(self._app_locks, name, fn, *args)

    async def reschedule(self, app_id, replicas, only_host=None):
        """
        Place replicas C{replicas} of the app C{app_id} again (their machines failed: their
        host was lost), elsewhere if need be, leaving its other replicas alone; in the
        app's order.  Replicas whose machine is no longer failed (on C{only_host}, if
        given) are skipped.

        @raise zwrm.errors.Unplaceable: one does not fit; nothing was changed.
        """
        app = await self.data.apps.by_id(app_id)
        if app is None:
            return
        return await self._in_app_order(app["name"], self._reschedule, app["name"],
                                        set(replicas), only_host)

    async def _reschedule(self, name, replicas, only_host):
        app = await self._app(name)
        spec = app["spec"]
        if spec is None:
            return
        rows = await self.data.machines.find(app_id=app["id"], states=("failed",))
        only = {m["spec"]["replica"] for m in rows
                if m["spec"]["replica"] in replicas and m["spec"]["replica"] < spec["replicas"]
                and (only_host is None or m["host_id"] == only_host)}
        if only:
            await self._converge(app, spec, replace=False, only=only)

    async def _converge(self, app, spec, replace, store_spec=None, only=None):
        """
        Converge C{app}'s machines to C{spec} (the caller holds the app's lock).

        First, under the placement lock, place every missing replica (all or nothing),
        lending it the capacity of the machines that will go (extra, stale, failed, or
        stored by a control plane that restarted before their start was confirmed).  If
        that fails, the capacity is given back and nothing has changed.  Then remove the
        machines that go, call C{store_spec} (it stores the new spec), store the placed
        replicas as C{pending} machines holding their reservations, and start them on their
        hosts outside the placement lock.  With C{only} (a set of replica numbers), only
        those replicas are looked at.
        """
        if only is None:
            rows = await self.data.machines.find(app_id=app["id"])
        else:  # those replicas' rows only (an app may have thousands)
            rows = await self.data.machines.find(app_id=app["id"], replicas=only)
        going, kept = [], set()
        for m in rows:
            if m["state"] not in LIVE and m["state"] not in ("failed", "stopped"):
                continue
            replica = m["spec"]["replica"]
            if only is not None and replica not in only:
                continue
            unconfirmed = m["state"] == "pending" and m["id"] in self._unconfirmed
            stale = replace and not same_version(m["spec"].get("app_spec"), spec)
            down = m["state"] in ("failed", "stopped")  # replaced (a guest that powered off)
            if replica >= spec["replicas"] or stale or down or unconfirmed:
                going.append((m, unconfirmed))
            else:
                kept.add(replica)
        missing = [i for i in range(spec["replicas"])
                   if i not in kept and (only is None or i in only)]
        await self._placing.acquire()
        try:
            lent = self._lend([m for m, _ in going])
            try:
                planned = await self._plan_all(app, spec, missing)
            except BaseException:
                self._give_back(lent)
                raise
        finally:
            self._placing.release()
        try:
            for m, unconfirmed in going:
                if unconfirmed:
                    await self.set_machine(
                        m, "the control plane restarted before its start was confirmed",
                        state="failed")
                await self.remove_machine(m)
                lent.pop(m["id"], None)
        except BaseException:
            for _, placement, _ in planned:
                self.release_placement(placement)
            self._give_back(lent)
            raise
        stored = []
        try:
            if store_spec is not None:
                await store_spec()
            for replica, placement, volumes in planned:
                stored.append(await self._store_replica(app, spec, replica, placement, volumes))
        except BaseException:
            for _, placement, _ in planned[len(stored):]:
                self.release_placement(placement)
            raise
        await self._start_all(stored)

    def _lend(self, machines):
        """
        Take the reservations of C{machines} (which a converge will remove) out of the
        scheduler, so that their replacements may use the capacity.

        @return: C{{machine_id: placement}}, for L{_give_back}.
        """
        lent = {}
        for m in machines:
            p = self._placements.pop(m["id"], None)
            if p is not None:
                self.scheduler.release(p)
                self._alloc_changed(p.host_id)
                lent[m["id"]] = p
        return lent

    def _give_back(self, lent):
        """Reserve again what L{_lend} took, for the machines that were not removed."""
        for machine_id, p in lent.items():
            request = PlacementRequest(vcpus=p.vcpus, memory_mb=p.memory_mb, disk_mb=p.disk_mb)
            try:
                self._placements[machine_id] = self.scheduler.restore(p.host_id, request)
            except errors.ZwrmError as e:
                self.log.warn("machine {id}: capacity not given back: {e}", id=machine_id, e=e)
            self._alloc_changed(p.host_id)

    async def _plan_all(self, app, spec, missing):
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

    async def _start_all(self, rows):
        """
        Start every stored machine in C{rows} on its host, all at once; wait for all.
        A start that fails marks its machine failed (releasing its reservation).
        """
        if not rows:
            return
        results = await DeferredList(
            [ensureDeferred(self.start_machine(row)) for row in rows], consumeErrors=True)
        for ok, result in results:
            if not ok:
                result.raiseException()

    async def _plan(self, app, spec, replica):
        existing = {
            v["name"]: v for v in await self.data.volumes.find(app_id=app["id"], replica=replica)
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

    async def _store_replica(self, app, spec, replica, placement, existing):
        host_id = placement.host_id
        now = self._clock.seconds()
        vols = []
        for v in spec["volumes"]:
            row = existing.get(v["name"])
            if row is None:
                row = {"id": _new_id("v"), "app_id": app["id"], "host_id": host_id,
                       "name": v["name"], "replica": replica, "size_mb": v["size_mb"],
                       "mount": v["mount"], "state": "creating", "created_at": now}
                await self.data.volumes.add(row)
            vols.append({"id": row["id"], "mount": v["mount"], "size_mb": row["size_mb"]})
        mid = _new_id("m")
        mspec = {
            "id": mid, "app": app["name"], "replica": replica, "image": spec["image"],
            "vcpus": spec["vcpus"], "memory_mb": spec["memory_mb"],
            "region": spec["region"], "datacenter": spec["datacenter"],
            "constraints": spec["constraints"], "volumes": vols,
            "service_port": spec["service_port"], "health": spec["health"], "app_spec": spec,
            "cloud_init": spec.get("cloud_init"),
            "network": await self.network.attach(
                mid, app["id"], host_id, hostname=f"{app['name']}-{replica}",
                open_ports=[p["guest_port"] for p in spec.get("publish") or []]),
        }
        row = {"id": mid, "app_id": app["id"], "host_id": host_id, "state": "pending",
               "spec": mspec, "health": {"status": "none"}, "created_at": now,
               "updated_at": now}
        return await self.add_machine(row, "placed", placement=placement)

    def _agent_spec(self, mspec):
        out = {k: mspec[k] for k in ("id", "app", "image", "vcpus", "memory_mb", "volumes",
                                     "service_port", "health")}
        out["cloud_init"] = mspec.get("cloud_init")
        out["network"] = mspec.get("network")
        return out

    async def start_machine(self, row):
        """
        Start the stored machine C{row} on its host (C{machine.start}) and apply the status
        its agent answers; a start that fails marks it failed (releasing its reservation).
        """
        try:
            spec = self._agent_spec(row["spec"])
            # Its own address on its host (a drain's replacement gets one of its target's).
            spec["network"] = await self.network.attach(
                row["id"], row["app_id"], row["host_id"],
                hostname=f"{spec['app']}-{row['spec'].get('replica')}",
                open_ports=[p["guest_port"] for p in
                            (row["spec"].get("app_spec") or {}).get("publish") or []])
            status = await self._call(row["host_id"], "machine.start", spec)
        except Exception as e:
            reason = getattr(e, "args", [None])[0] if isinstance(e, errors.ZwrmError) else None
            reason = reason or _error_text(e)
            await self.set_machine(row, f"could not start: {reason}", state="failed")
            return row
        await self._volumes_ready(row)
        await self._apply_status(row, status)
        return row

    async def _volumes_ready(self, row):
        for v in row["spec"]["volumes"]:
            vrow = await self.data.volumes.get(v["id"])
            if vrow is not None and vrow["state"] == "creating":
                await self.data.volumes.set_state(vrow, "ready")

    def _in_order(self, machine_id, fn, *args):
        """
        Run C{fn(*args)} after every change already under way for C{machine_id}: reports
        arrive in order, and applying them must keep it.
        """
        return _in_key_order(self._machine_locks, machine_id, fn, *args)

    async def update_machine(self, machine_id, fn):
        """
        Run C{await fn(row)} with the fresh row of C{machine_id} (L{None} if it is gone),
        in order with the machine's reports and other changes.
        """
        async def fresh():
            return await fn(await self.data.machines.get(machine_id))

        return await self._in_order(machine_id, fresh)

    def _apply_status(self, row, status):
        """Apply an executor status or report to a stored machine (in order)."""
        return self._in_order(row["id"], self._apply_fresh, row, status)

    async def _apply_fresh(self, row, status):
        fresh = await self.data.machines.get(row["id"])
        if fresh is None:
            return row
        row.update(fresh)
        return await self._apply_locked(row, status)

    async def _apply_locked(self, row, status):
        state = status.get("state")
        if state not in MACHINE_STATES:
            return row
        health = dict(row.get("health") or {})
        if status.get("health") is not None:
            health["status"] = status["health"]
        if status.get("host_port") is not None:
            health["host_port"] = status["host_port"]
        if state == row["state"] and health == row.get("health"):
            return row
        return await self.set_machine(row, status.get("reason") or state,
                                      state=state, health=health)

    # -- machines ---------------------------------------------------------------------

    @wamp.register("zwrm.machine.list")
    async def list_machines(self, app=None, host_id=None):
        """Machines, optionally of one app or on one host."""
        app_id = (await self._app(app))["id"] if app is not None else None
        rows = await self.data.machines.find(app_id=app_id, host_id=host_id,
                                             order_by="created_at")
        return [machine_wire(m) for m in rows]

    @wamp.register("zwrm.machine.status")
    async def machine_status(self, machine_id):
        """One machine with its recent events."""
        m = await self._machine(machine_id)
        view = machine_wire(m)
        view["spec"] = public_spec(self._agent_spec(m["spec"]))  # secrets: its agent only
        view["events"] = await self.data.machines.recent_events(machine_id)
        return view

    @wamp.register("zwrm.machine.logs")
    async def machine_logs(self, machine_id, max_bytes=65536):
        """The tail of a machine's serial console, from its host."""
        m = await self._machine(machine_id)
        return await self._call(m["host_id"], "machine.logs", machine_id, max_bytes=max_bytes)

    @wamp.register("zwrm.machine.destroy")
    async def destroy_machine(self, machine_id):
        """
        Destroy one machine (its app's next converge replaces it: to remove it for good,
        scale the app down). Its volumes are kept.
        """
        m = await self._machine(machine_id)
        return await self.remove_machine(m)

    async def remove_machine(self, m):
        """
        Destroy the machine of row C{m} on its host, then delete its row (one event) and
        release its reservation.  A machine that is stopped or failed on a host that cannot
        be reached loses only its row (its host stops it when it returns: reconciliation).

        @raise zwrm.errors.Unavailable: it is live on a host that cannot be reached.
        """
        if m["state"] not in ("stopped", "failed") or self._hosts.executor_available(m["host_id"]):
            try:
                await self._call(m["host_id"], "machine.destroy", m["id"])
            except errors.NotFound:
                pass  # the agent no longer knows it: it is gone
            except errors.Unavailable:
                if m["state"] in LIVE:
                    raise errors.Unavailable(
                        f"machine {m['id']} is on host {m['host_id']}, which is not reachable; "
                        "it is destroyed when the host returns") from None
        await self.data.machines.delete(m)
        self._release(m["id"])
        await self.network.release(m["id"])
        return m["id"]

    # -- reports from agents ----------------------------------------------------------

    async def machine_event(self, event=None, details=None):
        """
        An agent reports a change of one of its machines (the executor's report, which
        reaches the control plane as C{zwrm.agent.report(event)}).

        Only the agent of the machine's host may report it: C{details.caller_authid}
        must be the host the machine is recorded on.
        """
        if not isinstance(event, dict) or not isinstance(event.get("machine_id"), str):
            raise errors.InvalidArgument("a machine event needs machine_id and state")
        host_id = getattr(details, "caller_authid", None)
        return await self._in_order(event["machine_id"], self._machine_event, host_id, event)

    async def _machine_event(self, host_id, event):
        row = await self.data.machines.get(event["machine_id"])
        if row is None:
            if event.get("destroyed"):
                return None
            raise errors.NotFound(f"no machine {event['machine_id']!r}")
        if host_id is not None and row["host_id"] != host_id:
            raise errors.NotAuthorized(
                f"machine {row['id']} is recorded on {row['host_id']}, not {host_id}")
        if not event.get("destroyed"):
            await self._apply_locked(row, event)
        return None

    # -- volumes ----------------------------------------------------------------------

    @wamp.register("zwrm.volume.create")
    async def create_volume(self, app, name, size_mb, mount, replica=0,
                            region=None, datacenter=None, host_id=None):
        """
        Create a volume for replica C{replica} of C{app} before its first deploy: the
        scheduler picks its host (by disk), or C{host_id} if given; the app's machine for
        that replica is then pinned there.
        """
        a = await self._app(app)
        _check_name(name, "volume name")
        size_mb = _int({"size_mb": size_mb}, "size_mb", 2, 16 * 1024 * 1024, 64)
        if not isinstance(mount, str) or not mount.startswith("/") or mount == "/":
            raise errors.InvalidArgument(f"mount must be an absolute path other than /, not {mount!r}")
        if await self.data.volumes.find(app_id=a["id"], name=name, replica=replica):
            raise errors.Conflict(f"app {app!r} has a volume {name!r} for replica {replica}")
        # only a host with the disk is wanted: machines reserve their vCPUs and memory later
        request = placement_request({"vcpus": 1, "memory_mb": 1, "region": region,
                                     "datacenter": datacenter},
                                    pinned_host=host_id, disk_mb=size_mb)
        placement = self.scheduler.place(request)
        self.scheduler.release(placement)
        row = {"id": _new_id("v"), "app_id": a["id"], "host_id": placement.host_id,
               "name": name, "replica": replica, "size_mb": size_mb, "mount": mount,
               "state": "creating", "created_at": self._clock.seconds()}
        await self.data.volumes.add(row)
        try:
            await self._call(row["host_id"], "volume.create", row["id"], size_mb)
        except Exception as e:
            await self.data.volumes.creation_failed(row, _error_text(e))
            raise
        await self.data.volumes.set_state(row, "ready")
        return row

    @wamp.register("zwrm.volume.list")
    async def list_volumes(self, app=None):
        """Volumes, optionally of one app."""
        if app is None:
            return await self.data.volumes.find(order_by="created_at")
        a = await self._app(app)
        return await self.data.volumes.find(app_id=a["id"], order_by="name")

    @wamp.register("zwrm.volume.destroy")
    async def destroy_volume(self, volume_id):
        """
        Delete a volume and its data. @raise Conflict: while a live machine uses it.
        """
        if not isinstance(volume_id, str) or not volume_id:
            raise errors.InvalidArgument("a volume id is needed")
        row = await self.data.volumes.get(volume_id)
        if row is None:
            raise errors.NotFound(f"no volume {volume_id!r}")
        await self._destroy_volume(row)
        return row["id"]

    async def _destroy_volume(self, row):
        for m in await self.data.machines.find(app_id=row["app_id"]):
            if m["state"] in LIVE and any(v["id"] == row["id"] for v in m["spec"]["volumes"]):
                raise errors.Conflict(f"volume {row['id']} is used by machine {m['id']}")
        try:
            await self._call(row["host_id"], "volume.delete", row["id"])
        except errors.NotFound:
            pass
        await self.data.volumes.delete(row)


def _error_text(e):
    if isinstance(e, errors.ZwrmError):
        return e.message
    args = getattr(e, "args", ())
    return str(args[0]) if args else e.__class__.__name__


async def _in_key_order(locks, key, fn, *args):
    """
    Run C{fn(*args)} under the lock of C{key} in C{locks} (a dict of L{DeferredLock}s,
    made on first use and dropped when nobody waits), after every call already under way
    for C{key}.  The lock is taken before any await, so calls keep their order.
    """
    lock = locks.setdefault(key, DeferredLock())
    await lock.acquire()
    try:
        return await fn(*args)
    finally:
        lock.release()
        if not lock.locked and not lock.waiting:
            locks.pop(key, None)
