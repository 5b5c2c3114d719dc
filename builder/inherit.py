"""Preset inheritance: `extends: clip-vit-l-14.yaml` names a parent preset, by a path
relative to the file that says it. The parent chain is read first, then each child is
deep-merged over its parent: maps merge key by key, the child wins, anything else (a list, a
scalar) is replaced whole. Overrides come after, on the merged preset.

Every value keeps the file and line that set it, so an error in an inherited value points
into the parent file. `name` is not inherited: it defaults to the child's file name.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:
    from .preset import Path_, RawPreset

KEY = "extends"
MAX_DEPTH = 16


def _chain_text(chain: list[Path]) -> str:
    return " -> ".join(str(p) for p in chain)


def _merge(parent: Any, child: Any) -> Any:
    if isinstance(parent, dict) and isinstance(child, dict):
        out = copy.deepcopy(parent)
        for key, value in child.items():
            out[key] = _merge(parent.get(key), value)
        return out
    return copy.deepcopy(child)


def _value(data: Any, path: Path_) -> tuple[bool, Any]:
    for part in path:
        in_map = isinstance(data, dict) and part in data
        in_list = isinstance(data, list) and isinstance(part, int) and part < len(data)
        if not (in_map or in_list):
            return False, None
        data = data[part]
    return True, data


def _survives(path: Path_, parent: dict[str, Any], child: dict[str, Any]) -> bool:
    """Whether the parent's value at `path` is still in the merged preset: every level that
    the child also sets must be a map on both sides (merged, not replaced)."""
    for n in range(1, len(path) + 1):
        in_child, theirs = _value(child, path[:n])
        if not in_child:
            return True
        if not (isinstance(theirs, dict) and isinstance(_value(parent, path[:n])[1], dict)):
            return False
    return True


def _merge_raw(parent: RawPreset, child: RawPreset) -> RawPreset:
    from .preset import RawPreset

    parent_data = {k: v for k, v in parent.data.items() if k != "name"}
    lines: dict[Path_, int] = {}
    files: dict[Path_, str] = {}
    for path, line in parent.lines.items():
        if path and path[0] != "name" and _survives(path, parent_data, child.data):
            lines[path] = line
            files[path] = parent.files.get(path, parent.file)
    for path, line in child.lines.items():
        if path:
            lines[path] = line
            files[path] = child.file
    merged = RawPreset(child.file, _merge(parent_data, child.data), lines)
    merged.files = files
    merged.chain = [*parent.chain, child.file]
    return merged


def resolve(raw: RawPreset, read: Callable[[Path], RawPreset]) -> RawPreset:
    """`raw` with its `extends` chain read (by `read`, one file each) and merged in."""
    chain = [Path(raw.file).resolve()]
    stack = [raw]
    while KEY in stack[-1].data:
        current = stack[-1]
        parent_ref = current.data[KEY]
        line = current.lines.get((KEY,), 1)
        where = f"{current.file}:{line}: {KEY}"
        if not isinstance(parent_ref, str) or not parent_ref:
            raise InputError(f"{where}: expected a preset file path, got {parent_ref!r}")
        path = (Path(current.file).parent / parent_ref).resolve()
        if path in chain:
            raise InputError(f"{where}: cycle: {_chain_text([*chain, path])}")
        if len(chain) >= MAX_DEPTH:
            raise InputError(f"{where}: more than {MAX_DEPTH} levels: {_chain_text(chain)}")
        if not path.is_file():
            missing = _chain_text([*chain, path])
            raise InputError(f"{where}: no such preset {parent_ref!r}: {missing}")
        chain.append(path)
        stack.append(read(path))
    merged = stack.pop()
    merged = _strip(merged)
    while stack:
        merged = _merge_raw(merged, _strip(stack.pop()))
    return merged


def _strip(raw: RawPreset) -> RawPreset:
    """The preset without its `extends` key (already followed)."""
    raw.data.pop(KEY, None)
    for path in [p for p in raw.lines if p and p[0] == KEY]:
        del raw.lines[path]
    return raw
