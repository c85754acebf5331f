"""
Step: C{zwrm host drain --mode live|auto} on the installed cluster (issue 18). The agents
run C{--network=bridge}: a live move there would have to move the machine's address on the
cluster network, which the control plane does not do yet, so C{--mode live} is refused up
front with one readable line and nothing changes, and C{--mode auto} (the default) plans
the cold path and says why. The live path itself (user-mode networking, a control plane,
two agents, QEMU, a client writing while it moves): tests/integration/test_live_drain.py.
"""

import pytest

pytestmark = pytest.mark.acceptance


def _app(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    return cluster.state["app"]


def test_live_facts_say_bridge(cluster):
    # Each agent answers live.facts (the control plane's choice of mode rests on them):
    # the plan says the mode and the reason for every machine.
    app = _app(cluster)
    host = app["machine"]["host_id"]
    plan = cluster.zwrm_json("host", "drain", host, "--dry-run")
    [item] = plan["plan"]
    assert (item["machine_id"], item["mode"]) == (app["machine"]["id"], "cold"), plan
    assert "bridge" in item["mode_reason"], item


def test_live_mode_refused_and_nothing_changes(cluster):
    app = _app(cluster)
    host = app["machine"]["host_id"]
    before = {h["id"]: h["state"] for h in cluster.host_list()}
    with cluster.phase("zwrm host drain --mode live on bridge hosts (refused)"):
        r = cluster.sh("client", ["zwrm", "host", "drain", host, "--mode", "live"],
                       env={"HOME": cluster.client_home}, ok=range(1, 256))
    text = (r.stdout + r.stderr).strip()
    assert len(text.splitlines()) == 1, text
    assert "bridge" in text and "Traceback" not in text, text
    assert {h["id"]: h["state"] for h in cluster.host_list()} == before
    [machine] = cluster.zwrm_json("status", app["name"])["machines"]
    assert (machine["id"], machine["host_id"], machine["state"]) == (
        app["machine"]["id"], host, "running"), machine
    assert cluster.app_request("/cgi-bin/read?index.txt").encode() == app["data"]
