"""
A headless Firefox for the console's tests, driven over Marionette, Firefox's own remote
protocol (built in; Debian 12 has C{firefox-esr} but no C{geckodriver}), with Mozilla's Python
client C{marionette_driver} (PyPI).  Nothing is downloaded.

Firefox is started with C{spawnProcess} in a process group of its own (C{setsid}), with a
private profile and C{HOME} in a temporary directory; L{Firefox.stop} ends the whole group
(SIGTERM, a bounded wait, then SIGKILL) and removes that directory.  Every Marionette call is
blocking, so each runs in a thread, off the reactor.

The page's errors are read from Firefox itself (with system privileges, hence
C{--remote-allow-system-access}): script errors and CSP violations of the page's origin from
C{nsIConsoleService}, and its C{console.error} calls from the console API's storage.
"""

import os
import shutil
import signal
import tempfile

from twisted.internet.threads import deferToThread

from zwrm.testing.processes import _Collect, poll

FIREFOX = "/usr/bin/firefox-esr"
SETSID = "/usr/bin/setsid"

# Quiet start-up: no update, telemetry, remote settings or safe-browsing fetches, no first-run
# pages (Marionette sets more of these when the session starts; these hold from the start).
PREFS = {
    "marionette.port": 0,  # any free port: Firefox writes it to MarionetteActivePort
    "app.update.disabledForTesting": True,
    "app.normandy.enabled": False,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.page": 0,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.aboutwelcome.enabled": False,
    "browser.safebrowsing.update.enabled": False,
    "browser.safebrowsing.provider.mozilla.updateURL": "",
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "toolkit.telemetry.enabled": False,
    "extensions.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.proxy.type": 0,
    "services.settings.server": "data:,#remote-settings-dummy/v1",
}

ERRORS = """
const origin = arguments[0];
const out = [];
for (const m of Services.console.getMessageArray() || []) {
  if (!(m instanceof Ci.nsIScriptError)) continue;
  if (m.flags & (Ci.nsIScriptError.warningFlag | Ci.nsIScriptError.infoFlag)) continue;
  if (!(m.sourceName || '').startsWith(origin)) continue;
  out.push(`${m.category}: ${m.errorMessage} (${m.sourceName}:${m.lineNumber})`);
}
return out;
"""

CONSOLE_ERRORS = """
const origin = arguments[0];
const storage = Cc['@mozilla.org/consoleAPI-storage;1'].getService(Ci.nsIConsoleAPIStorage);
return storage.getEvents()
  .filter(e => e.level === 'error' && (e.filename || '').startsWith(origin))
  .map(e => `console.error: ${(e.arguments || []).map(String).join(' ')} (${e.filename}:${e.lineNumber})`);
"""


def missing():
    """What driving Firefox needs and this machine lacks (installed by the setup scripts in CI)."""
    out = []
    try:
        import marionette_driver  # noqa: F401
    except ImportError:
        out.append("marionette_driver (pip install -e .[test])")
    if not os.access(FIREFOX, os.X_OK):
        out.append(f"{FIREFOX} (apt-get install firefox-esr: scripts/install-system-deps)")
    return out


class Firefox:
    """A headless Firefox with one Marionette session."""

    def __init__(self, reactor, shots):
        self.reactor = reactor
        self.shots = shots
        self.dir = tempfile.mkdtemp(prefix="zwrm-firefox-")
        self.profile = os.path.join(self.dir, "profile")
        self.client = None
        self._proto = None
        self._transport = None

    @classmethod
    async def start(cls, reactor, shots, timeout=90):
        """Start Firefox and a Marionette session in it; on failure, everything is stopped."""
        self = cls(reactor, shots)
        try:
            await self._start(timeout)
        except BaseException:
            await self.stop()
            raise
        return self

    async def _start(self, timeout):
        from marionette_driver.marionette import Marionette

        home = os.path.join(self.dir, "home")
        os.makedirs(self.profile, mode=0o700)
        os.makedirs(home, mode=0o700)
        with open(os.path.join(self.profile, "user.js"), "w") as f:
            for name, value in PREFS.items():
                v = ("true" if value else "false") if isinstance(value, bool) else (
                    str(value) if isinstance(value, int) else f'"{value}"')
                f.write(f'user_pref("{name}", {v});\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MOZ_", "DISPLAY", "WAYLAND"))}
        env.update(HOME=home, XDG_CACHE_HOME=os.path.join(home, ".cache"),
                   XDG_CONFIG_HOME=os.path.join(home, ".config"), TMPDIR=home, MOZ_HEADLESS="1",
                   MOZ_CRASHREPORTER_DISABLE="1", MOZ_HEADLESS_WIDTH="1440",
                   MOZ_HEADLESS_HEIGHT="900")
        self.log_path = os.path.join(self.dir, "firefox.log")
        self._proto = _Collect(self.log_path)
        argv = [SETSID, FIREFOX, "--headless", "--no-remote", "--marionette",
                "--remote-allow-system-access", "--profile", self.profile, "about:blank"]
        # setsid execs Firefox in the same process (not a group leader after fork): its pid is
        # Firefox's, and the group of that pid holds Firefox and its content processes.
        self._transport = self.reactor.spawnProcess(self._proto, argv[0], argv, env=env,
                                                    path=self.dir)
        port_file = os.path.join(self.profile, "MarionetteActivePort")

        def port():
            if self._proto.ended.called:
                raise RuntimeError(f"firefox exited: {self.log_tail()}")
            try:
                with open(port_file) as f:
                    return int(f.read().strip() or 0)
            except (OSError, ValueError):
                return 0

        number = await poll(self.reactor, port, timeout, interval=0.1, what="Firefox's Marionette port")
        self.client = Marionette(host="127.0.0.1", port=number)
        client = self.client

        def session():
            client.start_session(timeout=timeout)
            client.timeout.page_load = 60
            client.timeout.script = 30
            client.set_window_rect(width=1440, height=900)

        await deferToThread(session)

    async def js(self, script, *args):
        # sandbox=None: in the page's own window, as WebDriver's execute_script (window.x stays)
        return await deferToThread(self.client.execute_script, script, script_args=list(args),
                                   sandbox=None)

    async def get(self, url):
        await deferToThread(self.client.navigate, url)

    async def shot(self, name):
        path = os.path.join(self.shots, name)
        data = await deferToThread(self.client.screenshot, format="binary")
        with open(path, "wb") as f:
            f.write(data)
        return path

    async def errors(self, origin):
        """
        The errors the page at C{origin} reported: exceptions and CSP violations (Firefox's
        console service, which the content processes forward to the parent's: chrome context),
        and C{console.error} calls (kept by the console API's storage in the page's content
        process: read there with the system principal, Marionette's C{system} sandbox).
        """

        def read():
            with self.client.using_context("chrome"):
                found = self.client.execute_script(ERRORS, script_args=[origin])
            return found + self.client.execute_script(CONSOLE_ERRORS, script_args=[origin],
                                                      sandbox="system")

        return await deferToThread(read)

    def log_tail(self, lines=30):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def _group(self, sig):
        pid = self._transport.pid if self._transport is not None else None
        if pid is None:
            return False
        try:
            os.killpg(pid, sig)
            return True
        except ProcessLookupError:
            return False

    async def stop(self, timeout=15):
        """End the session, Firefox and its content processes (bounded), remove the profile."""
        client, self.client = self.client, None
        if client is not None:
            try:
                await deferToThread(client.delete_session, send_request=True)
            except Exception:
                pass  # Firefox is ended below either way
        if self._proto is not None:
            self._group(signal.SIGTERM)
            ended = self._proto.ended
            timer = self.reactor.callLater(timeout, self._group, signal.SIGKILL)
            try:
                await ended
            finally:
                if timer.active():
                    timer.cancel()

            # the content processes, in the same group, go with it (bounded; then killed)
            def group_gone():
                return not self._group(0) or self._zombies_only()

            try:
                await poll(self.reactor, group_gone, timeout, interval=0.1, what="Firefox's processes gone")
            except AssertionError:
                self._group(signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _zombies_only(self):
        pgid = self._transport.pid
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return False
        return True
