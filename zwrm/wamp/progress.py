"""
Progress for the callers of long procedures (those that copy a volume's data: a snapshot, a
restore, a replica, a recovery), as WAMP progressive call results.

A caller that asks for them (C{receive_progress}: autobahn's C{CallOptions(on_progress=...)})
gets one at least every L{INTERVAL} seconds while the work goes on, and one each time the
work says how far it got: C{{"elapsed": seconds, ...}} with what it said (e.g. C{done} and
C{total} bytes).  The C{zwrm} CLI bounds such a call by how long the control plane stays
silent rather than by how long the copy takes, so a volume of any size is snapshotted or
replicated within the default C{--timeout}, and a control plane that went away is still
noticed within it.  A caller that did not ask gets nothing more than the result.
"""

from autobahn.wamp.types import RegisterOptions
from twisted.internet import task

DETAILS = RegisterOptions(details_arg="details")
"""The register options of a procedure that may report progress (its call's details)."""

INTERVAL = 10.0
"""Seconds between two progressive results while the work says nothing new."""


class CallerProgress:
    """
    A context around a procedure's work: progressive results to its caller, if it asked.

    @ivar said: what the work reported so far (merged), sent with each result.
    """

    def __init__(self, clock, details, interval=None):
        """
        @param clock: an L{IReactorTime}.
        @param details: the call's autobahn C{CallDetails} (its C{progress}, set when the
            caller asked for progressive results), or L{None}.
        @param interval: seconds between two results while the work says nothing new
            (L{INTERVAL}).
        """
        self._clock = clock
        self._send = getattr(details, "progress", None)
        self._interval = INTERVAL if interval is None else interval
        self._started = clock.seconds()
        self._loop = None
        self.said = {}

    def __enter__(self):
        if self._send is not None:
            self._loop = task.LoopingCall(self._say)
            self._loop.clock = self._clock
            self._loop.start(self._interval, now=False)
        return self

    def __exit__(self, *exc):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._send = None  # (the result follows)

    def report(self, **fields):
        """The work got this far (e.g. C{done}, C{total}): said to the caller now."""
        self.said.update(fields)
        self._say()

    def _say(self):
        if self._send is None:
            return
        try:
            self._send(dict(self.said, elapsed=round(self._clock.seconds() - self._started, 1)))
        except Exception:
            self._send = None  # the caller went away: the work goes on (shielded)
