"""
What a host's name, region, datacenter and labels may be: one rule for the agent's
configuration (refused when it starts, not at each attempt to join), the control plane's
check of the facts an agent reports (L{zwrm.control.schema}) and an app's region and
datacenter (L{zwrm.control.appspec}). It imports nothing of zwrm's parts.
"""

import re

#: A region or datacenter name ("" is none).
PLACE_PATTERN = r"[A-Za-z0-9._-]{0,63}"
PLACE_TEXT = "at most 63 characters of A-Z a-z 0-9 . _ -"
#: A label's key; its value is any text of at most L{LABEL_VALUE_MAX} characters.
LABEL_KEY_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}"
LABEL_KEY_TEXT = "1-63 characters of A-Z a-z 0-9 . _ / -"
LABEL_VALUE_MAX = 255
MAX_LABELS = 64
NAME_MAX = 253

_PLACE = re.compile(PLACE_PATTERN)
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)


def problems(name=None, region=None, datacenter=None, labels=None):
    """
    @return: what is wrong with the facts given (L{None} for one not given), one phrase
        each, naming the fact; C{[]} if nothing is.
    """
    out = []
    if name is not None and (not isinstance(name, str) or len(name) > NAME_MAX):
        out.append(f"name must be text of at most {NAME_MAX} characters, not {name!r}")
    for key, value in (("region", region), ("datacenter", datacenter)):
        if value is not None and (not isinstance(value, str) or not _PLACE.fullmatch(value)):
            out.append(f"{key} must be {PLACE_TEXT}, not {value!r}")
    if labels is not None:
        if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
            out.append(f"labels must be at most {MAX_LABELS} key=value pairs")
        else:
            for key, value in labels.items():
                if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
                    out.append(f"label key must be {LABEL_KEY_TEXT}, not {key!r}")
                elif not isinstance(value, str) or len(value) > LABEL_VALUE_MAX:
                    out.append(f"label {key}: its value must be text of at most"
                               f" {LABEL_VALUE_MAX} characters, not {value!r}")
    return out
