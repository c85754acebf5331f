zwrm-control embeds its own WAMP router (realm `zwrm`): WebSocket (JSON, MsgPack, CBOR) and
RawSocket, with or without TLS, on Twisted endpoint strings; ticket, WAMP-CRA and cryptosign
authentication; role rules over exact, prefix and wildcard URIs checked on every message; the
session meta API; progressive results, call cancel and timeouts. Any WAMP client (autobahn-js,
autobahn-python, ...) can connect; see docs/wamp-clients.md.
