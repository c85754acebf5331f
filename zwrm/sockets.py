"""
Writing to a Twisted TCP connection without a reactor turn, shared by the router's
transports (L{zwrm.wamp.transport}) and the volume stream (L{zwrm.agent.transfer.wire}).
"""

from twisted.internet import tcp
from twisted.protocols import policies


def write_now(transport, data):
    """
    Write C{data} (bytes, or a bytes-like object the caller may reuse once this returns) to
    a Twisted transport.  On a plain TCP connection (under plain pass-through wrappers such
    as the control plane's plain-only listener) with nothing queued, it is sent at once
    with one C{send()}, and only what the socket did not take is queued (as bytes); anything
    else is C{transport.write}.

    Twisted's C{write} queues the bytes, asks C{epoll} to report the socket writable
    (C{epoll_ctl}), joins what was queued into one bytes object and sends it in the next
    reactor turn, and asks C{epoll} to stop (another C{epoll_ctl}): a second reactor turn,
    a copy and two more system calls per write, which for a heartbeat (one frame in, one
    out) cost about as much as routing it.
    """
    t = transport
    while type(t).write is policies.ProtocolWrapper.write:
        t = t.transport
    if ((type(t) is tcp.Server or type(t) is tcp.Client) and not t.TLS and t.connected
            and not t.disconnecting and not t._writeDisconnected and not t._tempDataLen
            and t.offset == len(t.dataBuffer)):
        try:
            n = t.socket.send(data)
        except OSError:  # EAGAIN, EINTR, or the peer gone: Twisted's write finds out which
            n = 0
        if n == len(data):
            return
        data = data[n:]
    transport.write(data if type(data) is bytes else bytes(data))
