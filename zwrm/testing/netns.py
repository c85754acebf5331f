"""
A test network made only of network namespaces that this module creates.

Every address lives inside a namespace the harness made: a "switch" namespace holds a
Linux bridge, and each host namespace is joined to it by a veth pair, with its own
address on a /24 of 10.99.0.0/16 chosen per run (so parallel runs do not collide) and
its loopback up.  Nothing is added to, or sent from, the namespace the tests run in.

Example::

    net = TestNetwork(["cp", "a1"])          # sweeps stale namespaces, builds the network
    try:
        net.run("a1", ["ping", "-c1", net.address("cp")])
        proc = net.spawn("cp", ["python3", "-m", "http.server", "--bind", net.address("cp")])
        argv = net.argv("a1", ["curl", "..."])   # for reactor.spawnProcess
    finally:
        net.close()                            # kills what runs inside, removes every namespace

API (all of it):

  - C{TestNetwork(hosts=(), binds=None)}: build the switch and one namespace per name
    (names: lower-case letters, digits, C{-}; at most 20 characters).
  - C{add_host(name, binds=None)}: one more host; returns its address.
  - C{address(name)}: the host's IPv4 address (a string); C{subnet}: e.g. C{"10.99.7.0/24"}.
  - C{hostname(name)}: C{"<name>.zwrm.test"}; every host's C{/etc/hosts} lists every host
    under that name and the short one (through C{/etc/netns/<ns>/hosts}, which
    C{ip netns exec} mounts over C{/etc/hosts}).
  - C{argv(name, argv)}: C{argv} wrapped to run in the host (C{ip netns exec ...}, in
    its own UTS namespace with hostname C{name}, with the host's bind mounts); C{run(name, argv, **kw)} is C{subprocess.run} of it
    (C{check=True}, output captured as text unless told otherwise); C{spawn(name, argv, **kw)}
    is C{subprocess.Popen} of it.
  - C{disconnect(name)} / C{reconnect(name)}: pull the host's cable out of the switch and
    plug it back (its switch port down, then up): the host and what runs in it stay as
    they are, and nothing reaches it or leaves it meanwhile.
  - C{close()}: kill every process left in the namespaces, delete them and the
    C{/etc/netns} entries.  Idempotent; also registered with C{atexit}.
  - C{sweep()}: delete namespaces of earlier runs whose process is gone (run on creation).

Bind mounts: C{binds={"/etc/zwrm": "/tmp/x/cp/etc"}} gives the host its own view of a
directory (the hosts share one filesystem).  Each C{argv()} mounts them in the private
mount namespace that C{ip netns exec} already creates for its command (propagation is
slave, so nothing leaks to the test's namespace).  Missing targets and sources are
created (empty directories) when the host is added; C{close()} removes the targets it
created if they are still empty.

Requires root, C{ip} (iproute2) and C{mount}.
"""

import atexit
import ipaddress
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

PREFIX = "zwrmt-"
DOMAIN = "zwrm.test"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,19}\Z")
_OURS = re.compile(r"^" + re.escape(PREFIX) + r"(\d+)-(\d+)-([a-z0-9-]+)\Z")
_LOCK = "/run/zwrm-testnet.lock"
NETNS_ETC = Path("/etc/netns")


class NetworkError(Exception):
    """A command that builds or tears down the test network failed."""


def _ip(*args, check=True):
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _namespaces():
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(ns, timeout=5.0, signals=(signal.SIGTERM, signal.SIGKILL)):
    """Each of C{signals} in turn to every process in namespace C{ns}; bounded waits."""

    def pids():
        r = _ip("netns", "pids", ns, check=False)
        return [int(p) for p in r.stdout.split() if p.isdigit()]

    for sig in signals:
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not pids():
            return


def _delete(ns):
    _kill_inside(ns)
    _ip("netns", "delete", ns, check=False)
    etc = NETNS_ETC / ns
    if etc.is_dir():
        for f in etc.iterdir():
            f.unlink()
        etc.rmdir()


def sweep():
    """Delete the namespaces of earlier runs whose process has ended."""
    for ns in _namespaces():
        m = _OURS.match(ns)
        if m and not _alive(int(m.group(2))):
            _delete(ns)


class TestNetwork:
    """A bridge in its own namespace and host namespaces on it; see the module docstring."""

    __test__ = False  # not a pytest test class

    def __init__(self, hosts=(), binds=None):
        import fcntl

        self._hosts = {}  # name -> (namespace, address, binds)
        self._made = []  # bind targets this network created (removed again if empty)
        self._closed = False
        self._pid = os.getpid()
        with open(_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            sweep()
            used = {int(m.group(1)) for m in map(_OURS.match, _namespaces()) if m}
            free = [n for n in range(1, 255) if n not in used]
            if not free:
                raise NetworkError("no free 10.99.N.0/24 test subnet")
            self._n = free[(self._pid % len(free))]
            self.subnet = f"10.99.{self._n}.0/24"
            self._switch = self._ns("switch")
            atexit.register(self.close)
            try:
                _ip("netns", "add", self._switch)
            except BaseException:
                self.close()
                raise
        try:
            _ip("-n", self._switch, "link", "set", "lo", "up")
            _ip("-n", self._switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self._switch, "link", "set", "br0", "up")
            for name in hosts:
                self.add_host(name, binds=(binds or {}).get(name))
        except BaseException:
            self.close()
            raise

    def _ns(self, name):
        return f"{PREFIX}{self._n}-{self._pid}-{name}"

    def add_host(self, name, binds=None):
        """Add host C{name} (its own namespace, veth to the bridge); return its address."""
        if self._closed:
            raise NetworkError("the test network is closed")
        if not _NAME.match(name) or name == "switch" or name in self._hosts:
            raise NetworkError(f"bad or duplicate host name {name!r}")
        index = len(self._hosts) + 1
        if index > 250:
            raise NetworkError("at most 250 hosts")
        ns = self._ns(name)
        address = str(ipaddress.ip_network(self.subnet)[index])
        binds = {str(k): str(v) for k, v in (binds or {}).items()}
        for target, source in binds.items():
            if not os.path.isdir(target):
                os.makedirs(target)
                self._made.append(target)
            os.makedirs(source, exist_ok=True)
        self._hosts[name] = (ns, address, binds)
        _ip("netns", "add", ns)
        port = f"p{index}"
        _ip("-n", self._switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", ns)
        _ip("-n", self._switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self._write_hosts()
        return address

    def _write_hosts(self):
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{a} {n}.{DOMAIN} {n}" for n, (_, a, _) in self._hosts.items()]
        text = "\n".join(lines) + "\n"
        for ns, _, _ in self._hosts.values():
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(text)

    @property
    def hosts(self):
        """The host names, in the order they were added."""
        return list(self._hosts)

    def namespace(self, name):
        """The name of host C{name}'s network namespace (for C{ip netns ...})."""
        return self._hosts[name][0]

    def address(self, name):
        return self._hosts[name][1]

    def hostname(self, name):
        self._hosts[name]  # noqa: B018 - KeyError for an unknown host
        return f"{name}.{DOMAIN}"

    def argv(self, name, argv):
        """C{argv} wrapped to run inside host C{name}: its network, hostname and bind mounts."""
        ns, _, binds = self._hosts[name]
        argv = [str(a) for a in argv]
        setup = [f"hostname {shlex.quote(name)}"] + [
            f"mount --bind {shlex.quote(src)} {shlex.quote(dst)}" for dst, src in binds.items()
        ]
        script = " && ".join(setup) + ' && exec "$@"'
        return ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", script, "sh", *argv]

    def run(self, name, argv, check=True, capture_output=True, text=True, **kw):
        """C{subprocess.run} of C{argv} inside host C{name}."""
        return subprocess.run(self.argv(name, argv), check=check,
                              capture_output=capture_output, text=text, **kw)

    def spawn(self, name, argv, **kw):
        """C{subprocess.Popen} of C{argv} inside host C{name}."""
        return subprocess.Popen(self.argv(name, argv), **kw)

    def _port(self, name):
        self._hosts[name]  # noqa: B018 - KeyError for an unknown host
        return f"p{list(self._hosts).index(name) + 1}"

    def disconnect(self, name):
        """Cut host C{name} off the network (its switch port down); it keeps running."""
        _ip("-n", self._switch, "link", "set", self._port(name), "down")

    def reconnect(self, name):
        """Plug host C{name} back into the switch (its port up again)."""
        _ip("-n", self._switch, "link", "set", self._port(name), "up")

    def power_cut(self, name):
        """
        Host C{name} loses power and boots again, as far as its network namespace can: every
        process in it killed at once (SIGKILL: nothing gets to clean up), and the kernel state
        a reboot empties gone (the links its programs made, every nftables table).  Its
        address, its cable and its files stay, as a disk does; its kernel settings stay too,
        as a boot applies C{/etc/sysctl.d} again.
        """
        ns = self._hosts[name][0]
        _kill_inside(ns, signals=(signal.SIGKILL,))
        out = _ip("-n", ns, "-o", "link", "show").stdout
        for line in out.splitlines():
            link = line.split(":")[1].strip().split("@")[0]
            if link not in ("lo", "eth0"):
                _ip("-n", ns, "link", "delete", link, check=False)
        subprocess.run(["ip", "netns", "exec", ns, "nft", "flush", "ruleset"], check=True,
                       capture_output=True)

    def close(self):
        """Kill what runs inside, delete every namespace this network made.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        for ns, _, _ in self._hosts.values():
            _delete(ns)
        _delete(self._switch)
        for target in reversed(self._made):
            try:
                os.rmdir(target)
            except OSError:
                pass
        try:
            atexit.unregister(self.close)
        except Exception:  # pragma: no cover - interpreter shutting down
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
