Disk images are raw or qcow2, as their own layer media types (application/vnd.zwrm.disk.raw.v1,
application/vnd.zwrm.disk.qcow2.v1). A qcow2 with a backing file or an external data file is refused
at push, by the registry, and again on the agent before QEMU sees it (checked with qemu-img info,
never by magic bytes). `zwrm images push --firmware uefi` marks a self-booting UEFI disk.
