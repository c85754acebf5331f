"""
A spec's cloud-init user-data and environment reach only the agent that runs the machine:
viewers see their SHA-256 and size in C{zwrm.app.status}, C{zwrm.machine.status} and the
payloads of C{zwrm.event.app}.
"""

import hashlib
import json

from twisted.trial.unittest import TestCase

from tests.control.test_apps import Cluster, d

SECRET = "#cloud-config\npassword: hunter2-very-secret\n"
TOKEN = "s3cr3t-token-value"


class SecretTests(TestCase):
    @d
    async def test_wire_forms_carry_no_secrets(self):
        c = await Cluster(self).start(hosts=("h-a",))
        await c.apps.create_app("web")
        spec = c.spec(cloud_init={"user_data": SECRET, "env": {"API_TOKEN": TOKEN}})
        status = await c.apps.deploy("web", spec)
        (m,) = status["machines"]
        seen = {
            "deploy": status,
            "app.status": await c.apps.app_status("web"),
            "machine.status": await c.apps.machine_status(m["id"]),
            "events": [e for t, e in c.published if t in ("zwrm.event.app", "zwrm.event.machine")],
            "list": await c.apps.list_apps(),
        }
        for what, value in seen.items():
            text = json.dumps(value)
            self.assertNotIn("hunter2", text, what)
            self.assertNotIn(TOKEN, text, what)
        ci = seen["app.status"]["spec"]["cloud_init"]
        self.assertEqual(ci["user_data"], {"sha256": hashlib.sha256(SECRET.encode()).hexdigest(),
                                           "size": len(SECRET.encode())})
        self.assertEqual(ci["env"]["size"], len(json.dumps({"API_TOKEN": TOKEN}).encode()))
        self.assertEqual(seen["machine.status"]["spec"]["cloud_init"]["user_data"]["sha256"],
                         ci["user_data"]["sha256"])
        # the agent that runs it has them
        ex = c.executors["h-a"][0]
        agent_spec = ex._machines[m["id"]].spec
        self.assertEqual(agent_spec["cloud_init"]["user_data"], SECRET)
        self.assertEqual(agent_spec["cloud_init"]["env"], {"API_TOKEN": TOKEN})
        # a redeploy of the same spec is not a change (the stored spec keeps its secrets)
        again = await c.apps.deploy("web", spec)
        self.assertEqual([x["id"] for x in again["machines"]], [m["id"]])
