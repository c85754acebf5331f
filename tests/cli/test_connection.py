"""
The CLI's connection, for real: https:// URLs and certificate checks against a control plane
listening with TLS, and a control plane process that is frozen or killed while a command
waits on it (issue 12 item 2, issue 14 item 4: the CLI never hangs).
"""

import argparse
import os
import signal
import time

from twisted.internet import endpoints, error, protocol, reactor, task
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm import pki
from zwrm.cli import client, main
from zwrm.cli.client import CliError, call, close, connect
from zwrm.control.service import ControlPlane
from zwrm.control.tap import Config
from zwrm.testing.processes import ControlPlaneProcess, poll, run_cli, temp_dir


def _established(port):
    """Whether some TCP connection to 127.0.0.1:C{port} is established (from /proc)."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and int(remote.split(":")[1], 16) == port:
                return True
    return False


class TLSTests(TestCase):
    """The CLI against an in-process control plane listening on TLS and plain TCP."""

    timeout = 60

    async def _plane(self):
        tmp = temp_dir(self)
        self.tmp = tmp
        config = Config(listen=["ssl:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"],
                        data_dir=os.path.join(tmp, "cp"))
        plane = ControlPlane(reactor, config)
        plane.startService()
        self.addCleanup(plane.stopService)
        await plane.started
        self.tls_port = plane.ports[0].getHost().port
        self.plain_port = plane.ports[1].getHost().port
        self.ca_file = os.path.join(config.data_dir, "pki", "ca.pem")
        with open(os.path.join(config.data_dir, "operator.token")) as f:
            self.token = f.read().strip()
        return plane

    async def _list(self, url, ca_file=None, timeout=20):
        settings = client.load_settings(
            url, {"ZWRM_TOKEN": self.token, **({"ZWRM_CA_FILE": ca_file} if ca_file else {})},
            "/nonexistent")
        session = await connect(reactor, dict(settings, timeout=timeout))
        try:
            return await call(session, "zwrm.host.list")
        finally:
            await close(session)

    async def _fails(self, coro):
        try:
            await coro
        except CliError as e:
            return e
        self.fail("no CliError")

    def test_https_url_and_certificates(self):
        return ensureDeferred(self._certificates())

    async def _certificates(self):
        self.plane = await self._plane()
        https = f"https://127.0.0.1:{self.tls_port}"
        self.assertEqual(await self._list(https, self.ca_file), [])
        self.assertEqual(await self._list(f"http://127.0.0.1:{self.plain_port}"), [])

        # a CA that did not issue the control plane's certificate
        other = os.path.join(self.tmp, "other-ca.pem")
        with open(other, "wb") as f:
            f.write(pki.CertificateAuthority.create().certificate_pem)
        e = await self._fails(self._list(https, other))
        self.assertEqual(e.code, client.EXIT_TLS)
        self.assertEqual(e.message, "the control plane's certificate is not trusted:"
                                    f" certificate verify failed (ca_file={other})")
        # no CA file: the platform's trust store does not know the cluster CA
        e = await self._fails(self._list(https))
        self.assertEqual(e.code, client.EXIT_TLS)
        self.assertIn("not trusted", e.message)
        self.assertIn("the platform's trust store", e.message)
        # the right CA, but a name the certificate is not for (its server certificate on
        # another loopback address)
        factory = protocol.Factory.forProtocol(protocol.Protocol)
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.2").listen(
            TLSMemoryBIOFactory(self.plane.pki.server_context(), False, factory))
        self.addCleanup(port.stopListening)
        e = await self._fails(self._list(f"https://127.0.0.2:{port.getHost().port}", self.ca_file))
        self.assertEqual(e.code, client.EXIT_TLS)
        self.assertIn("not for 127.0.0.2", e.message)

    def test_scheme_and_listener_mismatch(self):
        """https:// to the plain listener fails fast (it answers a ClientHello at once)."""
        return ensureDeferred(self._mismatch())

    async def _mismatch(self):
        await self._plane()
        start = time.monotonic()
        e = await self._fails(self._list(f"https://127.0.0.1:{self.plain_port}", self.ca_file))
        self.assertLess(time.monotonic() - start, 5)
        self.assertEqual(e.code, client.EXIT_TLS)
        self.assertIn("is it a TLS listener?", e.message)
        e = await self._fails(self._list(f"http://127.0.0.1:{self.tls_port}"))
        self.assertEqual(e.code, client.EXIT_UNREACHABLE)
        self.assertIn("closed the connection", e.message)
        self.assertIn("if it is a TLS listener, use https://", e.message)


class DropTests(TestCase):
    """A real control plane process frozen (SIGSTOP) or killed while the CLI waits on it."""

    timeout = 120

    async def _cp(self):
        tmp = temp_dir(self)
        cp = ControlPlaneProcess(reactor, os.path.join(tmp, "cp"))
        self.addCleanup(lambda: ensureDeferred(cp.stop()))
        await cp.start()
        return cp

    def test_pending_call_fails_when_the_control_plane_dies(self):
        return ensureDeferred(self._pending_call())

    async def _pending_call(self):
        cp = await self._cp()
        session = await connect(reactor, {"url": cp.url, "token": cp.operator_token,
                                          "authid": "operator", "timeout": 60})
        self.addCleanup(lambda: ensureDeferred(close(session)))
        self.assertEqual(await call(session, "zwrm.host.list"), [])
        cp.freeze()
        pending = ensureDeferred(call(session, "zwrm.host.list"))
        self.assertFalse(pending.called)
        start = time.monotonic()
        cp.signal(signal.SIGKILL)
        try:
            await pending
        except CliError as e:
            error = e
        else:
            self.fail("the call succeeded")
        # it failed because the connection dropped, not after the 60 s timeout
        self.assertLess(time.monotonic() - start, 10)
        self.assertEqual((error.code, error.message), (
            client.EXIT_UNREACHABLE, f"lost the connection to the control plane at {cp.url}"))
        # and a later call on the dead session fails at once the same way
        with self.assertRaises(CliError) as c:
            await call(session, "zwrm.host.list")
        self.assertEqual(c.exception.code, client.EXIT_UNREACHABLE)

    def test_command_processes(self):
        """
        `zwrm host list` as a process: against a frozen control plane it ends after its
        --timeout (exit 8); one waiting on a control plane that is then killed ends at once
        (exit 3); each with one line on stderr.
        """
        return ensureDeferred(self._processes())

    async def _processes(self):
        cp = await self._cp()
        cp.freeze()
        start = time.monotonic()
        code, out, err = await run_cli(reactor, ["--timeout", "2", "host", "list"], cp.url,
                                       cp.operator_token, timeout=30)
        self.assertEqual((code, len(err.strip().splitlines())), (client.EXIT_TIMEOUT, 1), err)
        self.assertIn("did not answer within 2 s", err)
        self.assertLess(time.monotonic() - start, 20)

        running = ensureDeferred(run_cli(reactor, ["host", "list"], cp.url, cp.operator_token,
                                         timeout=60))
        await poll(reactor, lambda: _established(cp.port), 20, 0.05, what="the CLI connected")
        start = time.monotonic()
        cp.signal(signal.SIGKILL)
        code, out, err = await running
        self.assertLess(time.monotonic() - start, 10)
        self.assertEqual((code, len(err.strip().splitlines())), (client.EXIT_UNREACHABLE, 1), err)
        self.assertIn("closed the connection", err)


class _ClosedWhileConnecting:
    """
    An endpoint whose connect fails as Twisted fails one whose socket closes before it is set
    up (C{ConnectError} carrying the L{Failure} that closed it): not made to happen on
    loopback, whose connects complete at once.
    """

    def connect(self, factory):
        return fail(error.ConnectError(string=Failure(error.ConnectionDone())))


class ConnectFailureTextTests(SynchronousTestCase):
    def test_closed_while_connecting(self):
        """
        The CLI's line for a connection closed while it was being set up says so in words: it
        was the repr of a Failure, with "Traceback" in it.
        """
        self.patch(client, "client_endpoint", lambda *a, **kw: _ClosedWhileConnecting())
        d = ensureDeferred(connect(reactor, {"url": "ws://127.0.0.1:1/ws", "token": "t",
                                             "authid": "operator", "timeout": 5}))
        e = self.failureResultOf(d, CliError).value
        self.assertEqual((e.code, e.message), (
            client.EXIT_UNREACHABLE, "cannot reach the control plane at ws://127.0.0.1:1/ws:"
                                     " the connection was closed before it was set up"))


class Args:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class ShuttingClock(task.Clock):
    """A Clock with the reactor's shutdown triggers, which L{shut_down} fires."""

    def __init__(self):
        task.Clock.__init__(self)
        self.triggers = {}
        self._next = 0

    def addSystemEventTrigger(self, phase, event, f, *args, **kw):
        self._next += 1
        self.triggers[self._next] = (phase, event, f, args, kw)
        return self._next

    def removeSystemEventTrigger(self, trigger):
        del self.triggers[trigger]

    def shut_down(self):
        for phase in ("before", "during", "after"):
            for key, (p, event, f, args, kw) in list(self.triggers.items()):
                if (p, event) == (phase, "shutdown"):
                    del self.triggers[key]
                    f(*args, **kw)


class SecondsTests(SynchronousTestCase):
    def test_seconds_that_are_no_number_are_refused(self):
        """
        nan and inf (and what overflows to it) as --timeout, --wait or a configured timeout:
        one line and exit 2 (a flag) or 5 (a setting). nan went on to the whole command's
        timer, whose assertion printed a traceback.
        """
        parser = main.build_parser()
        out = []
        self.patch(argparse._sys, "stderr", Args(write=out.append, flush=lambda: None))
        for argv, said in [
            (["--timeout", "nan", "host", "list"], "zwrm: argument --timeout: 'nan': give a"
                                                   " positive number of seconds"),
            (["--timeout", "1e999", "host", "list"], "zwrm: argument --timeout: '1e999': give"),
            (["deploy", "web", "--wait", "nan"], "zwrm: argument --wait: 'nan' is not seconds"),
            (["deploy", "web", "--wait", "inf"], "zwrm: argument --wait: 'inf' is not seconds"),
            (["deploy", "web", "--wait", "-5"], "zwrm: argument --wait: '-5' is not seconds"),
        ]:
            del out[:]
            with self.assertRaises(SystemExit) as e:
                main.parse_args(parser, argv)
            self.assertEqual(e.exception.code, client.EXIT_USAGE)
            self.assertTrue("".join(out).startswith(said), (argv, out))
        self.assertEqual(main.parse_args(parser, ["deploy", "web", "--wait", "0"]).wait, 0)
        self.patch(client, "_flags", {})
        for value in ("nan", "inf", "-inf"):
            with self.assertRaises(CliError) as e:
                client.load_settings(None, {"ZWRM_TOKEN": "t", "ZWRM_TIMEOUT": value},
                                     "/nonexistent")
            self.assertEqual((e.exception.code, e.exception.message), (
                client.EXIT_CONFIG, f"timeout {float(value)!r} (from $ZWRM_TIMEOUT) must be a"
                                    " positive number of seconds"))
            # (the whole command's limit meanwhile: the default, until the setting is read)
            self.assertEqual(client.configured_timeout({"ZWRM_TIMEOUT": value}),
                             client.DEFAULT_TIMEOUT)


class OverallTimeoutTests(SynchronousTestCase):
    """The whole command's limit (L{main.budget}), on a Clock."""

    def setUp(self):
        self.patch(client, "configured_timeout", lambda environ=None: 30.0)
        self.err = []
        self.patch(main.sys, "stderr", Args(write=self.err.append))

    @staticmethod
    async def stuck(reactor, args):
        await Deferred()

    def run_command(self, args):
        clock = ShuttingClock()
        d = ensureDeferred(main._run(clock, args))
        return clock, d

    def test_a_stuck_command_ends_after_its_timeout(self):
        args = Args(func=self.stuck, timeout=None)
        clock, d = self.run_command(args)
        clock.advance(30.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        f = self.failureResultOf(d, SystemExit)
        self.assertEqual(f.value.code, client.EXIT_TIMEOUT)
        self.assertEqual(self.err, ["zwrm: no answer within 31 s (--timeout)\n"])

    def test_interrupted_it_says_nothing_of_the_lost_connection(self):
        """
        Ctrl-C or SIGTERM: the reactor shuts down, the connection ends, and the command's
        CliError about it is not written (its exit code stays); otherwise it is, and the
        shutdown trigger is let go.
        """
        lost = Deferred()

        async def following(reactor, args):
            await lost

        clock, d = self.run_command(Args(func=following, timeout=None))
        clock.shut_down()
        lost.errback(CliError("lost the connection to the control plane", 3))
        self.assertEqual(self.failureResultOf(d, SystemExit).value.code, 3)
        self.assertEqual((self.err, clock.triggers), ([], {}))
        lost = Deferred()
        clock, d = self.run_command(Args(func=following, timeout=None))
        lost.errback(CliError("lost the connection to the control plane", 3))
        self.assertEqual(self.failureResultOf(d, SystemExit).value.code, 3)
        self.assertEqual(self.err, ["zwrm: lost the connection to the control plane\n"])
        self.assertEqual(clock.triggers, {})

    def test_wait_extends_it(self):
        args = Args(func=self.stuck, timeout=None, wait=100.0)
        clock, d = self.run_command(args)
        clock.advance(130)
        self.assertNoResult(d)
        clock.advance(2)
        self.assertEqual(self.failureResultOf(d, SystemExit).value.code, client.EXIT_TIMEOUT)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_budgets(self):
        def host_drain():
            pass

        def host_drain_status():
            pass

        self.assertEqual(main.budget(Args(func=host_drain, detach=False, dry_run=False), 30), None)
        self.assertEqual(main.budget(Args(func=host_drain, detach=True, dry_run=False), 30), 31)
        self.assertEqual(main.budget(Args(func=host_drain_status, watch=True), 30), None)
        self.assertEqual(main.budget(Args(func=host_drain_status, watch=False), 30), 31)
        self.assertEqual(main.budget(Args(func=print, images_command="push"), 30), None)
        self.assertEqual(main.budget(Args(func=print, wait=5.0), 30), 36)

    def test_flag_wins(self):
        parser = main.build_parser()
        args = parser.parse_args(["--timeout", "7", "host", "list"])
        self.assertEqual(args.timeout, 7.0)
        self.patch(client, "_flags", {})
        client.set_flags(timeout=args.timeout)
        s = client.load_settings(None, {"ZWRM_TOKEN": "t", "ZWRM_TIMEOUT": "9"}, "/nonexistent")
        self.assertEqual(s["timeout"], 7.0)
        client.set_flags()
        s = client.load_settings(None, {"ZWRM_TOKEN": "t", "ZWRM_TIMEOUT": "9"}, "/nonexistent")
        self.assertEqual(s["timeout"], 9.0)
        # deploy --wait 100: each request may take the timeout plus the wait
        client.set_flags(timeout=7.0, extra=100.0)
        s = client.load_settings(None, {"ZWRM_TOKEN": "t"}, "/nonexistent")
        self.assertEqual(s["timeout"], 107.0)
        client.set_flags()
        s = client.load_settings(None, {"ZWRM_TOKEN": "t"}, "/nonexistent")
        self.assertEqual(s["timeout"], client.DEFAULT_TIMEOUT)
