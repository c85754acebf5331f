"""
The bootable test image: a Debian kernel plus a busybox-static initramfs.

The integration tests and the local-cluster demo boot this image. It is built from what the
host has installed (``linux-image-amd64`` and ``busybox-static``) into a cache directory,
keyed by the kernel version and a hash of this file, so it is built once and reused.

What the guest does (its ``/init``):

 1. mounts ``/proc``, ``/sys`` and ``devtmpfs``, and sends its output to the serial console;
 2. ``insmod``s the virtio, virtio-blk, virtio-net, ext4, ACPI button and evdev modules copied
    from ``/lib/modules/<kver>`` (their order is the one ``modprobe --show-depends`` gives);
 3. mounts each volume named on the kernel command line by its virtio serial:
    ``zwrm.vol=data:/data,logs:/logs`` (the disk whose ``/sys/block/vd*/serial`` is ``data``;
    a device name such as ``vdb`` works too), ext4, the mount point is created; appends one
    line per boot to
    ``<mount>/boots.log`` (the first volume only), then C{sync}s;
 4. configures user-mode networking (10.0.2.15/24 via 10.0.2.2);
 5. serves ``busybox httpd -f -p 8080`` from ``/www``:

    - ``GET /`` (``/cgi-bin/index.cgi``): an HTML page that includes the file
      ``index.txt`` of the first volume (or says there is none) and the boot count;
    - ``GET /cgi-bin/read?NAME``: the file NAME of the first volume, 404 if absent;
    - ``POST /cgi-bin/write?NAME`` with a body: writes the body to file NAME of the first
      volume and C{sync}s before answering ``ok``;

 6. powers off when the ACPI power button is pressed (QMP ``system_powerdown``), after
    unmounting the volumes, so a clean stop leaves a clean file system.

With ``zwrm.selftest=poweroff`` on the command line it powers itself off right after step 3
(tests use it to see a guest-initiated power-off). With ``zwrm.selftest=panic-once`` its
kernel panics right after step 3 (``/proc/sysrq-trigger``) if the first volume has no file
``panicked``, which it writes first: a machine that fails once at boot and then boots.
With ``zwrm.selftest=fill`` it writes 40 MiB to the file ``fill`` of the first volume after
step 3 (``dd`` with ``fsync``) and then says ``zwrm: selftest: filled (<dd's exit
status>)`` (tests use it to meet a full disk on the host).

The line ``zwrm: ready`` on the console means the HTTP server is running.

Building is blocking file work (a few MB): call L{build} from a thread
(C{deferToThread}) in reactor code; tests call it before they start anything.
"""

import gzip
import hashlib
import io
import lzma
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass

from zwrm.errors import NotFound

#: Modules whose dependencies (in load order) go into the initramfs.
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "ext4", "button", "evdev")

#: The kernel command line the image wants; volumes are added as ``zwrm.vol=...``.
#: ``no_timer_check``: under TCG on a loaded host the kernel's early check that the timer
#: interrupt comes through the IO-APIC can fail, and the kernel then panics ("IO-APIC +
#: timer doesn't work!"; 1 of 32 boots of 16 guests at once on 2 cores, 0 of 48 with it,
#: 2026-12-06); cloud images boot with it for the same reason.
BASE_CMDLINE = "console=ttyS0 quiet panic=-1 no_timer_check"

READY_LINE = "zwrm: ready"

INIT = r"""#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
echo "zwrm: init starting"
for m in $(cat /etc/modules); do insmod "/lib/modules/$m" 2>/dev/null; done
FIRST=""
VOLS=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    zwrm.vol=*) VOLS=$(echo "${arg#zwrm.vol=}" | tr ',' ' ');;
  esac
done
finddev() {
  # A volume is named by its virtio serial (or, from older agents, by its device name).
  [ -b "/dev/$1" ] && { echo "/dev/$1"; return; }
  for s in /sys/block/vd*/serial; do
    [ -f "$s" ] && [ "$(cat "$s")" = "$1" ] && { d="${s%/serial}"; echo "/dev/${d##*/}"; return; }
  done
}
for v in $VOLS; do
  key="${v%%:*}"
  mnt="${v#*:}"
  n=0
  dev=$(finddev "$key")
  while [ -z "$dev" ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); dev=$(finddev "$key"); done
  [ -z "$dev" ] && dev="/dev/$key"
  mkdir -p "$mnt"
  if mount -t ext4 "$dev" "$mnt"; then
    echo "zwrm: mounted $dev at $mnt"
    echo "$mnt" >> /etc/mounts.zwrm
    [ -z "$FIRST" ] && FIRST="$mnt"
  else
    echo "zwrm: cannot mount $dev at $mnt"
  fi
done
[ -z "$FIRST" ] && FIRST=/tmp/novolume && mkdir -p "$FIRST"
echo "$FIRST" > /etc/volume
echo "boot $(cat /proc/uptime)" >> "$FIRST/boots.log"
sync
if grep -q "zwrm.selftest=fill" /proc/cmdline; then
  echo "zwrm: selftest: filling $FIRST"
  dd if=/dev/zero of="$FIRST/fill" bs=1M count=40 conv=fsync 2>/dev/null
  echo "zwrm: selftest: filled ($?)"
fi
if grep -q "zwrm.selftest=panic-once" /proc/cmdline && [ ! -f "$FIRST/panicked" ]; then
  echo "zwrm: selftest: panicking once"
  echo "$(cat /proc/uptime)" > "$FIRST/panicked"
  sync
  echo c > /proc/sysrq-trigger
fi
if grep -q "zwrm.selftest=poweroff" /proc/cmdline; then
  echo "zwrm: selftest: powering off"
  for m in $(cat /etc/mounts.zwrm 2>/dev/null); do umount "$m"; done
  poweroff -f
fi
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
powerbutton() {
  for d in /sys/class/input/event*; do
    if grep -q "Power Button" "$d/device/name" 2>/dev/null; then
      head -c 1 "/dev/input/${d##*/}" >/dev/null
      echo "zwrm: power button pressed, powering off"
      kill $(pidof httpd) 2>/dev/null
      sync
      for m in $(cat /etc/mounts.zwrm 2>/dev/null); do umount "$m"; done
      sync
      poweroff -f
    fi
  done
}
powerbutton &
busybox httpd -p 8080 -h /www
echo "zwrm: ready"
while true; do sleep 3600; done
"""

CGI_INDEX = r"""#!/bin/sh
V=$(cat /etc/volume)
echo "Content-Type: text/html"
echo ""
echo "<html><body><h1>zwrm test image</h1>"
echo "<p>boots: $(wc -l < "$V/boots.log")</p>"
if [ -f "$V/index.txt" ]; then
  echo "<pre>"; cat "$V/index.txt"; echo "</pre>"
else
  echo "<p>no index.txt on the volume</p>"
fi
echo "</body></html>"
"""

CGI_READ = r"""#!/bin/sh
V=$(cat /etc/volume)
NAME="$QUERY_STRING"
case "$NAME" in */*|""|.*) echo "Status: 400 Bad Request"; echo ""; echo "bad name"; exit 0;; esac
if [ -f "$V/$NAME" ]; then
  echo "Content-Type: application/octet-stream"
  echo ""
  cat "$V/$NAME"
else
  echo "Status: 404 Not Found"
  echo ""
  echo "no such file"
fi
"""

CGI_WRITE = r"""#!/bin/sh
V=$(cat /etc/volume)
NAME="$QUERY_STRING"
case "$NAME" in */*|""|.*) echo "Status: 400 Bad Request"; echo ""; echo "bad name"; exit 0;; esac
# Hold the volume (a busy file system cannot be unmounted) and check that it is still
# mounted: during a power-down a request can slip in after the volume was unmounted, and a
# write that went to the initramfs must not be acknowledged.
if ! cd "$V" 2>/dev/null || { [ "$V" != /tmp/novolume ] && ! grep -q " $V ext4 " /proc/mounts; }; then
  echo "Status: 503 Service Unavailable"; echo ""; echo "volume not mounted"; exit 0
fi
head -c "${CONTENT_LENGTH:-0}" > "$NAME.tmp" && mv "$NAME.tmp" "$NAME" && sync
echo "Content-Type: text/plain"
echo ""
echo "ok"
"""


@dataclass(frozen=True)
class TestImage:
    """
    A built test image.

    @ivar kernel: path of the kernel.
    @ivar initrd: path of the initramfs.
    @ivar cmdline: the base kernel command line.
    """

    __test__ = False  # not a pytest test class

    kernel: str
    initrd: str
    cmdline: str = BASE_CMDLINE

    def spec(self):
        """The image part of a machine spec: C{{kernel, initrd, disk, cmdline}}."""
        return {"kernel": self.kernel, "initrd": self.initrd, "disk": None, "cmdline": self.cmdline}


def volume_cmdline(volumes):
    """
    The kernel command line argument that tells the image where to mount its volumes.

    @param volumes: C{[(device, mount)]}, e.g. C{[("vda", "/data")]}.
    """
    if not volumes:
        return ""
    return "zwrm.vol=" + ",".join(f"{dev}:{mnt}" for dev, mnt in volumes)


def _kernel_version():
    mods = "/lib/modules"
    running = platform.release()
    if os.path.exists(f"/boot/vmlinuz-{running}") and os.path.isdir(f"{mods}/{running}"):
        return running
    if os.path.isdir(mods):
        for kver in sorted(os.listdir(mods), reverse=True):
            if os.path.exists(f"/boot/vmlinuz-{kver}"):
                return kver
    raise NotFound("no kernel found: install linux-image-amd64 (/boot/vmlinuz-* and /lib/modules)")


def _module_paths(kver):
    """The module files for L{MODULES} with their dependencies, in load order, relative."""
    base = f"/lib/modules/{kver}/"
    order = []
    for name in MODULES:
        try:
            out = subprocess.run(
                ["/sbin/modprobe", "-S", kver, "--show-depends", name],
                capture_output=True, text=True, check=True, timeout=30,
            ).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise NotFound(f"cannot list the dependencies of kernel module {name}: {e}") from None
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod" and parts[1].startswith(base):
                rel = parts[1][len(base):]
                if rel not in order:
                    order.append(rel)
    return order


class _Cpio:
    """A writer of ``newc`` cpio archives, so the initramfs needs neither root nor cpio."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}"
            for v in (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                      len(name_b), 0)
        )
        self.ino += 1
        self.buf.write(hdr.encode() + name_b)
        self.buf.write(b"\0" * (-(110 + len(name_b)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name):
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name, data, mode=0o644):
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name, target):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name, major, minor):
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self):
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _busybox():
    for p in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(p):
            return p
    raise NotFound("busybox not found: install busybox-static")


def _initramfs(kver):
    cp = _Cpio()
    for d in ("bin", "sbin", "dev", "proc", "sys", "etc", "tmp", "www", "www/cgi-bin", "lib",
              "lib/modules", "mnt"):
        cp.dir(d)
    cp.chardev("dev/console", 5, 1)
    cp.chardev("dev/null", 1, 3)
    with open(_busybox(), "rb") as f:
        cp.file("bin/busybox", f.read(), 0o755)
    applets = subprocess.run(
        [_busybox(), "--list"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    for a in applets:
        if a != "busybox":
            cp.symlink(f"bin/{a}", "busybox")
    mods = []
    made = set()
    for rel in _module_paths(kver):
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "lib/modules/" + "/".join(parts[:i])
            if d not in made:
                cp.dir(d)
                made.add(d)
        with open(f"/lib/modules/{kver}/{rel}", "rb") as f:
            data = f.read()
        # Newer Debian kernels compress modules; busybox insmod wants them plain.
        for ext, unpack in ((".xz", lzma.decompress), (".zst", None), (".gz", gzip.decompress)):
            if rel.endswith(ext):
                if unpack is None:
                    raise NotFound(f"kernel module {rel} is zstd-compressed, which this builder "
                                   "cannot unpack")
                data, rel = unpack(data), rel[: -len(ext)]
        cp.file(f"lib/modules/{rel}", data)
        mods.append(rel)
    cp.file("etc/modules", ("\n".join(mods) + "\n").encode())
    cp.file("init", INIT.encode(), 0o755)
    cp.file("www/cgi-bin/index.cgi", CGI_INDEX.encode(), 0o755)
    cp.file("www/cgi-bin/read", CGI_READ.encode(), 0o755)
    cp.file("www/cgi-bin/write", CGI_WRITE.encode(), 0o755)
    return cp.finish()


def _source_hash():
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def default_cache_dir():
    """C{$ZWRM_IMAGE_CACHE}, else C{~/.cache/zwrm/test-image}."""
    return os.environ.get("ZWRM_IMAGE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "zwrm", "test-image"
    )


def build(cache_dir=None):
    """
    Build the test image into C{cache_dir} (or reuse the one built there already).

    Blocking: run it in a thread from reactor code.

    @return: a L{TestImage}.
    @raise NotFound: if the kernel, its modules or busybox are not installed.
    """
    cache_dir = cache_dir or default_cache_dir()
    kver = _kernel_version()
    key = f"{kver}-{_source_hash()}"
    out = os.path.join(cache_dir, key)
    kernel = os.path.join(out, "vmlinuz")
    initrd = os.path.join(out, "initrd.gz")
    if os.path.exists(kernel) and os.path.exists(initrd):
        return TestImage(kernel, initrd)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=cache_dir)
    os.chmod(tmp, 0o755)
    try:
        shutil.copyfile(f"/boot/vmlinuz-{kver}", os.path.join(tmp, "vmlinuz"))
        with gzip.open(os.path.join(tmp, "initrd.gz"), "wb", compresslevel=1) as f:
            f.write(_initramfs(kver))
        try:
            os.rename(tmp, out)
        except OSError:
            # Another builder got there first; theirs is as good as ours.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TestImage(kernel, initrd)


def kernel_bytes(body=b"K" * 1000):
    """
    Bytes that pass for an x86 kernel where no guest boots from them (registry, cache and
    CLI tests): the Linux boot protocol's header (one setup sector, C{HdrS}, protocol 2.15),
    then C{body}. The registry and C{zwrm images push} refuse a kernel without it
    (L{zwrm.drivers.kernelimage}).
    """
    head = bytearray(1024)
    head[0x1F1] = 1  # setup_sects
    head[0x1FE:0x200] = b"\x55\xaa"
    head[0x202:0x206] = b"HdrS"
    head[0x206:0x208] = (0x020F).to_bytes(2, "little")
    return bytes(head) + body


if __name__ == "__main__":
    img = build()
    print(f"kernel {img.kernel}\ninitrd {img.initrd}\ncmdline {img.cmdline}")

