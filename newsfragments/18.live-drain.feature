`zwrm host drain --mode auto|live|cold` (default `auto`): a machine with volumes now moves live
where both hosts can (their agents report the same CPU model, machine type and VM
networking): it keeps its address on the cluster network, its volumes are mirrored and its RAM migrated while it runs, it pauses only for
the switchover, and the moved volumes are verified against the source's frozen image before
the source is deleted (a failed verification is logged as an error and deletes nothing).
Otherwise, or when a live attempt gives up (the machine runs on at the source), it moves cold
as before; `--mode live` refuses, changing nothing, a drain where a machine cannot move live.
New migration phases `live_preparing`, `live_migrating`, `switched_over`, `verifying`, each
stored before it is acted on; `zwrm host drain-status` shows each machine's mode, a live
move's progress (mirrored bytes and rate, RAM passes, switchover), the pause QEMU reported and
the verification. After a control-plane restart mid-migration both agents are asked where the
machine is, and the source is never resumed once the target may hold it.
