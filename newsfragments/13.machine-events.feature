Events on `zwrm.event.machine`, `zwrm.event.host` and `zwrm.event.app` have one payload shape
per resource: the resource's wire form (as `zwrm.machine.list`, `zwrm.host.list`,
`zwrm.app.status` return it) plus `old` and `reason` (and `machine_id` / `host_id` / `app_id`,
as before). Machine health is `health` (the status) everywhere. New host event kinds
`registered` and `executor` announce re-registrations and executor availability.
