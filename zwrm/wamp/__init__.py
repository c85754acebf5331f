"""
zwrm's embedded WAMP router: L{zwrm.wamp.router.Router}, its transports
(L{zwrm.wamp.transport}) and authentication / authorization (L{zwrm.wamp.auth}).
"""

import txaio

txaio.use_twisted()
