"""
The errors zwrm reports to its clients.

Every error a WAMP client can see is an ``autobahn.wamp.exception.ApplicationError``
whose URI is under ``zwrm.error.`` and whose first argument is one readable sentence.
Raise these from procedures; the router sends them to the caller as WAMP ERROR messages,
and the CLI prints the message (never a traceback) and exits non-zero.

Add a new class here only for a new *kind* of failure a client can act on.
"""

import errno

from autobahn.wamp.exception import ApplicationError


class ZwrmError(ApplicationError):
    """
    Base class of every error zwrm reports.

    @ivar uri: the WAMP error URI, ``zwrm.error.<kind>``.
    """

    uri = "zwrm.error.internal"

    def __init__(self, message, **details):
        ApplicationError.__init__(self, self.uri, message, **details)

    @property
    def message(self):
        return self.args[0] if self.args else ""

    def __str__(self):
        return f"{self.uri}: {self.message}"


class NotFound(ZwrmError):
    """A named object (host, app, machine, volume, image, drain) does not exist."""

    uri = "zwrm.error.not_found"


class InvalidArgument(ZwrmError):
    """An argument is missing, of the wrong type or out of range."""

    uri = "zwrm.error.invalid_argument"


class Conflict(ZwrmError):
    """The request contradicts the current state (e.g. draining a drained host)."""

    uri = "zwrm.error.conflict"


class Unplaceable(ZwrmError):
    """The scheduler found no host; details say how many hosts each filter removed."""

    uri = "zwrm.error.unplaceable"


class NotAuthorized(ZwrmError):
    """The caller's role may not do this."""

    uri = "zwrm.error.not_authorized"


class AuthenticationFailed(ZwrmError):
    """A token, secret or signature was not accepted."""

    uri = "zwrm.error.authentication_failed"


class Unavailable(ZwrmError):
    """A host or service that is needed is not reachable right now; retry later."""

    uri = "zwrm.error.unavailable"


class NoCallee(Unavailable):
    """
    Nothing is registered for the procedure called (C{wamp.error.no_such_procedure}): the
    session that served it is gone, e.g. an agent that restarted and has not registered
    again.  Reaches other sessions as L{Unavailable}.
    """


class ResourceExhausted(ZwrmError):
    """A disk is full, a cache or a limit is exhausted."""

    uri = "zwrm.error.resource_exhausted"


class Corrupt(ZwrmError):
    """Data failed verification (a digest, a checksum, a malformed stream)."""

    uri = "zwrm.error.corrupt"


class StaleView(ZwrmError):
    """
    A change to a view was based on a version the receiver does not hold (an agent's
    cluster network view: a C{hosts_delta} whose C{base} is not its hosts list's serial);
    nothing was applied: the sender sends the whole view again.
    """

    uri = "zwrm.error.stale_view"


class Internal(ZwrmError):
    """A bug: logged with its traceback on the server, reported without it."""

    uri = "zwrm.error.internal"


ALL = {cls.uri: cls for cls in ZwrmError.__subclasses__()}


def from_wire(error):
    """
    The L{ZwrmError} subclass instance for an C{ApplicationError} received over WAMP.

    A callee's L{NotFound} reaches its caller as a plain C{ApplicationError} whose C{error}
    is C{zwrm.error.not_found}; this rebuilds the L{NotFound} so callers can catch it by
    class. Errors that are not zwrm's (e.g. C{wamp.error.no_such_procedure}) become
    L{Unavailable} when they mean the callee is gone (L{NoCallee} for no such procedure),
    and are returned unchanged otherwise.
    """
    if isinstance(error, ZwrmError) or not isinstance(error, ApplicationError):
        return error
    cls = ALL.get(error.error)
    message = error.args[0] if error.args else error.error
    if cls is not None:
        return cls(message, **(error.kwargs or {}))
    if error.error == ApplicationError.NO_SUCH_PROCEDURE:
        return NoCallee(f"{error.error}: {message}")
    if error.error in (ApplicationError.CANCELED, "wamp.error.timeout"):
        return Unavailable(f"{error.error}: {message}")
    return error


def disk_full(e):
    """
    Whether exception C{e} says a disk has no room left (C{ENOSPC}, C{EDQUOT}): a condition
    to report as L{ResourceExhausted}, not a bug.
    """
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def message_of(e):
    """
    The readable sentence of exception C{e}: a zwrm error's message (one received over WAMP
    too), another WAMP error's URI and message, else C{str(e)} (or its class's name).
    """
    e = from_wire(e)
    if isinstance(e, ZwrmError):
        return e.message
    if isinstance(e, ApplicationError):
        return e.error_message()
    return str(e) or e.__class__.__name__


def log_failure(log, failure, format, **kw):
    """
    Log C{failure} of background work (no caller to answer): a L{ZwrmError} other than
    L{Internal} (a condition it names in one sentence, such as a full disk) as one error
    line, C{"<format>: <its message>"}; anything else, a bug, with its traceback.

    @param log: a L{twisted.logger.Logger}.
    @param format: what was being done, a L{twisted.logger} format (C{kw} fills it).
    """
    if failure.check(ZwrmError) and not failure.check(Internal):
        log.error(format + ": {why}", why=failure.value.message, **kw)
    else:
        log.failure(format, failure, **kw)
