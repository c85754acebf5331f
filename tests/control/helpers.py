"""Shared pieces of the control plane's unit tests."""

from twisted.internet import reactor
from twisted.internet.task import Clock

from zwrm.control.registry import HostRegistry
from zwrm.control.store import Store


async def make_registry(testcase, path=":memory:", clock=None, **kw):
    """
    A registry over a real store (an in-memory database by default), a Clock and a list
    of published events; the store is stopped at cleanup.
    """
    clock = clock or Clock()
    store = Store(reactor, path, now=clock.seconds)
    await store.start()
    testcase.addCleanup(store.stop)
    published = []
    registry = HostRegistry(clock, store, lambda t, e: published.append((t, e)), **kw)
    await registry.load()
    return clock, store, registry, published


FACTS = {
    "name": "worker-1",
    "region": "eu-central",
    "datacenter": "dc1",
    "address": "10.0.0.1",
    "labels": {"disk": "ssd"},
    "vcpus": 8,
    "memory_mb": 16384,
    "disk_mb": 100000,
    "agent_version": "0.1",
}
