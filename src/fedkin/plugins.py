"""Plugins: Python modules that register algorithms, datasets, models or optimizers on import.

A plugin is loaded in three ways, all ending in an ordinary import (whose ``register_*``
calls fill the registries, see :mod:`fedkin.registry`):

* ``--plugin MODULE`` on any ``fedkin`` command (repeatable);
* ``plugins: [MODULE, …]`` in an experiment config. ``fedkin run --plugin`` records its
  modules there, so the saved ``config.yaml`` loads them again wherever the config is
  validated: ``fedkin run --resume``, ``fedkin compare``, Flower ServerApps and ClientApps.
  (Ray workers receive the algorithm by reference and import its module themselves.)
* the entry-point group ``fedkin.plugins`` of installed packages, loaded the first time a
  registry is read. An entry point names a module (importing it registers) or a function
  (called without arguments)::

      [project.entry-points."fedkin.plugins"]
      mine = "mypackage.fedkin_plugin"

``MODULE`` is a dotted module name, imported like ``python -m`` would: from ``sys.path`` and
then the current directory. A plugin that fails to import is one :class:`PluginError` line
naming the module and the error (exit code 2 on the command line).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from importlib import metadata
from types import ModuleType

from fedkin.core.errors import UserError

ENTRY_POINT_GROUP = "fedkin.plugins"
_entry_points_loaded = False


class PluginError(UserError):
    """A plugin module (or entry point) that cannot be imported or loaded."""


def load_plugins(modules: Iterable[str]) -> list[ModuleType]:
    """Import every plugin module (each once per process); returns the modules."""
    return [_import(name) for name in modules]


def _import(name: str) -> ModuleType:
    if not isinstance(name, str) or not name:
        raise PluginError(f"plugin {name!r}: expected a dotted module name")
    if name in sys.modules:
        return sys.modules[name]
    try:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as err:
            cwd = os.getcwd()
            if err.name != name.split(".")[0] or cwd in sys.path or "" in sys.path:
                raise
            sys.path.append(cwd)  # like `python -m`: modules of the current directory
            try:
                return importlib.import_module(name)
            except ModuleNotFoundError:
                sys.path.remove(cwd)
                raise err from None
    except Exception as err:  # one line: the module and what went wrong importing it
        raise PluginError(
            f"plugin {name!r} failed to import: {type(err).__name__}: {err}"
        ) from None


def load_entry_points() -> None:
    """Load the installed ``fedkin.plugins`` entry points (once per process)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
            if callable(loaded) and not isinstance(loaded, ModuleType):
                loaded()
        except Exception as err:
            raise PluginError(
                f"plugin entry point {ep.name!r} ({ep.value}, group {ENTRY_POINT_GROUP}) "
                f"failed to load: {type(err).__name__}: {err}"
            ) from None
