"""
zwrm's plugin package.

zwrm's own plugins (placement strategies, hypervisor drivers) are modules in this package
that define objects providing ``twisted.plugin.IPlugin`` and one of zwrm's interfaces
(see ``zwrm.interfaces``). Operators add directories of third-party plugins in the
configuration (``plugin_dirs``); those directories are appended to this package's path, so
``twisted.plugin.getPlugins`` finds their modules as it finds ours.
"""

import os

from twisted.plugin import getPlugins, pluginPackagePaths
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

__path__.extend(pluginPackagePaths(__name__))  # noqa: F821 (module __path__)
__all__ = []


class PluginError(Exception):
    """
    A plugin could not be found or does not fulfil its interface.

    The message is meant for an operator: it names what was asked for and what exists.
    """


def add_plugin_dirs(dirs):
    """
    Make the modules in C{dirs} visible as plugins of this package.

    @param dirs: directory paths; each must exist.
    @raise PluginError: if one does not.
    """
    for d in dirs:
        d = os.path.abspath(os.fspath(d))
        if not os.path.isdir(d):
            raise PluginError(f"plugin directory {d} does not exist")
        if d not in __path__:  # noqa: F821
            __path__.append(d)  # noqa: F821


def available(interface, dirs=()):
    """
    Every plugin providing C{interface}, by name, each checked with C{verifyObject}.

    @param interface: a zope.interface with a C{name} attribute.
    @return: a dict mapping each plugin's C{name} to the plugin.
    @raise PluginError: if a plugin fails verification, naming it and why.
    """
    import zwrm.plugins

    add_plugin_dirs(dirs)
    found = {}
    for plugin in getPlugins(interface, zwrm.plugins):
        try:
            verifyObject(interface, plugin)
        except Invalid as e:
            raise PluginError(
                f"plugin {plugin!r} claims {interface.__name__} but does not provide it: {e}"
            ) from None
        found[plugin.name] = plugin
    return found


def find(interface, name, dirs=(), kind="plugin"):
    """
    The plugin providing C{interface} named C{name}.

    @param kind: what the operator calls this sort of plugin, for the error message
        (e.g. C{"placement strategy"}).
    @raise PluginError: if none has that name; the message lists the ones there are.
    """
    plugins = available(interface, dirs)
    try:
        return plugins[name]
    except KeyError:
        names = ", ".join(sorted(plugins)) or "none"
        raise PluginError(f"unknown {kind} {name!r}; available: {names}") from None
