"""
The agent's fence (C{fence_after}): once the control plane has not answered for that long,
the agent asks its runtime to stop the machines with volumes, and looks again while the
silence lasts; every answer puts it back; the time of the last answer is kept on disk, so
an agent restarted meanwhile fences no later. Time from a Clock; the runtime a recorder
(the executor's part: tests/agent/test_executor.py, C{test_fence_...}).
"""

import json
import os
import random

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm.agent.runtime import HostRuntime
from zwrm.agent.service import CONTACT_FILE, FENCE_GRACE, FENCE_RECHECK, AgentService
from zwrm.agent.tap import AgentConfig, Options
from zwrm.control.host_removal import FENCE_MARGIN
from zwrm.drivers.fake import FakeDriver, FakeHost
from zwrm.testing.image import kernel_bytes
from zwrm.testing.processes import temp_dir


class Runtime:
    """What the agent asks of its runtime here: L{fence} (recorded)."""

    def __init__(self):
        self.fences = []

    async def fence(self, host_id, credential, reason, grace):
        self.fences.append((host_id, reason, grace))
        return ["m-1"]

    async def close(self):
        pass


class FencingTests(SynchronousTestCase):
    def agent(self, clock, data_dir=None, **kw):
        config = AgentConfig(url="ws://127.0.0.1:1/ws", data_dir=data_dir or temp_dir(self),
                             **kw)
        agent = AgentService(clock, config, rng=random.Random(1), runtime=Runtime())
        agent._attempt = lambda: Deferred()  # the control plane never answers
        agent.identity.load()
        return agent

    def started(self, agent):
        agent.startService()
        self.addCleanup(agent.stopService)
        return agent

    def test_silence_fences_then_looks_again(self):
        clock = Clock()
        clock.advance(1000)
        agent = self.started(self.agent(clock, fence_after=30))
        clock.advance(29)
        self.assertEqual(agent.runtime.fences, [])
        clock.advance(1)
        [(host_id, reason, grace)] = agent.runtime.fences
        self.assertEqual((host_id, grace), (agent.identity.host_id, FENCE_GRACE))
        self.assertEqual(reason, "fenced: the control plane did not answer for 30 s"
                                 " (fence_after 30 s): stopped so that its volumes may be"
                                 " recovered on another host")
        self.assertEqual(agent.fenced, 1)  # (/metrics: zwrm_agent_fenced_machines_total)
        clock.advance(FENCE_RECHECK)
        self.assertEqual(len(agent.runtime.fences), 2)
        self.assertIn(f"did not answer for {30 + FENCE_RECHECK:.0f} s", agent.runtime.fences[1][1])
        # a machine starting at the first look is stopped within the control plane's margin
        self.assertLess(FENCE_RECHECK + FENCE_GRACE, FENCE_MARGIN)

    def test_answers_put_it_back(self):
        clock = Clock()
        agent = self.started(self.agent(clock, fence_after=30))
        for _ in range(10):  # heartbeats, answered: sent 5 s apart
            clock.advance(5)
            agent._contact(clock.seconds() - 0.5)
        self.assertEqual(agent.runtime.fences, [])
        sent = clock.seconds() - 0.5
        clock.advance(29.4)  # counted from when the last answered call was sent
        self.assertEqual(agent.runtime.fences, [])
        clock.advance(0.1)
        self.assertEqual(len(agent.runtime.fences), 1)
        self.assertIn("did not answer for 30 s", agent.runtime.fences[0][1])
        agent._contact(clock.seconds())  # the control plane is back
        clock.advance(FENCE_RECHECK)
        self.assertEqual(len(agent.runtime.fences), 1)
        self.assertGreater(clock.seconds(), sent + 30)

    def test_a_restart_counts_from_the_last_answer_kept(self):
        clock = Clock()
        clock.advance(90)
        data_dir = temp_dir(self)
        first = self.started(self.agent(clock, data_dir, fence_after=30))
        clock.advance(10)
        first._contact(100.0)
        path = os.path.join(data_dir, CONTACT_FILE)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(path) as f:
            self.assertEqual(json.load(f), {"at": 100.0})
        self.successResultOf(first.stopService())
        clock.advance(20)
        second = self.started(self.agent(clock, data_dir, fence_after=30))
        clock.advance(9)
        self.assertEqual(second.runtime.fences, [])
        clock.advance(1)  # 30 s after the last answer the first agent had, not 30 after start
        self.assertEqual(len(second.runtime.fences), 1)
        # stopped longer than fence_after: at once (its volumes may be elsewhere by now)
        self.successResultOf(second.stopService())
        clock.advance(300)
        third = self.started(self.agent(clock, data_dir, fence_after=30))
        clock.advance(0)
        self.assertEqual(len(third.runtime.fences), 1)

    def test_a_damaged_record_fences_at_once(self):
        clock = Clock()
        clock.advance(1000)
        data_dir = temp_dir(self)
        with open(os.path.join(data_dir, CONTACT_FILE), "w") as f:
            f.write("{")
        agent = self.started(self.agent(clock, data_dir, fence_after=30))
        clock.advance(0)
        self.assertEqual(len(agent.runtime.fences), 1)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_off_by_default(self):
        clock = Clock()
        agent = self.started(self.agent(clock))
        agent._contact(0.0)
        clock.advance(100000)
        self.assertEqual(agent.runtime.fences, [])
        self.assertFalse(os.path.exists(os.path.join(agent.config.data_dir, CONTACT_FILE)))
        self.assertEqual(agent.facts()["fence_after"], 0.0)
        self.assertEqual(self.agent(clock, fence_after=60).facts()["fence_after"], 60.0)

    def test_stopping_cancels_it(self):
        clock = Clock()
        agent = self.agent(clock, fence_after=30)
        agent.startService()
        self.successResultOf(agent.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_the_setting(self):
        def parsed(*argv):
            o = Options()
            o.parseOptions(["--control-plane-url", "ws://127.0.0.1:1/ws", *argv])
            return o.config.fence_after

        self.assertEqual(parsed(), 0.0)
        self.assertEqual(parsed("--fence-after", "60"), 60.0)
        for bad in ("5", "-1", "nan", "inf", "90000", "soon"):
            with self.assertRaises(usage.UsageError) as e:
                parsed("--fence-after", bad)
            self.assertEqual(str(e.exception),
                             "fence_after must be 0 (never) or seconds from 10 to 86400")


class RuntimeFenceTests(TestCase):
    """
    The runtime's part, with the fake driver over a real volume store: an agent that
    starts while the control plane cannot be reached fences the machines its previous
    process ran, its executor made for it (no session made it).
    """

    timeout = 30

    def runtime(self, data_dir, host):
        config = AgentConfig(url="ws://127.0.0.1:1/ws", data_dir=data_dir, fence_after=30)
        runtime = HostRuntime(reactor, config)
        runtime.driver = FakeDriver(reactor, os.path.join(data_dir, "machines"), host=host)
        self.addCleanup(lambda: ensureDeferred(runtime.close()))
        return runtime

    async def test_before_any_session(self):
        data_dir, host = temp_dir(self), FakeHost(powerdown_delay=0.01)
        kernel = os.path.join(data_dir, "vmlinuz")
        with open(kernel, "wb") as f:
            f.write(kernel_bytes())
        first = self.runtime(data_dir, host)
        self.assertEqual(await first.fence(None, None, "fenced: never joined", 1), [])
        await first._executor_ready("h_1", "c", "http://127.0.0.1:1")
        image = {"kernel": kernel, "initrd": None, "disk": None, "cmdline": ""}
        await first.executor.start_machine(
            {"id": "m1", "app": "db", "image": image, "vcpus": 1, "memory_mb": 64,
             "volumes": [{"id": "v1", "mount": "/data", "size_mb": 8}],
             "service_port": None, "health": None})
        await first.close()  # (its machine runs on, as QEMU does when an agent stops)
        second = self.runtime(data_dir, host)
        self.assertIsNone(second.executor)
        self.assertEqual(await second.fence("h_1", "c", "fenced: test", 1), ["m1"])
        st = second.executor.machine_status("m1")
        self.assertEqual((st["state"], st["reason"]), ("failed", "fenced: test"))
        # kept for the control plane, the latest per machine, sent once registered
        [(_, event)] = second._unsent.values()
        self.assertEqual((event["state"], event["reason"]), ("failed", "fenced: test"))
