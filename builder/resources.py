"""Where the shipped schema and presets are: inside the installed package, or at the top of
a source checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _data(name: str) -> Path:
    installed = _PACKAGE / "_data" / name
    return installed if installed.is_dir() else _PACKAGE.parent / name


def schema_path() -> Path:
    return _data("schemas") / "preset.schema.json"


def presets_dir() -> Path:
    return _data("presets")


def family_schema_path(family: str) -> Path:
    """The JSON Schema of a family's own model fields."""
    return _data("schemas") / "families" / f"{family}.json"
