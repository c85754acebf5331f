`zwrm deploy` takes `--ssh-key FILE` (repeatable), `--user-data FILE` and `--env KEY=VALUE`
(repeatable): they go into the guest through its cloud-init seed (deploy spec field `cloud_init`).
