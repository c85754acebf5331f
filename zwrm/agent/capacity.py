"""
What a host offers: vCPUs, memory and disk, found on the machine and overridable.
"""

import os


def meminfo_mb(path="/proc/meminfo"):
    """C{MemTotal} from C{/proc/meminfo}, in MiB (0 if unreadable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def disk_mb(path):
    """The size of the filesystem holding C{path}, in MiB (0 if unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_blocks * st.f_frsize // (1024 * 1024)


def free_disk_mb(path):
    """
    The MiB an unprivileged process may still write on C{path}'s filesystem (C{statvfs}'s
    C{f_bavail}), or L{None} if unknown.
    """
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize // (1024 * 1024)


def detect(data_dir, vcpus=None, memory_mb=None, disk=None):
    """
    The host's capacity: found on the machine unless overridden.

    @param data_dir: the agent's data directory (its filesystem is the disk counted).
    @param vcpus: override for the vCPU count.
    @param memory_mb: override for the memory, MiB.
    @param disk: override for the disk, MiB.
    @return: C{{"vcpus", "memory_mb", "disk_mb"}}, integers.
    """
    return {
        "vcpus": int(vcpus) if vcpus is not None else (os.cpu_count() or 1),
        "memory_mb": int(memory_mb) if memory_mb is not None else meminfo_mb(),
        "disk_mb": int(disk) if disk is not None else disk_mb(data_dir),
    }
