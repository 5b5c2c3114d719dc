"""Import TVM for a command, without the seconds TVM-FFI spends importing torch.

TVM-FFI imports torch at start-up when it is installed (to exchange tensors with it), which
takes about as long as TVM itself. The builder hands TVM numpy arrays and TVM tensors only,
so a command, or a process that loads an artifact (`builder.load`: an encode worker, a
Ray actor), imports TVM with torch hidden if nothing has imported torch yet; torch stays
importable afterwards, for whatever else the process does, and exchanges tensors with TVM
through the DLPack protocol.
"""

from __future__ import annotations

import sys
from types import ModuleType


def import_tvm() -> ModuleType:
    if "tvm" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` fails fast
        try:
            import tvm  # noqa: F401
            from tvm import relax  # noqa: F401
        finally:
            if sys.modules.get("torch", False) is None:
                del sys.modules["torch"]
    import tvm

    return tvm
