"""
A lean callee path for autobahn sessions attached to the embedded router in-process
(L{zwrm.wamp.router.Router.attach}).

The router sends an attached session its messages as lists (L{RouterSession.send_list});
a plain autobahn C{ApplicationSession} gets each one as an autobahn message object.  A
session that mixes in L{LocalCallee} takes the lists itself: a plain INVOCATION (no
progressive results, no payload encryption, positional and keyword arguments as lists
and mappings) calls the registered endpoint straight from the list and answers with a
YIELD list, which the router routes from the list too.  That skips, per call, autobahn's
INVOCATION and YIELD message objects, its message dispatch and two Deferreds of
bookkeeping: about a fifth of the control plane's CPU per agent heartbeat
(C{benchmarks/heartbeats.py --micro}).

What the endpoint sees and what the caller gets are autobahn's: the same positional and
keyword arguments, the same C{CallDetails} under the registration's C{details_arg}, a
result sent as C{args=[result]} (a C{CallResult} as its args and kwargs), an exception
(raised, or a failed Deferred) turned into ERROR by autobahn's own
C{_message_from_exception} after C{onUserError}, and a pending Deferred kept in the
session's C{_invocations}, so an INTERRUPT cancels it as autobahn would.  Every other
message goes to autobahn's C{onMessage} as before.
"""

from __future__ import annotations

import inspect

import txaio
from autobahn.wamp import message
from autobahn.wamp.request import InvocationRequest
from autobahn.wamp.types import CallDetails, CallResult
from twisted.internet.defer import Deferred

from zwrm.wamp.wire import router_message

_INVOCATION, _YIELD = 68, 70


class LocalCallee:
    """
    Mix into an autobahn C{ApplicationSession} (before it) that the router attaches
    in-process: INVOCATIONs are handled from the router's lists (see the module docstring).

    @ivar lean_invocations: INVOCATIONs handled from the list.
    """

    lean_invocations = 0

    def on_list(self, m):
        """A message list from the in-memory transport (L{zwrm.wamp.transport.MemoryTransportPair})."""
        if m[0] == _INVOCATION and self._lean_invocation(m):
            return
        self.onMessage(router_message(m))

    def _lean_invocation(self, m):
        """Handle a plain INVOCATION; C{False} for autobahn's path (anything else)."""
        n = len(m)
        if n < 4 or n > 6 or self._session_id is None or self._transport is None:
            return False
        request, details = m[1], m[3]
        registration = self._registrations.get(m[2])
        if (registration is None or request in self._invocations or type(details) is not dict
                or details.get("receive_progress")):
            return False
        args = m[4] if n > 4 else None
        kwargs = m[5] if n > 5 else None
        if (args is not None and type(args) is not list) or (kwargs is not None and type(kwargs) is not dict):
            return False
        endpoint = registration.endpoint
        invoke_kwargs = dict(kwargs) if kwargs else {}
        if endpoint.details_arg:
            invoke_kwargs[endpoint.details_arg] = CallDetails(
                registration,
                caller=details.get("caller"),
                caller_authid=details.get("caller_authid"),
                caller_authrole=details.get("caller_authrole"),
                procedure=details.get("procedure") or registration.procedure,
            )
        self.lean_invocations += 1
        try:
            if endpoint.obj is not None:
                result = endpoint.fn(endpoint.obj, *(args or ()), **invoke_kwargs)
            else:
                result = endpoint.fn(*(args or ()), **invoke_kwargs)
        except Exception:
            self._lean_failed(txaio.create_failure(), request)
            return True
        if inspect.iscoroutine(result):
            result = Deferred.fromCoroutine(result)
        if isinstance(result, Deferred):
            if not result.called:  # an INTERRUPT cancels it, as in autobahn's path
                self._invocations[request] = InvocationRequest(request, result)
            result.addCallbacks(self._lean_answered, self._lean_failed,
                                callbackArgs=(request,), errbackArgs=(request,))
        else:
            self._lean_answered(result, request)
        return True

    def _lean_answered(self, result, request):
        self._invocations.pop(request, None)
        transport = self._transport
        if transport is None:
            return None  # the session went away meanwhile (autobahn drops the result too)
        if isinstance(result, CallResult):
            transport.send(message.Yield(
                request, args=result.results, kwargs=result.kwresults, callee=result.callee,
                callee_authid=result.callee_authid, callee_authrole=result.callee_authrole,
                forward_for=result.forward_for))
        else:
            transport.send_list([_YIELD, request, {}, [result]])
        return None

    def _lean_failed(self, failure, request):
        self._invocations.pop(request, None)
        try:
            self.onUserError(failure, txaio.failure_message(failure))
        except Exception:
            pass
        traceback = txaio.failure_format_traceback(failure) if self.traceback_app else None
        reply = self._message_from_exception(_INVOCATION, request, failure.value, traceback)
        if self._transport is not None:
            self._transport.send(reply)
        return None


__all__ = ["LocalCallee"]
