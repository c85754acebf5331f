"""
The control component: an ordinary WAMP session (role C{trusted}) that offers the
control plane's procedures and publishes its events.

It is attached to the embedded router in-process
(C{router.attach(session, authid="control", authrole="trusted")}) but depends on nothing
in the router, so it can run against an external router too.

Procedures (realm C{zwrm}):

 - C{zwrm.agent.join(host_id, facts, csr=None, credential=None)} (role C{joining}):
   admits a new host; returns C{{host_id, credential, heartbeat_interval}}; with C{csr} (a
   PEM certificate request from L{zwrm.pki.make_host_request} for the host id) also
   C{certificate} (the host certificate, PEM) and C{ca} (the cluster CA certificate, PEM).
   A host id that already joined needs that host's C{credential}, or a C{zwrm.host.reset}.
 - C{zwrm.host.reset(host_id, ttl=3600)} (operator): lets an existing host join again once.
 - C{zwrm.agent.register(facts)} (role C{agent}; the host is the caller's authid):
   returns C{{host_id, state, heartbeat_interval}}.
 - C{zwrm.agent.renew_certificate(csr)} (role C{agent}): a new host certificate for the
   caller's host; returns C{{certificate, ca}}.
 - C{zwrm.agent.heartbeat(stats=None)} (role C{agent}): returns
   C{{state, heartbeat_interval}}.
 - C{zwrm.agent.report(machines_or_event)} (role C{agent}): reconciles a list of
   machines, or stores one machine event from the executor.
 - C{zwrm.host.list()}: every host, summarised.
 - C{zwrm.host.status(host_id)}: one host with its machines and recent events.
 - C{zwrm.host.remove(host_id, forget_volumes=False, recover_volumes=False)} (operator):
   removes an offline host
   (L{zwrm.control.host_removal}).
"""

import hmac

from autobahn import wamp
from autobahn.twisted.wamp import ApplicationSession
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import ComponentConfig, RegisterOptions
from twisted.internet import defer
from twisted.logger import Logger

from zwrm import errors, pki
from zwrm.control import schema
from zwrm.control.store import hash_secret
from zwrm.control.tokens import RESET_TTL
from zwrm.hostid import current_host_id
from zwrm.wamp.local import LocalCallee
from zwrm.wamp.procedures import (
    QuietAnswers,
    call_guarded,
    procedures_of,
    shield_unless_cancellable,
)
from zwrm.wamp.progress import CallerProgress

DETAILS = RegisterOptions(details_arg="details")


def _caller(details):
    authid = getattr(details, "caller_authid", None)
    if not authid:
        raise errors.NotAuthorized("the caller is not identified")
    return authid


class AgentAPI:
    """
    The procedures agents call, and the operator's C{zwrm.host.reset} (the other half of
    admission).
    """

    log = Logger()

    def __init__(self, registry, machines=None, pki=None):
        """
        @param registry: the L{HostRegistry}.
        @param machines: the L{zwrm.control.apps.Apps} that applies machine events (in
            order, releasing capacity); needed for C{zwrm.agent.report} of one event.
        @param pki: the L{zwrm.control.tokens.ControlPKI} that signs joining hosts'
            certificate requests, or L{None} (then C{csr} is refused).
        """
        self.registry = registry
        self.machines = machines
        self.pki = pki
        self._joining = set()

    @wamp.register("zwrm.agent.join")
    async def join(self, host_id=None, facts=None, csr=None, credential=None):
        """
        Admit a new host.  A host id that has already joined is refused unless the caller
        proves that host's C{credential}, or an operator ran C{zwrm host reset} for it
        (which lets one join through).  An older agent's C{h-<16 hex>} id is checked and
        admitted as C{h_<16 hex>} (L{zwrm.hostid.current_host_id}).
        """
        host_id = current_host_id(host_id)
        if isinstance(host_id, str) and host_id in self._joining:
            raise errors.Conflict(f"host {host_id!r} is already joining")
        if isinstance(host_id, str):
            self._joining.add(host_id)
        try:
            if isinstance(host_id, str) and self.registry.credential_hash(host_id) is not None:
                await self._admit_existing(host_id, credential)
            return await self._join(host_id, facts, csr)
        finally:
            if isinstance(host_id, str):
                self._joining.discard(host_id)

    async def _admit_existing(self, host_id, credential):
        """@raise errors.NotAuthorized: unless the caller may take over C{host_id}."""
        stored = self.registry.credential_hash(host_id)
        if isinstance(credential, str) and credential and hmac.compare_digest(
                stored, hash_secret(credential)):
            return
        if self.pki is not None and await self.pki.take_rejoin(host_id):
            self.log.info("host {host_id} joins again after a reset", host_id=host_id)
            return
        raise errors.NotAuthorized(
            f"host {host_id!r} has already joined; a join token admits only new hosts."
            f" If its agent lost its credential, run `zwrm host reset {host_id}` first")

    @wamp.register("zwrm.host.reset")
    async def reset(self, host_id, ttl=RESET_TTL):
        """
        (Operator.) Let host C{host_id} join again once in the coming C{ttl} seconds with a
        join token, without its credential (its agent lost it).  Its current credential stays
        valid until then.

        @return: C{{"host_id", "expires_at"}}.
        @raise errors.NotFound: no such host.
        """
        if self.registry.credential_hash(host_id) is None:
            raise errors.NotFound(f"no host {host_id!r}")
        if self.pki is None:
            raise errors.Unavailable("this control plane keeps no join tokens")
        expires = await self.pki.allow_rejoin(host_id, ttl)
        self.log.info("host {host_id} reset: it may join again until {t}", host_id=host_id,
                      t=expires)
        return {"host_id": host_id, "expires_at": expires}

    async def _join(self, host_id, facts, csr):
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
        return await self.registry.register(_caller(details), facts or {},
                                            session_id=getattr(details, "caller", None))

    @wamp.register("zwrm.agent.renew_certificate", options=DETAILS)
    async def renew_certificate(self, csr=None, details=None):
        """
        A new host certificate for the calling host, for the key of C{csr} (the host is
        the caller's authid: an agent renews only its own).  The one it had stays valid
        until it expires.  Announced (a C{certificate} event on C{zwrm.event.host}, kept in
        the event history) before it is returned.
        """
        host_id = _caller(details)
        if self.pki is None:
            raise errors.Unavailable("this control plane has no CA to sign certificates")
        signed = self.pki.sign(csr, host_id)
        await self.registry.hosts.certificate_renewed(
            host_id, pki.expiry_of(signed["certificate"].encode("ascii")))
        return signed

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
            return await self.machines.machine_event(report, details=details)
        return await self.registry.reconcile(host_id, report or [])


class HostAPI:
    """The operator's C{zwrm.host.*} procedures (the parts of issue 3, and removal)."""

    def __init__(self, registry, removal=None, unrecorded=None):
        """
        @param removal: the L{zwrm.control.host_removal.HostRemoval}, or L{None} (then
            C{zwrm.host.remove} is not offered).
        @param unrecorded: the L{zwrm.control.unrecorded.Unrecorded}, or L{None} (then
            C{zwrm.host.clean} is not offered).
        """
        self.registry = registry
        self.removal = removal
        self.unrecorded = unrecorded

    @wamp.register("zwrm.host.list")
    async def list(self):
        return await self.registry.list()

    @wamp.register("zwrm.host.status")
    async def status(self, host_id=None, events=20):
        if not isinstance(host_id, str) or not host_id:
            raise errors.InvalidArgument("zwrm.host.status needs a host id")
        result = await self.registry.status(host_id, events)
        if self.unrecorded is not None:  # (its agent asked now, if it can be)
            result["unrecorded"] = (await self.unrecorded.look(host_id)
                                    if self.registry.executor_available(host_id) else None)
        return result

    @wamp.register("zwrm.host.clean")
    async def clean(self, host_id):
        """
        (Operator.) Delete what a host keeps that the cluster does not record
        (L{zwrm.control.unrecorded}).
        """
        if self.unrecorded is None:
            raise errors.Unavailable("this control plane does not clean hosts")
        self.registry.entry(host_id)  # NotFound
        return await self.unrecorded.clean(host_id)

    @wamp.register("zwrm.host.remove", options=DETAILS)
    async def remove(self, host_id, forget_volumes=False, recover_volumes=False,
                     details=None):
        """
        (Operator.) Remove an offline host from the cluster (L{zwrm.control.host_removal});
        a caller that asks for progressive results gets one every few seconds while its
        volumes are recovered (L{zwrm.wamp.progress}).
        """
        if self.removal is None:
            raise errors.Unavailable("this control plane does not remove hosts")
        with CallerProgress(self.registry.clock, details):
            result = await self.removal.remove(host_id, forget_volumes=forget_volumes,
                                               recover_volumes=recover_volumes)
        if self.unrecorded is not None:
            self.unrecorded.forget(host_id)
        return result


def guarded(uri, endpoint, options, log):
    """
    C{endpoint} behind its schema (L{zwrm.control.schema}): a call whose arguments do not fit
    is answered with C{zwrm.error.invalid_argument} naming the argument, and the endpoint does
    not run.  An exception that is not a L{errors.ZwrmError} is a bug: logged once with its
    traceback, answered as C{zwrm.error.internal} without it.

    A procedure without a schema (a bug: tests/control/test_schema.py fails) is logged and
    gets L{schema.unknown}: bounded JSON arguments only.
    """
    try:
        procedure = schema.schema(uri)
    except KeyError:
        log.error("{uri} has no schema: add one to zwrm/control/schema.py", uri=uri)
        procedure = schema.unknown(uri)
    details_arg = getattr(options, "details_arg", None)

    def internal(failure):
        if isinstance(failure.value, ApplicationError | defer.CancelledError):
            return failure  # an answer, or the caller went away
        log.failure("{uri} failed", failure, uri=uri)
        raise errors.Internal(f"{uri} failed: an internal error (see the control plane's log)")

    def call(*args, **kwargs):
        details = kwargs.pop(details_arg, None) if details_arg else None
        procedure.check(args, kwargs)
        if details_arg:
            kwargs[details_arg] = details
        return call_guarded(endpoint, args, kwargs, internal)

    call.__name__ = getattr(endpoint, "__name__", "procedure")
    call.__doc__ = endpoint.__doc__
    return call


class ControlSession(QuietAnswers, LocalCallee, ApplicationSession):
    """
    The control component's session.  Every procedure it registers is checked against its
    schema in L{zwrm.control.schema} first (see L{guarded}).  Attached to the embedded
    router, it takes its INVOCATIONs as lists (L{zwrm.wamp.local.LocalCallee}).

    @ivar apis: the objects whose C{@wamp.register} methods it registers on join.
    """

    log = Logger()

    audit = None
    """The L{zwrm.control.audit.AuditLog} that stores operators' calls, or L{None}."""

    def __init__(self, apis, realm="zwrm", audit=None, under_way=None):
        """
        @param audit: the L{zwrm.control.audit.AuditLog}; by default that of the
            L{zwrm.control.audit.AuditAPI} among C{apis}, if any (so a session on an
            external router audits too).
        @param under_way: the set that holds the work of its procedures under way
            (L{zwrm.wamp.procedures.shielded}); by default its own.  The control plane
            gives every session it makes the same one (behind an external router, one per
            connection): its stop ends the work each of them started.
        """
        from zwrm.control.audit import AuditAPI

        ApplicationSession.__init__(self, ComponentConfig(realm=realm))
        self.apis = list(apis)
        #: the work of its procedures under way (shielded): the control plane's stop ends it
        self.under_way = set() if under_way is None else under_way
        if audit is None:
            audit = next((a.audit for a in self.apis if isinstance(a, AuditAPI)), None)
        if audit is not None:
            self.audit = audit

    async def onJoin(self, details):
        for api in self.apis:
            for uri, endpoint, options in procedures_of(api):
                fn = guarded(uri, endpoint, options, self.log)
                if self.audit is not None:  # around the schema check: refusals are stored too
                    fn, options = self.audit.wrap(uri, fn, options)
                # (around the audit: its entry records how the work really ended)
                fn = shield_unless_cancellable(uri, endpoint, fn, self.log, self.under_way)
                reg = await self.register(fn, uri, options=options)
                if not hasattr(reg, "id"):
                    raise RuntimeError(f"could not register {uri} of {api!r}: {reg}")
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
