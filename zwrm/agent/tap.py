"""
C{twistd zwrm-agent}: options and service.

    twistd -n zwrm-agent --control-plane-url=wss://cp.example.com:8080/ws \\
        --region=eu-central --datacenter=dc1 --join-token-file=/etc/zwrm/join-token

Every option can also be set in a TOML file (C{--config}), section C{[agent]}, with the
option's name spelled with underscores (C{control_plane_url = "..."}); a flag wins.

The join token never comes from the command line (every local user can read a process's
arguments in /proc): it comes from the file C{--join-token-file} / C{join_token_file}
names, else from the environment variable C{ZWRM_JOIN_TOKEN}, else from C{join_token} in
the configuration file.  A token file, or a configuration file holding C{join_token}, that
every user may read is refused.  C{--join-token=...} is refused with a message naming these.
"""

import os
import socket
import tomllib
from dataclasses import dataclass, field
from ipaddress import ip_address

from autobahn.websocket.util import parse_url
from twisted.python import usage

from zwrm import hostfacts


@dataclass
class AgentConfig:
    """The agent's settings."""

    url: str
    region: str = ""
    datacenter: str = ""
    join_token: str | None = None
    data_dir: str = "/var/lib/zwrm/agent"
    name: str = field(default_factory=socket.gethostname)
    address: str | None = None
    labels: dict = field(default_factory=dict)
    vcpus: int | None = None
    memory_mb: int | None = None
    disk_mb: int | None = None
    ca_file: str | None = None
    insecure: bool = False
    retry_initial: float = 1.0
    #: The longest reconnection delay.  While the control plane is down the delay doubles
    #: up to this; once it is back, an agent may sleep this long (jittered to 50-100%)
    #: before it notices.  Keep it well below the control plane's C{grace} and
    #: C{offline_after} (30 s by default), or a control-plane restart after a long outage
    #: marks hosts offline (and fails their machines) before their agents try again.
    retry_max: float = 15.0
    driver: str = "qemu"
    accel: str = "auto"
    #: The CPU model (QEMU's C{-cpu}) and machine type (C{-machine}) of every machine here:
    #: live migration needs the same on both hosts (docs/live-migration.md).  None: the
    #: driver's default (C{host} under KVM, which does not migrate between different hosts;
    #: C{qemu64} under TCG; machine type C{pc-i440fx-7.2}).
    cpu_model: str | None = None
    machine_type: str | None = None
    image_cache_mb: int = 10240
    plugin_dirs: list = field(default_factory=list)
    volume_endpoint: str = "tcp:0:interface=127.0.0.1"
    #: VM networking: "user" (QEMU user mode, restrict=on) or "bridge" (docs/networking.md).
    network: str = "user"
    dns_port: int = 53
    #: Seconds an http/https client of a published port may wait between its requests.
    ingress_keepalive_timeout: float = 75.0
    #: Where C{/metrics} (Prometheus text) is served, an endpoint string; None: nowhere.
    metrics_listen: str | None = None
    #: Seconds after which the agent stops its machines with volumes once it has heard
    #: nothing from the control plane (0: never): a host cut off from the cluster then
    #: runs no copy of a machine whose volumes the control plane may recover elsewhere
    #: (L{zwrm.agent.service.AgentService}, "Fencing").
    fence_after: float = 0.0


def _is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url, insecure=False):
    """
    Check a control-plane URL.

    @raise usage.UsageError: if it is not a ws:// or wss:// URL, or plain beyond
        loopback without C{insecure}.
    """
    try:
        secure, host, _port, _r, _p, _q = parse_url(url)
    except Exception as e:
        raise usage.UsageError(f"bad --control-plane-url {url!r}: {e}") from None
    if not secure and not insecure and not _is_loopback(host):
        raise usage.UsageError(
            f"--control-plane-url {url!r} is plain ws:// beyond loopback; use wss:// or --insecure"
        )


class Options(usage.Options):
    """Command-line options of C{twistd zwrm-agent}."""

    synopsis = "--control-plane-url=URL [options]"
    optParameters = [
        ["config", "c", None, "TOML configuration file ([agent] section)."],
        ["control-plane-url", "u", None, "The control plane's WebSocket URL (ws:// or wss://)."],
        ["region", None, None, "This host's region."],
        ["datacenter", None, None, "This host's datacenter."],
        ["join-token", None, None, "Refused: use --join-token-file or $ZWRM_JOIN_TOKEN."],
        ["join-token-file", None, None,
         "Read the join token (needed only until the host has joined) from this file; "
         "else $ZWRM_JOIN_TOKEN."],
        ["data-dir", "d", None, "Data directory (host id, credential, ...)."],
        ["name", None, None, "The host's name (default: the hostname)."],
        ["address", None, None, "The address other hosts reach this host at."],
        ["vcpus", None, None, "Override the vCPU count."],
        ["memory-mb", None, None, "Override the memory (MiB)."],
        ["disk-mb", None, None, "Override the disk (MiB)."],
        ["ca-file", None, None, "PEM CA certificate to trust for wss://."],
        ["retry-initial", None, None, "First reconnection delay, seconds (default 1)."],
        ["retry-max", None, None, "Longest reconnection delay, seconds (default 15); keep it below half the "
         "control plane's --offline-after."],
        ["driver", None, None, "Hypervisor driver plugin (default qemu)."],
        ["accel", None, None, "QEMU accelerator: auto, kvm or tcg (default auto)."],
        ["cpu-model", None, None, "QEMU CPU model of every machine here (default: host under "
         "KVM, qemu64 under TCG); the same migratable model on every host (e.g. "
         "x86-64-v2-AES) for live migration."],
        ["machine-type", None, None, "QEMU machine type of every machine here (default "
         "pc-i440fx-7.2); the same on every host for live migration."],
        ["image-cache-mb", None, None, "Image cache size limit in MiB (default 10240)."],
        ["network", None, None, "VM networking: user (default; QEMU user mode, guests reach "
         "nothing of the host) or bridge (cluster network: bridge, TAPs, VXLAN overlay, "
         "needs CAP_NET_ADMIN and /dev/net/tun; see docs/networking.md)."],
        ["dns-port", None, None, "Port of the cluster DNS server on the bridge (default 53)."],
        ["ingress-keepalive-timeout", None, None,
         "Seconds an http/https client of a published port may wait for its next request "
         "(default 75)."],
        ["volume-endpoint", None, None,
         "Where other agents stream volumes to this host (TLS with host certificates), an "
         "endpoint string; default tcp:0:interface=127.0.0.1 (loopback only)."],
        ["fence-after", None, None,
         "Stop this host's machines with volumes once the control plane has not answered "
         "for this many seconds (10-86400; default 0: never); the control plane recovers "
         "their volumes elsewhere only after that."],
        ["metrics-listen", None, None,
         "Serve /metrics (Prometheus text format) on this endpoint, e.g. "
         "tcp:9464:interface=127.0.0.1; default: not served."],
    ]
    optFlags = [["insecure", None, "Allow plain ws:// to a non-loopback control plane."]]

    def __init__(self):
        usage.Options.__init__(self)
        self["label"] = {}
        self["plugin-dir"] = []

    def opt_plugin_dir(self, path):
        """A directory of third-party plugins (drivers) (repeatable)."""
        self["plugin-dir"].append(path)

    def opt_label(self, text):
        """A label key=value (repeatable)."""
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise usage.UsageError(f"--label {text!r}: use key=value")
        self["label"][key] = value

    def postOptions(self):
        if self["join-token"] is not None:
            raise usage.UsageError(JOIN_TOKEN_FLAG_REFUSED)
        values = {}
        if self["config"]:
            values = _load(self["config"])
        for key in ("control-plane-url", "region", "datacenter", "join-token-file",
                    "data-dir", "name", "address", "vcpus", "memory-mb", "disk-mb", "ca-file",
                    "retry-initial", "retry-max", "driver", "accel", "image-cache-mb",
                    "volume-endpoint", "network", "dns-port", "metrics-listen", "cpu-model",
                    "machine-type", "ingress-keepalive-timeout", "fence-after"):
            if self[key] is not None:
                values[key.replace("-", "_")] = self[key]
        if self["label"]:
            values.setdefault("labels", {}).update(self["label"])
        if self["insecure"]:
            values["insecure"] = True
        url = values.pop("control_plane_url", None)
        if not url:
            raise usage.UsageError("--control-plane-url is required")
        token = join_token(values.pop("join_token_file", None), values.pop("join_token", None),
                           os.environ)
        if token:
            values["join_token"] = token
        if self["plugin-dir"]:
            values["plugin_dirs"] = list(values.get("plugin_dirs", [])) + self["plugin-dir"]
        for key in ("cpu_model", "machine_type"):
            v = values.get(key)
            if v is not None and (not isinstance(v, str) or not v
                                  or any(c in v for c in ", \t\n=")):
                raise usage.UsageError(f"{key} must be a QEMU name (a CPU model or machine "
                                       f"type, e.g. x86-64-v2-AES or pc-i440fx-7.2), not {v!r}")
        if values.get("accel", "auto") not in ("auto", "kvm", "tcg"):
            raise usage.UsageError(f"accel must be auto, kvm or tcg, not {values['accel']!r}")
        for key in ("vcpus", "memory_mb", "disk_mb", "image_cache_mb"):
            if key in values:
                try:
                    values[key] = int(values[key])
                    assert values[key] >= 0
                except (ValueError, TypeError, AssertionError):
                    raise usage.UsageError(f"{key} must be a non-negative integer") from None
        for key in ("retry_initial", "retry_max"):
            if key in values:
                try:
                    values[key] = float(values[key])
                    assert 0 < values[key] < float("inf")
                except (ValueError, TypeError, AssertionError):
                    raise usage.UsageError(f"{key} must be a positive number") from None
        if not isinstance(values.get("labels", {}), dict):
            raise usage.UsageError("labels must be a table of strings")
        # (what the control plane takes: refused now, not at each attempt to join)
        wrong = hostfacts.problems(values.get("name"), values.get("region"),
                                   values.get("datacenter"), values.get("labels"))
        if wrong:
            raise usage.UsageError(wrong[0])
        config = AgentConfig(url=url, **values)
        config.data_dir = os.path.abspath(os.path.expanduser(config.data_dir))
        if config.ca_file and not os.path.exists(config.ca_file):
            raise usage.UsageError(f"CA file {config.ca_file} does not exist")
        check_url(config.url, config.insecure)
        _check_driver(config)
        _check_volume_endpoint(config.volume_endpoint)
        if config.metrics_listen is not None:
            _check_metrics_listen(config.metrics_listen)
        if config.network not in ("user", "bridge"):
            raise usage.UsageError(f"network must be user or bridge, not {config.network!r}")
        if config.network == "bridge" and not config.address:
            raise usage.UsageError("--network bridge needs --address (the VXLAN source and "
                                   "where published ports listen)")
        try:
            config.dns_port = int(config.dns_port)
            assert 1 <= config.dns_port <= 65535
        except (ValueError, TypeError, AssertionError):
            raise usage.UsageError("dns_port must be a port number (1-65535)") from None
        try:
            config.fence_after = float(config.fence_after)
            assert config.fence_after == 0 or MIN_FENCE_AFTER <= config.fence_after <= 86400
        except (ValueError, TypeError, AssertionError):
            raise usage.UsageError(f"fence_after must be 0 (never) or seconds from "
                                   f"{MIN_FENCE_AFTER:g} to 86400") from None
        try:
            config.ingress_keepalive_timeout = float(config.ingress_keepalive_timeout)
            assert 0 < config.ingress_keepalive_timeout < float("inf")
        except (ValueError, TypeError, AssertionError):
            raise usage.UsageError("ingress_keepalive_timeout must be a number of seconds "
                                   "above 0") from None
        self.config = config


#: The shortest C{fence_after}: a few heartbeats (a heartbeat late by a loaded control
#: plane must not stop machines).
MIN_FENCE_AFTER = 10.0

JOIN_TOKEN_ENV = "ZWRM_JOIN_TOKEN"
"""The environment variable an agent reads its join token from (when no file is named)."""

JOIN_TOKEN_FLAG_REFUSED = (
    "--join-token is not accepted: a process's command line is readable by every local user;"
    " put the token in a file only root can read and pass --join-token-file=PATH"
    " (join_token_file in the [agent] section), or set $" + JOIN_TOKEN_ENV)


def join_token(path=None, inline=None, environ=None):
    """
    The agent's join token: from the file C{path}, else the environment, else the value
    C{inline} (from a private configuration file); L{None} if there is none.

    @raise usage.UsageError: the file cannot be read or is empty.
    """
    if path:
        try:
            with open(path) as f:
                mode = os.fstat(f.fileno()).st_mode
                text = f.read().strip()
        except OSError as e:
            raise usage.UsageError(f"cannot read the join token file {path}: {e.strerror}") from None
        if mode & 0o004:
            raise usage.UsageError(
                f"the join token file {path} is readable by every user (mode {mode & 0o777:o}):"
                f" chmod 600 {path}")
        if not text:
            raise usage.UsageError(f"the join token file {path} is empty")
        return text
    text = (environ or {}).get(JOIN_TOKEN_ENV, "").strip()
    if text:
        return text
    return inline.strip() if isinstance(inline, str) and inline.strip() else None


def _check_volume_endpoint(description):
    """@raise usage.UsageError: unless C{description} is a TCP server endpoint string."""
    from twisted.internet import endpoints, reactor

    if not isinstance(description, str) or not description.startswith("tcp:"):
        raise usage.UsageError(
            f"volume_endpoint must be a tcp: endpoint string (TLS is added), not {description!r}")
    try:
        endpoints.serverFromString(reactor, description)
    except (ValueError, TypeError) as e:
        raise usage.UsageError(f"bad volume_endpoint {description!r}: {e}") from None


def _check_metrics_listen(description):
    """@raise usage.UsageError: unless C{description} is a server endpoint string."""
    from twisted.internet import endpoints, reactor

    try:
        assert isinstance(description, str) and description
        endpoints.serverFromString(reactor, description)
    except (ValueError, TypeError, AssertionError, KeyError) as e:
        raise usage.UsageError(f"bad metrics_listen {description!r}: {e or 'not an endpoint'}") from None


def _check_driver(config):
    """@raise usage.UsageError: unless the configured driver plugin exists."""
    from zwrm import plugins
    from zwrm.interfaces import IHypervisorDriverPlugin

    try:
        plugins.find(IHypervisorDriverPlugin, config.driver, config.plugin_dirs,
                     kind="hypervisor driver")
    except plugins.PluginError as e:
        raise usage.UsageError(str(e)) from None


KEYS = {"control_plane_url", "region", "datacenter", "join_token", "join_token_file", "data_dir",
        "name", "address", "labels", "vcpus", "memory_mb", "disk_mb", "ca_file", "insecure",
        "retry_initial", "retry_max", "driver", "accel", "image_cache_mb", "plugin_dirs", "volume_endpoint",
        "network", "dns_port", "metrics_listen", "cpu_model", "machine_type",
        "ingress_keepalive_timeout", "fence_after"}


def _load(path):
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise usage.UsageError(f"configuration file {path} does not exist") from None
    except OSError as e:
        raise usage.UsageError(f"cannot read configuration file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise usage.UsageError(f"configuration file {path} is not valid TOML: {e}") from None
    agent = data.get("agent", {})
    if set(data) - {"agent"} or not isinstance(agent, dict):
        raise usage.UsageError(f"{path}: only an [agent] section is understood")
    unknown = set(agent) - KEYS
    if unknown:
        raise usage.UsageError(f"{path}: unknown setting [agent] {sorted(unknown)[0]}")
    if "join_token" in agent:
        mode = os.stat(path).st_mode
        if mode & 0o004:
            raise usage.UsageError(
                f"{path} holds join_token but every user can read it (mode {mode & 0o777:o}):"
                f" move the token to a file only root can read and name it with join_token_file,"
                f" or chmod 600 {path}")
    return dict(agent)


PRIVATE_UMASK = 0o077
"""The agents' and control plane's umask: everything under their data directories (volumes,
console logs, machine specs and state, the image cache, the store, keys), and what the QEMU
processes they start create, is private to their user (files 0600, directories 0700)."""


def makeService(options):
    """The agent service; the only place that touches the global reactor (and umask)."""
    from twisted.internet import reactor

    os.umask(PRIVATE_UMASK)  # inherited by QEMU and every other child
    from twisted.logger import Logger

    from zwrm.rlimits import raise_open_files

    raise_open_files(Logger(namespace="zwrm.rlimits"))  # a socket per session, connection

    from zwrm.agent.runtime import HostRuntime
    from zwrm.agent.service import AgentService

    return AgentService(reactor, options.config, runtime=HostRuntime(reactor, options.config))
