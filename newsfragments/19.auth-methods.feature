The WAMP authmethods the control plane offers are configurable: `[wamp] auth_methods` (flag
`--auth-methods`), default `["ticket"]`; `wampcra` can be offered to hosts (key: the hex SHA-256
of the host's credential). An unknown method stops the control plane with one readable line.
docs/wamp-clients.md lists exactly the methods the control plane can offer.
