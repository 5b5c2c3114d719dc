"""PyTorch pickles (`.bin`, `.pt`: open_clip's `open_clip_pytorch_model.bin`, older HF
`pytorch_model.bin`) as a tensor source with the interface of `SafetensorsFile`.

They are read with `torch.load(weights_only=True)`, which unpickles tensors and plain
containers only, never arbitrary objects; torch is an optional extra (`pip install
'clip-tvm-builder[torch]'`), and without it such a file is an input error that says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

SUFFIXES = (".bin", ".pt", ".pth")


class TorchPickleFile:
    """A state dict read from a PyTorch pickle (memory-mapped where the file allows it)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            import torch
        except ImportError as e:
            raise InputError(
                f"{path}: a PyTorch pickle; reading it needs torch (pip install "
                "'clip-tvm-builder[torch]'), or convert it to safetensors"
            ) from e
        try:
            state = _load(torch, path)
        except Exception as e:  # torch raises many kinds for a file that is not its pickle
            raise InputError(
                f"{path}: not a PyTorch state dict that torch.load(weights_only=True) reads "
                f"({type(e).__name__})"
            ) from e
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # a training checkpoint's weights
        if not isinstance(state, dict):
            raise InputError(f"{path}: not a PyTorch state dict (holds {type(state).__name__})")
        self.tensors: dict[str, Any] = {
            k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)
        }

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str) -> np.ndarray:
        tensor = self.tensors[name]
        if not tensor.is_floating_point():
            raise InputError(f"{self.path}: tensor {name!r} has dtype {tensor.dtype}, not float")
        return tensor.float().numpy()


def _load(torch: Any, path: Path) -> Any:
    """Memory-mapped (the zip format torch has written since 1.6), else read whole (the
    legacy format cannot be mapped)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)
