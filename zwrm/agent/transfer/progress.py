"""
Announcing a volume stream's progress at a bounded rate.

The sender reports its progress after every block (L{zwrm.agent.transfer.sender}); an agent
announces it to whoever asked for the copy (the control plane's drain, as WAMP progressive
results of C{volume.send}) through a L{ProgressThrottle}: the first report at once, then at
most one every C{interval} seconds (the latest figures, a trailing announcement when reports
stopped in between), and the final figures when the copy ends, whatever the interval.
"""

from autobahn.wamp.exception import TransportLost
from twisted.logger import Logger

PROGRESS_INTERVAL = 0.5
"""Seconds between two announcements of one stream's progress (at most 2/s)."""


class ProgressThrottle:
    """
    Pass reports to C{announce}, at most one every C{interval} seconds plus the final one.

    @ivar announced: how many announcements were made (tests, metrics).
    """

    log = Logger()

    def __init__(self, clock, announce, interval=PROGRESS_INTERVAL):
        """
        @param clock: an L{IReactorTime}.
        @param announce: C{announce(progress)}, called with the dict last reported.
        @param interval: the least time between two announcements, in seconds.
        """
        self._clock = clock
        self._announce = announce
        self._interval = interval
        self._last_at = None  # when the last announcement was made
        self._pending = None  # figures reported since, not announced yet
        self._call = None  # the trailing announcement, while one is scheduled
        self._finished = False
        self.announced = 0

    def report(self, progress):
        """The sender's latest figures: announced now, or at the next allowed time."""
        if self._finished:
            return
        now = self._clock.seconds()
        if self._last_at is None or now - self._last_at >= self._interval:
            self._cancel()
            self._emit(progress)
            return
        self._pending = progress
        if self._call is None:
            self._call = self._clock.callLater(
                self._last_at + self._interval - now, self._trailing)

    def finish(self, progress=None):
        """
        The copy ended: announce C{progress} (the final figures; if L{None}, whatever was
        reported and not yet announced) at once, and nothing after it.
        """
        if self._finished:
            return
        self._finished = True
        self._cancel()
        final = progress if progress is not None else self._pending
        self._pending = None
        if final is not None:
            self._emit(final)

    def _trailing(self):
        self._call = None
        if self._pending is not None and not self._finished:
            self._emit(self._pending)

    def _cancel(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _emit(self, progress):
        self._pending = None
        self._last_at = self._clock.seconds()
        self.announced += 1
        try:
            self._announce(dict(progress))
        except Exception as e:
            # Progress is best-effort: the call's result says how the copy ended. Whoever
            # asked is gone, or cannot be told: nothing more is announced to it.
            self._finished = True
            self._cancel()
            if _session_gone(e):
                self.log.info("progress no longer announced: the caller's session is gone")
            else:
                self.log.failure("announcing a volume stream's progress failed")


def _session_gone(e):
    """
    Whether C{e}, raised by autobahn's progress callable, says the session that got the call
    has lost its transport (autobahn calls C{send} on a transport that is None then).
    """
    return isinstance(e, TransportLost) or (isinstance(e, AttributeError) and "send" in str(e))
