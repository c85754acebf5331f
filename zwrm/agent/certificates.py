"""
An agent keeps its host certificate valid: L{CertificateRenewal}.

The control plane signs host certificates for C{[pki] host_certificate_lifetime} (a year by
default).  Once two thirds of that have passed (L{zwrm.pki.renewal_time}: 122 days before a
year's certificate expires), a connected agent makes a new key and asks for a certificate
for it (C{zwrm.agent.renew_certificate}, which signs only for the caller's own host id).
The new pair replaces the old one on disk so that a crash leaves a pair that belongs together
(L{zwrm.pki.HostCredentials.save_renewed}); the agent's volume endpoint presents it to the
connections it accepts from then on, its volume and migration streams present it to the peers
they connect to, and the next connection to the control plane presents it.  A failed attempt
is tried again in an hour (sooner when little of the certificate's life is left), so a
control plane that is away for a while does not cost a host its certificate.

An agent whose certificate expired all the same (its host was off for most of a year)
connects without it, authenticated by its credential alone, and renews at once
(L{zwrm.agent.service.AgentService._tls_options}).
"""

from autobahn.wamp.exception import ApplicationError
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from zwrm import errors, pki

CHECK_INTERVAL = 12 * 3600.0
"""Seconds at most between two looks at the certificate (a clock that jumps is seen)."""

RETRY_INTERVAL = 3600.0
"""Seconds before a failed renewal is tried again (less when less of its life is left)."""


class CertificateRenewal:
    """
    Renews the host certificate in C{tls_dir} over the agent's session while it is
    registered (L{start} with the session, L{stop} when it ends).

    @ivar renewals: how many renewals were saved.
    @ivar expires_at: the POSIX time the host certificate expires, as last read (L{None}
        before the first look); the agent's C{/metrics} has it.
    """

    log = Logger()

    def __init__(self, clock, tls_dir, host_id, on_renewed=None, threads=None):
        """
        @param clock: an L{IReactorTime} (its C{seconds()} is the wall clock certificates
            are read against).
        @param tls_dir: the agent's L{zwrm.pki.AGENT_TLS_DIR}.
        @param host_id: a callable returning this host's id (it can be renamed).
        @param on_renewed: called with the new L{zwrm.pki.HostCredentials} once saved.
        @param threads: C{threads(f, *args)} -> Deferred: makes the new key and writes (and
            fsyncs) the new pair off the reactor thread; default: C{clock}'s thread pool
            (C{clock} is then the reactor).
        """
        self.clock = clock
        self._threads = threads or (
            lambda f, *a: deferToThreadPool(clock, clock.getThreadPool(), f, *a))
        self.tls_dir = tls_dir
        self._host_id = host_id
        self.on_renewed = on_renewed or (lambda credentials: None)
        self.renewals = 0
        self.expires_at = None
        self._session = None
        self._timer = None
        self._running = None  # the renewal under way

    def start(self, session):
        """Look at the certificate now and keep doing so over C{session}."""
        self.stop()
        self._session = session
        self._check()

    def stop(self):
        """The session ended: no more looks until L{start}."""
        self._session = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _later(self, delay):
        if self._session is not None:
            self._timer = self.clock.callLater(max(0.0, delay), self._check)

    def _check(self):
        self._timer = None
        if self._session is None or self._running is not None:
            return
        try:
            credentials = pki.HostCredentials.load(self.tls_dir)
        except errors.InvalidArgument as e:
            self.log.warn("cannot renew the host certificate: {why}", why=e.message)
            self._later(CHECK_INTERVAL)
            return
        if credentials is None:  # a cluster without a CA (plain ws://): nothing to renew
            return
        self.expires_at = credentials.not_valid_after.timestamp()
        now = self.clock.seconds()
        due = pki.renewal_time(credentials.cert_pem)
        if now < due:
            self._later(min(due - now, CHECK_INTERVAL))
            return
        self._running = defer.ensureDeferred(self._renew(credentials))

        def done(_):
            self._running = None

        self._running.addBoth(done)

    async def _renew(self, old):
        session = self._session
        expires = old.not_valid_after.timestamp()
        try:
            key_pem, csr_pem = await self._threads(pki.make_host_request, self._host_id())
            result = await session.call("zwrm.agent.renew_certificate",
                                        csr=csr_pem.decode("ascii"))
            new = pki.HostCredentials(result["ca"].encode("ascii"),
                                      result["certificate"].encode("ascii"), key_pem)
            if new.host_id != old.host_id or new.fingerprint != old.fingerprint:
                raise errors.InvalidArgument(
                    f"the control plane returned a certificate for host {new.host_id!r} of CA"
                    f" {new.fingerprint[:16]}..., not for {old.host_id!r} of CA"
                    f" {old.fingerprint[:16]}...")
            await self._threads(new.save_renewed, self.tls_dir)
        except Exception as e:
            retry = min(RETRY_INTERVAL, max(1.0, (expires - self.clock.seconds()) / 10))
            if isinstance(e, ApplicationError) and e.error in (
                    ApplicationError.NO_SUCH_PROCEDURE, ApplicationError.NOT_AUTHORIZED):
                # (an older role table does not let agents call it either)
                why = "the control plane does not renew certificates (an older version)"
                retry = CHECK_INTERVAL
            else:
                why = errors.message_of(e)
            self.log.warn("renewing the host certificate (it expires {t}) failed: {why};"
                          " trying again in {s:.0f} s", t=pki.expiry_of(old.cert_pem), why=why,
                          s=retry)
            self._later(retry)
            return
        self.renewals += 1
        self.expires_at = new.not_valid_after.timestamp()
        self.log.info("host certificate renewed: valid until {t} (the old one until {old})",
                      t=pki.expiry_of(new.cert_pem), old=pki.expiry_of(old.cert_pem))
        try:
            self.on_renewed(new)
        except Exception:
            self.log.failure("using the renewed host certificate")
        self._later(min(pki.renewal_time(new.cert_pem) - self.clock.seconds(), CHECK_INTERVAL))
