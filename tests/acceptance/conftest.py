"""
The acceptance suite's shared cluster (one per run of this package) (tests/acceptance/cluster.py).

Steps are modules run in name order (test_10_install.py, test_20_deploy.py, ...), each
using the one C{cluster}; a later issue adds its own module (and may read what earlier
steps left in C{cluster.state}).  A failing step's report carries the end of every
service's log; the session ends with the time of each phase.
"""

import os
import shutil

import pytest

from tests.acceptance.cluster import Cluster, make_run_dir

_cluster = {}
_failed = []


@pytest.fixture(scope="package")
def cluster():
    # Package scope: torn down (services stopped, namespaces removed, packages purged) as soon
    # as the acceptance steps are done, before tests/packaging installs the packages itself.
    if os.geteuid() != 0:
        pytest.skip("the acceptance suite needs root (network namespaces, packages)")
    c = Cluster(make_run_dir())
    _cluster["c"] = c
    try:
        try:
            c.setup()
        except BaseException:
            _failed.append("cluster setup")
            raise
        yield c
    finally:
        c.close()
        if not _failed and not os.environ.get("ZWRM_KEEP_TEST_DIRS"):
            # kept (logs, data) after a failure, or when asked (as temp_dir keeps its own)
            shutil.rmtree(c.run_dir, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        _failed.append(item.nodeid)
    c = _cluster.get("c")
    if report.failed and c is not None and "cluster" in getattr(item, "fixturenames", ()):
        report.sections.append(("zwrm service logs", c.log_report()))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    c = _cluster.get("c")
    if c is None:
        return
    terminalreporter.write_line("zwrm acceptance: seconds per phase")
    for name, seconds in c.timings.items():
        terminalreporter.write_line(f"  {seconds:7.1f}  {name}")
    if os.path.exists(c.run_dir):
        terminalreporter.write_line(f"  run directory (logs): {c.run_dir}")
