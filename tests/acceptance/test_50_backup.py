"""
Step: the control plane's disk is lost and it comes back from a backup, as docs/install.md
("Back up the control plane") says: C{zwrm-control backup} while it runs (plus the
registry's blobs with tar), then the service stopped, its /etc/zwrm and /var/lib/zwrm
gone, C{install.sh --control-plane} with the same URL, C{zwrm-control restore}, the
registry put back, the service started.  The agents come back (they trust the restored CA),
the app, its machine and its data are there, and the client's token still works.
"""

import os

import pytest

from tests.acceptance.cluster import PORT

pytestmark = pytest.mark.acceptance


def test_restore_into_a_fresh_control_plane(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    app = cluster.state["app"]
    before = cluster.zwrm_json("status", app["name"])
    backup = cluster.host_dir("backup", "zwrm-control.db")
    registry = cluster.host_dir("backup", "zwrm-registry.tar.gz")
    os.makedirs(os.path.dirname(backup), exist_ok=True)

    with cluster.phase("backup, lose the control plane's disk, reinstall, restore"):
        cluster.sh("cp", ["zwrm-control", "backup", "--config", "/etc/zwrm/control.toml", backup])
        assert oct(os.stat(backup).st_mode & 0o777) == oct(0o600)
        cluster.sh("cp", ["tar", "-C", "/var/lib/zwrm/control", "-czf", registry, "registry"])

        cluster.services[("cp", "zwrm-control.service")].stop()
        for part in ("etc", "lib"):
            os.rename(cluster.host_dir("cp", part), cluster.host_dir("cp", f"{part}.lost"))
            os.makedirs(cluster.host_dir("cp", part))
        url = f"https://{cluster.net.hostname('cp')}:{PORT}"
        cluster.install("cp", "--control-plane", f"--control-plane-url={url}")
        cluster.sh("cp", ["zwrm-control", "restore", "--config", "/etc/zwrm/control.toml", backup])
        cluster.sh("cp", ["tar", "-C", "/var/lib/zwrm/control", "-xzf", registry])
        cluster.control = cluster.start("cp", "zwrm-control.service")
        cluster.wait_ready("both agents ready on the restored control plane", timeout=180,
                           retry=(3, 5, 8))

    after = cluster.zwrm_json("status", app["name"])  # the client's token: restored too
    assert [(m["id"], m["host_id"]) for m in after["machines"]] == [
        (m["id"], m["host_id"]) for m in before["machines"]]
    assert [v["id"] for v in after["volumes"]] == [v["id"] for v in before["volumes"]]
    [machine] = after["machines"]
    for body in cluster.app_everywhere("/cgi-bin/read?index.txt").values():
        assert body.encode() == app["data"]
    assert "demo" in cluster.zwrm("images", "list")
