"""A compiled library's Relax VM and its tensors, through TVM's runtime library alone
(`tvm_import.import_runtime`): what the build's packing and a loaded artifact need, without
TVM's Python package or its compiler. An artifact for another device (cuda) imports TVM
first (`devices.open_device`), which loads that device's runtime; these functions serve it
all the same.

numpy takes tensors through DLPack, which has no bfloat16 for numpy: those cross as uint16,
viewed as bfloat16 on TVM's side (`runtime.TVMTensorCreateView`, which keeps its source
alive) and as ml_dtypes' bfloat16 on numpy's."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from . import artifact
from .tvm_import import import_runtime

# The Relax VM's allocator kinds (tvm.runtime.vm.VirtualMachine): the pooled one, as TVM's.
POOLED_ALLOCATOR = 2
_CPU = 1  # DLPack's device type of the host


def cpu() -> Any:
    return import_runtime().device("cpu", 0)


def on_cpu(device: Any) -> bool:
    return device.dlpack_device_type() == _CPU


def load_vm(library: Path | Any, device: Any = None) -> Any:
    """The Relax VM of a library: a path to an exported library (loaded by TVM's runtime
    library), or a runtime module or executable in hand; on `device` (the CPU by default),
    with the CPU beside it for shape functions, as `tvm.runtime.vm.VirtualMachine` sets
    up."""
    vm = load_library(library)["vm_load_executable"]()
    devices = [device or cpu()]
    if not on_cpu(devices[0]):
        devices.append(cpu())
    init = []
    for d in devices:
        init += [d.dlpack_device_type(), d.index, POOLED_ALLOCATOR]
    vm["vm_initialization"](*init)
    return vm


def load_library(library: Path | Any) -> Any:
    """The runtime module of a library: a path to an exported library (loaded by TVM's
    runtime library), or a runtime module or executable in hand."""
    if isinstance(library, str | Path):
        return import_runtime().load_module(str(library))
    if hasattr(library, "jit"):  # a tvm.runtime.Executable, not exported yet
        return library.jit()
    return library


def empty(shape: tuple[int, ...], dtype: str, device: Any = None) -> Any:
    """An uninitialized tensor, allocated by TVM's runtime on `device` (the CPU)."""
    ffi = import_runtime()
    alloc = ffi.get_global_func("runtime.TVMTensorAllocWithScope")
    return alloc(ffi.Shape([int(d) for d in shape]), ffi.dtype(dtype), device or cpu(), None)


def tensor(a: np.ndarray, device: Any = None) -> Any:
    """A tensor of `a` on `device` (the CPU). On the CPU, a view of `a` (DLPack) where its
    memory is C-contiguous, writable and aligned as TVM aligns its own, else a copy in a
    tensor of TVM's allocator (a model's input, every call); on another device, a copy
    there."""
    device = device or cpu()
    if not (on_cpu(device) and viewable(a)):
        return copied(a, device)
    return _taken(a)


def viewable(a: np.ndarray) -> bool:
    """Whether TVM can take `a`'s memory as it is: C-contiguous, writable and aligned as TVM
    aligns its own."""
    return a.flags.c_contiguous and a.flags.writeable and a.ctypes.data % artifact.ALIGN == 0


def view(a: np.ndarray) -> Any:
    """A tensor that is `a`'s memory (DLPack), never a copy: what a kernel writes into. A
    ValueError where `a` is not `viewable`."""
    if not viewable(a):
        raise ValueError(f"TVM cannot take this array as it is: {a.flags}, at {a.ctypes.data}")
    return _taken(a)


def _taken(a: np.ndarray) -> Any:
    """The tensor of a `viewable` array's memory."""
    ffi = import_runtime()
    if a.dtype != artifact.numpy_dtype("bfloat16"):
        return ffi.from_dlpack(a)
    return _view(ffi.from_dlpack(a.view(np.uint16)), "bfloat16")


def array(t: Any, copy: bool = False) -> np.ndarray:
    """A numpy array of a tensor: a view of a CPU tensor, which it keeps alive (the memory
    stays the VM's: its pooled allocator takes it back when the view goes, for the VM's
    next call, not for the system), or with `copy` (what a caller keeps) a copy of it in
    numpy's own memory; a copy of another device's."""
    if not on_cpu(t.device):
        return copied_back(t)
    if str(t.dtype) != "bfloat16":
        view = np.from_dlpack(t)
    else:
        view = np.from_dlpack(_view(t, "uint16")).view(artifact.numpy_dtype("bfloat16"))
    return view.copy() if copy else view


def copied(a: np.ndarray, device: Any) -> Any:
    """A tensor on `device` holding a copy of `a` (what `tvm.runtime.tensor` does)."""
    if not a.flags.c_contiguous:
        a = a.copy(order="C")  # np.ascontiguousarray would make a 0-d array 1-d
    out = empty(a.shape, a.dtype.name, device)
    copy = import_runtime().get_global_func("runtime.TVMTensorCopyFromBytes")
    copy(out, a.ctypes.data_as(ctypes.c_void_p), a.nbytes)
    return out


def copied_back(t: Any) -> np.ndarray:
    """A numpy copy of a tensor on any device (what `Tensor.numpy` calls)."""
    out = np.empty(tuple(t.shape), artifact.numpy_dtype(str(t.dtype)))
    copy = import_runtime().get_global_func("runtime.TVMTensorCopyToBytes")
    copy(t, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
    return out


def _view(t: Any, dtype: str) -> Any:
    """`t`'s memory as another dtype of the same width."""
    return import_runtime().get_global_func("runtime.TVMTensorCreateView")(t, t.shape, dtype, 0)
