"""
A real Debian 12 cloud image for the tests and the boot benchmark, built with mmdebstrap from
Debian's packages and cached by the hash of its recipe.

What is in it: systemd, cloud-init (NoCloud only), openssh-server, ifupdown with DHCP, the
Debian kernel and its initramfs, and a small HTTP service on port 8080 (C{zwrm-web}, a
Python script run by systemd) that answers::

    GET  /              "zwrm-web ok <hostname>"          (the health check)
    GET  /keys          the default user's authorized_keys (what cloud-init installed)
    GET  /mounts        /proc/mounts
    GET  /env           /etc/zwrm/env
    GET  /data/NAME     the file NAME under /data (404 if absent)
    POST /data/NAME     writes the body to /data/NAME and fsyncs it before answering "ok"

The image is kernel + initrd + disk: the disk is an ext4 file system without a partition
table (C{root=/dev/vda}), as qcow2; the kernel and initrd are taken out of it. The console
is C{ttyS0}, with a getty (the login prompt C{zwrm-debian login:}).

The build needs root (mmdebstrap's root mode, as CI's setup runs it) or working user
namespaces (its unshare mode), network access to deb.debian.org, and a few minutes; its result
lives in C{<cache>/<hash>/} (default C{/var/cache/zwrm-ci/images}), so it is built once per
recipe. Call L{build} from a thread or a setup script, never from the reactor thread::

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
DISK_SIZE = "2G"
SERVICE_PORT = 8080
LOGIN_PROMPT = "login:"
CMDLINE = "console=ttyS0 root=/dev/vda rw net.ifnames=0 quiet systemd.show_status=0"

PACKAGES = [
    "systemd-sysv", "udev", "dbus", "linux-image-amd64", "initramfs-tools", "cloud-init",
    "openssh-server", "ifupdown", "isc-dhcp-client", "python3", "netbase", "e2fsprogs",
    "iproute2", "ca-certificates", "procps",
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
    'chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer '
    'fstrim.timer man-db.timer systemd-networkd-wait-online.service',
    'printf "/dev/vda / ext4 defaults,discard 0 1\\n" > "$1/etc/fstab"',
    'rm -rf "$1/var/cache/apt/archives/"*.deb "$1/var/lib/apt/lists/"*',
]


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
            "size": DISK_SIZE, "cmdline": CMDLINE, "version": 1}


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
        raw = os.path.join(work, "root.raw")
        _run(["mkfs.ext4", "-q", "-L", "root", "-d", tree, raw, DISK_SIZE], log)
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
        os.rename(out, final)
        return DebianImage(**meta)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(argv, log):
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if log is not None:
        log.write(proc.stdout[-4000:])
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stdout[-2000:]}")


if __name__ == "__main__":
    img = build(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CACHE)
    print(json.dumps(img.__dict__, indent=1))
