"""
C{zwrm host drain|drain-status|undrain|activate <host-id>} (see docs/drain.md).
"""

import sys

from twisted.internet import defer, task

from zwrm.cli.client import call, close, connect, load_settings, print_json, seconds_of
from zwrm.drain_phases import DRAIN_MODES
from zwrm.drain_phases import DRAIN_TERMINAL as TERMINAL  # the states a drain ends in


def _duration(text):
    """C{90}, C{90s}, C{15m}, C{2h} -> seconds."""
    return seconds_of(text)


def register_host_commands(hsub):
    """Add the drain commands to C{zwrm host}'s subparsers."""
    dr = hsub.add_parser("drain", help="move every machine off a host (then maintenance)")
    dr.add_argument("host_id")
    dr.add_argument("--deadline", default="1h",
                    help="migrations not started by then are not moved (default 1h)")
    dr.add_argument("--max-parallel", type=int, default=1, help="migrations at a time (1)")
    dr.add_argument("--healthy-deadline", default="5m",
                    help="time a replacement has to become healthy (default 5m)")
    dr.add_argument("--min-healthy", default="10s",
                    help="how long it must stay healthy before the move commits (10s)")
    dr.add_argument("--poll", default="1s",
                    help="how often the control plane reads copy progress (1s)")
    dr.add_argument("--mode", choices=DRAIN_MODES, default="auto",
                    help="how machines with volumes move: auto (live where both hosts can, "
                         "else cold; the default), live (refused if one cannot) or cold")
    dr.add_argument("--downtime-limit", type=float, default=None, metavar="MS",
                    help="longest pause of a live move, in milliseconds (agents' default 300)")
    dr.add_argument("--live-deadline", default=None,
                    help="time the RAM migration of a live move may take before it gives up "
                         "(moved cold in auto mode) or, with --postcopy, switches to "
                         "post-copy (agents' default 2m)")
    dr.add_argument("--postcopy", action="store_true",
                    help="allow post-copy at the live deadline (the target then runs while "
                         "the rest of the RAM arrives: losing it then loses the machine)")
    dr.add_argument("--dry-run", action="store_true",
                    help="print the plan (each machine, its target or why none); change nothing")
    dr.add_argument("--detach", action="store_true", help="start it and return")
    dr.add_argument("--json", action="store_true", help="print JSON")
    dr.set_defaults(func=host_drain)
    st = hsub.add_parser("drain-status", help="progress of a host's drain")
    st.add_argument("host_id")
    st.add_argument("--watch", action="store_true", help="refresh until the drain ends")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=host_drain_status)
    un = hsub.add_parser("undrain", help="cancel a drain; the host returns to ready")
    un.add_argument("host_id")
    un.add_argument("--json", action="store_true", help="print JSON")
    un.set_defaults(func=host_undrain)
    ac = hsub.add_parser("activate", help="return a drained host to ready")
    ac.add_argument("host_id")
    ac.add_argument("--json", action="store_true", help="print JSON")
    ac.set_defaults(func=host_activate)


def _size(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024


def format_plan(result, out):
    out.write(f"drain of {result['host_id']}"
              f"{' (dry run)' if result['drain_id'] is None else ': ' + result['drain_id']}\n")
    for p in result["plan"]:
        where = p["target"] or f"no target: {p['reason']}"
        snaps = f", {p['snapshots']} snapshot(s)" if p.get("snapshots") else ""
        vols = f" ({len(p['volumes'])} volume(s){snaps})" if p["volumes"] else ""
        how = ""
        if p.get("mode") and p["volumes"]:
            how = f"  [{p['mode']}" + (f": {p['mode_reason']}" if p.get("mode_reason")
                                       and p["mode"] == "cold" else "") + "]"
        out.write(f"  {p['machine_id']}  {p['app'] or '-'}{vols}  -> {where}{how}\n")
    if not result["plan"]:
        out.write("  no machines to move\n")
    for r in result.get("replicas") or ():
        where = r["target"] or f"stays: {r['reason']}"
        out.write(f"  replica {r['replica']}  {r['name']} of {r['volume_id']}  -> {where}\n")


def _live_line(m):
    """What a live move is doing (its last progress), or None."""
    live = m.get("live")
    if not live:
        return None
    mirror, ram = live.get("mirror") or {}, live.get("ram") or {}
    phase = live.get("phase") or "-"
    text = (f"{phase}: mirrored {_size(mirror.get('done'))} of {_size(mirror.get('total'))}"
            f" at {_size(mirror.get('rate') or 0)}/s")
    if ram.get("passes"):
        text += (f", RAM pass {ram['passes']} ({_size(ram.get('transferred'))} sent,"
                 f" {_size(ram.get('remaining'))} left)")
    if phase == "switching":
        text += ", switching over"
    return text


def format_status(s, out):
    out.write(f"drain {s['drain_id']} of {s['host_id']}: {s['state']} "
              f"(host {s['host_state']})\n")
    for m in s["migrations"]:
        rate = f"{_size(m['rate'])}/s" if m["rate"] else "-"
        eta = f"{m['eta']:.0f}s" if m["eta"] is not None else "-"
        mode = f" ({m['mode']})" if m.get("mode") and m.get("volumes") else ""
        line = f"  {m['machine_id']}  {m['app'] or '-'}  {m['phase']}{mode}  -> {m['target'] or '-'}"
        if m["bytes_sent"] or not (m.get("mode") == "live" or m.get("live")):
            # (a live move's volumes go through QEMU's mirror: its progress is the live part)
            line += (f"  sent {_size(m['bytes_sent'])} (image {_size(m['bytes_total'])})"
                     f"  {rate}  eta {eta}")
        live = _live_line(m)
        if live is not None:
            line += f"  [{live}]"
        if m.get("downtime_ms") is not None:
            line += f"  pause {m['downtime_ms']} ms (QEMU)"
        elif m.get("downtime") is not None:
            line += f"  downtime {m['downtime']:.1f}s"
        verified = m.get("verified") or {}
        if verified:
            ok = sum(1 for v in verified.values() if v.get("ok"))
            line += f"  verified {ok}/{len(m.get('volumes') or verified)}"
        if m.get("mode") == "cold" and m.get("mode_reason") and m.get("volumes") \
                and m["phase"] not in ("done",):
            line += f"  (cold: {m['mode_reason']})"
        if m["error"]:
            line += f"  error: {m['error']}"
        out.write(line + "\n")
    for r in s.get("replicas") or ():
        line = f"  replica {r['replica']}  {r['name']} of {r['volume_id']}  {r['state']}"
        if r.get("target"):
            line += f"  -> {r['target']}"
        if r.get("reason"):
            line += f"  ({r['reason']})"
        out.write(line + "\n")


DRAIN_TOPIC = "zwrm.event.drain"
REFRESH = 60.0
"""Seconds without an event of the drain after which its status is read anyway."""
POLL_INTERVAL = 1.0
"""Seconds between reads of the status for a session that may not subscribe."""


async def _follow(reactor, session, host_id, out, as_json, interval=None, refresh=None):
    """
    Print the drain's status each time its state, or a migration's phase or error, changed,
    until the drain ends.  The status is read again on each event of the drain
    (C{zwrm.event.drain}: every change of its state, phases and of what a migration waits
    for is announced), or after C{refresh} seconds without one; a session that may not
    subscribe reads it every C{interval} seconds instead.
    """
    interval = POLL_INTERVAL if interval is None else interval
    refresh = REFRESH if refresh is None else refresh
    wake = [defer.Deferred()]
    drain_id = [None]

    def on_event(event=None, *args, **kwargs):
        payload = event.get("payload") if isinstance(event, dict) else None
        if isinstance(payload, dict) and payload.get("host_id") != host_id \
                and payload.get("drain_id") not in (None, drain_id[0]):
            return  # another host's drain
        if not wake[0].called:
            wake[0].callback(None)

    def ended(result):  # a lost connection: the next read says so (exit 3)
        if not wake[0].called:
            wake[0].callback(None)
        return result

    if isinstance(getattr(session, "ended", None), defer.Deferred):
        session.ended.addBoth(ended)
    try:
        subscription = await session.subscribe(on_event, DRAIN_TOPIC)
    except Exception:
        subscription = None  # not allowed to subscribe: read the status every interval
    try:
        last = None
        while True:
            wake[0] = defer.Deferred()  # before the read: an event meanwhile is not missed
            s = await call(session, "zwrm.host.drain_status", host_id)
            drain_id[0] = s["drain_id"]
            if not as_json:
                key = [(m["phase"], m["error"]) for m in s["migrations"]] + [
                    (r["replica"], r["state"]) for r in s.get("replicas") or ()] + [s["state"]]
                if key != last:
                    format_status(s, out)
                    last = key
            if s["state"] in TERMINAL:
                if as_json:
                    print_json(s, out)
                return 0 if s["state"] == "completed" else 1
            if subscription is None:
                await task.deferLater(reactor, interval, lambda: None)
            else:
                await _first(reactor, wake[0], refresh)
    finally:
        if subscription is not None:
            try:
                await subscription.unsubscribe()
            except Exception:
                pass  # the session is closing


def _first(reactor, d, seconds):
    """A Deferred firing when C{d} fires or after C{seconds}, whichever comes first."""
    done = defer.Deferred()
    timer = reactor.callLater(seconds, lambda: done.called or done.callback(None))

    def fired(result):
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(None)

    d.addBoth(fired)
    return done


async def host_drain(reactor, args, out=None):
    out = out or sys.stdout
    kw = {"deadline": _duration(args.deadline), "max_parallel": args.max_parallel,
          "healthy_deadline": _duration(args.healthy_deadline),
          "min_healthy": _duration(args.min_healthy), "dry_run": args.dry_run,
          "poll": _duration(args.poll), "mode": args.mode}
    if getattr(args, "downtime_limit", None) is not None:
        kw["downtime_limit"] = args.downtime_limit
    if getattr(args, "live_deadline", None) is not None:
        kw["live_deadline"] = _duration(args.live_deadline)
    if getattr(args, "postcopy", False):
        kw["postcopy"] = True
    session = await connect(reactor, load_settings(args.api_url))
    try:
        result = await call(session, "zwrm.host.drain", args.host_id, **kw)
        if args.json and (args.dry_run or args.detach):
            print_json(result, out)
            return 0
        if not args.json:
            format_plan(result, out)
        if args.dry_run or args.detach:
            return 0
        return await _follow(reactor, session, args.host_id, out, args.json)
    finally:
        await close(session)


async def host_drain_status(reactor, args, out=None):
    out = out or sys.stdout
    session = await connect(reactor, load_settings(args.api_url))
    try:
        if args.watch:
            await _follow(reactor, session, args.host_id, out, args.json)
            return 0
        s = await call(session, "zwrm.host.drain_status", args.host_id)
        if args.json:
            print_json(s, out)
        else:
            format_status(s, out)
        return 0
    finally:
        await close(session)


async def _simple(reactor, args, procedure, out):
    out = out or sys.stdout
    session = await connect(reactor, load_settings(args.api_url))
    try:
        r = await call(session, procedure, args.host_id)
    finally:
        await close(session)
    if getattr(args, "json", False):
        print_json(r, out)
    else:
        out.write(f"{r['host_id']}: {r['state']}\n")
    return 0


def host_undrain(reactor, args, out=None):
    return _simple(reactor, args, "zwrm.host.undrain", out)


def host_activate(reactor, args, out=None):
    return _simple(reactor, args, "zwrm.host.activate", out)
