"""
Step: hosts lose power and boot again (L{Cluster.power_cut}: every process in the host killed
at once, its bridges, TAPs, VXLAN device and nftables rules gone, as after a reboot; its disk
kept).

 - The worker that runs the earlier app's machine (pinned there by its volume), back faster
   than the control plane's 30 s to call it offline: the control plane, which still counted
   the machine running, learns from the agent that it is not, and it is started again on
   its host, from its volume.
 - The same worker off until the control plane calls it offline and the machine failed
   (not started elsewhere: its volume pins it), then booted: started again there.
 - Either way the app answers with its data through both agents' ingresses (the host's
   network rebuilt: bridge, overlay, published ports), one copy runs, the hosts are ready.
 - The control plane's host: its store is whole after a kill, the agents join again, and
   nothing about the app changed.

No service logs a traceback or a critical line meanwhile.
"""

import time

import pytest

from tests.acceptance.cluster import AGENTS, poll

pytestmark = pytest.mark.acceptance


def _qemu_count(cluster, host, machine_id):
    r = cluster.sh(host, ["pgrep", "-c", "-f", f"qemu.*{machine_id}"], ok=(0, 1))
    return int(r.stdout.strip() or 0)


def _power_cut(cluster, until_offline):
    web = cluster.state["app"]
    [machine] = cluster.zwrm_json("status", web["name"])["machines"]
    host = cluster.host_of(machine["host_id"])
    assert _qemu_count(cluster, host, machine["id"]) == 1
    offsets = cluster.log_offsets()

    cut = time.monotonic()
    units = cluster.power_cut(host)
    assert _qemu_count(cluster, host, machine["id"]) == 0
    if until_offline:
        # Off longer than the control plane waits: the host offline, the machine failed,
        # pinned to its volume (not started elsewhere).
        def offline():
            hosts = {h["name"]: h["state"] for h in cluster.host_list()}
            [m] = cluster.zwrm_json("status", web["name"])["machines"]
            return hosts[host] == "offline" and m["state"] == "failed" and m

        m = poll(offline, 90, interval=2, what=f"{host} offline, its machine failed")
        assert (m["id"], m["host_id"]) == (machine["id"], machine["host_id"]), m
    booted = time.monotonic()
    cluster.boot(host, units)

    seen = {}

    def running_again():
        for service in cluster.agents.values():
            service.check()
        [m] = cluster.zwrm_json("status", web["name"])["machines"]
        seen.update(state=m["state"], health=m["health"], qemu=_qemu_count(cluster, host, m["id"]),
                    restart=m.get("restart_reason"))
        return (m["state"] == "running" and m["health"] in ("passing", "none")
                and seen["qemu"] == 1 and m)

    again = poll(running_again, 240, interval=2,
                 what=lambda: f"the app's machine running again (last seen: {seen})")
    assert again["host_id"] == machine["host_id"], again  # pinned to its volume
    for body in cluster.app_everywhere("/cgi-bin/read?index.txt", wait=120).values():
        assert body.encode() == web["data"]
    done = time.monotonic()

    hosts = {h["name"]: h["state"] for h in cluster.host_list()}
    assert all(hosts[a] == "ready" for a in AGENTS), hosts
    [m] = cluster.zwrm_json("status", web["name"])["machines"]
    assert m["state"] == "running" and _qemu_count(cluster, host, m["id"]) == 1, m
    cluster.check_logs_since(offsets)
    return round(booted - cut, 1), round(done - booted, 1)


def test_a_host_loses_power(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    off, back = _power_cut(cluster, until_offline=False)
    cluster.timings["a worker's power cut: boot to the app's data answering everywhere"] = back


def test_a_host_off_until_offline(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    off, back = _power_cut(cluster, until_offline=True)
    cluster.timings["a worker off: power cut to offline and its machine failed"] = off
    cluster.timings["a worker off: boot to the app's data answering everywhere"] = back


def test_the_control_plane_loses_power(cluster):
    """
    The control plane's host loses power (SIGKILL, mid-whatever it was doing) and boots: its
    store is whole (SQLite's WAL), the agents join again, the app and its volume are as they
    were, and the CLI works.
    """
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    web = cluster.state["app"]
    before = cluster.zwrm_json("status", web["name"])
    offsets = cluster.log_offsets()

    with cluster.phase("a power cut of the control plane until both agents are ready"):
        cluster.boot("cp", cluster.power_cut("cp"))
        cluster.wait_ready("both agents ready after the power cut")

    after = cluster.zwrm_json("status", web["name"])
    assert [(m["id"], m["host_id"], m["state"]) for m in after["machines"]] == [
        (m["id"], m["host_id"], m["state"]) for m in before["machines"]]
    assert [v["id"] for v in after["volumes"]] == [v["id"] for v in before["volumes"]]
    for body in cluster.app_everywhere("/cgi-bin/read?index.txt").values():
        assert body.encode() == web["data"]
    assert "demo" in cluster.zwrm("images", "list")
    cluster.check_logs_since(offsets)
