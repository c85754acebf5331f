"""
Test-wide rules.

 - Skips are counted. Under CI (the CI environment variable set), any skipped test fails
   the run (the QEMU, multi-host and acceptance suites included): a missing tool is
   installed by the setup scripts, not skipped.
 - Hypothesis under CI runs derandomized without its example database, so a failure found
   once on a machine is never replayed there as a stale failure (locally it is, as usual).
 - A session deadline: after C{ZWRM_TEST_DEADLINE} seconds (under CI by default 1560, 26
   minutes: a hung run fails inside the 30-minute CI budget with a warm setup; a quiet run
   takes about 16 minutes on two workers, 2026-12-06) a watchdog prints every thread's stack
   and ends the run with exit status 2.  Each test also has a default timeout (pytest-timeout, see
   pyproject.toml); the deadline bounds their sum.
 - Two workers (pytest-xdist, C{scripts/test} passes C{-n 2 --dist loadgroup}): the tests
   that install the .debs system-wide (tests/acceptance, tests/packaging) share one worker
   and keep their order; the slow suites (QEMU, several processes) are handed out first, so
   the quick unit tests fill the gaps instead of leaving one worker alone with a long test
   at the end.
"""

import faulthandler
import os
import sys
import threading

import pytest
from hypothesis import settings

STRICT_MARKERS = ("qemu", "multihost", "acceptance")
_strict = set()
_skipped = []

DEADLINE_ENV = "ZWRM_TEST_DEADLINE"
CI_DEADLINE = 26 * 60  # inside the 30-minute CI budget with a warm setup (.ci/run caches)

#: Tests that install the packages system-wide (/opt/zwrm, the units): one worker, in order.
SYSTEM_WIDE = ("tests/acceptance/", "tests/packaging/")

if os.environ.get("CI"):
    settings.register_profile("zwrm-ci", database=None, derandomize=True, deadline=None)
    settings.load_profile("zwrm-ci")


def session_deadline(environ=os.environ):
    """Seconds the whole session may take, or L{None} (no deadline)."""
    text = environ.get(DEADLINE_ENV)
    if text:
        return float(text)
    return CI_DEADLINE if environ.get("CI") else None


def pytest_configure(config):
    deadline = session_deadline()
    if deadline:
        watchdog = threading.Timer(deadline, _deadline_passed, (config, deadline))
        watchdog.daemon = True
        watchdog.start()


def _deadline_passed(config, deadline):
    capman = config.pluginmanager.getplugin("capturemanager")
    try:
        if capman is not None:
            capman.suspend_global_capture(in_=False)  # the real stderr again
    except Exception:
        pass
    sys.__stderr__.write(
        f"\nzwrm: the test session ran past its deadline of {deadline:.0f}s ({DEADLINE_ENV});"
        " failing it. The stack of every thread:\n")
    sys.__stderr__.flush()
    faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
    sys.__stderr__.flush()
    os._exit(2)


def _group(item, name):
    """
    Put C{item} in pytest-xdist's group C{name}: what xdist's own hook does for the
    xdist_group marker (C{"@name"} after the node id), which pytest 9 no longer honours
    (its node ids live in C{_id}, a structured L{NodeId}, not in C{_nodeid}).
    """
    if item.nodeid.endswith(f"@{name}"):
        return
    node_id = getattr(item, "_id", None)
    if node_id is not None and hasattr(type(node_id), "parse"):
        item._id = type(node_id).parse(f"{item.nodeid}@{name}")
    else:
        item._nodeid = f"{item.nodeid}@{name}"


def _slow(item):
    return any(item.get_closest_marker(m) for m in STRICT_MARKERS)


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the groups off the markers
def pytest_collection_modifyitems(config, items):
    _strict.update(item.nodeid for item in items if _slow(item))
    grouping = bool(getattr(config.option, "loadgroup", False))
    for item in items:
        if item.nodeid.startswith(SYSTEM_WIDE):
            item.add_marker(pytest.mark.xdist_group("system-wide"))
            if grouping:
                _group(item, "system-wide")
    # The slow suites first (a stable sort: each keeps its order); see the module docstring.
    items.sort(key=lambda item: not _slow(item))


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)
        if any(m in report.keywords for m in STRICT_MARKERS):
            _strict.add(report.nodeid)  # with workers, the controller collects nothing


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    if _skipped and os.environ.get("CI") and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bad = [n for n in _skipped if n in _strict]
    terminalreporter.write_line(
        f"zwrm: {len(_skipped)} skipped, {len(bad)} of them in the qemu/multihost suites"
    )
    if _skipped and os.environ.get("CI"):
        for n in _skipped:
            terminalreporter.write_line(f"  skipped, not allowed under CI: {n}")
