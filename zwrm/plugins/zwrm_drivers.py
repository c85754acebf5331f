"""
The built-in hypervisor drivers, as plugins.

Each object here provides C{IPlugin} and L{zwrm.interfaces.IHypervisorDriverPlugin}: a
factory with a C{name} and C{create(reactor, config)}. The agent finds one with
C{zwrm.plugins.find(IHypervisorDriverPlugin, name, dirs, kind="hypervisor driver")}.
The driver module is imported only when a driver is created.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from zwrm.errors import InvalidArgument
from zwrm.interfaces import IHypervisorDriverPlugin


@implementer(IPlugin, IHypervisorDriverPlugin)
class QemuPlugin:
    """
    The C{qemu} driver. Its C{config} keys: C{root} (required), C{accel} (C{auto}, C{kvm} or
    C{tcg}; default C{auto}), C{qemu_binary} (default C{qemu-system-x86_64}), C{stop_timeout}
    (seconds, default 30), C{probe_timeout} (seconds the KVM probe may take, default 10),
    C{cpu_model} (the C{-cpu} model; default C{host} under KVM, C{qemu64} under TCG: set it
    to the same migratable model on every host for live migration), C{machine_type} (default
    L{zwrm.drivers.qemu.MACHINE_TYPE}).
    """

    name = "qemu"
    description = "QEMU virtual machines: KVM where it works, else TCG; controlled over QMP"

    KEYS = ("root", "accel", "qemu_binary", "stop_timeout", "probe_timeout", "cpu_model",
            "machine_type")

    def create(self, reactor, config):
        from zwrm.drivers.qemu import QemuDriver

        unknown = sorted(set(config) - set(self.KEYS))
        if unknown:
            raise InvalidArgument(
                f"unknown qemu driver setting(s): {', '.join(unknown)}; "
                f"known: {', '.join(self.KEYS)}"
            )
        if not config.get("root"):
            raise InvalidArgument("the qemu driver needs a root directory (config key 'root')")
        kwargs = {k: config[k] for k in self.KEYS[1:] if config.get(k) is not None}
        for k in ("stop_timeout", "probe_timeout"):
            if k in kwargs and (not isinstance(kwargs[k], int | float) or kwargs[k] <= 0):
                raise InvalidArgument(f"qemu driver setting {k} must be a positive number of seconds")
        for k in ("cpu_model", "machine_type"):
            if k in kwargs and (not isinstance(kwargs[k], str) or not kwargs[k]
                                or any(c in kwargs[k] for c in ", \t\n")):
                raise InvalidArgument(f"qemu driver setting {k} must be a QEMU name "
                                      f"(e.g. a CPU model or machine type), not {kwargs[k]!r}")
        return QemuDriver(reactor, config["root"], **kwargs)


qemu = QemuPlugin()
