"""
The host registry: host membership as a service over the resource layer.

Joins, registrations, heartbeats, operator transitions, marking hosts offline and
reconciling what a returning agent runs.  It writes nothing itself: every change goes
through an update method of the hosts resource (L{zwrm.control.resources.hosts}) or the
machines resource (L{zwrm.control.resources.machines}), which stores it, then publishes
one event (C{zwrm.event.host}, C{zwrm.event.machine}).

Heartbeats: at 10,000 hosts and a 5 s interval the control plane receives 2,000
heartbeats a second.  A heartbeat only updates the host's entry in memory; the
registry writes the changed last-heartbeat times to SQLite in one transaction every
C{flush_interval} seconds (L{HostRegistry.flush_heartbeats}).  A crash loses at most
that many seconds of heartbeat times, which the restart grace period covers: after a
restart the monitor counts every host's heartbeat age from the restart, not from the
stored time.
"""

import re
import secrets
from collections import OrderedDict

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from zwrm import errors
from zwrm.control.appspec import error_text
from zwrm.control.host import INPUTS
from zwrm.control.resources import Data
from zwrm.control.resources.hosts import DISK_FULL_MB, HostEntry
from zwrm.control.resources.hosts import TOPIC as HOST_TOPIC
from zwrm.control.resources.hosts import wire as host_wire
from zwrm.control.resources.machines import TOPIC as MACHINE_TOPIC
from zwrm.control.resources.machines import reported_health
from zwrm.control.resources.machines import wire as machine_wire
from zwrm.hostid import current_host_id, new_host_id

__all__ = ["HOST_TOPIC", "MACHINE_TOPIC", "HostEntry", "HostRegistry"]
LIVE_MACHINE_STATES = ("running", "starting")
# recorded states in which a machine may rightly be running on its host: also "pending"
# (its start call may be under way: the apps layer starts machines outside its placement
# lock) and "stopping"
MAY_RUN_STATES = ("pending", "starting", "running", "stopping")
"""Machine states that mean "should be running on its host now"."""

FACT_FIELDS = ("name", "region", "datacenter", "address", "vcpus", "memory_mb", "disk_mb")


RESERVED = ("join", "operator", "viewer", "control")
"""authids that are never host ids."""


def valid_host_id(host_id):
    """
    Whether C{host_id} is an id a host may join with: 1 to 64 letters, digits, C{-} or
    C{_} (new agents make strict ones, L{zwrm.hostid.new_host_id}; an older agent's
    C{h-<16 hex>} is admitted as C{h_<16 hex>}, L{zwrm.hostid.current_host_id}).
    """
    return (
        isinstance(host_id, str)
        and 1 <= len(host_id) <= 64
        and all(c.isalnum() or c in "-_" for c in host_id)
    )


_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}\Z")
#: The longest C{fence_after} an agent may report (a day).
MAX_FENCE_AFTER = 86400


def _check_facts(facts):
    if not isinstance(facts, dict):
        raise errors.InvalidArgument("host facts must be a mapping")
    for key in ("vcpus", "memory_mb", "disk_mb"):
        if key in facts and (not isinstance(facts[key], int) or facts[key] < 0):
            raise errors.InvalidArgument(f"host fact {key} must be a non-negative integer")
    for key in ("name", "region", "datacenter", "address", "agent_version"):
        if key in facts and not isinstance(facts[key], str):
            raise errors.InvalidArgument(f"host fact {key} must be a string")
    if "fence_after" in facts and (not isinstance(facts["fence_after"], int | float)
                                   or isinstance(facts["fence_after"], bool)
                                   or not 0 <= facts["fence_after"] <= MAX_FENCE_AFTER):
        raise errors.InvalidArgument(f"host fact fence_after must be seconds from 0 to "
                                     f"{MAX_FENCE_AFTER}")
    if "labels" in facts and not isinstance(facts["labels"], dict):
        raise errors.InvalidArgument("host fact labels must be a mapping")
    if "machines" in facts and not isinstance(facts["machines"], list):
        raise errors.InvalidArgument("host fact machines must be a list")
    if "network" in facts:
        held = facts["network"]
        # (other keys are a later agent's: ignored)
        if not (isinstance(held, dict) and {"hosts_serial", "hosts_digest"} <= set(held)
                and isinstance(held["hosts_serial"], int)
                and not isinstance(held["hosts_serial"], bool)
                and isinstance(held["hosts_digest"], str)
                and _HEX_DIGEST.match(held["hosts_digest"])):
            raise errors.InvalidArgument(
                "host fact network must be a mapping {hosts_serial: integer,"
                " hosts_digest: 64 hex digits}")


MAX_STATS = 16
"""How many top-level entries of an agent's heartbeat stats are kept (in memory only)."""


def _bounded_stats(stats):
    """
    What the registry keeps of a heartbeat's C{stats}: at most L{MAX_STATS} entries whose
    values are numbers, strings or flat mappings of them (e.g. C{image_cache}).
    """
    def plain(v):
        return isinstance(v, (int, float, str, bool)) or v is None

    kept = {}
    for k, v in list(stats.items())[:MAX_STATS]:
        if not isinstance(k, str):
            continue
        if plain(v):
            kept[k] = v
        elif isinstance(v, dict):
            kept[k] = {ik: iv for ik, iv in list(v.items())[:MAX_STATS]
                       if isinstance(ik, str) and plain(iv)}
    return kept


class HostRegistry:
    """
    The control plane's hosts.

    @ivar heartbeat_interval: the interval agents are told to heartbeat at (seconds).
    """

    log = Logger()

    def __init__(self, clock, store, publish, call=None, heartbeat_interval=5.0,
                 on_offline=None, data=None, min_free_disk_mb=DISK_FULL_MB):
        """
        @param clock: an L{IReactorTime}; its C{seconds()} is the time of every record.
        @param store: a L{zwrm.control.store.Store}.
        @param publish: C{publish(topic, payload)}, called after each stored change.
        @param call: C{call(procedure, *args, **kwargs) -> Deferred}, to call agents'
            executor procedures; L{None} when there is no WAMP session (tests).
        @param heartbeat_interval: what agents are told.
        @param on_offline: called with a host id after it was marked offline, if it had
            registered since the control plane started (the control plane uses it to
            drop the host's WAMP session).
        @param data: the L{zwrm.control.resources.Data} to work on (default: a new one
            over C{store} that publishes with C{publish}).
        @param min_free_disk_mb: a host whose heartbeats report less free on its data disk
            (C{disk_free_mb}) gets no new placements; 0: never.
        """
        self._clock = clock
        self._store = store
        self._publish = publish
        self._call = call
        self._on_offline = on_offline
        #: when this registry began: no heartbeat before it is known (L{silent_for})
        self.started_at = clock.seconds()
        self.heartbeat_interval = heartbeat_interval
        self.min_free_disk_mb = min_free_disk_mb
        self.data = data if data is not None else Data(
            clock, store, lambda topic, event: self._publish(topic, event))
        self.hosts = self.data.hosts
        self.machines = self.data.machines
        self._sessions = {}  # WAMP session id -> the host whose agent registered from it
        self._left = []  # hosts whose agents' sessions ended, to deregister (session_left)
        self._stopped = False  # (stop)
        #: hosts that joined as new hosts (no record before) and were not reconciled since
        #: (L{zwrm.control.unrecorded.Unrecorded} looks at what they kept of a life before)
        self.joined_anew = set()
        self._left_done = None  # fires once they are
        # WAMP session id -> clock time it ended, for ENDED_MEMORY s: a registration whose
        # session ended before (or while) it was stored is deregistered at once
        self._ended = OrderedDict()
        #: Called with the row of each machine L{reconcile} found running on its host: again
        #: on a host that came back, or stored pending before a restart (L{unconfirmed}).
        #: The placements hold its capacity there.
        self.on_restored = []
        #: Ids of the machines found C{pending} at the control plane's start (the
        #: placements' set, L{zwrm.control.placements.Placements.unconfirmed}): whether
        #: their start reached their host is told by its agent's list (L{reconcile}).
        self.unconfirmed = set()
        #: Ids of the machines found C{stopping} at the control plane's start
        #: (L{zwrm.control.placements.Placements.cut_short}): settled by L{reconcile} on a
        #: ready host.
        self.cut_short = set()
        #: Called with the row of each of those L{reconcile} failed (its agent does not run
        #: it): the healer decides on it as on an exit (its stop was not one it counts).
        self.on_cut_short = []
        #: Called (C{await callback(host_id)}) once a host that registered is reconciled:
        #: what a control plane that stopped meanwhile left half-way there is settled
        #: (L{zwrm.control.app_volumes.AppVolumes.settle_snapshots}).
        self.on_reconciled = []

    # -- loading and persistence -----------------------------------------------------

    def load(self):
        """Read every host from the store; executors start deregistered."""
        return self.hosts.load()

    def flush_heartbeats(self):
        """
        Write the heartbeat times that changed since the last flush, in one transaction.

        @return: a Deferred firing when they are stored.
        """
        return self.hosts.flush_heartbeats()

    # -- queries ----------------------------------------------------------------------

    def __contains__(self, host_id):
        return host_id in self.hosts

    def __len__(self):
        return len(self.hosts)

    def host_ids(self):
        """Every known host id."""
        return self.hosts.ids()

    def entry(self, host_id):
        """
        The L{HostEntry} of C{host_id}.

        @raise zwrm.errors.NotFound: if there is no such host.
        """
        return self.hosts.entry(host_id)

    def state(self, host_id):
        """The public state of C{host_id}."""
        return self.entry(host_id).machine.state

    def last_heartbeat(self, host_id):
        """The clock time of C{host_id}'s last heartbeat."""
        return self.entry(host_id).last_heartbeat

    def credential_hash(self, host_id):
        """The stored hash of C{host_id}'s credential, or L{None} if no such host."""
        entry = self.hosts.get(host_id)
        return entry.record.get("credential_hash") if entry else None

    def executor_available(self, host_id):
        """Whether the control plane may call C{host_id}'s executor now."""
        entry = self.hosts.get(host_id)
        return bool(entry and entry.executor and entry.machine.state != "offline")

    def call_executor(self, host_id, verb, *args, **kwargs):
        """
        Call C{zwrm.agent.<host_id>.<verb>}.

        @raise zwrm.errors.Unavailable: (as a failed Deferred) if the host is offline or
            its executor is not registered.
        """
        if not self.executor_available(host_id) or self._call is None:
            return fail(errors.Unavailable(f"host {host_id} is not available"))
        return self._call(f"zwrm.agent.{host_id}.{verb}", *args, **kwargs)

    def _summary(self, entry, now, machine_counts):
        """The host's wire form with its machine count and heartbeat (C{zwrm.host.list})."""
        last = entry.last_heartbeat
        return dict(
            host_wire(entry),
            machines=machine_counts.get(entry.record["id"], 0),
            last_heartbeat=last,
            heartbeat_age=(now - last) if last is not None else None,
        )

    async def list(self):
        """Every host, summarised (as C{zwrm.host.list} returns them), sorted by name."""
        counts = await self.machines.count_by_host()
        now = self._clock.seconds()
        hosts = [self._summary(e, now, counts) for e in self.hosts.entries()]
        return sorted(hosts, key=lambda h: (h["name"] or "", h["id"]))

    async def status(self, host_id, events=20):
        """Everything known about one host, with its machines and recent events."""
        entry = self.entry(host_id)
        machines = await self.machines.find(host_id=host_id, order_by="id")
        result = self._summary(entry, self._clock.seconds(), {host_id: len(machines)})
        result["machine_list"] = [machine_wire(m) for m in machines]
        result["stats"] = entry.stats
        result["disk_full"] = entry.disk_full  # its heartbeats' disk_free_mb: no placements
        result["events"] = await self._store.recent_events(host_id, events)
        return result

    # -- membership -------------------------------------------------------------------

    async def join(self, host_id, facts, credential=None):
        """
        Admit a host (new, or an existing one whose agent lost its credential).

        @param host_id: the id the agent chose, or L{None} to have one assigned.
        @param facts: what the agent reports (see L{register}).
        @param credential: the credential to issue (default: a fresh random one).
        @return: C{{"host_id", "credential", "heartbeat_interval"}}.
        """
        _check_facts(facts)
        if host_id is None:
            host_id = new_host_id()
        elif not valid_host_id(host_id) or host_id in RESERVED:
            raise errors.InvalidArgument(
                "a host id is 1 to 64 letters, digits, '-' or '_'"
            )
        else:
            host_id = current_host_id(host_id)  # an older agent's h-<hex> joins as h_<hex>
        credential = credential or secrets.token_urlsafe(32)
        from zwrm.control.store import hash_secret

        now = self._clock.seconds()
        if host_id not in self.hosts:
            record = {
                "id": host_id,
                "name": facts.get("name") or host_id,
                "region": facts.get("region", ""),
                "datacenter": facts.get("datacenter", ""),
                "address": facts.get("address", ""),
                "labels": facts.get("labels", {}),
                "vcpus": facts.get("vcpus", 0),
                "memory_mb": facts.get("memory_mb", 0),
                "disk_mb": facts.get("disk_mb", 0),
                "alloc_vcpus": 0,
                "alloc_memory_mb": 0,
                "alloc_disk_mb": 0,
                "state": "ready",
                "state_before_offline": None,
                "last_heartbeat": now,
                "agent_version": facts.get("agent_version", ""),
                "fence_after": float(facts.get("fence_after") or 0),
                "credential_hash": hash_secret(credential),
                "joined_at": now,
            }
            await self.hosts.add(record)
            self.joined_anew.add(host_id)
            self.log.info("host {host_id} ({name}) joined", host_id=host_id, name=record["name"])
        else:
            await self.hosts.set_credential(host_id, hash_secret(credential))
            self.log.info("host {host_id} joined again; new credential", host_id=host_id)
        return {
            "host_id": host_id,
            "credential": credential,
            "heartbeat_interval": self.heartbeat_interval,
        }

    async def register(self, host_id, facts, session_id=None):
        """
        The agent of C{host_id} connected with its credential and reports its facts.

        Its executor becomes callable; if the host was offline it returns to the state
        it had; what it runs is reconciled with what the store recorded.

        @param facts: a mapping with any of C{name, region, datacenter, address, labels,
            vcpus, memory_mb, disk_mb, agent_version} and optionally C{machines}
            (C{[{"id", "state"}, ...]}, what the agent runs).
        @param session_id: the WAMP session it registered from (the call's disclosed
            caller), if known: when that session ends (L{session_left}) its executor may no
            longer be called.
        @return: C{{"host_id", "state", "heartbeat_interval"}}.
        """
        _check_facts(facts)
        entry = self.entry(host_id)
        if session_id is not None:
            self._sessions.pop(entry.session_id, None)
            entry.session_id = session_id
            self._sessions[session_id] = host_id
        update = {k: facts[k] for k in FACT_FIELDS if facts.get(k) not in (None, "")}
        if "labels" in facts:
            update["labels"] = facts["labels"]
        if "agent_version" in facts:
            update["agent_version"] = facts["agent_version"]
        if "fence_after" in facts:  # (an agent from before fencing sends none)
            update["fence_after"] = float(facts["fence_after"])
        # The hosts list its agent holds (this session's first network view may say it is
        # current instead of sending it); kept in memory only, taken by that view.
        held = facts.get("network")
        entry.network_held = ({"hosts_serial": held["hosts_serial"],
                               "hosts_digest": held["hosts_digest"]} if held else None)
        entry.sessions += 1
        await self.hosts.registered(host_id, update)
        if session_id is not None and session_id in self._ended \
                and entry.session_id in (session_id, None):
            # Its session ended before this registration was in (the end came first, or
            # while the registration was stored): not callable after all.
            self._sessions.pop(session_id, None)
            entry.session_id = None
            self._note_left(host_id)
        self._clock.callLater(0, self._reconcile_soon, host_id, facts.get("machines"))
        return {
            "host_id": host_id,
            "state": entry.machine.state,
            "heartbeat_interval": self.heartbeat_interval,
        }

    LEFT_CHUNK = 50
    """Hosts whose sessions ended that are deregistered in one turn of the reactor."""

    ENDED_MEMORY = 60.0
    """Seconds for which an ended session's id is remembered (L{register})."""

    def session_left(self, session_id):
        """
        A WAMP session ended (the router's C{wamp.session.on_leave}).  If a host's agent
        registered from it, and has not registered again since, that host's executor may no
        longer be called: nothing is placed there and nothing is called on it until its
        agent registers again (its state stays until the health monitor calls it offline).

        Cheap: it notes the host, and the deregistrations (each stored, then announced) run
        L{LEFT_CHUNK} at a time, one turn of the reactor after another, so that 10,000
        sessions ending at once do not stop the reactor (L{sessions_noted}).
        """
        now = self._clock.seconds()
        ended = self._ended
        while ended:  # forget the old ones, oldest first (each in O(1))
            sid = next(iter(ended))
            if now - ended[sid] <= self.ENDED_MEMORY:
                break
            del ended[sid]
        ended[session_id] = now
        host_id = self._sessions.pop(session_id, None)  # (a later registration took it out)
        entry = self.hosts.get(host_id) if host_id is not None else None
        if entry is None:
            return
        entry.session_id = None
        self._note_left(host_id)

    def _note_left(self, host_id):
        self._left.append(host_id)
        if self._left_done is None:
            self._left_done = Deferred()
            self._clock.callLater(0, self._deregister_left)

    def sessions_noted(self):
        """A Deferred firing once the hosts of every session ended so far are deregistered."""
        if self._left_done is None:
            return succeed(None)
        d = Deferred()
        self._left_done.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    def _deregister_left(self):
        batch, self._left = self._left[:self.LEFT_CHUNK], self._left[self.LEFT_CHUNK:]
        d = DeferredList([self._deferred(self._deregister(h)) for h in batch])

        def next_chunk(_):
            if self._left:
                self._clock.callLater(0, self._deregister_left)
            else:
                done, self._left_done = self._left_done, None
                done.callback(None)

        d.addCallback(next_chunk)

    @property
    def clock(self):
        """The L{IReactorTime} it keeps time with."""
        return self._clock

    def stop(self):
        """
        The control plane stops (its store closes next): the sessions that end from now
        on change nothing stored (its next start knows no executor until agents register).
        """
        self._stopped = True

    async def _deregister(self, host_id):
        entry = self.hosts.get(host_id)
        if entry is None or entry.session_id is not None or not entry.executor:
            return  # removed, registered again meanwhile, or already deregistered
        if self._stopped:
            return
        try:
            await self.hosts.set_executor(host_id, False, "its agent's session ended")
        except Exception as e:
            errors.log_failure(self.log, Failure(e), "noting the end of {host_id}'s session",
                               host_id=host_id)

    def heartbeat(self, host_id, stats=None):
        """
        Note a heartbeat from C{host_id}.

        Cheap: it only updates memory (see the module docstring).  A heartbeat from a
        host marked offline registers it again.

        @return: C{{"state", "heartbeat_interval"}}.
        """
        entry = self.hosts.note_heartbeat(host_id)
        if isinstance(stats, dict) and stats:
            entry.stats = _bounded_stats(stats)
            free = entry.stats.get("disk_free_mb")
            if isinstance(free, int) and not isinstance(free, bool):
                full = free < self.min_free_disk_mb
                if full != entry.disk_full:
                    self._clock.callLater(0, self._disk_changed, host_id, full, free)
        state = entry.machine.state
        if state == "offline" and not entry.reregistering:
            entry.reregistering = True
            self._clock.callLater(0, self._reregister, host_id)
        return {"state": state, "heartbeat_interval": self.heartbeat_interval}

    def silent_for(self, host_id):
        """
        The seconds since this control plane last heard from C{host_id}'s agent (a
        heartbeat or registration), counted at most from its own start (one stored before
        a restart may be older than the agent's last message).

        @raise zwrm.errors.NotFound: no such host.
        """
        last = self.entry(host_id).last_heartbeat or 0.0
        return self._clock.seconds() - max(last, self.started_at)

    def room_mb(self, host_id):
        """
        The MiB a copy may take on C{host_id}'s data disk: what its last heartbeat reported
        free, less the C{min_free_disk_mb} kept free; L{None} when it reported nothing.

        @raise zwrm.errors.NotFound: no such host.
        """
        free = (self.entry(host_id).stats or {}).get("disk_free_mb")
        if not isinstance(free, int) or isinstance(free, bool):
            return None
        return free - self.min_free_disk_mb

    def _disk_changed(self, host_id, full, free_mb):
        d = self._deferred(self.hosts.set_disk_full(host_id, full, free_mb,
                                                    self.min_free_disk_mb))
        d.addErrback(lambda f: errors.log_failure(self.log, f, "noting the disk of {host_id}",
                                                    host_id=host_id))

    def _reregister(self, host_id):
        d = self._deferred(self.register(host_id, {}))
        d.addErrback(lambda f: errors.log_failure(self.log, f, "re-registering {host_id}",
                                                    host_id=host_id))

    @staticmethod
    def _deferred(coro):
        return Deferred.fromCoroutine(coro)

    async def transition(self, host_id, input_name):
        """
        Feed C{input_name} to C{host_id}'s machine; store, then publish, any change.

        @return: the host's public state afterwards.
        @raise zwrm.errors.NotFound: no such host.
        @raise zwrm.errors.Conflict: the input contradicts the state.
        """
        if input_name not in INPUTS:
            raise errors.InvalidArgument(f"unknown host input {input_name!r}")
        entry = self.entry(host_id)
        await self.hosts.apply_input(host_id, input_name)
        return entry.machine.state

    # -- health -----------------------------------------------------------------------

    async def mark_offline(self, host_id):
        """
        Mark C{host_id} offline: store and publish the change, deregister its executor,
        and mark its live machines failed (each stored, then published).

        @return: the ids of the machines marked failed.
        """
        entry = self.entry(host_id)
        had_session = entry.executor
        was_ready = self._ready(host_id)
        change = await self.hosts.apply_input(host_id, "heartbeat_lost", executor=False)
        if change is None:
            return []
        failed = []
        for row in await self.machines.find(host_id=host_id, states=LIVE_MACHINE_STATES):
            await self.machines.set(row, "host offline", state="failed")
            failed.append(row["id"])
        if self.cut_short and was_ready:
            # A planned stop a killed control plane left (L{cut_short}), on a ready host
            # that did not come back: failed as its running machines are, and handed to
            # the restart policy (it stayed stopping, its replica placed nowhere, until the
            # host returned).  (On a draining host it may be a live drain's original.)
            for row in await self.machines.find(host_id=host_id, states=("stopping",)):
                if row["id"] in self.cut_short:
                    self.cut_short.discard(row["id"])
                    await self.machines.set(row, "host offline (its planned stop was cut"
                                            " short by the control plane's stop)",
                                            state="failed")
                    failed.append(row["id"])
                    self._tell(self.on_cut_short, row, "after failing {mid} on {host_id}")
        if self._on_offline is not None and had_session:
            try:
                self._on_offline(host_id)
            except Exception:
                self.log.failure("after marking {host_id} offline", host_id=host_id)
        return failed

    # -- reconciliation ---------------------------------------------------------------

    def _reconcile_soon(self, host_id, reported):
        d = self._deferred(self._fetch_and_reconcile(host_id, reported))
        d.addErrback(lambda f: errors.log_failure(self.log, f, "reconciling {host_id}",
                                                    host_id=host_id))

    async def _fetch_and_reconcile(self, host_id, reported):
        if reported is None and self._call is not None and self.executor_available(host_id):
            try:
                reported = await self.call_executor(host_id, "machine.list")
            except Exception as e:
                e = errors.from_wire(e)
                if not isinstance(e, errors.NoCallee):  # (no callee: it is restarting)
                    self.log.warn("host {host_id}: could not list its machines: {e}",
                                  host_id=host_id, e=error_text(e))
                return None
        if reported is None:
            return None
        result = await self.reconcile(host_id, reported)
        for callback in list(self.on_reconciled):
            try:
                await callback(host_id)
            except Exception as e:
                self.log.warn("host {host_id}: after its reconciliation: {e}", host_id=host_id,
                              e=error_text(e))
        return result

    async def _stop_on(self, host_id, mid):
        try:
            await self.call_executor(host_id, "machine.stop", mid)
        except Exception as e:
            self.log.warn("could not stop {mid} on {host_id}: {e}", mid=mid, host_id=host_id, e=e)

    async def _destroy_on(self, host_id, mid):
        try:
            await self.call_executor(host_id, "machine.destroy", mid)
        except errors.NotFound:
            pass  # gone already
        except Exception as e:
            self.log.warn("could not destroy {mid} on {host_id}: {e}", mid=mid,
                          host_id=host_id, e=e)

    async def reconcile(self, host_id, reported):
        """
        Reconcile what C{host_id}'s agent says it runs with what the store recorded.

         - recorded on this host as failed (it was marked failed while the host was
           offline), reported running: restored to running;
         - recorded live on this host, not reported: failed (nothing is forgotten);
         - recorded C{pending} here when the control plane started (L{unconfirmed}: the
           start was called by the process before, which may have stopped before its
           call reached the agent or before the answer came back): reported running or
           starting, it takes the state reported; not reported, it is failed (its start
           never reached its host), so its restart policy decides (it stayed pending,
           out of the routes, until its app's next deploy or scale);
         - recorded C{stopping} here when the control plane started (L{cut_short}), on a
           host that is ready (on a draining or drained one it may be a live drain's
           original, paused for good: its drain ends it): the planned stop of the
           process before, killed before it ended (a stop of its own puts such machines
           back). Reported running, it is put back in the routes (as a cancelled stop
           does); not reported, it is failed and its restart policy decides
           (L{on_cut_short}) (it stayed C{stopping}, out of the routes, holding its
           capacity, for good); those of an app being destroyed are not in it: they
           stay out of the routes until their destroy removes them
           (L{zwrm.control.apps.Apps.load});
         - reported running but recorded elsewhere, or stopped/destroyed: a duplicate;
           the agent is told to stop it (nothing runs twice); recorded here as pending
           (its start is under way) or stopping, it is left alone;
         - reported in any state, with no record and a C{destroyed} event in the log: a
           machine destroyed while its host was unreachable (only its record could go,
           by a request that succeeded: a request that fails removes no record), the
           destroy is carried out on its host (its volumes stay; its claim on them ends,
           so they can be deleted or used by a new machine), recorded as an event (C{kind}
           C{unknown_machine}, C{action} C{destroyed});
         - reported running with no record, and no such event (e.g. the database was
           restored from a backup older than the machine): stopped, its disk and volumes
           kept, and recorded as an event (C{kind} C{unknown_machine}).

        @param reported: C{[{"id", "state", ...}, ...]}.
        @return: a dict of lists of machine ids: C{restored, confirmed, put_back, failed,
            duplicate, unknown, removed}.
        """
        if not isinstance(reported, list) or not all(
            isinstance(m, dict) and isinstance(m.get("id", m.get("machine_id")), str)
            for m in reported
        ):
            raise errors.InvalidArgument("reported machines must be a list of {id, state}")
        result = {"restored": [], "confirmed": [], "put_back": [], "failed": [], "duplicate": [],
                  "unknown": [], "removed": []}
        running = {
            m.get("id", m.get("machine_id")): m
            for m in reported
            if m.get("state") in LIVE_MACHINE_STATES
        }
        ids = [m.get("id", m.get("machine_id")) for m in reported]
        recorded = {row["id"]: row for row in await self.machines.find(ids=ids)}
        for mid in ids:
            if mid not in recorded and await self.machines.was_destroyed(mid):
                # Destroyed while its host was unreachable: the rest of its destroy.
                await self.machines.note_stray("unknown_machine", mid, host_id,
                                               action="destroyed")
                self.log.info("host {host_id} keeps machine {mid}, destroyed while the host"
                              " was unreachable: destroying it there", host_id=host_id, mid=mid)
                result["removed"].append(mid)
                running.pop(mid, None)
                await self._destroy_on(host_id, mid)
        for mid in running:
            row = recorded.get(mid)
            if row is None:
                # no record: it was destroyed while its host was unreachable (only the row
                # could go). Stop it, so that its app does not run twice; its disk and
                # volumes stay on the host, nothing is deleted.
                await self.machines.note_stray("unknown_machine", mid, host_id)
                self.log.warn("host {host_id} runs machine {mid}, which has no record:"
                              " stopping it", host_id=host_id, mid=mid)
                result["unknown"].append(mid)
                await self._stop_on(host_id, mid)
            elif row["host_id"] == host_id and row["state"] == "failed":
                # As its agent has it: its check (a host gone was no news to it), its
                # port; and the capacity it takes there is held again (on_restored).
                await self.machines.set(row, "host back", state="running",
                                        health=reported_health(row.get("health"), running[mid]))
                self._found_running(row)
                result["restored"].append(mid)
            elif (row["host_id"] == host_id and row["state"] == "stopping"
                  and mid in self.cut_short and self._ready(host_id)):
                self.cut_short.discard(mid)
                await self.machines.set(
                    row, "its planned stop was cut short by the control plane's stop: back in"
                    " the routes", state=running[mid]["state"],
                    health=reported_health(row.get("health"), running[mid]))
                result["put_back"].append(mid)
            elif (row["host_id"] == host_id and row["state"] == "pending"
                  and mid in self.unconfirmed):
                # Its start reached the agent; the answer never reached us.
                await self.machines.set(
                    row, "its host runs it (its start was not confirmed before the control"
                    " plane stopped)", state=running[mid]["state"],
                    health=reported_health(row.get("health"), running[mid]))
                self._found_running(row)
                result["confirmed"].append(mid)
            elif row["host_id"] != host_id or row["state"] not in MAY_RUN_STATES:
                result["duplicate"].append(mid)
                self.log.warn(
                    "host {host_id} runs machine {mid}, recorded {state} on {other}: stopping it",
                    host_id=host_id, mid=mid, state=row["state"], other=row["host_id"],
                )
                await self.machines.note_stray("duplicate_machine", mid, host_id, row=row)
                await self._stop_on(host_id, mid)
        for row in await self.machines.find(host_id=host_id, states=LIVE_MACHINE_STATES):
            if row["id"] not in running:
                await self.machines.set(row, "not running on its host", state="failed")
                result["failed"].append(row["id"])
        if self.unconfirmed:
            for row in await self._fail_not_running(
                    host_id, "pending", self.unconfirmed, running,
                    "its start never reached its host (the control plane stopped first)"):
                result["failed"].append(row["id"])
        if self.cut_short and self._ready(host_id):
            for row in await self._fail_not_running(
                    host_id, "stopping", self.cut_short, running,
                    "not running on its host (its planned stop was cut short by the control"
                    " plane's stop)"):
                result["failed"].append(row["id"])
                self._tell(self.on_cut_short, row, "after failing {mid} on {host_id}")
        return result

    async def _fail_not_running(self, host_id, state, ids, running, reason):
        """
        Fail the machines recorded C{state} on C{host_id} whose ids are in C{ids} (taken
        out of it) and that its agent does not run (C{running}).

        @return: their rows.
        """
        failed = []
        for row in await self.machines.find(host_id=host_id, states=(state,)):
            if row["id"] in ids and row["id"] not in running:
                ids.discard(row["id"])
                await self.machines.set(row, reason, state="failed")
                failed.append(row)
        return failed

    def _found_running(self, row):
        self._tell(self.on_restored, row, "after finding {mid} running on {host_id}")

    def _tell(self, callbacks, row, what):
        for callback in list(callbacks):
            try:
                callback(row)
            except Exception:
                self.log.failure(what, mid=row["id"], host_id=row["host_id"])

    def _ready(self, host_id):
        try:
            return self.state(host_id) == "ready"
        except errors.NotFound:
            return False

