"""
An agent that joined over TLS pulls images from the control plane's registry over https,
trusting the cluster CA it received at join (C{<data_dir>/tls/ca.pem}), with no C{ca_file}
configured: the path an C{install.sh} cluster takes (issue 12).
"""

import os

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from zwrm import pki
from zwrm.agent.runtime import HostRuntime, registry_ca_file
from zwrm.agent.service import AgentService
from zwrm.agent.tap import AgentConfig
from zwrm.control.service import ControlPlane
from zwrm.control.tap import Config
from zwrm.registry.client import RegistryClient, make_http_client
from zwrm.testing.processes import temp_dir


class RegistryTrustTests(TestCase):
    timeout = 60

    def test_pull_with_the_ca_from_join(self):
        return ensureDeferred(self._pull())

    async def _pull(self):
        tmp = temp_dir(self)
        config = Config(listen=["ssl:0:interface=127.0.0.1"], data_dir=os.path.join(tmp, "cp"),
                        heartbeat_interval=0.2, flush_interval=0.2)
        plane = ControlPlane(reactor, config)
        plane.startService()
        self.addCleanup(plane.stopService)
        await plane.started
        port = plane.ports[0].getHost().port
        url = f"wss://127.0.0.1:{port}/ws"
        with open(os.path.join(config.data_dir, "join.token")) as f:
            join_token = f.read().strip()
        with open(os.path.join(config.data_dir, "operator.token")) as f:
            operator_token = f.read().strip()

        # an operator pushes a blob, trusting the CA file it was given
        http, pool = make_http_client(reactor, os.path.join(config.data_dir, "pki", "ca.pem"),
                                      persistent=False)
        pusher = RegistryClient(reactor, f"https://127.0.0.1:{port}",
                                ("operator", operator_token), http_client=http)
        digest = await pusher.push_bytes("demo", b"kernel bytes" * 1000)
        await pusher.close()

        # an agent with no ca_file joins with the zwrm1 token (pinning the CA) ...
        agent_config = AgentConfig(url=url, join_token=join_token, name="a1",
                                   data_dir=os.path.join(tmp, "a1"), retry_initial=0.05,
                                   retry_max=0.2, accel="tcg")
        self.assertIsNone(agent_config.ca_file)
        agent = AgentService(reactor, agent_config, runtime=HostRuntime(reactor, agent_config))
        agent.startService()
        self.addCleanup(agent.stopService)
        await agent.registered
        ca = os.path.join(agent_config.data_dir, pki.AGENT_TLS_DIR, "ca.pem")
        self.assertEqual(registry_ca_file(agent_config), ca)

        # ... and its image cache pulls over https with the CA it received
        cache = agent.runtime.cache
        path = await cache.fetch_blob("demo", digest)
        cache.unpin(digest)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"kernel bytes" * 1000)

    def test_before_join(self):
        tmp = temp_dir(self)
        config = AgentConfig(url="wss://x:1/ws", data_dir=tmp, ca_file="/etc/zwrm/ca.pem")
        self.assertEqual(registry_ca_file(config), "/etc/zwrm/ca.pem")
        os.makedirs(os.path.join(tmp, pki.AGENT_TLS_DIR))
        with open(os.path.join(tmp, pki.AGENT_TLS_DIR, "ca.pem"), "w") as f:
            f.write("x")
        self.assertEqual(registry_ca_file(config), os.path.join(tmp, pki.AGENT_TLS_DIR, "ca.pem"))
