"""The build-time packing of parameters: a compiled library's `transform_params` run on the
build's weights, through TVM's runtime alone (`builder.vm`): a build that reuses a stored
library packs new weights without importing TVM's compiler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import artifact, vm
from .runtime import set_threads

PACK_FUNCTION = "transform_params"
# The same packing into buffers of the caller's; `_shapes` gives their shapes.
PACK_INTO = "transform_params_into"


def pack_params(
    library: Path | Any, order: list[str], arrays: dict[str, np.ndarray]
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Run the `transform_params` of a library (`vm.load_vm` takes it): the weight layouts
    its pipeline chose, such as GEMM panels, made once at build time, so the artifact stores
    the packed weights and `forward` takes them as they are. Libraries without it get the
    parameters unchanged.

    Where the pipeline offers `transform_params_into` (the same kernels, writing into the
    caller's buffers), the packed weights land in arrays of the builder's own
    (`artifact.empty_arrays`) rather than memory the VM allocates, and the kernels read
    the parameters where they are, without a copy; TVM's pool runs them on every core
    (`runtime.set_threads`, before the pool starts)."""
    set_threads(None)
    machine = vm.load_vm(library)
    if not machine.implements_function(PACK_FUNCTION):
        return order, arrays
    inputs = [vm.tensor(arrays[name]) for name in order]
    if machine.implements_function(PACK_INTO):
        shapes = [tuple(int(d) for d in s) for s in machine[f"{PACK_INTO}_shapes"]()]
        outs = artifact.empty_arrays([(s, np.dtype(np.float32)) for s in shapes])
        packed = machine[PACK_INTO](*inputs, *(vm.tensor(o) for o in outs))
    else:
        packed = machine[PACK_FUNCTION](*inputs)
    names = [f"packed.{i}" for i in range(len(packed))]
    return names, {name: vm.array(t) for name, t in zip(names, packed, strict=True)}
