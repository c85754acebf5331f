"""
Step: a host retired and added again, as docs/operators.md ("Removing a host") says.

The worker that runs the earlier app's machine (with its volume):

 - `zwrm host remove` of it, ready, is refused with one line and changes nothing;
 - an app whose machine there is down (its QEMU killed, restart policy never) with a volume:
   the drain moves that machine too, at rest (its volume copied and verified, the machine
   failed on the other worker, never started), so the host holds no volume to keep it;
 - drained (the machine and its volume move to the other worker), its agent stopped (its
   executor deregistered at once, its session's end seen), and, once the control plane
   calls it offline, removed: `zwrm host list` no longer has it,
   the other worker's overlay drops it (its VXLAN forwarding entry), and the app answers
   with its data through the other worker's ingress;
 - its agent started again (the machine installed anew keeps its install's join token):
   it joins as a new host with the same id, ready, holding nothing; its overlay and
   ingress are built again and the app answers through both workers.

Step: a host cut off for good, its app's volume recovered from a replica on the other
worker (docs/operators.md, "Removing a host", "Fencing"): a snapshot of the volume
replicated there (C{zwrm volumes snapshot --replicate-to}, the file 0600 there), data
written after it through the ingress; the host's agent configured to fence
(C{fence_after = 10}, restarted: C{zwrm host status} says so), then its cable pulled: the
host and its VMs keep running, cut off, and its agent stops the app's machine itself
10 s later; the control plane calls it offline; C{zwrm host remove} refused with one line
naming C{--recover-volumes}; with it, the volume is made again on the other worker from the
replica, the replica's machine placed there, and the app answers from the client with the
data of the replica (the later write lost with the host); one copy of the machine ran at
any moment. The cable back, the removed host's agent joins again as a new host (its join
token kept) and the app answers through both workers.

No service logs a traceback or a critical line meanwhile.
"""

import glob
import os
import signal

import pytest

from tests.acceptance.cluster import AGENTS, poll

pytestmark = pytest.mark.acceptance

VXLAN = "zwvx0"  # zwrm.agent.network.host.VXLAN


def _hosts(cluster):
    return {h["id"]: h for h in cluster.host_list()}


def _peers(cluster, host):
    """The hosts' addresses C{host}'s overlay forwards to (its VXLAN device's entries)."""
    out = cluster.sh(host, ["bridge", "fdb", "show", "dev", VXLAN]).stdout
    return {w[w.index("dst") + 1] for w in (ln.split() for ln in out.splitlines()) if "dst" in w}


def _machines(cluster, app):
    return {m["id"]: m for m in cluster.zwrm_json("status", app)["machines"]}


def test_a_host_retired_and_added_again(cluster, request):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    web = cluster.state["app"]
    [machine] = cluster.zwrm_json("status", web["name"])["machines"]
    host_id = machine["host_id"]
    host = cluster.host_of(host_id)
    [other] = [a for a in AGENTS if a != host]
    address = cluster.net.address(host)
    offsets = cluster.log_offsets()
    assert address in _peers(cluster, other)

    with cluster.phase("remove a ready host: refused"):
        r = cluster.sh("client", ["zwrm", "host", "remove", host_id],
                       env={"HOME": cluster.client_home}, ok=(1,))
        assert r.stderr.strip() == (
            f"zwrm: host {host_id} is ready, not offline: only a host that is gone can be"
            " removed. Drain it (`zwrm host drain`), then stop its agent (systemctl stop"
            " zwrm-agent) and remove it once `zwrm host list` shows it offline"), r.stderr
        assert _hosts(cluster)[host_id]["state"] == "ready"

    with cluster.phase("a machine with a volume down on it (killed, restart never)"):
        # The other worker, empty, drained for the deploy (so that its one replica goes to
        # this host, beside the app's), then activated again.
        other_id = cluster.host_ids[other]
        assert _hosts(cluster)[other_id]["machines"] == 0, _hosts(cluster)[other_id]
        request.addfinalizer(lambda: cluster.zwrm("host", "activate", other_id, ok=range(256)))
        assert cluster.zwrm_json("host", "drain", other_id)["state"] == "completed"
        cluster.step_app(request, "keep")
        keep = cluster.deploy("keep", "demo:1", "--volume", "data:16:/data", "--restart",
                              "never")
        cluster.zwrm("host", "activate", other_id)
        [down] = keep["machines"]
        assert down["host_id"] == host_id, down
        [pidfile] = glob.glob(os.path.join(cluster.host_dir(host), "**", down["id"],
                                           "qemu.pid"), recursive=True)
        with open(pidfile) as f:
            os.kill(int(f.read().strip()), signal.SIGKILL)
        failed = poll(lambda: _machines(cluster, "keep")[down["id"]]["state"] == "failed"
                      and _machines(cluster, "keep")[down["id"]], 120, interval=1,
                      what="the killed machine failed")
        assert failed["restart_reason"] == "not restarted (restart policy never)", failed

    with cluster.phase("drain it, stop its agent, remove it once offline"):
        status = cluster.zwrm_json("host", "drain", host_id, "--min-healthy", "3s",
                                   "--healthy-deadline", "300s", timeout=600)
        assert status["state"] == "completed", status
        moved = {m["machine_id"]: m for m in status["migrations"]}
        assert down["id"] in moved, f"the machine that is down was not moved: {status}"
        at_rest = moved[down["id"]]
        assert (at_rest["phase"], at_rest["mode"]) == ("done", "cold"), at_rest
        assert "it stays failed" in at_rest["mode_reason"], at_rest
        [kept] = _machines(cluster, "keep").values()
        assert (kept["id"], kept["host_id"], kept["state"], kept["restarts"]) == (
            at_rest["replacement"], other_id, "failed", 0), kept  # never started
        cluster.agents[host].stop()
        # its session's end is seen at once: not called any more, though not offline yet
        stopped = poll(lambda: _hosts(cluster)[host_id]["executor"] is False
                       and _hosts(cluster)[host_id], 10, interval=0.5,
                       what=f"{host}'s executor deregistered")
        assert stopped["state"] == "drained", stopped
        poll(lambda: _hosts(cluster)[host_id]["state"] == "offline", 90, interval=2,
             what=f"{host} offline")
        assert cluster.zwrm("host", "remove", host_id) == f"host {host_id} removed\n"
        assert list(_hosts(cluster)) == [cluster.host_ids[other]]
        poll(lambda: address not in _peers(cluster, other), 30, interval=1,
             what=f"{other}'s overlay without {host}")
        [moved] = cluster.zwrm_json("status", web["name"])["machines"]
        assert (moved["host_id"], moved["state"]) == (cluster.host_ids[other], "running")
        body = cluster.app_request("/cgi-bin/read?index.txt", via=other, wait=60)
        assert body.encode() == web["data"]
        cluster.zwrm("destroy", "keep", "--volumes")

    with cluster.phase("its agent started again: a new host"):
        cluster.agents[host] = cluster.start(host, "zwrm-agent.service")
        hosts = {h["id"]: h for h in cluster.wait_ready(f"{host} joined again")}
        assert (hosts[host_id]["state"], hosts[host_id]["machines"]) == ("ready", 0)
        poll(lambda: address in _peers(cluster, other), 60, interval=1,
             what=f"{other}'s overlay with {host} again")
        for body in cluster.app_everywhere("/cgi-bin/read?index.txt", wait=60).values():
            assert body.encode() == web["data"]

    web["machine"] = moved
    cluster.check_logs_since(offsets)


SNAPSHOTS = "/var/lib/zwrm/agent/volumes/snapshots"
VOLUMES = "/var/lib/zwrm/agent/volumes"


def test_a_lost_host_s_volume_recovered_from_its_replica(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    web = cluster.state["app"]
    vid = web["volume"]
    [machine] = cluster.zwrm_json("status", web["name"])["machines"]
    host_id = machine["host_id"]
    host = cluster.host_of(host_id)
    [other] = [a for a in AGENTS if a != host]
    other_id = cluster.host_ids[other]
    offsets = cluster.log_offsets()

    with cluster.phase("a snapshot of the app's volume, replicated to the other worker"):
        out = cluster.zwrm("volumes", "snapshot", vid, "--name", "replicated",
                           "--replicate-to", other_id)
        [rep] = cluster.zwrm_json("volumes", "replicas", vid)
        assert (rep["host_id"], rep["name"], rep["state"]) == (other_id, "replicated",
                                                               "ready"), rep
        assert f"replica {rep['id']} of snapshot replicated of volume {vid} on {other_id}" \
            in out, out
        mode = cluster.sh(other, ["stat", "-c", "%a", f"{SNAPSHOTS}/{vid}/{rep['id']}.img"])
        assert mode.stdout.split() == ["600"], mode.stdout
        # a drain of its host would keep it there: the only other worker is the volume's
        plan = cluster.zwrm("host", "drain", other_id, "--dry-run")
        assert f"  replica {rep['id']}  replicated of {vid}  -> stays: no host may keep " \
            in plan, plan
    later = b"written after the replica, lost with the host\n"
    assert cluster.app_request("/cgi-bin/write?index.txt", later, via=other).strip() == "ok"

    config = os.path.join(cluster.host_dir(host, "etc"), "agent.toml")
    with open(config) as f:
        plain = f.read()
    with cluster.phase("its agent configured to fence, restarted"):
        with open(config, "a") as f:
            f.write("fence_after = 10\n")
        cluster.restart(host, "zwrm-agent.service")
        cluster.wait_ready(f"{host}'s agent registered again")
        assert "\nfence                 its agent stops its machines with volumes 10 s after" \
            in cluster.zwrm("host", "status", host_id)

    cluster.net.disconnect(host)
    try:
        with cluster.phase("the worker cut off: its agent stops the machine, then offline"):
            said = f"stopped the machines with volumes here: {machine['id']}"

            def fenced():
                # (its agent says so once the stop has ended: a moment after QEMU exits)
                return cluster.sh(host, ["pgrep", "-f", f"qemu.*{machine['id']}"],
                                  ok=(0, 1)).returncode == 1 \
                    and said in cluster.agents[host].log()

            poll(fenced, 60, interval=1,
                 what=lambda: f"the machine stopped by its fencing agent, which says so:"
                              f" {cluster.agents[host].log()[-3000:]}")

            def offline():
                hosts = {h["id"]: h["state"] for h in cluster.host_list()}
                [m] = cluster.zwrm_json("status", web["name"])["machines"]
                return hosts[host_id] == "offline" and m["state"] == "failed" and m

            poll(offline, 90, interval=2, what=f"{host} offline, its machine failed")
        r = cluster.sh("client", ["zwrm", "host", "remove", host_id],
                       env={"HOME": cluster.client_home}, ok=(1,))
        assert len(r.stderr.splitlines()) == 1 and "--recover-volumes" in r.stderr, r.stderr
        # (it names the replica a recovery takes)
        assert (f"Their newest replicas on ready hosts: {vid} snapshot replicated of "
                in r.stderr and f" on {other_id}. Bring the host back" in r.stderr), r.stderr
        # (fencing off again for the steps after this one: restarted while cut off)
        with open(config, "w") as f:
            f.write(plain)
        cluster.restart(host, "zwrm-agent.service")

        with cluster.phase("removed, its volume recovered from the replica, until the app "
                           "answers"):
            out = cluster.zwrm("host", "remove", host_id, "--recover-volumes")
            assert out.startswith(f"host {host_id} removed\n  volume {vid} recovered on "
                                  f"{other_id} from its replica of snapshot replicated (taken "
                                  ), out
            body = cluster.app_request("/cgi-bin/read?index.txt", via=other, wait=300)
        # (the stopped copy did not start again there: cut off, nothing could start it)
        assert cluster.sh(host, ["pgrep", "-f", f"qemu.*{machine['id']}"],
                          ok=(0, 1)).returncode == 1
    finally:
        cluster.net.reconnect(host)
    assert body.encode() == web["data"], body  # the replica's data: the later write is lost
    [m] = cluster.zwrm_json("status", web["name"])["machines"]
    assert (m["host_id"], m["state"]) == (other_id, "running"), m
    [v] = cluster.zwrm_json("volumes", "list", "--app", web["name"])
    assert (v["id"], v["host_id"]) == (vid, other_id), v
    assert cluster.zwrm_json("volumes", "replicas") == []
    [snap] = cluster.zwrm_json("volumes", "snapshots", vid)  # the replica, its snapshot now
    assert (snap["id"], snap["name"], snap["host_id"]) == (rep["id"], "replicated",
                                                           other_id), snap
    cluster.zwrm("volumes", "delete-snapshot", vid, "replicated")
    web["machine"] = m

    with cluster.phase("the cable back: the removed host joins again, a new host"):
        hosts = {h["id"]: h for h in cluster.wait_ready(f"{host} joined again", timeout=180)}
        assert hosts[host_id]["state"] == "ready", hosts
        for body in cluster.app_everywhere("/cgi-bin/read?index.txt", wait=60).values():
            assert body.encode() == web["data"]

    with cluster.phase("its stale copy of the volume listed, then deleted on request"):
        # (the removal deleted nothing on the host: its copy, recovered elsewhere since,
        # would refuse that volume's drain back onto it)
        def listed():
            out = cluster.zwrm("host", "status", host_id)
            return "not recorded by the cluster" in out and out

        out = poll(listed, 60, interval=2, what=f"{host}'s stale volume listed")
        assert f"\n  volume {vid}  " in out, out
        assert cluster.sh(host, ["test", "-e", f"{VOLUMES}/{vid}.img"], ok=(0, 1)).returncode == 0
        out = cluster.zwrm("host", "clean", host_id, ok=(0, 1))
        assert out.startswith(f"host {host_id}: deleted 1 volume(s) ({vid})"), out
        assert cluster.sh(host, ["test", "-e", f"{VOLUMES}/{vid}.img"],
                          ok=(0, 1)).returncode == 1, "the stale copy is still there"
        assert "not recorded by the cluster" not in cluster.zwrm("host", "status", host_id)
        [v] = cluster.zwrm_json("volumes", "list", "--app", web["name"])
        assert (v["id"], v["host_id"], v["state"]) == (vid, other_id, "ready"), v
        assert cluster.app_request("/cgi-bin/read?index.txt", via=other).encode() == web["data"]
    cluster.check_logs_since(offsets)
