"""
C{zwrm certs add|list|remove}: the TLS certificates the ingress serves for published
ports in C{https} mode (C{zwrm deploy --publish 443:8080/https --domain NAME}).

The procedures these commands call (operator role, prefix C{zwrm.cert.}; see
L{zwrm.control.resources.certs}):

  - C{zwrm.cert.add(domain, cert, key)} -> the certificate's wire form (never its key);
    C{zwrm.error.invalid_argument} naming C{domain}, C{cert} or C{key} when they do not
    parse, do not match, have expired or do not cover the domain;
  - C{zwrm.cert.list()} -> a list of wire forms;
  - C{zwrm.cert.remove(domain)} -> C{{"domain", "removed"}}; C{zwrm.error.not_found}.
"""

import sys
import time

from zwrm.cli.client import EXIT_CONFIG, CliError, call_once, print_json

MAX_FILE = 64 * 1024


def register(subparsers):
    certs = subparsers.add_parser("certs", aliases=["cert"], help="TLS certificates of the ingress (https ports)")
    csub = certs.add_subparsers(dest="certs_command", metavar="SUBCOMMAND")
    csub.required = True
    add = csub.add_parser("add", help="store (or replace) the certificate of a domain")
    add.add_argument("domain", help="www.example.com, or *.example.com")
    add.add_argument("--cert", required=True, metavar="FILE",
                     help="the certificate, then its chain (PEM)")
    add.add_argument("--key", required=True, metavar="FILE",
                     help="its private key (PEM, without a passphrase)")
    add.add_argument("--json", action="store_true", help="print JSON")
    add.set_defaults(func=certs_add)
    ls = csub.add_parser("list", help="every certificate (never the keys)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=certs_list)
    rm = csub.add_parser("remove", help="remove the certificate of a domain")
    rm.add_argument("domain")
    rm.add_argument("--json", action="store_true", help="print JSON")
    rm.set_defaults(func=certs_remove)


def _with_session(reactor, args, procedure, *cargs, **ckwargs):
    return call_once(reactor, args.api_url, procedure, *cargs, **ckwargs)


def _read(path, what):
    """The text of a PEM file. @raise CliError: (exit 5) naming the option and the path."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise CliError(f"--{what} {path}: {e.strerror or e}", EXIT_CONFIG) from None
    if len(data) > MAX_FILE:
        raise CliError(f"--{what} {path}: larger than {MAX_FILE // 1024} KiB; is it a PEM file?",
                       EXIT_CONFIG)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise CliError(f"--{what} {path}: not a PEM file (PEM is text; convert DER with "
                       f"openssl)", EXIT_CONFIG) from None


def _when(seconds):
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(seconds))


def format_certs(certs, out):
    """Write the C{zwrm certs list} table."""
    rows = [["DOMAIN", "NAMES", "EXPIRES (UTC)", "ISSUER", "SHA-256"]]
    for c in certs:
        rows.append([c["domain"], ",".join(c.get("names") or []) or "-", _when(c.get("not_after")),
                     c.get("issuer") or "-", (c.get("fingerprint") or "-")[:16]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n")



async def certs_add(reactor, args, out=None, session_call=None):
    out = out or sys.stdout
    cert, key = _read(args.cert, "cert"), _read(args.key, "key")
    session_call = session_call or _with_session
    result = await session_call(reactor, args, "zwrm.cert.add", args.domain, cert, key)
    if args.json:
        return print_json(result, out)
    out.write(f"{result['domain']}: certificate {result['fingerprint'][:16]} for "
              f"{', '.join(result['names'])}, valid until {_when(result['not_after'])} UTC; "
              "every agent's ingress serves it\n")
    return 0


async def certs_list(reactor, args, out=None, session_call=None):
    out = out or sys.stdout
    session_call = session_call or _with_session
    certs = await session_call(reactor, args, "zwrm.cert.list")
    if args.json:
        return print_json(certs, out)
    format_certs(certs, out)
    return 0


async def certs_remove(reactor, args, out=None, session_call=None):
    out = out or sys.stdout
    session_call = session_call or _with_session
    result = await session_call(reactor, args, "zwrm.cert.remove", args.domain)
    if getattr(args, "json", False):
        return print_json(result, out)
    out.write(f"removed the certificate of {args.domain}\n")
    return 0
