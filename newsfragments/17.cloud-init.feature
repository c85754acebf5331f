Machines booted from a disk get a cloud-init NoCloud seed disk (built per machine with genisoimage,
no root needed): meta-data with the machine id as instance id and a host name, network-config (DHCP
on the machine's NIC by MAC), and user-data with the deploy's SSH keys, environment
(/etc/zwrm/env, /etc/environment) and the volumes' mounts (by virtio serial,
/dev/disk/by-id/virtio-<serial>), followed by the operator's own user-data if given.
