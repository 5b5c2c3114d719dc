"""Error of each `dtype` against HF transformers' float32 CLIPVisionModel, and the time of one
forward call, on a tower with random weights (norms and biases included).

    python -m benchmarks.dtype_error                 # tiny tower (3 layers, width 32)
    python -m benchmarks.dtype_error clip-vit-b-32 2 # ViT-B/32's widths, 2 layers (1 computed)

Prints one Markdown table row per dtype: max abs error / max |reference| of the artifact and
of HF's model run by torch in that dtype, and the artifact's seconds per image (batch 1, one
call after a warm-up); then the same for a float32 model built with each 16-bit `precision`
(for bfloat16 what `targets=[llvm-bf16]` builds), against HF's model in that type. Works in
a temporary folder that it deletes.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from builder.preset import load_preset
from tests.conftest import (
    build_and_load,
    expected_features,
    pixels,
    save_hf_tower,
    tiny_overrides,
)


def main(preset_name: str | None, layers: int) -> None:
    with tempfile.TemporaryDirectory(prefix="dtype-error-") as work:
        measure(preset_name, layers, Path(work))


def measure(preset_name: str | None, layers: int, work: Path) -> None:
    if preset_name is None:
        preset_name, overrides = "clip-vit-b-32", tiny_overrides()
    else:
        overrides = [f"model.num_hidden_layers={layers}"]
    preset = load_preset(preset_name, overrides)
    model = preset.model
    hf = save_hf_tower(work / "ckpt", preset, seed=3)
    overrides.append(f"weights.path={work / 'ckpt'}")
    x = pixels(1, model.image_size)
    ref = expected_features(hf, model, x)
    print(f"{preset_name} {overrides[:-1]}: features {ref.shape}")
    print("| dtype | error | HF in that dtype: error | s per image |")
    print("|---|---|---|---|")
    cases = [(dtype, f"dtype={dtype}", dtype) for dtype in ("float32", "float16", "bfloat16")]
    cases += [
        (
            f"precision: {precision}",
            f"targets=[{{name: llvm, kind: llvm, precision: {precision}}}]",
            precision,
        )
        for precision in ("float16", "bfloat16")
    ]
    for label, override, dtype in cases:
        enc = build_and_load(preset_name, [*overrides, override], work / label.replace(": ", "-"))
        enc(x)  # warm-up
        t0 = time.perf_counter()
        out = enc(x)
        seconds = time.perf_counter() - t0
        err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
        hf_err = torch_error(hf, model, x, ref, dtype)
        print(f"| {label} | {err:.1e} | {hf_err:.1e} | {seconds:.3f} |", flush=True)


def torch_error(hf, model, x: np.ndarray, ref: np.ndarray, dtype: str) -> float:
    """The same error for HF's model run by torch in `dtype` on the CPU."""
    import copy

    import torch

    low = copy.deepcopy(hf).to(getattr(torch, dtype))
    with torch.inference_mode():
        pixels_ = torch.from_numpy(x).to(getattr(torch, dtype))
        states = low(pixels_, output_hidden_states=True).hidden_states
    out = torch.cat([states[i] for i in model.feature_layers], -1).float().numpy()
    out = out[:, 1:] if model.feature_select_strategy == "default" else out
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None, int(sys.argv[2]) if len(sys.argv) > 2 else 2)
