"""Registered block types. Importing this package registers the built-in blocks: every module
in it (a new one needs no line here)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
