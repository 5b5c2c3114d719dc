"""What `forward` runs on the fallback schedule, and the Relax ops each of those functions
came from: the manifest's `fallback_ops`, and what a test over every preset checks.

The stock passes name a legalized PrimFunc after its TE computation (`transpose` for
`permute_dims`, `T_add`...) and a fused one after those (`fused_multiply1_add`), which does
not always say which Relax op to look for. The report follows the ops instead: it notes the
op of each binding before `LegalizeOps`, the PrimFuncs each binding's legalization called
after it, the PrimFuncs each fused function groups before `FuseTIR`, the functions the
fallback schedule saw, and at the end the ones `forward` still calls (a reshape that
`RewriteDataflowReshape` turned into a view runs nothing).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax

from .walk import bindings, noting_pass, op_name, relax_functions

ENTRY = "forward"


def _bindings(mod: tvm.IRModule):
    """(function, binding) of every variable binding of every Relax function, in order."""
    for gv, func in relax_functions(mod):
        for _, b in bindings(func):
            if isinstance(b, relax.VarBinding):
                yield gv, func, b


def _called_prim_func(value) -> str | None:
    """The PrimFunc a `call_tir` binding calls."""
    if op_name(value) in ("relax.call_tir", "relax.call_tir_inplace"):
        return value.args[0].name_hint
    return None


def _referenced(func) -> list[str]:
    """Names of the global functions `func` refers to, in order of first reference."""
    names: list[str] = []

    def note(gv):
        if gv.name_hint not in names:
            names.append(gv.name_hint)

    tvm_ffi.structural_walk(func, [(tvm.ir.GlobalVar, note)], order="pre")
    return names


def _append(ops: list[str], more: list[str]) -> None:
    ops.extend(op for op in more if op not in ops)


class FallbackReport:
    """Filled by the passes it hands out (`note_*`), in pipeline order; `entries` then lists,
    for each function `forward` runs on the fallback schedule, in the order it first calls
    them: its name, the Relax ops it came from (`nn.rms_norm`, `add`...) and whether the
    schedule parallelized it (`parallel: false`: it runs as legalized, on one core)."""

    def __init__(self) -> None:
        self._ops: dict = {}  # binding variable -> its Relax op, before legalization
        self._kernels: set = set()  # binding variables of the kernel calls, before it
        self.origins: dict[str, list[str]] = {}  # PrimFunc (or fused function) -> Relax ops
        self.fallback: dict[str, bool] = {}  # PrimFunc -> parallelized by the fallback
        self.entries: list[dict] = []

    def note_ops(self):
        """Before LegalizeOps: the Relax op each binding computes."""

        def note(mod):
            for _, _, b in _bindings(mod):
                name = op_name(b.value)
                if name is not None and name.startswith("relax.call_"):
                    self._kernels.add(b.var)
                elif name is not None:
                    self._ops[b.var] = name.removeprefix("relax.")

        return noting_pass("NoteRelaxOps", note)

    def note_legalized(self):
        """After LegalizeOps: the PrimFuncs each op became. An op whose legalization emits
        several calls binds the last to its variable and the others just before it."""

        def note(mod):
            pending: list[str] = []
            for _, _, b in _bindings(mod):
                prim = _called_prim_func(b.value)
                if prim is not None and b.var not in self._kernels:
                    pending.append(prim)
                op = self._ops.get(b.var)
                if op is not None:
                    for name in pending:
                        _append(self.origins.setdefault(name, []), [op])
                    pending = []

        return noting_pass("NoteLegalizedOps", note)

    def note_fused(self):
        """After FuseOps, before FuseTIR: each fused function's ops, from its PrimFuncs (the
        fused PrimFunc takes the fused function's name)."""

        def note(mod):
            for gv, func, b in _bindings(mod):
                prim = _called_prim_func(b.value)
                if prim is not None and func.attrs is not None and "Primitive" in func.attrs:
                    _append(self.origins.setdefault(gv.name_hint, []), self.origins.get(prim, []))

        return noting_pass("NoteFusedOps", note)

    def note_fallback(self, name: str, parallel: bool) -> None:
        """The fallback schedule's callback, for each PrimFunc it was given."""
        self.fallback[name] = parallel

    def note_called(self):
        """At the end: the fallback functions that `forward` calls."""

        def note(mod):
            entry = [gv for gv in mod.get_global_vars() if gv.name_hint == ENTRY]
            called = _referenced(mod[entry[0]]) if entry else []
            self.entries = [
                {
                    "function": name,
                    "ops": self.origins.get(name, []),
                    "parallel": self.fallback[name],
                }
                for name in called
                if name in self.fallback
            ]

        return noting_pass("NoteFallbackCalls", note)
