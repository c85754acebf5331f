"""
Live migration for the QEMU driver: L{zwrm.interfaces.ILiveMigration} over QMP.

A running machine and its local disks move to another host's QEMU with a pause of
milliseconds (docs/live-migration.md). The order is the one libvirt and Incus use, verified
with QEMU 7.2 under TCG (see the notes there):

 - target: QEMU started with C{-incoming defer -S} and the same devices over blank volumes of
   the same size (L{QemuLiveMigration.start_incoming}); an NBD server exports every disk,
   writable; C{migrate-incoming} listens.  Both listeners are on the address the agent is
   configured with and retry on a taken port;
 - source: each disk is mirrored into its export (L{QemuLiveMigration.start_mirror}:
   C{blockdev-mirror}, C{sync=full}, C{copy-mode=write-blocking}, a C{speed} limit); once
   every mirror is C{READY} the RAM migration starts with C{pause-before-switchover}
   (L{QemuLiveMigration.start_migration});
 - at C{pre-switchover} (the guest is paused) the source cancels each READY mirror without
   force (a final sync, no pivot) and continues (L{QemuLiveMigration.complete_switchover});
 - the target, once its incoming migration completed, stops its NBD server, starts a dirty
   bitmap on each disk and resumes (L{QemuLiveMigration.finish_incoming}).

Rollback before the target resumes (L{QemuLiveMigration.cancel_migration}):
C{migrate_cancel}, C{block-job-cancel force=true}, C{blockdev-del} of the NBD nodes, C{cont}
if the source was paused; the target QEMU ends on its own (or is destroyed).

The source's NBD connections are the driver's (L{nbd_socket}), passed to QEMU with
C{getfd}: QEMU 7.2 connects an NBD node and reads the server's handshake on its main
thread, and a mirror's writes wait for the server's replies, so a target that stops
answering (a host gone from the network, a QEMU that hangs) would freeze the source's
guest (its C{blockdev-add}) or hold every guest write (C{copy-mode=write-blocking}) for as
long as TCP keeps the connection: for ever on an idle connection. The driver's copy bounds
that: the connection is dropped by the kernel after L{NBD_USER_TIMEOUT} seconds of
unacknowledged data or failed keepalives, a handshake that takes over L{NBD_OPEN_TIMEOUT}
is shut down, and a rollback shuts the connection down before it cancels the mirror, so
what QEMU waits for fails at once and the source runs on.

TLS: with C{tls} the two QEMUs authenticate each other with the hosts' own certificates
from the cluster CA (C{tls-creds-x509}, C{verify-peer}); the target accepts only the source
host's certificate (C{authz-simple} on the subject DN C{CN=<host id>}), the source only the
target host's (C{tls-hostname=<host id>}, which GnuTLS checks against the CN of a host
certificate that has no DNS name).

Each machine in a migration has C{<dir>/live.json}: its role (C{source} or C{target}) and
phase, so L{QemuLiveMigration.live_recover} can resolve what an agent restart left (see
its docstring).
"""

import ctypes
import errno
import json
import os
import socket
import threading

from twisted.internet import utils
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import Logger

from zwrm.drivers import diskfull as _diskfull
from zwrm.drivers import diskimage
from zwrm.drivers.qmp import QMPError
from zwrm.errors import (
    Conflict,
    InvalidArgument,
    NotAuthorized,
    ResourceExhausted,
    Unavailable,
    disk_full,
)
from zwrm.files import Reserve, write_atomically

log = Logger()

TLS_ID = "zwrm-live-tls"
AUTHZ_ID = "zwrm-live-authz"
#: The dirty bitmap the target keeps on each disk from the moment it resumes.
BITMAP = "zwrm-verify"
#: Its granularity, and the block size of the verification.
VERIFY_BLOCK = 64 * 1024
#: Default mirror speed limit (bytes/s): an unthrottled mirror under TCG starves the guest.
MIRROR_SPEED = 100 * 1024 * 1024

#: The driver root's file that keeps room for the migration records (L{zwrm.files.Reserve}).
RESERVE_FILE = ".reserve"

#: Default downtime limit (ms).
DOWNTIME_LIMIT_MS = 300
#: How many ports a listener tries before it gives up.
LISTEN_TRIES = 8
#: The events a live listener is given (QMP names; the fake driver sends the same).
LIVE_EVENTS = ("MIGRATION", "MIGRATION_PASS", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED",
               "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR", "RESUME", "STOP")

#: Seconds the source gives the target's NBD server to accept its connection and answer
#: the handshake (L{QemuLiveMigration.nbd_open_timeout}).
NBD_OPEN_TIMEOUT = 30.0
#: Seconds data sent to the target's NBD server may stay unacknowledged (and keepalive probes
#: unanswered) before the kernel drops the connection (TCP_USER_TIMEOUT).
NBD_USER_TIMEOUT = 20.0

#: Seconds a rolled-back mirror's jobs get to end, and then its NBD nodes to be removed
#: (L{QemuLiveMigration._undo_mirror}); how often they are asked about meanwhile.
UNDO_TIMEOUT = 30.0
UNDO_POLL = 0.1

#: Migration statuses (query-migrate) in which a migration is under way.
ACTIVE = ("setup", "active", "pre-switchover", "device", "postcopy-active",
          "postcopy-paused", "postcopy-recover", "wait-unplug", "cancelling")


def live_drives(spec):
    """
    The disks a live migration moves: C{[(drive id, key, sync)]}; the key is the volume id,
    or C{"root"} for the machine's root overlay (mirrored C{sync=top}: its base image is in
    the target's image cache).  The cloud-init seed is made again on the target.
    """
    out = []
    if spec.get("disk"):
        out.append(("root", "root", "top"))
    for i, v in enumerate(spec.get("volumes") or ()):
        out.append((f"vol{i}", v["id"], "full"))
    return out


def free_port(host):
    """A TCP port that was free on C{host} a moment ago (the listener retries if it is taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as e:
            if e.errno != errno.EADDRNOTAVAIL:
                raise
            # QEMU listens in another network namespace than this process's (the address
            # is not here): a port free here; QEMU's bind tells, and a taken one is retried.
            s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        return s.getsockname()[1]


def _taken(e):
    return isinstance(e, QMPError) and ("in use" in e.desc or "EADDRINUSE" in e.desc
                                         or os.strerror(errno.EADDRINUSE) in e.desc)


def _uri_host(host):
    return f"[{host}]" if ":" in host else host


def check_tls(tls):
    """
    @param tls: C{None} or C{{"ca", "cert", "key", "peer"}}: PEM texts of the cluster CA,
        this host's certificate and key, and the peer's host id.
    @raise InvalidArgument: naming what is missing.
    """
    if tls is None:
        return None
    if not isinstance(tls, dict):
        raise InvalidArgument("tls must be null or {ca, cert, key, peer}")
    for k in ("ca", "cert", "key", "peer"):
        v = tls.get(k)
        if isinstance(v, bytes):
            v = v.decode()
        if not isinstance(v, str) or not v:
            raise InvalidArgument(f"tls.{k} is missing")
    return {k: (tls[k].decode() if isinstance(tls[k], bytes) else tls[k])
            for k in ("ca", "cert", "key", "peer")}


_CLONE_NEWNET = 0x40000000


def _enter_network_namespace(path):
    """Move the calling thread into the network namespace at C{path} (C{/proc/PID/ns/net})."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if hasattr(os, "setns"):  # Python 3.12
            os.setns(fd, _CLONE_NEWNET)
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


def nbd_socket(host, port, pid=None, timeout=NBD_OPEN_TIMEOUT, user_timeout=NBD_USER_TIMEOUT):
    """
    A TCP connection to the NBD server at C{host}:C{port}, made in the network namespace of
    process C{pid} (QEMU's: the source's QEMU may run in another one than the agent), for
    QEMU to use (C{getfd}): blocking, no Nagle, the kernel's keepalive every few seconds
    and C{TCP_USER_TIMEOUT} of C{user_timeout} s, so a peer that is gone is noticed in
    seconds and not after TCP's retransmissions (about 15 minutes), or never on an idle
    connection.

    Blocking: call it in a thread of its own (L{connect_nbd}); it enters the namespace.

    @raise OSError: the connection failed or took over C{timeout} s.
    """
    if pid is not None:
        theirs = f"/proc/{pid}/ns/net"
        try:
            other = os.stat(theirs).st_ino != os.stat("/proc/thread-self/ns/net").st_ino
        except OSError:  # not ours to read (or gone): the agent's own namespace
            other = False
        if other:
            _enter_network_namespace(theirs)
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        s.settimeout(None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle = max(1, int(user_timeout / 4))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, idle)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000))
    except BaseException:
        s.close()
        raise
    return s


def connect_nbd(reactor, host, port, pid=None, timeout=NBD_OPEN_TIMEOUT,
                user_timeout=NBD_USER_TIMEOUT):
    """
    L{nbd_socket} in a thread of its own (it may enter another network namespace, which
    the reactor's thread pool must not keep).

    @return: a Deferred firing with the socket, or failing with the C{OSError}.
    """
    d = Deferred()  # no canceller: the thread ends within the connect timeout

    def run():
        try:
            s = nbd_socket(host, port, pid, timeout, user_timeout)
        except BaseException as e:
            reactor.callFromThread(d.errback, e)
        else:
            reactor.callFromThread(d.callback, s)

    threading.Thread(target=run, name="zwrm-nbd-connect", daemon=True).start()
    return d


def _check_target(target):
    if not isinstance(target, dict):
        raise InvalidArgument("target must be {host, nbd_port, migration_port, exports}")
    host = target.get("host")
    if not isinstance(host, str) or not host:
        raise InvalidArgument("target.host must be an address")
    for k in ("nbd_port", "migration_port"):
        p = target.get(k)
        if not isinstance(p, int) or isinstance(p, bool) or not 0 < p < 65536:
            raise InvalidArgument(f"target.{k} must be a TCP port, not {p!r}")
    if not isinstance(target.get("exports"), dict):
        raise InvalidArgument("target.exports must map each volume id to its export name")
    return target


def _positive(value, what, integer=True):
    if (not isinstance(value, int | float) or isinstance(value, bool) or value <= 0
            or (integer and not isinstance(value, int))):
        raise InvalidArgument(f"{what} must be a positive number, not {value!r}")
    return value


def _refusal(e, what):
    """A QMP error of a connection to the peer as a zwrm error."""
    desc = getattr(e, "desc", str(e))
    low = desc.lower()
    if "tls" in low or "certificate" in low or "authoriz" in low or "denied" in low \
            or "handshake" in low or "x509" in low:
        return NotAuthorized(f"{what}: the peer refused the TLS session or was refused: {desc}")
    return Unavailable(f"{what}: {desc}")


def parse_dirty_map(entries, length):
    """
    The dirty extents of a bitmap from C{qemu-img map --output=json} of an NBD export read
    with C{x-dirty-bitmap}: QEMU reports the dirty ranges as C{"data": false}.

    @return: C{[[offset, length]]}, merged, within C{length}.
    """
    out = []
    for e in entries:
        if e.get("data", True):
            continue
        start, n = int(e["start"]), int(e["length"])
        if start >= length:
            continue
        n = min(n, length - start)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1][1] += n
        else:
            out.append([start, n])
    return out


class QemuLiveMigration:
    """
    The L{zwrm.interfaces.ILiveMigration} part of L{zwrm.drivers.qemu.QemuDriver} (a mixin:
    it uses the driver's machines, QMP connections and start).
    """

    # --- ILiveMigration ---------------------------------------------------------------

    def migration_facts(self):
        cpu = self.cpu_model or ("host" if self.accel == "kvm" else "qemu64")
        reason = None
        if cpu == "host":
            reason = ("the CPU model is 'host', which does not migrate between different "
                      "hosts: set the driver's cpu_model")
        return {"live": reason is None, "reason": reason, "cpu_model": cpu,
                "machine_type": self.machine_type, "accel": self.accel}

    def live_subscribe(self, machine_id, listener):
        self._get(machine_id)
        lst = self._live_listeners.setdefault(machine_id, [])
        lst.append(listener)
        return lambda: lst.remove(listener) if listener in lst else None

    def start_incoming(self, spec, listen, tls=None, postcopy=False):
        return ensureDeferred(self._start_incoming(spec, listen, tls, postcopy))

    def start_mirror(self, machine_id, target, tls=None, speed=MIRROR_SPEED):
        return ensureDeferred(self._start_mirror(machine_id, target, tls, speed))

    def start_migration(self, machine_id, target, tls=None, downtime_limit_ms=DOWNTIME_LIMIT_MS,
                        auto_converge=False, postcopy=False, max_bandwidth=None):
        return ensureDeferred(self._start_migration(
            machine_id, target, tls, downtime_limit_ms, auto_converge, postcopy, max_bandwidth))

    def complete_switchover(self, machine_id, timeout=30.0):
        return ensureDeferred(self._complete_switchover(machine_id, timeout))

    def start_postcopy(self, machine_id):
        return ensureDeferred(self._qmp_call(machine_id, "migrate-start-postcopy"))

    def finish_incoming(self, machine_id, announce=True):
        return ensureDeferred(self._finish_incoming(machine_id, announce))

    def cancel_migration(self, machine_id):
        return ensureDeferred(self._cancel_migration(machine_id))

    def migration_status(self, machine_id):
        return ensureDeferred(self._migration_status(machine_id))

    def dirty_extents(self, machine_id, volume_id):
        return ensureDeferred(self._dirty_extents(machine_id, volume_id))

    # --- helpers ------------------------------------------------------------------------

    #: See L{NBD_OPEN_TIMEOUT} and L{NBD_USER_TIMEOUT}.
    nbd_open_timeout = NBD_OPEN_TIMEOUT
    nbd_user_timeout = NBD_USER_TIMEOUT

    def _live_init(self):
        # Room kept on the machines' file system for their migration records, so that a
        # machine paused on this host's full disk can still leave live
        # (L{zwrm.files.Reserve}); the driver makes it once its root exists.
        self.reserve = Reserve(os.path.join(self.root, RESERVE_FILE), _diskfull.RESERVE_BYTES,
                               _diskfull.RESUME_FREE_BYTES)
        self._live_listeners = {}
        self._incoming = set()
        # machine id -> {NBD node name: this process's copy of QEMU's connection}
        self._nbd_sockets = {}

    def _nbd_release(self, m):
        """Close this process's copies of C{m}'s NBD connections (QEMU keeps its own)."""
        for sock in self._nbd_sockets.pop(m.id, {}).values():
            sock.close()

    def _nbd_shut(self, m):
        """
        Shut C{m}'s NBD connections down: QEMU's reads and writes on them fail at once.
        (This process's copies stay open until L{_nbd_release}.)
        """
        for sock in self._nbd_sockets.get(m.id, {}).values():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _nbd_connect(self, m, host, port):
        """A Deferred connection to the NBD server C{host}:C{port} for C{m}'s QEMU."""
        return connect_nbd(self.reactor, host, port, m.pid, self.nbd_open_timeout,
                           self.nbd_user_timeout)

    async def _add_nbd_node(self, m, node, target, export, tls):
        """
        C{blockdev-add} the NBD node C{node} for C{export} of C{target} over a connection
        of this process's (L{connect_nbd}) given to QEMU; shut down if QEMU's handshake
        takes over L{nbd_open_timeout} s (QEMU's main thread waits in it).
        """
        what = f"machine {m.id}: connecting to the target's NBD export {export}"
        try:
            sock = await self._nbd_connect(m, target["host"], target["nbd_port"])
        except OSError as e:
            raise Unavailable(f"{what} at {_uri_host(target['host'])}:{target['nbd_port']}: "
                              f"{e.strerror or e}") from None
        self._nbd_sockets.setdefault(m.id, {})[node] = sock
        q = m.qmp
        fdname = node
        try:
            await q.execute_with_fd("getfd", {"fdname": fdname}, sock.fileno())
        except QMPError as e:
            raise Unavailable(f"{what}: getfd: {e.desc}") from None
        # discard=unmap: the mirror writes a hole's zeros to the target as unmapped (a hole
        # there too, not counted against its speed limit); without it QEMU sends them as
        # data at the mirror's speed (an empty 100 GiB volume: 17 minutes at 100 MiB/s).
        args = {"driver": "nbd", "node-name": node, "discard": "unmap",
                "server": {"type": "fd", "str": fdname}, "export": export}
        if tls:
            args.update({"tls-creds": TLS_ID, "tls-hostname": tls["peer"]})
        late = []

        def too_late():
            late.append(True)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        watchdog = self.reactor.callLater(self.nbd_open_timeout, too_late)
        try:
            try:
                await q.execute("blockdev-add", args)
            except QMPError as e:
                if late or "Duplicate nodes" not in e.desc:
                    raise
                # A node of this name outlived a mirror rolled back earlier (its removal
                # did not succeed in time): it goes first (QEMU checks the name before it
                # takes the connection), then the node is added once more.
                if not await self._remove_node(m, q, node):
                    raise Unavailable(f"{what}: an earlier mirror's node {node} is still "
                                      "there and cannot be removed") from None
                await q.execute("blockdev-add", args)
        except QMPError as e:
            if not late:
                raise _refusal(e, what) from None
        finally:
            if watchdog.active():
                watchdog.cancel()
        if late:
            raise Unavailable(f"{what}: the target's NBD server did not answer within "
                              f"{self.nbd_open_timeout:g} s")

    def _live_event(self, m, name, data):
        if name not in LIVE_EVENTS:
            return
        for listener in list(self._live_listeners.get(m.id, ())):
            try:
                listener(name, dict(data or {}))
            except Exception:
                log.failure("live-migration listener failed")

    def _controllable(self, machine_id):
        m = self._get(machine_id)
        if m.state != "running" or m.starting or m.qmp is None:
            raise Conflict(f"machine {machine_id} is {m.state}: it cannot migrate")
        return m

    async def _qmp_call(self, machine_id, command, args=None):
        m = self._controllable(machine_id)
        try:
            return await m.qmp.execute(command, args)
        except QMPError as e:
            raise Unavailable(f"machine {machine_id}: {command}: {e.desc}") from None

    def _wait_event(self, m, match):
        """A Deferred firing with C{(name, data)} of the next live event that C{match}es."""
        lst = self._live_listeners.setdefault(m.id, [])

        def listener(name, data):
            if not d.called and match(name, data):
                lst.remove(listener)
                d.callback((name, data))

        def cancel(_):
            if listener in lst:
                lst.remove(listener)

        d = Deferred(cancel)
        lst.append(listener)
        return d

    def _record(self, m, **doc):
        try:
            with open(m.path("live.json")) as f:
                have = json.load(f)
        except (OSError, ValueError):
            have = {}
        have.update(doc)
        # A migration under way may take the reserve; the record of one cancelled (no role)
        # is removed instead when there is no room for it (_cancel_migration).
        reserve = self.reserve if have.get("role") else None
        held = reserve is not None and (reserve.held() or reserve.refill())
        write_atomically(m.path("live.json"), json.dumps(have), reserve=reserve)
        if held and not reserve.held():
            log.warn("machine {id}: this host's disk is full: its migration is recorded in the"
                     " {kib} KiB kept in reserve for it (made again once the disk has room)",
                     id=m.id, kib=self.reserve.size >> 10)

    def _live_record(self, m):
        try:
            with open(m.path("live.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    async def _tls_objects(self, m, tls, endpoint):
        """Write the TLS files (0600 in a 0700 directory) and add the QEMU objects."""
        d = m.path("tls")
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
        role = "server" if endpoint == "server" else "client"
        for name, text in (("ca-cert.pem", tls["ca"]), (f"{role}-cert.pem", tls["cert"]),
                           (f"{role}-key.pem", tls["key"])):
            p = os.path.join(d, name)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        q = m.qmp
        for oid in (AUTHZ_ID, TLS_ID):
            try:
                await q.execute("object-del", {"id": oid})
            except QMPError:
                pass
        await q.execute("object-add", {"qom-type": "tls-creds-x509", "id": TLS_ID, "dir": d,
                                       "endpoint": endpoint, "verify-peer": True})
        if endpoint == "server":
            # The subject DN as GnuTLS writes it: a host certificate's subject is its CN.
            await q.execute("object-add", {"qom-type": "authz-simple", "id": AUTHZ_ID,
                                           "identity": f"CN={tls['peer']}"})

    async def _drive_nodes(self, q):
        """Drive id -> the node name of its top node (query-block)."""
        out = {}
        for b in await q.execute("query-block") or ():
            ins = b.get("inserted")
            if ins and b.get("device"):
                out[b["device"]] = ins.get("node-name")
        return out

    async def _listen(self, m, what, host, start):
        """Run C{start(port)} on free ports until one is not taken; @return: the port."""
        last = None
        for _ in range(LISTEN_TRIES):
            try:
                port = free_port(host)
            except OSError as e:
                raise Unavailable(f"machine {m.id}: {what}: cannot listen on {host}: "
                                  f"{e.strerror or e}") from None
            try:
                await start(port)
                return port
            except QMPError as e:
                if not _taken(e):
                    raise Unavailable(f"machine {m.id}: {what} on {host}:{port}: {e.desc}") from None
                last = e
                log.info("machine {id}: {what}: port {port} was taken; trying another",
                         id=m.id, what=what, port=port)
        raise Unavailable(f"machine {m.id}: {what}: no free port on {host} after "
                          f"{LISTEN_TRIES} tries ({last.desc if last else ''})")

    # --- target ---------------------------------------------------------------------------

    async def _start_incoming(self, spec, listen, tls, postcopy=False):
        tls = check_tls(tls)
        if not isinstance(listen, str) or not listen:
            raise InvalidArgument("listen must be the address the target listens on")
        mid = spec.get("id") if isinstance(spec, dict) else None
        self._incoming.add(mid)
        try:
            await self.start(spec)
        finally:
            self._incoming.discard(mid)
        m = self._get(mid)
        try:
            q = m.qmp
            self._record(m, role="target", phase="incoming", peer=tls and tls["peer"])
            # Post-copy needs the capability on both sides (and userfaultfd here).
            await q.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True},
                {"capability": "postcopy-ram", "state": bool(postcopy)}]})
            if tls:
                await self._tls_objects(m, tls, "server")
            nodes = await self._drive_nodes(q)
            nbd = {}
            if tls:
                nbd = {"tls-creds": TLS_ID, "tls-authz": AUTHZ_ID}

            def nbd_start(port):
                return q.execute("nbd-server-start", dict(nbd, addr={
                    "type": "inet", "data": {"host": listen, "port": str(port)}}))

            nbd_port = await self._listen(m, "the NBD server", listen, nbd_start)
            exports = {}
            for drive, key, _sync in live_drives(m.spec):
                await q.execute("block-export-add", {
                    "type": "nbd", "id": f"zwrm-export-{drive}", "node-name": nodes[drive],
                    "name": drive, "writable": True})
                exports[key] = drive
            if tls:
                await q.execute("migrate-set-parameters", {"tls-creds": TLS_ID,
                                                           "tls-authz": AUTHZ_ID})

            def incoming(port):
                return q.execute("migrate-incoming",
                                 {"uri": f"tcp:{_uri_host(listen)}:{port}"})

            mig_port = await self._listen(m, "the migration listener", listen, incoming)
        except BaseException as e:
            # It never ran a guest: end it and forget it (its directory too).
            await self.destroy(mid)
            if isinstance(e, QMPError):
                raise Unavailable(f"machine {mid}: incoming migration: {e.desc}") from None
            raise
        return {"host": listen, "nbd_port": nbd_port, "migration_port": mig_port,
                "exports": exports}

    async def _end_failed_target(self, m):
        if m.state == "running":
            m.stop_requested = True
            d = self._wait_end(m)
            self._kill(m)
            await d

    async def _finish_incoming(self, machine_id, announce):
        m = self._controllable(machine_id)
        q = m.qmp
        try:
            status = (await q.execute("query-status"))["status"]
            mig = (await q.execute("query-migrate")).get("status")
            record = self._live_record(m) or {}
            if record.get("role") != "target":
                raise Conflict(f"machine {machine_id} is not the target of a migration")
            if status == "running" and record.get("phase") == "resumed":
                return {"resumed": True, "already": True}
            # io-error: the source was paused on its full disk when it moved; QEMU brought
            # the write that waited, which the cont below retries here.
            if mig != "completed" or status not in ("paused", "prelaunch", "io-error"):
                raise Conflict(f"machine {machine_id}: its incoming migration is not complete "
                               f"({status}, migration {mig})")
            await q.execute("nbd-server-stop")
            nodes = await self._drive_nodes(q)
            for drive, _key, _sync in live_drives(m.spec):
                try:
                    await q.execute("block-dirty-bitmap-add", {
                        "node": nodes[drive], "name": BITMAP, "granularity": VERIFY_BLOCK})
                except QMPError as e:
                    if "already" not in e.desc:
                        raise
            await q.execute("cont")
        except QMPError as e:
            raise Unavailable(f"machine {machine_id}: resuming after the migration: {e.desc}") \
                from None
        self._record(m, phase="resumed")
        if announce:
            try:
                await q.execute("announce-self", {"initial": 50, "max": 550, "rounds": 5,
                                                  "step": 100})
            except QMPError as e:
                log.info("machine {id}: announce-self failed: {e}", id=m.id, e=e.desc)
        return {"resumed": True, "already": False}

    async def _dirty_extents(self, machine_id, volume_id):
        m = self._controllable(machine_id)
        drive = {key: d for d, key, _s in live_drives(m.spec)}.get(volume_id)
        if drive is None:
            raise InvalidArgument(f"machine {machine_id} has no volume {volume_id!r}")
        size = None
        for v in m.spec.get("volumes") or ():
            if v["id"] == volume_id:
                size = os.path.getsize(v["path"])
        q = m.qmp
        sock = m.path("verify.sock")
        if len(sock.encode()) > 107:
            sock = m._socket("verify")
        nodes = await self._drive_nodes(q)
        try:
            os.unlink(sock)
        except FileNotFoundError:
            pass
        node, snap = nodes[drive], BITMAP + "-snapshot"
        try:
            # A read-only export takes only a disabled bitmap: a copy of the live one, as it
            # is now (it only grows).
            try:
                await q.execute("block-dirty-bitmap-remove", {"node": node, "name": snap})
            except QMPError:
                pass
            await q.execute("block-dirty-bitmap-add", {"node": node, "name": snap,
                                                       "granularity": VERIFY_BLOCK,
                                                       "disabled": True})
            await q.execute("block-dirty-bitmap-merge", {"node": node, "target": snap,
                                                         "bitmaps": [BITMAP]})
            await q.execute("nbd-server-start", {"addr": {"type": "unix",
                                                          "data": {"path": sock}}})
            await q.execute("block-export-add", {
                "type": "nbd", "id": "zwrm-verify", "node-name": node,
                "name": "verify", "writable": False, "bitmaps": [snap]})
        except QMPError as e:
            raise Unavailable(f"machine {machine_id}: cannot read its dirty bitmap: {e.desc}") \
                from None
        try:
            out, err, code = await utils.getProcessOutputAndValue(
                diskimage.qemu_img(),
                ["map", "--output=json", "--image-opts",
                 f"driver=nbd,export=verify,server.type=unix,server.path={sock},"
                 f"x-dirty-bitmap=qemu:dirty-bitmap:{snap}"],
                env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "")}, reactor=self.reactor)
        finally:
            for cmd, args in (("block-export-del", {"id": "zwrm-verify"}),
                              ("nbd-server-stop", None),
                              ("block-dirty-bitmap-remove", {"node": node, "name": snap})):
                try:
                    await q.execute(cmd, args)
                except QMPError:
                    pass
        if code != 0:
            raise Unavailable(f"machine {machine_id}: qemu-img map of the dirty bitmap failed: "
                              f"{err.decode('utf-8', 'replace').strip()}")
        return parse_dirty_map(json.loads(out), size if size is not None else 1 << 62)

    # --- source ---------------------------------------------------------------------------

    async def _start_mirror(self, machine_id, target, tls, speed):
        tls = check_tls(tls)
        _check_target(target)
        _positive(speed, "speed")
        m = self._controllable(machine_id)
        drives = live_drives(m.spec)
        for _d, key, _s in drives:
            if key not in target["exports"]:
                raise InvalidArgument(f"target.exports has no export for {key!r}")
        q = m.qmp
        try:
            self._record(m, role="source", phase="mirroring", peer=tls and tls["peer"])
        except OSError as e:
            if disk_full(e):
                # (a machine paused on this full disk, say: the cold path can still move it)
                raise ResourceExhausted(f"machine {machine_id}: this host's disk is full: its "
                                        f"migration cannot be recorded ({e.strerror})") from None
            raise
        added, started = [], []
        try:
            await q.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True}]})
            if tls:
                await self._tls_objects(m, tls, "client")
            for drive, key, sync in drives:
                node = f"zwrm-nbd-{drive}"
                await self._add_nbd_node(m, node, target, target["exports"][key], tls)
                added.append(node)
                await q.execute("blockdev-mirror", {
                    "job-id": f"zwrm-mirror-{drive}", "device": drive, "target": node,
                    "sync": sync, "speed": int(speed), "copy-mode": "write-blocking"})
                started.append(f"zwrm-mirror-{drive}")
        except BaseException as e:
            await self._undo_mirror(m, started, added)
            if isinstance(e, QMPError):
                raise Unavailable(f"machine {machine_id}: mirror: {e.desc}") from None
            raise
        return {"jobs": started}

    async def _undo_mirror(self, m, jobs, nodes):
        """
        End C{m}'s mirror C{jobs} and remove its NBD C{nodes}, so that the machine runs
        on as before and a later mirror can add its nodes again.

        The connections are cut first: what the mirror (and a guest write) waits for from
        the target fails at once, so the cancel does not wait for a peer that is gone. A
        job the cut failed already, or is failing, cannot be cancelled (QEMU: "not
        found", or a job "aborting" that "cannot accept command verb 'cancel'"): it is
        waited for until QEMU no longer lists it, since its node cannot be removed before.
        Bounded: L{UNDO_TIMEOUT} for the jobs, then as long again for the nodes; what is
        left is logged (and a node left is removed before the next mirror adds it).
        """
        self._nbd_shut(m)
        q = m.qmp
        if q is None:
            self._nbd_release(m)
            return
        unsure = []
        for job in jobs:
            gone = self._wait_event(m, lambda n, d, job=job: n in (
                "BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR")
                and d.get("device") == job)
            gone.addErrback(lambda f: None)  # cancelled below, or timed out
            try:
                await q.execute("block-job-cancel", {"device": job, "force": True})
            except QMPError:
                gone.cancel()
                unsure.append(job)
                continue
            await gone.addTimeout(UNDO_TIMEOUT, self.reactor)
        if unsure:
            await self._until_jobs_end(m, q, unsure)
        for node in nodes:
            await self._remove_node(m, q, node)
        self._nbd_release(m)

    async def _until_jobs_end(self, m, q, jobs):
        """Wait (at most L{UNDO_TIMEOUT} s) until QEMU lists none of the block C{jobs}."""
        deadline = self.reactor.seconds() + UNDO_TIMEOUT
        while True:
            try:
                left = [j["device"] for j in await q.execute("query-block-jobs")
                        if j.get("device") in jobs]
            except QMPError as e:
                log.warn("machine {id}: cannot list its block jobs: {e}", id=m.id, e=e.desc)
                return
            if not left:
                return
            if self.reactor.seconds() >= deadline:
                log.warn("machine {id}: its mirror jobs {jobs} had not ended {t:g} s after "
                         "they were cut off", id=m.id, jobs=", ".join(left), t=UNDO_TIMEOUT)
                return
            await deferLater(self.reactor, UNDO_POLL, lambda: None)

    async def _remove_node(self, m, q, node):
        """
        C{blockdev-del} C{node}, again while QEMU still lists it and says no (a job that
        used it is ending), at most L{UNDO_TIMEOUT} s.

        @return: whether the node is gone.
        """
        deadline = self.reactor.seconds() + UNDO_TIMEOUT
        while True:
            try:
                await q.execute("blockdev-del", {"node-name": node})
                return True
            except QMPError as e:
                if e.error_class == "Disconnected":
                    return False
                refusal = e.desc
            try:
                listed = {n.get("node-name") for n in await q.execute(
                    "query-named-block-nodes", {"flat": True})}
            except QMPError as e:
                refusal = e.desc
                listed = {node}
            if node not in listed:
                return True
            if self.reactor.seconds() >= deadline:
                log.warn("machine {id}: its NBD node {node} could not be removed within "
                         "{t:g} s: {e}", id=m.id, node=node, t=UNDO_TIMEOUT, e=refusal)
                return False
            await deferLater(self.reactor, UNDO_POLL, lambda: None)

    async def _start_migration(self, machine_id, target, tls, downtime, auto_converge,
                               postcopy, max_bandwidth):
        tls = check_tls(tls)
        _check_target(target)
        _positive(downtime, "downtime_limit_ms")
        if max_bandwidth is not None:
            _positive(max_bandwidth, "max_bandwidth")
        m = self._controllable(machine_id)
        q = m.qmp
        jobs = await q.execute("query-block-jobs")
        mine = {f"zwrm-mirror-{d}" for d, _k, _s in live_drives(m.spec)}
        ready = {j["device"] for j in jobs if j.get("ready")}
        if not mine <= ready:
            raise Conflict(f"machine {machine_id}: its mirrors are not all ready "
                           f"({sorted(mine - ready)})")
        caps = [("events", True), ("pause-before-switchover", True),
                ("auto-converge", bool(auto_converge)), ("postcopy-ram", bool(postcopy))]
        params = {"downtime-limit": int(downtime)}
        if max_bandwidth is not None:
            params["max-bandwidth"] = int(max_bandwidth)
        if tls:
            params.update({"tls-creds": TLS_ID, "tls-hostname": tls["peer"]})
        else:
            params.update({"tls-creds": "", "tls-hostname": ""})
        try:
            await q.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": c, "state": s} for c, s in caps]})
            await q.execute("migrate-set-parameters", params)
            self._record(m, phase="migrating")
            await q.execute("migrate", {"uri": f"tcp:{_uri_host(target['host'])}:"
                                               f"{target['migration_port']}"})
        except QMPError as e:
            raise _refusal(e, f"machine {machine_id}: migrate") from None
        return {"started": True}

    async def _complete_switchover(self, machine_id, timeout):
        m = self._controllable(machine_id)
        q = m.qmp
        try:
            mig = (await q.execute("query-migrate")).get("status")
            if mig != "pre-switchover":
                raise Conflict(f"machine {machine_id}: the migration is {mig}, "
                               "not pre-switchover")
            jobs = {j["device"]: j for j in await q.execute("query-block-jobs")}
            mine = [f"zwrm-mirror-{d}" for d, _k, _s in live_drives(m.spec)]
            for job in mine:
                if not jobs.get(job, {}).get("ready"):
                    raise Conflict(f"machine {machine_id}: mirror {job} is not ready")
            waits = [self._wait_event(m, lambda n, d, job=job: n in (
                "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR")
                and d.get("device") == job) for job in mine]
            for job in mine:
                await q.execute("block-job-cancel", {"device": job})
            ends = await gatherResults([w.addTimeout(timeout, self.reactor) for w in waits],
                                       consumeErrors=True)
            for name, data in ends:
                if name != "BLOCK_JOB_COMPLETED" or data.get("error"):
                    raise Unavailable(f"machine {machine_id}: mirror {data.get('device')} "
                                      f"did not complete its final sync: {name} "
                                      f"{data.get('error', '')}")
            self._record(m, phase="switching")
            # The mirrors are done: QEMU keeps its NBD connections until it ends.
            self._nbd_release(m)
            await q.execute("migrate-continue", {"state": "pre-switchover"})
        except QMPError as e:
            raise Unavailable(f"machine {machine_id}: switchover: {e.desc}") from None
        return {"continued": True}

    async def _cancel_migration(self, machine_id):
        """Roll the source back: it runs on, untouched. Idempotent."""
        m = self._controllable(machine_id)
        q = m.qmp
        try:
            mig = (await q.execute("query-migrate")).get("status")
            run = (await q.execute("query-status"))["status"]
            if cannot_cancel(run, mig, self._live_record(m)):
                raise Conflict(f"machine {machine_id}: its migration completed; it cannot "
                               "be cancelled")
            if mig in ACTIVE:
                done = self._wait_event(m, lambda n, d: n == "MIGRATION" and d.get("status") in (
                    "cancelled", "failed", "completed"))
                await q.execute("migrate_cancel")
                try:
                    name, data = await done.addTimeout(30, self.reactor)
                except Exception:
                    pass
                else:
                    if data.get("status") == "completed":
                        raise Conflict(f"machine {machine_id}: its migration completed "
                                       "before the cancel")
            jobs = [j["device"] for j in await q.execute("query-block-jobs")
                    if j["device"].startswith("zwrm-mirror-")]
            nodes = [f"zwrm-nbd-{d}" for d, _k, _s in live_drives(m.spec)]
            await self._undo_mirror(m, jobs, nodes)
            status = (await q.execute("query-status"))["status"]
            if status in ("paused", "finish-migrate", "postmigrate"):
                await q.execute("cont")
        except QMPError as e:
            raise Unavailable(f"machine {machine_id}: cancelling its migration: {e.desc}") \
                from None
        try:
            self._record(m, role=None, phase="cancelled")
        except OSError as e:
            if not disk_full(e):
                raise
            # No record is as good as "cancelled" (no role: in no migration), and removing
            # one needs no room: the machine runs on here either way.
            try:
                os.unlink(m.path("live.json"))
            except FileNotFoundError:
                pass
            log.info("machine {id}: its cancelled migration's record removed (the disk is "
                     "full)", id=machine_id)
        return {"cancelled": True}

    async def _migration_status(self, machine_id):
        m = self._controllable(machine_id)
        q = m.qmp
        try:
            run = (await q.execute("query-status"))["status"]
            mig = await q.execute("query-migrate")
            jobs = await q.execute("query-block-jobs")
        except QMPError as e:
            raise Unavailable(f"machine {machine_id}: {e.desc}") from None
        return status_doc(run, mig, jobs, self._live_record(m))

    # --- recovery ---------------------------------------------------------------------

    async def live_recover(self, m):
        """
        After an agent restart, resolve a recovered machine that a live migration left
        half-way; called by C{recover()} for each machine still running.  By QEMU's state:

         - C{inmigrate} (a target whose incoming migration had not completed): killed.
           Nothing ran here; the source still holds the machine.
         - a source whose migration is still under way (its mirrors, RAM passes,
           C{pre-switchover}): rolled back (L{cancel_migration}): it runs on, untouched.
         - C{postmigrate} (a source whose migration completed): left paused, never resumed
           here: the target may run the machine.  Its status says so; the control plane
           decides (destroy it once the target runs, never C{cont}).
         - C{paused} after a completed incoming migration (a target that had not resumed):
           left paused until L{finish_incoming} is asked for (the control plane records
           "switched over" first).
         - C{paused} for another reason (a source rolled back but not resumed): resumed.

        @return: a str for the machine's reason, or C{None} if nothing was to be done.
        """
        q = m.qmp
        rec = self._live_record(m)
        try:
            run = (await q.execute("query-status"))["status"]
            mig = (await q.execute("query-migrate")).get("status")
        except QMPError:
            return None
        if run == "inmigrate":
            log.info("machine {id}: an incoming migration was left by an agent restart; "
                     "ending it (the source keeps the machine)", id=m.id)
            await self._end_failed_target(m)
            return "ended: its incoming migration was interrupted by an agent restart"
        if outgoing_completed(run, mig, rec):
            return "paused: its live migration completed; the target holds the machine"
        jobs = []
        if (rec or {}).get("role") == "source":
            try:
                jobs = [j for j in await q.execute("query-block-jobs")
                        if str(j.get("device", "")).startswith("zwrm-mirror-")]
            except QMPError:
                pass
        if mig in ACTIVE or jobs:
            log.info("machine {id}: a live migration (source, {mig}) was left by an agent "
                     "restart; cancelling it", id=m.id, mig=mig)
            await self._cancel_migration(m.id)
            return "recovered: its interrupted live migration was cancelled; it runs here"
        if run in ("paused", "prelaunch", "io-error") and (rec or {}).get("role") == "target" \
                and mig == "completed":
            return "paused: its incoming migration completed; waiting to be resumed"
        if run in ("paused", "finish-migrate") and (rec or {}).get("role") == "source":
            await self._cancel_migration(m.id)
            return "recovered: its interrupted live migration was cancelled; it runs here"
        return None


def outgoing_completed(run, mig, record):
    """
    Whether the machine's own live migration (this host its source) completed, from QEMU's
    run state C{run}, C{query-migrate}'s C{mig} and the machine's C{live.json} C{record}.

    QEMU keeps the status of the last migration: for a machine that arrived by one it says
    C{completed} (its incoming migration) until its next outgoing migration begins, which
    the record marks C{migrating}.  An outgoing migration that completed leaves its source in
    C{finish-migrate}, then C{postmigrate}.
    """
    if run == "postmigrate":
        return True
    if mig != "completed":
        return False
    record = record or {}
    return run == "finish-migrate" or (record.get("role") == "source"
                                       and record.get("phase") in ("migrating", "switching"))


def cannot_cancel(run, mig, record):
    """
    Whether the machine's migration completed, so that a cancel must refuse it: its own
    outgoing one (L{outgoing_completed}), or, on a target, the incoming one, after which the
    target holds the machine (the drain learns so from the refusal).
    """
    return outgoing_completed(run, mig, record) or (
        mig == "completed" and (record or {}).get("role") == "target")


def status_doc(run, mig, jobs, record):
    """The wire form of L{ILiveMigration.migration_status} from QEMU's answers."""
    ram = mig.get("ram") or {}
    mirrors = []
    for j in jobs or ():
        if str(j.get("device", "")).startswith("zwrm-mirror-"):
            mirrors.append({"job": j["device"], "offset": j.get("offset", 0),
                            "len": j.get("len", 0), "ready": bool(j.get("ready")),
                            "speed": j.get("speed", 0)})
    return {
        "runstate": run,
        "migration": mig.get("status", "none"),
        "role": (record or {}).get("role"),
        "phase": (record or {}).get("phase"),
        "mirrors": mirrors,
        "ram": {"transferred": ram.get("transferred", 0), "remaining": ram.get("remaining", 0),
                "total": ram.get("total", 0), "mbps": ram.get("mbps", 0.0),
                "passes": ram.get("dirty-sync-count", 0)},
        "downtime_ms": mig.get("downtime"),
        "expected_downtime_ms": mig.get("expected-downtime"),
        "total_ms": mig.get("total-time"),
        "setup_ms": mig.get("setup-time"),
    }


__all__ = ["QemuLiveMigration", "live_drives", "status_doc", "parse_dirty_map", "check_tls"]
