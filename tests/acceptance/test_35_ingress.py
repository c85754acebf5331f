"""
Step: the ingress (issue 16).  The app's published port answers from the client host on
every agent's address, wherever the replica runs (test_20 wrote through the agent without
the replica, test_25 and test_30 read through both before and after a restart and a drain);
here the agent of the replica's host restarts (SIGTERM, started again from its unit, as
C{systemctl restart zwrm-agent} does): the VM keeps running (C{KillMode=process}), the agent
finds it again, listens on the published port again, and both agents' ingress answers; it
kept the cluster's hosts list, so the control plane resumed its network view instead of
sending the whole list again.
"""

import pytest

from tests.acceptance.cluster import AGENTS, PUBLISHED, poll

pytestmark = pytest.mark.acceptance


def _app(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    return cluster.state["app"]


def test_published_port_on_every_agent(cluster):
    app = _app(cluster)
    for agent in AGENTS:
        out = cluster.sh(agent, ["ss", "-Htln", f"sport = :{PUBLISHED}"]).stdout
        assert f"{cluster.net.address(agent)}:{PUBLISHED}" in out, (agent, out)
    for body in cluster.app_everywhere("/cgi-bin/read?index.txt").values():
        assert body.encode() == app["data"]


def test_ingress_follows_an_agent_restart(cluster):
    app = _app(cluster)
    [machine] = cluster.zwrm_json("status", app["name"])["machines"]
    host = cluster.host_of(machine["host_id"])

    views_before = cluster.control_metrics()
    with cluster.phase("agent restart until ready, the app through both ingresses"):
        service = cluster.restart(host, "zwrm-agent.service")
        cluster.agents[host] = service

        def ready():
            service.check()
            hosts = {h["name"]: h for h in cluster.host_list()}
            [m] = cluster.zwrm_json("status", app["name"])["machines"]
            return (hosts[host]["state"] == "ready" and hosts[host]["executor"]
                    and m["state"] == "running"
                    and m["health"] == "passing" and m)

        m = poll(ready, 120, interval=1.0, what=f"{host}'s agent ready again, the app passing")
        bodies = cluster.app_everywhere("/cgi-bin/read?index.txt")

    # The same machine, not restarted: the VM outlived its agent.
    assert (m["id"], m["host_id"], m["restarts"]) == (
        machine["id"], machine["host_id"], machine["restarts"])
    assert {a: b.encode() for a, b in bodies.items()} == {a: app["data"] for a in bodies}
    out = cluster.sh(host, ["ss", "-Htln", f"sport = :{PUBLISHED}"]).stdout
    assert f"{cluster.net.address(host)}:{PUBLISHED}" in out, out
    # The agent kept the cluster's hosts list across its restart (0600, in its data
    # directory), reported it when it registered, and was told it is current: no whole list.
    mode = cluster.sh(host, ["stat", "-c", "%a %U", "/var/lib/zwrm/agent/network/hosts.json"])
    assert mode.stdout.split() == ["600", "zwrm"], mode.stdout
    views = cluster.views_resumed(views_before.get("zwrm_network_view_resumed_total", 0) + 1,
                                  f"{host}'s network view resumed")
    why = {k: (views_before.get(k), v) for k, v in views.items()
           if k.startswith("zwrm_network_view") and views_before.get(k) != v}
    assert (views["zwrm_network_view_full_lists_total"]
            == views_before["zwrm_network_view_full_lists_total"]), why
