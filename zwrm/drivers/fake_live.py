"""
The L{zwrm.interfaces.ILiveMigration} part of the fake driver (L{zwrm.drivers.fake}), for
unit tests. It passes the same contract tests as the QEMU driver
(tests/drivers/test_live.py).

Two fake drivers "connect" through a L{FakeNetwork} (by default one per process): the
target registers its listeners there, the source finds them. Mirrors copy the volume files
(so the target's volume really holds the source's bytes), RAM passes take a little time on
the driver's clock, and the events are QMP's names and data, sent in QEMU's order.  A guest
"writes" with L{FakeLiveMigration.guest_write_file}: into a block of its first volume, and
into the guest's memory (a dict the migration carries over).
"""

import hashlib
import os
import shutil

from twisted.internet.defer import fail, succeed

from zwrm.drivers.live import (
    DOWNTIME_LIMIT_MS,
    MIRROR_SPEED,
    VERIFY_BLOCK,
    _check_target,
    _positive,
    cannot_cancel,
    check_tls,
    live_drives,
    status_doc,
)
from zwrm.errors import Conflict, InvalidArgument, NotAuthorized, Unavailable
from zwrm.pki.ca import host_id_of


class FakeNetwork:
    """Listeners of fake targets: C{(host, port) -> (kind, driver, machine id, tls)}."""

    def __init__(self):
        self.listeners = {}
        self.next_port = 20000


NETWORK = FakeNetwork()

#: Seconds (on the driver's clock) each fake step takes.
STEP = 0.01


class FakeLiveMigration:
    """Mixin for L{zwrm.drivers.fake.FakeDriver}; state lives in C{host.machines[id]["live"]}."""

    def _live_init(self, network=None):
        self.network = network or NETWORK
        self._live_listeners = {}
        self._live_calls = {}  # machine id -> its pending delayed calls

    def _later(self, delay, f, mid, *args):
        calls = self._live_calls.setdefault(mid, set())

        def run():
            calls.discard(call)
            f(mid, *args)

        call = self.reactor.callLater(delay, run)
        calls.add(call)

    def _live_forget(self, mid):
        """Cancel a machine's pending steps (it ended, or was destroyed)."""
        for call in self._live_calls.pop(mid, ()):
            if call.active():
                call.cancel()

    # --- helpers -------------------------------------------------------------------------

    def _live(self, mid):
        proc = self.host.machines.setdefault(mid, {"alive": False, "spec": {}})
        return proc.setdefault("live", {"runstate": "running", "migration": "none",
                                        "role": None, "phase": None, "mirrors": {},
                                        "files": {}, "dirty": None, "ram": 0, "passes": 0})

    def _running(self, mid):
        st = self._get(mid)
        if st["state"] != "running":
            raise Conflict(f"machine {mid} is {st['state']}: it cannot migrate")
        return self._live(mid)

    def _emit(self, mid, name, data):
        for listener in list(self._live_listeners.get(mid, ())):
            listener(name, dict(data))

    def _alive(self, mid):
        return bool(self.host.machines.get(mid, {}).get("alive"))

    def _hung(self, mid):
        return bool(self.host.machines.get(mid, {}).get("hung"))

    def hang(self, machine_id):
        """
        Make a machine's QEMU stop answering (as C{SIGSTOP} would): a mirror into it copies
        nothing more and never gets in sync, a RAM migration to it sends nothing more; the
        connections stay up.
        """
        self.host.machines[machine_id]["hung"] = True

    def _peer(self, target, kind):
        got = self.network.listeners.get((target["host"], target[f"{kind}_port"]))
        if got is None or got[0] != kind or not got[1]._alive(got[2]):
            raise Unavailable(f"{kind}: connection refused by {target['host']}:"
                              f"{target[f'{kind}_port']}")
        return got

    @staticmethod
    def _check_peer(tls, their_tls):
        """Both sides' TLS, as QEMU checks them: each pins the other's host id."""
        if (tls is None) != (their_tls is None):
            raise NotAuthorized("TLS handshake failed: one side does not use TLS")
        if tls is None:
            return
        mine = host_id_of(tls["cert"].encode())
        theirs = host_id_of(their_tls["cert"].encode())
        if their_tls["peer"] != mine:
            raise NotAuthorized(f"TLS: the target refused client {mine} (authz-simple)")
        if tls["peer"] != theirs:
            raise NotAuthorized(f"TLS: certificate of {theirs} does not match {tls['peer']}")

    def _wrap(self, f, *args):
        try:
            return succeed(f(*args))
        except Exception as e:
            return fail(e)

    # --- ILiveMigration ------------------------------------------------------------------

    def migration_facts(self):
        return {"live": True, "reason": None, "cpu_model": "fake", "machine_type": "fake",
                "accel": "fake"}

    def live_subscribe(self, machine_id, listener):
        self._get(machine_id)
        lst = self._live_listeners.setdefault(machine_id, [])
        lst.append(listener)
        return lambda: lst.remove(listener) if listener in lst else None

    def start_incoming(self, spec, listen, tls=None, postcopy=False):
        try:
            tls = check_tls(tls)
            if not isinstance(listen, str) or not listen:
                raise InvalidArgument("listen must be the address the target listens on")
        except Exception as e:
            return fail(e)
        d = self.start(spec)

        def started(status):
            mid = status["id"]
            live = self._live(mid)
            live.update(runstate="inmigrate", role="target", phase="incoming", tls=tls,
                        postcopy_ok=bool(postcopy))
            ports = []
            for kind in ("nbd", "migration"):
                self.network.next_port += 1
                port = self.network.next_port
                self.network.listeners[(listen, port)] = (kind, self, mid, tls)
                ports.append(port)
            return {"host": listen, "nbd_port": ports[0], "migration_port": ports[1],
                    "exports": {key: drive for drive, key, _s in
                                live_drives(self.host.machines[mid]["spec"])}}

        return d.addCallback(started)

    def start_mirror(self, machine_id, target, tls=None, speed=MIRROR_SPEED):
        return self._wrap(self._start_mirror, machine_id, target, tls, speed)

    def _start_mirror(self, mid, target, tls, speed):
        tls = check_tls(tls)
        _check_target(target)
        _positive(speed, "speed")
        live = self._running(mid)
        spec = self.host.machines[mid]["spec"]
        for _d, key, _s in live_drives(spec):
            if key not in target["exports"]:
                raise InvalidArgument(f"target.exports has no export for {key!r}")
        _kind, tdrv, tmid, ttls = self._peer(target, "nbd")
        self._check_peer(tls, ttls)
        live.update(role="source", phase="mirroring", target=(tdrv, tmid))
        jobs = []
        for drive, _key, _s in live_drives(spec):
            job = f"zwrm-mirror-{drive}"
            size = os.path.getsize(self._volume_path(spec, drive))
            delay = max(STEP, min(size / speed, 5.0))
            live["mirrors"][job] = {"job": job, "offset": 0, "len": size, "ready": False,
                                    "speed": speed, "drive": drive,
                                    "started": self.reactor.seconds(), "delay": delay}
            jobs.append(job)
            self._later(delay, self._mirror_ready, mid, job)
        return {"jobs": jobs}

    @staticmethod
    def _volume_path(spec, drive):
        return spec["volumes"][int(drive[3:])]["path"]

    def _sync(self, mid, drive):
        tdrv, tmid = self._live(mid)["target"]
        src = self._volume_path(self.host.machines[mid]["spec"], drive)
        dst = self._volume_path(tdrv.host.machines[tmid]["spec"], drive)
        with open(src, "rb") as a, open(dst, "r+b") as b:
            shutil.copyfileobj(a, b, 1 << 20)

    def _mirror_ready(self, mid, job):
        live = self._live(mid)
        m = live["mirrors"].get(job)
        if m is None or not self._alive(mid):
            return
        tdrv, tmid = live["target"]
        if tdrv._hung(tmid):
            return  # no reply comes: the mirror copies nothing more, and is never in sync
        if not tdrv._alive(tmid):
            del live["mirrors"][job]
            self._emit(mid, "BLOCK_JOB_COMPLETED", {"device": job, "type": "mirror",
                                                    "error": "Input/output error",
                                                    "offset": 0, "len": m["len"]})
            return
        self._sync(mid, m["drive"])
        m.update(ready=True, offset=m["len"])
        self._emit(mid, "BLOCK_JOB_READY", {"device": job, "type": "mirror",
                                            "offset": m["len"], "len": m["len"], "speed": 0})

    def start_migration(self, machine_id, target, tls=None, downtime_limit_ms=DOWNTIME_LIMIT_MS,
                        auto_converge=False, postcopy=False, max_bandwidth=None):
        return self._wrap(self._start_migration, machine_id, target, tls, downtime_limit_ms,
                          max_bandwidth, postcopy)

    def _start_migration(self, mid, target, tls, downtime, max_bandwidth, postcopy=False):
        tls = check_tls(tls)
        _check_target(target)
        _positive(downtime, "downtime_limit_ms")
        live = self._running(mid)
        spec = self.host.machines[mid]["spec"]
        jobs = {f"zwrm-mirror-{d}" for d, _k, _s in live_drives(spec)}
        if not all(live["mirrors"].get(j, {}).get("ready") for j in jobs):
            raise Conflict(f"machine {mid}: its mirrors are not all ready")
        _kind, tdrv, tmid, ttls = self._peer(target, "migration")
        self._check_peer(tls, ttls)
        # As QEMU's target: a post-copy stream to a target without the capability fails.
        live["postcopy_refused"] = bool(postcopy) and not tdrv._live(tmid).get("postcopy_ok")
        live.update(migration="setup", phase="migrating", downtime_limit=downtime,
                    started_at=self.reactor.seconds())
        self._emit(mid, "MIGRATION", {"status": "setup"})
        delay = STEP if max_bandwidth is None else max(STEP, 1.0)
        self._later(STEP, self._ram_pass, mid, 1, delay)
        return {"started": True}

    def _ram_pass(self, mid, n, delay):
        live = self._live(mid)
        if live["migration"] not in ("setup", "active") or not self._alive(mid):
            return
        tdrv, tmid = live["target"]
        if tdrv._hung(tmid):  # nothing more is sent; the migration stays active
            self._later(delay, self._ram_pass, mid, n, delay)
            return
        if not tdrv._alive(tmid) or live.get("postcopy_refused"):
            live["migration"] = "failed"
            self._emit(mid, "MIGRATION", {"status": "failed"})
            return
        if n == 1:
            live["migration"] = "active"
            self._emit(mid, "MIGRATION", {"status": "active"})
        live["passes"] = n
        self._emit(mid, "MIGRATION_PASS", {"pass": n})
        # A guest that dirties memory faster than the link (FakeHost.live_converges false)
        # never converges, unless post-copy is started.
        converges = getattr(self.host, "live_converges", True) or live.get("postcopy")
        if n < 3 or not converges:
            self._later(delay, self._ram_pass, mid, n + 1, delay)
            return
        live.update(runstate="finish-migrate", migration="pre-switchover",
                    paused_at=self.reactor.seconds())
        self._emit(mid, "STOP", {})
        self._emit(mid, "MIGRATION", {"status": "pre-switchover"})

    def complete_switchover(self, machine_id, timeout=30.0):
        return self._wrap(self._complete_switchover, machine_id)

    def _complete_switchover(self, mid):
        live = self._running(mid)
        if live["migration"] != "pre-switchover":
            raise Conflict(f"machine {mid}: the migration is {live['migration']}, "
                           "not pre-switchover")
        spec = self.host.machines[mid]["spec"]
        jobs = [f"zwrm-mirror-{d}" for d, _k, _s in live_drives(spec)]
        for job in jobs:
            if not live["mirrors"].get(job, {}).get("ready"):
                raise Conflict(f"machine {mid}: mirror {job} is not ready")
        tdrv, tmid = live["target"]
        if not tdrv._alive(tmid):
            raise Unavailable(f"machine {mid}: switchover: the target is gone")
        for job in jobs:
            m = live["mirrors"].pop(job)
            self._sync(mid, m["drive"])
            self._emit(mid, "BLOCK_JOB_COMPLETED", {"device": job, "type": "mirror",
                                                    "offset": m["len"], "len": m["len"]})
        live.update(migration="completed", runstate="postmigrate", phase="switching",
                    downtime=int((self.reactor.seconds() - live["paused_at"]) * 1000) + 1)
        tlive = tdrv._live(tmid)
        tlive.update(migration="completed", runstate="paused",
                     files=dict(live["files"]))
        self._emit(mid, "MIGRATION", {"status": "postcopy-active" if live.get("postcopy")
                                      else "device"})
        self._emit(mid, "MIGRATION", {"status": "completed"})
        tdrv._emit(tmid, "MIGRATION", {"status": "completed"})
        return {"continued": True}

    def start_postcopy(self, machine_id):
        def postcopy():
            live = self._running(machine_id)
            if live["migration"] != "active":
                raise Conflict(f"machine {machine_id}: no migration to switch to post-copy")
            live["postcopy"] = True
            return {"postcopy": True}
        return self._wrap(postcopy)

    def finish_incoming(self, machine_id, announce=True):
        return self._wrap(self._finish_incoming, machine_id)

    def _finish_incoming(self, mid):
        live = self._running(mid)
        if live["role"] != "target":
            raise Conflict(f"machine {mid} is not the target of a migration")
        if live["runstate"] == "running" and live["phase"] == "resumed":
            return {"resumed": True, "already": True}
        if live["migration"] != "completed" or live["runstate"] != "paused":
            raise Conflict(f"machine {mid}: its incoming migration is not complete "
                           f"({live['runstate']}, migration {live['migration']})")
        for key in [k for k, v in self.network.listeners.items() if v[1] is self and v[2] == mid]:
            del self.network.listeners[key]
        live.update(runstate="running", phase="resumed", dirty=set())
        self._emit(mid, "RESUME", {})
        return {"resumed": True, "already": False}

    def cancel_migration(self, machine_id):
        return self._wrap(self._cancel_migration, machine_id)

    def _cancel_migration(self, mid):
        live = self._running(mid)
        # (as QEMU, "completed" stays said of the migration that brought a machine here)
        if cannot_cancel(live["runstate"], live["migration"], live):
            raise Conflict(f"machine {mid}: its migration completed; it cannot be cancelled")
        streaming = live["migration"] not in ("none", "cancelled", "failed")
        if streaming:
            live["migration"] = "cancelled"
            self._emit(mid, "MIGRATION", {"status": "cancelled"})
        self._live_forget(mid)
        for job in list(live["mirrors"]):
            m = live["mirrors"].pop(job)
            self._emit(mid, "BLOCK_JOB_CANCELLED", {"device": job, "type": "mirror",
                                                    "offset": m["offset"], "len": m["len"]})
        target = live.pop("target", None)
        if target is not None:
            tdrv, tmid = target
            tlive = tdrv._live(tmid)
            if streaming and tdrv._alive(tmid) and tlive["runstate"] == "inmigrate":
                # As QEMU's incoming migration does once its stream broke: the target ends.
                tdrv.crash(tmid, "exited with code 1")
        if live["runstate"] in ("finish-migrate", "paused"):
            live["runstate"] = "running"
            self._emit(mid, "RESUME", {})
        live.update(role=None, phase="cancelled")
        return {"cancelled": True}

    def migration_status(self, machine_id):
        return self._wrap(self._migration_status, machine_id)

    def _migration_status(self, mid):
        live = self._running(mid)
        mig = {"status": live["migration"]}
        if live["migration"] != "none":
            mig["ram"] = {"transferred": live["passes"] * 1024, "remaining": 0,
                          "total": 1024, "mbps": 100.0, "dirty-sync-count": live["passes"]}
        if live["migration"] == "completed" and live["role"] == "source":
            mig.update(downtime=live["downtime"], **{"total-time": 10, "setup-time": 1})
        now = self.reactor.seconds()
        for m in live["mirrors"].values():
            # Copied in proportion to the time, until the target stops answering.
            tdrv, tmid = live["target"]
            if not m["ready"] and not m.get("hung_at") and tdrv._hung(tmid):
                m["hung_at"] = now
            if not m["ready"]:
                until = m.get("hung_at") or now
                m["offset"] = int(m["len"] * min(1.0, (until - m["started"]) / m["delay"]))
        jobs = [dict(m, device=m["job"]) for m in live["mirrors"].values()]
        return status_doc(live["runstate"], mig, jobs,
                          {"role": live["role"], "phase": live["phase"]})

    def dirty_extents(self, machine_id, volume_id):
        def extents():
            live = self._running(machine_id)
            if live["dirty"] is None:
                raise Conflict(f"machine {machine_id} has no dirty bitmap")
            return [[b * VERIFY_BLOCK, VERIFY_BLOCK] for b in sorted(live["dirty"])]
        return self._wrap(extents)

    # --- the fake guest --------------------------------------------------------------------

    def guest_write_file(self, machine_id, name, data):
        """The guest writes file C{name}: to its memory and a block of its first volume."""
        live = self._running(machine_id)
        if live["runstate"] != "running":
            raise Unavailable(f"machine {machine_id} is paused ({live['runstate']})")
        live["files"][name] = data
        spec = self.host.machines[machine_id]["spec"]
        path = spec["volumes"][0]["path"]
        blocks = os.path.getsize(path) // VERIFY_BLOCK
        block = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % blocks
        with open(path, "r+b") as f:
            f.seek(block * VERIFY_BLOCK)
            f.write(data[:VERIFY_BLOCK])
        if live["dirty"] is not None:
            live["dirty"].add(block)
        # A write-blocking mirror in sync: on both sides before it completes.
        if any(m["ready"] for m in live["mirrors"].values()):
            for m in live["mirrors"].values():
                self._sync(machine_id, m["drive"])
        return name

    def guest_read_file(self, machine_id, name):
        live = self._running(machine_id)
        return live["files"].get(name)

    def _live_recover(self, mid):
        """As the QEMU driver's C{live_recover}: resolve what a restart left (or C{None})."""
        live = self.host.machines.get(mid, {}).get("live")
        if not live:
            return None
        if live["runstate"] == "inmigrate":
            self.host.machines[mid]["alive"] = False
            return "ended: its incoming migration was interrupted by an agent restart"
        if live["runstate"] == "postmigrate":
            return "paused: its live migration completed; the target holds the machine"
        if live["role"] == "source" and (live["mirrors"] or live["migration"] not in (
                "none", "cancelled", "failed")):
            self._status.setdefault(mid, {"state": "running"})
            self._cancel_migration(mid)
            return "recovered: its interrupted live migration was cancelled; it runs here"
        if live["role"] == "target" and live["runstate"] == "paused":
            return "paused: its incoming migration completed; waiting to be resumed"
        return None


__all__ = ["FakeLiveMigration", "FakeNetwork", "NETWORK"]
