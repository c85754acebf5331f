"""
The Debian packages: they build with dpkg-buildpackage (scripts/build-debs), their units pass
`systemd-analyze verify`, and, installed, both services start from the installed files.

The packages come from $ZWRM_DEBS (a directory of .deb files, e.g. what CI built with
scripts/build-debs) or are built once per source tree (tests/packaging/debs.py caches them by
a hash of the sources under /var/cache/zwrm-ci/debs). Building is skipped outside CI only when
dpkg-buildpackage is missing. The install tests change the machine (packages, the zwrm user,
/etc/zwrm): they run as root under CI, or elsewhere with ZWRM_TEST_INSTALL=1.
"""

import glob
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile

import pytest
import treq
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from tests.packaging import debs
from zwrm import pki

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("zwrm", "zwrm-control", "zwrm-agent")
UNITS = ("zwrm-control.service", "zwrm-agent.service")
VENV = "/opt/zwrm/venv"

def debs_dir():
    """The directory holding the three .deb files (tests/packaging/debs.py: cached by source hash)."""
    if not os.environ.get("ZWRM_DEBS") and not shutil.which("dpkg-buildpackage") and not os.environ.get("CI"):
        raise SkipTest("dpkg-buildpackage is missing (apt-get install dpkg-dev debhelper)")
    return debs.debs_dir()


def deb(package):
    [path] = glob.glob(os.path.join(debs_dir(), f"{package}_*.deb"))
    return path


def run(*args, timeout=600, **kw):
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


def unit_settings(path):
    """The [Service] settings of a unit file: name -> list of values."""
    settings, section = {}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                section = line
                continue
            key, _, value = line.partition("=")
            settings.setdefault((section, key), []).append(value)
    return settings


class BuiltPackagesTests(SynchronousTestCase):
    """What the packages contain (no installation needed)."""

    @classmethod
    def setUpClass(cls):
        cls.root = tempfile.mkdtemp(prefix="zwrm-deb-root-")
        for package in PACKAGES:
            result = run("dpkg-deb", "-x", deb(package), cls.root)
            assert result.returncode == 0, result.stderr

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def test_cli_and_services(self):
        self.assertEqual(os.readlink(self.path("usr/bin/zwrm")), f"{VENV}/bin/zwrm")
        # zwrm-control backup / restore (docs/install.md, "Back up the control plane")
        self.assertEqual(os.readlink(self.path("usr/bin/zwrm-control")), f"{VENV}/bin/zwrm-control")
        self.assertTrue(os.path.exists(self.path("opt/zwrm/venv/bin/zwrm-control")))
        with open(self.path("opt/zwrm/venv/bin/zwrm")) as f:
            self.assertEqual(f.readline().strip(), f"#!{VENV}/bin/python")
        for unit in UNITS:
            self.assertTrue(os.path.exists(self.path("lib/systemd/system", unit)), unit)
        plugins = self.path("opt/zwrm/venv/lib/python3.11/site-packages/twisted/plugins")
        self.assertTrue(os.path.exists(os.path.join(plugins, "zwrm_control.py")))
        self.assertTrue(os.path.exists(os.path.join(plugins, "zwrm_agent.py")))

    def test_no_plugin_cache_byte_code_or_shadowing_init(self):
        venv = self.path("opt/zwrm/venv")
        for top, dirs, files in os.walk(venv):
            self.assertNotIn("dropin.cache", files, top)
            self.assertNotIn("__pycache__", dirs, top)
        site = os.path.join(venv, "lib/python3.11/site-packages")
        [record] = glob.glob(os.path.join(site, "zwrm-*.dist-info/RECORD"))
        with open(record) as f:
            self.assertNotIn("twisted/plugins/__init__.py", f.read())
        [twisted_record] = glob.glob(os.path.join(site, "twisted-*.dist-info/RECORD")) or glob.glob(
            os.path.join(site, "Twisted-*.dist-info/RECORD")
        )
        with open(twisted_record) as f:
            self.assertIn("twisted/plugins/__init__.py", f.read())

    def test_virtualenv_relocated(self):
        with open(self.path("opt/zwrm/venv/pyvenv.cfg")) as f:
            cfg = f.read()
        self.assertIn("home = /usr/bin", cfg)
        self.assertNotIn("debian/zwrm", cfg)

    def test_examples(self):
        self.assertTrue(os.path.exists(self.path("usr/share/zwrm/control.toml.example")))
        self.assertTrue(os.path.exists(self.path("usr/share/zwrm/agent.toml.example")))
        self.assertTrue(os.path.exists(self.path("usr/share/doc/zwrm/install.md")))

    def test_units_documentation_exists(self):
        # Every Documentation= of each unit names a file the packages ship (not, say, a
        # name that dh_compress turned into .gz).
        for unit in UNITS:
            settings = unit_settings(self.path("lib/systemd/system", unit))
            urls = " ".join(settings[("[Unit]", "Documentation")]).split()
            self.assertTrue(urls, unit)
            for url in urls:
                self.assertTrue(url.startswith("file:///"), (unit, url))
                self.assertTrue(os.path.isfile(self.path(url[len("file:///"):])), (unit, url))

    def test_copyright_covers_every_bundled_distribution(self):
        from importlib.metadata import distributions

        with open(self.path("usr/share/doc/zwrm/copyright")) as f:
            text = f.read()
        self.assertTrue(text.startswith("Format: https://www.debian.org/doc/packaging-manuals/"))
        paragraphs = {}
        for para in text.split("\n\n"):
            fields = dict(
                line.split(": ", 1) for line in para.splitlines() if ": " in line and not line.startswith(" ")
            )
            if "Files" in fields:
                paragraphs[fields["Files"]] = fields
        site = self.path("opt/zwrm/venv/lib/python3.11/site-packages")
        dists = [d for d in distributions(path=[site]) if d.metadata["Name"] != "zwrm"]
        self.assertGreater(len(dists), 20)
        for dist in dists:
            info = next(f.parts[0] for f in dist.files if f.parts[0].endswith(".dist-info"))
            key = f"{VENV}/lib/python3.11/site-packages/{info}/*"
            self.assertIn(key, paragraphs, f"{dist.metadata['Name']} is not in the copyright file")
            licence = paragraphs[key].get("License", "")
            self.assertTrue(licence and licence.upper() not in ("UNKNOWN", "LICENSE"), (info, licence))
        for package in ("zwrm-control", "zwrm-agent"):
            self.assertTrue(os.path.exists(self.path("usr/share/doc", package, "copyright")))

    def test_units_verify(self):
        # Offline, before installing: point ExecStart at the unpacked twistd (verify checks that
        # the program exists); every other line is the packaged unit's.
        if not shutil.which("systemd-analyze"):
            raise SkipTest("systemd-analyze is missing (apt-get install systemd)")
        work = tempfile.mkdtemp(prefix="zwrm-units-")
        self.addCleanup(shutil.rmtree, work)
        for unit in UNITS:
            with open(self.path("lib/systemd/system", unit)) as f:
                text = f.read()
            text = text.replace(f"ExecStart={VENV}/", f"ExecStart={self.root}{VENV}/")
            with open(os.path.join(work, unit), "w") as f:
                f.write(text)
            result = run("systemd-analyze", "verify", os.path.join(work, unit))
            self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""), unit)

    def test_hardening(self):
        control = unit_settings(self.path("lib/systemd/system/zwrm-control.service"))
        agent = unit_settings(self.path("lib/systemd/system/zwrm-agent.service"))
        for settings in (control, agent):
            service = {k[1]: v for k, v in settings.items() if k[0] == "[Service]"}
            self.assertEqual(service["User"], ["zwrm"])
            self.assertEqual(service["NoNewPrivileges"], ["yes"])
            self.assertEqual(service["ProtectSystem"], ["strict"])
            self.assertEqual(service["PrivateTmp"], ["yes"])
        self.assertEqual(control[("[Service]", "CapabilityBoundingSet")], [""])
        # Bridge networking (docs/networking.md): exactly these, nothing more.
        self.assertEqual(agent[("[Service]", "CapabilityBoundingSet")],
                         ["CAP_NET_ADMIN CAP_NET_BIND_SERVICE"])
        self.assertEqual(agent[("[Service]", "AmbientCapabilities")],
                         ["CAP_NET_ADMIN CAP_NET_BIND_SERVICE"])
        self.assertEqual(agent[("[Service]", "DeviceAllow")], ["/dev/kvm rw", "/dev/net/tun rw"])
        self.assertEqual(agent[("[Service]", "SupplementaryGroups")], ["kvm"])
        self.assertEqual(agent[("[Service]", "KillMode")], ["process"])
        self.assertEqual(control[("[Service]", "PrivateDevices")], ["yes"])

    def test_agent_depends_on_its_network_tools(self):
        # --network bridge runs ip, bridge (iproute2), nft (nftables) and sysctl (procps).
        result = run("dpkg-deb", "-f", deb("zwrm-agent"), "Depends")
        self.assertEqual(result.returncode, 0, result.stderr)
        depends = {d.strip().split()[0] for d in result.stdout.split(",")}
        self.assertLessEqual({"iproute2", "nftables", "procps", "qemu-system-x86"}, depends)
        # conntrack cuts a dead or drained replica's flows; genisoimage makes cloud-init seeds;
        # ovmf boots UEFI images.
        self.assertLessEqual({"conntrack", "genisoimage", "ovmf"}, depends)

    def test_qemu_img_where_images_are_checked(self):
        # The control plane's registry checks qcow2 layers (qemu-img info) and a deploy a
        # disk alone's boot sector (qemu-img dd); zwrm images push checks disks the same way.
        result = run("dpkg-deb", "-f", deb("zwrm-control"), "Depends")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("qemu-utils", {d.strip().split()[0] for d in result.stdout.split(",")})
        result = run("dpkg-deb", "-f", deb("zwrm"), "Recommends")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("qemu-utils", result.stdout)


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _require_install():
    if os.geteuid() != 0:
        raise SkipTest("installing packages needs root")
    if not (os.environ.get("CI") or os.environ.get("ZWRM_TEST_INSTALL")):
        raise SkipTest(
            "installs packages on this machine: runs under CI or with ZWRM_TEST_INSTALL=1"
        )


def ensure_installed():
    _require_install()
    result = run(
        "apt-get",
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        *(deb(p) for p in PACKAGES),
        env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
    )
    assert result.returncode == 0, result.stdout + result.stderr


@implementer(IPolicyForHTTPS)
class _Pinned:
    def __init__(self, fingerprint):
        self.fingerprint = fingerprint

    def creatorForNetloc(self, hostname, port):
        return pki.pinned_client_context(hostname.decode(), self.fingerprint)


class InstalledTests(TestCase):
    """Install the packages, then start both services from the installed files."""

    timeout = 300

    def setUp(self):
        ensure_installed()
        self.processes = []

    def tearDown(self):
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def zwrm_dir(self):
        d = tempfile.mkdtemp(prefix="zwrm-test-")
        self.addCleanup(shutil.rmtree, d, True)
        zwrm = pwd.getpwnam("zwrm")
        os.chown(d, zwrm.pw_uid, zwrm.pw_gid)
        return d

    def start_unit(self, unit, config_text):
        """
        Run the unit's ExecStart as its User with its WorkingDirectory (as systemd would),
        with --config pointing at a copy of the configuration for this test.
        """
        settings = unit_settings(f"/lib/systemd/system/{unit}")
        argv = shlex.split(settings[("[Service]", "ExecStart")][0])
        user = settings[("[Service]", "User")][0]
        config = os.path.join(self.zwrm_dir(), "config.toml")
        with open(config, "w") as f:
            f.write(config_text)
        # as install.sh writes it: readable by the service's group only
        os.chown(config, 0, pwd.getpwnam(user).pw_gid)
        os.chmod(config, 0o640)
        argv[argv.index("--config") + 1] = config
        log = open(os.path.join(os.path.dirname(config), "log"), "w+")
        self.addCleanup(log.close)
        p = subprocess.Popen(
            ["runuser", "-u", user, "--", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=settings[("[Service]", "WorkingDirectory")][0],
            umask=0o077,
        )
        p.log = log
        self.processes.append(p)
        return p

    @defer.inlineCallbacks
    def poll(self, what, check, process, seconds=90):
        for _ in range(int(seconds / 0.25)):
            if process.poll() is not None:
                process.log.seek(0)
                self.fail(
                    f"{what}: the process exited ({process.returncode}):\n{process.log.read()[-3000:]}"
                )
            try:
                value = yield check()
            except Exception:
                value = None
            if value:
                return value
            yield deferLater(reactor, 0.25, lambda: None)
        process.log.seek(0)
        self.fail(f"{what}: not within {seconds}s; log:\n{process.log.read()[-3000:]}")

    @defer.inlineCallbacks
    def healthz(self, url, agent=None):
        response = yield treq.get(url, agent=agent, timeout=5, persistent=False)
        body = yield response.text()
        return json.loads(body) if response.code == 200 else None

    def test_installed_layout(self):
        zwrm = pwd.getpwnam("zwrm")
        self.assertEqual(zwrm.pw_shell, "/usr/sbin/nologin")
        for path, owner, mode in [
            ("/etc/zwrm", "root", 0o750),
            ("/var/lib/zwrm", "zwrm", 0o750),
            ("/var/lib/zwrm/control", "zwrm", 0o750),
            ("/var/lib/zwrm/agent", "zwrm", 0o750),
        ]:
            st = os.stat(path)
            self.assertEqual(
                (pwd.getpwuid(st.st_uid).pw_name, stat.S_IMODE(st.st_mode)), (owner, mode), path
            )
        site = f"{VENV}/lib/python3.11/site-packages"
        self.assertTrue(os.path.exists(f"{site}/twisted/plugins/dropin.cache"))
        self.assertTrue(os.path.exists(f"{site}/zwrm/plugins/dropin.cache"))
        self.assertTrue(os.access(os.path.realpath("/usr/bin/zwrm"), os.X_OK))
        # The web console's files, with autobahn-js's browser build (debian/rules makes it).
        static = f"{site}/zwrm/console/static"
        if os.path.isdir(os.path.join(ROOT, "zwrm", "console")):
            for name in ("index.html", "app.js", "app.css", "favicon.svg",
                         "vendor/autobahn.min.js", "vendor/autobahn.LICENSE.txt"):
                self.assertTrue(os.path.isfile(f"{static}/{name}"), name)
        if os.path.exists(os.path.join(ROOT, "zwrm", "cli", "main.py")):
            result = run("/usr/bin/zwrm", "--help")
            self.assertEqual(result.returncode, 0, result.stderr)
        for unit in UNITS:
            result = run("systemd-analyze", "verify", f"/lib/systemd/system/{unit}")
            self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""), unit)

    @pytest.mark.multihost
    @defer.inlineCallbacks
    def test_both_services_start_from_installed_files(self):
        # a socket per agent session (and two per ingress connection): systemd's default soft
        # limit, 1,024, would cap the cluster near 1,000 hosts (zwrm/rlimits.py)
        for unit in ("zwrm-control.service", "zwrm-agent.service"):
            settings = unit_settings(f"/lib/systemd/system/{unit}")
            self.assertEqual(settings[("[Service]", "LimitNOFILE")], ["1048576"], unit)
        port = _free_port()
        data = self.zwrm_dir()
        control = self.start_unit(
            "zwrm-control.service",
            f'[control]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\ndata_dir = "{data}/control"\n',
        )
        url = f"http://127.0.0.1:{port}/healthz"
        health = yield self.poll("control plane /healthz", lambda: self.healthz(url), control)
        self.assertEqual(health["hosts"], 0)
        if os.path.isdir(os.path.join(ROOT, "zwrm", "console")):
            # The web console, from the installed files, complete.
            page = yield treq.get(f"http://127.0.0.1:{port}/", timeout=5, persistent=False)
            yield page.content()
            self.assertEqual(page.code, 200)
            self.assertIn(b"text/html", page.headers.getRawHeaders(b"content-type")[0])
            self.assertTrue(page.headers.hasHeader(b"content-security-policy"))
            js = yield treq.get(f"http://127.0.0.1:{port}/console/vendor/autobahn.min.js",
                                timeout=5, persistent=False)
            yield js.content()
            self.assertEqual(js.code, 200)
            self.assertIn(b"javascript", js.headers.getRawHeaders(b"content-type")[0])
            control.log.seek(0)
            self.assertNotIn("web console at / is incomplete", control.log.read())
        token_file = os.path.join(data, "control", "join.token")
        yield self.poll(
            "join token file", lambda: defer.succeed(os.path.exists(token_file)), control
        )
        with open(token_file) as f:
            token = f.read().strip()
        # The token in a file of its own (0640 root:zwrm), as install.sh writes it.
        agent_token = os.path.join(self.zwrm_dir(), "join-token")
        with open(agent_token, "w") as f:
            f.write(token + "\n")
        os.chown(agent_token, 0, pwd.getpwnam("zwrm").pw_gid)
        os.chmod(agent_token, 0o640)
        agent = self.start_unit(
            "zwrm-agent.service",
            "[agent]\n"
            f'control_plane_url = "ws://127.0.0.1:{port}/ws"\n'
            'region = "eu-central"\ndatacenter = "dc1"\n'
            f'join_token_file = "{agent_token}"\ndata_dir = "{data}/agent"\n',
        )

        @defer.inlineCallbacks
        def registered():
            if agent.poll() is not None:
                agent.log.seek(0)
                self.fail(f"the agent exited ({agent.returncode}):\n{agent.log.read()[-3000:]}")
            h = yield self.healthz(url)
            return h and h["hosts"] == 1

        yield self.poll("agent registered", registered, control)

    @defer.inlineCallbacks
    def test_install_sh_control_plane_with_tls(self):
        port = _free_port()
        result = run(
            "bash",
            os.path.join(ROOT, "install.sh"),
            "--control-plane",
            f"--control-plane-url=https://localhost:{port}",
            f"--deb={debs_dir()}",
            "--no-start",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        [fingerprint] = [
            line.split(": ")[1]
            for line in result.stdout.splitlines()
            if line.startswith("Control plane CA fingerprint: ")
        ]
        ca = pki.CertificateAuthority.load("/var/lib/zwrm/control/pki")
        self.assertEqual(fingerprint, ca.fingerprint)
        self.assertEqual(stat.S_IMODE(os.stat("/var/lib/zwrm/control/pki/ca.key").st_mode), 0o600)
        # Idempotent: the same arguments change nothing.
        again = run(
            "bash",
            os.path.join(ROOT, "install.sh"),
            "--control-plane",
            f"--control-plane-url=https://localhost:{port}",
            f"--deb={debs_dir()}",
            "--no-start",
        )
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertIn("install.sh: /etc/zwrm/control.toml is unchanged", again.stdout)
        self.assertIn(f"Control plane CA fingerprint: {fingerprint}", again.stdout)
        with open("/etc/zwrm/control.toml") as f:
            config = f.read()
        control = self.start_unit("zwrm-control.service", config)
        url = f"https://localhost:{port}/healthz"
        pinned = Agent(reactor, contextFactory=_Pinned(fingerprint))
        health = yield self.poll("TLS /healthz", lambda: self.healthz(url, pinned), control)
        self.assertIn("hosts", health)
        # A client holding another CA's fingerprint is refused in the handshake.
        wrong = Agent(
            reactor, contextFactory=_Pinned(pki.CertificateAuthority.create().fingerprint)
        )
        with self.assertRaises(Exception) as caught:
            yield treq.get(url, agent=wrong, timeout=5, persistent=False)
        self.assertIn("the server's CA has fingerprint", repr(caught.exception))

    def test_install_sh_agent_idempotent(self):
        args = [
            "bash",
            os.path.join(ROOT, "install.sh"),
            "--agent",
            "--control-plane-url=https://cp.example.com:8080",
            "--region=eu-central",
            "--datacenter=dc1",
            "--join-token=zwrm1.abc123." + "s" * 32 + "." + "f" * 64,
            f"--deb={debs_dir()}",
            "--no-start",
        ]
        if os.path.exists("/etc/zwrm/agent.toml"):
            os.remove("/etc/zwrm/agent.toml")
        first = run(*args)
        self.assertEqual(first.returncode, 0, first.stderr)
        self.assertIn("install.sh: wrote /etc/zwrm/agent.toml", first.stdout)
        self.assertIn("zwrm host list", first.stdout)
        st = os.stat("/etc/zwrm/agent.toml")
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o640)
        self.assertEqual(st.st_gid, pwd.getpwnam("zwrm").pw_gid)
        # Again, the way the documentation runs it: the script piped into `bash -s`.
        with open(os.path.join(ROOT, "install.sh")) as f:
            script = f.read()
        second = subprocess.run(
            ["bash", "-s", "--", *args[2:]],
            input=script,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        self.assertEqual(second.returncode, 0, second.stderr)
        self.assertIn("install.sh: /etc/zwrm/agent.toml is unchanged", second.stdout)

    def test_remove_and_purge(self):
        site = f"{VENV}/lib/python3.11/site-packages"
        result = run("apt-get", "remove", "-y", "-qq", *PACKAGES)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertFalse(os.path.exists(f"{site}/twisted/plugins/dropin.cache"))
        self.assertFalse(os.path.exists(VENV))
        result = run("apt-get", "purge", "-y", "-qq", *PACKAGES)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertFalse(os.path.exists("/etc/zwrm"))
        self.assertTrue(os.path.exists("/var/lib/zwrm"))
        ensure_installed()
        self.assertTrue(os.path.exists(f"{site}/twisted/plugins/dropin.cache"))
