Agents run machines as QEMU virtual machines (KVM where it really works, TCG otherwise) through
the `qemu` hypervisor-driver plugin, controlled over QMP, with ext4 volumes on virtio-blk, a
forwarded service port, TCP or HTTP health checks, and the serial console kept for `zwrm logs`.
An agent restart finds its running VMs again.
