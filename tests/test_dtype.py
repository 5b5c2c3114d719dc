"""`dtype`: parameters in float16 / bfloat16, pixels in and features out in float32, against
HF's float32 reference on the same checkpoint. On llvm the CPU pipeline computes in float32
from the rounded parameters, through the same kernels as a float32 build."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from builder.preset import load_preset
from builder.targets.cpu.kernels import kernel_config

from .conftest import (
    HOST,
    assert_close,
    build_and_load,
    expected_features,
    pixels,
    tiny_overrides,
)

# Relative to max|ref|. On this tiny tower (weights and norms randomized) the rounded
# parameters gave 5.0e-4 (float16) and 3.7e-3 (bfloat16), the float32 build 5e-7; torch's
# own float16 / bfloat16 CPU model, which also rounds the activations, 1.0e-3 / 9.3e-3.
TOLERANCE = {"float16": 2e-3, "bfloat16": 2e-2}
NUMPY = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@pytest.mark.parity
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_against_fp32_hf(dtype, tiny_checkpoint, tmp_path):
    folder, hf_model = tiny_checkpoint
    overrides = tiny_overrides() + [f"weights.path={folder}", f"dtype={dtype}"]
    preset = load_preset("clip-vit-b-32", overrides)
    enc = build_and_load("clip-vit-b-32", overrides, tmp_path)
    assert enc.manifest["dtype"] == dtype
    assert enc.manifest["inputs"][0]["dtype"] == enc.manifest["outputs"][0]["dtype"] == "float32"
    # Packed at build time, in float32: every stored value is a value of `dtype`.
    stored = safetensors.numpy.load_file(str(enc.folder / "params.safetensors"))
    for name, a in stored.items():
        assert a.dtype == np.float32, name
        assert np.array_equal(a.astype(NUMPY[dtype]).astype(np.float32), a), name
    # The GEMM kernels' weight panels, as in a float32 build: [blocks, K, columns] (tiny
    # tower: K = 32 for q, k, v and out, K = 64 for fc2; 32 outputs each).
    nb = kernel_config(HOST).nb
    assert {(-(-32 // nb), 32, nb), (-(-32 // nb), 64, nb)} <= {a.shape for a in stored.values()}
    x = pixels(2, preset.model.image_size)
    out = enc(x)
    assert out.dtype == np.float32
    rel = assert_close(out, expected_features(hf_model, preset.model, x), rel=TOLERANCE[dtype])
    assert rel > 1e-5  # the parameters really were rounded
