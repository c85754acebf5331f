"""
The agent's executor: the procedures the control plane calls on one host.

The agent service registers an L{Executor} with
C{register_agent_procedures(session, executor, host_id, log)} (L{zwrm.wamp.procedures}:
under C{zwrm.agent.<host_id>.}, each behind a guard), so each method decorated
with C{@wamp.register("machine.start")} becomes C{zwrm.agent.<host_id>.machine.start}.

Every change of a machine's state or health is passed to C{report(event)} (the agent wires it
to C{zwrm.agent.report} on the control plane) as::

    {"kind": "machine", "host_id", "machine_id", "state", "health", "reason", "host_port"}

States: C{pending} (accepted), C{starting} (its volumes and image are being prepared and its
hypervisor process started), C{running} (the hypervisor runs; C{health} says whether its
service answers), C{stopping}, C{stopped}, C{failed}. Health: C{none} (no check), C{starting}
(within the grace period), C{passing}, C{failing}. A destroyed machine is reported once more
with state C{stopped}, C{"destroyed": True}, and then forgotten.

The machine spec a caller passes to L{Executor.start_machine}::

    {"id", "app", "image": {"kernel", "initrd", "disk", "cmdline"} | "name:tag",
     "vcpus", "memory_mb", "volumes": [{"id", "mount", "size_mb"}], "service_port",
     "health": {"type": "http"|"tcp", "path", "interval", "timeout", "grace"} | None,
     "cloud_init": {"ssh_keys", "user_data", "env"} | None}

A machine booted from a disk gets a cloud-init NoCloud seed (L{zwrm.drivers.cloudinit}) built
from C{cloud_init}: its SSH keys, user-data and environment, and its volumes' mounts.

Volumes that do not exist are created (empty ext4, C{size_mb}); each is attached with its
virtio serial (L{zwrm.drivers.spec.volume_serial}, the guest sees
C{/dev/disk/by-id/virtio-<serial>}), after the root disk, and the kernel command line gets
C{zwrm.vol=<serial>:/mount,...} so an initramfs image can mount them (a cloud image mounts
them through its cloud-init seed). The service port is forwarded from a free port on 127.0.0.1 (C{host_port}).

Each machine's spec and bookkeeping is kept in C{<data_dir>/executor/<id>.json}; the driver
keeps its own files in C{<data_dir>/machines/<id>/}. L{Executor.recover} (called by the agent
at start-up) puts both together again after an agent restart.
"""

import json
import os
import socket

from autobahn import wamp
from autobahn.wamp.types import RegisterOptions
from twisted.internet.defer import ensureDeferred, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from zwrm.agent import health as _health
from zwrm.agent.blockmap import ALGORITHMS, BLOCK_SIZE, PREFERRED, file_digest
from zwrm.agent.console import ConsoleRelay
from zwrm.agent.network.host import check_network
from zwrm.agent.transfer.progress import ProgressThrottle
from zwrm.drivers import cloudinit as _cloudinit
from zwrm.drivers import kernelimage
from zwrm.drivers.spec import check_id, volume_serial
from zwrm.errors import (
    Conflict,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    ZwrmError,
    disk_full,
    from_wire,
    message_of,
)
from zwrm.interfaces import IVolumeBackup
from zwrm.wamp.procedures import cancellable

log = Logger()

STATES = ("pending", "starting", "running", "stopping", "stopped", "failed")


def check_algorithm(name, what="algorithm"):
    """
    @return: C{name}, a block hash this agent knows (L{ALGORITHMS}: volume digests, live
        verification).
    @raise InvalidArgument: any other, naming C{what}.
    """
    if not isinstance(name, str) or name not in ALGORITHMS:
        raise InvalidArgument(f"{what} must be one of {', '.join(sorted(ALGORITHMS))}, not {name!r}")
    return name


def free_port(host="127.0.0.1"):
    """A TCP port on C{host} that nothing listens on now."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def _check_int(spec, key, low, high, default=None):
    v = spec.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise InvalidArgument(f"{key} must be an integer from {low} to {high}, not {v!r}")
    return v


def validate_machine(spec):
    """
    Check a machine spec as the control plane sends it; return a normalized copy.

    @raise InvalidArgument: naming the bad field.
    """
    if not isinstance(spec, dict):
        raise InvalidArgument(f"a machine spec must be a dict, not {type(spec).__name__}")
    out = {"id": check_id(spec.get("id")), "app": spec.get("app")}
    image = spec.get("image")
    if isinstance(image, dict):
        img = {}
        for key in ("kernel", "initrd", "disk"):
            v = image.get(key)
            if v is not None and (not isinstance(v, str) or not os.path.isabs(v)):
                raise InvalidArgument(f"image {key} must be an absolute path or null, not {v!r}")
            img[key] = v
        if not img["kernel"] and not img["disk"]:
            raise InvalidArgument("the image needs a kernel or a disk")
        cmdline = image.get("cmdline") or ""
        if not isinstance(cmdline, str):
            raise InvalidArgument(f"image cmdline must be a string, not {cmdline!r}")
        img["cmdline"] = cmdline
        out["image"] = img
    elif isinstance(image, str) and image:
        out["image"] = image
    else:
        raise InvalidArgument(
            "image must be {kernel, initrd, disk, cmdline} or an image reference (name:tag)"
        )
    out["vcpus"] = _check_int(spec, "vcpus", 1, 256, 1)
    out["memory_mb"] = _check_int(spec, "memory_mb", 32, 1024 * 1024, 256)
    vols = spec.get("volumes") or []
    if not isinstance(vols, list):
        raise InvalidArgument("volumes must be a list of {id, mount, size_mb}")
    out["volumes"] = []
    seen = set()
    for v in vols:
        if not isinstance(v, dict):
            raise InvalidArgument(f"each volume must be {{id, mount, size_mb}}, not {v!r}")
        vid = check_id(v.get("id"), "volume id")
        if vid in seen:
            raise InvalidArgument(f"volume {vid!r} is listed twice")
        seen.add(vid)
        mount = v.get("mount")
        if (not isinstance(mount, str) or not mount.startswith("/") or mount == "/"
                or any(c in mount for c in " ,:\t\n")):
            raise InvalidArgument(
                f"volume {vid!r}: mount must be an absolute path other than / without spaces, "
                f"commas or colons, not {mount!r}"
            )
        size = v.get("size_mb", 64)
        if not isinstance(size, int) or isinstance(size, bool) or size < 2:
            raise InvalidArgument(f"volume {vid!r}: size_mb must be an integer >= 2, not {size!r}")
        out["volumes"].append({"id": vid, "mount": mount, "size_mb": size})
    port = spec.get("service_port")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool)
                             or not 1 <= port <= 65535):
        raise InvalidArgument(f"service_port must be a TCP port (1-65535) or null, not {port!r}")
    out["service_port"] = port
    out["health"] = _health.validate(spec.get("health"))
    out["cloud_init"] = _cloudinit.validate(spec.get("cloud_init"))
    # Its address on the cluster network (bridge networking; see docs/networking.md).
    out["network"] = check_network(spec["network"]) if spec.get("network") is not None else None
    if out["health"] is not None and port is None:
        raise InvalidArgument("a health check needs a service_port")
    return out


def driver_spec(machine_id, spec, image, volumes, forwards=(), net=None):
    """
    The driver spec (L{zwrm.interfaces.IHypervisorDriver.start}) of machine spec C{spec}
    (L{validate_machine}): what L{Executor} starts, and what a live migration's target
    (C{live.prepare}, L{zwrm.agent.live}) starts paused, so both build it the same way.

    @param image: the resolved image (C{kernel}, C{initrd}, C{disk}, C{disk_format},
        C{firmware}, C{cmdline}).
    @param volumes: C{[{"id", "path", "mount"}]}, in the spec's order (mounted by virtio
        serial, never by device order: a root disk comes first).
    @param forwards: C{[{"guest", "host"}]} (user-mode networking).
    @param net: the answer of L{zwrm.agent.network.agent.AgentNetwork.prepare} (bridge
        networking: the NIC on its TAP and the kernel's address arguments), or L{None}.
    """
    cmdline = image.get("cmdline") or ""
    if spec["volumes"]:
        mounts = ",".join(f"{volume_serial(v['id'])}:{v['mount']}" for v in spec["volumes"])
        cmdline = f"{cmdline} zwrm.vol={mounts}".strip()
    if net is not None:
        cmdline = f"{cmdline} {net['cmdline']}".strip()
    return {
        "id": machine_id, "kernel": image.get("kernel"), "initrd": image.get("initrd"),
        "disk": image.get("disk"), "disk_format": image.get("disk_format"),
        "firmware": image.get("firmware"),
        # A disk image gets a cloud-init seed (it mounts the volumes); its local-hostname
        # is spec.network.hostname when there is one.
        "cloud_init": _cloudinit.with_hostname(spec["cloud_init"] or (
            _cloudinit.validate({}) if image.get("disk") else None), spec["network"]),
        "cmdline": cmdline, "vcpus": spec["vcpus"], "memory_mb": spec["memory_mb"],
        "volumes": list(volumes), "forwards": list(forwards),
        "nic": net["nic"] if net else None,
    }


class _Record:
    def __init__(self, spec):
        self.spec = spec
        self.state = "pending"
        self.health = "none"
        self.reason = ""
        self.host_port = None
        self.check = None
        self.image_digests = []
        #: Set while a live migration holds the machine (L{Executor.hold}): why.
        self.held = None
        #: The host a live migration moved it to (it stays paused here until destroyed).
        self.migrated_to = None
        #: Its driver's C{paused} (C{"disk-full"}: held until its host's disk has room).
        self.paused = None
        #: Set while the fence stops it (L{Executor.fence}): its driver's stop is not
        #: reported, the fence reports it C{failed} once it is down.
        self.fencing = False

    def to_json(self):
        return {"spec": self.spec, "host_port": self.host_port, "state": self.state,
                "reason": self.reason, "image_digests": self.image_digests,
                "held": self.held, "migrated_to": self.migrated_to}


def _announced(progress):
    """A volume stream's progress as it is announced (L{Executor.send_volume})."""
    return {k: progress[k] for k in ("volume_id", "mode", "sent", "done", "total", "finished")}


class Executor:
    """
    The executor procedures of one agent.

    @param reactor: the reactor (time, processes, TCP) the health checks use.
    @param host_id: this host's id, for reports and facts.
    @param driver: an L{zwrm.interfaces.IHypervisorDriver}.
    @param volumes: a L{zwrm.agent.volumes.VolumeStore}.
    @param report: C{report(event) -> Deferred}, called for every machine state change.
    @param images: an object with C{async resolve(ref, pin=True)} and C{unpin(digest)}
        (the agent's image cache), or C{None} when images are local paths only.
    @param data_dir: the agent's data directory.
    @param health_probe: C{health_probe(reactor, health_spec, host_port)} makes a machine's
        health probe (L{zwrm.agent.health.probe_for}; tests may pass another).
    @param network: an L{zwrm.agent.network.agent.AgentNetwork} (bridge networking), or
        L{None} for user-mode networking.
    """

    def __init__(self, reactor, host_id, driver, volumes, report, images=None, data_dir=".",
                 health_probe=_health.probe_for, transfers=None, transfer_host="127.0.0.1",
                 network=None):
        self.reactor = reactor
        self.network = network
        self.transfers = transfers
        self.transfer_host = transfer_host
        self._outgoing = {}  # volume id -> progress of the send under way (or last)
        self.health_probe = health_probe
        self.host_id = host_id
        self.driver = driver
        self.volumes = volumes
        self.report = report
        self.images = images
        self.data_dir = os.path.abspath(data_dir)
        self.records_dir = os.path.join(self.data_dir, "executor")
        os.makedirs(self.records_dir, exist_ok=True)
        self._machines = {}
        #: The agent's L{zwrm.agent.live.LiveMigrations}, once made (C{machine.destroy} of
        #: a machine still arriving by a live migration cancels that migration).
        self.live = None
        self._unsubscribe = driver.subscribe(self._driver_changed)

    # --- machine procedures -------------------------------------------------------------

    @wamp.register("machine.start")
    def start_machine(self, spec):
        """
        Start a machine (or start again a stopped one, with this spec).

        @return: (a Deferred of) its status once its hypervisor process runs.
        @raise InvalidArgument: bad spec. @raise Conflict: it is not stopped or failed, or a
            volume is used by another machine. @raise ResourceExhausted: no disk for a new
            volume. @raise NotFound: unknown image. @raise Unavailable: the hypervisor failed.
        """
        return ensureDeferred(self._start(spec))

    async def _start(self, spec):
        spec = validate_machine(spec)
        mid = spec["id"]
        rec = self._machines.get(mid)
        if rec is not None and rec.migrated_to is not None:
            # Never two copies: its guest runs on the target now.
            raise Conflict(f"machine {mid!r} was moved live to {rec.migrated_to}; it cannot "
                           "start here again (destroy it)")
        if rec is not None and rec.state not in ("stopped", "failed"):
            raise Conflict(f"machine {mid!r} is {rec.state}; stop it first")
        for v in spec["volumes"]:
            owner = self.volumes.in_use(v["id"])
            if owner is not None and owner != mid:
                raise Conflict(f"volume {v['id']!r} is used by machine {owner!r}")
        old_digests = rec.image_digests if rec is not None else []
        if rec is not None:
            # Started again with another spec: volumes it no longer lists are free again.
            keep = {v["id"] for v in spec["volumes"]}
            for v in rec.spec["volumes"]:
                if v["id"] not in keep:
                    self.volumes.release(v["id"], mid)
        rec = _Record(spec)
        rec.image_digests = old_digests
        self._machines[mid] = rec
        self._change(rec, "pending", "accepted")
        try:
            self._change(rec, "starting", "preparing volumes and image")
            image = await self._resolve_image(rec)
            vols = []
            for v in spec["volumes"]:
                if not self.volumes.exists(v["id"]):
                    await self.volumes.create(v["id"], v["size_mb"])
                self.volumes.claim(v["id"], mid)
                vols.append({"id": v["id"], "path": self.volumes.existing_path(v["id"]),
                             "mount": v["mount"]})
            net = None
            if spec["network"] is not None and self.network is not None:
                # A TAP on the host's bridge; host_port forwards to the guest's address.
                net = await self.network.prepare(mid, spec["app"], spec["network"],
                                                 spec["service_port"], bool(image.get("kernel")))
                rec.host_port = net["host_port"]
            for attempt in range(3):
                forwards = []
                if spec["service_port"] is not None and net is None:
                    rec.host_port = free_port()
                    forwards.append({"guest": spec["service_port"], "host": rec.host_port})
                self._save(rec)
                try:
                    status = await self.driver.start(
                        driver_spec(mid, spec, image, vols, forwards, net))
                    break
                except Unavailable as e:
                    # Another process took the free port between our check and QEMU's bind.
                    if attempt == 2 or not forwards or "forwarding" not in e.message:
                        raise
                    log.info("machine {id}: port {p} was taken; trying another", id=mid,
                             p=rec.host_port)
                    rec.state = "starting"
        except Exception as e:
            if disk_full(e):
                # The host's disk, not a fault of the agent's: said, without a traceback.
                # (the machine is named by the call; its record and the control plane's
                # say "could not start: " before it)
                e = ResourceExhausted(f"the disk of host {self.host_id} is full"
                                      f" ({e.strerror or e})")
            msg = e.message if isinstance(e, ZwrmError) else f"{e.__class__.__name__}: {e}"
            if rec.state != "failed":
                self._change(rec, "failed", f"could not start: {msg}")
            if not isinstance(e, ZwrmError):
                log.failure("machine {id}: start failed", id=mid)
                raise Internal(f"machine {mid!r} could not start: {msg}") from None
            raise e from None
        # The driver's "running" notification may have come first; make sure it is reported.
        if status["state"] == "running" and rec.state != "running":
            self._running(rec)
        return self._status(rec)

    async def _resolve_image(self, rec):
        image = rec.spec["image"]
        if isinstance(image, dict):
            if image.get("kernel") and os.path.isfile(image["kernel"]):
                # A development --kernel path: checked as an image's kernel layer is
                # (ImageCache.resolve), since QEMU runs any file as an old zImage.
                await deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                        kernelimage.inspect, image["kernel"],
                                        f"kernel {image['kernel']}")
            return image
        if self.images is None:
            raise InvalidArgument(
                f"image {image!r} is a reference, but this agent has no image cache; "
                "give local paths {kernel, initrd, disk, cmdline}"
            )
        resolved = await self.images.resolve(image, pin=True)
        for d in rec.image_digests:
            self.images.unpin(d)
        rec.image_digests = list(resolved.get("digests", []))
        return resolved

    @wamp.register("machine.stop")
    def stop_machine(self, machine_id, timeout=None):
        """
        Stop a machine: ACPI power-down, then a hard stop after C{timeout} seconds.
        Stopping a stopped machine is not an error.

        @return: (a Deferred of) its status once stopped.
        @raise NotFound: unknown machine. @raise Conflict: it is still starting.
        """
        rec = self._get(machine_id)
        if timeout is not None and (not isinstance(timeout, int | float)
                                    or isinstance(timeout, bool) or not 0 <= timeout <= 3600):
            raise InvalidArgument(f"timeout must be seconds from 0 to 3600, not {timeout!r}")
        if rec.state in ("pending", "starting"):
            raise Conflict(f"machine {machine_id!r} is {rec.state}; wait until it runs")
        if rec.state in ("stopped", "failed"):
            return succeed(self._status(rec))
        if rec.held is not None and rec.migrated_to is None:
            raise Conflict(f"machine {machine_id!r} is held by a live migration "
                           f"({rec.held}); cancel it (live.cancel) or destroy the machine")
        if rec.migrated_to is not None:
            # Paused for good (its guest runs on the target): no guest to power down.
            self._change(rec, "stopping", "stop requested")
            d = self.driver.stop(machine_id, 0)

            def stopped(_):
                self._change(rec, "stopped", f"stopped here after its live migration to "
                                             f"{rec.migrated_to}")
                return self._status(rec)

            return d.addCallback(stopped)
        if rec.state != "stopping":
            self._stop_check(rec)
            self._change(rec, "stopping", "stop requested")
        d = self.driver.stop(machine_id, timeout)
        return d.addCallback(lambda _: self._status(rec))

    def fence(self, reason, grace):
        """
        The agent has heard nothing from the control plane for its C{fence_after}
        (L{zwrm.agent.service.AgentService}): stop every machine here that has volumes,
        an ACPI power-down then a hard stop after C{grace} seconds, and mark it C{failed}
        with C{reason} (reported once the agent registers again: its restart policy
        starts it again here if its volumes are still its own). The control plane
        recovers such a host's volumes elsewhere only after that
        (L{zwrm.control.host_removal}), so no two copies of the machine run at once.
        A machine held by a live migration is left to it (a drain under way refuses the
        host's removal); one without volumes runs on (the cluster may run another copy,
        and stops this one when the host returns).

        @return: a Deferred firing with the ids of the machines stopped.
        """
        return ensureDeferred(self._fence(reason, grace))

    async def _fence(self, reason, grace):
        # Reported as a failure, from running to failed, with no stopping nor stopped in
        # between: the control plane's restart policy then starts it again here if the host
        # returns without having been removed (a stop through stopping is one the control
        # plane asked for, which the policy leaves alone).
        stopped = []
        for mid, rec in sorted(self._machines.items()):
            if not rec.spec["volumes"] or rec.held is not None \
                    or rec.state not in ("running", "stopping"):
                continue
            self._stop_check(rec)
            rec.fencing = True
            try:
                await self.driver.stop(mid, grace)
            except Exception as e:
                log.warn("machine {id} was not stopped ({reason}): {e}", id=mid,
                         reason=reason, e=message_of(e))
                continue
            finally:
                rec.fencing = False
            self._change(rec, "failed", reason)
            stopped.append(mid)
        return stopped

    @wamp.register("machine.destroy")
    def destroy_machine(self, machine_id):
        """
        Stop a machine at once and forget it. Its volumes stay (released).

        A machine still arriving here by a live migration (not resumed yet) is not this
        executor's: its migration is cancelled instead (its QEMU destroyed, its blank
        volumes deleted; L{zwrm.agent.live.LiveMigrations.cancel}).

        @raise NotFound: unknown machine.
        """
        check_id(machine_id)
        if (machine_id not in self._machines and self.live is not None
                and self.live.receiving(machine_id)):
            return self.live.cancel(machine_id).addCallback(
                lambda _: {"machine_id": machine_id, "destroyed": True})
        rec = self._get(machine_id)
        self._stop_check(rec)
        d = self.driver.destroy(machine_id)

        def forget(_):
            if self.network is not None and rec.spec.get("network") is not None:
                ensureDeferred(self.network.release(machine_id)).addErrback(
                    lambda f: log.warn("machine {id}: its network was not removed: {e}",
                                       id=machine_id, e=f.getErrorMessage()))
            for v in rec.spec["volumes"]:
                self.volumes.release(v["id"], machine_id)
            if self.images is not None:
                for dg in rec.image_digests:
                    self.images.unpin(dg)
            self._machines.pop(machine_id, None)
            try:
                os.unlink(self._record_path(machine_id))
            except FileNotFoundError:
                pass
            rec.state, rec.reason = "stopped", "destroyed"
            self._report(rec, destroyed=True)
            return {"machine_id": machine_id, "destroyed": True}

        return d.addCallback(forget)

    @wamp.register("machine.status")
    def machine_status(self, machine_id):
        """@return: the machine's status. @raise NotFound: unknown machine."""
        return self._status(self._get(machine_id))

    @wamp.register("machine.list")
    def list_machines(self):
        """@return: the status of every machine on this host."""
        return [self._status(r) for _, r in sorted(self._machines.items())]

    @wamp.register("machine.logs")
    def machine_logs(self, machine_id, max_bytes=65536):
        """
        @return: (a Deferred of) the tail of the machine's serial console, a str.
        @raise NotFound: unknown machine.
        """
        self._get(machine_id)
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or not (
            1 <= max_bytes <= 1024 * 1024
        ):
            raise InvalidArgument(f"max_bytes must be from 1 to 1048576 (1 MiB), not {max_bytes!r}")
        try:
            return self.driver.console(machine_id, max_bytes)
        except NotFound:
            return succeed("")  # it failed before its hypervisor ever started

    @wamp.register("machine.console.attach", options=RegisterOptions(details_arg="details"))
    @cancellable  # a reader detaches by cancelling
    async def console_attach(self, machine_id, details=None):
        """
        Attach to a machine's serial console: what the guest writes comes as progressive
        results (base64 text) until the caller cancels (detach) or the console closes.

        @return: C{{"machine_id", "ended"}}. @raise NotFound: unknown machine.
        @raise Unavailable: it is not running, or its driver has no interactive console.
        """
        self._get(machine_id)
        progress = getattr(details, "progress", None) or (lambda text: None)
        return await self._console_relay().attach(machine_id, progress)

    @wamp.register("machine.console.write")
    async def console_write(self, machine_id, data):
        """Send keystrokes (base64 text, at most 4 KiB) to a machine's serial console."""
        self._get(machine_id)
        return await self._console_relay().write(machine_id, data)

    def _console_relay(self):
        if getattr(self, "_consoles", None) is None:
            socket_path = getattr(self.driver, "console_socket", None)
            if socket_path is None:
                raise Unavailable(f"the {getattr(self.driver, 'name', '')} driver has no "
                                  "interactive console")
            self._consoles = ConsoleRelay(self.reactor, socket_path)
        return self._consoles

    # --- volume procedures --------------------------------------------------------------

    @wamp.register("volume.create")
    def create_volume(self, volume_id, size_mb):
        """@return: (a Deferred of) the new volume's info. See L{VolumeStore.create}."""
        return maybeDeferred(self.volumes.create, volume_id, size_mb)

    @wamp.register("volume.delete")
    def delete_volume(self, volume_id, keep_snapshots=False):
        """
        Delete a volume. @raise Conflict: a machine uses it, or it has snapshots here
        (unless C{keep_snapshots}: they stay, as a recovery undone leaves them).
        @raise NotFound: no such volume.

        @return: a Deferred of C{{"volume_id", "deleted": True}}, once the deletion is on
            disk.
        """
        if not isinstance(keep_snapshots, bool):
            raise InvalidArgument(f"keep_snapshots must be true or false, not "
                                  f"{keep_snapshots!r}")
        for mid, rec in self._machines.items():
            if any(v["id"] == volume_id for v in rec.spec["volumes"]):
                raise Conflict(
                    f"volume {volume_id!r} belongs to machine {mid!r} ({rec.state}); "
                    "destroy the machine first"
                )
        d = self.volumes.delete(volume_id, "keep" if keep_snapshots else "refuse")
        return d.addCallback(lambda _: {"volume_id": volume_id, "deleted": True})

    @wamp.register("volume.recover")
    def recover_volume(self, volume_id, snapshot_id):
        """
        Make volume C{volume_id} here from its snapshot C{snapshot_id} here (a replica: its
        host was lost). @return: a Deferred of the volume's info (L{VolumeStore.recover}).
        @raise Conflict: the volume is here already. @raise NotFound: no such snapshot.
        """
        check_id(volume_id, "volume id")
        check_id(snapshot_id, "snapshot id")
        return self.volumes.recover(volume_id, snapshot_id)

    @wamp.register("volume.list")
    def list_volumes(self):
        """@return: the info of every volume on this host."""
        return self.volumes.list()

    @wamp.register("volume.info")
    def volume_info(self, volume_id):
        """@return: C{{id, size_mb, size_bytes, allocated_bytes, in_use_by, path}}."""
        return self.volumes.info(volume_id)

    # --- volume snapshots ----------------------------------------------------------------

    @wamp.register("volume.snapshot")
    def snapshot_volume(self, volume_id, snapshot_id):
        """
        Make snapshot C{snapshot_id} of local volume C{volume_id}: a copy at rest when no
        running machine uses it, else a point-in-time copy through the driver
        (L{zwrm.interfaces.IVolumeBackup}) while the guest runs on.

        @return: a Deferred of the snapshot's C{{id, volume_id, size_bytes,
            allocated_bytes, path, live}} (C{live}: taken while its machine ran).
        @raise NotFound: no such volume. @raise Conflict: its machine is starting, stopping
            or moving live, or the volume is busy. @raise Unavailable: the driver cannot
            copy a running machine's volume.
        """
        check_id(volume_id, "volume id")
        check_id(snapshot_id, "snapshot id")
        owner = self.volumes.in_use(volume_id)
        rec = self._machines.get(owner) if owner is not None else None
        backup = None
        if rec is not None and rec.state not in ("stopped", "failed"):
            if rec.state != "running" or rec.held is not None:
                raise Conflict(f"volume {volume_id!r} is used by machine {owner!r}, which is "
                               f"{rec.held or rec.state}; try again once it runs or is down")
            if not IVolumeBackup.providedBy(self.driver):
                raise Unavailable(f"the {getattr(self.driver, 'name', '')} driver cannot copy "
                                  "a running machine's volume; stop the machine first")

            def backup(target):
                return self.driver.backup_volume(owner, volume_id, target)
        # (a claim with no record here is no machine known to be down: refused)
        d = self.volumes.snapshot(volume_id, snapshot_id, backup=backup,
                                  idle_owner=owner if backup is None and rec else None)
        return d.addCallback(lambda info: dict(info, live=backup is not None))

    @wamp.register("volume.restore")
    def restore_volume(self, volume_id, snapshot_id, keep_id):
        """
        Put snapshot C{snapshot_id}'s data back into local volume C{volume_id}; what it held
        becomes snapshot C{keep_id}. Only while no machine here runs with the volume.

        @return: a Deferred of C{{"volume", "kept"}} (L{VolumeStore.restore}).
        @raise Conflict: a machine that is not down uses the volume, or it is busy.
        """
        check_id(volume_id, "volume id")
        owner = self.volumes.in_use(volume_id)
        rec = self._machines.get(owner) if owner is not None else None
        if owner is not None and rec is not None and rec.state not in ("stopped", "failed"):
            raise Conflict(f"volume {volume_id!r} is used by machine {owner!r} ({rec.state}); "
                           "it can be restored only while no machine runs with it")
        return self.volumes.restore(volume_id, snapshot_id, keep_id,
                                    idle_owner=owner if rec is not None else None)

    @wamp.register("volume.snapshot_delete")
    def delete_snapshot(self, volume_id, snapshot_id):
        """
        Delete snapshot C{snapshot_id} of volume C{volume_id}.

        @return: a Deferred of C{{"volume_id", "snapshot_id", "deleted": True}}.
        @raise NotFound: no such snapshot here.
        """
        d = self.volumes.delete_snapshot(volume_id, snapshot_id)
        return d.addCallback(lambda _: {"volume_id": volume_id, "snapshot_id": snapshot_id,
                                        "deleted": True})

    @wamp.register("volume.snapshots")
    def list_snapshots(self, volume_id=None):
        """@return: the snapshots on this host (of C{volume_id} if given)."""
        if volume_id is not None:
            check_id(volume_id, "volume id")
        return self.volumes.snapshots(volume_id)

    # --- volume moves (host drains; see docs/volume-streams.md and docs/drain.md) --------

    def _transfers(self):
        if self.transfers is None:
            raise Unavailable(
                f"host {self.host_id} cannot move volumes: it has no host certificate yet"
            )
        return self.transfers

    @wamp.register("volume.receive")
    def receive_volume(self, token, volume_id, size, source=None, snapshot=None):
        """
        Expect volume C{volume_id} (C{size} bytes) from host C{source}, for the one-time
        C{token} the control plane minted.

        @param snapshot: not the volume but this snapshot of it (a drain moves a volume's
            snapshots with it): adopted into the volume's snapshot directory here.
        @return: C{{"host", "port"}}: where the source agent sends it.
        @raise Conflict: the volume (or snapshot) is here already or being received.
        @raise Unavailable: this agent has no volume endpoint.
        """
        check_id(volume_id, "volume id")
        if snapshot is not None:
            check_id(snapshot, "snapshot id")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise InvalidArgument(f"size must be a positive number of bytes, not {size!r}")
        got = self._transfers().receive(token, volume_id, size, source=source,
                                        snapshot_id=snapshot)
        return {"host": self.transfer_host, "port": got["port"]}

    @wamp.register("volume.send", options=RegisterOptions(details_arg="details"))
    @cancellable  # a drain the control plane stops ends its copy (resumed at its next start)
    def send_volume(self, volume_id, host, port, token, target, mode="bulk", commit=True,
                    snapshot=None, details=None):
        """
        Stream local volume C{volume_id} to host C{target} at C{host}:C{port}.

        A caller that asks for progressive results (the control plane's drain) is told how
        far the copy is as it goes: C{{"volume_id", "mode", "sent", "done", "total",
        "finished"}}, the first at once (so the caller knows this agent announces), then at
        most one every L{zwrm.agent.transfer.progress.PROGRESS_INTERVAL} seconds, and the
        final figures just before the result (L{ProgressThrottle}).  L{volume_progress}
        tells the same to a caller that asks (control planes from before the
        announcements).

        @param mode: C{"bulk"} (every allocated block) or C{"delta"} (only the blocks that
            differ from the copy the target holds for C{token}).
        @param snapshot: send this snapshot of the volume instead (it never changes: in
            bulk mode, committed at once); not in L{volume_progress}.
        @return: a Deferred of the sender's result C{{"digest", "committed", "size",
            "allocated", "sent", ...}}.
        @raise NotFound: no such volume (or snapshot) here.
        """
        check_id(volume_id, "volume id")
        if mode not in ("bulk", "delta"):
            raise InvalidArgument(f"mode must be bulk or delta, not {mode!r}")
        if snapshot is not None:
            check_id(snapshot, "snapshot id")
            if mode != "bulk" or not commit:
                raise InvalidArgument("a snapshot is sent in bulk mode and committed at once")
        progress = {"volume_id": volume_id, "mode": mode, "sent": 0, "done": 0, "total": None,
                    "finished": False, "started_at": self.reactor.seconds()}
        if snapshot is None:
            self._outgoing[volume_id] = progress
        else:
            progress["snapshot_id"] = snapshot
        announce = getattr(details, "progress", None)
        throttle = None
        if announce is not None:
            throttle = ProgressThrottle(self.reactor, lambda p: announce(_announced(p)))
            throttle.report(progress)

        def update(p):
            progress.update(sent=p["sent"], done=p["done"], total=p["total"])
            if throttle is not None:
                throttle.report(progress)

        d = self._transfers().send(volume_id, host, port, token, target, mode=mode,
                                   commit=commit, progress=update, snapshot_id=snapshot)

        def finished(result):
            progress["finished"] = True
            if isinstance(result, dict):
                progress.update(sent=result.get("sent", progress["sent"]),
                                total=result.get("allocated", progress["total"]))
                progress["done"] = progress["total"]
                if throttle is not None:
                    throttle.finish(progress)
            elif throttle is not None:
                throttle.finish()  # failed: what was reported, nothing more
            return result

        return d.addBoth(finished)

    @wamp.register("volume.progress")
    def volume_progress(self, volume_id):
        """
        @return: the progress of the latest send of C{volume_id} from here: C{{"sent",
            "done", "total", "mode", "finished", "started_at"}}.
        @raise NotFound: no send of it since this agent started.
        """
        try:
            return dict(self._outgoing[volume_id])
        except KeyError:
            raise NotFound(f"no volume {volume_id!r} is being sent from {self.host_id}") from None

    @wamp.register("volume.cancel_receive")
    def cancel_receive(self, token):
        """
        Cancel an incoming transfer and delete its partial copy.

        @return: a Deferred firing once the partial copy is deleted.
        @raise NotFound: no transfer for this token.
        """
        return self._transfers().cancel(token).addCallback(lambda _: {"cancelled": True})

    @wamp.register("volume.digest")
    def volume_digest(self, volume_id, algorithm=PREFERRED[0]):
        """
        @param algorithm: the block hash (C{"blake3"}, what streams between hosts of this
            version use, or C{"sha256"}).
        @return: a Deferred of the volume's image digest (C{blake3-blocks:...}, see
            docs/volume-streams.md), computed in a thread.
        @raise NotFound: no such volume here.
        @raise InvalidArgument: an unknown algorithm.
        """
        check_algorithm(algorithm)
        if not self.volumes.exists(volume_id):
            raise NotFound(f"no volume {volume_id!r} on host {self.host_id}")
        path = self.volumes.path(volume_id)
        return deferToThreadPool(
            self.reactor,
            self.reactor.getThreadPool(),
            file_digest,
            path,
            BLOCK_SIZE,
            algorithm,
        )

    # --- network ------------------------------------------------------------------------

    @wamp.register("network.update")
    def network_update(self, view):
        """
        The cluster network as the control plane sees it (see
        L{zwrm.agent.network.agent.AgentNetwork.update}); ignored in user-mode networking.
        """
        if self.network is None:
            return {"network": "user"}
        return self.network.update(view)

    @wamp.register("ingress.certs")
    def ingress_certs(self, certs):
        """
        The ingress certificates (see L{zwrm.agent.network.agent.AgentNetwork.set_certs});
        ignored in user-mode networking (no ingress).
        """
        if self.network is None:
            return {"network": "user"}
        return self.network.set_certs(certs)

    # --- host ---------------------------------------------------------------------------

    @wamp.register("host.facts")
    def host_facts(self):
        """
        @return: C{{host_id, cpus, memory_mb, disk_free_mb, driver, accel, machines,
            running}}.
        """
        memory_mb = None
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemTotal:"):
                        memory_mb = int(line.split()[1]) // 1024
        except OSError:
            pass
        facts = {
            "host_id": self.host_id,
            # volume.receive/send stream snapshots (snapshot=), volume.recover makes a
            # volume from one, volume.delete keeps them (keep_snapshots): what a drain that
            # moves snapshots, a replica and a recovery need of both hosts' agents
            "snapshot_streams": True,
            "cpus": os.cpu_count(),
            "memory_mb": memory_mb,
            "disk_free_mb": self.volumes.free_mb(),
            "machines": len(self._machines),
            "running": sum(1 for r in self._machines.values() if r.state == "running"),
        }
        facts.update(self.driver.facts())
        return facts

    # --- live migration (zwrm.agent.live) ------------------------------------------------

    def adopt(self, spec, host_port=None, image_digests=(), restore_network=False,
              reason=None, health=None):
        """
        Take a machine that arrived here by a live migration and resumed as this executor's
        own, as if it had started it: its record, its volumes' claims, its health checks,
        its reports (C{running}) to the control plane, C{machine.*} on it.

        @param spec: its machine spec (as C{machine.start} takes it, with its id).
        @param host_port: where its service port is forwarded here (C{live.prepare} chose it).
        @param image_digests: the image blobs pinned for it; the executor unpins them when
            it is destroyed.
        @param restore_network: its TAP exists but this agent process did not make it (it
            restarted between C{live.prepare} and the resume): restore its forward.
        @param health: C{passing} if the guest was passing where it ran before: its health
            check starts from there (L{zwrm.agent.health.HealthCheck}), so the app's routes
            keep it while the first checks here run; else it starts C{starting}.
        @return: a Deferred firing with its status.
        @raise Conflict: this executor has a machine of that id already.
        @raise NotFound: the driver does not run it.
        """
        return ensureDeferred(self._adopt(spec, host_port, image_digests, restore_network,
                                          reason, health))

    async def _adopt(self, spec, host_port, image_digests, restore_network, reason,
                     health=None):
        spec = validate_machine(spec)
        mid = spec["id"]
        if mid in self._machines:
            raise Conflict(f"machine {mid!r} is here already ({self._machines[mid].state})")
        st = self.driver.status(mid)  # NotFound
        rec = _Record(spec)
        rec.host_port = host_port
        rec.image_digests = list(image_digests)
        rec.state = "starting"
        self._machines[mid] = rec
        for v in spec["volumes"]:
            try:
                self.volumes.claim(v["id"], mid)
            except ZwrmError as e:
                log.warn("machine {id}: cannot claim volume {v}: {e}", id=mid, v=v["id"], e=e)
        if (restore_network and self.network is not None
                and spec.get("network") is not None):
            try:
                net = await self.network.prepare(mid, spec["app"], spec["network"],
                                                 spec["service_port"], host_port=host_port,
                                                 adopt=True)
                rec.host_port = net["host_port"]
            except ZwrmError as e:
                log.warn("machine {id}: its network was not restored: {e}", id=mid, e=e)
        if st["state"] == "running":
            self._running(rec, reason or "running here after a live migration",
                          health="passing" if health == "passing" else "starting")
        else:
            self._change(rec, st["state"], st["reason"])
        return self._status(rec)

    def has_machine(self, machine_id):
        """Whether this executor has a record of machine C{machine_id}."""
        return machine_id in self._machines

    def hold(self, machine_id, why):
        """
        A live migration takes machine C{machine_id} (the source): from now on its health
        is not checked nor reported, and the driver's news of it are the migration's (no
        C{failed} report while it is paused at the switchover, nothing that makes the
        control plane restart it).  L{release} gives it back; L{migrated} keeps it held.

        @return: whether this executor knows the machine.
        @raise Conflict: it is not running, or held by another migration.
        """
        rec = self._machines.get(machine_id)
        if rec is None:
            return False
        if rec.state != "running":
            raise Conflict(f"machine {machine_id} is {rec.state}: it cannot migrate")
        if rec.held is not None:
            raise Conflict(f"machine {machine_id} is held already ({rec.held})")
        rec.held = why
        self._stop_check(rec)
        self._save(rec)
        return True

    def release(self, machine_id, reason):
        """
        The live migration of C{machine_id} was rolled back: the machine is this executor's
        again (its state as the driver says, health checked and reported again).
        """
        rec = self._machines.get(machine_id)
        if rec is None or rec.held is None:
            return
        rec.held = rec.migrated_to = None
        try:
            st = self.driver.status(machine_id)
        except NotFound:
            st = {"state": "failed", "reason": "its hypervisor files are gone"}
        if st["state"] == "running":
            # The same guest, paused at most for the switchover: its health goes on from
            # what it was before the migration took it.
            was = "passing" if rec.health == "passing" else "starting"
            rec.state = "starting"
            self._running(rec, reason, health=was)
        else:
            self._change(rec, st["state"], f"{reason}; {st['reason']}")

    def migrated(self, machine_id, target_host):
        """
        The live migration of C{machine_id} completed: it stays here paused for good (its
        guest runs on C{target_host}), held, until the control plane destroys it.
        """
        rec = self._machines.get(machine_id)
        if rec is None:
            return
        rec.held = f"moved live to {target_host}; paused here until destroyed"
        rec.migrated_to = target_host
        self._save(rec)
        if self.network is not None and rec.spec.get("network") is not None:
            # Its guest never runs here again: its TAP goes now, and with it what this
            # host's bridge learned of the guest's MAC on it, so frames for the guest's
            # address go over the overlay to the target at once.
            ensureDeferred(self.network.release(machine_id)).addErrback(
                lambda f: log.warn("machine {id}: its network was not removed: {e}",
                                   id=machine_id, e=f.getErrorMessage()))

    # --- restart ------------------------------------------------------------------------

    def recover(self):
        """
        After an agent restart: find the machines the previous agent process left, take
        control of the running ones (claim their volumes, restart health checks) and report
        every one of them (those that died meanwhile as C{failed}).

        @return: a Deferred firing with their statuses.
        """
        return ensureDeferred(self._recover())

    async def _recover(self):
        found = {s["id"]: s for s in await self.driver.recover()}
        for mid in self.driver.list():
            if mid not in found and mid not in self._machines:
                found[mid] = self.driver.status(mid)
        out = []
        for name in sorted(os.listdir(self.records_dir)):
            if not name.endswith(".json"):
                continue
            mid = name[:-5]
            if mid in self._machines:
                continue
            try:
                with open(os.path.join(self.records_dir, name)) as f:
                    saved = json.load(f)
                rec = _Record(saved["spec"])
            except (OSError, ValueError, KeyError) as e:
                log.warn("machine record {name} is unreadable ({e}); ignored", name=name, e=e)
                continue
            rec.host_port = saved.get("host_port")
            rec.image_digests = saved.get("image_digests", [])
            rec.held = saved.get("held")
            rec.migrated_to = saved.get("migrated_to")
            self._machines[mid] = rec
            if self.images is not None:
                for dg in rec.image_digests:
                    self.images.pin(dg)
            for v in rec.spec["volumes"]:
                try:
                    self.volumes.claim(v["id"], mid)
                except ZwrmError as e:
                    log.warn("machine {id}: cannot claim volume {v}: {e}", id=mid, v=v["id"], e=e)
            st = found.get(mid)
            if (st is not None and st["state"] == "running" and self.network is not None
                    and rec.spec.get("network") is not None):
                try:
                    await self.network.prepare(mid, rec.spec["app"], rec.spec["network"],
                                               rec.spec["service_port"], host_port=rec.host_port,
                                               adopt=True)
                except ZwrmError as e:
                    log.warn("machine {id}: its network was not restored: {e}", id=mid, e=e)
            if st is not None and st["state"] == "running" and rec.held is not None:
                if rec.migrated_to is not None or str(st.get("reason", "")).startswith(
                        "paused: its live migration completed"):
                    # Moved: paused for good here; the control plane destroys it.
                    rec.state = "running"
                    out.append(self._status(rec))
                    continue
                # Otherwise the driver's recover() rolled its migration back (or it had
                # not begun): it runs here, this executor's again.
                rec.held = None
            if st is None:
                rec.held = rec.migrated_to = None
                self._change(rec, "failed", "its hypervisor files are gone")
            elif st["state"] == "running":
                rec.state = "starting"
                rec.paused = st.get("paused")
                self._running(rec, st["reason"] if rec.paused else "recovered after an agent restart")
            elif saved.get("state") in ("stopped",) and st["state"] == "stopped":
                self._change(rec, "stopped", saved.get("reason") or st["reason"])
            else:
                self._change(rec, st["state"], st["reason"])
            out.append(self._status(rec))
        return out

    def close(self):
        """
        Stop health checks and listening to the driver (the machines keep running).

        @return: a Deferred that fires once the hosts list held is saved, for the next start
            to resume (L{None} without bridge networking).
        """
        for rec in self._machines.values():
            self._stop_check(rec)
        self._unsubscribe()
        if self.network is not None:
            return self.network.save_pending()
        return None

    # --- internals ----------------------------------------------------------------------

    def _get(self, machine_id):
        check_id(machine_id)
        try:
            return self._machines[machine_id]
        except KeyError:
            raise NotFound(f"no machine {machine_id!r} on host {self.host_id}") from None

    def _record_path(self, mid):
        return os.path.join(self.records_dir, f"{mid}.json")

    def _save(self, rec):
        p = self._record_path(rec.spec["id"])
        try:
            with open(p + ".tmp", "w") as f:
                json.dump(rec.to_json(), f)
            os.replace(p + ".tmp", p)
        except OSError as e:
            log.warn("machine {id}: cannot save its record: {e}", id=rec.spec["id"], e=e)

    def _status(self, rec):
        mid = rec.spec["id"]
        st = {
            "machine_id": mid,
            "id": mid,
            "app": rec.spec.get("app"),
            "host_id": self.host_id,
            "state": rec.state,
            "health": rec.health,
            "reason": rec.reason,
            "host_port": rec.host_port,
            "service_port": rec.spec["service_port"],
            "volumes": [dict(v) for v in rec.spec["volumes"]],
            "pid": None,
            # A live migration holds it (why), or moved it (the target host).
            "live_migration": rec.held,
            "migrated_to": rec.migrated_to,
            "paused": rec.paused,
        }
        if rec.check is not None:
            st["health_detail"] = rec.check.detail
        try:
            st["pid"] = self.driver.status(mid).get("pid")
        except NotFound:
            pass
        return st

    def _change(self, rec, state, reason):
        if state == rec.state and reason == rec.reason:
            return
        rec.state, rec.reason = state, reason
        if state != "running":
            rec.paused = None
        if state in ("stopped", "failed", "stopping"):
            self._stop_check(rec)
            if state != "stopping":
                rec.health = "none" if rec.spec["health"] is None else rec.health
        self._save(rec)
        self._report(rec)

    def _report(self, rec, **extra):
        event = {
            "kind": "machine",
            "host_id": self.host_id,
            "machine_id": rec.spec["id"],
            "state": rec.state,
            "health": rec.health,
            "reason": rec.reason,
            "host_port": rec.host_port,
            "paused": rec.paused,
        }
        event.update(extra)
        try:
            d = maybeDeferred(self.report, event)
        except Exception:
            log.failure("reporting a machine event failed")
            return
        d.addErrback(self._reportFailed, rec)

    @staticmethod
    def _reportFailed(f, rec):
        e = from_wire(f.value)
        if isinstance(e, NotFound) and rec.state in ("stopping", "stopped", "failed"):
            # The control plane destroyed it (its app, a scale-down) before it stopped here.
            log.info("machine {id} {state}: the control plane has no record of it any more",
                     id=rec.spec["id"], state=rec.state)
            return
        log.warn("could not report machine {id} {state}: {e}", id=rec.spec["id"],
                 state=rec.state, e=message_of(e))

    def _running(self, rec, reason="running", health="starting"):
        spec = rec.spec
        if spec["health"] is not None and rec.host_port is not None:
            rec.health = health
            self._stop_check(rec)
            hc = spec["health"]
            rec.check = _health.HealthCheck(
                self.reactor,
                self.health_probe(self.reactor, hc, rec.host_port),
                hc["interval"], hc["grace"],
                lambda health, detail, rec=rec: self._health_changed(rec, health, detail),
                health=health,
            )
        else:
            rec.health = "none"
        self._change(rec, "running", reason)
        if rec.check is not None:
            rec.check.start()

    def _health_changed(self, rec, health, detail):
        if rec.state != "running" or rec.held is not None:
            return
        rec.health = health
        if rec.paused is None:  # (while paused, its reason says why it fails its checks)
            rec.reason = f"health {health}: {detail}"
        self._report(rec)

    def _stop_check(self, rec):
        if rec.check is not None:
            rec.check.stop()
            rec.check = None

    def _driver_changed(self, status):
        rec = self._machines.get(status["id"])
        if rec is None or rec.held is not None or rec.fencing:
            # Held by a live migration: the migration watches it (and gives it back).
            return
        state = status["state"]
        if state == "running":
            if rec.state == "starting":
                rec.paused = status.get("paused")
                self._running(rec, status["reason"] or "running")
            elif rec.state == "running" and status.get("paused") != rec.paused:
                # Paused on a full disk, or resumed (zwrm.drivers.diskfull).
                rec.paused = status.get("paused")
                rec.reason = status["reason"]
                self._save(rec)
                self._report(rec)
        elif state in ("stopped", "failed"):
            # While starting, a failure is reported by the start itself (which may retry).
            if rec.state in ("running", "stopping"):
                self._change(rec, state, status["reason"])
