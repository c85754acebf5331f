"""
zwrm's OCI image registry: the OCI Distribution API served by the control plane at C{/v2/}.

 - L{RegistryResource} / L{make_registry_resource}: the twisted.web resource.
 - L{TokenAuthorizer}, L{parse_credentials}: credentials (Bearer or Basic).
 - L{zwrm.registry.image}: the zwrm VM image format (an OCI artifact).
 - L{zwrm.registry.client}: the client (the CLI pushes, the agent pulls).

The server's names are loaded when first used, so that the client side (the agent's image
cache, the CLI) can import L{zwrm.registry.client} and L{zwrm.registry.image} without
loading the server (its resource, store and authorizers).
"""

import importlib

_SERVER = {
    "RegistryResource": "zwrm.registry.resource",
    "RegistryStore": "zwrm.registry.store",
    "StoreError": "zwrm.registry.store",
    "TicketAuthorizer": "zwrm.registry.auth",
    "TokenAuthorizer": "zwrm.registry.auth",
    "make_registry_resource": "zwrm.registry.resource",
    "parse_credentials": "zwrm.registry.auth",
}


def __getattr__(name):
    module = _SERVER.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_SERVER)
