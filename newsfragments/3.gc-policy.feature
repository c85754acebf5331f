zwrm-control has a garbage-collection policy (`[gc] policy = "freeze"`, the default): it freezes
the settled heap, collects only new objects every 5 s, and does a full collection only after
session churn or heap growth. One control plane now answers 10,000 agents' heartbeats (every
5 s) within 1 s on about half a core; before, CPython's full collections stalled it for up to a
second at that size. Every collection is timed in `/metrics` (`zwrm_gc_*`).
