"""
C{zwrm host list} and C{zwrm host status <host-id>} (drain, reset and remove are in
modules of their own).
"""

import sys
import time

from zwrm.cli.client import (
    EXIT_AUTH,
    CliError,
    NotOffered,
    call,
    call_once,
    close,
    connect,
    count_arg,
    load_settings,
    print_json,
)
from zwrm.cli.drain import register_host_commands
from zwrm.cli.host_remove import register_remove
from zwrm.cli.host_reset import register_reset


def register(subparsers):
    host = subparsers.add_parser("host", aliases=["hosts"], help="hosts of the cluster")
    hsub = host.add_subparsers(dest="host_command", metavar="SUBCOMMAND")
    hsub.required = True
    ls = hsub.add_parser("list", help="every host, as a table")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=host_list)
    st = hsub.add_parser("status", help="everything known about one host")
    st.add_argument("host_id")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--events", type=count_arg("events", 0, 1000), default=20, metavar="N",
                    help="how many of its newest events (0 to 1000; default 20)")
    st.set_defaults(func=host_status)
    cl = hsub.add_parser(
        "clean", help="delete what a host keeps that the cluster does not record (zwrm host "
                      "status lists it)",
        description="Delete, on a ready or drained host, the volumes, snapshot files and "
                    "machine records (those down) its agent keeps that no record of the "
                    "cluster names there: a removed host's old ones once it joined again, "
                    "files a destroy left while the host was away. Nothing under way is "
                    "touched; what the agent refuses is kept and said (exit 1).")
    cl.add_argument("host_id", help="the host (zwrm host list)")
    cl.add_argument("--json", action="store_true", help="print JSON")
    cl.set_defaults(func=host_clean)
    register_host_commands(hsub)
    register_reset(hsub)
    register_remove(hsub)


def _with_session(reactor, args, procedure, *cargs):
    return call_once(reactor, args.api_url, procedure, *cargs)


def _age(seconds):
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def machine_state(m):
    """A machine's STATE cell: its state, and why its hypervisor holds it if it does."""
    return f"{m['state']} (paused: {m['paused']})" if m.get("paused") else m["state"]


#: What a machine's C{paused} means, for the line under a table.
PAUSED = {"disk-full": "a write to one of its disks waits for room on its host's disk; it "
                       "resumes by itself once there is room"}


def _table(headers, rows, out):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    for row in [headers, *rows]:
        out.write("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")


def format_hosts(hosts, out):
    """Write the C{zwrm host list} table."""
    headers = ["ID", "NAME", "REGION", "DATACENTER", "STATE", "VCPU", "MEMORY(MiB)", "MACHINES",
               "HEARTBEAT"]
    rows = [
        [
            h["id"],
            h["name"],
            h["region"] or "-",
            h["datacenter"] or "-",
            _state(h),
            f"{h['alloc_vcpus']}/{h['vcpus']}",
            f"{h['alloc_memory_mb']}/{h['memory_mb']}",
            h["machines"],
            _age(h["heartbeat_age"]),
        ]
        for h in hosts
    ]
    _table(headers, rows, out)


def _state(h):
    """
    A host's state, saying so when its agent is not connected (stopped, restarting, cut
    off) though the host is not offline yet: nothing is placed or called there meanwhile.
    """
    if h.get("executor") is False and h["state"] not in ("offline", "removed"):
        return f"{h['state']} (agent not connected)"
    return h["state"]


def _mib(n):
    return f"{(n or 0) / (1024 * 1024):.1f} MiB"


def _free(mb, full):
    """What C{zwrm host status} adds to the disk line: the free MiB its agent reported."""
    if not isinstance(mb, int) or isinstance(mb, bool):
        return ""
    return f", {mb} MiB free" + (" (nearly full: no new placements)" if full else "")


def _cache(c):
    if not c:
        return "-"
    return (f"{_mib(c.get('size'))} of {_mib(c.get('limit'))}, {c.get('hits', 0)} hits, "
            f"{c.get('misses', 0)} misses, {c.get('blobs', 0)} blobs")


def _certificate(expires_at):
    """What C{zwrm host status} says of the host certificate its agent's heartbeats report."""
    if not isinstance(expires_at, (int, float)) or isinstance(expires_at, bool):
        return "-"
    days = (expires_at - time.time()) / 86400
    left = f"{days:.0f} days left" if days >= 1 else "expired" if days <= 0 else "under a day left"
    return f"valid until {_utc(expires_at)} ({left}; its agent renews it with a third left)"


def format_status(h, out, partition=None):
    """
    Write the C{zwrm host status} report; C{partition}: the partition that holds the
    host's replicas, if one does (L{zwrm.control.healing.Healer.partitions}).
    """
    fields = [
        ("id", h["id"]), ("name", h["name"]), ("state", h["state"]),
        ("state before offline", h.get("state_before_offline") or "-"),
        ("region", h["region"] or "-"), ("datacenter", h["datacenter"] or "-"),
        ("address", h["address"] or "-"),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted((h["labels"] or {}).items())) or "-"),
        ("vcpus", f"{h['alloc_vcpus']} of {h['vcpus']} allocated"),
        ("memory", f"{h['alloc_memory_mb']} of {h['memory_mb']} MiB allocated"),
        ("disk", f"{h['alloc_disk_mb']} of {h['disk_mb']} MiB allocated"
                 + _free(h.get("stats", {}).get("disk_free_mb"), h.get("disk_full"))),
        ("agent version", h["agent_version"] or "-"),
        ("last heartbeat", f"{_age(h['heartbeat_age'])} ago"),
        ("executor", "registered" if h.get("executor") else "not registered"),
        ("image cache", _cache(h.get("stats", {}).get("image_cache"))),
        ("host certificate", _certificate(h.get("stats", {}).get("host_certificate_expires_at"))),
        ("fence", f"its agent stops its machines with volumes {h['fence_after']:g} s after the"
                  " control plane last answered (fence_after)" if h.get("fence_after")
         else "off (fence_after 0: power the host off before zwrm host remove"
              " --recover-volumes)"),
    ]
    if partition is not None:
        fields.append(("partition", f"its replicas are held: datacenter {partition['datacenter']}"
                                    f" partitioned since {_utc(partition.get('since'))}"
                                    " (zwrm host list)"))
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        out.write(f"{k.ljust(width)}  {v}\n")
    out.write(f"\nmachines ({len(h['machine_list'])}):\n")
    if h["machine_list"]:
        _table(["ID", "APP", "STATE"],
               [[m["id"], m.get("app") or m.get("app_id") or "-", machine_state(m)] for m in h["machine_list"]],
               out)
        for m in h["machine_list"]:
            if m.get("paused"):
                out.write(f"  {m['id']}: paused: {PAUSED.get(m['paused'], m['paused'])}\n")
    unrecorded = h.get("unrecorded") or {}
    if any(unrecorded.values()):
        out.write("\nkept there, not recorded by the cluster (zwrm host clean deletes them):\n")
        for v in unrecorded.get("volumes") or ():
            out.write(f"  volume {v['id']}  {_mib(v.get('allocated_bytes'))} of data\n")
        for f in unrecorded.get("snapshots") or ():
            out.write(f"  snapshot file {f['id']} of volume {f['volume_id']}  "
                      f"{_mib(f.get('allocated_bytes'))} of data\n")
        for m in unrecorded.get("machines") or ():
            out.write(f"  machine record {m['id']}  {m.get('state') or '-'}\n")
    out.write(f"\nrecent events ({len(h['events'])}):\n")
    if h["events"]:
        rows = []
        for e in h["events"]:
            p = e.get("payload") or {}
            what = p.get("state") or ""
            if p.get("reason"):
                what += f" ({p['reason']})"
            rows.append([time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["ts"])), e["kind"], what])
        _table(["TIME (UTC)", "KIND", "DETAIL"], rows, out)


def _utc(ts):
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts else "?"


def format_partitions(partitions, out):
    """
    Write what C{zwrm host list} says under its table about each datacenter where the
    partition guard holds rescheduling (L{zwrm.control.healing.Healer.partitions}).
    """
    for p in partitions:
        held = ", ".join(p.get("held_hosts") or []) or "none"
        share, threshold = p.get("offline_share") or 0, p.get("threshold") or 0
        out.write(f"\ndatacenter {p['datacenter'] or '(none)'}: partitioned since "
                  f"{_utc(p.get('since'))}: {share:.0%} of its hosts are offline (threshold "
                  f"{threshold:.0%}); the replicas of the hosts held ({held}) ")
        if p.get("evicting"):
            out.write("are placed elsewhere one host at a time, now that enough hosts are "
                      "back\n")
        else:
            out.write("are not placed elsewhere until enough hosts return\n")


async def _partitions(session):
    """The partitions held now; none from a control plane older than the procedure."""
    try:
        return await call(session, "zwrm.cluster.partitions")
    except NotOffered:
        return []
    except CliError as e:
        if e.code == EXIT_AUTH:  # a viewer, by an older control plane's role table
            return []
        raise


async def _with_partitions(reactor, args, procedure, *cargs, **kwargs):
    """
    C{procedure}'s answer and, for the text output (not C{--json}), the partitions held
    now, over one session.
    """
    session = await connect(reactor, load_settings(args.api_url))
    try:
        answer = await call(session, procedure, *cargs, **kwargs)
        return answer, ([] if args.json else await _partitions(session))
    finally:
        await close(session)


async def host_list(reactor, args, out=None):
    out = out or sys.stdout
    hosts, partitions = await _with_partitions(reactor, args, "zwrm.host.list")
    if args.json:
        print_json(hosts, out)
    else:
        format_hosts(hosts, out)
        format_partitions(partitions, out)
    return 0


async def host_status(reactor, args, out=None):
    out = out or sys.stdout
    # (the default not sent: a control plane from before --events still answers)
    more = {"events": args.events} if args.events != 20 else {}
    host, partitions = await _with_partitions(reactor, args, "zwrm.host.status", args.host_id,
                                              **more)
    if args.json:
        print_json(host, out)
    else:
        held = [p for p in partitions if host.get("id") in (p.get("held_hosts") or [])]
        format_status(host, out, held[0] if held else None)
    return 0


async def host_clean(reactor, args, out=None):
    out = out or sys.stdout
    r = await call_once(reactor, args.api_url, "zwrm.host.clean", args.host_id)
    if args.json:
        print_json(r, out)
        return 0
    deleted = r["deleted"]
    gone = [f"{len(deleted[k])} {name} ({', '.join(deleted[k])})"
            for k, name in (("volumes", "volume(s)"), ("snapshots", "snapshot file(s)"),
                            ("machines", "machine record(s)")) if deleted[k]]
    out.write(f"host {r['host_id']}: deleted {'; '.join(gone) if gone else 'nothing'}\n")
    for k in r["kept"]:
        out.write(f"  kept {k['kind'].rstrip('s')} {k['id']}: {k['reason']}\n")
    return 1 if r["kept"] else 0
