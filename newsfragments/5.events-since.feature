`zwrm events --since 30m` (or `24h`, `7d`, a UTC time, as for `zwrm audit`) prints every event
stored since then, and with `--follow` goes on from there; `zwrm.event.history` takes `since`
(a POSIX time) instead of `after`.
