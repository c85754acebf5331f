"""
The stored event history (L{zwrm.control.resources.events}): reading a page and pruning, on
a real SQLite file through the control plane's store (its one thread), beside the plain SQL
of the same page measured in the same run.

    .venv/bin/python benchmarks/event_history.py [--events 120000] [--keep 100000]

Fills C{--events} host and app events, then times:

 - B{history}: C{EventHistory.history(after=<middle>, limit=1000)}, and the same filtered by
   one topic; B{baseline}: C{SELECT ... WHERE id > ? ORDER BY id LIMIT 1000} on the same
   connection (the floor: the query alone, no thread hop, no decoding);
 - B{prune}: down to C{--keep} events, in batches of L{events.PRUNE_BATCH} (the store's thread
   is free between batches); the longest batch is what another write may wait behind.
"""

import argparse
import os
import tempfile
import time

from twisted.internet import defer, task

from zwrm.control.resources import events
from zwrm.control.resources.events import EventHistory
from zwrm.control.store import Store


async def main(reactor, n, keep):
    store = Store(reactor, os.path.join(tempfile.mkdtemp(), "zwrm.db"))
    await store.start()
    payload = '{"state": "ready", "old": "joining", "host_id": "h_1234567890abcdef"}'

    def fill(db):
        with db.conn:
            db.conn.execute("BEGIN")
            db.conn.executemany(
                "INSERT INTO events (ts, topic, kind, subject, payload) VALUES (?, ?, ?, ?, ?)",
                [(time.time(), "zwrm.event.app" if i % 3 == 0 else "zwrm.event.host", "state",
                  f"s{i}", payload) for i in range(n)])

    await store.run(fill)
    history = EventHistory(reactor, store, max_events=keep)
    middle = n // 2

    def baseline(db):
        t = time.perf_counter()
        db.conn.execute("SELECT id, ts, topic, kind, subject, payload FROM events WHERE id > ?"
                        " ORDER BY id LIMIT 1000", [middle]).fetchall()
        return time.perf_counter() - t

    base = min([await store.run(baseline) for _ in range(5)])
    times = []
    for _ in range(5):
        t = time.perf_counter()
        await history.history(after=middle, limit=1000)
        times.append(time.perf_counter() - t)
    filtered = []
    for _ in range(5):
        t = time.perf_counter()
        await history.history(after=middle, topics=["app"], limit=1000)
        filtered.append(time.perf_counter() - t)
    batches = []
    run = store.run

    async def timed(fn, *args):
        t = time.perf_counter()
        result = await run(fn, *args)
        batches.append(time.perf_counter() - t)
        return result

    store.run = timed
    t = time.perf_counter()
    deleted = await history.prune()
    prune = time.perf_counter() - t
    store.run = run
    print(f"history: 1000 of {n} events: {min(times) * 1000:.1f} ms (baseline, the SQL alone:"
          f" {base * 1000:.1f} ms); one topic: {min(filtered) * 1000:.1f} ms")
    print(f"prune: {deleted} events in {prune * 1000:.0f} ms, {len(batches)} store calls of at"
          f" most {events.PRUNE_BATCH} rows; longest {max(batches) * 1000:.0f} ms")
    await store.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=120000)
    p.add_argument("--keep", type=int, default=100000)
    a = p.parse_args()
    task.react(lambda r: defer.Deferred.fromCoroutine(main(r, a.events, a.keep)))
