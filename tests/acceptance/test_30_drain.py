"""
Step: C{zwrm host drain} moves the app and its volume to the other host, with the volume's
snapshot (test_21_snapshots.py); the data is there, and the ingress follows: the published port answers from the client host on both
agents' addresses before and after the replica moved.  C{zwrm host activate} makes the
drained host ready again.
"""

import pytest

from tests.acceptance.test_21_snapshots import assert_snapshot_on

pytestmark = pytest.mark.acceptance


def _app(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    return cluster.state["app"]


def test_ingress_before_the_drain(cluster):
    app = _app(cluster)
    before = cluster.app_everywhere("/cgi-bin/read?index.txt")
    assert {a: b.encode() for a, b in before.items()} == {a: app["data"] for a in before}


def test_drain_moves_the_data(cluster):
    app = _app(cluster)
    src = app["machine"]["host_id"]
    [dst] = [h for h in cluster.host_ids.values() if h != src]
    if "snapshot" in app:
        plan = cluster.zwrm("host", "drain", src, "--dry-run")
        assert "(1 volume(s), 1 snapshot(s))" in plan, plan
    with cluster.phase("drain a host with the app, its volume and its snapshot"):
        status = cluster.zwrm_json("host", "drain", src, "--min-healthy", "3s",
                                   "--healthy-deadline", "300s", timeout=600)
    assert status["state"] == "completed", status
    if "snapshot" in app:
        assert_snapshot_on(cluster, dst)
    [machine] = cluster.zwrm_json("status", app["name"])["machines"]
    assert (machine["host_id"], machine["state"]) == (dst, "running"), machine
    after = cluster.app_everywhere("/cgi-bin/read?index.txt")
    assert {a: b.encode() for a, b in after.items()} == {a: app["data"] for a in after}
    hosts = {h["id"]: h for h in cluster.host_list()}
    assert (hosts[src]["state"], hosts[src]["machines"]) == ("drained", 0)
    app["machine"] = machine
    app["drained"] = src


def test_activate(cluster):
    app = _app(cluster)
    if "drained" not in app:
        pytest.fail("needs test_drain_moves_the_data to have passed")
    assert "ready" in cluster.zwrm("host", "activate", app["drained"])
    hosts = {h["id"]: h for h in cluster.host_list()}
    assert hosts[app["drained"]]["state"] == "ready"
