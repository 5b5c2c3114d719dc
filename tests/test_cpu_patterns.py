"""The CPU fast path on the blocks of the newer tower families (AIMv2, InternViT, DINOv2):
RMSNorm (as a layer's norm and as qk-norm), SwiGLU MLPs, linear layers without bias and
layer scales. At IR level: which kernels the rewrite calls and what is left to the fallback
schedule; in numbers: the compiled modules against torch in float64, and the folded layer
scale against TVM's stock pipeline, which computes the graph as written."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from builder.blocks.common import Linear, RMSNorm, SiLU, in_float32
from builder.packing import pack_params
from builder.preset import load_preset
from builder.registry import create
from builder.targets import llvm
from builder.targets.cpu import kernels
from builder.targets.cpu.pipeline import compile_kernel, fallback_report
from builder.targets.cpu.rewrite import rewrite_to_kernels
from builder.targets.cpu.widen import widen_to_float32

from .conftest import HOST, assert_close, cpu_target, needs_bf16, rounding
from .test_cpu_pipeline import FLOAT32_KERNELS, HALF_TOLERANCE, kernel_calls

EPS = 1e-6
TOKENS = 13  # two row tiles and a last one of 1 row


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): AIMv2's MLP (no biases), DINOv2-giant's (biases);
    `up_first` computes up(x) * silu(gate(x)) instead."""

    def __init__(self, dim: int, hidden: int, bias: bool, up_first: bool = False):
        self.gate_proj = Linear(dim, hidden, bias=bias)
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)
        self.act = SiLU()
        self.up_first = up_first

    def forward(self, x: Tensor) -> Tensor:
        if self.up_first:
            return self.down_proj(self.up_proj(x) * self.act(self.gate_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    """A pre-norm layer with every pattern: RMSNorm, q/k/v without bias and with qk-norm
    over the full width (InternViT), layer scales on both residual branches (DINOv2,
    InternViT), a SwiGLU MLP. In a half `dtype` it computes as the built-in blocks do
    (float32 norms, matmuls and attention) and takes and returns float32, as the towers do."""

    def __init__(self, dim: int, hidden: int, heads: int, bias: bool):
        self.heads = heads
        self.norm1 = RMSNorm(dim, EPS)
        self.q_proj = Linear(dim, dim, bias=False)
        self.k_proj = Linear(dim, dim, bias=False)
        self.v_proj = Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(dim, EPS)
        self.k_norm = RMSNorm(dim, EPS)
        self.out_proj = Linear(dim, dim)
        self.ls1 = nn.Parameter((dim,))
        self.norm2 = RMSNorm(dim, EPS)
        self.mlp = SwiGLU(dim, hidden, bias)
        self.ls2 = nn.Parameter((dim,))
        self.dtype = "float32"

    def forward(self, x: Tensor) -> Tensor:
        x = x.astype(self.dtype)
        b, s, d = x.shape
        heads = (b, s, self.heads, d // self.heads)
        h = self.norm1(x)
        q = op.reshape(self.q_norm(self.q_proj(h)), heads)  # (B, S, H, hd)
        k = op.reshape(self.k_norm(self.k_proj(h)), heads)
        v = op.reshape(self.v_proj(h), heads)
        a = op.reshape(in_float32(op.scaled_dot_product_attention, q, k, v), (b, s, d))
        x = x + self.out_proj(a) * self.ls1
        x = x + self.mlp(self.norm2(x)) * self.ls2
        return x.astype("float32")


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


class Residual(nn.Module):
    """x + proj(x), or x + proj(x) * scale (a layer scale), or x + act(proj(x)) * scale."""

    def __init__(self, dim: int, bias: bool, scale: bool = False, act: bool = False):
        self.proj = Linear(dim, dim, bias=bias)
        self.scale = nn.Parameter((dim,)) if scale else None
        self.act = SiLU() if act else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.proj(x)
        if self.act is not None:
            y = self.act(y)
        return x + (y * self.scale if self.scale is not None else y)


@pytest.mark.ir
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("scale", [False, True], ids=["", "layer-scale"])
def test_linear_with_residual_and_layer_scale_is_one_gemm(bias, scale):
    """A linear layer with or without bias, its residual add and a layer scale: one GEMM
    that takes the residual (x, the packed weight, the bias if any, x again), the scale
    folded into the weight and bias by the packing, which depends on weights only."""
    mod = rewritten(Residual(64, bias, scale), 64)
    assert kernel_calls(mod) == {"gemm": 1}
    assert forward_ops(mod) == set()
    assert gemm_operands(mod) == [3 + bias]


@pytest.mark.ir
def test_a_scale_after_an_activation_is_not_folded():
    """scale * act(x W + b) is not act(x (W scale) + b scale): the multiply stays."""
    mod = rewritten(Residual(64, True, scale=True, act=True), 64)
    assert kernel_calls(mod)["gemm"] == 1
    assert forward_ops(mod) == {"multiply", "add"}


def gemm_operands(mod: tvm.IRModule) -> list[int]:
    """How many operands each GEMM call of `forward` takes."""
    counts = []

    def note(call):
        tir = isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"
        if tir and call.args[0].name_hint.startswith("gemm"):
            counts.append(len(call.args[1].fields))

    tvm_ffi.structural_walk(mod["forward"], [(tvm.ir.Call, note)])
    return counts


@pytest.mark.ir
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("up_first", [False, True], ids=["gate-first", "up-first"])
def test_swiglu_is_all_gemms(bias, up_first):
    """silu(x W_g + b_g) * (x W_u + b_u) is one GEMM of both halves, the weights and biases
    interleaved by the packing, then the down projection: two GEMMs. Written up half first,
    the up GEMM's epilogue multiplies by the gate GEMM's output: three. Nothing of the MLP
    is left to the fallback either way."""
    mod = rewritten(SwiGLU(64, 100, bias, up_first), 64)
    assert kernel_calls(mod) == {"gemm": 3 if up_first else 2}
    assert forward_ops(mod) == set()


@pytest.mark.ir
def test_layer_leaves_nothing_hot_to_the_fallback():
    """The layer with every pattern, through the Relax passes: each fallback function is a
    reshape or a cast, and the report names the op it came from."""
    mod, _ = exported(Layer(64, 100, 4, True), 64)
    report = fallback_report(mod, HOST)
    assert {op for entry in report for op in entry["ops"]} <= {"reshape", "astype"}
    assert all(entry["ops"] for entry in report)
    calls = kernel_calls(rewrite_to_kernels(mod, FLOAT32_KERNELS))
    assert (calls["gemm"], calls["rms_norm"], calls["attention"]) == (6, 4, 1)


@pytest.mark.ir
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_layer_makes_the_float32_kernel_calls(dtype):
    """A float16 / bfloat16 layer is widened into the float32 layer's kernel calls."""
    half, _ = exported(Layer(64, 100, 4, True), 64, dtype)
    f32, _ = exported(Layer(64, 100, 4, True), 64)
    widened = rewrite_to_kernels(widen_to_float32(half), FLOAT32_KERNELS)
    assert kernel_calls(widened) == kernel_calls(rewrite_to_kernels(f32, FLOAT32_KERNELS))


@pytest.mark.ir
def test_pair_gemms_take_pairs_from_rms_norm_and_the_swiglu():
    """With 16-bit GEMMs, the norms before q/k/v and the MLP write the pairs those GEMMs
    read, and so does the merged gate and up GEMM for the down projection: only the
    attention output is converted on its own."""
    mod = rewritten(Layer(64, 128, 4, True), 64, dataclasses.replace(FLOAT32_KERNELS, bf16=True))
    calls = kernel_calls(mod)
    assert (calls["gemm"], calls["rms_norm"], calls["to_pairs"]) == (6, 4, 1)


# -- numbers -------------------------------------------------------------------------------


def weights(params: list, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights; norm weights and layer scales around 1, so that swapping any two
    shows."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in params:
        a = rng.standard_normal(shape) * (0.1 if len(shape) == 1 else 1 / np.sqrt(shape[-1]))
        out[name] = (a + (1.0 if len(shape) == 1 and "bias" not in name else 0.0)).astype(
            np.float32
        )
    return out


def torch_linear(t: dict, name: str, h):
    import torch.nn.functional as F

    return F.linear(h, t[f"{name}.weight"], t.get(f"{name}.bias"))


def torch_swiglu(t: dict, h, prefix: str = ""):
    """`SwiGLU` in torch, on `t`'s tensors under `prefix`."""
    import torch.nn.functional as F

    m = F.silu(torch_linear(t, f"{prefix}gate_proj", h)) * torch_linear(t, f"{prefix}up_proj", h)
    return torch_linear(t, f"{prefix}down_proj", m)


def torch_layer(t: dict, x, heads: int):
    """`Layer` in torch."""
    import torch
    import torch.nn.functional as F

    def rms(name, h):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * t[f"{name}.weight"]

    b, s, d = x.shape

    def split(h):
        return h.reshape(b, s, heads, d // heads).transpose(1, 2)

    h = rms("norm1", x)
    q = split(rms("q_norm", torch_linear(t, "q_proj", h)))
    k = split(rms("k_norm", torch_linear(t, "k_proj", h)))
    v = split(torch_linear(t, "v_proj", h))
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
    x = x + torch_linear(t, "out_proj", a) * t["ls1"]
    return x + torch_swiglu(t, rms("norm2", x), "mlp.") * t["ls2"]


def in_torch(reference, w: dict[str, np.ndarray], x: np.ndarray, *args) -> np.ndarray:
    """`reference(tensors, x, *args)` in float64."""
    import torch

    t = {k: torch.from_numpy(v).double() for k, v in w.items()}
    return reference(t, torch.from_numpy(x).double(), *args).numpy()


def run(executable, params: list, w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    order, packed = pack_params(executable, [name for name, _ in params], w)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(packed[name]) for name in order]
    return vm["forward"](tvm.runtime.tensor(x), *args).numpy()


# (target options, precision)
LAYER_BUILDS = {
    "float32": ({}, "float32"),
    "avx2": ({"mcpu": "x86-64-v3"}, "float32"),
    "bfloat16-pairs": ({}, "bfloat16"),
    "bfloat16-rounded": (rounding("bfloat16"), "bfloat16"),
    "float16-rounded": (rounding("float16"), "float16"),
}


@pytest.mark.parity
@pytest.mark.parametrize(
    "build",
    [
        "float32",
        "avx2",
        pytest.param("bfloat16-pairs", marks=needs_bf16),
        "bfloat16-rounded",
        "float16-rounded",
    ],
)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_layer_against_torch(build, bias):
    """The layer with every pattern (MLP width 100: a ragged last weight block), compiled,
    against torch in float64: float32 within 1e-5 of max|reference|, 16-bit GEMM operands
    within their tolerance; batch 3."""
    options, precision = LAYER_BUILDS[build]
    heads, dim = 4, 64
    mod, params = exported(Layer(dim, 100, heads, bias), dim)
    target = cpu_target(options)
    executable = llvm.compile(mod, target, precision)
    assert executable.fallback_ops == fallback_report(mod, target, precision)
    w = weights(params)
    x = np.random.default_rng(1).standard_normal((3, TOKENS, dim)).astype(np.float32)
    ours, ref = run(executable, params, w, x), in_torch(torch_layer, w, x, heads)
    if precision == "float32":
        assert_close(ours, ref, rel=1e-5)
    else:
        assert assert_close(ours, ref, rel=HALF_TOLERANCE[precision]) > 1e-5


@pytest.mark.parity
@pytest.mark.parametrize("build", ["float32", pytest.param("bfloat16-pairs", marks=needs_bf16)])
@pytest.mark.parametrize("hidden", [100, 128])
@pytest.mark.parametrize("up_first", [False, True], ids=["gate-first", "up-first"])
def test_swiglu_against_torch(up_first, hidden, build):
    """The SwiGLU MLP as one GEMM of both halves (gate first) or with the gating in the up
    GEMM's epilogue (up first), against torch in float64: a ragged last block of the merged
    GEMM (hidden 100), whole blocks (128: 16-bit builds write the down projection's input as
    pairs), a last row tile of 1 row; batch 3."""
    options, precision = LAYER_BUILDS[build]
    mod, params = exported(SwiGLU(64, hidden, True, up_first), 64)
    executable = llvm.compile(mod, HOST, precision)
    w = weights(params)
    x = np.random.default_rng(3).standard_normal((3, TOKENS, 64)).astype(np.float32)
    ours, ref = run(executable, params, w, x), in_torch(torch_swiglu, w, x)
    assert_close(ours, ref, rel=1e-5 if precision == "float32" else HALF_TOLERANCE[precision])


@pytest.mark.parity
def test_folded_layer_scale_equals_the_graph_as_written():
    """x + (x W^T + b) * s with s folded into W and b at build time, against TVM's stock
    pipeline computing the multiply: equal within float32 rounding."""
    mod, params = exported(Residual(64, True, scale=True), 64)
    w = weights(params)
    x = np.random.default_rng(2).standard_normal((3, TOKENS, 64)).astype(np.float32)
    stock = relax.VirtualMachine(tvm.compile(mod, HOST), tvm.cpu())["forward"]
    ref = stock(tvm.runtime.tensor(x), *(tvm.runtime.tensor(w[n]) for n, _ in params)).numpy()
    assert_close(run(llvm.compile(mod, HOST), params, w, x), ref, rel=1e-6)


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


# -- the VLM projectors' token merges ------------------------------------------------------

PROJECTORS = {  # block: (kernel calls, tokens the tower puts before the grid)
    "idefics3_connector": ({"gemm": 1}, 0),
    "internvl_projector": ({"layer_norm": 1, "gemm": 2}, 1),
    "gemma3_projector": ({"avg_pool": 1, "rms_norm": 1, "gemm": 1}, 0),
}
GRID_WIDTH = 32  # a 4 x 4 grid of 32-wide tokens, merged 2 x 2


class OnTokens(nn.Module):
    """A registered projector on a tower's last state, its first `skip` tokens (a CLS)
    dropped as the top module drops them, at a tiny width: 4 x 4 patches, merges of 2 x 2
    (pixel shuffle) or pooled to 4 tokens, out width 40 (a ragged weight block)."""

    def __init__(self, block: str, skip: int):
        preset = "internvl3-1b" if block == "internvl_projector" else "gemma-3-4b-it"
        resolved = load_preset(preset)
        sizes = dict(hidden_size=GRID_WIDTH, image_size=32, patch_size=8, scale_factor=2)
        sizes.update(mm_tokens_per_image=4, projector_hidden_size=40)
        model = dataclasses.replace(resolved.model, **sizes)
        self.p = create(block, "projector", model, resolved.blocks)
        self.skip = skip

    def forward(self, x: Tensor) -> Tensor:
        if self.skip:
            x = op.split(x, [self.skip], axis=1)[1]  # (B, 16, D)
        return self.p(x)


def projector(block: str) -> tuple[tvm.IRModule, list]:
    skip = PROJECTORS[block][1]
    spec = {"forward": {"x": nn.spec.Tensor(["batch", skip + 16, GRID_WIDTH], "float32")}}
    mod, params = OnTokens(block, skip).export_tvm(spec=spec)
    return mod, [(name, tuple(int(d) for d in p.shape)) for name, p in params]


@pytest.mark.ir
@pytest.mark.parametrize("block", list(PROJECTORS))
@pytest.mark.parametrize("cfg", ["float32", "bfloat16-pairs", "rounded"])
def test_token_merges_are_read_in_place(block, cfg):
    """The pixel shuffle (Idefics3, InternVL; the CLS drop before InternVL's included) is
    read by the kernel after it, the GEMM or the LayerNorm, and Gemma 3's pooling is a
    kernel: nothing of the projector is left to `forward` but reshapes, with float32, 16-bit
    pairs or rounded GEMM operands (whose conversion reads the shuffle)."""
    mod = projector(block)[0]
    config = (
        FLOAT32_KERNELS
        if cfg != "bfloat16-pairs"
        else dataclasses.replace(FLOAT32_KERNELS, bf16=True)
    )
    rounded = "bfloat16" if cfg == "rounded" else None
    rewritten = relax.transform.LiftTransformParams()(rewrite_to_kernels(mod, config, rounded))
    calls = kernel_calls(rewritten)
    want = PROJECTORS[block][0]
    assert {k: calls[k] for k in want} == want
    assert forward_ops(rewritten) <= {"astype"}


@pytest.mark.ir
@pytest.mark.parametrize("block", list(PROJECTORS))
def test_token_merges_leave_nothing_to_the_fallback(block):
    """Through the Relax passes: the only fallback function is the copy of the output (a
    reshape that leaves the dataflow block); no permute, split, sum or divide."""
    report = fallback_report(projector(block)[0], HOST)
    assert [entry["ops"] for entry in report] == [["reshape"]], report


def torch_projector(t: dict, x, block: str):
    """The projectors in torch (float64), HF's way: the shuffle as Idefics3's and
    InternVL's view-permute steps compose, the pooling as a mean over each block."""
    import torch.nn.functional as F

    b, s, d = x.shape
    if block == "gemma3_projector":
        pooled = x.reshape(b, 2, 2, 2, 2, d).mean((2, 4)).reshape(b, 4, d)
        w, eps = t["p.mm_soft_emb_norm.weight"], load_preset("gemma-3-4b-it").model.norm_eps
        normed = pooled * (pooled.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * (1 + w)
        return normed @ t["p.mm_input_projection_weight"]
    x = x[:, PROJECTORS[block][1] :]
    merged = x.reshape(b, 2, 2, 2, 2, d).permute(0, 1, 3, 2, 4, 5).reshape(b, 4, 4 * d)
    if block == "idefics3_connector":
        return torch_linear(t, "p.modality_projection.proj", merged)
    h = F.layer_norm(merged, (4 * d,), t["p.layer_norm.weight"], t["p.layer_norm.bias"], 1e-5)
    return torch_linear(t, "p.linear_2", F.gelu(torch_linear(t, "p.linear_1", h)))


@pytest.mark.parity
@pytest.mark.parametrize("block", list(PROJECTORS))
@pytest.mark.parametrize(
    "build",
    ["float32", "avx2", pytest.param("bfloat16-pairs", marks=needs_bf16), "bfloat16-rounded"],
)
def test_token_merges_against_torch(block, build):
    """Each projector compiled, against torch in float64, batch 2 (8 merged rows: a row tile
    and 2 rows one at a time): float32 within 1e-5 of max|reference|, 16-bit GEMM operands
    within their tolerance; the compiled executable's fallback list is the report's."""
    options, precision = LAYER_BUILDS[build]
    mod, params = projector(block)
    target = cpu_target(options)
    executable = llvm.compile(mod, target, precision)
    assert executable.fallback_ops == fallback_report(mod, target, precision)
    w = weights(params)
    skip = PROJECTORS[block][1]
    x = np.random.default_rng(4).standard_normal((2, skip + 16, GRID_WIDTH)).astype(np.float32)
    ours, ref = run(executable, params, w, x), in_torch(torch_projector, w, x, block)
    assert_close(ours, ref, rel=1e-5 if precision == "float32" else HALF_TOLERANCE[precision])
