Host ids are strict WAMP URI components: new hosts get `h_` and 16 hex digits, so the per-host
procedures `zwrm.agent.<host_id>.*` pass clients that validate URIs strictly. On upgrade the
store's migration (schema version 8) renames every `h-<hex>` id to `h_<hex>` in every table that
refers to it (machines, volumes, drains and migrations, the cluster network, host resets, events);
an agent that comes back with its old id is authenticated under the new one, takes it from
WELCOME's authid and rewrites its host.json; host certificates issued for the old id stay valid.
Upgrade the control plane before the agents.
