"""
The agent's identity on disk: a stable host id and the credential it was issued.

C{<data_dir>/host.json} (mode 0600): C{{"host_id": ..., "credential": ... or null}}.
The host id is made on first start and never changes, so a restarted agent is the same
host; the credential comes from C{zwrm.agent.join}.
"""

import json
import os
import uuid

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
        else:
            self.host_id = "h-" + uuid.uuid4().hex[:16]
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
