"""
The test image (L{zwrm.testing.image}) with a network-aware C{/init}, for the network tests.

The initramfs is the test image's, followed by a second cpio archive whose C{/init}
replaces the image's (the kernel unpacks concatenated archives in order; later files win).
The replacement is the image's own init with its fixed user-mode address replaced by:

 - C{ip=<address>::<gateway>:<netmask>:<hostname>:eth0:off:<dns>} on the kernel command
   line (the kernel's own syntax, which zwrm's agent passes; Debian's kernel has no
   C{CONFIG_IP_PNP}, so init applies it): the address, default route and resolver;
   without it, user-mode networking's 10.0.2.15/24 via 10.0.2.2 as before; and
   C{zwrm.mtu=N}, the NIC's MTU;
 - C{zwrm.run=<base64 of a shell script>}: run once the network is up, in the background,
   every output line prefixed with C{zwrm-run: } on the console.

L{probe} makes such a script's argument.
"""

import base64
import gzip
import hashlib
import os
import tempfile

from zwrm.testing import image

_OLD = """ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
"""

_NEW = r"""ip link set lo up
ip link set eth0 up
NET=""
RUN=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    ip=*) NET="${arg#ip=}";;
    zwrm.run=*) RUN="${arg#zwrm.run=}";;
    zwrm.mtu=*) ip link set eth0 mtu "${arg#zwrm.mtu=}";;
  esac
done
if [ -n "$NET" ]; then
  ADDR=$(echo "$NET" | cut -d: -f1)
  GW=$(echo "$NET" | cut -d: -f3)
  MASK=$(echo "$NET" | cut -d: -f4)
  HN=$(echo "$NET" | cut -d: -f5)
  DNS=$(echo "$NET" | cut -d: -f8)
  eval $(ipcalc -p "$ADDR" "$MASK")
  ip addr add "$ADDR/$PREFIX" dev eth0
  [ -n "$GW" ] && ip route add default via "$GW"
  [ -n "$DNS" ] && echo "nameserver $DNS" > /etc/resolv.conf
  [ -n "$HN" ] && hostname "$HN"
  echo "zwrm: address $ADDR/$PREFIX gateway $GW dns $DNS"
else
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
fi
if [ -n "$RUN" ]; then
  echo "$RUN" | base64 -d > /tmp/run.sh
  (sh /tmp/run.sh 2>&1 | sed 's/^/zwrm-run: /') &
fi
"""


def script_arg(script):
    """The C{zwrm.run=...} kernel command line argument that runs C{script} at boot."""
    return "zwrm.run=" + base64.b64encode(script.encode()).decode()


def build(cache_dir=None):
    """The network-aware test image (a L{zwrm.testing.image.TestImage}); blocking."""
    base = image.build(cache_dir)
    if _OLD not in image.INIT:
        raise AssertionError("zwrm.testing.image's /init changed its networking lines; "
                             "update tests/network/guest.py")
    init = image.INIT.replace(_OLD, _NEW)
    key = hashlib.sha256(init.encode() + base.initrd.encode()).hexdigest()[:16]
    out = os.path.join(os.path.dirname(base.initrd), f"initrd-net-{key}.gz")
    if not os.path.exists(out):
        cp = image._Cpio()
        cp.file("init", init.encode(), 0o755)
        with open(base.initrd, "rb") as f:
            data = f.read()
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.write(gzip.compress(cp.finish(), compresslevel=1))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    return image.TestImage(base.kernel, out)


def probe_script(targets, tries=1, delay=1):
    """
    A guest script that tries a TCP connection to each C{(label, host, port)} and prints
    C{probe LABEL reached} or C{probe LABEL blocked}, then C{probe done}.  Each target is
    tried up to C{tries} times (C{delay} seconds apart) until it is reached.  Compact: the
    kernel command line holds at most 2048 bytes.
    """
    items = " ".join(f"{label}:{host}:{port}" for label, host, port in targets)
    return (f"sleep {delay}\n"
            f"for t in {items}; do l=${{t%%:*}}; r=${{t#*:}}; h=${{r%:*}}; p=${{r#*:}}; "
            f"x=blocked; n=0; while [ $n -lt {tries} ]; do "
            f"if echo | nc -w 3 $h $p >/dev/null 2>&1; then x=reached; break; fi; "
            f"n=$((n+1)); sleep {delay}; done; echo \"probe $l $x\"; done\n"
            "echo \"probe done\"\n")


def probe_results(console):
    """C{{label: "reached"|"blocked"}} from a guest console."""
    out = {}
    for line in console.splitlines():
        parts = line.strip().split()
        if len(parts) == 4 and parts[:2] == ["zwrm-run:", "probe"]:
            out[parts[2]] = parts[3]
    return out
