"""
Where the built-in placement strategies used to live; they are now in
L{zwrm.scheduler.strategies}. These modules only re-export them, for code that still
imports the old names (benchmarks/scheduler.py, tests/scheduler/test_properties.py);
new code imports L{zwrm.scheduler.strategies}.
"""
