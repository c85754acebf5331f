"""
zwrm's OCI image registry: the OCI Distribution API served by the control plane at C{/v2/}.

 - L{RegistryResource} / L{make_registry_resource}: the twisted.web resource.
 - L{TokenAuthorizer}, L{parse_credentials}: credentials (Bearer or Basic).
 - L{zwrm.registry.image}: the zwrm VM image format (an OCI artifact).
"""

from zwrm.registry.auth import TicketAuthorizer, TokenAuthorizer, parse_credentials
from zwrm.registry.resource import RegistryResource, make_registry_resource
from zwrm.registry.store import RegistryStore, StoreError

__all__ = [
    "RegistryResource",
    "RegistryStore",
    "StoreError",
    "TicketAuthorizer",
    "TokenAuthorizer",
    "make_registry_resource",
    "parse_credentials",
]
