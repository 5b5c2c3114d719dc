"""Floating-point work of an exported tower, for GFLOP/s figures (a multiply-add counts as 2).

Counted from the graph itself, so that any family or block is counted without a formula of
its own: every matmul, attention and convolution of `forward`, at batch 1 (norms and
activations are left out: a fraction of a percent).
"""

from __future__ import annotations

import math

from .tvm_import import import_tvm

import_tvm()  # torch hidden from TVM-FFI's start-up, whoever imports this first

import tvm  # noqa: E402
import tvm.sym  # noqa: E402
from tvm import relax  # noqa: E402


def _dims(expr: relax.Expr, sizes: dict[str, int]) -> list[int]:
    """The shape of a tensor expression, its symbolic dimensions set to `sizes` by name (1
    where not named: the batch)."""
    analyzer = tvm.sym.Analyzer()
    dims = expr.ty.shape.values
    for dim in dims:
        for var in tvm.tirx.analysis.undefined_vars(dim):
            analyzer.bind(var, sizes.get(var.name, 1))
    return [int(analyzer.simplify(dim)) for dim in dims]


def gflop(mod: tvm.IRModule, entry: str = "forward", sizes: dict[str, int] | None = None) -> float:
    """GFLOP of one image through `mod[entry]` (its symbolic batch set to 1; a native
    tower's patch counts to `sizes`)."""
    return sum(work(mod, entry, sizes).values())


def per_patch(mod: tvm.IRModule, entry: str = "forward") -> dict[str, float]:
    """A native tower's GFLOP as `linear * n + quadratic * n^2` for an image of n patches
    (its linear layers, and its attention over the whole image; windowed attention is left
    out), from the graph at two sizes; a patch merger keeps every patch (an even grid)."""

    def at(n: int) -> float:
        return gflop(mod, entry, {"patches": n, "kept_patches": n})

    n = 16
    small, large = at(n), at(2 * n)
    quadratic = (large - 2 * small) / (2 * n * n)
    return {"linear": (small - quadratic * n * n) / n, "quadratic": quadratic}


def native_gflop(model: dict[str, float], patches: int) -> float:
    """`per_patch`'s model at `patches`."""
    return model["linear"] * patches + model["quadratic"] * patches**2


def work(
    mod: tvm.IRModule, entry: str = "forward", sizes: dict[str, int] | None = None
) -> dict[str, float]:
    """GFLOP of one image per operator: "matmul" (the linear layers, GEMMs), "attention"
    (Q.K^T and P.V) and "conv" (the patch embedding)."""
    sizes = sizes or {}
    total = {"matmul": 0, "attention": 0, "conv": 0}
    for block in mod[entry].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
                continue
            name = call.op.name
            if name not in ("relax.matmul", "relax.nn.attention", "relax.nn.conv2d"):
                continue
            args = [_dims(a, sizes) for a in call.args[:3]]
            out = _dims(binding.var, sizes)
            if name == "relax.matmul":
                total["matmul"] += 2 * math.prod(out) * args[0][-1]
            elif name == "relax.nn.attention":
                (b, s, h, d), (_, t, _, dv) = args[0], args[2]
                total["attention"] += 2 * b * h * s * t * (d + dv)
            else:
                total["conv"] += 2 * math.prod(out) * math.prod(args[1][1:])
    return {k: v / 1e9 for k, v in total.items()}
