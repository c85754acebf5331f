"""
Step: C{zwrm host drain --mode live} on the installed cluster (issue 18): the agents run
C{--network=bridge}, so the running VM moves with its volume and keeps its address on the
cluster network; the data is there, the moved volume verified, QEMU's pause reported, and
the app answers through the ingress of both agents; C{zwrm host activate} makes the drained
host ready again.  (With user-mode networking, a client writing while it moves, faults:
tests/integration/test_live_drain.py.)
"""

import pytest

pytestmark = pytest.mark.acceptance


def _app(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    return cluster.state["app"]


def test_the_plan_says_live(cluster):
    app = _app(cluster)
    host = app["machine"]["host_id"]
    plan = cluster.zwrm_json("host", "drain", host, "--dry-run", "--mode", "live")
    [item] = plan["plan"]
    assert (item["machine_id"], item["mode"]) == (app["machine"]["id"], "live"), plan


def test_live_drain_moves_the_running_vm(cluster):
    app = _app(cluster)
    src = app["machine"]["host_id"]
    [dst] = [h for h in cluster.host_ids.values() if h != src]
    address = app["machine"].get("address")
    with cluster.phase("live drain of a host with the app and its volume"):
        status = cluster.zwrm_json("host", "drain", src, "--mode", "live", timeout=600)
    assert status["state"] == "completed", status
    [mg] = status["migrations"]
    assert (mg["phase"], mg["mode"], mg["target"]) == ("done", "live", dst), mg
    assert isinstance(mg["downtime_ms"], int), mg
    assert all(v["ok"] for v in (mg["verified"] or {}).values()) and mg["verified"], mg
    [machine] = cluster.zwrm_json("status", app["name"])["machines"]
    assert (machine["host_id"], machine["state"]) == (dst, "running"), machine
    if address is not None:
        assert machine["address"] == address, (address, machine)  # it kept its address
    after = cluster.app_everywhere("/cgi-bin/read?index.txt")
    assert {a: b.encode() for a, b in after.items()} == {a: app["data"] for a in after}
    hosts = {h["id"]: h for h in cluster.host_list()}
    assert (hosts[src]["state"], hosts[src]["machines"]) == ("drained", 0)
    app["machine"] = machine
    app["live_drained"] = src


def test_activate_after_the_live_drain(cluster):
    app = _app(cluster)
    if "live_drained" not in app:
        pytest.fail("needs test_live_drain_moves_the_running_vm to have passed")
    assert "ready" in cluster.zwrm("host", "activate", app["live_drained"])
