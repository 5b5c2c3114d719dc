"""Import TVM for a command, without the seconds TVM-FFI spends importing torch.

TVM-FFI imports torch at start-up when it is installed (to exchange tensors with it), which
takes about as long as TVM itself. The builder hands TVM numpy arrays and TVM tensors only,
so a command, or a process that loads an artifact (`builder.load`: an encode worker, a
Ray actor), imports TVM with torch hidden if nothing has imported torch yet; torch stays
importable afterwards, for whatever else the process does, and exchanges tensors with TVM
through the DLPack protocol.

`import_runtime` loads TVM's runtime library alone, through TVM-FFI, without TVM's Python
package or its compiler library: what running a compiled library needs (the build's
parameter packing), in a fraction of `import tvm`'s time (docs/build-stages.md).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType


@contextmanager
def _torch_hidden() -> Iterator[None]:
    """Within the block, `import torch` fails fast, unless something has imported it."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("torch", False) is None:
            del sys.modules["torch"]


def import_tvm() -> ModuleType:
    if "tvm" not in sys.modules:
        with _torch_hidden():
            import tvm  # noqa: F401
            from tvm import relax  # noqa: F401
    import tvm

    return tvm


_RUNTIME_LOADED: list[bool] = []


def import_runtime() -> ModuleType:
    """TVM-FFI, with TVM's runtime library loaded (global symbols, as TVM loads it): its
    global functions (the Relax VM's, the tensors') are then registered. A later
    `import tvm` finds the library loaded and uses the same one."""
    if "tvm" not in sys.modules and not _RUNTIME_LOADED:
        with _torch_hidden():
            import tvm_ffi
            from tvm_ffi.libinfo import load_lib_ctypes

        # Where TVM looks for it (tvm/libinfo.py): TVM_LIBRARY_PATH, then the package's lib/.
        spec = importlib.util.find_spec("tvm")
        paths = [Path(p) / "lib" for p in (spec.submodule_search_locations or [])] if spec else []
        if os.environ.get("TVM_LIBRARY_PATH"):
            paths.insert(0, Path(os.environ["TVM_LIBRARY_PATH"]))
        load_lib_ctypes("tvm", "tvm_runtime", "RTLD_GLOBAL", extra_lib_paths=paths)
        _RUNTIME_LOADED.append(True)
    import tvm_ffi

    return tvm_ffi


def tvm_version() -> str:
    """`tvm.__version__`, from TVM's distribution where it has one, so without importing
    TVM."""
    if "tvm" not in sys.modules:
        try:
            return importlib.metadata.version("apache-tvm")
        except importlib.metadata.PackageNotFoundError:  # a TVM built from source
            pass
    return import_tvm().__version__
