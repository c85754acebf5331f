"""
zwrm.testing.netns on real namespaces: hosts reach each other over the bridge, nothing
is added to the test's own namespace, and close() / sweep() leave nothing behind.
"""

import os
import subprocess
import sys

import pytest

from zwrm.testing import netns
from zwrm.testing.netns import NetworkError, TestNetwork

pytestmark = pytest.mark.acceptance

SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7777))
s.listen()
print("listening", flush=True)
c, peer = s.accept()
c.sendall(("hello " + peer[0]).encode())
c.close()
"""

CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 7777), timeout=10)
print(c.recv(100).decode())
"""


def _ours():
    """This process's test namespaces (other test processes may be making theirs)."""
    mine = f"-{os.getpid()}-"
    return [n for n in netns._namespaces() if n.startswith(netns.PREFIX) and mine in n]


@pytest.fixture
def net():
    n = TestNetwork(["a", "b"])
    yield n
    n.close()


def test_ping_between_hosts(net):
    assert net.address("a") != net.address("b")
    assert net.address("a").startswith("10.99.")
    net.run("a", ["ping", "-c1", "-W5", net.address("b")])
    net.run("b", ["ping", "-c1", "-W5", net.hostname("a")])


def test_tcp_between_hosts(net):
    server = net.spawn("a", [sys.executable, "-c", SERVER, net.address("a")],
                       stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        out = net.run("b", [sys.executable, "-c", CLIENT, net.address("a")], timeout=30)
        assert out.stdout.strip() == f"hello {net.address('b')}"
        server.wait(timeout=10)
    finally:
        server.kill()
        server.wait()


def test_disconnect_and_reconnect(net):
    net.run("a", ["ping", "-c1", "-W5", net.address("b")])
    net.disconnect("b")
    r = net.run("a", ["ping", "-c1", "-W2", net.address("b")], check=False)
    assert r.returncode != 0
    assert net.run("b", ["hostname"]).stdout.strip() == "b"  # still there, only cut off
    net.reconnect("b")
    net.run("a", ["ping", "-c1", "-W5", net.address("b")])
    with pytest.raises(KeyError):
        net.disconnect("nosuchhost")


def test_power_cut(net):
    # What programs in the host made: a process, a bridge, a veth pair, nftables rules.
    sleeper = net.spawn("b", ["sleep", "600"])
    net.run("b", ["ip", "link", "add", "br-test", "type", "bridge"])
    net.run("b", ["ip", "link", "add", "veth-test", "type", "veth", "peer", "name", "veth-peer"])
    net.run("b", ["nft", "add", "table", "inet", "zwrm_test"])
    net.power_cut("b")
    assert sleeper.wait(timeout=10) == -9  # killed, not asked
    links = net.run("b", ["ip", "-o", "link", "show"]).stdout
    assert "br-test" not in links and "veth-test" not in links and "veth-peer" not in links
    assert net.run("b", ["nft", "list", "ruleset"]).stdout.strip() == ""
    # Its address and cable stay: it answers again, as a booted host does.
    net.run("a", ["ping", "-c1", "-W5", net.address("b")])
    assert net.run("b", ["hostname"]).stdout.strip() == "b"
    with pytest.raises(KeyError):
        net.power_cut("nosuchhost")


def test_hostname_is_the_host_name(net):
    assert net.run("a", ["hostname"]).stdout.strip() == "a"
    assert net.run("b", ["hostname"]).stdout.strip() == "b"
    assert subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip() != "a"


def test_addresses_only_inside(net):
    outside = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert net.address("a") not in outside
    inside = net.run("a", ["ip", "-o", "addr"]).stdout
    assert net.address("a") in inside
    assert "127.0.0.1" in inside  # loopback up
    assert net.address("b") not in inside


def test_binds_are_per_host(tmp_path):
    target = tmp_path / "shared"
    binds = {"a": {target: tmp_path / "a"}, "b": {target: tmp_path / "b"}}
    with TestNetwork(["a", "b"], binds=binds) as n:
        n.run("a", ["sh", "-c", f"echo A > {target}/f"])
        n.run("b", ["sh", "-c", f"echo B > {target}/f"])
        assert (tmp_path / "a" / "f").read_text() == "A\n"
        assert (tmp_path / "b" / "f").read_text() == "B\n"
        assert not (target / "f").exists()
        assert n.run("a", ["cat", f"{target}/f"]).stdout == "A\n"
    assert not target.exists()  # made for the binds, removed again


def test_close_leaves_nothing():
    before = set(_ours())
    n = TestNetwork(["a", "b"])
    made = set(_ours()) - before
    assert len(made) == 3  # switch + two hosts
    sleeper = n.spawn("a", ["sleep", "600"])
    n.close()
    assert sleeper.wait(timeout=10) != 0  # killed, not left running
    assert not (set(_ours()) & made)
    assert not any((netns.NETNS_ETC / ns).exists() for ns in made)
    n.close()  # idempotent
    with pytest.raises(NetworkError):
        n.add_host("c")


def test_sweep_removes_stale_namespaces():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netns.PREFIX}250-{dead.pid}-x"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with TestNetwork(["a"]):
            assert stale not in netns._namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True)


def test_parallel_networks_get_their_own_subnets():
    with TestNetwork(["a"]) as one, TestNetwork(["a"]) as two:
        assert one.subnet != two.subnet
        assert one.namespace("a") != two.namespace("a")
        # the two bridges are separate: one's host cannot reach the other's
        r = one.run("a", ["ping", "-c1", "-W1", two.address("a")], check=False)
        assert r.returncode != 0


def test_bad_host_name():
    with TestNetwork() as n:
        for bad in ("switch", "Bad", "", "x" * 30, "a/b"):
            with pytest.raises(NetworkError):
                n.add_host(bad)
