"""open_clip and timm, the references of the open_clip and timm layouts, imported for tests
(and for the CPU benchmark's open_clip peer).

Both import torchvision at module level, for image transforms and a frozen batch norm that
their ViTs never use. Its wheels here are built against the CUDA torch and do not load with
the CPU torch the test extras pin, so the test extras do not install it; where it is missing,
`open_clip_and_timm` puts a stand-in in its place before importing them: modules whose every
name is a class that raises when called (and torchvision's `InterpolationMode`, which timm
reads at import). Nothing the tests run touches it; the towers compared are open_clip's and
timm's own code. transformers decides whether torchvision is there when it is first asked,
so it is asked before the stand-in exists; and the stand-in is removed once they are imported.
"""

from __future__ import annotations

import enum
import importlib.util
import os
import sys
import types
from typing import Any

MODULES = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.ops",
    "torchvision.ops.misc",
    "torchvision.datasets",
)
MODES = ("NEAREST", "NEAREST_EXACT", "BILINEAR", "BICUBIC", "BOX", "HAMMING", "LANCZOS")


class _Absent(type):
    """A class whose attributes are itself, and whose instances cannot be made."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return cls

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("torchvision is not installed (a stand-in for tests/peers.py)")


def _stand_in() -> None:
    absent = _Absent("Absent", (), {})
    interpolation = enum.Enum("InterpolationMode", {m: m.lower() for m in MODES})

    def attribute(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return absent

    for name in MODULES:
        module = types.ModuleType(name)
        module.__getattr__ = attribute  # type: ignore[method-assign]
        module.InterpolationMode = interpolation  # type: ignore[attr-defined]
        sys.modules[name] = module


def open_clip_and_timm() -> tuple[Any, Any]:
    """The open_clip and timm modules, torchvision's stand-in put in first where it is
    missing and taken out of `sys.modules` again once they are imported, for the other tests'
    sake. Without them the test skips, but fails in CI, which installs them (`.ci/run`, with
    --no-deps: the test extras cannot list them)."""
    stand_in = "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None
    if stand_in:
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()  # cached as False before the stand-in
        _stand_in()
    try:
        import open_clip
        import timm
    except ImportError as e:
        if "pytest" not in sys.modules:  # the CPU benchmark, which goes on without them
            raise
        import pytest

        reason = f"{e}: pip install --no-deps open_clip_torch==3.3.0 timm==1.0.31"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI installs them: see .ci/run)")
        pytest.skip(reason)
    finally:
        if stand_in:
            for name in MODULES:
                sys.modules.pop(name, None)
    return open_clip, timm
