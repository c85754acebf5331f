"""
Every URI zwrm registers, calls, publishes or documents is a strict WAMP URI (the
specification's strict rule: lowercase letters, digits and C{_} between single dots),
so clients that validate URIs strictly accept them all, the per-host agent procedures
C{zwrm.agent.<host_id>.*} included: a host id is one strict component (C{h_} and 16 hex
digits, L{zwrm.hostid}), checked with the ids agents and the control plane really make.
"""

import ast
import os
import re

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

import zwrm
from zwrm.wamp import is_strict_uri

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(zwrm.__file__)))
PLACEHOLDER = re.compile(r"\{[^{}]*\}|<[^<>]*>")
# how a host id appears in source (f-string fields) and docs (placeholders, examples)
HOST_ID_FIELD = re.compile(r"^zwrm\.agent\.(\{[^{}]*(host|authid|ident)[^{}]*\}|<[^<>]*(host|authid)[^<>]*>)")
DOC_URI = re.compile(r"`((?:zwrm|wamp)\.[^`\s]*)`")
# dotted Python module names (zwrm.wamp.router) that docs and sources mention are not URIs
MODULES = {"zwrm." + name.split(".")[0] for name in os.listdir(os.path.join(ROOT, "zwrm"))}


def source_trees():
    """C{(path, syntax tree)} of every Python file in zwrm/."""
    for dirpath, _, files in os.walk(os.path.join(ROOT, "zwrm")):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    yield path, ast.parse(f.read(), path)


def _source_uris():
    """(uri, where) for every string constant or f-string in zwrm/ that starts with zwrm. or wamp."""
    for path, tree in source_trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            elif isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}"
                               for v in node.values)
            else:
                continue
            if re.match(r"^(zwrm|wamp)\.", text) and " " not in text:
                yield text, f"{os.path.relpath(path, ROOT)}:{node.lineno}"


def _doc_uris():
    docs = os.path.join(ROOT, "docs")
    for name in sorted(os.listdir(docs)):
        if name.endswith(".md"):
            with open(os.path.join(docs, name)) as f:
                for lineno, line in enumerate(f, 1):
                    for uri in DOC_URI.findall(line):
                        uri = uri.split("(")[0]  # zwrm.host.drain(host_id): the procedure
                        head, _, last = uri.rpartition(".")
                        for alt in last.split("|"):  # zwrm.app.create|list: several procedures
                            yield f"{head}.{alt}" if head else alt, f"docs/{name}:{lineno}"


def _check(uri):
    """None if strict (or not a URI), else the reason it is not."""
    if ".".join(uri.split(".")[:2]) in MODULES:
        return None  # a Python module path
    if uri.endswith(".py") or "=" in uri:
        return None  # a file name, or a key=value setting such as the zwrm.vol= kernel argument
    concrete = PLACEHOLDER.sub("x", uri)
    if concrete.endswith(".*"):
        concrete = concrete[:-1]  # "zwrm.image.*" documents the prefix zwrm.image.
    match = "prefix" if concrete.endswith(".") else ("wildcard" if ".." in concrete else "exact")
    return None if is_strict_uri(concrete, match) else f"not strict as {match}: {concrete!r}"


class StrictUriTests(unittest.SynchronousTestCase):
    def test_the_rule(self):
        for uri in ("zwrm.host.list", "wamp.session.on_join", "a1_b.c", "x"):
            self.assertTrue(is_strict_uri(uri), uri)
        for uri in ("zwrm.agent.h-1.start", "Zwrm.host", "zwrm..x", "zwrm.host.", "zwrm host", "", "zwrm.#", None):
            self.assertFalse(is_strict_uri(uri), uri)
        self.assertTrue(is_strict_uri("zwrm.event.", "prefix"))
        self.assertTrue(is_strict_uri("zwrm.agent..heartbeat", "wildcard"))
        self.assertFalse(is_strict_uri("zwrm.Event.", "prefix"))

    def test_every_uri_in_sources_and_docs_is_strict(self):
        sources = list(_source_uris())
        # in docs, a zwrm.<x>... token is a URI when <x> is a namespace the sources use
        # (zwrm.host, zwrm.event, zwrm.error, ...); others are file or module names
        # (zwrm.db.before-restore-<time>, zwrm.toml)
        namespaces = {u.split(".")[1] for u, _ in sources if u.startswith("zwrm.") and u.count(".") >= 2}
        docs = [(u, w) for u, w in _doc_uris() if u.startswith("wamp.") or u.split(".")[1] in namespaces]
        found = sources + docs
        checked = found
        # the scan sees the URIs the control plane registers and the topics it publishes
        names = {u for u, _ in checked}
        for expected in ("zwrm.host.list", "zwrm.agent.register", "zwrm.agent.heartbeat", "wamp.session.on_join"):
            self.assertIn(expected, names)
        self.assertTrue(any(u.startswith("zwrm.event.") for u in names))
        bad = [f"{where}: {uri} ({why})" for uri, where in checked if (why := _check(uri))]
        self.assertEqual(bad, [], "\n".join(bad))

    def test_host_ids_are_strict_components(self):
        """
        The per-host procedures carry the host id: the ids an agent, the control plane
        and the store's migration make are one strict URI component each.
        """
        import tempfile

        from zwrm.agent.identity import Identity
        from zwrm.control.registry import new_host_id
        from zwrm.hostid import current_host_id, strict_host_id

        family = [u for u, _ in list(_source_uris()) + list(_doc_uris()) if HOST_ID_FIELD.match(u)]
        self.assertTrue(family, "the scan no longer sees the zwrm.agent.<host_id>. family")
        with tempfile.TemporaryDirectory() as d:
            made = [Identity(d).load().host_id, new_host_id(),
                    current_host_id("h-0123456789abcdef"), strict_host_id("H-Old.Host:1")]
        for host_id in made:
            self.assertRegex(host_id, r"^[0-9a-z_]{1,64}$")
            self.assertTrue(is_strict_uri(f"zwrm.agent.{host_id}.machine.start"), host_id)
            self.assertTrue(is_strict_uri(f"zwrm.agent.{host_id}.", "prefix"), host_id)

    def test_agent_procedures(self):
        """
        Every procedure of the agent's executors (registered under C{zwrm.agent.<host_id>.},
        so the source scan sees only their last components), under a real host id.
        """
        import importlib
        import inspect
        import pkgutil

        import zwrm.agent
        from zwrm.hostid import new_host_id

        found = []
        for info in pkgutil.walk_packages(zwrm.agent.__path__, "zwrm.agent."):
            module = importlib.import_module(info.name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ != module.__name__:
                    continue
                for _, fn in inspect.getmembers(cls, inspect.isfunction):
                    found += [(f"zwrm.agent.{new_host_id()}.{p.uri()}", cls.__qualname__)
                              for p in getattr(fn, "_wampuris", ())]
        self.assertIn("machine.start", {uri.split(".", 3)[3] for uri, _ in found})
        bad = [f"{where}: {uri}" for uri, where in found if not is_strict_uri(uri)]
        self.assertEqual(bad, [], "\n".join(bad))


class RuntimeUriTests(unittest.TestCase):
    """
    What a running control plane and agent really register and publish (over real sockets):
    every registration and every published topic is strict, the agent's per-host
    procedures included.
    """

    timeout = 60

    def test_registered_and_published(self):
        return ensureDeferred(self._scenario())

    async def _scenario(self):
        from zwrm.agent.service import AgentService
        from zwrm.agent.tap import AgentConfig
        from zwrm.control.service import ControlPlane
        from zwrm.control.tap import Config
        from zwrm.testing.processes import poll, temp_dir

        tmp = temp_dir(self)
        plane = ControlPlane(reactor, Config(listen=["tcp:0:interface=127.0.0.1"],
                                             data_dir=os.path.join(tmp, "cp"),
                                             heartbeat_interval=0.2, flush_interval=0.2))
        plane.startService()
        self.addCleanup(plane.stopService)
        await plane.started
        published = []
        deliver = plane.router._deliver

        def recording(topic, *args, **kwargs):
            published.append(topic)
            return deliver(topic, *args, **kwargs)

        plane.router._deliver = recording
        with open(os.path.join(tmp, "cp", "join.token")) as f:
            token = f.read().strip()
        agent = AgentService(reactor, AgentConfig(
            url=f"ws://127.0.0.1:{plane.ports[0].getHost().port}/ws", join_token=token,
            data_dir=os.path.join(tmp, "agent"), name="a1", retry_initial=0.05, retry_max=0.2))
        agent.startService()
        self.addCleanup(agent.stopService)
        await agent.registered
        await poll(reactor, lambda: agent.heartbeats_sent >= 2, 10, 0.05, what="heartbeats")
        host_id = agent.identity.host_id
        registered = [(r.uri, r.match) for r in plane.router._registrations_by_id.values()]
        uris = {uri for uri, _ in registered}
        for expected in ("zwrm.host.list", "zwrm.agent.register", f"zwrm.agent.{host_id}.agent.info",
                         "wamp.session.kill_by_authid"):
            self.assertIn(expected, uris)
        self.assertIn("zwrm.event.host", published)
        bad = [f"{uri} ({match})" for uri, match in registered if not is_strict_uri(uri, match)]
        bad += [f"published {topic}" for topic in published if not is_strict_uri(topic)]
        self.assertEqual(bad, [], "\n".join(bad))
