"""
Names and addresses of a VM's network, as pure functions (every agent computes the same).

A VM's network, as the control plane gives it in the machine spec (C{spec["network"]})::

    {"address": "10.80.3.7", "prefix": 16, "gateway": "10.80.3.1", "dns": "10.80.3.1",
     "mtu": 1450, "domain": "zwrm.internal", "hostname": "web-0"}
"""

import hashlib
import ipaddress
import json
import zlib

import orjson

#: The MTU guests get: the overlay's VXLAN header takes 50 bytes of a 1500-byte underlay.
GUEST_MTU = 1450


def tap_name(machine_id):
    """The TAP device of a machine: C{zt} and 12 hex digits (Linux allows 15 characters)."""
    return "zt" + hashlib.sha256(machine_id.encode()).hexdigest()[:12]


def hosts_digest(hosts):
    """
    The SHA-256 (hex) of a network view's hosts list, whatever its order: its entries
    sorted by C{host_id}, as compact JSON with sorted keys. The control plane and the
    agents compute it alike, so an agent that comes back with the list it held can be
    told that list is still current instead of being sent it again (the control plane's
    L{zwrm.control.network.ViewPublisher}).

    @param hosts: the entries (dicts with a C{host_id} string), in any order.
    """
    entries = sorted(hosts, key=lambda h: h["host_id"])
    try:
        text = orjson.dumps(entries, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # what orjson refuses (an integer past 64 bits): the same, slower
        text = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(text).hexdigest()


def mac_for(address):
    """
    The MAC address of the VM at C{address}: locally administered, C{0a:58} and the four
    bytes of the IPv4 address, so every agent knows a remote VM's MAC from its address.
    """
    b = ipaddress.IPv4Address(address).packed
    return "0a:58:" + ":".join(f"{x:02x}" for x in b)


def app_mark(app):
    """A non-zero 31-bit number for an app, the packet mark its VMs' packets carry."""
    return (zlib.crc32(str(app).encode()) & 0x7FFFFFFF) or 1


def netmask(prefix):
    return str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)


def kernel_ip_arg(net):
    """
    The kernel command line arguments giving a kernel-image guest its address: the kernel's
    own C{ip=<client>::<gateway>:<netmask>:<hostname>:eth0:off:<dns>} and C{zwrm.mtu=}.
    """
    return (f"ip={net['address']}::{net['gateway']}:{netmask(net['prefix'])}:"
            f"{net.get('hostname') or ''}:eth0:off:{net.get('dns') or ''} "
            f"zwrm.mtu={net.get('mtu') or GUEST_MTU}")


def cloud_init_network_config(net):
    """
    The cloud-init network-config (version 2) for a disk-image guest: its NIC (matched by
    MAC address), static address, default route, resolver and MTU.  The seed builder
    writes it as C{network-config} next to C{meta-data} and C{user-data}.
    """
    nameservers = {"addresses": [net["dns"]]} if net.get("dns") else {}
    if nameservers and net.get("domain"):
        nameservers["search"] = [net["domain"]]
    eth = {
        "match": {"macaddress": mac_for(net["address"])},
        "set-name": "eth0",
        "addresses": [f"{net['address']}/{net['prefix']}"],
        # The default route as gateway4, which every renderer applies (ifupdown's own
        # "gateway"); not routes: cloud-init 22.4 (Debian 12) refuses "to: default" and
        # leaves eth0 down, and renders other routes for ifupdown with net-tools' route,
        # which images without net-tools lack.
        "gateway4": net["gateway"],
        "mtu": net.get("mtu") or GUEST_MTU,
    }
    if nameservers:
        eth["nameservers"] = nameservers
    return {"version": 2, "ethernets": {"eth0": eth}}
