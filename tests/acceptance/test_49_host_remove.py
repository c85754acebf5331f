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
