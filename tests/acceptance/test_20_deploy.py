"""
Step: an image pushed from the client (listed as JSON; a kernel that is not one and a disk
alone without a boot sector refused in one line; C{zwrm console} of an id that names no
machine is one line), an app deployed with a volume and a published port
(the agents run --network=bridge), data written and read back through the app from the
client host, through the ingress: on the agent the replica runs on, then on every agent (the
other one reaches the replica over the overlay).  Leaves C{cluster.state["app"]} =
{"name", "data", "machine", "volume"} for later steps.
"""

import os

import pytest

from tests.acceptance.cluster import PUBLISHED, PUBLISHED_HTTP

pytestmark = pytest.mark.acceptance

DATA = b"written through the app before anything moved " * 8


def test_push_image(cluster):
    img = cluster.image
    cluster.zwrm("images", "push", "demo:1", "--kernel", img.kernel, "--initrd", img.initrd,
                 "--cmdline", img.cmdline, "--port", "8080", "-q", timeout=300)
    assert "demo" in cluster.zwrm("images", "list")
    [listed] = [i for i in cluster.zwrm_json("images", "list") if i["image"] == "demo:1"]
    assert listed["layers"] == ["kernel", "initrd"] and len(listed["digest"]) == 71, listed
    # not a kernel (the initrd given as --kernel), and a disk alone without a boot sector (a
    # bare file system's zeros): one line each, exit 2, nothing pushed
    bare = cluster.host_dir("client", "root.raw")
    os.makedirs(os.path.dirname(bare), exist_ok=True)
    with open(bare, "wb") as f:
        f.truncate(1 << 20)
    for flag, path, said in (("--kernel", img.initrd, "is not an x86 kernel QEMU can boot"),
                             ("--disk", bare, "has no boot sector")):
        r = cluster.sh("client", ["zwrm", "images", "push", "demo:wrong", flag, path, "-q"],
                       env={"HOME": cluster.client_home}, ok=(2,))
        assert len(r.stderr.splitlines()) == 1 and said in r.stderr, r.stderr
    assert [i["image"] for i in cluster.zwrm_json("images", "list")] == ["demo:1"]
    # an id that names no machine: one line, exit 1, before the terminal is taken
    r = cluster.sh("client", ["zwrm", "console", "m-0123456789ab"],
                   env={"HOME": cluster.client_home}, ok=(1,))
    assert r.stderr == "zwrm: no machine 'm-0123456789ab'\n", r.stderr


def test_deploy_with_a_volume(cluster):
    cluster.zwrm("apps", "create", "web")
    with cluster.phase("deploy with a volume until healthy"):
        app = cluster.deploy(
            "web", "demo:1", "--publish", f"{PUBLISHED}:8080",
            "--publish", f"{PUBLISHED_HTTP}:8080/http", "--volume", "data:16:/data", memory=256)
    [machine] = app["machines"]
    assert machine["state"] == "running", machine
    assert machine["host_id"] in cluster.host_ids.values()
    here = cluster.host_of(machine["host_id"])
    assert cluster.app_request("/cgi-bin/write?index.txt", DATA, via=here).strip() == "ok"
    assert cluster.app_request("/cgi-bin/read?index.txt", via=here).encode() == DATA
    assert DATA.decode() in cluster.app_request("/", via=here)
    with cluster.phase("the operator's views of it"):
        # a kind of object in either number; the volume by its app's name
        tables = [[line.split()[:5] for line in cluster.zwrm(kind, "list").splitlines()]
                  for kind in ("host", "hosts")]  # (ID NAME REGION DATACENTER STATE)
        assert tables[0] == tables[1] and len(tables[0]) == 1 + len(cluster.host_ids), tables
        [row] = [line.split() for line in cluster.zwrm("volumes", "list").splitlines()[1:]]
        assert row[:3] == [app["volumes"][0]["id"], "web", "data"], row
        listed = cluster.zwrm("machines", "list", "--host", machine["host_id"])
        assert f"\n{machine['id']}  web  " in listed, listed
        # a host that is not the cluster's: one line, exit 1, not an empty table
        r = cluster.sh("client", ["zwrm", "machines", "list", "--host", "h-typo"],
                       env={"HOME": cluster.client_home}, ok=(1,))
        assert (r.stdout, r.stderr) == ("", "zwrm: no host 'h-typo'\n"), r
        status = cluster.zwrm("host", "status", machine["host_id"], "--events", "1")
        assert "\nrecent events (1):\n" in status, status
        assert f"\n{machine['id']}  web  running\n" in status, status
    cluster.state["app"] = {"name": "web", "data": DATA, "machine": machine,
                            "volume": app["volumes"][0]["id"]}


def test_published_port_on_every_agent(cluster):
    # Also on the agent that has no VM at all: its ingress reaches the replica on the
    # other host over the overlay (its bridge is there before any VM of its own).
    if "app" not in cluster.state:
        pytest.fail("needs test_deploy_with_a_volume to have passed")
    data = cluster.state["app"]["data"]
    for body in cluster.app_everywhere("/cgi-bin/read?index.txt").values():
        assert body.encode() == data
    for body in cluster.app_everywhere("/").values():
        assert data.decode() in body
