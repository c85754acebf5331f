#!/usr/bin/env python3
"""
What the control plane's store (tier 3 of docs/scaling.md: one SQLite database, one writer
thread) takes: the writes a growing cluster makes, through the real L{zwrm.control.store.Store}.

    .venv/bin/python benchmarks/store_writes.py [--hosts 10000] [--changes 2000]
        [--in-flight 1,64] [--dir /var/tmp]

On a database seeded with C{--hosts} hosts (benchmarks/heartbeats.py's seed, in a fresh
directory under C{--dir}, on the disk the control plane would use) it measures:

 - a state change as the control plane stores one (a host registering: the host row's
   update and its event in one transaction, L{Store.update_with_event}, as every resource
   of L{zwrm.control.resources} makes them), C{--changes} of them, with 1 and with 64 in
   flight (they queue for the one writer thread): changes per second and the writer
   thread's CPU; beside it the same change as two transactions (the update, then the
   event appended: how the resources other than machines stored until 2026-12-06);
 - the batched heartbeat flush (L{Store.save_heartbeats}: every host's last-seen time in one
   transaction, once per C{flush_interval}): milliseconds per flush of C{--hosts} rows.

Baseline in the same run: a bare C{sqlite3} loop doing the same two statements per change
on the same database with the same pragmas (WAL, C{synchronous = NORMAL}), without the
store's thread hand-off and sqlite-utils: what SQLite itself costs (in one transaction per
change, and as two autocommit statements).
"""

import argparse
import os
import sqlite3
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def bare(path, creds, n, together):
    """
    The same two statements per change with plain sqlite3, in one transaction
    (C{together}) or as two autocommit statements: seconds.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    t0 = time.perf_counter()
    for i in range(n):
        hid = creds[i % len(creds)][0]
        if together:
            conn.execute("BEGIN")
        conn.execute("UPDATE hosts SET agent_version = ?, last_heartbeat = ? WHERE id = ?",
                     ("bench", time.time(), hid))
        conn.execute("INSERT INTO events (ts, topic, kind, subject, payload) VALUES (?, ?, ?, ?, ?)",
                     (time.time(), "zwrm.event.host", "registered", hid, "{}"))
        if together:
            conn.execute("COMMIT")
    dt = time.perf_counter() - t0
    conn.close()
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=10000)
    ap.add_argument("--changes", type=int, default=2000)
    ap.add_argument("--in-flight", default="1,64")
    ap.add_argument("--flushes", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()

    from heartbeats import seed
    from twisted.internet import defer, task

    from zwrm.control.store import Store

    tmp = tempfile.mkdtemp(prefix="zwrm-bench-store-", dir=args.dir)
    creds = seed(os.path.join(tmp, "cp"), args.hosts)
    path = os.path.join(tmp, "cp", "zwrm.db")
    print(f"store: {args.hosts} hosts in {path}; machine: {os.cpu_count()} cores,"
          f" load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    for together, how in ((True, "one transaction"), (False, "two autocommit statements")):
        dt = bare(path, creds, args.changes, together)
        print(f"baseline, bare sqlite3: {args.changes / dt:8,.0f} state changes/s"
              f" ({1000 * dt / args.changes:.3f} ms each, {how})"
              f"; load {os.getloadavg()[0]:.2f}", flush=True)

    async def run(reactor):
        store = Store(reactor, path)
        await store.start()

        def thread_cpu():
            return time.thread_time()

        async def together(hid):
            await store.update_with_event(
                "hosts", hid, {"agent_version": "bench", "last_heartbeat": time.time()},
                "zwrm.event.host", "registered", hid, {})

        async def apart(hid):
            await store.update("hosts", hid, {"agent_version": "bench",
                                              "last_heartbeat": time.time()})
            await store.add_event("zwrm.event.host", "registered", hid, {})

        for in_flight, (how, one) in [
                (int(x), h) for x in args.in_flight.split(",")
                for h in (("one transaction", together), ("two transactions", apart))]:
            sem = defer.DeferredSemaphore(in_flight)

            async def change(i, one=one):
                await one(creds[i % len(creds)][0])

            c0 = await store.run(lambda db: thread_cpu())
            p0, t0 = time.process_time(), time.perf_counter()
            await defer.gatherResults([
                sem.run(lambda i=i: defer.Deferred.fromCoroutine(change(i)))
                for i in range(args.changes)])
            dt = time.perf_counter() - t0
            proc = time.process_time() - p0
            writer = await store.run(lambda db: thread_cpu()) - c0
            print(f"state changes ({how}), {in_flight:>3} in flight:"
                  f" {args.changes / dt:8,.0f}/s"
                  f" ({1000 * dt / args.changes:.3f} ms each; writer thread CPU"
                  f" {1000 * writer / args.changes:.3f} ms, process CPU"
                  f" {1000 * proc / args.changes:.3f} ms per change)"
                  f"; load {os.getloadavg()[0]:.2f}", flush=True)
        beats = {hid: time.time() for hid, _ in creds}
        times = []
        for _ in range(args.flushes):
            t0 = time.perf_counter()
            await store.save_heartbeats(beats)
            times.append(time.perf_counter() - t0)
        times.sort()
        print(f"heartbeat flush of {len(beats):,} rows: {1000 * times[len(times) // 2]:.1f} ms"
              f" (median of {args.flushes}; fastest {1000 * times[0]:.1f} ms)"
              f"; load {os.getloadavg()[0]:.2f}", flush=True)
        await store.stop()

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
