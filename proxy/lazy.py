"""Names a package re-exports, imported on first use (PEP 562): importing the package (or
``casproxy --version``) then loads no SDK or framework until a name that needs one is used."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``, for ``names`` (name -> the module defining it)."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name]), name)
        setattr(sys.modules[package], name, value)  # once: later lookups do not come here
        return value

    return __getattr__
