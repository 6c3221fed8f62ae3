"""The public surface: every name in bpl.__all__ exists, and no function hides a module."""

from __future__ import annotations

import importlib
import pkgutil
import types

import bpl


def test_every_public_name_exists():
    missing = [name for name in bpl.__all__ if not hasattr(bpl, name)]
    assert not missing


def test_no_function_shadows_its_own_module():
    """`import bpl.<module>` must give the module: bpl.extend is the function, so the
    module that holds it may not be called extend."""
    shadowed = []
    for info in pkgutil.iter_modules(bpl.__path__):
        if info.name == "__main__":
            continue
        module = importlib.import_module(f"bpl.{info.name}")
        assert isinstance(module, types.ModuleType)
        if not isinstance(getattr(bpl, info.name), types.ModuleType):
            shadowed.append(info.name)
    assert not shadowed, f"functions named like their modules: {shadowed}"
    assert callable(bpl.extend) and callable(bpl.fuse) and callable(bpl.export)
