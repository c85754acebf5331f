"""
Choosing QEMU's accelerator: C{kvm} where it really works, else C{tcg}.

C{/dev/kvm} opening is not proof that KVM works: on a host whose CPU does not expose
virtualization to it (a VM without nested virtualization) a KVM guest can hang. So C{auto}
checks three things, and any failure means TCG, with a log line saying which:

 1. C{/dev/kvm} opens for reading and writing;
 2. the CPU flags in C{/proc/cpuinfo} include C{vmx} or C{svm};
 3. a probe guest (a 512-byte boot sector that writes to QEMU's C{isa-debug-exit} port)
    really runs under C{-accel kvm} and exits with the expected code within a deadline.

The result is cached per QEMU binary for the life of the process.
"""

import os
import tempfile

from twisted.logger import Logger

from zwrm.drivers import process
from zwrm.errors import InvalidArgument, Unavailable

log = Logger()

ACCELS = ("auto", "kvm", "tcg")

# mov al, 0x2a; out 0xf4, al; hlt -> QEMU exits with (0x2a << 1) | 1 = 85.
_BOOT_SECTOR = bytes([0xB0, 0x2A, 0xE6, 0xF4, 0xF4])
_PROBE_EXIT = 85

_cache = {}


def _kvm_preconditions(dev="/dev/kvm", cpuinfo="/proc/cpuinfo"):
    """@return: C{None} if KVM may work, else the reason it cannot (a str)."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{dev} cannot be opened ({e.strerror})"
    os.close(fd)
    try:
        with open(cpuinfo) as f:
            flags = set()
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
    except OSError as e:
        return f"{cpuinfo} cannot be read ({e.strerror})"
    if not flags & {"vmx", "svm"}:
        return "the CPU does not expose hardware virtualization (no vmx or svm flag)"
    return None


async def probe_kvm(reactor, qemu_binary, timeout=10.0):
    """
    @return: C{None} if a probe guest runs under KVM within C{timeout} seconds, else the reason.
    """
    reason = _kvm_preconditions()
    if reason:
        return reason
    return await probe_guest(reactor, qemu_binary, "kvm", timeout)


async def probe_guest(reactor, qemu_binary, accel, timeout=10.0):
    """
    Run the probe guest under C{-accel accel}.

    @return: C{None} if it ran and exited as expected within C{timeout} seconds, else why not.
    """
    with tempfile.TemporaryDirectory(prefix="zwrm-accel-probe-") as tmp:
        img = os.path.join(tmp, "probe.img")
        with open(img, "wb") as f:
            f.write(_BOOT_SECTOR + bytes(510 - len(_BOOT_SECTOR)) + b"\x55\xaa")
        try:
            result = await process.run(
                reactor,
                [qemu_binary, "-accel", accel, "-nodefaults", "-no-user-config", "-display",
                 "none", "-no-reboot", "-m", "16", "-device",
                 "isa-debug-exit,iobase=0xf4,iosize=0x04", "-drive",
                 f"file={img},format=raw,if=ide"],
                timeout=timeout,
            )
        except OSError as e:
            return f"{qemu_binary} cannot run ({e})"
    if result.timed_out:
        return f"a probe guest under {accel} did not finish within {timeout} s"
    if result.code != _PROBE_EXIT:
        return f"a probe guest under {accel} failed: {result.last_line() or result}"
    return None


async def choose(reactor, requested, qemu_binary, timeout=10.0):
    """
    The accelerator to use.

    @param requested: C{"auto"}, C{"kvm"} or C{"tcg"}.
    @return: C{"kvm"} or C{"tcg"}.
    @raise InvalidArgument: for another C{requested}.
    @raise Unavailable: if C{"kvm"} was requested and does not work (the message says why).
    """
    if requested not in ACCELS:
        raise InvalidArgument(f"accel must be one of {', '.join(ACCELS)}, not {requested!r}")
    if requested == "tcg":
        return "tcg"
    if qemu_binary not in _cache:
        _cache[qemu_binary] = await probe_kvm(reactor, qemu_binary, timeout)
    reason = _cache[qemu_binary]
    if reason is None:
        return "kvm"
    if requested == "kvm":
        raise Unavailable(f"accel = \"kvm\" is configured but KVM does not work here: {reason}")
    log.info("KVM is not usable ({reason}); using TCG (software emulation, slower)", reason=reason)
    return "tcg"
