"""
The built-in placement strategies, as plugins (found by L{zwrm.scheduler.load_strategy}).
"""

from zwrm.scheduler.strategies.pack import Pack
from zwrm.scheduler.strategies.spread import Spread

spread = Spread()
pack = Pack()
