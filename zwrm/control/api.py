"""
The control component: an ordinary WAMP session (role C{trusted}) that offers the
control plane's procedures and publishes its events.

It is attached to the embedded router in-process
(C{router.attach(session, authid="control", authrole="trusted")}) but depends on nothing
in the router, so it can run against an external router too.

Procedures (realm C{zwrm}):

 - C{zwrm.agent.join(host_id, facts, csr=None)} (role C{joining}): admits a host;
   returns C{{host_id, credential, heartbeat_interval}}; with C{csr} (a PEM certificate
   request from L{zwrm.pki.make_host_request} for the host id) also C{certificate} (the
   host certificate, PEM) and C{ca} (the cluster CA certificate, PEM).
 - C{zwrm.agent.register(facts)} (role C{agent}; the host is the caller's authid):
   returns C{{host_id, state, heartbeat_interval}}.
 - C{zwrm.agent.heartbeat(stats=None)} (role C{agent}): returns
   C{{state, heartbeat_interval}}.
 - C{zwrm.agent.report(machines_or_event)} (role C{agent}): reconciles a list of
   machines, or stores one machine event from the executor.
 - C{zwrm.host.list()}: every host, summarised.
 - C{zwrm.host.status(host_id)}: one host with its machines and recent events.
"""

from autobahn import wamp
from autobahn.twisted.wamp import ApplicationSession
from autobahn.wamp.types import ComponentConfig, RegisterOptions
from twisted.logger import Logger

from zwrm import errors

DETAILS = RegisterOptions(details_arg="details")


def _caller(details):
    authid = getattr(details, "caller_authid", None)
    if not authid:
        raise errors.NotAuthorized("the caller is not identified")
    return authid


class AgentAPI:
    """The procedures agents call."""

    def __init__(self, registry, machines=None, pki=None):
        """
        @param registry: the L{HostRegistry}.
        @param machines: the L{zwrm.control.apps.Apps} that applies machine events (in
            order, releasing capacity); without it the registry stores them as they come.
        @param pki: the L{zwrm.control.tokens.ControlPKI} that signs joining hosts'
            certificate requests, or L{None} (then C{csr} is refused).
        """
        self.registry = registry
        self.machines = machines
        self.pki = pki

    @wamp.register("zwrm.agent.join")
    async def join(self, host_id=None, facts=None, csr=None):
        if csr is not None:
            if self.pki is None:
                raise errors.InvalidArgument("this control plane has no CA to sign certificates")
            if not isinstance(csr, str):
                raise errors.InvalidArgument("csr must be a PEM certificate request (a string)")
            if isinstance(host_id, str) and host_id:
                signed = self.pki.sign(csr, host_id)  # refuse a bad request before admitting
        result = await self.registry.join(host_id, facts or {})
        if csr is not None:
            if result["host_id"] != host_id:
                signed = self.pki.sign(csr, result["host_id"])
            result = dict(result, **signed)
        return result

    @wamp.register("zwrm.agent.register", options=DETAILS)
    async def register(self, facts=None, details=None):
        return await self.registry.register(_caller(details), facts or {})

    @wamp.register("zwrm.agent.heartbeat", options=DETAILS)
    def heartbeat(self, stats=None, details=None):
        return self.registry.heartbeat(_caller(details), stats)

    @wamp.register("zwrm.agent.report", options=DETAILS)
    async def report(self, report=None, details=None):
        """
        A list of machines (C{[{id or machine_id, state}]}): reconcile it.  One machine
        event (C{{"kind": "machine", "machine_id", "state", ...}}, as the executor's
        C{report} callback gives): store and publish it.
        """
        host_id = _caller(details)
        if isinstance(report, dict):
            if self.machines is not None:
                return await self.machines.machine_event(report, details=details)
            return await self.registry.machine_report(host_id, report)
        return await self.registry.reconcile(host_id, report or [])


class HostAPI:
    """The operator's C{zwrm.host.*} procedures (the parts of issue 3)."""

    def __init__(self, registry):
        self.registry = registry

    @wamp.register("zwrm.host.list")
    async def list(self):
        return await self.registry.list()

    @wamp.register("zwrm.host.status")
    async def status(self, host_id=None):
        if not isinstance(host_id, str) or not host_id:
            raise errors.InvalidArgument("zwrm.host.status needs a host id")
        return await self.registry.status(host_id)


class ControlSession(ApplicationSession):
    """
    The control component's session.

    @ivar apis: the objects whose C{@wamp.register} methods it registers on join.
    """

    log = Logger()

    def __init__(self, apis, realm="zwrm"):
        ApplicationSession.__init__(self, ComponentConfig(realm=realm))
        self.apis = list(apis)

    async def onJoin(self, details):
        for api in self.apis:
            for reg in await self.register(api):
                if not hasattr(reg, "id"):
                    raise RuntimeError(f"could not register a procedure of {api!r}: {reg}")
        self.log.info("control component joined; {n} API objects registered", n=len(self.apis))

    def onLeave(self, details):
        transport = self._transport
        if transport is not None and transport.isOpen():
            try:
                self.disconnect()
            except Exception:
                pass  # the in-memory transport is already gone at shutdown

    def publish_event(self, topic, event):
        """Publish a stored event (called by the registry after storing it)."""
        if self.is_attached():
            self.publish(topic, event)

    def call_procedure(self, procedure, *args, **kwargs):
        """Call a procedure (an agent's executor) through the router."""
        return self.call(procedure, *args, **kwargs)
