"""
Test-wide rules.

Skips are counted. Under CI (the CI environment variable set), a skipped test in the
QEMU, multi-host or acceptance suites fails the run: those suites must really run there.
"""

import os

import pytest

STRICT_MARKERS = ("qemu", "multihost", "acceptance")
_strict = set()
_skipped = []


def pytest_collection_modifyitems(config, items):
    _strict.update(
        item.nodeid for item in items if any(item.get_closest_marker(m) for m in STRICT_MARKERS)
    )


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    bad = [n for n in _skipped if n in _strict]
    if bad and os.environ.get("CI") and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bad = [n for n in _skipped if n in _strict]
    terminalreporter.write_line(
        f"zwrm: {len(_skipped)} skipped, {len(bad)} of them in the qemu/multihost suites"
    )
    if bad and os.environ.get("CI"):
        for n in bad:
            terminalreporter.write_line(f"  skipped, not allowed under CI: {n}")
