"""
Test tools for the router: a scripted raw WAMP peer over an in-memory transport pair,
driven by a task.Clock.
"""

from autobahn.wamp import message
from autobahn.wamp.role import (
    RoleCalleeFeatures,
    RoleCallerFeatures,
    RolePublisherFeatures,
    RoleSubscriberFeatures,
)
from twisted.internet.task import Clock

from zwrm.wamp.auth import Principal, RoleBasedAuthorizer, Rule, StaticAuthenticator
from zwrm.wamp.router import Router, RouterLimits
from zwrm.wamp.transport import MemoryTransportPair

ALL = {"call", "register", "publish", "subscribe"}

CLIENT_ROLES = {
    "caller": RoleCallerFeatures(progressive_call_results=True, call_canceling=True, call_timeout=True),
    "callee": RoleCalleeFeatures(progressive_call_results=True, call_canceling=True),
    "publisher": RolePublisherFeatures(publisher_exclusion=True),
    "subscriber": RoleSubscriberFeatures(pattern_based_subscription=True),
}


def make_authorizer():
    return RoleBasedAuthorizer(
        {
            "trusted": [Rule("zwrm.", "prefix", ALL), Rule("wamp.session.", "prefix", {"call", "subscribe"})],
            "operator": [
                Rule("zwrm.", "prefix", {"call", "subscribe"}),
                Rule("test.", "prefix", ALL),
                Rule("wamp.session.", "prefix", {"call", "subscribe"}),
            ],
            "agent": [
                Rule("zwrm.agent.{authid}.", "prefix", {"register"}),
                Rule("zwrm.agent.register", "exact", {"call"}),
                Rule("test.", "prefix", ALL),
            ],
            "viewer": [Rule("zwrm.event.", "prefix", {"subscribe"})],
        }
    )


def make_authenticator(**kw):
    tickets = {
        "op": ("op-ticket", Principal("op", "operator")),
        "op2": ("op2-ticket", Principal("op2", "operator")),
        "host1": ("h1-ticket", Principal("host1", "agent")),
        "host2": ("h2-ticket", Principal("host2", "agent")),
        "view": ("v-ticket", Principal("view", "viewer")),
        "ctl": ("ctl-ticket", Principal("ctl", "trusted")),
    }
    return StaticAuthenticator(tickets=tickets, **kw)


TICKETS = {"op": "op-ticket", "op2": "op2-ticket", "host1": "h1-ticket", "host2": "h2-ticket",
           "view": "v-ticket", "ctl": "ctl-ticket"}


class RawClient:
    """A WAMP peer that records every message it receives."""

    def __init__(self):
        self.received = []
        self.closed = False
        self.transport = None
        self.session_id = None
        self._req = 0

    def onOpen(self, transport):
        self.transport = transport

    def onMessage(self, msg):
        self.received.append(msg)

    def onClose(self, wasClean):
        self.closed = True

    def send(self, msg):
        self.transport.send(msg)

    def req(self):
        self._req += 1
        return self._req

    def take(self, kind=None):
        """Remove and return the received messages (of one type, if given)."""
        if kind is None:
            out, self.received = self.received, []
            return out
        out = [m for m in self.received if isinstance(m, kind)]
        self.received = [m for m in self.received if not isinstance(m, kind)]
        return out

    def last(self, kind):
        found = [m for m in self.received if isinstance(m, kind)]
        assert found, f"no {kind.__name__} in {self.received!r}"
        return found[-1]


class RouterTestMixin:
    """setUp builds a router on a Clock; helpers connect and join raw clients."""

    limits = RouterLimits()
    authenticator_kw = {}
    # clients' serializer when a test names none (None: message objects, no bytes)
    serializer = None

    def setUp(self):
        self.clock = Clock()
        self.router = Router(self.clock, make_authenticator(**self.authenticator_kw), make_authorizer(),
                             limits=self.limits)

    def pump(self, n=200):
        for _ in range(n):
            due = [c for c in self.clock.getDelayedCalls() if c.getTime() <= self.clock.seconds()]
            if not due:
                return
            self.clock.advance(0)
        raise AssertionError("the router did not go quiet")

    def connect(self, serializer=None):
        pair = MemoryTransportPair(self.clock, serializer if serializer is not None else self.serializer)
        client = RawClient()
        client.pair = pair
        pair.connect(self.router.session_factory(), client)
        return client

    def join(self, authid="op", ticket=None, serializer=None, roles=None):
        c = self.connect(serializer)
        c.send(message.Hello("zwrm", roles or CLIENT_ROLES, authmethods=["ticket"], authid=authid))
        self.pump()
        ch = c.last(message.Challenge)
        assert ch.method == "ticket"
        c.send(message.Authenticate(ticket if ticket is not None else TICKETS[authid]))
        self.pump()
        w = c.last(message.Welcome)
        c.session_id = w.session
        c.take()
        return c

    def register(self, client, procedure, match=None):
        r = client.req()
        client.send(message.Register(r, procedure, match=match))
        self.pump()
        reg = client.last(message.Registered)
        assert reg.request == r
        client.take()
        return reg.registration

    def subscribe(self, client, topic, match=None):
        r = client.req()
        client.send(message.Subscribe(r, topic, match=match))
        self.pump()
        sub = client.last(message.Subscribed)
        assert sub.request == r
        client.take()
        return sub.subscription
