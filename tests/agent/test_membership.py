"""
Agents and the control plane over real loopback sockets, in one process: join,
credentials, register, heartbeats, roles, wrong tokens.
"""

import errno
import fcntl
import json
import os
import stat
import struct
import termios
import types

from autobahn import wamp
from autobahn.wamp.exception import ApplicationError, TransportLost
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from zwrm import errors
from zwrm.agent.runtime import HostRuntime
from zwrm.agent.service import CONTACT_FILE, AgentService, _AgentSession
from zwrm.agent.tap import AgentConfig
from zwrm.cli.client import CliError, close, connect
from zwrm.control.service import ControlPlane
from zwrm.control.tap import Config
from zwrm.testing.processes import poll, temp_dir
from zwrm.wamp.procedures import cancellable


def d(f):
    def wrapper(self):
        return ensureDeferred(f(self))

    wrapper.__name__ = f.__name__
    return wrapper


async def start_plane(testcase, tls=False, **kw):
    """A control plane in this process on loopback (C{tls}: an C{ssl:} listener, C{wss://})."""
    tmp = temp_dir(testcase)
    listen = "ssl:0:interface=127.0.0.1" if tls else "tcp:0:interface=127.0.0.1"
    config = Config(listen=[listen], data_dir=os.path.join(tmp, "cp"),
                    heartbeat_interval=0.2, flush_interval=0.2, **kw)
    plane = ControlPlane(reactor, config)
    plane.startService()
    testcase.addCleanup(plane.stopService)
    await plane.started
    port = plane.ports[0].getHost().port
    plane.url = f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/ws"
    with open(os.path.join(config.data_dir, "join.token")) as f:
        plane.join_token = f.read().strip()
    with open(os.path.join(config.data_dir, "operator.token")) as f:
        plane.operator_token = f.read().strip()
    return plane, tmp


async def start_host_agent(testcase, plane, data_dir, url=None, join_token=None, **options):
    """
    A registered agent with its host runtime (the QEMU driver under TCG, a volume store, an
    image cache), as C{twistd zwrm-agent} runs it, joined to C{plane} (or to C{url} with
    C{join_token}); stopped when the test ends. C{options}: more of its L{AgentConfig}.
    """
    config = AgentConfig(url=url or plane.url, join_token=join_token or plane.join_token,
                         name="a1", data_dir=data_dir, retry_initial=0.05, retry_max=0.2,
                         accel="tcg", **options)
    agent = AgentService(reactor, config, runtime=HostRuntime(reactor, config))
    agent.startService()
    testcase.addCleanup(agent.stopService)
    await agent.registered
    return agent


def _unread(sock):
    """How many bytes wait unread in C{sock}."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def make_agent(testcase, plane, data_dir, token=None, name="a1"):
    config = AgentConfig(url=plane.url, join_token=token or plane.join_token, data_dir=data_dir,
                         name=name, region="eu", datacenter="dc1", labels={"k": "v"},
                         vcpus=3, retry_initial=0.05, retry_max=0.2)
    agent = AgentService(reactor, config)
    agent.startService()
    testcase.addCleanup(agent.stopService)
    return agent


class MembershipTests(TestCase):
    timeout = 60

    @d
    async def test_a_fencing_agent_says_so_and_keeps_its_last_answer(self):
        """
        An agent with fence_after reports it (the control plane stores it for the host:
        zwrm.host.remove waits that long before it recovers its volumes); each answered
        heartbeat moves its last contact on, kept in its data directory (tests/agent/
        test_fencing.py has the fence itself).
        """
        plane, tmp = await start_plane(self)
        data_dir = os.path.join(tmp, "a1")
        agent = await start_host_agent(self, plane, data_dir, fence_after=30)
        host_id = agent.identity.host_id
        [joined] = [e for e in await plane.store.select("events", "subject = ?", [host_id])
                    if e["kind"] == "joined"]
        self.assertEqual(joined["payload"]["fence_after"], 30.0)  # (before it registered)
        self.assertEqual((await plane.store.get("hosts", host_id))["fence_after"], 30.0)
        self.assertEqual(plane.registry.hosts.wire(host_id)["fence_after"], 30.0)
        first = agent.last_contact
        await poll(reactor, lambda: agent.heartbeats_sent >= 2, 10, 0.05, what="heartbeats")
        self.assertGreater(agent.last_contact, first)
        with open(os.path.join(data_dir, CONTACT_FILE)) as f:
            self.assertEqual(json.load(f)["at"], agent.last_contact)

    @d
    async def test_join_register_heartbeat_restart(self):
        plane, tmp = await start_plane(self)
        data_dir = os.path.join(tmp, "a1")
        agent = make_agent(self, plane, data_dir)
        result = await agent.registered
        host_id = agent.identity.host_id
        self.assertEqual(result["host_id"], host_id)
        # credential stored privately; only its hash on the control plane
        path = os.path.join(data_dir, "host.json")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            credential = json.load(f)["credential"]
        self.assertTrue(credential)
        row = await plane.store.get("hosts", host_id)
        self.assertNotIn(credential, json.dumps(row))
        self.assertEqual((row["name"], row["region"], row["vcpus"]), ("a1", "eu", 3))
        self.assertEqual(row["labels"], {"k": "v"})
        # heartbeats arrive
        first = plane.registry.last_heartbeat(host_id)
        await poll(reactor, lambda: agent.heartbeats_sent >= 2, 10, 0.05, what="heartbeats")
        self.assertGreater(plane.registry.last_heartbeat(host_id), first)
        # the executor is callable through the router
        info = await plane.registry.call_executor(host_id, "agent.info")
        self.assertEqual(info["name"], "a1")
        # a restart is the same host, using its credential (no new join)
        await agent.stopService()
        agent2 = make_agent(self, plane, data_dir, token="not-needed-any-more")
        await agent2.registered
        self.assertEqual(agent2.identity.host_id, host_id)
        self.assertEqual(plane.registry.host_ids(), [host_id])

    @d
    async def test_an_agent_that_stops_is_not_called_before_it_is_offline(self):
        """
        Its session's end (the router's wamp.session.on_leave) deregisters its executor at
        once: nothing is placed there nor called on it, though its host is not offline yet.
        """
        plane, tmp = await start_plane(self)
        data_dir = os.path.join(tmp, "a1")
        agent = make_agent(self, plane, data_dir)
        await agent.registered
        host_id = agent.identity.host_id
        self.assertTrue(plane.registry.executor_available(host_id))
        await agent.stopService()
        await poll(reactor, lambda: plane.scheduler.host(host_id).state == "unreachable", 10,
                   0.02, what="the host unschedulable")
        self.assertFalse(plane.registry.executor_available(host_id))
        self.assertEqual(plane.registry.state(host_id), "ready")
        agent2 = make_agent(self, plane, data_dir)
        await agent2.registered
        self.assertTrue(plane.registry.executor_available(host_id))
        self.assertEqual(plane.scheduler.host(host_id).state, "ready")

    @d
    async def test_wrong_token_retries_with_one_line(self):
        plane, tmp = await start_plane(self)
        agent = make_agent(self, plane, os.path.join(tmp, "a1"), token="wrong")
        await poll(reactor, lambda: agent.attempts >= 3 and agent.last_error, 30, 0.05,
                   what="retries")
        self.assertFalse(agent.registered.called)
        self.assertIn("rejected our join token", agent.last_error)
        self.assertEqual(len(plane.registry), 0)
        # stopped wherever it was in an attempt: nothing left (trial checks the reactor)
        await agent.stopService()
        self.assertEqual((agent.state, agent._connections), ("stopped", set()))

    @d
    async def test_stop_while_the_control_plane_closes_the_connection(self):
        """
        The control plane rejected the token and sent ABORT and its WebSocket close, which
        the agent has not read yet, when the agent stops: the agent finishes the closing
        handshake, so neither side keeps a closing-handshake timer (aborting the
        connection here left one in the control plane's reactor).
        """
        plane, tmp = await start_plane(self)
        paused = []
        challenge = _AgentSession.onChallenge

        def on_challenge(session, c):
            # answer, then read nothing more: what the control plane sends next waits
            try:
                return challenge(session, c)
            finally:
                transport = session._transport.transport
                transport.pauseProducing()
                paused.append(transport)

        self.patch(_AgentSession, "onChallenge", on_challenge)
        agent = make_agent(self, plane, os.path.join(tmp, "a1"), token="wrong")
        await poll(reactor, lambda: paused, 10, 0.01, what="token sent")
        sock = paused[0].socket
        seen = []

        def answered():  # bytes are waiting, and no more came in the last 0.1 s
            seen.append(_unread(sock))
            return len(seen) > 2 and seen[-1] == seen[-3] > 0

        await poll(reactor, answered, 10, 0.05, what="the control plane's answer waiting")
        stopped = agent.stopService()
        paused[0].resumeProducing()
        await stopped
        self.assertEqual((agent.state, agent._connections), ("stopped", set()))

    @d
    async def test_calls_fail_when_the_connection_is_lost(self):
        """
        A call still waiting for its answer when the connection goes fails (it used to
        wait for ever, and with it the agent's attempt), and the agent connects again.
        """
        plane, tmp = await start_plane(self)
        agent = make_agent(self, plane, os.path.join(tmp, "a1"))
        await agent.registered
        session, attempts = agent.session, agent.attempts
        call = session.call("zwrm.agent.heartbeat", {})
        session._transport.transport.abortConnection()  # the CALL never leaves
        failed = []
        call.addErrback(failed.append)
        await poll(reactor, lambda: failed, 10, 0.05, what="the call failed")
        self.assertIsInstance(failed[0].value, TransportLost)
        await poll(reactor, lambda: agent.state == "registered"
                   and agent.session not in (None, session), 10, 0.05, what="registered again")
        self.assertGreater(agent.attempts, attempts)

    @d
    async def test_unreachable_retries(self):
        plane, tmp = await start_plane(self)
        port = plane.ports[0]
        await port.stopListening()
        plane.ports = []
        agent = make_agent(self, plane, os.path.join(tmp, "a1"))
        await poll(reactor, lambda: agent.attempts >= 2, 10, 0.05, what="retries")
        self.assertIn("connection refused", agent.last_error)

    @d
    async def test_lost_credential_joins_again(self):
        plane, tmp = await start_plane(self)
        data_dir = os.path.join(tmp, "a1")
        agent = make_agent(self, plane, data_dir)
        await agent.registered
        await agent.stopService()
        host_id = agent.identity.host_id
        with open(os.path.join(data_dir, "host.json"), "w") as f:
            json.dump({"host_id": host_id, "credential": "forged"}, f)
        # a join token admits only new hosts: it joins again only after `zwrm host reset`
        agent2 = make_agent(self, plane, data_dir)
        await poll(reactor, lambda: "zwrm host reset" in (agent2.last_error or ""), 20, 0.05,
                   what="the join refused")
        self.assertFalse(agent2.registered.called)
        op = await connect(reactor, {"url": plane.url, "token": plane.operator_token,
                                     "authid": "operator"})
        try:
            await op.call("zwrm.host.reset", host_id)
        finally:
            await close(op)
        await agent2.registered
        self.assertEqual(agent2.identity.host_id, host_id)
        self.assertNotEqual(agent2.identity.credential, "forged")

    @d
    async def test_session_killed_while_registering(self):
        """
        The control plane kills the host's session (as when its health monitor marks the
        host offline) while the agent's C{zwrm.agent.register} call is outstanding: the
        call fails, and the agent connects and registers again.  (It used to wait for the
        answer for ever: the host stayed offline until the agent was restarted.)
        """
        plane, tmp = await start_plane(self)
        agent = make_agent(self, plane, os.path.join(tmp, "a1"))
        await agent.registered
        attempts, register, killed = agent.attempts, plane.registry.register, []

        async def killing_register(host_id, facts, **kw):
            if not killed:
                killed.append(plane.router.kill_by_authid(host_id, "host marked offline"))
            return await register(host_id, facts, **kw)

        self.patch(plane.registry, "register", killing_register)
        agent.session._transport.transport.abortConnection()  # connect and register again
        await poll(reactor, lambda: killed and agent.state == "registered"
                   and agent.attempts >= attempts + 2, 20, 0.05, what="registered again")
        self.assertEqual(killed, [1])
        sent = agent.heartbeats_sent
        await poll(reactor, lambda: agent.heartbeats_sent > sent, 10, 0.05, what="heartbeats")

    @d
    async def test_reports_that_could_not_be_sent_are_sent_once_registered_again(self):
        """
        Machine events the agent could not send (the connection went) reach the control
        plane once the agent has registered again, the latest per machine, in order; before,
        they were lost, and a drain waited for ever for a replacement's health.
        """
        plane, tmp = await start_plane(self)
        received = []

        async def machine_event(event=None, details=None):
            received.append((event["machine_id"], event["state"], event.get("health")))

        self.patch(plane.apps, "machine_event", machine_event)
        agent = await start_host_agent(self, plane, os.path.join(tmp, "a1"))
        session = agent.session
        session._transport.transport.abortConnection()  # none of these leaves
        sent = [agent.runtime.report({"machine_id": m, "state": st, "health": h})
                for m, st, h in [("m-1", "starting", None), ("m-2", "running", "starting"),
                                 ("m-2", "running", "passing")]]
        for r in sent:
            r.addErrback(lambda f: None)
        await poll(reactor, lambda: ("m-1", "starting", None) in received
                   and ("m-2", "running", "passing") in received, 20, 0.05,
                   what="reports sent again")
        self.assertIsNot(agent.session, session)
        # the older event of m-2 is not sent after (or instead of) the newer one
        self.assertEqual(set(received), {("m-1", "starting", None), ("m-2", "running", "passing")})


class _Failing:
    """Agent procedures that fail as a full disk, a bug, and a named zwrm error would."""

    @wamp.register("test.full")
    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    @wamp.register("test.full_later")
    async def full_later(self):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    @wamp.register("test.bug")
    def bug(self):
        return {}["missing"]

    @wamp.register("test.named")
    def named(self):
        raise errors.NotFound("no machine 'm9'")

    waiting = None

    @wamp.register("test.wait")
    @cancellable  # as a console attachment is
    def wait(self):
        self.waiting = Deferred()
        return self.waiting


class ProcedureGuardTests(TestCase):
    """
    An agent's procedures answer every failure with a zwrm.error URI the control plane
    knows, over the real WAMP session: a full disk as resource_exhausted naming the host,
    a bug as internal (its traceback in the agent's log only).
    """

    timeout = 60

    async def agent(self):
        """@return: a control plane, and an agent registered with L{_Failing}'s procedures."""
        plane, tmp = await start_plane(self)
        config = AgentConfig(url=plane.url, join_token=plane.join_token,
                             data_dir=os.path.join(tmp, "a1"), name="a1", region="eu",
                             datacenter="dc1", retry_initial=0.05, retry_max=0.2)
        agent = AgentService(reactor, config)
        failing = _Failing()
        agent.executors.append(failing)
        agent.startService()
        self.addCleanup(agent.stopService)
        await agent.registered
        return plane, agent, failing

    @d
    async def test_failures_reach_the_control_plane_as_zwrm_errors(self):
        plane, agent, _ = await self.agent()
        host_id = agent.identity.host_id

        async def call(verb):
            try:
                return await plane.registry.call_executor(host_id, verb)
            except ApplicationError as e:
                raise errors.from_wire(e) from None

        for verb, quota in (("test.full", "No space left on device"),
                            ("test.full_later", "Disk quota exceeded")):
            with self.assertRaises(errors.ResourceExhausted) as cm:
                await call(verb)
            self.assertEqual(cm.exception.message,
                             f"host {host_id}: the disk is full: {verb} failed ({quota})")
        self.assertEqual(self.flushLoggedErrors(), [])
        with self.assertRaises(errors.Internal) as cm:
            await call("test.bug")
        self.assertEqual(cm.exception.message, f"host {host_id}: test.bug failed: an internal"
                         " error (see the agent's log)")
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)  # the agent's log
        with self.assertRaises(errors.NotFound) as cm:
            await call("test.named")
        self.assertEqual(cm.exception.message, "no machine 'm9'")
        self.assertEqual(self.flushLoggedErrors(), [])

    @d
    async def test_a_call_its_caller_cancels_is_not_an_error(self):
        """
        The control plane cancels a call (as a console that detaches does): the agent's
        procedure is cancelled, and the agent does not log it as an error (autobahn's
        onUserError logged the CancelledError with its traceback). The control plane's own
        session has the same mix-in (zwrm.wamp.procedures.QuietAnswers).
        """
        plane, agent, failing = await self.agent()
        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        call = plane.registry.call_executor(agent.identity.host_id, "test.wait")
        call.addErrback(lambda f: f.trap(CancelledError))
        await poll(reactor, lambda: failing.waiting is not None, 10, 0.01, what="the call")
        call.cancel()
        # (the agent's answer to the cancel, its onUserError included, runs as it fires)
        await poll(reactor, lambda: failing.waiting.called, 10, 0.01, what="the cancel")
        self.assertEqual([formatEvent(e) for e in seen if e["log_level"] >= LogLevel.warn],
                         [])


class HeartbeatLogTests(TestCase):
    """
    A heartbeat outstanding when the session ends is cancelled by autobahn: not a warning
    with an empty reason (the session's end is logged on its own); a refused one says why.
    """

    def _agent(self, call):
        config = AgentConfig(url="ws://127.0.0.1:1/ws", join_token="t",
                             data_dir=temp_dir(self), name="a1")
        agent = AgentService(reactor, config)
        agent.session = types.SimpleNamespace(is_attached=lambda: True, call=call)
        seen = []
        agent.log = Logger(observer=seen.append)
        return agent, seen

    def test_cancelled_by_the_session_end(self):
        outstanding = Deferred()
        agent, seen = self._agent(lambda *a: outstanding)
        agent._heartbeat()
        outstanding.cancel()
        self.assertEqual([(e["log_level"].name, formatEvent(e)) for e in seen],
                         [("debug", "heartbeat cancelled: the session ended")])

    def test_refused(self):
        agent, seen = self._agent(lambda *a: fail(ApplicationError(
            "zwrm.error.not_authorized", "host h1 is not known")))
        agent._heartbeat()
        self.assertEqual([(e["log_level"].name, formatEvent(e)) for e in seen],
                         [("warn", "heartbeat failed: host h1 is not known")])

class RoleTests(TestCase):
    timeout = 60

    async def session(self, plane, authid, token):
        s = await connect(reactor, {"url": plane.url, "token": token, "authid": authid})
        self.addCleanup(lambda: ensureDeferred(close(s)))
        return s

    @d
    async def test_roles(self):
        plane, tmp = await start_plane(self)
        agent = make_agent(self, plane, os.path.join(tmp, "a1"))
        await agent.registered
        host_id, credential = agent.identity.host_id, agent.identity.credential
        op = await self.session(plane, "operator", plane.operator_token)
        hosts = await op.call("zwrm.host.list")
        self.assertEqual([h["id"] for h in hosts], [host_id])
        for proc in ("zwrm.agent.register", f"zwrm.agent.{host_id}.agent.info"):
            with self.assertRaises(ApplicationError) as e:
                await op.call(proc)
            self.assertEqual(e.exception.error, "wamp.error.not_authorized")
        ag = await self.session(plane, host_id, credential)
        with self.assertRaises(ApplicationError) as e:
            await ag.call("zwrm.host.list")
        self.assertEqual(e.exception.error, "wamp.error.not_authorized")
        with self.assertRaises(ApplicationError):
            await ag.register(lambda: 1, "zwrm.agent.h-other.machine.start")
        await ag.register(lambda: 1, f"zwrm.agent.{host_id}.test.extra")
        joining = await self.session(plane, "join", plane.join_token)
        with self.assertRaises(ApplicationError) as e:
            await joining.call("zwrm.agent.heartbeat")
        self.assertEqual(e.exception.error, "wamp.error.not_authorized")
        with self.assertRaises(CliError) as e:
            await connect(reactor, {"url": plane.url, "token": "x", "authid": "operator"})
        self.assertIn("rejected the token", e.exception.message)
        with self.assertRaises(CliError):
            await connect(reactor, {"url": plane.url, "token": credential, "authid": "h-other"})
        with self.assertRaises(ApplicationError) as e:
            await op.call("zwrm.host.status", "h-nobody")
        self.assertEqual(e.exception.error, "zwrm.error.not_found")


class StartFailureTests(TestCase):
    @d
    async def test_port_in_use_fails_started(self):
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        self.addCleanup(s.close)
        config = Config(listen=[f"tcp:{s.getsockname()[1]}:interface=127.0.0.1"],
                        data_dir=os.path.join(temp_dir(self), "cp"))
        plane = ControlPlane(reactor, config)
        plane.startService()
        self.addCleanup(plane.stopService)
        with self.assertRaises(Exception) as e:
            await plane.started
        self.assertIn("Address already in use", str(e.exception))
        self.assertFalse(plane.ready)
