"""The build-time packing of parameters: a compiled library's `transform_params` run on the
build's weights, through TVM's runtime alone (`tvm_import.import_runtime`): a build that
reuses a stored library packs new weights without importing TVM's compiler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import artifact
from .runtime import set_threads
from .tvm_import import import_runtime

PACK_FUNCTION = "transform_params"
# The same packing into buffers of the caller's; `_shapes` gives their shapes.
PACK_INTO = "transform_params_into"
# The Relax VM's allocator kinds (tvm.runtime.vm.VirtualMachine): the pooled one, as TVM's.
POOLED_ALLOCATOR = 2


def load_vm(library: Path | Any) -> Any:
    """The Relax VM of a library on the CPU: a path to an exported library (loaded by TVM's
    runtime library, without its compiler), or a runtime module or executable in hand."""
    ffi = import_runtime()
    if isinstance(library, str | Path):
        library = ffi.load_module(str(library))
    elif hasattr(library, "jit"):  # a tvm.runtime.Executable, not exported yet
        library = library.jit()
    vm = library["vm_load_executable"]()
    cpu = ffi.device("cpu", 0)
    vm["vm_initialization"](cpu.dlpack_device_type(), cpu.index, POOLED_ALLOCATOR)
    return vm


def pack_params(
    library: Path | Any, order: list[str], arrays: dict[str, np.ndarray]
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Run the `transform_params` of a library (`load_vm` takes it): the weight layouts its
    pipeline chose, such as GEMM panels, made once at build time, so the artifact stores the
    packed weights and `forward` takes them as they are. Libraries without it get the
    parameters unchanged.

    Where the pipeline offers `transform_params_into` (the same kernels, writing into the
    caller's buffers), the packed weights land in arrays of the builder's own
    (`artifact.empty_arrays`) rather than memory the VM allocates, and the kernels read
    the parameters where they are, without a copy; TVM's pool runs them on every core
    (`runtime.set_threads`, before the pool starts)."""
    set_threads(None)
    vm = load_vm(library)
    if not vm.implements_function(PACK_FUNCTION):
        return order, arrays
    inputs = [_tensor(arrays[name]) for name in order]
    if vm.implements_function(PACK_INTO):
        shapes = [tuple(int(d) for d in s) for s in vm[f"{PACK_INTO}_shapes"]()]
        outs = artifact.empty_arrays([(s, np.dtype(np.float32)) for s in shapes])
        packed = vm[PACK_INTO](*inputs, *(_tensor(o) for o in outs))
    else:
        packed = vm[PACK_FUNCTION](*inputs)
    names = [f"packed.{i}" for i in range(len(packed))]
    return names, {name: _array(t) for name, t in zip(names, packed, strict=True)}


def _tensor(a: np.ndarray) -> Any:
    """A CPU tensor of `a`: a view (DLPack) where its memory is C-contiguous and aligned as
    TVM aligns its own, else of an aligned copy. numpy has no bfloat16 in DLPack: those
    are taken as uint16 and viewed as bfloat16 by TVM's runtime."""
    ffi = import_runtime()
    aligned = a.ctypes.data % artifact.ALIGN == 0
    if not (a.flags.c_contiguous and a.flags.writeable and aligned):
        (copy,) = artifact.empty_arrays([(a.shape, a.dtype)])
        np.copyto(copy, a)
        a = copy
    if a.dtype != artifact.numpy_dtype("bfloat16"):
        return ffi.from_dlpack(a)
    bits = ffi.from_dlpack(a.view(np.uint16))
    return ffi.get_global_func("runtime.TVMTensorCreateView")(bits, a.shape, "bfloat16", 0)


def _array(t: Any) -> np.ndarray:
    """A zero-copy numpy view of a CPU tensor (copying a ViT-L's 1.2 GB would take
    seconds); a bfloat16 one viewed through uint16, which DLPack's numpy takes."""
    if str(t.dtype) != "bfloat16":
        return np.from_dlpack(t)
    bits = import_runtime().get_global_func("runtime.TVMTensorCreateView")(t, t.shape, "uint16", 0)
    return np.from_dlpack(bits).view(artifact.numpy_dtype("bfloat16"))
