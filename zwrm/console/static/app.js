// The zwrm web console (docs/console.md): one WAMP session over the control plane's /ws,
// authenticated with the operator's or viewer's token as its ticket. State is read once by
// RPC (and again after a reconnect), then kept live by the canonical zwrm.event.* events;
// nothing is polled. Actions call the same procedures as the CLI, so the router enforces
// roles: a viewer's buttons are disabled, and a call forced anyway is refused there.
//
// Everything shown is put in the page as text (textContent), never as HTML.

const autobahn = globalThis.autobahn;
const TOKEN_KEY = "zwrm.console.token";
const AUTHID_KEY = "zwrm.console.authid";
const MAX_EVENTS = 500;
const PHASES = ["planned", "bulk_copying", "stopping_source", "delta_copying",
  "starting_replacement", "waiting_healthy", "committing", "cleaning", "done"];

const state = {
  session: null, connection: null, role: null, authid: null, view: "hosts",
  hosts: new Map(), hostStatus: new Map(), readAt: null, partitions: new Map(),
  apps: new Map(), machines: new Map(), volumes: new Map(), snapshots: new Map(), replicas: new Map(), schedules: new Map(),
  drains: new Map(),
  events: [], lastEventId: 0, audit: null,
};

// -- small helpers --------------------------------------------------------------------

const $ = (sel, root = document) => root.querySelector(sel);

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "style") for (const [p, x] of Object.entries(v)) el.style.setProperty(p, x); // CSSOM: allowed by the CSP
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const stateBadge = (s) => h("span", { class: `state s-${s || "none"}` }, s || "-");
// What a machine's `paused` means (zwrm/cli/host.py's PAUSED says the same).
const PAUSED = {
  "disk-full": "a write to one of its disks waits for room on its host's disk; it resumes by itself once there is room",
};
// A machine's state, and why its hypervisor holds it if it does (the CLI's "running (paused: disk-full)").
const machineState = (m) => [stateBadge(m.state), m.paused ? h("span", { class: "state s-paused", title: PAUSED[m.paused] || m.paused }, `paused: ${m.paused}`) : null,
  m.paused ? h("div", { class: "small" }, PAUSED[m.paused] || m.paused) : null];

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n >= 10 || i === 0 ? n.toFixed(0) : n.toFixed(1)} ${units[i]}`;
}

const mib = (n) => bytes((n || 0) * 1024 * 1024);

function seconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "-";
  if (s < 1) return "<1 s";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

const time = (ts) => (ts ? new Date(ts * 1000).toLocaleTimeString() : "-");

function usage(used, total, fmt = (x) => x) {
  const pct = total ? Math.min(100, (100 * used) / total) : 0;
  return h("div", {}, h("span", { class: "small" }, `${fmt(used)} / ${fmt(total)}`),
    h("div", { class: "bar", title: `${pct.toFixed(0)} %` }, h("span", { style: { width: `${pct}%` } })));
}

function hostName(id) {
  const host = state.hosts.get(id);
  return host ? host.name || id : id || "-";
}

const isOperator = () => state.role === "operator";

// -- errors ---------------------------------------------------------------------------

function describe(err, procedure) {
  // autobahn.Error: {error: URI, args, kwargs}; anything else: its message.
  const uri = err && err.error;
  const text = err && Array.isArray(err.args) && typeof err.args[0] === "string" ? err.args[0] : null;
  if (uri === "wamp.error.not_authorized") {
    return { uri, text: `Your role (${state.role}) may not call ${procedure}.${text ? " " + text : ""}` };
  }
  if (uri === "wamp.error.no_such_procedure") {
    return { uri, text: `The control plane has no procedure ${procedure}.` };
  }
  if (uri) return { uri, text: text || uri.replace(/^zwrm\.error\./, "").replace(/_/g, " ") };
  return { uri: null, text: String((err && err.message) || err) };
}

function showMessage(text, uri = null, kind = "error") {
  const box = $("#message");
  box.replaceChildren(...[h("span", { class: "text" }, text), uri ? h("span", { class: "uri" }, uri) : null,
    h("button", { type: "button", onclick: () => { box.hidden = true; } }, "Dismiss")].filter(Boolean));
  box.className = kind;
  box.dataset.uri = uri || "";
  box.hidden = false;
  clearTimeout(showMessage.timer);
  if (kind === "info") showMessage.timer = setTimeout(() => { box.hidden = true; }, 8000); // errors stay
}

async function call(procedure, args = [], kwargs = {}) {
  try {
    return await state.session.call(procedure, args, kwargs);
  } catch (err) {
    const d = describe(err, procedure);
    showMessage(d.text, d.uri);
    throw err;
  }
}

// -- reading state --------------------------------------------------------------------

const timers = new Map();
function soon(key, fn, delay = 300) {
  // One call of fn per key within delay ms: several events in a burst cause one read.
  if (timers.has(key)) return;
  timers.set(key, setTimeout(async () => {
    timers.delete(key);
    try { await fn(); } catch (err) { console.warn(key, err); }
  }, delay));
}

const reads = new Map();
async function latest(key, read) {
  // The answer of read(), or undefined if a later read of the same key was asked meanwhile:
  // answers may come back out of order (one read may take more queries than the next),
  // and an older one must not overwrite what a newer one drew (a drain's "done" with the
  // phase before it, until the next event).
  const n = (reads.get(key) || 0) + 1;
  reads.set(key, n);
  const answer = await read();
  return reads.get(key) === n ? answer : undefined;
}

async function quiet(procedure, args = [], kwargs = {}) {
  // A read whose failure is not the operator's concern (e.g. a host never drained).
  try { return await state.session.call(procedure, args, kwargs); } catch (err) { return null; }
}

async function loadHosts() {
  const list = await latest("hosts", () => state.session.call("zwrm.host.list"));
  if (list === undefined) return; // a later read draws
  state.readAt = new Date().toLocaleTimeString();
  state.hosts = new Map(list.map((x) => [x.id, x]));
  // null from a control plane older than the procedure: the events alone then
  const parts = await quiet("zwrm.cluster.partitions");
  if (parts) state.partitions = new Map(parts.map((p) => [p.datacenter, p]));
  const statuses = await Promise.all(list.slice(0, 64).map((x) => quiet("zwrm.host.status", [x.id])));
  for (const s of statuses) if (s) state.hostStatus.set(s.id, s);
  render();
}

async function loadApps() {
  const list = await state.session.call("zwrm.app.list");
  const apps = new Map();
  for (const a of list) apps.set(a.name, a);
  for (const a of list) {
    const s = await quiet("zwrm.app.status", [a.name]);
    if (s) apps.set(a.name, Object.assign({}, a, s, { machines: undefined }));
  }
  state.apps = apps;
  const machines = await state.session.call("zwrm.machine.list");
  state.machines = new Map(machines.map((m) => [m.id, m]));
  const volumes = await state.session.call("zwrm.volume.list");
  state.volumes = new Map(volumes.map((v) => [v.id, v]));
  const snapshots = await state.session.call("zwrm.volume.snapshots");
  state.snapshots = new Map(snapshots.map((s) => [s.id, s]));
  const replicas = await state.session.call("zwrm.volume.replicas");
  state.replicas = new Map(replicas.map((r) => [r.id, r]));
  // (a control plane from before snapshot schedules has none)
  const schedules = (await quiet("zwrm.volume.schedules")) || [];
  state.schedules = new Map(schedules.map((x) => [x.app_id, x]));
  render();
}

async function loadDrain(hostId) {
  const s = await latest(`drain:${hostId}`, () => quiet("zwrm.host.drain_status", [hostId]));
  if (s === undefined) return; // a later read draws
  if (s) state.drains.set(hostId, s);
  render();
}

async function loadDrains() {
  await Promise.all([...state.hosts.keys()].map((id) => loadDrain(id)));
}

async function loadEvents() {
  let r;
  try {
    r = await state.session.call("zwrm.event.history", [],
      state.lastEventId ? { after: state.lastEventId, limit: 1000 } : { limit: 200 });
  } catch (err) {
    if (err.error !== "zwrm.error.history_gone") throw err;
    r = await state.session.call("zwrm.event.history", [], { limit: 200 });
  }
  for (const e of r.events) addEvent(e, false);
  render();
}

async function loadAll() {
  await loadHosts();
  await Promise.all([loadApps(), loadDrains(), loadEvents()]);
}

// -- events ---------------------------------------------------------------------------

function addEvent(e, live) {
  if (!e || typeof e.id !== "number" || state.events.some((x) => x.id === e.id)) return false;
  state.events.push(Object.assign({ live }, e));
  state.events.sort((a, b) => b.id - a.id);
  if (state.events.length > MAX_EVENTS) state.events.length = MAX_EVENTS;
  state.lastEventId = Math.max(state.lastEventId, e.id);
  return true;
}

function onEvent(args, kwargs, details) {
  const e = args && args[0];
  if (!e || !e.payload) return;
  addEvent(e, true);
  const p = e.payload;
  switch (e.topic) {
    case "zwrm.event.host": {
      if (e.kind === "partition") { // subject dc:<name>, not a host
        if (p.state === "over") state.partitions.delete(p.datacenter);
        else state.partitions.set(p.datacenter, Object.assign({}, state.partitions.get(p.datacenter), p));
        soon("hosts", loadHosts, 500);
        break;
      }
      if (!p.id) break;
      const old = state.hosts.get(p.id) || {};
      if (e.kind === "removed") state.hosts.delete(p.id);
      else state.hosts.set(p.id, Object.assign({}, old, p));
      soon("hosts", loadHosts, 500);
      soon(`drain:${p.id}`, () => loadDrain(p.id));
      break;
    }
    case "zwrm.event.machine":
      if (e.kind === "state") state.machines.set(p.id, p);
      else if (e.kind === "destroyed") state.machines.delete(p.id || e.subject);
      else if (e.kind === "volume_destroyed") state.volumes.delete(p.id || e.subject);
      // a volume's snapshots: their rows (snapshot_id), kept apart from the volumes
      else if (e.kind === "volume_snapshot") {
        state.snapshots.set(p.snapshot_id, snapshotRow(p));
        state.replicas.delete(p.snapshot_id); // a replica that became a snapshot keeps its id
      } else if (e.kind.startsWith("volume_snapshot_")) state.snapshots.delete(p.snapshot_id);
      else if (e.kind === "volume_restored") state.snapshots.set(p.kept.id, snapshotRow(p.kept));
      // its replicas on other hosts: their rows (replica_id), kept apart too
      else if (e.kind === "volume_replica") state.replicas.set(p.replica_id, replicaRow(p));
      else if (e.kind.startsWith("volume_replica_")) state.replicas.delete(p.replica_id);
      // an app's snapshot schedule (subject: the app's id): set, a run's end, or gone
      else if (e.kind === "snapshot_schedule_destroyed") state.schedules.delete(p.app_id);
      else if (e.kind.startsWith("snapshot_schedule")) {
        const x = Object.assign({}, state.schedules.get(p.app_id), p);
        delete x.reason;
        state.schedules.set(p.app_id, x);
      }
      else if (e.kind === "volume_recovered") {
        const v = Object.assign({}, p);
        delete v.reason; delete v.volume_id; delete v.from; delete v.replica;
        state.volumes.set(v.id, Object.assign({}, state.volumes.get(v.id), v));
      }
      else if (e.kind.startsWith("volume")) {
        const v = Object.assign({}, p);
        delete v.reason; delete v.volume_id;
        state.volumes.set(v.id, Object.assign({}, state.volumes.get(v.id), v));
      }
      soon("hosts", loadHosts, 1000); // allocations and image caches are not announced
      break;
    case "zwrm.event.app":
      // a destroy that keeps the app's volumes leaves the app, without a spec, as their owner
      if (e.kind === "destroyed" && !p.volumes_kept) state.apps.delete(p.name);
      else state.apps.set(p.name, Object.assign({}, state.apps.get(p.name), {
        id: p.id, name: p.name, spec: p.spec, spec_version: p.spec_version,
        image: p.spec && p.spec.image, replicas: p.spec && p.spec.replicas,
        destroying: p.destroying ?? null,
      }, e.kind === "rollout" ? { rollout: Object.assign({}, p, { at: e.ts }) } : {}));
      break;
    case "zwrm.event.drain": {
      const hostId = p.host_id || p.source_host;
      if (hostId) soon(`drain:${hostId}`, () => loadDrain(hostId), 200);
      break;
    }
    default:
      break;
  }
  render();
}

// -- actions --------------------------------------------------------------------------

function ask(text, extra = null) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  $("#confirm-extra").replaceChildren(...(extra ? [extra] : []));
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
  });
}

function actionButton(label, action, data, run, enabled = true) {
  const viewer = !isOperator();
  return h("button", {
    type: "button", dataset: Object.assign({ action }, data),
    disabled: viewer || !enabled,
    title: viewer ? "viewers see everything and change nothing" : null,
    onclick: async (ev) => {
      const button = ev.currentTarget;
      button.disabled = true;
      try { await run(); } catch (err) { /* shown by call() */ } finally { render(); }
    },
  }, label);
}

async function drain(host) {
  let plan;
  try {
    plan = await call("zwrm.host.drain", [host.id], { dry_run: true });
  } catch (err) {
    return;
  }
  const moves = (plan.plan || []).map((m) => h("li", {},
    `${m.app || "-"} ${m.machine_id} -> ${m.target ? hostName(m.target) : "nowhere: " + (m.reason || "no host fits")}`));
  const replicas = (plan.replicas || []).map((r) => h("li", {},
    `replica ${r.name} of ${r.volume_id} -> ${r.target ? hostName(r.target) : "stays: " + r.reason}`));
  const minHealthy = h("input", { id: "drain-min-healthy", type: "number", min: "0", step: "1", placeholder: "10" });
  const extra = h("div", {}, moves.length ? h("ul", {}, moves) : h("p", {}, "No machines to move."),
    replicas.length ? h("ul", {}, replicas) : null,
    h("label", {}, "Seconds a replacement must stay healthy: ", minHealthy));
  if (!(await ask(`Drain ${host.name || host.id}?`, extra))) return;
  const kwargs = {};
  if (minHealthy.value !== "") kwargs.min_healthy = Number(minHealthy.value);
  const r = await call("zwrm.host.drain", [host.id], kwargs);
  showMessage(`Drain ${r.drain_id} of ${host.name || host.id} started.`, null, "info");
  state.view = "drains";
  location.hash = "#drains";
  soon(`drain:${host.id}`, () => loadDrain(host.id), 100);
}

// What a host keeps that the cluster does not record (zwrm.host.status's unrecorded, its
// agent asked then): a removed host's old volumes when it joins again, a replica deleted
// while its host could not be asked. `zwrm host status` lists them, `zwrm host clean` deletes them.
const UNRECORDED = [["volumes", "volume(s)"], ["snapshots", "snapshot file(s)"], ["machines", "machine record(s)"]];
const unrecordedCount = (u) => (u ? UNRECORDED.reduce((n, [k]) => n + (u[k] || []).length, 0) : 0);
const unrecordedText = (u) => UNRECORDED.filter(([k]) => (u[k] || []).length)
  .map(([k, what]) => `${u[k].length} ${what}`).join(", ");

async function cleanHost(host, unrecorded) {
  const items = UNRECORDED.flatMap(([k, what]) => (unrecorded[k] || []).map((x) => h("li", { class: "mono" },
    `${what.replace("(s)", "")} ${x.id}` + (x.volume_id ? ` of ${x.volume_id}` : "")
    + (x.allocated_bytes !== undefined && x.allocated_bytes !== null ? ` (${bytes(x.allocated_bytes)} of data)` : "")
    + (x.state ? ` (${x.state})` : ""))));
  const ok = await ask(`Delete what ${host.name || host.id} keeps that the cluster does not record? (Read`
    + " again before: what is under way, or recorded meanwhile, is left alone. Machine records still running"
    + " stay.)", h("ul", {}, items));
  if (!ok) return;
  const r = await call("zwrm.host.clean", [host.id]);
  const done = UNRECORDED.filter(([k]) => r.deleted[k].length).map(([k, what]) => `${r.deleted[k].length} ${what}`);
  const kept = r.kept.map((x) => `${x.id}: ${x.reason}`);
  showMessage(`${host.name || host.id}: deleted ${done.join(", ") || "nothing"}`
    + (kept.length ? `; kept ${kept.join("; ")}` : ""), null, kept.length ? "error" : "info");
  soon("hosts", loadHosts, 100);
}

async function hostAction(host, verb) {
  if (!(await ask(`${verb[0].toUpperCase() + verb.slice(1)} ${host.name || host.id}?`))) return;
  await call(`zwrm.host.${verb}`, [host.id]);
}

// What recovering a host's volumes elsewhere relies on (the CLI's "fence" line of zwrm host status).
function fenceNote(host) {
  return host.fence_after
    ? `Its agent stops its machines with volumes ${host.fence_after} s after it last heard from the control plane` +
      " (fence_after): their recovery is refused until then, and 15 s more."
    : "Its agent does not fence (fence_after 0): recover its volumes only once the host is powered off," +
      " or a machine with volumes may run twice.";
}

async function removeHost(host) {
  // Only an offline host (docs/operators.md, "Removing a host"); one holding volumes is
  // refused unless they are recovered from their replicas (the CLI's --recover-volumes);
  // giving their data up is the CLI's alone (--forget-volumes). A refusal is shown as any other.
  const recover = h("input", { id: "remove-recover-volumes", type: "checkbox" });
  const extra = h("div", {}, h("label", {}, recover,
    " Recover its volumes from their newest replicas on other hosts (the writes since those snapshots are lost)"),
  h("p", { class: "small", id: "remove-fence" }, fenceNote(host)));
  const ok = await ask(`Remove ${host.name || host.id} from the cluster? Its record and credential go;` +
    " the replicas that failed with it are placed again elsewhere. Its agent, started again, joins as a new host.", extra);
  if (!ok) return;
  const r = await call("zwrm.host.remove", [host.id], recover.checked ? { recover_volumes: true } : {});
  state.hosts.delete(host.id);
  const recovered = (r && r.volumes_recovered) || [];
  showMessage(`${host.name || host.id} removed` + (recovered.length ?
    `; ${recovered.map((v) => `volume ${v.volume_id} recovered on ${hostName(v.host_id)}`).join(", ")}` : ""),
  null, "info");
}

async function scale(app) {
  const input = h("input", { id: "scale-replicas", type: "number", min: "0", max: "1000",
    value: String(app.replicas ?? (app.spec && app.spec.replicas) ?? 1) });
  if (!(await ask(`Scale ${app.name} to how many replicas?`, input))) return;
  await call("zwrm.app.scale", [app.name, Number(input.value)]);
}

async function restart(machine) {
  // In place: the same machine on the same host, its volumes and root disk kept. It leaves the
  // routes, waits its app's shutdown delay, stops gracefully and starts again.
  const ok = await ask(`Restart ${machine.id} of ${machine.app} in place? It leaves the routes, waits` +
    " its app's shutdown delay, stops and starts again on the same host (volumes kept).");
  if (!ok) return;
  await call("zwrm.machine.restart", [machine.id]);
  showMessage(`${machine.id} restarted`, null, "info");
}

// An app's spec, edited and deployed as a whole, as `zwrm apps spec` and `zwrm deploy --file`
// do: JSON here (the page has no TOML), null and empty fields left out. A field the edit
// leaves out is back to its default, but replicas (the current count). Cloud-init user_data
// and env show as their digest (sha256, size), which a deploy takes as the current value.
// Plan asks zwrm.app.plan (nothing changes); Deploy asks zwrm.app.deploy, which answers once
// a rolling update ended (the app's card follows it meanwhile).
const SPEC_FIELDS = ["cloud_init", "constraints", "datacenter", "domain", "health", "image", "memory_mb",
  "publish", "region", "replicas", "restart", "service_port", "shutdown_delay", "update", "vcpus", "volumes"];

function bare(v) {
  if (Array.isArray(v)) return v.map(bare);
  if (!v || typeof v !== "object") return v;
  const out = {};
  for (const [k, x] of Object.entries(v)) {
    const empty = x === null || (Array.isArray(x) ? !x.length : typeof x === "object" && !Object.keys(x).length);
    if (!empty) out[k] = bare(x);
  }
  return out;
}

function wholeSpec(text) {
  let given;
  try { given = JSON.parse(text); } catch (err) { throw new Error(`the spec is not JSON: ${err.message}`); }
  if (!given || typeof given !== "object" || Array.isArray(given)) throw new Error("a spec is an object of fields");
  const unknown = Object.keys(given).filter((k) => !SPEC_FIELDS.includes(k)).sort();
  if (unknown.length) {
    throw new Error(`unknown field(s) ${unknown.join(", ")} (a spec's fields are ${SPEC_FIELDS.join(", ")})`);
  }
  const spec = Object.fromEntries(SPEC_FIELDS.filter((f) => f !== "replicas").map((f) => [f, null]));
  return Object.assign(spec, given);
}

function planText(plan) {
  // as `zwrm deploy --plan`
  const j = (v) => JSON.stringify(v);
  return [`${plan.app}: ${plan.changed ? "new version" : "no change to version"} ${plan.version}`,
    ...Object.entries(plan.diff || {}).map(([k, d]) => `  ${k}: ${j(d.old)} -> ${j(d.new)}`),
    ...(plan.create || []).map((c) => `create   replica ${c.replica} on ${c.host_id ? hostName(c.host_id) : "?"}`),
    ...(plan.replace || []).map((r) => `${r.to_host && r.to_host !== r.host_id ? "move   " : "replace"}  ${r.machine_id}` +
      ` (replica ${r.replica}, ${r.state}) on ${hostName(r.host_id)} -> ${r.to_host ? hostName(r.to_host) : "?"}`),
    ...(plan.destroy || []).map((r) => `destroy  ${r.machine_id} (replica ${r.replica}) on ${hostName(r.host_id)}`),
    ...(plan.keep || []).map((r) => `keep     ${r.machine_id} (replica ${r.replica}) on ${hostName(r.host_id)}`),
    ...(plan.unplaceable ? [`unplaceable: ${plan.unplaceable}`] : [])].join("\n");
}

async function showSpec(app) {
  const status = await call("zwrm.app.status", [app.name]);
  const text = $("#spec-text");
  const result = $("#spec-result");
  const say = (line, kind = "") => {
    result.textContent = line;
    result.className = kind;
    result.dataset.kind = kind || "ok";
    result.hidden = false;
  };
  const run = async (button, procedure, done) => {
    let spec;
    try { spec = wholeSpec(text.value); } catch (err) { say(err.message, "error"); return; }
    button.disabled = true;
    try {
      done(await state.session.call(procedure, [app.name, spec]));
    } catch (err) {
      const d = describe(err, procedure);
      say(d.text, "error");
      // (a deploy outlives a dialog closed to watch the card: its end is said there too)
      if (!$("#spec").open) showMessage(d.text, d.uri);
    } finally {
      button.disabled = false;
    }
  };
  $("#spec-title").textContent = `${app.name}: spec version ${status.spec_version}`;
  $("#spec-hint").textContent = "JSON; a field left out is its default (replicas: the current count)";
  text.value = JSON.stringify(bare(status.spec), null, 2);
  result.hidden = true;
  $("#spec-plan").onclick = (ev) => run(ev.currentTarget, "zwrm.app.plan", (plan) => say(planText(plan)));
  $("#spec-deploy").onclick = (ev) => {
    say(`deploying ${app.name}: close this dialog to follow its update on the app's card`);
    return run(ev.currentTarget, "zwrm.app.deploy", (s) => {
      say(`${app.name}: version ${s.spec_version} deployed`);
      $("#spec-title").textContent = `${app.name}: spec version ${s.spec_version}`;
      if (!$("#spec").open) showMessage(`${app.name}: version ${s.spec_version} deployed`, null, "info");
    });
  };
  const dialog = $("#spec");
  if (!dialog.open) dialog.showModal();
}

// The tail of a machine's serial console (zwrm.machine.logs: its last 64 KiB, as `zwrm logs`),
// read again on Refresh: a crashed guest's last words too. Operators only (a guest's console
// may show what a viewer must not see); a refused or failed read is shown as any error.
async function showLogs(machine) {
  const pre = $("#logs-text");
  const read = async () => {
    const text = await call("zwrm.machine.logs", [machine.id]);
    pre.textContent = text || "(the guest has written nothing yet)";
    $("#logs-read").textContent = `read at ${new Date().toLocaleTimeString()}`;
    pre.scrollTop = pre.scrollHeight;
  };
  $("#logs-title").textContent = `${machine.id} of ${machine.app}: serial console`;
  $("#logs-refresh").onclick = () => read().catch(() => { /* shown by call() */ });
  await read();
  const dialog = $("#logs");
  if (!dialog.open) dialog.showModal();
  pre.scrollTop = pre.scrollHeight;
}

// -- rendering ------------------------------------------------------------------------

let frame = 0;
function render() {
  if (frame) return;
  frame = requestAnimationFrame(() => { frame = 0; draw(); });
}

function draw() {
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== `${state.view}-view`;
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.view === state.view);
  // Every view, not only the one shown: a hidden one must not keep buttons drawn for
  // another session's role.
  drawHosts(); drawApps(); drawVolumes(); drawDrains(); drawEvents(); drawAudit();
}

function heartbeatCell(host) {
  // Heartbeats are not announced (one event per host every few seconds would drown the
  // stream): the age is the one read last (at each host or machine event, or Reload), with
  // when it was read. A host whose heartbeats stop turns offline by event.
  if (host.heartbeat_age === undefined || host.heartbeat_age === null) return "-";
  return [`${seconds(host.heartbeat_age)}`, h("div", { class: "small" }, `as of ${state.readAt || "-"}`)];
}

function drawPartitions() {
  const parts = [...state.partitions.values()].sort((a, b) => (a.datacenter || "").localeCompare(b.datacenter || ""));
  $("#partitions").replaceChildren(...parts.map((p) => h("p", { class: "warning", dataset: { datacenter: p.datacenter } },
    `Datacenter ${p.datacenter || "(none)"} is partitioned`,
    p.since ? ` since ${new Date(p.since * 1000).toLocaleTimeString()}` : "",
    `: ${Math.round(100 * (p.offline_share || 0))}% of its hosts are offline (threshold ${Math.round(100 * (p.threshold || 0))}%). `,
    `The replicas of the hosts held (${(p.held_hosts || []).map(hostName).join(", ") || "none"}) `,
    p.evicting ? "are placed elsewhere one host at a time, now that enough hosts are back."
      : "are not placed elsewhere until enough hosts return.")));
}

function drawHosts() {
  drawPartitions();
  const hosts = [...state.hosts.values()].sort((a, b) => (a.name || a.id).localeCompare(b.name || b.id));
  $("#hosts-count").textContent = `(${hosts.length})`;
  const rows = hosts.map((x) => {
    const st = state.hostStatus.get(x.id);
    const cache = st && st.stats && st.stats.image_cache;
    return h("tr", { dataset: { host: x.id, state: x.state, diskFull: x.disk_full ? "yes" : "" } },
      h("td", {}, x.name || "-", h("div", { class: "small" }, [x.region, x.datacenter].filter(Boolean).join(" / "))),
      h("td", { class: "mono" }, x.id),
      h("td", {}, stateBadge(x.state), x.executor === false && x.state !== "offline" ? h("div", { class: "small" }, "agent not callable") : null,
        h("div", { class: "small fence", title: fenceNote(x) }, x.fence_after ? `fences after ${x.fence_after} s` : "no fencing")),
      h("td", {}, usage(x.alloc_vcpus || 0, x.vcpus || 0)),
      h("td", {}, usage(x.alloc_memory_mb || 0, x.memory_mb || 0, mib)),
      h("td", {}, usage(x.alloc_disk_mb || 0, x.disk_mb || 0, mib),
        x.disk_full ? h("div", {}, h("span", { class: "state s-disk_full", title: "its heartbeats say its data disk is nearly full" }, "disk full"),
          h("div", { class: "small" }, "no new placements")) : null),
      h("td", { class: "num" }, [...state.machines.values()].filter((m) => m.host_id === x.id).length),
      h("td", { class: "num heartbeat" }, heartbeatCell(x)),
      h("td", {}, cache ? usage(cache.size, cache.limit, bytes) : "-",
        cache ? h("div", { class: "small" }, `${cache.blobs} blobs, ${cache.hits} hits, ${cache.misses} misses`) : null),
      h("td", {}, h("div", { class: "actions" },
        actionButton("Drain", "drain", { host: x.id }, () => drain(x), x.state === "ready"),
        actionButton("Undrain", "undrain", { host: x.id }, () => hostAction(x, "undrain"), x.state === "draining"),
        actionButton("Activate", "activate", { host: x.id }, () => hostAction(x, "activate"), x.state === "drained"),
        actionButton("Remove", "remove", { host: x.id }, () => removeHost(x), x.state === "offline"),
        actionButton("Clean", "clean", { host: x.id }, () => cleanHost(x, st.unrecorded),
          !!(st && unrecordedCount(st.unrecorded)) && (x.state === "ready" || x.state === "drained"))),
      st && unrecordedCount(st.unrecorded) ? h("div", { class: "small unrecorded", title: "zwrm never deletes"
        + " these on its own: they may be the only copy of something (Clean deletes them)" },
      `keeps what the cluster does not record: ${unrecordedText(st.unrecorded)}`) : null));
  });
  $("#hosts-table tbody").replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 10, class: "empty" }, "No hosts have joined yet."))]));
}

// Whether an app has a spec (zwrm.app.list alone, without the status, says so by its image).
const deployed = (a) => (a.spec !== undefined ? !!a.spec : !!a.image);

function notDeployed(a) {
  // Never deployed, or destroyed with its volumes kept (it stays as their owner).
  const kept = [...state.volumes.values()].filter((v) => v.app_id === a.id).length;
  return kept ? `not deployed; keeps ${kept} volume(s)` : "not deployed";
}

// An app's last rolling update (zwrm.app.status's rollout, then its rollout events), as
// zwrm status's "update" line: under way, completed, failed or reverted, and why.
function rolloutLine(r) {
  if (!r || !r.state) return null;
  const underWay = r.state === "started" || r.state === "progress";
  return h("p", { class: "small rollout", dataset: { rollout: r.state } },
    "update ", h("span", { class: `state s-${underWay ? "rolling" : r.state}` }, underWay ? "under way" : r.state),
    underWay && r.total ? ` ${r.replaced || 0} of ${r.total} replaced` : "",
    ` (${time(r.at)}): ${r.reason || "-"}`);
}

function drawApps() {
  const apps = [...state.apps.values()].sort((a, b) => a.name.localeCompare(b.name));
  $("#apps-count").textContent = `(${apps.length})`;
  const cards = apps.map((a) => {
    const machines = [...state.machines.values()].filter((m) => m.app === a.name)
      .sort((x, y) => (x.replica - y.replica) || x.id.localeCompare(y.id));
    const replicas = a.replicas ?? (a.spec && a.spec.replicas);
    // zwrm.app.list says only whether; zwrm.app.status and the events say since when
    const d = a.destroying && typeof a.destroying === "object" ? a.destroying : null;
    return h("section", { class: "card", dataset: { app: a.name, destroying: a.destroying ? "yes" : "" } },
      h("header", {}, h("h3", {}, a.name),
        h("span", { class: "small" }, `image ${a.image || (a.spec && a.spec.image) || "-"}`),
        h("span", { class: "small replicas" }, deployed(a)
          ? `${machines.filter((m) => m.state === "running").length} of ${replicas ?? "-"} running`
          : notDeployed(a)),
        a.destroying ? h("span", {
          class: "state s-destroying",
          title: "the destroy is stored and goes on by itself (after a restart of the control plane too);"
            + " a deploy or scale is refused until the app is gone",
        }, d ? `destroying since ${time(d.since)} (${d.volumes ? "volumes too" : "volumes kept"})` : "destroying") : null,
        // (a spec to scale: one never deployed, or destroyed with its volumes kept, has none)
        actionButton("Scale", "scale", { app: a.name }, () => scale(Object.assign({ replicas }, a)),
          !a.destroying && deployed(a)),
        actionButton("Spec", "spec", { app: a.name }, () => showSpec(a), !a.destroying && deployed(a))),
      rolloutLine(a.rollout),
      machines.length ? h("table", {},
        h("thead", {}, h("tr", {}, ["Machine", "Replica", "State", "Health", "Restarts", "Host", "Address", "Volumes", ""].map((t) => h("th", {}, t)))),
        h("tbody", {}, machines.map((m) => h("tr", { dataset: { machine: m.id, state: m.state, paused: m.paused || "" } },
          h("td", { class: "mono" }, m.id),
          h("td", { class: "num" }, m.replica),
          h("td", {}, ...machineState(m)),
          h("td", {}, stateBadge(m.health)),
          h("td", { class: "num" }, m.restarts || 0, m.restart_reason ? h("div", { class: "small" }, m.restart_reason) : null),
          h("td", {}, hostName(m.host_id)),
          h("td", { class: "mono" }, [m.address, m.host_port ? `127.0.0.1:${m.host_port}` : null].filter(Boolean).join(" ") || "-"),
          h("td", { class: "mono" }, (m.volumes || []).join(" ") || "-"),
          h("td", {}, h("div", { class: "actions" }, actionButton("Logs", "logs", { machine: m.id }, () => showLogs(m)),
            actionButton("Restart", "restart", { machine: m.id }, () => restart(m))))))))
        : h("p", { class: "empty" }, "No machines."));
  });
  $("#apps-list").replaceChildren(...(cards.length ? cards : [h("p", { class: "empty" }, "No apps yet.")]));
}

function snapshotRow(p) {
  const s = Object.assign({}, p);
  delete s.reason; delete s.snapshot_id;
  return s;
}

function replicaRow(p) {
  const r = Object.assign({}, p);
  delete r.reason; delete r.replica_id;
  return r;
}

// A snapshot of a volume on its host, as `zwrm volumes snapshot` takes it (while its machine
// runs: a point in time). Restores are the CLI's: `zwrm volumes restore --restart`.
async function snapshot(volume) {
  const input = h("input", { type: "text", id: "snapshot-name", placeholder: "the time (UTC)" });
  if (!(await ask(`Snapshot volume ${volume.id} (${volume.name}) on its host? Its name` +
    " (optional):", input))) return;
  const s = await call("zwrm.volume.snapshot", [volume.id], input.value ? { name: input.value } : {});
  showMessage(`snapshot ${s.name} of ${volume.id} taken ${s.live ? "while its machine ran" : "at rest"}`,
    null, "info");
}

// A copy of one of a volume's snapshots on another host, as `zwrm volumes replicate` makes
// it: the snapshot (the newest by default) and the host (default: the cluster chooses, by
// where its other replicas are and who has the room). A big copy takes a while; the answer
// comes once it is verified on that host.
async function replicate(volume) {
  const snaps = [...state.snapshots.values()].filter((s) => s.volume_id === volume.id && s.state === "ready")
    .sort((a, b) => b.created_at - a.created_at);
  const which = h("select", { id: "replicate-snapshot" }, snaps.map((s) => h("option", { value: s.name }, s.name)));
  const hosts = [...state.hosts.values()].filter((x) => x.id !== volume.host_id && x.state === "ready")
    .sort((a, b) => (a.name || a.id).localeCompare(b.name || b.id));
  const to = h("select", { id: "replicate-host" }, h("option", { value: "" }, "chosen by the cluster"),
    hosts.map((x) => h("option", { value: x.id }, x.name || x.id)));
  const extra = h("div", {}, h("label", {}, "Snapshot: ", which), " ", h("label", {}, "To host: ", to));
  if (!(await ask(`Copy a snapshot of volume ${volume.id} (${volume.name}) to another host, as a replica`
    + " (a lost host's volumes are recovered from their newest replicas)?", extra))) return;
  showMessage(`copying snapshot ${which.value} of ${volume.id}...`, null, "info");
  const r = await call("zwrm.volume.replicate", [volume.id, which.value], to.value ? { host_id: to.value } : {});
  showMessage(`replica ${r.name} of ${volume.id} kept on ${hostName(r.host_id)} (${bytes(r.allocated_bytes)} of data)`,
    null, "info");
}

// A period as `zwrm volumes schedule --every` takes it: 90s, 30m, 1h, 1d (seconds if bare).
function period(text) {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$/.exec(text);
  if (!m) throw new Error(`every: ${JSON.stringify(text)} is not a period (such as 30m, 1h or 1d)`);
  return Number(m[1]) * { "": 1, s: 1, m: 60, h: 3600, d: 86400 }[m[2]];
}

// An app's snapshot schedule, kept and run by the control plane as `zwrm volumes schedule`
// sets it: every volume of the app snapshotted every so often (the first at once), the
// last so many of its snapshots kept, each copied to another host if asked.
async function schedule(volume) {
  const app = appOf(volume);
  const old = state.schedules.get(volume.app_id);
  const every = h("input", { id: "schedule-every", type: "text", size: "6", placeholder: "1h",
    value: old ? periodText(old.every) : "1h" });
  const keep = h("input", { id: "schedule-keep", type: "number", min: "1", max: "1000", step: "1",
    placeholder: "all", value: old && old.keep ? String(old.keep) : null });
  const copy = h("input", { id: "schedule-replicate", type: "checkbox", checked: !!(old && old.replicate) });
  const extra = h("div", {}, h("label", {}, "Every: ", every), " ",
    h("label", {}, "Keep the last: ", keep), " ", h("label", {}, copy, " Copy each to another host"));
  if (!(await ask(`Snapshot every volume of app ${app} on a schedule (the first now)?`
    + (old ? " It replaces the app's schedule." : ""), extra))) return;
  let secs;
  try { secs = period(every.value); } catch (err) { showMessage(err.message); return; }
  const kwargs = { replicate: copy.checked };
  if (keep.value !== "") kwargs.keep = Number(keep.value);
  const x = await call("zwrm.volume.schedule", [app, secs], kwargs);
  state.schedules.set(x.app_id, x);
  showMessage(`app ${app}: ${scheduleText(x)}`, null, "info");
}

async function unschedule(volume) {
  const app = appOf(volume);
  if (!(await ask(`Stop snapshotting the volumes of app ${app} on a schedule? Its snapshots stay.`))) return;
  await call("zwrm.volume.unschedule", [app]);
  state.schedules.delete(volume.app_id);
  showMessage(`app ${app}: no schedule`, null, "info");
}

const appOf = (volume) => ([...state.apps.values()].find((a) => a.id === volume.app_id) || {}).name || volume.app_id;

function drawVolumes() {
  const vols = [...state.volumes.values()].sort((a, b) => a.id.localeCompare(b.id));
  $("#volumes-count").textContent = `(${vols.length})`;
  const snaps = (id) => [...state.snapshots.values()].filter((s) => s.volume_id === id)
    .sort((a, b) => a.created_at - b.created_at);
  const reps = (id) => [...state.replicas.values()].filter((r) => r.volume_id === id)
    .sort((a, b) => a.taken_at - b.taken_at);
  const rows = vols.map((v) => h("tr", { dataset: { volume: v.id } },
    h("td", { class: "mono" }, v.id), h("td", {}, appOf(v)), h("td", {}, v.name),
    h("td", { class: "num" }, v.replica), h("td", { class: "num" }, mib(v.size_mb)),
    h("td", { class: "mono" }, v.mount || "-"), h("td", {}, hostName(v.host_id)), h("td", {}, stateBadge(v.state)),
    h("td", { class: "snapshots" }, snaps(v.id).map((s) => `${s.name}${s.state === "ready" ? "" : ` (${s.state})`}`).join(", ") || "-"),
    h("td", { class: "volume-replicas" }, reps(v.id).map((r) => `${r.name} on ${hostName(r.host_id)}${r.state === "ready" ? "" : ` (${r.state})`}`).join(", ") || "-"),
    h("td", { class: "volume-schedule" }, scheduleText(state.schedules.get(v.app_id))),
    h("td", {}, h("div", { class: "actions" },
      actionButton("Snapshot", "snapshot", { volume: v.id }, () => snapshot(v), v.state === "ready"),
      actionButton("Replicate", "replicate", { volume: v.id }, () => replicate(v),
        [...state.snapshots.values()].some((s) => s.volume_id === v.id && s.state === "ready")),
      actionButton("Schedule", "schedule", { volume: v.id, app: appOf(v) }, () => schedule(v)),
      actionButton("Unschedule", "unschedule", { volume: v.id, app: appOf(v) }, () => unschedule(v),
        state.schedules.has(v.app_id))))));
  $("#volumes-table tbody").replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 12, class: "empty" }, "No volumes."))]));
}

// An app's snapshot schedule, as `zwrm volumes schedules` says it: its period, what it
// keeps, and how its last run went (`ok`, or which volume was not taken and why).
const periodText = (s) => (s % 86400 === 0 ? `${s / 86400}d` : s % 3600 === 0 ? `${s / 3600}h`
  : s % 60 === 0 ? `${s / 60}m` : `${s}s`);

function scheduleText(x) {
  if (!x) return "-";
  const what = `every ${periodText(x.every)}` + (x.keep ? `, the last ${x.keep} kept` : "") + (x.replicate ? ", replicated" : "");
  if (!x.last_at) return `${what}; not run yet`;
  return `${what}; last run ${time(x.last_at)}: ${x.last_error === null || x.last_error === undefined ? "ok" : x.last_error}`;
}

function phaseBar(phase) {
  const i = PHASES.indexOf(phase);
  const pct = i < 0 ? 100 : (100 * i) / (PHASES.length - 1);
  return h("div", { class: "bar", title: phase }, h("span", { style: { width: `${pct}%` } }));
}

function drawDrains() {
  const drains = [...state.drains.values()].sort((a, b) => (b.created_at || 0) - (a.created_at || 0));
  $("#drains-count").textContent = `(${drains.length})`;
  const cards = drains.map((d) => h("section", { class: "card", dataset: { drain: d.drain_id, state: d.state } },
    h("header", {}, h("h3", {}, `${hostName(d.host_id)}`), stateBadge(d.state),
      h("span", { class: "small" }, `drain ${d.drain_id}, started ${time(d.created_at)}, host ${d.host_state || "-"}`),
      actionButton("Undrain", "undrain", { host: d.host_id }, () => hostAction({ id: d.host_id, name: hostName(d.host_id) }, "undrain"), d.state === "running")),
    (d.migrations || []).length ? h("table", {},
      h("thead", {}, h("tr", {}, ["Machine", "App", "To", "Phase", "Bytes", "Rate", "ETA", "Downtime", "Note"].map((t) => h("th", {}, t)))),
      h("tbody", {}, d.migrations.map((m) => h("tr", { dataset: { migration: m.machine_id, phase: m.phase } },
        h("td", { class: "mono" }, m.machine_id, m.replacement ? h("div", { class: "small" }, `-> ${m.replacement}`) : null),
        h("td", {}, m.app || "-"),
        h("td", {}, m.target ? hostName(m.target) : "-"),
        h("td", { class: "phase" }, stateBadge(m.phase), phaseBar(m.phase)),
        h("td", { class: "num" }, `${bytes(m.bytes_sent)} / ${bytes(m.bytes_total)}`),
        h("td", { class: "num" }, m.rate ? `${bytes(m.rate)}/s` : "-"),
        h("td", { class: "num" }, m.eta === null || m.eta === undefined ? "-" : seconds(m.eta)),
        h("td", { class: "num" }, m.downtime ? seconds(m.downtime) : "-"),
        h("td", { class: "small" }, m.error || (m.waiting_for ? `waiting for ${m.waiting_for}` : ""))))))
      : (d.replicas || []).length ? null : h("p", { class: "empty" }, "Nothing to move."),
    (d.replicas || []).length ? h("ul", { class: "small drain-replicas" }, d.replicas.map((r) =>
      h("li", { dataset: { replica: r.replica, state: r.state } },
        `replica ${r.name} of ${r.volume_id}: ${r.state}${r.target ? " -> " + hostName(r.target) : ""}` +
        (r.reason ? ` (${r.reason})` : "")))) : null));
  $("#drains-list").replaceChildren(...(cards.length ? cards : [h("p", { class: "empty" }, "No drains.")]));
}

function summary(e) {
  const p = e.payload || {};
  const bits = [];
  if (p.old !== undefined && p.old !== null && (p.state || p.phase)) bits.push(`${p.old} -> ${p.state || p.phase}`);
  else if (p.state || p.phase) bits.push(p.state || p.phase);
  if (p.reason && p.reason !== e.kind) bits.push(p.reason);
  if (p.host_id && e.topic !== "zwrm.event.host") bits.push(`on ${hostName(p.host_id)}`);
  if (p.app && e.topic !== "zwrm.event.app") bits.push(`app ${p.app}`);
  if (p.actor) bits.push(`by ${p.actor.authid || p.actor}`);
  return bits.join(", ");
}

function drawEvents() {
  if ($("#events-pause").checked) return;
  const rows = state.events.slice(0, 300).map((e) => h("tr", { class: e.live ? "fresh" : null, dataset: { event: e.id } },
    h("td", { class: "num" }, e.id), h("td", { class: "num" }, time(e.ts)),
    h("td", {}, e.topic.replace(/^zwrm\.event\./, "")), h("td", {}, e.kind),
    h("td", { class: "mono" }, e.subject || "-"), h("td", {}, summary(e))));
  for (const e of state.events) e.live = false;
  $("#events-table tbody").replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 6, class: "empty" }, "No events yet."))]));
}

function drawAudit() {
  const body = $("#audit-table tbody");
  if (!isOperator()) {
    body.replaceChildren(h("tr", {}, h("td", { colspan: 6, class: "empty" }, "The audit trail is shown to operators only.")));
    return;
  }
  const rows = (state.audit || []).slice().reverse().map((a) => h("tr", { dataset: { procedure: a.procedure, result: a.result } },
    h("td", { class: "num" }, time(a.ts)), h("td", {}, a.authid, h("div", { class: "small" }, a.role)),
    h("td", { class: "mono" }, a.procedure), h("td", { class: "mono" }, JSON.stringify(a.args)),
    h("td", {}, a.result), h("td", { class: "small" }, a.message || "")));
  body.replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 6, class: "empty" }, state.audit ? "Nothing audited yet." : "Loading..."))]));
}

async function loadAudit() {
  if (!isOperator()) return;
  state.audit = await call("zwrm.audit.list", [], { limit: 200 });
  render();
}

// -- session --------------------------------------------------------------------------

function authidFor(token, chosen) {
  if (chosen) return chosen;
  return token.startsWith("viewer-") ? "viewer" : "operator";
}

function setConnection(text, up) {
  const badge = $("#conn");
  badge.textContent = text;
  badge.className = `badge ${up ? "up" : "down"}`;
}

function showLogin(error) {
  $("#login-view").hidden = false;
  $("#tabs").hidden = true;
  $("#who").hidden = true;
  for (const v of document.querySelectorAll(".view")) v.hidden = true;
  const p = $("#login-error");
  p.textContent = error || "";
  p.hidden = !error;
  $("#login-button").disabled = false;
}

function connect(token, chosenAuthid) {
  if (!autobahn) {
    showLogin("This console was installed without autobahn-js (run scripts/build-console before installing zwrm).");
    return;
  }
  const authid = authidFor(token, chosenAuthid);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const connection = new autobahn.Connection({
    url: `${scheme}//${location.host}/ws`, realm: "zwrm",
    authmethods: ["ticket"], authid,
    onchallenge: (session, method) => (method === "ticket" ? token : null),
    max_retries: -1, initial_retry_delay: 1, max_retry_delay: 15, retry_delay_jitter: 0.2,
  });
  let opened = false;
  connection.onopen = async (session, details) => {
    opened = true;
    state.session = session;
    state.role = details.authrole;
    state.authid = details.authid;
    sessionStorage.setItem(TOKEN_KEY, token);
    sessionStorage.setItem(AUTHID_KEY, chosenAuthid || "");
    $("#login-view").hidden = true;
    $("#tabs").hidden = false;
    $("#who").hidden = false;
    $("#identity").textContent = `${details.authid} (${details.authrole})`;
    document.body.dataset.role = details.authrole;
    setConnection("live", true);
    try {
      await session.subscribe("zwrm.event", onEvent, { match: "prefix" });
      await loadAll();
      document.body.dataset.ready = "yes";
      if (state.view === "audit") await loadAudit();
    } catch (err) {
      const d = describe(err, "reading the state");
      showMessage(`Could not read the cluster's state: ${d.text}`, d.uri);
    }
    render();
  };
  connection.onclose = (reason, details) => {
    state.session = null;
    document.body.dataset.ready = "";
    const why = details && details.reason;
    if (why && /authentication_failed|no_auth_method|not_authorized|no_such_role/.test(why)) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(`The token was not accepted${details.message ? ": " + details.message : ""}.`);
      return true; // stop retrying
    }
    if (reason === "closed") return true;
    if (!opened && reason === "unreachable") {
      showLogin("Cannot reach the control plane's WebSocket (/ws).");
      return true;
    }
    setConnection(details && details.will_retry ? `reconnecting in ${Math.round(details.retry_delay)} s` : "disconnected", false);
    return false;
  };
  state.connection = connection;
  setConnection("connecting", false);
  connection.open();
}

function logout() {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(AUTHID_KEY);
  if (state.connection) state.connection.close();
  state.connection = null;
  // Nothing of this session stays in the page for the next one.
  Object.assign(state, { session: null, role: null, authid: null, hosts: new Map(),
    hostStatus: new Map(), apps: new Map(), machines: new Map(), volumes: new Map(),
    drains: new Map(), events: [], lastEventId: 0, audit: null });
  draw();
  $("#message").hidden = true;
  showLogin(null);
}

function route() {
  const view = location.hash.replace(/^#/, "");
  state.view = ["hosts", "apps", "volumes", "drains", "events", "audit"].includes(view) ? view : "hosts";
  if (state.view === "audit" && state.session) loadAudit().catch(() => {});
  if (state.session) render();
}

function init() {
  // The audit tab (operators) is added here so that index.html stays one static page.
  $("#tabs").append(h("a", { href: "#audit", dataset: { view: "audit" } }, "Audit"));
  $("main").append(h("section", { id: "audit-view", class: "view", hidden: true },
    h("h2", {}, "Audit trail ", h("button", { type: "button", onclick: () => loadAudit().catch(() => {}) }, "Reload")),
    h("table", { id: "audit-table" }, h("thead", {}, h("tr", {}, ["Time", "Who", "Procedure", "Arguments", "Result", "Message"].map((t) => h("th", {}, t)))), h("tbody"))));
  $("#login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = $("#token").value.trim();
    if (!token) return;
    $("#login-button").disabled = true;
    $("#token").value = "";
    connect(token, $("#authid").value);
  });
  $("#logout").addEventListener("click", logout);
  $("#events-pause").addEventListener("change", render);
  window.addEventListener("hashchange", route);
  route();
  $("#hosts-reload").addEventListener("click", () => { if (state.session) loadHosts().catch(() => {}); });
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) connect(saved, sessionStorage.getItem(AUTHID_KEY) || "");
  else showLogin(null);
}

init();
