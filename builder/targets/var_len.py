"""`relax.nn.attention_var_len` as ops every target can legalize.

A native tower's windowed layers (Qwen2.5-VL's) attend within consecutive runs of tokens
given by their cumulative lengths, flash attention's cu_seqlens (`blocks/native.py`). TVM
0.27 has the op but cannot legalize it. This pass rewrites each call that is still there
(the CPU pipeline first replaces those it has a kernel for) into attention with an additive
mask: a token's window is the number of window starts at or before it, and a score between
tokens of different windows gets float32's lowest value, as HF's block masks do.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

OP = "relax.nn.attention_var_len"


@mutator
class _Lower(PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == OP):
            return call
        q, k, v, starts = call.args[:4]
        keys = call.args[4] if len(call.args) > 4 else None  # seqstart_k
        if (
            call.attrs.causal_mask
            or call.attrs.window_size
            or (keys is not None and not keys.same_as(starts))
        ):
            # The native towers' windows are none of these; lowering them would be wrong.
            raise ValueError(
                "attention_var_len with a causal mask, a sliding window or key segments of "
                "their own is not supported"
            )
        n = q.ty.shape.values[1]
        bb = self.builder_
        index = bb.emit(relax.op.arange(0, n, dtype="int32"))
        # (n, K + 1): which window starts are at or before each token; the count less one is
        # its window (the first start is 0).
        after = bb.emit(
            relax.op.greater_equal(
                relax.op.expand_dims(index, [1]), relax.op.expand_dims(starts, [0])
            )
        )
        window = bb.emit(relax.op.sum(relax.op.astype(after, "int32"), axis=[1]))
        same = bb.emit(
            relax.op.equal(relax.op.expand_dims(window, [1]), relax.op.expand_dims(window, [0]))
        )
        low = relax.const(np.finfo(np.float32).min, "float32")
        mask = bb.emit(relax.op.where(same, relax.const(0.0, "float32"), low))
        bias = bb.emit(relax.op.reshape(mask, relax.ShapeExpr([1, 1, n, n])))
        return relax.op.nn.attention(q, k, v, bias, scale=call.attrs.scale)


def _calls_op(func: relax.Function) -> bool:
    """Whether a binding of the function calls the op (the exporter's functions are flat
    binding blocks: no need to print or walk the whole function)."""
    blocks = func.body.blocks if isinstance(func.body, relax.SeqExpr) else []
    return any(
        isinstance(b.value, tvm.ir.Call)
        and isinstance(b.value.op, tvm.ir.Op)
        and b.value.op.name == OP
        for block in blocks
        for b in block.bindings
    )


def lower_attention_var_len(mod: tvm.IRModule) -> tvm.IRModule:
    """Every `attention_var_len` call of `mod`'s Relax functions as masked attention."""
    calls = [
        gv
        for gv, func in mod.functions.items()
        if isinstance(func, relax.Function) and _calls_op(func)
    ]
    if not calls:
        return mod
    lowering = _Lower(mod)
    for gv in calls:
        lowering.builder_.update_func(gv, lowering.visit_expr(mod[gv]))
    return lowering.builder_.get()
