Apps keep every spec they were given (deploys and scales), numbered: `zwrm.app.status` and the
`zwrm.event.app` events carry `spec_version` (store schema version 5 keeps an app deployed
before the upgrade as version 1).
