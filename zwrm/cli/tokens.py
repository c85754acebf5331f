"""
C{zwrm tokens create|list|revoke}: the control plane's join tokens.

The procedures these commands call (operator role, prefix C{zwrm.token.}):

  - C{zwrm.token.create(ttl=<seconds>, description=<str>)} -> C{{"token": <text>, "id": <id>,
    "expires_at": <POSIX time>}}; the token text (C{zwrm1.<id>.<secret>.<ca-fingerprint>}, see
    L{zwrm.pki.JoinToken}) is shown this once.
  - C{zwrm.token.list()} -> a list of C{{"id", "description", "created_at", "expires_at",
    "revoked", "used", "state"}} (state: valid, expired or revoked), as
    L{zwrm.pki.JoinTokens.list} returns them.
  - C{zwrm.token.revoke(id)} -> C{None}; C{zwrm.error.not_found} for an unknown id.
"""

import re
import sys
import time

from zwrm.cli.client import EXIT_USAGE, CliError, call_once, print_json

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text):
    """
    A duration: seconds (C{3600}) or a number with a unit (C{90s}, C{30m}, C{24h}, C{7d}).

    @raise CliError: (usage) for anything else.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise CliError(
            f"--ttl {text!r}: give a positive duration such as 3600, 30m, 24h or 7d", EXIT_USAGE
        )
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def register(subparsers):
    tokens = subparsers.add_parser(
        "tokens", aliases=["token"], help="join tokens for adding hosts; operator and viewer tokens")
    tsub = tokens.add_subparsers(dest="tokens_command", metavar="SUBCOMMAND")
    tsub.required = True
    create = tsub.add_parser("create", help="create a token and print it (once)")
    create.add_argument("--role", choices=("join", "operator", "viewer"), default="join",
                        help="join (an agent joins with it; the default), operator (may change"
                             " the cluster) or viewer (may only read it): the ticket of"
                             " authid operator or viewer")
    create.add_argument("--ttl", "--expires", dest="ttl", default="24h", metavar="DURATION",
                        help="how long it is valid: 3600, 30m, 24h, 7d (default 24h)")
    create.add_argument("--description", default="", help="a note, e.g. the rack it is for")
    create.add_argument("--json", action="store_true", help="print JSON")
    create.set_defaults(func=tokens_create)
    ls = tsub.add_parser("list", help="every token (never their secrets)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=tokens_list)
    revoke = tsub.add_parser("revoke", help="revoke a token")
    revoke.add_argument("token_id", help="the token's id (or its whole text)")
    revoke.add_argument("--json", action="store_true", help="print JSON")
    revoke.set_defaults(func=tokens_revoke)


def _with_session(reactor, args, procedure, *cargs, **ckwargs):
    return call_once(reactor, args.api_url, procedure, *cargs, **ckwargs)


def _when(seconds):
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def format_tokens(tokens, out):
    """Write the C{zwrm tokens list} table."""
    roles = any((t.get("role") or "join") != "join" for t in tokens)
    rows = [["ID"] + (["ROLE"] if roles else [])
            + ["STATE", "EXPIRES (UTC)", "CREATED (UTC)", "USED", "DESCRIPTION"]]
    for t in tokens:
        rows.append(
            [
                t["id"],
            ] + ([t.get("role") or "join"] if roles else []) + [
                t["state"],
                _when(t["expires_at"]),
                _when(t.get("created_at")),
                "-" if "used" in t and t["used"] is None else str(t.get("used", 0)),
                t.get("description") or "-",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n")


async def tokens_create(reactor, args, out=None, session_call=None):
    out = out or sys.stdout
    ttl = parse_ttl(args.ttl)
    session_call = session_call or _with_session
    role = getattr(args, "role", "join") or "join"
    kw = {"role": role} if role != "join" else {}
    result = await session_call(
        reactor, args, "zwrm.token.create", ttl=ttl, description=args.description, **kw
    )
    if args.json:
        print_json(result, out)
    else:
        out.write(result["token"] + "\n")
        use = f" (use it as the ticket of authid {role}: ZWRM_AUTHID={role})" \
            if role != "join" else ""
        sys.stderr.write(
            f"zwrm: {role} token {result['id']} is valid until {_when(result['expires_at'])}"
            f" UTC; it is shown only now{use}\n"
        )
    return 0


async def tokens_list(reactor, args, out=None, session_call=None):
    out = out or sys.stdout
    session_call = session_call or _with_session
    tokens = await session_call(reactor, args, "zwrm.token.list")
    if args.json:
        print_json(tokens, out)
    else:
        format_tokens(tokens, out)
    return 0


async def tokens_revoke(reactor, args, out=None, session_call=None):
    out = out or sys.stdout
    token_id = args.token_id.strip()
    if token_id.startswith("zwrm1."):
        token_id = token_id.split(".")[1]
    elif re.match(r"(operator|viewer)-", token_id):
        token_id = token_id.split(".")[0]  # an operator or viewer token, by id or text
    if not re.fullmatch(r"[a-z0-9]{6}|(operator|viewer)-[a-z0-9]{1,32}", token_id):
        raise CliError(f"{args.token_id!r} is not a token id (6 characters a-z, 0-9)", EXIT_USAGE)
    session_call = session_call or _with_session
    await session_call(reactor, args, "zwrm.token.revoke", token_id)
    if getattr(args, "json", False):
        print_json({"id": token_id, "revoked": True}, out)
    else:
        out.write(f"revoked {token_id}\n")
    return 0
