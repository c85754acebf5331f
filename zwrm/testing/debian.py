"""
A real Debian 12 cloud image for the tests and the boot benchmark, built with mmdebstrap from
Debian's packages and cached by the hash of its recipe.

What is in it: systemd, cloud-init (NoCloud only), openssh-server, ifupdown with DHCP, Debian's
cloud kernel (C{linux-image-cloud-amd64}: virtio, no hardware drivers) and its initramfs, and a
small HTTP service on port 8080 (C{zwrm-web}, a Python script run by systemd) that answers::

    GET  /              "zwrm-web ok <hostname>"          (the health check)
    GET  /keys          the default user's authorized_keys (what cloud-init installed)
    GET  /mounts        /proc/mounts
    GET  /env           /etc/zwrm/env
    GET  /data/NAME     the file NAME under /data (404 if absent)
    POST /data/NAME     writes the body to /data/NAME and fsyncs it before answering "ok"

Nothing else: no documentation, manual pages, locales, apt lists or caches (dpkg's
C{path-exclude}, so packages installed later in the guest leave them out too), no perl, no
kernel modules for hardware a QEMU guest has not (L{MODULES_PRUNED}), no kernel in the root
file system: about 300 MiB of qcow2 (the first recipe, with all of that, was 828 MiB).

The disk boots in both of zwrm's forms. It has a GPT with two partitions: an EFI system
partition (FAT, 128 MiB: systemd-boot as C{EFI/BOOT/BOOTX64.EFI}, the kernel, the initrd and a
loader entry with L{CMDLINE}) and the ext4 root (C{/dev/vda2}, label C{root}). So it is

 - kernel + initrd + disk: push the kernel, the initrd and the disk with C{--cmdline}
   L{CMDLINE} (which names C{root=/dev/vda2}); or
 - a self-booting UEFI disk: push the disk alone with C{--firmware uefi} (OVMF runs
   systemd-boot from the ESP, which boots the same kernel with the same command line).

The disk is qcow2 (sparse: only written clusters). The console is C{ttyS0}, with a getty (the
login prompt C{zwrm-debian login:}).

The build needs root (mmdebstrap's root mode, as CI's setup runs it) or working user
namespaces (its unshare mode), network access to deb.debian.org, C{sfdisk} (fdisk),
C{mkfs.vfat} (dosfstools), C{mcopy} (mtools) and a few minutes; its result lives in
C{<cache>/<hash>/} (default C{/var/cache/zwrm-ci/images}), so it is built once per recipe
(a new build removes the images of earlier recipes).
Call L{build} from a thread or a setup script, never from the reactor thread::

    python -m zwrm.testing.debian [CACHE_DIR]
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

DEFAULT_CACHE = "/var/cache/zwrm-ci/images"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
DISK_SIZE = 2 << 30
#: The EFI system partition: from 1 MiB, 128 MiB; the root partition fills the rest but the
#: last MiB (the GPT's backup).
ESP_START, ESP_SIZE = 1 << 20, 128 << 20
ROOT_START = ESP_START + ESP_SIZE
ROOT_SIZE = DISK_SIZE - ROOT_START - (1 << 20)
SERVICE_PORT = 8080
LOGIN_PROMPT = "login:"
CMDLINE = "console=ttyS0 root=/dev/vda2 rw net.ifnames=0 quiet systemd.show_status=0"
#: systemd-boot, from the image's own systemd-boot-efi package.
SYSTEMD_BOOT = "usr/lib/systemd/boot/efi/systemd-bootx64.efi"

PACKAGES = [
    "systemd-sysv", "udev", "dbus", "linux-image-cloud-amd64", "initramfs-tools", "cloud-init",
    "openssh-server", "ifupdown", "isc-dhcp-client", "python3", "netbase", "e2fsprogs",
    "iproute2", "ca-certificates", "procps", "systemd-boot-efi",
    # init-system-helpers needs "usrmerge | usr-is-merged" (usrmerge brings perl, 50 MB).
    "usr-is-merged",
]

#: What dpkg leaves out (here and in packages the guest installs later).
PATH_EXCLUDE = [
    "/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
    "/usr/share/lintian/*", "/usr/share/linda/*", "/usr/share/bug/*", "/usr/share/zsh/*",
    "/usr/share/bash-completion/*", "/usr/share/common-licenses/*",
    # The locales' sources (16 MB): the guest runs in C.UTF-8 (glibc's own; see CLOUD_CFG).
    "/usr/share/i18n/*",
]

#: Kernel modules for hardware a QEMU guest with virtio disks and NIC never has, and file
#: systems it never mounts (under /usr/lib/modules/<version>/kernel/).
MODULES_PRUNED = [
    "drivers/infiniband", "drivers/md", "drivers/target", "drivers/scsi", "drivers/comedi",
    "drivers/nvme", "drivers/ata", "drivers/gpu", "drivers/media", "drivers/usb",
    "drivers/hid", "drivers/isdn", "drivers/staging", "drivers/net/ethernet",
    "drivers/net/wireless", "drivers/net/can", "fs/btrfs", "fs/xfs", "fs/nfs", "fs/nfsd",
    "fs/smb", "fs/ceph", "fs/ocfs2", "fs/gfs2", "fs/nilfs2", "fs/jfs", "fs/f2fs",
    "fs/reiserfs", "fs/udf", "fs/ntfs3", "fs/dlm", "fs/afs", "fs/orangefs", "fs/coda",
    "net/sunrpc", "net/ceph", "net/sctp", "net/rds",
]

WEB = r'''#!/usr/bin/python3
import http.server, os, socket

DATA = "/data"

class H(http.server.BaseHTTPRequestHandler):
    def reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def read(self, path):
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError:
            return None

    def do_GET(self):
        if self.path == "/":
            return self.reply(200, b"zwrm-web ok " + socket.gethostname().encode() + b"\n")
        files = {"/keys": "/home/debian/.ssh/authorized_keys", "/mounts": "/proc/mounts",
                 "/env": "/etc/zwrm/env"}
        if self.path in files:
            body = self.read(files[self.path])
        elif self.path.startswith("/data/") and "/" not in self.path[6:]:
            body = self.read(os.path.join(DATA, self.path[6:]))
        else:
            body = None
        self.reply(200, body) if body is not None else self.reply(404, b"not found\n")

    def do_POST(self):
        name = self.path[6:]
        if not self.path.startswith("/data/") or not name or "/" in name:
            return self.reply(404, b"not found\n")
        if not os.path.ismount(DATA):
            return self.reply(503, b"no volume at /data\n")
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with open(os.path.join(DATA, name), "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(DATA, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        self.reply(200, b"ok\n")

    def log_message(self, *a):
        pass

http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
'''

UNIT = """[Unit]
Description=zwrm test web service
After=network.target

[Service]
ExecStart=/usr/local/bin/zwrm-web
Restart=always

[Install]
WantedBy=multi-user.target
"""

CLOUD_CFG = """datasource_list: [NoCloud, None]
datasource:
  NoCloud:
    fs_label: cidata
locale: C.UTF-8
"""

#: Shell run inside the new tree (mmdebstrap --customize-hook, "$1" is the tree).
CUSTOMIZE = [
    'echo zwrm-debian > "$1/etc/hostname"',
    'cp /dev/stdin "$1/usr/local/bin/zwrm-web" <<"ZWRMEOF"\n' + WEB + "ZWRMEOF",
    'chmod 755 "$1/usr/local/bin/zwrm-web"',
    'cat > "$1/etc/systemd/system/zwrm-web.service" <<"ZWRMEOF"\n' + UNIT + "ZWRMEOF",
    'chroot "$1" systemctl enable zwrm-web.service serial-getty@ttyS0.service',
    'cat > "$1/etc/cloud/cloud.cfg.d/90-zwrm.cfg" <<"ZWRMEOF"\n' + CLOUD_CFG + "ZWRMEOF",
    # Quicker boots under TCG: nothing that waits for or polls what a test VM has not.
    ('chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer '
     'fstrim.timer man-db.timer systemd-networkd-wait-online.service'),
    'printf "/dev/vda2 / ext4 defaults,discard 0 1\\n" > "$1/etc/fstab"',
    # apt took usrmerge for init-system-helpers while usr-is-merged was asked for too: off
    # with it and with what only it needed (perl; autoremove keeps it: perl-modules
    # recommends it).
    ('chroot "$1" env DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq usrmerge perl '
     'perl-modules-5.36 libperl5.36 libfile-find-rule-perl libnumber-compare-perl '
     'libtext-glob-perl libgdbm-compat4'),
    'test ! -d "$1/usr/share/perl" && test -x "$1/usr/bin/cloud-init"',
    # Caches, lists, logs and backups nothing in a test VM reads.
    ('rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/var/cache/debconf/*-old '
     '"$1"/var/lib/dpkg/*-old "$1"/var/log/*.log "$1"/var/log/apt/* "$1"/var/cache/man '
     '"$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/locale/*'),
    ('for d in "$1"/usr/lib/modules/*; do (cd "$d/kernel" && rm -rf '
     + " ".join(MODULES_PRUNED) + ') && chroot "$1" depmod -a "${d##*/}"; done'),
]


#: systemd-boot's settings and the one boot entry, on the ESP.
LOADER = {
    "loader/loader.conf": "default debian.conf\ntimeout 0\nconsole-mode keep\n",
    "loader/entries/debian.conf": ("title Debian 12 (zwrm test image)\nlinux /vmlinuz\n"
                                   f"initrd /initrd.img\noptions {CMDLINE}\n"),
}


@dataclass
class DebianImage:
    kernel: str
    initrd: str
    disk: str
    cmdline: str
    service_port: int
    recipe_hash: str
    directory: str


def recipe():
    """The recipe (what determines the image); its hash names the cache entry."""
    return {"suite": SUITE, "mirror": MIRROR, "packages": PACKAGES, "customize": CUSTOMIZE,
            "exclude": PATH_EXCLUDE, "size": DISK_SIZE, "esp": [ESP_START, ESP_SIZE],
            "cmdline": CMDLINE, "loader": LOADER, "version": 3}


def recipe_hash():
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:16]


def cached(cache_dir=DEFAULT_CACHE):
    """The built image if it is in the cache, else L{None}."""
    d = os.path.join(cache_dir, recipe_hash())
    try:
        with open(os.path.join(d, "image.json")) as f:
            return DebianImage(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def build(cache_dir=DEFAULT_CACHE, log=sys.stderr):
    """
    Build the image (or take it from the cache). Blocking: minutes the first time.

    @return: a L{DebianImage}.
    @raise RuntimeError: if mmdebstrap or mkfs fail (their output is in the message).
    """
    image = cached(cache_dir)
    if image is not None:
        return image
    h = recipe_hash()
    final = os.path.join(cache_dir, h)
    os.makedirs(cache_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{h}-", dir=cache_dir)
    try:
        tree = os.path.join(work, "tree")
        argv = ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
                "--aptopt=Acquire::Retries \"3\""]
        argv += ["--dpkgopt=path-exclude=" + p for p in PATH_EXCLUDE]
        for hook in CUSTOMIZE:
            argv.append("--customize-hook=" + hook)
        argv += [SUITE, tree, MIRROR]
        _run(argv, log)
        boot = os.path.join(tree, "boot")
        kernels = sorted(n for n in os.listdir(boot) if n.startswith("vmlinuz-"))
        initrds = sorted(n for n in os.listdir(boot) if n.startswith("initrd.img-"))
        if not kernels or not initrds:
            raise RuntimeError(f"no kernel or initrd in {boot}: {os.listdir(boot)}")
        out = os.path.join(work, "out")
        os.makedirs(out)
        kernel, initrd = os.path.join(out, "vmlinuz"), os.path.join(out, "initrd.img")
        shutil.copyfile(os.path.join(boot, kernels[-1]), kernel)
        shutil.copyfile(os.path.join(boot, initrds[-1]), initrd)
        # The kernel lives in the image's layers and on the ESP, not in the root file system.
        for name in kernels + initrds:
            os.unlink(os.path.join(boot, name))
        raw = os.path.join(work, "disk.raw")
        _partitioned_disk(raw, tree, kernel, initrd, work, log)
        disk = os.path.join(out, "disk.qcow2")
        _run(["qemu-img", "convert", "-O", "qcow2", raw, disk], log)
        os.unlink(raw)
        shutil.rmtree(tree)
        meta = {"kernel": os.path.join(final, "vmlinuz"),
                "initrd": os.path.join(final, "initrd.img"),
                "disk": os.path.join(final, "disk.qcow2"), "cmdline": CMDLINE,
                "service_port": SERVICE_PORT, "recipe_hash": h, "directory": final}
        with open(os.path.join(out, "image.json"), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(out, final)
        except OSError:
            # Built at the same time by another process: take its result.
            image = cached(cache_dir)
            if image is None:
                raise
            return image
        _prune(cache_dir, keep=h)
        return DebianImage(**meta)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prune(cache_dir, keep):
    """Remove the images of earlier recipes (entries named by another recipe hash)."""
    for name in os.listdir(cache_dir):
        if name != keep and len(name) == 16 and all(c in "0123456789abcdef" for c in name):
            shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)


def _partitioned_disk(raw, tree, kernel, initrd, work, log):
    """
    A sparse raw GPT disk without root or loop devices: sfdisk writes the table into the file,
    mkfs.vfat and mtools make and fill the ESP (copied in at its offset), mkfs.ext4 -d makes
    the root at its offset.
    """
    with open(raw, "wb") as f:
        f.truncate(DISK_SIZE)
    table = ("label: gpt\n"
             f"start={ESP_START // 512}, size={ESP_SIZE // 512}, "
             "type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp\n"
             f"start={ROOT_START // 512}, size={ROOT_SIZE // 512}, "
             "type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n")
    _run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", raw], log, input=table)
    esp = os.path.join(work, "esp.img")
    with open(esp, "wb") as f:
        f.truncate(ESP_SIZE)
    _run(["mkfs.vfat", "-F", "32", "-n", "ESP", "-h", str(ESP_START // 512), esp], log)
    _run(["mmd", "-i", esp, "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"], log)
    _run(["mcopy", "-i", esp, os.path.join(tree, SYSTEMD_BOOT), "::/EFI/BOOT/BOOTX64.EFI"],
         log)
    _run(["mcopy", "-i", esp, kernel, "::/vmlinuz"], log)
    _run(["mcopy", "-i", esp, initrd, "::/initrd.img"], log)
    for name, text in LOADER.items():
        path = os.path.join(work, os.path.basename(name))
        with open(path, "w") as f:
            f.write(text)
        _run(["mcopy", "-i", esp, path, "::/" + name], log)
    _run(["dd", f"if={esp}", f"of={raw}", "bs=1M", f"seek={ESP_START >> 20}",
          "conv=notrunc,sparse", "status=none"], log)
    os.unlink(esp)
    _run(["mkfs.ext4", "-q", "-F", "-L", "root", "-E", f"offset={ROOT_START}", "-d", tree, raw,
          f"{ROOT_SIZE // 1024}k"], log)
    if os.path.getsize(raw) != DISK_SIZE:
        raise RuntimeError(f"mkfs.ext4 changed the disk's size to {os.path.getsize(raw)}")


def _run(argv, log, input=None):
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          input=input, check=False)
    if log is not None:
        log.write(proc.stdout[-4000:])
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stdout[-2000:]}")


if __name__ == "__main__":
    img = build(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CACHE)
    print(json.dumps(img.__dict__, indent=1))
