"""
Checks shared by the parts of an app's spec that are mappings of settings with defaults
(C{update}, C{restart}): each raises L{zwrm.errors.InvalidArgument} naming the field.
"""

from zwrm import errors


def settings(value, defaults, what):
    """
    C{value} (a mapping, or L{None} for the defaults) merged over C{defaults}: every key
    present, keys given as L{None} left at their default.

    @raise zwrm.errors.InvalidArgument: C{value} is not a mapping, or names a key that
        C{defaults} does not have.
    """
    if value is None:
        return dict(defaults)
    if not isinstance(value, dict):
        raise errors.InvalidArgument(f"{what} must be a mapping")
    unknown = sorted(set(value) - set(defaults))
    if unknown:
        raise errors.InvalidArgument(f"unknown {what} field(s): {', '.join(unknown)}")
    return dict(defaults, **{k: v for k, v in value.items() if v is not None})


def seconds(value, what, low, high):
    """
    C{value} as a float, when it is a number (not a bool) of seconds from C{low} to C{high}.

    @raise zwrm.errors.InvalidArgument: naming C{what}.
    """
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise errors.InvalidArgument(f"{what} must be seconds from {low} to {high}, not {value!r}")
    return float(value)
