`zwrm status` without an app lists every app, as `zwrm apps list` (and `nomad status`) does.
