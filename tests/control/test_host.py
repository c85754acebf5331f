"""
The Host machine: every state handles every input.
"""

from twisted.trial.unittest import SynchronousTestCase

from zwrm.control.host import INPUTS, Host
from zwrm.errors import Conflict

# (state, state_before_offline) x input -> expected (state, state_before_offline),
# or Conflict, with "same" meaning an explicit no-op.
C = Conflict
SAME = "same"
TABLE = {
    ("ready", None): {
        "heartbeat_lost": ("offline", "ready"),
        "agent_registered": SAME,
        "drain_requested": ("draining", None),
        "drain_finished": SAME,
        "undrain_requested": C,
        "activate_requested": SAME,
    },
    ("draining", None): {
        "heartbeat_lost": ("offline", "draining"),
        "agent_registered": SAME,
        "drain_requested": C,
        "drain_finished": ("drained", None),
        "undrain_requested": ("ready", None),
        "activate_requested": C,
    },
    ("drained", None): {
        "heartbeat_lost": ("offline", "drained"),
        "agent_registered": SAME,
        "drain_requested": C,
        "drain_finished": SAME,
        "undrain_requested": C,
        "activate_requested": ("ready", None),
    },
    ("offline", "ready"): {
        "heartbeat_lost": SAME,
        "agent_registered": ("ready", None),
        "drain_requested": C,
        "drain_finished": SAME,
        "undrain_requested": C,
        "activate_requested": C,
    },
    ("offline", "draining"): {
        "heartbeat_lost": SAME,
        "agent_registered": ("draining", None),
        "drain_requested": C,
        "drain_finished": ("offline", "drained"),
        "undrain_requested": C,
        "activate_requested": C,
    },
    ("offline", "drained"): {
        "heartbeat_lost": SAME,
        "agent_registered": ("drained", None),
        "drain_requested": C,
        "drain_finished": SAME,
        "undrain_requested": C,
        "activate_requested": C,
    },
}


class HostMachineTests(SynchronousTestCase):
    def test_table_is_complete(self):
        """The table covers every state and every input."""
        for row in TABLE.values():
            self.assertEqual(set(row), set(INPUTS))
        self.assertEqual(len(TABLE), 6)

    def test_every_state_every_input(self):
        """Each (state, input) does what the table says, and nothing else."""
        for (state, before), row in TABLE.items():
            for input_name, expected in row.items():
                host = Host.restore("h1", state, before)
                label = f"{state}/{before} + {input_name}"
                if expected is C:
                    self.assertRaises(Conflict, host.handle, input_name)
                    self.assertEqual((host.state, host.state_before_offline), (state, before), label)
                    continue
                change = host.handle(input_name)
                if expected == SAME:
                    self.assertIsNone(change, label)
                    self.assertEqual((host.state, host.state_before_offline), (state, before), label)
                else:
                    self.assertEqual((host.state, host.state_before_offline), expected, label)
                    self.assertEqual(change.old, state, label)
                    self.assertEqual(change.new, expected[0], label)
                    self.assertEqual(change.state_before_offline, expected[1], label)
                    self.assertEqual(change.reason, input_name, label)

    def test_new_host_is_ready(self):
        self.assertEqual(Host("h").state, "ready")

    def test_offline_returns_to_previous_state(self):
        """A draining host that goes offline and comes back is draining again."""
        host = Host("h")
        host.handle("drain_requested")
        host.handle("heartbeat_lost")
        self.assertEqual((host.state, host.state_before_offline), ("offline", "draining"))
        host.handle("agent_registered")
        self.assertEqual(host.state, "draining")

    def test_bad_input_and_state(self):
        self.assertRaises(ValueError, Host("h").handle, "explode")
        self.assertRaises(ValueError, Host.restore, "h", "weird")
