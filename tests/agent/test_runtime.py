"""The agent's volume endpoint option and the address it advertises to other agents."""

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from zwrm.agent.runtime import _advertised
from zwrm.agent.tap import Options


class _Port:
    def __init__(self, host):
        self.host = host

    def getHost(self):
        return self


class VolumeEndpointTests(SynchronousTestCase):
    def options(self, *extra):
        o = Options()
        o.parseOptions(["--control-plane-url", "ws://127.0.0.1:9/ws", *extra])
        return o.config

    def test_default_is_loopback(self):
        self.assertEqual(self.options().volume_endpoint, "tcp:0:interface=127.0.0.1")

    def test_configured(self):
        c = self.options("--volume-endpoint", "tcp:7443:interface=0.0.0.0", "--address", "10.1.2.3")
        self.assertEqual(c.volume_endpoint, "tcp:7443:interface=0.0.0.0")

    def test_bad_endpoints_are_usage_errors(self):
        for bad in ("unix:/tmp/x", "tcp:notaport", "ssl:7443"):
            self.assertRaises(usage.UsageError, self.options, "--volume-endpoint", bad)

    def test_advertised_address(self):
        self.assertEqual(_advertised("tcp:0:interface=10.0.0.5", _Port("10.0.0.5")), "10.0.0.5")
        self.assertEqual(
            _advertised("tcp:7443:interface=0.0.0.0", _Port("0.0.0.0"), "10.1.2.3"), "10.1.2.3")
        self.assertEqual(_advertised("tcp:7443", _Port("0.0.0.0")), "127.0.0.1")
