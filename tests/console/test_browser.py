"""
The web console in a real headless Chromium (Debian's C{chromium}, driven by Selenium through
Debian's C{chromium-driver}; nothing is downloaded), against a real control plane and two real
agents running the busybox test image under QEMU (TCG):

 - an operator logs in and sees both hosts appear;
 - an app deployed with the CLI appears with its machine running, without a reload;
 - its host's disk fills up (each agent's data directory is a file system of its own) and a
   user's write meets it: the console shows the machine paused ("paused: disk-full", and
   what that means) and the host's disk full ("no new placements"), live, and both cleared
   once the disk has room and the write is done;
 - a drain started from the console (its button, its dialog) is followed live: the migration's
   phases advance in order up to C{done};
 - the other actions (restart, scale, activate, remove of a host whose agent stopped), a
   refused call's zwrm.error.* shown, the audit trail of what the console did; a machine's
   serial console log (its Logs button); a redeploy from the app's Spec dialog (its spec as
   JSON, edited: a typo and a bad value said there, changing nothing; its plan), its
   rolling update followed on the app's card, live, from under way to completed;
 - the control plane restarts: the console reconnects by itself and is live again;
 - both hosts of the datacenter lost at once: the hosts view says the partition guard holds
   them (read at load and followed by event), and not after they are back; an app destroyed
   meanwhile, its volume out of reach, is shown being destroyed until it is gone;
 - a viewer sees everything, finds every action button disabled, and a drain forced through
   the page anyway is refused by the router (C{wamp.error.not_authorized}), the host unchanged.

Screenshots go to the test's temporary directory (printed; kept as CI artefacts) or, with
C{ZWRM_CONSOLE_SCREENSHOTS=docs/console}, to that directory: how docs/console.md's pictures are
made again.
"""

import json
import os
import shutil
import tempfile

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.console.pages import LOGIN, ROWS, TWO_READY_HOSTS, wait_js
from zwrm.console import STATIC, VENDOR_AUTOBAHN
from zwrm.drain_phases import MIGRATION_PHASES
from zwrm.testing.disks import fill_disk
from zwrm.testing.drains import quiet_log
from zwrm.testing.processes import host_list, run_cli, start_vm_cluster

#: Each agent's data directory's own file system (a tmpfs: its pages are taken only as
#: written): the test image's cache, the app's 16 MiB volume, its machine's files, a drain's
#: copy, and the control plane's C{min_free_disk_mb} (256) above that for placements.
DATA_DISK_MIB = 1024

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _missing():
    """What the test needs and this machine lacks (installed by the setup scripts in CI)."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e .[test])")
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            missing.append(f"{path} (apt-get install {pkg}: scripts/install-system-deps)")
    if not os.path.exists(os.path.join(STATIC, VENDOR_AUTOBAHN)):
        missing.append(f"zwrm/console/static/{VENDOR_AUTOBAHN} (scripts/build-console)")
    return missing


class Browser:
    """A headless Chromium; every WebDriver call runs in a thread, off the reactor."""

    def __init__(self, driver, shots):
        self.driver = driver
        self.shots = shots

    @classmethod
    async def start(cls, profile, shots):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1440,900", "--no-first-run", "--disable-extensions",
                    "--disable-background-networking", "--disable-sync",
                    "--disable-component-update", "--hide-scrollbars",
                    f"--user-data-dir={profile}"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(CHROMEDRIVER)  # Debian's driver: Selenium Manager downloads nothing
        driver = await deferToThread(webdriver.Chrome, service=service, options=options)
        driver.set_page_load_timeout(60)
        driver.set_script_timeout(30)
        return cls(driver, shots)

    async def js(self, script, *args):
        return await deferToThread(self.driver.execute_script, script, *args)

    async def get(self, url):
        await deferToThread(self.driver.get, url)

    async def shot(self, name):
        path = os.path.join(self.shots, name)
        await deferToThread(self.driver.save_screenshot, path)
        return path

    async def log(self):
        return await deferToThread(self.driver.get_log, "browser")

    async def quit(self):
        await deferToThread(self.driver.quit)


#: The hosts view's row of host C{arguments[0]}, as C{r}.
HOST_ROW = "const r = document.querySelector(`#hosts-table tr[data-host='${arguments[0]}']`);"

#: Records each state of the web app's update line as the page shows it (a rolling update
#: announced by event, not read again).
ROLLOUT_RECORDER = """
window.__rollouts = [];
window.__rolloutTexts = [];
const line = () => {
  const p = document.querySelector('[data-app=web] p[data-rollout]');
  const s = p && p.dataset.rollout;
  if (s && window.__rollouts[window.__rollouts.length - 1] !== s) {
    window.__rollouts.push(s);
    window.__rolloutTexts.push(p.textContent);
  }
};
new MutationObserver(line).observe(document.body, {subtree: true, childList: true, attributes: true});
"""

#: Holds back the answer of the page's next zwrm.host.list by 1.5 s, every host in it
#: marked "stale" (window.__held: 1 while held, 2 once given).
HOLD_FIRST_HOST_LIST = """
window.__call = autobahn.Session.prototype.call;
window.__held = 0;
autobahn.Session.prototype.call = function (procedure, ...rest) {
  const answer = window.__call.call(this, procedure, ...rest);
  if (procedure !== 'zwrm.host.list' || window.__held) return answer;
  window.__held = 1;
  return answer.then((list) => new Promise((resolve) => setTimeout(() => {
    window.__held = 2;
    resolve(list.map((x) => Object.assign({}, x, { state: 'stale' })));
  }, 1500)));
};
"""

PHASE_RECORDER = """
window.__phases = [];
window.__noReload = true;
const seen = () => {
  for (const tr of document.querySelectorAll('tr[data-migration]')) {
    const p = tr.dataset.phase;
    if (window.__phases[window.__phases.length - 1] !== p) window.__phases.push(p);
  }
};
new MutationObserver(seen).observe(document.body, {subtree: true, childList: true, attributes: true});
seen();
"""


@pytest.mark.qemu
@pytest.mark.multihost
class ConsoleBrowserTests(TestCase):
    timeout = 900

    def setUp(self):
        missing = _missing()
        if missing:
            # under CI a skip fails the run (tests/conftest.py): the setup scripts install these
            raise SkipTest("the console's browser test needs " + "; ".join(missing))

    def test_console_end_to_end(self):
        return ensureDeferred(self._scenario())

    async def cli(self, cp, *args, timeout=120):
        code, out, err = await run_cli(reactor, list(args), cp.url, cp.operator_token,
                                       timeout=timeout)
        self.assertEqual(code, 0, f"zwrm {' '.join(args)} failed ({code}): {out} {err}")
        return out

    async def _scenario(self):
        shots = os.environ.get("ZWRM_CONSOLE_SCREENSHOTS") or os.path.abspath(self.mktemp())
        os.makedirs(shots, exist_ok=True)
        print(f"console screenshots: {shots}")
        cp, agents = await start_vm_cluster(reactor, self, data_disk_mib=DATA_DISK_MIB)
        base = f"http://127.0.0.1:{cp.port}"
        viewer = json.loads(await self.cli(cp, "tokens", "create", "--role", "viewer",
                                           "--ttl", "1h", "--json"))["token"]

        profile = tempfile.mkdtemp(prefix="zwrm-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)
        b = await Browser.start(profile, shots)
        self.addCleanup(b.quit)

        async def failed_with_log(e):
            for entry in await b.log():
                print("browser:", entry)
            await b.shot("failure.png")
            # What the services said (a drain that ended "failed" says why only there).
            for p in (cp, *agents):
                print(f"--- {os.path.basename(p.log_path)} (filtered):\n"
                      f"{quiet_log(p.log_tail(400))}")
            raise e

        try:
            await self._operator(cp, b, base, agents)
            await self._reconnect(cp, b)
            await self._partition(cp, b, agents)
            await self._viewer(cp, b, base, viewer)
        except Exception as e:
            await failed_with_log(e)
        errors = [e for e in await b.log()
                  if e["level"] == "SEVERE" and e.get("source") != "network"]
        self.assertEqual(errors, [], "the page logged errors (a CSP violation, an exception)")

    async def _operator(self, cp, b, base, agents):
        # log in: the two hosts appear
        await b.get(base + "/")
        await wait_js(b, "return !!document.getElementById('login')", 30, "the login form")
        await b.shot("login.png")
        # a wrong token: the form comes back with the router's reason, nothing is kept
        await b.js(LOGIN, "operator-0000.not-a-token")
        refused = await wait_js(b, "const p = document.getElementById('login-error');"
                                   " return !p.hidden && p.textContent", 60, "the refusal")
        self.assertIn("not accepted", refused)
        self.assertIsNone(await b.js("return sessionStorage.getItem('zwrm.console.token')"))
        await b.js(LOGIN, cp.operator_token)
        await wait_js(b, "return document.body.dataset.ready === 'yes'", 60, "console ready")
        self.assertEqual(await b.js("return document.body.dataset.role"), "operator")
        # the token travels only inside the WebSocket (WAMP's ticket): in no URL the page has
        # or loaded (resource timing leaves WebSockets out: the console's is always .../ws)
        urls = await b.js("return [location.href, ...performance.getEntries().map(e => e.name)]")
        self.assertEqual([u for u in urls if cp.operator_token in u], [])
        hosts = await wait_js(b, TWO_READY_HOSTS, 60, "two ready hosts in the hosts view")
        self.assertEqual({h["host"] for h in hosts}, {a.host_id for a in agents})

        # deploy with the CLI: the machine appears, running, without a reload
        await b.js(PHASE_RECORDER)
        await b.js("location.hash = '#apps'")
        await self.cli(cp, "apps", "create", "web")
        await self.cli(cp, "deploy", "web", "--image", "demo:1", "--replicas", "1",
                       "--memory", "128", "--port", "8080", "--volume", "data:16:/data",
                       "--wait", "300", timeout=330)
        machines = await wait_js(
            b, "const r = [...document.querySelectorAll('[data-app=web] tr[data-machine]')]"
               ".map(e => Object.assign({}, e.dataset));"
               " return r.length === 1 && r[0].state === 'running' && r;",
            60, "the deployed machine, running, in the apps view")
        self.assertTrue(await b.js("return window.__noReload === true"), "the page was reloaded")
        await b.shot("apps.png")
        status = json.loads(await self.cli(cp, "status", "web", "--json"))
        source = status["machines"][0]["host_id"]
        self.assertEqual(machines[0]["machine"], status["machines"][0]["id"])
        await self._paused(b, status["machines"][0], agents)

        # a drain from the console: its phases advance to done
        await b.js("location.hash = '#hosts'")
        await wait_js(b, "const x = document.querySelector(`button[data-action=drain][data-host='${arguments[0]}']`);"
                         " return x && !x.disabled;", 30, "an enabled Drain button", source)
        await b.js("document.querySelector(`button[data-action=drain][data-host='${arguments[0]}']`).click()",
                   source)
        await wait_js(b, "return document.getElementById('confirm').open", 60, "the drain dialog")
        self.assertIn("web", await b.js("return document.getElementById('confirm-extra').textContent"))
        await b.js("document.getElementById('drain-min-healthy').value = '3';"
                   " document.getElementById('confirm-ok').click();")
        await wait_js(b, "return location.hash === '#drains'"
                         " && document.querySelector('tr[data-migration]')", 60, "the drain's migration")
        shot = False
        deadline = reactor.seconds() + 400
        while reactor.seconds() < deadline:
            phase = await b.js("const r = document.querySelector('tr[data-migration]'); return r && r.dataset.phase")
            drain_state = await b.js("const d = document.querySelector('[data-drain]'); return d && d.dataset.state")
            if not shot and phase in ("starting_replacement", "waiting_healthy", "delta_copying"):
                await b.shot("drains.png")
                shot = True
            if drain_state in ("completed", "incomplete", "cancelled"):
                break
            await deferLater(reactor, 0.25, lambda: None)
        self.assertEqual(drain_state, "completed", await b.js(ROWS, "tr[data-migration]"))
        phases = await b.js("return window.__phases")
        print(f"migration phases the console showed: {phases}")
        order = list(MIGRATION_PHASES)  # a live move or a cold one (the drain's default is auto)
        self.assertEqual(phases[-1], "done", phases)
        # (followed live: at least one phase before done; a live move of this small guest
        # may pass several phases within one of the console's reads, 200 ms apart)
        self.assertGreaterEqual(len(phases), 2, f"phases seen: {phases}")
        self.assertEqual(phases, sorted(phases, key=order.index), f"phases out of order: {phases}")
        if not shot:
            await b.shot("drains.png")
        self.assertTrue(await b.js("return window.__noReload === true"), "the page was reloaded")
        await b.js("location.hash = '#events'")
        await wait_js(b, "return document.querySelectorAll('#events-table tr[data-event]').length > 10",
                      30, "events in the events view")
        await b.shot("events.png")
        await b.js("location.hash = '#hosts'")
        await wait_js(b, "const r = document.querySelector(`#hosts-table tr[data-host='${arguments[0]}']`);"
                         " return r && r.dataset.state === 'drained'", 30, "the drained host", source)
        await b.shot("hosts.png")
        await self._out_of_order(b)
        await self._actions(cp, b, source, agents)

    async def _out_of_order(self, b):
        """
        Two reads of the hosts (Reload, twice) whose answers come back out of order: the
        older one (held back 1.5 s by a wrapper of the page's autobahn, and marked) must
        not overwrite what the newer one drew.
        """
        await b.js(HOLD_FIRST_HOST_LIST)
        await self.click(b, "#hosts-reload")
        await wait_js(b, "return window.__held === 1", 10, "the first read held back")
        await b.js("document.getElementById('hosts-reload').click()")
        await wait_js(b, "return window.__held === 2", 10, "the held answer come back")
        await deferLater(reactor, 0.5, lambda: None)  # a render, if it were drawn
        states = await b.js("return [...document.querySelectorAll('#hosts-table tr[data-host]')]"
                            ".map(r => r.dataset.state)")
        self.assertEqual(sorted(states), ["drained", "ready"])
        await b.js("autobahn.Session.prototype.call = window.__call")

    async def _paused(self, b, machine, agents):
        """
        A user's write meets the full disk of the machine's host: the machine is shown
        paused and its host's disk full, then both cleared once the disk has room (the
        write then done).
        """
        [agent] = [a for a in agents if a.host_id == machine["host_id"]]
        row = f"[data-app=web] tr[data-machine='{machine['id']}']"
        filler = fill_disk(agent.data_dir, leave=2 << 20)
        try:
            # (8 MiB: the 16 MiB volume has room for it, its host's disk has not)
            write = treq.post(f"http://127.0.0.1:{machine['host_port']}/cgi-bin/write?big",
                              data=b"p" * (8 << 20), timeout=300)
            shown = await wait_js(
                b, "const r = document.querySelector(arguments[0]);"
                   " const p = r && r.dataset.paused === 'disk-full' && r.querySelector('.s-paused');"
                   " return p && [r.dataset.state, p.textContent, r.textContent];",
                180, "the machine shown paused", row)
            self.assertEqual(shown[:2], ["running", "paused: disk-full"])
            self.assertIn("waits for room on its host's disk", shown[2])
            await b.shot("paused.png")
            # and its host, in the hosts view: no new placements there
            await b.js("location.hash = '#hosts'")
            await wait_js(b, HOST_ROW + " return r && r.dataset.diskFull === 'yes'"
                             " && r.textContent.includes('disk fullno new placements')",
                          30, "its host shown with a full disk", agent.host_id)
            await b.shot("disk-full.png")
            await b.js("location.hash = '#apps'")
        finally:
            os.unlink(filler)
        response = await write
        self.assertEqual((response.code, (await response.text()).strip()), (200, "ok"))
        await wait_js(b, "const r = document.querySelector(arguments[0]);"
                         " return r && r.dataset.state === 'running' && r.dataset.paused === ''"
                         " && !r.querySelector('.s-paused');",
                      60, "the machine shown running again", row)
        await wait_js(b, HOST_ROW + " return r && r.dataset.diskFull === ''", 30,
                      "its host's disk no longer shown full", agent.host_id)

    async def confirm(self, b, **inputs):
        """Answer the console's confirmation dialog: fill C{inputs} (id -> value), confirm."""
        await wait_js(b, "return document.getElementById('confirm').open", 60, "the dialog")
        for element_id, value in inputs.items():
            await b.js("document.getElementById(arguments[0]).value = arguments[1]",
                       element_id, str(value))
        await b.js("document.getElementById('confirm-ok').click()")

    async def click(self, b, selector):
        await wait_js(b, "const x = document.querySelector(arguments[0]); return x && !x.disabled",
                      60, f"an enabled {selector}", selector)
        await b.js("document.querySelector(arguments[0]).click()", selector)

    async def _actions(self, cp, b, drained, agents):
        """The other actions: an error shown readably, restart, scale, activate, remove."""
        ready = next(h["id"] for h in await host_list(reactor, cp) if h["id"] != drained)
        # a refused zwrm.error.*: undrain of a host that is not draining (forced on)
        await b.js("const x = document.querySelector(`button[data-action=undrain][data-host='${arguments[0]}']`);"
                   " x.disabled = false; x.click();", ready)
        await self.confirm(b)
        uri = await wait_js(b, "const m = document.getElementById('message');"
                               " return !m.hidden && m.dataset.uri", 30, "the error shown")
        self.assertTrue(uri.startswith("zwrm.error."), uri)
        text = await b.js("return document.querySelector('#message .text').textContent")
        self.assertIn(ready, text)
        self.assertNotIn("Traceback", text)
        await b.shot("error.png")

        # restart, in place: the same machine stops and runs again, seen live
        await b.js("location.hash = '#apps'")
        old = await wait_js(b, "const r = document.querySelector('[data-app=web] tr[data-machine]');"
                               " return r && r.dataset.machine", 30, "the machine")
        before = json.loads(await self.cli(cp, "machines", "status", old, "--json"))
        await self.click(b, f"button[data-action=restart][data-machine='{old}']")
        await self.confirm(b)
        await wait_js(
            b, "const m = document.getElementById('message');"
               " return !m.hidden && m.className === 'info'"
               " && m.querySelector('.text').textContent === arguments[0] + ' restarted'",
            300, "the restart confirmed", old)
        await wait_js(
            b, "const r = [...document.querySelectorAll('[data-app=web] tr[data-machine]')];"
               " return r.length === 1 && r[0].dataset.machine === arguments[0]"
               " && r[0].dataset.state === 'running'",
            60, "the restarted machine running", old)
        status = json.loads(await self.cli(cp, "status", "web", "--json"))
        self.assertEqual([m["id"] for m in status["machines"]], [old])
        after = json.loads(await self.cli(cp, "machines", "status", old, "--json"))
        self.assertEqual(after["host_id"], before["host_id"])
        events = await wait_js(
            b, "return [...document.querySelectorAll('#events-table tr[data-event]')]"
               ".map(e => e.textContent).join(' ')", 30, "the events")
        self.assertIn("restart requested", events)

        # its serial console's tail, from its Logs button: its guest's stop for the restart,
        # then (read again by Refresh, if it was not yet there) its boot
        await self.click(b, f"button[data-action=logs][data-machine='{old}']")
        text = await wait_js(b, "const d = document.getElementById('logs');"
                                " return d.open && document.getElementById('logs-text').textContent",
                             60, "the machine's console log")
        self.assertIn("reboot: Power down", text)
        text = await wait_js(b, "const t = document.getElementById('logs-text').textContent;"
                                " if (t.lastIndexOf('zwrm: init starting') > t.lastIndexOf('reboot: Power down'))"
                                " return t;"
                                " document.getElementById('logs-refresh').click();",
                             120, "the guest's boot after its stop in its console log")
        print(f"console log read by the console: {len(text)} characters")
        self.assertIn(old, await b.js("return document.getElementById('logs-title').textContent"))
        await b.shot("logs.png")
        await b.js("document.getElementById('logs-close').click()")
        await wait_js(b, "return !document.getElementById('logs').open", 10, "the log closed")

        # a redeploy from its Spec dialog (its spec as JSON, edited): a typo and a bad value
        # said there and sent nowhere or refused, the plan, then the deploy; its card
        # follows the rolling update, live, to its end
        await self.click(b, "button[data-action=spec][data-app=web]")
        text = await wait_js(b, "const d = document.getElementById('spec');"
                                " return d.open && document.getElementById('spec-text').value",
                             30, "the app's spec in its dialog")
        spec = json.loads(text)
        self.assertEqual((spec["image"], spec["memory_mb"], spec["volumes"]),
                         ("demo:1", 128, [{"mount": "/data", "name": "data", "size_mb": 16}]))
        self.assertNotIn("region", spec)  # null and empty fields left out

        async def spec_says(edited, button):
            await b.js("document.getElementById('spec-text').value = arguments[0];"
                       " document.getElementById('spec-result').hidden = true;"
                       " document.getElementById(arguments[1]).click();",
                       json.dumps(edited, indent=2), button)
            return await wait_js(b, "const r = document.getElementById('spec-result');"
                                    " return !r.hidden && !r.textContent.startsWith('deploying')"
                                    " && [r.dataset.kind, r.textContent]",
                                 330, f"the {button} answered")

        typo = dict(spec, memroy_mb=256)
        del typo["memory_mb"]
        kind, said = await spec_says(typo, "spec-deploy")
        self.assertEqual(kind, "error")
        self.assertTrue(said.startswith("unknown field(s) memroy_mb (a spec's fields are "), said)
        kind, said = await spec_says(dict(spec, memory_mb=10), "spec-plan")
        self.assertEqual((kind, said), ("error", "memory_mb must be a whole number from 32 to "
                                                 "1048576, not 10"))
        # the edit is the whole spec: a field left out is back to its default
        kind, said = await spec_says({k: v for k, v in spec.items() if k != "service_port"},
                                     "spec-plan")
        self.assertIn("  service_port: 8080 -> null", said.splitlines())
        edited = dict(spec, cloud_init={"env": {"GREETING": "2"}})
        kind, said = await spec_says(edited, "spec-plan")
        machine = (await b.js("return document.querySelector('[data-app=web] tr[data-machine]')"
                              ".dataset.machine"))
        self.assertEqual(kind, "ok", said)
        self.assertEqual(said.splitlines()[0], "web: new version 2")
        self.assertIn(f"replace  {machine} (replica 0, running)", said)
        await b.shot("spec.png")
        self.assertEqual(json.loads(await self.cli(cp, "status", "web", "--json"))["spec_version"],
                         1)  # a plan, a typo, a bad value: nothing changed
        # deployed, the dialog closed to watch the card: the deploy's end is said on the page
        await b.js(ROLLOUT_RECORDER)
        await b.js("document.getElementById('spec-text').value = arguments[0];"
                   " document.getElementById('spec-deploy').click();", json.dumps(edited, indent=2))
        await wait_js(b, "return document.getElementById('spec-result').textContent"
                         ".startsWith('deploying web: close this dialog')", 10, "the deploy under way")
        await b.js("document.getElementById('spec-close').click()")
        await wait_js(b, "return !document.getElementById('spec').open", 10, "the spec closed")
        await wait_js(b, "const m = document.getElementById('message');"
                         " return !m.hidden && m.className === 'info'"
                         " && m.querySelector('.text').textContent === 'web: version 2 deployed'",
                      330, "the deploy's end said on the page")
        status = json.loads(await self.cli(cp, "status", "web", "--json"))
        self.assertEqual(status["spec"]["cloud_init"]["env"]["size"], len('{"GREETING": "2"}'))
        self.assertEqual(status["spec"]["memory_mb"], 128)
        line = await wait_js(b, "const p = document.querySelector('[data-app=web] p[data-rollout]');"
                                " return p && p.dataset.rollout === 'completed' && p.textContent",
                             30, "the update shown completed on the app's card")
        self.assertRegex(line, r"^update completed \(.+\): version 2 rolled out: 1 machine\(s\) replaced$")
        self.assertEqual((await b.js("return window.__rollouts"))[:2], ["started", "completed"])
        self.assertRegex(await b.js("return window.__rolloutTexts[0]"),
                         r"^update under way 0 of 1 replaced \(.+\): rolling update to version 2")
        await b.shot("rollout.png")

        # a snapshot of its volume while it runs, from the volumes view; the event shows it
        await b.js("location.hash = '#volumes'")
        [vid] = [v["id"] for v in status["volumes"]]
        await self.click(b, f"button[data-action=snapshot][data-volume='{vid}']")
        await self.confirm(b, **{"snapshot-name": "from-the-console"})
        await wait_js(
            b, "const m = document.getElementById('message');"
               " return !m.hidden && m.className === 'info' && m.querySelector('.text').textContent"
               " === `snapshot from-the-console of ${arguments[0]} taken while its machine ran`",
            120, "the snapshot confirmed", vid)
        await wait_js(b, "const r = document.querySelector(`#volumes-table tr[data-volume='${arguments[0]}']`);"
                         " return r && r.querySelector('.snapshots').textContent === 'from-the-console'",
                      30, "the snapshot listed with its volume", vid)
        [snap] = json.loads(await self.cli(cp, "volumes", "snapshots", vid, "--json"))
        self.assertEqual((snap["name"], snap["live"], snap["state"]), ("from-the-console", True, "ready"))
        await b.js("location.hash = '#apps'")

        # scale to 0: the machine goes
        await self.click(b, "button[data-action=scale][data-app=web]")
        await self.confirm(b, **{"scale-replicas": 0})
        await wait_js(b, "return document.querySelectorAll('[data-app=web] tr[data-machine]').length === 0"
                         " && document.querySelector('[data-app=web] .replicas').textContent === '0 of 0 running'",
                      120, "no machines after scaling to 0")

        # activate the drained host
        await b.js("location.hash = '#hosts'")
        await self.click(b, f"button[data-action=activate][data-host='{drained}']")
        await self.confirm(b)
        await wait_js(b, "const r = document.querySelector(`#hosts-table tr[data-host='${arguments[0]}']`);"
                         " return r && r.dataset.state === 'ready'", 60, "the activated host", drained)
        state = {h["id"]: h["state"] for h in await host_list(reactor, cp)}
        self.assertEqual(state[drained], "ready")

        # the volume's snapshot replicated there, from the volumes view: the answer says
        # where, the event lists the replica with its volume; the host's removal below
        # takes it away
        self.assertNotEqual(snap["host_id"], drained)
        await b.js("location.hash = '#volumes'")
        await self.click(b, f"button[data-action=replicate][data-volume='{vid}']")
        await self.confirm(b, **{"replicate-snapshot": "from-the-console", "replicate-host": drained})
        said = await wait_js(b, "const m = document.getElementById('message');"
                                " const t = !m.hidden && m.className === 'info' && m.querySelector('.text').textContent;"
                                " return t && t.startsWith('replica ') && t", 120, "the replica made")
        self.assertRegex(said, rf"^replica from-the-console of {vid} kept on \S+ \(.+ of data\)$")
        replicas = ("const r = document.querySelector(`#volumes-table tr[data-volume='${arguments[0]}']`);"
                    " const t = r && r.querySelector('.volume-replicas').textContent;")
        shown = await wait_js(b, replicas + " return t && t.startsWith('from-the-console on ') && t",
                              30, "the replica listed with its volume", vid)
        self.assertNotIn("(", shown)  # ready, not creating
        # (its events are the replica's, not a volume's)
        self.assertEqual(await b.js("return [...document.querySelectorAll("
                                    "'#volumes-table tr[data-volume]')].map((r) => r.dataset.volume)"),
                         [vid])
        [made] = json.loads(await self.cli(cp, "volumes", "replicas", vid, "--json"))
        self.assertEqual((made["host_id"], made["state"]), (drained, "ready"))
        # a snapshot schedule, from the volumes view: its first run shown with the volume,
        # live; then unscheduled there
        await self.click(b, f"button[data-action=schedule][data-volume='{vid}']")
        await self.confirm(b, **{"schedule-every": "1h", "schedule-keep": 3})
        schedule = ("const r = document.querySelector(`#volumes-table tr[data-volume='${arguments[0]}']`);"
                    " const t = r && r.querySelector('.volume-schedule').textContent;")
        shown = await wait_js(b, schedule + " return t && t.includes('last run') && t", 60,
                              "the schedule's first run, with the volume", vid)
        self.assertRegex(shown, r"^every 1h, the last 3 kept; last run .+: ok$")
        [listed] = json.loads(await self.cli(cp, "volumes", "schedules", "--json"))
        self.assertEqual((listed["app"], listed["every"], listed["keep"], listed["replicate"]),
                         ("web", 3600, 3, False))
        await self.click(b, f"button[data-action=unschedule][data-volume='{vid}']")
        await self.confirm(b)
        await wait_js(b, schedule + " return t === '-'", 30, "the schedule gone", vid)
        self.assertEqual(json.loads(await self.cli(cp, "volumes", "schedules", "--json")), [])
        # its drain (the CLI) cannot move the replica (the other host is the volume's): the
        # Drains view says it stays, and why
        await self.cli(cp, "host", "drain", drained)
        await b.js("location.hash = '#drains'")
        left = await wait_js(b, "const x = document.querySelector(`section[data-drain][data-state=completed]"
                                " li[data-replica][data-state=left]`); return x && x.textContent", 30,
                             "the replica the drain left, in the Drains view")
        self.assertRegex(left, rf"^replica from-the-console of {vid}: left \(no host may keep ")
        await b.js("location.hash = '#hosts'")

        # remove it, its agent stopped: offline, then Remove; started again, it joins anew
        [agent] = [a for a in agents if a.host_id == drained]
        await agent.stop()
        row = "const r = document.querySelector(`#hosts-table tr[data-host='${arguments[0]}']`);"
        await wait_js(b, row + " return r && r.dataset.state === 'offline'", 60,
                      "the stopped agent's host offline", drained)
        self.assertEqual(await b.js(row + " return r.querySelector('.fence').textContent", drained),
                         "no fencing")  # (the agents' default: fence_after 0)
        await self.click(b, f"button[data-action=remove][data-host='{drained}']")
        await wait_js(b, "return document.getElementById('confirm').open", 60, "the dialog")
        self.assertIn("does not fence (fence_after 0): recover its volumes only once the host"
                      " is powered off",
                      await b.js("return document.getElementById('remove-fence').textContent"))
        # (it holds no volume: asking to recover them changes nothing, but it is asked)
        await b.js("document.getElementById('remove-recover-volumes').checked = true")
        await self.confirm(b)
        await wait_js(b, row + " const m = document.getElementById('message');"
                      " return !r && !m.hidden && m.className === 'info'", 30,
                      "the host removed", drained)
        self.assertNotIn(drained, [h["id"] for h in await host_list(reactor, cp)])
        [removal] = json.loads(await self.cli(cp, "audit", "--procedure", "zwrm.host.remove",
                                              "--json"))
        self.assertEqual(removal["args"], {"host_id": drained, "recover_volumes": True})
        await b.js("location.hash = '#volumes'")
        await wait_js(b, replicas + " return t === '-'", 30, "the replica gone with its host", vid)
        await b.js("location.hash = '#hosts'")
        await agent.start()
        await wait_js(b, TWO_READY_HOSTS, 60, "the host back, ready, after its agent started")
        # it joined anew, keeping the replica's file: the Hosts view says so; Clean deletes it
        [back] = [h["id"] for h in await host_list(reactor, cp) if h["id"] not in
                  (a.host_id for a in agents if a is not agent)]
        row = "const r = document.querySelector(`#hosts-table tr[data-host='${arguments[0]}']`);"
        said = await wait_js(b, row + " const u = r && r.querySelector('.unrecorded');"
                                      " return u && u.textContent", 60,
                             "what the host keeps unrecorded", back)
        self.assertEqual(said, "keeps what the cluster does not record: 1 snapshot file(s)")
        await self.click(b, f"button[data-action=clean][data-host='{back}']")
        await wait_js(b, "return document.getElementById('confirm').open", 60, "the dialog")
        self.assertIn(made["id"], await b.js(
            "return document.getElementById('confirm-extra').textContent"))
        await self.confirm(b)
        await wait_js(b, "const m = document.getElementById('message');"
                         " return !m.hidden && m.className === 'info' && m.querySelector('.text')"
                         ".textContent.endsWith(': deleted 1 snapshot file(s)')", 60,
                      "the host cleaned")
        await wait_js(b, row + " return r && !r.querySelector('.unrecorded')"
                               " && r.querySelector('button[data-action=clean]').disabled", 60,
                      "nothing unrecorded on the host", back)

        # the audit trail shows what the console did, as the operator
        await b.js("location.hash = '#audit'")
        done = await wait_js(b, "return [...document.querySelectorAll('#audit-table tr[data-procedure]')]"
                                ".map(r => r.dataset.procedure)", 30, "the audit trail")
        for procedure in ("zwrm.host.drain", "zwrm.machine.restart", "zwrm.app.scale",
                          "zwrm.app.deploy", "zwrm.volume.snapshot", "zwrm.volume.replicate",
                          "zwrm.volume.schedule", "zwrm.volume.unschedule", "zwrm.host.clean",
                          "zwrm.host.activate", "zwrm.host.undrain", "zwrm.host.remove"):
            self.assertIn(procedure, done)
        await b.shot("audit.png")

    async def _reconnect(self, cp, b):
        """The control plane restarts: the console reconnects by itself and is live again."""
        await b.js("window.__noReload = true")
        await cp.stop()
        await wait_js(b, "return document.getElementById('conn').textContent !== 'live'"
                         " && document.body.dataset.ready !== 'yes'", 30, "the connection lost")
        await cp.start()
        await wait_js(b, "return document.getElementById('conn').textContent === 'live'"
                         " && document.body.dataset.ready === 'yes'", 90, "reconnected and read again")
        await b.js("location.hash = '#apps'")
        await self.cli(cp, "apps", "create", "after-restart")
        await wait_js(b, "return !!document.querySelector('[data-app=after-restart]')", 30,
                      "an app created after the reconnect, shown live")
        self.assertTrue(await b.js("return window.__noReload === true"), "the page was reloaded")

    async def _partition(self, cp, b, agents):
        """
        Both hosts of dc1 lost at once (their agents stopped, then the control plane
        restarted: its first check after the grace marks both offline together): the hosts
        view says the partition guard holds them, with no row for the event's subject; it
        goes once they are back.
        """
        await gatherResults([Deferred.fromCoroutine(a.stop()) for a in agents])
        await cp.stop()
        await cp.start()
        banner = ("const p = document.querySelector('#partitions p[data-datacenter=dc1]');"
                  " const rows = [...document.querySelectorAll('#hosts-table tr[data-host]')];")
        text = await wait_js(
            b, banner + " return p && p.textContent.includes(' since ') && rows.length === 2"
                        " && rows.every(r => r.dataset.state === 'offline') && p.textContent",
            90, "the partition shown")
        self.assertIn("is partitioned", text)
        self.assertIn("100% of its hosts are offline (threshold 55%)", text)
        for a in agents:
            self.assertIn(a.name, text)
        await b.shot("partition.png")
        # web (scaled to 0) destroyed, its volume kept: the app stays as the volume's owner
        await self.cli(cp, "destroy", "web")
        await wait_js(b, "const c = document.querySelector('[data-app=web]');"
                         " return c && c.dataset.destroying === '' && !c.querySelector('tr[data-machine]')"
                         " && c.querySelector('button[data-action=scale]').disabled"
                         " && c.querySelector('.replicas').textContent === 'not deployed; keeps 1 volume(s)'"
                         " && [...document.querySelectorAll('#events-table tr[data-event]')]"
                         ".some(r => r.cells[2].textContent === 'app' && r.cells[3].textContent === 'destroyed')",
                      30, "the app kept for its volume after its destroyed event, nothing to scale")
        # then with its volume, whose host is out of reach: the destroy is stored and
        # waits; its card says so, its Scale button is disabled
        code, out, err = await run_cli(reactor, ["destroy", "web", "--volumes"], cp.url,
                                       cp.operator_token, timeout=60)
        self.assertEqual(code, 1, (out, err))
        self.assertIn("is being destroyed", err)
        await b.js("location.hash = '#apps'")
        card = ("const c = document.querySelector('[data-app=web]');"
                " const d = c && c.querySelector('.s-destroying');"
                " const s = c && c.querySelector('button[data-action=scale]');")
        shown = await wait_js(b, card + " return c && c.dataset.destroying === 'yes' && d"
                                         " && [d.textContent, s.disabled]",
                              30, "the app shown being destroyed")
        self.assertRegex(shown[0], r"^destroying since .+ \(volumes too\)$")
        self.assertTrue(shown[1], "Scale stays enabled while the app is being destroyed")
        await b.shot("destroying.png")
        await gatherResults([Deferred.fromCoroutine(a.start()) for a in agents])
        await wait_js(b, banner + " return !p && rows.length === 2", 60,
                      "the partition over once the hosts are back")
        await wait_js(b, TWO_READY_HOSTS, 60, "both hosts ready again")
        # the destroy goes on by itself once the volume's host is back: the card goes
        await wait_js(b, "return !document.querySelector('[data-app=web]')", 90,
                      "the app gone once its volume's host is back")
        apps = json.loads(await self.cli(cp, "apps", "list", "--json"))
        self.assertNotIn("web", [a["name"] for a in apps])
        await b.js("location.hash = '#hosts'")

    async def _viewer(self, cp, b, base, token):
        await b.js("document.getElementById('logout').click()")
        await wait_js(b, "return !document.getElementById('login-view').hidden", 30, "logged out")
        self.assertIsNone(await b.js("return sessionStorage.getItem('zwrm.console.token')"))
        await b.js(LOGIN, token)
        await wait_js(b, "return document.body.dataset.ready === 'yes'"
                         " && document.body.dataset.role === 'viewer'", 60, "console ready as viewer")
        ready = next(h["id"] for h in await host_list(reactor, cp) if h["state"] == "ready")
        await wait_js(b, "return document.querySelectorAll('#hosts-table tr[data-host]').length === 2",
                      30, "both hosts, as a viewer")
        buttons = await b.js("return [...document.querySelectorAll('button[data-action]')]"
                             ".map(x => [x.dataset.action, x.disabled])")
        self.assertTrue(buttons)
        self.assertEqual([a for a, disabled in buttons if not disabled], [], buttons)
        await b.shot("viewer.png")
        await b.js("location.hash = '#audit'")
        await wait_js(b, "return document.querySelector('#audit-table tbody').textContent"
                         ".includes('operators only')", 30, "no audit trail for a viewer")
        await b.js("location.hash = '#hosts'")
        # forced: the button enabled by hand and clicked; the router refuses the call
        await b.js("const x = document.querySelector(`button[data-action=drain][data-host='${arguments[0]}']`);"
                   " x.disabled = false; x.click();", ready)
        uri = await wait_js(b, "const m = document.getElementById('message');"
                               " return !m.hidden && m.dataset.uri", 30, "the refusal shown")
        self.assertEqual(uri, "wamp.error.not_authorized")
        self.assertIn("viewer", await b.js("return document.getElementById('message').textContent"))
        await b.shot("viewer-refused.png")
        state = {h["id"]: h["state"] for h in await host_list(reactor, cp)}
        self.assertEqual(state[ready], "ready")
