"""The CPU fast path on graphs whose token count n is symbolic, as the towers that take each
image at its own resolution export them (Qwen2.5-VL, Pixtral, SigLIP2 NaFlex: one image per
call, activations (1, n, D)): one build serves every n. Attention runs the sequence kernel
(n an argument), and `attention_var_len` (block-diagonal by cu_seqlens, Qwen2.5-VL's window
layers) its segment form; without the kernels, `var_len` lowers the latter to masked
attention. At IR level: which kernels the rewrite calls and what is left to the fallback
schedule; in numbers: builds run at several n against torch in float64."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from builder.blocks.common import Linear, RMSNorm
from builder.packing import pack_params
from builder.targets import llvm
from builder.targets.cpu import kernels
from builder.targets.cpu.pipeline import compile_kernel, fallback_report
from builder.targets.cpu.rewrite import rewrite_to_kernels
from builder.targets.var_len import lower_attention_var_len

from .conftest import HOST, assert_close, cpu_target, needs_bf16
from .test_cpu_patterns import forward_ops, torch_linear, weights
from .test_cpu_pipeline import FLOAT32_KERNELS, HALF_TOLERANCE, kernel_calls

EPS = 1e-6
PATCH, DIM, HEADS = 12, 64, 4
HD = DIM // HEADS
# Token counts of one build: a single token, fewer than a row tile, ragged tiles and key
# blocks, a whole key block.
TOKENS = [1, 5, 37, 64, 100]


def windows(n: int, size: int, first: int = 0) -> list[int]:
    """cu_seqlens of windows of `size` tokens, the first `first` tokens (or `size`) long and
    the last what is left (Qwen2.5-VL's windows at the image's edges)."""
    cuts = list(range(first or size, n, size))
    return [0, *cuts, n]


def layouts(n: int) -> list[list[int]]:
    """Segment layouts of n tokens: one segment, windows of 64 with ragged edges, and many
    small ones (1 to 7 tokens)."""
    rng = np.random.default_rng(n)
    small = np.cumsum(rng.integers(1, 8, size=n))
    return [
        [0, n],
        windows(n, 64, first=min(n, 10)),
        [0, *[int(c) for c in small if c < n], n],
    ]


class SeqLayer(nn.Module):
    """A patch embedding and one pre-norm layer with a 2D-RoPE-like rotary embedding: what
    such a tower computes, on a symbolic token count. `var_len`: attention by cu_seqlens."""

    def __init__(self, var_len: bool):
        self.embed = Linear(PATCH, DIM)
        self.norm1 = nn.LayerNorm(DIM, eps=EPS)
        self.qkv = Linear(DIM, 3 * DIM)
        self.proj = Linear(DIM, DIM)
        self.norm2 = RMSNorm(DIM, EPS)
        self.var_len = var_len

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, seqstart: Tensor | None = None):
        b, n, _ = x.shape
        h = self.embed(x)
        qkv = op.reshape(self.qkv(self.norm1(h)), (b, n, 3, HEADS, HD))
        q, k, v = (op.reshape(t, (b, n, HEADS, HD)) for t in op.split(qkv, 3, axis=2))
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)  # (1, n, H, hd)
        if self.var_len:
            a = op.wrap_nested(
                relax.op.nn.attention_var_len(
                    q._expr, k._expr, v._expr, seqstart._expr, relax.const(64, "int32")
                ),
                "attention_var_len",
            )
        else:
            a = op.scaled_dot_product_attention(q, k, v)
        h = h + self.proj(op.reshape(a, (b, n, DIM)))
        return self.norm2(h)


def rotary(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """t * cos + rotate_half(t) * sin, as HF's Qwen2.5-VL and Pixtral write it."""
    first, second = op.split(t, 2, axis=-1)
    return t * cos + op.concat([op.negative(second), first], dim=-1) * sin


def exported(var_len: bool) -> tuple[tvm.IRModule, list]:
    spec = {
        "x": nn.spec.Tensor([1, "n", PATCH], "float32"),
        "cos": nn.spec.Tensor([1, "n", 1, HD], "float32"),
        "sin": nn.spec.Tensor([1, "n", 1, HD], "float32"),
    }
    if var_len:
        spec["seqstart"] = nn.spec.Tensor(["segments"], "int32")
    mod, params = SeqLayer(var_len).export_tvm(spec={"forward": spec})
    return mod, [(name, tuple(int(d) for d in p.shape)) for name, p in params]


def inputs(n: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, n, PATCH)).astype(np.float32)
    angles = rng.uniform(0, 6.3, (1, n, 1, HD // 2))
    angles = np.concatenate([angles, angles], axis=-1)
    return [x, np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)]


def torch_attention(q, k, v, starts: list[int] | None):
    """Attention over (1, n, H, hd) tensors, segment by segment (`starts`: cu_seqlens)."""
    import torch
    import torch.nn.functional as F

    starts = starts or [0, q.shape[1]]
    parts = [
        F.scaled_dot_product_attention(*(t[:, a:z].transpose(1, 2) for t in (q, k, v)))
        for a, z in zip(starts, starts[1:], strict=False)
        if z > a
    ]
    return torch.cat(parts, dim=2).transpose(1, 2)


def torch_seq_layer(t: dict, x, cos, sin, starts: list[int] | None):
    """`SeqLayer` in torch."""
    import torch
    import torch.nn.functional as F

    def rot(u):
        first, second = u.chunk(2, dim=-1)
        return u * cos + torch.cat([-second, first], dim=-1) * sin

    n = x.shape[1]
    h = torch_linear(t, "embed", x)
    normed = F.layer_norm(h, (DIM,), t["norm1.weight"], t["norm1.bias"], EPS)
    q, k, v = torch_linear(t, "qkv", normed).reshape(1, n, 3, HEADS, HD).unbind(2)
    a = torch_attention(rot(q), rot(k), v, starts).reshape(1, n, DIM)
    h = h + torch_linear(t, "proj", a)
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * t["norm2.weight"]


def run(executable, params: list, w: dict, *arrays) -> np.ndarray:
    """`forward` of a compiled build on the inputs `arrays` (its parameters packed)."""
    order, packed = pack_params(executable, [name for name, _ in params], w)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(packed[name]) for name in order]
    return vm["forward"](*(tvm.runtime.tensor(a) for a in arrays), *args).numpy()


def in_torch64(reference, w: dict, *arrays, starts=None) -> np.ndarray:
    import torch

    t = {k: torch.from_numpy(v).double() for k, v in w.items()}
    return reference(t, *(torch.from_numpy(a).double() for a in arrays), starts).numpy()


# -- IR ------------------------------------------------------------------------------------


@pytest.mark.ir
@pytest.mark.parametrize("var_len", [False, True], ids=["attention", "var_len"])
def test_symbolic_layer_runs_the_kernels(var_len):
    """With n symbolic, the GEMMs, both norms and attention (or its var_len form) are
    kernel calls; no hot op is left."""
    mod = rewrite_to_kernels(exported(var_len)[0], FLOAT32_KERNELS)
    calls = kernel_calls(mod)
    assert (calls["gemm"], calls["layer_norm"], calls["rms_norm"]) == (3, 1, 1)
    assert (calls["attention_seq"], calls["attn_segments"]) == (1, int(var_len))
    hot = {"matmul", "nn.attention", "nn.attention_var_len", "nn.layer_norm", "nn.rms_norm"}
    assert not forward_ops(mod) & hot


@pytest.mark.ir
@pytest.mark.parametrize("var_len", [False, True], ids=["attention", "var_len"])
def test_symbolic_layer_leaves_only_elementwise_ops_parallel(var_len):
    """What stays on the fallback schedule: the rotary embedding and the q/k/v split, each
    parallelized over its symbolic rows."""
    report = fallback_report(exported(var_len)[0], HOST)
    ops = {op for entry in report for op in entry["ops"]}
    assert ops <= {"split", "multiply", "negative", "concat", "add", "reshape"}, report
    assert all(entry["parallel"] for entry in report), report


@pytest.mark.ir
def test_var_len_lowers_to_masked_attention():
    """Without the kernels, `attention_var_len` becomes attention with a bias, which
    legalizes; the CPU rewrite takes it first where it can."""
    mod = exported(True)[0]
    lowered = lower_attention_var_len(mod)["forward"].script()
    assert "R.nn.attention_var_len(" not in lowered and "R.nn.attention_bias(" in lowered
    assert "R.nn.attention_var_len(" not in rewrite_to_kernels(mod, FLOAT32_KERNELS).script()


# -- numbers -------------------------------------------------------------------------------

# (target options, precision, tolerance relative to max|reference|)
BUILDS = {
    "float32": ({}, "float32", 1e-5),
    "avx2": ({"mcpu": "x86-64-v3"}, "float32", 1e-5),
    "bfloat16": ({}, "bfloat16", HALF_TOLERANCE["bfloat16"]),
}


@pytest.mark.parity
@pytest.mark.parametrize("build", ["float32", "avx2", pytest.param("bfloat16", marks=needs_bf16)])
@pytest.mark.parametrize("var_len", [False, True], ids=["attention", "var_len"])
def test_symbolic_layer_against_torch(build, var_len):
    """One build of the layer, run at every n of `TOKENS` (and with var_len, each segment
    layout of `layouts`), against torch in float64."""
    options, precision, tolerance = BUILDS[build]
    mod, params = exported(var_len)
    target = cpu_target(options)
    executable = llvm.compile(mod, target, precision)
    assert executable.fallback_ops == fallback_report(mod, target, precision)
    w = weights(params)
    for n in TOKENS:
        arrays = inputs(n)
        for starts in layouts(n) if var_len else [None]:
            extra = [np.array(starts, np.int32)] if var_len else []
            ours = run(executable, params, w, *arrays, *extra)
            ref = in_torch64(torch_seq_layer, w, *arrays, starts=starts)
            assert_close(ours, ref, tolerance)


def test_var_len_through_the_stock_pipeline():
    """The lowered `attention_var_len` on TVM's own llvm pipeline (no kernels), against
    torch per segment."""
    mod, params = exported(True)
    executable = tvm.compile(lower_attention_var_len(mod), "llvm")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    w = weights(params)
    args = [tvm.runtime.tensor(w[name]) for name, _ in params]
    for n in (5, 100):
        arrays = inputs(n)
        for starts in layouts(n):
            extra = [tvm.runtime.tensor(np.array(starts, np.int32))]
            ours = vm["forward"](*(tvm.runtime.tensor(a) for a in arrays), *extra, *args)
            ref = in_torch64(torch_seq_layer, w, *arrays, starts=starts)
            assert_close(ours.numpy(), ref, 1e-5)


# Past one chunk of keys (512) and its N blocks: the online softmax's rescaling.
KERNEL_TOKENS = [1, 37, 100, 513, 1100]


@pytest.mark.parity
@pytest.mark.parametrize(
    "cfg",
    [
        kernels.KernelConfig(vec=16, nv=4, mr=6),
        pytest.param(kernels.KernelConfig(vec=16, nv=4, mr=6, bf16=True), marks=needs_bf16),
    ],
    ids=["float32", "bfloat16"],
)
@pytest.mark.parametrize("D", [64, 80, 40])
@pytest.mark.parametrize("var_len", [False, True], ids=["attention", "var_len"])
def test_sequence_kernel_against_numpy(cfg, D, var_len):
    """The sequence kernel (head dims of whole vectors, 5 vectors, a tail; 4 rows a tile at
    80) on key counts past one chunk, built once; var_len on each segment layout."""
    H = 2
    build = {
        "pack_k": kernels.attn_pack_k_kernel(cfg, None, H, D),
        "pack_v": kernels.attn_pack_v_kernel(cfg, None, H, D),
        "attention": kernels.attention_seq_kernel(cfg, H, D, D**-0.5, segments=var_len),
        "segments": kernels.attn_segments_kernel(),
    }
    f = {name: compile_kernel(func, HOST) for name, func in build.items()}
    rng = np.random.default_rng(D)
    for n in KERNEL_TOKENS:
        q, k, v = (rng.standard_normal((1, n, H, D)).astype(np.float32) for _ in range(3))
        (DK, _), (SK, DP) = kernels.attn_packed(cfg, n, D)
        kt = tvm.runtime.empty((1, H, DK, kernels.attn_seq_padding(cfg, n, var_len)), "float32")
        vp = tvm.runtime.empty((1, H, SK, DP), "float32")
        f["pack_k"](tvm.runtime.tensor(k), kt)
        f["pack_v"](tvm.runtime.tensor(v), vp)
        for starts in layouts(n) if var_len else [None]:
            o = tvm.runtime.empty((1, n, H, D), "float32")
            args = [tvm.runtime.tensor(q), kt, vp]
            if var_len:
                seqstart = tvm.runtime.tensor(np.array(starts, np.int32))
                ranges = tvm.runtime.empty((n, 2), "int32")
                f["segments"](seqstart, seqstart, n, ranges)
                args.append(ranges)
            f["attention"](*args, n, o)
            ref = numpy_attention(q, k, v, starts)
            assert_close(o.numpy(), ref, 2e-2 if cfg.bf16 else 1e-5)


def numpy_attention(q, k, v, starts: list[int] | None) -> np.ndarray:
    """Attention in float64, keys masked outside each query's segment."""
    n = q.shape[1]
    s = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k.astype(np.float64))
    s = s * q.shape[-1] ** -0.5
    if starts is not None:
        ids = np.searchsorted(np.array(starts[1:]), np.arange(n), side="right")
        s = np.where((ids[:, None] == ids[None, :])[None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v.astype(np.float64))
