"""
A host renamed by the store's migration (C{h-<hex>} to C{h_<hex>}) behind Crossbar.io, every
part a real process: the upgraded C{zwrm-control} (with C{router_url}) finds a database of
schema version 7 with the host, and the host's C{zwrm-agent} comes back through Crossbar with
its old id and credential: the dynamic authenticator answers with the new authid, Crossbar's
WELCOME carries it, the agent takes it (host.json rewritten, 0600), registers its procedures
under C{zwrm.agent.h_<hex>.} (the dynamic authorizer allows exactly those) and is ready.
"""

import json
import os
import stat

import pytest
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.control.test_host_ids import NEW, OLD, OTHER_NEW, _old_database
from tests.crossbar.router import ensure_crossbar
from tests.crossbar.test_end_to_end import TICKET, CrossbarProcess
from zwrm.testing.processes import (
    AgentProcess,
    ControlPlaneProcess,
    free_port,
    poll,
    run_cli,
    temp_dir,
)


@pytest.mark.multihost
class RenamedHostBehindCrossbarTests(TestCase):
    timeout = 600

    def test_agent_with_its_old_id(self):
        return defer_scenario(self._scenario())

    async def _scenario(self):
        executable = await deferToThread(ensure_crossbar)
        tmp = temp_dir(self)
        cb = CrossbarProcess(reactor, f"{tmp}/crossbar", executable)
        self.addCleanup(cb.stop)
        await cb.start()

        os.makedirs(f"{tmp}/cp", mode=0o700)
        _old_database(f"{tmp}/cp/zwrm.db", credential="old-credential").conn.close()
        http_port = free_port()
        with open(f"{tmp}/router.ticket", "w") as f:
            f.write(TICKET + "\n")
        with open(f"{tmp}/control.toml", "w") as f:
            f.write(f'[control]\nrouter_url = "{cb.control_url}"\n'
                    f'router_ticket_file = "{tmp}/router.ticket"\n'
                    f'registry_url = "http://127.0.0.1:{http_port}"\n')
        cp = ControlPlaneProcess(reactor, f"{tmp}/cp", port=http_port, heartbeat_interval=1.0,
                                 extra_args=["--config", f"{tmp}/control.toml"])
        self.addCleanup(cp.stop)
        await cp.start(timeout=120)

        os.makedirs(f"{tmp}/a1", mode=0o700)
        identity = f"{tmp}/a1/host.json"
        with open(identity, "w") as f:
            json.dump({"host_id": OLD, "credential": "old-credential"}, f)
        os.chmod(identity, 0o600)
        agent = AgentProcess(reactor, f"{tmp}/a1", cb.client_url, "no-join-token", name="a1")
        self.addCleanup(agent.stop)
        await agent.start()

        async def ready():
            code, out, err = await run_cli(reactor, ["host", "list", "--json"], cb.client_url,
                                           cp.operator_token)
            if code != 0:
                raise AssertionError(f"zwrm host list: {code} {err}")
            host = {h["id"]: h for h in json.loads(out)}.get(NEW) or {}
            # its executor is callable: the agent registered under the new id
            return agent.host_id == NEW and host.get("state") == "ready" and host.get("executor")

        await poll(reactor, ready, 120, interval=1.0,
                   what="the renamed host ready via Crossbar, its executor registered")
        self.assertEqual(agent.host_id, NEW)
        with open(identity) as f:
            self.assertEqual(json.load(f), {"host_id": NEW, "credential": "old-credential"})
        self.assertEqual(stat.S_IMODE(os.stat(identity).st_mode), 0o600)
        code, out, _ = await run_cli(reactor, ["host", "status", NEW, "--json"], cb.client_url,
                                     cp.operator_token)
        self.assertEqual(code, 0)
        self.assertEqual([m["id"] for m in json.loads(out)["machine_list"]], ["m-1"])
        code, out, err = await run_cli(reactor, ["host", "list", "--json"], cb.client_url,
                                       cp.operator_token)
        self.assertNotIn(OLD, out)
        self.assertIn(OTHER_NEW, out)


def defer_scenario(coroutine):
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(coroutine)
