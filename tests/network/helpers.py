"""Small clients the network tests use (real sockets, bounded time)."""

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol


class _Fetch(protocol.Protocol):
    def __init__(self, request):
        self.request = request
        self.data = b""
        self.done = Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.done.callback(self.data)


async def http_get(reactor, host, port, path="/", headers=None, timeout=10, host_header=None):
    """
    C{GET path} over HTTP/1.0 (the server closes when done); the whole response as bytes.

    @raise Exception: if it cannot connect, or no answer within C{timeout} seconds.
    """
    head = f"GET {path} HTTP/1.0\r\nHost: {host_header or host}\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    p = _Fetch((head + "\r\n").encode())
    await connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=timeout), p)
    call = reactor.callLater(timeout, p.transport.abortConnection)
    try:
        return await p.done
    finally:
        if call.active():
            call.cancel()


async def answers(reactor, host, port, needle=b"zwrm test image", **kw):
    """True if C{GET /} at C{host:port} answers with C{needle} in it."""
    try:
        return needle in await http_get(reactor, host, port, **kw)
    except Exception:
        return False


async def veth_guest(reactor, host_run, guest_ns, nic, net):
    """
    A network namespace C{guest_ns} standing in for a VM on a host's bridge (TCG would
    measure the emulator, not the network): the TAP the host made for it (C{nic}) is
    replaced by a veth whose other end, C{eth0} in C{guest_ns}, has the VM's MAC and
    address (C{net}, its network spec), default route through the bridge address.

    @param host_run: a L{zwrm.agent.network.commands.Runner} acting in the host's namespace.
    @return: a L{Runner} acting in the guest's namespace.  The caller deletes C{guest_ns}.
    """
    from zwrm.agent.network.commands import Runner

    await Runner(reactor)("ip", "netns", "add", guest_ns)
    await host_run("ip", "link", "del", nic["tap"])
    await host_run("ip", "link", "add", nic["tap"], "mtu", net.get("mtu", 1450), "type", "veth",
                   "peer", "name", "eth0", "netns", guest_ns)
    await host_run("ip", "link", "set", nic["tap"], "master", "zwbr0", "up")
    g = Runner(reactor, ["ip", "netns", "exec", guest_ns])
    await g("ip", "link", "set", "eth0", "address", nic["mac"], "mtu", net.get("mtu", 1450), "up")
    await g("ip", "addr", "add", f"{net['address']}/{net['prefix']}", "dev", "eth0")
    await g("ip", "link", "set", "lo", "up")
    await g("ip", "route", "add", "default", "via", net["gateway"])
    return g
