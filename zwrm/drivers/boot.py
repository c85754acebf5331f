"""
Which boot of its host a machine ran in.  A machine recorded running whose process is gone
when the agent starts ended with its host if the host has booted since (Linux's boot id
changed: a reboot or a power cut), else while the agent was not running (its QEMU crashed
or was killed).  Both drivers say which in the machine's reason, for the operator.
"""

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"

ENDED_WITH_THE_HOST = "the host restarted while it ran (a reboot or a power cut ended it)"
ENDED_WITHOUT_THE_AGENT = "it ended while the agent was not running"


def current_boot_id(path=BOOT_ID_PATH):
    """This boot's id (a UUID the kernel makes at each boot), or L{None} if it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def why_it_ended(recorded, current):
    """
    The reason of a machine recorded running in boot C{recorded} (L{None}: not recorded,
    as by an older agent) and found ended in boot C{current}.
    """
    if recorded and current and recorded != current:
        return ENDED_WITH_THE_HOST
    return ENDED_WITHOUT_THE_AGENT
