"""
zwrm's embedded WAMP router: L{zwrm.wamp.router.Router}, its transports
(L{zwrm.wamp.transport}) and authentication / authorization (L{zwrm.wamp.auth}).
L{is_strict_uri} checks a URI against the WAMP specification's strict URI rule.
"""

import txaio

from zwrm.wamp.uri import is_strict_uri

txaio.use_twisted()

__all__ = ["is_strict_uri"]
