"""
The life cycle of one host, as an Automat state machine.

States, as the rest of zwrm sees them (the C{state} column of C{hosts}):

 - C{ready}: schedulable.
 - C{draining}: its machines are being moved away; nothing new is placed on it.
 - C{drained}: empty, in maintenance.
 - C{offline}: its heartbeats stopped.  The machine remembers the state it had
   (C{state_before_offline}) and returns to it when the agent registers again; inside
   the machine this is one state per remembered state (C{offline_ready},
   C{offline_draining}, C{offline_drained}), which keeps every transition unconditional.

Every state handles every input.  An input that means nothing in a state is an explicit
no-op (returns L{None}); an operator request that contradicts the state raises
L{zwrm.errors.Conflict} and changes nothing.  An input that changes the state returns a
L{Change}; the machine itself never stores or publishes anything and never calls back into
itself: its owner (L{zwrm.control.registry.HostRegistry}) stores the change, then
publishes it on C{zwrm.event.host}.

A diagram is in C{docs/state-machines/host.dot}, generated from this machine by
C{scripts/state_diagrams.py} (a test fails when it differs).
"""

from dataclasses import dataclass

from automat import MethodicalMachine

from zwrm.errors import Conflict

STATES = ("ready", "draining", "drained", "offline")
INPUTS = (
    "heartbeat_lost",
    "agent_registered",
    "drain_requested",
    "drain_finished",
    "undrain_requested",
    "activate_requested",
)


@dataclass(frozen=True)
class Change:
    """
    A state change of a host, to be stored and then announced.

    @ivar old: the public state before (one of L{STATES}).
    @ivar new: the public state after.
    @ivar state_before_offline: when C{new} is C{offline}, the state to return to.
    @ivar reason: the input that caused it.
    """

    old: str
    new: str
    state_before_offline: str | None
    reason: str


def _split(serialized):
    if serialized.startswith("offline_"):
        return "offline", serialized[len("offline_") :]
    return serialized, None


class Host:
    """
    One host's life cycle.

    Create it with L{Host.restore} from what the store says, or as C{Host(host_id)} for a
    new host (which starts C{ready}).

    @ivar host_id: the host's id.
    """

    _machine = MethodicalMachine()

    def __init__(self, host_id):
        self.host_id = host_id

    @classmethod
    def restore(cls, host_id, state, state_before_offline=None):
        """
        A machine in the stored C{state}.

        @param state: one of L{STATES}.
        @param state_before_offline: when C{state} is C{offline}, the state to return
            to (default C{ready}).
        """
        if state not in STATES:
            raise ValueError(f"unknown host state {state!r}")
        if state == "offline":
            state = "offline_" + (state_before_offline or "ready")
        host = cls(host_id)
        host._restore(state)
        return host

    @property
    def state(self):
        """The public state: one of L{STATES}."""
        return _split(self._save())[0]

    def saved(self):
        """Its state as it would be stored (serialized), for L{put_back}."""
        return self._save()

    def put_back(self, saved):
        """Return to a state L{saved} gave: a change that could not be stored is undone."""
        self._restore(saved)

    @property
    def state_before_offline(self):
        """When offline, the state the host returns to; else L{None}."""
        return _split(self._save())[1]

    @_machine.serializer()
    def _save(self, state):
        return state

    @_machine.unserializer()
    def _restore(self, state):
        return state

    # -- states -----------------------------------------------------------------------

    @_machine.state(initial=True, serialized="ready")
    def ready(self):
        "Schedulable."

    @_machine.state(serialized="draining")
    def draining(self):
        "Machines are being moved away."

    @_machine.state(serialized="drained")
    def drained(self):
        "Empty; in maintenance."

    @_machine.state(serialized="offline_ready")
    def offline_ready(self):
        "Heartbeats stopped while ready."

    @_machine.state(serialized="offline_draining")
    def offline_draining(self):
        "Heartbeats stopped while draining."

    @_machine.state(serialized="offline_drained")
    def offline_drained(self):
        "Heartbeats stopped while drained."

    # -- inputs -----------------------------------------------------------------------

    @_machine.input()
    def heartbeat_lost(self):
        "No heartbeat for C{offline_after} seconds."

    @_machine.input()
    def agent_registered(self):
        "The agent registered (again), or heartbeated after being offline."

    @_machine.input()
    def drain_requested(self):
        "An operator asked to drain the host."

    @_machine.input()
    def drain_finished(self):
        "The host's drain moved every machine away."

    @_machine.input()
    def undrain_requested(self):
        "An operator cancelled a drain."

    @_machine.input()
    def activate_requested(self):
        "An operator returned a drained host to service."

    # -- outputs ----------------------------------------------------------------------
    # Each runs after the transition, so self.state is already the new state.

    def _change(self, old, reason):
        return Change(old, self.state, self.state_before_offline, reason)

    def _out(name, old, reason):
        def output(self):
            return self._change(old, reason)

        output.__name__ = output.__qualname__ = name
        return output

    _went_offline_ready = _machine.output()(_out("went_offline_ready", "ready", "heartbeat_lost"))
    _went_offline_draining = _machine.output()(
        _out("went_offline_draining", "draining", "heartbeat_lost")
    )
    _went_offline_drained = _machine.output()(
        _out("went_offline_drained", "drained", "heartbeat_lost")
    )
    _back_ready = _machine.output()(_out("back_ready", "offline", "agent_registered"))
    _back_draining = _machine.output()(_out("back_draining", "offline", "agent_registered"))
    _back_drained = _machine.output()(_out("back_drained", "offline", "agent_registered"))
    _started_drain = _machine.output()(_out("started_drain", "ready", "drain_requested"))
    _finished_drain = _machine.output()(_out("finished_drain", "draining", "drain_finished"))
    _finished_drain_offline = _machine.output()(
        _out("finished_drain_offline", "offline", "drain_finished")
    )
    _undrained = _machine.output()(_out("undrained", "draining", "undrain_requested"))
    _activated = _machine.output()(_out("activated", "drained", "activate_requested"))
    del _out

    @_machine.output()
    def _nothing(self):
        return None

    @_machine.output()
    def _conflict_already_draining(self):
        raise Conflict(f"host {self.host_id} is already draining")

    @_machine.output()
    def _conflict_already_drained(self):
        raise Conflict(f"host {self.host_id} is already drained; activate it first")

    @_machine.output()
    def _conflict_not_draining(self):
        raise Conflict(f"host {self.host_id} is not draining")

    @_machine.output()
    def _conflict_draining(self):
        raise Conflict(f"host {self.host_id} is draining; undrain it or wait for the drain")

    @_machine.output()
    def _conflict_offline(self):
        raise Conflict(f"host {self.host_id} is offline")

    # -- transitions: every state x every input ---------------------------------------

    ready.upon(heartbeat_lost, enter=offline_ready, outputs=[_went_offline_ready])
    ready.upon(agent_registered, enter=ready, outputs=[_nothing])
    ready.upon(drain_requested, enter=draining, outputs=[_started_drain])
    ready.upon(drain_finished, enter=ready, outputs=[_nothing])
    ready.upon(undrain_requested, enter=ready, outputs=[_conflict_not_draining])
    ready.upon(activate_requested, enter=ready, outputs=[_nothing])

    draining.upon(heartbeat_lost, enter=offline_draining, outputs=[_went_offline_draining])
    draining.upon(agent_registered, enter=draining, outputs=[_nothing])
    draining.upon(drain_requested, enter=draining, outputs=[_conflict_already_draining])
    draining.upon(drain_finished, enter=drained, outputs=[_finished_drain])
    draining.upon(undrain_requested, enter=ready, outputs=[_undrained])
    draining.upon(activate_requested, enter=draining, outputs=[_conflict_draining])

    drained.upon(heartbeat_lost, enter=offline_drained, outputs=[_went_offline_drained])
    drained.upon(agent_registered, enter=drained, outputs=[_nothing])
    drained.upon(drain_requested, enter=drained, outputs=[_conflict_already_drained])
    drained.upon(drain_finished, enter=drained, outputs=[_nothing])
    drained.upon(undrain_requested, enter=drained, outputs=[_conflict_not_draining])
    drained.upon(activate_requested, enter=ready, outputs=[_activated])

    for _offline, _back, _enter in (
        (offline_ready, _back_ready, ready),
        (offline_draining, _back_draining, draining),
        (offline_drained, _back_drained, drained),
    ):
        _offline.upon(heartbeat_lost, enter=_offline, outputs=[_nothing])
        _offline.upon(agent_registered, enter=_enter, outputs=[_back])
        _offline.upon(drain_requested, enter=_offline, outputs=[_conflict_offline])
        _offline.upon(undrain_requested, enter=_offline, outputs=[_conflict_offline])
        _offline.upon(activate_requested, enter=_offline, outputs=[_conflict_offline])
    offline_ready.upon(drain_finished, enter=offline_ready, outputs=[_nothing])
    offline_draining.upon(
        drain_finished, enter=offline_drained, outputs=[_finished_drain_offline]
    )
    offline_drained.upon(drain_finished, enter=offline_drained, outputs=[_nothing])
    del _offline, _back, _enter

    def handle(self, input_name):
        """
        Feed the input named C{input_name}.

        @return: a L{Change}, or L{None} when the state did not change.
        @raise Conflict: when the input contradicts the state.
        """
        if input_name not in INPUTS:
            raise ValueError(f"unknown host input {input_name!r}")
        results = getattr(self, input_name)()
        return results[0] if results else None
