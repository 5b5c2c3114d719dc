"""One module per target kind, each with the same three functions:

- `tvm_target(entry)`: the `tvm.target.Target` for a preset's target entry, and the resolved
  options to record in the manifest (`mcpu: host` becomes the detected CPU);
- `compile(mod, target)`: the compile pipeline, IRModule -> `tvm.runtime.Executable`;
- `LIBRARY`: the file name of the exported library;
- `PIPELINE_VERSION`: an integer in the build cache key, bumped when `compile` changes.

The compile pipeline of a kind is one replaceable function.
"""

from __future__ import annotations

from types import ModuleType

from ..errors import BuilderError
from . import llvm

KINDS: dict[str, ModuleType] = {"llvm": llvm}


def pipeline(kind: str) -> ModuleType:
    try:
        return KINDS[kind]
    except KeyError:
        raise BuilderError(
            f"no pipeline for target kind {kind!r}; known: {sorted(KINDS)}"
        ) from None
