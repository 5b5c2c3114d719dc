"""`dtype`: parameters and computation in float16 / bfloat16, pixels in and features out in
float32, against HF's float32 reference on the same checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy

from builder.preset import load_preset

from .conftest import assert_close, build_and_load, expected_features, pixels, tiny_overrides

# Relative to max|ref|. On this tiny tower (weights and norms randomized) float16 gave 9e-4
# and bfloat16 9e-3, as torch's own float16 / bfloat16 CPU model (1.0e-3 / 9.3e-3): matmuls
# accumulate in float32 and norms, attention and the patch conv run in float32. Accumulating
# in the compute dtype (TVM's default) gave 3x that here, and 4e-2 / 3e-1 at real widths.
TOLERANCE = {"float16": 2e-3, "bfloat16": 2e-2}


@pytest.mark.parity
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_against_fp32_hf(dtype, tiny_checkpoint, tmp_path):
    folder, hf_model = tiny_checkpoint
    overrides = tiny_overrides() + [f"weights.path={folder}", f"dtype={dtype}"]
    preset = load_preset("clip-vit-b-32", overrides)
    enc = build_and_load("clip-vit-b-32", overrides, tmp_path)
    assert enc.manifest["dtype"] == dtype
    assert enc.manifest["inputs"][0]["dtype"] == enc.manifest["outputs"][0]["dtype"] == "float32"
    stored = safetensors.numpy.load_file(str(enc.folder / "params.safetensors")).values()
    # The matmul weights are stored in `dtype`; weight packing precomputes the float32 casts
    # of the few that feed float32 computations (norms, the patch conv).
    in_dtype = sum(a.size for a in stored if str(a.dtype) == dtype)
    assert in_dtype >= 0.7 * sum(a.size for a in stored)
    x = pixels(2, preset.model.image_size)
    out = enc(x)
    assert out.dtype == np.float32
    assert_close(out, expected_features(hf_model, preset.model, x), rel=TOLERANCE[dtype])
