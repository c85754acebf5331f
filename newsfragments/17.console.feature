`zwrm console MACHINE` attaches interactively to a running machine's serial console through the
control plane (operators only; Ctrl-] detaches), and `zwrm logs -f MACHINE` follows it after the
log's tail. New procedures: `zwrm.machine.console` (progressive results) and
`zwrm.machine.console_write`; the agent relays QEMU's console socket (`machine.console.attach`,
`machine.console.write`). The console log is kept as before.
