"""
C{zwrm audit [--since DURATION|TIME] [--procedure URI] [--authid AUTHID] [--limit N]
[--json]}: the audit trail (C{zwrm.audit.list}, operator role): each operator action with
its time, actor (authid and role), procedure, arguments (secrets redacted) and result.
"""

import json
import re
import sys
import time
from datetime import UTC, datetime

from zwrm.cli.client import EXIT_USAGE, CliError, call, close, connect, load_settings, print_json

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text, now=None):
    """
    A POSIX time from a duration back from now (C{90s}, C{30m}, C{24h}, C{7d}) or an ISO
    8601 time (C{2026-12-02T21:00:00}, UTC unless it says otherwise).

    @raise CliError: (usage) for anything else.
    """
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", str(text))
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = datetime.fromisoformat(str(text).strip())
    except ValueError:
        raise CliError(f"--since {text!r}: give a duration such as 30m, 24h or 7d, or a time"
                       " such as 2026-12-02T21:00:00 (UTC)", EXIT_USAGE) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def register(subparsers):
    p = subparsers.add_parser(
        "audit", help="who did what: the operator actions the control plane stored",
        description="Print the audit trail, oldest first: each state-changing call made by"
                    " an operator, with its time, actor, arguments (secrets redacted) and"
                    " result. Operators only.")
    p.add_argument("--since", metavar="WHEN",
                   help="only entries since a duration ago (30m, 24h, 7d) or a time (UTC)")
    p.add_argument("--procedure", metavar="URI", help="only calls of this procedure")
    p.add_argument("--authid", metavar="AUTHID", help="only calls by this authid")
    p.add_argument("--limit", type=int, default=100, metavar="N",
                   help="the newest N entries (default 100, at most 10000)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=audit)


def _when(ts):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts or 0))


def _args(args):
    text = json.dumps(args, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= 120 else text[:117] + "..."


def format_entries(entries, out):
    """Write the C{zwrm audit} table."""
    rows = [["TIME (UTC)", "ACTOR", "PROCEDURE", "RESULT", "ARGUMENTS"]]
    for e in entries:
        rows.append([_when(e.get("ts")), f"{e.get('authid')} ({e.get('role')})",
                     str(e.get("procedure")), str(e.get("result")), _args(e.get("args"))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        out.write("  ".join(v.ljust(w) for v, w in zip(r[:-1], widths, strict=True))
                  + "  " + r[-1] + "\n")


async def audit(reactor, args, out=None):
    out = out or sys.stdout
    if not 1 <= args.limit <= 10000:
        raise CliError(f"--limit {args.limit}: give 1 to 10000", EXIT_USAGE)
    kw = {"limit": args.limit}
    if args.since is not None:  # ("" is no time: refused, not taken as no filter)
        kw["since"] = parse_since(args.since)
    if args.procedure:
        kw["uri"] = args.procedure
    if args.authid:
        kw["authid"] = args.authid
    session = await connect(reactor, load_settings(args.api_url))
    try:
        entries = await call(session, "zwrm.audit.list", **kw)
    finally:
        await close(session)
    if args.json:
        print_json(entries, out)
    else:
        format_entries(entries, out)
    return 0
