"""
Step: an image pushed from the client, an app deployed with a volume, data written and read
back through the app.  Leaves C{cluster.state["app"]} = {"name", "data", "machine",
"volume"} for later steps.
"""

import pytest

pytestmark = pytest.mark.acceptance

DATA = b"written through the app before anything moved " * 8


def test_push_image(cluster):
    img = cluster.image
    cluster.zwrm("images", "push", "demo:1", "--kernel", img.kernel, "--initrd", img.initrd,
                 "--cmdline", img.cmdline, "--port", "8080", "-q", timeout=300)
    assert "demo" in cluster.zwrm("images", "list")


def test_deploy_with_a_volume(cluster):
    cluster.zwrm("apps", "create", "web")
    with cluster.phase("deploy with a volume until healthy"):
        app = cluster.zwrm_json(
            "deploy", "web", "--image", "demo:1", "--replicas", "1", "--memory", "256",
            "--port", "8080", "--health-http", "/", "--health-grace", "240",
            "--volume", "data:16:/data", "--wait", "300", timeout=360)
    [machine] = app["machines"]
    assert machine["state"] == "running", machine
    assert machine["host_id"] in cluster.host_ids.values()
    assert cluster.app_request(machine, "/cgi-bin/write?index.txt", DATA).strip() == "ok"
    assert cluster.app_request(machine, "/cgi-bin/read?index.txt").encode() == DATA
    assert DATA.decode() in cluster.app_request(machine, "/")
    cluster.state["app"] = {"name": "web", "data": DATA, "machine": machine,
                            "volume": app["volumes"][0]["id"]}
