"""
Step: the install, as docs/install.md says (the cluster fixture does it); what the
operator then sees and what install.sh left on the hosts.
"""

import os
import stat

import pytest

from tests.acceptance.cluster import AGENTS

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
            "ready", "eu-central", "dc1")


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
