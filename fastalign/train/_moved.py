"""Old import paths of names that moved to another module: they still work, with a DeprecationWarning.

A module that lost names ends with ``__getattr__ = moved_names(__name__, {"Name": new_module, ...})``.
"""
from __future__ import annotations

import warnings
from types import ModuleType
from typing import Callable


def moved_names(old_module: str, moved: dict[str, ModuleType]) -> Callable[[str], object]:
    """A module ``__getattr__`` (PEP 562): ``old_module.NAME`` warns, then returns ``moved[NAME].NAME``."""

    def __getattr__(name: str):
        if name not in moved:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        new_module = moved[name].__name__
        warnings.warn(f"{old_module}.{name} has moved to {new_module}.{name}; import it from there",
                      DeprecationWarning, stacklevel=2)
        return getattr(moved[name], name)

    return __getattr__
