"""
Step: the control plane restarts (SIGTERM, started again from its unit); nothing is lost:
the hosts come back ready, the app's machine and volume are where they were, the data is
there, and the CLI works as before.
"""

import pytest

from tests.acceptance.cluster import AGENTS

pytestmark = pytest.mark.acceptance


def test_control_plane_restart_loses_nothing(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    app = cluster.state["app"]
    before = cluster.zwrm_json("status", app["name"])
    hosts_before = {h["id"]: h["state"] for h in cluster.host_list()}

    with cluster.phase("control-plane restart until both agents are ready"):
        cluster.restart("cp", "zwrm-control.service")
        hosts = cluster.wait_ready("both agents ready after the restart")

    assert {h["id"]: h["state"] for h in hosts} == hosts_before
    # Each agent came back holding the cluster's hosts list: the restarted control plane
    # told it the list is current (zwrm_network_view_resumed) and sent no whole list.
    metrics = cluster.views_resumed(len(AGENTS), "both agents' network views resumed")
    assert metrics["zwrm_network_view_full_lists_total"] == 0, metrics
    after = cluster.zwrm_json("status", app["name"])
    assert [(m["id"], m["host_id"], m["state"]) for m in after["machines"]] == [
        (m["id"], m["host_id"], m["state"]) for m in before["machines"]]
    assert [v["id"] for v in after["volumes"]] == [v["id"] for v in before["volumes"]]
    [machine] = after["machines"]
    for body in cluster.app_everywhere("/cgi-bin/read?index.txt").values():
        assert body.encode() == app["data"]
    assert "demo" in cluster.zwrm("images", "list")
