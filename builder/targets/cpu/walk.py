"""What the CPU pipeline's passes read off a Relax module: its functions, their bindings, the
op a binding calls; and the pass that shows a module to a function that reads it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import tvm
from tvm import relax


def op_name(value) -> str | None:
    """The name of the op `value` calls (`relax.reshape`...), if it is a call of one."""
    if isinstance(value, tvm.ir.Call) and isinstance(value.op, tvm.ir.Op):
        return value.op.name
    return None


def relax_functions(mod: tvm.IRModule) -> Iterator[tuple[tvm.ir.GlobalVar, relax.Function]]:
    """The Relax functions of `mod` that have a body of binding blocks."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
            yield gv, func


def bindings(func: relax.Function) -> Iterator[tuple[relax.BindingBlock, relax.Binding]]:
    """Each binding of `func` (`relax_functions`), with its block, in order."""
    for block in func.body.blocks:
        for b in block.bindings:
            yield block, b


def noting_pass(name: str, note: Callable[[tvm.IRModule], None]) -> tvm.transform.Pass:
    """A pass that shows the module to `note` and changes nothing."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _note(mod: tvm.IRModule, _ctx: object) -> tvm.IRModule:
        note(mod)
        return mod

    return _note
