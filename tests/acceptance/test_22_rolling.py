"""
Step: a new version of the app, rolled out while its users use it.

Version 2 of the test image is version 1 with one more file (C{/www/version.txt}, which
the guest's web server serves), pushed as C{demo:2}.

 - A stateless app with two replicas (a published port of its own) is redeployed with
   C{demo:2} while a user on the client host sends it a request every 0.1 s through an
   agent's ingress: every request answered, both replicas replaced (new machine ids)
   and serving version 2.
 - The earlier app (one replica, pinned to its volume) is redeployed with C{demo:2}: its
   replacement runs on the same host with the same volume, the data is there, and it
   serves version 2 through both ingresses; at most one copy ran at any moment (the
   old one stopped before the new one started: it has the volume).
"""

import collections
import gzip
import json
import os
import subprocess

import pytest

from tests.acceptance.cluster import AGENTS
from zwrm.testing import image

pytestmark = pytest.mark.acceptance

PORT = 82  # the stateless app's published port


def _push_v2(cluster):
    img = cluster.image
    out = os.path.join(cluster.run_dir, "initrd-v2.gz")
    cp = image._Cpio()
    cp.file("www/version.txt", b"2\n", 0o644)
    with open(img.initrd, "rb") as f:
        data = f.read()
    with open(out, "wb") as f:
        f.write(data + gzip.compress(cp.finish(), compresslevel=1))
    cluster.zwrm("images", "push", "demo:2", "--kernel", img.kernel, "--initrd", out,
                 "--cmdline", img.cmdline, "--port", "8080", "-q", timeout=300)


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


def test_rolling_deploy_of_a_stateless_app(cluster):
    _push_v2(cluster)
    cluster.zwrm("apps", "create", "roll")
    with cluster.phase("deploy a stateless app with two replicas"):
        app = cluster.zwrm_json(
            "deploy", "roll", "--image", "demo:1", "--replicas", "2", "--memory", "128",
            "--port", "8080", "--health-http", "/", "--health-grace", "240",
            "--publish", f"{PORT}:8080", "--wait", "300", timeout=360)
    before = {m["id"] for m in app["machines"]}
    assert len(before) == 2
    assert _versions(cluster, PORT) == {"404"}

    # A user: a request every 0.1 s through a1's ingress, each given 5 s.
    url = f"http://{cluster.net.address('a1')}:{PORT}/"
    user = cluster.net.spawn("client", [
        "sh", "-c", "while :; do curl -s -o /dev/null --max-time 5 -w '%{http_code}\\n' "
                    f"{url}; sleep 0.1; done"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        with cluster.phase("a rolling deploy of two replicas under requests"):
            app = cluster.zwrm_json("deploy", "roll", "--image", "demo:2", "--wait", "300",
                                    timeout=360)
        # (the user goes on meanwhile: requests after the deploy returned count too)
        versions = _versions(cluster, PORT)
    finally:
        user.terminate()
        codes = user.communicate(timeout=30)[0].split()
    after = {m["id"] for m in app["machines"]}
    assert len(after) == 2 and not after & before, app["machines"]
    assert all(m["state"] == "running" for m in app["machines"]), app["machines"]
    assert len(codes) > 20, codes
    failed = [c for c in codes if c != "200"]
    assert not failed, (f"{len(failed)} of {len(codes)} requests failed during the rollout"
                        f" (HTTP codes, 000: no answer): {dict(collections.Counter(failed))}")
    assert versions == {"2"}
    cluster.zwrm("destroy", "roll")


def test_redeploy_of_the_app_with_a_volume(cluster):
    if "app" not in cluster.state:
        pytest.fail("needs the deploy step (test_20_deploy.py) to have passed")
    web = cluster.state["app"]
    [old] = cluster.zwrm_json("status", web["name"])["machines"]
    with cluster.phase("redeploy of the app with a volume"):
        app = cluster.zwrm_json("deploy", web["name"], "--image", "demo:2", "--wait", "300",
                                timeout=360)
    [new] = app["machines"]
    assert new["id"] != old["id"]
    assert (new["host_id"], new["state"]) == (old["host_id"], "running"), new
    assert [v["id"] for v in app["volumes"]] == [web["volume"]], app["volumes"]
    for body in cluster.app_everywhere("/cgi-bin/read?index.txt", wait=60).values():
        assert body.encode() == web["data"]
    assert _versions(cluster, 80, tries=1) == {"2"}
    # One copy at a time: the old machine had ended before the new one began.
    lines = cluster.zwrm("events", "--topic", "machine", "--limit", "500", "--json")
    events = [json.loads(x) for x in lines.splitlines() if x.strip()]
    olds = [e for e in events if e["subject"] == old["id"]]
    news = [e for e in events if e["subject"] == new["id"]]
    assert olds and news and olds[-1]["kind"] == "destroyed", olds[-1:]
    assert olds[-1]["id"] < news[0]["id"], (olds[-1], news[0])
