"""
Step: the install, as docs/install.md says (the cluster fixture does it); what the
operator then sees and what install.sh left on the hosts.
"""

import base64
import hashlib
import json
import os
import stat
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.acceptance.cluster import AGENTS, DATACENTERS, PORT

CONSOLE_PAGE = os.path.join(os.path.dirname(__file__), "console_page.py")

pytestmark = pytest.mark.acceptance


def test_host_list_as_install_sh_tells(cluster):
    # install.sh's closing lines name the command; it works as printed, on the
    # control-plane host, with nothing but what install.sh wrote (/etc/zwrm/cli.toml).
    for host in ("cp", *AGENTS):
        assert "zwrm host list" in cluster.install_output[host], host
    out = cluster.cli_on_cp("host", "list").stdout
    for agent in AGENTS:
        assert agent in out
    assert out.count("ready") >= 2, out
    hosts = {h["name"]: h for h in cluster.host_list()}
    for agent in AGENTS:
        assert (hosts[agent]["state"], hosts[agent]["region"], hosts[agent]["datacenter"]) == (
            "ready", "eu-central", DATACENTERS[agent])


def test_web_console_over_tls_from_the_operator_s_machine(cluster, tmp_path):
    """
    The installed control plane serves its web console at https://cp:8443/: a headless
    Chromium on the operator's machine (trusting the server certificate by its key, as an
    operator would by importing the cluster's CA) loads it, logs in with the operator
    token over wss://, and shows both hosts ready, with nothing logged as an error (the
    page's Content-Security-Policy lets the packaged autobahn and app.js run).
    """
    with open(cluster.host_dir("cp", "lib", "control", "pki", "server.pem"), "rb") as f:
        key = x509.load_pem_x509_certificate(f.read()).public_key()
    spki = base64.b64encode(hashlib.sha256(
        key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest()).decode()
    url = f"https://{cluster.net.hostname('cp')}:{PORT}/"
    shot = tmp_path / "console.png"
    out = cluster.sh("client", [sys.executable, CONSOLE_PAGE, url,
                                os.path.join(cluster.client_home, ".zwrm", "token"), spki,
                                str(len(AGENTS)), shot], timeout=240).stdout
    page = json.loads(out.splitlines()[-1])
    assert (page["page"], page["role"], page["conn"]) == (url, "operator", "live"), page
    ids = {h["name"]: h["id"] for h in cluster.host_list()}
    assert sorted(page["hosts"]) == sorted([ids[a], "ready"] for a in AGENTS), page
    assert page["severe"] == [], page


def test_install_sh_files(cluster):
    etc = cluster.host_dir("cp", "etc")
    st = os.stat(os.path.join(etc, "cli.toml"))
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 0
    with open(os.path.join(etc, "cli.toml")) as f:
        cli = f.read()
    assert f'url = "https://{cluster.net.hostname("cp")}:8443"' in cli
    for agent in AGENTS:
        token = os.path.join(cluster.host_dir(agent, "etc"), "join-token")
        st = os.stat(token)
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 0
        with open(os.path.join(cluster.host_dir(agent, "etc"), "agent.toml")) as f:
            config = f.read()
        assert 'join_token_file = "/etc/zwrm/join-token"' in config
        assert "zwrm1." not in config
        assert 'network = "bridge"' in config
        # The kernel settings of bridge mode (the unit may not change them), applied.
        with open(os.path.join(cluster.host_dir(agent, "sysctl.d"), "60-zwrm-agent.conf")) as f:
            assert "net.ipv4.ip_forward = 1" in f.read()
        assert cluster.sh(agent, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"


def test_join_token_on_no_command_line(cluster):
    for agent in AGENTS:
        service = cluster.agents[agent]
        with open(f"/proc/{service.process.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert any(b"twistd" in a for a in argv), argv  # the service itself
        assert not any(b"zwrm1." in a for a in argv), argv


def test_services_run_as_the_units_user(cluster):
    import pwd

    zwrm = pwd.getpwnam("zwrm").pw_uid
    for service in (cluster.control, *cluster.agents.values()):
        with open(f"/proc/{service.process.pid}/status") as f:
            uid = next(line for line in f if line.startswith("Uid:")).split()[1:]
        assert {int(u) for u in uid} == {zwrm}, (service.unit.name, uid)


CAPS = {"CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12}


def test_services_have_exactly_the_units_capabilities(cluster):
    # The agent: CAP_NET_ADMIN and CAP_NET_BIND_SERVICE (bridge, TAPs, VXLAN, nftables;
    # the published port 80), ambient as the unit grants them; the control plane: none.
    for service in (cluster.control, *cluster.agents.values()):
        granted = " ".join(service.unit.all("AmbientCapabilities")).split()
        want = sum(1 << CAPS[c] for c in granted)
        with open(f"/proc/{service.process.pid}/status") as f:
            caps = {k: int(v, 16) for k, _, v in (line.partition(":\t") for line in f)
                    if k.startswith("Cap")}
        assert (caps["CapEff"], caps["CapAmb"], caps["CapBnd"]) == (want, want, want), (
            service.unit.name, caps)
    assert all(" ".join(s.unit.all("AmbientCapabilities")).split() ==
               ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"] for s in cluster.agents.values())


def test_kernel_settings_read_only_for_the_agent(cluster):
    # ProtectKernelTunables=yes, as systemd applies it: /proc/sys is read-only for the
    # agent (so install.sh's sysctl.d file is what sets ip_forward, not the agent).
    for service in cluster.agents.values():
        assert service.unit.get("ProtectKernelTunables") == "yes"
        with open(f"/proc/{service.process.pid}/mountinfo") as f:
            mounts = [line.split() for line in f]
        [proc_sys] = [m for m in mounts if m[4] == "/proc/sys"]
        assert "ro" in proc_sys[5].split(","), proc_sys
