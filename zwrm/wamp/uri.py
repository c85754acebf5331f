"""
The WAMP specification's strict URI rule, for clients that validate URIs strictly.

Strict URIs have components of lowercase letters, digits and C{_} only, separated by
single dots (WAMP basic profile, "Strict URIs").  Patterns may have empty components:
the last one for a prefix (C{"zwrm.event."}), any one for a wildcard
(C{"zwrm.agent..heartbeat"}).
"""

import re

_STRICT = {
    "exact": re.compile(r"^([0-9a-z_]+\.)*([0-9a-z_]+)\Z"),
    "prefix": re.compile(r"^([0-9a-z_]+\.)*([0-9a-z_]*)\Z"),
    "wildcard": re.compile(r"^(([0-9a-z_]+\.)|\.)*([0-9a-z_]+)?\Z"),
}


def is_strict_uri(uri, match="exact"):
    """
    C{True} if C{uri} follows the WAMP specification's strict URI rule.

    @param match: C{"exact"} for a URI, C{"prefix"} or C{"wildcard"} for a
        subscription or registration pattern.
    """
    if not isinstance(uri, str):
        return False
    return _STRICT[match].match(uri) is not None


__all__ = ["is_strict_uri"]
