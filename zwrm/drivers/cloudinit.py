"""
cloud-init NoCloud seed disks.

Every machine booted from a disk gets a seed: an ISO 9660 file system labelled C{cidata} with
three files that cloud-init (in the guest) reads at boot:

 - C{meta-data}: C{instance-id} (the machine id: stable across stops, starts and agent
   restarts, so per-instance steps run once) and C{local-hostname} (the machine spec's
   C{network.hostname}, e.g. C{web-0}, when it has one: L{with_hostname}; else made from
   the machine id);
 - C{network-config}: for a machine with an address on the cluster network (bridge
   networking), the static configuration the agent gives (version 2: address, route, resolver,
   search domain, MTU, the NIC matched by MAC; see
   L{zwrm.agent.network.addressing.cloud_init_network_config}; the user-data then also
   writes the resolver to C{/etc/resolv.conf} at boot where no manager owns it); otherwise (user-mode
   networking) version 1, DHCP on the machine's one NIC, found by its MAC address;
 - C{user-data}: a C{#cloud-config} zwrm writes from the deploy (the SSH keys of
   C{zwrm deploy --ssh-key FILE}, the volume mounts, the environment of C{--env KEY=VALUE} in
   C{/etc/zwrm/env} and C{/etc/environment}), followed, when the operator gave
   C{--user-data FILE}, by that file as a second part of a MIME multipart message (cloud-init
   merges cloud-config parts and runs scripts).

Volumes are mounted by their virtio serial (C{/dev/disk/by-id/virtio-<serial>}), never by
device order, with C{nofail} so a missing volume does not stop the boot.

The seed is built with C{genisoimage} (Debian package C{genisoimage}), as a process, without
root. The spec part (L{validate}) is shared by the control plane, the agent and the driver.
"""

import json
import os
import re
import shutil
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

from twisted.internet import utils

from zwrm.errors import InvalidArgument, Unavailable

MAX_KEYS = 32
MAX_KEY = 16 * 1024
MAX_USER_DATA = 16 * 1024  # the deploy schema bounds strings at 16 KiB
MAX_ENV = 64
MAX_ENV_VALUE = 4096
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
KEY_RE = re.compile(r"^(ssh-|ecdsa-|sk-)[A-Za-z0-9@.-]+ [A-Za-z0-9+/=]+( [^\n\r]*)?\Z")
HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")


def check_mount(mount, volume):
    """
    Check a volume's mount point in the guest (a line of its fstab, written by cloud-init).

    @param volume: the volume's name or id, for the message.
    @return: C{mount}.
    @raise InvalidArgument: unless an absolute path other than C{/}, at most 255 characters,
        without the blanks, commas or colons a fstab line or the CLI's C{--volume} would
        read as separators.
    """
    if (not isinstance(mount, str) or not mount.startswith("/") or mount == "/"
            or len(mount) > 255 or any(c in mount for c in " \t\n\r\0,:")):
        raise InvalidArgument(
            f"volume {volume}: mount must be an absolute path other than / (at most 255"
            f" characters; no blanks, commas or colons), not {mount!r}")
    return mount


def hostname_for(machine_id):
    """A valid host name for a machine id: lower case, C{-} for other characters, <= 63."""
    h = re.sub(r"[^a-z0-9-]", "-", machine_id.lower()).strip("-")[:63].strip("-")
    return h or "zwrm"


def validate(cfg):
    """
    Check the cloud-init part of a spec: C{None} or C{{"ssh_keys": [str], "user_data":
    str or None, "env": {KEY: VALUE}}} (every key optional; a driver spec may also give
    C{"hostname"}).

    @return: a normalized copy (or L{None}).
    @raise InvalidArgument: naming the bad field.
    """
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise InvalidArgument(f"cloud_init must be a mapping or null, not {type(cfg).__name__}")
    unknown = sorted(set(cfg) - {"ssh_keys", "user_data", "env", "hostname"})
    if unknown:
        raise InvalidArgument(f"cloud_init: unknown field(s) {', '.join(unknown)}")
    keys = cfg.get("ssh_keys") or []
    if not isinstance(keys, list) or len(keys) > MAX_KEYS:
        raise InvalidArgument(f"ssh_keys must be a list of at most {MAX_KEYS} public keys")
    out_keys = []
    for k in keys:
        if not isinstance(k, str) or len(k) > MAX_KEY or not KEY_RE.match(k.strip()):
            shown = k[:40] if isinstance(k, str) else k
            raise InvalidArgument(
                f"ssh_keys: {shown!r} is not an OpenSSH public key (one line 'TYPE BASE64 "
                "[COMMENT]')"
            )
        out_keys.append(k.strip())
    user_data = cfg.get("user_data")
    if user_data is not None and (not isinstance(user_data, str)
                                  or len(user_data.encode()) > MAX_USER_DATA):
        raise InvalidArgument(f"user_data must be text of at most {MAX_USER_DATA} bytes")
    env = cfg.get("env") or {}
    if not isinstance(env, dict) or len(env) > MAX_ENV:
        raise InvalidArgument(f"env must be a mapping of at most {MAX_ENV} KEY: VALUE")
    for k, v in env.items():
        if not isinstance(k, str) or not ENV_KEY_RE.match(k):
            raise InvalidArgument(f"env: {k!r} is not a variable name (letters, digits, _)")
        if not isinstance(v, str) or len(v) > MAX_ENV_VALUE or any(c in v for c in "\n\r\0"):
            raise InvalidArgument(f"env {k}: the value must be one line of at most "
                                  f"{MAX_ENV_VALUE} characters")
    out = {"ssh_keys": out_keys, "user_data": user_data, "env": dict(env)}
    hostname = cfg.get("hostname")
    if hostname is not None:
        if not isinstance(hostname, str) or not HOSTNAME_RE.match(hostname):
            raise InvalidArgument(f"hostname {hostname!r} is not a valid host name")
        out["hostname"] = hostname
    return out


def with_hostname(cfg, network):
    """
    The seed config of a machine: its validated C{cloud_init} (or L{None}: no seed) with
    the host name of its network spec (C{spec["network"]["hostname"]}, given by the control
    plane, e.g. C{web-0}) unless C{cloud_init} names one itself.  Without either, the seed
    takes the machine id's (L{hostname_for}).

    @raise InvalidArgument: the network's host name is not a DNS label.
    """
    name = (network or {}).get("hostname")
    if cfg is None or not name or cfg.get("hostname"):
        return cfg
    if not isinstance(name, str) or not HOSTNAME_RE.match(name):
        raise InvalidArgument(f"network hostname {name!r} is not a DNS label (a-z, 0-9 and "
                              "-, at most 63, not starting or ending with -)")
    return dict(cfg, hostname=name)


def _quote_env(v):
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def documents(machine_id, cfg, volumes=(), mac=None, network_config=None):
    """
    The seed's files.

    @param cfg: a validated cloud-init config (L{validate}).
    @param volumes: C{[{"serial", "mount"}]}: volumes to mount (those without a mount are
        left alone).
    @param mac: the NIC's MAC address (for network-config).
    @param network_config: the static network-config (a version 2 mapping) of a machine with
        an allocated address, or L{None} for DHCP.
    @return: C{{"meta-data": bytes, "user-data": bytes, "network-config": bytes}}.
    """
    hostname = cfg.get("hostname") or hostname_for(machine_id)
    meta = {"instance-id": machine_id, "local-hostname": hostname}
    config = {"hostname": hostname, "preserve_hostname": False, "manage_etc_hosts": True}
    if cfg["ssh_keys"]:
        config["ssh_authorized_keys"] = list(cfg["ssh_keys"])
    mounts = [v for v in volumes if v.get("mount")]
    if mounts:
        config["mounts"] = [
            [f"/dev/disk/by-id/virtio-{v['serial']}", v["mount"], "ext4",
             "defaults,nofail,x-systemd.device-timeout=30s", "0", "2"]
            for v in mounts
        ]
        # cloud-init writes the fstab lines and runs mount -a; make the points first.
        config["bootcmd"] = [["mkdir", "-p", *[v["mount"] for v in mounts]]]
    resolver = _resolver(network_config)
    if resolver:
        # Images whose /etc/resolv.conf is a plain file (no resolvconf, no systemd-resolved:
        # ifupdown ignores the network-config's nameservers there) get it written at every
        # boot; a managed one (a symlink) is left to its manager.
        config.setdefault("bootcmd", []).append(
            ["sh", "-c", '[ -L /etc/resolv.conf ] || printf "%s\\n" "$@" > /etc/resolv.conf',
             "sh", *resolver])
    if cfg["env"]:
        lines = "".join(f"{k}={_quote_env(v)}\n" for k, v in sorted(cfg["env"].items()))
        config["write_files"] = [
            {"path": "/etc/zwrm/env", "content": lines, "permissions": "0600", "owner": "root:root"},
            {"path": "/etc/environment", "content": lines, "append": True},
        ]
    ours = "#cloud-config\n" + json.dumps(config, indent=1, sort_keys=True) + "\n"
    if cfg.get("user_data"):
        msg = MIMEMultipart()
        msg.attach(MIMEText(ours, "cloud-config", "utf-8"))
        theirs = cfg["user_data"]
        subtype = "cloud-config" if theirs.startswith("#cloud-config") else (
            "x-shellscript" if theirs.startswith("#!") else "plain")
        part = MIMEText(theirs, subtype, "utf-8")
        part.add_header("Content-Disposition", "attachment", filename="user-data")
        msg.attach(part)
        user_data = msg.as_string()
    else:
        user_data = ours
    if network_config is not None:
        net = network_config
    else:
        net = {"version": 1, "config": [{
            "type": "physical", "name": "eth0", "subnets": [{"type": "dhcp"}],
        }]}
        if mac:
            net["config"][0]["mac_address"] = mac
    return {
        "meta-data": (json.dumps(meta, indent=1) + "\n").encode(),
        "user-data": user_data.encode(),
        "network-config": (json.dumps(net, indent=1) + "\n").encode(),
    }


def _resolver(network_config):
    """The C{resolv.conf} lines of a static network-config's nameservers (or [])."""
    servers, search = [], []
    for eth in ((network_config or {}).get("ethernets") or {}).values():
        ns = eth.get("nameservers") or {} if isinstance(eth, dict) else {}
        servers += [a for a in ns.get("addresses") or [] if a not in servers]
        search += [d for d in ns.get("search") or [] if d not in search]
    lines = [f"nameserver {a}" for a in servers]
    if lines and search:
        lines.append("search " + " ".join(search))
    return lines


def genisoimage():
    return shutil.which("genisoimage") or shutil.which("mkisofs") or "genisoimage"


async def build_seed(reactor, path, docs, program=None):
    """
    Write the seed ISO (label C{cidata}) holding C{docs} (L{documents}) to C{path}
    (atomically; mode 0600). Runs C{genisoimage} as a process.

    @raise Unavailable: genisoimage is missing or failed.
    """
    work = path + ".d"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work, mode=0o700)
    try:
        for name, body in docs.items():
            fd = os.open(os.path.join(work, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(body)
        tmp = path + ".tmp"
        try:
            out, err, code = await utils.getProcessOutputAndValue(
                program or genisoimage(),
                ["-quiet", "-output", tmp, "-volid", "cidata", "-joliet", "-rock",
                 *[os.path.join(work, n) for n in sorted(docs)]],
                env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "")}, reactor=reactor,
            )
        except OSError as e:
            raise Unavailable(f"cannot build the cloud-init seed: genisoimage: {e}") from None
        if code != 0:
            raise Unavailable("cannot build the cloud-init seed: genisoimage: "
                              + err.decode("utf-8", "replace").strip()[-300:])
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path
