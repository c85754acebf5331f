"""
A garbage-collection policy for a long-running process that holds many long-lived
objects: the control plane with thousands of WAMP sessions.

CPython's cyclic collector runs a full (generation 2) collection whenever the objects
that survived into generation 2 since the last one exceed a quarter of those it found
there.  A full collection walks every tracked object.  A control plane with 10,000 agent
sessions holds about 800,000 of them (69 per session, measured), and a full collection
stops the reactor for up to a second, so heartbeats queue behind it.

L{CollectionPolicy} keeps the settled heap out of the collector's way:

  - Every C{interval} seconds it collects whatever is not frozen (C{gc.collect()} walks
    only the objects that are not in the permanent generation, so this costs in
    proportion to what is new) and then freezes what survived (C{gc.freeze()}).  An
    automatic collection then never walks the settled sessions.
  - Frozen objects that die through their reference count are freed as usual.  Frozen
    objects that die in a reference cycle stay until the next full collection (unfreeze,
    collect everything, freeze again), which costs what CPython's own full collection
    costs.  The policy does one only when there is garbage to find:
      - when more WAMP sessions have closed since the last one than C{churn} times the
        sessions open (and at least C{min_closed}).  A closed session used to leave about
        50 objects in cycles (Twisted Web's request and channel, autobahn's protocol and
        its C{is_closed} Deferred); since issue 20 the router's WebSocket and RawSocket
        sessions are freed by reference counting (C{gc.DEBUG_SAVEALL} over 50 real agent
        sessions of a control plane, opened, heartbeating and closed: nothing of theirs
        in cycles; tests: C{SessionLifetimeTests}, C{check_freed} in
        C{tests/wamp/test_sockets.py}).  What is left in cycles is not per session:
        Twisted's thread pool leaves 4 objects per C{deferToThread} call, which die young
        and are collected before they are frozen.  The rule stays as a backstop for
        transports or plugins that still leave cycles; the garbage kept is bounded by
        C{churn} times the sessions' share of the heap;
      - or, as a backstop for garbage from anything else, when the frozen heap has
        grown by C{growth} (a fraction) since the last one.  A growth collection that
        frees less than C{barren} of the heap (1%) doubles the growth the next one waits
        for, up to C{max_growth}; one that frees more sets it back to C{growth}.  A heap
        growing from nothing to 20,000 agent sessions (a control plane's start, every
        agent reconnecting) had a full collection at each doubling, the last ones 0.4-1 s
        each, and each freed 15-3,210 objects of 0.17-0.83 million.
    A cluster whose agents stay connected needs no full collection; one where a quarter
    of the agents reconnect, or whose heap doubles, needs one.
Every collection, automatic or not, is timed (C{gc.callbacks}); L{CollectionPolicy.stats}
gives the figures that C{/metrics} shows.

A collection is not the only thing that stops the reactor: so can a burst of work in
one reactor turn (10,000 agents reconnecting at once).  While the policy runs, a timer
every C{probe_interval} (0.1 s) notes how late it fires: C{/metrics}
C{zwrm_reactor_pause_max_seconds} is the longest such pause since the start, whatever
caused it, which bounds how long any heartbeat waited behind other work.
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
    Freeze the settled heap; collect the rest often; collect everything only after
    session churn or heap growth (see the module docstring).

    This changes process-wide state (the collector's permanent generation and its
    callbacks), so one process has at most one running policy; L{stopService} unfreezes
    and removes its callback.

    @ivar stats: the L{CollectionStats} of every collection while running.
    @ivar young_collections: ticks that collected only what was not frozen.
    @ivar full_collections: ticks (and the start) that unfroze and collected everything.
    @ivar frozen: objects in the permanent generation after the last tick: counted
        exactly by a full collection, then plus what each tick and each automatic full
        collection froze (frozen objects freed since by reference counting are still
        counted until the next exact count, which a tick makes only when this count
        says the frozen heap has grown enough for a full collection).
    @ivar frozen_after_full: objects frozen right after the last full collection.
    @ivar last_young_seconds: how long the last young tick took (collect and freeze).
    @ivar last_full_seconds: how long the last full collection took.
    """

    log = Logger()

    def __init__(self, clock, interval=5.0, growth=1.0, churn=0.25, minimum=50_000,
                 min_closed=1000, gc=_gc, timer=time.perf_counter, probe_interval=0.1,
                 max_growth=8.0, barren=0.01):
        """
        @param clock: an L{IReactorTime} for the ticks.
        @param interval: seconds between ticks.
        @param growth: the fraction by which the frozen heap may grow before a tick does
            a full collection.
        @param churn: the fraction of the open sessions that may close before a tick
            does a full collection (see L{watch_sessions}); 0: never for churn, only for
            growth (closed WAMP sessions of the embedded router leave no cycles since
            issue 20, so a full collection after churn finds nothing of theirs and only
            costs its pause: about 1 s at 10,000 sessions).
        @param minimum: growth is never a reason for a full collection while fewer
            objects than this are frozen beyond the last full collection's count (keeps
            a small heap from collecting fully on every tick).
        @param min_closed: nor is churn while fewer sessions than this have closed.
        @param gc: the C{gc} module (the real one; a parameter for the tests only).
        @param timer: seconds, for timing collections.
        @param probe_interval: seconds between the reactor-pause probe's ticks (0: no probe).
        @param max_growth: the most the growth a full collection waits for is doubled to.
        @param barren: a growth collection that frees less than this fraction of the heap
            doubles the growth the next one waits for.
        """
        if interval <= 0:
            raise ValueError("interval must be positive")
        if growth <= 0:
            raise ValueError("growth must be positive")
        if churn < 0:
            raise ValueError("churn must be positive, or 0 for no full collections after churn")
        self._clock = clock
        self._gc = gc
        self._timer = timer
        self.interval = interval
        self.growth = growth
        self.max_growth = max(max_growth, growth)
        self.barren = barren
        #: the growth the next full collection waits for (L{growth}, doubled after each
        #: growth collection that found almost nothing)
        self.growth_now = growth
        self.churn = churn
        self.minimum = minimum
        self.min_closed = min_closed
        self.stats = CollectionStats(timer)
        self.young_collections = 0
        self.full_collections = 0
        self.frozen = 0
        self._frozen_exact = True
        self.frozen_after_full = 0
        self.last_young_seconds = 0.0
        self.last_full_seconds = 0.0
        self.last_full_reason = None
        self._loop = None
        self._closed = self._open = None
        self._closed_at_full = 0
        self.probe_interval = probe_interval
        self.max_pause_seconds = 0.0  # the longest the reactor was late for the probe's timer
        self.pauses_over = {0.1: 0, 0.25: 0, 1.0: 0, 5.0: 0}  # pauses longer than each, counted
        self.frozen_by_collector = 0  # automatic full collections whose survivors were frozen
        self._probe = None
        self._probe_last = None

    def watch_sessions(self, closed, open):
        """
        Count session churn towards a full collection.

        @param closed: returns how many sessions have closed so far (a counter).
        @param open: returns how many sessions are open now.
        """
        self._closed, self._open = closed, open
        self._closed_at_full = closed()

    def startService(self):
        service.Service.startService(self)
        self._gc.callbacks.append(self.stats)
        self._gc.callbacks.append(self._after_collection)
        self.full()
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=False)
        if self.probe_interval:
            self._probe_last = None
            self._probe = task.LoopingCall(self._probe_tick)
            self._probe.clock = self._clock
            self._probe.start(self.probe_interval, now=True)

    def _after_collection(self, phase, info):
        """
        The C{gc.callbacks} hook: what survived an automatic full collection of the
        unfrozen objects is long-lived; freeze it at once.  Between two ticks a burst of
        new objects (10,000 agents reconnecting) would otherwise be walked again by every
        automatic full collection, each longer than the last, and then by the tick.
        """
        if phase == "stop" and info["generation"] == 2 and self._loop is not None:
            self._freeze()
            self.frozen_by_collector += 1

    def _freeze(self):
        """
        Freeze what is not frozen, and count it into L{frozen}: C{gc.get_objects()} walks
        only what is not frozen yet, where C{gc.get_freeze_count()} walks the whole
        frozen heap (a linked list across the process's memory: 60-130 ms for 130,000
        objects, 0.4-1.1 s for a million, measured on the reference machine under load).
        """
        self.frozen += len(self._gc.get_objects())
        self._gc.freeze()
        self._frozen_exact = False

    def _probe_tick(self):
        """How late the probe's timer fired: a pause of the reactor (any cause)."""
        now = self._clock.seconds()
        if self._probe_last is not None:
            late = now - self._probe_last - self.probe_interval
            if late > self.max_pause_seconds:
                self.max_pause_seconds = late
            for limit in self.pauses_over:
                if late > limit:
                    self.pauses_over[limit] += 1
        self._probe_last = now

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._probe is not None and self._probe.running:
            self._probe.stop()
        self._probe = None
        self._gc.unfreeze()
        for hook in (self.stats, self._after_collection):
            if hook in self._gc.callbacks:
                self._gc.callbacks.remove(hook)
        return service.Service.stopService(self)

    def full_due(self):
        """
        Why a full collection is due, or C{None}: sessions closed, or the frozen heap
        grew, enough since the last one.
        """
        return self._due()[1]

    def _due(self):
        """C{("churn" or "growth", why)}, or C{(None, None)}: see L{full_due}."""
        if self._closed is not None and self.churn:
            closed = self._closed() - self._closed_at_full
            if closed >= self.min_closed and closed > self.churn * self._open():
                return "churn", f"{closed} sessions closed"
        grown = self.frozen - self.frozen_after_full
        if grown >= self.minimum and grown > self.growth_now * self.frozen_after_full:
            return "growth", f"frozen heap grew from {self.frozen_after_full} to {self.frozen} objects"
        return None, None

    def tick(self):
        """One tick: a young collection, or a full one when it is due."""
        kind, why = self._due()
        if why and not self._frozen_exact:
            # L{frozen} still counts the frozen objects freed since the last exact count:
            # count exactly (a walk of the frozen heap) only now that it matters
            self.frozen = self._gc.get_freeze_count()
            self._frozen_exact = True
            kind, why = self._due()
        if why:
            self.full(why, growth=kind == "growth")
        else:
            self.young()

    def young(self):
        """Collect what is not frozen, then freeze what survived."""
        t0 = self._timer()
        self._gc.collect()
        self._freeze()
        self.last_young_seconds = self._timer() - t0
        self.young_collections += 1

    def full(self, why="start", growth=False):
        """
        Unfreeze, collect everything, freeze again.

        @param growth: whether the heap's growth made it due (see L{growth_now}).
        """
        before = self.frozen
        if self._closed is not None:
            self._closed_at_full = self._closed()
        t0 = self._timer()
        self._gc.unfreeze()
        freed = self._gc.collect()
        self._gc.freeze()
        self.last_full_seconds = self._timer() - t0
        self.frozen = self.frozen_after_full = self._gc.get_freeze_count()
        self._frozen_exact = True
        self.full_collections += 1
        self.last_full_reason = why
        if growth:
            self.growth_now = (min(2 * self.growth_now, self.max_growth)
                               if freed < self.barren * self.frozen else self.growth)
        self.log.info(
            "full garbage collection ({why}): {freed} objects freed, {frozen} frozen"
            " (was {before}), {ms:.0f} ms; the next after growth by {next:g}x",
            why=why, freed=freed, frozen=self.frozen, before=before,
            ms=1000 * self.last_full_seconds, next=self.growth_now,
        )

    def metrics(self):
        """Prometheus text-format lines."""
        s = self.stats
        lines = ["# HELP zwrm_gc_collections_total Garbage collections, by generation.",
                 "# TYPE zwrm_gc_collections_total counter"]
        lines += [f'zwrm_gc_collections_total{{generation="{g}"}} {s.collections[g]}'
                  for g in range(3)]
        lines.append("# HELP zwrm_gc_pause_seconds_total Time spent in garbage collections.")
        lines.append("# TYPE zwrm_gc_pause_seconds_total counter")
        lines += [f'zwrm_gc_pause_seconds_total{{generation="{g}"}} {s.pause_seconds[g]:.6f}'
                  for g in range(3)]
        lines.append("# HELP zwrm_gc_pause_max_seconds The longest garbage-collection pause.")
        lines.append("# TYPE zwrm_gc_pause_max_seconds gauge")
        lines += [f'zwrm_gc_pause_max_seconds{{generation="{g}"}} {s.max_pause_seconds[g]:.6f}'
                  for g in range(3)]
        lines.append("# HELP zwrm_gc_collected_total Objects freed by garbage collections.")
        lines.append("# TYPE zwrm_gc_collected_total counter")
        lines += [f'zwrm_gc_collected_total{{generation="{g}"}} {s.collected[g]}'
                  for g in range(3)]
        lines += [
            "# HELP zwrm_gc_frozen_objects Objects frozen out of garbage collection (counted as they are"
            " frozen: those freed since the last full collection may still be in it).",
            "# TYPE zwrm_gc_frozen_objects gauge",
            f"zwrm_gc_frozen_objects {self.frozen}",
            "# HELP zwrm_gc_growth The growth of the frozen heap (a fraction) after which the next"
            " full collection is due (doubled after one that freed almost nothing).",
            "# TYPE zwrm_gc_growth gauge",
            f"zwrm_gc_growth {self.growth_now:g}",
            "# HELP zwrm_gc_full_collections_total Full collections the policy ran.",
            "# TYPE zwrm_gc_full_collections_total counter",
            f"zwrm_gc_full_collections_total {self.full_collections}",
            "# HELP zwrm_gc_last_full_seconds How long the last full collection took.",
            "# TYPE zwrm_gc_last_full_seconds gauge",
            f"zwrm_gc_last_full_seconds {self.last_full_seconds:.6f}",
            "# HELP zwrm_gc_last_young_seconds How long the last young collection took.",
            "# TYPE zwrm_gc_last_young_seconds gauge",
            f"zwrm_gc_last_young_seconds {self.last_young_seconds:.6f}",
            "# HELP zwrm_reactor_pause_max_seconds The longest the reactor was late for a timer"
            " since the start (a collection, or a burst of work in one turn).",
            "# TYPE zwrm_reactor_pause_max_seconds gauge",
            f"zwrm_reactor_pause_max_seconds {self.max_pause_seconds:.6f}",
            "# HELP zwrm_reactor_pauses_total Times the reactor was late for a timer by more"
            " than over_seconds.",
            "# TYPE zwrm_reactor_pauses_total counter",
        ] + [f'zwrm_reactor_pauses_total{{over_seconds="{limit:g}"}} {n}'
             for limit, n in self.pauses_over.items()]
        return lines
