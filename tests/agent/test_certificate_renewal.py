"""
Host certificates are renewed (L{zwrm.agent.certificates}): over a real TLS control plane
(C{ssl:} listener, the cluster CA), with real agents.

 - An agent's renewal, its clock moved past two thirds of its certificate's life, asks the
   control plane for a new certificate for a new key; the pair on disk is replaced, the
   volume endpoint and the next connection present it.
 - A host certificate that expired while the agent was stopped does not lock it out: it
   connects with its credential alone and renews at once.
 - The control plane signs only for the caller's own host id; operators cannot ask.
 - The control plane's own server certificate, renewed while it runs, is what new
   connections get.
"""

import datetime
import os
from types import SimpleNamespace

from autobahn.wamp.exception import ApplicationError
from cryptography import x509
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tests.agent.test_membership import start_plane
from tests.agent.test_metrics import d
from zwrm import pki
from zwrm.agent.certificates import CHECK_INTERVAL, CertificateRenewal
from zwrm.agent.metrics import AgentMetrics
from zwrm.agent.runtime import HostRuntime
from zwrm.agent.service import AgentService
from zwrm.agent.tap import AgentConfig
from zwrm.agent.transfer.transfers import VolumeTransfers
from zwrm.agent.volumes import VolumeStore
from zwrm.cli.client import close, connect
from zwrm.control import roles
from zwrm.control.service import CERT_CHECK_INTERVAL
from zwrm.testing.processes import poll, temp_dir


def serial(cert_pem):
    return x509.load_pem_x509_certificate(cert_pem).serial_number


class RenewalTests(TestCase):
    timeout = 60

    def plane(self, **kw):
        return start_plane(self, tls=True, **kw)

    def agent(self, plane, data_dir, runtime=False):
        config = AgentConfig(url=plane.url, join_token=plane.join_token, name="a1",
                             data_dir=data_dir, retry_initial=0.05, retry_max=0.2, accel="tcg")
        agent = AgentService(reactor, config,
                             runtime=HostRuntime(reactor, config) if runtime else None)
        agent.startService()
        self.addCleanup(agent.stopService)
        return agent

    @d
    async def test_renewed_when_a_third_of_its_life_is_left(self):
        plane, tmp = await self.plane()
        agent = self.agent(plane, os.path.join(tmp, "a1"))
        await agent.registered
        old = pki.HostCredentials.load(agent.tls_dir)
        renewed = []
        clock = Clock()
        clock.advance(reactor.seconds())
        in_threads = []

        def threads(f, *args):
            in_threads.append(f.__name__)
            return deferToThread(f, *args)

        renewal = CertificateRenewal(clock, agent.tls_dir, lambda: agent.identity.host_id,
                                     on_renewed=renewed.append, threads=threads)
        renewal.start(agent.session)
        self.addCleanup(renewal.stop)
        # not due: nothing asked, the next look within CHECK_INTERVAL
        self.assertEqual(renewal.renewals, 0)
        [call] = clock.getDelayedCalls()
        self.assertEqual(call.getTime() - clock.seconds(), CHECK_INTERVAL)
        clock.advance(pki.renewal_time(old.cert_pem) - clock.seconds() - 1)
        self.assertEqual(renewal.renewals, 0)
        clock.advance(1)  # two thirds of the year gone: asked over the real session
        await poll(reactor, lambda: renewal.renewals == 1, 10, what="the renewal")
        new = pki.HostCredentials.load(agent.tls_dir)
        self.assertEqual(renewed, [new])
        # the key made and the pair written (fsynced) off the reactor thread
        self.assertEqual(in_threads, ["make_host_request", "save_renewed"])
        self.assertNotEqual(serial(new.cert_pem), serial(old.cert_pem))
        self.assertNotEqual(new.key_pem, old.key_pem)
        self.assertEqual((new.host_id, new.fingerprint), (old.host_id, old.fingerprint))
        self.assertGreaterEqual(new.not_valid_after, old.not_valid_after)  # (whole seconds)
        # recorded: a certificate event in the host's history, with the new expiry
        [event] = [e for e in (await plane.events.history(topics=["host"]))["events"]
                   if e["kind"] == "certificate"]
        self.assertEqual((event["subject"], event["payload"]["reason"]), (
            new.host_id, f"host certificate renewed, valid until {pki.expiry_of(new.cert_pem)}"))
        # the agent's next connection presents it (the control plane checks its host id)
        await agent.stopService()
        agent2 = self.agent(plane, os.path.join(tmp, "a1"))
        await agent2.registered
        self.assertEqual(plane.registry.state(agent2.identity.host_id), "ready")

    @d
    async def test_a_control_plane_that_does_not_renew(self):
        # an older control plane: its role table does not let agents ask
        self.patch(roles, "AGENT_PROCEDURES",
                   [p for p in roles.AGENT_PROCEDURES if p != "zwrm.agent.renew_certificate"])
        plane, tmp = await self.plane()
        agent = self.agent(plane, os.path.join(tmp, "a1"))
        await agent.registered
        old = pki.HostCredentials.load(agent.tls_dir)
        clock = Clock()
        clock.advance(pki.renewal_time(old.cert_pem))
        warned = []
        self.patch(CertificateRenewal, "log", SimpleNamespace(
            warn=lambda fmt, **kw: warned.append(kw["why"]), info=lambda *a, **kw: None))
        renewal = CertificateRenewal(clock, agent.tls_dir, lambda: agent.identity.host_id,
                                     threads=deferToThread)
        renewal.start(agent.session)
        self.addCleanup(renewal.stop)
        await poll(reactor, lambda: warned, 10, what="the refusal")
        self.assertEqual(warned, ["the control plane does not renew certificates (an older"
                                  " version)"])
        [call] = clock.getDelayedCalls()  # asked again in 12 hours, not every hour
        self.assertEqual(call.getTime() - clock.seconds(), CHECK_INTERVAL)
        self.assertEqual(pki.HostCredentials.load(agent.tls_dir), old)

    @d
    async def test_an_expired_certificate_does_not_lock_the_agent_out(self):
        plane, tmp = await self.plane()
        data_dir = os.path.join(tmp, "a1")
        agent = self.agent(plane, data_dir)
        await agent.registered
        host_id = agent.identity.host_id
        await agent.stopService()
        # its host off for longer than the certificate lives
        expired = pki.HostCredentials(plane.pki.ca.certificate_pem, *plane.pki.ca.issue_host(
            host_id, lifetime=datetime.timedelta(seconds=-60)))
        expired.save(agent.tls_dir)
        agent2 = self.agent(plane, data_dir, runtime=True)
        await agent2.registered  # with its credential alone
        await poll(reactor, lambda: agent2.renewal.renewals == 1, 10, what="the renewal")
        new = pki.HostCredentials.load(agent2.tls_dir)
        self.assertEqual(new.host_id, host_id)
        self.assertGreater(new.not_valid_after.timestamp(), reactor.seconds() + 300 * 86400)
        [expiry] = [f for f in await AgentMetrics(reactor, agent2).families()
                    if f.name == "zwrm_agent_host_certificate_expiry_timestamp_seconds"]
        self.assertEqual(expiry.samples[0].value, new.not_valid_after.timestamp())
        # its volume endpoint (started with the expired one) presents the new one to peers
        peer = pki.HostCredentials(plane.pki.ca.certificate_pem,
                                   *plane.pki.ca.issue_host("h_peer"))
        port = agent2.runtime.transfers.receiver.port.getHost().port
        self.assertEqual(await peek(port, peer.peer_client_context(host_id)),
                         serial(new.cert_pem))

    @d
    async def test_only_for_the_callers_own_host(self):
        plane, tmp = await self.plane(host_certificate_lifetime=3600)
        agent = self.agent(plane, os.path.join(tmp, "a1"))
        await agent.registered
        # signed for the configured lifetime
        left = pki.HostCredentials.load(agent.tls_dir).not_valid_after.timestamp() - reactor.seconds()
        self.assertTrue(3590 < left <= 3600, left)
        _key, csr = pki.make_host_request("h_0000000000000000")
        with self.assertRaises(ApplicationError) as e:
            await agent.session.call("zwrm.agent.renew_certificate", csr=csr.decode())
        self.assertEqual(e.exception.error, "zwrm.error.invalid_argument")
        self.assertIn("not for host", e.exception.args[0])
        with self.assertRaises(ApplicationError) as e:
            await agent.session.call("zwrm.agent.renew_certificate", csr="not a request")
        self.assertEqual(e.exception.error, "zwrm.error.invalid_argument")
        ca = os.path.join(plane.config.data_dir, "pki", "ca.pem")
        operator = await connect(reactor, {"url": plane.url, "token": plane.operator_token,
                                           "authid": "operator", "ca_file": ca})
        self.addCleanup(lambda: ensureDeferred(close(operator)))
        _key, csr = pki.make_host_request("operator")
        with self.assertRaises(ApplicationError) as e:
            await operator.call("zwrm.agent.renew_certificate", csr=csr.decode())
        self.assertEqual(e.exception.error, "wamp.error.not_authorized")

    @d
    async def test_the_control_planes_server_certificate_renewed_while_it_runs(self):
        plane, tmp = await self.plane()
        self.assertEqual(plane._cert_renewal.interval, CERT_CHECK_INTERVAL)
        pki_dir = os.path.join(plane.config.data_dir, "pki")

        def on_disk():
            with open(os.path.join(pki_dir, "server.pem"), "rb") as f:
                return f.read()

        started = on_disk()
        self.assertEqual(await served_serial(plane), serial(started))
        await plane._renew_server_certificate()  # more than 30 days left: kept
        self.assertEqual(on_disk(), started)
        # 20 days left (as after eleven months of running): reissued, and served
        near = plane.pki.ca.issue_server(plane.pki.names, lifetime=datetime.timedelta(days=20))
        for name, data in zip(("server.pem", "server.key"), near, strict=True):
            with open(os.path.join(pki_dir, name), "wb") as f:
                f.write(data)
        await plane._renew_server_certificate()
        renewed = on_disk()
        self.assertNotIn(renewed, (started, near[0]))
        self.assertEqual(await served_serial(plane), serial(renewed))
        self.assertEqual(plane.pki.server_expires_at, pki.expiry_time(renewed))  # (/metrics)
        agent = self.agent(plane, os.path.join(tmp, "a1"))  # and agents connect to it
        await agent.registered


class VolumeEndpointTests(TestCase):
    timeout = 30

    @d
    async def test_the_volume_endpoint_presents_the_renewed_certificate(self):
        ca = pki.CertificateAuthority.create()
        a = pki.HostCredentials(ca.certificate_pem, *ca.issue_host("a"))
        expired = pki.HostCredentials(ca.certificate_pem, *ca.issue_host(
            "b", lifetime=datetime.timedelta(seconds=-60)))
        store = VolumeStore(reactor, os.path.join(temp_dir(self), "volumes"))
        transfers = VolumeTransfers(reactor, store, expired)
        port = await transfers.listen()
        self.addCleanup(port.stopListening)
        self.addCleanup(transfers.receiver.stopService)  # (and its accepted connection)
        renewed = pki.HostCredentials(ca.certificate_pem, *ca.issue_host("b"))
        transfers.use_credentials(renewed)
        served = await peek(port.getHost().port, a.peer_client_context("b"))
        self.assertEqual(served, serial(renewed.cert_pem))
        self.assertEqual(transfers.sender.tls, renewed.peer_client_context)


@implementer(IHandshakeListener)
class _Peek(Protocol):
    def handshakeCompleted(self):
        self.factory.done.callback(self.transport.getPeerCertificate())
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.factory.lost.callback(None)


async def served_serial(plane):
    """The serial number of the certificate the control plane's TLS listener presents."""
    ca = os.path.join(plane.config.data_dir, "pki", "ca.pem")
    with open(ca, "rb") as f:
        trust = ssl.Certificate.loadPEM(f.read())
    return await peek(plane.ports[0].getHost().port, ssl.optionsForClientTLS("127.0.0.1", trust))


async def peek(port, options):
    """The serial number of the certificate the TLS listener on C{port} presents."""
    factory = Factory.forProtocol(_Peek)
    factory.done, factory.lost = Deferred(), Deferred()
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    await endpoint.connect(factory)
    cert = await factory.done.addTimeout(10, reactor)
    await factory.lost
    return cert.to_cryptography().serial_number
