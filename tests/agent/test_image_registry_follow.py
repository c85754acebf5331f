"""
The agent's image cache follows the registry's address (issue 19): new pulls go to the
C{registry_url} the control plane announces now, a pull that finds nothing where it looked
asks for the address again, a download under way keeps the registry it started with, and
cached blobs stay valid (they are by digest).  Real registries on loopback; the last test is a
real agent whose control plane comes back announcing another C{registry_url}.
"""

import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.agent.test_images import Counting, Flaky, aio, serve, sha
from tests.registry.helpers import AGENT_ID, AGENT_TOKEN, OPERATOR, RunningRegistry
from zwrm.agent.images import ImageCache
from zwrm.errors import InvalidArgument, NotFound, Unavailable
from zwrm.registry.client import RegistryClient, push_image
from zwrm.testing.image import kernel_bytes
from zwrm.testing.processes import poll, temp_dir

UNREACHABLE = "http://127.0.0.1:1"


class FollowRegistryTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.files = self.mktemp()
        os.makedirs(self.files)

    def cache(self, url, **kw):
        c = ImageCache(reactor, self.mktemp(), url, (AGENT_ID, AGENT_TOKEN), 1 << 30, **kw)
        self.addCleanup(c.close)
        return c

    async def registry_with_demo(self):
        reg = RunningRegistry(self, self.mktemp())
        client = RegistryClient(reactor, reg.url, OPERATOR)
        self.addCleanup(client.close)
        kernel = os.path.join(self.files, "kernel")
        with open(kernel, "wb") as f:
            f.write(kernel_bytes(b"K" * 5000))
        await push_image(client, "demo:1", kernel=kernel, cmdline="console=ttyS0")
        return reg

    @aio
    async def test_new_pulls_go_to_the_new_registry(self):
        empty = RunningRegistry(self, self.mktemp())
        full = await self.registry_with_demo()
        cache = self.cache(empty.url)
        with self.assertRaises(NotFound):
            await cache.resolve("demo:1")
        self.assertTrue(cache.follow_registry(full.url + "/v2/"))
        self.assertEqual(cache.registry_url, full.url)
        self.assertFalse(cache.follow_registry(full.url), "the same address is no change")
        out = await cache.resolve("demo:1")
        self.assertTrue(os.path.isfile(out["kernel"]))

    def test_a_bad_address_is_refused_and_changes_nothing(self):
        cache = self.cache(UNREACHABLE)
        for bad in ("ftp://x", "", None, "wss://cp:8080/ws"):
            with self.assertRaises(InvalidArgument, msg=repr(bad)):
                cache.follow_registry(bad)
        self.assertEqual(cache.registry_url, UNREACHABLE)

    @aio
    async def test_an_unreachable_registry_makes_it_ask_again(self):
        full = await self.registry_with_demo()
        asked = []

        def learn():
            asked.append(1)
            return defer.succeed(full.url)

        cache = self.cache(UNREACHABLE, learn_registry=learn)
        out = await cache.resolve("demo:1")
        self.assertTrue(os.path.isfile(out["kernel"]))
        self.assertEqual((cache.registry_url, len(asked)), (full.url, 1))
        await cache.resolve("demo:1")  # found where it looks now: not asked again
        self.assertEqual(len(asked), 1)

    @aio
    async def test_an_image_missing_where_it_looks_makes_it_ask_again(self):
        empty = RunningRegistry(self, self.mktemp())
        full = await self.registry_with_demo()

        async def learn():  # a coroutine, as the runtime's is
            return full.url

        cache = self.cache(empty.url, learn_registry=learn)
        await cache.resolve("demo:1")
        self.assertEqual(cache.registry_url, full.url)

    @aio
    async def test_the_same_address_again_gives_the_pull_error(self):
        asked = []
        cache = self.cache(UNREACHABLE, learn_registry=lambda: asked.append(1) or UNREACHABLE)
        with self.assertRaises(Unavailable):
            await cache.resolve("demo:1")
        self.assertEqual(len(asked), 1, "asked once, not in a loop")

        def broken():
            raise RuntimeError("not connected")

        cache.learn_registry = broken
        with self.assertRaises(Unavailable):
            await cache.resolve("demo:1")
        self.assertEqual(cache.registry_url, UNREACHABLE)

    @aio
    async def test_a_download_under_way_keeps_its_registry(self):
        data = os.urandom(300_000)
        old = Flaky({sha(data): data}, drops=1)  # the first response breaks half-way
        new = Counting(Flaky({}))
        cache = self.cache(serve(self, old))
        d = defer.Deferred.fromCoroutine(cache.fetch_blob("demo", sha(data), len(data)))
        cache.follow_registry(serve(self, new))
        path = await d
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(len(old.ranges), 2, "resumed at the registry it started with")
        self.assertIsNotNone(old.ranges[1])
        self.assertEqual(new.requests, [])
        cache.unpin(sha(data))

    @aio
    async def test_cached_blobs_stay_valid(self):
        first = await self.registry_with_demo()
        second = await self.registry_with_demo()  # the same image pushed there
        cache = self.cache(first.url)
        out = await cache.resolve("demo:1")
        misses = cache.stats()["misses"]
        cache.follow_registry(second.url)
        again = await cache.resolve("demo:1")
        self.assertEqual(again["digests"], out["digests"])
        self.assertEqual(cache.stats()["misses"], misses, "nothing downloaded again")


class AgentFollowsControlPlaneTests(unittest.TestCase):
    """
    A real agent (in process) whose control plane is restarted with another
    C{registry_url}: at its new session the image cache follows, and the pull works.
    """

    timeout = 60

    def test_control_plane_announces_another_registry(self):
        return defer.ensureDeferred(self._scenario())

    async def _start_plane(self, data_dir, port, registry_url):
        from zwrm.control.service import ControlPlane
        from zwrm.control.tap import Config

        config = Config(listen=[f"tcp:{port}:interface=127.0.0.1"], data_dir=data_dir,
                        heartbeat_interval=0.5, flush_interval=0.2, registry_url=registry_url)
        plane = ControlPlane(reactor, config)
        plane.startService()
        await plane.started
        return plane

    async def _scenario(self):
        from tests.agent.test_membership import start_host_agent

        tmp = temp_dir(self)
        cp_dir = os.path.join(tmp, "cp")
        plane = await self._start_plane(cp_dir, 0, UNREACHABLE)
        port = plane.ports[0].getHost().port
        own = f"http://127.0.0.1:{port}"
        with open(os.path.join(cp_dir, "join.token")) as f:
            join_token = f.read().strip()
        agent = await start_host_agent(self, None, os.path.join(tmp, "a1"),
                                       url=f"ws://127.0.0.1:{port}/ws", join_token=join_token)
        cache = agent.runtime.cache
        self.assertEqual(cache.registry_url, UNREACHABLE)

        await plane.stopService()
        # in process, stopping leaves the open connections; a real process takes them along
        plane.router.kill_by_authid(agent.identity.host_id, "control plane restarting")
        plane = await self._start_plane(cp_dir, port, own)
        self.addCleanup(plane.stopService)
        await poll(reactor, lambda: cache.registry_url == own, 20,
                   what="the image cache follows the new registry_url")

        with open(os.path.join(cp_dir, "operator.token")) as f:
            pusher = RegistryClient(reactor, own, ("operator", f.read().strip()))
        digest = await pusher.push_bytes("demo", b"kernel bytes" * 1000)
        await pusher.close()
        path = await cache.fetch_blob("demo", digest)
        cache.unpin(digest)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"kernel bytes" * 1000)
