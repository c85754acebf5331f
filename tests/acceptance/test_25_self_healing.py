"""
Step: apps that stay up.  A redeploy with an image tag that is not in the registry exits 1
and leaves the serving machine as it was; a C{kill -9} of the machine's QEMU is restarted on
its host (same machine, same volume, the data still there), and the ingress of both agents
follows it.  Updates C{cluster.state["app"]["machine"]}.

Then a new app whose guest's kernel panics at its first boot (the test image's
C{zwrm.selftest=panic-once}, as a guest did under TCG on a loaded host): C{zwrm deploy
--wait} says the failure in one line with the kernel's own words, waits through the
restart, and ends healthy; the agent's log has the console's last lines.
"""

import glob
import json
import os
import re
import signal

import pytest

from tests.acceptance.cluster import poll

pytestmark = pytest.mark.acceptance


def _what_is_known(cluster, machine_id, offsets):
    """
    For a step that timed out: what C{zwrm machines status} says of machine C{machine_id},
    and the lines naming it that the services logged since C{offsets} (the last 40, in
    time order).
    """
    logged = sorted(f"{line} [{key[0]}]"
                    for key, text in cluster.check_logs_since(offsets, bad=()).items()
                    for line in text.splitlines() if machine_id in line)
    return ("what zwrm says of it:\n"
            + cluster.zwrm("machines", "status", machine_id, ok=range(256))
            + "\nwhat the services logged of it:\n" + "\n".join(logged[-40:]))


def test_bad_redeploy_changes_nothing(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    app = cluster.state["app"]
    before = cluster.zwrm_json("status", app["name"])
    out = cluster.sh("client", ["zwrm", "deploy", app["name"], "--image", "demo:no-such-tag"],
                     env={"HOME": cluster.client_home}, ok=(1,))
    assert "not in the registry" in out.stderr
    after = cluster.zwrm_json("status", app["name"])
    assert after["spec_version"] == before["spec_version"]
    assert [(m["id"], m["state"]) for m in after["machines"]] == [
        (m["id"], "running") for m in before["machines"]]
    here = cluster.host_of(after["machines"][0]["host_id"])
    assert app["data"].decode() in cluster.app_request("/", via=here)


def test_killed_qemu_is_restarted_on_its_host(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    app = cluster.state["app"]
    [machine] = cluster.zwrm_json("status", app["name"])["machines"]
    before = machine.get("restarts") or 0  # (test_22's guest that panics once: 1)
    host = cluster.host_of(machine["host_id"])
    [pidfile] = glob.glob(os.path.join(cluster.host_dir(host), "**", machine["id"], "qemu.pid"),
                          recursive=True)
    offsets = cluster.log_offsets()
    with open(pidfile) as f:
        os.kill(int(f.read().strip()), signal.SIGKILL)

    with cluster.phase("kill -9 of QEMU until restarted and healthy"):
        def healthy_again():
            [m] = cluster.zwrm_json("status", app["name"])["machines"]
            return m["restarts"] > before and m["state"] == "running" \
                and m["health"] == "passing" and m

        m = poll(healthy_again, 300, interval=1.0, what=lambda: (
            "the machine restarted and healthy; "
            + _what_is_known(cluster, machine["id"], offsets)))
    assert (m["id"], m["host_id"]) == (machine["id"], machine["host_id"])
    assert "RESTARTS" in cluster.zwrm("status", app["name"])
    # What an operator reads next: the machine's own status, and the events of the last
    # minutes, both with QEMU's end in its words.
    status = cluster.zwrm("machines", "status", m["id"])
    assert re.search(rf"^restarts    {before + 1}$", status, re.M), status
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d +state +failed \(QEMU was killed by "
                     r"signal 9\)", status, re.M), status
    recent = cluster.zwrm("events", "--since", "10m", "--topic", "machine")
    assert re.search(rf"{m['id']}  failed \(was running\) .*reason: QEMU was killed by signal 9",
                     recent), recent
    app["machine"] = m
    assert app["data"].decode() in cluster.app_request("/", via=host)
    app["restarted"] = True


def test_ingress_follows_the_restart(cluster):
    app = cluster.state.get("app", {})
    if not app.get("restarted"):
        pytest.fail("needs test_killed_qemu_is_restarted_on_its_host to have passed")
    for body in cluster.app_everywhere("/").values():
        assert app["data"].decode() in body


def test_frozen_qemu_is_restarted(cluster):
    """
    The machine's QEMU hangs (SIGSTOP: neither the guest nor QMP answers; nothing exits):
    its health check fails until the liveness threshold, the agent stops it (QMP does not
    answer, so a hard kill) and it is started again on its host with its data.
    """
    app = cluster.state.get("app", {})
    if not app.get("restarted"):
        pytest.fail("needs test_killed_qemu_is_restarted_on_its_host to have passed")
    [machine] = cluster.zwrm_json("status", app["name"])["machines"]
    host = cluster.host_of(machine["host_id"])
    [pidfile] = glob.glob(os.path.join(cluster.host_dir(host), "**", machine["id"], "qemu.pid"),
                          recursive=True)
    with open(pidfile) as f:
        frozen = int(f.read().strip())
    offsets = cluster.log_offsets()
    os.kill(frozen, signal.SIGSTOP)
    try:
        with cluster.phase("a frozen QEMU until restarted and healthy"):
            def healthy_again():
                [m] = cluster.zwrm_json("status", app["name"])["machines"]
                return (m["restarts"] > machine["restarts"] and m["state"] == "running"
                        and m["health"] == "passing" and m)

            m = poll(healthy_again, 300, interval=2, what=lambda: (
                "the frozen machine restarted; "
                + _what_is_known(cluster, machine["id"], offsets)))
    finally:
        try:
            os.kill(frozen, signal.SIGCONT)  # (if it is still there: the step failed)
        except ProcessLookupError:
            pass
    assert (m["id"], m["host_id"]) == (machine["id"], machine["host_id"])
    assert not os.path.exists(f"/proc/{frozen}"), "the frozen QEMU is still there"
    for body in cluster.app_everywhere("/cgi-bin/read?index.txt", wait=60).values():
        assert body.encode() == app["data"]
    cluster.check_logs_since(offsets)


def test_a_deploy_waits_through_a_guest_that_panics_once(cluster, request):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    img = cluster.image
    cluster.zwrm("images", "push", "demo:panic-once", "--kernel", img.kernel, "--initrd",
                 img.initrd, "--cmdline", f"{img.cmdline} zwrm.selftest=panic-once", "--port",
                 "8080", "-q", timeout=300)
    cluster.step_app(request, "panics")
    offsets = cluster.log_offsets()
    with cluster.phase("deploy --wait of a guest that panics at its first boot"):
        r = cluster.sh("client", [
            "zwrm", "deploy", "panics", "--image", "demo:panic-once", "--memory", "128",
            "--port", "8080", "--health-http", "/", "--health-grace", "240", "--volume",
            "data:16:/data", "--wait", "300", "--json"], env={"HOME": cluster.client_home},
            timeout=360)
    [m] = json.loads(r.stdout)["machines"]
    assert (m["state"], m["health"], m["restarts"]) == ("running", "passing", 1), m
    assert re.fullmatch(
        rf"machine {m['id']} of panics failed: the guest ended itself \(guest-reset\): Kernel "
        r"panic - not syncing: sysrq triggered crash; restart 1 at \d\d:\d\d:\d\d UTC\n",
        r.stderr), r.stderr
    # Its console (both boots) has the first boot's last words.
    assert "zwrm: selftest: panicking once" in cluster.zwrm("logs", m["id"])
    cluster.zwrm("destroy", "panics", "--volumes")
    logged = cluster.check_logs_since(offsets)
    agent_log = logged[(cluster.host_of(m["host_id"]), "zwrm-agent.service")]
    assert (f"machine {m['id']}: the guest ended itself (guest-reset): Kernel panic - not "
            "syncing: sysrq triggered crash; the last lines of its console:") in agent_log, \
        agent_log[-4000:]
