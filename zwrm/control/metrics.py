"""
The control plane's C{/metrics}: Prometheus text exposition, every family with HELP and
TYPE lines (docs/operators.md, "Metrics").

 - hosts by state, and per host: state, capacity and allocation (vCPUs, memory, disk),
   heartbeat age and the image-cache figures its last heartbeat carried (all in memory,
   L{zwrm.control.registry.HostRegistry});
 - per app: desired replicas and machines by state and health (one query on the store's
   thread);
 - the embedded router: sessions, calls, and a histogram of call latency per procedure
   (the router's C{call_observer}: from CALL to its answer; an agent's procedures
   C{zwrm.agent.<host id>.<verb>} are labelled C{zwrm.agent.{host}.<verb>}, so the
   histogram has one series per verb, not per host); behind an external router (Crossbar.io)
   only whether it is connected;
 - the garbage-collection policy's figures, when there is one.

Families are made with C{prometheus_client} and written with its C{generate_latest}
(see docs/dependencies.md). The per-host families are built and the text written in a
thread of the reactor's pool from a copy of the hosts' figures taken on the reactor thread:
at 20,000 hosts the text has about 200,000 samples, and building and writing it on the
reactor thread stopped the control plane for about a second per scrape (heartbeats
answered late).
"""

import json
import math
import re

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web import resource, server

HOST_STATES = ("ready", "draining", "drained", "offline")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 300.0)
_AGENT_PROCEDURE = re.compile(r"^zwrm\.agent\.[^.]+\.(.+)$")
_AGENT_GLOBAL = {"heartbeat", "report", "join", "register"}  # zwrm.agent.<these> are not per host


def procedure_label(uri):
    """C{zwrm.agent.h_1f2e.machine.start} -> C{zwrm.agent.{host}.machine.start}; others unchanged."""
    m = _AGENT_PROCEDURE.match(uri)
    if m and uri.split(".")[2] not in _AGENT_GLOBAL:
        return "zwrm.agent.{host}." + m.group(1)
    return uri


class CallLatencies:
    """
    A histogram of WAMP call latency per procedure, fed by the router's C{call_observer}.
    """

    def __init__(self):
        self.histogram = Histogram(
            "zwrm_wamp_call_duration_seconds",
            "Time from a CALL to its answer (result, error, timeout or cancel), by procedure.",
            ["procedure"], buckets=LATENCY_BUCKETS, registry=None)
        self._children = {}  # procedure URI -> its labelled histogram (one per heartbeat: cheap)

    def observe(self, procedure, seconds):
        child = self._children.get(procedure)
        if child is None:
            if len(self._children) >= 4096:  # one per host and verb at most; keep it bounded
                self._children.clear()
            child = self._children[procedure] = self.histogram.labels(procedure_label(procedure))
        child.observe(max(0.0, seconds))

    def collect(self):
        return self.histogram.collect()


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


class ControlMetrics:
    """The control plane's metric families (see the module docstring)."""

    def __init__(self, plane):
        """@param plane: the L{zwrm.control.service.ControlPlane}."""
        self.plane = plane
        self.latencies = CallLatencies()

    async def render(self):
        """
        The exposition text (bytes). The hosts' figures are copied here, on the reactor
        thread (a tuple per host); their families are built and all of it written in a
        thread of the reactor's pool.
        """
        rows, now = self._host_rows(), self.plane.reactor.seconds()
        other = await self._other_families()

        def build():
            return generate_latest(_Families(self._host_families(rows, now) + other))

        reactor = self.plane.reactor
        if not hasattr(reactor, "getThreadPool"):  # a reactor without threads (unit tests)
            return build()
        return await threads.deferToThreadPool(reactor, reactor.getThreadPool(), build)

    async def _other_families(self):
        plane = self.plane
        out = await self._apps()
        router = plane.router
        if router is not None:
            out.append(GaugeMetricFamily("zwrm_wamp_sessions", "WAMP sessions joined to the router.",
                                         value=router.session_count()))
            out.append(CounterMetricFamily("zwrm_wamp_calls", "WAMP calls the router received.",
                                           value=router.stats.calls))
            out.append(CounterMetricFamily("zwrm_wamp_sessions_closed", "WAMP sessions that closed.",
                                           value=router.stats.sessions_closed))
            out += self.latencies.collect()
        elif plane.external is not None:
            out.append(GaugeMetricFamily("zwrm_router_connected",
                                         "1 while the control component is joined to the external router.",
                                         value=int(plane.wamp_connected())))
        return out

    def _host_rows(self):
        """What the per-host families need, copied from the registry (on the reactor thread)."""
        reg = self.plane.registry
        rows = []
        for entry in reg.hosts.entries() if reg is not None else ():
            r = entry.record
            figures = (entry.stats or {}).get("image_cache")
            rows.append((r["id"], r.get("name"), entry.machine.state, r.get("vcpus"),
                         r.get("memory_mb"), r.get("disk_mb"), r.get("alloc_vcpus"),
                         r.get("alloc_memory_mb"), r.get("alloc_disk_mb"), entry.last_heartbeat,
                         dict(figures) if figures else None))
        return rows

    @staticmethod
    def _host_families(rows, now):
        """The per-host families from L{_host_rows}' copy (in any thread)."""
        counts = dict.fromkeys(HOST_STATES, 0)
        state = GaugeMetricFamily("zwrm_host_state", "1 for the state each host is in.",
                                  labels=["host", "name", "state"])
        cap = {r: GaugeMetricFamily(f"zwrm_host_{r}", f"The host's {t}.", labels=["host"])
               for r, t in (("vcpus", "vCPUs"), ("memory_bytes", "memory"), ("disk_bytes", "disk for volumes"))}
        alloc = {r: GaugeMetricFamily(f"zwrm_host_allocated_{r}", f"The host's {t} given to machines.",
                                      labels=["host"])
                 for r, t in (("vcpus", "vCPUs"), ("memory_bytes", "memory"), ("disk_bytes", "disk"))}
        age = GaugeMetricFamily("zwrm_host_heartbeat_age_seconds",
                                "Seconds since the host's last heartbeat.", labels=["host"])
        cache = {k: GaugeMetricFamily(f"zwrm_host_image_cache_{n}", t, labels=["host"])
                 for k, n, t in (("size", "size_bytes", "The host's image cache size (last heartbeat)."),
                                 ("limit", "limit_bytes", "The host's image cache limit (last heartbeat)."),
                                 ("hits", "hits", "The host's image cache hits (last heartbeat)."),
                                 ("misses", "misses", "The host's image cache misses (last heartbeat)."))}
        MiB = 1024 * 1024
        for (hid, name, s, vcpus, memory_mb, disk_mb, a_vcpus, a_memory_mb, a_disk_mb,
             last_heartbeat, figures) in rows:
            counts[s] = counts.get(s, 0) + 1
            state.add_metric([hid, name or hid, s], 1)
            cap["vcpus"].add_metric([hid], _num(vcpus))
            cap["memory_bytes"].add_metric([hid], _num(memory_mb) * MiB)
            cap["disk_bytes"].add_metric([hid], _num(disk_mb) * MiB)
            alloc["vcpus"].add_metric([hid], _num(a_vcpus))
            alloc["memory_bytes"].add_metric([hid], _num(a_memory_mb) * MiB)
            alloc["disk_bytes"].add_metric([hid], _num(a_disk_mb) * MiB)
            if last_heartbeat is not None:
                age.add_metric([hid], max(0.0, now - last_heartbeat))
            figures = figures or {}
            for key, family in cache.items():
                if key in figures:
                    family.add_metric([hid], _num(figures[key]))
        hosts = GaugeMetricFamily("zwrm_hosts", "Hosts, by state.", labels=["state"])
        for s, n in counts.items():
            hosts.add_metric([s], n)
        return [hosts, state, *cap.values(), *alloc.values(), age, *cache.values()]

    async def _apps(self):
        store = self.plane.store
        replicas = GaugeMetricFamily("zwrm_app_replicas", "Replicas the app's spec asks for.",
                                     labels=["app"])
        machines = GaugeMetricFamily("zwrm_app_machines", "The app's machines, by state and health.",
                                     labels=["app", "state", "health"])
        if store is None:
            return [replicas, machines]

        def query(db):
            if "apps" not in db.table_names() or "machines" not in db.table_names():
                return [], []
            apps = db.execute("SELECT name, spec FROM apps").fetchall()
            rows = db.execute(
                "SELECT a.name, m.state, COALESCE(m.health, ''), count(*) FROM machines m"
                " JOIN apps a ON a.id = m.app_id WHERE m.state NOT IN ('destroyed', 'deleted')"
                " GROUP BY 1, 2, 3").fetchall()
            return apps, rows

        apps, rows = await store.run(query)
        for name, spec in apps:
            try:
                n = (json.loads(spec) if isinstance(spec, str) else spec or {}).get("replicas", 0)
            except (ValueError, AttributeError):
                n = 0
            replicas.add_metric([name], _num(n))
        for name, st, health, n in rows:
            machines.add_metric([name, st, _health(health)], n)
        return [replicas, machines]


def _health(value):
    """The stored health (a word, or a JSON status) as a label."""
    if isinstance(value, str) and value.startswith("{"):
        try:
            return str(json.loads(value).get("status", ""))
        except (ValueError, AttributeError):
            return ""
    return value or ""


class _Families:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return iter(self.families)


class MetricsResource(resource.Resource):
    """C{GET /metrics} of the control plane."""

    isLeaf = True
    log = Logger()

    def __init__(self, plane):
        resource.Resource.__init__(self)
        self.plane = plane

    @property
    def metrics(self):
        return self.plane.metrics

    def render_GET(self, request):
        d = defer.Deferred.fromCoroutine(self.metrics.render())

        def write(text):
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            if self.plane.gc_policy is not None:
                text += ("\n".join(self.plane.gc_policy.metrics()) + "\n").encode()
            request.write(text)

        def failed(f):
            self.log.failure("collecting metrics", f)
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain")
            request.write(b"metrics could not be collected (see the control plane's log)\n")

        def finish(_):
            if not request._disconnected:
                request.finish()

        d.addCallbacks(write, failed).addBoth(finish)
        return server.NOT_DONE_YET
