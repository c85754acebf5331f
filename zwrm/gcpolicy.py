"""
A garbage-collection policy for a long-running process that holds many long-lived
objects: the control plane with thousands of WAMP sessions.

CPython's cyclic collector runs a full (generation 2) collection whenever the objects
that survived into generation 2 since the last one exceed a quarter of those it found
there.  A full collection walks every tracked object.  A control plane with 10,000 agent
sessions holds about 700,000 of them (69 per session, measured), and a full collection
stops the reactor for up to a second, so heartbeats queue behind it.

L{CollectionPolicy} keeps the settled heap out of the collector's way:

  - Every C{interval} seconds it collects whatever is not frozen (C{gc.collect()} walks
    only the objects that are not in the permanent generation, so this costs in
    proportion to what is new) and then freezes what survived (C{gc.freeze()}).  An
    automatic collection then never walks the settled sessions.
  - Frozen objects that die through their reference count are freed as usual.  Frozen
    objects that die in a reference cycle (a closed WAMP session leaves about 51 such
    objects, measured) stay until the next full collection.  So, like CPython's own rule
    but over the frozen generation, when the frozen objects have grown by C{growth} (a
    fraction) since the last full collection, the next tick does a full one: unfreeze,
    collect everything, freeze again.  A steady cluster never needs one; a cluster that
    grows or whose agents all reconnect needs one per C{growth} of growth, whose cost is
    that of CPython's own full collection.  The garbage kept is bounded by C{growth}
    times the live heap.

Every collection, automatic or not, is timed (C{gc.callbacks}); L{CollectionPolicy.stats}
gives the figures that C{/metrics} shows.
"""

import gc as _gc
import time

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger


class CollectionStats:
    """
    Counts and times every collection of the cyclic garbage collector while installed.

    @ivar collections: per generation, how many collections ran.
    @ivar pause_seconds: per generation, the total time they took.
    @ivar max_pause_seconds: per generation, the longest one.
    @ivar collected: per generation, the objects they freed.
    """

    def __init__(self, timer=time.perf_counter):
        self._timer = timer
        self._started = None
        self.collections = [0, 0, 0]
        self.pause_seconds = [0.0, 0.0, 0.0]
        self.max_pause_seconds = [0.0, 0.0, 0.0]
        self.collected = [0, 0, 0]

    def __call__(self, phase, info):
        """The C{gc.callbacks} hook."""
        if phase == "start":
            self._started = self._timer()
            return
        if self._started is None:
            return
        took = self._timer() - self._started
        self._started = None
        g = info["generation"]
        self.collections[g] += 1
        self.pause_seconds[g] += took
        self.max_pause_seconds[g] = max(self.max_pause_seconds[g], took)
        self.collected[g] += info["collected"]


class CollectionPolicy(service.Service):
    """
    Freeze the settled heap; collect the rest often; collect everything only when the
    frozen heap has grown by C{growth} (see the module docstring).

    This changes process-wide state (the collector's permanent generation and its
    callbacks), so one process has at most one running policy; L{stopService} unfreezes
    and removes its callback.

    @ivar stats: the L{CollectionStats} of every collection while running.
    @ivar young_collections: ticks that collected only what was not frozen.
    @ivar full_collections: ticks (and the start) that unfroze and collected everything.
    @ivar frozen: objects in the permanent generation after the last tick.
    @ivar frozen_after_full: objects frozen right after the last full collection.
    @ivar last_young_seconds: how long the last young tick took (collect and freeze).
    @ivar last_full_seconds: how long the last full collection took.
    """

    log = Logger()

    def __init__(self, clock, interval=10.0, growth=0.25, minimum=50_000, gc=_gc,
                 timer=time.perf_counter):
        """
        @param clock: an L{IReactorTime} for the ticks.
        @param interval: seconds between ticks.
        @param growth: the fraction by which the frozen heap may grow before a tick does
            a full collection.
        @param minimum: a full collection is never due while fewer objects than this are
            frozen beyond the last full collection's count (keeps a small heap from
            collecting fully on every tick).
        @param gc: the C{gc} module (the real one; a parameter for the tests only).
        @param timer: seconds, for timing collections.
        """
        if interval <= 0:
            raise ValueError("interval must be positive")
        if growth <= 0:
            raise ValueError("growth must be positive")
        self._clock = clock
        self._gc = gc
        self._timer = timer
        self.interval = interval
        self.growth = growth
        self.minimum = minimum
        self.stats = CollectionStats(timer)
        self.young_collections = 0
        self.full_collections = 0
        self.frozen = 0
        self.frozen_after_full = 0
        self.last_young_seconds = 0.0
        self.last_full_seconds = 0.0
        self._loop = None

    def startService(self):
        service.Service.startService(self)
        self._gc.callbacks.append(self.stats)
        self.full()
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=False)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self._gc.unfreeze()
        if self.stats in self._gc.callbacks:
            self._gc.callbacks.remove(self.stats)
        return service.Service.stopService(self)

    def full_due(self):
        """Whether the frozen heap has grown enough since the last full collection."""
        grown = self.frozen - self.frozen_after_full
        return grown >= self.minimum and grown > self.growth * self.frozen_after_full

    def tick(self):
        """One tick: a young collection, or a full one when it is due."""
        if self.full_due():
            self.full()
        else:
            self.young()

    def young(self):
        """Collect what is not frozen, then freeze what survived."""
        t0 = self._timer()
        self._gc.collect()
        self._gc.freeze()
        self.last_young_seconds = self._timer() - t0
        self.frozen = self._gc.get_freeze_count()
        self.young_collections += 1

    def full(self):
        """Unfreeze, collect everything, freeze again."""
        before = self.frozen
        t0 = self._timer()
        self._gc.unfreeze()
        freed = self._gc.collect()
        self._gc.freeze()
        self.last_full_seconds = self._timer() - t0
        self.frozen = self.frozen_after_full = self._gc.get_freeze_count()
        self.full_collections += 1
        self.log.info(
            "full garbage collection: {freed} objects freed, {frozen} frozen (was {before})"
            " in {ms:.0f} ms",
            freed=freed, frozen=self.frozen, before=before, ms=1000 * self.last_full_seconds,
        )

    def metrics(self):
        """Prometheus text-format lines."""
        s = self.stats
        lines = ["# TYPE zwrm_gc_collections_total counter"]
        lines += [f'zwrm_gc_collections_total{{generation="{g}"}} {s.collections[g]}'
                  for g in range(3)]
        lines.append("# TYPE zwrm_gc_pause_seconds_total counter")
        lines += [f'zwrm_gc_pause_seconds_total{{generation="{g}"}} {s.pause_seconds[g]:.6f}'
                  for g in range(3)]
        lines.append("# TYPE zwrm_gc_pause_max_seconds gauge")
        lines += [f'zwrm_gc_pause_max_seconds{{generation="{g}"}} {s.max_pause_seconds[g]:.6f}'
                  for g in range(3)]
        lines.append("# TYPE zwrm_gc_collected_total counter")
        lines += [f'zwrm_gc_collected_total{{generation="{g}"}} {s.collected[g]}'
                  for g in range(3)]
        lines += [
            "# TYPE zwrm_gc_frozen_objects gauge",
            f"zwrm_gc_frozen_objects {self.frozen}",
            "# TYPE zwrm_gc_full_collections_total counter",
            f"zwrm_gc_full_collections_total {self.full_collections}",
            "# TYPE zwrm_gc_last_full_seconds gauge",
            f"zwrm_gc_last_full_seconds {self.last_full_seconds:.6f}",
            "# TYPE zwrm_gc_last_young_seconds gauge",
            f"zwrm_gc_last_young_seconds {self.last_young_seconds:.6f}",
        ]
        return lines
