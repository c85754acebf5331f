Drains run on the resource layer: every change a drain makes is stored, then announced once on
`zwrm.event.drain` in the drains resource's form (`started`, `state` with `old`, `migration`
with the migration's fields, `old` and `reason`); the undrain of an incomplete drain now
announces its `cancelled`, a dropped replacement its `failed`, and a migration that starts or
stops waiting for an unreachable host says so (a `migration` event, its phase unchanged). A replacement's health is
followed on its agent's reports instead of being polled every `--poll` seconds, and a resumed
drain goes on as soon as its hosts reconnect. `zwrm host drain` and
`zwrm host drain-status --watch` follow the drain on `zwrm.event.drain` instead of reading its
status every second.
