The embedded router provides the meta procedure `wamp.session.kill_by_authid(authid, reason=None,
message=None)` itself, as Crossbar.io does (ends every session of the authid but the caller's,
returns their ids; bad arguments get `wamp.error.invalid_argument`); the control plane ends an
offline host's session through it on either router.
