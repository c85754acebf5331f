"""
Host ids: what they look like, and how an id of an older zwrm maps to today's.

A host id is a component of WAMP URIs (C{zwrm.agent.<host_id>.machine.start}), so it
follows the specification's strict rule for a URI component: 1 to 64 lowercase letters,
digits and C{_}.  New ids are C{h_} and 16 hex digits (L{new_host_id}).

Before, ids were C{h-} and 16 hex digits, which a client that validates URIs strictly
refuses.  The store's migration renames every such id to L{strict_host_id} of it
(C{h-0123...} becomes C{h_0123...}); an agent that comes back with its old id is
authenticated under the new one and takes it from WELCOME's C{authid}.  A host certificate
issued for an old C{h-<hex>} id stays valid: L{current_host_id} reads it as the new id,
and an agent of an older zwrm that joins with a fresh C{h-<hex>} id is admitted as
C{h_<hex>} (it takes the id C{zwrm.agent.join} returns).

Shared by the agent, the control plane and the PKI; imports nothing of zwrm.
"""

import re
import uuid

PREFIX = "h_"
"""What every new host id starts with."""

STRICT = re.compile(r"[0-9a-z_]{1,64}")
"""A host id: one strict WAMP URI component of at most 64 characters."""

_LEGACY = re.compile(r"h-[0-9a-f]{16}")
_NOT_STRICT = re.compile(r"[^0-9a-z_]")


def new_host_id():
    """A fresh host id: C{h_} and 16 hex digits."""
    return PREFIX + uuid.uuid4().hex[:16]


def is_strict_host_id(host_id):
    """Whether C{host_id} is a host id of today's form (see L{STRICT})."""
    return isinstance(host_id, str) and STRICT.fullmatch(host_id) is not None


def strict_host_id(host_id):
    """
    The strict host id for C{host_id}: itself if it is strict, else lowercased with every
    other character than C{a-z 0-9 _} replaced by C{_} (C{h-0123abcd...} becomes
    C{h_0123abcd...}), at most 64 characters.  L{None} for what is not a non-empty string.
    """
    if not isinstance(host_id, str) or not host_id:
        return None
    if STRICT.fullmatch(host_id):
        return host_id
    return _NOT_STRICT.sub("_", host_id.lower())[:64]


def current_host_id(host_id):
    """
    Today's id for a host id that an older zwrm made (C{h-<16 hex>}, as an agent or the
    control plane generated them): C{h_<16 hex>}.  Every other value as it is.  Used for
    the id a host certificate names and the id an agent joins with.
    """
    if isinstance(host_id, str) and _LEGACY.fullmatch(host_id):
        return PREFIX + host_id[2:]
    return host_id


__all__ = ["PREFIX", "STRICT", "current_host_id", "is_strict_host_id", "new_host_id",
           "strict_host_id"]
