"""
Arguments of the control plane's WAMP procedures are checked at the boundary, in one place
(L{zwrm.control.schema}, applied by L{zwrm.control.api.ControlSession}): the schema types,
that every registered procedure has a schema matching its signature, the generated
docs/wamp-procedures.md, and a fuzz test that calls every procedure over a real WAMP session
(real sockets, real control plane) with wrong counts, names, types and sizes and expects
C{zwrm.error.invalid_argument} naming the argument every time, and no traceback in the log.
"""

import inspect
import os

from autobahn.twisted.wamp import ApplicationSession
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.serializer import MsgPackSerializer
from autobahn.wamp.types import ComponentConfig
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zwrm import errors
from zwrm.control import schema
from zwrm.control.api import procedures_of
from zwrm.control.roles import roles
from zwrm.control.service import ControlPlane
from zwrm.control.tap import Config
from zwrm.testing.processes import temp_dir
from zwrm.wamp.auth import Principal, RoleBasedAuthorizer
from zwrm.wamp.transport import WampWebSocketClientFactory, WampWebSocketClientProtocol

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "wamp-procedures.md")


class TypeTests(SynchronousTestCase):
    def refused(self, uri, args=(), kwargs=None, argument=None, words=None):
        with self.assertRaises(errors.InvalidArgument) as c:
            schema.schema(uri).check(tuple(args), dict(kwargs or {}))
        if argument is not None:
            self.assertEqual(c.exception.kwargs.get("argument"), argument, c.exception.message)
        if words is not None:
            self.assertIn(words, c.exception.message)
        self.assertLess(len(c.exception.message), 400)
        return c.exception

    def test_counts_and_names(self):
        self.refused("zwrm.app.scale", ["a", 1, 2], words="takes at most 2 arguments")
        self.refused("zwrm.app.scale", ["a"], argument="replicas", words="needs replicas")
        self.refused("zwrm.app.scale", ["a", 1], {"color": 1}, argument="color",
                     words="has no argument 'color'")
        self.refused("zwrm.app.scale", ["a", 1], {"name": "b"}, argument="name", words="twice")
        self.refused("zwrm.host.list", ["x"], words="takes at most 0 arguments")
        self.refused("zwrm.host.list", [], {"x" * 1000: 1}, words="(a long name)")
        schema.schema("zwrm.app.scale").check(("a",), {"replicas": 3})

    def test_types_and_sizes(self):
        self.refused("zwrm.host.status", [["h1"]], argument="host_id", words="not ['h1']")
        self.refused("zwrm.host.status", ["h" * 129], argument="host_id",
                     words="at most 128 characters, not 129")
        self.refused("zwrm.host.status", ["h 1"], argument="host_id")
        self.refused("zwrm.image.info", [42], argument="ref")
        e = self.refused("zwrm.app.create", ["a" * 100_000], argument="name")
        self.assertNotIn("aaaa" * 20, e.message)
        self.refused("zwrm.app.scale", ["a", True], argument="replicas")
        self.refused("zwrm.app.scale", ["a", 1.5], argument="replicas")
        self.refused("zwrm.app.scale", ["a", 1001], argument="replicas")
        self.refused("zwrm.app.destroy", ["a", "yes"], argument="volumes")
        self.refused("zwrm.token.create", [float("inf")], argument="ttl")
        self.refused("zwrm.token.create", [float("nan")], argument="ttl")
        deep = []
        for _ in range(100):
            deep = [deep]
        self.refused("zwrm.app.deploy", ["a", {"image": deep}], argument="spec", words="deeper")
        self.refused("zwrm.app.deploy", ["a", {"x": list(range(10_000))}], argument="spec")
        self.refused("zwrm.machine.logs", ["m-1", 2 * 1024 * 1024], argument="max_bytes")

    def test_secrets_not_repeated(self):
        secret = "zwrm1.abcdef.s3cr3t s3cr3t.ff"
        e = self.refused("zwrm.token.revoke", [secret], argument="token_id")
        self.assertNotIn("s3cr3t", e.message)
        e = self.refused("zwrm.agent.join", ["h1", {}, None, ["s3cr3t"]], argument="credential")
        self.assertNotIn("s3cr3t", e.message)

    def test_agent_reports_bounded(self):
        """An agent's capacity is within what a host can have; its lists are bounded."""
        facts = {"name": "w1", "vcpus": 8, "memory_mb": 1024, "disk_mb": 10,
                 "labels": {"disk": "ssd"}, "machines": [{"id": "m-1", "state": "running"}]}
        schema.schema("zwrm.agent.register").check((facts,), {})
        schema.schema("zwrm.agent.join").check(("h-1", facts), {"csr": None})
        for key, value in (("vcpus", 10 ** 9), ("vcpus", 4097), ("memory_mb", 64 * 2 ** 20 + 1),
                           ("disk_mb", 2 ** 40 + 1), ("vcpus", -1), ("vcpus", "8")):
            e = self.refused("zwrm.agent.register", [dict(facts, **{key: value})],
                             argument="facts")
            self.assertIn(f"facts.{key}", e.message)
        schema.schema("zwrm.agent.register").check((dict(facts, vcpus=4096),), {})
        self.refused("zwrm.agent.register", [dict(facts, labels={str(i): "x" for i in range(65)})],
                     argument="facts", words="at most 64 entries")
        self.refused("zwrm.agent.register",
                     [dict(facts, machines=[{"id": "m"}] * (schema.MAX_MACHINES_PER_HOST + 1))],
                     argument="facts")
        self.refused("zwrm.agent.report", [[{"id": ["m-1"], "state": "running"}]],
                     argument="report", words="report[0].id")
        self.refused("zwrm.agent.report", [{"kind": "machine", "state": "running"}],
                     argument="report", words="needs 'machine_id'")
        self.refused("zwrm.agent.heartbeat", [{"image_cache": {"size": "x" * 5000}}],
                     argument="stats")
        schema.schema("zwrm.agent.report").check(
            ({"kind": "machine", "machine_id": "m-1", "state": "running", "health": "passing",
              "reason": None, "host_port": 2222, "host_id": "h-1"},), {})


class CoverageTests(TestCase):
    async def test_every_procedure_has_a_schema_that_fits(self):
        """
        Every @wamp.register procedure of a started control plane's session has a schema
        whose arguments are the procedure's own (names, order, defaults), and the roles each
        schema names may call it.
        """
        plane = await start_plane(self)
        seen = set()
        for api in plane.session.apis:
            for uri, endpoint, options in procedures_of(api):
                seen.add(uri)
                self.assertIn(uri, schema.PROCEDURES, f"{uri} has no schema")
                p = schema.PROCEDURES[uri]
                details = getattr(options, "details_arg", None)
                params = [v for k, v in inspect.signature(endpoint).parameters.items()
                          if k != details]
                self.assertEqual([a.name for a in p.args], [v.name for v in params], uri)
                for a, v in zip(p.args, params, strict=True):
                    if v.default is inspect.Parameter.empty:
                        self.assertTrue(a.required, (uri, a.name))
                    elif not a.required:
                        self.assertEqual(a.default, v.default, (uri, a.name))
        # (every schema's procedure is registered: FuzzTests calls each one)
        self.assertLessEqual(seen, set(schema.PROCEDURES))
        self.assertGreater(len(seen), 30)
        authz = RoleBasedAuthorizer(roles())
        for p in schema.PROCEDURES.values():
            for role in p.roles:
                self.assertTrue(authz.authorize(Principal("h-1" if role == "agent" else role, role),
                                                p.uri, "call"), (p.uri, role))


class DocTests(SynchronousTestCase):
    def test_doc_is_generated(self):
        """docs/wamp-procedures.md is what scripts/gen-wamp-docs writes (run it after a change)."""
        with open(DOC) as f:
            self.assertEqual(f.read(), schema.markdown(),
                             "docs/wamp-procedures.md is stale: run scripts/gen-wamp-docs")


# -- over a real WAMP session ---------------------------------------------------------------


class _Protocol(WampWebSocketClientProtocol):
    def connectionLost(self, reason):
        WampWebSocketClientProtocol.connectionLost(self, reason)
        self.factory.lost.callback(None)


class _Client(ApplicationSession):
    def __init__(self, authid, ticket):
        ApplicationSession.__init__(self, ComponentConfig(realm="zwrm"))
        self._authid, self._ticket = authid, ticket
        self.joined = defer.Deferred()

    def onConnect(self):
        self.join("zwrm", authmethods=["ticket"], authid=self._authid)

    def onChallenge(self, challenge):
        return self._ticket

    def onJoin(self, details):
        self.joined.callback(self)

    def onLeave(self, details):
        if not self.joined.called:
            self.joined.errback(Exception(f"refused: {details.reason} {details.message}"))
        self.disconnect()


def _deep(n):
    v = []
    for _ in range(n):
        v = [v]
    return v


BIG = "n" * 100_000


def bad_values(t):
    """Values of the wrong type or size for the schema type C{t}."""
    if isinstance(t, schema.Nullable):
        return bad_values(t.inner)
    if isinstance(t, schema.Str):
        return [["an-id"], 42, {"a": 1}, True, BIG[: t.max_len + 1], BIG]
    if isinstance(t, schema.Int):
        return ["1", 1.5, True, [1], t.high + 1, t.low - 1, 2 ** 63 - 1]
    if isinstance(t, schema.Number):
        return ["1", True, [1], {}, t.high * 2 + 1, t.low - 1]
    if isinstance(t, schema.Bool):
        return [1, "yes", [], None]
    if isinstance(t, (schema.Record, schema.Map)):
        return ["x", 5, [], {"k" * 200: 1}, {str(i): i for i in range(t.max_items + 1)}]
    if isinstance(t, schema.OneOf):
        return ["x", 5, [[1]] * 10, _deep(200)]
    if isinstance(t, schema.Json):
        return [_deep(200), {"x": BIG}, list(range(t.max_items + 1))]
    raise AssertionError(f"no bad values for {t!r}")


async def start_plane(testcase):
    """A started control plane on a loopback port, stopped after C{testcase}."""
    config = Config(listen=["tcp:0:interface=127.0.0.1"],
                    data_dir=os.path.join(temp_dir(testcase), "cp"),
                    heartbeat_interval=1.0, flush_interval=0.2)
    plane = ControlPlane(reactor, config)
    plane.startService()
    testcase.addCleanup(plane.stopService)
    await plane.started
    plane.data_dir = config.data_dir
    return plane


class FuzzTests(TestCase):
    timeout = 120

    async def _start(self):
        plane = await start_plane(self)
        self.port = plane.ports[0].getHost().port
        with open(os.path.join(plane.data_dir, "join.token")) as f:
            join_token = f.read().strip()
        with open(os.path.join(plane.data_dir, "operator.token")) as f:
            operator_token = f.read().strip()
        joining = await self._session("join", join_token)
        joined = await joining.call("zwrm.agent.join", "h-fuzz", {"name": "fuzz", "vcpus": 1})
        return {
            "joining": joining,
            "operator": await self._session("operator", operator_token),
            "agent": await self._session(joined["host_id"], joined["credential"]),
            "trusted": plane.session,  # the control component itself (in memory)
        }

    async def _session(self, authid, ticket):
        client = _Client(authid, ticket)
        factory = WampWebSocketClientFactory(lambda: client, url=f"ws://127.0.0.1:{self.port}/ws",
                                             serializers=[MsgPackSerializer()])
        factory.noisy = False
        factory.protocol = _Protocol
        factory.lost = defer.Deferred()
        proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(factory)

        def close():
            if not factory.lost.called:
                proto.transport.abortConnection()
            return factory.lost

        self.addCleanup(close)
        await client.joined
        return client

    def test_every_procedure_refuses_bad_arguments(self):
        """
        Every procedure, called over a real WAMP session by a role allowed to call it, answers
        wrong counts, unknown keywords, missing arguments and wrong types or sizes of each
        argument (a list where an id belongs, a number as an image name, a 100 kB name) with
        zwrm.error.invalid_argument naming the argument, and nothing reaches the log with a
        traceback.
        """
        return defer.ensureDeferred(self._fuzz())

    async def _fuzz(self):
        logged = []

        def observe(event):
            text = formatEvent(event) or ""
            if event.get("log_failure") is not None or "Traceback" in text:
                logged.append(text[:500])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        sessions = await self._start()
        calls = 0
        for p in sorted(schema.PROCEDURES.values(), key=lambda p: p.uri):
            if p.roles == ("trusted",):
                continue  # zwrm.crossbar.*: only an external router calls them (tests/crossbar/)
            session = sessions[next(r for r in ("joining", "agent", "operator", "trusted")
                                    if r in p.roles)]
            good = [_good(a) for a in p.args if a.required]

            async def refused(args, kwargs, argument, p=p, session=session):
                with self.assertRaises(ApplicationError) as c:
                    await session.call(p.uri, *args, **kwargs)
                e = c.exception
                self.assertEqual(e.error, "zwrm.error.invalid_argument",
                                 (p.uri, _short(args), _short(kwargs), e))
                if argument is not None:
                    self.assertEqual((e.kwargs or {}).get("argument"), argument,
                                     (p.uri, _short(args), _short(kwargs), e.args))
                    self.assertIn(argument, e.args[0])

            # too many positional arguments; an unknown keyword; a 100 kB keyword
            await refused(good + [_good(a) for a in p.args if not a.required] + [1], {}, None)
            await refused(good, {"no_such_argument": 1}, "no_such_argument")
            await refused(good, {BIG: 1}, "(a long name)")
            calls += 3
            for i, a in enumerate(p.args):
                if a.required:  # missing
                    await refused(good[:i], {}, a.name)
                    calls += 1
                for bad in bad_values(a.type):
                    if a.required:
                        await refused(good[:i] + [bad] + good[i + 1:], {}, a.name)
                    else:
                        await refused(good, {a.name: bad}, a.name)
                    calls += 1
        self.assertGreater(calls, 400)
        self.assertEqual(logged, [], "tracebacks or errors in the log")


def _short(value):
    text = repr(value)
    return text if len(text) < 200 else text[:200] + "..."


NAMED = {
    "host_id": "h-fuzz", "name": "app", "machine_id": "m-1", "volume_id": "v-1",
    "ref": "img:1", "token_id": "abcdef", "replicas": 1, "app": "app", "size_mb": 64,
    "mount": "/data", "ttl": 60, "max_bytes": 10, "replica": 0,
}


def _good(arg):
    """A value that passes C{arg}'s type (the call must then fail at another argument)."""
    t = arg.type
    if arg.name in NAMED and not isinstance(t, schema.Nullable):
        return NAMED[arg.name]
    if isinstance(t, schema.Nullable):
        return None
    if isinstance(t, schema.Str):
        for v in ("x", "id-1", "app", "/x", "img:1"):
            try:
                t.check(v, arg.name)
                return v
            except schema.Invalid:
                pass
    if isinstance(t, (schema.Int, schema.Number)):
        return max(t.low, min(1, t.high))
    if isinstance(t, schema.Bool):
        return False
    if isinstance(t, (schema.Json, schema.Map, schema.Record)):
        return {}
    if isinstance(t, schema.List):
        return []
    raise AssertionError(f"no good value for {arg.name}")


class CancelledCallTests(SynchronousTestCase):
    def test_a_cancelled_call_is_not_a_user_error(self):
        """
        The control plane's session does not log a call its caller cancelled (a console that
        detaches) as an error with a traceback, as autobahn's onUserError does, nor an
        answer to bad input as a warning; a bug it still logs as an error.
        """
        from twisted.python.failure import Failure

        from zwrm.control.api import ControlSession

        session = ControlSession([])
        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        session.onUserError(Failure(defer.CancelledError()), "cancelled")
        self.assertEqual([e for e in seen if e["log_level"].name in ("warn", "error")], [])
        # an answer to bad input: one info line, not a warning
        session.onUserError(Failure(errors.InvalidArgument("image demo:nope is not in the"
                                                           " registry")), "bad input")
        self.assertEqual([e for e in seen if e["log_level"].name in ("warn", "error")], [])
        self.assertEqual(formatEvent(seen[-1]), "ControlSession: answered"
                         " zwrm.error.invalid_argument: image demo:nope is not in the registry")
        session.onUserError(Failure(KeyError("a bug")), "KeyError: a bug")
        self.assertEqual([e["log_level"].name for e in seen
                          if e["log_level"].name in ("warn", "error")], ["error"])
