"""
C{zwrm events [--topic host|machine|drain|app|cert] [--after ID | --since WHEN] [--limit N]
[--follow] [--json]}: the control plane's event history (C{zwrm.event.history}), and with
C{--follow} the events as they happen.  C{--since} (C{30m}, C{24h}, C{7d} or a UTC time, as
for C{zwrm audit}) prints every event stored since then.

A follower subscribes to the topics, then reads the history after the last id it printed
(until the answer says there is no C{more}), then prints what arrived meanwhile and from then
on: each event once, in id order.  When the connection drops it connects again (backoff with
jitter, for ever; a line on stderr says so) and resumes from the last id it printed, so it
loses nothing the control plane still keeps.  If the control plane no longer keeps the events
after that id (C{zwrm.error.history_gone}: pruned, or its database was restored), it says so
on stderr, once, and goes on from the control plane's newest id.

Output: one line per event (C{TIME  #ID  TOPIC  KIND  SUBJECT  DETAIL}), or with C{--json}
one JSON object per line (C{{id, ts, topic, kind, subject, payload}}, as published).
"""

import json
import random
import sys
import time

from autobahn.wamp.exception import ApplicationError, TransportLost
from twisted.internet import defer, task

from zwrm.cli.audit import parse_since
from zwrm.cli.client import (
    EXIT_AUTH,
    EXIT_CONFIG,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_URL,
    CliError,
    call,
    close,
    connect,
    count_arg,
    load_settings,
)

TOPICS = ("host", "machine", "drain", "app", "cert")
GONE = "zwrm.error.history_gone"

RETRY_INITIAL = 0.5
RETRY_MAX = 10.0
"""Seconds between attempts to connect again: from the first, doubling up to the second."""

PAGE = 1000
"""Events read per call while catching up."""


def register(subparsers):
    p = subparsers.add_parser(
        "events", help="the cluster's event history; --follow for live events",
        description="Print the control plane's stored events (oldest first); with --follow,"
                    " go on printing them as they happen, resuming after a reconnect from"
                    " the last event printed.")
    p.add_argument("--topic", action="append", choices=TOPICS, metavar="TOPIC",
                   help="only this topic: host, machine, drain, app or cert (repeatable)")
    since = p.add_mutually_exclusive_group()
    since.add_argument("--after", type=_event_id, metavar="ID",
                       help="the events after this id (default: the newest --limit)")
    since.add_argument("--since", metavar="WHEN",
                       help="every event since a duration ago (30m, 24h, 7d) or a time (UTC)")
    p.add_argument("--limit", type=count_arg("events", 1, 10000), default=20, metavar="N",
                   help="without --after or --since, the newest N events (default 20)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing events as they happen (until interrupted)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=events)


def _event_id(text):
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an event id (an integer)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: an event id is not negative")
    return value


class Gone(Exception):
    """C{zwrm.error.history_gone}: C{message}, and C{last_id} to go on from."""

    def __init__(self, message, last_id):
        Exception.__init__(self, message)
        self.message = message
        self.last_id = last_id


class _GoneAware:
    """A session whose C{zwrm.error.history_gone} answers are L{Gone}, not a CliError."""

    def __init__(self, session):
        self._session = session

    def __getattr__(self, name):
        return getattr(self._session, name)

    def call(self, *args, **kwargs):
        def convert(failure):
            e = failure.value
            if isinstance(e, ApplicationError) and e.error == GONE:
                raise Gone(e.args[0] if e.args else GONE, (e.kwargs or {}).get("last_id"))
            return failure

        return defer.maybeDeferred(self._session.call, *args, **kwargs).addErrback(convert)


def _when(ts):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts or 0))


def _detail(event):
    p = event.get("payload")
    if not isinstance(p, dict):
        return ""
    parts = []
    state = p.get("state") or p.get("phase")
    if state:
        old = p.get("old")
        parts.append(f"{state} (was {old})" if old and old != state else str(state))
    for key in ("app", "host_id", "machine_id", "drain_id"):
        value = p.get(key)
        if value and value != event.get("subject"):
            parts.append(f"{key}={value}")
    if p.get("reason"):
        parts.append(f"reason: {p['reason']}")
    return "  ".join(parts)


def format_event(event, as_json):
    """One line for C{event}."""
    if as_json:
        return json.dumps(event, sort_keys=True)
    topic = str(event.get("topic", "")).rsplit(".", 1)[-1]
    cols = [_when(event.get("ts")), f"#{event.get('id')}", topic.ljust(7),
            str(event.get("kind", "")).ljust(10), str(event.get("subject", ""))]
    detail = _detail(event)
    return "  ".join(cols + ([detail] if detail else []))


class Printer:
    """Prints each event once, in id order: C{last} is the id of the last one printed."""

    def __init__(self, out, as_json, last=None):
        self.out = out
        self.as_json = as_json
        self.last = last
        self.printed = 0

    def emit(self, event):
        event_id = event.get("id") if isinstance(event, dict) else None
        if not isinstance(event_id, int) or (self.last is not None and event_id <= self.last):
            return
        self.out.write(format_event(event, self.as_json) + "\n")
        if hasattr(self.out, "flush"):
            self.out.flush()
        self.last = event_id
        self.printed += 1


async def _catch_up(session, printer, topics, after=None, limit=None, since=None):
    """
    Print the history after C{printer.last} (else after C{after}, else every event since
    the time C{since}, else the newest C{limit}).

    @return: the cursor to follow from.
    """
    kw = {"topics": topics} if topics else {}
    if after is None and printer.last is None and since is None:
        page = await call(session, "zwrm.event.history", limit=limit or PAGE, **kw)
        for e in page["events"]:
            printer.emit(e)
        return page["cursor"]
    cursor = printer.last if printer.last is not None else after
    while True:
        where = {"after": cursor} if cursor is not None else {"since": since}
        page = await call(session, "zwrm.event.history", limit=PAGE, **where, **kw)
        for e in page["events"]:
            printer.emit(e)
        cursor = page["cursor"]
        if not page["more"]:
            return cursor


async def follow_once(reactor, session, printer, topics, limit=None, err=None, since=None):
    """
    Follow on one session until its connection ends: subscribe, catch up from
    C{printer.last}, then print events as they come.  A history that no longer holds the
    events after C{printer.last} is said on C{err}, and the follower goes on from the newest.

    Without a topic filter the ids a follower sees are consecutive; an event whose id skips
    some (they were stored but not published to this session: the control component was off
    an external router for a while) has the follower catch up again from its last id first.
    """
    err = err or sys.stderr
    session = _GoneAware(session)
    buffered = []
    state = {"live": False, "signal": None, "ended": False}

    def wake():
        signal = state["signal"]
        if signal is not None and not signal.called:
            signal.callback(None)

    def on_event(event=None, *args, **kwargs):
        if state["live"]:
            event_id = event.get("id") if isinstance(event, dict) else None
            if (topics is None and isinstance(event_id, int) and printer.last is not None
                    and event_id > printer.last + 1):
                state["live"] = False  # a gap: read the history first
                buffered.append(event)
                wake()
                return
            printer.emit(event)
        else:
            buffered.append(event)

    def ended(result):
        state["ended"] = True
        wake()
        return result

    for name in topics or TOPICS:
        try:
            await session.subscribe(on_event, f"zwrm.event.{name}")
        except TransportLost:
            raise CliError("lost the connection while subscribing", EXIT_UNREACHABLE) from None
        except ApplicationError as e:
            raise CliError(f"not allowed to follow zwrm.event.{name}: {e.error}",
                           EXIT_AUTH) from None
    session.ended.addBoth(ended)
    while not state["ended"]:
        try:
            cursor = await _catch_up(session, printer, topics, limit=limit, since=since)
        except Gone as e:
            err.write(f"zwrm: events were lost: {e.message}\n")
            printer.last = e.last_id
            cursor = await _catch_up(session, printer, topics)
        limit = since = None
        if cursor is not None and (printer.last is None or cursor > printer.last):
            printer.last = cursor  # every event up to it that matches was printed
        for event in sorted((e for e in buffered if isinstance(e, dict)
                             and isinstance(e.get("id"), int)), key=lambda e: e["id"]):
            printer.emit(event)
        buffered.clear()
        state["signal"] = defer.Deferred()
        state["live"] = True
        if not state["ended"]:
            await state["signal"]


async def events(reactor, args, out=None, err=None, settings=None):
    out = out or sys.stdout
    err = err or sys.stderr
    settings = settings or load_settings(args.api_url)
    topics = list(dict.fromkeys(args.topic or [])) or None
    printer = Printer(out, args.json, last=args.after)
    since = parse_since(args.since) if getattr(args, "since", None) is not None else None
    if not args.follow:
        session = await connect(reactor, settings)
        try:
            await _catch_up(_GoneAware(session), printer, topics, after=args.after,
                            limit=args.limit, since=since)
        except Gone as e:
            raise CliError(e.message) from None
        finally:
            await close(session)
        return 0
    # Interrupted (Ctrl-C, SIGTERM): the reactor's shutdown closes the connection, which
    # is then the end asked for, not a loss to say and reconnect after.
    stopping = []
    trigger = reactor.addSystemEventTrigger("before", "shutdown", stopping.append, True)
    try:
        return await _follow(reactor, settings, printer, topics, args, since, err, stopping)
    finally:
        if not stopping:  # (once fired, the reactor has let go of it)
            reactor.removeSystemEventTrigger(trigger)


async def _follow(reactor, settings, printer, topics, args, since, err, stopping):
    first = True
    delay = RETRY_INITIAL
    while True:
        try:
            session = await connect(reactor, settings)
        except CliError as e:
            if first or e.code in (EXIT_AUTH, EXIT_CONFIG, EXIT_URL):
                raise
            err.write(f"zwrm: {e.message}; trying again in {delay:.1f} s\n")
            await task.deferLater(reactor, delay * random.uniform(0.5, 1.0), lambda: None)
            delay = min(delay * 2, RETRY_MAX)
            continue
        try:
            await follow_once(reactor, session, printer, topics,
                              limit=args.limit if first else None, err=err,
                              since=since if first else None)
        except CliError as e:
            if e.code not in (EXIT_UNREACHABLE, EXIT_TIMEOUT):
                raise
        except defer.CancelledError:
            await close(session)
            raise
        if stopping:
            return 0
        err.write(f"zwrm: lost the connection; reconnecting (resuming after event"
                  f" #{printer.last})\n")
        first = False
        delay = RETRY_INITIAL
        await task.deferLater(reactor, delay * random.uniform(0.5, 1.0), lambda: None)
