"""
How zwrm's sessions serve procedures: an object's C{@wamp.register} methods registered one by
one, so each can be wrapped (the control plane's API, L{zwrm.control.api.guarded}; an
agent's procedures, L{guarded_agent_procedure}), and how their failures are logged
(L{QuietAnswers}).
"""

import inspect
from collections.abc import Coroutine

from autobahn.wamp.exception import ApplicationError
from twisted.internet import defer
from twisted.python.failure import Failure

from zwrm import errors


def cancellable(fn):
    """
    Mark a procedure whose work its caller may end: a CANCEL, or the caller leaving (the
    router then sends the callee an INTERRUPT), cancels it (L{shielded} leaves it so).
    For procedures that only wait or stream, such as a console attachment.
    """
    fn.cancellable = True
    return fn


def shielded(uri, procedure, log, under_way=None):
    """
    C{procedure} (a registered callable) run to its end whatever its caller does (for
    every procedure that is not L{cancellable}).

    autobahn answers an INTERRUPT (the caller cancelled, timed out or left, e.g. an agent
    that lost power mid-report) by cancelling the Deferred the procedure returned: a
    coroutine would stop at whatever it awaited, between two writes (a machine stored
    failed, its event never produced).  Here the caller's Deferred is a separate one: it
    fails with L{defer.CancelledError} at once, and the work goes on to its end; an error
    it ends with then has nobody to answer and is logged as one line.

    @param under_way: a set that holds the work's Deferreds while they run: its owner
        cancels them when it stops itself (the control plane, before its store closes);
        a caller still waiting then gets L{errors.Unavailable} saying so.
    """
    def call(*args, **kwargs):
        result = procedure(*args, **kwargs)
        if not isinstance(result, defer.Deferred) or result.called:
            return result
        answer = defer.Deferred()
        if under_way is not None:
            under_way.add(result)

        def ended(outcome):
            if under_way is not None:
                under_way.discard(result)
            if not answer.called:
                if (under_way is not None and isinstance(outcome, Failure)
                        and outcome.check(defer.CancelledError)):
                    # Not its caller (that cancels the answer, above): the owner stopping
                    # (the control plane's shutdown). Said so, not as a bare cancellation
                    # (which autobahn would send as wamp.error.runtime_error, no words).
                    answer.errback(errors.Unavailable(
                        f"{uri} was interrupted: the control plane is stopping (what it "
                        "had done is kept: zwrm events shows it once the control plane "
                        "is back)"))
                elif isinstance(outcome, Failure):
                    answer.errback(outcome)
                else:
                    answer.callback(outcome)
            elif isinstance(outcome, Failure) and not outcome.check(defer.CancelledError):
                why = getattr(outcome.value, "message", None) or outcome.getErrorMessage()
                log.info("{uri}: its caller had gone; it ended with: {why}", uri=uri, why=why)
            return None

        result.addBoth(ended)
        return answer

    call.__name__ = getattr(procedure, "__name__", "procedure")
    call.__doc__ = procedure.__doc__
    return call


def shield_unless_cancellable(uri, endpoint, fn, log, under_way=None):
    """
    C{fn} (the registered wrapper of C{endpoint}) L{shielded}, unless C{endpoint} is
    L{cancellable}: a caller that cancels or leaves does not stop a change half-way.
    """
    if getattr(endpoint, "cancellable", False):
        return fn
    return shielded(uri, fn, log, under_way)


def procedures_of(api):
    """
    C{(uri, bound method, RegisterOptions or None)} for each C{@wamp.register} method of
    C{api}, as autobahn's C{register(api)} would register them.
    """
    for _name, fn in inspect.getmembers(type(api), inspect.isfunction):
        for pattern in fn.__dict__.get("_wampuris", ()):
            if pattern.is_endpoint():
                yield pattern.uri(), getattr(api, fn.__name__), pattern.options


def call_guarded(endpoint, args, kwargs, failed):
    """
    Call C{endpoint(*args, **kwargs)}; its failure, raised or as a failed Deferred or
    coroutine, goes to C{failed} (an errback).

    @return: a Deferred, or a plain answer as it is (e.g. a heartbeat's: no Deferred to
        make and fire).
    """
    try:
        result = endpoint(*args, **kwargs)
    except Exception:
        return defer.fail().addErrback(failed)
    if isinstance(result, Coroutine):
        result = defer.Deferred.fromCoroutine(result)
    if isinstance(result, defer.Deferred):
        return result.addErrback(failed)
    return result


def guarded_agent_procedure(uri, endpoint, host_id, log):
    """
    C{endpoint}, an agent's procedure C{uri} (without its C{zwrm.agent.<host id>.} prefix),
    answering every failure with a C{zwrm.error.*} URI:

      - a L{errors.ZwrmError} (or any WAMP error) and a cancellation pass as they are;
      - a full disk (C{ENOSPC}, C{EDQUOT}) that a procedure did not name itself is
        L{errors.ResourceExhausted} naming the host, logged as one line;
      - anything else is a bug: logged once with its traceback, answered as
        L{errors.Internal} without it (autobahn's default sends the exception's text as
        C{wamp.error.runtime_error} and logs it as a user error).
    """

    def failed(failure):
        if failure.check(ApplicationError, defer.CancelledError):
            return failure
        e = failure.value
        if errors.disk_full(e):
            log.error("{uri}: the disk is full ({why})", uri=uri, why=e.strerror or e)
            raise errors.ResourceExhausted(
                f"host {host_id}: the disk is full: {uri} failed ({e.strerror or e})"
            )
        log.failure("{uri} failed", failure, uri=uri)
        raise errors.Internal(
            f"host {host_id}: {uri} failed: an internal error (see the agent's log)"
        )

    def call(*args, **kwargs):
        return call_guarded(endpoint, args, kwargs, failed)

    call.__name__ = getattr(endpoint, "__name__", "procedure")
    call.__doc__ = endpoint.__doc__
    return call


async def register_agent_procedures(session, obj, host_id, log):
    """
    Register the C{@wamp.register} methods of C{obj} on C{session} under
    C{zwrm.agent.<host_id>.}, each behind L{guarded_agent_procedure} and, unless it is
    L{cancellable}, L{shielded}.

    @return: the registrations.
    """
    registrations = []
    for uri, endpoint, options in procedures_of(obj):
        # a control plane that restarts mid-call does not cut a start or a stop half-way
        fn = shield_unless_cancellable(
            uri, endpoint, guarded_agent_procedure(uri, endpoint, host_id, log), log)
        registrations.append(await session.register(
            fn, f"zwrm.agent.{host_id}.{uri}", options=options))
    return registrations


class QuietAnswers:
    """
    A session mix-in (before C{ApplicationSession}) for how its procedures' failures are
    logged. autobahn's C{onUserError} logs an answered WAMP error (a caller's bad input, a
    routine "not found") at warn level, and a call its caller cancelled (a console that
    detached, a drain given up) as an error with its traceback. Here the first is an info
    line, the second a debug line; anything else (a bug) is C{onUserError}'s as before.
    """

    def onUserError(self, fail, msg):
        value = getattr(fail, "value", None)
        if isinstance(value, defer.CancelledError):
            self.log.debug("{klass}: a call was cancelled by its caller",
                           klass=type(self).__name__)
            return None
        if isinstance(value, ApplicationError):
            self.log.info("{klass}: answered {answer}", klass=type(self).__name__,
                          answer=value.error_message())
            return None
        return super().onUserError(fail, msg)
