"""Import TVM for a command, without the seconds TVM-FFI spends importing torch.

TVM-FFI imports torch at start-up when it is installed (to exchange tensors with it), which
takes about as long as TVM itself. The builder hands TVM numpy arrays and TVM tensors only,
so a command that compiles imports TVM with torch hidden if nothing has imported torch yet;
torch stays importable afterwards, for whatever else the process does, and exchanges
tensors with TVM through the DLPack protocol.

`import_runtime` loads TVM's runtime library alone, through TVM-FFI (torch hidden the same
way), without TVM's Python package or its compiler library: what running a compiled library
needs (`builder.vm`: the build's parameter packing, and a process that loads an artifact,
`builder.load`: an encode worker, a Ray actor), in a fraction of `import tvm`'s time
(docs/artifacts.md).
"""

from __future__ import annotations

import functools
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

        load_lib_ctypes("tvm", "tvm_runtime", "RTLD_GLOBAL", extra_lib_paths=_library_paths())
        _RUNTIME_LOADED.append(True)
    import tvm_ffi

    return tvm_ffi


def _library_paths() -> list[Path]:
    """Where TVM itself looks for its libraries (`tvm/libinfo.py`'s `package_lib_paths`:
    TVM_LIBRARY_PATH, the wheel's lib/, a source tree's build folders), that file loaded
    alone, without the package it belongs to."""
    spec = importlib.util.find_spec("tvm")
    folders = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for folder in folders:
        found = importlib.util.spec_from_file_location("_tvm_libinfo", folder / "libinfo.py")
        if found is None or found.loader is None or not (folder / "libinfo.py").is_file():
            continue
        libinfo = importlib.util.module_from_spec(found)
        found.loader.exec_module(libinfo)
        return list(libinfo.package_lib_paths())
    paths = [folder / "lib" for folder in folders]
    if os.environ.get("TVM_LIBRARY_PATH"):
        paths.insert(0, Path(os.environ["TVM_LIBRARY_PATH"]))
    return paths


@functools.cache
def versions() -> dict[str, str]:
    """The installed TVM's and TVM-FFI's versions, as their distributions say, so without
    importing them; where one has no distribution (built from source), its `__version__`,
    imported. Artifacts record these, and the build cache's keys cover them."""
    found = {}
    for dist, module in (("apache-tvm", "tvm"), ("apache-tvm-ffi", "tvm_ffi")):
        try:
            found[module] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            imported = import_tvm() if module == "tvm" else import_runtime()
            found[module] = imported.__version__
    return found
