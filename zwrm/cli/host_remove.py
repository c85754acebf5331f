"""
C{zwrm host remove <host-id> [--recover-volumes] [--forget-volumes]}: remove an offline host
from the cluster
(C{zwrm.host.remove}; docs/operators.md, "Removing a host").

Refused, with one line saying why and nothing changed, while the host is not offline, while
a drain involves it, while a machine is recorded live on it, and while it holds volumes
unless C{--recover-volumes} makes them again from their replicas on other hosts or
C{--forget-volumes} gives their data up.
"""

import sys
import time

from zwrm.cli.client import call_once, print_json, working


def register_remove(hsub):
    """Add C{remove} to the C{zwrm host} subcommands."""
    rm = hsub.add_parser(
        "remove", help="remove an offline host (retired or lost) from the cluster",
        description="Remove a host that is gone from the cluster: only an offline one. To"
                    " retire a working host: `zwrm host drain HOST`, stop its agent"
                    " (systemctl stop zwrm-agent), and once `zwrm host list` shows it"
                    " offline, `zwrm host remove HOST`. A host holding volumes is refused"
                    " unless --recover-volumes makes them again from their replicas (zwrm"
                    " volumes replicate) or --forget-volumes gives up their data. Its agent,"
                    " started again"
                    " with a valid join token, joins as a new host (docs/operators.md,"
                    " \"Removing a host\").")
    rm.add_argument("host_id", help="the host's id (zwrm host list)")
    rm.add_argument("--forget-volumes", action="store_true",
                    help="also give up the volumes that live only on it (their replicas get"
                         " new, empty volumes elsewhere)")
    rm.add_argument("--recover-volumes", action="store_true",
                    help="make each of its volumes again on the host of its newest replica "
                         "(the data of that replica's snapshot; what was written since is "
                         "lost with the host)")
    rm.add_argument("--json", action="store_true", help="print JSON")
    rm.set_defaults(func=host_remove)


def format_removal(result, out):
    """Write what C{zwrm.host.remove} did, a line each."""
    out.write(f"host {result['host_id']} removed\n")
    for v in result.get("volumes_recovered") or ():
        out.write(f"  volume {v['volume_id']} recovered on {v['host_id']} from its replica of"
                  f" snapshot {v['snapshot']} (taken "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(v['taken_at']))} UTC)\n")
    for v in result["volumes_forgotten"]:
        out.write(f"  volume {v} forgotten (its data was only on that host)\n")
    kept = [r for r in result.get("replicas_forgotten") or () if r["host_id"] == result["host_id"]]
    if kept:
        volumes = sorted({r["volume_id"] for r in kept})
        out.write(f"  {len(kept)} replica(s) it kept of volumes {', '.join(volumes)} gone with it"
                  " (zwrm volumes replicas: replicate them again elsewhere)\n")
    for r in result["rescheduled"]:
        out.write(f"  {r['app']}: replicas {', '.join(map(str, r['replicas']))} placed again\n")
    for r in result["not_placed"]:
        out.write(f"  {r['app']}: replicas {', '.join(map(str, r['replicas']))} not placed"
                  f" again: {r['error']}\n")


async def host_remove(reactor, args, out=None):
    out = out or sys.stdout
    result = await call_once(reactor, args.api_url, "zwrm.host.remove", args.host_id,
                             forget_volumes=args.forget_volumes,
                             recover_volumes=args.recover_volumes,
                             on_progress=working("recovering volumes")
                             if args.recover_volumes else None)
    if args.json:
        print_json(result, out)
    else:
        format_removal(result, out)
    return 1 if result["not_placed"] else 0
