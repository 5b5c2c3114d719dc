"""Reshapes that the dataflow lowering would make views, kept as Relax ops through
legalization; and constant folding only where there is a constant to fold.

The stock passes legalize every `relax.reshape` into a PrimFunc (a TE computation each), and
`RewriteDataflowReshape` then finds that PrimFunc to be a reshape and makes the call a view
(`relax.reshape` again), which the VM runs without copying. A ViT binds hundreds of them
between the kernels' calls (512 in llava-clip), so that round trip was a third of the Relax
passes' time; and `FoldConstant`, which legalizes each op it meets to see whether its
arguments are constants, took as long again once reshapes reached it unlegalized
(docs/build-stages.md). Here:

* `legalize` is `LegalizeOps` with the reshapes that would end as views left as they are
  (`views`: between the kernels' calls and the parameters). The others are legalized as
  before: those bound outside a dataflow block or to a variable the block hands out, and
  those with a division in a shape (`RewriteDataflowReshape` leaves those copies), and
  those next to an op that is legalized (`FuseOps` may fuse them into it), following
  chains of reshapes;
* `fold_constants` runs `FoldConstant` only where a call's arguments hold no variable.

The module that comes out is the stock passes' one, up to the names of the reshape
PrimFuncs (`tests/test_fallback.py` compares the two on every preset).
"""

from __future__ import annotations

import functools
from collections import defaultdict

import tvm
import tvm_ffi
from tvm import relax

from .walk import bindings, op_name, relax_functions

RESHAPE = "relax.reshape"


def _is_reshape(value) -> bool:
    return op_name(value) == RESHAPE


@functools.cache
def _legalizable(name: str) -> bool:
    return tvm.ir.Op.get(name).get_attr("FLegalize") is not None


def _untouched(value) -> bool:
    """A binding that `LegalizeOps` leaves as it is: a call of an op it has no legalization
    for (`call_tir`, allocations...)."""
    name = op_name(value)
    return name is not None and not _legalizable(name)


def _leaves(expr):
    if isinstance(expr, relax.Tuple):
        for field in expr.fields:
            yield from _leaves(field)
    else:
        yield expr


def _used(value) -> list[relax.Var]:
    if isinstance(value, relax.Call):
        parts = list(value.args)
    elif isinstance(value, relax.TupleGetItem):
        parts = [value.tuple_value]
    else:
        parts = [value]
    return [leaf for part in parts for leaf in _leaves(part) if isinstance(leaf, relax.Var)]


def _product(dim) -> bool:
    if isinstance(dim, tvm.tirx.Mul):
        return _product(dim.a) and _product(dim.b)
    return isinstance(dim, (tvm.tirx.IntImm, tvm.tirx.Var))


def _plain(expr) -> bool:
    """A tensor whose dimensions are products of constants and variables: the reshapes that
    `RewriteDataflowReshape` recognizes (not a division, such as `patches // 4`)."""
    shape = getattr(expr.ty, "shape", None)
    return isinstance(shape, relax.ShapeExpr) and all(_product(d) for d in shape.values)


def views(func: relax.Function) -> set[relax.Var]:
    """The variables of `func`'s reshapes that the stock lowering makes views: bound in a
    dataflow block to a dataflow variable, with the value they reshape and every use of
    theirs untouched by `LegalizeOps` or another such reshape."""
    bound: dict[relax.Var, object] = {}
    users: dict[relax.Var, list[relax.Var]] = defaultdict(list)
    found = set()
    for block, b in bindings(func):
        value = b.value if isinstance(b, relax.VarBinding) else None  # a match_cast: unknown
        bound[b.var] = value
        for var in _used(b.value):
            users[var].append(b.var)
        if (
            _is_reshape(value)
            and isinstance(block, relax.DataflowBlock)
            and isinstance(b.var, relax.DataflowVar)
            and _plain(value.args[0])
            and _plain(b.var)
        ):
            found.add(b.var)

    def fits(var: relax.Var) -> bool:  # a neighbor that keeps a reshape a view
        return var in found or var not in bound or _untouched(bound[var])

    changed = True
    while changed:
        changed = False
        for var in list(found):
            source = bound[var].args[0]
            if not (isinstance(source, relax.Var) and fits(source)) or not all(
                user in found or _untouched(bound[user]) for user in users[var]
            ):
                found.discard(var)
                changed = True
    return found


@tvm.transform.module_pass(opt_level=0, name="LegalizeOpsKeepingViews")
def legalize(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """`LegalizeOps`, but for the reshapes that are `views`, left as they are. A reshape it
    legalizes is legalized as the first reshape of its function between the same types
    (the one the stock passes legalized first, whose PrimFunc the others shared), so that
    its PrimFunc's parameters take their names from the same variable as the stock one's:
    a tower with another layer count so links the same stored object (docs/build-cache.md)
    where a layer's variable names would have changed its code."""
    kept, first = set(), {}
    for _, func in relax_functions(mod):
        found = views(func)
        for _, b in bindings(func):
            if _is_reshape(b.value):
                first.setdefault(_types(b.value), b.value)
                if b.var in found:
                    kept.add(b.value)
    stock = tvm.ir.Op.get(RESHAPE).get_attr("FLegalize")

    def reshape(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        # The call as bound: its arguments are the kept reshapes' or untouched bindings'.
        if call in kept:
            return call
        model = first.get(_types(call), call)
        if not model.same_as(call) and _plain(call.args[0]) and _plain(call):
            made = stock(bb, model)
            # The model's PrimFunc with this call's argument (shapes without a division:
            # their variables are bound by the argument's shape, no scalar is passed).
            if op_name(made) == "relax.call_tir" and len(made.args) == 2:
                args = [made.args[0], relax.Tuple([call.args[0]])]
                return relax.Call(made.op, args, made.attrs, made.ty_args)
        return stock(bb, call)

    return relax.transform.LegalizeOps({RESHAPE: reshape})(mod)


def _types(call: relax.Call) -> tvm_ffi.StructuralKey:
    """What a reshape's PrimFunc is made of: its argument's type, the shape, its type."""
    return tvm_ffi.StructuralKey(tvm.runtime.convert([call.args[0].ty, call.args[1], call.ty]))


def _constant_call(value) -> bool:
    """A call that `FoldConstant` may fold: a `call_tir`, or an op it can legalize, none of
    whose arguments is a variable (an allocation has none either, and is never folded)."""
    name = op_name(value)
    if name is None or _used(value):
        return False
    return name == "relax.call_tir" or _legalizable(name)


@tvm.transform.module_pass(opt_level=0, name="FoldConstantsWhereAny")
def fold_constants(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """`FoldConstant` where some call's arguments are all constants; else the module as it
    is (what `FoldConstant` would return, without legalizing each op to find that out)."""
    if not any(_constant_call(b.value) for _, f in relax_functions(mod) for _, b in bindings(f)):
        return mod
    return relax.transform.FoldConstant()(mod)
