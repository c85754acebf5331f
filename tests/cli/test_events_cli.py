"""
C{zwrm events} and C{zwrm audit} against a real control plane over real sockets; a follower
whose connection is cut (twice) while events are published loses none and repeats none.
"""

import io
import json

from twisted.internet import defer, reactor, task
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.agent.test_membership import start_plane
from tests.cli.test_cli import Args, d
from zwrm.cli import audit as cli_audit
from zwrm.cli import client
from zwrm.cli import events as cli_events
from zwrm.cli.client import CliError
from zwrm.cli.main import budget, build_parser
from zwrm.testing.processes import poll


def _args(plane, **kw):
    base = {"api_url": plane.url, "topic": None, "after": None, "since": None, "limit": 20,
            "follow": False, "json": True}
    base.update(kw)
    return Args(**base)


class EventsTests(TestCase):
    timeout = 120

    async def _plane(self):
        plane, _ = await start_plane(self)
        self.patch(client.os, "environ", {"ZWRM_TOKEN": plane.operator_token})
        return plane

    def _record_sessions(self):
        """The sessions the CLI's events connect, in order, from now on."""
        sessions = []
        connect = cli_events.connect

        async def recording_connect(reactor, settings, timeout=None):
            s = await connect(reactor, settings, timeout)
            sessions.append(s)
            return s

        self.patch(cli_events, "connect", recording_connect)
        return sessions

    @d
    async def test_history_printed_filtered_and_gone(self):
        plane = await self._plane()
        hosts, apps = plane.registry.data.hosts, plane.registry.data.apps
        h = await hosts.produce_event("state", "h_one", {"state": "ready", "old": "joining"})
        a = await apps.produce_event("created", "app-1", {"app": "web"})
        out = io.StringIO()
        self.assertEqual(await cli_events.events(reactor, _args(plane, after=h["id"] - 1), out), 0)
        self.assertEqual([json.loads(line)["id"] for line in out.getvalue().splitlines()],
                         [h["id"], a["id"]])
        out = io.StringIO()
        await cli_events.events(reactor, _args(plane, topic=["host"], json=False,
                                               after=h["id"] - 1), out)
        line, = out.getvalue().splitlines()
        self.assertIn(f"#{h['id']}", line)
        self.assertIn("ready (was joining)", line)
        plane.events.max_events = 1
        await plane.events.prune()
        with self.assertRaises(CliError) as c:
            await cli_events.events(reactor, _args(plane, after=h["id"] - 1), io.StringIO())
        self.assertIn("no longer kept", c.exception.message)

    @d
    async def test_since(self):
        """
        --since prints every event stored since then (page after page), oldest first; a
        time to come prints none; a bad WHEN is a usage error; --after and --since together
        are refused by the parser.
        """
        plane = await self._plane()
        hosts = plane.registry.data.hosts
        made = [await hosts.produce_event("state", f"h_{i}", {"state": "ready"})
                for i in range(5)]
        self.patch(cli_events, "PAGE", 2)
        out = io.StringIO()
        await cli_events.events(reactor, _args(plane, since="1h", limit=1), out)
        printed = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([e["id"] for e in printed if e["subject"].startswith("h_")],
                         [e["id"] for e in made])
        self.assertEqual([e["id"] for e in printed], sorted(e["id"] for e in printed))
        out = io.StringIO()
        await cli_events.events(reactor, _args(plane, since="2099-01-01T00:00:00"), out)
        self.assertEqual(out.getvalue(), "")
        with self.assertRaises(CliError) as c:
            await cli_events.events(reactor, _args(plane, since="yesterday"), io.StringIO())
        self.assertEqual(c.exception.code, client.EXIT_USAGE)
        self.assertIn("--since 'yesterday'", c.exception.message)
        args = build_parser().parse_args(["events", "--since", "30m", "--follow"])
        self.assertEqual((args.since, args.after, args.follow), ("30m", None, True))
        import sys

        self.patch(sys, "stderr", io.StringIO())
        with self.assertRaises(SystemExit):
            build_parser().parse_args(["events", "--after", "1", "--since", "30m"])
        self.assertIn("not allowed with argument", sys.stderr.getvalue())

    @d
    async def test_follow_resumes_after_reconnects_losing_nothing(self):
        """
        The follower's connection is aborted twice while events are published (and some
        are published while it is away); it reconnects and prints every event once, in order.
        """
        plane = await self._plane()
        self.patch(cli_events, "RETRY_INITIAL", 0.05)
        sessions = self._record_sessions()
        hosts = plane.registry.data.hosts
        before = await hosts.produce_event("state", "h_x", {"n": -1})
        out, err = io.StringIO(), io.StringIO()
        follower = defer.Deferred.fromCoroutine(cli_events.events(
            reactor, _args(plane, follow=True, after=before["id"]), out, err))
        follower.addErrback(lambda f: f.trap(defer.CancelledError))

        def printed():
            return [json.loads(line)["id"] for line in out.getvalue().splitlines()]

        produced = [before]  # --after before: not printed
        for n in range(60):
            produced.append(await hosts.produce_event("state", "h_x", {"n": n}))
            if n in (15, 40):
                await poll(reactor, lambda: printed() and printed()[-1] == produced[-1]["id"],
                           20, 0.01, what="the follower caught up")
                sessions[-1].abort()  # the connection drops
                await poll(reactor, lambda: sessions[-1].ended.called, 20, 0.01,
                           what="the connection ended")
            if n % 5 == 0:
                await task.deferLater(reactor, 0.01, lambda: None)
        await poll(reactor, lambda: printed() and printed()[-1] == produced[-1]["id"], 30,
                   0.01, what="every event printed")
        follower.cancel()
        await follower
        self.assertEqual(printed(), [e["id"] for e in produced[1:]])
        self.assertEqual(len(sessions), 3)
        self.assertEqual(err.getvalue().count("reconnecting"), 2)

    @d
    async def test_follow_ends_quietly_when_interrupted(self):
        """
        Ctrl-C or SIGTERM: the reactor's shutdown ends the follower's connection; the
        follower returns 0 and says nothing about a lost connection or a reconnect.
        """
        plane = await self._plane()
        sessions = self._record_sessions()

        class Shutting:
            """The reactor, whose shutdown triggers this test fires itself."""

            def __init__(self):
                self.triggers = {}

            def addSystemEventTrigger(self, phase, event, f, *args):
                self.triggers[len(self.triggers)] = (phase, event, f, args)
                return len(self.triggers) - 1

            def removeSystemEventTrigger(self, trigger):
                del self.triggers[trigger]

            def __getattr__(self, name):
                return getattr(reactor, name)

        shutting = Shutting()
        out, err = io.StringIO(), io.StringIO()
        follower = defer.Deferred.fromCoroutine(cli_events.events(
            shutting, _args(plane, follow=True), out, err))
        await poll(reactor, lambda: sessions, 20, 0.01, what="the follower connected")
        [(phase, event, f, args)] = shutting.triggers.values()
        self.assertEqual((phase, event), ("before", "shutdown"))
        f(*args)
        sessions[-1].abort()
        self.assertEqual(await follower.addTimeout(10, reactor), 0)
        self.assertEqual((err.getvalue(), len(sessions)), ("", 1))
        # Returned for another reason, the follower lets go of its trigger.
        follower = defer.Deferred.fromCoroutine(cli_events.events(
            shutting, _args(plane, follow=True, api_url="ws://127.0.0.1:1/ws"), out, err))
        with self.assertRaises(CliError):
            await follower
        self.assertEqual(len(shutting.triggers), 1)  # the fired one, kept by the first

    @d
    async def test_follow_fills_a_gap_in_the_ids(self):
        """
        An event stored but not published to the follower (the control component was off
        an external router) is read from the history when the next event's id skips it.
        """
        plane = await self._plane()
        sessions = self._record_sessions()
        hosts = plane.registry.data.hosts
        first = await hosts.produce_event("state", "h_x", {"n": 0})
        out = io.StringIO()
        follower = defer.Deferred.fromCoroutine(cli_events.events(
            reactor, _args(plane, follow=True, after=first["id"] - 1), out, io.StringIO()))
        follower.addErrback(lambda f: f.trap(defer.CancelledError))

        def printed():
            return [json.loads(line)["id"] for line in out.getvalue().splitlines()]

        await poll(reactor, lambda: printed() == [first["id"]], 20, 0.01, what="first event")
        unpublished = await plane.store.add_event("zwrm.event.host", "state", "h_x", {"n": 1})
        last = await hosts.produce_event("state", "h_x", {"n": 2})
        await poll(reactor, lambda: printed()[-1:] == [last["id"]], 20, 0.01, what="last event")
        follower.cancel()
        await follower
        self.assertEqual(printed(), [first["id"], unpublished["id"], last["id"]])
        self.assertEqual(len(sessions), 1)

    def test_follow_has_no_overall_time_limit(self):
        args = build_parser().parse_args(["events", "--follow"])
        self.assertIsNone(budget(args, 10))
        args = build_parser().parse_args(["events"])
        self.assertEqual(budget(args, 10), 11)


class AuditCliTests(TestCase):
    timeout = 60

    @d
    async def test_audit_table_and_json(self):
        plane, _ = await start_plane(self)
        self.patch(client.os, "environ", {"ZWRM_TOKEN": plane.operator_token})
        op = await client.connect(reactor, {"url": plane.url, "token": plane.operator_token,
                                            "authid": "operator", "timeout": 10})
        self.addCleanup(client.close, op)
        await op.call("zwrm.app.create", "web")
        out = io.StringIO()
        args = Args(api_url=plane.url, since="1h", procedure=None, authid=None, limit=100,
                    json=False)
        self.assertEqual(await cli_audit.audit(reactor, args, out), 0)
        header, row = out.getvalue().splitlines()
        self.assertIn("ACTOR", header)
        self.assertIn("operator (operator)", row)
        self.assertIn('zwrm.app.create  ok', " ".join(row.split()).replace(" ok", "  ok"))
        self.assertIn('{"name":"web"}', row)
        out = io.StringIO()
        args.json = True
        args.procedure = "zwrm.app.scale"
        await cli_audit.audit(reactor, args, out)
        self.assertEqual(json.loads(out.getvalue()), [])


class ParseTests(SynchronousTestCase):
    def test_an_empty_since_is_refused(self):
        """--since '' is no time: refused before anything is sent (it was taken as no filter)."""
        settings = {"url": "ws://127.0.0.1:1/ws"}
        audit = Args(since="", limit=100, procedure=None, authid=None, api_url=None)
        events = Args(since="", topic=None, json=False, after=None, follow=False, limit=20,
                      api_url=None)
        for done in (ensureDeferred(cli_audit.audit(reactor, audit)),
                     ensureDeferred(cli_events.events(reactor, events, settings=settings))):
            e = self.failureResultOf(done, CliError).value
            self.assertEqual(e.code, 2)
            self.assertTrue(e.message.startswith("--since '': give a duration"), e.message)

    def test_since(self):
        self.assertEqual(cli_audit.parse_since("2h", now=10000.0), 2800.0)
        self.assertEqual(cli_audit.parse_since("1970-01-01T01:00:00"), 3600.0)
        with self.assertRaises(CliError) as c:
            cli_audit.parse_since("yesterday")
        self.assertEqual(c.exception.code, 2)
