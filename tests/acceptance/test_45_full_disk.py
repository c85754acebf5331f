"""
Step: a host's data disk fills up (something outside zwrm filled a2's /var/lib/zwrm, a
filesystem of its own).  A deploy onto that host (the app asks for a2's datacenter, dc2)
ends with one line that says the disk of that host is full; nothing else changes: the
earlier app still answers through every agent's ingress, both hosts stay ready, the full
host's network takes every view the control plane sends, and no service logs a traceback
or a critical line.  Once the operator frees the disk the app's
restart policy starts the machine on the same host, with no command.  The app is destroyed
at the end, so later steps find the cluster as they would have.
"""

import os

import pytest

from tests.acceptance.cluster import AGENTS, poll

pytestmark = pytest.mark.acceptance

EXIT_REMOTE = 1  # the CLI's exit code for an error the control plane answered (zwrm.cli.client)


def _log_offsets(cluster):
    return {key: os.path.getsize(s.log_path) for key, s in cluster.services.items()}


def _logged_since(cluster, offsets):
    out = {}
    for key, service in cluster.services.items():
        with open(service.log_path, "rb") as f:
            f.seek(offsets.get(key, 0))
            out[key] = f.read().decode(errors="replace")
    return out


def test_deploy_onto_a_full_disk(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    web = cluster.state["app"]
    a2 = cluster.host_ids["a2"]
    offsets = _log_offsets(cluster)
    web_before = {m["id"]: (m["host_id"], m["state"])
                  for m in cluster.zwrm_json("status", web["name"])["machines"]}
    cluster.zwrm("apps", "create", "full")

    with cluster.phase("a deploy onto a full disk, then the disk freed"):
        filler = cluster.fill_data_disk("a2")
        try:
            r = cluster.sh("client", ["zwrm", "deploy", "full", "--image", "demo:1",
                                      "--replicas", "1", "--memory", "128", "--port", "8080",
                                      "--datacenter", "dc2", "--wait", "120"],
                           env={"HOME": cluster.client_home}, ok=(EXIT_REMOTE,), timeout=180)
            last = r.stderr.strip().splitlines()[-1]
            assert last.startswith("zwrm: machine m-"), r.stderr
            # (and, once the restart policy took it, when it tries again).  After the drain
            # steps a2 has the image, and the start meets the full disk; without them the
            # image's pull may be first, and says so.
            assert any(said in last for said in (
                f"of full failed: could not start: the disk of host {a2} is full (No space"
                " left on device)",
                "of full failed: could not start: cannot write ",  # ... to the image cache
            )), r.stderr
            assert "No space left on device" in last, r.stderr
            [machine] = cluster.zwrm_json("status", "full")["machines"]
            assert (machine["host_id"], machine["state"]) == (a2, "failed"), machine

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

        # The restart policy tries again (5 s, then 10, 20, ...): it starts on the same host.
        def running():
            [m] = cluster.zwrm_json("status", "full")["machines"]
            return m if m["state"] == "running" else None

        machine_after = poll(running, 150, interval=2, what="the machine started once the disk"
                                                             " had room")
        assert (machine_after["id"], machine_after["host_id"]) == (machine["id"], a2)
        assert machine_after["restarts"] >= 1, machine_after

    cluster.zwrm("destroy", "full")
    logged = _logged_since(cluster, offsets)
    for (host, unit), text in logged.items():
        assert "Traceback" not in text, f"{host} {unit}:\n{text[-4000:]}"
        assert "#critical]" not in text, f"{host} {unit}:\n{text[-4000:]}"
    # The agent said what happened, in one line, where its operator looks.
    agent_log = logged[("a2", "zwrm-agent.service")]
    assert "No space left on device" in agent_log, agent_log[-4000:]
    # Its network took every view all the same (nft reads the rules from a pipe).
    assert "network.update failed" not in agent_log, agent_log[-4000:]
