"""
Step: a volume snapshot undoes a mistake. The app deployed with a volume
(test_20_deploy.py) is snapshotted while it runs (a point-in-time copy through QEMU);
its data is then overwritten through the app, as a bad release or an operator's slip
would. A plain restore is refused while the replica runs (one line); with C{--restart} its
machine is stopped gracefully, the snapshot restored and the same machine started again,
and it serves the data as it was through the ingress from the client host. What the volume
held before the restore is kept as a snapshot, then deleted; the first is kept for the
drain steps (test_30_drain.py, test_32_live_drain.py), which move it with the volume. The
snapshot files on the agent are private (0600 in 0700 directories). Updates
C{cluster.state["app"]["machine"]} and sets C{cluster.state["app"]["snapshot"]}.
"""

import pytest

from tests.acceptance.cluster import poll

pytestmark = pytest.mark.acceptance

MISTAKE = b"overwritten by mistake\n"
SNAPSHOTS = "/var/lib/zwrm/agent/volumes/snapshots"


def test_a_snapshot_restores_the_data_a_mistake_overwrote(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    web = cluster.state["app"]
    vid = web["volume"]
    here = cluster.host_of(web["machine"]["host_id"])

    with cluster.phase("snapshot of the running app's volume"):
        out = cluster.zwrm("volumes", "snapshot", vid, "--name", "good")
    assert out.startswith("snapshot good (s-"), out
    assert out.endswith("taken while its machine ran\n"), out
    [snap] = cluster.zwrm_json("volumes", "snapshots", vid)
    path = f"{SNAPSHOTS}/{vid}/{snap['id']}.img"
    modes = cluster.sh(here, ["stat", "-c", "%a", path, f"{SNAPSHOTS}/{vid}", SNAPSHOTS]
                       ).stdout.split()
    assert modes == ["600", "700", "700"], modes

    assert cluster.app_request("/cgi-bin/write?index.txt", MISTAKE, via=here).strip() == "ok"
    assert cluster.app_request("/cgi-bin/read?index.txt", via=here).encode() == MISTAKE

    r = cluster.sh("client", ["zwrm", "volumes", "restore", vid, "good"],
                   env={"HOME": cluster.client_home}, ok=(1,))
    assert len(r.stderr.splitlines()) == 1 and "scale replica 0 of its app away" in r.stderr, \
        r.stderr

    with cluster.phase("restore with the machine restarted around it, until it serves"):
        out = cluster.zwrm("volumes", "restore", vid, "good", "--restart", timeout=600)
        mid = web["machine"]["id"]
        assert out.startswith(f"restored volume {vid} from snapshot good (machine {mid} "
                              "restarted in place); what it held is kept as snapshot "
                              "before-restore-"), out
        body = cluster.app_request("/cgi-bin/read?index.txt", via=here, wait=360)
    assert body.encode() == web["data"], body
    [machine] = cluster.zwrm_json("status", web["name"])["machines"]
    assert (machine["id"], machine["host_id"], machine["state"]) == (
        mid, web["machine"]["host_id"], "running"), machine
    web["machine"] = machine

    snaps = cluster.zwrm_json("volumes", "snapshots", vid)
    assert [s["name"] for s in snaps][0] == "good" and len(snaps) == 2, snaps
    assert snaps[1]["name"].startswith("before-restore-"), snaps
    cluster.zwrm("volumes", "delete-snapshot", vid, snaps[1]["name"])
    assert cluster.zwrm_json("volumes", "snapshots") == [snaps[0]]
    assert cluster.sh(here, ["ls", "-A", f"{SNAPSHOTS}/{vid}"]).stdout == f"{snap['id']}.img\n"
    web["snapshot"] = snap


def test_a_schedule_kept_and_run_by_the_control_plane(cluster):
    """
    The app's volumes snapshotted and replicated on a schedule the control plane keeps:
    the first run at once, its result listed; unscheduled, its snapshot and replica then
    deleted (the drain steps count the one snapshot above).
    """
    if "snapshot" not in cluster.state.get("app", {}):
        pytest.fail("needs the snapshot step above to have passed")
    web = cluster.state["app"]
    vid = web["volume"]
    with cluster.phase("a schedule's first run: a snapshot and its replica"):
        out = cluster.zwrm("volumes", "schedule", web["name"], "--every", "1h", "--keep", "2",
                           "--replicate")
        assert out.startswith(f"app {web['name']}: its volumes snapshotted every 1h"), out

        def ran():
            [row] = cluster.zwrm_json("volumes", "schedules")
            return row["last_at"] is not None and row

        row = poll(ran, 120, interval=1, what="the schedule's first run")
    assert row["last_error"] is None, row
    scheduled = [s for s in cluster.zwrm_json("volumes", "snapshots", vid)
                 if s["name"].startswith("scheduled-")]
    assert len(scheduled) == 1 and scheduled[0]["live"], scheduled
    [rep] = cluster.zwrm_json("volumes", "replicas", vid)
    assert (rep["name"], rep["state"]) == (scheduled[0]["name"], "ready"), rep
    assert rep["host_id"] != web["machine"]["host_id"], rep
    out = cluster.zwrm("volumes", "schedules")
    assert out.splitlines()[1].endswith("  ok"), out
    cluster.zwrm("volumes", "unschedule", web["name"])
    assert cluster.zwrm_json("volumes", "schedules") == []
    cluster.zwrm("volumes", "delete-replica", vid, rep["id"])
    cluster.zwrm("volumes", "delete-snapshot", vid, scheduled[0]["name"])
    assert [s["id"] for s in cluster.zwrm_json("volumes", "snapshots", vid)] == [
        web["snapshot"]["id"]]


def assert_snapshot_on(cluster, host_id):
    """
    The app's kept snapshot is recorded on C{host_id}, its file is there (0600) and on no
    other host; its volume's snapshot directory on the others is gone.
    """
    web = cluster.state["app"]
    vid, snap = web["volume"], web["snapshot"]
    [row] = cluster.zwrm_json("volumes", "snapshots", vid)
    assert (row["id"], row["host_id"], row["state"]) == (snap["id"], host_id, "ready"), row
    for h in cluster.host_ids.values():
        r = cluster.sh(cluster.host_of(h), ["stat", "-c", "%a", f"{SNAPSHOTS}/{vid}/{snap['id']}.img"],
                       ok=(0, 1))
        assert (r.stdout.split(), r.returncode) == ((["600"], 0) if h == host_id else ([], 1)), \
            (h, r.stdout, r.stderr)
