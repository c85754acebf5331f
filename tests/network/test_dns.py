"""The cluster DNS server, queried over real UDP on the loopback."""

from twisted.internet import reactor
from twisted.names import client, dns, error
from twisted.trial.unittest import TestCase

from zwrm.agent.network.dns import ClusterDNS


class ClusterDNSTests(TestCase):
    async def server(self):
        srv = ClusterDNS(reactor, "127.0.0.1", port=0, upstream=False)
        port = srv.start()
        self.addCleanup(srv.stop)
        res = client.Resolver(servers=[("127.0.0.1", port)], reactor=reactor)
        return srv, res

    async def a(self, res, name):
        answers, _, _ = await res.lookupAddress(name, timeout=[2])
        return sorted(r.payload.dottedQuad() for r in answers if r.type == dns.A)

    async def test_app_and_replica_names_follow_health(self):
        srv, res = await self.server()
        srv.resolver.set_records({"web": [
            {"names": ["0", "m-aaa"], "address": "10.80.1.2", "healthy": True},
            {"names": ["1", "m-bbb"], "address": "10.80.2.2", "healthy": True}]})
        self.assertEqual(await self.a(res, "web.zwrm.internal"), ["10.80.1.2", "10.80.2.2"])
        self.assertEqual(await self.a(res, "1.web.zwrm.internal"), ["10.80.2.2"])
        self.assertEqual(await self.a(res, "m-aaa.web.zwrm.internal"), ["10.80.1.2"])
        # Replica 1 fails its health check: the app name drops it at once.
        srv.resolver.set_records({"web": [
            {"names": ["0"], "address": "10.80.1.2", "healthy": True},
            {"names": ["1"], "address": "10.80.2.2", "healthy": False}]})
        self.assertEqual(await self.a(res, "web.zwrm.internal"), ["10.80.1.2"])
        answers, _, _ = await res.lookupAddress("web.zwrm.internal", timeout=[2])
        self.assertEqual(answers[0].ttl, 1)
        with self.assertRaises(error.DNSNameError):
            await res.lookupAddress("nosuch.zwrm.internal", timeout=[2])
