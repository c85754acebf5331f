"""
The production path, as an operator runs it, on hosts made of network namespaces.

One cluster per test session (the C{cluster} fixture in conftest.py):

 - the .debs, built once per source tree (tests/packaging/debs.py; cached by hash);
 - a test network (L{zwrm.testing.netns.TestNetwork}) with hosts C{cp} (control plane),
   C{a1}, C{a2} (agents) and C{client} (the operator's machine: the CLI, the apps' users),
   each with its own address and host name, resolvable as C{<name>.zwrm.test};
 - the hosts share one filesystem, so each gets its own C{/etc/zwrm} and C{/var/lib/zwrm}:
   bind mounts, made in the private mount namespace every command in the host runs in
   (C{TestNetwork(binds=...)}), of C{<run>/<host>/etc} and C{<run>/<host>/lib}.  The
   agents' C{/var/lib/zwrm} is a data disk of their own, as operators give their hosts: an
   ext4 filesystem (C{<run>/a1-data.img}, sparse, loop-mounted on C{<run>/a1/lib}), which a
   step can fill (L{Cluster.fill_data_disk});  The
   packages themselves (C{/opt/zwrm}, C{/usr/bin/zwrm}, the units, the C{zwrm} user) are
   installed once into the shared filesystem by the first C{install.sh}: as on identical
   hosts.  Any zwrm packages installed before are purged first;
 - C{install.sh} as docs/install.md says: the control plane with
   C{--control-plane-url=https://cp.zwrm.test:8443}; then C{zwrm host list} and
   C{zwrm tokens create} on the control-plane host (as root: /etc/zwrm/cli.toml, written by
   install.sh, tells the CLI where and how); the agents (C{a1} in datacenter C{dc1}, C{a2}
   in C{dc2}, both in region C{eu-central}) with the seed's flags plus
   C{--join-token-file} (a1) or C{$ZWRM_JOIN_TOKEN} (a2), C{--address} and
   C{--network=bridge} (the cluster network and the ingress, docs/networking.md; install.sh
   writes the kernel settings into the host's own C{/etc/sysctl.d}, a bind mount too);
 - no systemd runs here: each service is started from its installed unit (L{Unit}): the
   C{ExecStart} line run as its C{User} (C{setpriv}, with C{SupplementaryGroups},
   C{NoNewPrivileges}, and exactly the unit's C{AmbientCapabilities} and
   C{CapabilityBoundingSet}), its C{WorkingDirectory}, C{UMask}, C{Environment}, its
   C{StateDirectory}s created as systemd would, and C{/proc/sys} and C{/sys} read-only
   under C{ProtectKernelTunables=yes}, inside the host;
 - the client gets the CA certificate and the operator token from the control plane (as an
   operator copies them) and its own C{~/.zwrm/config.toml}; from then on everything goes
   through the installed C{/usr/bin/zwrm}, and the apps are reached from there too, as
   their users reach them: through the ingress, on an agent's address and the published
   port (L{Cluster.app_request}).

Each service's output goes to C{<run>/logs/<host>-<unit>.log}; a failing acceptance test
shows the end of every log (conftest.py).
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time

from tests.packaging import debs
from zwrm.testing.netns import TestNetwork

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INSTALL_SH = os.path.join(ROOT, "install.sh")
PORT = 8443
HOSTS = ("cp", "a1", "a2", "client")
AGENTS = ("a1", "a2")
DATACENTERS = {"a1": "dc1", "a2": "dc2"}
DATA_DISKS = {"a1": 16, "a2": 16}  # agents whose /var/lib/zwrm is a filesystem of its own: GiB (sparse)
PUBLISHED = 80  # the app's published port (below 1024: the agent's CAP_NET_BIND_SERVICE)
PUBLISHED_HTTP = 8000  # the same guest port published in http mode (through the proxy)
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class StepFailed(AssertionError):
    """A command of the acceptance run failed; the message has its output."""


def poll(check, timeout, interval=0.5, what="condition"):
    """
    Call C{check()} until it returns something true (and return it), at most C{timeout} s.
    C{what} names the condition, or is a function of no arguments that does (when it
    failed: it may tell what the checks saw).
    """
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            what = what() if callable(what) else what
            raise StepFailed(f"{what}: not within {timeout}s (last: {last})")
        time.sleep(interval)


class Unit:
    """The settings of an installed systemd unit that matter to run it by hand."""

    def __init__(self, name, path=None):
        self.name = name
        self.settings = {}
        section = None
        with open(path or f"/lib/systemd/system/{name}") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith(("#", ";")):
                    continue
                if line.startswith("["):
                    section = line.strip("[]")
                    continue
                key, _, value = line.partition("=")
                self.settings.setdefault((section, key), []).append(value)

    def get(self, key, default=None, section="Service"):
        values = self.settings.get((section, key))
        return values[-1] if values else default

    def all(self, key, section="Service"):
        return self.settings.get((section, key), [])

    @property
    def exec_start(self):
        return shlex.split(self.get("ExecStart"))

    @property
    def environment(self):
        env = {}
        for line in self.all("Environment"):
            for item in shlex.split(line):
                k, _, v = item.partition("=")
                env[k] = v
        return env

    def state_directories(self):
        return [f"/var/lib/{d}" for line in self.all("StateDirectory") for d in line.split()]

    def capabilities(self, key):
        """
        The capabilities a setting names (C{AmbientCapabilities}, C{CapabilityBoundingSet}),
        as setpriv spells them (C{["net_admin", ...]}); L{None} if the unit does not set it.
        Later lines add to earlier ones; an empty assignment clears them, as in systemd.
        """
        values = self.all(key)
        if not values:
            return None
        caps = []
        for line in values:
            if not line.strip():
                caps = []
                continue
            if line.startswith("~"):
                raise ValueError(f"{self.name}: {key}=~... is not understood by the harness")
            caps += [c.lower().removeprefix("cap_") for c in line.split()]
        return caps

    def privileges(self):
        """setpriv's capability flags for what the unit grants: nothing more, nothing less."""
        out = []
        ambient = self.capabilities("AmbientCapabilities") or []
        flags = "-all" + "".join(f",+{c}" for c in ambient)
        out += [f"--inh-caps={flags}", f"--ambient-caps={flags}"]
        bounding = self.capabilities("CapabilityBoundingSet")
        if bounding is not None:
            out.append("--bounding-set=-all" + "".join(f",+{c}" for c in bounding))
        return out


class Service:
    """One service started from its unit inside a host (see L{Cluster.start})."""

    def __init__(self, host, unit, process, log_path, log_offset=0):
        self.host = host
        self.unit = unit
        self.process = process
        self.log_path = log_path
        self.log_offset = log_offset  # where this start's output begins in the log

    @property
    def running(self):
        return self.process.poll() is None

    def check(self):
        """L{StepFailed} if the service exited or logged that it could not start."""
        if not self.running:
            raise StepFailed(f"{self.unit.name} on {self.host} exited "
                             f"({self.process.returncode})")
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            for line in f.read().decode(errors="replace").splitlines():
                if "zwrm-control could not start" in line:  # (not a machine's)
                    raise StepFailed(f"{self.unit.name} on {self.host}: {line}")

    def stop(self, timeout=30):
        """SIGTERM (as systemctl stop), then SIGKILL after C{timeout} seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


class Cluster:
    """
    The hosts, their services and the operator's CLI; see the module docstring.

    @ivar state: what steps leave for later steps (e.g. the app's data), by step name.
    @ivar timings: seconds per phase, reported at the end of the session.
    """

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.logs = os.path.join(run_dir, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.services = {}  # (host, unit name) -> Service
        self.state = {}
        self.timings = {}
        self.net = None
        self._mounts = []  # data disks mounted by setup (unmounted by close)
        self.debs = None
        self.host_ids = {}  # agent host name -> host id

    # --- building it --------------------------------------------------------------------

    def phase(self, name):
        cluster = self

        class _Timer:
            def __enter__(self):
                self.start = time.monotonic()

            def __exit__(self, *exc):
                cluster.timings[name] = round(time.monotonic() - self.start, 1)

        return _Timer()

    def host_dir(self, host, *parts):
        return os.path.join(self.run_dir, host, *parts)

    def setup(self):
        with self.phase("build the .debs (cached by source hash)"):
            self.debs = debs.debs_dir()
        with self.phase("build the test image"):
            # The test image with an /init that takes its address from the kernel command
            # line (ip=...), as the agent gives it under --network=bridge.
            from tests.network import guest

            self.image = guest.build()
        with self.phase("purge zwrm packages installed before"):
            self._purge()
        with self.phase("a data disk of its own for each agent"):
            for host, gib in DATA_DISKS.items():
                self._make_data_disk(host, gib)
        binds = {h: {"/etc/zwrm": self.host_dir(h, "etc"), "/var/lib/zwrm": self.host_dir(h, "lib"),
                     "/etc/sysctl.d": self.host_dir(h, "sysctl.d")}
                 for h in HOSTS}
        self.net = TestNetwork(HOSTS, binds=binds)
        with self.phase("install and start the control plane"):
            self._install_control_plane()
        with self.phase("install and start two agents"):
            self._install_agents()
        with self.phase("configure the client"):
            self._configure_client()

    def _make_data_disk(self, host, gib):
        """
        An ext4 filesystem of C{gib} GiB (a sparse file, no blocks reserved for root, so that
        a full disk is full for root and the zwrm user alike) mounted where C{host}'s
        C{/var/lib/zwrm} comes from.
        """
        image = os.path.join(self.run_dir, f"{host}-data.img")
        with open(image, "wb") as f:
            f.truncate(gib << 30)
        mount_point = self.host_dir(host, "lib")
        os.makedirs(mount_point, exist_ok=True)
        for argv in (["mkfs.ext4", "-q", "-F", "-m", "0", "-L", f"zwrm-{host}", image],
                     ["mount", "-o", "loop", image, mount_point]):
            r = subprocess.run(argv, capture_output=True, text=True)
            if r.returncode != 0:
                raise StepFailed(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
        self._mounts.append((mount_point, image))

    def fill_data_disk(self, host):
        """
        Fill C{host}'s data disk, as something outside zwrm would (a log, a backup): one file
        as large as the space left, in C{/var/lib/zwrm}.

        @return: the file's path on the host (remove it to free the disk again).
        """
        filler = "/var/lib/zwrm/filler"
        free = os.statvfs(self.host_dir(host, "lib"))
        # Allocated at once but for the last 16 MiB (its extents need blocks too), which
        # zeros then fill up to the last block (dd stops at ENOSPC).
        size = max(0, free.f_bavail * free.f_frsize - (16 << 20))
        self.sh(host, ["sh", "-c", f"fallocate -l {size} {filler} && "
                                   f"{{ dd if=/dev/zero bs=64k >> {filler} 2>/dev/null; true; }}"])
        left = os.statvfs(self.host_dir(host, "lib"))
        if left.f_bavail * left.f_frsize > (1 << 20):
            raise StepFailed(f"{host}'s data disk still has {left.f_bavail * left.f_frsize} bytes free")
        return filler

    def _purge(self):
        installed = [p for p in debs.PACKAGES
                     if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                                       text=True).stdout.startswith("install ok")]
        if installed:
            r = subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "purge", "-y", "-qq", *installed], capture_output=True,
                               text=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
            if r.returncode != 0:
                raise StepFailed(f"apt-get purge {installed}: {r.stdout}{r.stderr}")

    def sh(self, host, argv, env=None, input=None, timeout=600, ok=(0,)):
        """Run C{argv} in C{host} as root; return its output; L{StepFailed} unless exit in C{ok}."""
        full_env = {"PATH": SYSTEM_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
        full_env.update(env or {})
        r = self.net.run(host, argv, check=False, env=full_env, input=input, timeout=timeout)
        if r.returncode not in ok:
            raise StepFailed(
                f"on {host}: {' '.join(map(str, argv))} exited {r.returncode}\n"
                f"--- stdout:\n{r.stdout[-3000:]}\n--- stderr:\n{r.stderr[-3000:]}")
        self._check_no_traceback(host, argv, r.stderr)
        return r

    @staticmethod
    def _check_no_traceback(host, argv, text):
        if "Traceback (most recent call last)" in text:
            raise StepFailed(f"on {host}: {' '.join(map(str, argv))} printed a traceback:\n{text}")

    def install(self, host, *args, env=None):
        """C{bash install.sh ARGS --deb=<debs>} in C{host}, as docs/install.md says."""
        return self.sh(host, ["bash", INSTALL_SH, *args, f"--deb={self.debs}"], env=env)

    def start(self, host, unit_name):
        """Start C{unit_name} in C{host} the way systemd would run its unit."""
        unit = Unit(unit_name)
        user = unit.get("User")
        group = unit.get("Group", user)
        for d in unit.state_directories():
            mode = unit.get("StateDirectoryMode", "0755")
            self.sh(host, ["install", "-d", "-o", user, "-g", group, "-m", mode, d])
        priv = ["setpriv", f"--reuid={user}", f"--regid={group}"]
        groups = " ".join(unit.all("SupplementaryGroups")).split()
        priv += [f"--groups={','.join(groups)}"] if groups else ["--clear-groups"]
        if unit.get("NoNewPrivileges") == "yes":
            priv.append("--no-new-privs")
        priv += unit.privileges()
        umask = unit.get("UMask", "0022")
        workdir = unit.get("WorkingDirectory", "/")
        inner = f"umask {umask} && cd {shlex.quote(workdir)} && exec \"$@\""
        if unit.get("ProtectKernelTunables") == "yes":
            # As systemd does: kernel settings are read-only for the service (its own
            # mount namespace: `ip netns exec` made one for this command).
            inner = ("mount --bind -o ro /proc/sys /proc/sys && "
                     "mount -o remount,bind,ro /proc/sys && "
                     "mount -o remount,bind,ro /sys && " + inner)
        argv = ["sh", "-c", inner, "sh", *priv, *unit.exec_start]
        env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": "/var/lib/zwrm", "USER": user,
               "LOGNAME": user, **unit.environment}
        log_path = os.path.join(self.logs, f"{host}-{unit_name}.log")
        log = open(log_path, "ab")  # noqa: SIM115 - kept open for the process
        offset = log.tell()
        log.write(f"--- started {time.strftime('%H:%M:%S')}: {' '.join(argv)}\n".encode())
        log.flush()
        process = self.net.spawn(host, argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 stdin=subprocess.DEVNULL)
        log.close()
        service = Service(host, unit, process, log_path, offset)
        self.services[(host, unit_name)] = service
        return service

    def _install_control_plane(self):
        url = f"https://{self.net.hostname('cp')}:{PORT}"
        out = self.install("cp", "--control-plane", f"--control-plane-url={url}").stdout
        self.install_output = {"cp": out}
        self.control = self.start("cp", "zwrm-control.service")
        token = self.host_dir("cp", "lib", "control", "operator.token")

        def listening():
            self.control.check()
            return os.path.exists(token) and self.cli_on_cp("host", "list", ok=(0, 3, 8)).returncode == 0

        poll(listening, 90, what="the control plane answers `zwrm host list` on its host")

    def cli_on_cp(self, *args, ok=(0,), timeout=120):
        """C{zwrm ARGS} on the control-plane host as root (configured by install.sh)."""
        return self.sh("cp", ["zwrm", *args], ok=ok, timeout=timeout)

    def control_metrics(self):
        """
        The control plane's C{/metrics} samples (C{{name: value}}, a labelled one's name
        with its labels: C{'name{label="value"}'}), read on its host over TLS with the
        cluster CA, as a Prometheus server there would.
        """
        url = f"https://{self.net.hostname('cp')}:{PORT}/metrics"
        text = self.sh("cp", ["curl", "-fsS", "--max-time", "20", "--cacert",
                              "/var/lib/zwrm/control/pki/ca.pem", url]).stdout
        out = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and not line.startswith("#"):
                out[parts[0]] = float(parts[1])
        return out

    def views_resumed(self, at_least, what):
        """
        Wait (60 s at most) until the control plane has resumed C{at_least} network views
        (C{zwrm_network_view_resumed_total}: agents that came back holding the current hosts
        list). @return: its metrics then (L{control_metrics}).
        """
        def resumed():
            metrics = self.control_metrics()
            return metrics if metrics.get("zwrm_network_view_resumed_total", 0) >= at_least else None

        return poll(resumed, 60, interval=1.0, what=what)

    def _install_agents(self):
        token = self.cli_on_cp("tokens", "create", "--description", "acceptance").stdout.strip()
        token = token.split()[-1]
        token_file = self.host_dir("client", "join-token")
        os.makedirs(os.path.dirname(token_file), exist_ok=True)
        with open(token_file, "w") as f:
            f.write(token + "\n")
        os.chmod(token_file, 0o600)
        url = f"https://{self.net.hostname('cp')}:{PORT}"
        self.agents = {}
        for host in AGENTS:
            args = ["--agent", f"--control-plane-url={url}", "--region=eu-central",
                    f"--datacenter={DATACENTERS[host]}", f"--address={self.net.address(host)}",
                    "--network=bridge"]
            env = None
            if host == "a1":
                args.append(f"--join-token-file={token_file}")
            else:
                env = {"ZWRM_JOIN_TOKEN": token}
            self.install_output[host] = self.install(host, *args, env=env).stdout
            self.agents[host] = self.start(host, "zwrm-agent.service")

        def ready():
            for service in self.agents.values():
                service.check()
            hosts = self.host_list()
            by_name = {h["name"]: h for h in hosts}
            if all(by_name.get(a, {}).get("state") == "ready" for a in AGENTS):
                self.host_ids = {a: by_name[a]["id"] for a in AGENTS}
                return True
            return False

        poll(ready, 120, interval=1.0, what="both agents joined and ready")

    def host_list(self):
        return json.loads(self.cli_on_cp("host", "list", "--json").stdout)

    def _configure_client(self):
        """The operator's machine: the CA and the operator token, copied from the control plane."""
        home = self.host_dir("client", "home")
        cfg = os.path.join(home, ".zwrm")
        os.makedirs(cfg, exist_ok=True)
        shutil.copy(self.host_dir("cp", "lib", "control", "pki", "ca.pem"), f"{cfg}/ca.pem")
        shutil.copy(self.host_dir("cp", "lib", "control", "operator.token"), f"{cfg}/token")
        os.chmod(f"{cfg}/token", 0o600)
        with open(f"{cfg}/config.toml", "w") as f:
            f.write(f'url = "https://{self.net.hostname("cp")}:{PORT}"\n'
                    f'ca_file = "{cfg}/ca.pem"\n'
                    f'token_file = "{cfg}/token"\n')
        self.client_home = home

    # --- using it -----------------------------------------------------------------------

    def zwrm(self, *args, ok=(0,), timeout=600, input=None):
        """The installed C{zwrm ARGS} on the client (its ~/.zwrm/config.toml); its stdout."""
        return self.sh("client", ["zwrm", *args], env={"HOME": self.client_home}, ok=ok,
                       timeout=timeout, input=input).stdout

    def deploy(self, name, image, *flags, replicas=1, memory=128):
        """
        C{zwrm deploy NAME} of C{image} (the test image's web server: port 8080, a health
        check of C{GET /} with the grace a boot under TCG needs) with C{flags}, waiting until
        it is healthy; the app's status.
        """
        return self.zwrm_json(
            "deploy", name, "--image", image, "--replicas", str(replicas), "--memory",
            str(memory), "--port", "8080", "--health-http", "/", "--health-grace", "240",
            *flags, "--wait", "300", timeout=360)

    def zwrm_json(self, *args, **kw):
        return json.loads(self.zwrm(*args, "--json", **kw))

    def step_app(self, request, name):
        """
        Create app C{name} for one step (C{request}: the test's pytest request).  When the
        step ends, however it ends, the app is destroyed with its volumes (a step that
        passed has done so already: then nothing is left to destroy), so that a step that
        failed leaves no machine holding the room later steps need.
        """
        self.zwrm("apps", "create", name)
        request.addfinalizer(lambda: self.zwrm("destroy", name, "--volumes", ok=range(256)))

    def host_of(self, host_id):
        """The test host (namespace) name of the agent with id C{host_id}."""
        return {v: k for k, v in self.host_ids.items()}[host_id]

    def app_request(self, path, data=None, via="a1", wait=30, port=PUBLISHED):
        """
        An HTTP request to the app, as its users make it: from the client host to the
        ingress of agent C{via} (its C{--address} and the published C{port}), wherever the
        replica runs.  Returns the body.  A read (C{data} None) is tried again for up to
        C{wait} seconds while the ingress answers with an error or not at all (it follows
        the cluster's health events); a write is made once.
        """
        url = f"http://{self.net.address(via)}:{port}{path}"
        argv = ["curl", "-fsS", "--max-time", "20", url]
        if data is not None:
            argv[1:1] = ["--data-binary", "@-", "-H", "Content-Type: application/octet-stream"]
            return self.sh("client", argv, input=data.decode()).stdout
        last = []

        def answered():
            r = self.sh("client", argv, ok=range(256))
            last[:] = [r.returncode, r.stderr.strip()]
            return r.stdout if r.returncode == 0 else None

        try:
            return poll(answered, wait, interval=1.0, what=f"{url} from the client")
        except StepFailed as e:
            raise StepFailed(f"{e}: curl exited {last[0]}: {last[1]}") from None

    def app_everywhere(self, path, wait=30):
        """C{{agent: body}}: L{app_request} of C{path} through every agent's ingress."""
        return {a: self.app_request(path, via=a, wait=wait) for a in AGENTS}

    def restart(self, host, unit_name):
        """Stop (SIGTERM) and start again a service, as systemctl restart does."""
        self.services[(host, unit_name)].stop()
        service = self.start(host, unit_name)
        if unit_name == "zwrm-control.service":
            self.control = service
        elif unit_name == "zwrm-agent.service":
            self.agents[host] = service
        return service

    def log_offsets(self):
        """Where each service's log ends now (for L{check_logs_since})."""
        return {key: os.path.getsize(s.log_path) for key, s in self.services.items()}

    def check_logs_since(self, offsets, bad=("Traceback", "#critical]")):
        """
        L{StepFailed} if a service logged any of C{bad} after C{offsets} (a service started
        since: all of its log).

        @return: C{{(host, unit): what it logged}}.
        """
        out = {}
        for key, service in self.services.items():
            with open(service.log_path, "rb") as f:
                f.seek(offsets.get(key, 0))
                out[key] = text = f.read().decode(errors="replace")
            for b in bad:
                if b in text:
                    raise StepFailed(f"{key[0]} {key[1]} logged {b!r}:\n{text[-4000:]}")
        return out

    def wait_ready(self, what, timeout=120, retry=(3, 8)):
        """
        Poll until the control plane answers and lists every agent C{ready} and registered
        (the CLI's exit codes in C{retry}: the control plane is not answering yet); return
        the hosts.
        """

        def ready():
            self.control.check()
            for service in self.agents.values():
                service.check()
            r = self.cli_on_cp("host", "list", "--json", ok=(0, *retry))
            if r.returncode != 0:
                return False
            hosts = json.loads(r.stdout)
            # ready and registered (a restarted agent's host stays ready, not callable,
            # from its old session's end until it registers again)
            return (len(hosts) == len(AGENTS)
                    and all(h["state"] == "ready" and h["executor"] for h in hosts) and hosts)

        return poll(ready, timeout, interval=1.0, what=what)

    def power_cut(self, host):
        """
        C{host} loses power (L{TestNetwork.power_cut}: everything in it killed at once, the
        links and nftables rules its programs made gone, as after a reboot).

        @return: the units it ran, for L{boot}.
        """
        self.net.power_cut(host)
        units = [unit for (h, unit) in self.services if h == host]
        for unit in units:
            self.services[(host, unit)].process.wait(timeout=30)
        return units

    def boot(self, host, units):
        """C{host} boots: the C{units} it ran are started, as the boot starts enabled units."""
        for unit in units:
            service = self.start(host, unit)
            if unit == "zwrm-control.service":
                self.control = service
            else:
                self.agents[host] = service

    # --- reporting ----------------------------------------------------------------------

    NOISE = ("_HTTP11ClientFactory", '"GET /v2/', '"HEAD /v2/', '"PUT /v2/', '"POST /v2/',
             "QMP event", "Starting factory", "Stopping factory")

    def log_report(self, lines=80):
        """The end of every service's log (without per-request noise), for a failure report."""
        out = []
        for (host, unit), service in self.services.items():
            text = [ln for ln in service.log().splitlines()
                    if not any(n in ln for n in self.NOISE)][-lines:]
            state = "running" if service.running else f"exited {service.process.returncode}"
            out.append(f"--- {host} {unit} ({state}), {service.log_path}:\n" + "\n".join(text))
        return "\n".join(out)

    def close(self):
        for service in self.services.values():
            service.stop(timeout=20)
        if self.net is not None:
            self.net.close()  # also kills what the agents left running (QEMU)
            # Leave the machine without zwrm packages, as the purge before found it or
            # better: their postinst ran in the hosts' views, not in the shared one.
            self._purge()
        while self._mounts:
            mount_point, image = self._mounts.pop()
            if subprocess.run(["umount", mount_point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", mount_point], capture_output=True)
            if not os.environ.get("ZWRM_KEEP_TEST_DIRS"):
                os.unlink(image)


def make_run_dir():
    base = os.environ.get("ZWRM_ACCEPTANCE_DIR", "/var/tmp")
    os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix="zwrm-acceptance-", dir=base)
