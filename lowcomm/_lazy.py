"""A package's public names, imported on first use (PEP 562).

``import lowcomm`` and the packages below it import none of their submodules: a name is imported
from its submodule the first time it is read, and kept. So a command that trains nothing
(``lowcomm launch`` above all, which only starts the processes that do) never loads torch, which
takes about two seconds a process; ``lowcomm.DiLoCo`` loads what it needs when it is first used.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, where: dict[str, tuple[str, ...]]) -> tuple[Callable, Callable, list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` of ``package``, whose names live in submodules:
    ``where`` maps each submodule (relative, ``".codecs"``) to the names it gives. A submodule of
    the package (``lowcomm.kernels``) is served as an attribute too, as an eager ``__init__`` would
    have made it one."""
    origin = {name: module for module, names in where.items() for name in names}
    public = sorted(origin)

    def __getattr__(name: str) -> Any:
        module = origin.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module, package), name)
            setattr(importlib.import_module(package), name, value)  # the next read is a plain one
            return value
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return public

    return __getattr__, __dir__, public
