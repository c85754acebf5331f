"""
Checking the driver-level machine spec that every L{zwrm.interfaces.IHypervisorDriver} takes.

Drivers call L{validate} first, so every driver rejects the same bad input with the same
C{zwrm.error.invalid_argument} message.
"""

import hashlib
import json
import re

from zwrm.drivers import cloudinit as _cloudinit
from zwrm.errors import InvalidArgument
from zwrm.registry.image import check_cmdline

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def check_id(machine_id, what="machine id"):
    """@raise InvalidArgument: unless C{machine_id} is a valid id."""
    if not isinstance(machine_id, str) or not ID_RE.match(machine_id):
        raise InvalidArgument(
            f"{what} {machine_id!r} is not valid: use 1-64 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return machine_id


def volume_serial(volume_id):
    """
    The virtio serial a volume is attached with (at most 20 bytes, as virtio-blk allows):
    the id itself, or for a longer id its first 11 characters, '-' and 8 hex digits of its
    SHA-256. A guest finds the volume at C{/dev/disk/by-id/virtio-<serial>}, whatever the
    order of the disks.
    """
    if len(volume_id) <= 20:
        return volume_id
    return volume_id[:11] + "-" + hashlib.sha256(volume_id.encode()).hexdigest()[:8]


def machine_mac(machine_id):
    """The machine's MAC address: fixed for its id (QEMU's 52:54:00 prefix)."""
    h = hashlib.sha256(machine_id.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


def _int(spec, key, low, high):
    v = spec.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise InvalidArgument(f"{key} must be an integer from {low} to {high}, not {v!r}")
    return v


def _port(v, what):
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65535:
        raise InvalidArgument(f"{what} must be a TCP port (1-65535), not {v!r}")
    return v


def validate(spec):
    """
    Check a machine spec and return a normalized copy.

    @raise InvalidArgument: naming the first bad field and why.
    """
    if not isinstance(spec, dict):
        raise InvalidArgument(f"a machine spec must be a dict, not {type(spec).__name__}")
    out = {"id": check_id(spec.get("id"))}
    for key in ("kernel", "initrd", "disk"):
        v = spec.get(key)
        if v is not None and (not isinstance(v, str) or not v):
            raise InvalidArgument(f"{key} must be a file path or null, not {v!r}")
        out[key] = v
    if not out["kernel"] and not out["disk"]:
        raise InvalidArgument("a machine needs a kernel or a boot disk; the spec has neither")
    if out["initrd"] and not out["kernel"]:
        raise InvalidArgument("an initrd needs a kernel")
    fmt = spec.get("disk_format")
    if fmt is not None and fmt not in ("raw", "qcow2"):
        raise InvalidArgument(f"disk_format must be raw, qcow2 or null, not {fmt!r}")
    out["disk_format"] = fmt
    firmware = spec.get("firmware") or "bios"
    if firmware not in ("bios", "uefi"):
        raise InvalidArgument(f"firmware must be bios or uefi, not {firmware!r}")
    out["firmware"] = firmware
    out["cmdline"] = check_cmdline(spec.get("cmdline") or "")
    out["vcpus"] = _int(spec, "vcpus", 1, 256)
    out["memory_mb"] = _int(spec, "memory_mb", 32, 1024 * 1024)
    vols = spec.get("volumes") or []
    if not isinstance(vols, list) or len(vols) > 20:
        raise InvalidArgument("volumes must be a list of at most 20 {id, path}")
    out["volumes"] = []
    for v in vols:
        if not isinstance(v, dict) or not isinstance(v.get("path"), str) or not v["path"]:
            raise InvalidArgument(f"each volume needs an id and a path, not {v!r}")
        vid = check_id(v.get("id"), "volume id")
        vol = {"id": vid, "path": v["path"], "serial": volume_serial(vid)}
        mount = v.get("mount")
        if mount is not None:
            vol["mount"] = _cloudinit.check_mount(mount, vid)
        out["volumes"].append(vol)
    serials = [v["serial"] for v in out["volumes"]]
    if len(set(serials)) != len(serials):
        raise InvalidArgument("two volumes of the machine have the same id (or virtio serial)")
    out["cloud_init"] = _cloudinit.validate(spec.get("cloud_init"))
    out["mac"] = machine_mac(out["id"])
    fwds = spec.get("forwards") or []
    if not isinstance(fwds, list):
        raise InvalidArgument("forwards must be a list of {guest, host}")
    out["forwards"] = []
    for f in fwds:
        if not isinstance(f, dict):
            raise InvalidArgument(f"each forward must be {{guest, host}}, not {f!r}")
        out["forwards"].append(
            {"guest": _port(f.get("guest"), "forward guest port"),
             "host": _port(f.get("host"), "forward host port")}
        )
    out["nic"] = _nic(spec.get("nic"))
    return out


_TAP_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}\Z")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")


def _nic(nic):
    """
    C{None} (user-mode networking) or C{{"tap", "mac", "network_config"}} (a TAP device the
    agent made; C{network_config}, optional, is the guest's static cloud-init network-config,
    version 2, that a disk image's seed carries).
    """
    if nic is None:
        return None
    if (not isinstance(nic, dict) or not isinstance(nic.get("tap"), str)
            or not _TAP_RE.match(nic["tap"]) or not isinstance(nic.get("mac"), str)
            or not _MAC_RE.match(nic["mac"])):
        raise InvalidArgument(
            f"nic must be null or {{tap: an interface name, mac: aa:bb:cc:dd:ee:ff}}, not {nic!r}")
    out = {"tap": nic["tap"], "mac": nic["mac"]}
    cfg = nic.get("network_config")
    if cfg is not None:
        if (not isinstance(cfg, dict) or cfg.get("version") != 2
                or not isinstance(cfg.get("ethernets"), dict)
                or len(json.dumps(cfg)) > 16 * 1024):
            raise InvalidArgument("nic network_config must be a cloud-init network-config "
                                  "version 2 mapping (with ethernets) of at most 16 KiB")
        out["network_config"] = cfg
    return out
