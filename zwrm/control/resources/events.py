"""
The control plane's event history: every canonical event of the resource layer, kept and
numbered, so that a client can resume after a reconnect with nothing lost (as Nomad's event
stream does with its index).

Every event a resource produces (L{zwrm.control.resources.Resource.produce_event}) is first
appended to the store's C{events} table, which gives it its C{id}: an integer that only grows
(SQLite C{AUTOINCREMENT}: never reused, even after pruning).  The event published on its topic
(C{zwrm.event.host}, C{.machine}, C{.drain}, C{.app}, C{.cert}) is that stored row,
C{{id, ts, topic, kind, subject, payload}}, so a subscriber always knows where it is.

C{zwrm.event.history(after, topics, limit)} (roles operator and viewer) returns the events
after an id, oldest first.  A client that follows the stream:

 1. subscribes to the topics it wants (keeping what arrives in a buffer);
 2. calls C{zwrm.event.history(after=<the last id it saw>)} until C{more} is false, resuming
    each time from the answer's C{cursor};
 3. then takes the buffered and the new events whose id is above its last one.

The history is bounded (L{EventHistory.prune}, run every L{PRUNE_INTERVAL} seconds on the
store's thread): only the newest C{max_events} events younger than C{max_age} seconds are
kept; what goes is always the oldest (the kept ids are one contiguous run).  A client whose
last id is older than the history (events it has not seen were pruned), or newer than it (the
control plane's database was restored from a backup), gets C{zwrm.error.history_gone}: it
must read the state again (C{zwrm.host.list}, C{zwrm.app.list}, ...) and resume from the
error's C{last_id}.
"""

import json

from autobahn import wamp
from twisted.application.internet import TimerService
from twisted.logger import Logger

from zwrm import errors

TOPICS = {
    "host": "zwrm.event.host",
    "machine": "zwrm.event.machine",
    "drain": "zwrm.event.drain",
    "app": "zwrm.event.app",
    "cert": "zwrm.event.cert",
}
"""The short names of the resource layer's topics (C{zwrm events --topic}) -> topic."""

DEFAULT_MAX_EVENTS = 100000
"""Events kept at most (C{[events] max_events})."""

DEFAULT_MAX_AGE = 7 * 86400.0
"""Seconds an event is kept at most (C{[events] max_age}): a week."""

PRUNE_INTERVAL = 60.0
"""Seconds between prunings."""

PRUNE_BATCH = 5000
"""Events deleted at most per statement, so that no one write holds the store long."""

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10000


class HistoryGone(errors.ZwrmError):
    """
    The events after the id a client asked from are no longer (or not) in the history: it
    must read the state again, then resume from C{last_id} (a keyword of the error).
    """

    uri = "zwrm.error.history_gone"


def topic_of(name):
    """
    The topic of a short name (C{host}) or of a topic given in full (C{zwrm.event.host}).

    @raise errors.InvalidArgument: naming the argument and the topics there are.
    """
    if name in TOPICS:
        return TOPICS[name]
    if name in TOPICS.values():
        return name
    raise errors.InvalidArgument(
        f"topics: {name!r} is not a topic of the event history (one of"
        f" {', '.join(TOPICS)}, or zwrm.event.<that>)", argument="topics")


def _event(row):
    event_id, ts, topic, kind, subject, payload = row
    if isinstance(payload, str):
        payload = json.loads(payload)
    return {"id": event_id, "ts": ts, "topic": topic, "kind": kind, "subject": subject,
            "payload": payload}


def _bounds(conn):
    """C{(first kept id, newest id ever given)}; with nothing kept, first = newest + 1."""
    lo = conn.execute("SELECT MIN(id) FROM events").fetchone()[0]
    seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    newest = seq[0] if seq else 0
    return (lo if lo is not None else newest + 1), newest


class EventHistory:
    """
    The stored, bounded event history (the store's C{events} table, see the module
    docstring).
    """

    log = Logger()

    def __init__(self, clock, store, max_events=DEFAULT_MAX_EVENTS, max_age=DEFAULT_MAX_AGE):
        """
        @param clock: an L{IReactorTime} (the same time the store stamps events with).
        @param store: the started L{zwrm.control.store.Store}.
        @param max_events: keep at most this many events.
        @param max_age: keep no event older than this many seconds.
        """
        if not (isinstance(max_events, int) and max_events >= 1):
            raise ValueError(f"[events] max_events must be a positive integer, not {max_events!r}")
        if not max_age > 0:
            raise ValueError(f"[events] max_age must be a positive number of seconds, not {max_age!r}")
        self._clock = clock
        self._store = store
        self.max_events = max_events
        self.max_age = float(max_age)

    def history(self, after=None, topics=None, limit=DEFAULT_LIMIT, since=None):
        """
        The events after id C{after} (or, without it, the newest C{limit}), oldest first.

        @param since: instead of C{after}, the events stored at or after this POSIX time
            (paged like C{after}: call again with C{after=cursor} while C{more}).
        @param topics: only these topics (short names or full); L{None}: every topic.
        @return: a Deferred firing with C{{"events": [...], "cursor": <id to resume from>,
            "more": <bool: call again from the cursor>, "first_id", "last_id"}}.
        @raise HistoryGone: C{after} is older than the history, or newer than its newest id.
        """
        if isinstance(topics, str):
            topics = [topics]
        wanted = None if not topics else sorted({topic_of(t) for t in topics})
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise errors.InvalidArgument(f"limit must be an integer from 1 to {MAX_LIMIT}",
                                         argument="limit")
        if since is not None and after is not None:
            raise errors.InvalidArgument("give after (an event id) or since (a time), not both",
                                         argument="since")

        def query(db):
            conn = db.conn
            conn.execute("BEGIN")
            try:
                first, newest = _bounds(conn)
                start = after
                if since is not None:
                    # The events from the first stored at or after the time (ids grow with
                    # time); none yet: the newest id, so that nothing is returned.
                    at = conn.execute("SELECT MIN(id) FROM events WHERE ts >= ?",
                                      [since]).fetchone()[0]
                    start = newest if at is None else at - 1
                elif after is not None and after < first - 1:
                    raise HistoryGone(
                        f"the events after id {after} are no longer kept (the history starts"
                        f" at id {first}): read the state again, then resume from id {newest}",
                        first_id=first, last_id=newest)
                if since is None and after is not None and after > newest:
                    raise HistoryGone(
                        f"event id {after} is newer than the control plane's newest ({newest}):"
                        f" its database was restored or replaced; read the state again, then"
                        f" resume from id {newest}", first_id=first, last_id=newest)
                where, args = [], []
                if wanted:
                    where.append(f"topic IN ({', '.join('?' * len(wanted))})")
                    args += wanted
                cols = "SELECT id, ts, topic, kind, subject, payload FROM events"
                if start is None:
                    sql = cols + (" WHERE " + " AND ".join(where) if where else "")
                    rows = conn.execute(sql + " ORDER BY id DESC LIMIT ?", args + [limit]).fetchall()
                    rows.reverse()
                    more = False
                else:
                    where.insert(0, "id > ?")
                    args.insert(0, start)
                    rows = conn.execute(cols + " WHERE " + " AND ".join(where)
                                        + " ORDER BY id LIMIT ?", args + [limit + 1]).fetchall()
                    more = len(rows) > limit
                    rows = rows[:limit]
            finally:
                conn.execute("COMMIT")
            events = [_event(r) for r in rows]
            cursor = events[-1]["id"] if more else newest
            return {"events": events, "cursor": cursor, "more": more, "first_id": first,
                    "last_id": newest}

        return self._store.run(query)

    def prune(self):
        """
        Delete the oldest events beyond C{max_events} or older than C{max_age}, a batch of
        at most L{PRUNE_BATCH} per statement, on the store's thread (other writes go between
        the batches).

        @return: a Deferred firing with the number of events deleted.
        """
        cutoff = self._clock.seconds() - self.max_age
        keep = self.max_events
        batch = PRUNE_BATCH

        def cut(db):
            conn = db.conn
            hi = conn.execute("SELECT MAX(id) FROM events").fetchone()[0]
            if hi is None:
                return None, None
            old = conn.execute("SELECT MAX(id) FROM events WHERE ts < ?", [cutoff]).fetchone()[0]
            lo = conn.execute("SELECT MIN(id) FROM events").fetchone()[0]
            return lo, max(hi - keep, old or 0)

        def delete(db, upto):
            lo = db.conn.execute("SELECT MIN(id) FROM events").fetchone()[0]
            if lo is None or lo > upto:
                return 0
            return db.conn.execute("DELETE FROM events WHERE id <= ?",
                                   [min(upto, lo + batch - 1)]).rowcount

        async def run():
            lo, upto = await self._store.run(cut)
            deleted = 0
            if lo is None or upto < lo:
                return 0
            while True:
                n = await self._store.run(delete, upto)
                deleted += n
                if not n:
                    return deleted

        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(run())

    def service(self, interval=PRUNE_INTERVAL):
        """A L{TimerService} that prunes every C{interval} seconds (failures are logged)."""

        def prune():
            d = self.prune()
            d.addErrback(lambda f: errors.log_failure(self.log, f, "pruning the event history"))
            return d

        timer = TimerService(interval, prune)
        timer.clock = self._clock
        return timer


class EventAPI:
    """C{zwrm.event.history} (roles operator and viewer)."""

    def __init__(self, history):
        """@param history: the L{EventHistory}."""
        self.history = history

    @wamp.register("zwrm.event.history")
    def event_history(self, after=None, topics=None, limit=DEFAULT_LIMIT, since=None):
        """
        The events after id C{after} (or stored at or after the time C{since}; without
        either, the newest C{limit}), oldest first; see L{EventHistory.history}.
        """
        return self.history.history(after, topics, limit, since)
