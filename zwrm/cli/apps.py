"""
C{zwrm apps create|list|history|spec}, C{zwrm deploy}, C{zwrm scale}, C{zwrm status}, C{zwrm destroy},
C{zwrm machines list|status|restart}, C{zwrm logs} and C{zwrm volumes create|list|destroy}.
"""

import json
import os
import sys
import time
import tomllib

import tomli_w
from twisted.internet import defer, task
from twisted.python import failure

from zwrm.cli.client import (
    EXIT_REMOTE,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
    call,
    call_once,
    close,
    connect,
    load_settings,
    print_json,
    seconds_arg,
    seconds_of,
    working,
)
from zwrm.cli.host import PAUSED, _table, _with_session
from zwrm.cli.host import machine_state as _state


def register(subparsers):
    apps = subparsers.add_parser("apps", aliases=["app"], help="apps of the cluster")
    asub = apps.add_subparsers(dest="apps_command", metavar="SUBCOMMAND")
    asub.required = True
    p = asub.add_parser("create", help="create an app (then deploy it)")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=apps_create)
    p = asub.add_parser("list", help="every app with its machines by state")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=apps_list)
    p = asub.add_parser("history", help="an app's spec versions")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=apps_history)
    p = asub.add_parser(
        "spec", help="an app's spec as a file for zwrm deploy --file",
        description="Print the current spec of APP (or its VERSION) as TOML, the file that "
                    "`zwrm deploy APP --file FILE` deploys. Its cloud-init user_data and env "
                    "are shown as their digest (sha256, size), which a deploy takes as the "
                    "current value.")
    p.add_argument("name")
    p.add_argument("version", type=int, nargs="?",
                   help="a spec version (default: the current one, which viewers may read too)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=apps_spec)

    p = subparsers.add_parser("rollback", help="deploy an earlier spec version of an app again")
    p.add_argument("app")
    p.add_argument("version", type=int, nargs="?",
                   help="the version (default: the one before the current one)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=rollback)

    p = subparsers.add_parser(
        "deploy", help="deploy an app: place and start its machines",
        description="Deploy APP with an image from the registry (--image NAME:TAG) or, for "
                    "development, a kernel and initrd that exist at the same paths on every "
                    "host (--kernel, --initrd). A redeploy sends only what it is given: the "
                    "other fields, the image too, keep the current version's values. With "
                    "--file, the file is the whole spec: a field it leaves out is back to its "
                    "default (but replicas: the current count), and the options given beside "
                    "it win.")
    p.add_argument("app")
    p.add_argument("-f", "--file", metavar="FILE",
                   help="the spec as TOML (or JSON, FILE.json; - reads TOML from stdin): the "
                        "fields of `zwrm apps spec APP`")
    p.add_argument("--image", help="image reference NAME:TAG in the control plane's registry")
    p.add_argument("--kernel", help="local kernel path on the hosts (instead of --image)")
    p.add_argument("--initrd", help="local initrd path on the hosts")
    p.add_argument("--disk", help="local raw disk image path on the hosts")
    p.add_argument("--cmdline", default="", help="kernel command line (with --kernel)")
    p.add_argument("--vcpus", type=int, help="default 1 (a redeploy keeps the current value)")
    p.add_argument("--memory", type=int, metavar="MiB",
                   help="default 256 (a redeploy keeps the current value)")
    p.add_argument("--replicas", type=int,
                   help="default 1 (a redeploy keeps the current count)")
    p.add_argument("--region")
    p.add_argument("--datacenter")
    p.add_argument("--constraint", action="append", default=[], metavar="LABEL=VALUE",
                   help="only hosts with this label (repeatable)")
    p.add_argument("--port", type=int, help="the service port inside the VM")
    p.add_argument("--health-http", metavar="PATH", help="HTTP GET health check on the port")
    p.add_argument("--health-tcp", action="store_true", help="TCP connect health check")
    p.add_argument("--health-interval", type=float, default=2.0)
    p.add_argument("--health-timeout", type=float, default=2.0)
    p.add_argument("--health-grace", type=float, default=60.0)
    p.add_argument("--unhealthy-threshold", type=int, metavar="N",
                   help="restart a machine whose check failed for N intervals (default 3)")
    p.add_argument("--restart", choices=["always", "on-failure", "never"],
                   help="restart policy (default always)")
    p.add_argument("--max-restarts", type=int, metavar="N",
                   help="at most N restarts within --restart-interval (default 10)")
    p.add_argument("--restart-interval", type=float, metavar="SECONDS",
                   help="the window of --max-restarts (default 1800)")
    p.add_argument("--rolling", action="store_true",
                   help="roll with the default settings (every update rolls: the running "
                        "machines are replaced --max-parallel at a time)")
    p.add_argument("--max-parallel", type=int, metavar="N",
                   help="rolling update: machines replaced at a time (default 1; 0 replaces "
                        "them all at once, stopping the old ones first)")
    p.add_argument("--min-healthy-time", type=float, metavar="SECONDS",
                   help="rolling update: how long a new machine must stay healthy (default 10)")
    p.add_argument("--healthy-deadline", type=float, metavar="SECONDS",
                   help="rolling update: how long a new machine may take (default 300)")
    p.add_argument("--no-auto-revert", action="store_true",
                   help="rolling update: stop on failure, do not go back to the previous version")
    p.add_argument("--shutdown-delay", type=float, metavar="SECONDS",
                   help="a replica stopped on purpose (update, scale down, destroy, drain) is "
                        "out of the routes this long first, for its open connections to end "
                        "(default 5 for an app with --publish, else 0; at most 3600)")
    p.add_argument("--clear", action="append", default=[], metavar="FIELD",
                   choices=sorted(CLEARABLE),
                   help="reset a field of the current version to its default (repeatable); "
                        "a redeploy keeps every field it does not give")
    p.add_argument("--volume", action="append", default=[], metavar="NAME:SIZE_MB:/MOUNT",
                   help="a local volume per replica (repeatable; a redeploy without "
                        "--volume keeps the current volumes)")
    p.add_argument("--ssh-key", action="append", default=[], metavar="FILE",
                   help="an OpenSSH public key file for the guest (cloud-init); repeatable")
    p.add_argument("--user-data", metavar="FILE", help="cloud-init user-data for the guest")
    p.add_argument("--publish", action="append", default=[],
                   metavar="PORT[:GUESTPORT][/tcp|/http|/https]",
                   help="serve the app on PORT of every agent's address (bridge networking; "
                        "repeatable)")
    p.add_argument("--domain", help="the app's host name for --publish .../http and .../https "
                                    "routing (https: the certificate of `zwrm certs add`)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the guest (cloud-init); repeatable")
    p.add_argument("--plan", action="store_true",
                   help="only show what the deploy would change (the diff against the current "
                        "version; replicas created, replaced, moved, destroyed); change nothing")
    p.add_argument("--wait", type=seconds_arg, default=0, metavar="SECONDS",
                   help="wait until every machine runs (and is healthy) or SECONDS pass,"
                        " counted from the command's start, a rolling update and an image"
                        " pull included (then it ends with exit 1; an update under way goes"
                        " on); it follows a failed machine through the restart its policy"
                        " gives it")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=deploy)

    p = subparsers.add_parser("scale", help="change an app's replica count")
    p.add_argument("app")
    p.add_argument("replicas", type=int)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=scale)

    p = subparsers.add_parser("status", help="an app's machines and volumes (no app: every "
                                             "app, as zwrm apps list)")
    p.add_argument("app", nargs="?")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=status)

    p = subparsers.add_parser("destroy", help="destroy an app, or one machine")
    p.add_argument("app", nargs="?")
    p.add_argument("--machine", help="destroy this machine instead of an app")
    p.add_argument("--volumes", action="store_true",
                   help="also delete the app's volumes and their data")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=destroy)

    machines = subparsers.add_parser("machines", aliases=["machine"], help="machines of the cluster")
    msub = machines.add_subparsers(dest="machines_command", metavar="SUBCOMMAND")
    msub.required = True
    p = msub.add_parser("list", help="machines, optionally of one app or host")
    p.add_argument("--app")
    p.add_argument("--host")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=machines_list)
    p = msub.add_parser("status", help="one machine with its recent events")
    p.add_argument("machine_id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=machine_status)
    p = msub.add_parser(
        "restart", help="restart one machine in place (same id, host and volumes): out of the "
                        "routes for the app's shutdown_delay, stopped, started again")
    p.add_argument("machine_id", metavar="MACHINE")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=machine_restart)

    p = subparsers.add_parser("logs", help="a machine's serial console")
    p.add_argument("machine_id")
    p.add_argument("--bytes", type=int, default=65536, help="at most this many (the tail)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="then follow the console as the guest writes (until Ctrl-C)")
    p.set_defaults(func=logs)

    volumes = subparsers.add_parser("volumes", aliases=["volume"], help="local volumes of apps")
    vsub = volumes.add_subparsers(dest="volumes_command", metavar="SUBCOMMAND")
    vsub.required = True
    p = vsub.add_parser("create", help="create a volume for an app's replica before deploying")
    p.add_argument("app")
    p.add_argument("name")
    p.add_argument("--size", type=int, required=True, metavar="MiB")
    p.add_argument("--mount", required=True)
    p.add_argument("--replica", type=int, default=0)
    p.add_argument("--region")
    p.add_argument("--datacenter")
    p.add_argument("--host", help="create it on this host")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=volumes_create)
    p = vsub.add_parser("list", help="volumes, optionally of one app")
    p.add_argument("--app")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=volumes_list)
    p = vsub.add_parser("destroy", help="delete a volume, its snapshots and its data")
    p.add_argument("volume_id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=volumes_destroy)
    p = vsub.add_parser("snapshot", help="copy a volume on its host (its machine may run)")
    p.add_argument("volume_id", nargs="?", help="the volume (or --app)")
    p.add_argument("--app", metavar="APP",
                   help="every volume of APP instead, one after the other (a schedule for "
                        "an app; exit 1 if one failed, the others taken all the same)")
    p.add_argument("--name", help="the snapshot's name (default: the time, YYYYMMDD-HHMMSS)")
    p.add_argument("--keep", type=int, metavar="N",
                   help="then delete the volume's oldest snapshots until N are left (not a "
                        "restore's before-restore-... ones): for scheduled snapshots")
    p.add_argument("--replicate-to", metavar="HOST",
                   help="then copy it to HOST as a replica (with --keep, the last N "
                        "replicas there are kept)")
    p.add_argument("--replicate", action="store_true",
                   help="the same, to the host of its newest replica (else one the "
                        "scheduler picks): a schedule that follows drains")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=volumes_snapshot)
    p = vsub.add_parser("replicate", help="copy a snapshot to another host, from which the "
                                          "volume is recovered if its host is lost")
    p.add_argument("volume_id")
    p.add_argument("snapshot", help="the snapshot's name or id")
    p.add_argument("--to", metavar="HOST", dest="host_id",
                   help="the host to keep the replica (a ready host, not the volume's; "
                        "default: the host of its newest replica, else one the scheduler "
                        "picks)")
    p.add_argument("--keep", type=int, metavar="N",
                   help="then delete the volume's oldest replicas on HOST until N are left")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=volumes_replicate)
    p = vsub.add_parser("replicas", help="replicas, of one volume or of an app's volumes")
    p.add_argument("volume_id", nargs="?")
    p.add_argument("--app")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=volumes_replicas)
    p = vsub.add_parser("delete-replica", help="delete a replica and its data on its host")
    p.add_argument("volume_id")
    p.add_argument("replica", help="the replica's id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=volumes_delete_replica)
    p = vsub.add_parser("snapshots", help="snapshots, of one volume or of an app's volumes")
    p.add_argument("volume_id", nargs="?")
    p.add_argument("--app")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=volumes_snapshots)
    p = vsub.add_parser("schedule", help="snapshot every volume of an app on a schedule, "
                                         "kept and run by the control plane")
    p.add_argument("app", help="the app whose volumes are snapshotted (replaces its schedule)")
    p.add_argument("--every", required=True, metavar="PERIOD",
                   help="time between two runs: 15m, 1h, 1d... (1m to 30d); the first at once")
    p.add_argument("--keep", type=int, metavar="N",
                   help="keep the last N scheduled snapshots of each volume (and replicas "
                        "on each host); snapshots taken by hand are not counted")
    p.add_argument("--replicate", action="store_true",
                   help="copy each new snapshot to another host (the one with the volume's "
                        "newest replica, else the scheduler's pick)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=volumes_schedule)
    p = vsub.add_parser("schedules", help="the apps' snapshot schedules and their last runs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=volumes_schedules)
    p = vsub.add_parser("unschedule", help="stop an app's snapshot schedule (its snapshots stay)")
    p.add_argument("app", help="the app whose schedule ends")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=volumes_unschedule)
    for name, func, text in (
            ("restore", volumes_restore, "put a snapshot's data back into its volume (what "
             "it held is kept as a snapshot)"),
            ("delete-snapshot", volumes_delete_snapshot, "delete a snapshot and its data")):
        p = vsub.add_parser(name, help=text)
        p.add_argument("volume_id")
        p.add_argument("snapshot", help="the snapshot's name or id")
        if name == "restore":
            p.add_argument("--restart", action="store_true",
                           help="if its machine runs, restart it in place around the restore "
                                "(else a running machine refuses it)")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=func)


CLEARABLE = {"region": "region", "datacenter": "datacenter", "port": "service_port",
             "health": "health", "volumes": "volumes", "constraints": "constraints",
             "cloud-init": "cloud_init", "publish": "publish", "domain": "domain",
             "restart": "restart", "rolling": "update", "shutdown-delay": "shutdown_delay"}
"""C{zwrm deploy --clear FIELD}: the spec field it resets."""


SPEC_FIELDS = frozenset({
    "image", "vcpus", "memory_mb", "replicas", "region", "datacenter", "service_port", "health",
    "volumes", "constraints", "cloud_init", "publish", "domain", "restart", "update",
    "shutdown_delay"})
"""The fields of a deployment spec (the control plane's C{zwrm.control.appspec.SPEC_FIELDS})."""

SPEC_FILE_LIMIT = 1024 * 1024


def deploy_spec(args):
    """
    What C{zwrm deploy} sends: the fields given as options (L{_spec}) or, with C{--file},
    the file's spec with every field it leaves out cleared (but C{replicas}) and the
    options' fields over it.
    """
    path = getattr(args, "file", None)
    if not path:
        return _spec(args)
    if getattr(args, "clear", None):
        raise CliError("--clear does not go with --file: a field the file leaves out is "
                       "back to its default", EXIT_USAGE)
    given = read_spec_file(path)
    spec = {f: None for f in SPEC_FIELDS - {"replicas"}}
    spec.update(given)
    options = _spec(args, required=False)
    for key in ("cloud_init", "restart", "update"):  # an option's part over the file's table
        if isinstance(given.get(key), dict) and isinstance(options.get(key), dict):
            options[key] = {**given[key], **{k: v for k, v in options[key].items()
                                             if v is not None and v != [] and v != {}}}
    spec.update(options)
    if spec["image"] is None:
        raise CliError(f"{path} has no image: give image = \"NAME:TAG\" in it, or --image",
                       EXIT_USAGE)
    return spec


def read_spec_file(path):
    """
    The spec in file C{path} (TOML; JSON if its name ends in C{.json}; C{-}: TOML from
    stdin), its top-level keys checked against L{SPEC_FIELDS}.

    @raise CliError: (usage) naming the file and what is wrong.
    """
    if path == "-":
        data = sys.stdin.buffer.read(SPEC_FILE_LIMIT + 1)
        if len(data) > SPEC_FILE_LIMIT:
            raise CliError(f"the spec on stdin is larger than {SPEC_FILE_LIMIT // 1024} KiB",
                           EXIT_USAGE)
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise CliError("the spec on stdin is not UTF-8 text", EXIT_USAGE) from None
    else:
        text = _read_text(path, "spec file", SPEC_FILE_LIMIT)
    name = "stdin" if path == "-" else path
    try:
        spec = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise CliError(f"{name}: {e}", EXIT_USAGE) from None
    if not isinstance(spec, dict):
        raise CliError(f"{name}: a spec is a table of fields, not {type(spec).__name__}",
                       EXIT_USAGE)
    unknown = sorted(set(spec) - SPEC_FIELDS)
    if unknown:
        raise CliError(f"{name}: unknown field(s) {', '.join(unknown)} (a spec's fields are "
                       f"{', '.join(sorted(SPEC_FIELDS))})", EXIT_USAGE)
    return spec


def spec_file_text(app, version, spec):
    """
    C{spec} (of spec version C{version} of app C{app}) as the TOML that C{zwrm deploy
    --file} reads: fields that are L{None} (TOML has no null) or empty left out (left
    out, they are their default).
    """
    def bare(v):
        if isinstance(v, dict):
            return {k: bare(x) for k, x in v.items() if x is not None and x != {} and x != []}
        if isinstance(v, list):
            return [bare(x) for x in v]
        return v

    order = ["image", "replicas", "vcpus", "memory_mb", "region", "datacenter", "constraints",
             "service_port", "health", "publish", "domain", "volumes", "restart", "update",
             "shutdown_delay", "cloud_init"]
    ordered = {k: spec[k] for k in order if k in spec}
    ordered.update((k, v) for k, v in spec.items() if k not in ordered)
    head = (f"# app {app}, spec version {version}: zwrm deploy {app} --file FILE deploys it.\n"
            "# A field left out is its default (replicas: the current count); cloud-init\n"
            "# user_data and env, shown as their digest, keep the current value.\n")
    return head + tomli_w.dumps(bare(ordered))


def _spec(args, required=True):
    if args.image and (args.kernel or args.disk):
        raise CliError("give --image NAME:TAG or --kernel/--disk paths, not both", EXIT_USAGE)
    image = None  # neither: a redeploy keeps the current version's image
    if args.image:
        image = args.image
    elif args.kernel or args.disk:
        image = {"kernel": _abs(args.kernel), "initrd": _abs(args.initrd),
                 "disk": _abs(args.disk), "cmdline": args.cmdline}
    health = None
    if args.health_http or args.health_tcp:
        if args.health_http and args.health_tcp:
            raise CliError("give --health-http or --health-tcp, not both", EXIT_USAGE)
        health = {"type": "http" if args.health_http else "tcp",
                  "interval": args.health_interval, "timeout": args.health_timeout,
                  "grace": args.health_grace}
        if args.health_http:
            health["path"] = args.health_http
    constraints = {}
    for c in args.constraint:
        k, sep, v = c.partition("=")
        if not sep or not k:
            raise CliError(f"--constraint {c!r} is not LABEL=VALUE", EXIT_USAGE)
        constraints[k] = v
    volumes = []
    for v in args.volume:
        parts = v.split(":", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            raise CliError(f"--volume {v!r} is not NAME:SIZE_MB:/MOUNT", EXIT_USAGE)
        volumes.append({"name": parts[0], "size_mb": int(parts[1]), "mount": parts[2]})
    # Only what was given: a redeploy keeps the current version's other fields.
    spec = {"image": image} if image is not None else {}
    for key, value in (("vcpus", args.vcpus), ("memory_mb", args.memory),
                       ("replicas", args.replicas), ("region", args.region),
                       ("datacenter", args.datacenter), ("service_port", args.port),
                       ("health", health)):
        if value is not None:
            spec[key] = value
    if volumes:
        spec["volumes"] = volumes
    if health is not None and getattr(args, "unhealthy_threshold", None) is not None:
        health["unhealthy_threshold"] = args.unhealthy_threshold
    restart = {k: v for k, v in (("policy", getattr(args, "restart", None)),
                                 ("max_restarts", getattr(args, "max_restarts", None)),
                                 ("interval", getattr(args, "restart_interval", None)))
               if v is not None}
    if restart:
        spec["restart"] = restart
    update = {k: v for k, v in (("max_parallel", getattr(args, "max_parallel", None)),
                                ("min_healthy_time", getattr(args, "min_healthy_time", None)),
                                ("healthy_deadline", getattr(args, "healthy_deadline", None)))
              if v is not None}
    if getattr(args, "no_auto_revert", False):
        update["auto_revert"] = False
    if update or getattr(args, "rolling", False):
        spec["update"] = update
    if getattr(args, "shutdown_delay", None) is not None:
        spec["shutdown_delay"] = args.shutdown_delay
    for field in getattr(args, "clear", None) or []:
        spec[CLEARABLE[field]] = None
    if constraints:
        spec["constraints"] = constraints
    cloud_init = _cloud_init(args)
    if cloud_init:
        spec["cloud_init"] = cloud_init
    if args.publish or args.domain:
        spec["publish"] = args.publish  # checked by the control plane (zwrm.control.network)
        spec["domain"] = args.domain
    if not spec and required:
        raise CliError("nothing to deploy: give --image NAME:TAG (or --kernel/--disk), the "
                       "fields a redeploy changes, or --file", EXIT_USAGE)
    return spec


def _read_text(path, what, limit=64 * 1024):
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise CliError(f"{what} {path}: {e.strerror}", EXIT_USAGE) from None
    if len(data) > limit:
        raise CliError(f"{what} {path} is larger than {limit // 1024} KiB", EXIT_USAGE)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise CliError(f"{what} {path} is not UTF-8 text", EXIT_USAGE) from None


def _cloud_init(args):
    """The deploy's cloud-init part from --ssh-key, --user-data, --env (or None)."""
    keys = []
    for path in getattr(args, "ssh_key", None) or []:
        keys += [x.strip() for x in _read_text(path, "--ssh-key").splitlines()
                 if x.strip() and not x.startswith("#")]
    env = {}
    for e in getattr(args, "env", None) or []:
        k, sep, v = e.partition("=")
        if not sep or not k:
            raise CliError(f"--env {e!r} is not KEY=VALUE", EXIT_USAGE)
        env[k] = v
    user_data = None
    if getattr(args, "user_data", None):
        user_data = _read_text(args.user_data, "--user-data", 16 * 1024)
    if not keys and not env and user_data is None:
        return None
    return {"ssh_keys": keys, "user_data": user_data, "env": env}


def _abs(path):
    return os.path.abspath(path) if path else None


def format_app(app, out):
    spec = app["spec"] or {}
    image = spec.get("image")
    if isinstance(image, dict):
        image = image.get("kernel") or image.get("disk")
    out.write(f"app       {app['name']} ({app['id']})\n")
    out.write(f"image     {image or '-'}\n")
    out.write(f"replicas  {spec.get('replicas', 0)}\n")
    if app.get("spec_version"):
        out.write(f"version   {app['spec_version']}\n")
    destroying = app.get("destroying")
    if destroying:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(destroying["since"]))
        what = "volumes too" if destroying.get("volumes") else "volumes kept"
        out.write(f"destroy   under way since {since} ({what})")
        stopping = [m for m in app.get("machines") or () if m.get("state") == "stopping"]
        if stopping and destroying.get("delay_ends"):
            until = time.strftime("%H:%M:%S UTC", time.gmtime(destroying["delay_ends"]))
            out.write(f"; {len(stopping)} machine(s) out of the routes, removed after"
                      f" {until} (shutdown_delay)")
        out.write("\n")
    rollout = app.get("rollout")
    if rollout:
        at = rollout.get("at")
        when = time.strftime(" (%Y-%m-%d %H:%M:%S UTC)", time.gmtime(at)) if at else ""
        under_way = rollout.get("state") in ("started", "progress")
        out.write(f"update    {'under way' if under_way else rollout.get('state')}{when}: "
                  f"{rollout.get('reason')}\n")
    out.write("\n")
    out.write(f"machines ({len(app['machines'])}):\n")
    if app["machines"]:
        _table(["ID", "REPLICA", "HOST", "STATE", "HEALTH", "ADDRESS", "PORT", "RESTARTS"],
               [[m["id"], m["replica"], m["host_id"], _state(m), m["health"] or "-",
                 m.get("address") or "-", m["host_port"] or "-", m.get("restarts") or 0]
                for m in app["machines"]], out)
        for m in app["machines"]:
            if m.get("paused"):
                out.write(f"  {m['id']}: paused: {PAUSED.get(m['paused'], m['paused'])}\n")
            if m.get("restart_reason") and m["state"] != "running":
                nxt = m.get("next_restart_at")
                when = (time.strftime(" (next attempt %H:%M:%S UTC)", time.gmtime(nxt))
                        if nxt else "")
                out.write(f"  {m['id']}: {m['restart_reason']}{when}\n")
    out.write(f"\nvolumes ({len(app['volumes'])}):\n")
    if app["volumes"]:
        format_volumes(app["volumes"], out)
    schedule = app.get("snapshot_schedule")
    if schedule:
        out.write(f"snapshots: {_schedule_line(schedule)}; {_last_run(schedule)}\n")


def format_volumes(volumes, out, apps=False):
    """The volumes' table; C{apps}: with their apps' names (a list of several apps')."""
    _table(["ID", *(["APP"] if apps else []), "NAME", "REPLICA", "HOST", "SIZE(MiB)", "MOUNT",
            "STATE"],
           [[v["id"], *([v.get("app") or v.get("app_id") or "-"] if apps else []), v["name"],
             v.get("replica", 0), v["host_id"], v["size_mb"], v["mount"], v["state"]]
            for v in volumes], out)


async def apps_create(reactor, args, out=None):
    out = out or sys.stdout
    app = await _with_session(reactor, args, "zwrm.app.create", args.name)
    print_json(app, out) if args.json else out.write(f"created app {app['name']} ({app['id']})\n")


async def apps_list(reactor, args, out=None):
    out = out or sys.stdout
    apps = await _with_session(reactor, args, "zwrm.app.list")
    if args.json:
        return print_json(apps, out)
    _table(["NAME", "ID", "REPLICAS", "MACHINES"],
           [[a["name"], a["id"], "destroying" if a.get("destroying") else a["replicas"],
             ", ".join(f"{n} {s}" for s, n in sorted(a["machines"].items())) or "-"]
            for a in apps], out)


async def apps_history(reactor, args, out=None):
    out = out or sys.stdout
    versions = await _with_session(reactor, args, "zwrm.app.history", args.name)
    if args.json:
        return print_json(versions, out)

    _table(["VERSION", "CREATED (UTC)", "IMAGE", "REPLICAS", "CHANGED", ""],
           history_rows(versions), out)


def history_rows(versions):
    """
    The rows of C{zwrm apps history}: each version with what its spec changed from the
    version before it (the spec's fields, e.g. C{health}; "as version N" when it is an
    earlier version's spec again: a rollback, or the revert of a failed update).
    """
    def image(spec):
        img = spec.get("image")
        return (img.get("kernel") or img.get("disk")) if isinstance(img, dict) else img

    rows, before = [], []
    for v in sorted(versions, key=lambda v: v["version"]):
        spec = v["spec"] or {}
        if not before or before[-1]["version"] != v["version"] - 1:
            changed = "-"  # the first, or the one before it is no longer kept
        else:
            last = before[-1]["spec"] or {}
            changed = ", ".join(sorted(k for k in spec.keys() | last.keys()
                                       if spec.get(k) != last.get(k))) or "nothing"
            again = [b["version"] for b in before[:-1] if (b["spec"] or {}) == spec]
            if again and changed != "nothing":
                changed += f" (as version {again[-1]})"
        rows.append([v["version"],
                     time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v["created_at"])),
                     image(spec) or "-", spec.get("replicas", "-"), changed,
                     "current" if v["current"] else ""])
        before.append(v)
    return rows


async def apps_spec(reactor, args, out=None):
    out = out or sys.stdout
    if args.version is not None and args.version < 1:
        raise CliError("version must be 1 or more", EXIT_USAGE)
    if args.version is None:  # (the app's status: viewers may read it, not its history)
        app = await _with_session(reactor, args, "zwrm.app.status", args.name)
        if app["spec"] is None:
            raise CliError(f"app {args.name} has no spec yet: deploy it first", EXIT_REMOTE)
        v = {"version": app["spec_version"], "spec": app["spec"]}
    else:
        versions = await _with_session(reactor, args, "zwrm.app.history", args.name)
        chosen = [v for v in versions if v["version"] == args.version]
        if not chosen:
            kept = ", ".join(str(v["version"]) for v in versions) or "none"
            raise CliError(f"app {args.name} has no spec version {args.version} (kept: {kept})",
                           EXIT_REMOTE)
        v = chosen[0]
    if args.json:
        return print_json(v["spec"], out)
    out.write(spec_file_text(args.name, v["version"], v["spec"]))


async def rollback(reactor, args, out=None):
    out = out or sys.stdout
    if args.version is not None and args.version < 1:
        raise CliError("version must be 1 or more", EXIT_USAGE)
    app = await _with_session(reactor, args, "zwrm.app.rollback", args.app, args.version)
    print_json(app, out) if args.json else format_app(app, out)


def _settled(app):
    """
    C{"ok"}: every replica runs and passes its check; C{"failed"}: a machine failed and its
    restart policy gives it no restart (none is due: C{next_restart_at} is null); else
    L{None} (a failed machine whose restart is due is on its way).
    """
    want = (app["spec"] or {}).get("replicas", 0)
    ms = app["machines"]
    if any(m["state"] == "failed" and m.get("next_restart_at") is None for m in ms):
        return "failed"
    ok = [m for m in ms if m["state"] == "running" and m["health"] in ("passing", "none", None)]
    return "ok" if len(ok) == want == len(ms) else None


#: Seconds a failed machine with no restart due may wait for its restart policy's decision
#: before a deploy that waits takes the failure for final: the control plane stores the
#: failure, then the decision (in milliseconds), and the status may be read in between.
DECISION_GRACE = 2.0


def _restart_line(name, machine):
    """
    The line of a deploy that waits and sees C{machine} failed (or stopped: a guest that
    powered off), its restart due.
    """
    when = time.strftime("%H:%M:%S UTC", time.gmtime(machine["next_restart_at"]))
    why = machine.get("restart_reason") or f"see zwrm logs {machine['id']}"
    return (f"machine {machine['id']} of {name} {machine['state']}: {why}; restart "
            f"{(machine.get('restarts') or 0) + 1} at {when}")


async def wait_until_settled(reactor, session, name, app, wait, err, told=None, deadline=None):
    """
    Follow app C{name} (its status C{app} to start from) until every replica runs and
    passes its check: its status then.  A machine that fails (or stops) and is due a
    restart is followed through it, written to C{err} as one line; one that fails for
    good (its policy gives it no restart, L{DECISION_GRACE}) ends the wait with a
    L{CliError} naming it and why, and so do C{wait} seconds, with the last failure seen.

    @param told: the restarts already written (L{deploy_following}'s), not written again.
    @param deadline: when the C{wait} seconds end, if they began before this call (the
        deploy's start: L{None}, now).
    """
    deadline = reactor.seconds() + wait if deadline is None else deadline
    told = set() if told is None else told
    last, failed_since = None, None
    while True:
        for m in app["machines"]:
            if m["state"] in ("failed", "stopped") and m.get("next_restart_at") is not None:
                key = (m["id"], m.get("restarts") or 0)
                if key not in told:
                    told.add(key)
                    last = _restart_line(name, m)
                    err.write(last + "\n")
                elif last is None:
                    last = _restart_line(name, m)
        state = _settled(app)
        now = reactor.seconds()
        if state == "failed":
            failed_since = now if failed_since is None else failed_since
            if now - failed_since >= DECISION_GRACE:
                format_app(app, err)
                failed = next(m for m in app["machines"] if m["state"] == "failed"
                              and m.get("next_restart_at") is None)
                why = await _why_failed(session, failed["id"])
                raise CliError(_failed_line(name, failed, why), EXIT_REMOTE)
        else:
            failed_since = None
        if state == "ok":
            return app
        if now >= deadline:
            said = f"; last: {last}" if last else ""
            raise CliError(f"{name} did not become healthy within {wait:g} s{said} (see zwrm "
                           "status and zwrm logs)", EXIT_REMOTE)
        await task.deferLater(reactor, 0.5, lambda: None)
        app = await call(session, "zwrm.app.status", name)


def _last_reason(machine):
    """The newest reason among the events of C{machine} (C{zwrm.machine.status}), or None."""
    for e in machine.get("events") or []:  # newest first
        reason = (e.get("payload") or {}).get("reason")
        if reason:
            return reason
    return None


async def _why_failed(session, machine_id):
    """
    The newest event reason of the failed machine C{machine_id}, or L{None} when the control
    plane has none to give (e.g. the machine was destroyed meanwhile): the deploy's own
    failure is the line to print, not that of this question.
    """
    try:
        return _last_reason(await call(session, "zwrm.machine.status", machine_id))
    except CliError as e:
        if e.code != EXIT_REMOTE:
            raise
        return None


def _failed_line(name, machine, why):
    """
    The one line of a deploy whose machine failed: which, and C{why} (its newest event's
    reason: the agent's, e.g. a full disk) when there is one.
    """
    if why:
        return f"machine {machine['id']} of {name} failed: {why}"
    return f"machine {machine['id']} of {name} failed (see zwrm logs {machine['id']})"


def format_plan(plan, out):
    version = plan["version"]
    out.write(f"{plan['app']}: " + (f"new version {version}\n" if plan["changed"]
                                    else f"no change to version {version}\n"))
    for key, d in plan["diff"].items():
        out.write(f"  {key}: {json.dumps(d['old'])} -> {json.dumps(d['new'])}\n")
    for c in plan["create"]:
        out.write(f"create   replica {c['replica']} on {c['host_id'] or '?'}\n")
    for r in plan["replace"]:
        verb = "move   " if r["to_host"] and r["to_host"] != r["host_id"] else "replace"
        out.write(f"{verb}  {r['machine_id']} (replica {r['replica']}, {r['state']}) on "
                  f"{r['host_id']} -> {r['to_host'] or '?'}\n")
    for r in plan["destroy"]:
        out.write(f"destroy  {r['machine_id']} (replica {r['replica']}) on {r['host_id']}\n")
    for r in plan["keep"]:
        out.write(f"keep     {r['machine_id']} (replica {r['replica']}) on {r['host_id']}\n")
    if plan["unplaceable"]:
        out.write(f"unplaceable: {plan['unplaceable']}\n")


async def deploy(reactor, args, out=None):
    try:
        return await _deploy(reactor, args, out)
    except CliError as e:
        if e.code == EXIT_REMOTE and e.message == f"no app {args.app!r}":
            raise CliError(f"{e.message}: create it first (zwrm apps create {args.app})",
                           EXIT_REMOTE) from None
        raise


async def _deploy(reactor, args, out=None):
    out = out or sys.stdout
    spec = deploy_spec(args)
    if getattr(args, "plan", False):
        plan = await _with_session(reactor, args, "zwrm.app.plan", args.app, spec)
        print_json(plan, out) if args.json else format_plan(plan, out)
        if plan["unplaceable"]:
            raise CliError(f"the deploy would fail: {plan['unplaceable']}", EXIT_REMOTE)
        return
    settings = load_settings(args.api_url)
    session = await connect(reactor, settings)
    told = set()  # the restarts written on stderr: each once, whichever saw it first
    # --wait bounds the whole command, a rolling update's course included
    deadline = reactor.seconds() + args.wait if args.wait else None
    try:
        app = await deploy_following(reactor, session, args.app, spec, out, args.json,
                                     settings["timeout"], told=told, deadline=deadline,
                                     wait=args.wait)
        if args.wait:
            app = await wait_until_settled(reactor, session, args.app, app, args.wait,
                                           sys.stderr, told=told, deadline=deadline)
    finally:
        await close(session)
    print_json(app, out) if args.json else format_app(app, out)


APP_TOPIC = "zwrm.event.app"
MACHINE_TOPIC = "zwrm.event.machine"
ROLLOUT_ENDS = ("completed", "failed", "reverted")


async def deploy_following(reactor, session, name, spec, out, as_json, timeout, err=None,
                           told=None, deadline=None, wait=None):
    """
    Call C{zwrm.app.deploy(name, spec)} and return its answer (the app's status).

    A rolling update outlasts a call's timeout: the call is timed only until the control
    plane announces that the update started (C{zwrm.event.app}, kind C{rollout}); from then
    on its announcements are followed (each printed as a line, not with C{as_json}) until
    the update ends and the call answers.  Between two announcements it waits at most the
    update's C{healthy_deadline} and C{min_healthy_time} plus C{timeout} (one batch, then a
    slow control plane), else it gives up (exit 8; the update goes on).  A session that may
    not subscribe makes a plain call (bounded by C{timeout}).  A machine of the app that
    fails meanwhile and is due a restart (which the update waits through) is one line on
    C{err}, as with C{--wait} (L{_restart_line}), once: C{told} holds those written
    (C{(machine id, restarts)}), which L{wait_until_settled} then does not write again.

    @param deadline: L{None}, or the reactor time by which the command gives up
        (C{zwrm deploy --wait}: C{wait} seconds from its start) even while the update
        runs: exit 1, the update goes on.
    """
    err = err or sys.stderr
    queue = defer.DeferredQueue()
    told = set() if told is None else told

    def on_event(event=None, *args, **kwargs):
        if not isinstance(event, dict) or event.get("kind") != "rollout":
            return
        payload = event.get("payload")
        if isinstance(payload, dict) and payload.get("app") == name:
            queue.put(payload)

    def on_machine(event=None, *args, **kwargs):
        m = event.get("payload") if isinstance(event, dict) else None
        if (not isinstance(m, dict) or m.get("app") != name
                or m.get("state") not in ("failed", "stopped")
                or not isinstance(m.get("next_restart_at"), (int, float))):
            return
        key = (m.get("id"), m.get("restarts") or 0)
        if key not in told:
            told.add(key)
            err.write(_restart_line(name, m) + "\n")
            err.flush()

    try:
        subscription = await session.subscribe(on_event, APP_TOPIC)
    except Exception:
        return await call(session, "zwrm.app.deploy", name, spec)
    try:
        machines = await session.subscribe(on_machine, MACHINE_TOPIC)
    except Exception:
        machines = None  # a role that may not follow machines: the update's lines only
    try:
        saved, session.timeout = getattr(session, "timeout", None), None
        try:  # timed below, on the announcements, not as one call
            answer = defer.Deferred.fromCoroutine(call(session, "zwrm.app.deploy", name, spec))
        finally:
            session.timeout = saved
        answered, outcome = defer.Deferred(), []

        def took(result):  # the answer (or its failure) is kept here, the Deferred done
            outcome.append(result)
            if not answered.called:
                answered.callback(None)

        answer.addBoth(took)
        bound, started = timeout, False
        while not answered.called:
            news = queue.get()
            left = bound if deadline is None else min(bound, deadline - reactor.seconds())
            which = await _first_of(reactor, max(left, 0), answered, news)
            if which != 1:
                news.cancel()  # not taken: a later announcement stays in the queue
                news.addErrback(lambda f: None)
            if which is None and left < bound:  # --wait's time is up: the deploy goes on
                if not started:
                    raise CliError(f"the control plane did not answer zwrm.app.deploy within"
                                   f" {wait:g} s; the deploy of {name} may still be carried out"
                                   f" (see zwrm status {name})", EXIT_REMOTE)
                raise CliError(f"{name} did not become healthy within {wait:g} s: its rolling"
                               f" update goes on (see zwrm status {name})", EXIT_REMOTE)
            if which is None:  # given up: a late answer is dropped
                if not started:
                    raise CliError(f"the control plane did not answer zwrm.app.deploy within "
                                   f"{bound:g} s", EXIT_TIMEOUT)
                raise CliError(f"no news of the update of {name} for {bound:g} s; it may still "
                               f"be running (see zwrm status {name})", EXIT_TIMEOUT)
            if which == 0:
                break
            p = await news
            if not as_json:
                out.write(f"{name}: {p.get('reason')}\n")
            if p.get("state") == "started":
                started = True
                update = p.get("update") or {}
                bound = (float(update.get("healthy_deadline") or 0)
                        + float(update.get("min_healthy_time") or 0)
                        + float((p.get("spec") or {}).get("shutdown_delay") or 0) + timeout)
            elif p.get("state") in ROLLOUT_ENDS:
                bound = timeout  # the answer follows
        if isinstance(outcome[0], failure.Failure):
            outcome[0].raiseException()
        return outcome[0]
    finally:
        for sub in (subscription, machines):
            try:
                if sub is not None:
                    await sub.unsubscribe()
            except Exception:
                pass  # the session is closing


def _first_of(reactor, seconds, *ds):
    """
    A Deferred firing with the index of the first of C{ds} to fire (their results are
    left as they are), or with L{None} after C{seconds}.
    """
    done = defer.Deferred()

    def fired(result, i):
        if not done.called:
            done.callback(i)
        return result

    timer = reactor.callLater(seconds, lambda: done.called or done.callback(None))
    for i, d in enumerate(ds):
        d.addBoth(fired, i)

    def stop(result):
        if timer.active():
            timer.cancel()
        return result

    return done.addBoth(stop)


async def scale(reactor, args, out=None):
    out = out or sys.stdout
    app = await _with_session(reactor, args, "zwrm.app.scale", args.app, args.replicas)
    print_json(app, out) if args.json else format_app(app, out)


async def status(reactor, args, out=None):
    out = out or sys.stdout
    if args.app is None:  # as `nomad status`: the apps
        return await apps_list(reactor, args, out)
    app = await _with_session(reactor, args, "zwrm.app.status", args.app)
    print_json(app, out) if args.json else format_app(app, out)


def destroy_cut_short(e, app):
    """
    The line of C{zwrm destroy APP} that failed with C{e} (a L{CliError}): a destroy cut
    short by the loss of the connection, or by the control plane's stop, goes on (it is
    stored before its first machine stops), and the line says so.
    """
    if e.code == EXIT_UNREACHABLE:
        return CliError(f"{e.message}; a destroy that reached it goes on"
                        f" (`zwrm status {app}` shows it)", e.code)
    if "was interrupted: the control plane is stopping" in e.message:
        return CliError(f"the destroy of {app} was interrupted: the control plane is stopping;"
                        f" it goes on once the control plane is back (`zwrm status {app}`"
                        " shows it)", e.code)
    return e


async def destroy(reactor, args, out=None):
    out = out or sys.stdout
    if bool(args.app) == bool(args.machine):
        raise CliError("give an app name or --machine ID", EXIT_USAGE)
    if args.machine:
        gone = await _with_session(reactor, args, "zwrm.machine.destroy", args.machine)
        return print_json({"machine": gone}, out) if args.json else out.write(f"destroyed {gone}\n")
    session = await connect(reactor, load_settings(args.api_url))
    try:
        result = await call(session, "zwrm.app.destroy", args.app, volumes=args.volumes)
    except CliError as e:
        raise destroy_cut_short(e, args.app) from None
    finally:
        await close(session)
    if args.json:
        return print_json(result, out)
    out.write(f"destroyed {len(result['machines'])} machine(s) and "
              f"{len(result['volumes'])} volume(s) of {args.app}\n")
    if result.get("app_kept_for_volumes"):
        out.write(f"{args.app} keeps its volumes; `zwrm destroy {args.app} --volumes` deletes them\n")


async def machines_list(reactor, args, out=None):
    out = out or sys.stdout
    session = await connect(reactor, load_settings(args.api_url))
    try:
        ms = await call(session, "zwrm.machine.list", app=args.app, host_id=args.host)
    finally:
        await close(session)
    if args.json:
        return print_json(ms, out)
    _table(["ID", "APP", "REPLICA", "HOST", "STATE", "HEALTH", "ADDRESS", "PORT"],
           [[m["id"], m["app"] or "-", m["replica"], m["host_id"], _state(m),
             m["health"] or "-", m.get("address") or "-", m["host_port"] or "-"] for m in ms], out)


async def machine_status(reactor, args, out=None):
    out = out or sys.stdout
    m = await _with_session(reactor, args, "zwrm.machine.status", args.machine_id)
    if args.json:
        return print_json(m, out)
    spec = m.get("spec") or {}
    fields = {k: m.get(k) for k in ("id", "app", "replica", "host_id", "state", "health",
                                     "address", "host_port")}
    fields["image"] = spec.get("image")
    fields["volumes"] = ", ".join(m.get("volumes") or ()) or None
    restarts = m.get("restarts") or 0
    if m.get("next_restart_at"):
        at = time.strftime("%H:%M:%S UTC", time.gmtime(m["next_restart_at"]))
        fields["restarts"] = f"{restarts}; the next at {at} ({m.get('restart_reason') or '-'})"
    else:
        fields["restarts"] = restarts
    for k, v in fields.items():
        out.write(f"{k.ljust(10)}  {v if v is not None else '-'}\n")
    if m.get("paused"):
        out.write(f"{'paused'.ljust(10)}  {m['paused']}: {PAUSED.get(m['paused'], '')}\n")
    out.write(f"\nrecent events ({len(m['events'])}):\n")
    rows = []
    for e in m["events"]:
        p = e.get("payload") or {}
        what = str(p.get("state") or "")
        if p.get("reason"):
            what += f" ({p['reason']})"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["ts"])) if e.get("ts") else "-"
        rows.append([when, e["kind"], what])
    if rows:
        _table(["TIME (UTC)", "KIND", "DETAIL"], rows, out)


async def machine_restart(reactor, args, out=None):
    out = out or sys.stdout
    m = await _with_session(reactor, args, "zwrm.machine.restart", args.machine_id)
    if args.json:
        return print_json(m, out)
    out.write(f"restarted {m['id']} on {m['host_id']}: {m['state']}\n")


async def logs(reactor, args, out=None):
    out = out or sys.stdout
    if args.bytes < 1:
        raise CliError("--bytes must be at least 1", EXIT_USAGE)
    if getattr(args, "follow", False):
        from zwrm.cli.console import follow

        return await follow(reactor, args, out)
    text = await _with_session(reactor, args, "zwrm.machine.logs", args.machine_id, args.bytes)
    out.write(text if isinstance(text, str) else json.dumps(text))


async def volumes_create(reactor, args, out=None):
    out = out or sys.stdout
    session = await connect(reactor, load_settings(args.api_url))
    try:
        v = await call(session, "zwrm.volume.create", args.app, args.name, args.size, args.mount,
                       replica=args.replica, region=args.region, datacenter=args.datacenter,
                       host_id=args.host)
    finally:
        await close(session)
    print_json(v, out) if args.json else out.write(f"created volume {v['id']} on {v['host_id']}\n")


async def volumes_list(reactor, args, out=None):
    out = out or sys.stdout
    session = await connect(reactor, load_settings(args.api_url))
    try:
        vs = await call(session, "zwrm.volume.list", app=args.app)
    finally:
        await close(session)
    print_json(vs, out) if args.json else format_volumes(vs, out, apps=args.app is None)


async def volumes_destroy(reactor, args, out=None):
    out = out or sys.stdout
    gone = await _with_session(reactor, args, "zwrm.volume.destroy", args.volume_id)
    print_json({"volume": gone}, out) if args.json else out.write(f"destroyed volume {gone}\n")


def _mib(n):
    return f"{n / (1 << 20):.1f}"


def format_snapshots(snapshots, out):
    _table(["NAME", "ID", "VOLUME", "HOST", "CREATED", "SIZE(MiB)", "DATA(MiB)", "TAKEN",
            "STATE"],
           [[s["name"], s["id"], s["volume_id"], s["host_id"],
             time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s["created_at"])),
             _mib(s["size_bytes"]), _mib(s["allocated_bytes"]),
             "running" if s["live"] else "at rest", s["state"]] for s in snapshots], out)


async def volumes_snapshot(reactor, args, out=None):
    out = out or sys.stdout
    if (args.volume_id is None) == (getattr(args, "app", None) is None):
        raise CliError("give a volume id or --app APP (not both)", EXIT_USAGE)
    if args.volume_id is not None:
        await _snapshot_one(reactor, args, args.volume_id, out)
        return 0
    volumes = await call_once(reactor, args.api_url, "zwrm.volume.list", app=args.app)
    if not volumes:
        raise CliError(f"app {args.app!r} has no volumes", EXIT_REMOTE)
    failed, results = [], []
    for v in volumes:
        try:
            results.append(await _snapshot_one(reactor, args, v["id"], out, quiet_json=True))
        except CliError as e:
            failed.append(v["id"])
            results.append({"volume_id": v["id"], "error": e.message})
            if not args.json:
                out.write(f"volume {v['id']} ({v['name']}, replica {v['replica']}): "
                          f"{e.message}\n")
                out.flush()
    if args.json:
        print_json(results, out)
    if failed:
        sys.stderr.write(f"zwrm: {len(failed)} of {len(volumes)} volume(s) of app "
                         f"{args.app} not snapshotted: {', '.join(failed)}\n")
        return 1
    return 0


async def _snapshot_one(reactor, args, volume_id, out, quiet_json=False):
    """Snapshot (and replicate, as asked) one volume; its lines, or its JSON."""
    try:
        s = await call_once(reactor, args.api_url, "zwrm.volume.snapshot", volume_id,
                            name=args.name, keep=args.keep, on_progress=working("snapshotting"))
    except CliError as e:
        if args.volume_id is not None:
            raise
        raise CliError(f"not snapshotted: {e.message}", e.code) from None
    if not args.json:
        how = "while its machine ran" if s["live"] else "at rest"
        out.write(f"snapshot {s['name']} ({s['id']}) of volume {s['volume_id']} on "
                  f"{s['host_id']}: {_mib(s['allocated_bytes'])} MiB of data, taken {how}\n")
        if s.get("pruned"):
            out.write(f"deleted {len(s['pruned'])} older snapshot(s) to keep {args.keep}: "
                      f"{', '.join(p['name'] for p in s['pruned'])}\n")
        out.flush()
    if args.replicate_to or args.replicate:
        try:
            s["replica"] = await call_once(reactor, args.api_url, "zwrm.volume.replicate",
                                           volume_id, s["id"], args.replicate_to,
                                           keep=args.keep, on_progress=working("replicating"))
        except CliError as e:
            if args.volume_id is not None:
                raise
            raise CliError(f"snapshot {s['name']} taken, not replicated: {e.message}",
                           e.code) from None
        if not args.json:
            _replica_lines(s["replica"], args.keep, out)
    if args.json and not quiet_json:
        print_json(s, out)
    return s


def _replica_lines(r, keep, out):
    out.write(f"replica {r['id']} of snapshot {r['name']} of volume {r['volume_id']} on "
              f"{r['host_id']}: {_mib(r['allocated_bytes'])} MiB of data, verified\n")
    if r.get("pruned"):
        out.write(f"deleted {len(r['pruned'])} older replica(s) on {r['host_id']} to keep "
                  f"{keep}: {', '.join(p['id'] for p in r['pruned'])}\n")


async def volumes_replicate(reactor, args, out=None):
    out = out or sys.stdout
    r = await call_once(reactor, args.api_url, "zwrm.volume.replicate", args.volume_id,
                        args.snapshot, args.host_id, keep=args.keep,
                        on_progress=working("replicating"))
    print_json(r, out) if args.json else _replica_lines(r, args.keep, out)


def _period(text):
    """
    C{90s}, C{15m}, C{1h}, C{1d} (or seconds) -> seconds: from a minute to 30 days.

    @raise CliError: (usage) anything else, in the words of C{--every}.
    """
    seconds = seconds_of(text, "period", "15m, 1h or 1d")
    if not 60 <= seconds <= 30 * 86400:
        raise CliError(f"--every {text}: a schedule runs at most once a minute and at least "
                       "once in 30 days (e.g. 15m, 1h or 1d)", EXIT_USAGE)
    return seconds


def _every(seconds):
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{seconds / n:g}{unit}"
    return f"{seconds:g}s"


def _last_run(r):
    """How a schedule's last run went: C{last run 2026-12-07 10:00:04 UTC: ok}."""
    if not r.get("last_at"):
        return "not run yet"
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(r["last_at"]))
    return f"last run {when}: {'ok' if r['last_error'] is None else r['last_error']}"


def _schedule_line(r):
    what = f"every {_every(r['every'])}" + (f", the last {r['keep']} kept" if r["keep"] else "")
    return what + (", replicated" if r["replicate"] else "")


async def volumes_schedule(reactor, args, out=None):
    out = out or sys.stdout
    r = await call_once(reactor, args.api_url, "zwrm.volume.schedule", args.app,
                        _period(args.every), keep=args.keep, replicate=args.replicate)
    if args.json:
        return print_json(r, out)
    out.write(f"app {r['app']}: its volumes snapshotted {_schedule_line(r)}; the first run "
              "now (zwrm volumes schedules)\n")


async def volumes_schedules(reactor, args, out=None):
    out = out or sys.stdout
    rows = await call_once(reactor, args.api_url, "zwrm.volume.schedules")
    if args.json:
        return print_json(rows, out)

    def utc(ts):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "-"

    _table(["APP", "SCHEDULE", "LAST RUN", "NEXT RUN", "LAST RESULT"],
           [[r["app"] or r["app_id"], _schedule_line(r), utc(r["last_at"]), utc(r["next_at"]),
             ("ok" if r["last_error"] is None else r["last_error"]) if r["last_at"] else "-"]
            for r in rows], out)


async def volumes_unschedule(reactor, args, out=None):
    out = out or sys.stdout
    r = await call_once(reactor, args.api_url, "zwrm.volume.unschedule", args.app)
    if args.json:
        return print_json(r, out)
    out.write(f"app {args.app}: no longer snapshotted on a schedule (its snapshots stay)\n")


def format_replicas(replicas, out):
    _table(["ID", "VOLUME", "HOST", "SNAPSHOT", "TAKEN", "COPIED", "DATA(MiB)", "STATE"],
           [[r["id"], r["volume_id"], r["host_id"], r["name"],
             time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["taken_at"])),
             time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created_at"])),
             _mib(r["allocated_bytes"]), r["state"]] for r in replicas], out)


async def _volume_listing(reactor, args, procedure, fmt, out):
    """C{procedure}'s rows (of C{args.volume_id}, or of C{args.app}'s volumes), printed."""
    rows = await call_once(reactor, args.api_url, procedure, volume_id=args.volume_id,
                           app=args.app)
    print_json(rows, out) if args.json else fmt(rows, out)


async def volumes_replicas(reactor, args, out=None):
    await _volume_listing(reactor, args, "zwrm.volume.replicas", format_replicas,
                          out or sys.stdout)


async def volumes_delete_replica(reactor, args, out=None):
    out = out or sys.stdout
    gone = await call_once(reactor, args.api_url, "zwrm.volume.delete_replica",
                           args.volume_id, args.replica)
    if args.json:
        return print_json({"replica": gone}, out)
    out.write(f"deleted replica {gone} of volume {args.volume_id}\n")


async def volumes_snapshots(reactor, args, out=None):
    await _volume_listing(reactor, args, "zwrm.volume.snapshots", format_snapshots,
                          out or sys.stdout)


async def volumes_restore(reactor, args, out=None):
    out = out or sys.stdout
    got = await call_once(reactor, args.api_url, "zwrm.volume.restore", args.volume_id,
                          args.snapshot, restart=args.restart, on_progress=working("restoring"))
    if args.json:
        return print_json(got, out)
    machine = got.get("machine")
    again = f" (machine {machine['id']} restarted in place)" if machine else ""
    out.write(f"restored volume {got['volume']['id']} from snapshot {got['snapshot']['name']}"
              f"{again}; what it held is kept as snapshot {got['kept']['name']}\n")


async def volumes_delete_snapshot(reactor, args, out=None):
    out = out or sys.stdout
    gone = await call_once(reactor, args.api_url, "zwrm.volume.delete_snapshot",
                           args.volume_id, args.snapshot)
    if args.json:
        return print_json({"snapshot": gone}, out)
    out.write(f"deleted snapshot {args.snapshot} ({gone}) of volume {args.volume_id}\n")
