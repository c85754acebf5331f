A rolling update ended (and reverted) the moment one of its new machines failed, even when the
machine's restart policy was about to restart it: a guest that panics once at its first boot,
which `zwrm deploy --wait` already waits through, could not be rolled out. The update now
waits through the restart within its `healthy_deadline`, as Nomad's deployments and
Kubernetes' rollouts do; a machine that fails with no restart due (policy `never`,
`max_restarts` reached) still ends it, within 2 s, its message saying why it is not restarted.
`zwrm deploy` says each such restart on stderr while it follows the update (`machine M of APP
failed: ...; restart 1 at HH:MM:SS UTC`), as `--wait` does.
