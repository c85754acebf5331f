"""Moved: see L{zwrm.scheduler.strategies.spread}."""

from zwrm.scheduler.strategies.spread import Spread

__all__ = ["Spread"]
