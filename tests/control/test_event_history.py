"""
The stored, bounded event history (L{zwrm.control.resources.events}) and
C{zwrm.event.history}: on a real store, and over a real WAMP session to a real control plane.
"""

import time

from autobahn.wamp.exception import ApplicationError
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tests.agent.test_membership import start_plane
from tests.cli.test_cli import d
from zwrm import errors
from zwrm.cli import client
from zwrm.control.resources import Resource
from zwrm.control.resources.events import (
    EventAPI,
    EventHistory,
    HistoryGone,
    topic_of,
)
from zwrm.control.store import Store


class _Thing(Resource):
    topic = "zwrm.event.host"


class _Other(Resource):
    topic = "zwrm.event.app"


class HistoryTests(TestCase):
    """On a real (in-memory) store, with a Clock."""

    async def _setup(self, **kw):
        self.clock = Clock()
        self.clock.advance(time.time())
        self.store = Store(reactor, ":memory:", now=self.clock.seconds)
        await self.store.start()
        self.addCleanup(self.store.stop)
        self.published = []
        publish = lambda topic, event: self.published.append((topic, event))  # noqa: E731
        self.hosts = _Thing(self.clock, self.store, publish)
        self.apps = _Other(self.clock, self.store, publish)
        self.history = EventHistory(self.clock, self.store, **kw)

    async def _produce(self, n, resource=None):
        out = []
        for i in range(n):
            out.append(await (resource or self.hosts).produce_event("state", f"s{i}", {"i": i}))
        return out

    @d
    async def test_published_event_carries_its_id_and_history_has_it(self):
        """
        Every event is published as stored, with its id; the ids grow; the history after an
        id returns exactly the later events, oldest first, as they were published.
        """
        await self._setup()
        events = await self._produce(3)
        ids = [e["id"] for e in events]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual([e for _, e in self.published], events)
        page = await self.history.history(after=ids[0])
        self.assertEqual(page["events"], events[1:])
        self.assertEqual((page["more"], page["cursor"], page["last_id"]), (False, ids[2], ids[2]))
        page = await self.history.history()  # no after: the newest, oldest first
        self.assertEqual(page["events"], events)

    @d
    async def test_topics_limit_and_cursor(self):
        """
        A topic filter returns only that topic's events; limit pages through them with
        more/cursor, and the pages together are every event, each once.
        """
        await self._setup()
        mixed = []
        for _ in range(5):
            mixed += await self._produce(1)
            mixed += await self._produce(1, self.apps)
        page = await self.history.history(after=0, topics=["app"])
        self.assertEqual(page["events"], [e for e in mixed if e["topic"] == "zwrm.event.app"])
        self.assertEqual(page["cursor"], mixed[-1]["id"])
        seen, cursor = [], 0
        while True:
            page = await self.history.history(after=cursor, limit=3)
            seen += page["events"]
            cursor = page["cursor"]
            if not page["more"]:
                break
        self.assertEqual(seen, mixed)
        # a single topic by its full name
        page = await self.history.history(after=0, topics="zwrm.event.host", limit=2)
        self.assertEqual([e["topic"] for e in page["events"]], ["zwrm.event.host"] * 2)
        self.assertTrue(page["more"])

    @d
    async def test_since_a_time(self):
        """
        since: every event stored at or after the time, oldest first, of the topics asked
        for, paged like after; none yet is an empty page at the newest id; after and since
        together are refused, naming since.
        """
        await self._setup()
        early = await self._produce(2)
        self.clock.advance(60)
        at = self.clock.seconds()
        late = await self._produce(3)
        late += await self._produce(1, self.apps)
        self.clock.advance(10)
        page = await self.history.history(since=at)
        self.assertEqual((page["events"], page["more"]), (late, False))
        self.assertEqual(page["cursor"], late[-1]["id"])
        page = await self.history.history(since=at, topics=["app"])
        self.assertEqual(page["events"], late[-1:])
        page = await self.history.history(since=at - 61)
        self.assertEqual(page["events"], early + late)
        page = await self.history.history(since=at, limit=2)
        self.assertEqual((page["events"], page["more"], page["cursor"]),
                         (late[:2], True, late[1]["id"]))
        page = await self.history.history(after=page["cursor"], limit=2)
        self.assertEqual(page["events"], late[2:])
        page = await self.history.history(since=self.clock.seconds())
        self.assertEqual((page["events"], page["more"], page["cursor"]),
                         ([], False, late[-1]["id"]))
        with self.assertRaises(errors.InvalidArgument) as c:
            await self.history.history(after=early[0]["id"], since=at)
        self.assertEqual(c.exception.kwargs["argument"], "since")

    def test_unknown_topic(self):
        with self.assertRaises(errors.InvalidArgument) as c:
            topic_of("hosts")
        self.assertEqual(c.exception.kwargs["argument"], "topics")
        self.assertIn("host, machine, drain, app, cert", c.exception.message)

    @d
    async def test_pruned_by_count_then_gone(self):
        """
        Only the newest max_events are kept after pruning; asking after an id whose
        successors were pruned is zwrm.error.history_gone with the id to resume from.
        """
        await self._setup(max_events=3)
        events = await self._produce(7)
        self.assertEqual(await self.history.prune(), 4)
        page = await self.history.history(after=events[3]["id"])  # just before the first kept
        self.assertEqual(page["events"], events[4:])
        self.assertEqual(page["first_id"], events[4]["id"])
        with self.assertRaises(HistoryGone) as c:
            await self.history.history(after=events[2]["id"])
        e = c.exception
        self.assertEqual(e.error, "zwrm.error.history_gone")
        self.assertEqual(e.kwargs["last_id"], events[-1]["id"])
        self.assertIn("read the state again", e.message)
        self.assertEqual(await self.history.prune(), 0)

    @d
    async def test_pruned_by_age_and_ids_never_reused(self):
        """
        Events older than max_age go, oldest first; after everything went, new events still
        get higher ids, and a client's last id is still known (not gone).
        """
        await self._setup(max_age=60)
        old = await self._produce(2)
        self.clock.advance(30)
        young = await self._produce(1)
        self.clock.advance(40)
        self.assertEqual(await self.history.prune(), 2)
        page = await self.history.history(after=old[-1]["id"])
        self.assertEqual(page["events"], young)
        self.clock.advance(100)
        self.assertEqual(await self.history.prune(), 1)
        page = await self.history.history(after=young[0]["id"])
        self.assertEqual((page["events"], page["cursor"]), ([], young[0]["id"]))
        new = await self._produce(1)
        self.assertGreater(new[0]["id"], young[0]["id"])
        page = await self.history.history(after=young[0]["id"])
        self.assertEqual(page["events"], new)

    @d
    async def test_id_newer_than_history(self):
        """A last id beyond the newest (a restored database) is history_gone too."""
        await self._setup()
        events = await self._produce(1)
        with self.assertRaises(HistoryGone) as c:
            await self.history.history(after=events[0]["id"] + 5)
        self.assertIn("restored", c.exception.message)

    @d
    async def test_pruning_in_batches(self):
        """Large backlogs go in several statements (other writes run between them)."""
        from zwrm.control.resources import events as mod

        self.patch(mod, "PRUNE_BATCH", 2)
        await self._setup(max_events=1)
        events = await self._produce(6)
        calls = []
        run = self.store.run
        self.patch(self.store, "run", lambda fn, *a: calls.append(fn) or run(fn, *a))
        self.assertEqual(await self.history.prune(), 5)
        self.assertEqual(len(calls), 1 + 3 + 1)  # the bound, three batches, the empty one
        page = await self.history.history(after=events[-2]["id"])
        self.assertEqual(page["events"], events[-1:])

    @d
    async def test_prune_service_runs_on_the_clock(self):
        await self._setup(max_events=1)
        await self._produce(3)
        timer = self.history.service(interval=60)
        timer.startService()
        self.addCleanup(timer.stopService)
        await self.history.history()  # the store's queue: the first pruning ran before this
        page = await self.history.history(after=None, limit=10)
        self.assertEqual(len(page["events"]), 1)

    def test_bad_settings(self):
        with self.assertRaises(ValueError):
            EventHistory(Clock(), None, max_events=0)
        with self.assertRaises(ValueError):
            EventHistory(Clock(), None, max_age=0)

    def test_api_registers_the_procedure(self):
        from zwrm.control.api import procedures_of

        uris = [uri for uri, _, _ in procedures_of(EventAPI(None))]
        self.assertEqual(uris, ["zwrm.event.history"])


class SessionTests(TestCase):
    """C{zwrm.event.history} over a real WAMP session to a real control plane."""

    timeout = 60

    @d
    async def test_viewer_reads_history_and_gone_is_an_error_uri(self):
        plane, _ = await start_plane(self)
        await plane.store.add_token("viewer-test", "viewer", "viewer-secret")
        viewer = await client.connect(reactor, {"url": plane.url, "token": "viewer-secret",
                                                "authid": "viewer", "timeout": 10})
        self.addCleanup(client.close, viewer)
        received = []
        await viewer.subscribe(lambda e: received.append(e), "zwrm.event.host")
        hosts = plane.registry.data.hosts
        event = await hosts.produce_event("state", "h_test", {"host_id": "h_test"})
        page = await viewer.call("zwrm.event.history", after=event["id"] - 1, topics=["host"])
        self.assertEqual([e["id"] for e in page["events"]], [event["id"]])
        await _until(lambda: received)
        self.assertEqual(received[0]["id"], event["id"])  # the published event carries it
        # an id whose successors were pruned: a zwrm.error.* the client can act on
        await hosts.produce_event("state", "h_test", {"host_id": "h_test"})
        plane.events.max_events = 1
        await plane.events.prune()
        with self.assertRaises(ApplicationError) as c:
            await viewer.call("zwrm.event.history", after=event["id"] - 1)
        self.assertEqual(c.exception.error, "zwrm.error.history_gone")
        self.assertEqual(c.exception.kwargs["last_id"], event["id"] + 1)
        with self.assertRaises(ApplicationError) as c:
            await viewer.call("zwrm.event.history", topics=["nope"])
        self.assertEqual(c.exception.error, "zwrm.error.invalid_argument")
        self.assertEqual(c.exception.kwargs["argument"], "topics")
        # a viewer may not read the audit trail
        with self.assertRaises(ApplicationError) as c:
            await viewer.call("zwrm.audit.list")
        self.assertEqual(c.exception.error, "wamp.error.not_authorized")


async def _until(predicate, timeout=10.0):
    from zwrm.testing.processes import poll

    await poll(reactor, predicate, timeout, 0.01, what="condition")


class SettingTests(TestCase):
    def test_config_file_keys(self):
        import os

        from zwrm.control.tap import load_config

        path = os.path.join(self.mktemp())
        with open(path, "w") as f:
            f.write("[events]\nmax_events = 500\nmax_age = 3600\n"
                    "[audit]\nmax_entries = 50\nmax_age = 86400\n")
        self.assertEqual(load_config(path), {
            "event_max_events": 500.0, "event_max_age": 3600.0,
            "audit_max_entries": 50.0, "audit_max_age": 86400.0})

    @d
    async def test_plane_uses_the_settings(self):
        plane, _ = await start_plane(self, event_max_events=7, event_max_age=60,
                                     audit_max_entries=5)
        self.assertEqual((plane.events.max_events, plane.events.max_age), (7, 60.0))
        self.assertEqual(plane.audit.max_entries, 5)
