"""Helpers shared by the scheduler tests."""

import os

from zwrm.scheduler import Scheduler
from zwrm.scheduler.strategies.pack import Pack
from zwrm.scheduler.strategies.spread import Spread

PLUGIN_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "plugins")


def record(host_id, region="eu", datacenter="dc1", state="ready", vcpus=8, memory_mb=8192,
           disk_mb=10000, labels=None, **alloc):
    """A host record shaped like a row of the store's C{hosts} table."""
    r = dict(id=host_id, region=region, datacenter=datacenter, state=state, vcpus=vcpus,
             memory_mb=memory_mb, disk_mb=disk_mb, labels=labels or {})
    r.update(alloc)
    return r


def scheduler(strategy=None, hosts=(), **kw):
    s = Scheduler(strategy or Spread(), **kw)
    for h in hosts:
        s.update_host(h if isinstance(h, dict) else record(h))
    return s


def check_indexes(s):
    """Every materialized index is sorted, consistent, and holds exactly its hosts."""
    for (region, dc), index in s._scopes.items():
        index.check()
        want = sorted(
            h._entry for h in s._hosts.values()
            if h.state == "ready"
            and (region is None or h.region == region)
            and (dc is None or h.datacenter == dc)
        )
        assert [h._entry for h in index.hosts()] == want


STRATEGIES = {"spread": Spread, "pack": Pack}
