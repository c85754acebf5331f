"""
The open-files limit of C{zwrm-control} and C{zwrm-agent}.

Each agent's session is a socket of the control plane, and each client connection of an
agent's ingress proxy is two of the agent's; the soft limit most processes start with
(1,024, systemd's default for services and the usual shell's) caps a control plane near a
thousand hosts, after which Twisted's accept loop meets C{EMFILE} and closes what it accepts.
Like Go's runtime and nginx's C{worker_rlimit_nofile}, the daemons raise their soft limit to
the hard one at start (the hard limit is the operator's: the packaged units set
C{LimitNOFILE=}).  Processes they start (QEMU) inherit it.
"""

import resource


def raise_open_files(log=None):
    """
    Raise this process's soft C{RLIMIT_NOFILE} to its hard limit.

    @return: the (soft limit before, soft limit after) pair.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            if log is not None:
                log.warn("open files: the limit stays {soft} ({e})", soft=soft, e=e)
            return soft, soft
        if log is not None:
            log.info("open files: limit raised from {soft} to {target}", soft=soft, target=target)
        return soft, target
    return soft, soft
