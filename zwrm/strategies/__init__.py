"""
zwrm's built-in placement strategies (L{zwrm.interfaces.IPlacementStrategy}).

The plugin objects operators name in the configuration are in
L{zwrm.plugins.zwrm_strategies}; see docs/plugins.md.
"""
