"""
The audit trail (L{zwrm.control.audit}): which calls are stored, how their arguments are
redacted, and, over real WAMP sessions to a real control plane, that operators' actions are
stored with actor and result while reads, viewers and agents leave no entry.
"""

import time

from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.request import Registration
from autobahn.wamp.types import CallDetails
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.agent.test_membership import start_plane
from tests.cli.test_cli import d
from zwrm import errors
from zwrm.cli import client
from zwrm.control import audit
from zwrm.control.audit import REDACTED, AuditLog, audited, redact
from zwrm.control.store import Store


class ClassifyTests(SynchronousTestCase):
    def test_state_changing_operator_calls_are_audited(self):
        for uri in ("zwrm.app.deploy", "zwrm.app.scale", "zwrm.app.destroy", "zwrm.host.drain",
                    "zwrm.host.undrain", "zwrm.host.activate", "zwrm.host.reset",
                    "zwrm.image.delete", "zwrm.token.create", "zwrm.token.revoke",
                    "zwrm.cert.add", "zwrm.cert.remove", "zwrm.volume.destroy",
                    "zwrm.machine.destroy", "zwrm.machine.console_write"):
            self.assertTrue(audited(uri), uri)

    def test_reads_and_agents_are_not(self):
        for uri in ("zwrm.host.list", "zwrm.app.status", "zwrm.app.plan", "zwrm.app.history",
                    "zwrm.machine.logs", "zwrm.token.list", "zwrm.audit.list",
                    "zwrm.event.history", "zwrm.agent.report", "zwrm.agent.heartbeat",
                    "zwrm.crossbar.authenticate", "zwrm.cluster.info"):
            self.assertFalse(audited(uri), uri)


class RedactTests(SynchronousTestCase):
    def test_secret_arguments(self):
        """A schema-secret argument is never stored; positional ones get their names."""
        out = redact("zwrm.cert.add", ["www.example.com", "CERT"], {"key": "PRIVATE KEY"})
        self.assertEqual(out, {"domain": "www.example.com", "cert": "CERT", "key": REDACTED})
        self.assertEqual(redact("zwrm.token.revoke", ["zwrm1.abc123.s3cret.ff"], {}),
                         {"token_id": REDACTED})
        self.assertEqual(redact("zwrm.token.revoke", ["abc123"], {}), {"token_id": "abc123"})

    def test_spec_secrets_and_keystrokes(self):
        spec = {"image": "web:1", "cloud_init": {"user_data": "password: x", "env": {"A": "b"}}}
        out = redact("zwrm.app.deploy", ["web", spec], {})
        self.assertEqual(out["spec"]["image"], "web:1")
        self.assertNotIn("password", repr(out))
        self.assertEqual(set(out["spec"]["cloud_init"]["user_data"]), {"sha256", "size"})
        self.assertEqual(redact("zwrm.machine.console_write", ["m1", "cGFzc3dvcmQK"], {}),
                         {"machine_id": "m1", "data": {"size": 12}})

    def test_long_strings_cut(self):
        out = redact("zwrm.cert.add", ["d", "x" * 5000, "k"], {})
        self.assertLess(len(out["cert"]), 600)
        self.assertIn("5000 characters", out["cert"])


class LogTests(TestCase):
    async def _log(self, **kw):
        clock = Clock()
        clock.advance(time.time())
        store = Store(reactor, ":memory:", now=clock.seconds)
        await store.start()
        self.addCleanup(store.stop)
        return clock, AuditLog(clock, store, **kw)

    @d
    async def test_list_filters_and_prune(self):
        clock, log = await self._log(max_entries=3, max_age=100)
        for i in range(5):
            await log.record("operator", "operator", "zwrm.app.scale", {"replicas": i}, "ok")
            clock.advance(10)
        rows = await log.list()
        self.assertEqual([r["args"]["replicas"] for r in rows], [0, 1, 2, 3, 4])
        self.assertEqual([r["args"]["replicas"] for r in await log.list(limit=2)], [3, 4])
        self.assertEqual(len(await log.list(since=clock.seconds() - 25)), 2)
        self.assertEqual(await log.list(uri="zwrm.app.deploy"), [])
        self.assertEqual(await log.prune(), 2)  # beyond the newest 3
        clock.advance(75)  # the entry of replicas=2 is now 105 s old
        self.assertEqual(await log.prune(), 1)
        self.assertEqual([r["args"]["replicas"] for r in await log.list()], [3, 4])


    @d
    async def test_an_entry_the_store_cannot_take_is_one_error_line(self):
        """
        The call is answered; the audit entry that a full disk refused is logged as one line
        (the store's sentence), not as a fault with a traceback. A bug is still a fault.
        """
        from twisted.internet.defer import fail
        from twisted.logger import Logger

        _, log = await self._log()
        seen = []
        log.log = Logger(observer=seen.append)
        wrapped, opts = log.wrap("zwrm.app.scale", lambda app, replicas: {"replicas": replicas},
                                 None)
        details = CallDetails(Registration(None, 1, "zwrm.app.scale", None), caller=1,
                              caller_authid="operator", caller_authrole="operator")
        log.record = lambda *a: fail(errors.ResourceExhausted(
            "the control plane's disk is full: its database (db) cannot grow"))
        self.assertEqual(await wrapped("web", 3, **{opts.details_arg: details}),
                         {"replicas": 3})
        self.assertEqual([(e["log_level"].name, "log_failure" in e) for e in seen],
                         [("error", False)])
        self.assertEqual(formatEvent(seen[0]), "storing the audit entry of zwrm.app.scale:"
                         " the control plane's disk is full: its database (db) cannot grow")
        seen.clear()
        log.record = lambda *a: fail(KeyError("a bug"))
        await wrapped("web", 4, **{opts.details_arg: details})
        self.assertEqual([(e["log_level"].name, "log_failure" in e) for e in seen],
                         [("critical", True)])

    @d
    async def test_procedure_with_its_own_details(self):
        """
        A procedure that takes the call's details itself (zwrm.machine.console) gets them,
        keeps its register options, and its call is stored; a cancelled call as cancelled.
        """
        from autobahn.wamp.types import CallDetails, RegisterOptions
        from twisted.internet import defer

        _, log = await self._log()
        options = RegisterOptions(details_arg="details")
        seen = []

        def console(machine_id, details=None):
            seen.append(details)
            return defer.Deferred()  # attached until the caller detaches

        wrapped, opts = log.wrap("zwrm.machine.console", console, options)
        self.assertIs(opts, options)
        from autobahn.wamp.request import Registration

        details = CallDetails(Registration(None, 1, "zwrm.machine.console", None), caller=1,
                              caller_authid="operator", caller_authrole="operator")
        d = wrapped("m-1", details=details)
        self.assertEqual(seen, [details])
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        rows = await log.list()
        self.assertEqual([(r["procedure"], r["args"], r["result"]) for r in rows],
                         [("zwrm.machine.console", {"machine_id": "m-1"}, "cancelled")])


class SessionTests(TestCase):
    """Real control plane, real sockets, sessions of each role."""

    timeout = 60

    @d
    async def test_operator_actions_stored_reads_and_viewers_not(self):
        plane, _ = await start_plane(self)
        op = await client.connect(reactor, {"url": plane.url, "token": plane.operator_token,
                                            "authid": "operator", "timeout": 10})
        self.addCleanup(client.close, op)
        await plane.store.add_token("viewer-test", "viewer", "viewer-secret")
        viewer = await client.connect(reactor, {"url": plane.url, "token": "viewer-secret",
                                                "authid": "viewer", "timeout": 10})
        self.addCleanup(client.close, viewer)

        await op.call("zwrm.app.create", "web")
        with self.assertRaises(ApplicationError):
            await op.call("zwrm.app.create", "web")  # taken: refused, still stored
        with self.assertRaises(ApplicationError):
            await op.call("zwrm.cert.add", "www.example.com", "not a certificate",
                          key="-----BEGIN PRIVATE KEY----- secret")
        with self.assertRaises(ApplicationError):
            await op.call("zwrm.app.scale", "Bad Name!", 1)  # refused by the schema
        await op.call("zwrm.host.list")  # a read: not stored
        await viewer.call("zwrm.host.list")
        with self.assertRaises(ApplicationError):
            await viewer.call("zwrm.host.drain", "h_1")  # refused by the router: never arrives

        entries = await op.call("zwrm.audit.list")
        self.assertEqual([(e["procedure"], e["result"]) for e in entries], [
            ("zwrm.app.create", "ok"),
            ("zwrm.app.create", "zwrm.error.conflict"),
            ("zwrm.cert.add", "zwrm.error.invalid_argument"),
            ("zwrm.app.scale", "zwrm.error.invalid_argument"),
        ])
        first = entries[0]
        self.assertEqual((first["authid"], first["role"], first["args"]),
                         ("operator", "operator", {"name": "web"}))
        self.assertLessEqual(abs(first["ts"] - time.time()), 60)
        self.assertIn("exists", entries[1]["message"])
        self.assertEqual(entries[2]["args"]["key"], REDACTED)
        self.assertNotIn("secret", repr(entries))
        # filters, and the audit trail is for operators only
        self.assertEqual(len(await op.call("zwrm.audit.list", uri="zwrm.cert.add")), 1)
        with self.assertRaises(ApplicationError) as c:
            await viewer.call("zwrm.audit.list")
        self.assertEqual(c.exception.error, "wamp.error.not_authorized")

    def test_unaudited_calls_pass_through(self):
        """Reads are registered as they are; a call by no audited role runs as it is."""
        sentinel = object()

        def fn():
            return sentinel

        self.assertEqual(AuditLog(Clock(), None).wrap("zwrm.host.list", fn, None), (fn, None))
        wrapped, options = AuditLog(Clock(), None).wrap("zwrm.app.create", fn, None)
        self.assertEqual(options.details_arg, audit._DETAILS_ARG)
        # a call whose details name no audited role runs as it is, storing nothing
        self.assertIs(wrapped(**{audit._DETAILS_ARG: None}), sentinel)


class ExternalRouterTests(SynchronousTestCase):
    def test_session_on_an_external_router_audits(self):
        """The control component's session on Crossbar.io takes the AuditAPI's log."""
        from zwrm.control.audit import AuditAPI
        from zwrm.control.crossbar import RouterControlSession

        log = AuditLog(Clock(), None)
        session = RouterControlSession([object(), AuditAPI(log)], "zwrm", "control", "t",
                                       lambda s: None)
        self.assertIs(session.audit, log)
        self.assertIsNone(RouterControlSession([], "zwrm", "control", "t", None).audit)
