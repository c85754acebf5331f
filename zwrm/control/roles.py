"""
The role table of the realm C{zwrm}: who may call, register, publish and subscribe what.

There is no allow-all role.  Other parts extend the table by appending to
L{OPERATOR_PREFIXES} or L{VIEWER_PROCEDURES} before L{roles} is called.
"""

from zwrm.wamp.auth import Rule

CALL = frozenset({"call"})
ALL = frozenset({"call", "register", "publish", "subscribe"})

OPERATOR_PREFIXES = [
    "zwrm.host.",
    "zwrm.app.",
    "zwrm.machine.",
    "zwrm.volume.",
    "zwrm.image.",
    "zwrm.token.",
    "zwrm.cluster.",
    "zwrm.cert.",
    "zwrm.event.history",
    "zwrm.audit.",
    "zwrm.drain.list",
]
"""Procedure prefixes an operator may call."""

VIEWER_PROCEDURES = [
    "zwrm.host.list",
    "zwrm.host.status",
    "zwrm.host.drain_status",
    "zwrm.drain.list",
    "zwrm.app.list",
    "zwrm.app.status",
    "zwrm.machine.list",
    "zwrm.machine.status",
    "zwrm.volume.list",
    "zwrm.volume.snapshots",
    "zwrm.volume.replicas",
    "zwrm.volume.schedules",
    "zwrm.image.list",
    "zwrm.cluster.info",
    "zwrm.cluster.partitions",
    "zwrm.cert.list",
    "zwrm.event.history",
]
"""Read-only procedures a viewer may call (not zwrm.audit.list: see zwrm.control.audit)."""

AGENT_PROCEDURES = ["zwrm.agent.register", "zwrm.agent.heartbeat", "zwrm.agent.report",
                    "zwrm.agent.renew_certificate", "zwrm.cluster.info"]
"""Control-plane procedures an agent (authid = its host id) may call."""


def roles():
    """
    The role table for L{zwrm.wamp.auth.RoleBasedAuthorizer}.

     - C{trusted}: the control component; everything under C{zwrm.}, and of the router's
       meta API only C{wamp.session.kill_by_authid} (to end an offline host's session) and
       a subscription to C{wamp.session.on_leave} (an agent's session ended).
     - C{joining}: an agent holding the join token; may only call C{zwrm.agent.join}.
     - C{agent}: may call L{AGENT_PROCEDURES} and register only C{zwrm.agent.<its id>.*}.
     - C{operator}: may call L{OPERATOR_PREFIXES}, subscribe to C{zwrm.event.*}.
     - C{viewer}: may call L{VIEWER_PROCEDURES}, subscribe to C{zwrm.event.*}.
    """
    events = Rule("zwrm.event.", "prefix", {"subscribe"})
    return {
        "trusted": [Rule("zwrm.", "prefix", ALL),
                    Rule("wamp.session.kill_by_authid", "exact", CALL),
                    Rule("wamp.session.on_leave", "exact", {"subscribe"})],
        "joining": [Rule("zwrm.agent.join", "exact", CALL)],
        "agent": [Rule(p, "exact", CALL) for p in AGENT_PROCEDURES]
        + [Rule("zwrm.agent.{authid}.", "prefix", {"register"})],
        "operator": [Rule(p, "prefix", CALL) for p in OPERATOR_PREFIXES] + [events],
        "viewer": [Rule(p, "exact", CALL) for p in VIEWER_PROCEDURES] + [events],
    }
