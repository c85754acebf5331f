"""
The agent's connection machine (L{zwrm.agent.connection.ConnectionLife}): every state x every
input, on a Clock, with attempts that are Deferreds the test fires.
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from zwrm.agent.connection import ConnectionLife


class Ended:
    """A registered session's end (what the agent's SessionEnded is to the machine)."""


class Driver:
    """The agent's side of the machine: attempts it can fire, the waits and aborts it saw."""

    def __init__(self):
        self.clock = Clock()
        self.attempts = []
        self.retries = []
        self.aborts = 0
        self.life = ConnectionLife(
            self.clock, self.attempt, lambda failures: 2.0 ** failures, self.retrying,
            self.abort, session_ended=lambda outcome: isinstance(outcome, Ended))

    def attempt(self):
        d = defer.Deferred()
        self.attempts.append(d)
        return d

    def retrying(self, outcome, delay):
        self.retries.append((outcome, delay))

    def abort(self):
        self.aborts += 1

    def end(self, outcome):
        """The attempt in flight ends with C{outcome}."""
        self.attempts[-1].callback(outcome)


def in_state(name):
    """A driver whose machine is in state C{name}."""
    driver = Driver()
    life = driver.life
    if name != "stopped":
        life.start()
    if name == "connected":
        life.registered()
    elif name == "waiting":
        driver.end("refused")
    elif name == "stopping":
        driver.stopped = life.stop()
    assert life.state == name, (life.state, name)
    return driver


INPUTS = {
    "start": lambda life: life.start(),
    "stop": lambda life: life.stop(),
    "registered": lambda life: life.registered(),
    "attempt_joined": lambda life: life.attempt_joined(),
    "attempt_failed": lambda life: life.attempt_failed("refused"),
    "session_ended": lambda life: life.session_ended(Ended()),
    "retry_due": lambda life: life.retry_due(),
}

# (state, input) -> (new state, attempts started, retry timers set, aborts)
TABLE = {
    ("stopped", "start"): ("attempting", 1, 0, 0),
    ("stopped", "stop"): ("stopped", 0, 0, 0),
    ("stopped", "registered"): ("stopped", 0, 0, 0),
    ("stopped", "attempt_joined"): ("stopped", 0, 0, 0),
    ("stopped", "attempt_failed"): ("stopped", 0, 0, 0),
    ("stopped", "session_ended"): ("stopped", 0, 0, 0),
    ("stopped", "retry_due"): ("stopped", 0, 0, 0),
    ("attempting", "start"): ("attempting", 0, 0, 0),
    ("attempting", "stop"): ("stopping", 0, 0, 1),
    ("attempting", "registered"): ("connected", 0, 0, 0),
    ("attempting", "attempt_joined"): ("attempting", 1, 0, 0),
    ("attempting", "attempt_failed"): ("waiting", 0, 1, 0),
    ("attempting", "session_ended"): ("waiting", 0, 1, 0),
    ("attempting", "retry_due"): ("attempting", 0, 0, 0),
    ("connected", "start"): ("connected", 0, 0, 0),
    ("connected", "stop"): ("stopping", 0, 0, 1),
    ("connected", "registered"): ("connected", 0, 0, 0),
    ("connected", "attempt_joined"): ("attempting", 1, 0, 0),
    ("connected", "attempt_failed"): ("waiting", 0, 1, 0),
    ("connected", "session_ended"): ("waiting", 0, 1, 0),
    ("connected", "retry_due"): ("connected", 0, 0, 0),
    ("waiting", "start"): ("waiting", 0, 0, 0),
    ("waiting", "stop"): ("stopped", 0, 0, 0),
    ("waiting", "registered"): ("waiting", 0, 0, 0),
    ("waiting", "attempt_joined"): ("waiting", 0, 0, 0),
    ("waiting", "attempt_failed"): ("waiting", 0, 0, 0),
    ("waiting", "session_ended"): ("waiting", 0, 0, 0),
    ("waiting", "retry_due"): ("attempting", 1, 0, 0),
    ("stopping", "start"): ("stopping", 0, 0, 0),
    ("stopping", "stop"): ("stopping", 0, 0, 0),
    ("stopping", "registered"): ("stopping", 0, 0, 0),
    ("stopping", "attempt_joined"): ("stopped", 0, 0, 0),
    ("stopping", "attempt_failed"): ("stopped", 0, 0, 0),
    ("stopping", "session_ended"): ("stopped", 0, 0, 0),
    ("stopping", "retry_due"): ("stopping", 0, 0, 0),
}


class TableTests(SynchronousTestCase):
    def test_every_state_and_input(self):
        states = {"stopped", "attempting", "connected", "waiting", "stopping"}
        self.assertEqual({s for s, _ in TABLE}, states)
        self.assertEqual(len(TABLE), len(states) * len(INPUTS))
        for (state, name), (new, attempts, retries, aborts) in sorted(TABLE.items()):
            driver = in_state(state)
            before = (len(driver.attempts), len(driver.retries), driver.aborts)
            INPUTS[name](driver.life)
            after = (len(driver.attempts), len(driver.retries), driver.aborts)
            self.assertEqual(
                (driver.life.state,) + tuple(a - b for a, b in zip(after, before, strict=True)),
                (new, attempts, retries, aborts), (state, name))
            if new == "waiting":
                self.assertEqual(len(driver.clock.getDelayedCalls()), 1, (state, name))
            elif new != "stopping":
                self.assertEqual(driver.clock.getDelayedCalls(), [], (state, name))

    def test_the_table_is_the_machines(self):
        """The table above lists the machine's own transitions (its diagram's)."""
        automaton = ConnectionLife._machine._automaton
        machine = {(s.method.__name__, i.method.__name__): n.method.__name__
                   for s, i, n, _ in automaton.allTransitions()}
        self.assertEqual(machine, {key: value[0] for key, value in TABLE.items()})


class LifeTests(SynchronousTestCase):
    def test_backoff_grows_and_starts_again_after_a_registered_session(self):
        driver = in_state("attempting")
        delays = []
        for _ in range(3):
            driver.end("refused")
            delays.append(driver.retries[-1][1])
            driver.clock.advance(delays[-1])
        self.assertEqual(delays, [2.0, 4.0, 8.0])
        driver.life.registered()
        driver.end(Ended())
        self.assertEqual(driver.retries[-1][1], 2.0)  # from the first step again
        self.assertIsInstance(driver.retries[-1][0], Ended)

    def test_a_failure_is_the_failed_attempts_exception(self):
        driver = in_state("attempting")
        oops = ConnectionRefusedError("refused")
        driver.attempts[-1].errback(oops)
        self.assertEqual((driver.life.state, driver.retries), ("waiting", [(oops, 2.0)]))

    def test_joined_attempts_again_at_once(self):
        driver = in_state("attempting")
        driver.end("refused")
        driver.clock.advance(2.0)
        driver.end("joined")
        self.assertEqual((driver.life.state, len(driver.attempts)), ("attempting", 3))
        self.assertEqual(driver.clock.getDelayedCalls(), [])
        driver.end("refused")
        self.assertEqual(driver.retries[-1][1], 2.0)  # joining reset the backoff

    def test_stop_while_attempting_waits_for_the_attempt(self):
        driver = in_state("connected")
        stopped = driver.life.stop()
        again = driver.life.stop()
        self.assertNoResult(stopped)
        self.assertEqual(driver.aborts, 1)
        driver.end(Ended())
        self.assertIsNone(self.successResultOf(stopped))
        self.assertIsNone(self.successResultOf(again))
        self.assertEqual((driver.life.state, driver.retries), ("stopped", []))
        self.assertEqual(driver.clock.getDelayedCalls(), [])

    def test_an_attempt_that_ends_when_aborted_stops_at_once(self):
        driver = Driver()
        driver.life._abort = lambda: driver.end("stopped")
        driver.life.start()
        self.assertIsNone(self.successResultOf(driver.life.stop()))
        self.assertEqual(driver.life.state, "stopped")

    def test_stop_while_waiting_cancels_the_timer(self):
        driver = in_state("waiting")
        self.assertIsNone(self.successResultOf(driver.life.stop()))
        self.assertEqual((driver.life.state, driver.clock.getDelayedCalls()), ("stopped", []))
        driver.life.start()
        self.assertEqual((driver.life.state, len(driver.attempts)), ("attempting", 2))

    def test_an_attempt_that_raises_is_a_failure(self):
        driver = Driver()

        def broken():
            raise RuntimeError("no")

        driver.life._attempt = broken
        driver.life.start()
        self.assertEqual(driver.life.state, "waiting")
        self.assertIsInstance(driver.retries[0][0], RuntimeError)
