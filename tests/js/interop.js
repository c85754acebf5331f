// autobahn-js against zwrm's router: authenticates, registers, calls, publishes,
// subscribes and receives progressive results.  Driven by tests/wamp/test_js_interop.py.
//
// usage: node interop.js '<json config>'
//   {url, realm, serializer: "json"|"msgpack"|"cbor", authmethod: "ticket"|"wampcra"|"cryptosign",
//    authid, secret (ticket or CRA secret), seed (hex, cryptosign)}
// Prints one JSON line {"ok": true, ...results} or {"ok": false, "error": ...}; exit code 0 / 1.

"use strict";

if (typeof globalThis.WebSocket === "undefined") {
    // Node < 22 has no built-in WebSocket; autobahn-js 26 expects one.
    globalThis.WebSocket = require("ws");
}
const autobahn = require("autobahn");

const cfg = JSON.parse(process.argv[2]);
const out = {};

function finish(ok, extra) {
    console.log(JSON.stringify(Object.assign({ ok: ok }, out, extra || {})));
    process.exit(ok ? 0 : 1);
}

setTimeout(() => finish(false, { error: "timed out" }), 20000);

const serializers = {
    json: () => new autobahn.serializer.JSONSerializer(),
    msgpack: () => new autobahn.serializer.MsgpackSerializer(),
    cbor: () => new autobahn.serializer.CBORSerializer(),
};

const options = {
    url: cfg.url,
    realm: cfg.realm,
    serializers: [serializers[cfg.serializer]()],
    authmethods: [cfg.authmethod],
    authid: cfg.authid,
    max_retries: 0,
};

let key = null;
if (cfg.authmethod === "cryptosign") {
    key = autobahn.nacl.sign.keyPair.fromSeed(autobahn.util.htob(cfg.seed));
    options.authextra = { pubkey: autobahn.auth_cryptosign.public_key(key) };
}

options.onchallenge = function (session, method, extra) {
    if (method === "ticket") {
        return cfg.secret;
    } else if (method === "wampcra") {
        return autobahn.auth_cra.sign(cfg.secret, extra.challenge);
    } else if (method === "cryptosign") {
        return autobahn.auth_cryptosign.sign_challenge(key, extra);
    }
    throw new Error("unexpected challenge " + method);
};

const connection = new autobahn.Connection(options);

connection.onclose = function (reason, details) {
    if (!out.done) {
        finish(false, { error: "closed: " + reason + " " + JSON.stringify(details) });
    }
    return true; // do not reconnect
};

connection.onopen = async function (session, details) {
    try {
        out.authrole = details.authrole;
        out.authmethod = details.authmethod;

        // a JS callee, plain and progressive
        await session.register("test.js.echo", (args, kwargs) => new autobahn.Result(args, kwargs));
        await session.register("test.js.countdown", (args, kwargs, details) => {
            const n = args[0];
            for (let i = n; i > 0; i--) {
                if (details.progress) {
                    details.progress([i]);
                }
            }
            return "liftoff";
        });

        // a Python callee (in-process), result and application error
        out.add = await session.call("test.py.add", [2, 40]);
        try {
            await session.call("test.py.fail", ["x"]);
            out.fail = null;
        } catch (e) {
            out.fail = { error: e.error, args: e.args };
        }

        // progressive results from a Python callee
        out.progress = [];
        out.final = await session.call("test.py.count", [3], {}, { receive_progress: true }).then(
            (res) => res,
            (err) => { throw err; },
            (p) => { out.progress.push(p); },
        );

        // pub/sub through the router: our own event, and one the Python side publishes
        const gotOwn = new Promise((resolve) => {
            session.subscribe("test.js.topic", (args, kwargs, details) => resolve({ args, kwargs, publisher_authrole: details.publisher_authrole }));
        });
        const gotPy = new Promise((resolve) => {
            session.subscribe("test.py.", (args, kwargs, details) => resolve({ args, topic: details.topic }), { match: "prefix" });
        });
        await new Promise((r) => setTimeout(r, 50));
        await session.publish("test.js.topic", ["hello"], { from: "js" }, { acknowledge: true, exclude_me: false });
        out.own_event = await gotOwn;

        // ask Python to call our procedures and publish to us; it returns what it saw
        out.python_saw = await session.call("test.py.check_js");
        out.py_event = await gotPy;

        out.done = true;
        session.leave();
        finish(true);
    } catch (e) {
        finish(false, { error: String(e && (e.error || e.message || e)), detail: e && e.args });
    }
};

connection.open();
