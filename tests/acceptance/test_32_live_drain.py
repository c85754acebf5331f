"""
Step: C{zwrm host drain --mode live} on the installed cluster (issue 18): the agents run
C{--network=bridge}, so the running VM moves with its volume and keeps its address on the
cluster network; the data is there, the moved volume verified, QEMU's pause reported, and
the app answers through the ingress of both agents; C{zwrm host activate} makes the drained
host ready again.  While it moves, a client on its own host reads the app's data through the
ingress of both agents in turn, the source's included (new connections from the source host
to the guest now on the target), through the published tcp port (the kernel forwards it)
and the http one (the agents' proxy) at once: every request is answered with the data, the
guest never boots (its volume's boots.log has no new line), and the longest time without an
answer, printed, is within QEMU's pause and three seconds.  On a quiet machine it is, through
the proxy, under a second (QEMU's pause, a request, and 0.25 s when a connection's SYN was
lost in the switchover: the proxy tries again); through the kernel's forwarding, the client's
own SYN sent again after a second when it reached the guest's old place during the
switchover (a cold move's is the guest's boot, 7 s and more).  (With user-mode networking, a
client writing while it moves, faults: tests/integration/test_live_drain.py.)
"""

import json
import subprocess
from itertools import pairwise

import pytest

from tests.acceptance.cluster import AGENTS, PUBLISHED, PUBLISHED_HTTP
from tests.acceptance.test_21_snapshots import assert_snapshot_on

pytestmark = pytest.mark.acceptance

# Reads URL after URL (in turn) until its stdin closes; prints [[start, end, url, ok]].
PROBE = """
import json, sys, threading, time, urllib.request
want, urls = sys.argv[1].encode(), sys.argv[2:]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
out, i = [], 0
while not stop.is_set():
    url, i = urls[i % len(urls)], i + 1
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = r.read()
            ok = True if body == want else f"{r.status}: {body[:80]!r}"
    except Exception as e:
        ok = repr(e)
    out.append([t0, time.monotonic(), url, ok])
    stop.wait(0.02)
print(json.dumps(out))
"""


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
    boots = cluster.app_request("/cgi-bin/read?boots.log")  # a line per boot of the guest
    # One client loop per kind of published port, at the same time: the tcp port the kernel
    # forwards, and the http port through the agents' proxy.
    urls = {port: [f"http://{cluster.net.address(a)}:{port}/cgi-bin/read?index.txt"
                   for a in AGENTS] for port in (PUBLISHED, PUBLISHED_HTTP)}
    probes = {port: cluster.net.spawn("client", ["/usr/bin/python3", "-c", PROBE,
                                                 app["data"].decode(), *u],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
              for port, u in urls.items()}
    got = {}
    try:
        with cluster.phase("live drain of a host with the app and its volume"):
            status = cluster.zwrm_json("host", "drain", src, "--mode", "live", timeout=600)
    finally:
        for port, probe in probes.items():  # stdin closed: it stops
            got[port] = json.loads(probe.communicate("", timeout=60)[0])
    assert status["state"] == "completed", status
    # What the next steps start from, recorded before anything here can fail: the source
    # is drained (the next step activates it) and the machine is where the cluster says.
    app["live_drained"] = src
    [machine] = cluster.zwrm_json("status", app["name"])["machines"]
    app["machine"] = machine
    [mg] = status["migrations"]
    assert (mg["phase"], mg["mode"], mg["target"]) == ("done", "live", dst), mg
    assert isinstance(mg["downtime_ms"], int), mg
    assert all(v["ok"] for v in (mg["verified"] or {}).values()) and mg["verified"], mg
    assert (machine["host_id"], machine["state"]) == (dst, "running"), machine
    if address is not None:
        assert machine["address"] == address, (address, machine)  # it kept its address
    # The guest ran on through the move: no boot of it since (a cold move boots it).
    assert cluster.app_request("/cgi-bin/read?boots.log") == boots
    after = cluster.app_everywhere("/cgi-bin/read?index.txt")
    assert {a: b.encode() for a, b in after.items()} == {a: app["data"] for a in after}
    hosts = {h["id"]: h for h in cluster.host_list()}
    assert (hosts[src]["state"], hosts[src]["machines"]) == ("drained", 0)
    if "snapshot" in app:  # it moved with the volume (before the mirror); no longer needed
        assert_snapshot_on(cluster, dst)
        cluster.zwrm("volumes", "delete-snapshot", app["volume"], app["snapshot"]["name"])
        assert cluster.zwrm_json("volumes", "snapshots") == []
        del app["snapshot"]
    gaps = {}
    for port, answers in got.items():
        failed = [p for p in answers if p[3] is not True]
        assert not failed, f"port {port}: {len(failed)} of {len(answers)} requests failed: {failed[:5]}"
        assert len(answers) > 10, (port, len(answers))
        gaps[port] = max(b[1] - a[1] for a, b in pairwise(answers))
        print(f"\nlive drain through the ingress, port {port}: {len(answers)} requests answered, "
              f"longest time without an answer {gaps[port]:.2f} s, QEMU's pause "
              f"{mg['downtime_ms']} ms; slowest: "
              f"{[(round(p[1] - p[0], 2), p[2]) for p in sorted(answers, key=lambda p: p[0] - p[1])[:3]]}")
    # The longest time without an answer is a figure (printed above; docs/live-migration.md
    # has the quiet machine's: through the proxy under a second, a SYN lost in the switchover
    # tried again after 0.25 s; through the kernel's forwarding the client's own SYN sent
    # again after a second), not a target: QEMU's pause and every request stretch with the
    # machine's load (a pause of 1.1 s and 0.3 s requests seen in CI).  What is checked is
    # that the ingress followed the guest at once, not at a later refresh or a boot: within
    # QEMU's pause and three seconds.
    pause = mg["downtime_ms"] / 1000
    assert max(gaps.values()) < pause + 3.0, (gaps, pause)


def test_activate_after_the_live_drain(cluster):
    app = _app(cluster)
    if "live_drained" not in app:
        pytest.fail("needs the live drain of test_live_drain_moves_the_running_vm to have completed")
    assert "ready" in cluster.zwrm("host", "activate", app["live_drained"])


#: A volume of three pages of verification (65,536 blocks of 64 KiB each), as large as the
#: agents' 16 GiB data disks allow.
BIG_MIB = 12 * 1024


def test_a_large_volume_moves_live_and_verifies(cluster, request):
    """
    A 12 GiB volume (sparse: an ext4 file system with little in it) moves live, and its
    verification (196,608 blocks of 64 KiB, in three pages) passes; the host is made ready
    again and the app destroyed with its volume.  The drain took 4.9 s here; 126.6 s while
    QEMU's mirror sent the volume's holes as zeros at its 100 MiB/s limit
    (docs/live-migration.md, C{mirror_speed}).
    """
    app = _app(cluster)
    offsets = cluster.log_offsets()
    cluster.step_app(request, "big")
    with cluster.phase("an app with a 12 GiB volume"):
        big = cluster.deploy("big", "demo:1", "--volume", f"data:{BIG_MIB}:/data")
        [m] = big["machines"]
    src = m["host_id"]
    [dst] = [h for h in cluster.host_ids.values() if h != src]
    try:
        with cluster.phase("live drain of its host"):
            status = cluster.zwrm_json("host", "drain", src, "--mode", "live", timeout=900)
        assert status["state"] == "completed", status
        mine = [mg for mg in status["migrations"] if mg["machine_id"] == m["id"]]
        [mg] = mine
        assert (mg["phase"], mg["mode"], mg["target"]) == ("done", "live", dst), mg
        [verified] = mg["verified"].values()
        assert verified["ok"] and verified["blocks"] == BIG_MIB * 16, verified
        assert verified["hash"] == "blake3", verified  # both agents of this version
        [moved] = cluster.zwrm_json("status", "big")["machines"]
        assert (moved["host_id"], moved["state"]) == (dst, "running"), moved
    finally:
        assert "ready" in cluster.zwrm("host", "activate", src)
        # The first app moves too when it was on that host: the next steps find it there.
        [app["machine"]] = cluster.zwrm_json("status", app["name"])["machines"]
    cluster.zwrm("destroy", "big", "--volumes")
    cluster.check_logs_since(offsets)
