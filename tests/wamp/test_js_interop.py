"""
Interop: autobahn-js (node, tests/js/interop.js) against the router over a real
WebSocket, with each serializer and each authentication method.
"""

import json
import os
import shutil
import subprocess

from autobahn.twisted.wamp import ApplicationSession
from autobahn.wamp.types import CallOptions, ComponentConfig, PublishOptions, RegisterOptions
from nacl.signing import SigningKey
from twisted.internet import defer, protocol, reactor
from twisted.python.filepath import FilePath
from twisted.trial import unittest

from tests.wamp.helpers import make_authorizer
from zwrm.errors import NotFound
from zwrm.wamp.auth import Principal, StaticAuthenticator
from zwrm.wamp.router import Router
from zwrm.wamp.transport import listen

JS_DIR = FilePath(__file__).parent().parent().child("js")
NODE = shutil.which("node")
SEED = bytes(range(32))


class PythonSide(ApplicationSession):
    async def onJoin(self, details):
        await self.register(lambda a, b: a + b, "test.py.add")
        await self.register(self.fail, "test.py.fail")
        await self.register(self.count, "test.py.count", options=RegisterOptions(details_arg="details"))
        await self.register(self.check_js, "test.py.check_js")

    def fail(self, name):
        raise NotFound(f"no such thing: {name}")

    def count(self, n, details=None):
        for i in range(n):
            if details.progress:
                details.progress(i)
        return "done"

    async def check_js(self):
        echo = await self.call("test.js.echo", 1, "a", k=True)
        progress = []
        final = await self.call("test.js.countdown", 3, options=CallOptions(on_progress=progress.append))
        await self.publish("test.py.hello", "from python", options=PublishOptions(acknowledge=True))
        return {"echo": [list(echo.results), echo.kwresults], "progress": progress, "final": final}


class NodeProcess(protocol.ProcessProtocol):
    def __init__(self):
        self.out = []
        self.err = []
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


def _install_node_modules():
    """
    Install tests/js's npm packages (as scripts/test does) if they are missing: a missing
    package is installed, not skipped.  Fails the tests with npm's last lines if it cannot.
    """
    if NODE is None or JS_DIR.child("node_modules").child("autobahn").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("tests/js/node_modules is missing and npm is not installed"
                           " (scripts/install-system-deps installs it)")
    try:
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=JS_DIR.path,
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise RuntimeError("npm install in tests/js did not finish in 600 s") from None
    if done.returncode != 0 or not JS_DIR.child("node_modules").child("autobahn").exists():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-10:])
        raise RuntimeError(f"npm install in tests/js failed ({done.returncode}):\n{tail}")


class JavaScriptInteropTests(unittest.TestCase):
    timeout = 90

    @classmethod
    def setUpClass(cls):
        _install_node_modules()

    def setUp(self):
        if NODE is None:
            raise unittest.SkipTest("node is not installed (scripts/install-system-deps installs it)")
        pub = SigningKey(SEED).verify_key.encode().hex()
        authn = StaticAuthenticator(
            tickets={"op": ("op-ticket", Principal("op", "operator"))},
            secrets={"cra": (b"cra-secret", Principal("cra", "operator"))},
            pubkeys={pub: Principal("cs", "operator")},
        )
        self.router = Router(reactor, authn, make_authorizer())
        d = self.router.attach(PythonSide(ComponentConfig(realm="zwrm")), "python", "operator")
        d.addCallback(lambda _: listen(reactor, self.router, "tcp:0:interface=127.0.0.1"))

        def listening(port):
            self.port = port
            self.addCleanup(port.stopListening)

        return d.addCallback(listening)

    @defer.inlineCallbacks
    def run_js(self, serializer, authmethod, authid, secret=None):
        cfg = {
            "url": f"ws://127.0.0.1:{self.port.getHost().port}/ws",
            "realm": "zwrm",
            "serializer": serializer,
            "authmethod": authmethod,
            "authid": authid,
            "secret": secret,
            "seed": SEED.hex(),
        }
        proc = NodeProcess()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        transport = reactor.spawnProcess(proc, NODE, [NODE, "interop.js", json.dumps(cfg)], env=env,
                                         path=JS_DIR.path)
        timer = reactor.callLater(60, transport.signalProcess, "KILL")
        code = yield proc.ended
        if timer.active():
            timer.cancel()
        out = b"".join(proc.out).decode()
        err = b"".join(proc.err).decode()
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        self.assertTrue(lines, f"no result from node (exit {code}): {out}\n{err}")
        result = json.loads(lines[-1])
        self.assertTrue(result["ok"], f"node failed: {result}\n{err}")
        self.assertEqual(code, 0)
        return result

    def check(self, r, authmethod):
        self.assertEqual(r["authrole"], "operator")
        self.assertEqual(r["authmethod"], authmethod)
        self.assertEqual(r["add"], 42)
        self.assertEqual(r["fail"], {"error": "zwrm.error.not_found", "args": ["no such thing: x"]})
        self.assertEqual(r["progress"], [0, 1, 2])
        self.assertEqual(r["final"], "done")
        self.assertEqual(r["own_event"], {"args": ["hello"], "kwargs": {"from": "js"},
                                          "publisher_authrole": "operator"})
        self.assertEqual(r["python_saw"], {"echo": [[1, "a"], {"k": True}], "progress": [3, 2, 1],
                                           "final": "liftoff"})
        self.assertEqual(r["py_event"], {"args": ["from python"], "topic": "test.py.hello"})

    @defer.inlineCallbacks
    def test_json_ticket(self):
        self.check((yield self.run_js("json", "ticket", "op", "op-ticket")), "ticket")

    @defer.inlineCallbacks
    def test_msgpack_wampcra(self):
        self.check((yield self.run_js("msgpack", "wampcra", "cra", "cra-secret")), "wampcra")

    @defer.inlineCallbacks
    def test_cbor_cryptosign(self):
        self.check((yield self.run_js("cbor", "cryptosign", "cs")), "cryptosign")

    @defer.inlineCallbacks
    def test_bad_ticket_is_refused(self):
        try:
            yield self.run_js("json", "ticket", "op", "wrong")
        except self.failureException as e:
            self.assertIn("authentication_failed", str(e))
        else:
            self.fail("node joined with a wrong ticket")
