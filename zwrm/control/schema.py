"""
The arguments of every WAMP procedure the control plane registers, in one place.

Each procedure has a L{Procedure}: its URI, the roles that may call it, its arguments in
order (name, type, required or default, what it is), what it returns and the errors it
raises.  L{zwrm.control.api.ControlSession} checks every call against its procedure's schema
before the procedure runs: a wrong number of arguments, an unknown keyword, a missing
required argument, a value of the wrong type, an oversize string, list or mapping, or a
number out of range is answered with C{zwrm.error.invalid_argument}, whose message names the
argument (and whose C{argument} keyword carries its name), and nothing runs.  The
procedures themselves still check what only they can (an app name that is taken, a host
that does not exist).

C{scripts/gen-wamp-docs} writes docs/wamp-procedures.md from L{PROCEDURES}; a test fails if
the checked-in file differs.

Bounds worth knowing: ids are at most 128 characters of C{A-Z a-z 0-9 . _ : -}; app and
volume names are DNS labels (1-63 lower-case letters, digits and C{-}); lists and mappings
are bounded; numbers are finite and within the stated range; an agent's capacity is at most
4096 vCPUs, 64 TiB of memory and 1 EiB of disk.
"""

import math
import re

from zwrm import errors, hostfacts

# -- types -------------------------------------------------------------------------------


def _show(value, secret=False):
    """A short description of a value for an error message (never the value if secret)."""
    if secret:
        return f"a {_kind(value)}"
    text = repr(value)
    if len(text) <= 40:
        return text
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    if isinstance(value, (list, tuple, dict)):
        return f"a {_kind(value)} of {len(value)} items"
    return f"a {_kind(value)}"


def _kind(value):
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            tuple: "list", dict: "mapping", type(None): "null"}.get(type(value), type(value).__name__)


class Invalid(Exception):
    """Raised by a type's C{check}: C{path} (e.g. C{facts.labels}) and a phrase."""

    def __init__(self, path, phrase):
        Exception.__init__(self, path, phrase)
        self.path = path
        self.phrase = phrase


class Type:
    """A type of argument value: C{check(value, path, secret)} and C{describe()}."""

    def check(self, value, path, secret=False):
        raise NotImplementedError

    def describe(self):
        raise NotImplementedError

    def _wrong(self, value, path, secret):
        raise Invalid(path, f"must be {self.describe()}, not {_show(value, secret)}")


class Str(Type):
    def __init__(self, max_len, pattern=None, what=None, min_len=0):
        self.max_len = max_len
        self.min_len = min_len
        self.pattern = re.compile(pattern) if pattern else None
        self.what = what

    def check(self, value, path, secret=False):
        if not isinstance(value, str):
            self._wrong(value, path, secret)
        if len(value) > self.max_len:
            raise Invalid(path, f"is at most {self.max_len} characters, not {len(value)}")
        if len(value) < self.min_len or (self.pattern and not self.pattern.fullmatch(value)):
            self._wrong(value, path, secret)

    def describe(self):
        if self.what:
            return self.what
        least = "a non-empty" if self.min_len else "a"
        return f"{least} string of at most {self.max_len} characters"


class Int(Type):
    def __init__(self, low, high):
        self.low, self.high = low, high

    def check(self, value, path, secret=False):
        if isinstance(value, bool) or not isinstance(value, int) or not self.low <= value <= self.high:
            self._wrong(value, path, secret)

    def describe(self):
        return f"an integer from {self.low} to {self.high}"


class Number(Type):
    def __init__(self, low, high):
        self.low, self.high = low, high

    def check(self, value, path, secret=False):
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (isinstance(value, float) and not math.isfinite(value))
                or not self.low <= value <= self.high):
            self._wrong(value, path, secret)

    def describe(self):
        return f"a number from {_number(self.low)} to {_number(self.high)}"


def _number(n):
    """C{60}, C{2592000}, C{0.05}: a bound as written (not C{2.592e+06})."""
    return str(int(n)) if float(n).is_integer() else f"{n:g}"


class Bool(Type):
    def check(self, value, path, secret=False):
        if not isinstance(value, bool):
            self._wrong(value, path, secret)

    def describe(self):
        return "true or false"


class Nullable(Type):
    def __init__(self, inner):
        self.inner = inner

    def check(self, value, path, secret=False):
        if value is not None:
            self.inner.check(value, path, secret)

    def describe(self):
        return f"{self.inner.describe()}, or null"


class List(Type):
    def __init__(self, item, max_items):
        self.item, self.max_items = item, max_items

    def check(self, value, path, secret=False):
        if not isinstance(value, (list, tuple)):
            self._wrong(value, path, secret)
        if len(value) > self.max_items:
            raise Invalid(path, f"has at most {self.max_items} items, not {len(value)}")
        for i, v in enumerate(value):
            self.item.check(v, f"{path}[{i}]", secret)

    def describe(self):
        return f"a list of at most {self.max_items} items, each {self.item.describe()}"


class Map(Type):
    """A mapping of string keys (bounded) to values of one type."""

    def __init__(self, value, max_items, key=None):
        self.value, self.max_items = value, max_items
        self.key = key or Str(128, min_len=1)

    def check(self, value, path, secret=False):
        if not isinstance(value, dict):
            self._wrong(value, path, secret)
        if len(value) > self.max_items:
            raise Invalid(path, f"has at most {self.max_items} entries, not {len(value)}")
        for k, v in value.items():
            try:
                self.key.check(k, f"{path} key", secret)
            except Invalid as e:
                raise Invalid(f"{path} key", f"{e.phrase} (keys are {self.key.describe()})") from None
            self.value.check(v, f"{path}.{k}", secret)

    def describe(self):
        return f"a mapping of at most {self.max_items} entries to {self.value.describe()}"


class Record(Type):
    """A mapping with known fields (each typed, some required) and, if allowed, others."""

    def __init__(self, fields, required=(), others=None, max_items=64, what=None):
        self.fields = dict(fields)
        self.required = tuple(required)
        self.others = others
        self.max_items = max_items
        self.what = what

    def check(self, value, path, secret=False):
        if not isinstance(value, dict):
            self._wrong(value, path, secret)
        if len(value) > self.max_items:
            raise Invalid(path, f"has at most {self.max_items} entries, not {len(value)}")
        for name in self.required:
            if name not in value:
                raise Invalid(path, f"needs {name!r}")
        for k, v in value.items():
            if not isinstance(k, str) or len(k) > 128:
                raise Invalid(f"{path} key", f"must be a string of at most 128 characters, not {_show(k)}")
            t = self.fields.get(k, self.others)
            if t is None:
                raise Invalid(path, f"has no field {_show(k)} (fields: {', '.join(self.fields)})")
            t.check(v, f"{path}.{k}", secret)

    def describe(self):
        if self.what:
            return self.what
        return "a mapping with " + ", ".join(
            f"{k}{'' if k in self.required else ' (optional)'}" for k in self.fields)


class OneOf(Type):
    def __init__(self, *choices):
        self.choices = choices

    def check(self, value, path, secret=False):
        errs = []
        for t in self.choices:
            try:
                t.check(value, path, secret)
                return
            except Invalid as e:
                errs.append(e)
        # report the error of the choice of the value's own kind, if any
        for t, e in zip(self.choices, errs, strict=True):
            if (isinstance(t, List) and isinstance(value, (list, tuple))) or (
                    isinstance(t, (Record, Map)) and isinstance(value, dict)):
                raise e
        self._wrong(value, path, secret)

    def describe(self):
        return " or ".join(t.describe() for t in self.choices)


class Json(Type):
    """
    Any JSON value, bounded: depth, items per list or mapping, string length, total items.
    With C{binary}, byte strings too (WAMP's binary values, bounded as strings are).
    """

    def __init__(self, max_depth=8, max_items=1000, max_string=65536, max_total=20000, what=None,
                 binary=False):
        self.max_depth, self.max_items = max_depth, max_items
        self.max_string, self.max_total = max_string, max_total
        self.what = what
        self.binary = binary

    def check(self, value, path, secret=False):
        budget = [self.max_total]
        self._walk(value, path, 0, budget)

    def _walk(self, value, path, depth, budget):
        budget[0] -= 1
        if budget[0] < 0:
            raise Invalid(path, f"holds more than {self.max_total} values in all")
        if value is None or isinstance(value, bool | int):
            return
        if isinstance(value, float):
            if not math.isfinite(value):
                raise Invalid(path, "must be a finite number")
            return
        if isinstance(value, str) or (self.binary and isinstance(value, bytes)):
            if len(value) > self.max_string:
                raise Invalid(path, f"is at most {self.max_string} characters, not {len(value)}")
            return
        if isinstance(value, (list, tuple, dict)):
            if depth >= self.max_depth:
                raise Invalid(path, f"is nested deeper than {self.max_depth} levels")
            if len(value) > self.max_items:
                raise Invalid(path, f"has at most {self.max_items} items, not {len(value)}")
            if isinstance(value, dict):
                for k, v in value.items():
                    if not isinstance(k, str) or len(k) > 128:
                        raise Invalid(f"{path} key", "must be a string of at most 128 characters")
                    self._walk(v, f"{path}.{k}", depth + 1, budget)
            else:
                for i, v in enumerate(value):
                    self._walk(v, f"{path}[{i}]", depth + 1, budget)
            return
        raise Invalid(path, f"must be JSON data, not a {_kind(value)}")

    def describe(self):
        return self.what or (f"JSON data (nested at most {self.max_depth} deep, at most"
                             f" {self.max_items} items per list or mapping)")


# -- the argument types of zwrm ---------------------------------------------------------

ID_ALPHABET = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
ID = Str(128, ID_ALPHABET, "an id (1-128 characters of A-Z a-z 0-9 . _ : -, starting with a"
                           " letter or digit)")
NAME = Str(63, r"[a-z0-9][a-z0-9-]{0,62}",
           "a name (1-63 lower-case letters, digits and -, starting with a letter or digit)")
PLACE = Str(63, hostfacts.PLACE_PATTERN,
            f"a region or datacenter name ({hostfacts.PLACE_TEXT})")
LABEL_KEY = Str(63, hostfacts.LABEL_KEY_PATTERN,
                f"a label key ({hostfacts.LABEL_KEY_TEXT})")
TEXT = Str(255)
IMAGE_NAME = Str(255, r"[a-z0-9][a-z0-9._/-]{0,254}", "an image repository name (at most 255"
                                                       " characters of a-z 0-9 . _ / -)")
IMAGE_REF = Str(512, r"[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?"
                     r"(@[a-z0-9]+:[a-f0-9]{32,128})?",
                "an image reference NAME[:TAG][@DIGEST] (at most 512 characters)")
TOKEN_ID = Str(256, r"[A-Za-z0-9._-]{1,256}", "a token id (or the token's text)")
SECONDS_MAX = 365 * 24 * 3600

MAX_VCPUS = 4096
MAX_MEMORY_MB = 64 * 1024 * 1024  # 64 TiB
MAX_DISK_MB = 1024 ** 4  # 1 EiB
MAX_MACHINES_PER_HOST = 10000

MACHINE_STATE = Str(32, r"[a-z_]{1,32}", "a machine state")

MACHINE_REPORT = Record(
    {"id": ID, "machine_id": ID, "state": MACHINE_STATE, "health": Nullable(Str(32)),
     "reason": Nullable(Str(65536)), "host_port": Nullable(Int(0, 65535)),
     "app": Nullable(Str(63)), "spec_id": Nullable(ID), "destroyed": Bool(),
     "host_id": Nullable(ID), "kind": Str(32), "paused": Nullable(Str(32))},
    others=Json(max_depth=4, max_items=64, max_string=4096, max_total=256),
    max_items=32, what="a machine report {id or machine_id, state, ...}")

MACHINE_EVENT = Record(
    dict(MACHINE_REPORT.fields), required=("machine_id",),
    others=MACHINE_REPORT.others, max_items=32,
    what="a machine event {kind: \"machine\", machine_id, state, health, reason, host_port, ...}")

FACTS = Record(
    {
        "name": Str(hostfacts.NAME_MAX), "region": PLACE, "datacenter": PLACE,
        "address": Str(255),
        "labels": Map(Str(hostfacts.LABEL_VALUE_MAX), hostfacts.MAX_LABELS, key=LABEL_KEY),
        "vcpus": Int(0, MAX_VCPUS), "memory_mb": Int(0, MAX_MEMORY_MB),
        "disk_mb": Int(0, MAX_DISK_MB), "agent_version": Str(64),
        "fence_after": Number(0, 86400),
        "machines": List(MACHINE_REPORT, MAX_MACHINES_PER_HOST),
    },
    others=Json(max_depth=4, max_items=64, max_string=4096, max_total=256),
    max_items=32,
    what=("a mapping of host facts: name, region, datacenter, address, labels (at most 64),"
          f" vcpus (0-{MAX_VCPUS}), memory_mb (at most 64 TiB), disk_mb (at most 1 EiB),"
          f" agent_version, fence_after (seconds, 0-86400), machines (at most"
          f" {MAX_MACHINES_PER_HOST})"))

STATS = Json(max_depth=4, max_items=64, max_string=4096, max_total=1024,
             what="a mapping of heartbeat figures (at most 64 entries, nested at most 4 deep)")

SPEC = Json(max_depth=8, max_items=256, max_string=16384, max_total=4096,
            what="an app spec (see zwrm.app.deploy; at most 4096 values, nested at most 8 deep)")


# -- procedures ------------------------------------------------------------------------

# binary: Crossbar.io passes a TLS transport's channel id (tls-unique) as bytes
ROUTER_DETAILS = Json(max_depth=8, max_items=256, max_string=65536, max_total=4096,
                      what="a mapping of details from the router", binary=True)

REQUIRED = object()


class Arg:
    """
    One argument: C{name}, C{type}, C{default} (L{REQUIRED} if it must be given), C{doc},
    and C{secret} (its value is never repeated in an error message).
    """

    def __init__(self, name, type, default=REQUIRED, doc="", secret=False):
        self.name, self.type, self.default, self.doc, self.secret = name, type, default, doc, secret

    @property
    def required(self):
        return self.default is REQUIRED


class Procedure:
    """The schema of one WAMP procedure."""

    def __init__(self, uri, roles, doc, args=(), returns="", errors=()):
        self.uri, self.roles, self.doc = uri, tuple(roles), doc
        self.args = list(args)
        self.returns = returns
        self.errors = tuple(errors)
        self._by_name = {a.name: a for a in self.args}
        self._names = ", ".join(a.name for a in self.args) or "none"

    def check(self, args, kwargs):
        """
        Check one call's positional C{args} and keyword C{kwargs}.

        @raise errors.InvalidArgument: naming the argument at fault (keyword C{argument}).
        """
        names = self._names
        if len(args) > len(self.args):
            raise errors.InvalidArgument(
                f"{self.uri} takes at most {len(self.args)} argument"
                f"{'' if len(self.args) == 1 else 's'} ({names}), not {len(args)}",
                argument=None)
        given = {}
        for a, v in zip(self.args, args, strict=False):
            given[a.name] = v
        for k, v in kwargs.items():
            if k not in self._by_name:
                shown = k if isinstance(k, str) and len(k) <= 40 else "(a long name)"
                raise errors.InvalidArgument(
                    f"{self.uri} has no argument {shown!r} (its arguments: {names})",
                    argument=shown)
            if k in given:
                raise errors.InvalidArgument(f"{self.uri}: {k} is given twice", argument=k)
            given[k] = v
        for a in self.args:
            if a.name not in given:
                if a.required:
                    raise errors.InvalidArgument(f"{self.uri} needs {a.name}", argument=a.name)
                continue
            try:
                a.type.check(given[a.name], a.name, a.secret)
            except Invalid as e:
                raise errors.InvalidArgument(f"{self.uri}: {e.path} {e.phrase}",
                                             argument=a.name) from None


OPERATOR = ("operator",)
READ = ("operator", "viewer")
AGENT = ("agent",)

_HOST = Arg("host_id", ID, doc="the host's id")
_APP = Arg("name", NAME, doc="the app's name")
_MACHINE = Arg("machine_id", ID, doc="the machine's id")

PROCEDURES = {p.uri: p for p in [
    # -- agents ------------------------------------------------------------------------
    Procedure(
        "zwrm.agent.join", ("joining",),
        "Admit a new host. A host id that already joined needs that host's credential, or an"
        " operator's zwrm.host.reset.",
        [Arg("host_id", Nullable(ID), None, "the id the agent chose (null: one is assigned)"),
         Arg("facts", Nullable(FACTS), None, "what the agent reports about its host"),
         Arg("csr", Nullable(Str(16384)), None,
             "a PEM certificate request for the host id (then the answer has a certificate)"),
         Arg("credential", Nullable(Str(256)), None,
             "the host's credential, to join an existing host id again", secret=True)],
        "{host_id, credential, heartbeat_interval}, with csr also {certificate, ca} (PEM)",
        ["invalid_argument", "not_authorized (a host id that already joined)",
         "conflict (a join of this id is under way)"]),
    Procedure(
        "zwrm.agent.register", AGENT,
        "The agent of the calling host (its authid) connected with its credential; report"
        " its facts.",
        [Arg("facts", Nullable(FACTS), None, "what the agent reports about its host")],
        "{host_id, state, heartbeat_interval}", ["invalid_argument", "not_found"]),
    Procedure(
        "zwrm.agent.renew_certificate", AGENT,
        "A new host certificate for the calling host (its authid), for the key of csr;"
        " agents ask when a third of their certificate's lifetime is left. The host"
        " certificate it had stays valid until it expires.",
        [Arg("csr", Str(16384), doc="a PEM certificate request for the calling host's id")],
        "{certificate, ca} (PEM)",
        ["invalid_argument (a malformed request, or one for another host)",
         "unavailable (a control plane without a CA)"]),
    Procedure(
        "zwrm.agent.heartbeat", AGENT, "The calling host is alive.",
        [Arg("stats", Nullable(STATS), None, "figures such as image_cache {size, limit, ...} and"
             " disk_free_mb (under min_free_disk_mb: no new placements on the host)")],
        "{state, heartbeat_interval}", ["invalid_argument", "not_found"]),
    Procedure(
        "zwrm.agent.report", AGENT,
        "A list of the calling host's machines (reconciled), or one machine event (stored"
        " and published).",
        [Arg("report", Nullable(OneOf(List(MACHINE_REPORT, MAX_MACHINES_PER_HOST), MACHINE_EVENT)),
             None, "the machines, or one machine event")],
        "{restored, failed, duplicate, unknown} for a list; the machine for an event",
        ["invalid_argument", "not_found", "not_authorized (a machine of another host)"]),
    # -- hosts -------------------------------------------------------------------------
    Procedure("zwrm.host.list", READ, "Every host, summarised.", [], "a list of hosts"),
    Procedure("zwrm.host.status", READ, "One host with its machines and recent events.",
              [_HOST, Arg("events", Int(0, 1000), 20, "how many of its newest events")], "the host with machine_list, events, stats, disk_full and unrecorded"
              " ({volumes, snapshots, machines} its agent keeps that the cluster does not"
              " record, its agent asked now; null when it cannot be asked)",
              ["invalid_argument", "not_found"]),
    Procedure(
        "zwrm.host.clean", OPERATOR,
        "Delete what a host keeps that the cluster does not record (zwrm.host.status's"
        " unrecorded, read again now): its machine records that are down, then snapshot"
        " files, then volumes. Nothing under way is touched.",
        [_HOST],
        "{host_id, deleted: {volumes, snapshots, machines}, kept: [{id, kind, reason}]}",
        ["invalid_argument", "not_found", "conflict (the host is not ready or drained)",
         "unavailable (its agent cannot be reached)"]),
    Procedure(
        "zwrm.host.reset", OPERATOR,
        "Let a host whose agent lost its credential join again once (with a join token)"
        " within ttl seconds.",
        [_HOST, Arg("ttl", Number(1, 30 * 86400), 3600.0, "seconds the permission lasts")],
        "{host_id, expires_at}", ["invalid_argument", "not_found"]),
    Procedure(
        "zwrm.host.remove", OPERATOR,
        "Remove an offline host from the cluster: its row and credential, its subnet and"
        " addresses; the replicas that failed with it are placed again elsewhere."
        " Progressive results, if asked for: {elapsed} at least every 10 s.",
        [_HOST, Arg("forget_volumes", Bool(), False,
                    "also delete the records of the volumes that live on it (their data is"
                    " given up; their replicas get new, empty volumes)"),
         Arg("recover_volumes", Bool(), False,
             "make each of its volumes again on the host of its newest replica"
             " (zwrm.volume.replicate), verified, before anything is stored; volumes without"
             " one are refused unless forget_volumes")],
        "{host_id, volumes_forgotten, replicas_forgotten: [{replica_id, volume_id, host_id}],"
        " volumes_recovered: [{volume_id, host_id, replica_id, snapshot, taken_at}],"
        " rescheduled: [{app, replicas}], not_placed: [{app, replicas, error}]}",
        ["invalid_argument", "not_found", "conflict", "unavailable (a recovery failed:"
         " nothing changed)", "resource_exhausted (no room for a recovered volume)"]),
    Procedure(
        "zwrm.host.drain", OPERATOR,
        "Start draining a host: move each of its machines to a host the scheduler picks,"
        " then the replicas it keeps.",
        [_HOST,
         Arg("deadline", Nullable(Number(1, 7 * 86400)), None,
             "seconds; migrations not started by then are not moved (3600)"),
         Arg("max_parallel", Nullable(Int(1, 64)), None, "migrations at a time (1)"),
         Arg("dry_run", Bool(), False, "only return the plan"),
         Arg("healthy_deadline", Nullable(Number(1, 86400)), None,
             "seconds a replacement has to pass its health check (300)"),
         Arg("min_healthy", Nullable(Number(0, 3600)), None,
             "seconds it must keep passing before the move commits (10)"),
         Arg("stop_timeout", Nullable(Number(0, 3600)), None,
             "seconds of ACPI power-down before a hard stop (30)"),
         Arg("poll", Nullable(Number(0.05, 60)), None,
             "seconds before a failed call to a host is tried again, and between reads of "
             "copy progress from an agent that does not announce it (1)"),
         Arg("mode", Nullable(Str(4, pattern="auto|live|cold", what='"auto", "live" or "cold"')),
             None, "how machines with volumes move: auto (live where both hosts can, else "
             "cold), live (refused if one cannot) or cold (auto)"),
         Arg("downtime_limit", Nullable(Number(1, 60000)), None,
             "milliseconds a live move may pause the machine (the agents' 300)"),
         Arg("live_deadline", Nullable(Number(1, 86400)), None,
             "seconds of RAM migration a live move may take before it gives up or, with "
             "postcopy, switches to post-copy (the agents' 120)"),
         Arg("postcopy", Bool(), False, "allow post-copy at the live deadline")],
        "{drain_id, host_id, state, mode, plan: [{machine_id, app, volumes, snapshots, "
        "target, reason, mode, mode_reason, down, keep_down}], replicas: [{replica, "
        "volume_id, name, target, reason}]}",
        ["invalid_argument", "not_found", "conflict", "unplaceable"]),
    Procedure("zwrm.host.drain_status", READ, "The latest drain of a host.", [_HOST],
              "{drain_id, host_id, state, host_state, options, migrations: [...], replicas:"
              " [{replica, volume_id, name, state, target, reason}]}",
              ["invalid_argument", "not_found"]),
    Procedure("zwrm.drain.list", READ,
              "Every drain, newest first (those under way and the recent ones), with its host"
              " and state, so a client need not call drain_status per host.",
              [Arg("limit", Int(1, 1000), 100, "at most this many drains")],
              "[{drain_id, host_id, state, host_state, created_at, updated_at, migrations:"
              " {phase: count}, total}]", ["invalid_argument"]),
    Procedure("zwrm.host.undrain", OPERATOR, "Cancel a drain.", [_HOST],
              "the drain's status", ["invalid_argument", "not_found", "conflict"]),
    Procedure("zwrm.host.activate", OPERATOR, "Return a drained host to service.", [_HOST],
              "the host's state", ["invalid_argument", "not_found", "conflict"]),
    # -- apps --------------------------------------------------------------------------
    Procedure("zwrm.app.create", OPERATOR, "Create an empty app.", [_APP], "{id, name}",
              ["invalid_argument", "conflict"]),
    Procedure("zwrm.app.list", READ, "Every app with its replica and machine counts.", [],
              "[{id, name, image, replicas, machines, destroying}]"),
    Procedure("zwrm.app.status", READ, "An app's spec, machines and volumes.", [_APP],
              "{id, name, spec, spec_version, destroying, machines, volumes, rollout,"
              " snapshot_schedule}: rollout is its last rolling update ({state, version,"
              " replaced, total, reason, at}) or null; destroying is the destroy under way"
              " ({volumes, since, delay_ends}) or null; snapshot_schedule is its volumes' schedule (as"
              " zwrm.volume.schedules lists it) or null",
              ["invalid_argument", "not_found"]),
    Procedure(
        "zwrm.app.deploy", OPERATOR,
        "Store a spec as the app's spec (its next version; the current spec again is no"
        " new version) and converge its machines to it.",
        [_APP, Arg("spec", SPEC, doc="{image, vcpus, memory_mb, replicas, region, datacenter,"
                                     " service_port, health, volumes, restart, update, ...}:"
                                     " a field"
                                     " left out keeps the current version's value, a field"
                                     " given as null is reset to its default; a cloud_init"
                                     " user_data or env given as the {sha256, size} that"
                                     " zwrm.app.status shows keeps the current value")],
        "the app's status (a rolling update: once it ended; conflict: a later deploy,"
        " rollback or destroy superseded it)",
        ["invalid_argument", "not_found", "unplaceable", "unavailable", "conflict"]),
    Procedure("zwrm.app.plan", OPERATOR,
              "What a deploy of this spec would do, changing nothing: the diff against the "
              "current version and the replicas it would create, replace (and move), "
              "destroy or keep.",
              [_APP, Arg("spec", SPEC, doc="as zwrm.app.deploy's")],
              "{app, version, changed, diff, create, replace, destroy, keep, unplaceable}",
              ["invalid_argument", "not_found", "conflict (the app is being destroyed)"]),
    Procedure("zwrm.app.history", OPERATOR, "Every spec version of an app, oldest first.", [_APP],
              "[{version, spec, created_at, current}]", ["invalid_argument", "not_found"]),
    Procedure("zwrm.app.rollback", OPERATOR,
              "Deploy an earlier spec version again (as a new version), checked as a deploy.",
              [_APP, Arg("version", Nullable(Int(1, 2 ** 31)), None,
                         "the version (default: the one before the current one)")],
              "the app's status",
              ["invalid_argument", "not_found", "unplaceable", "unavailable", "conflict"]),
    Procedure("zwrm.app.scale", OPERATOR, "Change an app's replica count and converge.",
              [_APP, Arg("replicas", Int(0, 1000), doc="the number of machines")],
              "the app's status",
              ["invalid_argument", "not_found", "unplaceable", "unavailable",
               "conflict (the app is being destroyed)"]),
    Procedure("zwrm.app.destroy", OPERATOR,
              "Destroy every machine of an app and the app; its volumes too if asked. The"
              " destroy is stored first and carried out to its end: a control-plane stop or"
              " an unreachable host only delays it (unavailable: the rest is removed once"
              " its host returns or is found offline). Asked again, it goes on with the"
              " volumes given last.",
              [_APP, Arg("volumes", Bool(), False, "also delete its volumes")],
              "what was destroyed", ["invalid_argument", "not_found", "unavailable"]),
    # -- machines ----------------------------------------------------------------------
    Procedure("zwrm.machine.list", READ, "Machines, optionally of one app or on one host.",
              [Arg("app", Nullable(NAME), None, "only this app's"),
               Arg("host_id", Nullable(ID), None, "only this host's")],
              "a list of machines", ["invalid_argument", "not_found"]),
    Procedure("zwrm.machine.status", READ, "One machine with its recent events.", [_MACHINE],
              "the machine with spec and events", ["invalid_argument", "not_found"]),
    Procedure("zwrm.machine.logs", OPERATOR, "The tail of a machine's serial console.",
              [_MACHINE, Arg("max_bytes", Int(1, 1024 * 1024), 65536, "at most this many bytes")],
              "the console text", ["invalid_argument", "not_found", "unavailable"]),
    Procedure("zwrm.machine.console", OPERATOR,
              "Attach to a machine's serial console: the guest's output comes as progressive "
              "results (base64 text) until the caller cancels (detaches) or the console closes.",
              [_MACHINE], "{machine_id, ended}", ["invalid_argument", "not_found", "unavailable"]),
    Procedure("zwrm.machine.console_write", OPERATOR,
              "Send keystrokes to a machine's serial console.",
              [_MACHINE, Arg("data", Str(8192), doc="base64 of at most 4 KiB")],
              "the bytes sent", ["invalid_argument", "not_found", "unavailable"]),
    Procedure("zwrm.machine.destroy", OPERATOR,
              "Destroy one machine (its app's next converge replaces it).", [_MACHINE],
              "the machine's id", ["invalid_argument", "not_found", "unavailable"]),
    Procedure("zwrm.machine.restart", OPERATOR,
              "Restart one machine in place: the same id on the same host, its volumes and"
              " root overlay kept. Out of the routes for the app's shutdown_delay, stopped"
              " gracefully, started again (a stopped or failed machine is only started).",
              [_MACHINE], "the machine after its start",
              ["invalid_argument", "not_found (machine_id)",
               "conflict (its host is offline or draining, a drain moves it, or it is being"
               " started or stopped; nothing changed. A drain that began during the restart:"
               " it stays stopped, the drain moves it)", "unplaceable (a stopped machine's"
               " host has no room)", "unavailable (it did not start again: it is failed)"]),
    # -- volumes -----------------------------------------------------------------------
    Procedure(
        "zwrm.volume.create", OPERATOR, "Create a volume of an app for one replica.",
        [Arg("app", NAME, doc="the app's name"), Arg("name", NAME, doc="the volume's name"),
         Arg("size_mb", Int(2, 16 * 1024 * 1024), doc="its size in MiB"),
         Arg("mount", Str(4096, r"/.+", "an absolute path other than /"),
             doc="where the guest mounts it"),
         Arg("replica", Int(0, 999), 0, "the replica it belongs to"),
         Arg("region", Nullable(PLACE), None, "place it in this region"),
         Arg("datacenter", Nullable(PLACE), None, "place it in this datacenter"),
         Arg("host_id", Nullable(ID), None, "place it on this host")],
        "the volume", ["invalid_argument", "not_found", "conflict", "unplaceable", "unavailable"]),
    Procedure("zwrm.volume.list", READ, "Volumes, optionally of one app.",
              [Arg("app", Nullable(NAME), None, "only this app's")],
              "a list of volumes, each with its app's name (app)",
              ["invalid_argument", "not_found"]),
    Procedure("zwrm.volume.destroy", OPERATOR, "Delete a volume and its data.",
              [Arg("volume_id", ID, doc="the volume's id")], "the volume's id",
              ["invalid_argument", "not_found", "conflict (a live machine uses it)",
               "unavailable"]),
    Procedure("zwrm.volume.snapshot", OPERATOR,
              "Snapshot a volume on its host: a whole copy, taken while its machine runs (a"
              " point in time, crash-consistent) or while it is down. Progressive results, if"
              " asked for: {elapsed} at least every 10 s while it copies.",
              [Arg("volume_id", ID, doc="the volume's id"),
               Arg("name", Nullable(NAME), None, "the snapshot's name (default: the time,"
                   " YYYYMMDD-HHMMSS UTC)"),
               Arg("keep", Nullable(Int(1, 1000)), None, "then delete the volume's oldest"
                   " snapshots until this many are left (a restore's before-restore-..."
                   " ones are neither deleted nor counted)")],
              "the snapshot: {id, volume_id, app_id, host_id, name, state, live, size_bytes,"
              " allocated_bytes, reason, created_at, pruned: [the snapshots deleted for"
              " keep]}",
              ["invalid_argument", "not_found (volume_id)",
               "conflict (the name is taken, the volume's host drains, its machine is"
               " starting, stopping or moving, or another snapshot operation on it is under"
               " way)", "resource_exhausted (no room on its host)", "unavailable"]),
    Procedure("zwrm.volume.snapshots", READ,
              "Snapshots of one volume, of one app's volumes, or all; oldest first.",
              [Arg("volume_id", Nullable(ID), None, "only this volume's"),
               Arg("app", Nullable(NAME), None, "only this app's")],
              "a list of snapshots", ["invalid_argument", "not_found"]),
    Procedure("zwrm.volume.restore", OPERATOR,
              "Put a snapshot's data back into its volume, while no machine runs with it."
              " The copy is verified before it replaces the volume; what the volume held is"
              " kept as a new snapshot, before-restore-<time>. Progressive results, if asked"
              " for: {elapsed} at least every 10 s.",
              [Arg("volume_id", ID, doc="the volume's id"),
               Arg("snapshot", ID, doc="the snapshot's name or id"),
               Arg("restart", Bool(), False, "if its machine runs, restart it in place around"
                   " the restore (as zwrm.machine.restart); a failed restore changes nothing"
                   " and the machine starts again all the same")],
              "{volume, snapshot, kept}: the rows (kept: the new snapshot), and machine: the"
              " machine restarted, after its start",
              ["invalid_argument", "not_found (volume_id, snapshot)",
               "conflict (a live machine uses the volume and restart is false: scale its"
               " replica away first; the volume's host drains; another snapshot operation is"
               " under way; restart: its host is offline or draining, a drain moves it)",
               "resource_exhausted (no room on its host)",
               "unavailable (the copy differed: nothing changed; restart: the machine did not"
               " start again)"]),
    Procedure("zwrm.volume.replicate", OPERATOR,
              "Copy one of a volume's snapshots to another host, as a replica: if the"
              " volume's host is lost, zwrm.host.remove with recover_volumes makes the volume"
              " again there from its newest replica. Progressive results, if asked for:"
              " {elapsed, sent, done, total} (bytes) as the copy goes, at least every 10 s.",
              [Arg("volume_id", ID, doc="the volume's id"),
               Arg("snapshot", ID, doc="the snapshot's name or id"),
               Arg("host_id", Nullable(ID), None, "the host to keep the replica (a ready"
                   " host, not the volume's); default: the one that keeps its newest replica"
                   " if it is ready, else one the scheduler picks for the data"),
               Arg("keep", Nullable(Int(1, 1000)), None, "then delete the volume's oldest"
                   " replicas on that host until this many are left")],
              "the replica: {id, volume_id, app_id, host_id, snapshot_id, name, state,"
              " size_bytes, allocated_bytes, taken_at, reason, created_at, pruned: [the"
              " replicas deleted for keep]}",
              ["invalid_argument", "not_found (volume_id, snapshot, host_id)",
               "unplaceable (no host_id given, and no other host has the room)",
               "conflict (the host is the volume's or not ready, it has a replica of that"
               " snapshot, the volume's host drains, or another snapshot operation on it is"
               " under way)", "resource_exhausted (no room on that host)",
               "unavailable (a host cannot be reached, or the copy failed its verification:"
               " nothing kept)"]),
    Procedure(
        "zwrm.volume.schedule", OPERATOR,
        "Snapshot every volume of an app every so many seconds, the first at once (kept and"
        " run by the control plane): scheduled-<time> snapshots, the oldest of them pruned"
        " to keep, each copied to another host with replicate. Replaces the app's schedule.",
        [Arg("app", NAME, doc="the app's name"),
         Arg("every", Number(60, 30 * 86400), doc="seconds between two runs"),
         Arg("keep", Nullable(Int(1, 1000)), None,
             "keep the last this many scheduled snapshots (and replicas on each host)"),
         Arg("replicate", Bool(), False, "copy each new snapshot to another host")],
        "{id, app_id, app, every, keep, replicate, next_at, last_at, last_error, created_at}",
        ["invalid_argument", "not_found"]),
    Procedure("zwrm.volume.schedules", READ, "Every app's snapshot schedule, the next due first.",
              [], "a list of schedules, as zwrm.volume.schedule returns one", []),
    Procedure("zwrm.volume.unschedule", OPERATOR,
              "Stop snapshotting an app's volumes on a schedule (its snapshots stay).",
              [Arg("app", NAME, doc="the app's name")], "the schedule that was",
              ["invalid_argument", "not_found"]),
    Procedure("zwrm.volume.replicas", READ,
              "Replicas of one volume, of one app's volumes, or all; oldest data first.",
              [Arg("volume_id", Nullable(ID), None, "only this volume's"),
               Arg("app", Nullable(NAME), None, "only this app's")],
              "a list of replicas", ["invalid_argument", "not_found"]),
    Procedure("zwrm.volume.delete_replica", OPERATOR,
              "Delete one replica of a volume and its data on its host.",
              [Arg("volume_id", ID, doc="the volume's id"),
               Arg("replica", ID, doc="the replica's id")],
              "the replica's id",
              ["invalid_argument", "not_found (volume_id, replica)",
               "conflict (the volume's host drains, or another snapshot operation on it is"
               " under way)", "unavailable (its host cannot be reached: nothing changed)"]),
    Procedure("zwrm.volume.delete_snapshot", OPERATOR, "Delete one snapshot and its data.",
              [Arg("volume_id", ID, doc="the volume's id"),
               Arg("snapshot", ID, doc="the snapshot's name or id")],
              "the snapshot's id",
              ["invalid_argument", "not_found (volume_id, snapshot)",
               "conflict (another snapshot operation on the volume is under way)",
               "unavailable"]),
    # -- images ------------------------------------------------------------------------
    Procedure("zwrm.image.list", READ, "Every tagged image, or those of one repository.",
              [Arg("name", Nullable(IMAGE_NAME), None, "only this repository's")],
              "[{name, tag, digest, media_type, kind, size, layers}]", ["invalid_argument"]),
    Procedure("zwrm.image.info", OPERATOR, "One image.",
              [Arg("ref", IMAGE_REF, doc="NAME[:TAG][@DIGEST]")], "the image with its tags",
              ["invalid_argument", "not_found"]),
    Procedure("zwrm.image.gc", OPERATOR,
              "Remove what no image needs: manifests no tag, index or app spec points at, and"
              " blobs no remaining manifest uses, each older than the grace period; then the"
              " content no repository links. A push under way keeps what it uploaded.",
              [Arg("dry_run", Bool(), False, "only say what it would remove"),
               Arg("grace", Nullable(Number(0, 10 * 365 * 86400)), None,
                   "seconds something unused is left first (default 86400: a push uploads"
                   " its blobs before its manifest)")],
              "{manifests: [{name, digest}], blobs: [{name, digest}], bytes, dry_run, changed}",
              ["invalid_argument", "not_authorized (deleting is turned off)"]),
    Procedure("zwrm.image.delete", OPERATOR,
              "Delete a tag, or a manifest and every tag that points at it.",
              [Arg("ref", IMAGE_REF, doc="NAME:TAG or NAME@DIGEST")], "{image, deleted}",
              ["invalid_argument", "not_found", "not_authorized (deleting is turned off)"]),
    # -- ingress certificates (zwrm/control/resources/certs.py) ----------------------------
    Procedure("zwrm.cert.add", OPERATOR,
              "Store (or replace) the TLS certificate and key the ingress serves for a domain"
              " (published ports in https mode); checked: PEM, the key matches, not expired,"
              " its names cover the domain. Every agent gets it.",
              [Arg("domain", Str(253, min_len=1), doc="www.example.com or *.example.com"),
               Arg("cert", Str(65536, min_len=1), doc="the certificate, then its chain (PEM)"),
               Arg("key", Str(16384, min_len=1), doc="its private key (PEM, unencrypted)",
                   secret=True)],
              "{domain, names, subject, issuer, not_before, not_after, fingerprint, "
              "created_at, updated_at} (never the key)",
              ["invalid_argument (naming domain, cert or key)"]),
    Procedure("zwrm.cert.list", READ, "Every ingress certificate, without its key.", [],
              "[{domain, names, subject, issuer, not_before, not_after, fingerprint, "
              "created_at, updated_at}]"),
    Procedure("zwrm.cert.remove", OPERATOR, "Remove the ingress certificate of a domain.",
              [Arg("domain", Str(253, min_len=1), doc="the domain it was added for")],
              "{domain, removed}", ["invalid_argument", "not_found"]),
    # -- join tokens -------------------------------------------------------------------
    Procedure("zwrm.token.create", OPERATOR,
              "Make a join token, or an operator or viewer token (the ticket of authid"
              " operator or viewer).",
              [Arg("ttl", Number(1, SECONDS_MAX), 86400, "seconds it is valid"),
               Arg("description", Str(200), "", "a note"),
               Arg("role", Str(16, r"[a-z]{1,16}", "join, operator or viewer"),
                   "join", "what the token is for")],
              "{token (shown only here), id, role, expires_at}", ["invalid_argument"]),
    Procedure("zwrm.token.list", OPERATOR,
              "Every join, operator and viewer token, without its secret.", [],
              "[{id, role, description, created_at, expires_at, revoked, used, state}]"),
    Procedure("zwrm.token.revoke", OPERATOR,
              "Revoke a join, operator or viewer token (a session already open stays).",
              [Arg("token_id", TOKEN_ID, doc="the token's id (or its whole text)", secret=True)],
              "null", ["invalid_argument", "not_found"]),
    # -- the event history and the audit trail (resources/events.py, audit.py) ---------
    Procedure("zwrm.event.history", READ,
              "The stored events after an id, oldest first (without after: the newest"
              " limit); every published event carries its id. Resume from cursor while more"
              " is true.",
              [Arg("after", Nullable(Int(0, 2 ** 53)), None,
                   "the last event id the client saw"),
               Arg("topics", Nullable(OneOf(Str(64, min_len=1), List(Str(64, min_len=1), 8))),
                   None, "only this topic, or these: host, machine, drain, app, cert (or"
                         " zwrm.event.<that>)"),
               Arg("limit", Int(1, 10000), 1000, "at most this many events"),
               Arg("since", Nullable(Number(0, 2 ** 40)), None,
                   "instead of after: the events stored at or after this POSIX time (paged"
                   " like after)")],
              "{events: [{id, ts, topic, kind, subject, payload}], cursor, more, first_id,"
              " last_id}",
              ["invalid_argument (also: after and since both given)",
               "history_gone (after is older than the kept history, or"
               " newer than its newest id: read the state again, resume from last_id)"]),
    Procedure("zwrm.audit.list", OPERATOR,
              "The audit trail: operator actions with actor, time, arguments (secrets"
              " redacted) and result, oldest first (the newest limit).",
              [Arg("since", Nullable(Number(0, 2 ** 40)), None, "only entries at or after this"
                                                                 " POSIX time"),
               Arg("limit", Int(1, 10000), 1000, "at most this many entries"),
               Arg("uri", Nullable(Str(255)), None, "only calls of this procedure"),
               Arg("authid", Nullable(Str(255)), None, "only calls by this authid")],
              "[{id, ts, authid, role, procedure, args, result, message}]",
              ["invalid_argument"]),
    # -- the cluster -------------------------------------------------------------------
    Procedure("zwrm.cluster.info", ("operator", "viewer", "agent"),
              "Where the registry and the console are (null: the registry is at the host and"
              " port of the caller's WAMP URL).", [],
              "{registry_url, console_url, realm, version}"),
    Procedure("zwrm.cluster.partitions", ("operator", "viewer"),
              "The datacenters where the partition guard holds rescheduling: more than"
              " partition_threshold of their hosts went offline at once, so the replicas"
              " of the held hosts are not placed elsewhere until enough of them return"
              " (then one held host per eviction_interval). Also announced as partition"
              " events on zwrm.event.host.", [],
              "[{datacenter, since, offline_share, held_hosts, threshold, evicting}]"),
    # -- an external router (Crossbar.io) calls these; see docs/scaling.md ---------------
    Procedure("zwrm.crossbar.authenticate", ("trusted",),
              "Crossbar.io's dynamic ticket authenticator: the same checks as the embedded"
              " router's (join, operator and viewer tokens, host credentials; a host's TLS"
              " client certificate from details.transport.peer_cert must be its own).",
              [Arg("realm", Str(255), doc="the realm"),
               Arg("authid", Str(255), doc="who the client says it is"),
               Arg("details", ROUTER_DETAILS, doc="ticket, authmethod, transport", secret=True)],
              "{authid, role, extra}",
              ["wamp.error.authentication_failed (saying why)", "invalid_argument"]),
    Procedure("zwrm.crossbar.authorize", ("trusted",),
              "Crossbar.io's dynamic authorizer for the roles joining, agent, operator and"
              " viewer: zwrm's role table decides; calls are disclosed; a decision that"
              " depends on the authid is not cached.",
              [Arg("session", ROUTER_DETAILS, doc="the session (authid, authrole, ...)"),
               Arg("uri", Str(255), doc="the URI"),
               Arg("action", Str(32), doc="call, register, publish or subscribe"),
               Arg("options", Nullable(ROUTER_DETAILS), None, "match (for register, subscribe)")],
              "{allow, cache, disclose}", ["invalid_argument"]),
]}
"""Every procedure the control plane registers, by URI."""

def schema(uri):
    """
    The L{Procedure} of C{uri}.

    @raise KeyError: it has none (add one to L{PROCEDURES}).
    """
    return PROCEDURES[uri]


class _Unknown(Procedure):
    """The schema of a procedure that has none: up to 16 bounded JSON arguments."""

    def __init__(self, uri):
        Procedure.__init__(self, uri, (), "", [Arg(f"#{i}", Json(), None) for i in range(16)])

    def check(self, args, kwargs):
        Procedure.check(self, args, {})
        for k, v in kwargs.items():
            if not isinstance(k, str) or len(k) > 64:
                raise errors.InvalidArgument(f"{self.uri}: a keyword is at most 64 characters")
            try:
                Json().check(v, k)
            except Invalid as e:
                raise errors.InvalidArgument(f"{self.uri}: {e.path} {e.phrase}", argument=k) from None


def unknown(uri):
    """A L{Procedure} for C{uri}, which has no schema (a bug): bounded JSON arguments only."""
    return _Unknown(uri)


def markdown():
    """The procedure reference (docs/wamp-procedures.md) generated from L{PROCEDURES}."""
    out = [
        "# WAMP procedures of the control plane (realm `zwrm`)",
        "",
        "<!-- Generated by scripts/gen-wamp-docs from zwrm/control/schema.py; do not edit. -->",
        "",
        "Every call is checked against the schema below before the procedure runs. A wrong",
        "number of arguments, an unknown keyword, a missing required argument, a value of the",
        "wrong type, an oversize string, list or mapping, or a number out of range is answered",
        "with `zwrm.error.invalid_argument`; its message names the argument and its `argument`",
        "keyword holds the argument's name. Arguments may be given by position (in the order",
        "below) or by keyword. Every error URI is `zwrm.error.<kind>`.",
        "",
        "A caller that cancels its call, lets it time out or leaves (its connection lost)",
        "gets no answer, but the procedure runs to its end: a change is carried out whole,",
        "stored and announced, never left half-made. Only `zwrm.machine.console` ends when",
        "its caller cancels.",
        "",
    ]
    for p in sorted(PROCEDURES.values(), key=lambda p: p.uri):
        out += [f"## `{p.uri}`", "", p.doc, "", f"Roles: {', '.join(p.roles)}.", ""]
        if p.args:
            out += ["| argument | what | default |", "|---|---|---|"]
            for a in p.args:
                default = "required" if a.required else f"`{_json(a.default)}`"
                what = a.type.describe().replace("|", "\\|")
                doc = f"{a.doc}: " if a.doc else ""
                out.append(f"| `{a.name}` | {doc}{what} | {default} |")
            out.append("")
        else:
            out += ["No arguments.", ""]
        out += [f"Returns: {p.returns}.", ""]
        if p.errors:
            out += ["Errors: " + ", ".join(f"`zwrm.error.{e.split(' ')[0]}`"
                                            + (" " + e.split(" ", 1)[1] if " " in e else "")
                                            for e in p.errors) + ".", ""]
    return "\n".join(out).rstrip() + "\n"


def _json(value):
    import json

    return json.dumps(value)
