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
import json
import os

import pytest

from tests.acceptance.cluster import AGENTS, poll

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
    offsets = {key: os.path.getsize(s.log_path) for key, s in cluster.services.items()}

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

            def ready():
                cluster.control.check()
                for service in cluster.agents.values():
                    service.check()
                r = cluster.cli_on_cp("host", "list", "--json", ok=(0, 3, 8))  # (restarting)
                if r.returncode != 0:
                    return False
                hosts = json.loads(r.stdout)
                return len(hosts) == len(AGENTS) and all(h["state"] == "ready" for h in hosts)

            poll(ready, 120, interval=1, what=f"every host ready after {host}'s upgrade")

    [after] = cluster.zwrm_json("status", web["name"])["machines"]
    assert (after["id"], after["host_id"], after["state"]) == (
        machine["id"], machine["host_id"], "running"), after
    assert _qemu_pid(cluster, after) == pid, "the VM was restarted by its agent's upgrade"
    for body in cluster.app_everywhere("/cgi-bin/read?index.txt", wait=60).values():
        assert body.encode() == web["data"]
    for key, service in cluster.services.items():
        with open(service.log_path, "rb") as f:
            f.seek(offsets.get(key, 0))
            text = f.read().decode(errors="replace")
        # (the maintainer scripts keep Twisted's plugin caches, which the services cannot
        # write: without them every start scans every plugin again)
        for bad in ("Traceback", "#critical]", "Unable to write to plugin cache"):
            assert bad not in text, f"{key}: {text[-4000:]}"
