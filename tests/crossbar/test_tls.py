"""
zwrm behind Crossbar.io over TLS, end to end, every part a real process: Crossbar.io runs the
TLS configuration of docs/wamp-clients.md as it is written (only its ports and the directory
of the certificate files changed), with the certificate the cluster CA issued
(C{python -m zwrm.pki init}, as the docs say); the control component connects over
C{wss://} trusting the cluster CA; the control plane's HTTP listener (the registry) is
C{https://}.

The path: two agents join over C{wss://} on the clients' transport (the join token pins the
CA: Crossbar must send it after its certificate), then move to the agents' transport, where
Crossbar asks for their host certificates and passes them to zwrm's authenticator (a host
credential presented with another host's certificate is refused there, and a client without
a certificate does not get through the handshake); the CLI over C{wss://} lists the hosts
and pushes an image over C{https://}; a deploy with a volume (the agent pulls over
C{https://} with the CA it got at join) and a drain to the other host.
"""

import io
import json
import os

import pytest
from autobahn.twisted.wamp import ApplicationSession
from autobahn.twisted.websocket import WampWebSocketClientFactory
from autobahn.wamp.types import ComponentConfig
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.crossbar.router import configure_tls, ensure_crossbar, sample_config
from tests.crossbar.test_end_to_end import (
    TICKET,
    AcceptancePath,
    CrossbarProcess,
    distinct_ports,
    registrations,
)
from zwrm import pki
from zwrm.pki.main import main as pki_main
from zwrm.testing.processes import (
    AgentProcess,
    ControlPlaneProcess,
    PollTimeout,
    free_port,
    poll,
    temp_dir,
)


class TLSCrossbarProcess(CrossbarProcess):
    """Crossbar with the docs' TLS configuration: clients', agents' and control ports."""

    def __init__(self, reactor, data_dir, executable, pki_dir):
        CrossbarProcess.__init__(self, reactor, data_dir, executable)
        self.pki_dir = pki_dir

    def choose_ports(self):
        CrossbarProcess.choose_ports(self)
        [self.agent_port] = distinct_ports(1, taken=(self.client_port, self.control_port))
        self.client_url = f"wss://127.0.0.1:{self.client_port}/ws"
        self.control_url = f"wss://127.0.0.1:{self.control_port}/ws"
        self.agent_url = f"wss://127.0.0.1:{self.agent_port}/ws"

    def config(self):
        return configure_tls(sample_config(marker="crossbar-config-tls"), self.client_port,
                             self.control_port, self.agent_port, self.pki_dir)

    def ports(self):
        return (self.client_port, self.control_port, self.agent_port)


class HTTPSControlPlaneProcess(ControlPlaneProcess):
    """The control plane with its HTTP listener on TLS (the cluster CA's server certificate)."""

    def argv(self):
        plain = f"tcp:{self.port}:interface=127.0.0.1"
        return [f"ssl:{self.port}:interface=127.0.0.1" if a == plain else a
                for a in ControlPlaneProcess.argv(self)]


class _Probe(ApplicationSession):
    """Joins with a ticket and says how it went (C{outcome}), then leaves."""

    def __init__(self, authid, ticket):
        ApplicationSession.__init__(self, ComponentConfig(realm="zwrm"))
        self._authid = authid
        self._ticket = ticket
        self.outcome = defer.Deferred()

    def onConnect(self):
        self.join("zwrm", authmethods=["ticket"], authid=self._authid)

    def onChallenge(self, challenge):
        return self._ticket

    def onJoin(self, details):
        if not self.outcome.called:
            self.outcome.callback(("joined", details.authid))
        self.leave()

    def onLeave(self, details):
        if not self.outcome.called:
            self.outcome.callback((details.reason, details.message))
        self.disconnect()


async def attempt(port, authid, ticket, tls_options, timeout=30):
    """
    A WAMP session over C{wss://127.0.0.1:<port>} with C{tls_options}.

    @return: C{("joined", authid)}, C{(ABORT reason, message)}, or C{("closed", None)} when
        the connection ended before either (a refused TLS handshake).
    """
    probe = _Probe(authid, ticket)
    factory = WampWebSocketClientFactory(lambda: probe, url=f"wss://127.0.0.1:{port}/ws")
    factory.noisy = False
    endpoint = wrapClientTLS(tls_options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    try:
        proto = await endpoint.connect(factory)
    except Exception as e:
        return ("closed", str(e))
    closed = proto.is_closed.addCallback(lambda _: ("closed", None))
    timer = reactor.callLater(timeout, proto.transport.abortConnection)
    try:
        first = await defer.DeferredList([probe.outcome, closed], fireOnOneCallback=True,
                                         consumeErrors=True)
    finally:
        if timer.active():
            timer.cancel()
    if proto.transport is not None:
        proto.transport.loseConnection()
    return first[0]


@pytest.mark.qemu
@pytest.mark.multihost
class CrossbarTLSTests(AcceptancePath, TestCase):
    timeout = 900

    def test_acceptance_path_over_tls(self):
        return defer.ensureDeferred(self._scenario())

    async def _scenario(self):
        from zwrm.testing import image

        executable = await deferToThread(ensure_crossbar)
        img = await deferToThread(image.build)
        tmp = temp_dir(self)

        # the cluster CA and the server certificate, before Crossbar (docs: step 1)
        cp_dir = os.path.join(tmp, "cp")
        os.makedirs(cp_dir, mode=0o700)
        pki_dir = os.path.join(cp_dir, pki.CONTROL_PKI_DIR)
        out = io.StringIO()
        code = await deferToThread(pki_main, ["init", pki_dir, "localhost", "127.0.0.1"], out)
        self.assertEqual(code, 0)
        ca = os.path.join(pki_dir, "ca.pem")

        cb = TLSCrossbarProcess(reactor, f"{tmp}/crossbar", executable, pki_dir)
        self.addCleanup(cb.stop)
        await cb.start()

        http_port = free_port()
        with open(f"{tmp}/router.ticket", "w") as f:
            f.write(TICKET + "\n")
        with open(f"{tmp}/control.toml", "w") as f:
            f.write(f'[control]\nrouter_url = "{cb.control_url}"\n'
                    f'router_ticket_file = "{tmp}/router.ticket"\n'
                    f'router_ca_file = "{ca}"\n'
                    f'registry_url = "https://127.0.0.1:{http_port}"\n')
        cp = HTTPSControlPlaneProcess(reactor, cp_dir, port=http_port, heartbeat_interval=1.0,
                                      check_interval=1.0, offline_after=4.0, grace=4.0,
                                      extra_args=["--config", f"{tmp}/control.toml"])
        self.addCleanup(cp.stop)
        await cp.start(timeout=120)
        with open(f"{cp_dir}/control.url") as f:
            self.assertEqual(f.read().split(), [f"https://127.0.0.1:{http_port}"])
        self.assertEqual(cp.join_token.rsplit(".", 1)[1], out.getvalue().strip(),
                         "the control plane uses the CA made before it (Crossbar's)")
        self.url, self.token = cb.client_url, cp.operator_token
        self.cli_env = {"ZWRM_CA_FILE": ca}

        # join over wss:// on the clients' transport (no client certificate asked for)
        agents = [AgentProcess(reactor, f"{tmp}/a{i}", cb.client_url, cp.join_token,
                               name=f"a{i}", extra_args=["--accel", "tcg"]) for i in (1, 2)]
        for a in agents:
            self.addCleanup(a.stop)
            await a.start()
        by_id = {a.host_id: a for a in agents}
        await self.wait_ready(by_id, "both agents joined over wss:// via Crossbar")
        tls_dirs = {h: os.path.join(a.data_dir, pki.AGENT_TLS_DIR) for h, a in by_id.items()}
        for host_id, directory in tls_dirs.items():
            self.assertEqual(pki.HostCredentials.load(directory).host_id, host_id)

        # then to the agents' transport, where Crossbar asks for the host certificate
        await defer.gatherResults([defer.ensureDeferred(a.stop()) for a in by_id.values()])
        for host_id, a in list(by_id.items()):
            moved = AgentProcess(reactor, a.data_dir, cb.agent_url, cp.join_token, name=a.name,
                                 extra_args=["--accel", "tcg"])
            self.addCleanup(moved.stop)
            await moved.start()
            by_id[host_id] = moved
        try:
            await poll(reactor, lambda: all(registrations(m) >= 2 for m in by_id.values()),
                       60, what="both agents registered again on the agents' transport")
        except PollTimeout as e:
            self.fail(f"{e}\n{cb.log_tail(30)}")
        await self.wait_ready(by_id, "both agents ready with their host certificates")

        # the binding, through Crossbar: a1's certificate with a2's credential is refused
        (h1, a1), (h2, a2) = sorted(by_id.items())
        with open(os.path.join(a2.data_dir, "host.json")) as f:
            credential2 = json.load(f)["credential"]
        creds1 = pki.HostCredentials.load(tls_dirs[h1])
        reason, message = await attempt(cb.agent_port, h2, credential2,
                                        creds1.control_client_context("127.0.0.1"))
        self.assertEqual(reason, "wamp.error.authentication_failed", message)
        self.assertIn(f"the TLS client certificate is for host {h1!r}", message)
        # ... and without a certificate there is no session on that transport at all
        bare = pki.pinned_client_context("127.0.0.1", creds1.fingerprint,
                                         ca_certificate=creds1.ca_pem)
        reason, _ = await attempt(cb.agent_port, h2, credential2, bare)
        self.assertEqual(reason, "closed")
        # the same credential with no certificate on the clients' transport is let in
        # (what the docs say of an agent left there)
        bare = pki.pinned_client_context("127.0.0.1", creds1.fingerprint,
                                         ca_certificate=creds1.ca_pem)
        self.assertEqual(await attempt(cb.client_port, h2, credential2, bare), ("joined", h2))

        # the acceptance path over TLS: push (https), deploy (pulled over https), drain
        await self.push_demo(img)
        m, known = await self.deploy_with_volume()
        src = m["host_id"]
        dst = next(h for h in by_id if h != src)
        await self.drain_and_check(src, dst, known, cp)
        # every call to the authenticator could be carried (a certificate's serial number
        # does not fit MessagePack, a TLS channel id is bytes)
        self.assertNotIn("serialization error", cb.log_tail(5000))
