"""
The agent's identity on disk: a stable host id and the credential it was issued.

C{<data_dir>/host.json} (mode 0600): C{{"host_id": ..., "credential": ... or null}}.
The host id is made on first start (C{h_} and 16 hex digits, L{zwrm.hostid.new_host_id})
and changes only when the control plane renames the host (an id of an older zwrm,
C{h-<hex>}, becomes C{h_<hex>}: the agent takes the authid WELCOME gives it), so a
restarted agent is the same host; the credential comes from C{zwrm.agent.join}.
"""

import json
import os

from zwrm.hostid import new_host_id, strict_host_id

FILE = "host.json"


class Identity:
    """
    @ivar host_id: this host's id.
    @ivar credential: the credential issued at join, or L{None} before joining.
    """

    def __init__(self, data_dir):
        self.path = os.path.join(data_dir, FILE)
        self.host_id = None
        self.credential = None

    def load(self):
        """Read the file, creating it with a fresh host id if missing."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        if os.path.exists(self.path):
            with open(self.path) as f:
                data = json.load(f)
            self.host_id = data["host_id"]
            self.credential = data.get("credential")
            if self.credential is None and strict_host_id(self.host_id) != self.host_id:
                # never joined under its old-style id: nothing refers to it yet
                self.host_id = strict_host_id(self.host_id)
                self.save()
        else:
            self.host_id = new_host_id()
            self.credential = None
            self.save()
        return self

    def save(self):
        """Write the file atomically with mode 0600."""
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"host_id": self.host_id, "credential": self.credential}, f)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
