"""
The test-wide rules of tests/conftest.py, run on small test files in a child pytest: under CI
any skip fails the run; a session that passes its deadline fails with every thread's stack.
"""

import os
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CIRulesTests(SynchronousTestCase):
    def pytest(self, source, *args, **env):
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "test_sample.py"), "w") as f:
            f.write(source)
        environ = {k: v for k, v in os.environ.items()
                   if k not in ("CI", "ZWRM_TEST_DEADLINE", "PYTEST_ADDOPTS")}
        environ.update(env)
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
             "-q", *args, "--rootdir", directory, directory],
            cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout + done.stderr, time.monotonic() - started

    SKIPS = (
        "import pytest\n"
        "def test_ok():\n    pass\n"
        "def test_skipped():\n    pytest.skip('a missing tool')\n"
    )

    def test_any_skip_fails_under_ci(self):
        code, out, _ = self.pytest(self.SKIPS, CI="true")
        self.assertEqual(code, 1, out)
        self.assertIn("skipped, not allowed under CI: test_sample.py::test_skipped", out)

    def test_any_skip_fails_under_ci_with_workers(self):
        """With pytest-xdist's workers (as scripts/test runs), the controller still counts."""
        code, out, _ = self.pytest(
            "import pytest\n"
            "@pytest.mark.qemu\n"
            "def test_skipped():\n    pytest.skip('a missing tool')\n"
            "def test_ok():\n    pass\n", "-n", "2", "--dist", "loadgroup", CI="true")
        self.assertEqual(code, 1, out)
        self.assertIn("skipped, not allowed under CI: test_sample.py::test_skipped", out)
        self.assertIn("zwrm: 1 skipped, 1 of them in the qemu/multihost suites", out)

    def test_skips_allowed_outside_ci(self):
        code, out, _ = self.pytest(self.SKIPS)
        self.assertEqual(code, 0, out)
        self.assertIn("zwrm: 1 skipped", out)

    def test_session_deadline(self):
        """A hung session ends at its deadline, non-zero, with the hung test's stack."""
        code, out, took = self.pytest(
            "import threading\n"
            "def test_hangs():\n    threading.Event().wait()  # for ever\n",
            ZWRM_TEST_DEADLINE="3")
        self.assertEqual(code, 2, out)
        self.assertIn("ran past its deadline of 3s", out)
        self.assertIn("test_hangs", out)
        self.assertLess(took, 60)

    def test_hypothesis_under_ci(self):
        """Under CI Hypothesis has no example database (no stale replays) and is derandomized."""
        source = (
            "from hypothesis import settings\n"
            "def test_profile():\n"
            "    assert settings.default.database is None\n"
            "    assert settings.default.derandomize\n"
        )
        code, out, _ = self.pytest(source, CI="true")
        self.assertEqual(code, 0, out)
        code, out, _ = self.pytest(source)
        self.assertEqual(code, 1, out)  # locally the database replays failures, as usual
