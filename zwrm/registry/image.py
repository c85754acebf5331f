"""
The zwrm VM image format: an OCI image manifest (an "artifact") whose layers are the files a
VM boots from, and whose config says how to boot them. See docs/images.md.
"""

import json
import re

from zwrm.errors import InvalidArgument

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.zwrm.image.v1"
CONFIG_TYPE = "application/vnd.zwrm.image.config.v1+json"
KERNEL_TYPE = "application/vnd.zwrm.kernel.v1"
INITRD_TYPE = "application/vnd.zwrm.initrd.v1"
DISK_TYPE = "application/vnd.zwrm.disk.raw.v1"
QCOW2_TYPE = "application/vnd.zwrm.disk.qcow2.v1"
#: The disk layer's media type for each disk format.
DISK_TYPES = {"raw": DISK_TYPE, "qcow2": QCOW2_TYPE}
DISK_FORMATS = {v: k for k, v in DISK_TYPES.items()}
LAYER_ROLES = {KERNEL_TYPE: "kernel", INITRD_TYPE: "initrd", DISK_TYPE: "disk",
               QCOW2_TYPE: "disk"}
ROLE_TYPES = {"kernel": KERNEL_TYPE, "initrd": INITRD_TYPE, "disk": DISK_TYPE}
FIRMWARES = ("bios", "uefi")

#: The longest repository name (as the distribution spec's registries bound it).
NAME_MAX = 255
_REF_RE = re.compile(
    r"^(?P<name>[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[a-f0-9]{64}))?\Z"
)


def parse_reference(ref):
    """
    Split an image reference C{NAME[:TAG][@DIGEST]}; the tag defaults to C{latest}.

    @return: C{(name, reference)} where reference is the digest if given, else the tag.
    @raise InvalidArgument: for a malformed reference.
    """
    m = _REF_RE.match(ref or "")
    if m is None:
        raise InvalidArgument(
            f"invalid image reference {ref!r}: expected NAME[:TAG][@sha256:DIGEST] "
            "(lower-case name)"
        )
    name = m.group("name")
    if len(name) > NAME_MAX:
        # (the distribution spec's bound, and more than a file name in the store can hold)
        raise InvalidArgument(
            f"invalid image reference: its name is at most {NAME_MAX} characters, not {len(name)}"
        )
    return name, m.group("digest") or m.group("tag") or "latest"


def make_config(cmdline="", service_port=None, firmware=None):
    """
    @param firmware: C{"bios"} (default) or C{"uefi"}: how a self-booting disk boots.
    @return: the config blob's bytes (canonical JSON).
    """
    check_cmdline(cmdline or "")
    if service_port is not None and not (isinstance(service_port, int) and 0 < service_port < 65536):
        raise InvalidArgument(f"service port must be 1-65535, not {service_port!r}")
    if firmware is not None and firmware not in FIRMWARES:
        raise InvalidArgument(f"firmware must be bios or uefi, not {firmware!r}")
    doc = {"cmdline": cmdline or "", "service_port": service_port}
    if firmware is not None:
        doc["firmware"] = firmware
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def make_manifest(config, layers, annotations=None):
    """
    @param config: C{(digest, size)} of the config blob.
    @param layers: C{[(role, digest, size, filename)]}, role in kernel/initrd/disk; a
        disk's role may name its format: C{"disk"} or C{"disk:raw"} (raw), C{"disk:qcow2"}.
    @return: the manifest's bytes.
    """
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config[0], "size": config[1]},
        "layers": [
            {
                "mediaType": _layer_type(role),
                "digest": digest,
                "size": size,
                "annotations": {"org.opencontainers.image.title": filename},
            }
            for role, digest, size, filename in layers
        ],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _layer_type(role):
    if role.startswith("disk:"):
        fmt = role[5:]
        if fmt not in DISK_TYPES:
            raise InvalidArgument(f"disk format must be raw or qcow2, not {fmt!r}")
        return DISK_TYPES[fmt]
    return ROLE_TYPES[role]


def parse_manifest(body):
    """
    Read a zwrm image manifest.

    @return: C{{"config": descriptor, "kernel": descriptor, "initrd": descriptor or None,
        "disk": descriptor or None}} where a descriptor is C{{"digest", "size"}}; the disk's
        also has C{"format"} (C{"raw"} or C{"qcow2"}, from its media type).
    @raise InvalidArgument: if it is not a zwrm image (no kernel layer, wrong config type,
        a role given twice).
    """
    try:
        doc = json.loads(body)
        config = doc["config"]
        layers = doc["layers"]
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("not an OCI image manifest") from None
    if not isinstance(config, dict) or config.get("mediaType") != CONFIG_TYPE:
        raise InvalidArgument(f"not a zwrm VM image: config media type is not {CONFIG_TYPE}")
    out = {"config": _desc(config), "kernel": None, "initrd": None, "disk": None}
    for layer in layers:
        role = LAYER_ROLES.get(layer.get("mediaType") if isinstance(layer, dict) else None)
        if role is None:
            continue  # unknown layers are ignored (forward compatibility)
        if out[role] is not None:
            raise InvalidArgument(f"image has more than one {role} layer")
        out[role] = _desc(layer)
        if role == "disk":
            out[role]["format"] = DISK_FORMATS[layer["mediaType"]]
    if out["kernel"] is None and out["disk"] is None:
        raise InvalidArgument("image has neither a kernel nor a disk layer")
    return out


def _desc(d):
    digest, size = d.get("digest"), d.get("size")
    if not isinstance(digest, str) or not isinstance(size, int):
        raise InvalidArgument("malformed descriptor in image manifest")
    return {"digest": digest, "size": size}


def parse_config(body):
    """
    @return: C{{"cmdline": str, "service_port": int or None, "firmware": "bios"|"uefi"}}.
    @raise InvalidArgument: for malformed config.
    """
    try:
        doc = json.loads(body)
        cmdline = doc.get("cmdline", "") or ""
        port = doc.get("service_port")
        firmware = doc.get("firmware") or "bios"
    except (ValueError, AttributeError):
        raise InvalidArgument("malformed zwrm image config") from None
    if not isinstance(cmdline, str) or not (port is None or isinstance(port, int)):
        raise InvalidArgument("malformed zwrm image config")
    if firmware not in FIRMWARES:
        raise InvalidArgument(f"zwrm image config: firmware must be bios or uefi, not {firmware!r}")
    check_cmdline(cmdline, "zwrm image config: cmdline")
    return {"cmdline": cmdline, "service_port": port, "firmware": firmware}


def check_cmdline(cmdline, what="cmdline"):
    """
    Check a kernel command line (QEMU's C{-append}, one argument of its command): an image's,
    an app spec's, a machine's (L{zwrm.drivers.spec}).

    @return: C{cmdline}.
    @raise InvalidArgument: (naming C{what}) unless one line of text without NUL, which no
        process argument can hold.
    """
    if not isinstance(cmdline, str) or any(c in cmdline for c in "\n\r\0"):
        raise InvalidArgument(f"{what} must be one line of text, not {cmdline!r}")
    return cmdline
