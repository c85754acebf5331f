"""
Apps, their machines and their volumes: the operator's C{zwrm.app.*}, C{zwrm.machine.*}
and C{zwrm.volume.*} procedures, and what agents report about machines.

L{Apps} is a thin facade: it registers the procedures, checks their names and looks up
their rows, and hands the work to small services, each a plain object with one job:

    - L{zwrm.control.appspec}: the spec's check and normal form, merging, the image check;
    - L{zwrm.control.placements.Placements}: the scheduler's host index (fed by host
      events) and every machine's reservation; the placement lock;
    - L{zwrm.control.replicas.Replicas}: one machine at a time: stored, started, its
      agents' reports applied in order, removed;
    - L{zwrm.control.converge.Converger}: an app's machines converged to its spec (one app
      at a time), scale, destroy, rescheduling a lost host's replicas;
    - L{zwrm.control.rollout.Rollout}: deploys and rolling updates;
    - L{zwrm.control.plan.Planner}: what a deploy would do (C{zwrm.app.plan});
    - L{zwrm.control.history.History}: spec versions and rollbacks;
    - L{zwrm.control.app_volumes.AppVolumes}: volumes made and deleted on their own.

An app is a name and a deployed spec (L{zwrm.control.appspec}).  Replica I{i} of an app
is a machine; each volume of the spec gives replica I{i} its own local volume (named
C{<name>} with C{replica} I{i}), created on the host the scheduler chose for that
replica.  From then on that volume pins the replica to its host, whatever the strategy (a
drain moves the volume, and with it the pin).  Scaling down stops and destroys the
highest replicas but keeps their volumes: nothing is deleted unless the operator asks
(C{zwrm.volume.destroy}, or C{zwrm.app.destroy} with C{volumes=True}).

Every change goes through an update method of the resource layer
(L{zwrm.control.resources}: apps, machines, volumes), which stores it, then publishes one
canonical event on C{zwrm.event.machine} (machines and volumes) or C{zwrm.event.app}.
"""

from autobahn import wamp
from twisted.internet.task import deferLater
from twisted.logger import Logger

from zwrm import errors
from zwrm.control import network
from zwrm.control.app_volumes import AppVolumes
from zwrm.control.appspec import (
    UPDATE_DEFAULTS,
    ImageCheck,
    check_name,
    merge_spec,
    new_id,
    same_version,
    validate_spec,
)
from zwrm.control.converge import Converger
from zwrm.control.history import History
from zwrm.control.placements import Placements
from zwrm.control.plan import Planner
from zwrm.control.replicas import Replicas
from zwrm.control.resources.apps import TOPIC as APP_TOPIC
from zwrm.control.resources.apps import public_spec
from zwrm.control.resources.machines import LIVE, placement_request
from zwrm.control.resources.machines import STATES as MACHINE_STATES
from zwrm.control.resources.machines import TOPIC as MACHINE_TOPIC
from zwrm.control.resources.machines import wire as machine_wire
from zwrm.control.rollout import Rollout
from zwrm.drain_phases import MIGRATION_TERMINAL
from zwrm.wamp.progress import DETAILS, CallerProgress

__all__ = ["APP_TOPIC", "MACHINE_TOPIC", "LIVE", "MACHINE_STATES", "Apps", "validate_spec",
           "placement_request", "merge_spec", "same_version", "UPDATE_DEFAULTS"]


class Apps:
    """
    The apps, machines and volumes of the cluster: their WAMP procedures, over the
    services that do the work.

    @ivar data: the L{zwrm.control.resources.Data} it works on (the host registry's).
    @ivar placements: the L{Placements} (C{scheduler}: the L{zwrm.scheduler.Scheduler}).
    @ivar replicas: the L{Replicas}.
    @ivar converger: the L{Converger}.
    @ivar rollout: the L{Rollout}.
    @ivar planner: the L{Planner}.
    @ivar spec_history: the L{History}.
    @ivar volumes: the L{AppVolumes}.
    @ivar network: the L{zwrm.control.network.ClusterNetwork} (addresses).
    @ivar network_view: the L{zwrm.control.network.ViewPublisher}.
    """

    log = Logger()

    def __init__(self, clock, store, hosts, scheduler, publish):
        """
        @param clock: an L{IReactorTime}.
        @param store: the L{zwrm.control.store.Store} (the cluster network's tables).
        @param hosts: the L{zwrm.control.registry.HostRegistry} (host states, executors,
            and the resource layer, C{hosts.data}).
        @param scheduler: a L{zwrm.scheduler.Scheduler}.
        @param publish: unused (events are published by the resource layer); kept for
            callers that pass it.
        """
        self.data = data = hosts.data
        self.network = network.ClusterNetwork(store, clock)  # addresses; docs/networking.md
        self.placements = Placements(scheduler, data)
        # A machine found running on a host that came back holds its capacity again.
        hosts.on_restored.append(self.placements.restored)
        # A machine stored pending or stopping before a restart: its agent's list says what
        # became of it.
        hosts.unconfirmed = self.placements.unconfirmed
        hosts.cut_short = self.placements.cut_short
        self.replicas = Replicas(clock, hosts, data, self.placements, self.network)
        self.network_view = network.ViewPublisher(clock, self.network, data, self.replicas.call)
        self._images = ImageCheck()
        self.volumes = AppVolumes(clock, data, self.placements, self.replicas,
                                  host_state=hosts.state,
                                  room_mb=getattr(hosts, "room_mb", None))
        hosts.on_reconciled.append(self.volumes.settle_snapshots)
        hosts.on_reconciled.append(self.volumes.settle_replicas)
        self.converger = Converger(data, self.placements, self.replicas, self.volumes)
        self.rollout = Rollout(data, self.placements, self.replicas, self.converger,
                               self._images)
        self.planner = Planner(data, self.placements, self._images)
        self.spec_history = History(data, self.rollout)
        self._clock = clock
        self._hosts = hosts
        self._destroy_told = {}  # app name -> the last reason its destroy waits, logged

    @property
    def scheduler(self):
        """The L{zwrm.scheduler.Scheduler} (its host index follows the hosts resource)."""
        return self.placements.scheduler

    @property
    def images(self):
        """The registry's C{ImageAPI} deploys are checked against (L{None}: not yet)."""
        return self._images.images

    @images.setter
    def images(self, image_api):
        self._images.images = image_api

    async def image_references(self):
        """
        The image references (C{NAME:TAG} or C{NAME@DIGEST}) of every app's spec versions
        (its current one, and those a rollback may deploy again) and every machine's spec:
        what the registry's collector keeps (L{zwrm.control.images.ImageAPI.gc}).
        """
        refs = set()
        for app in await self.data.apps.all():
            specs = [app["spec"]] + [v["spec"] for v in
                                     await self.data.apps.spec_versions(app["id"])]
            refs.update(s["image"] for s in specs
                        if isinstance(s, dict) and isinstance(s.get("image"), str))
        for m in await self.data.machines.find():
            for spec in (m["spec"], (m["spec"] or {}).get("app_spec")):
                if isinstance(spec, dict) and isinstance(spec.get("image"), str):
                    refs.add(spec["image"])
        return refs

    def sync_hosts(self):
        """Give the scheduler every known host again (at start-up only)."""
        self.placements.sync_hosts()

    async def load(self):
        """
        After a control plane start: account in the scheduler for every live machine.

        The machines of an app being destroyed that its destroy had taken out of the
        routes (C{stopping}) stay out of them (a stop cut short of another kind puts them
        back, L{zwrm.control.registry.HostRegistry.reconcile}): their destroy goes on
        (L{go_on_destroying}), waiting what is left of their shutdown_delay, and their
        agents' reports do not route them again meanwhile.

        @return: how many placements were restored.
        """
        n = await self.placements.load()
        destroying = {app["id"] for app in await self.data.apps.destroying()}
        if destroying:
            for row in await self.data.machines.find(states=("stopping",)):
                if row["app_id"] in destroying:
                    self.placements.cut_short.discard(row["id"])
                    self.replicas.kept_out(row["id"])
        return n

    async def resume_rollouts(self, wait=120.0, interval=1.0):
        """
        After a control plane start: take up every rolling update its stop interrupted
        (L{Rollout.resume}), one app at a time in the app's order.  The agents reconnect
        first: each update waits (at most C{wait} seconds, looking every C{interval}) for
        the hosts of its app's machines to be reachable, else its first steps would fail.

        @return: the names of the apps whose update was taken up.
        """
        resumed = []
        for app in await self.data.apps.all():
            if app.get("destroying"):
                continue  # its destroy goes on instead (go_on_destroying)
            last = await self.rollout.interrupted(app)
            if last is None:
                continue
            end = self._clock.seconds() + wait
            while self._clock.seconds() < end:
                hosts = {m["host_id"] for m in await self.data.machines.find(
                    app_id=app["id"], states=LIVE)}
                if all(self._hosts.executor_available(h) for h in hosts):
                    break
                await deferLater(self._clock, interval, lambda: None)

            async def take_up(row):
                if row.get("destroying"):
                    return False  # a destroy came first
                last = await self.rollout.interrupted(row)  # (a deploy may have come first)
                return last is not None and await self.rollout.resume(row, last)

            try:
                if await self._with_app(app["name"], take_up):
                    resumed.append(app["name"])
            except errors.ZwrmError as e:  # it failed (and was announced so), or went
                self.log.warn("the interrupted update of {app} ended: {e}", app=app["name"],
                              e=e.message)
                resumed.append(app["name"])
        return resumed

    async def go_on_destroying(self):
        """
        Carry on with the destroys that did not end (L{Converger.go_on}): after a control
        plane start, and after each health check (the hosts they waited for may be
        reachable now, or found offline).  Each runs in its app's order; one that can do
        nothing yet (L{Converger.can_go_on}: all it has left waits for unreachable hosts)
        is not tried, nor one with work under way or waiting in its order (its destroy
        asked again, say).

        @return: the names of the apps whose destroy ended.
        """
        ended = []
        for app in await self.data.apps.destroying():
            name = app["name"]
            if not await self.converger.can_go_on(app):
                continue
            if self.converger.busy(name):
                continue  # its destroy asked again, say: the next pass sees what it left
            try:
                result = await self._in_app_order(name, self.converger.go_on, name)
            except errors.ZwrmError as e:
                if self._destroy_told.get(name) != e.message:
                    self._destroy_told[name] = e.message
                    self.log.warn("the destroy of {app} goes on: {e}", app=name, e=e.message)
                continue
            self._destroy_told.pop(name, None)
            if result is not None:
                self.log.info("the destroy of {app} ended", app=name)
                ended.append(name)
        return ended

    # -- lookups ----------------------------------------------------------------------

    async def _app(self, name):
        check_name(name, "app name")
        return await self.data.apps.by_name(name)

    async def _machine(self, machine_id):
        if not isinstance(machine_id, str) or not machine_id:
            raise errors.InvalidArgument("a machine id is needed")
        row = await self.data.machines.get(machine_id)
        if row is None:
            raise errors.NotFound(f"no machine {machine_id!r}")
        return row

    def _in_app_order(self, name, fn, *args):
        return self.converger.in_app_order(name, fn, *args)

    async def _with_app(self, name, fn, *args):
        """C{fn(app_row, *args)} with the app called C{name}, in the app's order."""
        async def run():
            return await fn(await self._app(name), *args)

        return await self._in_app_order(name, run)

    async def _changing_app(self, name, fn, *args):
        """
        As L{_with_app}, for a change of its spec (a deploy, scale or rollback).

        @raise zwrm.errors.Conflict: the app is being destroyed (at once: it need not wait
            for the destroy's turn, nor the destroy for its); or it was destroyed, and
            another made under its name, while the change waited its turn (the change was
            asked of the app that was, not of the new one).
        """
        def refuse(app):
            if app.get("destroying"):
                raise errors.Conflict(f"app {name!r} is being destroyed: once it is gone,"
                                      " create it again")

        async def run(app):
            refuse(app)  # (a destroy may have come first)
            if app["id"] != asked["id"]:
                raise errors.Conflict(
                    f"app {name!r} was destroyed, and made again, while this change waited"
                    " its turn: nothing was changed (ask again for the new app)")
            return await fn(app, *args)

        asked = await self._app(name)
        refuse(asked)
        return await self._with_app(name, run)

    # -- apps -------------------------------------------------------------------------

    @wamp.register("zwrm.app.create")
    async def create_app(self, name):
        """Create an empty app. @raise Conflict: if the name is taken."""
        check_name(name, "app name")
        if await self.data.apps.exists(name):
            raise errors.Conflict(f"app {name!r} exists")
        row = {"id": new_id("a"), "name": name, "spec": None, "created_at": self._clock.seconds()}
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
                        "replicas": spec.get("replicas", 0), "machines": counts,
                        "destroying": a.get("destroying") is not None})
        return out

    @wamp.register("zwrm.app.status")
    async def app_status(self, name):
        """
        An app's spec (and its C{spec_version}), machines and volumes, its last rolling
        update's C{rollout} (C{{state, version, replaced, total, reason, at}}, or L{None}),
        and its volumes' C{snapshot_schedule} (as C{zwrm.volume.schedules} lists it, or
        L{None}).
        """
        app = await self._app(name)
        machines = await self.data.machines.find(app_id=app["id"], order_by="created_at")
        volumes = await self.data.volumes.find(app_id=app["id"], order_by="name")
        last = await self.data.apps.last_rollout(app)
        rollout = None if last is None else {
            k: last.get(k) for k in ("state", "version", "replaced", "total", "reason", "at")}
        schedule = await self.data.volumes.get_schedule(app["id"])
        if schedule is not None:
            schedule = dict(schedule, app=app["name"], replicate=bool(schedule["replicate"]))
        return {"id": app["id"], "name": app["name"], "spec": public_spec(app["spec"]),
                "spec_version": app.get("spec_version") or 0,
                "destroying": app.get("destroying"),
                "machines": [machine_wire(m) for m in machines],
                "volumes": volumes, "rollout": rollout, "snapshot_schedule": schedule}

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
        check_name(name, "app name")
        app = await self._app(name)
        if self.rollout.updating(app["id"]):
            # A new version supersedes the update under way (checked first: a spec with a
            # typo stops nothing); the same version again just waits for it.
            checked = await self.rollout.check(app, spec)
            if not same_version(checked, app["spec"]):
                self.rollout.supersede(app["id"], "a later deploy")
        await self._changing_app(name, self.rollout.deploy, spec)
        return await self.app_status(name)

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
        check_name(name, "app name")
        return await self._changing_app(name, self.planner.plan, spec)

    @wamp.register("zwrm.app.history")
    async def history(self, name):
        """
        Every spec version of an app, oldest first: C{[{version, spec, created_at,
        current}]} (specs without their secrets).
        """
        return await self.spec_history.versions(await self._app(name))

    @wamp.register("zwrm.app.rollback")
    async def rollback(self, name, version=None):
        """
        Deploy spec version C{version} of an app again (default: the one before the
        current one), as a new version; checked and converged as any deploy.

        @raise zwrm.errors.NotFound: no such app or version.
        """
        check_name(name, "app name")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)
                                    or version < 1):
            raise errors.InvalidArgument(f"version must be a spec version (1 or more), not {version!r}")
        app = await self._app(name)
        if self.rollout.updating(app["id"]):
            # the operator's way out of a bad update: it need not wait out its deadline
            await self.spec_history.spec_of(app, version)  # (no such version: NotFound)
            self.rollout.supersede(app["id"], "a rollback")
        await self._changing_app(name, self.spec_history.rollback, version)
        return await self.app_status(name)

    @wamp.register("zwrm.app.scale")
    async def scale(self, name, replicas):
        """
        Change an app's replica count and converge. @raise InvalidArgument, NotFound.
        @raise zwrm.errors.Unplaceable: a replica fits nowhere; nothing was changed.
        """
        if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= 1000:
            raise errors.InvalidArgument(f"replicas must be from 0 to 1000, not {replicas!r}")
        check_name(name, "app name")
        await self._changing_app(name, self.converger.scale, replicas)
        return await self.app_status(name)

    @wamp.register("zwrm.app.destroy")
    async def destroy_app(self, name, volumes=False):
        """
        Destroy every machine of an app and the app; its volumes too only if C{volumes}.
        The destroy is stored first and carried out to its end: a stop of the control
        plane, or a host that cannot be reached, only delays it (L{go_on_destroying}).
        Asked again while under way, it goes on with the C{volumes} given last (and a call
        whose turn comes after the app is gone has nothing left to do).

        @return: C{{"machines": [...], "volumes": [...]}} destroyed.
        @raise zwrm.errors.Unavailable: what is on a host that cannot be reached is
            removed once it can be (or is found offline); the rest was.
        """
        check_name(name, "app name")
        asked = await self._app(name)
        self.rollout.supersede(asked["id"], "the app's destroy")

        async def run():
            try:
                app = await self._app(name)
            except errors.NotFound:
                app = None
            if app is None or app["id"] != asked["id"]:
                # An earlier destroy (asked again, say) ended it in the meantime; an app
                # made since under the same name is another one, not this call's.
                return {"machines": [], "volumes": []}
            return await self.converger.destroy(app, volumes)

        return await self._in_app_order(name, run)

    # -- machines ---------------------------------------------------------------------

    @wamp.register("zwrm.machine.list")
    async def list_machines(self, app=None, host_id=None):
        """Machines, optionally of one app or on one host."""
        app_id = (await self._app(app))["id"] if app is not None else None
        rows = await self.data.machines.find(app_id=app_id, host_id=host_id,
                                             order_by="created_at")
        if not rows and host_id is not None and self.data.hosts.get(host_id) is None:
            # (a removed host's machines still listed are its own: a typo is not)
            raise errors.NotFound(f"no host {host_id!r}", argument="host_id")
        return [machine_wire(m) for m in rows]

    @wamp.register("zwrm.machine.status")
    async def machine_status(self, machine_id):
        """One machine with its recent events."""
        m = await self._machine(machine_id)
        view = machine_wire(m)
        view["spec"] = public_spec(self.replicas.agent_spec(m["spec"]))  # secrets: its agent only
        view["events"] = await self.data.machines.recent_events(machine_id)
        return view

    @wamp.register("zwrm.machine.logs")
    async def machine_logs(self, machine_id, max_bytes=65536):
        """The tail of a machine's serial console, from its host."""
        m = await self._machine(machine_id)
        return await self.replicas.call(m["host_id"], "machine.logs", machine_id, max_bytes=max_bytes)

    @wamp.register("zwrm.machine.destroy")
    async def destroy_machine(self, machine_id):
        """
        Destroy one machine (its app's next converge replaces it: to remove it for good,
        scale the app down). Its volumes are kept.
        """
        m = await self._machine(machine_id)
        # A planned stop: out of the routes, the app's shutdown_delay, then removed.
        await self.replicas.retire([m], await self.replicas.delay_for(m))
        return m["id"]

    @wamp.register("zwrm.machine.restart")
    async def restart_machine(self, machine_id):
        """
        Restart one machine in place: the same id on the same host, its volumes and root
        overlay kept.  A planned stop (out of the routes, the app's C{shutdown_delay}), a
        graceful stop through its agent, then a start of the same spec there; in the
        app's order (after its deploys, scales and destroys under way).  A stopped or
        failed machine is only started.

        @return: the machine's wire form after its start.
        @raise zwrm.errors.NotFound: no such machine (C{machine_id}).
        @raise zwrm.errors.Conflict: its host is offline or draining, a drain is moving
            it, or it is being started or stopped; nothing changed.
        @raise zwrm.errors.Unavailable: it stopped but could not start again (it is
            C{failed}, with the reason).
        """
        row = await self._restartable(machine_id)
        app = await self.data.apps.by_id(row["app_id"])

        async def run():
            fresh = await self._restartable(machine_id)  # checked again in the app's order
            return await self.replicas.restart(fresh, await self.replicas.delay_for(fresh),
                                               before_start=self._still_not_moving)

        row = await self._in_app_order(app["name"] if app else row["app_id"], run)
        if row["state"] == "failed":
            raise errors.Unavailable(
                f"machine {machine_id} stopped but did not start again on {row['host_id']}: "
                f"{await self._last_reason(machine_id)}")
        return machine_wire(row)

    async def _restartable(self, machine_id):
        """The row of C{machine_id} if it may be restarted now (L{restart_machine})."""
        if not isinstance(machine_id, str) or not machine_id:
            raise errors.InvalidArgument("machine_id: a machine id is needed",
                                         argument="machine_id")
        row = await self.data.machines.get(machine_id)
        if row is None:
            raise errors.NotFound(f"machine_id: no machine {machine_id!r}", argument="machine_id")
        await self._not_moving(row)
        if row["state"] not in ("running", "stopped", "failed"):
            raise errors.Conflict(f"machine {machine_id} is {row['state']}; restart it once"
                                  " it runs", argument="machine_id")
        return row

    def _still_not_moving(self, row):
        return self._not_moving(row, "it is stopped and was not started again")

    async def _not_moving(self, row, outcome="not restarted"):
        """
        Refuse to restart the machine C{row} while its host is offline or draining, or a
        drain moves it (checked before it stops, and again before it starts: a drain that
        began meanwhile moves it, so it stays stopped; never two copies).
        """
        machine_id, host = row["id"], row["host_id"]
        if host not in self._hosts or not self.replicas.executor_available(host):
            raise errors.Conflict(f"machine {machine_id} is on host {host}, which is offline;"
                                  f" {outcome}", argument="machine_id")
        if self._hosts.state(host) == "draining":
            raise errors.Conflict(f"machine {machine_id} is on host {host}, which is being"
                                  f" drained; {outcome}", argument="machine_id")
        for drain in await self.data.drains.find(states=("running", "cancelling")):
            for m in await self.data.drains.migrations(drain["id"]):
                if m["phase"] in MIGRATION_TERMINAL:
                    continue
                if machine_id in (m["machine_id"], (m.get("detail") or {}).get("replacement")):
                    raise errors.Conflict(
                        f"machine {machine_id} is being moved by the drain of host"
                        f" {drain['host_id']}; {outcome}", argument="machine_id")

    async def _last_reason(self, machine_id):
        for e in await self.data.machines.recent_events(machine_id):  # newest first
            reason = (e.get("payload") or {}).get("reason")
            if reason:
                return reason
        return "no reason given"

    # -- reports from agents ----------------------------------------------------------

    async def machine_event(self, event=None, details=None):
        """
        An agent reports a change of one of its machines (the executor's report, which
        reaches the control plane as C{zwrm.agent.report(event)}).

        Only the agent of the machine's host may report it: C{details.caller_authid}
        must be the host the machine is recorded on.
        """
        return await self.replicas.machine_event(getattr(details, "caller_authid", None), event)

    # -- volumes ----------------------------------------------------------------------

    @wamp.register("zwrm.volume.create")
    async def create_volume(self, app, name, size_mb, mount, replica=0,
                            region=None, datacenter=None, host_id=None):
        """
        Create a volume for replica C{replica} of C{app} before its first deploy: the
        scheduler picks its host (by disk), or C{host_id} if given; the app's machine for
        that replica is then pinned there.
        """
        return await self.volumes.create(await self._app(app), name, size_mb, mount,
                                         replica=replica, region=region,
                                         datacenter=datacenter, host_id=host_id)

    @wamp.register("zwrm.volume.list")
    async def list_volumes(self, app=None):
        """Volumes, optionally of one app; each with its C{app}'s name."""
        if app is None:
            names = {a["id"]: a["name"] for a in await self.data.apps.all()}
            rows = await self.data.volumes.find(order_by="created_at")
            return [{**v, "app": names.get(v["app_id"])} for v in rows]
        a = await self._app(app)
        return [{**v, "app": a["name"]}
                for v in await self.data.volumes.find(app_id=a["id"], order_by="name")]

    @wamp.register("zwrm.volume.destroy")
    async def destroy_volume(self, volume_id):
        """
        Delete a volume and its data. @raise Conflict: while a live machine uses it.
        """
        row = await self._volume(volume_id)
        await self.volumes.destroy(row)
        return row["id"]

    async def _volume(self, volume_id):
        if not isinstance(volume_id, str) or not volume_id:
            raise errors.InvalidArgument("a volume id is needed", argument="volume_id")
        row = await self.data.volumes.get(volume_id)
        if row is None:
            raise errors.NotFound(f"no volume {volume_id!r}", argument="volume_id")
        return row

    async def _snapshot(self, volume, snapshot):
        """The row of C{volume}'s snapshot named, or with the id, C{snapshot}."""
        if not isinstance(snapshot, str) or not snapshot:
            raise errors.InvalidArgument("a snapshot (its name or id) is needed",
                                         argument="snapshot")
        for row in await self.data.volumes.find_snapshots(volume_id=volume["id"]):
            if snapshot in (row["id"], row["name"]):
                return row
        raise errors.NotFound(f"volume {volume['id']} has no snapshot {snapshot!r}",
                              argument="snapshot")

    @wamp.register("zwrm.volume.snapshot", options=DETAILS)
    async def snapshot_volume(self, volume_id, name=None, keep=None, details=None):
        """
        Snapshot a volume on its host: while its machine runs (a point in time) or not;
        with C{keep}, then delete its oldest snapshots until C{keep} are left. A caller
        that asks for progressive results gets one every few seconds while it copies
        (L{zwrm.wamp.progress}).
        """
        volume = await self._volume(volume_id)
        with CallerProgress(self._clock, details):
            return await self.volumes.snapshot(volume, name, keep=keep)

    @wamp.register("zwrm.volume.snapshots")
    async def list_snapshots(self, volume_id=None, app=None):
        """Snapshots, of one volume or of one app's volumes, or all, oldest first."""
        if volume_id is not None:
            return await self.data.volumes.find_snapshots(
                volume_id=(await self._volume(volume_id))["id"])
        if app is not None:
            return await self.data.volumes.find_snapshots(app_id=(await self._app(app))["id"])
        return await self.data.volumes.find_snapshots()

    @wamp.register("zwrm.volume.restore", options=DETAILS)
    async def restore_volume(self, volume_id, snapshot, restart=False, details=None):
        """
        Put a snapshot's data back into its volume while no machine runs with it; what the
        volume held is kept as snapshot C{before-restore-<time>}.

        @param restart: if the volume's machine runs, restart it in place around the
            restore (as C{zwrm.machine.restart}: out of the routes, the app's
            C{shutdown_delay}, a graceful stop; the restore; the same machine started
            again). A restore that fails then leaves the volume as it was and the machine
            is started again all the same.
        @return: C{{volume, snapshot, kept}}, with C{machine} (its wire form after its
            start) when it was restarted.  (Progressive results: as C{zwrm.volume.snapshot}.)
        """
        with CallerProgress(self._clock, details):
            return await self._restore_volume(volume_id, snapshot, restart)

    async def _restore_volume(self, volume_id, snapshot, restart):
        if not isinstance(restart, bool):
            raise errors.InvalidArgument(f"restart must be true or false, not {restart!r}",
                                         argument="restart")
        volume = await self._volume(volume_id)
        snap = await self._snapshot(volume, snapshot)
        user = await self.volumes.live_user(volume) if restart else None
        if user is None:
            return await self.volumes.restore(volume, snap)
        app = await self.data.apps.by_id(user["app_id"])
        done, failed = {}, []

        async def restore_while_down(row):
            await self._still_not_moving(row)  # (a drain that began meanwhile moves it)
            try:
                done.update(await self.volumes.restore(volume, snap))
            except errors.ZwrmError as e:
                failed.append(e)  # nothing changed: it starts again as it was

        async def run():
            fresh = await self._restartable(user["id"])  # checked again in the app's order
            return await self.replicas.restart(fresh, await self.replicas.delay_for(fresh),
                                               before_start=restore_while_down)

        row = await self._in_app_order(app["name"] if app else user["app_id"], run)
        if failed:
            raise failed[0]
        if row["state"] == "failed":
            raise errors.Unavailable(
                f"volume {volume['id']} was restored, but machine {row['id']} did not start "
                f"again on {row['host_id']}: {await self._last_reason(row['id'])}")
        return dict(done, machine=machine_wire(row))

    @wamp.register("zwrm.volume.replicate", options=DETAILS)
    async def replicate_volume(self, volume_id, snapshot, host_id=None, keep=None,
                               details=None):
        """
        Copy one of a volume's snapshots to another host (L{None}: the host of its newest
        replica, else one the scheduler picks), as a replica from which the volume is
        recovered if its host is lost (C{zwrm.host.remove} with C{recover_volumes}); with
        C{keep}, then delete the volume's oldest replicas on that host until C{keep} are
        left.  A caller that asks for progressive results gets the copy's (C{sent},
        C{done}, C{total} bytes) as the sending agent announces it, and one every few
        seconds in any case (L{zwrm.wamp.progress}).
        """
        volume = await self._volume(volume_id)
        snap = await self._snapshot(volume, snapshot)
        with CallerProgress(self._clock, details) as progress:
            return await self.volumes.replicate(volume, snap, host_id, keep=keep,
                                                progress=progress.report)

    @wamp.register("zwrm.volume.replicas")
    async def list_replicas(self, volume_id=None, app=None):
        """Replicas, of one volume or of one app's volumes, or all; oldest data first."""
        if volume_id is not None:
            return await self.data.volumes.find_replicas(
                volume_id=(await self._volume(volume_id))["id"])
        if app is not None:
            return await self.data.volumes.find_replicas(app_id=(await self._app(app))["id"])
        return await self.data.volumes.find_replicas()

    @wamp.register("zwrm.volume.delete_replica")
    async def delete_replica(self, volume_id, replica):
        """Delete one replica of a volume and its data on its host."""
        volume = await self._volume(volume_id)
        if not isinstance(replica, str) or not replica:
            raise errors.InvalidArgument("a replica id is needed", argument="replica")
        row = await self.data.volumes.get_replica(replica)
        if row is None or row["volume_id"] != volume["id"]:
            raise errors.NotFound(f"volume {volume['id']} has no replica {replica!r}",
                                  argument="replica")
        await self.volumes.delete_replica(volume, row)
        return row["id"]

    @wamp.register("zwrm.volume.delete_snapshot")
    async def delete_snapshot(self, volume_id, snapshot):
        """Delete one snapshot of a volume and its data."""
        volume = await self._volume(volume_id)
        row = await self._snapshot(volume, snapshot)
        await self.volumes.delete_snapshot(volume, row)
        return row["id"]
