"""
The web console in a real headless Firefox (Debian's C{firefox-esr}, driven over Marionette,
its built-in remote protocol, by Mozilla's C{marionette_driver}; tests/console/firefox.py),
against a real control plane and two real agents running the busybox test image under QEMU
(TCG).  Shorter than the Chromium test (tests/console/test_browser.py), which covers every
action: here what must work in Firefox's engine:

 - a wrong token is refused (the login form again, nothing kept); an operator logs in with a
   token and sees both hosts;
 - an app deployed with the CLI appears with its machine running, without a reload;
 - an operator action from the console (scale to 0: its button, its dialog) takes effect, and
   the event stream shows the machine's events;
 - a viewer finds every action button disabled, and a drain forced through the page anyway is
   refused by the router (C{wamp.error.not_authorized}), the host unchanged;
 - the page reported no error (exception, CSP violation, console.error) to Firefox's consoles.

Screenshots go to the test's temporary directory (printed; kept as CI artefacts).
"""

import json
import os

import pytest
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SkipTest, TestCase

from tests.console import firefox
from tests.console.pages import LOGIN, TWO_READY_HOSTS, wait_js
from zwrm.console import STATIC, VENDOR_AUTOBAHN
from zwrm.testing.processes import host_list, run_cli, start_vm_cluster


@pytest.mark.qemu
@pytest.mark.multihost
class ConsoleFirefoxTests(TestCase):
    timeout = 600

    def setUp(self):
        missing = firefox.missing()
        if not os.path.exists(os.path.join(STATIC, VENDOR_AUTOBAHN)):
            missing.append(f"zwrm/console/static/{VENDOR_AUTOBAHN} (scripts/build-console)")
        if missing:
            # under CI a skip fails the run (tests/conftest.py): the setup scripts install these
            raise SkipTest("the console's Firefox test needs " + "; ".join(missing))

    def test_console_in_firefox(self):
        return ensureDeferred(self._scenario())

    async def cli(self, cp, *args, timeout=120):
        code, out, err = await run_cli(reactor, list(args), cp.url, cp.operator_token,
                                       timeout=timeout)
        self.assertEqual(code, 0, f"zwrm {' '.join(args)} failed ({code}): {out} {err}")
        return out

    async def _scenario(self):
        shots = os.path.abspath(self.mktemp())
        os.makedirs(shots)
        print(f"console screenshots (Firefox): {shots}")
        cp, agents = await start_vm_cluster(reactor, self)
        base = f"http://127.0.0.1:{cp.port}"
        viewer = json.loads(await self.cli(cp, "tokens", "create", "--role", "viewer",
                                           "--ttl", "1h", "--json"))["token"]
        b = await firefox.Firefox.start(reactor, shots)
        self.addCleanup(b.stop)
        try:
            await self._operator(cp, b, base, agents)
            await self._viewer(cp, b, viewer)
        except BaseException:
            print("firefox: page errors:", await b.errors(base))
            print("firefox: log:", b.log_tail())
            await b.shot("failure.png")
            raise
        self.assertEqual(await b.errors(base), [],
                         "the page reported errors (an exception, a CSP violation, console.error)")

    async def _operator(self, cp, b, base, agents):
        await b.get(base + "/")
        await wait_js(b, "return !!document.getElementById('login')", 30, "the login form")
        # a wrong token: the form comes back with the router's reason, nothing is kept
        await b.js(LOGIN, "operator-0000.not-a-token")
        refused = await wait_js(b, "const p = document.getElementById('login-error');"
                                   " return !p.hidden && p.textContent", 60, "the refusal")
        self.assertIn("not accepted", refused)
        self.assertIsNone(await b.js("return sessionStorage.getItem('zwrm.console.token')"))
        await b.js(LOGIN, cp.operator_token)
        await wait_js(b, "return document.body.dataset.ready === 'yes'", 60, "console ready")
        self.assertEqual(await b.js("return document.body.dataset.role"), "operator")
        hosts = await wait_js(b, TWO_READY_HOSTS, 60, "two ready hosts in the hosts view")
        self.assertEqual({h["host"] for h in hosts}, {a.host_id for a in agents})
        await b.shot("hosts.png")

        # deploy with the CLI: the machine appears, running, without a reload
        await b.js("window.__noReload = true; location.hash = '#apps';")
        await self.cli(cp, "apps", "create", "web")
        await self.cli(cp, "deploy", "web", "--image", "demo:1", "--replicas", "1",
                       "--memory", "128", "--port", "8080", "--wait", "300", timeout=330)
        status = json.loads(await self.cli(cp, "status", "web", "--json"))
        machine = status["machines"][0]["id"]
        await wait_js(b, "const r = [...document.querySelectorAll('[data-app=web] tr[data-machine]')];"
                         " return r.length === 1 && r[0].dataset.machine === arguments[0]"
                         " && r[0].dataset.state === 'running';",
                      60, "the deployed machine, running, in the apps view", machine)
        self.assertTrue(await b.js("return window.__noReload === true"), "the page was reloaded")
        await b.shot("apps.png")

        # an operator action from the console: scale to 0 (its button, its dialog)
        await wait_js(b, "const x = document.querySelector('button[data-action=scale][data-app=web]');"
                         " return x && !x.disabled", 30, "an enabled Scale button")
        await b.js("document.querySelector('button[data-action=scale][data-app=web]').click()")
        await wait_js(b, "return document.getElementById('confirm').open", 30, "the scale dialog")
        await b.js("document.getElementById('scale-replicas').value = '0';"
                   " document.getElementById('confirm-ok').click();")
        await wait_js(b, "return document.querySelectorAll('[data-app=web] tr[data-machine]').length === 0"
                         " && document.querySelector('[data-app=web] .replicas').textContent === '0 of 0 running'",
                      120, "no machines after scaling to 0")
        status = json.loads(await self.cli(cp, "status", "web", "--json"))
        self.assertEqual(status["machines"], [])
        self.assertTrue(await b.js("return window.__noReload === true"), "the page was reloaded")
        await b.shot("scaled.png")
        # the event stream shows what happened, live
        await b.js("location.hash = '#events'")
        kinds = await wait_js(b, "const r = [...document.querySelectorAll('#events-table tr[data-event]')];"
                                 " return r.length > 5 && r.map(e => e.textContent).join(' ');",
                              30, "events in the events view")
        self.assertIn(machine, kinds)
        await b.shot("events.png")

    async def _viewer(self, cp, b, token):
        await b.js("document.getElementById('logout').click()")
        await wait_js(b, "return !document.getElementById('login-view').hidden", 30, "logged out")
        await b.js(LOGIN, token)
        await wait_js(b, "return document.body.dataset.ready === 'yes'"
                         " && document.body.dataset.role === 'viewer'", 60, "console ready as viewer")
        await b.js("location.hash = '#hosts'")
        await wait_js(b, "return document.querySelectorAll('#hosts-table tr[data-host]').length === 2",
                      30, "both hosts, as a viewer")
        buttons = await b.js("return [...document.querySelectorAll('button[data-action]')]"
                             ".map(x => [x.dataset.action, x.disabled])")
        self.assertIn("drain", [a for a, _ in buttons])
        self.assertEqual([a for a, disabled in buttons if not disabled], [], buttons)
        ready = next(h["id"] for h in await host_list(reactor, cp) if h["state"] == "ready")
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
