"""
Step: the packages upgraded in place, as docs/install.md says (``apt-get install`` of the
.debs over the installed ones; here the same version again, ``--reinstall``, which runs the
same maintainer scripts: prerm ``upgrade``, postinst ``configure`` with the old version),
the control plane first, then each agent, each service restarted as the upgrade restarts
enabled services.

Checked: every apt run is clean, the hosts are ready after each restart, the app's VM kept
running through its agent's upgrade (the same QEMU process), its data answers through both
ingresses, and no service logged a traceback, a critical line or that it found no plugin
cache (the maintainer scripts make them again after an upgrade).
"""

import glob
import os

import pytest

from tests.acceptance.cluster import AGENTS

pytestmark = pytest.mark.acceptance

UNITS = {"cp": ("zwrm-control", "zwrm-control.service")}
UNITS.update({a: ("zwrm-agent", "zwrm-agent.service") for a in AGENTS})


def _qemu_pid(cluster, machine):
    host = cluster.host_of(machine["host_id"])
    [pidfile] = glob.glob(os.path.join(cluster.host_dir(host), "**", machine["id"], "qemu.pid"),
                          recursive=True)
    with open(pidfile) as f:
        return int(f.read().strip())


def test_upgrade_in_place(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    web = cluster.state["app"]
    [machine] = cluster.zwrm_json("status", web["name"])["machines"]
    pid = _qemu_pid(cluster, machine)
    offsets = cluster.log_offsets()

    with cluster.phase("upgrade in place: the control plane, then each agent"):
        for host in ("cp", *AGENTS):
            package, unit = UNITS[host]
            files = [f for p in ("zwrm", package)
                     for f in glob.glob(os.path.join(cluster.debs, f"{p}_*.deb"))]
            r = cluster.sh(host, ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install",
                                  "--reinstall", "-y", "-q", "--no-install-recommends", *files],
                           env={"DEBIAN_FRONTEND": "noninteractive"})
            for line in (r.stdout + r.stderr).splitlines():
                assert not line.startswith(("E:", "W:", "dpkg: error", "zwrm: warning")), (
                    f"on {host}: {line}\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
            cluster.restart(host, unit)
            cluster.wait_ready(f"every host ready after {host}'s upgrade")

    [after] = cluster.zwrm_json("status", web["name"])["machines"]
    assert (after["id"], after["host_id"], after["state"]) == (
        machine["id"], machine["host_id"], "running"), after
    assert _qemu_pid(cluster, after) == pid, "the VM was restarted by its agent's upgrade"
    for body in cluster.app_everywhere("/cgi-bin/read?index.txt", wait=60).values():
        assert body.encode() == web["data"]
    # (the maintainer scripts keep Twisted's plugin caches, which the services cannot write:
    # without them every start scans every plugin again)
    cluster.check_logs_since(offsets, bad=("Traceback", "#critical]",
                                           "Unable to write to plugin cache"))
