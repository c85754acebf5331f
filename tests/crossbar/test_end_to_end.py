"""
zwrm behind Crossbar.io, end to end, every part a real process: Crossbar.io 26.10.1 (in its
own cached virtualenv, tests/crossbar/router.py) running the sample configuration of
docs/wamp-clients.md as it is written (only its ports changed); a C{zwrm-control} with
C{router_url} (no WAMP listener of its own: HTTP only, for the registry); two
C{zwrm-agent}s and the C{zwrm} CLI connected to Crossbar only.

The acceptance path through it: join, host list, image push and list (the CLI learns the
registry's address from C{zwrm.cluster.info}), deploy with a volume (the agent pulls the
image from the registry_url it learnt: Crossbar's port serves no registry), a host going
offline (SIGSTOP) and coming back (its session ended by C{wamp.session.kill_by_authid}
through Crossbar), an agent stopped (its executor deregistered at once through
C{wamp.session.on_leave}) and started again, a restart of the control plane with its registry on another port (the
agents' Crossbar sessions outlive it: it ends them once so that they register again, and they
learn the new registry_url), a drain that moves the machine and its volume to the other host
(whose agent pulls the image from the new address).
"""

import json
import os
import socket

import pytest
import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.crossbar.router import CONTROL_TICKET_ENV, configure, ensure_crossbar, sample_config
from zwrm.testing.processes import (
    AgentProcess,
    ControlPlaneProcess,
    ZwrmProcess,
    _Collect,
    free_port,
    poll,
    run_cli,
    temp_dir,
)

TICKET = "the-control-components-ticket"


class CrossbarProcess(ZwrmProcess):
    """C{crossbar start} with the docs' configuration on two free loopback ports."""

    #: How Crossbar says that a port it was given is taken.
    CANNOT_LISTEN = "Cannot listen on transport endpoint"

    def __init__(self, reactor, data_dir, executable):
        ZwrmProcess.__init__(self, reactor, data_dir)
        self.executable = executable
        self.started_once = False
        self.choose_ports()

    def choose_ports(self):
        """Free loopback ports for its transports (and their URLs), each its own."""
        self.client_port, self.control_port = distinct_ports(2)
        self.client_url = f"ws://127.0.0.1:{self.client_port}/ws"
        self.control_url = f"ws://127.0.0.1:{self.control_port}/ws"

    def config(self):
        """The configuration it runs: the docs' sample with its ports changed."""
        return configure(sample_config(), self.client_port, self.control_port)

    def ports(self):
        return (self.client_port, self.control_port)

    def argv(self):
        cbdir = os.path.join(self.data_dir, ".crossbar")
        os.makedirs(cbdir, exist_ok=True)
        with open(os.path.join(cbdir, "config.json"), "w") as f:
            json.dump(self.config(), f)
        return [self.executable, "start", "--cbdir", cbdir, "--loglevel", "info"]

    def spawn(self):
        os.makedirs(self.data_dir, exist_ok=True)
        self._proto = _Collect(self.log_path)
        argv = self.argv()
        env = dict(os.environ, **{CONTROL_TICKET_ENV: TICKET})
        self._transport = self.reactor.spawnProcess(self._proto, argv[0], argv, env=env,
                                                    path=self.data_dir)

    async def start(self, timeout=240):
        """
        Start and wait (Crossbar starts slowly on a loaded machine) until its ports listen.
        A first start whose port another process took between L{free_port} and Crossbar's
        bind (tests run side by side) is made again on other ports, at most twice.
        """
        for attempt in range(3):
            self.spawn()
            try:
                await self._listening(timeout)
            except RuntimeError as e:
                if self.started_once or attempt == 2 or self.CANNOT_LISTEN not in str(e):
                    raise
                self.choose_ports()
                continue
            self.started_once = True
            return self

    async def _listening(self, timeout):
        for port in self.ports():
            async def listening(port=port):
                if not self.running:
                    raise RuntimeError(f"crossbar exited:\n{self.log_tail()}")
                return await _connects(port)

            await poll(self.reactor, listening, timeout, interval=0.5,
                       what=f"crossbar listening on {port}")


def distinct_ports(n, taken=()):
    """C{n} free loopback ports, none twice and none of C{taken}."""
    ports = []
    while len(ports) < n:
        port = free_port()
        if port not in ports and port not in taken:
            ports.append(port)
    return ports


def registrations(agent):
    """How many times C{agent} (an L{AgentProcess}) has registered, from its log."""
    try:
        with open(agent.log_path, errors="replace") as f:
            return f.read().count("registered as host")
    except OSError:
        return 0


async def _connects(port):
    from twisted.internet.endpoints import TCP4ClientEndpoint

    try:
        p = await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2).connect(
            protocol.Factory.forProtocol(protocol.Protocol))
    except Exception:
        return False
    p.transport.loseConnection()
    return True


class AcceptancePath:
    """
    Steps of the acceptance path through a router, shared by the plain and the TLS suites:
    C{self.url}, C{self.token} and C{self.cli_env} (more environment for the CLI) are set
    by the scenario.
    """

    cli_env = None

    async def cli(self, *args, timeout=60, ok=(0,)):
        code, out, err = await run_cli(reactor, list(args), self.url, self.token,
                                       timeout=timeout, env=self.cli_env)
        self.assertIn(code, ok, f"zwrm {' '.join(args)} failed ({code}): {out} {err}")
        self.assertNotIn("Traceback", err)
        return out

    async def hosts(self):
        return {h["id"]: h for h in json.loads(await self.cli("host", "list", "--json"))}

    async def wait_ready(self, host_ids, what):
        async def all_ready():
            hosts = await self.hosts()
            return sorted(hosts) == sorted(host_ids) and all(
                h["state"] == "ready" for h in hosts.values())

        await poll(reactor, all_ready, 90, interval=1.0, what=what)

    async def push_demo(self, img):
        """Image push and list (bulk bytes to registry_url, learnt from zwrm.cluster.info)."""
        await self.cli("images", "push", "demo:1", "--kernel", img.kernel, "--initrd",
                       img.initrd, "--cmdline", img.cmdline, "--port", "8080", "-q",
                       timeout=180)
        self.assertIn("demo:1", await self.cli("images", "list"))

    async def deploy_with_volume(self):
        """
        Deploy one replica with a volume (the agent pulls the image from registry_url) and
        write to the volume.

        @return: C{(machine, known bytes written)}.
        """
        await self.cli("apps", "create", "web")
        app = json.loads(await self.cli(
            "deploy", "web", "--image", "demo:1", "--replicas", "1", "--memory", "256",
            "--port", "8080", "--health-http", "/", "--health-grace", "240",
            "--volume", "data:16:/data", "--wait", "300", "--json", timeout=330))
        [m] = app["machines"]
        self.assertEqual((m["state"], m["health"]), ("running", "passing"))
        known = b"written before the drain " * 8
        r = await treq.post(f"http://127.0.0.1:{m['host_port']}/cgi-bin/write?index.txt", known,
                            persistent=False)
        self.assertEqual(r.code, 200, await r.text())
        return m, known

    async def drain_and_check(self, src, dst, known, cp):
        """A drain: the machine and its volume move from C{src} to C{dst}."""
        out = await self.cli("host", "drain", src, "--min-healthy", "3s",
                             "--healthy-deadline", "300s", "--json", timeout=500)
        status = json.loads(out)
        self.assertEqual(status["state"], "completed", status)
        app = json.loads(await self.cli("status", "web", "--json"))
        [new] = app["machines"]
        self.assertEqual((new["host_id"], new["state"], new["health"]),
                         (dst, "running", "passing"))
        page = await (await treq.get(f"http://127.0.0.1:{new['host_port']}/",
                                     persistent=False)).text()
        self.assertIn(known.decode(), page)
        hosts = await self.hosts()
        self.assertEqual((hosts[src]["state"], hosts[src]["machines"]), ("drained", 0))
        self.assertNotIn("Traceback", cp.log_tail(2000))


@pytest.mark.qemu
@pytest.mark.multihost
class BehindCrossbarTests(AcceptancePath, TestCase):
    timeout = 900

    def test_acceptance_path(self):
        return defer.ensureDeferred(self._scenario())

    async def _scenario(self):
        from zwrm.testing import image

        executable = await deferToThread(ensure_crossbar)
        img = await deferToThread(image.build)
        tmp = temp_dir(self)

        cb = CrossbarProcess(reactor, f"{tmp}/crossbar", executable)
        self.addCleanup(cb.stop)
        await cb.start()

        http_port = free_port()
        with open(f"{tmp}/router.ticket", "w") as f:
            f.write(TICKET + "\n")

        def write_config(http_port):
            with open(f"{tmp}/control.toml", "w") as f:
                f.write(f'[control]\nrouter_url = "{cb.control_url}"\n'
                        f'router_ticket_file = "{tmp}/router.ticket"\n'
                        f'registry_url = "http://127.0.0.1:{http_port}"\n')

        write_config(http_port)
        cp = ControlPlaneProcess(reactor, f"{tmp}/cp", port=http_port, heartbeat_interval=1.0,
                                 check_interval=1.0, offline_after=4.0, grace=4.0,
                                 extra_args=["--config", f"{tmp}/control.toml"])
        self.addCleanup(cp.stop)
        await cp.start(timeout=120)
        with open(f"{tmp}/cp/control.url") as f:
            self.assertEqual(f.read().split(), [f"http://127.0.0.1:{http_port}"])
        # no WAMP here: the HTTP listener has no /ws
        r = await treq.get(f"http://127.0.0.1:{http_port}/ws", persistent=False)
        self.assertEqual(r.code, 404)
        await r.content()
        self.url, self.token = cb.client_url, cp.operator_token

        # join: two agents that know only Crossbar's URL
        agents = [AgentProcess(reactor, f"{tmp}/a{i}", cb.client_url, cp.join_token,
                               name=f"a{i}", extra_args=["--accel", "tcg"]) for i in (1, 2)]
        for a in agents:
            self.addCleanup(a.stop)
            await a.start()
        by_id = {a.host_id: a for a in agents}
        await self.wait_ready(by_id, "both agents ready via Crossbar")

        await self.push_demo(img)
        m, known = await self.deploy_with_volume()
        src = m["host_id"]
        dst = next(h for h in by_id if h != src)

        # a host goes offline (frozen) and comes back; its session is ended through Crossbar
        by_id[dst].freeze()
        try:
            async def offline():
                return (await self.hosts())[dst]["state"] == "offline"

            await poll(reactor, offline, 60, interval=1.0, what=f"{dst} offline")
        finally:
            by_id[dst].thaw()

        async def back():
            return (await self.hosts())[dst]["state"] == "ready"

        await poll(reactor, back, 60, interval=1.0, what=f"{dst} ready again")
        self.assertIn("wamp.close.killed", by_id[dst].log_tail(400))

        # its agent stopped: Crossbar's wamp.session.on_leave deregisters its executor before
        # the host is offline (4 s here); started again, it registers again
        await by_id[dst].stop()

        async def deregistered():
            h = (await self.hosts())[dst]
            return h["executor"] is False and h["state"] == "ready"

        await poll(reactor, deregistered, 10, interval=0.2,
                   what=f"{dst}'s executor deregistered while it is still ready")
        await by_id[dst].start()

        async def registered():
            return (await self.hosts())[dst]["executor"] is True

        await poll(reactor, registered, 60, interval=0.5, what=f"{dst} registered again")
        self.assertNotIn("follow sessions ending", cp.log_tail(400))

        # the control plane restarts, with its registry on another port: the agents'
        # sessions on Crossbar outlive it, so it ends them once (wamp.session.kill_by_authrole)
        # and they register again, learning the new registry_url; the drain below calls both
        # executors, and the replacement's host pulls the image from the new address
        before = {h: registrations(a) for h, a in by_id.items()}
        await cp.stop()
        http_port = free_port()
        write_config(http_port)
        cp = ControlPlaneProcess(reactor, f"{tmp}/cp", port=http_port, heartbeat_interval=1.0,
                                 check_interval=1.0, offline_after=4.0, grace=4.0,
                                 extra_args=["--config", f"{tmp}/control.toml"])
        self.addCleanup(cp.stop)
        await cp.start(timeout=120)
        await poll(reactor, lambda: all(registrations(a) > before[h] for h, a in by_id.items()),
                   60, what="both agents registered again after the control plane's restart")

        await self.drain_and_check(src, dst, known, cp)


class CrossbarHarnessTests(TestCase):
    """The harness's Crossbar process (L{CrossbarProcess})."""

    timeout = 300

    async def test_a_port_taken_before_crossbar_binds_it_is_chosen_again(self):
        """
        Another process takes a port between L{free_port} and Crossbar's bind (ci14: "Cannot
        listen on transport endpoint"): the first start is made again on other ports.
        """
        executable = await deferToThread(ensure_crossbar)
        cb = CrossbarProcess(reactor, f"{temp_dir(self)}/crossbar", executable)
        self.addCleanup(cb.stop)
        taken = socket.socket()
        taken.bind(("127.0.0.1", cb.client_port))
        taken.listen(1)
        self.addCleanup(taken.close)
        first = cb.client_port
        await cb.start()
        self.assertNotEqual(cb.client_port, first)
        self.assertEqual(cb.client_url, f"ws://127.0.0.1:{cb.client_port}/ws")
        self.assertTrue(await _connects(cb.client_port))
