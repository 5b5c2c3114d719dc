"""A model built in float16 or bfloat16 (`dtype`) computes in float32 on the CPU pipeline.

The kernels in `kernels.py` are float32 kernels (and float16 GEMMs, chosen by `precision`);
a float16 or bfloat16 graph would miss every one of them and run through the fallback
schedule, many times slower (docs/cpu-pipeline.md). This pass rewrites such a graph into the float32 graph of the same
parameters: each half-precision parameter is cast to float32 where it is first used (the
cast depends only on the weight, so LiftTransformParams moves it to build time with the
weight packing), the casts of activations to and from the half dtype are dropped, and
half-precision constants become float32 constants of the same value. The function's
signature does not change.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .walk import op_name

HALF = ("float16", "bfloat16")


def _dtype(e) -> str | None:
    ty = getattr(e, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


@mutator
class _Widener(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod
        self.params: set = set()  # the current function's
        self.casts: dict = {}  # half parameter -> its float32 cast, in the current block

    def _in_block(self, visit, block):
        saved, self.casts = self.casts, {}
        out = visit(block)
        self.casts = saved
        return out

    def visit_dataflow_block_(self, block):
        return self._in_block(super().visit_dataflow_block_, block)

    def visit_binding_block_(self, block):
        return self._in_block(super().visit_binding_block_, block)

    def visit_var_(self, var):
        if _dtype(var) in HALF and var in self.params:
            if var not in self.casts:
                self.casts[var] = self.builder_.emit(relax.op.astype(var, "float32"))
            return self.casts[var]
        return super().visit_var_(var)

    def visit_var_binding_(self, binding):
        value = binding.value
        if op_name(value) == "relax.astype" and str(value.attrs.dtype) in HALF + ("float32",):
            x = self.visit_expr(value.args[0])
            if _dtype(x) == "float32":  # the value is float32 already: the cast goes
                if not isinstance(binding.var, relax.DataflowVar):  # a block output: bound anew
                    x = self.builder_.emit_output(x, name_hint=binding.var.name)
                self.set_var_remap(binding.var, x)
                return
        super().visit_var_binding_(binding)

    def visit_call_(self, call):
        if not isinstance(call.op, tvm.ir.Op):
            return super().visit_call_(call)
        args = [self._widen_const(a) for a in call.args]
        new = self.builder_.normalize(relax.Call(call.op, args, call.attrs, call.ty_args))
        if _dtype(new) in HALF:  # an op whose attributes name the half dtype
            return relax.op.astype(self.builder_.emit(new), "float32")
        return new

    def _widen_const(self, arg):
        if isinstance(arg, tvm.ir.GenericConst) and _dtype(arg) in HALF:
            return relax.const(arg.value.numpy().astype("float32"), "float32")
        return self.visit_expr(arg)

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.params = set(func.params)
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.finalize()


def widen_to_float32(mod: tvm.IRModule) -> tvm.IRModule:
    """The float32 graph of a half-precision model (see the module docstring); a float32
    model comes back as it is. CanonicalizeBindings folds the dropped casts' aliases, so
    the kernel rewrite sees the same patterns as in a float32 model."""
    funcs = [f for _, f in mod.functions_items() if isinstance(f, relax.Function)]
    if not any(_dtype(p) in HALF for f in funcs for p in f.params):
        return mod
    return relax.transform.CanonicalizeBindings()(_Widener(mod).run())
