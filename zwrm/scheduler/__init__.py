"""
The placement scheduler: decides which host each machine runs on.

Pure logic, no I/O: the control plane feeds a L{Scheduler} the hosts it knows
(L{Scheduler.update_host}, L{Scheduler.set_state}, L{Scheduler.remove_host}) and asks it
to L{place <Scheduler.place>} machines.  Every call runs to completion on the reactor
thread, so two deploys can interleave only between placements, and each placement
reserves its host's capacity before it returns: replicas of one batch and concurrent
deploys never oversubscribe a host.

How a host is chosen:

 1. The hard filters remove every host that is excluded, is not the host a volume
    pins the machine to, whose data disk is nearly full (state C{disk_full}), is not
    C{ready}, is in the wrong region or datacenter, lacks a required label, or lacks the
    vCPUs, memory or disk the request needs after everything already placed or reserved
    there.
 2. The strategy (an L{IPlacementStrategy} plugin) orders what is left; the first host
    wins, ties broken by host id.

When nothing is left, L{zwrm.errors.Unplaceable} says how many hosts each filter
removed, as Nomad reports placement failures::

    0/12 hosts fit: 3 not ready, 5 wrong region, 4 insufficient memory

Cost.  For a strategy with a host-only L{IPlacementStrategy.key} the scheduler keeps the
ready hosts of every constraint scope it has been asked about (all hosts, one region,
one datacenter, one region and datacenter) sorted by C{(key, host id)} in a blocked
list (L{_Index}) that records the most free vCPUs, memory and disk of any host per block
of about L{_Index.LOAD} hosts and per group of L{_Index.GROUP} blocks.  A placement walks
that order, skipping every group and block in which no host can have enough of some
resource, and checks hosts one by one only inside blocks that may fit; the first host
that passes every filter is the strategy's choice among I{all} eligible hosts (exact,
no sampling).  Reserving then moves one host in each scope it belongs to (bisection,
O(log n + LOAD)).  A placement thus costs O(log n + LOAD) plus n / (LOAD x GROUP) group
tests and up to GROUP block tests per group that may fit, and degrades towards a scan only when many hosts ahead
in the order pass the block test but fail in detail (fragmented free resources, a long
exclusion list, or a rare required label).  An L{IRequestAwarePlacementStrategy} is
scored on every eligible host: O(n).
"""

import itertools
from bisect import bisect_left
from dataclasses import dataclass, field

from zwrm.errors import InvalidArgument, NotFound, Unplaceable
from zwrm.interfaces import IPlacementStrategy, IRequestAwarePlacementStrategy

READY = "ready"
DISK_FULL = "disk_full"  # a ready host whose data disk is nearly full: placed on as not ready

# The hard filters, in the order a host is tested; each host that does not fit is
# counted under the first filter that removes it.
FILTERS = (
    ("excluded", "excluded"),
    ("not_pinned", "not the pinned host"),
    ("disk_full", "data disk full"),
    ("not_ready", "not ready"),
    ("wrong_region", "wrong region"),
    ("wrong_datacenter", "wrong datacenter"),
    ("missing_labels", "missing required labels"),
    ("insufficient_vcpus", "insufficient vcpus"),
    ("insufficient_memory", "insufficient memory"),
    ("insufficient_disk", "insufficient disk"),
)


def load_strategy(name, dirs=()):
    """
    The placement strategy plugin called C{name}.

    @param dirs: extra plugin directories from the configuration.
    @raise zwrm.plugins.PluginError: if there is none by that name; the message lists
        the available strategies.  The control plane stops at start with it.
    """
    import zwrm.plugins

    return zwrm.plugins.find(IPlacementStrategy, name, dirs, kind="placement strategy")


def _label_map(value, what):
    if value is None:
        return {}
    if isinstance(value, dict):
        items = value.items()
    else:
        try:
            items = [item.split("=", 1) for item in value]
        except (TypeError, AttributeError):
            raise InvalidArgument(
                f"{what} must be a mapping of label to value, or a list of 'label=value'"
            ) from None
        if any(len(item) != 2 for item in items):
            raise InvalidArgument(f"{what} must be written 'label=value'")
    out = {}
    for k, v in items:
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise InvalidArgument(f"{what}: labels and their values must be strings")
        out[k] = v
    return out


def _count(value, what, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(f"{what} must be a whole number >= {minimum}, not {value!r}")
    return value


def _name(value, what):
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} must be a non-empty string, not {value!r}")
    return value


@dataclass(frozen=True)
class PlacementRequest:
    """
    What one machine needs.

    @ivar vcpus: virtual CPUs, at least 1.
    @ivar memory_mb: memory in MiB, at least 1.
    @ivar disk_mb: local disk in MiB (the sum of its volumes' sizes), at least 0.
    @ivar region: if not L{None}, only hosts in this region.
    @ivar datacenter: if not L{None}, only hosts in this datacenter.
    @ivar pinned_host: if not L{None}, only this host (where the app's local volume
        lives), whatever the strategy.
    @ivar constraints: labels (name to value) a host must have.
    @ivar preferences: labels a host should have; only request-aware strategies look.
    @raise zwrm.errors.InvalidArgument: on construction, if a field is out of range.
    """

    vcpus: int
    memory_mb: int
    disk_mb: int = 0
    region: str | None = None
    datacenter: str | None = None
    pinned_host: str | None = None
    constraints: dict = field(default_factory=dict)
    preferences: dict = field(default_factory=dict)

    def __post_init__(self):
        _count(self.vcpus, "vcpus", 1)
        _count(self.memory_mb, "memory_mb", 1)
        _count(self.disk_mb, "disk_mb", 0)
        _name(self.region, "region")
        _name(self.datacenter, "datacenter")
        _name(self.pinned_host, "pinned_host")
        object.__setattr__(self, "constraints", _label_map(self.constraints, "constraints"))
        object.__setattr__(self, "preferences", _label_map(self.preferences, "preferences"))


@dataclass(frozen=True)
class Placement:
    """
    One reservation of a host's capacity for one machine.

    @ivar id: unique within its L{Scheduler}.
    @ivar host_id: the chosen host.
    @ivar vcpus: reserved vCPUs.
    @ivar memory_mb: reserved memory.
    @ivar disk_mb: reserved disk.
    """

    id: int
    host_id: str
    vcpus: int
    memory_mb: int
    disk_mb: int


class Host:
    """
    The scheduler's view of one host: what strategies' C{key} and C{score} see.

    Read-only for everyone but the L{Scheduler} that owns it.  See
    L{IPlacementStrategy.key} for the attributes.
    """

    __slots__ = (
        "id",
        "region",
        "datacenter",
        "state",
        "labels",
        "vcpus",
        "memory_mb",
        "disk_mb",
        "used_vcpus",
        "used_memory_mb",
        "used_disk_mb",
        "free_vcpus",
        "free_memory_mb",
        "free_disk_mb",
        "machines",
        "utilization",
        "last_placed",
        "_entry",
        "_base",
        "_indexes",
        "_gen",
    )

    def __init__(self, host_id):
        self.id = host_id
        self.region = self.datacenter = None
        self.state = READY
        self.labels = {}
        self.vcpus = self.memory_mb = self.disk_mb = 0
        self.used_vcpus = self.used_memory_mb = self.used_disk_mb = 0
        self.machines = 0
        self.last_placed = 0
        self._entry = None
        self._base = (0, 0, 0)
        self._indexes = ()
        self._gen = -1
        self._recompute()

    def _recompute(self):
        self.free_vcpus = self.vcpus - self.used_vcpus
        self.free_memory_mb = self.memory_mb - self.used_memory_mb
        self.free_disk_mb = self.disk_mb - self.used_disk_mb
        u = 0.0
        for used, cap in (
            (self.used_vcpus, self.vcpus),
            (self.used_memory_mb, self.memory_mb),
            (self.used_disk_mb, self.disk_mb),
        ):
            if cap > 0:
                f = used / cap
            else:
                f = 1.0 if used > 0 else 0.0
            if f > u:
                u = f
        self.utilization = u

    def __repr__(self):
        return (
            f"<Host {self.id} {self.state} {self.region}/{self.datacenter} "
            f"free {self.free_vcpus} vcpus {self.free_memory_mb} MiB {self.free_disk_mb} MiB disk"
            f" machines={self.machines}>"
        )


class _Index:
    """
    Hosts sorted by C{(strategy key, host id)}, in blocks of about L{LOAD}, with the
    largest free vCPUs, memory and disk per block and per group of L{GROUP} blocks, so
    that a search skips every group and every block where no host can fit.

    The free figures stored per host are those it had when it was inserted: the
    scheduler removes a host before changing it and inserts it again after.
    """

    LOAD = 48
    GROUP = 16

    def __init__(self, hosts=()):
        hosts = sorted(hosts, key=lambda h: h._entry)
        self._entries, self._hosts = [], []
        self._fv, self._fm, self._fd = [], [], []
        self._mv, self._mm, self._md = [], [], []
        self._gv, self._gm, self._gd = [], [], []
        self._last = []
        for i in range(0, len(hosts), self.LOAD):
            self._add_block(hosts[i : i + self.LOAD], len(self._entries))
        self._regroup()

    def __len__(self):
        return sum(len(b) for b in self._entries)

    def _add_block(self, hosts, at):
        fv = [h.free_vcpus for h in hosts]
        fm = [h.free_memory_mb for h in hosts]
        fd = [h.free_disk_mb for h in hosts]
        self._entries.insert(at, [h._entry for h in hosts])
        self._hosts.insert(at, list(hosts))
        self._fv.insert(at, fv)
        self._fm.insert(at, fm)
        self._fd.insert(at, fd)
        self._mv.insert(at, max(fv))
        self._mm.insert(at, max(fm))
        self._md.insert(at, max(fd))
        self._last.insert(at, hosts[-1]._entry)

    def _delete_block(self, b):
        for lst in (
            self._entries,
            self._hosts,
            self._fv,
            self._fm,
            self._fd,
            self._mv,
            self._mm,
            self._md,
            self._last,
        ):
            del lst[b]

    def _regroup(self):
        """Recompute every group's maxima (after blocks were added or deleted)."""
        G, mv, mm, md = self.GROUP, self._mv, self._mm, self._md
        starts = range(0, len(mv), G)
        self._gv = [max(mv[s : s + G]) for s in starts]
        self._gm = [max(mm[s : s + G]) for s in starts]
        self._gd = [max(md[s : s + G]) for s in starts]

    def _regroup_one(self, b, block_max, group_max):
        """Block C{b}'s maximum in one resource went down: recompute its group's."""
        G = self.GROUP
        g = b // G
        group_max[g] = max(block_max[g * G : g * G + G])

    def insert(self, host):
        entry = host._entry
        if not self._entries:
            self._add_block([host], 0)
            self._regroup()
            return
        last = self._last
        b = bisect_left(last, entry)
        if b == len(last):
            b -= 1
        entries = self._entries[b]
        i = bisect_left(entries, entry)
        entries.insert(i, entry)
        self._hosts[b].insert(i, host)
        v, m, d = host.free_vcpus, host.free_memory_mb, host.free_disk_mb
        self._fv[b].insert(i, v)
        self._fm[b].insert(i, m)
        self._fd[b].insert(i, d)
        if v > self._mv[b]:
            self._mv[b] = v
            g = b // self.GROUP
            if v > self._gv[g]:
                self._gv[g] = v
        if m > self._mm[b]:
            self._mm[b] = m
            g = b // self.GROUP
            if m > self._gm[g]:
                self._gm[g] = m
        if d > self._md[b]:
            self._md[b] = d
            g = b // self.GROUP
            if d > self._gd[g]:
                self._gd[g] = d
        last[b] = entries[-1]
        if len(entries) > 2 * self.LOAD:
            hosts = self._hosts[b]
            self._delete_block(b)
            half = len(hosts) // 2
            self._add_block(hosts[:half], b)
            self._add_block(hosts[half:], b + 1)
            self._regroup()

    def remove(self, host):
        entry = host._entry
        last = self._last
        # A placement usually takes a host from the first block (the first fit).
        b = 0 if entry <= last[0] else bisect_left(last, entry, 1)
        entries = self._entries[b]
        i = bisect_left(entries, entry)
        if entries[i] != entry:  # pragma: no cover (a bug)
            raise AssertionError(f"{host!r} is not in this index")
        if len(entries) == 1:
            self._delete_block(b)
            self._regroup()
            return
        del entries[i]
        del self._hosts[b][i]
        v = self._fv[b].pop(i)
        m = self._fm[b].pop(i)
        d = self._fd[b].pop(i)
        if v == self._mv[b]:
            self._mv[b] = new = max(self._fv[b])
            if new < v:
                self._regroup_one(b, self._mv, self._gv)
        if m == self._mm[b]:
            self._mm[b] = new = max(self._fm[b])
            if new < m:
                self._regroup_one(b, self._mm, self._gm)
        if d == self._md[b]:
            self._md[b] = new = max(self._fd[b])
            if new < d:
                self._regroup_one(b, self._md, self._gd)
        last[b] = entries[-1]

    def first_fit(self, vcpus, memory_mb, disk_mb, exclude, constraints):
        """
        The first host in order with at least this much free that is not in
        C{exclude} and has every label in C{constraints}, or L{None}.
        """
        G = self.GROUP
        gv, gm, gd = self._gv, self._gm, self._gd
        mv, mm, md = self._mv, self._mm, self._md
        b, nblocks = 0, len(mv)
        while b < nblocks:
            if not b % G:
                g = b // G
                if gv[g] < vcpus or gm[g] < memory_mb or gd[g] < disk_mb:
                    b += G
                    continue
            if mv[b] < vcpus or mm[b] < memory_mb or md[b] < disk_mb:
                b += 1
                continue
            fv, fm, fd = self._fv[b], self._fm[b], self._fd[b]
            hosts = self._hosts[b]
            for i in range(len(hosts)):
                if fv[i] < vcpus or fm[i] < memory_mb or fd[i] < disk_mb:
                    continue
                host = hosts[i]
                if exclude and host.id in exclude:
                    continue
                if constraints and not _has_labels(host, constraints):
                    continue
                return host
            b += 1
        return None

    def hosts(self):
        """Every host, in order."""
        return itertools.chain.from_iterable(self._hosts)

    def check(self):
        """Assert the invariants (for tests)."""
        flat = list(itertools.chain.from_iterable(self._entries))
        assert flat == sorted(flat), "entries out of order"
        for b, hosts in enumerate(self._hosts):
            assert hosts, "empty block"
            assert [h._entry for h in hosts] == self._entries[b]
            assert self._fv[b] == [h.free_vcpus for h in hosts]
            assert self._fm[b] == [h.free_memory_mb for h in hosts]
            assert self._fd[b] == [h.free_disk_mb for h in hosts]
            assert self._mv[b] == max(self._fv[b])
            assert self._mm[b] == max(self._fm[b])
            assert self._md[b] == max(self._fd[b])
            assert self._last[b] == self._entries[b][-1]
        G = self.GROUP
        starts = range(0, len(self._mv), G)
        assert self._gv == [max(self._mv[s : s + G]) for s in starts]
        assert self._gm == [max(self._mm[s : s + G]) for s in starts]
        assert self._gd == [max(self._md[s : s + G]) for s in starts]


def _exclusions(exclude):
    if not exclude:
        return frozenset()
    if isinstance(exclude, str) or not all(isinstance(h, str) for h in exclude):
        raise InvalidArgument("exclude must be a list of host ids")
    return frozenset(exclude)


def _has_labels(host, constraints):
    labels = host.labels
    for k, v in constraints.items():
        if labels.get(k) != v:
            return False
    return True


class Scheduler:
    """
    Places machines on hosts: hard filters first, then a strategy's order.

    @ivar strategy: the L{IPlacementStrategy} in use.
    @ivar exhaustive: if true, every placement scans and ranks every host (O(n)): the
        reference the indexed search is tested and benchmarked against.
    """

    def __init__(self, strategy, exhaustive=False):
        """
        @param strategy: an L{IPlacementStrategy} provider (see L{load_strategy}).
        @param exhaustive: see L{exhaustive}.
        """
        self.strategy = strategy
        self.exhaustive = exhaustive
        self._aware = IRequestAwarePlacementStrategy.providedBy(strategy)
        self._key = strategy.key
        self._hosts = {}
        self._scopes = {}
        self._placements = {}
        self._committed = set()
        self._ids = itertools.count(1)
        self._clock = 0
        self._gen = 0

    # --- the host inventory -----------------------------------------------------------

    def update_host(self, record):
        """
        Add a host or change what the scheduler knows about it.

        @param record: a mapping as stored in the C{hosts} table: C{id}, C{region},
            C{datacenter}, C{state}, C{vcpus}, C{memory_mb}, C{disk_mb}, optional
            C{labels} (mapping) and optional C{alloc_vcpus}, C{alloc_memory_mb},
            C{alloc_disk_mb}: capacity in use by machines this scheduler holds no
            placement for (e.g. found running when the control plane started and not
            L{restored <restore>}).  Placements made here come on top of them.
        @return: the L{Host}.
        @raise zwrm.errors.InvalidArgument: if a field is missing or out of range.
        """
        try:
            host_id = _name(record["id"], "host id")
            # A host without a region or datacenter ("" or None) only matches requests
            # that do not ask for one.
            region = _name(record["region"] or None, "region")
            datacenter = _name(record["datacenter"] or None, "datacenter")
            state = _name(record.get("state", READY), "state")
            vcpus = _count(record["vcpus"], "vcpus", 0)
            memory_mb = _count(record["memory_mb"], "memory_mb", 0)
            disk_mb = _count(record.get("disk_mb", 0), "disk_mb", 0)
            alloc = (
                _count(record.get("alloc_vcpus") or 0, "alloc_vcpus", 0),
                _count(record.get("alloc_memory_mb") or 0, "alloc_memory_mb", 0),
                _count(record.get("alloc_disk_mb") or 0, "alloc_disk_mb", 0),
            )
            labels = _label_map(record.get("labels"), "labels")
        except KeyError as e:
            raise InvalidArgument(f"host record lacks {e.args[0]!r}") from None
        except TypeError:
            raise InvalidArgument("a host record must be a mapping") from None
        host = self._hosts.get(host_id)
        if host is None:
            host = self._hosts[host_id] = Host(host_id)
        elif (
            (host.region, host.datacenter, host.state, host.labels) == (region, datacenter, state, labels)
            and (host.vcpus, host.memory_mb, host.disk_mb) == (vcpus, memory_mb, disk_mb)
            and host._base == alloc
        ):
            return host  # nothing changed: keep the indexes as they are
        else:
            self._unindex(host)
        base = host._base
        placed = (host.used_vcpus - base[0], host.used_memory_mb - base[1], host.used_disk_mb - base[2])
        host.region, host.datacenter, host.state, host.labels = region, datacenter, state, labels
        host._gen = -1
        host.vcpus, host.memory_mb, host.disk_mb = vcpus, memory_mb, disk_mb
        host.used_vcpus = alloc[0] + placed[0]
        host.used_memory_mb = alloc[1] + placed[1]
        host.used_disk_mb = alloc[2] + placed[2]
        host._base = alloc
        host._recompute()
        self._index(host)
        return host

    def set_state(self, host_id, state):
        """
        Record a host's new state; only C{ready} hosts are placed on.

        @raise zwrm.errors.NotFound: for an unknown host.
        """
        host = self._host(host_id)
        if host.state == state:
            return
        self._unindex(host)
        host.state = state
        self._index(host)

    def remove_host(self, host_id):
        """
        Forget a host and its placements (releasing them later is harmless).

        @raise zwrm.errors.NotFound: for an unknown host.
        """
        host = self._host(host_id)
        self._unindex(host)
        del self._hosts[host_id]
        for p in [p for p in self._placements.values() if p.host_id == host_id]:
            del self._placements[p.id]
            self._committed.discard(p.id)

    def host(self, host_id):
        """
        The L{Host} called C{host_id}.

        @raise zwrm.errors.NotFound: if there is none.
        """
        return self._host(host_id)

    def hosts(self):
        """Every L{Host}, by id."""
        return [self._hosts[k] for k in sorted(self._hosts)]

    # --- placing ----------------------------------------------------------------------

    def place(self, request, exclude=()):
        """
        Choose a host for one machine and reserve its capacity there.

        @param request: a L{PlacementRequest}.
        @param exclude: host ids not to use (e.g. a draining host).
        @return: the L{Placement}; its capacity stays reserved until L{release}.
        @raise zwrm.errors.Unplaceable: if no host passes the filters; the message and
            the C{hosts} and C{filtered} details say how many each filter removed.
        """
        exclude = _exclusions(exclude)
        host = self._choose(request, exclude)
        if host is None:
            raise self._unplaceable(request, exclude)
        return self._reserve(host, request)

    def place_many(self, request, replicas, exclude=()):
        """
        Place C{replicas} machines of the same shape, all or none: each placement
        accounts for the ones before it.

        @return: a list of L{Placement}s.
        @raise zwrm.errors.Unplaceable: if one cannot be placed; the ones placed before
            it are released, and the message says how many were placed.
        """
        _count(replicas, "replicas", 1)
        exclude = _exclusions(exclude)
        placed = []
        try:
            for _ in range(replicas):
                placed.append(self.place(request, exclude))
        except Unplaceable as e:
            for p in placed:
                self.release(p)
            details = dict(e.kwargs)
            details.update(replicas=replicas, placed=len(placed))
            raise Unplaceable(
                f"only {len(placed)} of {replicas} replicas fit; then {e.message}", **details
            ) from None
        return placed

    def restore(self, host_id, request):
        """
        Account for a machine that already runs on C{host_id} (after a control plane
        restart), without filtering: a committed placement.

        @raise zwrm.errors.NotFound: for an unknown host.
        """
        placement = self._reserve(self._host(host_id), request)
        self._committed.add(placement.id)
        return placement

    def commit(self, placement):
        """
        The machine of C{placement} started: its reservation becomes a lasting
        allocation (capacity stays taken until L{release}).

        @raise zwrm.errors.NotFound: if the placement was released or never made here.
        """
        if placement.id not in self._placements:
            raise NotFound(f"placement {placement.id} is not reserved")
        self._committed.add(placement.id)

    def release(self, placement):
        """
        Give back the capacity of C{placement} (its machine failed, stopped for good or
        was destroyed).  Releasing twice is harmless.

        @return: C{True} if capacity was given back, C{False} if it already had been.
        """
        if self._placements.pop(placement.id, None) is None:
            return False
        self._committed.discard(placement.id)
        host = self._hosts.get(placement.host_id)
        if host is not None:
            self._unindex(host)
            host.used_vcpus -= placement.vcpus
            host.used_memory_mb -= placement.memory_mb
            host.used_disk_mb -= placement.disk_mb
            host.machines -= 1
            host._recompute()
            self._index(host)
        return True

    def is_committed(self, placement):
        """Whether L{commit} was called for C{placement} (and it was not released)."""
        return placement.id in self._committed

    def placements(self):
        """Every placement not released, by id."""
        return [self._placements[k] for k in sorted(self._placements)]

    # --- internals ----------------------------------------------------------------------

    def _host(self, host_id):
        try:
            return self._hosts[host_id]
        except KeyError:
            raise NotFound(f"no host {host_id!r}") from None

    def _indexes_of(self, host):
        """The indexes of the scopes C{host} belongs to (cached until a scope is added)."""
        if host._gen != self._gen:
            r, d = host.region, host.datacenter
            scopes = self._scopes
            # dict.fromkeys: without a region or datacenter some scopes coincide.
            host._indexes = tuple(
                scopes[s] for s in dict.fromkeys(((None, None), (r, None), (None, d), (r, d)))
                if s in scopes
            )
            host._gen = self._gen
        return host._indexes

    def _index(self, host):
        key = self._key(host)
        # Flat entries (key..., id) compare faster than nested ones and sort the same
        # for keys of one shape.
        host._entry = (*key, host.id) if type(key) is tuple else (key, host.id)
        if host.state != READY:
            return
        for index in self._indexes_of(host):
            index.insert(host)

    def _unindex(self, host):
        if host.state != READY:
            return
        for index in self._indexes_of(host):
            index.remove(host)

    def _scope(self, region, datacenter):
        s = (region, datacenter)
        index = self._scopes.get(s)
        if index is None:
            self._gen += 1
            index = self._scopes[s] = _Index(
                h
                for h in self._hosts.values()
                if h.state == READY
                and (region is None or h.region == region)
                and (datacenter is None or h.datacenter == datacenter)
            )
        return index

    def _fits(self, host, request, exclude):
        return (
            host.id not in exclude
            and host.state == READY
            and (request.region is None or host.region == request.region)
            and (request.datacenter is None or host.datacenter == request.datacenter)
            and (not request.constraints or _has_labels(host, request.constraints))
            and host.free_vcpus >= request.vcpus
            and host.free_memory_mb >= request.memory_mb
            and host.free_disk_mb >= request.disk_mb
        )

    def _choose(self, request, exclude):
        if request.pinned_host is not None:
            host = self._hosts.get(request.pinned_host)
            if host is not None and self._fits(host, request, exclude):
                return host
            return None
        if self.exhaustive or self._aware:
            return self._choose_exhaustively(request, exclude)
        return self._scope(request.region, request.datacenter).first_fit(
            request.vcpus, request.memory_mb, request.disk_mb, exclude, request.constraints
        )

    def _choose_exhaustively(self, request, exclude):
        best = best_rank = None
        key, fits = self._key, self._fits
        score = self.strategy.score if self._aware else None
        for host in self._hosts.values():
            if not fits(host, request, exclude):
                continue
            rank = (key(host), host.id)
            if score is not None:
                rank = (score(host, request), rank)
            if best is None or rank < best_rank:
                best, best_rank = host, rank
        return best

    def _reserve(self, host, request):
        placement = Placement(
            next(self._ids), host.id, request.vcpus, request.memory_mb, request.disk_mb
        )
        self._unindex(host)
        host.used_vcpus += request.vcpus
        host.used_memory_mb += request.memory_mb
        host.used_disk_mb += request.disk_mb
        host.machines += 1
        self._clock += 1
        host.last_placed = self._clock
        host._recompute()
        self._index(host)
        self._placements[placement.id] = placement
        return placement

    def _unplaceable(self, request, exclude):
        counts = dict.fromkeys((k for k, _ in FILTERS), 0)
        for host in self._hosts.values():
            counts[self._first_failed_filter(host, request, exclude)] += 1
        total = len(self._hosts)
        reasons = [f"{counts[k]} {label}" for k, label in FILTERS if counts[k]]
        message = f"0/{total} hosts fit"
        if total == 0:
            message += ": no hosts are registered"
        else:
            message += ": " + ", ".join(reasons)
        if request.pinned_host is not None and request.pinned_host not in self._hosts:
            message += f" (the pinned host {request.pinned_host!r} is not registered)"
        filtered = {k: v for k, v in counts.items() if v}
        return Unplaceable(message, hosts=total, filtered=filtered)

    def _first_failed_filter(self, host, request, exclude):
        if host.id in exclude:
            return "excluded"
        if request.pinned_host is not None and host.id != request.pinned_host:
            return "not_pinned"
        if host.state == DISK_FULL:
            return "disk_full"
        if host.state != READY:
            return "not_ready"
        if request.region is not None and host.region != request.region:
            return "wrong_region"
        if request.datacenter is not None and host.datacenter != request.datacenter:
            return "wrong_datacenter"
        if request.constraints and not _has_labels(host, request.constraints):
            return "missing_labels"
        if host.free_vcpus < request.vcpus:
            return "insufficient_vcpus"
        if host.free_memory_mb < request.memory_mb:
            return "insufficient_memory"
        if host.free_disk_mb < request.disk_mb:
            return "insufficient_disk"
        raise AssertionError(f"{host!r} fits {request!r} but was not chosen")  # a bug
