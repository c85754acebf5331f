"""The agent's reconnection backoff and heartbeat jitter, with a Clock."""

import random

from twisted.internet import error
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from zwrm.agent.service import AgentService, SessionEnded
from zwrm.agent.tap import AgentConfig
from zwrm.testing.processes import temp_dir


class BackoffTests(SynchronousTestCase):
    def agent(self, **kw):
        config = AgentConfig(url="ws://127.0.0.1:1/ws", data_dir=temp_dir(self), **kw)
        return AgentService(Clock(), config, rng=random.Random(1))

    def test_exponential_with_jitter_and_cap(self):
        agent = self.agent(retry_initial=1, retry_max=8)
        for failures, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 8), (30, 8)]:
            delays = {agent._backoff(failures) for _ in range(50)}
            self.assertTrue(all(ceiling / 2 <= x <= ceiling for x in delays), (failures, delays))
            self.assertGreater(len(delays), 1)  # jittered

    def test_default_cap_is_within_the_control_planes_grace(self):
        """
        However long the control plane was down, an agent with the default settings tries
        again within half the control plane's default grace (= offline_after) of its
        return, so a restarted control plane does not mark live hosts offline.
        """
        from zwrm.control.tap import Config

        agent = self.agent()
        longest = max(agent._backoff(failures) for failures in range(1, 200))
        plane = Config()
        self.assertLessEqual(longest, agent.config.retry_max)
        self.assertLessEqual(agent.config.retry_max, (plane.grace or plane.offline_after) / 2)

    def test_backoff_starts_again_after_a_registered_session(self):
        """
        Failures while the control plane is unreachable grow the delay to the cap; a
        registered session that ends, even when the control plane ended it (as when it marks
        the host offline), starts the backoff again from C{retry_initial}.
        """
        agent = self.agent(retry_initial=1, retry_max=8)
        clock = agent.reactor
        outcomes = [error.ConnectionRefusedError()] * 6 + [
            SessionEnded("wamp.close.killed: host marked offline"),
            error.ConnectionRefusedError()]

        async def attempt():
            outcome = outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        agent._attempt = attempt
        agent.startService()
        delays, why = [], []
        while True:
            delays.append(agent.life._retry.getTime() - clock.seconds())
            why.append(agent.last_error)
            if not outcomes:
                break
            clock.advance(delays[-1])
        self.assertGreaterEqual(min(delays[3:6]), 4)  # capped at 8, jittered to 4..8
        self.assertLessEqual(delays[6], 1)  # after the registered session: retry_initial
        self.assertLessEqual(delays[7], 2)
        self.assertIn("closed our session (wamp.close.killed", why[6])
        self.successResultOf(agent.stopService())
        self.assertEqual((agent.state, clock.getDelayedCalls()), ("stopped", []))

    def test_heartbeat_jitter(self):
        agent = self.agent()
        agent.heartbeat_interval = 10
        times = []
        for _ in range(50):
            agent._schedule_heartbeat()
            times.append(agent._hb_call.getTime())
            agent._stop_heartbeats()
        self.assertTrue(all(9 <= t <= 11 for t in times))
        self.assertGreater(len(set(times)), 1)
        self.assertEqual(agent.reactor.getDelayedCalls(), [])
