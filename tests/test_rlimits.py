"""
L{zwrm.rlimits}: the daemons raise their soft open-files limit to the hard one (in a real
child process whose limits are set low first), and the control plane's and the agent's
services do so when twistd makes them.
"""

import json
import resource
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

CHILD = """
import json, resource
from zwrm.rlimits import raise_open_files
before_after = raise_open_files()
print(json.dumps([before_after, resource.getrlimit(resource.RLIMIT_NOFILE)]))
"""


def run_with_limits(soft, hard, code=CHILD):
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    out = subprocess.run([sys.executable, "-c", code], preexec_fn=limit, capture_output=True,
                         text=True, timeout=60, check=True)
    return json.loads(out.stdout)


class RaiseOpenFilesTests(SynchronousTestCase):
    def test_soft_limit_raised_to_the_hard_one(self):
        (before, after), (soft, hard) = run_with_limits(256, 4096)
        self.assertEqual((before, after, soft, hard), (256, 4096, 4096, 4096))

    def test_already_at_the_hard_limit(self):
        (before, after), (soft, hard) = run_with_limits(2048, 2048)
        self.assertEqual((before, after, soft, hard), (2048, 2048, 2048, 2048))

    def test_the_daemons_raise_it(self):
        for module in ("zwrm.control.tap", "zwrm.agent.tap"):
            code = f"""
import json, resource
import zwrm.rlimits
calls = []
zwrm.rlimits.raise_open_files = lambda log=None: calls.append(1) or (0, 0)
import {module} as tap
try:
    tap.makeService(tap.Options())  # may fail later for want of a configuration
except BaseException:
    pass
print(json.dumps([len(calls), 0]))
"""
            (calls, _) = run_with_limits(256, 4096, code)
            self.assertEqual(calls, 1, module)
