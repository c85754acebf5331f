"""
An app's deployment spec: its check (L{validate_spec}: the normal form every other part of
the control plane reads), how a redeploy's spec is made from the current one
(L{merge_spec}), when a machine may stay under a new spec (L{same_version}), and the check
that the image it boots from is there (L{ImageCheck}).  Pure functions but the last, which
asks the registry.

A spec::

    {"image": "name:tag" | {"kernel", "initrd", "disk", "cmdline"},
     "vcpus", "memory_mb", "replicas", "region", "datacenter",
     "service_port", "health": {"type", "path", "interval", "timeout", "grace"},
     "volumes": [{"name", "size_mb", "mount"}], "constraints", "cloud_init",
     "publish", "domain", "restart", "update", "shutdown_delay"}
"""

import re
import uuid

from zwrm import errors, healthspec, hostfacts
from zwrm.control import fields, healing, network
from zwrm.control.resources.apps import SECRET_FIELDS, secret_digest
from zwrm.drivers import cloudinit
from zwrm.registry.image import check_cmdline
from zwrm.registry.image import parse_reference as parse_image_reference
from zwrm.scheduler import PlacementRequest

SPEC_FIELDS = frozenset({
    "image", "vcpus", "memory_mb", "replicas", "region", "datacenter", "service_port", "health",
    "volumes", "constraints", "cloud_init", "publish", "domain", "restart", "update",
    "shutdown_delay"})
"""The fields of a deployment spec (docs/wamp-procedures.md)."""

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")


def check_name(name, what):
    """C{name} if it is a valid app or volume name. @raise InvalidArgument: naming C{what}."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise errors.InvalidArgument(
            f"{what} {name!r} is not valid: use 1-63 lower-case letters, digits and '-', "
            "starting with a letter or digit"
        )
    return name


def whole_number(spec, key, low, high, default):
    """C{spec[key]} (or C{default}), a whole number from C{low} to C{high}."""
    v = spec.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise errors.InvalidArgument(f"{key} must be a whole number from {low} to {high}, not {v!r}")
    return v


def validate_spec(spec):
    """
    Check a deployment spec; return a normalized copy.

    @raise zwrm.errors.InvalidArgument: naming the field that is wrong.
    """
    if not isinstance(spec, dict):
        raise errors.InvalidArgument("a deployment spec must be a mapping")
    unknown = sorted(set(spec) - SPEC_FIELDS)
    if unknown:
        raise errors.InvalidArgument(f"unknown deployment field(s): {', '.join(unknown)}")
    out = {
        "image": _check_image(spec.get("image")),
        "vcpus": whole_number(spec, "vcpus", 1, 256, 1),
        "memory_mb": whole_number(spec, "memory_mb", 32, 1024 * 1024, 256),
        "replicas": whole_number(spec, "replicas", 0, 1000, 1),
        "region": spec.get("region"),
        "datacenter": spec.get("datacenter"),
        "service_port": spec.get("service_port"),
        "health": spec.get("health"),
        "constraints": spec.get("constraints") or {},
        "volumes": [],
        "cloud_init": cloudinit.validate(spec.get("cloud_init")),
    }
    if spec.get("publish") or spec.get("domain"):  # the ingress (zwrm.control.network)
        out["publish"] = network.check_publish(spec.get("publish"), spec.get("domain"))
        out["domain"] = network.check_domain(spec.get("domain"))
    for key in ("region", "datacenter"):
        # (what a host's region and datacenter may be: anything else no host could match)
        if out[key] is not None and (out[key] == "" or hostfacts.problems(**{key: out[key]})):
            raise errors.InvalidArgument(
                f"{key} must be a name ({hostfacts.PLACE_TEXT}) or null, not {out[key]!r}")
    port = out["service_port"]
    if port is not None and (not isinstance(port, int) or isinstance(port, bool)
                             or not 1 <= port <= 65535):
        raise errors.InvalidArgument(f"service_port must be a TCP port or null, not {port!r}")
    if out["health"] is not None:
        out["health"] = _check_health(out["health"])
    if out["health"] is not None and port is None:
        raise errors.InvalidArgument("a health check needs a service_port")
    if spec.get("restart") is not None:  # the restart policy (zwrm.control.healing)
        out["restart"] = healing.validate_restart(spec["restart"])
    if spec.get("update") is not None:  # a rolling update (zwrm.control.rollout)
        out["update"] = _check_update(spec["update"])
    if spec.get("shutdown_delay") is not None:  # a planned stop's drain (shutdown_delay())
        v = spec["shutdown_delay"]
        if not isinstance(v, int | float) or isinstance(v, bool) \
                or not 0 <= v <= SHUTDOWN_DELAY_MAX:
            raise errors.InvalidArgument(
                f"shutdown_delay must be seconds from 0 to {SHUTDOWN_DELAY_MAX}, not {v!r}")
        out["shutdown_delay"] = float(v)
    vols = spec.get("volumes") or []
    if not isinstance(vols, list):
        raise errors.InvalidArgument("volumes must be a list of {name, size_mb, mount}")
    seen = set()
    for v in vols:
        if not isinstance(v, dict):
            raise errors.InvalidArgument(f"each volume must be {{name, size_mb, mount}}, not {v!r}")
        name = check_name(v.get("name"), "volume name")
        unknown = sorted(set(v) - VOLUME_FIELDS)
        if unknown:
            raise errors.InvalidArgument(
                f"volume {name!r}: unknown field(s) {', '.join(map(str, unknown))} (a volume"
                f" has name, mount and size_mb)")
        if name in seen:
            raise errors.InvalidArgument(f"volume {name!r} is listed twice")
        seen.add(name)
        # (what the agent's driver takes: refused here, not at each machine's start)
        mount = cloudinit.check_mount(v.get("mount"), repr(name))
        out["volumes"].append({
            "name": name, "mount": mount, "size_mb": whole_number(v, "size_mb", 2, 16 * 1024 * 1024, 64),
        })
    # Placement-side checks (labels) are the scheduler's; fail now, not per replica.
    request = PlacementRequest(vcpus=out["vcpus"], memory_mb=out["memory_mb"],
                               region=out["region"], datacenter=out["datacenter"],
                               constraints=out["constraints"])
    wrong = hostfacts.problems(labels=request.constraints)  # (no host could have it)
    if wrong:
        raise errors.InvalidArgument(f"constraints: {wrong[0]}")
    return out


def _check_image(image):
    """
    A spec's image: a reference C{name:tag}, or local paths C{{kernel, initrd, disk,
    cmdline}} with every key (a path left out is L{None}, the command line C{""}), so that
    the same paths given with or without their empty keys are the same version.
    """
    if isinstance(image, str) and image:
        return image
    if not isinstance(image, dict):
        raise errors.InvalidArgument("image must be an image reference (name:tag) or local paths")
    unknown = sorted(set(image) - {"kernel", "initrd", "disk", "cmdline"})
    if unknown:
        raise errors.InvalidArgument(f"image: unknown field(s) {', '.join(unknown)} "
                                     "(local paths are kernel, initrd, disk and cmdline)")
    for key in ("kernel", "initrd", "disk"):
        v = image.get(key)
        if v is not None and not (isinstance(v, str) and v.startswith("/")):
            raise errors.InvalidArgument(f"image {key} must be an absolute path on the hosts, "
                                         f"not {v!r}")
    if not image.get("kernel") and not image.get("disk"):
        raise errors.InvalidArgument("image needs a kernel or a disk path")
    # (what the agent's driver takes: refused here, not at each machine's start)
    check_cmdline(image.get("cmdline") or "", "image cmdline")
    return _filled(image)


def _filled(image):
    """Local image paths with every key: a path left out is L{None}, the command line C{""}."""
    return {"kernel": None, "initrd": None, "disk": None,
            **{k: v for k, v in image.items() if v is not None}, "cmdline": image.get("cmdline") or ""}


HEALTH_FIELDS = frozenset({"type", "path", "interval", "timeout", "grace", "unhealthy_threshold"})
VOLUME_FIELDS = frozenset({"name", "mount", "size_mb"})


def _check_health(health):
    """
    The health check of a spec, checked as its agent will check it, plus the control
    plane's C{unhealthy_threshold} (checks failing in a row before a restart, default 3).
    """
    unknown = sorted(set(health) - HEALTH_FIELDS) if isinstance(health, dict) else ()
    if unknown:  # (a misspelt one was dropped, and its default taken without a word)
        raise errors.InvalidArgument(
            f"unknown health field(s): {', '.join(map(str, unknown))} (a check has"
            f" {', '.join(sorted(HEALTH_FIELDS))})")
    threshold = health.get("unhealthy_threshold") if isinstance(health, dict) else None
    rest = {k: v for k, v in health.items() if k != "unhealthy_threshold"} \
        if isinstance(health, dict) else health
    out = healthspec.validate(rest)
    if threshold is not None:
        if not isinstance(threshold, int) or isinstance(threshold, bool) \
                or not 1 <= threshold <= 1000:
            raise errors.InvalidArgument(
                f"health unhealthy_threshold must be a whole number from 1 to 1000, "
                f"not {threshold!r}")
        out["unhealthy_threshold"] = threshold
    return out


UPDATE_DEFAULTS = {"max_parallel": 1, "min_healthy_time": 10.0, "healthy_deadline": 300.0,
                   "auto_revert": True}


def _check_update(update):
    """A spec's rolling-update settings, with every key (see L{zwrm.control.rollout})."""
    out = fields.settings(update, UPDATE_DEFAULTS, "update")
    out["max_parallel"] = whole_number(out, "max_parallel", 0, 1000, 1)  # 0: all at once
    out["min_healthy_time"] = fields.seconds(out["min_healthy_time"], "update min_healthy_time", 0, 3600)
    out["healthy_deadline"] = fields.seconds(out["healthy_deadline"], "update healthy_deadline", 0, 86400)
    if out["healthy_deadline"] < out["min_healthy_time"]:
        raise errors.InvalidArgument("update healthy_deadline must not be below min_healthy_time")
    if not isinstance(out["auto_revert"], bool):
        raise errors.InvalidArgument("update auto_revert must be true or false")
    return out


def merge_spec(current, given):
    """
    A redeploy's spec: C{given}'s fields over the C{current} version's; a field C{given}
    as L{None} is cleared (back to its default), a field left out keeps its value.  A
    cloud-init C{user_data} or C{env} given as the C{{sha256, size}} that the app's status
    shows in their place (L{zwrm.control.resources.apps.public_spec}) keeps the current
    value: a spec read back with C{zwrm apps spec} deploys as it was.

    @raise zwrm.errors.InvalidArgument: for such a digest of no current value.
    """
    out = dict(current or {})
    for key, value in given.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    ci = out.get("cloud_init")
    if isinstance(ci, dict) and any(_is_digest(ci.get(k)) for k in SECRET_FIELDS):
        ci = out["cloud_init"] = dict(ci)
        had = (current or {}).get("cloud_init") or {}
        for key in SECRET_FIELDS:
            if _is_digest(ci.get(key)):
                if secret_digest(had.get(key)) != ci[key]:
                    raise errors.InvalidArgument(
                        f"cloud_init {key}: {ci[key]['sha256'][:12]}... is the digest of no "
                        f"current {key} of this app: give the {key} itself")
                ci[key] = had[key]
    return out


def _is_digest(value):
    # Never a valid user_data (text) or env (its values are text): the size is a number.
    return (isinstance(value, dict) and set(value) == {"sha256", "size"}
            and isinstance(value["sha256"], str) and isinstance(value["size"], int))


def same_version(a, b):
    """Whether a machine of spec C{a} may stay under spec C{b}: they differ at most in
    their replica count and how they are updated and stopped (and local image paths in
    keys left out rather than empty, as specs stored before L{_check_image} may be)."""
    return _versioned(a) == _versioned(b)


def _versioned(spec):
    out = {k: v for k, v in (spec or {}).items() if k not in _NOT_VERSIONED}
    if isinstance(out.get("image"), dict):
        out["image"] = _filled(out["image"])
    return out


_NOT_VERSIONED = ("replicas", "update", "shutdown_delay")

SHUTDOWN_DELAY_DEFAULT = 5.0  # seconds, for an app that publishes a port
SHUTDOWN_DELAY_MAX = 3600


def shutdown_delay(spec):
    """
    How long a replica of an app with spec C{spec} is out of the routes before a planned
    stop (a rolling update, a scale down, a destroy, a drain): the spec's
    C{shutdown_delay}, else L{SHUTDOWN_DELAY_DEFAULT} seconds for an app that publishes
    a port (the ingress gives the replica's open connections that long to finish), else
    0 (nothing routes to it).
    """
    spec = spec or {}
    if spec.get("shutdown_delay") is not None:
        return float(spec["shutdown_delay"])
    return SHUTDOWN_DELAY_DEFAULT if spec.get("publish") else 0.0


class ImageCheck:
    """
    Whether the image a spec boots from is there.

    @ivar images: the registry's C{ImageAPI} (C{info(ref)}), or L{None} (set once the
        registry is up; until then references are only parsed).
    """

    def __init__(self, images=None):
        self.images = images

    async def check(self, spec):
        """
        Check that the image a spec boots from is there: a registry reference must name an
        image of the control plane's registry with a kernel or a disk, its kernel one QEMU
        boots, a disk without a kernel one with a boot sector; local paths must be
        absolute, with a kernel or a disk.

        @raise zwrm.errors.InvalidArgument: saying what is missing.
        """
        image = spec["image"]
        if isinstance(image, dict):
            unknown = sorted(set(image) - {"kernel", "initrd", "disk", "cmdline"})
            if unknown:
                raise errors.InvalidArgument(f"image: unknown field(s) {', '.join(unknown)}")
            for key in ("kernel", "initrd", "disk"):
                path = image.get(key)
                if path is not None and (not isinstance(path, str) or not path.startswith("/")):
                    raise errors.InvalidArgument(f"image {key} must be an absolute path, not {path!r}")
            if not image.get("kernel") and not image.get("disk"):
                raise errors.InvalidArgument("image needs a kernel or a disk")
            return
        parse_image_reference(image)
        if self.images is None:
            return
        try:
            info = await self.images.info(image)
        except errors.NotFound:
            raise errors.InvalidArgument(f"image {image} is not in the registry") from None
        layers = info.get("layers") or {}
        if info.get("kind") != "zwrm" or not (layers.get("kernel") or layers.get("disk")):
            raise errors.InvalidArgument(
                f"image {image} is not a bootable zwrm image (it has no kernel or disk)")
        if layers.get("kernel"):
            await self.images.check_kernel(image, layers["kernel"]["digest"])
        else:
            await self.images.check_boot_disk(image, layers["disk"])


def new_id(prefix):
    """A new id for a row: C{<prefix>-<12 hex digits>}."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def error_text(e):
    """The readable message of an exception (a zwrm error's, or its first argument)."""
    if isinstance(e, errors.ZwrmError):
        return e.message
    args = getattr(e, "args", ())
    return str(args[0]) if args else e.__class__.__name__
