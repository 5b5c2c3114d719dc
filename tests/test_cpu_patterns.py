"""The CPU fast path on the blocks of the newer tower families (AIMv2, InternViT, DINOv2):
RMSNorm, as a layer's norm and as qk-norm. At IR level: which kernels the rewrite calls and
what is left in `forward`; in numbers: the norm kernels against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor

from builder.blocks.common import RMSNorm
from builder.targets.cpu import kernels
from builder.targets.cpu.pipeline import compile_kernel
from builder.targets.cpu.rewrite import rewrite_to_kernels

from .conftest import HOST, assert_close
from .test_cpu_pipeline import FLOAT32_KERNELS, kernel_calls

EPS = 1e-6
TOKENS = 13  # two row tiles and a last one of 1 row


def exported(module: nn.Module, dim: int, dtype: str = "float32") -> tuple[tvm.IRModule, list]:
    module.to(dtype)
    spec = {"forward": {"x": nn.spec.Tensor(["batch", TOKENS, dim], "float32")}}
    mod, params = module.export_tvm(spec=spec)
    return mod, [(name, tuple(int(d) for d in p.shape)) for name, p in params]


def forward_ops(mod: tvm.IRModule) -> set[str]:
    """The Relax ops `forward` calls, reshapes aside."""
    ops = set()

    def note(call):
        if isinstance(call.op, tvm.ir.Op) and not call.op.name.startswith("relax.call_tir"):
            ops.add(call.op.name.removeprefix("relax."))

    tvm_ffi.structural_walk(mod["forward"], [(tvm.ir.Call, note)])
    return ops - {"reshape"}


def rewritten(module: nn.Module, dim: int, cfg=FLOAT32_KERNELS) -> tvm.IRModule:
    """The module's kernel calls, with what depends on weights only (the packing, a folded
    layer scale) lifted out of `forward`, as the pipeline does."""
    mod = rewrite_to_kernels(exported(module, dim)[0], cfg)
    return relax.transform.LiftTransformParams()(mod)


# -- IR: what the rewrite makes of each pattern -------------------------------------------


class Norm(nn.Module):
    def __init__(self, dim: int):
        self.norm = RMSNorm(dim, EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


@pytest.mark.ir
@pytest.mark.parametrize("dim", [64, 40, 8])
def test_rms_norm_is_a_kernel(dim):
    """RMSNorm of any width (whole vectors and a scalar tail) is its kernel's call."""
    mod = rewritten(Norm(dim), dim)
    assert kernel_calls(mod) == {"rms_norm": 1}
    assert forward_ops(mod) == set()


# -- numbers -------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("C", [1024, 40, 8])
@pytest.mark.parametrize("rms", [True, False], ids=["rms_norm", "layer_norm"])
def test_norm_kernels_against_numpy(C, rms):
    """RMSNorm and LayerNorm kernels against float64 sums: whole vectors, a scalar tail, a
    width under one vector."""
    cfg = kernels.kernel_config(HOST)
    rng = np.random.default_rng(C)
    x = (rng.standard_normal((7, C)) * 3 + 1).astype(np.float32)
    g, b = (rng.standard_normal(C).astype(np.float32) for _ in range(2))
    y = tvm.runtime.empty((7, C), "float32")
    xd = x.astype(np.float64)
    if rms:
        compile_kernel(kernels.rms_norm_kernel(cfg, C, EPS), HOST)(
            tvm.runtime.tensor(x), tvm.runtime.tensor(g), y
        )
        ref = xd / np.sqrt((xd**2).mean(-1, keepdims=True) + EPS) * g
    else:
        compile_kernel(kernels.layer_norm_kernel(cfg, C, EPS), HOST)(
            *(tvm.runtime.tensor(a) for a in (x, g, b)), y
        )
        ref = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + EPS) * g + b
    assert_close(y.numpy(), ref, rel=1e-6)
