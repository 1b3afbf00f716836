"""Package names that load on first use (PEP 562), for lmbatch.engine and lmbatch.io."""

from __future__ import annotations

from importlib import import_module


def lazy_getattr(package: str, exports: dict[str, str], namespace: dict):
    """A module `__getattr__` that imports `exports[name]` (relative to `package`) on first use."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(exports[name], package), name)
        namespace[name] = value
        return value

    return __getattr__
