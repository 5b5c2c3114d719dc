"""Block plugins: user modules that register block types without touching this package.

Three ways in, all imported before a preset is checked (the schema's block and activation
choices come from the live registry):

- `plugins: [my_blocks]` in a preset: module names, looked up on `sys.path` and then in the
  folders of the preset and of
  the presets it extends;
- `build --plugin my_blocks ...` on the command line;
- the `builder.blocks` entry-point group of any installed distribution
  (`[project.entry-points."builder.blocks"] my_blocks = "my_blocks"`), loaded once.

A plugin module registers its blocks with `builder.registry.register`, as the built-in blocks
do; a name registered twice is an error naming both definitions.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import BuilderError, InputError

ENTRY_POINT_GROUP = "builder.blocks"
MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

_entry_points_loaded = False


@contextmanager
def _search_path(folders: Sequence[Path]) -> Iterator[None]:
    # Appended, not prepended: a preset's folder never shadows an installed module.
    added = [str(f) for f in dict.fromkeys(folders) if str(f) not in sys.path]
    sys.path.extend(added)
    try:
        yield
    finally:
        for folder in added:
            sys.path.remove(folder)


def _import(module: str, where: str) -> None:
    if not MODULE_NAME.match(module):
        raise InputError(f"{where}: {module!r} is not a module name like 'my_blocks'")
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise InputError(f"{where}: cannot import {module!r}: {e}") from e
    except BuilderError as e:  # a duplicate block name, or an unknown slot in the plugin
        raise InputError(f"{where}: plugin {module!r}: {e}") from e
    except Exception as e:  # the plugin's own code failed: it is input, not our bug
        raise InputError(
            f"{where}: plugin {module!r} failed on import: {type(e).__name__}: {e}"
        ) from e


def load_entry_points() -> list[str]:
    """Import every module of the `builder.blocks` entry-point group (once per process);
    returns the entry points as `name = value`."""
    global _entry_points_loaded
    found = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    if not _entry_points_loaded:
        errors = []
        for ep in found:
            try:
                ep.load()
            except BuilderError as e:
                errors.append(f"entry point {ep.name!r} = {ep.value!r} ({ENTRY_POINT_GROUP}): {e}")
            except Exception as e:
                errors.append(
                    f"entry point {ep.name!r} = {ep.value!r} ({ENTRY_POINT_GROUP}) failed on "
                    f"import: {type(e).__name__}: {e}"
                )
        if errors:
            raise InputError(errors)
        _entry_points_loaded = True
    return [f"{ep.name} = {ep.value}" for ep in found]


def load_plugins(modules: Sequence[tuple[str, str]], folders: Sequence[Path] = ()) -> None:
    """Import the entry-point plugins, then each `(module, where)`; `where` is what an error
    names ('FILE:LINE: plugins[0]' or "--plugin 'x'"). Every failure is reported at once."""
    load_entry_points()
    errors: list[str] = []
    with _search_path(folders):
        for module, where in modules:
            try:
                _import(module, where)
            except InputError as e:
                errors.extend(e.lines)
    if errors:
        raise InputError(errors)
