"""
Test-wide rules.

Skips are counted. Under CI (the CI environment variable set), a skipped test in the
QEMU or multi-host suites fails the run: those suites must really run there.
"""

import os

import pytest

STRICT_MARKERS = ("qemu", "multihost")


def pytest_collection_modifyitems(config, items):
    config._zwrm_strict_items = {
        item.nodeid for item in items if any(item.get_closest_marker(m) for m in STRICT_MARKERS)
    }


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    strict = getattr(config, "_zwrm_strict_items", set())
    bad = [r for r in skipped if r.nodeid in strict]
    terminalreporter.write_line(f"zwrm: {len(skipped)} skipped, {len(bad)} of them in qemu/multihost suites")
    if bad and os.environ.get("CI"):
        for r in bad:
            terminalreporter.write_line(f"  not allowed under CI: {r.nodeid}")
        config._zwrm_strict_failed = True


def pytest_sessionfinish(session, exitstatus):
    if getattr(session.config, "_zwrm_strict_failed", False) and exitstatus == 0:
        session.exitstatus = 1
