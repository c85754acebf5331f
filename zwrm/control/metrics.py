"""
The control plane's C{/metrics}: Prometheus text exposition, every family with HELP and
TYPE lines (docs/operators.md, "Metrics").

 - hosts by state, and per host: state, capacity and allocation (vCPUs, memory, disk),
   heartbeat age and the image-cache figures its last heartbeat carried (all in memory,
   L{zwrm.control.registry.HostRegistry});
 - per app: desired replicas and machines by state and health (one query on the store's
   thread);
 - per volume: when its newest snapshot was taken, how many replicas of its snapshots
   other hosts keep, and when the snapshot its newest replica copies was taken (what a
   recovery after losing its host gives back: alert on its age);
 - the embedded router: sessions, calls, and a histogram of call latency per procedure
   (the router's C{call_observer}: from CALL to its answer; an agent's procedures
   C{zwrm.agent.<host id>.<verb>} are labelled C{zwrm.agent.{host}.<verb>}, so the
   histogram has one series per verb, not per host); behind an external router (Crossbar.io)
   only whether it is connected;
 - per datacenter where the partition guard holds rescheduling, the hosts it holds;
 - when the cluster CA's certificate and the server certificate expire;
 - the disk the image registry's blobs take;
 - the garbage-collection policy's figures, when there is one.

Families are made with C{prometheus_client} and written with its C{generate_latest}
(see docs/dependencies.md), except the per-host ones: at 20,000 hosts they are about
200,000 samples, which C{prometheus_client} took 2.0-2.4 s to build and write. On the
reactor thread that stopped the control plane for as long; in a thread, the reactor got
the interpreter lock between that thread's 5 ms slices only, and heartbeats were answered
up to 400 ms late (with 1,000 hosts connected and 20,000 known; 2 ms with no scrape). The
per-host samples are now written straight as text (their host label escaped once per host),
L{HOSTS_PER_TURN} hosts per reactor turn, so a scrape holds the reactor for one such slice
at a time.
"""

import json
import math
import re

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web import resource, server

HOST_STATES = ("ready", "draining", "drained", "offline")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 300.0)
_AGENT_PROCEDURE = re.compile(r"^zwrm\.agent\.[^.]+\.(.+)\Z")
_AGENT_GLOBAL = {"heartbeat", "report", "join", "register"}  # zwrm.agent.<these> are not per host

#: Hosts whose samples one reactor turn writes: a scrape of 20,000 hosts takes 20 turns,
#: between which the reactor reads and answers what came in (each turn took 5-10 ms here).
HOSTS_PER_TURN = 1000

#: The per-host families (all gauges): name and help.
HOST_FAMILIES = (
    ("zwrm_host_state", "1 for the state each host is in."),
    ("zwrm_host_vcpus", "The host's vCPUs."),
    ("zwrm_host_memory_bytes", "The host's memory."),
    ("zwrm_host_disk_bytes", "The host's disk for volumes."),
    ("zwrm_host_allocated_vcpus", "The host's vCPUs given to machines."),
    ("zwrm_host_allocated_memory_bytes", "The host's memory given to machines."),
    ("zwrm_host_allocated_disk_bytes", "The host's disk given to machines."),
    ("zwrm_host_heartbeat_age_seconds", "Seconds since the host's last heartbeat."),
    ("zwrm_host_image_cache_size_bytes", "The host's image cache size (last heartbeat)."),
    ("zwrm_host_image_cache_limit_bytes", "The host's image cache limit (last heartbeat)."),
    ("zwrm_host_image_cache_hits", "The host's image cache hits (last heartbeat)."),
    ("zwrm_host_image_cache_misses", "The host's image cache misses (last heartbeat)."),
    ("zwrm_host_certificate_expiry_timestamp_seconds",
     "When the host's certificate expires, POSIX time (last heartbeat); its agent renews it"
     " when a third of its life is left."),
)
_CACHE_FIGURES = (("size", 8), ("limit", 9), ("hits", 10), ("misses", 11))  # key, family


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


def _escape(value):
    """A label value as the text format writes it (backslash, double quote, newline escaped)."""
    value = str(value)
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", r"\\").replace('"', r'\"').replace("\n", r"\n")
    return value


def _value(value, scale=1):
    """A sample's value as the text format writes it: an integer as is, else a float (NaN if not a number)."""
    if type(value) is int:
        return str(value * scale)
    return floatToGoString(_num(value) * scale)


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
        The exposition text (bytes). The per-host samples are written L{HOSTS_PER_TURN}
        hosts per reactor turn (see the module docstring).
        """
        other = await self._other_families()
        counts, host_text = await self._host_samples()
        hosts = GaugeMetricFamily("zwrm_hosts", "Hosts, by state.", labels=["state"])
        for s, n in counts.items():
            hosts.add_metric([s], n)
        return generate_latest(_Families([hosts, *other])) + host_text

    async def _host_samples(self):
        """
        The hosts by state, and the per-host families' text (bytes), written from the
        registry's entries a slice of hosts per reactor turn: a host that goes away meanwhile
        is written as it was, one that comes is in the next scrape.
        """
        reg = self.plane.registry
        reactor = self.plane.reactor
        entries = list(reg.hosts.entries()) if reg is not None else []
        counts = dict.fromkeys(HOST_STATES, 0)
        lines = [[] for _ in HOST_FAMILIES]
        (state, vcpus, memory, disk, a_vcpus, a_memory, a_disk, age, *_) = lines
        cert = lines[-1]
        names = [name for name, _ in HOST_FAMILIES]
        MiB = 1024 * 1024
        for start in range(0, len(entries), HOSTS_PER_TURN):
            if start:
                await task.deferLater(reactor, 0, lambda: None)
            now = reactor.seconds()
            for entry in entries[start:start + HOSTS_PER_TURN]:
                r = entry.record
                hid = r["id"]
                s = entry.machine.state
                counts[s] = counts.get(s, 0) + 1
                h = _escape(hid)
                host = f'{{host="{h}"}} '
                state.append(f'zwrm_host_state{{host="{h}",name="{_escape(r.get("name") or hid)}",'
                             f'state="{_escape(s)}"}} 1.0\n')
                vcpus.append(f"zwrm_host_vcpus{host}{_value(r.get('vcpus'))}\n")
                memory.append(f"zwrm_host_memory_bytes{host}{_value(r.get('memory_mb'), MiB)}\n")
                disk.append(f"zwrm_host_disk_bytes{host}{_value(r.get('disk_mb'), MiB)}\n")
                a_vcpus.append(f"zwrm_host_allocated_vcpus{host}{_value(r.get('alloc_vcpus'))}\n")
                a_memory.append(f"zwrm_host_allocated_memory_bytes{host}"
                                f"{_value(r.get('alloc_memory_mb'), MiB)}\n")
                a_disk.append(f"zwrm_host_allocated_disk_bytes{host}{_value(r.get('alloc_disk_mb'), MiB)}\n")
                if entry.last_heartbeat is not None:
                    age.append(f"zwrm_host_heartbeat_age_seconds{host}"
                               f"{floatToGoString(max(0.0, now - entry.last_heartbeat))}\n")
                stats = entry.stats or {}
                expires = stats.get("host_certificate_expires_at")
                if expires is not None:
                    cert.append(f"zwrm_host_certificate_expiry_timestamp_seconds{host}"
                                f"{_value(expires)}\n")
                figures = stats.get("image_cache")
                if figures:
                    for key, i in _CACHE_FIGURES:
                        if key in figures:
                            lines[i].append(f"{names[i]}{host}{_value(figures[key])}\n")
        out = []
        for (name, text), samples in zip(HOST_FAMILIES, lines, strict=True):
            out.append(f"# HELP {name} {text}\n# TYPE {name} gauge\n")
            out += samples
        return counts, "".join(out).encode("utf-8")

    async def _other_families(self):
        plane = self.plane
        out = await self._apps()
        out += await self._volumes()
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
        control_pki = getattr(plane, "pki", None)
        if control_pki is not None and control_pki.ca is not None:
            out.append(GaugeMetricFamily(
                "zwrm_ca_certificate_expiry_timestamp_seconds",
                "When the cluster CA's certificate expires, POSIX time (it is not renewed:"
                " plan its replacement well before).",
                value=control_pki.ca.certificate.not_valid_after_utc.timestamp()))
            out.append(GaugeMetricFamily(
                "zwrm_server_certificate_expiry_timestamp_seconds",
                "When the control plane's server certificate expires, POSIX time (renewed"
                " with 30 days left, checked every 6 hours).",
                value=control_pki.server_expires_at))
        images = getattr(getattr(plane, "apps", None), "images", None)
        if images is not None:
            out.append(GaugeMetricFamily(
                "zwrm_registry_bytes",
                "The disk the registry's images take (its blobs' allocated bytes); zwrm images"
                " gc frees what no image needs.", value=await images.disk_usage()))
        partitions = plane.partitions()
        held = GaugeMetricFamily(
            "zwrm_partition_held_hosts",
            "Per datacenter where the partition guard holds rescheduling (more than"
            " partition_threshold of its hosts went offline at once): its offline hosts whose"
            " replicas are not placed elsewhere yet. No sample: no partition.",
            labels=["datacenter"])
        for p in partitions:
            held.add_metric([p["datacenter"]], len(p["held_hosts"]))
        out.append(held)
        view = getattr(getattr(plane, "apps", None), "network_view", None)
        if view is not None:
            out.append(CounterMetricFamily(
                "zwrm_network_views_sent", "Cluster network views sent to agents.",
                value=view.sent))
            out.append(CounterMetricFamily(
                "zwrm_network_view_full_lists",
                "Network views sent with the whole hosts list (a new agent session whose"
                " list is not current, or one that lost a view).", value=view.full_lists))
            reasons = CounterMetricFamily(
                "zwrm_network_view_full_list_reasons",
                "The same by reason: new_session, list_changed, no_deltas, lost, refused,"
                " out_of_order, other_serial, history (docs/networking.md).",
                labels=["reason"])
            for reason, n in view.full_list_reasons.items():
                reasons.add_metric([reason], n)
            out.append(reasons)
            out.append(CounterMetricFamily(
                "zwrm_network_view_resumed",
                "New agent sessions told the hosts list they held is current, instead of"
                " being sent it.", value=view.resumed))
        return out

    async def _apps(self):
        store = self.plane.store
        replicas = GaugeMetricFamily("zwrm_app_replicas", "Replicas the app's spec asks for.",
                                     labels=["app"])
        machines = GaugeMetricFamily("zwrm_app_machines", "The app's machines, by state and health.",
                                     labels=["app", "state", "health"])
        paused = GaugeMetricFamily(
            "zwrm_app_machines_paused",
            "The app's running machines that their hypervisor holds, by why (disk-full: a"
            " write waits for room on its host's disk).", labels=["app", "reason"])
        if store is None:
            return [replicas, machines, paused]

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
        # (the stored health holds more than its status: one sample per label set)
        counts, held = {}, {}
        for name, st, health, n in rows:
            status, why = _health(health)
            counts[name, st, status] = counts.get((name, st, status), 0) + n
            if why and st == "running":
                held[name, why] = held.get((name, why), 0) + n
        for labels, n in sorted(counts.items()):
            machines.add_metric(list(labels), n)
        for labels, n in sorted(held.items()):
            paused.add_metric(list(labels), n)
        return [replicas, machines, paused]


    async def _volumes(self):
        labels = ["app", "volume"]
        snapshot = GaugeMetricFamily(
            "zwrm_volume_snapshot_newest_timestamp_seconds",
            "When the volume's newest snapshot was taken, POSIX time. No sample: none.",
            labels=labels)
        count = GaugeMetricFamily(
            "zwrm_volume_replicas",
            "Replicas of the volume's snapshots other hosts keep (zwrm volumes replicate);"
            " 0: losing its host loses its data.", labels=labels)
        replica = GaugeMetricFamily(
            "zwrm_volume_replica_newest_timestamp_seconds",
            "When the snapshot the volume's newest replica copies was taken, POSIX time:"
            " what zwrm host remove --recover-volumes gives back. No sample: none.",
            labels=labels)
        ran = GaugeMetricFamily(
            "zwrm_snapshot_schedule_last_run_timestamp_seconds",
            "When the app's snapshot schedule (zwrm volumes schedule) last ran, POSIX time."
            " No sample: it has not run yet.", labels=["app"])
        failed = GaugeMetricFamily(
            "zwrm_snapshot_schedule_last_run_failed",
            "1 if the last run of the app's snapshot schedule left a volume not snapshotted"
            " or not replicated (zwrm volumes schedules says which), else 0.", labels=["app"])
        store = self.plane.store
        families = [snapshot, count, replica, ran, failed]
        if store is None:
            return families

        def query(db):
            tables = set(db.table_names())
            if not {"volumes", "apps", "volume_snapshots", "volume_replicas"} <= tables:
                return []
            return db.execute(
                "SELECT COALESCE(a.name, v.app_id), v.id,"
                " (SELECT max(created_at) FROM volume_snapshots s"
                "   WHERE s.volume_id = v.id AND s.state = 'ready'),"
                " (SELECT count(*) FROM volume_replicas r"
                "   WHERE r.volume_id = v.id AND r.state = 'ready'),"
                " (SELECT max(taken_at) FROM volume_replicas r"
                "   WHERE r.volume_id = v.id AND r.state = 'ready')"
                " FROM volumes v LEFT JOIN apps a ON a.id = v.app_id ORDER BY 1, 2").fetchall()

        def schedules(db):
            if not {"snapshot_schedules", "apps"} <= set(db.table_names()):
                return []
            return db.execute(
                "SELECT COALESCE(a.name, s.app_id), s.last_at, s.last_error"
                " FROM snapshot_schedules s LEFT JOIN apps a ON a.id = s.app_id"
                " WHERE s.last_at IS NOT NULL ORDER BY 1").fetchall()

        for app, vid, newest, n, taken in await store.run(query):
            if newest is not None:
                snapshot.add_metric([app, vid], newest)
            count.add_metric([app, vid], n)
            if taken is not None:
                replica.add_metric([app, vid], taken)
        for app, last_at, error in await store.run(schedules):
            ran.add_metric([app], last_at)
            failed.add_metric([app], 0 if error is None else 1)
        return families


def _health(value):
    """
    The stored health (a word, or a JSON status) as labels: its status, and why its
    hypervisor holds it paused (L{None} if it does not).
    """
    if isinstance(value, str) and value.startswith("{"):
        try:
            health = json.loads(value)
            return str(health.get("status", "")), health.get("paused")
        except (ValueError, AttributeError):
            return "", None
    return value or "", None


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
