"""The build-time packing of parameters: a compiled library's `transform_params` run on the
build's weights, through TVM's runtime library alone (`builder.vm`): a build that reuses a
stored library packs new weights without importing TVM's compiler.

Where the library's `part.json` has its packing as steps (`targets/cpu/packing_steps.py`), each
packed tensor is computed when the writer reaches it, into a buffer the writer reuses
(`safetensors_io.Computed`): the packed weights are never all in memory, and the file is
written while they are computed. Otherwise `transform_params_into` packs them all at once."""

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
    library: Path | Any,
    order: list[str],
    arrays: dict[str, np.ndarray],
    steps: list[dict[str, Any]] | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Run the `transform_params` of a library (`vm.load_vm` takes it): the weight layouts
    its pipeline chose, such as GEMM panels, made once at build time, so the artifact stores
    the packed weights and `forward` takes them as they are. Libraries without it get the
    parameters unchanged.

    With `steps` (the library's `part.json` has them), the packed
    tensors are `Packed` ones, computed as they are written. Otherwise, where the pipeline
    offers `transform_params_into` (the same kernels, writing into the caller's buffers),
    the packed weights land in arrays of the builder's own (`artifact.empty_arrays`) rather
    than memory the VM allocates, and the kernels read the parameters where they are,
    without a copy. TVM's pool runs the kernels on every core (`runtime.set_threads`,
    before the pool starts)."""
    set_threads(None)
    if steps is not None:
        kernels = Kernels(library)
        params = Params(order, arrays, kernels)
        packed = {f"packed.{i}": _packed(step, params, kernels) for i, step in enumerate(steps)}
        return list(packed), packed
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


class Kernels:
    """The functions of a compiled library by name, looked up once each, and the temporary
    buffers their steps use, kept for the next step that needs the same."""

    def __init__(self, library: Path | Any):
        self._module = vm.load_library(library)
        self._functions: dict[str, Any] = {}
        self._temps: dict[tuple[Any, ...], np.ndarray] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._functions:
            self._functions[name] = self._module.get_function(name, query_imports=True)
        return self._functions[name]

    def buffer(self, place: tuple[str, int], shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """A buffer for a step's temporary or parameter at `place`: the same one for every
        step that needs that shape and dtype there."""
        key = (*place, shape, dtype)
        if key not in self._temps:
            self._temps[key] = artifact.empty_arrays([(shape, artifact.numpy_dtype(dtype))])[0]
        return self._temps[key]


def _packed(step: dict[str, Any], params: Params, kernels: Kernels) -> Any:
    """A step's tensor: a parameter (or a view of it) as it is, or a `Packed` one."""
    if "calls" in step:
        return Packed(step, params, kernels)
    if params.made_on_demand:
        return Made(step, params)
    source = params.array(step["param"])
    return source.reshape(step["shape"]) if "shape" in step else source


class Params:
    """The parameters that steps read, by index: the arrays given, or, where the weights are
    made on demand (`random_init.RandomParams`), each made into a buffer when a step reads
    it (one per shape and place among the step's arguments, reused by later steps)."""

    def __init__(self, order: list[str], arrays: Any, kernels: Kernels):
        self._order, self._arrays, self._kernels = order, arrays, kernels
        self.made_on_demand = not isinstance(arrays, dict)

    def shape(self, i: int) -> tuple[int, ...]:
        name = self._order[i]
        return tuple(self._arrays.shapes[name] if self.made_on_demand else self._arrays[name].shape)

    def array(self, i: int, place: int = 0) -> np.ndarray:
        if not self.made_on_demand:
            return self._arrays[self._order[i]]
        out = self._kernels.buffer(("param", place), self.shape(i), "float32")
        self._arrays.fill(self._order[i], out)
        return out

    def fill(self, i: int, out: np.ndarray) -> None:
        self._arrays.fill(self._order[i], out)


class Made:
    """A parameter stored as it is, made when the writer asks for it, straight into the
    writer's buffer (`safetensors_io.Computed`)."""

    def __init__(self, step: dict[str, Any], params: Params):
        self._param, self._params = step["param"], params
        self.shape = tuple(step.get("shape", params.shape(self._param)))
        self.dtype = np.dtype(np.float32)

    def fill(self, out: np.ndarray) -> None:
        self._params.fill(self._param, out.reshape(self._params.shape(self._param)))


class Packed:
    """One packed tensor, computed when the writer asks for it (`safetensors_io.Computed`):
    its step's kernels run on the parameters, into the writer's buffer."""

    def __init__(self, step: dict[str, Any], params: Params, kernels: Kernels):
        self.shape = tuple(step["shape"])
        self.dtype = artifact.numpy_dtype(step["dtype"])
        self._step, self._params, self._kernels = step, params, kernels

    def fill(self, out: np.ndarray) -> None:
        temps = [
            self._kernels.buffer(("temp", k), tuple(shape), dtype)
            for k, (shape, dtype) in enumerate(self._step["temps"])
        ]
        read: dict[int, np.ndarray] = {}  # each parameter made once per step

        def argument(ref: dict[str, Any]) -> Any:
            if "param" in ref:
                i = ref["param"]
                if i not in read:
                    read[i] = self._params.array(i, len(read))
                a = read[i]
            else:
                a = out if "result" in ref else temps[ref["temp"]]
            a = a.reshape(ref["shape"]) if "shape" in ref else a
            # A buffer a kernel may write is taken as it is, never copied.
            return vm.tensor(a) if "param" in ref else vm.view(a)

        for call in self._step["calls"]:
            self._kernels[call["kernel"]](*(argument(r) for r in call["args"]))
