"""
The control plane's resource layer, in the style of Buildbot's data API
(C{master/buildbot/data/base.py}: C{ResourceType}, C{updateMethod}, C{produceEvent}).

One module per resource (L{hosts}, L{apps}, L{machines}, L{volumes}, L{drains}) owns:

 - its rows in the store (nobody else writes them);
 - the one translation between a row and the dict that goes on the wire (C{wire});
 - its update methods (marked L{update_method}): each stores the change and one event
   whose payload is the resource's wire form (plus C{old} and C{reason} where a state
   changed), on the resource's topic, in one transaction (L{Resource.store_with_event}):
   a control plane that stops in between keeps both or neither, so a follower of the
   event log (C{zwrm events --follow}, resuming from its cursor) misses no change.

An event is appended to the store's event log, then given to every local subscriber
(L{Resource.subscribe}: the scheduler's host index, waits on a machine's health), then
published over WAMP.  Subscribers are called synchronously, in subscription order, after
the change is stored: a cache fed by them is never behind the store when the update
method returns.  A subscriber that raises is logged and does not stop the others.

The services over this layer (the host registry, apps, drains) change state only through
these update methods and learn about changes only from these events.
"""

from twisted.logger import Logger


def subscription(callbacks, callback):
    """
    Add C{callback} to the list C{callbacks}.

    @return: a function of no arguments that takes it out again.
    """
    callbacks.append(callback)

    def unsubscribe():
        if callback in callbacks:
            callbacks.remove(callback)

    return unsubscribe


def update_method(fn):
    """
    Mark C{fn} as an update method of its resource: it stores a change, then produces one
    event (see L{Resource.produce_event}).
    """
    fn.is_update_method = True
    return fn


class Resource:
    """
    The base of every resource: its topic, its subscribers and how it produces events.

    @cvar topic: the WAMP topic its events are published on.
    """

    topic = None
    log = Logger()

    def __init__(self, clock, store, publish):
        """
        @param clock: an L{IReactorTime}; its C{seconds()} is the time of every record.
        @param store: the L{zwrm.control.store.Store}.
        @param publish: C{publish(topic, event)}, called after each stored event.
        """
        self._clock = clock
        self._store = store
        self._publish = publish
        self._subscribers = []

    def subscribe(self, callback):
        """
        Call C{callback(event)} with every event of this resource from now on.

        @return: a function of no arguments that ends the subscription.
        """
        return subscription(self._subscribers, callback)

    def deliver(self, event):
        """Give a stored event to the local subscribers, then publish it."""
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                self.log.failure("an event subscriber of {topic} failed", topic=self.topic)
        try:
            self._publish(self.topic, event)
        except Exception:
            self.log.failure("publishing on {topic}", topic=self.topic)

    async def produce_event(self, kind, subject, payload):
        """
        Append an event to the store's log, then deliver it (L{deliver}): for an event with
        no change of its own stored (a change kept in memory, an announcement).

        @return: the stored event (C{{id, ts, topic, kind, subject, payload}}).
        """
        event = await self._store.add_event(self.topic, kind, subject, payload)
        self.deliver(event)
        return event

    async def store_with_event(self, change, kind, subject, payload):
        """
        Run C{change(db)} in the store's thread and append its event, in one transaction;
        then deliver the event (L{deliver}).

        @param payload: the event's payload, or a function of C{change}'s result that gives
            it (run in the store's thread: it may only combine that result with what was
            built before, e.g. a version the change stored).
        @return: C{change}'s result.
        """
        result, _ = await store_with_events(self._store, change,
                                            [(self, kind, subject, payload)])
        return result


async def store_with_events(store, change, events, stored=None):
    """
    Run C{change(db)} and append the events of one or more resources in one transaction
    (L{zwrm.control.store.Store.change_with_events}); then deliver each, by its resource.

    @param events: C{[(resource, kind, subject, payload)]}; a payload may be a function of
        C{change}'s result (as in L{Resource.store_with_event}).
    @param stored: L{None}, or C{stored(result)}, called once all of it is stored and before
        any event is delivered: memory follows the store, and subscribers see it followed.
    @return: C{(change's result, [event, ...])}.
    """
    def to_store(result):
        return [(resource.topic, kind, subject, payload(result) if callable(payload) else payload)
                for resource, kind, subject, payload in events]

    result, events_stored = await store.change_with_events(change, to_store)
    if stored is not None:
        stored(result)
    for (resource, _, _, _), event in zip(events, events_stored, strict=True):
        resource.deliver(event)
    return result, events_stored


def update_methods(resource):
    """The names of C{resource}'s update methods (for docs and tests)."""
    return sorted(
        name for name in dir(type(resource))
        if getattr(getattr(type(resource), name, None), "is_update_method", False)
    )


class Data:
    """
    Every resource of one control plane, over one store (Buildbot's C{DataConnector}).

    @ivar hosts: the L{zwrm.control.resources.hosts.Hosts}.
    @ivar machines: the L{zwrm.control.resources.machines.Machines}.
    @ivar volumes: the L{zwrm.control.resources.volumes.Volumes}.
    @ivar apps: the L{zwrm.control.resources.apps.Apps}.
    @ivar drains: the L{zwrm.control.resources.drains.Drains} (drains and migrations).
    """

    def __init__(self, clock, store, publish):
        """
        @param publish: C{publish(topic, event)}, called after each stored event.
        """
        from zwrm.control.resources.apps import Apps
        from zwrm.control.resources.drains import Drains
        from zwrm.control.resources.hosts import Hosts
        from zwrm.control.resources.machines import Machines
        from zwrm.control.resources.volumes import Volumes

        self.store = store
        self.hosts = Hosts(clock, store, publish)
        self.machines = Machines(clock, store, publish)
        self.volumes = Volumes(clock, store, publish)
        self.apps = Apps(clock, store, publish)
        self.drains = Drains(clock, store, publish, volumes=self.volumes)
