"""
The QEMU hypervisor driver: one C{qemu-system-x86_64} process per machine, controlled
through QMP over a UNIX socket.

Each machine has a directory C{<root>/<id>/} holding:
 - C{spec.json}: the spec it was started with;
 - C{state.json}: its last known state and reason (so a new agent knows a machine it
   stopped from one that died);
 - C{qemu.pid}: written by QEMU (C{-pidfile});
 - C{qmp.sock}: the QMP socket (in the temporary directory instead if the path would be
   too long for a UNIX socket);
 - C{console.log}: the serial console (appended to across starts);
 - C{qemu.log}: QEMU's own stdout and stderr.

QEMU processes are started in their own session (C{setsid}), with no pipes to the agent, so
they outlive an agent restart; L{QemuDriver.recover} finds them again by their pid file,
checks the pid still is that QEMU (its command line names the machine directory) and
reconnects QMP. A machine started by this process is watched through its process (exit code
or signal at once); a recovered one through its QMP connection, whose end means QEMU ended.

L{QemuDriver.close} lets go of running machines (they keep running, for the next agent to
adopt) but not of a start under way: that QEMU is killed, and its start fails with
L{Unavailable} ("the agent is shutting down"). A start records C{running} in C{state.json}
only once QMP answers, and QEMU writes its pid file and QMP socket at moments of its own,
so a half-started QEMU is not reliably adoptable; and its start has been reported failed,
so nobody would expect it to be running. See L{QemuDriver.close}.
"""

import errno
import hashlib
import json
import os
import shutil
import signal
import tempfile

from twisted.internet import utils
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from zwrm.drivers import accel as _accel
from zwrm.drivers import boot as _boot
from zwrm.drivers import cloudinit as _cloudinit
from zwrm.drivers import diskfull as _diskfull
from zwrm.drivers import diskimage
from zwrm.drivers import qmp as _qmp
from zwrm.drivers import spec as _spec
from zwrm.drivers.backup import QemuVolumeBackup
from zwrm.drivers.live import QemuLiveMigration
from zwrm.errors import Conflict, InvalidArgument, NotFound, Unavailable
from zwrm.files import write_atomically
from zwrm.interfaces import IHypervisorDriver, ILiveMigration, IVolumeBackup

log = Logger()

#: How the kernel's panic line begins (the rest says why).
PANIC = "Kernel panic - not syncing"

#: The longest path a UNIX socket may have (Linux C{sun_path} less the NUL).
MAX_SOCKET_PATH = 107

#: The machine's writable root disk (qcow2 over the cached base) and the record of its base.
ROOT_OVERLAY = "root.qcow2"
ROOT_BASE = "root.base.json"

#: The cloud-init NoCloud seed disk.
SEED = "seed.iso"

#: UEFI firmware (Debian package ovmf), for self-booting disks whose image says uefi: the
#: code (read-only flash) and the template of the variable store each machine gets a
#: writable copy of (L{EFI_VARS}, kept across stops and starts, deleted with the machine).
OVMF = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
EFI_VARS = "efivars.fd"

#: Why a start under way when the driver closes fails.
SHUTTING_DOWN = "the agent is shutting down"


def _opt(path):
    """A path inside a QEMU option string, where a comma must be doubled."""
    return path.replace(",", ",,")


def _nic_argv(spec):
    """
    The network device of a machine.

    With C{spec["nic"]} (C{{"tap", "mac"}}): a virtio NIC on that TAP device, which the
    agent created and owns (C{script=no}: QEMU needs no privilege to use it).  Without:
    QEMU user-mode networking with C{restrict=on}, so the guest reaches nothing of the host
    (not even its loopback through 10.0.2.2) and only the explicit C{forwards} from
    127.0.0.1 reach the guest.
    """
    nic = spec.get("nic")
    if nic:
        return ["-netdev", f"tap,id=n0,ifname={_opt(nic['tap'])},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n0,mac={nic['mac']}"]
    fwd = "".join(f",hostfwd=tcp:127.0.0.1:{f['host']}-:{f['guest']}" for f in spec["forwards"])
    mac = f",mac={spec['mac']}" if spec.get("mac") else ""
    return ["-netdev", f"user,id=n0,restrict=on{fwd}", "-device", f"virtio-net-pci,netdev=n0{mac}"]


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited already.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pid_cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _proc_usage(pid):
    """C{(cpu seconds, resident bytes)} of process C{pid} from C{/proc/<pid>/stat}, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after "pid (comm)": state is fields[0], utime 11, stime 12, rss (pages) 21
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def _tap_usage(tap):
    """A TAP device's byte and packet counters (C{/sys/class/net/<tap>/statistics}), or None."""
    out = {}
    for name in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"):
        try:
            with open(f"/sys/class/net/{tap}/statistics/{name}") as f:
                out[name] = int(f.read())
        except (OSError, ValueError):
            return None
    return out


class _Machine:
    def __init__(self, machine_id, directory):
        self.id = machine_id
        self.dir = directory
        self.spec = None
        self.state = "stopped"
        self.reason = ""
        self.pid = None
        self.transport = None  # IProcessTransport if we started it
        self.qmp = None
        self.stop_requested = False
        self.guest_shutdown = False
        self.waiters = []
        self.watch = None
        # While a start kills a QEMU that did not answer on QMP: why (the state's reason if
        # the kill is what ended it).
        self.kill_reason = None
        # The signal that ended the QEMU this process started (None: it exited, or unknown).
        self.end_signal = None
        # A start is under way (from just before the spawn until the start's result).
        self.starting = False
        # QEMU paused it on a write its disk had no room for (zwrm.drivers.diskfull):
        # DISK_FULL, and the watch that resumes it; else None.
        self.paused = None
        self.room_watch = None
        # The (disk, operation, error) of I/O errors QEMU passed to the guest, logged once.
        self.io_errors = set()

    def path(self, name):
        return os.path.join(self.dir, name)

    def _socket(self, name):
        p = self.path(f"{name}.sock")
        if len(p.encode()) <= MAX_SOCKET_PATH:
            return p
        digest = hashlib.sha256(self.dir.encode()).hexdigest()[:24]
        return os.path.join(tempfile.gettempdir(), f"zwrm-{name}-{digest}.sock")

    @property
    def qmp_path(self):
        """
        C{<dir>/qmp.sock}, or, where that is too long for a UNIX socket, a path in the
        temporary directory derived from the machine directory (so a new agent finds it).
        """
        return self._socket("qmp")

    @property
    def console_path(self):
        """The serial console's socket: C{<dir>/console.sock} (or as L{qmp_path})."""
        return self._socket("console")


class _Closed(Exception):
    """The driver closed while a start was waiting."""


class _QemuProcess(ProcessProtocol):
    def __init__(self, driver, machine):
        self.driver = driver
        self.machine = machine

    def processEnded(self, reason):
        self.machine.end_signal = reason.value.signal
        if reason.check(ProcessDone):
            how = "exited with code 0"
        elif reason.value.signal is not None:
            how = f"was killed by signal {reason.value.signal}"
        else:
            how = f"exited with code {reason.value.exitCode}"
        self.driver._ended(self.machine, how, reason.value.exitCode == 0)


#: The machine type every machine gets (pinned: a live migration needs the same on both sides).
MACHINE_TYPE = "pc-i440fx-7.2"

#: What a machine gets beyond its C{memory_mb} under TCG (see L{memory_arg}).
TCG_RAM_EXTRA_KIB = 8


def memory_arg(memory_mb, accel):
    """
    QEMU's C{-m} for a machine of C{memory_mb} MiB: exactly that under KVM, 8 KiB more under
    TCG.

    Why: QEMU before 9.0 loses guest writes in a live migration under TCG when its RAM is a
    multiple of 256 KiB. Its dirty-bitmap sync takes a fast path for such a range that
    clears the migration's dirty bits without resetting TCG's TLB, so later stores through
    entries already in the TLB are not logged, and the target resumes with stale pages
    (upstream's fix: "system/physmem: Fix migration dirty bitmap coherency with TCG memory
    access", QEMU 9.0; Debian 12 has 7.2). Here it showed as Debian guests that panicked
    after a live drain, and as pages that differed between the paused source and the
    target right after the move. A RAM size that is not a multiple of 256 KiB takes the
    per-page path, which resets the TLB (tests/drivers/test_live.py,
    C{LiveRamTests}). KVM logs dirty pages itself: nothing changes there.
    """
    if accel == "tcg":
        return f"{memory_mb * 1024 + TCG_RAM_EXTRA_KIB}k"
    return str(memory_mb)


@implementer(IHypervisorDriver, ILiveMigration, IVolumeBackup)
class QemuDriver(QemuLiveMigration, QemuVolumeBackup):
    """
    Runs machines as QEMU processes. See L{zwrm.interfaces.IHypervisorDriver}.

    @param reactor: provides process, time and UNIX-socket interfaces.
    @param root: the directory under which each machine gets its own.
    @param accel: C{"auto"}, C{"kvm"} or C{"tcg"}.
    @param qemu_binary: the QEMU program.
    @param stop_timeout: default seconds between the ACPI power-down and the hard stop.
    @param probe_timeout: seconds the KVM probe guest may take.
    @param close_timeout: seconds L{close} waits for the end of a QEMU it killed because its
        start was under way.
    @param ovmf: the UEFI firmware image for disks whose image says C{uefi}.
    @param cpu_model: the C{-cpu} model; L{None}: C{host} under KVM (which does not
        migrate between different hosts), C{qemu64} under TCG. Live migration
        (L{zwrm.drivers.live}) needs the same model on every host.
    @param machine_type: the C{-machine} type (L{MACHINE_TYPE}), the same on every host.
    @param boot_id: this boot of the host (L{zwrm.drivers.boot}); default: the kernel's.
    """

    name = "qemu"

    def __init__(self, reactor, root, accel="auto", qemu_binary="qemu-system-x86_64",
                 stop_timeout=30.0, probe_timeout=10.0, close_timeout=5.0, ovmf=OVMF,
                 ovmf_vars=OVMF_VARS, cpu_model=None, machine_type=MACHINE_TYPE,
                 boot_id=None):
        if accel not in _accel.ACCELS:
            raise InvalidArgument(f"accel must be one of {', '.join(_accel.ACCELS)}, not {accel!r}")
        self.reactor = reactor
        self.root = os.path.abspath(root)
        self.requested_accel = accel
        self.accel = None
        self.qemu_binary = shutil.which(qemu_binary) or qemu_binary
        self.stop_timeout = stop_timeout
        self.probe_timeout = probe_timeout
        self.close_timeout = close_timeout
        self.setsid = shutil.which("setsid")
        self.ovmf = ovmf
        self.ovmf_vars = ovmf_vars
        self._machines = {}
        self._listeners = []
        self._closed = False
        self._choosing = None
        # Called (without arguments) by close(): how each start under way learns of it.
        self._close_hooks = set()
        # Fire (with None) when a start under way has its result.
        self._starts = set()
        self.cpu_model = cpu_model
        self.machine_type = machine_type
        #: Seconds between two looks at a paused machine's disks (L{zwrm.drivers.diskfull}).
        self.disk_room_interval = _diskfull.CHECK_INTERVAL
        self.boot_id = boot_id or _boot.current_boot_id()
        self._live_init()
        os.makedirs(self.root, exist_ok=True)
        self.reserve.refill()

    # --- public -------------------------------------------------------------------------

    def start(self, spec):
        if self._closed:
            raise Conflict("this driver has been closed")
        finished = Deferred()
        self._starts.add(finished)
        started = Deferred()

        def done(result):
            # The start's result first (its callbacks run to their end), then close()'s.
            self._starts.discard(finished)
            (started.errback if isinstance(result, Failure) else started.callback)(result)
            finished.callback(None)

        ensureDeferred(self._start(spec)).addBoth(done)
        return started

    def stop(self, machine_id, timeout=None):
        m = self._get(machine_id)
        if m.state != "running":
            return succeed(self._status(m))
        m.stop_requested = True
        timeout = self.stop_timeout if timeout is None else timeout
        d = self._wait_end(m)
        timers = [self.reactor.callLater(timeout, self._hard_stop, m)]
        if m.qmp is not None:
            pressed = m.qmp.execute("system_powerdown")
            if self.QMP_ANSWER_TIMEOUT < timeout:
                # A QEMU that does not even acknowledge the power button within
                # QMP_ANSWER_TIMEOUT is hung itself (a guest that ignores the button still
                # gets its acknowledgement at once): no use waiting out the guest's time.
                hung = self.reactor.callLater(
                    self.QMP_ANSWER_TIMEOUT, self._hard_stop, m,
                    f"QEMU did not acknowledge the power button within "
                    f"{self.QMP_ANSWER_TIMEOUT:g}s")
                timers.append(hung)
                pressed.addBoth(lambda r: (hung.cancel() if hung.active() else None, r)[1])
            pressed.addErrback(
                lambda f: log.info("machine {id}: power-down request failed: {e}", id=m.id,
                                   e=f.getErrorMessage())
            )
        else:
            self._kill(m)

        def ended(result):
            for timer in timers:
                if timer.active():
                    timer.cancel()
            return result

        return d.addBoth(ended).addCallback(lambda _: self._status(m))

    def destroy(self, machine_id):
        _spec.check_id(machine_id)
        m = self._machines.get(machine_id)
        if m is None:
            d = os.path.join(self.root, machine_id)
            shutil.rmtree(d, ignore_errors=True)
            return succeed(None)
        d = succeed(None)
        if m.state == "running":
            m.stop_requested = True
            d = self._wait_end(m)
            self._kill(m)

        def forget(_):
            self._machines.pop(machine_id, None)
            shutil.rmtree(m.dir, ignore_errors=True)

        return d.addCallback(forget)

    def status(self, machine_id):
        return self._status(self._get(machine_id))

    def list(self):
        return sorted(self._machines)

    def recover(self):
        return ensureDeferred(self._recover())

    def console(self, machine_id, max_bytes=65536):
        m = self._get(machine_id)
        try:
            with open(m.path("console.log"), "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                data = f.read(max_bytes)
        except FileNotFoundError:
            data = b""
        return succeed(data.decode("utf-8", "replace"))

    def console_socket(self, machine_id):
        """
        The UNIX socket of a running machine's serial console (QEMU serves it; one client at
        a time: L{zwrm.agent.console.ConsoleRelay} shares it).

        @raise NotFound: unknown machine. @raise Unavailable: it is not running.
        """
        m = self._get(machine_id)
        if m.state != "running" or m.starting:
            raise Unavailable(f"machine {machine_id} is {m.state}: its console is closed")
        return m.console_path

    def usage(self, machine_id):
        """
        A running machine's counters, for the agent's C{/metrics}
        (L{zwrm.agent.metrics}): QEMU's CPU time and resident memory from
        C{/proc/<pid>/stat}, each disk's from QMP C{query-blockstats}, and, with a TAP
        device (bridge networking), its C{/sys/class/net/<tap>/statistics}.  User-mode
        networking has no host-side device to count: no C{net}.

        @return: C{{"cpu_seconds", "rss_bytes", "memory_bytes", "disks": {drive id:
            {"rd_bytes", "wr_bytes", "rd_operations", "wr_operations"}}, "net":
            {"rx_bytes", "tx_bytes", "rx_packets", "tx_packets"} or None, "tap": its name or None}},
            or L{None}
            if it is not running (or QMP has gone); a Deferred.
        @raise NotFound: unknown machine.
        """
        return ensureDeferred(self._usage(self._get(machine_id)))

    async def _usage(self, m):
        qmp, pid = m.qmp, m.pid
        if m.state != "running" or m.starting or qmp is None or pid is None:
            return None
        proc = _proc_usage(pid)
        if proc is None:
            return None
        try:
            blockstats = await qmp.execute("query-blockstats")
        except _qmp.QMPError:
            return None
        disks = {}
        for entry in blockstats or ():
            name = entry.get("device") or entry.get("qdev") or entry.get("node-name")
            stats = entry.get("stats") or {}
            if name:
                disks[name] = {k: int(stats.get(k, 0)) for k in
                               ("rd_bytes", "wr_bytes", "rd_operations", "wr_operations")}
        tap = ((m.spec or {}).get("nic") or {}).get("tap")
        cpu, rss = proc
        return {"cpu_seconds": cpu, "rss_bytes": rss,
                "memory_bytes": int((m.spec or {}).get("memory_mb", 0)) * 1024 * 1024,
                "disks": disks, "tap": tap, "net": _tap_usage(tap) if tap else None}

    def subscribe(self, listener):
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def close(self):
        """
        Let go of the machines: running ones keep running (a new driver adopts them with
        L{recover}); no QMP connection, timer or process watcher of theirs is left.

        A start under way is ended instead: its start fails with L{Unavailable}
        (C{"the agent is shutting down"}). Before the spawn, no QEMU is started; after it,
        the QMP connection (or the attempt) is dropped, the QEMU is killed and its state
        recorded as C{failed} once its end is seen; one that ended by itself in the meantime
        keeps its own reason. A start that completed already succeeds.

        @return: a Deferred that fires once every start under way has its result: at most
            C{close_timeout} seconds later (a killed QEMU whose end is not seen by then is
            recorded as failed anyway, without waiting further).
        """
        self._closed = True
        for m in self._machines.values():
            if m.starting:
                continue
            if m.watch is not None and m.watch.active():
                m.watch.cancel()
            self._unpause(m)
            if m.qmp is not None:
                m.qmp.close()
                m.qmp = None
            m.transport = None
        starting = [m for m in self._machines.values() if m.starting]
        self._machines = {}
        for hook in list(self._close_hooks):
            hook()
        if not self._starts:
            return succeed(None)
        give_up = self.reactor.callLater(self.close_timeout, self._give_up, starting)

        def finished(_):
            if give_up.active():
                give_up.cancel()

        return gatherResults(list(self._starts)).addCallback(finished)

    def facts(self):
        return {"driver": self.name, "accel": self.accel, "accel_requested": self.requested_accel,
                "qemu": self.qemu_binary}

    # --- internals ----------------------------------------------------------------------

    def _get(self, machine_id):
        _spec.check_id(machine_id)
        try:
            return self._machines[machine_id]
        except KeyError:
            raise NotFound(f"no machine {machine_id!r} on this host") from None

    def _status(self, m):
        return {
            "id": m.id,
            "state": m.state,
            "pid": m.pid if m.state == "running" else None,
            "reason": m.reason,
            "console": m.path("console.log"),
            "forwards": list((m.spec or {}).get("forwards", [])),
            "paused": m.paused if m.state == "running" else None,
        }

    def _set(self, m, state, reason):
        m.state, m.reason = state, reason
        try:
            with open(m.path("state.json.tmp"), "w") as f:
                json.dump({"state": state, "reason": reason, "boot_id": self.boot_id}, f)
            os.replace(m.path("state.json.tmp"), m.path("state.json"))
        except OSError as e:
            log.warn("machine {id}: cannot record its state: {e}", id=m.id, e=e)
        status = self._status(m)
        for listener in list(self._listeners):
            try:
                listener(dict(status))
            except Exception:
                log.failure("machine listener failed")

    def _give_up(self, machines):
        for m in machines:
            if m.state != "running":
                continue
            log.warn("machine {id}: QEMU (pid {pid}) was killed but did not end within {t} s",
                     id=m.id, pid=m.pid, t=self.close_timeout)
            m.transport = None
            if m.qmp is not None:
                m.qmp.close()
                m.qmp = None
            # The pid file stays: a new agent finds a QEMU still there, fails to reach it on
            # QMP and kills it again.
            self._set(m, "failed", f"{m.kill_reason or 'QEMU was killed'}; it had not ended "
                                   f"{self.close_timeout} s later")
            waiters, m.waiters = m.waiters, []
            for d in waiters:
                if not d.called:
                    d.callback(None)

    def _unless_closed(self, d):
        """
        C{d}'s result, or a failure with L{_Closed} if the driver closes first (C{d} goes on,
        and its result is then ignored).
        """
        out = Deferred()

        def closed():
            self._close_hooks.discard(closed)
            if not out.called:
                out.errback(_Closed())

        def result(r):
            self._close_hooks.discard(closed)
            if not out.called:
                (out.errback if isinstance(r, Failure) else out.callback)(r)

        self._close_hooks.add(closed)
        d.addBoth(result)
        return out

    def _wait_end(self, m):
        d = Deferred()
        if m.state != "running":
            d.callback(None)
        else:
            m.waiters.append(d)
        return d

    def _argv(self, m, spec, accel):
        argv = [
            self.qemu_binary,
            "-name", f"zwrm-{m.id}",
            "-accel", accel,
            "-machine", f"type={self.machine_type}",
            "-smp", str(spec["vcpus"]),
            "-m", memory_arg(spec["memory_mb"], accel),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            # The serial console: a socket the agent relays (zwrm console) and a log of
            # everything the guest wrote (zwrm logs), appended to across starts.
            "-chardev", f"socket,id=ser0,path={_opt(m.console_path)},server=on,wait=off,"
            f"logfile={_opt(m.path('console.log'))},logappend=on",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{_opt(m.qmp_path)},server=on,wait=off",
            "-pidfile", m.path("qemu.pid"),
        ]
        argv += ["-cpu", self.cpu_model or ("host" if accel == "kvm" else "qemu64")]
        if m.id in self._incoming:
            # The target of a live migration: paused, waiting for migrate-incoming.
            argv += ["-incoming", "defer", "-S"]
        cmdline = spec["cmdline"]
        if spec["kernel"]:
            if spec["disk"] and not any(a.startswith("root=") for a in cmdline.split()):
                # The root disk is always the first disk.
                cmdline = f"{cmdline} root=/dev/vda".strip()
            argv += ["-kernel", spec["kernel"], "-append", cmdline]
        elif spec["firmware"] == "uefi":
            argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(self.ovmf)}",
                     "-drive", f"if=pflash,format=raw,unit=1,file={_opt(m.path(EFI_VARS))}"]
        if spec["initrd"]:
            argv += ["-initrd", spec["initrd"]]
        # Disks in this order, so the guest enumerates them so: the root disk (vda), the
        # volumes (found by their virtio serial, never by order), the cloud-init seed.
        if spec["disk"]:
            # The machine's own writable overlay over the cached, read-only base.
            boot = "" if spec["kernel"] else ",bootindex=0"
            argv += [
                "-drive", f"file={_opt(m.path(ROOT_OVERLAY))},format=qcow2,if=none,id=root,"
                "cache=writeback,discard=unmap",
                "-device", f"virtio-blk-pci,drive=root{boot}",
            ]
        for i, v in enumerate(spec["volumes"]):
            argv += [
                "-drive", f"file={_opt(v['path'])},format=raw,if=none,id=vol{i},cache=writeback",
                "-device", f"virtio-blk-pci,drive=vol{i},serial={v['serial']}",
            ]
        if os.path.exists(m.path(SEED)):
            argv += [
                "-drive", f"file={_opt(m.path(SEED))},format=raw,if=none,id=seed,readonly=on",
                "-device", "virtio-blk-pci,drive=seed,serial=cidata",
            ]
        argv += self._netdev_args(spec)
        return argv

    def _netdev_args(self, spec):
        """The machine's network: its QEMU arguments (L{_nic_argv}, the one place)."""
        return _nic_argv(spec)

    async def _root_overlay(self, m, base, fmt):
        """
        Make sure the machine has its writable root overlay (qcow2 over C{base}, which QEMU
        opens read-only): kept across stops, starts and agent restarts while its base is the
        same; made again (empty) when the machine starts from another image.
        """
        overlay, record = m.path(ROOT_OVERLAY), m.path(ROOT_BASE)
        want = {"base": os.path.abspath(base), "format": fmt}
        try:
            with open(record) as f:
                have = json.load(f)
        except (OSError, ValueError):
            have = None
        if have == want and os.path.isfile(overlay):
            return overlay
        tmp = overlay + ".tmp"
        try:
            out, err, code = await utils.getProcessOutputAndValue(
                diskimage.qemu_img(),
                ["create", "-q", "-f", "qcow2", "-F", fmt, "-b", want["base"], tmp],
                env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "")}, reactor=self.reactor,
            )
        except OSError as e:
            raise Unavailable(f"machine {m.id}: qemu-img could not be run: {e}") from None
        if code != 0:
            raise Unavailable(f"machine {m.id}: cannot create its root overlay: "
                              f"{err.decode('utf-8', 'replace').strip()}")
        os.chmod(tmp, 0o600)
        os.replace(tmp, overlay)
        write_atomically(record, json.dumps(want))
        return overlay

    async def _start(self, spec):
        spec = _spec.validate(spec)
        for key in ("kernel", "initrd", "disk"):
            if spec[key] and not os.path.isfile(spec[key]):
                raise InvalidArgument(f"{key} {spec[key]} does not exist")
        for v in spec["volumes"]:
            if not os.path.isfile(v["path"]):
                raise InvalidArgument(f"volume {v['id']}: {v['path']} does not exist")
        if spec["disk"]:
            # Before QEMU sees it: qemu-img decides the format and refuses a qcow2 that
            # refers to anything outside itself (backing file, external data file).
            info = await diskimage.inspect(self.reactor, spec["disk"], spec["disk_format"],
                                           what=f"boot disk {spec['disk']}")
            spec["disk_format"] = info["format"]
        uefi = spec["firmware"] == "uefi" and not spec["kernel"]
        if uefi and not (os.path.isfile(self.ovmf) and os.path.isfile(self.ovmf_vars)):
            raise Unavailable(f"machine {spec['id']}: the image boots with UEFI, but this host "
                              f"has no OVMF firmware at {self.ovmf} (install the ovmf package)")
        m = self._machines.get(spec["id"])
        if m is not None and m.state == "running":
            raise Conflict(f"machine {spec['id']!r} is running already")
        if m is None:
            m = _Machine(spec["id"], os.path.join(self.root, spec["id"]))
        if self.accel is None:
            try:
                await self._unless_closed(ensureDeferred(self._choose_accel()))
            except _Closed:
                raise Unavailable(f"machine {spec['id']}: not started: {SHUTTING_DOWN}") from None
        if self._closed:
            raise Unavailable(f"machine {spec['id']}: not started: {SHUTTING_DOWN}")
        os.makedirs(m.dir, mode=0o700, exist_ok=True)
        if spec["disk"]:
            await self._root_overlay(m, spec["disk"], spec["disk_format"])
        if uefi and not os.path.isfile(m.path(EFI_VARS)):
            # The machine's own UEFI variable store (boot entries), from the template (512 KiB).
            tmp = m.path(EFI_VARS + ".tmp")
            shutil.copyfile(self.ovmf_vars, tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, m.path(EFI_VARS))
        if spec["cloud_init"] is not None:
            mac = spec["nic"]["mac"] if spec.get("nic") else spec["mac"]
            docs = _cloudinit.documents(m.id, spec["cloud_init"], spec["volumes"], mac,
                                        (spec.get("nic") or {}).get("network_config"))
            await _cloudinit.build_seed(self.reactor, m.path(SEED), docs)
        else:
            try:
                os.unlink(m.path(SEED))
            except FileNotFoundError:
                pass
        for p in (m.qmp_path, m.console_path, m.path("qemu.pid")):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        # private before QEMU opens the console log (it keeps an existing file's mode)
        fd = os.open(m.path("console.log"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        os.close(fd)
        with open(os.open(m.path("spec.json"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(spec, f)
        argv = self._argv(m, spec, self.accel)
        m.spec = spec
        m.stop_requested = m.guest_shutdown = False
        m.reason = ""
        m.kill_reason = m.end_signal = None
        m.io_errors = set()
        self._machines[m.id] = m
        out = os.open(m.path("qemu.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        exe, args = argv[0], argv
        if self.setsid:
            exe, args = self.setsid, [self.setsid] + argv
        # "running" (without notifying: it is not controllable yet) before the spawn: if QEMU
        # has exited already when spawnProcess registers it (the agent was descheduled after
        # the fork, and QEMU failed fast), Twisted calls processEnded from inside
        # spawnProcess, and _ended must take that end.
        m.transport = m.pid = None
        m.state = "running"
        m.starting = True
        try:
            return await self._spawn(m, exe, args, out, null)
        finally:
            m.starting = False

    async def _spawn(self, m, exe, args, out, null):
        try:
            transport = self.reactor.spawnProcess(
                _QemuProcess(self, m), exe, args, env=dict(os.environ, LC_ALL="C"),
                path=m.dir, childFDs={0: null, 1: out, 2: out},
            )
        except OSError as e:
            self._set(m, "failed", f"QEMU could not be started: {e}")
            raise Unavailable(f"machine {m.id}: QEMU could not be started: {e}") from None
        except BaseException as e:
            self._set(m, "failed", f"QEMU could not be started: {e}")
            raise
        finally:
            os.close(out)
            os.close(null)
        if m.state != "running":
            # It ended already (see above).
            raise self._start_error(m)
        m.transport, m.pid = transport, transport.pid
        if self._closed:
            # The driver closed while QEMU was being spawned.
            return await self._abandon(m)
        ended = self._wait_end(m)
        connecting = ensureDeferred(_qmp.connect(
            self.reactor, m.qmp_path,
            on_event=lambda name, data, ts: self._event(m, name, data),
            on_disconnect=lambda reason: self._qmp_lost(m),
        ))
        first = Deferred()

        def settle(what, value):
            if first.called:
                if what == "qmp":
                    value.close()
            else:
                first.callback((what, value))

        def closed():
            settle("closed", None)

        self._close_hooks.add(closed)
        ended.addCallback(lambda _: settle("ended", None))
        connecting.addCallbacks(lambda p: settle("qmp", p), lambda f: settle("qmp-failed", f))
        what, value = await first
        self._close_hooks.discard(closed)
        if what == "closed":
            # Dropping the connection (attempt) cancels its timers; a connection made closes.
            connecting.cancel()
            connecting.addErrback(lambda f: None)
            return await self._abandon(m)
        if what == "ended":
            connecting.cancel()
            connecting.addErrback(lambda f: None)
            raise self._start_error(m)
        if what == "qmp-failed":
            # QEMU listens on its QMP socket before it sets up the rest of the machine (a
            # host forward, a drive...), so a QEMU that fails at start-up can accept our
            # connection and then exit; the end of that connection can reach us before the
            # end of the process does. The process decides: kill it (a no-op if it is
            # exiting already) and wait for its end. If QEMU exited by itself, its exit and
            # its last words are the error; only if our kill ended it is QMP to blame.
            await self._kill_starting(m, f"QEMU did not answer on QMP: {value.getErrorMessage()}")
        m.qmp = value
        if m.state != "running":
            raise self._start_error(m)
        self._set(m, "running", f"started (accel {self.accel})")
        return self._status(m)

    def _abandon(self, m):
        """Kill a QEMU whose start is under way as the driver closes; wait for its end."""
        return self._kill_starting(m, f"QEMU was killed before it was ready: {SHUTTING_DOWN}")

    async def _kill_starting(self, m, reason):
        """
        Kill a QEMU whose start is under way, for C{reason}; wait for its end and fail the
        start with the reason that end gives (QEMU's own exit and error if it ended by
        itself first, else C{reason}).
        """
        m.stop_requested = False
        m.kill_reason = reason
        self._kill(m)
        await self._wait_end(m)
        error = self._start_error(m)  # (which asks whether the kill ended it)
        m.kill_reason = None
        raise error

    async def _choose_accel(self):
        # One probe, however many machines start at once.
        if self._choosing is not None:
            waiting = Deferred()
            self._choosing.append(waiting)
            await waiting
            return
        self._choosing = []
        try:
            self.accel = await _accel.choose(self.reactor, self.requested_accel,
                                             self.qemu_binary, self.probe_timeout)
        except Exception as e:
            waiters, self._choosing = self._choosing, None
            for d in waiters:
                d.errback(e)
            raise
        waiters, self._choosing = self._choosing, None
        for d in waiters:
            d.callback(self.accel)

    def _event(self, m, name, data):
        log.debug("machine {id}: QMP event {name} {data}", id=m.id, name=name, data=data)
        self._live_event(m, name, data)
        if name == "SHUTDOWN":
            if data.get("guest"):
                m.guest_shutdown = data.get("reason") or "guest-shutdown"
        elif name == "RESET":
            log.info("machine {id}: the guest reset", id=m.id)
        elif name == "STOP":
            log.info("machine {id}: the guest paused", id=m.id)
        elif name == "BLOCK_IO_ERROR":
            self._block_io_error(m, data)
        elif name == "RESUME" and m.paused is not None:
            self._unpause(m)
            if m.state == "running":
                self._set(m, "running", _diskfull.RESUMED)

    def _disk(self, m, device):
        """The name (a volume's id, or C{root}) and host file of QEMU's drive C{device}."""
        spec = m.spec or {}
        if device == "root" and spec.get("disk"):
            return "root", m.path(ROOT_OVERLAY)
        volumes = spec.get("volumes") or []
        if device.startswith("vol") and device[3:].isdigit() and int(device[3:]) < len(volumes):
            v = volumes[int(device[3:])]
            return v["id"], v["path"]
        return device or "?", None

    def _disk_paths(self, m):
        """The host files of the machine's writable disks."""
        spec = m.spec or {}
        paths = [v["path"] for v in spec.get("volumes") or []]
        if spec.get("disk"):
            paths.append(m.path(ROOT_OVERLAY))
        return paths or [m.dir]

    def _block_io_error(self, m, data):
        disk, path = self._disk(m, data.get("device") or "")
        if data.get("action") != "stop" or not data.get("nospace"):
            # The guest sees the error (QEMU's default for any error but ENOSPC). Once per
            # disk and error while the machine runs: a guest may retry a failing write often.
            seen = (disk, data.get("operation"), data.get("reason"))
            if seen not in m.io_errors:
                m.io_errors.add(seen)
                log.warn("machine {id}: disk {disk}: {op} error: {reason} (QEMU: {action})",
                         id=m.id, disk=disk, op=data.get("operation", "I/O"),
                         reason=data.get("reason", "?"), action=data.get("action", "?"))
            return
        if m.paused is None and m.state == "running":
            self._pause(m, disk, path)

    def _pause(self, m, disk, path):
        """QEMU paused the machine on a full disk: say so, and resume it once there is room."""
        reason = _diskfull.paused_reason(disk, path)
        log.warn("machine {id}: {reason}", id=m.id, reason=reason)
        m.paused = _diskfull.DISK_FULL
        m.room_watch = _diskfull.RoomWatch(self.reactor, self.disk_room_interval,
                                           self._disk_paths(m), self.free_bytes,
                                           lambda: self._cont(m), m.id)
        m.room_watch.start()
        self._set(m, "running", reason)

    async def _cont(self, m):
        """
        Continue a machine paused on a full disk, if it still is (QEMU's run state
        C{io-error}): never from another state, as a source whose live migration completed
        (C{postmigrate}: its guest runs on the target; resuming it would run the machine
        twice) or one at its switchover (C{finish-migrate}).  A migration under way goes on
        with its source running again, as any.
        """
        qmp = m.qmp
        if qmp is None or self._waits_to_be_resumed(m):
            return
        status = await qmp.execute("query-status")
        if (status or {}).get("status") != "io-error":
            # Something else holds it now (a live migration took it away): not ours to
            # resume, nor to watch; a write that meets the full disk again pauses it again.
            log.info("machine {id}: not resumed: its run state is {state}, not io-error",
                     id=m.id, state=(status or {}).get("status"))
            self._unpause(m)
            return
        # The room is back: the reserve for migration records first (taken by a machine
        # that left this full disk earlier), so that the next full disk can see this one
        # leave live too; then the write that waited.
        self.reserve.refill()
        await qmp.execute("cont")

    def _waits_to_be_resumed(self, m):
        """
        A live migration's target whose incoming migration has not been finished: only
        C{finish_incoming} resumes it, once the control plane recorded the switchover (it
        arrives in C{io-error} when its source was paused on a full disk).
        """
        record = self._live_record(m) or {}
        return record.get("role") == "target" and record.get("phase") != "resumed"

    def _unpause(self, m):
        if m.room_watch is not None:
            m.room_watch.stop()
        m.paused = m.room_watch = None

    async def _paused_on_full_disk(self, m):
        """
        A QEMU this driver takes over (L{recover}): if it is held on a full disk (run state
        C{io-error}, a drive's I/O status C{nospace}), treat it as if the pause had been
        seen. @return: whether it is.
        """
        if self._waits_to_be_resumed(m):
            return False
        try:
            status = await m.qmp.execute("query-status")
            if (status or {}).get("status") != "io-error":
                return False
            for entry in await m.qmp.execute("query-block") or ():
                if entry.get("io-status") == "nospace":
                    self._pause(m, *self._disk(m, entry.get("device") or ""))
                    return True
        except _qmp.QMPError as e:
            log.warn("machine {id}: cannot ask QEMU whether it is paused: {e}", id=m.id, e=e)
        return False

    def _qmp_lost(self, m):
        if self._closed:
            return
        m.qmp = None
        if m.transport is None and m.state == "running":
            # A recovered machine: the end of QMP is the end of QEMU. Wait for the pid to go.
            self._watch_pid(m, 0)

    def _watch_pid(self, m, n):
        if m.state != "running" or self._closed:
            return
        if m.pid is None or not _pid_alive(m.pid):
            self._ended(m, "ended (exit status unknown: it was started by an earlier agent)",
                        clean=m.guest_shutdown or m.stop_requested)
            return
        delay = 0.05 if n < 40 else 1.0
        if m.watch is not None and m.watch.active():
            m.watch.cancel()
        m.watch = self.reactor.callLater(delay, self._watch_pid, m, n + 1)

    def _ended(self, m, how, clean):
        if m.state != "running" or (self._closed and not m.starting):
            return
        m.transport = None
        if m.watch is not None and m.watch.active():
            m.watch.cancel()
        m.watch = None
        self._unpause(m)
        if m.qmp is not None:
            m.qmp.close()
            m.qmp = None
        self._nbd_release(m)
        if m.guest_shutdown and not m.stop_requested:
            if m.guest_shutdown == "guest-shutdown":
                state, reason = "stopped", "the guest powered off"
            else:
                # With -no-reboot a guest reboot (a kernel panic with panic=-1, too) ends QEMU.
                state, reason = "failed", f"the guest ended itself ({m.guest_shutdown})"
                panic, last = self._console_last_words(m)
                if panic:
                    reason += f": {panic}"
                if last:
                    log.warn("machine {id}: {reason}; the last lines of its console:\n{last}",
                             id=m.id, reason=reason, last="\n".join(last))
        elif m.stop_requested:
            state, reason = "stopped", "stopped on request"
        elif m.kill_reason is not None and m.end_signal == signal.SIGKILL:
            state, reason = "failed", m.kill_reason
        else:
            tail = self._qemu_log_tail(m)
            state, reason = "failed", f"QEMU {how}" + (f": {tail}" if tail else "")
        for p in (m.qmp_path, m.path("qemu.pid")):
            try:
                os.unlink(p)
            except OSError:
                pass
        self._set(m, state, reason)
        m.pid = None
        waiters, m.waiters = m.waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    #: Seconds QEMU has to answer a QMP command before a stop takes it for hung (its
    #: start gives QMP as long to negotiate).
    QMP_ANSWER_TIMEOUT = 10.0

    #: Below this many free bytes on its directory's filesystem, a QEMU that failed at
    #: start-up without a word in its log is taken to have met the full disk.
    FULL_DISK_BYTES = 1 << 20

    def free_bytes(self, path):
        """The bytes an unprivileged process may still write on C{path}'s filesystem."""
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize

    def _start_error(self, m):
        """
        The error of a start whose QEMU ended (L{m.reason} says how): L{Unavailable}, with
        QEMU's last words when its log has them.  A QEMU whose last words are ENOSPC's, or
        that could not even write its log on a filesystem without room, met the full disk:
        C{OSError(ENOSPC)}, which the agent reports as the host's full disk (not "QEMU
        exited with code 1").
        """
        if m.kill_reason is not None and m.end_signal == signal.SIGKILL:  # our kill ended it
            return Unavailable(f"machine {m.id}: {m.reason}")
        tail = self._qemu_log_tail(m)
        if tail:
            full = os.strerror(errno.ENOSPC) in tail  # QEMU's own words
        else:
            try:
                full = self.free_bytes(m.dir) < self.FULL_DISK_BYTES
            except OSError:
                full = False
        if full:
            log.info("machine {id}: {reason} (the disk of {dir} is full)", id=m.id,
                     reason=m.reason, dir=m.dir)
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return Unavailable(f"machine {m.id}: {m.reason}")

    def _qemu_log_tail(self, m):
        try:
            with open(m.path("qemu.log"), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                lines = [x.strip() for x in f.read().decode("utf-8", "replace").splitlines()]
        except OSError:
            return ""
        lines = [x for x in lines if x and "warning:" not in x]
        return lines[-1] if lines else ""

    #: The console lines the agent logs when a guest ends itself, and their longest length.
    CONSOLE_LAST_LINES = 20
    CONSOLE_LINE_CHARS = 200

    def _console_last_words(self, m):
        """
        What the console of a guest that ended itself last said (its last 4 KiB): the
        kernel's panic line if there is one (C{"Kernel panic - not syncing: ..."}, else
        C{""}), and the last L{CONSOLE_LAST_LINES} lines.  The guest wrote them: only
        printable ASCII is kept, each line cut at L{CONSOLE_LINE_CHARS} characters.
        """
        try:
            with open(m.path("console.log"), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                text = f.read().decode("ascii", "replace")
        except OSError:
            return "", []
        lines = []
        for line in text.splitlines():
            line = "".join(c for c in line if " " <= c <= "~").strip()
            if line:
                lines.append(line[:self.CONSOLE_LINE_CHARS])
        # The first: with panic=0 the kernel repeats it at the end ("---[ end Kernel panic
        # - not syncing: ... ]---").
        panic = next((line[line.find(PANIC):] for line in lines if PANIC in line), "")
        return panic, lines[-self.CONSOLE_LAST_LINES:]

    def _hard_stop(self, m, why="it did not power off in time"):
        if m.state == "running":
            log.info("machine {id}: {why}; stopping it hard", id=m.id, why=why)
            self._kill(m)

    def _kill(self, m):
        if m.transport is not None:
            try:
                m.transport.signalProcess("KILL")
            except Exception:
                pass
        elif m.pid is not None and self._is_ours(m, m.pid):
            try:
                os.kill(m.pid, signal.SIGKILL)
            except OSError as e:
                if e.errno != errno.ESRCH:
                    raise
            self._watch_pid(m, 0)
        else:
            self._ended(m, "is gone", clean=True)

    def _is_ours(self, m, pid):
        args = _pid_cmdline(pid)
        return any(a == m.path("qemu.pid").encode() for a in args) and any(
            b"qemu" in a for a in args[:2]
        )

    async def _recover(self):
        found = []
        if self.accel is None:
            # The agent calls recover at start-up: choose the accelerator now, so facts()
            # reports it from the start (a failure is reported again by every start).
            try:
                await self._choose_accel()
            except Exception as e:
                log.error("no usable accelerator: {e}", e=e)
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return found
        for name in names:
            d = os.path.join(self.root, name)
            if name in self._machines or not os.path.isfile(os.path.join(d, "spec.json")):
                continue
            try:
                _spec.check_id(name)
            except InvalidArgument:
                continue
            m = _Machine(name, d)
            try:
                with open(m.path("spec.json")) as f:
                    m.spec = json.load(f)
                with open(m.path("state.json")) as f:
                    last = json.load(f)
            except (OSError, ValueError):
                last = {"state": "failed", "reason": "its state was not recorded"}
            pid = None
            try:
                with open(m.path("qemu.pid")) as f:
                    pid = int(f.read().strip())
            except (OSError, ValueError):
                pass
            self._machines[name] = m
            if pid is not None and _pid_alive(pid) and self._is_ours(m, pid):
                m.pid = pid
                m.state = "running"
                try:
                    m.qmp = await _qmp.connect(
                        self.reactor, m.qmp_path,
                        on_event=lambda n, data, ts, m=m: self._event(m, n, data),
                        on_disconnect=lambda reason, m=m: self._qmp_lost(m),
                        timeout=5.0,
                    )
                except Exception as e:
                    log.warn("machine {id}: running but QMP does not answer ({e}); killing it",
                             id=name, e=e)
                    self._kill(m)
                    m.reason = "it was running but could not be controlled after an agent restart"
                    await self._wait_end(m)
                    self._set(m, "failed", m.reason)
                else:
                    # A live migration left half-way is resolved first (zwrm.drivers.live).
                    why = await self.live_recover(m) if os.path.exists(m.path("live.json")) \
                        else None
                    if m.state == "running" and not await self._paused_on_full_disk(m):
                        self._set(m, "running", why or "recovered after an agent restart")
                    elif m.state != "running":
                        self._set(m, "failed", why)
                    if m.state == "running" and not _pid_alive(pid):
                        self._watch_pid(m, 0)
            elif last.get("state") == "running":
                m.state = "running"
                self._set(m, "failed", _boot.why_it_ended(last.get("boot_id"), self.boot_id))
            else:
                m.state, m.reason = last.get("state", "failed"), last.get("reason", "")
                if m.state not in ("stopped", "failed"):
                    m.state = "failed"
            found.append(self._status(m))
        return found

