"""
Step: a new version of the app, rolled out while its users use it.

Two more versions of the test image, each with files added to its initramfs: C{demo:1-slow}
(C{/cgi-bin/slow}: an answer that takes 3 s) and C{demo:2} (the same and
C{/www/version.txt}, which the guest's web server serves).

 - A stateless app with two replicas of C{demo:1-slow} (a published port of its own) is
   redeployed with C{demo:2} while users on the client host send it requests through an
   agent's ingress: one every 0.1 s, and two users one 3 s request after the other.  The
   control plane restarts in the middle of the update (its first new machine running
   beside the old ones): the deploy command ends with one line saying so, and the control
   plane takes the update up again at its start.  Every request answered (those in flight
   on a replica being replaced too: connection draining), both replicas replaced (new
   machine ids) and serving version 2.  Then a redeploy with a wrong health path is
   superseded by its fix (deployed while the bad update waits for its first machine): the
   bad deploy exits 1 saying so, and the fix rolls out at once.  Then the app as a file
   (C{zwrm apps spec}, C{zwrm deploy --file}): applied again it is no new version and
   replaces nothing; a typo in it (exit 2), a typo inside its [health] table and a bad
   value (exit 1) are one line each and change nothing; an edit is the next version.  Its first image, untagged, is collected
   (C{zwrm images gc}): its manifest and the blobs no other image uses go, the rest stays.
 - The earlier app (one replica, pinned to its volume) is redeployed with
   C{demo:2-panic-once} (C{demo:2} whose guest panics at its first boot): its replacement
   runs on the same host with the same volume, the update having waited through the restart
   its policy gave it, the data is there, and it serves version 2 through both ingresses;
   at most one copy ran at any moment (the old one stopped before the new one started: it
   has the volume).  Updates
   C{cluster.state["app"]["machine"]}.
"""

import collections
import gzip
import json
import os
import re
import subprocess

import pytest

from tests.acceptance.cluster import AGENTS, PUBLISHED, SYSTEM_PATH, poll
from zwrm.testing import image

pytestmark = pytest.mark.acceptance

PORT = 82  # the stateless app's published port


SLOW = b"""#!/bin/sh
sleep 3
echo "Content-Type: text/plain"
echo ""
echo slow
"""


def _push(cluster, tag, files, cmdline=""):
    """
    Push the test image with C{files} ({path: (data, mode)}) added to its initramfs (and
    C{cmdline} to its kernel command line).
    """
    img = cluster.image
    out = os.path.join(cluster.run_dir, f"initrd-{tag.replace(':', '-')}.gz")
    cp = image._Cpio()
    for path, (data, mode) in files.items():
        cp.file(path, data, mode)
    with open(img.initrd, "rb") as f:
        data = f.read()
    with open(out, "wb") as f:
        f.write(data + gzip.compress(cp.finish(), compresslevel=1))
    cluster.zwrm("images", "push", tag, "--kernel", img.kernel, "--initrd", out,
                 "--cmdline", f"{img.cmdline} {cmdline}".strip(), "--port", "8080", "-q",
                 timeout=300)


def _users(cluster, via, port):
    """
    The app's users on the client host: one sends a request every 0.1 s, two more each a
    request that takes 3 s (C{/cgi-bin/slow}), one after the other, through C{via}'s
    ingress.  Each prints the HTTP code of every answer (000: none).
    """
    base = f"http://{cluster.net.address(via)}:{port}"
    loops = [f"while :; do curl -s -o /dev/null --max-time 5 -w '%{{http_code}}\\n' {base}/;"
             " sleep 0.1; done"]
    loops += [f"while :; do curl -s -o /dev/null --max-time 10 -w '%{{http_code}}\\n'"
              f" {base}/cgi-bin/slow; done"] * 2
    return [cluster.net.spawn("client", ["sh", "-c", loop], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for loop in loops]


def _answers(users):
    out = []
    for user in users:
        user.terminate()
        out.append(user.communicate(timeout=30)[0].split())
    return out


def _versions(cluster, port, tries=8):
    """The set of C{/version.txt} answers (C{"404"} for version 1) through every ingress."""
    seen = set()
    for via in AGENTS:
        for _ in range(tries):  # the ingress balances over the replicas
            r = cluster.sh("client", ["curl", "-sS", "--max-time", "10", "-o", "/dev/stdout",
                                      "-w", " %{http_code}",
                                      f"http://{cluster.net.address(via)}:{port}/version.txt"],
                           ok=range(256))
            body, _, code = r.stdout.rpartition(" ")
            seen.add(body.strip() if code == "200" else code)
    return seen


def _beside(cluster, before):
    """The id of a new machine of C{roll} running beside both old ones, else None."""
    machines = cluster.zwrm_json("status", "roll")["machines"]
    new = [m["id"] for m in machines if m["id"] not in before and m["state"] == "running"]
    old = [m for m in machines if m["id"] in before and m["state"] == "running"]
    return new[0] if len(new) == 1 and len(old) == 2 else None


def _rolled_out(cluster, before):
    """
    C{roll}'s status once its last rollout event says C{completed}, after one that says
    it was taken up again after the control plane's restart; else None.
    """
    lines = cluster.zwrm("events", "--topic", "app", "--limit", "200", "--json", ok=(0, 3, 8))
    rollouts = [e["payload"] for e in map(json.loads, lines.splitlines())
                if e["kind"] == "rollout" and e["payload"]["app"] == "roll"]
    states = [(p["state"], "taken up again after a control plane stop" in p["reason"])
              for p in rollouts]
    if not states or states[-1][0] != "completed" or ("started", True) not in states:
        return None
    return cluster.zwrm_json("status", "roll")


def test_rolling_deploy_of_a_stateless_app(cluster, request):
    _push(cluster, "demo:1-slow", {"www/cgi-bin/slow": (SLOW, 0o755)})
    _push(cluster, "demo:2", {"www/cgi-bin/slow": (SLOW, 0o755),
                              "www/version.txt": (b"2\n", 0o644)})
    cluster.step_app(request, "roll")
    with cluster.phase("deploy a stateless app with two replicas"):
        app = cluster.deploy("roll", "demo:1-slow", "--publish", f"{PORT}:8080", replicas=2)
    before = {m["id"] for m in app["machines"]}
    assert len(before) == 2
    assert _versions(cluster, PORT) == {"404"}

    users = _users(cluster, "a1", PORT)
    try:
        with cluster.phase("a rolling deploy of two replicas under requests, the control "
                           "plane restarted in its middle"):
            deploy = cluster.net.spawn(
                "client", ["zwrm", "deploy", "roll", "--image", "demo:2"],
                env={"PATH": SYSTEM_PATH, "HOME": cluster.client_home, "LANG": "C.UTF-8"},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                halfway = poll(lambda: _beside(cluster, before), 300,
                               what="the update's first new machine running beside the old")
                # it waits for that machine to stay healthy (10 s) when the control plane
                # stops (an upgrade, a crash): at its start it takes the update up again
                cluster.restart("cp", "zwrm-control.service")
                _, err = deploy.communicate(timeout=60)
            finally:
                if deploy.poll() is None:
                    deploy.kill()
            assert deploy.returncode != 0, err
            assert len(err.splitlines()) == 1 and (
                "was interrupted: the control plane is stopping" in err
                or "lost the connection" in err), err
            app = poll(lambda: _rolled_out(cluster, before), 300,
                       what="the update taken up again and completed")
        # waited for again, not made again (its old one retired once it stayed healthy)
        assert halfway in {m["id"] for m in app["machines"]}, (halfway, app["machines"])
        # (the users go on meanwhile: requests after the deploy returned count too)
        versions = _versions(cluster, PORT)
    finally:
        quick, *slow = _answers(users)
    after = {m["id"] for m in app["machines"]}
    assert len(after) == 2 and not after & before, app["machines"]
    assert all(m["state"] == "running" for m in app["machines"]), app["machines"]
    slow = [c for codes in slow for c in codes]
    assert len(quick) > 20 and len(slow) > 10, (quick, slow)
    for what, codes in (("quick", quick), ("3 s", slow)):
        failed = [c for c in codes if c != "200"]
        # A replaced replica leaves the routes 5 s (shutdown_delay) before it stops, so
        # the requests it is answering finish.
        assert not failed, (f"{len(failed)} of {len(codes)} {what} requests failed during the"
                            f" rollout (HTTP codes, 000: no answer):"
                            f" {dict(collections.Counter(failed))}")
    assert versions == {"2"}

    with cluster.phase("a redeploy with a wrong health path, superseded by its fix"):
        before = {m["id"] for m in app["machines"]}
        version = cluster.zwrm_json("status", "roll")["spec_version"]
        bad = cluster.net.spawn(
            "client", ["zwrm", "deploy", "roll", "--image", "demo:2", "--health-http", "/nope"],
            env={"PATH": SYSTEM_PATH, "HOME": cluster.client_home, "LANG": "C.UTF-8"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            poll(lambda: _beside(cluster, before), 120,
                 what="the bad update's first new machine running beside the old")
            # the bad update would wait out its healthy_deadline (5 min) and revert: the
            # fix stops it instead of queueing behind it
            app = cluster.zwrm_json("deploy", "roll", "--image", "demo:2", "--health-http", "/",
                                    "--max-parallel", "2", "--min-healthy-time", "1",
                                    "--wait", "120", timeout=180)
            _, err = bad.communicate(timeout=60)
        finally:
            if bad.poll() is None:
                bad.kill()
    assert bad.returncode == 1, err
    assert err.splitlines()[-1].startswith(
        f"zwrm: the update of roll to version {version + 1} was superseded by a later "
        "deploy"), err
    assert app["spec_version"] == version + 2, app
    assert app["spec"]["health"]["path"] == "/", app["spec"]
    assert [m["state"] for m in app["machines"]] == ["running"] * 2, app["machines"]
    assert not {m["id"] for m in app["machines"]} & before, app["machines"]
    assert _versions(cluster, PORT, tries=2) == {"2"}
    status = cluster.zwrm("status", "roll")
    assert re.search(rf"^version   {version + 2}\nupdate    completed \(\d{{4}}-\d\d-\d\d "
                     rf"\d\d:\d\d:\d\d UTC\): version {version + 2} rolled out: 2 machine\(s\) "
                     r"replaced$", status, re.M), status

    with cluster.phase("the app as a file: read back, applied again, a typo, an edit"):
        version = app["spec_version"]
        machines = {m["id"] for m in app["machines"]}
        text = cluster.zwrm("apps", "spec", "roll")
        path = os.path.join(cluster.client_home, "roll.toml")
        with open(path, "w") as f:
            f.write(text)
        again = cluster.zwrm_json("deploy", "roll", "--file", path)
        assert (again["spec_version"], {m["id"] for m in again["machines"]}) == \
            (version, machines), again  # the same spec: no new version, nothing replaced
        typo = cluster.sh("client", ["zwrm", "deploy", "roll", "-f", "-"],
                          env={"HOME": cluster.client_home}, ok=(2,),
                          input=text.replace("memory_mb =", "memroy_mb ="))
        assert typo.stderr.startswith("zwrm: stdin: unknown field(s) memroy_mb (a spec's "
                                      "fields are "), typo.stderr
        assert len(typo.stderr.splitlines()) == 1, typo.stderr
        bad = cluster.sh("client", ["zwrm", "deploy", "roll", "-f", "-"],
                         env={"HOME": cluster.client_home}, ok=(1,),
                         input=re.sub(r"(?m)^memory_mb = .*$", "memory_mb = 10", text))
        assert bad.stderr == "zwrm: memory_mb must be a whole number from 32 to 1048576, " \
            "not 10\n", bad.stderr
        # a typo inside a table: the control plane's (it dropped the field, its default taken)
        head, table, rest = text.partition("[health]\n")
        nested = cluster.sh("client", ["zwrm", "deploy", "roll", "-f", "-"],
                            env={"HOME": cluster.client_home}, ok=(1,),
                            input=head + table + rest.replace("interval = ", "intervall = ", 1))
        assert nested.stderr == "zwrm: unknown health field(s): intervall (a check has grace," \
            " interval, path, timeout, type, unhealthy_threshold)\n", nested.stderr
        # an edit that replaces no machine (how updates roll is not versioned)
        edited = cluster.zwrm_json("deploy", "roll", "-f", "-", "--shutdown-delay", "2",
                                   input=text)
    assert edited["spec_version"] == version + 1, edited
    assert edited["spec"]["shutdown_delay"] == 2, edited["spec"]
    assert {m["id"] for m in edited["machines"]} == machines, edited["machines"]
    assert cluster.zwrm("apps", "history", "roll").splitlines()[-1].split()[-2:] == \
        ["shutdown_delay", "current"]
    cluster.zwrm("destroy", "roll")

    with cluster.phase("the image no app uses any more, untagged and collected"):
        images = {f"{i['name']}:{i['tag']}": i for i in cluster.zwrm_json("images", "list")}
        slow = images["demo:1-slow"]["digest"]
        cluster.zwrm("images", "rm", "demo:1-slow")
        gone = cluster.zwrm_json("images", "gc", "--grace", "0")
        left = {f"{i['name']}:{i['tag']}" for i in cluster.zwrm_json("images", "list")}
    assert {"name": "demo", "digest": slow} in gone["manifests"], gone
    assert gone["blobs"] and gone["bytes"] > 0, gone  # its initramfs, which no other has
    assert left == set(images) - {"demo:1-slow"}, left


def test_redeploy_of_the_app_with_a_volume(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    web = cluster.state["app"]
    [old] = cluster.zwrm_json("status", web["name"])["machines"]
    # version 2 of this app's guest panics at its first boot (it marks its volume: the
    # next boot goes on): the update waits through the restart its policy gives it
    _push(cluster, "demo:2-panic-once", {"www/cgi-bin/slow": (SLOW, 0o755),
                                         "www/version.txt": (b"2\n", 0o644)},
          cmdline="zwrm.selftest=panic-once")
    with cluster.phase("redeploy of the app with a volume, its guest panicking once"):
        app = cluster.zwrm_json("deploy", web["name"], "--image", "demo:2-panic-once",
                                "--wait", "300", timeout=360)
    [new] = app["machines"]
    assert new["id"] != old["id"]
    assert (new["host_id"], new["state"], new["restarts"]) == (old["host_id"], "running", 1), new
    assert [v["id"] for v in app["volumes"]] == [web["volume"]], app["volumes"]
    for body in cluster.app_everywhere("/cgi-bin/read?index.txt", wait=60).values():
        assert body.encode() == web["data"]
    assert _versions(cluster, PUBLISHED, tries=1) == {"2"}
    # One copy at a time: the old machine had ended before the new one began.
    lines = cluster.zwrm("events", "--topic", "machine", "--limit", "500", "--json")
    events = [json.loads(x) for x in lines.splitlines() if x.strip()]
    olds = [e for e in events if e["subject"] == old["id"]]
    news = [e for e in events if e["subject"] == new["id"]]
    assert olds and news and olds[-1]["kind"] == "destroyed", olds[-1:]
    assert olds[-1]["id"] < news[0]["id"], (olds[-1], news[0])
    web["machine"] = new
