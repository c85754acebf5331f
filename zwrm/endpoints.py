"""
Client endpoints for the control plane's WebSocket URL, shared by the agent, the control
component behind an external router and the CLI (it imports nothing of theirs); and the one-line
text of a TLS error (L{tls_error_text}), which the CLI and the agent's volume sender report,
and of a failed connection (L{connect_error_text}), which the CLI and the agent report.
"""

import os
from ipaddress import ip_address

from autobahn.websocket.util import parse_url
from twisted.internet import endpoints, error
from twisted.python.failure import Failure


def tcp_endpoint(reactor, host, port, timeout):
    """
    A TCP client endpoint: an IP literal (IPv6 with or without brackets) is connected to
    directly, a name through L{endpoints.HostnameEndpoint}.
    """
    try:
        ip = ip_address(host.strip("[]"))
    except ValueError:
        return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    cls = endpoints.TCP6ClientEndpoint if ip.version == 6 else endpoints.TCP4ClientEndpoint
    return cls(reactor, str(ip), port, timeout=timeout)


def client_endpoint(reactor, url, ca_file=None, timeout=10, ca_pem=None):
    """
    A client endpoint for the WebSocket C{url}.

    @param ca_file: PEM file of the CA to trust for C{wss://}.
    @param ca_pem: that CA's PEM bytes, already read (instead of C{ca_file}).
    @return: a TCP endpoint for C{ws://}; for C{wss://} one wrapped in TLS that checks the
        server's certificate for the URL's host against the CA given, or against the
        platform's trust store if none is.
    """
    secure, host, port, _resource, _path, _params = parse_url(url)
    tcp = tcp_endpoint(reactor, host, port, timeout)
    if not secure:
        return tcp
    from twisted.internet import ssl

    if ca_pem is None and ca_file:
        with open(ca_file, "rb") as f:
            ca_pem = f.read()
    trust = ssl.Certificate.loadPEM(ca_pem) if ca_pem else ssl.platformTrust()
    return endpoints.wrapClientTLS(ssl.optionsForClientTLS(host, trustRoot=trust), tcp)


def tls_error_text(err):
    """
    @param err: an C{OpenSSL.SSL.Error}, whose argument is usually OpenSSL's error queue of
        C{(library, function, reason)} tuples.
    @return: the reasons in one line (C{""} for an empty queue), else C{str(err)}.
    """
    queue = err.args[0] if err.args and isinstance(err.args[0], list) else None
    if queue is None:
        return str(err)
    return "; ".join(e[-1] for e in queue if isinstance(e, tuple) and e and e[-1])


def connect_error_text(err):
    """
    @param err: why a connection failed or was lost: a Twisted connection error, an
        C{OSError}, or a L{Failure} of one.
    @return: why, in one line: the OS's words for an errno Twisted has no class for (e.g.
        "No route to host" while this host is cut off the network), else Twisted's sentence
        without its final stop. A connection closed while it was being set up (Twisted's
        C{ConnectError} carrying the L{Failure} that closed it, whose text is a traceback's
        repr) says so in words.
    """
    if isinstance(err, Failure):
        err = err.value
    if isinstance(err, error.ConnectError) and err.args and isinstance(err.args[0], Failure):
        inner = err.args[0].value
        if isinstance(inner, error.ConnectionDone):
            return "the connection was closed before it was set up"
        return connect_error_text(inner)
    errno_ = getattr(err, "osError", None)
    if isinstance(errno_, int):
        return os.strerror(errno_)
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err).rstrip(".") or err.__class__.__name__


__all__ = ["client_endpoint", "connect_error_text", "tcp_endpoint", "tls_error_text"]
