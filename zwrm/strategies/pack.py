"""Moved: see L{zwrm.scheduler.strategies.pack}."""

from zwrm.scheduler.strategies.pack import Pack

__all__ = ["Pack"]
