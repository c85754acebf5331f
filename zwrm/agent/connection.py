"""
The agent's connection life to the control plane, as one machine (L{ConnectionLife}).

An attempt (connect, join or register, heartbeat until the session ends: the agent's
C{_attempt}) runs while the machine is C{attempting}; once the session is registered the
machine is C{connected}.  Whatever ends an attempt, the machine waits a backoff (C{waiting})
and attempts again, for ever, until it is stopped:

  - an attempt that joined the cluster (it got its credential) is followed at once by the
    next attempt, which registers with that credential;
  - a registered session that ended starts the backoff again from its first step;
  - any other end (refused, rejected, lost before registering) grows the backoff.

Stopping while an attempt runs aborts it (C{stopping}) and is done once the attempt ended;
stopping while waiting cancels the timer.  The diagram is docs/state-machines/agent_connection.dot,
generated from this class by scripts/state_diagrams.py.
"""

from automat import MethodicalMachine
from twisted.internet import defer
from twisted.logger import Logger


def _last(results):
    """Automat collector: the result of the last output (every output runs)."""
    return list(results)[-1]


def _first(results):
    """Automat collector: the result of the first output (every output runs)."""
    return list(results)[0]


class ConnectionLife:
    """
    Attempt, wait, attempt again, until stopped.

    @ivar failures: attempts that failed in a row since the last registered session (the
        backoff's step).
    """

    _machine = MethodicalMachine()
    log = Logger()

    def __init__(self, clock, attempt, backoff, retrying, abort, session_ended=None):
        """
        @param clock: an C{IReactorTime} (the backoff's timer).
        @param attempt: C{attempt()} starts one attempt and returns a L{defer.Deferred} that
            fires with its outcome (C{"joined"}, an outcome for which C{session_ended} is
            true, or anything else: a failure) or fails with what ended it (a failure too).
        @param session_ended: C{session_ended(outcome)}: true when C{outcome} says that a
            registered session ended (default: never).
        @param backoff: C{backoff(failures)}: the seconds to wait after C{failures} failures.
        @param retrying: C{retrying(outcome, delay)}: told of each failure before the wait
            (to log it and keep it as the last error).
        @param abort: C{abort()}: end the attempt in flight (its Deferred then fires).
        """
        self._clock = clock
        self._attempt = attempt
        self._backoff = backoff
        self._retrying = retrying
        self._abort = abort
        self._is_session_end = session_ended or (lambda outcome: False)
        self.failures = 0
        self._retry = None
        self._stopped = []

    @property
    def state(self):
        """The state's name: stopped, attempting, connected, waiting or stopping."""
        return self._save()

    @_machine.serializer()
    def _save(self, state):
        return state

    def _ended(self, outcome):
        """The attempt in flight ended with C{outcome}: the input that says how."""
        if isinstance(outcome, str) and outcome == "joined":
            self.attempt_joined()
        elif self._is_session_end(outcome):
            self.session_ended(outcome)
        else:
            self.attempt_failed(outcome)

    # -- states -----------------------------------------------------------------------

    @_machine.state(initial=True, serialized="stopped")
    def stopped(self):
        "Not running: no attempt, no timer."

    @_machine.state(serialized="attempting")
    def attempting(self):
        "An attempt runs: connecting, joining or registering."

    @_machine.state(serialized="connected")
    def connected(self):
        "The attempt's session is registered (heartbeats run)."

    @_machine.state(serialized="waiting")
    def waiting(self):
        "The backoff's timer runs."

    @_machine.state(serialized="stopping")
    def stopping(self):
        "Stopped while an attempt ran: waiting for it to end."

    # -- inputs -----------------------------------------------------------------------

    @_machine.input()
    def start(self):
        "The service started."

    @_machine.input()
    def stop(self):
        "The service stops; returns a Deferred that fires once no attempt or timer is left."

    @_machine.input()
    def registered(self):
        "The attempt's session registered with the control plane."

    @_machine.input()
    def attempt_joined(self):
        "The attempt joined the cluster: it has a credential to register with now."

    @_machine.input()
    def attempt_failed(self, outcome):
        "The attempt ended before a session registered."

    @_machine.input()
    def session_ended(self, outcome):
        "The attempt's registered session ended."

    @_machine.input()
    def retry_due(self):
        "The backoff's timer fired."

    # -- outputs ----------------------------------------------------------------------
    # Each runs after the transition: the state is already the new one.

    @_machine.output()
    def _begin(self):
        try:
            d = self._attempt()
        except Exception as e:
            d = defer.fail(e)
        d.addCallbacks(lambda outcome: outcome, lambda f: f.value)
        d.addCallback(self._ended)
        d.addErrback(lambda f: self.log.failure("the agent's connection machine failed", f))

    @_machine.output()
    def _reset_failures(self):
        self.failures = 0

    @_machine.output()
    def _schedule_retry(self, outcome):
        self.failures += 1
        delay = self._backoff(self.failures)
        self._retrying(outcome, delay)
        self._retry = self._clock.callLater(delay, self.retry_due)

    @_machine.output()
    def _cancel_retry(self):
        retry, self._retry = self._retry, None
        if retry is not None and retry.active():
            retry.cancel()

    @_machine.output()
    def _abort_attempt(self):
        self._abort()

    @_machine.output()
    def _when_stopped(self):
        d = defer.Deferred()
        self._stopped.append(d)
        return d

    @_machine.output()
    def _already_stopped(self):
        return defer.succeed(None)

    @_machine.output()
    def _finish(self):
        waiting, self._stopped = self._stopped, []
        for d in waiting:
            d.callback(None)

    @_machine.output()
    def _nothing(self):
        return None

    # -- transitions: every state x every input ---------------------------------------

    stopped.upon(start, enter=attempting, outputs=[_begin])
    stopped.upon(stop, enter=stopped, outputs=[_already_stopped], collector=_last)
    stopped.upon(registered, enter=stopped, outputs=[_nothing])
    stopped.upon(attempt_joined, enter=stopped, outputs=[_nothing])
    stopped.upon(attempt_failed, enter=stopped, outputs=[_nothing])
    stopped.upon(session_ended, enter=stopped, outputs=[_nothing])
    stopped.upon(retry_due, enter=stopped, outputs=[_nothing])

    attempting.upon(start, enter=attempting, outputs=[_nothing])
    attempting.upon(stop, enter=stopping, outputs=[_when_stopped, _abort_attempt], collector=_first)
    attempting.upon(registered, enter=connected, outputs=[_reset_failures])
    attempting.upon(attempt_joined, enter=attempting, outputs=[_reset_failures, _begin])
    attempting.upon(attempt_failed, enter=waiting, outputs=[_schedule_retry])
    attempting.upon(session_ended, enter=waiting, outputs=[_reset_failures, _schedule_retry])
    attempting.upon(retry_due, enter=attempting, outputs=[_nothing])

    connected.upon(start, enter=connected, outputs=[_nothing])
    connected.upon(stop, enter=stopping, outputs=[_when_stopped, _abort_attempt], collector=_first)
    connected.upon(registered, enter=connected, outputs=[_nothing])
    connected.upon(attempt_joined, enter=attempting, outputs=[_reset_failures, _begin])
    connected.upon(attempt_failed, enter=waiting, outputs=[_schedule_retry])
    connected.upon(session_ended, enter=waiting, outputs=[_schedule_retry])
    connected.upon(retry_due, enter=connected, outputs=[_nothing])

    waiting.upon(start, enter=waiting, outputs=[_nothing])
    waiting.upon(stop, enter=stopped, outputs=[_cancel_retry, _already_stopped], collector=_last)
    waiting.upon(registered, enter=waiting, outputs=[_nothing])
    waiting.upon(attempt_joined, enter=waiting, outputs=[_nothing])
    waiting.upon(attempt_failed, enter=waiting, outputs=[_nothing])
    waiting.upon(session_ended, enter=waiting, outputs=[_nothing])
    waiting.upon(retry_due, enter=attempting, outputs=[_cancel_retry, _begin])

    stopping.upon(start, enter=stopping, outputs=[_nothing])
    stopping.upon(stop, enter=stopping, outputs=[_when_stopped], collector=_first)
    stopping.upon(registered, enter=stopping, outputs=[_nothing])
    stopping.upon(attempt_joined, enter=stopped, outputs=[_finish])
    stopping.upon(attempt_failed, enter=stopped, outputs=[_finish])
    stopping.upon(session_ended, enter=stopped, outputs=[_finish])
    stopping.upon(retry_due, enter=stopping, outputs=[_nothing])


__all__ = ["ConnectionLife"]
