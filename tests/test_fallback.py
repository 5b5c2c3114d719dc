"""Every shipped preset's hot ops run on the CPU kernels: none is left to the fallback
schedule (docs/cpu-pipeline.md), a rotary embedding's elementwise multiplies aside. Checked
on the Relax passes alone, at a tiny width with the preset's blocks, activations and norms,
so a new preset is checked as soon as it ships."""

from __future__ import annotations

import dataclasses

import pytest
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from builder.assemble import export
from builder.preset import load_preset
from builder.targets import llvm
from builder.targets.cpu.pipeline import fallback_report

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
def test_no_hot_op_of_a_preset_runs_on_the_fallback(preset):
    """For each llvm target of the preset, at its precision: no fallback function computes
    a hot op, and the report names the ops of each function it lists."""
    resolved = tiny(preset)
    mod, _ = export(resolved.model, resolved.blocks, resolved.dtype)
    entries = [t for t in resolved.targets if t.kind == "llvm"]
    assert entries
    for entry in entries:
        report = fallback_report(mod, llvm.tvm_target(entry)[0], entry.precision)
        assert not hot_on_the_fallback(report), (entry.name, report)
        assert all(e["ops"] for e in report), report


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
