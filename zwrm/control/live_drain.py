"""
The live side of a drain (issue 18; docs/live-migration.md, docs/drain.md): how a drain
chooses, per machine with volumes, between a live move and the cold path, and the steps of
the live phases (C{live_preparing}, C{live_migrating}, C{switched_over}, C{verifying}).

L{LiveSteps} is a mixin of L{zwrm.control.drain.Drains}: its steps run under the same
runner (a phase is stored, then announced, then its step runs; every step is idempotent,
so after a control-plane restart it runs again).  The agents do the moving
(C{zwrm.agent.<host_id>.live.*}, L{zwrm.agent.live}); the control plane only decides and
records:

 - C{live_preparing}: the replacement's id is stored and its row added (pending) on the
   target, then the target's C{live.prepare} (a paused QEMU over blank volumes);
 - C{live_migrating}: the source's C{live.migrate(..., hold=True)}, its progress kept like
   a volume copy's: it answers once every mirror is in sync (the machine still runs there,
   its writes reaching both copies) and waits;
 - C{switching_over}: the decision to switch over, stored before the source's agent is
   told to go on (C{live.switchover}: the RAM migration, paused before its switchover, then
   the switchover, by the agents alone: no round trip in the pause), so before the target
   can resume.  From it on the control plane never resumes the source by itself: the
   source runs on only if its agent rolled back before it continued past
   C{pre-switchover} (the target cannot hold the machine then), or once the target
   confirmed that it did not resume (the agents' protocol: L{_live_resolve});
 - C{switched_over}: the target holds the machine: the step makes sure it runs there;
 - C{verifying}: the source's C{live.hashes}, the target's C{live.verify} (BLAKE3 where
   both agents know it, else SHA-256: L{LiveSteps._verify_terms}); a failure is an error in
   the log and the migration C{failed}, with nothing deleted;
 - then the cold path's C{committing} and C{cleaning} (the paused source destroyed).

A live attempt that gives up (rolled back: the machine runs on at the source) falls back to
the cold path in C{auto} mode (L{Divert} C{fall_back}) and rolls back in C{live} mode.
"""

import uuid

from autobahn.wamp.types import CallOptions
from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from zwrm import errors
from zwrm.control.resources.machines import placement_request, volumes_size

SHA256 = "sha256"
"""
The block hash of a live verification with an agent that names none in C{live.facts}'
C{verify_hashes} (of a version before BLAKE3): what its C{live.hashes} always answers and its
C{live.verify} always compares.
"""

LIVE_HASH_PAGE = 16384
"""Blocks per C{live.hashes} call (64 KiB blocks: 1 GiB of volume, 256 KiB of hashes)."""

LIVE_VERIFY_PAGE = 4 * LIVE_HASH_PAGE
"""
Blocks per C{live.verify} call: 4 GiB of volume, whose hashes travel as 2 MiB of hexadecimal
(within the router's message size, 4 MiB). One call for a whole large volume would be one
message as large as the volume's hashes (32 MiB for 64 GiB), and the router cuts off a session
with more than four times its C{max_outgoing_queue} (4 MiB) waiting toward it; a volume up to
this size is verified in one call, as before pages.
"""

SOURCE_BUSY = ("mirroring", "ready", "migrating", "switching", "continued", "rolling_back")
"""C{live.status} states of a source whose migration is still under way."""

SOURCE_GONE_ON = ("migrating", "switching", "continued")
"""C{live.status} states of a source that was told to switch over (C{live.switchover})."""

TARGET_HOLDS = ("resuming", "resumed", "stuck")
"""C{live.status} states of a target that has the whole machine (it runs, or resumes)."""

RESOLVE_ROUNDS = 8
"""How many times L{LiveSteps._live_resolve} asks both agents again before it gives up."""


class Divert(Exception):
    """
    Raised by a step: feed the migration C{input(reason)} (C{fall_back} or C{moved})
    instead of C{step_failed}.
    """

    def __init__(self, input_name, reason):
        super().__init__(reason)
        self.input = input_name
        self.reason = reason


def live_refusal(source, target, source_facts, target_facts):
    """
    Why a machine cannot move live from C{source} to C{target} (their agents' C{live.facts}),
    or L{None} when it can: both say C{live}, with equal C{cpu_model} and C{machine_type},
    and the same VM networking (user or bridge: with bridge networking the machine keeps its
    address, which moves with it at the switchover).
    """
    for host, facts in ((source, source_facts), (target, target_facts)):
        if not facts.get("live"):
            return f"host {host} cannot migrate live: {facts.get('reason') or 'no reason given'}"
    if (source_facts.get("network") or "user") != (target_facts.get("network") or "user"):
        return (f"hosts {source} and {target} differ in VM networking "
                f"({source_facts.get('network') or 'user'} and "
                f"{target_facts.get('network') or 'user'}): the guest's network would change")
    for key in ("cpu_model", "machine_type"):
        if source_facts.get(key) != target_facts.get(key):
            return (f"hosts {source} and {target} differ in {key} "
                    f"({source_facts.get(key)!r} and {target_facts.get(key)!r})")
    return None


def live_policy(options):
    """
    The C{policy} of C{live.migrate} from a drain's options (L{None}: the agents' defaults):
    C{downtime_limit} (ms), C{live_deadline} (s), C{postcopy}.
    """
    policy = {}
    if options.get("downtime_limit") is not None:
        policy["downtime_limit_ms"] = int(options["downtime_limit"])
    if options.get("live_deadline") is not None:
        policy["deadline"] = float(options["live_deadline"])
    if options.get("postcopy"):
        policy["postcopy"] = True
    return policy or None


def _target_holds(st):
    """Whether a target's C{live.status} says it has the whole machine."""
    if st.get("state") in TARGET_HOLDS:
        return True
    hv = st.get("hypervisor") or {}
    return hv.get("runstate") == "running" or (
        hv.get("runstate") == "paused" and hv.get("migration") == "completed")


def _target_gone(st):
    """Whether a target's C{live.status} says its incoming machine is gone (or never was)."""
    return st.get("hypervisor") is None and st.get("state") in (None, "ended")


def _source_done(st):
    """Whether a source's C{live.status} says its migration completed (paused for good)."""
    hv = st.get("hypervisor") or {}
    return st.get("state") == "completed" or hv.get("runstate") == "postmigrate"


def snapshot_ids(run, vid):
    """The ids of the snapshots of volume C{vid} that migration C{run} moves."""
    return list((run.detail.get("snapshots") or {}).get(vid) or ())


class LiveSteps:
    """The live phases' steps and the choice of mode (a mixin of L{Drains})."""

    log = Logger()

    # -- the choice of mode ---------------------------------------------------------

    async def _live_facts(self, host_id):
        """A host's C{live.facts}; one that cannot say counts as C{live: false}."""
        try:
            facts = await self._call(host_id, "live.facts")
        except Exception as e:  # an agent without the procedure, or away
            return {"live": False, "reason": f"its agent did not say ({_text(e)})"}
        if not isinstance(facts, dict):
            return {"live": False, "reason": "its agent's live.facts is not a dict"}
        return facts

    async def _choose_modes(self, host_id, plan, mode):
        """
        Set C{mode} (C{live}, C{cold} or L{None} without a target) and C{mode_reason} on
        each item of C{plan} (C{[(item, placement)]}).

        @raise Conflict: in C{live} mode, a machine with volumes that cannot move live (the
            message names the host and why); nothing is changed.
        """
        facts = {}

        async def of(h):
            if h not in facts:
                facts[h] = await self._live_facts(h)
            return facts[h]

        refused = []
        for item, _ in plan:
            if item["target"] is None:
                item["mode"], item["mode_reason"] = None, None
            elif not item["volumes"]:
                item["mode"] = "cold"
                item["mode_reason"] = "no volumes: the replacement starts first"
            elif item.get("keep_down"):
                item["mode"] = "cold"
                item["mode_reason"] = (f"{item['keep_down']}: its volumes move; it stays "
                                       f"{item['keep_down']}")
            elif item.get("down"):
                item["mode"] = "cold"
                item["mode_reason"] = (f"{item['down']}, a restart due: its volumes move; "
                                       "it starts on the target")
            elif mode == "cold":
                item["mode"], item["mode_reason"] = "cold", "cold drain requested"
            else:
                why = live_refusal(host_id, item["target"], await of(host_id),
                                   await of(item["target"]))
                if why is None:
                    item["mode"], item["mode_reason"] = "live", None
                else:
                    item["mode"], item["mode_reason"] = "cold", why
                    refused.append(f"machine {item['machine_id']}: {why}")
        if mode == "live" and refused:
            raise errors.Conflict("a live drain is not possible (nothing changed): "
                                  + "; ".join(refused))

    def _live_ids(self, run):
        r = run.row
        return r["source_host"], r["target_host"], r["machine_id"], run.detail.get("replacement")

    async def _live_resolve(self, run, poll):
        """
        After a live migration's outcome was lost (a control-plane restart, an uncertain
        switchover, a rollback): ask both agents.  The target has the machine, or the
        source completed: C{True} (switched over; the source is never resumed).  Else the
        source's migration is cancelled if it is still under way (once the switchover was
        decided, C{switching_over}, one that went on past its mirrors is not cancelled but
        followed to its outcome: C{live.switchover} again), then the target's incoming
        machine (its blank volumes deleted), then a source left paused is resumed (only
        once the target confirmed that it did not resume): C{False}.
        """
        source, target, mid, new_id = self._live_ids(run)
        why = f"to learn where machine {mid} runs after its live migration"
        decided = run.detail.get("switchover_decided_at") is not None
        for _ in range(RESOLVE_ROUNDS):
            tgt = await self._ask(run, target, "live.status", new_id, why=why, poll=poll)
            if _target_holds(tgt):
                return True
            src = await self._ask(run, source, "live.status", mid, why=why, poll=poll)
            if _source_done(src):
                return True
            if (decided and src.get("role") == "source"
                    and src.get("state") in SOURCE_GONE_ON):
                try:  # it starts nothing: it answers once the migration ended
                    await self._call(source, "live.switchover", mid)
                except CancelledError:
                    raise
                except Exception:
                    pass  # rolled back, uncertain, its agent restarted or away: ask again
                continue
            if src.get("role") == "source" and src.get("state") in SOURCE_BUSY:
                try:
                    await self._ask(run, source, "live.cancel", mid, why=why, poll=poll)
                except errors.Conflict:
                    pass  # it completed or failed at the switchover meanwhile: ask again
                continue
            if await self._cancel_target(run, poll):
                return True  # it resumed there meanwhile
            hv = src.get("hypervisor") or {}
            if src.get("state") == "uncertain" or hv.get("runstate") in ("paused",
                                                                          "finish-migrate"):
                # The target confirmed it did not resume (destroyed now): the source may.
                await self._ask(run, source, "live.cancel", mid, why=why, poll=poll)
            return False
        raise errors.Unavailable(f"machine {mid}: the agents' answers about its live "
                                 f"migration did not settle after {RESOLVE_ROUNDS} rounds")

    async def _cancel_target(self, run, poll):
        """
        Cancel the target's incoming machine (its blank volumes deleted).

        @return: C{True} if the target holds the machine instead (it resumed: nothing may
            resume the source), C{False} once it is gone there.
        """
        _, target, _, new_id = self._live_ids(run)
        why = f"to cancel the incoming machine {new_id}"
        for _ in range(RESOLVE_ROUNDS):
            try:
                await self._ask(run, target, "live.cancel", new_id, why=why, poll=poll)
                return False
            except errors.NotFound:
                return False  # nothing of it there
            except errors.Conflict:
                # It resumed there - or it ended already: its status says which.
                st = await self._ask(run, target, "live.status", new_id, why=why, poll=poll)
                if _target_holds(st):
                    return True
                if _target_gone(st):
                    return False
        raise errors.Unavailable(f"{target} neither cancelled nor holds machine {new_id}")

    async def _live_gave_up(self, drain, run, reason, target_cancelled=False):
        """
        The live attempt ended without moving the machine (it runs on at the source): the
        target's incoming machine is cancelled (unless done), the replacement's row goes;
        then C{auto} falls back to the cold path (L{Divert} C{fall_back}) and C{live}
        fails the step (the migration rolls back).
        """
        source, target, mid, new_id = self._live_ids(run)
        poll = drain.row["options"]["poll"]
        if new_id is not None:
            if not target_cancelled and run.detail.get("live_prepare_asked"):
                if await self._cancel_target(run, poll):
                    if run.row["phase"] != "live_migrating":
                        raise errors.Conflict(f"{target} holds machine {new_id} before its "
                                              "migration began: look at it")
                    raise Divert("moved", f"{target} resumed machine {new_id}: it moved")
            rep = await self._machines.get(new_id)
            if rep is not None:
                await self._replicas.remove_machine(rep)
        tried = list(run.detail.get("live_tried") or []) + ([new_id] if new_id else [])
        mode = drain.row["options"].get("mode", "auto")
        await self._save_detail(run, replacement=None, live_target=None, live_started=None,
                                live_prepare_asked=None, live=None, live_ready=None,
                                switchover_decided_at=None, live_tried=tried,
                                live_error=reason,
                                mode="cold" if mode == "auto" else "live",
                                mode_reason=reason if mode == "auto" else None)
        self.log.warn("drain: machine {m}: {reason}", m=mid, reason=reason)
        if mode == "auto":
            original = await self._original(run)
            if run.placement is None:  # the target's room for the cold path
                run.placement = self._placements.restore(target, placement_request(
                    original["spec"], disk_mb=volumes_size(original["spec"])))
            raise Divert("fall_back", f"{reason}; falling back to the cold path")
        raise errors.Unavailable(reason)

    # -- the steps --------------------------------------------------------------------

    async def _live_spec(self, row, original):
        """
        What the target's agent is given of the replacement (as C{machine.start}), with the
        original's network spec: the guest keeps its address (it is in its memory).
        """
        # Loaded here: the replicas module (already loaded by the apps layer that runs
        # the machines) imports agent-side helpers that this module must not load.
        from zwrm.control.replicas import replica_hostname

        spec = self._replicas.agent_spec(row["spec"])
        spec["network"] = await self._replicas.network.attach(
            original["id"], original["app_id"], original["host_id"],
            hostname=replica_hostname(spec["app"], row["spec"].get("replica")),
            open_ports=[p["guest_port"] for p in
                        (row["spec"].get("app_spec") or {}).get("publish") or []])
        return spec

    async def _step_live_preparing(self, drain, run):
        source, target, mid, new_id = self._live_ids(run)
        poll = drain.row["options"]["poll"]
        original = await self._original(run)
        if new_id is None:
            # Stored before it is acted on: from now on the target may hold this machine.
            new_id = f"m-{uuid.uuid4().hex[:12]}"
            await self._save_detail(run, replacement=new_id, mode="live")
        elif run.detail.get("live_prepare_asked"):
            # Run again (a restart): what the target prepared before is cancelled first.
            if await self._cancel_target(run, poll):
                raise errors.Conflict(f"{target} holds machine {new_id} before its migration "
                                      "began: look at it")
        row = await self._machines.get(new_id)
        if row is None:
            if run.placement is None:  # after a restart: account for it on the target again
                run.placement = self._placements.restore(target, placement_request(
                    original["spec"], disk_mb=volumes_size(original["spec"])))
            now = self._clock.seconds()
            row = {"id": new_id, "app_id": original["app_id"], "host_id": target,
                   "state": "pending", "spec": dict(original["spec"], id=new_id),
                   "health": {"status": "none"}, "created_at": now, "updated_at": now}
            # Stored (event state, pending) before the target may report it as its own.
            await self._replicas.add_machine(row, f"replacement of {mid} (live drain)",
                                             placement=run.placement)
        elif run.placement is not None:
            self._placements.adopt(new_id, run.placement)
        run.placement = None  # the apps layer releases it with the machine from now on
        sent = done = 0
        for vid in run.detail["volumes"]:
            # copies an earlier rollback left there
            await self._clean_copy(target, vid, snapshot_ids(run, vid))
            # Its snapshots first, streamed as a cold move's are (the mirror moves only
            # the volume); a failure rolls the migration back.
            sent, done = await self._copy_snapshots(run, vid, sent, done, poll)
        try:
            described = await self._call(source, "live.describe", mid)
            spec = await self._live_spec(row, original)
            # The guest's health goes with it: a target that takes it starts its checks
            # from passing, so the app's routes keep the guest while they run.
            kw = {}
            health = ((original or {}).get("health") or {}).get("status")
            if health is not None and (await self._live_facts(target)).get("prepare_health"):
                kw["health"] = health
            await self._save_detail(run, live_prepare_asked=True)  # stored before it is asked
            where = await self._call(target, "live.prepare", new_id, spec,
                                     described["volumes"], source,
                                     bool(drain.row["options"].get("postcopy")), **kw)
        except errors.ZwrmError as e:
            await self._live_gave_up(drain, run, f"live.prepare: {e.message}")
        await self._save_detail(run, live_target=where)
        # What drain-status shows as the image: the volumes' sizes (the mirror copies them).
        await self._save_migration(run, bytes_total=sum(described["volumes"].values()),
                                   bytes_sent=0)

    def _live_announced(self, run):
        """A C{on_progress} for C{live.migrate} / C{live.switchover}: kept for drain-status."""
        def announced(*args, **kwargs):
            p = args[0] if args else kwargs
            if not isinstance(p, dict):
                return
            run.detail["live"] = {k: p.get(k) for k in ("phase", "mirror", "ram", "elapsed")}
            mirror = p.get("mirror") or {}
            if isinstance(mirror.get("total"), int) and mirror["total"]:
                run.row["bytes_total"] = mirror["total"]
                run.row["bytes_sent"] = mirror.get("done") or 0
        return announced

    async def _step_live_migrating(self, drain, run):
        """
        The source mirrors the volumes while the machine runs, and answers once they are in
        sync (C{hold}: it waits there for C{live.switchover}, which only the next phase,
        stored first, asks).  Any failure: the agents say where the machine is.
        """
        source, target, mid, new_id = self._live_ids(run)
        poll = drain.row["options"]["poll"]
        if run.detail.get("live_started") is not None:
            # Run again after a control-plane restart: what became of the first run?  A
            # source still mirroring (or in sync, waiting) is followed: live.migrate again
            # answers for that migration.  Else no switchover was decided (stored), so
            # whatever it did is resolved from both agents and, not moved, cancelled.
            src = await self._ask(run, source, "live.status", mid, poll=poll,
                                  why=f"to learn how machine {mid}'s live migration goes")
            if not (src.get("role") == "source" and src.get("state") in ("mirroring",
                                                                          "ready")):
                if await self._live_resolve(run, poll):
                    raise Divert("moved", f"{target} holds machine {new_id}: it moved")
                await self._live_gave_up(drain, run, "the control plane restarted during "
                                         "the live migration; it was rolled back", True)
        await self._save_detail(run, live_started=self._clock.seconds(), live=None)
        # The source holds in sync for live.switchover if its agent takes hold (one of
        # the version before refuses the argument: it is asked to migrate all the way).
        hold = (True,) if await self._source_holds(source) else ()
        ready, why = await self._call_source(run, "live.migrate", mid, target,
                                             run.detail["live_target"],
                                             live_policy(drain.row["options"]), *hold)
        if why is not None:
            # Rolled back (unavailable), or the answer was lost: the agents say which.
            if await self._live_resolve(run, poll):
                raise Divert("moved", f"live.migrate said: {why}; {target} holds machine "
                             f"{new_id}: it moved")
            await self._live_gave_up(drain, run, f"live migration not done: {why}", True)
        ready = ready if isinstance(ready, dict) else {}
        if not ready.get("ready"):
            # An agent that does not hold (from before live.switchover) migrated all the
            # way: the target holds the machine.
            await self._save_live_result(run, ready)
            raise Divert("moved", f"{target} holds machine {new_id}: it moved")
        await self._save_migration(run, bytes_sent=run.row["bytes_total"])
        await self._save_detail(run, live_ready={k: ready.get(k) for k in (
            "mirror", "mirror_seconds", "elapsed")})

    async def _source_holds(self, source):
        """
        Whether C{source}'s agent takes C{live.migrate}'s C{hold}: its C{live.facts} says
        C{hold}, or C{prepare_health} (agents that list it took C{hold} before they said
        so).
        """
        facts = await self._live_facts(source)
        return bool(facts.get("hold") or facts.get("prepare_health"))

    async def _call_source(self, run, verb, *args):
        """
        Call the source's C{verb} (C{live.migrate}, C{live.switchover}), its progressive
        results kept for drain-status.

        @return: C{(answer, None)}, or C{(None, why)} when it failed (logged: the caller
            asks the agents what became of it).
        """
        source, _, mid, _ = self._live_ids(run)
        try:
            answer = await self._call(source, verb, *args, options=CallOptions(
                on_progress=self._live_announced(run)))
            return answer, None
        except CancelledError:
            raise
        except Exception as e:
            why = _text(e)
        self.log.info("drain: machine {m}: {verb} failed ({e}); asking the agents", m=mid,
                      verb=verb, e=why)
        return None, why

    async def _save_live_result(self, run, result):
        """Store the figures of a completed migration (the pause QEMU reported, ...)."""
        await self._save_migration(run, bytes_sent=run.row["bytes_total"])
        ms = result.get("downtime_ms")
        await self._save_detail(
            run, live_result={k: result.get(k) for k in (
                "downtime_ms", "total_ms", "setup_ms", "elapsed", "mirror_seconds", "ram",
                "mirror", "postcopy")},
            downtime_ms=ms, downtime=(ms / 1000.0) if isinstance(ms, int | float) else None)

    async def _step_switching_over(self, drain, run):
        """
        The switchover is decided: this phase is stored before the source's agent is told
        to go on (C{live.switchover}: the RAM migration, paused before its switchover, then
        the switchover by the agents alone), so before the target can resume.  From here on
        the control plane never resumes the source by itself.  Run again (a restart), the
        call starts nothing new: the source's agent follows the migration under way or
        answers its outcome again.
        """
        source, target, mid, new_id = self._live_ids(run)
        poll = drain.row["options"]["poll"]
        if run.detail.get("switchover_decided_at") is None:
            await self._save_detail(run, switchover_decided_at=self._clock.seconds())
        why = f"to learn where machine {mid} runs after its live migration"
        for _ in range(RESOLVE_ROUNDS):
            result, said = await self._call_source(run, "live.switchover", mid)
            if said is None:
                break
            # The target first: a source cut off while the target resumed need not be
            # waited for.
            tgt = await self._ask(run, target, "live.status", new_id, why=why, poll=poll)
            if _target_holds(tgt):
                await self._save_detail(run, live_note=f"live.switchover said: {said}; the "
                                        "target holds the machine")
                return
            src = await self._ask(run, source, "live.status", mid, why=why, poll=poll)
            if src.get("role") == "source" and src.get("state") in SOURCE_BUSY:
                continue  # under way (the answer was lost): ask it again, it starts nothing
            if await self._live_resolve(run, poll):
                await self._save_detail(run, live_note=f"live.switchover said: {said}; the "
                                        "target holds the machine")
                return
            # Rolled back before the source continued (the target never had the machine),
            # or the target confirmed it did not resume: the machine runs on at the source.
            await self._live_gave_up(drain, run, f"live migration not done: {said}", True)
        else:
            raise errors.Unavailable(f"machine {mid}: its switchover's outcome did not settle "
                                     f"after {RESOLVE_ROUNDS} rounds")
        await self._save_live_result(run, result if isinstance(result, dict) else {})

    async def _step_switched_over(self, drain, run):
        """
        The target holds the machine (this phase is stored before anything else): make
        sure it runs there (C{live.resume} if it waits paused), and record it running.
        """
        source, target, mid, new_id = self._live_ids(run)
        opts = drain.row["options"]
        poll = opts["poll"]
        if run.detail.get("switched_over_at") is None:
            await self._save_detail(run, switched_over_at=self._clock.seconds())
        why = f"to confirm that machine {new_id} runs there"
        waited = 0.0
        while True:
            st = await self._ask(run, target, "live.status", new_id, why=why, poll=poll)
            hv = st.get("hypervisor") or {}
            if st.get("state") == "resumed" or hv.get("runstate") == "running":
                break
            if st.get("state") == "stuck" or (st.get("state") in (None, "ended")
                                              and hv.get("runstate") == "paused"):
                await self._ask(run, target, "live.resume", new_id, why=why, poll=poll)
                continue
            if waited >= opts["healthy_deadline"]:
                raise errors.Unavailable(
                    f"machine {new_id} does not run on {target} (live.status: "
                    f"{st.get('state')}, {hv.get('runstate')}); the source {mid} stays paused "
                    f"on {source} and is never resumed")
            await self._sleep(poll)  # completing or resuming: no event says when
            waited += poll
        # The replacement runs first, then takes the guest's address, then the original
        # leaves: the app's routes never lack the guest in between (on the cluster network
        # both rows are the same address: the kernel's forward does not even change).
        async def running_there(row):
            # The fresh row, in order with the target's reports of it: one that came
            # meanwhile (running, with its health) is not overwritten by an older read.
            if row is not None and row["state"] in ("pending", "starting"):
                host_port = (run.detail.get("live_target") or {}).get("host_port")
                health = dict(row.get("health") or {})
                if host_port is not None:
                    health.setdefault("host_port", host_port)
                await self._replicas.set_machine(row, f"resumed on {target} (live drain)",
                                                 state="running", health=health)

        await self._replicas.update_machine(new_id, running_there)
        # The guest keeps its address: the replacement takes the original's stored row, and
        # the view puts the machine on the target (idempotent: a step run again moves none).
        await self._replicas.network.move_address(mid, new_id, target)
        original = await self._machines.get(mid)
        if original is not None and original["state"] == "running":
            # Paused for good: out of the routes (the replacement is in them).
            await self._replicas.set_machine(
                original, f"moved live to {target} as {new_id}; paused here for good",
                state="stopping")

    async def _verify_terms(self, source, target):
        """
        How the two agents verify a volume, from their C{live.facts}' C{verify_hashes}:

         - the block hash: the source's first choice that the target knows too, or L{None}
           when either names none (of a version before BLAKE3: it knows only SHA-256, and as
           a source takes no C{algorithm} argument). A target that names none compares
           SHA-256 whatever a page says, and would fail a good copy: it is never sent
           another;
         - the blocks per C{live.verify} call: L{LIVE_VERIFY_PAGE}, or L{None} (the whole
           volume in one call) for a target that names none, which may be of a version
           before pages: it compares the whole volume with whatever it is sent, so a
           volume over one page would fail there (an upgrade takes the control plane
           first, docs/install.md). Agents of the version with pages and without hashes
           take one call as well.

        @return: C{(algorithm, blocks per call)}.
        """
        theirs = [(await self._live_facts(h)).get("verify_hashes") for h in (source, target)]
        per_call = LIVE_VERIFY_PAGE if isinstance(theirs[1], list) else None
        if not all(isinstance(names, list) for names in theirs):
            return None, per_call
        return next((n for n in theirs[0] if n in theirs[1]), None), per_call

    async def _step_verifying(self, drain, run):
        source, target, mid, new_id = self._live_ids(run)
        poll = drain.row["options"]["poll"]
        verified = dict(run.detail.get("verified") or {})
        algorithm, per_call = None, LIVE_VERIFY_PAGE
        if not all((verified.get(vid) or {}).get("ok") for vid in run.detail["volumes"]):
            algorithm, per_call = await self._verify_terms(source, target)
        # the version before's call (SHA-256) where either agent knows no other
        extra = (algorithm,) if algorithm is not None else ()
        for vid in run.detail["volumes"]:
            if (verified.get(vid) or {}).get("ok"):
                continue  # verified by an earlier run of this step
            why = f"to verify volume {vid}"
            total = {"ok": True, "blocks": 0, "dirty_blocks": 0, "differing_blocks": 0}
            first, last = 0, False
            while not last:
                # One page of verification: the source's hashes of up to per_call blocks
                # (all of them for a target that takes no pages), then the target's
                # comparison of them.
                pages, start = [], first
                while True:
                    want = LIVE_HASH_PAGE
                    if per_call is not None:
                        want = min(want, start + per_call - first)
                    h = await self._ask(run, source, "live.hashes", vid, first, want,
                                        *extra, why=why, poll=poll)
                    raw = h["hashes"]
                    pages.append(bytes.fromhex(raw) if isinstance(raw, str) else bytes(raw))
                    first += h["count"]
                    last = h["count"] == 0 or first >= h["blocks"]
                    if last or (per_call is not None and first - start >= per_call):
                        break
                hashes = {"size": h["size"], "block": h["block"], "blocks": h["blocks"],
                          "first": start, "count": first - start,
                          "hashes": b"".join(pages).hex()}
                if algorithm is not None:
                    hashes["hash"] = h.get("hash", SHA256)  # as the source hashed them
                try:
                    result = await self._ask(run, target, "live.verify", new_id, vid, hashes,
                                             why=why, poll=poll)
                except errors.Corrupt as e:
                    verified[vid] = {"ok": False, "error": e.message}
                    await self._save_detail(run, verified=verified)
                    self.log.error(
                        "VERIFICATION FAILED: drain of {s}: machine {m} moved live to {t} as "
                        "{n}, but volume {v} there differs from the source's frozen image: "
                        "{e}. Nothing is deleted: the source's image stays on {s}.",
                        s=source, m=mid, t=target, n=new_id, v=vid, e=e.message)
                    raise errors.Corrupt(
                        f"VERIFICATION FAILED for volume {vid}: {e.message}; machine {new_id} "
                        f"runs on {target}; the source's image stays on {source} (machine "
                        f"{mid} paused there) until an operator compares them") from None
                for k in ("blocks", "dirty_blocks", "differing_blocks"):
                    total[k] += result.get(k) or 0
            total["hash"] = algorithm or SHA256
            verified[vid] = total
            await self._save_detail(run, verified=verified)


def _text(e):
    if isinstance(e, errors.ZwrmError):
        return e.message
    args = getattr(e, "args", ())
    return str(args[0]) if args else e.__class__.__name__


__all__ = ["LiveSteps", "Divert", "live_refusal", "LIVE_HASH_PAGE"]
