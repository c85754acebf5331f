"""
Step: the control plane restarts (SIGTERM, started again from its unit); nothing is lost:
the hosts come back ready, the app's machine and volume are where they were, the data is
there, and the CLI works as before. Then a scale-down interrupted in its shutdown_delay by
the control plane's stop, then by its kill: its machine is back in the routes each time; and
a destroy interrupted by its kill: the next control plane carries it out.
"""

import subprocess

import pytest

from tests.acceptance.cluster import AGENTS, SYSTEM_PATH, poll

pytestmark = pytest.mark.acceptance


def test_control_plane_restart_loses_nothing(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    app = cluster.state["app"]
    before = cluster.zwrm_json("status", app["name"])
    hosts_before = {h["id"]: h["state"] for h in cluster.host_list()}

    with cluster.phase("control-plane restart until both agents are ready"):
        cluster.restart("cp", "zwrm-control.service")
        hosts = cluster.wait_ready("both agents ready after the restart")

    assert {h["id"]: h["state"] for h in hosts} == hosts_before
    # Each agent came back holding the cluster's hosts list: the restarted control plane
    # told it the list is current (zwrm_network_view_resumed) and sent no whole list.
    metrics = cluster.views_resumed(len(AGENTS), "both agents' network views resumed")
    assert metrics["zwrm_network_view_full_lists_total"] == 0, metrics
    after = cluster.zwrm_json("status", app["name"])
    assert [(m["id"], m["host_id"], m["state"]) for m in after["machines"]] == [
        (m["id"], m["host_id"], m["state"]) for m in before["machines"]]
    assert [v["id"] for v in after["volumes"]] == [v["id"] for v in before["volumes"]]
    [machine] = after["machines"]
    for body in cluster.app_everywhere("/cgi-bin/read?index.txt").values():
        assert body.encode() == app["data"]
    assert "demo" in cluster.zwrm("images", "list")


def _machines(cluster, name):
    return cluster.zwrm_json("status", name)["machines"]


def _stopping(cluster, name):
    """The id of C{name}'s machine out of the routes, stopping, while the other runs."""
    machines = _machines(cluster, name)
    stopping = [m["id"] for m in machines if m["state"] == "stopping"]
    running = [m for m in machines if m["state"] == "running"]
    return stopping[0] if len(stopping) == 1 and len(running) == 1 else None


def _reasons(cluster, machine_id):
    events = cluster.zwrm_json("machines", "status", machine_id)["events"]
    return [(e.get("payload") or {}).get("reason") or "" for e in events]


def _cut_short(cluster, args, how, under_way, what):
    """
    C{zwrm ARGS} on the client, and the control plane's stop (C{how}: C{"stop"}, SIGTERM
    through its unit) or kill (C{"kill"}, SIGKILL) once C{under_way()} is true; the command
    ends with one line and an exit code that is not 0.

    @return: what C{under_way} returned, and the command's line.
    """
    command = cluster.net.spawn(
        "client", ["zwrm", *args],
        env={"PATH": SYSTEM_PATH, "HOME": cluster.client_home, "LANG": "C.UTF-8"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = poll(under_way, 60, what=what)
        if how == "stop":
            cluster.restart("cp", "zwrm-control.service")
        else:
            cluster.control.process.kill()
            cluster.control.process.wait(timeout=30)
            cluster.boot("cp", ["zwrm-control.service"])
        _, err = command.communicate(timeout=60)
    finally:
        if command.poll() is None:
            command.kill()
    assert command.returncode != 0 and len(err.splitlines()) == 1, err
    return seen, err


def test_a_scale_down_cut_short_puts_its_machine_back(cluster, request):
    """
    A scale-down in its shutdown_delay (its machine out of the routes, stopping) when the
    control plane stops (SIGTERM, as systemctl restart does) or is killed (SIGKILL, as the
    OOM killer or a crash): the machine is back in the routes, running, and the app as it
    was. Before, it stayed stopping (out of the routes, holding its capacity) for good.
    Then its destroy, killed in its delay: the next control plane carries it out (before,
    the app was back, running, as if never destroyed), its machines kept out of the routes
    meanwhile (before, they were put back, then waited the whole delay again).
    """
    cluster.step_app(request, "scaler")
    with cluster.phase("deploy an app of two replicas with a 30 s shutdown_delay"):
        app = cluster.deploy("scaler", "demo:1", "--shutdown-delay", "30", replicas=2)
    assert [m["state"] for m in app["machines"]] == ["running"] * 2, app["machines"]
    said = {"stop": "stop cancelled; back in the routes",
            "kill": "its planned stop was cut short by the control plane's stop: back in the"
                    " routes"}
    for how in ("stop", "kill"):
        with cluster.phase(f"scale it down to 1, the control plane's {how} in its delay"):
            stopping, _ = _cut_short(cluster, ["scale", "scaler", "1"], how,
                                  lambda: _stopping(cluster, "scaler"),
                                  "one machine out of the routes, stopping")
            cluster.wait_ready(f"both agents ready after the control plane's {how}")
            poll(lambda: [m["state"] for m in _machines(cluster, "scaler")] == ["running"] * 2,
                 120, what=lambda: f"both machines running: {_machines(cluster, 'scaler')}")
        assert said[how] in _reasons(cluster, stopping), _reasons(cluster, stopping)
        status = cluster.zwrm_json("status", "scaler")
        assert status["spec"]["replicas"] == 2, status["spec"]
    with cluster.phase("destroy it, the control plane killed in its delay: the next one"
                       " carries the destroy out"):
        _, line = _cut_short(
            cluster, ["destroy", "scaler"], "kill",
            lambda: [m["state"] for m in _machines(cluster, "scaler")] == ["stopping"] * 2,
            lambda: f"both machines stopping: {_machines(cluster, 'scaler')}")
        assert line.endswith("; a destroy that reached it goes on (`zwrm status scaler`"
                             " shows it)\n"), line
        cluster.wait_ready("both agents ready after the control plane's kill")
        # out of the routes still (or gone already): not put back
        machines = _machines(cluster, "scaler")
        assert [m["state"] for m in machines] in ([], ["stopping"], ["stopping"] * 2), machines
        # stored before its first stop: the next control plane knows it is under way, and
        # will not let it be scaled (one line, exit 1) nor bring its machines back for good
        assert cluster.zwrm_json("status", "scaler")["destroying"]["volumes"] is False
        refused = cluster.sh("client", ["zwrm", "scale", "scaler", "3"],
                             env={"HOME": cluster.client_home}, ok=(1,))
        assert refused.stderr == ("zwrm: app 'scaler' is being destroyed: once it is gone,"
                                  " create it again\n"), refused.stderr
        poll(lambda: "scaler" not in {a["name"] for a in cluster.zwrm_json("apps", "list")},
             150, what=lambda: f"the app gone: {cluster.zwrm('status', 'scaler', ok=range(256))}")
    assert not [m for m in cluster.zwrm_json("machines", "list") if m["app"] == "scaler"]
