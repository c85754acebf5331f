`twistd -n zwrm-control` and `twistd -n zwrm-agent`: agents join with a token and then use their
own credential, report capacity, heartbeat with jitter and reconnect forever; the control plane
marks hosts offline after `offline_after` without a heartbeat (their machines failed, their
executor deregistered) and takes them back when they return. `zwrm host list` and
`zwrm host status`.
