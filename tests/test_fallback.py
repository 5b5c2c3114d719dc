"""Every shipped preset's hot ops run on the CPU kernels: none is left to the fallback
schedule (docs/cpu-pipeline.md), a rotary embedding's elementwise multiplies aside. Checked
on the Relax passes alone, at a tiny width with the preset's blocks, activations and norms,
so a new preset is checked as soon as it ships."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from builder.assemble import export
from builder.preset import load_preset
from builder.targets import llvm
from builder.targets.cpu import reshapes
from builder.targets.cpu.pipeline import after_relax_passes, fallback_report

from .conftest import HOST, PRESETS, TINY, hf_names

pytestmark = pytest.mark.ir

# Relax ops that the kernels cover, by kind: matmuls, attention, convolutions, norms,
# activations, and the multiplies the GEMM epilogues take in (a SwiGLU's gating, a layer
# scale).
HOT = {
    "matmul",
    "nn.attention",
    "nn.softmax",
    "nn.conv2d",
    "nn.layer_norm",
    "nn.rms_norm",
    "nn.group_norm",
    "sigmoid",
    "nn.silu",
    "nn.gelu",
    "nn.gelu_tanh",
    "nn.relu",
    "tanh",
    "exp",
    "multiply",
}


# A rotary embedding, x * cos + rotate_half(x) * sin (the native towers' q and k): its
# multiplies are elementwise, by tables of the positions, and no kernel covers it; on the
# fallback it must run in parallel.
ROTARY = {"multiply", "split", "negative", "concat", "add"}


def hot_on_the_fallback(report: list[dict]) -> list[dict]:
    return [
        entry
        for entry in report
        if HOT & set(entry["ops"])
        and not ({"negative", "concat"} <= set(entry["ops"]) <= ROTARY and entry["parallel"])
    ]


def tiny(preset):
    """The preset with the tiny widths (`conftest.TINY`) of the fields its model config has:
    a family may name its MLP width otherwise (DINOv2's `mlp_ratio`). A VLM's projector that
    merges patches gets a 4 x 4 grid, merged 2 x 2 or pooled to 4 tokens."""
    full = load_preset(preset)
    fields = {f.name for f in dataclasses.fields(full.model)}
    sizes = {**TINY}
    if full.blocks.projector:
        sizes.update(image_size=32, scale_factor=2, mm_tokens_per_image=4)
    sizes = hf_names(full.family, sizes)
    overrides = [f"model.{k}={v}" for k, v in sizes.items() if k in fields]
    if full.preprocess.image_grid_pinpoints:  # tiles of the tiny tower's size
        overrides.append("preprocess.image_grid_pinpoints=[[32,64]]")
    return load_preset(preset, overrides)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_relax_passes_of_a_preset(preset, monkeypatch):
    """For each llvm target of the preset, at its precision: no fallback function computes
    a hot op, and the report names the ops of each function it lists. And the passes that
    keep reshapes out of legalization (`reshapes.py`) give the module of the stock order
    (every reshape legalized, then made a view where it is one; constants folded
    everywhere), for the first target: the same PrimFuncs, each under a name of its own, and
    the same Relax functions calling them (one run of the stock passes: they are the slower)."""
    resolved = tiny(preset)
    mod, _ = export(resolved.model, resolved.blocks, resolved.dtype)
    entries = [t for t in resolved.targets if t.kind == "llvm"]
    assert entries
    modules = []
    for entry in entries:
        ours, report = after_relax_passes(mod, llvm.tvm_target(entry)[0], entry.precision)
        assert not hot_on_the_fallback(report.entries), (entry.name, report.entries)
        assert all(e["ops"] for e in report.entries), report.entries
        modules.append(ours)
    ours, entry = modules[0], entries[0]
    monkeypatch.setattr(reshapes, "legalize", relax.transform.LegalizeOps())
    monkeypatch.setattr(reshapes, "fold_constants", relax.transform.FoldConstant())
    stock, _ = after_relax_passes(mod, llvm.tvm_target(entry)[0], entry.precision)
    names = _prim_func_names(ours, stock)
    assert sorted(names.values()) == sorted(
        gv.name_hint for gv, f in stock.functions_items() if isinstance(f, tirx.PrimFunc)
    )
    renamed = _Renamed(stock, names)
    for gv, func in stock.functions_items():
        if isinstance(func, relax.Function):
            tvm.ir.assert_structural_equal(renamed.visit_expr(ours[gv.name_hint]), func)


def test_a_hot_op_on_the_fallback_is_reported():
    """The check above can fail: a softmax outside attention (no kernel covers it) and a
    ReLU (no GEMM epilogue knows it) show in the report, by their Relax ops, with the
    functions they went into."""

    class Uncovered(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return op.softmax(op.relu(x), axis=-1)

    mod, _ = Uncovered().export_tvm(spec={"forward": {"x": nn.spec.Tensor([2, 32], "float32")}})
    report = fallback_report(mod, HOST)
    assert [e["ops"] for e in hot_on_the_fallback(report)] == [["nn.relu"], ["nn.softmax"]]


def _prim_func_names(ours: tvm.IRModule, stock: tvm.IRModule) -> dict[str, str]:
    """Each PrimFunc of `ours` to the name of the structurally equal one of `stock`."""
    theirs = [
        (gv.name_hint, f) for gv, f in stock.functions_items() if isinstance(f, tirx.PrimFunc)
    ]
    names = {}
    for gv, func in ours.functions_items():
        if isinstance(func, tirx.PrimFunc):
            same = [name for name, f in theirs if tvm_ffi.structural_equal(func, f)]
            assert len(same) == 1, (gv.name_hint, same)
            names[gv.name_hint] = same[0]
    return names


@relax.expr_functor.mutator
class _Renamed(relax.PyExprMutator):
    """A Relax function of another module, its references to functions made references to
    `module`'s: by the name `names` gives, else by their own."""

    def __init__(self, module: tvm.IRModule, names: dict[str, str]):
        super().__init__()
        self._module = module
        self._names = names

    def visit_global_var_(self, gv):
        return self._module.get_global_var(self._names.get(gv.name_hint, gv.name_hint))


def _adding(constant: bool) -> tvm.IRModule:
    """`forward(x) = c + (c or x)`, legalized, with `c` a constant."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([4], "float32"))
    c = relax.const(np.arange(4, dtype=np.float32))
    with bb.function("forward", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.add(c, c if constant else x))
        bb.emit_func_output(out)
    return relax.transform.LegalizeOps()(bb.get())


def test_constants_are_folded_where_there_are_any():
    """A call of constants alone is folded, as `FoldConstant` folds it; a module without one
    is handed back as it is."""
    folded = reshapes.fold_constants(_adding(True))
    tvm.ir.assert_structural_equal(folded, relax.transform.FoldConstant()(_adding(True)))
    assert not tvm_ffi.structural_equal(folded, _adding(True))  # the add is gone
    plain = _adding(False)
    assert reshapes.fold_constants(plain).same_as(plain)
