"""
TLS from the first join, with real processes: a C{twistd zwrm-control} listening on
C{wss://} with the certificate its own CA issued, C{twistd zwrm-agent}s joining with
C{zwrm1.} join tokens, and the C{zwrm} CLI over C{wss://} with C{ZWRM_CA_FILE}.
"""

import json
import os
import socket
import ssl

import pytest
from autobahn.twisted.websocket import WampWebSocketClientFactory
from autobahn.wamp.serializer import JsonSerializer
from twisted.internet import error, reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm import errors, pki
from zwrm.agent.service import (
    AgentService,
    AuthRejected,
    ServerRejected,
    _AgentSession,
    _PinnedOptions,
)
from zwrm.agent.tap import AgentConfig
from zwrm.testing.processes import (
    AgentProcess,
    ControlPlaneProcess,
    PollTimeout,
    free_port,
    poll,
    run_cli,
    temp_dir,
)


def _log(process):
    try:
        with open(process.log_path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


async def _await_log(process, text, timeout=60):
    try:
        await poll(reactor, lambda: text in _log(process), timeout, what=repr(text))
    except PollTimeout as e:
        raise AssertionError(f"{e}; log {process.log_path}:\n{process.log_tail()}") from None


@pytest.mark.multihost
class TLSJoinTests(TestCase):
    timeout = 180

    async def _control_plane(self, tmp):
        self.tls_port = free_port()
        cp = ControlPlaneProcess(
            reactor, os.path.join(tmp, "cp"),
            extra_args=["--listen", f"ssl:{self.tls_port}:interface=127.0.0.1"])
        self.addCleanup(lambda: ensureDeferred(cp.stop()))
        await cp.start()
        self.wss = f"wss://127.0.0.1:{self.tls_port}/ws"
        self.ca_file = os.path.join(cp.data_dir, "pki", "ca.pem")
        return cp

    async def _cli(self, cp, *args):
        code, out, err = await run_cli(
            reactor, list(args), self.wss, cp.operator_token, env={"ZWRM_CA_FILE": self.ca_file})
        if code != 0:
            raise AssertionError(f"zwrm {' '.join(args)} failed ({code}): {err.strip()}")
        return out

    async def _agent(self, cp, tmp, name, token):
        agent = AgentProcess(reactor, os.path.join(tmp, name), self.wss, token, name=name)
        self.addCleanup(lambda: ensureDeferred(agent.stop()))
        await agent.start()
        return agent

    def test_join_over_tls(self):
        """
        An agent joins over wss:// with the zwrm1 token (verifying the control plane by the
        token's CA fingerprint), receives a host certificate for its host id, reconnects
        with it and is ready in `zwrm host list` run over wss:// with ZWRM_CA_FILE.
        """
        return ensureDeferred(self._join())

    async def _join(self):
        tmp = temp_dir(self)
        cp = await self._control_plane(tmp)
        token = pki.JoinToken.parse(cp.join_token)
        with open(self.ca_file, "rb") as f:
            self.assertEqual(token.ca_fingerprint, pki.fingerprint_of(f.read()))
        agent = await self._agent(cp, tmp, "a1", cp.join_token)

        async def ready():
            hosts = json.loads(await self._cli(cp, "host", "list", "--json"))
            return [h for h in hosts if h["id"] == agent.host_id and h["state"] == "ready"]

        await poll(reactor, ready, 60, interval=0.5, what="agent ready over wss://")
        credentials = pki.HostCredentials.load(os.path.join(agent.data_dir, pki.AGENT_TLS_DIR))
        self.assertEqual(credentials.host_id, agent.host_id)
        self.assertEqual(credentials.fingerprint, token.ca_fingerprint)
        listed = json.loads(await self._cli(cp, "tokens", "list", "--json"))
        used = {t["id"]: t["used"] for t in listed}
        self.assertGreaterEqual(used[token.id], 1)

        # a client presenting a1's host certificate cannot authenticate as another host
        with open(os.path.join(agent.data_dir, "host.json")) as f:
            credential = json.load(f)["credential"]
        options = _PinnedOptions(
            "127.0.0.1", credentials.fingerprint,
            client_certificate=(credentials.cert_pem, credentials.key_pem),
            ca_certificate=credentials.ca_pem)
        session = _AgentSession("zwrm", "h-other", credential)
        factory = WampWebSocketClientFactory(
            lambda: session, url=self.wss, serializers=[JsonSerializer()], reactor=reactor)
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", self.tls_port))
        await endpoint.connect(factory)
        with self.assertRaises(AuthRejected) as c:
            await session.joined
        self.assertIn(
            f"the TLS client certificate is for host {agent.host_id!r}, not for 'h-other'",
            str(c.exception))

    def test_refused(self):
        """
        Agents holding a token with the wrong CA fingerprint, a revoked token or an expired
        token are refused, each with one clear log line, no traceback and nothing at error
        level on either side, and never appear
        in `zwrm host list`; an agent whose saved host certificate names another host id
        refuses to use it.
        """
        return ensureDeferred(self._refused())

    async def _refused(self):
        tmp = temp_dir(self)
        cp = await self._control_plane(tmp)
        good = pki.JoinToken.parse(cp.join_token)
        wrong = f"zwrm1.{good.id}.{good.secret}.{'0' * 64}"
        revoked = (await self._cli(cp, "tokens", "create", "--description", "to revoke")).strip()
        await self._cli(cp, "tokens", "revoke", pki.JoinToken.parse(revoked).id)
        expired = (await self._cli(cp, "tokens", "create", "--ttl", "1")).strip()

        async def is_expired():
            listed = json.loads(await self._cli(cp, "tokens", "list", "--json"))
            states = {t["id"]: t["state"] for t in listed}
            return states[pki.JoinToken.parse(expired).id] == "expired"

        await poll(reactor, is_expired, 30, interval=0.5, what="token expired")

        # a joined agent whose certificate is then swapped for another host's
        a1 = await self._agent(cp, tmp, "a1", cp.join_token)
        await poll(reactor, lambda: "saved in" in _log(a1), 60, what="a1 host certificate")

        agents = {
            "wrong": await self._agent(cp, tmp, "wrong", wrong),
            "revoked": await self._agent(cp, tmp, "revoked", revoked),
            "expired": await self._agent(cp, tmp, "expired", expired),
        }
        expect = {
            "wrong": f"refusing the control plane at {self.wss}: the server's CA has fingerprint"
            f" {good.ca_fingerprint}, not the expected {'0' * 64}",
            "revoked": f"join token {pki.JoinToken.parse(revoked).id} was revoked",
            "expired": f"join token {pki.JoinToken.parse(expired).id} expired at",
        }
        for name, agent in agents.items():
            await _await_log(agent, expect[name])

        a1_id = a1.host_id
        await a1.stop()
        with open(os.path.join(a1.data_dir, "host.json")) as f:
            ident = json.load(f)
        ident["host_id"] = "h-someoneelse"
        with open(os.path.join(a1.data_dir, "host.json"), "w") as f:
            json.dump(ident, f)
        a1.spawn()
        await _await_log(a1, f"is for host {a1_id!r}, not this host 'h-someoneelse'")

        hosts = json.loads(await self._cli(cp, "host", "list", "--json"))
        self.assertEqual([h["name"] for h in hosts], ["a1"])
        for process in list(agents.values()) + [a1, cp]:
            self.assertNotIn("Traceback", _log(process))
            # one warning each time: autobahn's own "SSL error" line at error level is not
            # repeated beside the agent's
            self.assertNotIn("#error]", _log(process), process.log_path)
            self.assertNotIn("#critical]", _log(process), process.log_path)


def _broken_record_after_upgrade(port):
    """
    Over a blocking socket (run in a thread): a TLS handshake with the control plane, the
    WebSocket upgrade, then an application-data record that does not decrypt.

    @return: what the server sent after the upgrade's answer, until it closed.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:

        def exchange(step):
            while True:
                try:
                    result = step()
                except ssl.SSLWantReadError:
                    sock.sendall(outgoing.read())
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("closed during the TLS exchange") from None
                    incoming.write(data)
                else:
                    sock.sendall(outgoing.read())
                    return result

        exchange(tls.do_handshake)
        tls.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: wamp.2.json\r\n\r\n")
        sock.sendall(outgoing.read())
        answer = exchange(lambda: tls.read(65536))
        if not answer.startswith(b"HTTP/1.1 101"):
            raise AssertionError(f"no upgrade: {answer[:80]!r}")
        sock.sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # does not decrypt
        rest = b""
        while data := sock.recv(65536):
            rest += data
        return rest


class BadTLSPeerTests(TestCase):
    timeout = 120

    def test_broken_record_after_upgrade(self):
        """
        A peer that breaks TLS once the WebSocket is open (a record that does not decrypt)
        is the peer's mistake: the control plane closes the connection and logs one info
        line naming the peer and OpenSSL's reason, nothing at error level (autobahn's own
        "SSL error" line was at error level).
        """
        return ensureDeferred(self._broken())

    async def _broken(self):
        tmp = temp_dir(self)
        port = free_port()
        cp = ControlPlaneProcess(reactor, os.path.join(tmp, "cp"),
                                 extra_args=["--listen", f"ssl:{port}:interface=127.0.0.1"])
        self.addCleanup(lambda: ensureDeferred(cp.stop()))
        await cp.start()
        await deferToThread(_broken_record_after_upgrade, port)
        await _await_log(cp, "] TLS with tcp4:127.0.0.1:")
        [line] = [x for x in _log(cp).splitlines() if "] TLS with " in x]
        self.assertRegex(line, r"#info\] TLS with tcp4:127\.0\.0\.1:\d+ failed: .*(bad record|decrypt)")
        self.assertNotIn("#error]", _log(cp))
        self.assertNotIn("Traceback", _log(cp))


class AgentCredentialTests(SynchronousTestCase):
    """
    What a joining agent accepts from the control plane, and which TLS options it uses
    (no processes; a real CA in a temporary directory).
    """

    def setUp(self):
        self.ca = pki.CertificateAuthority.create()
        self.other_ca = pki.CertificateAuthority.create()
        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir)
        self.token = f"zwrm1.abc123.{'s' * 32}.{self.ca.fingerprint}"
        self.agent = AgentService(
            Clock(),
            AgentConfig(url="wss://127.0.0.1:8443/ws", join_token=self.token,
                        data_dir=self.data_dir))
        self.agent.identity.load()
        self.host_id = self.agent.identity.host_id

    def _result(self, ca, host_id):
        key_pem, csr_pem = pki.make_host_request(host_id)
        cert = ca.sign_host_request(csr_pem, host_id)
        return {"certificate": cert.decode(), "ca": ca.certificate_pem.decode()}, key_pem

    def test_options(self):
        """
        Joining trusts only the token's CA; once the credentials are saved the agent presents
        its host certificate; plain ws:// uses no TLS options.
        """
        joining = self.agent._tls_options(joining=True)
        self.assertIsInstance(joining, pki.PinnedClientTLSOptions)
        self.assertEqual(joining._fingerprint, self.ca.fingerprint)
        self.assertIsNone(self.agent._tls_options(joining=False))  # nothing saved yet
        result, key_pem = self._result(self.ca, self.host_id)
        self.agent._save_credentials(result, key_pem, joining)
        member = self.agent._tls_options(joining=False)
        self.assertEqual(member._fingerprint, self.ca.fingerprint)
        self.assertEqual(pki.HostCredentials.load(self.agent.tls_dir).host_id, self.host_id)
        self.agent.config.url = "ws://127.0.0.1:8080/ws"
        self.assertIsNone(self.agent._tls_options(joining=False))

    def test_certificate_for_another_host(self):
        result, key_pem = self._result(self.ca, "h-someoneelse")
        with self.assertRaises(ServerRejected) as c:
            self.agent._save_credentials(result, key_pem, None)
        self.assertIn("not for host", str(c.exception))
        self.assertIsNone(pki.HostCredentials.load(self.agent.tls_dir))

    def test_ca_other_than_the_tokens(self):
        result, key_pem = self._result(self.other_ca, self.host_id)
        with self.assertRaises(ServerRejected) as c:
            self.agent._save_credentials(result, key_pem, None)
        self.assertIn("the join token names", str(c.exception))
        self.assertIsNone(pki.HostCredentials.load(self.agent.tls_dir))

    def test_saved_certificate_for_another_host(self):
        result, key_pem = self._result(self.ca, self.host_id)
        self.agent._save_credentials(result, key_pem, None)
        self.agent.identity.host_id = "h-else"
        with self.assertRaises(ServerRejected) as c:
            self.agent._tls_options(joining=False)
        self.assertIn(f"is for host {self.host_id!r}, not this host 'h-else'", str(c.exception))

    def test_unreachable_says_why(self):
        """
        A connection that fails says why in words (the OS's for an errno Twisted has no
        class for: a host cut off the network), not the exception's class name.
        """
        url = self.agent.config.url
        for outcome, why in [
            (error.getConnectError((113, "No route to host")), "No route to host"),
            (error.TCPTimedOutError(), "TCP connection timed out"),
            (error.ConnectionLost(), "Connection to the other side was lost in a non-clean"
                                     " fashion"),
            # (what Twisted fails a connect with when the socket closes before it is set up:
            # its text was a Failure's repr, with "Traceback" in it)
            (error.ConnectError(string=Failure(error.ConnectionDone())),
             "the connection was closed before it was set up"),
            (error.ConnectError(string=Failure(error.getConnectError((113, "No route to host")))),
             "No route to host"),
        ]:
            self.assertEqual(self.agent._explain(outcome),
                             f"cannot reach the control plane at {url}: {why}")

    def test_malformed_token(self):
        self.agent.config.join_token = "zwrm1.abc"
        with self.assertRaises(errors.InvalidArgument) as c:
            self.agent._tls_options(joining=True)
        self.assertIn("malformed join token", c.exception.message)
        self.assertIn("malformed join token", self.agent._explain(c.exception))
