"""
VM networking on an agent's host (see docs/networking.md).

 - L{addressing}: pure functions: TAP names, MAC addresses, the guest's C{ip=} kernel
   argument and cloud-init network-config, app marks.
 - L{commands}: running C{ip}, C{bridge}, C{nft}, C{sysctl} without blocking the reactor.
 - L{host}: L{host.HostNetwork}: the bridge, a TAP per VM, the VXLAN overlay with its
   unicast forwarding entries, nftables isolation and NAT, and the kernel forwarding
   (DNAT) of published C{tcp} ports.
 - L{dns}: the cluster DNS server on the bridge address (twisted.names).
 - L{proxy}: TCP forwarding to a guest in user space (the loopback C{host_port}, and the
   ingress's C{http}/C{https} ports and the C{tcp} ports the kernel does not forward).
"""
