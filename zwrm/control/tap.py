"""
C{twistd zwrm-control}: options, configuration file and service.

Every setting can come from the TOML file given with C{--config} and from a flag; a
flag wins.  Example::

    [control]
    listen = ["tcp:8080:interface=127.0.0.1"]
    # WAMP over RawSocket too: "rawsocket:tcp:8081:interface=127.0.0.1" (or rawsocket:ssl:...)
    data_dir = "/var/lib/zwrm/control"
    heartbeat_interval = 5

    # The addresses agents and the CLI learn from the control plane (zwrm.cluster.info);
    # without registry_url they use the host and port of the WAMP URL they were given.
    # registry_url = "https://cp.example.com:8080"
    # console_url = "https://console.example.com"

    # Behind an external WAMP router (Crossbar.io, see docs/scaling.md): the control
    # component connects to it with ticket authentication; listen is then HTTP only
    # (registry, /healthz, /metrics) and registry_url is required.
    # router_url = "ws://127.0.0.1:8081/ws"
    # router_authid = "control"
    # router_ticket_file = "/etc/zwrm/router.ticket"   (or router_ticket = "...")
    # router_ca_file = "/etc/zwrm/router-ca.pem"       (for a wss:// router_url)
    # router_realm = "zwrm"

    [pki]
    host_certificate_lifetime = 31536000   # seconds (a year) host certificates are valid;
                                           # agents renew theirs when a third is left

    [wamp]
    auth_methods = ["ticket"]   # what the embedded router offers clients: ticket, wampcra

    [health]
    check_interval = 15
    offline_after = 30
    # grace = 30   (after a start, no host is marked offline for this long)
    reschedule_after = 0        # seconds before an offline host's stateless replicas move
    partition_threshold = 0.55  # more than this fraction of a datacenter offline: hold
    eviction_interval = 10      # then move one returned-partition host per this many seconds
    min_free_disk_mb = 256      # a host whose agent reports less free on its data disk gets
                                # no new placements (0: never held back)

    [network]
    cidr = "10.80.0.0/16"   # the cluster network: a private /8-/20, a /24 per host; it
                            # cannot change once addresses are allocated

    [scheduler]
    strategy = "spread"
    plugin_dirs = []

    [events]
    max_events = 100000   # the stored event history (zwrm events) keeps at most this many
    max_age = 604800      # ... and none older than this many seconds (a week)

    [audit]
    max_entries = 100000  # the audit trail (zwrm audit) keeps at most this many entries
    max_age = 31536000    # ... and none older than this many seconds (a year)

    [gc]
    policy = "freeze"   # or "python": CPython's collector as it comes
    interval = 5        # seconds between collections of the new (unfrozen) objects
    churn = 0.25        # a full collection once this fraction of the sessions closed
    growth = 1.0        # ... or once the frozen heap grew by this fraction

A bad file or value is one readable line from twistd, not a traceback.
"""

import math
import os
import tomllib
from dataclasses import dataclass, field

from twisted.python import usage

DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"


@dataclass
class Config:
    """The control plane's settings (see the module docstring)."""

    listen: list = field(default_factory=lambda: [DEFAULT_LISTEN])
    data_dir: str = "/var/lib/zwrm/control"
    heartbeat_interval: float = 5.0
    flush_interval: float = 5.0
    check_interval: float = 15.0
    offline_after: float = 30.0
    grace: float | None = None
    reschedule_after: float = 0.0
    partition_threshold: float = 0.55
    eviction_interval: float = 10.0
    min_free_disk_mb: float = 256.0
    network_cidr: str = "10.80.0.0/16"
    strategy: str = "spread"
    plugin_dirs: list = field(default_factory=list)
    insecure_listen: bool = False
    gc_policy: str = "freeze"
    gc_interval: float = 5.0
    gc_churn: float = 0.25
    gc_growth: float = 1.0
    registry_header_timeout: float = 10.0
    registry_body_timeout: float = 3600.0
    registry_idle_timeout: float = 30.0
    registry_upload_ttl: float = 900.0
    registry_url: str | None = None
    console_url: str | None = None
    router_url: str | None = None
    router_realm: str = "zwrm"
    router_authid: str = "control"
    router_ticket: str | None = None
    router_ticket_file: str | None = None
    router_ca_file: str | None = None
    auth_methods: list = field(default_factory=lambda: ["ticket"])
    event_max_events: float = 100000
    event_max_age: float = 7 * 86400.0
    audit_max_entries: float = 100000
    audit_max_age: float = 365 * 86400.0
    host_certificate_lifetime: float = 365 * 86400.0

    def router_secret(self):
        """
        The ticket the control component presents to the external router: C{router_ticket},
        or the first line of C{router_ticket_file}.

        @raise usage.UsageError: the file cannot be read or is empty.
        """
        if self.router_ticket:
            return self.router_ticket
        try:
            with open(self.router_ticket_file) as f:
                secret = f.read().strip()
        except OSError as e:
            raise usage.UsageError(
                f"[control] router_ticket_file {self.router_ticket_file}: {e.strerror}") from None
        if not secret:
            raise usage.UsageError(f"[control] router_ticket_file {self.router_ticket_file} is empty")
        return secret


# (section, key) -> (Config attribute, type)
FILE_KEYS = {
    ("control", "listen"): ("listen", list),
    ("control", "data_dir"): ("data_dir", str),
    ("control", "heartbeat_interval"): ("heartbeat_interval", float),
    ("control", "flush_interval"): ("flush_interval", float),
    ("control", "insecure_listen"): ("insecure_listen", bool),
    ("control", "registry_url"): ("registry_url", str),
    ("control", "console_url"): ("console_url", str),
    ("control", "router_url"): ("router_url", str),
    ("control", "router_realm"): ("router_realm", str),
    ("control", "router_authid"): ("router_authid", str),
    ("control", "router_ticket"): ("router_ticket", str),
    ("control", "router_ticket_file"): ("router_ticket_file", str),
    ("control", "router_ca_file"): ("router_ca_file", str),
    ("wamp", "auth_methods"): ("auth_methods", list),
    ("pki", "host_certificate_lifetime"): ("host_certificate_lifetime", float),
    ("health", "check_interval"): ("check_interval", float),
    ("health", "offline_after"): ("offline_after", float),
    ("health", "grace"): ("grace", float),
    ("health", "reschedule_after"): ("reschedule_after", float),
    ("health", "partition_threshold"): ("partition_threshold", float),
    ("health", "eviction_interval"): ("eviction_interval", float),
    ("health", "min_free_disk_mb"): ("min_free_disk_mb", float),
    ("network", "cidr"): ("network_cidr", str),
    ("scheduler", "strategy"): ("strategy", str),
    ("scheduler", "plugin_dirs"): ("plugin_dirs", list),
    ("events", "max_events"): ("event_max_events", float),
    ("events", "max_age"): ("event_max_age", float),
    ("audit", "max_entries"): ("audit_max_entries", float),
    ("audit", "max_age"): ("audit_max_age", float),
    ("gc", "policy"): ("gc_policy", str),
    ("gc", "interval"): ("gc_interval", float),
    ("gc", "churn"): ("gc_churn", float),
    ("gc", "growth"): ("gc_growth", float),
    ("registry", "header_timeout"): ("registry_header_timeout", float),
    ("registry", "body_timeout"): ("registry_body_timeout", float),
    ("registry", "idle_timeout"): ("registry_idle_timeout", float),
    ("registry", "upload_ttl"): ("registry_upload_ttl", float),
}

GC_POLICIES = ("freeze", "python")

MIN_HOST_CERTIFICATE_LIFETIME = 10.0
"""Seconds; a shorter lifetime would have agents renewing all the time (tests use 10-20)."""


# settings (flag or file key names end so) for which 0 is a meaningful value
_ZERO_ALLOWED = ("grace", "reschedule_after", "reschedule-after", "churn", "free_disk_mb",
                 "free-disk-mb")  # churn 0: see zwrm.gcpolicy


def _coerce(name, kind, value):
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise usage.UsageError(f"{name} must be a number, not {value!r}")
        try:
            value = float(value)
        except ValueError:
            raise usage.UsageError(f"{name} must be a number, not {value!r}") from None
        if not math.isfinite(value):  # (TOML has nan and inf; so has float())
            raise usage.UsageError(f"{name} must be a number, not {value!r}")
        if value <= 0 and not name.endswith(_ZERO_ALLOWED):
            raise usage.UsageError(f"{name} must be positive, not {value}")
        if value < 0:
            raise usage.UsageError(f"{name} must not be negative")
        return value
    if kind is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise usage.UsageError(f"{name} must be a string or a list of strings")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise usage.UsageError(f"{name} must be true or false")
        return value
    if not isinstance(value, str) or not value:
        raise usage.UsageError(f"{name} must be a non-empty string")
    return value


def load_config(path):
    """
    Read a TOML configuration file into a dict of L{Config} attributes.

    @raise usage.UsageError: with one readable line, for a missing or bad file.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise usage.UsageError(f"configuration file {path} does not exist") from None
    except OSError as e:
        raise usage.UsageError(f"cannot read configuration file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise usage.UsageError(f"configuration file {path} is not valid TOML: {e}") from None
    values = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise usage.UsageError(f"{path}: {section!r} must be a [section]")
        for key, value in table.items():
            if (section, key) not in FILE_KEYS:
                raise usage.UsageError(f"{path}: unknown setting [{section}] {key}")
            attr, kind = FILE_KEYS[(section, key)]
            values[attr] = _coerce(f"[{section}] {key}", kind, value)
    return values


def _loopback(description):
    """Whether a server endpoint description listens on loopback only."""
    parts = description.split(":")
    for p in parts[1:]:
        if p.startswith("interface="):
            iface = p[len("interface="):].strip("[]")
            return iface in ("127.0.0.1", "::1", "localhost") or iface.startswith("127.")
    return parts[0] == "unix"


def check_config(config):
    """
    Check a L{Config} as a whole.

    @raise usage.UsageError: if it is inconsistent.
    """
    if not config.listen:
        raise usage.UsageError("at least one listen endpoint is needed")
    for description in config.listen:
        endpoint = description.removeprefix("rawsocket:")  # WAMP over RawSocket on it
        kind = endpoint.split(":", 1)[0]
        if kind not in ("tcp", "tcp6", "ssl", "unix"):
            raise usage.UsageError(
                f"listen endpoint {description!r}: use tcp:, ssl: or unix: endpoints"
                " (rawsocket:<endpoint> for WAMP over RawSocket)"
            )
        if kind != "ssl" and not _loopback(endpoint) and not config.insecure_listen:
            raise usage.UsageError(
                f"listen endpoint {description!r} is plain (not TLS) and not on loopback;"
                " add interface=127.0.0.1, use an ssl: endpoint, or set insecure_listen"
            )
    _check_urls(config)
    _check_auth_methods(config)
    if not 0 < config.partition_threshold <= 1:
        raise usage.UsageError(
            f"[health] partition_threshold must be a fraction in (0, 1], not {config.partition_threshold}")
    if config.host_certificate_lifetime < MIN_HOST_CERTIFICATE_LIFETIME:
        raise usage.UsageError(
            "[pki] host_certificate_lifetime must be at least"
            f" {MIN_HOST_CERTIFICATE_LIFETIME:g} seconds, not {config.host_certificate_lifetime:g}")
    from zwrm.control.network import check_cluster_cidr
    from zwrm.errors import InvalidArgument

    try:
        check_cluster_cidr(config.network_cidr)
    except InvalidArgument as e:
        raise usage.UsageError(f"[network] cidr: {e.message}") from None
    if config.gc_policy not in GC_POLICIES:
        raise usage.UsageError(
            f"[gc] policy must be one of {', '.join(GC_POLICIES)}, not {config.gc_policy!r}"
        )
    # The strategy is loaded as the control plane will load it: an unknown name (or a
    # broken plugin) stops it here, with the names there are.
    from zwrm.plugins import PluginError
    from zwrm.scheduler import load_strategy

    try:
        load_strategy(config.strategy, config.plugin_dirs)
    except PluginError as e:
        raise usage.UsageError(f"scheduler: {e}") from None


def _check_auth_methods(config):
    from zwrm.control.auth import DEFAULT_AUTH_METHODS, check_auth_methods
    from zwrm.errors import InvalidArgument

    try:
        methods = check_auth_methods(config.auth_methods)
    except InvalidArgument as e:
        raise usage.UsageError(f"[wamp] {e.message}") from None
    if config.router_url and methods != DEFAULT_AUTH_METHODS:
        raise usage.UsageError(
            "[wamp] auth_methods is what the embedded router offers; with router_url the"
            " external router's transports decide (zwrm's dynamic authenticator takes ticket)")


def _http_url(name, url):
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise usage.UsageError(f"[control] {name} must be an http:// or https:// URL with no"
                               f" path (e.g. https://cp.example.com:8080), not {url!r}")


def _check_urls(config):
    """The registry, console and external router settings (see the module docstring)."""
    from urllib.parse import urlsplit

    if config.registry_url is not None:
        _http_url("registry_url", config.registry_url)
    if config.console_url is not None:
        if urlsplit(config.console_url).scheme not in ("http", "https"):
            raise usage.UsageError(
                f"[control] console_url must be an http:// or https:// URL, not {config.console_url!r}")
    if config.router_url is None:
        for name in ("router_ticket", "router_ticket_file", "router_ca_file"):
            if getattr(config, name) is not None:
                raise usage.UsageError(f"[control] {name} needs router_url")
        return
    parts = urlsplit(config.router_url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise usage.UsageError(
            f"[control] router_url must be a ws:// or wss:// URL, not {config.router_url!r}")
    if parts.scheme == "ws" and not config.insecure_listen and not (
            parts.hostname in ("localhost", "::1") or parts.hostname.startswith("127.")):
        raise usage.UsageError(
            f"[control] router_url {config.router_url!r} is plain ws:// beyond loopback;"
            " use wss:// (with router_ca_file) or set insecure_listen")
    if (config.router_ticket is None) == (config.router_ticket_file is None):
        raise usage.UsageError(
            "[control] router_url needs exactly one of router_ticket and router_ticket_file"
            " (the ticket of the control component's principal in the router's config)")
    if config.registry_url is None:
        raise usage.UsageError(
            "[control] router_url needs registry_url: agents and the CLI cannot find the"
            " registry (this control plane's HTTP listener) from the router's URL")
    for description in config.listen:
        if description.startswith(RAWSOCKET_PREFIX):
            raise usage.UsageError(
                f"listen endpoint {description!r}: with router_url WAMP goes through the"
                " router; listen serves HTTP only (registry, /healthz, /metrics)")
    if config.router_ca_file is not None and not os.path.isfile(config.router_ca_file):
        raise usage.UsageError(f"[control] router_ca_file {config.router_ca_file} does not exist")
    config.router_secret()  # a missing or empty ticket file: said now, not at start-up


RAWSOCKET_PREFIX = "rawsocket:"


class Options(usage.Options):
    """Command-line options of C{twistd zwrm-control}."""

    synopsis = "[options]"
    longdesc = "The zwrm control plane. Every option can also be set in the --config TOML file."

    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        ["data-dir", "d", None, "Data directory (database, tokens)."],
        ["heartbeat-interval", None, None, "Seconds between agent heartbeats (default 5)."],
        ["flush-interval", None, None, "Seconds between batched heartbeat writes (default 5)."],
        ["check-interval", None, None, "Seconds between host health checks (default 15)."],
        ["offline-after", None, None, "Seconds without heartbeat before offline (default 30)."],
        ["grace", None, None, "Seconds after start before any host is marked offline."],
        ["reschedule-after", None, None,
         "Seconds before an offline host's stateless replicas are placed elsewhere (default 0)."],
        ["partition-threshold", None, None,
         "Fraction of a datacenter's hosts offline at once that holds rescheduling (default 0.55)."],
        ["eviction-interval", None, None,
         "Seconds between hosts rescheduled after a partition (default 10)."],
        ["min-free-disk-mb", None, None,
         "MiB free on a host's data disk under which it gets no new placements (default 256)."],
        ["cluster-cidr", None, None,
         "The cluster network, a private /8 to /20 (default 10.80.0.0/16; fixed once "
         "addresses are allocated)."],
        ["strategy", None, None, "Scheduler strategy plugin (default spread)."],
        ["gc-policy", None, None, "Garbage collection: freeze (default) or python."],
        ["registry-url", None, None,
         "The registry's URL agents and the CLI are told (default: that of their WAMP URL)."],
        ["console-url", None, None, "The web console's URL agents and the CLI are told."],
        ["router-url", None, None,
         "Connect the control component to this external WAMP router (ws:// or wss://)."],
        ["router-ticket-file", None, None, "File with the ticket for --router-url."],
        ["auth-methods", None, None,
         "WAMP authmethods offered to clients, comma-separated: ticket, wampcra (default ticket)."],
        ["gc-interval", None, None, "Seconds between collections of new objects (default 5)."],
        ["gc-churn", None, None,
         "Full collection once this fraction of the sessions closed (default 0.25)."],
        ["gc-growth", None, None,
         "... or once the frozen heap grew by this fraction (default 1.0)."],
        ["registry-header-timeout", None, None,
         "Seconds a registry request may take to send its headers (default 10)."],
        ["registry-body-timeout", None, None,
         "Seconds a registry upload body may take in all (default 3600)."],
        ["registry-idle-timeout", None, None,
         "Seconds a registry upload body may stall (default 30)."],
        ["registry-upload-ttl", None, None,
         "Seconds an untouched upload session is kept (default 900)."],
        ["host-certificate-lifetime", None, None,
         "Seconds the host certificates it signs are valid (default 31536000, a year)."],
    ]
    optFlags = [
        ["insecure-listen", None, "Allow plain listeners beyond loopback."],
    ]

    def __init__(self):
        usage.Options.__init__(self)
        self["listen"] = []
        self["plugin-dir"] = []

    def opt_listen(self, description):
        """Listen on this endpoint, e.g. tcp:8080:interface=127.0.0.1 (repeatable);
        rawsocket:<endpoint> serves WAMP over RawSocket there."""
        self["listen"].append(description)

    def opt_plugin_dir(self, path):
        """A directory of third-party plugins (repeatable)."""
        self["plugin-dir"].append(path)

    def postOptions(self):
        values = load_config(self["config"]) if self["config"] else {}
        flags = {
            "data-dir": ("data_dir", str),
            "heartbeat-interval": ("heartbeat_interval", float),
            "flush-interval": ("flush_interval", float),
            "check-interval": ("check_interval", float),
            "offline-after": ("offline_after", float),
            "grace": ("grace", float),
            "reschedule-after": ("reschedule_after", float),
            "partition-threshold": ("partition_threshold", float),
            "eviction-interval": ("eviction_interval", float),
            "min-free-disk-mb": ("min_free_disk_mb", float),
            "cluster-cidr": ("network_cidr", str),
            "strategy": ("strategy", str),
            "gc-policy": ("gc_policy", str),
            "gc-interval": ("gc_interval", float),
            "gc-churn": ("gc_churn", float),
            "gc-growth": ("gc_growth", float),
            "registry-header-timeout": ("registry_header_timeout", float),
            "registry-body-timeout": ("registry_body_timeout", float),
            "registry-idle-timeout": ("registry_idle_timeout", float),
            "registry-upload-ttl": ("registry_upload_ttl", float),
            "host-certificate-lifetime": ("host_certificate_lifetime", float),
            "registry-url": ("registry_url", str),
            "console-url": ("console_url", str),
            "router-url": ("router_url", str),
            "router-ticket-file": ("router_ticket_file", str),
        }
        for flag, (attr, kind) in flags.items():
            if self[flag] is not None:
                values[attr] = _coerce(f"--{flag}", kind, self[flag])
        if self["listen"]:
            values["listen"] = list(self["listen"])
        if self["plugin-dir"]:
            values["plugin_dirs"] = list(self["plugin-dir"])
        if self["auth-methods"] is not None:
            values["auth_methods"] = [m.strip() for m in self["auth-methods"].split(",")
                                      if m.strip()]
        if self["insecure-listen"]:
            values["insecure_listen"] = True
        config = Config(**values)
        config.data_dir = os.path.abspath(os.path.expanduser(config.data_dir))
        check_config(config)
        self.config = config


def makeService(options):
    """The control plane service; the only place that touches the global reactor."""
    from twisted.internet import reactor

    from zwrm.agent.tap import PRIVATE_UMASK
    from zwrm.control.service import ControlPlane

    os.umask(PRIVATE_UMASK)  # the store, keys, tokens and registry blobs: private
    from twisted.logger import Logger

    from zwrm.rlimits import raise_open_files

    raise_open_files(Logger(namespace="zwrm.rlimits"))  # a socket per session, connection
    config = options.config
    plane = ControlPlane(reactor, config)
    plane.stop_reactor_on_failure = True
    if config.gc_policy == "freeze":
        # process-wide, so set up here and not by ControlPlane (tests run several of
        # those in one process)
        from zwrm.gcpolicy import CollectionPolicy

        plane.gc_policy = CollectionPolicy(
            reactor, config.gc_interval, growth=config.gc_growth, churn=config.gc_churn
        )
        plane.gc_policy.setServiceParent(plane)
    return plane
