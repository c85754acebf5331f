"""
The contracts between zwrm's parts, and between zwrm and its plugins.

Each interface's docstrings are its specification: implementations (ours, third-party,
and the fakes used in unit tests) are held to them by contract test suites in tests/
that run against every implementation.

Sections, each owned by the part it describes:
 - WAMP router: authentication and authorization.
 - Placement: scheduler strategies (plugins).
 - Hypervisor drivers (plugins).
 - Images.
"""

from zope.interface import Attribute, Interface  # noqa: F401

# --- WAMP router -----------------------------------------------------------------------

# --- Placement -------------------------------------------------------------------------

# --- Hypervisor drivers ----------------------------------------------------------------

# --- Images ----------------------------------------------------------------------------
