"""
Step: a host vanishes from the network (its cable pulled: L{TestNetwork.disconnect}; the
host and its VMs keep running, cut off) and comes back.

A stateless app (one replica, a published port of its own) runs on some agent, with the
earlier app (its host drained onto it first if need be); that agent is cut off.  The control
plane marks it offline, the replica is started on the other agent, and the app's users reach
it from the client through the other agent's ingress.  The earlier app's machine waits for
its host (its volume pins it) and says so.  The cable back: the host is ready again, the
stale copy of the stateless replica on it is stopped (one copy runs), the earlier app's
machine, found still running, is running again with its health passing and its capacity
counted on its host, and it answers with its data from every agent.
"""

import pytest

from tests.acceptance.cluster import AGENTS, poll

pytestmark = pytest.mark.acceptance

PORT = 81  # the stateless app's published port (web has 80 and 8000)


def _status(cluster, name):
    return cluster.zwrm_json("status", name)


def _qemu_running(cluster, host, machine_id):
    return cluster.sh(host, ["pgrep", "-f", f"qemu.*{machine_id}"], ok=(0, 1)).returncode == 0


def test_a_host_vanishes_and_returns(cluster, request):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    web = cluster.state["app"]
    cluster.step_app(request, "stateless")
    with cluster.phase("deploy a stateless app"):
        app = cluster.deploy("stateless", "demo:1", "--publish", f"{PORT}:8080")
    [first] = app["machines"]
    lost = cluster.host_of(first["host_id"])
    [other] = [a for a in AGENTS if a != lost]
    assert cluster.app_request("/", via=other, port=PORT)
    [web_machine] = _status(cluster, web["name"])["machines"]
    if web_machine["host_id"] != first["host_id"]:
        # The earlier app onto the same host (a drain of its own: spread put the stateless
        # replica on the other), so that the lost host holds both apps.
        with cluster.phase("drain the earlier app onto the stateless replica's host"):
            src = web_machine["host_id"]
            status = cluster.zwrm_json("host", "drain", src, "--min-healthy", "3s",
                                       "--healthy-deadline", "300s", timeout=600)
            assert status["state"] == "completed", status
            assert "ready" in cluster.zwrm("host", "activate", src)
        [web_machine] = _status(cluster, web["name"])["machines"]
        web["machine"] = web_machine
    assert web_machine["host_id"] == first["host_id"], web_machine
    [held] = [h for h in cluster.host_list() if h["id"] == first["host_id"]]

    with cluster.phase("a host cut off until its replica runs on the other"):
        cluster.net.disconnect(lost)
        try:
            def offline():
                hosts = {h["name"]: h["state"] for h in cluster.host_list()}
                return hosts[lost] == "offline" and hosts[other] == "ready"

            poll(offline, 90, interval=2, what=f"{lost} offline")

            def moved():
                ms = _status(cluster, "stateless")["machines"]
                return (len(ms) == 1 and ms[0]["host_id"] == cluster.host_ids[other]
                        and ms[0]["state"] == "running" and ms[0]["health"] == "passing"
                        and ms[0])

            replacement = poll(moved, 180, interval=2, what="the replica on the other host")
            assert replacement["id"] != first["id"]
            # The app's users reach it, from another machine, through the host that is left.
            assert cluster.app_request("/", via=other, port=PORT, wait=60)
            [w] = _status(cluster, web["name"])["machines"]
            # pinned to its volume: it waits for its host, and is not started twice
            assert (w["id"], w["host_id"], w["state"]) == (
                web_machine["id"], web_machine["host_id"], "failed"), w
            assert f"waiting for host {w['host_id']}" in (w.get("restart_reason") or ""), w
            # cut off, the lost host still runs the old copy (nothing could tell it)
            assert _qemu_running(cluster, lost, first["id"])
        finally:
            cluster.net.reconnect(lost)

    with cluster.phase("the host back until one copy runs"):
        def back():
            hosts = {h["name"]: h["state"] for h in cluster.host_list()}
            return all(hosts[a] == "ready" for a in AGENTS)

        poll(back, 120, interval=2, what=f"{lost} ready again")
        poll(lambda: not _qemu_running(cluster, lost, first["id"]), 120, interval=2,
             what="the stale copy stopped on the host that came back")
        ms = _status(cluster, "stateless")["machines"]
        assert [(m["id"], m["state"]) for m in ms] == [(replacement["id"], "running")], ms

        def web_running():
            [w] = _status(cluster, web["name"])["machines"]
            return w["state"] == "running" and w["health"] == "passing" and w

        # (Found running on its host back, it has the health its agent reports: it was
        # "none" for good before, its check never changing.)
        w = poll(web_running, 120, interval=2, what="the earlier app running again")
        assert (w["id"], w["host_id"]) == (web_machine["id"], web_machine["host_id"])
        # Its capacity on the host is taken again (given back when it failed; it was left
        # free before): the host holds what it held before the cut, less the stateless
        # replica (1 vCPU, 128 MiB), whose stale copy is gone.
        def allocation():
            [h] = [h for h in cluster.host_list() if h["id"] == w["host_id"]]
            return h["alloc_vcpus"], h["alloc_memory_mb"]

        assert allocation() == (held["alloc_vcpus"] - 1, held["alloc_memory_mb"] - 128), (
            allocation(), held)
        for body in cluster.app_everywhere("/cgi-bin/read?index.txt", wait=60).values():
            assert body.encode() == web["data"]

    cluster.zwrm("destroy", "stateless")
