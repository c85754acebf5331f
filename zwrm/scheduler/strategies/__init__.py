"""
zwrm's built-in placement strategies (L{zwrm.interfaces.IPlacementStrategy}), kept with
the scheduler that runs them.

The plugin objects operators name in the configuration are in
L{zwrm.plugins.zwrm_strategies} (found by L{zwrm.scheduler.load_strategy} through
C{twisted.plugin}); see docs/plugins.md.
"""

from zwrm.scheduler.strategies.pack import Pack
from zwrm.scheduler.strategies.spread import Spread

__all__ = ["Pack", "Spread"]
