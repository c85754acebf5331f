"""
The health monitor: marks hosts offline when their heartbeats stop.
"""

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger


def _observe(d):
    """A new Deferred with C{d}'s result, leaving C{d}'s own chain untouched."""
    out = Deferred()

    def fire(result):
        out.callback(result)
        return result

    d.addBoth(fire)
    return out


#: How long after a host's deadline (its last heartbeat and C{offline_after}) the check
#: it was armed for runs: a host is stale once its silence is I{more} than offline_after.
DUE_MARGIN = 0.01


class HealthMonitor(TimerService):
    """
    Every C{check_interval} seconds, marks offline each host whose last heartbeat is
    older than C{offline_after} seconds; and one check more at the moment the first host
    still counted alive will have been silent that long, when that comes before the next
    tick (a host is offline C{offline_after} seconds after its last heartbeat, not up to
    C{check_interval} later, as with per-node timers in Nomad).  While heartbeats come,
    the first such moment is later than the next tick: no check is added.

    After the monitor starts (the control plane started or restarted) no host is marked
    offline for C{grace} seconds, and a host's heartbeat age is counted from the start
    at the earliest: agents need time to reconnect to a control plane that was away.

    @ivar started_at: the clock time the monitor started.
    """

    log = Logger()

    def __init__(self, clock, registry, check_interval=15.0, offline_after=30.0, grace=None):
        """
        @param clock: an L{IReactorTime}.
        @param registry: a L{zwrm.control.registry.HostRegistry}.
        @param check_interval: seconds between checks.
        @param offline_after: seconds without a heartbeat after which a host is offline.
        @param grace: seconds after start during which nobody is marked offline
            (default C{offline_after}).
        """
        TimerService.__init__(self, check_interval, self.check)
        self.clock = clock
        self.registry = registry
        self.check_interval = check_interval
        self.offline_after = offline_after
        self.grace = offline_after if grace is None else grace
        self.started_at = None
        self._checking = None
        self._due = None  # the DelayedCall of the check armed for the first deadline
        self.after_check = []  # callables given the hosts each check marked offline

    def startService(self):
        self.started_at = self.clock.seconds()
        TimerService.startService(self)

    def stopService(self):
        self._disarm()
        return TimerService.stopService(self)

    def _disarm(self):
        if self._due is not None and self._due.active():
            self._due.cancel()
        self._due = None

    def next_deadline(self):
        """
        The first clock time still to come at which a host that is not offline will have
        been silent for more than C{offline_after} (the grace after the start counted),
        or L{None}.
        """
        return self._scan()[1]

    def _arm(self, due):
        """
        Arm one check for C{due}, the first deadline to come, if it comes before the next
        tick.  (One already past, a host whose mark failed, waits for the next tick: no
        loop.)
        """
        self._disarm()
        if due is None or not self.running:
            return
        delay = due - self.clock.seconds() + DUE_MARGIN
        if delay < self.check_interval:
            self._due = self.clock.callLater(delay, self._due_check)

    def _due_check(self):
        self._due = None
        self.check()

    def stale_hosts(self):
        """The ids of hosts that are not offline and have missed heartbeats too long."""
        return self._scan()[0]

    def _scan(self):
        """
        One walk over the hosts: those that are stale, and the first deadline to come of
        the others (L{next_deadline}).
        """
        now = self.clock.seconds()
        if self.started_at is None:
            return [], None
        ended = now - self.started_at >= self.grace  # the grace after the start
        stale, first = [], None
        for host_id in self.registry.host_ids():
            if self.registry.state(host_id) == "offline":
                continue
            last = max(self.registry.last_heartbeat(host_id) or 0.0, self.started_at)
            if ended and now - last > self.offline_after:
                stale.append(host_id)
                continue
            due = max(last + self.offline_after, self.started_at + self.grace)
            if due >= now and (first is None or due < first):
                first = due
        return stale, first

    def _stale(self, host_id, now):
        if self.registry.state(host_id) == "offline":
            return False
        last = max(self.registry.last_heartbeat(host_id) or 0.0, self.started_at)
        return now - last > self.offline_after

    def check(self):
        """
        Mark every stale host offline.

        A check never fails: whatever goes wrong is logged and the check marks what it can
        (a failed Deferred would stop the timer for good, and no host would ever be marked
        offline again).

        @return: a Deferred firing with the list of host ids marked offline (a check
            that is still running from the last tick is not started twice).
        """
        if self._checking is None:
            d = Deferred.fromCoroutine(self._check())
            d.addErrback(self._check_failed)

            def done(result):
                self._checking = None
                return result

            d.addBoth(done)
            if d.called:
                return d
            self._checking = d
        return _observe(self._checking)

    def _check_failed(self, f):
        self.log.failure("checking hosts' heartbeats", f)
        return []

    async def _check(self):
        marked = []
        stale, due = self._scan()
        for host_id in stale:
            try:
                # marking one host offline waits on the store: a host later in the list may
                # have heartbeated (or registered again, or gone) in the meantime
                if not self._stale(host_id, self.clock.seconds()):
                    continue
                await self.registry.mark_offline(host_id)
                marked.append(host_id)
            except Exception:
                self.log.failure("marking {host_id} offline", host_id=host_id)
        if marked:
            self.log.info(
                "marked {n} host(s) offline: {hosts}", n=len(marked), hosts=", ".join(marked)
            )
        for hook in self.after_check:  # e.g. the healer's host-loss decisions
            try:
                hook(marked)
            except Exception:
                self.log.failure("after a check of hosts' heartbeats")
        self._arm(due)  # (a host marked meanwhile or heard from again: a check too many)
        return marked
