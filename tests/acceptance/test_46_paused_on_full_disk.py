"""
Step: a running machine's write meets its host's full disk, and waits for room.

An app with a volume runs on a2, whose /var/lib/zwrm is a file system of its own.  Something
outside zwrm fills it; a user then writes 24 MiB to the app (from the client host, through
a2's ingress), which the guest writes to its volume:

 - QEMU pauses the machine rather than fail the guest's write; zwrm reports it running and
   paused (``zwrm status``: ``running (paused: disk-full)`` and a line saying it waits for
   room on its host's disk); its health check fails, and it is not restarted for it (a
   restart would lose the write and meet the same disk); the user's request waits;
 - the operator frees the disk: the agent resumes the machine by itself, the request is
   answered ``ok``, the file reads back as written, and the machine is no longer paused.

No service logs a traceback or a critical line meanwhile.  The app is destroyed with its
volume at the end.

Then the same on a host that is drained instead of freed (an app with a volume wherever
the scheduler puts it; both agents' data disks are file systems of their own): its disk is
filled, the write waits, and ``zwrm host drain --mode live`` moves the paused machine to
the other host with its volume (its migration's records written in the room the driver
keeps in reserve, which the agent says in its log), where it resumes: the write that
waited completes there, the guest never booted again, and nothing was restarted.  The
drained host's disk is freed and the host made ready again.
"""

import contextlib
import os
import subprocess
import tempfile
import time

import pytest

from tests.acceptance.cluster import AGENTS, poll

pytestmark = pytest.mark.acceptance

PORT = 83  # this app's published port (web has 80 and 8000, others 81 and 82)
LEAVING_PORT = 84  # the drained one's

#: What the user writes: 24 MiB of text (the file system has at most 1 MiB left).
BODY = b"".join(b"zwrm paused write, line %08d\n" % i for i in range((24 << 20) // 32))


@contextlib.contextmanager
def _full_disk_and_a_write(cluster, host, port):
    """
    C{host}'s data disk filled (as something outside zwrm would), then a user's write of
    L{BODY} to the app through C{host}'s ingress, from the client host: yields the filler's
    path and the C{curl} process; at the end the process is killed if it still runs, and the
    filler removed.
    """
    fd, body_path = tempfile.mkstemp(prefix="zwrm-acc-body-", dir="/tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(BODY)
    filler = writer = None
    try:
        filler = cluster.fill_data_disk(host)
        writer = cluster.net.spawn(
            "client", ["curl", "-fsS", "--max-time", "600", "--data-binary", f"@{body_path}",
                       "-H", "Content-Type: application/octet-stream",
                       f"http://{cluster.net.address(host)}:{port}/cgi-bin/write?big"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        yield filler, writer
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        if filler is not None:
            cluster.sh(host, ["rm", "-f", filler])
        os.unlink(body_path)


def _new_app(cluster, request, name):
    """
    Create app C{name} for this step (L{cluster.step_app}). @return: the services' log
    offsets, and a callable returning the status of its one machine.
    """
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    cluster.step_app(request, name)

    def machine():
        [m] = cluster.zwrm_json("status", name)["machines"]
        return m

    return cluster.log_offsets(), machine


def test_a_write_that_meets_a_full_disk_waits_for_room(cluster, request):
    a2 = cluster.host_ids["a2"]
    offsets, machine = _new_app(cluster, request, "held")

    with cluster.phase("an app with a volume on a2"):
        app = cluster.deploy("held", "demo:1", "--datacenter", "dc2", "--publish",
                             f"{PORT}:8080", "--volume", "data:64:/data")
        [m] = app["machines"]
        assert (m["host_id"], m["state"], m["paused"]) == (a2, "running", None), m

    with _full_disk_and_a_write(cluster, "a2", PORT) as (filler, writer):
        with cluster.phase("a2's disk full; a user's write to the volume meets it"):
            try:
                poll(lambda: machine()["paused"] == "disk-full", 180, interval=1,
                     what="the machine paused on a2's full disk")
                text = cluster.zwrm("status", "held")
                assert "running (paused: disk-full)" in text, text
                assert "waits for room on its host's disk" in text, text
                # Its health check fails while it is paused; no restart for it.
                poll(lambda: machine()["health"] == "failing", 60, interval=1,
                     what="its health check failing while it is paused")
                time.sleep(12)  # twice the checks' restart threshold (3 x 2 s)
                m = machine()
                assert (m["state"], m["paused"], m["restarts"]) == (
                    "running", "disk-full", 0), m
                assert writer.poll() is None, "the user's write ended while the disk was full"
            finally:
                cluster.sh("a2", ["rm", "-f", filler])

        with cluster.phase("room again: resumed by itself, the write completes"):
            out, err = writer.communicate(timeout=180)
            assert (writer.returncode, out.strip()) == (0, b"ok"), (writer.returncode, err)
            poll(lambda: machine()["paused"] is None, 60, interval=1, what="not paused")
            read = cluster.app_request("/cgi-bin/read?big", via="a2", port=PORT, wait=60)
            assert read.encode() == BODY, len(read)
            m = machine()
            assert (m["state"], m["restarts"]) == ("running", 0), m

    cluster.zwrm("destroy", "held", "--volumes")
    logged = cluster.check_logs_since(offsets)
    agent_log = logged[("a2", "zwrm-agent.service")]
    assert "met a full file system on this host" in agent_log, agent_log[-4000:]
    assert "its disks have room again; resuming it" in agent_log, agent_log[-4000:]


def test_a_machine_paused_on_a_full_disk_leaves_live_with_its_write(cluster, request):
    offsets, machine = _new_app(cluster, request, "leaving")
    web = cluster.state["app"]

    with cluster.phase("an app with a volume"):
        app = cluster.deploy("leaving", "demo:1", "--publish", f"{LEAVING_PORT}:8080",
                             "--volume", "data:64:/data")
        [m] = app["machines"]
        src_id = m["host_id"]
        src = cluster.host_of(src_id)
        [dst] = [a for a in AGENTS if a != src]
        boots = cluster.app_request("/cgi-bin/read?boots.log", via=src, port=LEAVING_PORT)

    try:
        with _full_disk_and_a_write(cluster, src, LEAVING_PORT) as (_, writer):
            with cluster.phase(f"{src}'s disk full; a user's write to the volume meets it"):
                poll(lambda: machine()["paused"] == "disk-full", 180, interval=1,
                     what=f"the machine paused on {src}'s full disk")
            with cluster.phase(f"live drain of {src}, its disk still full"):
                status = cluster.zwrm_json("host", "drain", src_id, "--mode", "live",
                                           timeout=600)
                assert status["state"] == "completed", status
                [mg] = [g for g in status["migrations"] if g["machine_id"] == m["id"]]
                assert (mg["phase"], mg["mode"], mg["target"]) == (
                    "done", "live", cluster.host_ids[dst]), mg
            with cluster.phase(f"resumed on {dst}: the write completes there"):
                out, err = writer.communicate(timeout=180)
                assert (writer.returncode, out.strip()) == (0, b"ok"), (writer.returncode, err)
        moved = machine()
        assert (moved["host_id"], moved["state"], moved["paused"], moved["restarts"]) == (
            cluster.host_ids[dst], "running", None, 0), moved
        read = cluster.app_request("/cgi-bin/read?big", via=dst, port=LEAVING_PORT, wait=60)
        assert read.encode() == BODY, len(read)
        # It ran on through the move (a stop and a start would have booted it again).
        assert cluster.app_request("/cgi-bin/read?boots.log", via=dst,
                                   port=LEAVING_PORT) == boots
    finally:
        # What the next steps start from: the web app where the cluster says, its host
        # ready again (however far the drain went).
        [web["machine"]] = cluster.zwrm_json("status", web["name"])["machines"]
        state = {h["id"]: h["state"] for h in cluster.host_list()}[src_id]
        if state in ("draining", "drained"):
            verb = "undrain" if state == "draining" else "activate"
            assert "ready" in cluster.zwrm("host", verb, src_id)

    cluster.zwrm("destroy", "leaving", "--volumes")
    logged = cluster.check_logs_since(offsets)
    agent_log = logged[(src, "zwrm-agent.service")]
    assert "met a full file system on this host" in agent_log, agent_log[-4000:]
    assert "its migration is recorded in the 1024 KiB kept in reserve" in agent_log, \
        agent_log[-4000:]
