Images with a root disk boot: kernel + initrd + disk (the disk is the root device, `root=/dev/vda`
unless the image's command line says otherwise; no more "bootindex 0 has already been used"), and
self-booting disks through SeaBIOS, or OVMF when the image's config says `"firmware": "uefi"`. The
root disk is always the first disk; volumes are attached with their virtio serial (the guest finds
them at /dev/disk/by-id/virtio-<serial>, and `zwrm.vol=<serial>:/mount` names them), never by order.
Each machine gets its own writable qcow2 root overlay over the cached read-only base; it survives
stop/start and agent restarts and is deleted with the machine. The serial console is also a socket.
