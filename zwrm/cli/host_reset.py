"""
C{zwrm host reset <host-id>}: let a host whose agent lost its credential join again.

A join token admits only new hosts: C{zwrm.agent.join} with the id of a host that has
already joined is refused unless the caller proves that host's credential.  This command
calls C{zwrm.host.reset(host_id, ttl)}, after which one join with a join token for that id
is accepted within C{--ttl} (default 1h); the host's current credential stays valid until
then.
"""

import sys
import time

from zwrm.cli.client import call, close, connect, load_settings, print_json
from zwrm.cli.tokens import parse_ttl


def register_reset(hsub):
    """Add C{reset} to the C{zwrm host} subcommands."""
    reset = hsub.add_parser("reset", help="let a host that lost its credential join again")
    reset.add_argument("host_id")
    reset.add_argument("--ttl", default="1h", help="how long the permission lasts (default 1h)")
    reset.add_argument("--json", action="store_true", help="print JSON")
    reset.set_defaults(func=host_reset)


async def host_reset(reactor, args, out=None):
    out = out or sys.stdout
    ttl = parse_ttl(args.ttl)
    session = await connect(reactor, load_settings(args.api_url))
    try:
        result = await call(session, "zwrm.host.reset", args.host_id, ttl=ttl)
    finally:
        await close(session)
    if getattr(args, "json", False):
        print_json(result, out)
        return 0
    until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(result["expires_at"]))
    out.write(f"host {result['host_id']} may join again with a join token until {until}\n")
    return 0
