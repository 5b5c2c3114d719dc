"""A fallback schedule for every PrimFunc the kernels do not cover: parallel outer loops and
a vectorized contiguous inner loop; anything it cannot handle stays serial and correct."""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

from .kernels import KERNEL_ATTR, KernelConfig


def _has_conditional(stmt) -> bool:
    found = [False]

    def visit_call(n):
        if isinstance(n.op, tvm.ir.Op) and "if_then_else" in n.op.name:
            found[0] = True

    def visit_other(_n):
        found[0] = True

    tvm_ffi.structural_walk(
        stmt,
        [(tvm.ir.Call, visit_call), (tirx.IfThenElse, visit_other), (tirx.Select, visit_other)],
        order="post",
    )
    return found[0]


def _runs_parallel(func: tirx.PrimFunc) -> bool:
    found = [False]

    def visit_for(n):
        if n.kind == tirx.ForKind.PARALLEL:
            found[0] = True

    tvm_ffi.structural_walk(func.body, [(tirx.For, visit_for)], order="post")
    return found[0]


def _fallback_schedule(func: tirx.PrimFunc, cfg: KernelConfig):
    from tvm.s_tir.dlight.analysis import normalize_prim_func  # pylint: disable=import-outside-toplevel
    from tvm.s_tir.dlight.base import try_inline  # pylint: disable=import-outside-toplevel

    sch = tvm.s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    infos = try_inline(sch, infos)
    for info in infos:
        block = info.block_rv
        loops = sch.get_loops(block)
        kinds = info.dom_kind()
        if len(loops) != len(kinds) or "O" in kinds:
            continue
        s_loops = [l for l, k in zip(loops, kinds, strict=True) if k == "S"]
        r_loops = [l for l, k in zip(loops, kinds, strict=True) if k == "R"]
        if not s_loops:
            continue
        if r_loops:
            sch.reorder(*s_loops, *r_loops)
        elif not _has_conditional(sch.get(block).body):
            inner = s_loops[-1]
            ext = sch.get(inner).extent
            if (
                isinstance(ext, tvm.tirx.IntImm)
                and ext.value % cfg.vec == 0
                and ext.value > cfg.vec
            ):
                outer, vi = sch.split(inner, [None, cfg.vec])
                sch.vectorize(vi)
                s_loops = s_loops[:-1] + [outer]
            elif isinstance(ext, tvm.tirx.IntImm) and ext.value == cfg.vec:
                sch.vectorize(inner)
                s_loops = s_loops[:-1]
        if not s_loops:
            continue
        fused = sch.fuse(*s_loops) if len(s_loops) > 1 else s_loops[0]
        sch.parallel(fused)
    return sch.mod["main"]


def fallback_schedule_pass(cfg: KernelConfig, note=None):
    """`note(name, parallel)`, if given, is told of every PrimFunc the schedule is given and
    whether it could parallelize it (`report.FallbackReport.note_fallback`)."""

    @tvm.transform.module_pass(opt_level=0, name="CPUFallbackSchedule")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and KERNEL_ATTR in func.attrs:
                continue
            try:
                new = _fallback_schedule(func, cfg)
            except Exception:  # pylint: disable=broad-except
                new = None  # leave it unscheduled: correct, just serial
            if new is not None:
                updates[gv] = new
            if note is not None:
                note(gv.name_hint, new is not None and _runs_parallel(new))
        for gv, f in updates.items():
            mod[gv] = f
        return mod

    return _pass
