"""
C{zwrm host drain-status --watch} (and C{zwrm host drain} without C{--detach}) follow a drain
on its events (C{zwrm.event.drain}), against a real control plane over a real socket: the
status is read again when the drain announces a change, not every second.
"""

import io
import os
import uuid

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.agent.test_membership import make_agent, start_plane
from tests.cli.test_cli import Args, d
from zwrm.cli import client
from zwrm.cli import drain as cli_drain
from zwrm.testing.processes import poll


async def plane_with_an_agent(testcase):
    """
    An in-process control plane and one registered agent; the CLI uses an operator token.
    @return: C{(plane, host_id)}.
    """
    plane, tmp = await start_plane(testcase)
    agent = make_agent(testcase, plane, os.path.join(tmp, "a1"))
    await agent.registered
    testcase.patch(client.os, "environ", {"ZWRM_TOKEN": plane.operator_token})
    return plane, agent.identity.host_id


class FollowTests(TestCase):
    timeout = 60

    @d
    async def test_watch_follows_the_drains_events(self):
        plane, host_id = await plane_with_an_agent(self)
        # Only events can wake it: no read of the status on a timer during this test.
        self.patch(cli_drain, "REFRESH", 3600.0)
        self.patch(cli_drain, "POLL_INTERVAL", 3600.0)
        reads = []
        call = cli_drain.call

        def counting_call(session, procedure, *args, **kwargs):
            reads.append(procedure)
            return call(session, procedure, *args, **kwargs)

        self.patch(cli_drain, "call", counting_call)
        drains = plane.registry.data.drains
        now = reactor.seconds()
        row = {"id": f"d-{uuid.uuid4().hex[:12]}", "host_id": host_id, "state": "running",
               "options": {}, "created_at": now, "updated_at": now}
        await drains.add(row, [])
        other = dict(row, id=f"d-{uuid.uuid4().hex[:12]}", host_id="h-other")
        await drains.add(other, [])

        out = io.StringIO()
        done = Deferred.fromCoroutine(cli_drain.host_drain_status(
            reactor, Args(api_url=plane.url, host_id=host_id, watch=True, json=False), out))
        await poll(reactor, lambda: "running" in out.getvalue(), 10, 0.01, what="first status")
        await drains.set_state(other, "cancelled")  # another host's drain: not read again
        await drains.set_state(row, "cancelling")
        await poll(reactor, lambda: "cancelling" in out.getvalue(), 10, 0.01, what="cancelling")
        await drains.set_state(row, "cancelled")
        self.assertEqual(await done, 0)
        self.assertEqual(reads, ["zwrm.host.drain_status"] * 3)
        self.assertEqual([line.split(": ")[1].split(" ")[0] for line in
                          out.getvalue().splitlines()], ["running", "cancelling", "cancelled"])
