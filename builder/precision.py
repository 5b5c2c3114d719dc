"""A target's `precision`, applied to the Relax module before the target's pipeline."""

from __future__ import annotations

import tvm
from tvm import relax


def apply(mod: tvm.IRModule, precision: str) -> tvm.IRModule:
    """`float16`: TVM's ToMixedPrecision with float32 accumulation: matmuls and convolutions
    take float16 inputs, and the ops that follow them stay in float16 where TVM allows it.
    The function's signature does not change: float32 inputs, outputs and parameters (cast
    when run)."""
    if precision == "float32":
        return mod
    if precision == "float16":
        return relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
    raise ValueError(f"unknown precision {precision!r}")
