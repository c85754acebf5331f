"""
A machine's health check spec (C{health} in a machine spec): its one check, shared by the
control plane (it checks a spec at deploy) and the agent (L{zwrm.agent.health} runs the
check); it imports neither.
"""

from zwrm.errors import InvalidArgument

HEALTH_TYPES = ("http", "tcp")


def validate(spec):
    """
    Check a health check spec C{{type, path, interval, timeout, grace}} and fill defaults
    (path "/", interval 5, timeout 2, grace 60 seconds).

    @return: the normalized spec, or C{None} for no check.
    @raise InvalidArgument: naming the bad field.
    """
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise InvalidArgument(f"health must be a dict or null, not {type(spec).__name__}")
    kind = spec.get("type", "http")
    if kind not in HEALTH_TYPES:
        raise InvalidArgument(f"health type must be one of {', '.join(HEALTH_TYPES)}, not {kind!r}")
    out = {"type": kind}
    path = spec.get("path") or "/"
    if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in " \r\n"):
        raise InvalidArgument(f"health path must be an absolute URL path, not {path!r}")
    out["path"] = path
    for key, default, low, high in (("interval", 5, 0.1, 3600), ("timeout", 2, 0.1, 600),
                                    ("grace", 60, 0, 86400)):
        v = spec.get(key, default)
        if v is None:
            v = default
        if not isinstance(v, int | float) or isinstance(v, bool) or not low <= v <= high:
            raise InvalidArgument(f"health {key} must be a number of seconds from {low} to {high}, not {v!r}")
        out[key] = v
    return out


__all__ = ["HEALTH_TYPES", "validate"]
