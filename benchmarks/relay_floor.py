#!/usr/bin/env python3
"""
The floor under the router's sequential RPC rows (benchmarks/router.py): what one round trip
through a process that only forwards bytes costs on this machine, with the relay written on
Twisted's reactor (as zwrm's router is) and as a bare C{epoll} loop.

A caller sends 100 bytes to the relay, which forwards them to a callee, which sends them back
through the relay: the shape of a sequential WAMP call (CALL, INVOCATION, YIELD, RESULT)
without WebSocket, WAMP or routing. The caller and the callee are blocking sockets in their
own processes (far cheaper than the autobahn sessions of benchmarks/router.py). Printed per
round trip, medians of interleaved rounds: the time, and each process's CPU (the threads'
on-CPU nanoseconds from C{/proc/<pid>/task/<tid>/schedstat}).

The Twisted relay writes with L{zwrm.sockets.write_now}, as the router does.

Usage:
    .venv/bin/python benchmarks/relay_floor.py [--rounds 3] [--calls 5000]
"""

import argparse
import os
import select
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
MESSAGE = b"x" * 100


def cpu_of(pid):
    """@return: the on-CPU seconds of all threads of C{pid}."""
    ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            ns += int(f.read().split()[0])
    return ns / 1e9


def _accept_two(port):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(2)
    print("listening", flush=True)
    return listener


def relay_twisted(port):
    from twisted.internet import protocol, reactor

    from zwrm.sockets import write_now

    peers, held = [], []

    class Relay(protocol.Protocol):
        def connectionMade(self):
            self.transport.setTcpNoDelay(True)
            peers.append(self)
            if len(peers) == 2:
                for data in held:
                    peers[0].transport.write(data)

        def dataReceived(self, data):
            if len(peers) < 2:
                held.append(data)  # the callee is not connected yet
                return
            write_now((peers[1] if self is peers[0] else peers[0]).transport, data)

        def connectionLost(self, reason):
            if reactor.running:
                reactor.stop()

    factory = protocol.Factory.forProtocol(Relay)
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    reactor.callWhenRunning(print, "listening", flush=True)
    reactor.run()


def relay_epoll(port):
    listener = _accept_two(port)
    a, _ = listener.accept()
    b, _ = listener.accept()
    ep = select.epoll()
    by_fd, other = {}, {}
    for s, o in ((a, b), (b, a)):
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ep.register(s.fileno(), select.EPOLLIN)
        by_fd[s.fileno()], other[s.fileno()] = s, o
    while True:
        for fd, _ in ep.poll(-1):
            data = by_fd[fd].recv(65536)
            if not data:
                return
            other[fd].sendall(data)


def _client(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def callee(port):
    s = _client(port)
    while True:
        data = s.recv(4096)
        if not data:
            return
        s.sendall(data)


def _recv_exactly(s, n):
    got = 0
    while got < n:
        data = s.recv(n - got)
        if not data:
            raise RuntimeError("the relay closed the connection")
        got += len(data)


def measure(kind, calls):
    """@return: µs per round trip: C{(time, relay CPU, callee CPU, caller CPU)}."""
    from zwrm.agent.executor import free_port

    port = free_port()
    relay = subprocess.Popen(
        [sys.executable, HERE, "--relay", kind, str(port)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    procs = [relay]
    try:
        if relay.stdout.readline().strip() != "listening":
            raise RuntimeError(f"the {kind} relay did not start")
        caller = _client(port)
        peer = subprocess.Popen([sys.executable, HERE, "--callee", str(port)])
        procs.append(peer)
        for _ in range(500):  # warm up (and wait for the callee)
            caller.sendall(MESSAGE)
            _recv_exactly(caller, len(MESSAGE))
        before = (cpu_of(relay.pid), cpu_of(peer.pid), cpu_of(os.getpid()))
        start = time.perf_counter()
        for _ in range(calls):
            caller.sendall(MESSAGE)
            _recv_exactly(caller, len(MESSAGE))
        elapsed = time.perf_counter() - start
        after = (cpu_of(relay.pid), cpu_of(peer.pid), cpu_of(os.getpid()))
        caller.close()
        return (elapsed / calls * 1e6,) + tuple((b - a) / calls * 1e6 for a, b in zip(before, after, strict=True))
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--relay", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--callee", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        kind, port = args.relay
        return (relay_twisted if kind == "twisted" else relay_epoll)(int(port))
    if args.callee:
        return callee(args.callee)
    kinds = ("twisted", "epoll")
    runs = {k: [] for k in kinds}
    load0 = os.getloadavg()[0]
    for _ in range(args.rounds):
        for kind in kinds:
            runs[kind].append(measure(kind, args.calls))
    print(f"µs per round trip, medians of {args.rounds} interleaved rounds of {args.calls} calls"
          f" (load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after)")
    print(f"  {'relay':28} {'time':>6} {'relay CPU':>10} {'callee CPU':>11} {'caller CPU':>11}")
    for kind, label in (("twisted", "Twisted reactor, write_now"), ("epoll", "bare epoll loop")):
        t, r, c, k = (statistics.median(x[i] for x in runs[kind]) for i in range(4))
        print(f"  {label:28} {t:6.0f} {r:10.1f} {c:11.1f} {k:11.1f}")


if __name__ == "__main__":
    main()
