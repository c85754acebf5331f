"""
An in-memory L{IHypervisorDriver} for unit tests.

It passes the same contract tests as the QEMU driver (tests/drivers/test_contract.py).
Machines "run" in a L{FakeHost}, which plays the part of the host's process table: it
outlives a driver instance, so a second driver on the same host can L{FakeDriver.recover}
what the first one started. Nothing here is registered as a plugin; agents never use it.
"""

import os

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from zwrm.drivers import diskfull as _diskfull
from zwrm.drivers import spec as _spec
from zwrm.drivers.boot import why_it_ended
from zwrm.drivers.fake_live import FakeLiveMigration
from zwrm.errors import Conflict, InvalidArgument, NotFound
from zwrm.interfaces import IHypervisorDriver, ILiveMigration, IVolumeBackup
from zwrm.sparse import write_sparse


class FakeHost:
    """
    The "processes" of fake machines: machine id -> C{{"alive": bool, "spec": dict}}.

    @ivar boot_delay: seconds (on the driver's clock) a start takes.
    @ivar powerdown_delay: seconds the guest takes to power off after the ACPI request, or
        C{None} for a guest that ignores it (so only the hard stop ends it).
    @ivar free_bytes: the free bytes of every file system of the host, or C{None} for
        plenty (what a paused machine's room check reads).
    """

    def __init__(self, boot_delay=0.0, powerdown_delay=0.5):
        self.machines = {}
        self.boot_delay = boot_delay
        self.powerdown_delay = powerdown_delay
        self.console = {}
        self.free_bytes = None


@implementer(IHypervisorDriver, ILiveMigration, IVolumeBackup)
class FakeDriver(FakeLiveMigration):
    """
    @param reactor: provides C{IReactorTime} (a C{task.Clock} in tests).
    @param root: the directory the driver may keep files in (it writes nothing there but
        checks it exists, as a real driver would).
    @param host: the L{FakeHost}; a new one if C{None}.
    @param network: the L{zwrm.drivers.fake_live.FakeNetwork} its live migrations use.
    """

    name = "fake"

    def __init__(self, reactor, root, host=None, stop_timeout=30.0, network=None,
                 boot_id="boot-1"):
        self.reactor = reactor
        self.root = root
        self.host = host or FakeHost()
        self.boot_id = boot_id  # recorded with each running machine, as QEMU's driver does
        self.stop_timeout = stop_timeout
        self._status = {}
        self._waiters = {}
        self._listeners = []
        self._closed = False
        self._room_watches = {}
        self.disk_room_interval = _diskfull.CHECK_INTERVAL
        self._live_init(network)
        os.makedirs(root, exist_ok=True)

    # helpers for tests ----------------------------------------------------------------

    def crash(self, machine_id, how="was killed by signal 9"):
        """Make a running machine's "process" die, as kill -9 would."""
        self.host.machines[machine_id]["alive"] = False
        if not self._closed:
            self._end(machine_id, "failed", f"QEMU {how}")

    def disk_full(self, machine_id, disk=None):
        """
        Make a running machine's guest write to C{disk} (a volume id; its first volume's if
        L{None}) on a full disk: the host has no room left, and the machine is paused as
        QEMU pauses it.  Once there is room (L{FakeHost.free_bytes}), it resumes and its
        console says C{fake: resumed}.
        """
        proc = self.host.machines[machine_id]
        volumes = proc["spec"]["volumes"]
        v = next((v for v in volumes if v["id"] == disk), volumes[0] if volumes else None)
        self.host.free_bytes = 0
        proc["paused"] = (v["id"], v["path"]) if v else ("root", None)
        self._pause(machine_id)

    def free_bytes(self, path):
        """What the host's file system holding C{path} has free (L{FakeHost.free_bytes})."""
        free = self.host.free_bytes
        return (1 << 40) if free is None else free

    def guest_write(self, machine_id, text):
        """Append C{text} to the machine's console, as its guest would."""
        self.host.console[machine_id] = self.host.console.get(machine_id, "") + text

    # IHypervisorDriver ----------------------------------------------------------------

    def start(self, spec):
        try:
            spec = _spec.validate(spec)
            for key in ("kernel", "initrd", "disk"):
                if spec[key] and not os.path.isfile(spec[key]):
                    raise InvalidArgument(f"{key} {spec[key]} does not exist")
            for v in spec["volumes"]:
                if not os.path.isfile(v["path"]):
                    raise InvalidArgument(f"volume {v['id']}: {v['path']} does not exist")
            mid = spec["id"]
            if self._status.get(mid, {}).get("state") == "running":
                raise Conflict(f"machine {mid!r} is running already")
        except Exception as e:
            return fail(e)
        d = Deferred()

        def boot():
            self.host.machines[mid] = {"alive": True, "spec": spec}
            self.guest_write(mid, "fake: booted\n")
            self._set(mid, spec, "running", "started (accel fake)")
            d.callback(self.status(mid))

        self.reactor.callLater(self.host.boot_delay, boot)
        return d

    def stop(self, machine_id, timeout=None):
        st = self._get(machine_id)
        if st["state"] != "running":
            return succeed(dict(st))
        timeout = self.stop_timeout if timeout is None else timeout
        d = Deferred()
        self._waiters.setdefault(machine_id, []).append(d)
        pd = self.host.powerdown_delay
        if pd is not None and pd < timeout:
            self.reactor.callLater(pd, self._end, machine_id, "stopped", "stopped on request")
        else:
            self.reactor.callLater(timeout, self._end, machine_id, "stopped", "stopped on request")
        return d.addCallback(lambda _: self.status(machine_id))

    def destroy(self, machine_id):
        _spec.check_id(machine_id)
        self._live_forget(machine_id)
        if machine_id in self._status:
            if self._status[machine_id]["state"] == "running":
                self._end(machine_id, "stopped", "stopped on request")
            del self._status[machine_id]
        self.host.machines.pop(machine_id, None)
        self.host.console.pop(machine_id, None)
        return succeed(None)

    def status(self, machine_id):
        return dict(self._get(machine_id))

    def list(self):
        return sorted(self._status)

    def recover(self):
        found = []
        for mid, proc in sorted(self.host.machines.items()):
            if mid in self._status:
                continue
            # A live migration left half-way is resolved first (zwrm.drivers.fake_live).
            why = self._live_recover(mid) if proc["alive"] else None
            if proc["alive"] and proc.get("paused"):
                self._pause(mid)
            elif proc["alive"]:
                self._set(mid, proc["spec"], "running", why or "recovered after an agent restart")
            elif why:
                self._set(mid, proc["spec"], "failed", why)
            elif proc.get("state", "running") == "running":
                self._set(mid, proc["spec"], "failed",
                          why_it_ended(proc.get("boot_id"), self.boot_id))
            else:
                self._set(mid, proc["spec"], proc["state"], proc.get("reason", ""))
            found.append(self.status(mid))
        return succeed(found)

    def console(self, machine_id, max_bytes=65536):
        self._get(machine_id)
        data = self.host.console.get(machine_id, "").encode()[-max_bytes:]
        return succeed(data.decode("utf-8", "replace"))

    def subscribe(self, listener):
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def close(self):
        self._closed = True
        for mid in list(self._live_calls):
            self._live_forget(mid)
        for watch in self._room_watches.values():
            watch.stop()
        self._room_watches = {}
        self._status = {}
        self._listeners = []
        return succeed(None)

    def facts(self):
        return {"driver": self.name, "accel": "fake"}

    # IVolumeBackup ----------------------------------------------------------------------

    def backup_volume(self, machine_id, volume_id, target):
        try:
            st = self._get(machine_id)
            proc = self.host.machines.get(machine_id) or {}
            volumes = proc.get("spec", {}).get("volumes") or []
            v = next((v for v in volumes if v["id"] == volume_id), None)
            if v is None:
                raise NotFound(f"machine {machine_id} has no volume {volume_id!r}")
            if st["state"] != "running":
                raise Conflict(f"machine {machine_id} is {st['state']}: its volume cannot be "
                               "copied while it runs")
            live = proc.get("live") or {}
            if live.get("role") and live.get("phase") not in ("resumed", "cancelled"):
                raise Conflict(f"machine {machine_id} is moving live: its volume cannot be "
                               "copied now")
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                raise Conflict(f"{target} exists already") from None
            with os.fdopen(fd, "wb") as out, open(v["path"], "rb") as src:
                while chunk := src.read(1 << 20):  # sparse, as QEMU's copy ends up
                    write_sparse(out, chunk)
                out.truncate(os.fstat(src.fileno()).st_size)
        except Exception as e:
            return fail(e)
        return succeed(None)

    # internals ------------------------------------------------------------------------

    def _get(self, machine_id):
        _spec.check_id(machine_id)
        try:
            return self._status[machine_id]
        except KeyError:
            raise NotFound(f"no machine {machine_id!r} on this host") from None

    def _pause(self, mid):
        proc = self.host.machines[mid]
        disk, path = proc["paused"]
        watch = self._room_watches.pop(mid, None)
        if watch is not None:
            watch.stop()
        watch = self._room_watches[mid] = _diskfull.RoomWatch(
            self.reactor, self.disk_room_interval, [path or self.root], self.free_bytes,
            lambda: self._resume(mid), mid)
        watch.start()
        self._set(mid, proc["spec"], "running", _diskfull.paused_reason(disk, path))

    def _resume(self, mid):
        proc = self.host.machines.get(mid)
        watch = self._room_watches.pop(mid, None)
        if watch is not None:
            watch.stop()
        if proc is None or not proc.get("paused") or not proc["alive"]:
            return
        proc["paused"] = None
        self.guest_write(mid, "fake: resumed\n")
        self._set(mid, proc["spec"], "running", _diskfull.RESUMED)

    def _set(self, mid, spec, state, reason):
        proc = self.host.machines.get(mid) or {}
        self._status[mid] = {
            "id": mid, "state": state, "reason": reason,
            "pid": 4242 if state == "running" else None,
            "console": os.path.join(self.root, mid, "console.log"),
            "forwards": list(spec.get("forwards", [])),
            "paused": _diskfull.DISK_FULL if state == "running" and proc.get("paused") else None,
        }
        if mid in self.host.machines:
            self.host.machines[mid].update(state=state, reason=reason, boot_id=self.boot_id)
        for listener in list(self._listeners):
            listener(dict(self._status[mid]))

    def _end(self, mid, state, reason):
        if self._closed:
            return
        st = self._status.get(mid)
        if st is None or st["state"] != "running":
            return
        proc = self.host.machines.get(mid)
        watch = self._room_watches.pop(mid, None)
        if watch is not None:
            watch.stop()
        if proc:
            proc["alive"] = False
            proc["paused"] = None
            if state == "stopped":
                self.guest_write(mid, "fake: power down\n")
            self._set(mid, proc["spec"], state, reason)
        for d in self._waiters.pop(mid, []):
            d.callback(None)
