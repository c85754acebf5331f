"""
Step: a host's data disk fills up (something outside zwrm fills a2's /var/lib/zwrm, a
filesystem of its own).

Once a2's heartbeats say its disk is nearly full, the control plane places nothing new
there: a deploy that asks for a2's datacenter (dc2) fails with one line naming the full data
disk and creates nothing.  Nothing else changes: the earlier app (wherever it runs) still
answers through every agent's ingress, both hosts stay ready, the full host's network takes
every view the control plane sends, and no service logs a traceback or a critical line.
Once the operator frees the disk, the next heartbeat lifts it and the same deploy runs
there.  The app is destroyed at the end, so later steps find the cluster as they would have.
(A machine start that meets a full disk anyway, placed before the control plane heard, is
tested below the acceptance suite: the executor's and the QEMU driver's tests.)
"""

import pytest

from tests.acceptance.cluster import AGENTS, poll

pytestmark = pytest.mark.acceptance

EXIT_REMOTE = 1  # the CLI's exit code for an error the control plane answered (zwrm.cli.client)


def _fails(cluster, *args):
    """C{zwrm ARGS} on the client, which must exit 1 with one line: that line."""
    r = cluster.sh("client", ["zwrm", *args], env={"HOME": cluster.client_home},
                   ok=(EXIT_REMOTE,), timeout=180)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zwrm: "), r.stderr
    return lines[0]


def test_a_full_data_disk(cluster, request):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    web = cluster.state["app"]
    a2 = cluster.host_ids["a2"]
    web_before = {m["id"]: (m["host_id"], m["state"])
                  for m in cluster.zwrm_json("status", web["name"])["machines"]}
    cluster.step_app(request, "full")
    deploy = ("deploy", "full", "--image", "demo:1", "--replicas", "1", "--memory", "128",
              "--port", "8080", "--datacenter", "dc2", "--wait", "300")
    offsets = cluster.log_offsets()

    def disk_full(full):
        return lambda: cluster.zwrm_json("host", "status", a2)["disk_full"] is full

    with cluster.phase("a full data disk, then the disk freed"):
        filler = cluster.fill_data_disk("a2")
        try:
            poll(disk_full(True), 60, interval=1, what="a2's heartbeats saying its disk is full")
            # Nothing new is placed there: one line, and nothing created.
            assert _fails(cluster, *deploy) == (
                "zwrm: replica 0 of full: 0/2 hosts fit: 1 data disk full, 1 wrong datacenter")
            status = cluster.zwrm_json("status", "full")
            assert (status["machines"], status["spec"]) == ([], None), status
            # Nothing else changed: the earlier app answers everywhere, the hosts are ready.
            for body in cluster.app_everywhere("/cgi-bin/read?index.txt").values():
                assert body.encode() == web["data"]
            after = {m["id"]: (m["host_id"], m["state"])
                     for m in cluster.zwrm_json("status", web["name"])["machines"]}
            assert after == web_before
            hosts = {h["name"]: h["state"] for h in cluster.host_list()}
            assert all(hosts[a] == "ready" for a in AGENTS), hosts
        finally:
            cluster.sh("a2", ["rm", "-f", filler])

        # Room again: the next heartbeat lifts it, and the same deploy runs there.
        poll(disk_full(False), 60, interval=1, what="a2 taking placements again")
        app = cluster.zwrm_json(*deploy, timeout=360)
        assert [(m["host_id"], m["state"]) for m in app["machines"]] == [(a2, "running")], app

    cluster.zwrm("destroy", "full")
    logged = cluster.check_logs_since(offsets)
    # The control plane said why it left the host alone, and the host's network took every
    # view all the same (nft reads the rules from a pipe).
    cp_log = logged[("cp", "zwrm-control.service")]
    assert "its data disk is nearly full" in cp_log, cp_log[-4000:]
    assert "its data disk has room again" in cp_log, cp_log[-4000:]
    agent_log = logged[("a2", "zwrm-agent.service")]
    assert "network.update failed" not in agent_log, agent_log[-4000:]
