"""
The sending side's attempts machine (L{zwrm.agent.transfer.attempts.SendAttempts}): every
state x every input, against an owner that records what the machine asks of it. The whole
stream, with real sockets, is tests/agent/test_transfer.py.
"""

from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from zwrm import errors
from zwrm.agent.transfer.attempts import SendAttempts


class Transport:
    def __init__(self):
        self.aborted = False

    def abortConnection(self):
        self.aborted = True


class Proto:
    def __init__(self):
        self._stopped = False
        self.transport = Transport()


class Owner:
    """What C{_Send} is to the machine: hooks that record their calls."""

    def __init__(self):
        self.proto = None
        self.calls = []
        self.outcome = None
        self.machine = SendAttempts(self)

    def _connect(self):
        self.calls.append("connect")

    def _schedule_retry(self):
        self.calls.append("schedule")

    def _cancel_retry(self):
        self.calls.append("cancel")

    def _stop(self, outcome):
        self.calls.append("stop")
        self.outcome = outcome

    def _fire(self):
        self.calls.append("fire")

    def _close_file(self):
        self.calls.append("close_file")


def in_state(name):
    owner = Owner()
    m = owner.machine
    if name != "scanning":
        m.scanned()
    if name in ("streaming", "closing"):
        m.connected(Proto())
    if name == "waiting":
        m.broke()
    elif name == "closing":
        m.finish({"digest": "d"})
    elif name == "done":
        m.finish(None)
    assert m.state == name, (m.state, name)
    owner.calls.clear()
    return owner


ERR = errors.Unavailable("no")

INPUTS = {
    "scanned": lambda m: m.scanned(),
    "scan_failed": lambda m: m.scan_failed(ERR),
    "connected": lambda m: m.connected(Proto()),
    "broke": lambda m: m.broke(),
    "gave_up": lambda m: m.gave_up(ERR),
    "finish": lambda m: m.finish({"digest": "d"}),
    "retry_due": lambda m: m.retry_due(),
}

# (state, input) -> (new state, the owner's hooks called, in order)
TABLE = {
    ("scanning", "scanned"): ("connecting", ["connect"]),
    ("scanning", "scan_failed"): ("done", ["stop", "fire"]),
    ("scanning", "connected"): ("scanning", []),
    ("scanning", "broke"): ("scanning", []),
    ("scanning", "gave_up"): ("scanning", []),
    ("scanning", "finish"): ("done", ["stop", "fire"]),
    ("scanning", "retry_due"): ("scanning", []),
    ("connecting", "scanned"): ("connecting", []),
    ("connecting", "scan_failed"): ("connecting", []),
    ("connecting", "connected"): ("streaming", []),
    ("connecting", "broke"): ("waiting", ["schedule"]),
    ("connecting", "gave_up"): ("done", ["stop", "fire"]),
    ("connecting", "finish"): ("done", ["stop", "fire"]),
    ("connecting", "retry_due"): ("connecting", []),
    ("streaming", "scanned"): ("streaming", []),
    ("streaming", "scan_failed"): ("streaming", []),
    ("streaming", "connected"): ("streaming", []),
    ("streaming", "broke"): ("waiting", ["schedule"]),
    ("streaming", "gave_up"): ("done", ["stop", "fire"]),
    ("streaming", "finish"): ("closing", ["stop"]),
    ("streaming", "retry_due"): ("streaming", []),
    ("waiting", "scanned"): ("waiting", []),
    ("waiting", "scan_failed"): ("waiting", []),
    ("waiting", "connected"): ("waiting", []),
    ("waiting", "broke"): ("waiting", []),
    ("waiting", "gave_up"): ("waiting", []),
    ("waiting", "finish"): ("done", ["cancel", "stop", "fire"]),
    ("waiting", "retry_due"): ("connecting", ["connect"]),
    ("closing", "scanned"): ("closing", []),
    ("closing", "scan_failed"): ("closing", []),
    ("closing", "connected"): ("closing", []),
    ("closing", "broke"): ("done", ["fire"]),
    ("closing", "gave_up"): ("done", ["fire"]),
    ("closing", "finish"): ("closing", []),
    ("closing", "retry_due"): ("closing", []),
    ("done", "scanned"): ("done", ["close_file"]),
    ("done", "scan_failed"): ("done", []),
    ("done", "connected"): ("done", []),
    ("done", "broke"): ("done", []),
    ("done", "gave_up"): ("done", []),
    ("done", "finish"): ("done", []),
    ("done", "retry_due"): ("done", []),
}


class TableTests(SynchronousTestCase):
    def test_every_state_and_input(self):
        states = {"scanning", "connecting", "streaming", "waiting", "closing", "done"}
        self.assertEqual({s for s, _ in TABLE}, states)
        self.assertEqual(len(TABLE), len(states) * len(INPUTS))
        for (state, name), (new, calls) in sorted(TABLE.items()):
            owner = in_state(state)
            INPUTS[name](owner.machine)
            self.assertEqual((owner.machine.state, owner.calls), (new, calls), (state, name))

    def test_the_table_is_the_machines(self):
        automaton = SendAttempts._machine._automaton
        machine = {(s.method.__name__, i.method.__name__): n.method.__name__
                   for s, i, n, _ in automaton.allTransitions()}
        self.assertEqual(machine, {key: value[0] for key, value in TABLE.items()})


class ConnectionTests(SynchronousTestCase):
    def test_the_open_connection_is_kept_then_closed_before_the_outcome(self):
        owner = in_state("connecting")
        proto = Proto()
        owner.machine.connected(proto)
        self.assertIs(owner.proto, proto)
        owner.machine.finish({"digest": "d"})
        self.assertEqual((proto.transport.aborted, proto._stopped), (True, True))
        self.assertEqual((owner.outcome, owner.calls), ({"digest": "d"}, ["stop"]))
        owner.machine.broke()  # the aborted connection is lost
        self.assertEqual((owner.machine.state, owner.proto, owner.calls[-1]),
                         ("done", None, "fire"))

    def test_a_lost_connection_is_forgotten(self):
        for lose in (lambda m: m.broke(), lambda m: m.gave_up(ERR)):
            owner = in_state("streaming")
            self.assertIsNotNone(owner.proto)
            lose(owner.machine)
            self.assertIsNone(owner.proto)

    def test_giving_up_fails_with_the_error(self):
        owner = in_state("streaming")
        owner.machine.gave_up(ERR)
        self.assertIsInstance(owner.outcome, Failure)
        self.assertIs(owner.outcome.value, ERR)

    def test_a_connection_after_the_outcome_is_aborted(self):
        for state in ("scanning", "waiting", "closing", "done", "streaming"):
            owner = in_state(state)
            proto = Proto()
            owner.machine.connected(proto)
            self.assertEqual((proto.transport.aborted, proto._stopped), (True, True), state)
            self.assertIsNot(owner.proto, proto, state)
