"""
C{twistd zwrm-control}: options, configuration file and service.

Every setting can come from the TOML file given with C{--config} and from a flag; a
flag wins.  Example::

    [control]
    listen = ["tcp:8080:interface=127.0.0.1"]
    # WAMP over RawSocket too: "rawsocket:tcp:8081:interface=127.0.0.1" (or rawsocket:ssl:...)
    data_dir = "/var/lib/zwrm/control"
    heartbeat_interval = 5

    [health]
    check_interval = 15
    offline_after = 30
    # grace = 30   (after a start, no host is marked offline for this long)

    [scheduler]
    strategy = "spread"
    plugin_dirs = []

    [gc]
    policy = "freeze"   # or "python": CPython's collector as it comes
    interval = 5        # seconds between collections of the new (unfrozen) objects
    churn = 0.25        # a full collection once this fraction of the sessions closed
    growth = 1.0        # ... or once the frozen heap grew by this fraction

A bad file or value is one readable line from twistd, not a traceback.
"""

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
    strategy: str = "spread"
    plugin_dirs: list = field(default_factory=list)
    insecure_listen: bool = False
    gc_policy: str = "freeze"
    gc_interval: float = 5.0
    gc_churn: float = 0.25
    gc_growth: float = 1.0


# (section, key) -> (Config attribute, type)
FILE_KEYS = {
    ("control", "listen"): ("listen", list),
    ("control", "data_dir"): ("data_dir", str),
    ("control", "heartbeat_interval"): ("heartbeat_interval", float),
    ("control", "flush_interval"): ("flush_interval", float),
    ("control", "insecure_listen"): ("insecure_listen", bool),
    ("health", "check_interval"): ("check_interval", float),
    ("health", "offline_after"): ("offline_after", float),
    ("health", "grace"): ("grace", float),
    ("scheduler", "strategy"): ("strategy", str),
    ("scheduler", "plugin_dirs"): ("plugin_dirs", list),
    ("gc", "policy"): ("gc_policy", str),
    ("gc", "interval"): ("gc_interval", float),
    ("gc", "churn"): ("gc_churn", float),
    ("gc", "growth"): ("gc_growth", float),
}

GC_POLICIES = ("freeze", "python")


def _coerce(name, kind, value):
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise usage.UsageError(f"{name} must be a number, not {value!r}")
        try:
            value = float(value)
        except ValueError:
            raise usage.UsageError(f"{name} must be a number, not {value!r}") from None
        if value <= 0 and name != "grace":
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
        ["strategy", None, None, "Scheduler strategy plugin (default spread)."],
        ["gc-policy", None, None, "Garbage collection: freeze (default) or python."],
        ["gc-interval", None, None, "Seconds between collections of new objects (default 5)."],
        ["gc-churn", None, None,
         "Full collection once this fraction of the sessions closed (default 0.25)."],
        ["gc-growth", None, None,
         "... or once the frozen heap grew by this fraction (default 1.0)."],
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
            "strategy": ("strategy", str),
            "gc-policy": ("gc_policy", str),
            "gc-interval": ("gc_interval", float),
            "gc-churn": ("gc_churn", float),
            "gc-growth": ("gc_growth", float),
        }
        for flag, (attr, kind) in flags.items():
            if self[flag] is not None:
                values[attr] = _coerce(f"--{flag}", kind, self[flag])
        if self["listen"]:
            values["listen"] = list(self["listen"])
        if self["plugin-dir"]:
            values["plugin_dirs"] = list(self["plugin-dir"])
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
