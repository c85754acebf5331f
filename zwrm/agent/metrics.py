"""
An agent's C{/metrics}: Prometheus text exposition (every family with HELP and TYPE lines),
served on the endpoint C{--metrics-listen} names (off unless configured; see
docs/operators.md, "Metrics").

What a scrape reads, none of it blocking the reactor:
 - per running machine, from the driver's optional C{usage(machine_id)}
   (L{zwrm.drivers.qemu.QemuDriver.usage}): QEMU's CPU time and resident memory
   (C{/proc/<pid>/stat}, one small read), its disks' counters (QMP
   C{query-blockstats}, asynchronous, bounded by L{AgentMetrics.timeout}) and, in bridge
   mode, its TAP device's counters (C{/sys/class/net/<tap>/statistics}); user-mode
   networking has no host-side device, so no network family for those machines;
 - volume sizes (one C{stat} per volume image), their snapshots' count and room;
 - the image cache's figures (kept in memory by L{zwrm.agent.images.ImageCache});
 - volume-transfer bytes sent and received (counters kept by the sender and receiver);
 - the heartbeat's last round-trip time and count (kept by the agent service).

The families are built with C{prometheus_client}'s metric families and written by its
C{generate_latest}, on the reactor thread after the asynchronous gathering: see
docs/dependencies.md for why not its Twisted C{MetricsResource}.
"""

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from zwrm.web import Root

_DISK = (
    ("rd_bytes", "zwrm_machine_disk_read_bytes", "Bytes read by the machine from a disk (QMP query-blockstats)."),
    ("wr_bytes", "zwrm_machine_disk_written_bytes", "Bytes written by the machine to a disk (QMP query-blockstats)."),
    ("rd_operations", "zwrm_machine_disk_reads", "Read operations of the machine on a disk (QMP query-blockstats)."),
    ("wr_operations", "zwrm_machine_disk_writes", "Write operations of the machine on a disk (QMP query-blockstats)."),
)
_NET = (
    ("rx_bytes", "zwrm_machine_network_receive_bytes",
     "Bytes the host received from the machine's TAP device (bridge mode only)."),
    ("tx_bytes", "zwrm_machine_network_transmit_bytes",
     "Bytes the host sent to the machine's TAP device (bridge mode only)."),
    ("rx_packets", "zwrm_machine_network_receive_packets",
     "Packets the host received from the machine's TAP device (bridge mode only)."),
    ("tx_packets", "zwrm_machine_network_transmit_packets",
     "Packets the host sent to the machine's TAP device (bridge mode only)."),
)


class _Families:
    """What C{generate_latest} asks for: an object whose C{collect()} yields families."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return iter(self.families)


class AgentMetrics:
    """
    Gathers an agent's figures into Prometheus metric families.

    @ivar timeout: seconds one machine's C{usage} may take before the scrape goes on
        without it.
    """

    log = Logger()
    timeout = 2.0

    def __init__(self, reactor, agent):
        """
        @param reactor: the reactor (timeouts).
        @param agent: the L{zwrm.agent.service.AgentService} (its C{runtime}, C{identity},
            C{state}, C{heartbeat_rtt}, C{heartbeats_sent}).
        """
        self.reactor = reactor
        self.agent = agent

    async def families(self):
        """@return: the list of metric families of this scrape."""
        agent = self.agent
        host_id = getattr(agent.identity, "host_id", None) or ""
        out = []
        info = GaugeMetricFamily("zwrm_agent_info", "This agent: its host id and name (always 1).",
                                 labels=["host_id", "name"])
        info.add_metric([host_id, agent.config.name], 1)
        out.append(info)
        out.append(GaugeMetricFamily("zwrm_agent_registered",
                                     "1 while the agent is registered with the control plane.",
                                     value=int(agent.state == "registered")))
        rtt = GaugeMetricFamily("zwrm_agent_heartbeat_rtt_seconds",
                                "Round-trip time of the last answered heartbeat (NaN before one).",
                                value=agent.heartbeat_rtt if agent.heartbeat_rtt is not None else float("nan"))
        out.append(rtt)
        out.append(CounterMetricFamily("zwrm_agent_heartbeats", "Heartbeats answered by the control plane.",
                                       value=agent.heartbeats_sent))
        out.append(GaugeMetricFamily(
            "zwrm_agent_fence_after_seconds",
            "Seconds without an answer from the control plane after which this agent stops its"
            " machines with volumes (fence_after); 0: it does not.",
            value=float(getattr(agent.config, "fence_after", 0) or 0)))
        out.append(CounterMetricFamily(
            "zwrm_agent_fenced_machines",
            "Machines with volumes this agent stopped because the control plane did not answer"
            " for fence_after.", value=getattr(agent, "fenced", 0)))
        expires = getattr(getattr(agent, "renewal", None), "expires_at", None)
        out.append(GaugeMetricFamily(
            "zwrm_agent_host_certificate_expiry_timestamp_seconds",
            "When the host certificate expires, POSIX time (NaN before the agent first"
            " connects); it is renewed when a third of its life is left.",
            value=expires if expires is not None else float("nan")))
        runtime = agent.runtime
        if runtime is None:
            return out
        out += await self._machines(runtime.driver)
        out += _volumes(runtime.volumes)
        out += _cache(runtime.cache)
        out += _transfers(runtime.transfers)
        return out

    async def _machines(self, driver):
        states, held = {}, {}
        ids = list(driver.list())
        for mid in ids:
            try:
                status = driver.status(mid)
            except Exception:
                continue
            state = status["state"]
            states[state] = states.get(state, 0) + 1
            why = status.get("paused") if state == "running" else None
            if why:
                held[why] = held.get(why, 0) + 1
        count = GaugeMetricFamily("zwrm_agent_machines", "Machines on this host, by state.", labels=["state"])
        for state, n in sorted(states.items()):
            count.add_metric([state], n)
        paused = GaugeMetricFamily(
            "zwrm_agent_machines_paused",
            "Running machines their hypervisor holds, by why (disk-full: a write waits for room"
            " on this host's disk; resumed by itself once there is room).", labels=["reason"])
        for why, n in sorted(held.items()):
            paused.add_metric([why], n)
        cpu = CounterMetricFamily("zwrm_machine_cpu_seconds",
                                  "CPU time (user and system) of the machine's QEMU process.", labels=["machine"])
        rss = GaugeMetricFamily("zwrm_machine_memory_rss_bytes",
                                "Resident memory of the machine's QEMU process.", labels=["machine"])
        mem = GaugeMetricFamily("zwrm_machine_memory_bytes", "Memory given to the machine.", labels=["machine"])
        disk = {key: CounterMetricFamily(name, text, labels=["machine", "drive"]) for key, name, text in _DISK}
        net = {key: CounterMetricFamily(name, text, labels=["machine", "device"]) for key, name, text in _NET}
        usage = getattr(driver, "usage", None)
        if usage is not None:
            running = [mid for mid in ids if _running(driver, mid)]
            results = await defer.DeferredList(
                [defer.maybeDeferred(usage, mid).addTimeout(self.timeout, self.reactor) for mid in running],
                consumeErrors=True)
            for mid, (ok, u) in zip(running, results, strict=True):
                if not ok:
                    self.log.debug("no usage of machine {id}: {why}", id=mid, why=u.getErrorMessage())
                    continue
                if not u:
                    continue
                cpu.add_metric([mid], u["cpu_seconds"])
                rss.add_metric([mid], u["rss_bytes"])
                mem.add_metric([mid], u["memory_bytes"])
                for drive, figures in sorted(u["disks"].items()):
                    for key, family in disk.items():
                        family.add_metric([mid, drive], figures[key])
                tap = u.get("net")
                if tap:
                    for key, family in net.items():
                        family.add_metric([mid, u.get("tap", "")], tap[key])
        return [count, paused, cpu, rss, mem, *disk.values(), *net.values()]


def _running(driver, mid):
    try:
        return driver.status(mid)["state"] == "running"
    except Exception:
        return False


def _volumes(volumes):
    size = GaugeMetricFamily("zwrm_volume_size_bytes", "Size of a volume on this host.", labels=["volume"])
    alloc = GaugeMetricFamily("zwrm_volume_allocated_bytes",
                              "Disk space a volume's (sparse) image takes on this host.", labels=["volume"])
    in_use = GaugeMetricFamily("zwrm_volume_in_use", "1 if a machine uses the volume.", labels=["volume"])
    snaps = GaugeMetricFamily("zwrm_volume_snapshots", "Snapshots of a volume on this host.",
                              labels=["volume"])
    snap_bytes = GaugeMetricFamily("zwrm_volume_snapshot_allocated_bytes",
                                   "Disk space a volume's snapshots take on this host.",
                                   labels=["volume"])
    for v in volumes.list():
        size.add_metric([v["id"]], v["size_bytes"])
        alloc.add_metric([v["id"]], v["allocated_bytes"])
        in_use.add_metric([v["id"]], int(bool(v["in_use_by"])))
    held = {}
    for s in volumes.snapshots():
        count, taken = held.get(s["volume_id"], (0, 0))
        held[s["volume_id"]] = (count + 1, taken + s["allocated_bytes"])
    for vid, (count, taken) in sorted(held.items()):
        snaps.add_metric([vid], count)
        snap_bytes.add_metric([vid], taken)
    return [size, alloc, in_use, snaps, snap_bytes]


def _cache(cache):
    s = cache.stats() if cache is not None else {}

    def g(name, text, key):
        return GaugeMetricFamily(name, text, value=s.get(key, 0))

    def c(name, text, key):
        return CounterMetricFamily(name, text, value=s.get(key, 0))

    return [
        g("zwrm_image_cache_size_bytes", "Bytes of images in this host's cache.", "size"),
        g("zwrm_image_cache_limit_bytes", "The image cache's size limit.", "limit"),
        g("zwrm_image_cache_blobs", "Image blobs in the cache.", "blobs"),
        g("zwrm_image_cache_pinned_blobs", "Blobs in use by machines (never evicted).", "pinned"),
        g("zwrm_image_cache_downloads", "Downloads under way.", "downloading"),
        c("zwrm_image_cache_hits", "Image pulls the cache answered.", "hits"),
        c("zwrm_image_cache_misses", "Image pulls that downloaded.", "misses"),
        c("zwrm_image_cache_evictions", "Blobs evicted to stay under the limit.", "evictions"),
    ]


def _transfers(transfers):
    sent = received = 0
    if transfers is not None:
        sent = transfers.sender.bytes_sent
        received = transfers.receiver.bytes_received
    return [
        CounterMetricFamily("zwrm_volume_transfer_sent_bytes",
                            "Volume data this host streamed to others (drains, moves).", value=sent),
        CounterMetricFamily("zwrm_volume_transfer_received_bytes",
                            "Volume data this host received from others and wrote.", value=received),
    ]


class MetricsResource(resource.Resource):
    """C{GET /metrics}: the L{AgentMetrics} of this scrape, as Prometheus text."""

    isLeaf = True
    log = Logger()

    def __init__(self, metrics):
        resource.Resource.__init__(self)
        self.metrics = metrics

    def render_GET(self, request):
        d = defer.Deferred.fromCoroutine(self.metrics.families())

        def write(families):
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            request.write(generate_latest(_Families(families)))

        def failed(f):
            self.log.failure("collecting metrics", f)
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain")
            request.write(b"metrics could not be collected (see the agent's log)\n")

        def finish(_):
            if not request._disconnected:
                request.finish()

        d.addCallbacks(write, failed).addBoth(finish)
        return server.NOT_DONE_YET


def make_site(metrics):
    """An HTTP site with C{/metrics} only (anything else is 404)."""
    root = Root()
    root.putChild(b"metrics", MetricsResource(metrics))
    return server.Site(root)
