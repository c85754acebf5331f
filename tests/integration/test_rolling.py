"""
A rolling update end to end (issue 15): a real C{zwrm-control} and two real agents running
QEMU (TCG); an app of 2 replicas with an HTTP health check is updated from C{demo:1} to
C{demo:2} with the default update settings (one at a time, each new machine healthy before
an old one goes).  An HTTP probe loop on the app's machines runs throughout and must never
find none of them answering.

The probe knows the app's machines from C{zwrm status} (refreshed every 2 s) and asks each
running one's forwarded port on 127.0.0.1 in turn until one answers 200; a round where none
does is a gap.
"""

import json
import time

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from zwrm.testing.processes import poll, run_cli, start_vm_cluster


@pytest.mark.qemu
@pytest.mark.multihost
class RollingUpdateTests(TestCase):
    timeout = 600

    async def cli(self, cp, *args, timeout=60, code=0):
        got, out, err = await run_cli(reactor, list(args), cp.url, cp.operator_token,
                                      timeout=timeout)
        self.assertEqual(got, code, f"zwrm {' '.join(args)} exited {got}: {err}")
        self.assertNotIn("Traceback", err)
        return out, err

    async def app(self, cp):
        out, _ = await self.cli(cp, "status", "web", "--json")
        return json.loads(out)

    def test_rolling_update_keeps_one_replica_serving(self):
        return ensureDeferred(self._scenario())

    async def _scenario(self):
        from twisted.internet.threads import deferToThread

        from zwrm.testing import image

        cp, _agents = await start_vm_cluster(reactor, self)
        img = await deferToThread(image.build)
        await self.cli(cp, "images", "push", "demo:2", "--kernel", img.kernel, "--initrd",
                       img.initrd, "--cmdline", img.cmdline, "--port", "8080", "-q",
                       timeout=120)
        await self.cli(cp, "apps", "create", "web")
        out, _ = await self.cli(
            cp, "deploy", "web", "--image", "demo:1", "--memory", "256", "--replicas", "2",
            "--port", "8080", "--health-http", "/", "--health-interval", "1",
            "--health-grace", "240", "--wait", "300", "--json", timeout=330)
        before = json.loads(out)["machines"]
        self.assertEqual(sorted(m["health"] for m in before), ["passing", "passing"])

        ports = {}  # machine id -> forwarded port of a running machine
        rounds = []  # (time, answered)
        stop = []

        async def refresh():
            while not stop:
                try:
                    ms = (await self.app(cp))["machines"]
                except Exception:
                    ms = None  # a slow CLI under load: keep the ports known so far
                if ms is not None:
                    for m in ms:
                        if m["state"] == "running" and m["host_port"]:
                            ports[m["id"]] = m["host_port"]
                        else:
                            ports.pop(m["id"], None)
                await deferLater(reactor, 2, lambda: None)

        async def probe():
            while not stop:
                answered = False
                for port in list(ports.values())[::-1]:  # the newest first
                    try:
                        r = await treq.get(f"http://127.0.0.1:{port}/", timeout=3)
                        await r.content()
                        answered = r.code == 200
                    except Exception:
                        answered = False
                    if answered:
                        break
                rounds.append((time.monotonic(), answered))
                await deferLater(reactor, 0.25, lambda: None)

        for m in before:
            ports[m["id"]] = m["host_port"]
        refreshing = ensureDeferred(refresh())
        probing = ensureDeferred(probe())
        try:
            started = time.monotonic()
            # Every update rolls: no update settings given (defaults: 1 at a time, 10 s).
            out, _ = await self.cli(cp, "--timeout", "400", "deploy", "web", "--image",
                                    "demo:2", "--json", timeout=420)

            async def settled():  # both new machines serving (a deploy may return earlier)
                ms = (await self.app(cp))["machines"]
                return (len(ms) == 2 and all(m["state"] == "running" and
                                             m["health"] == "passing" for m in ms)
                        and not {m["id"] for m in ms} & {m["id"] for m in before})

            await poll(reactor, settled, 300, what="both new machines passing")
            finished = time.monotonic()
            await deferLater(reactor, 2, lambda: None)
        finally:
            stop.append(True)
            await refreshing
            await probing
        after = json.loads(out)
        self.assertEqual(after["spec"]["image"], "demo:2")
        self.assertEqual(len(after["machines"]), 2)
        self.assertFalse({m["id"] for m in after["machines"]} & {m["id"] for m in before})
        during = [ok for t, ok in rounds if started <= t <= finished]
        gaps = [round(t - started, 1) for t, ok in rounds if not ok and started <= t <= finished]
        self.assertEqual(gaps, [], f"no replica answered at these seconds of the update "
                                   f"({len(during)} probe rounds)")
        # the update took at least two boots and two 10 s healthy waits: many rounds
        self.assertGreater(len(during), 40, rounds)
