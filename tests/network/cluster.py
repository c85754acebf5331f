"""
A test cluster network: host namespaces (L{zwrm.testing.netns}) each with a
L{zwrm.agent.network.host.HostNetwork} and a QEMU driver whose QEMUs run in that namespace.

No control plane here: the test plays its part (subnets, addresses, the cluster view).
"""

import os
import shutil
import stat
import sys
import tempfile

from twisted.internet.threads import deferToThread

from tests.network import guest
from zwrm.agent.network import addressing
from zwrm.agent.network.commands import Runner
from zwrm.agent.network.host import HostNetwork
from zwrm.drivers.qemu import QemuDriver
from zwrm.testing.netns import TestNetwork

CIDR_PREFIX = 16


def probe_all_script(targets, after=None, wait=400):
    """
    A guest script like L{guest.probe_script} (its output is read by
    L{guest.probe_results}), but trying every C{(label, host, port)} at once: a blocked
    target (its packets dropped, not refused) costs nc's 3 s connect timeout, once for all
    of them instead of once each.  With C{after=(host, port)} it first waits (at most
    C{wait} tries, a second apart) until that is reached: the test opens it once what the
    probes need is up, so that the guest may boot alongside the VMs it probes.
    """
    items = " ".join(f"{label}:{host}:{port}" for label, host, port in targets)
    script = "sleep 1\n"
    if after is not None:
        script += (f"n=0; while [ $n -lt {wait} ] && ! echo | nc -w 2 {after[0]} {after[1]} "
                   f">/dev/null 2>&1; do n=$((n+1)); sleep 1; done\n")
    return script + (
        f"for t in {items}; do (l=${{t%%:*}}; r=${{t#*:}}; h=${{r%:*}}; p=${{r#*:}}; "
        f"x=blocked; echo | nc -w 3 $h $p >/dev/null 2>&1 && x=reached; "
        f"echo \"probe $l $x\") & done; wait\n"
        "echo \"probe done\"\n")


class TestHost:
    __test__ = False

    def __init__(self, reactor, net, name, index, root):
        self.name = name
        self.index = index
        self.address = net.address(name)
        self.gateway = f"10.80.{index}.1"
        self.run = Runner(reactor, ["ip", "netns", "exec", net.namespace(name)])
        self.network = HostNetwork(reactor, local_address=self.address, run=self.run,
                                   state_dir=os.path.join(root, name, "net"))
        wrapper = os.path.join(root, name, "qemu")
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\nexec ip netns exec {net.namespace(name)} '
                    f'qemu-system-x86_64 "$@"\n')
        os.chmod(wrapper, stat.S_IRWXU)
        self.driver = QemuDriver(reactor, os.path.join(root, name, "machines"), accel="tcg",
                                 qemu_binary=wrapper)
        self.next = 2

    def view(self):
        return {"host_id": self.name, "address": self.address, "gateway": self.gateway}


class TestCluster:
    """Hosts with VM networks on one test switch, plus plain namespaces (C{others})."""

    __test__ = False

    def __init__(self, reactor, testcase, hosts=("h1", "h2"), others=("out",)):
        self.reactor = reactor
        self.root = tempfile.mkdtemp(prefix="zwrm-netc-", dir="/tmp")
        testcase.addCleanup(shutil.rmtree, self.root, True)
        self.net = TestNetwork(list(hosts) + list(others))
        testcase.addCleanup(self.net.close)
        self.hosts = {}
        for i, name in enumerate(hosts, 1):
            os.makedirs(os.path.join(self.root, name))
            self.hosts[name] = TestHost(reactor, self.net, name, i, self.root)
        for h in self.hosts.values():
            testcase.addCleanup(h.driver.close)
        self.vms = {}  # machine id -> (host, app, net spec)
        self.image = None

    async def build_image(self):
        self.image = await deferToThread(guest.build)
        return self.image

    def netspec(self, host, **kw):
        address = f"10.80.{host.index}.{host.next}"
        host.next += 1
        spec = {"address": address, "prefix": CIDR_PREFIX, "gateway": host.gateway,
                "dns": host.gateway, "mtu": addressing.GUEST_MTU}
        spec.update(kw)
        return spec

    async def publish(self):
        """Give every host the cluster view (what the control plane's events carry)."""
        hosts = [h.view() for h in self.hosts.values()]
        members = [{"address": n["address"], "app": app, "host_id": h.name,
                    "open_ports": n.get("open_ports", [])}
                   for (h, app, n) in self.vms.values()]
        for h in self.hosts.values():
            await h.network.set_cluster(hosts, members)

    async def start_vm(self, host_name, mid, app, script=None, **netkw):
        host = self.hosts[host_name]
        net = self.netspec(host, **netkw)
        self.vms[mid] = (host, app, net)
        nic = await host.network.add_machine(mid, app, net)
        await self.publish()
        cmdline = f"{self.image.cmdline} {addressing.kernel_ip_arg(net)}"
        if script:
            cmdline += " " + guest.script_arg(script)
        await host.driver.start({"id": mid, "kernel": self.image.kernel,
                                 "initrd": self.image.initrd, "cmdline": cmdline, "vcpus": 1,
                                 "memory_mb": 96, "nic": nic})
        return net["address"]

    async def console(self, mid):
        return await self.vms[mid][0].driver.console(mid)

    def listen(self, name, port):
        """A web server on every address of namespace C{name} (a host's service)."""
        p = self.net.spawn(name, [sys.executable, "-m", "http.server", str(port),
                                  "--bind", "0.0.0.0"], stdout=open(os.devnull, "w"),
                           stderr=open(os.devnull, "w"))
        return p

    async def fetch(self, name, url, timeout=3):
        """C{curl} inside namespace C{name}; the body, or None if it failed."""
        run = Runner(self.reactor, ["ip", "netns", "exec", self.net.namespace(name)])
        try:
            return await run("curl", "-sS", "-m", timeout, url)
        except Exception:
            return None
