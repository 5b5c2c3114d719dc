"""The scheduled CPU pipeline against TVM's stock llvm pipeline on shapes that stress its
kernels: widths that are not multiples of the vector panel, head dims that are not powers of
two, token counts that are not multiples of the row tile, several batch sizes."""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import tvm
from tvm import relax

from builder import artifact
from builder.assemble import export
from builder.config import BlocksConfig, CLIPVisionConfig, TargetConfig
from builder.packing import Packed, pack_params
from builder.runtime import available_cores
from builder.targets import llvm
from builder.targets.cpu import kernels, pipeline
from builder.targets.cpu.pipeline import compile_kernel
from builder.targets.cpu.report import FallbackReport
from builder.targets.cpu.rewrite import rewrite_to_kernels
from builder.targets.cpu.widen import widen_to_float32
from builder.weights.random_init import random_weights

from .conftest import (
    HOST,
    REPO,
    assert_close,
    cpu_target,
    needs_avx512,
    needs_bf16,
    needs_half,
    pixels,
    rounding,
)

pytestmark = pytest.mark.parity

CASES = {
    "quick_gelu": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4),
    "gelu-mlp100": dict(
        hidden_size=64, intermediate_size=100, num_attention_heads=4, hidden_act="gelu"
    ),
    "gelu_tanh-head72": dict(  # and, like SigLIP so400m, an image side that patches do not fill
        hidden_size=144,
        intermediate_size=200,
        num_attention_heads=2,
        hidden_act="gelu_tanh",
        image_size=32,
    ),
    "hidden40-final-postln": dict(
        hidden_size=40,
        intermediate_size=96,
        num_attention_heads=5,
        feature_layer=-1,
        post_layernorm=True,
    ),
}


# float16 and bfloat16 GEMMs: relative to max|stock float32|. Measured 1.1-2.7e-3 on these
# cases for float16 (float16 operands, float16 partial sums of 64 products), 2.9-6.1e-3
# for bfloat16 (8 significant bits, float32 sums).
HALF_TOLERANCE = {"float16": 1e-2, "bfloat16": 3e-2}


# (target options, precision): this CPU, its float16 GEMMs, and AVX2 code (8-lane vectors,
# 6 x 2-vector tiles), which this CPU also runs.
BUILDS = {
    "float32": ({}, "float32"),
    "float16": ({}, "float16"),
    "bfloat16": ({}, "bfloat16"),
    "avx2": ({"mcpu": "x86-64-v3"}, "float32"),
}


@functools.cache
def stock_reference(case: str) -> tuple[CLIPVisionConfig, tvm.IRModule, list, dict, dict]:
    """A case's tower, its weights, and the outputs of TVM's stock pipeline (for this CPU)
    on `pixels(batch, image_size, seed=batch)` at batch 1, 3 and 7: compiled once per case for
    every build it is compared with."""
    config = CLIPVisionConfig(
        num_hidden_layers=2, patch_size=6, **{"feature_layer": -1, "image_size": 30, **CASES[case]}
    )
    mod, params = export(config, BlocksConfig())
    arrays = random_weights(dict(params), seed=5)
    # Unit scales and zero biases would hide a swapped norm weight and bias: perturb them.
    rng = np.random.default_rng(0)
    arrays = {
        k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.1 for k, v in arrays.items()
    }
    stock = relax.VirtualMachine(tvm.compile(mod, HOST), tvm.cpu())["forward"]
    stock_params = [tvm.runtime.tensor(arrays[n]) for n, _ in params]
    refs = {
        batch: stock(tvm.runtime.tensor(image(batch, config)), *stock_params).numpy()
        for batch in (1, 3, 7)
    }
    return config, mod, params, arrays, refs


def image(batch: int, config: CLIPVisionConfig) -> np.ndarray:
    return pixels(batch, config.image_size, seed=batch)


@pytest.mark.parametrize(
    "build",
    [
        "float32",
        pytest.param("float16", marks=needs_half),
        pytest.param("bfloat16", marks=needs_bf16),
        "avx2",
    ],
    ids=str,
)
@pytest.mark.parametrize("case", sorted(CASES))
def test_scheduled_equals_stock_pipeline(case, build):
    options, precision = BUILDS[build]
    config, mod, params, arrays, refs = stock_reference(case)
    order = [name for name, _ in params]
    target = cpu_target(options)
    scheduled = llvm.compile(mod, target, precision)
    packed_order, packed = pack_params(scheduled, order, arrays)
    assert packed is not arrays  # the pipeline packs weights at build time
    fast = relax.VirtualMachine(scheduled, tvm.cpu())["forward"]
    fast_params = [tvm.runtime.tensor(packed[n]) for n in packed_order]
    for batch, ref in refs.items():
        ours = fast(tvm.runtime.tensor(image(batch, config)), *fast_params).numpy()
        if precision == "float32":
            assert_close(ours, ref, rel=1e-5)
        else:
            # the 16-bit type was used
            assert assert_close(ours, ref, rel=HALF_TOLERANCE[precision]) > 1e-5


@pytest.mark.parametrize(
    "mcpu,lanes,vectors",
    [("skylake-avx512", 16, 4), ("x86-64-v3", 8, 2), ("x86-64", 4, 2), ("generic", 4, 2)],
)
def test_kernel_config_follows_the_target(mcpu, lanes, vectors):
    """Vector lanes and tile width from the target's features (TVM 0.27's
    llvm_get_vector_width says 512 bits for every x86 CPU), the cores from its num-cores,
    the L2 the smallest of AVX-512 server cores for a CPU other than the build machine's;
    float16 GEMMs only with AVX-512 FP16."""
    triple = {"mtriple": "aarch64-linux-gnu"} if mcpu == "generic" else {}
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 3, **triple})
    cfg = kernels.kernel_config(target)
    assert (cfg.vec, cfg.nv, cfg.cores) == (lanes, vectors, 3)
    if mcpu != tvm.target.codegen.llvm_get_system_cpu():
        assert cfg.l2 == 1 << 20
    with pytest.raises(ValueError, match="float16 GEMMs need AVX-512 FP16"):
        kernels.kernel_config(target, half=True)
    sapphire = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})
    assert kernels.kernel_config(sapphire, half=True).half


LAYERS = 2
FLOAT32_KERNELS = kernels.KernelConfig(vec=16, nv=4, mr=6)  # for rewrites only: any CPU


def small_tower(dtype: str = "float32", **fields) -> tuple[tvm.IRModule, list]:
    """A 2-layer quick_gelu tower, exported: the module and its parameters."""
    fields = {"image_size": 30, "patch_size": 6, **CASES["quick_gelu"], **fields}
    config = CLIPVisionConfig(num_hidden_layers=LAYERS, feature_layer=-1, **fields)
    return export(config, BlocksConfig(), dtype)


def op_calls(mod: tvm.IRModule) -> collections.Counter:
    """The Relax ops that the rewrite turns into kernels, as called in `forward`."""
    ops = r"R\.(matmul|nn\.layer_norm|nn\.conv2d|nn\.attention)\("
    return collections.Counter(re.findall(ops, mod["forward"].script()))


def kernel_calls(mod: tvm.IRModule) -> collections.Counter:
    """The kernels that `forward` calls, by kind (gemm, pack_weight, layer_norm, ...)."""
    called = re.findall(r"call_tir\((\w+)", mod["forward"].script())
    return collections.Counter(re.sub(r"\d+$", "", name) for name in called)


def test_half_rewrite_computes_each_value_once():
    """With float16 GEMMs, LayerNorm and fc1 write float16 pairs for the GEMMs that read
    them, and their float32 values are dropped, with the kernels only those made: one kernel
    call per matmul, LayerNorm and conversion of the model, none twice."""
    mod, _ = small_tower()
    ops = op_calls(mod)
    rewritten = rewrite_to_kernels(mod, dataclasses.replace(FLOAT32_KERNELS, half=True))
    kernel_names = {
        gv.name_hint for gv, f in rewritten.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    }
    called = set(re.findall(r"call_tir\((\w+)", rewritten["forward"].script()))
    assert kernel_names == called  # no kernel left in the module that nothing calls
    calls = kernel_calls(rewritten)
    assert calls["gemm"] == ops["matmul"] + ops["nn.conv2d"] == 6 * LAYERS + 1
    assert calls["pack_weight"] == calls["gemm"]
    assert calls["layer_norm"] == ops["nn.layer_norm"]
    # Converted on their own: the patch conv's im2col and each attention output.
    assert calls["to_pairs"] == 1 + LAYERS


def test_library_holds_only_the_functions_it_calls():
    """After the Relax passes, every PrimFunc left in the module is called by a Relax
    function: the reshapes that the dataflow lowering turned into views leave no code in the
    library."""
    mod, _ = small_tower()
    lowered, cfg = pipeline._with_kernels(mod, HOST, "float32")
    with HOST, tvm.transform.PassContext(opt_level=3, config=pipeline.PASS_CONFIG):
        out = tvm.transform.Sequential(pipeline._relax_passes(HOST, cfg, FallbackReport()))(lowered)
    prims = {gv.name_hint for gv, f in out.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    called = set(re.findall(r"cls\.(\w+)", out.script()))  # PrimFuncs call nothing
    assert {"gemm", "attention", "layer_norm"} <= prims <= called


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rounded_operands_once_per_value(dtype):
    """`precision: float16` or `bfloat16` without the arithmetic: every GEMM weight and
    every GEMM input value is rounded to the type once (Q, K and V share theirs), by the
    rounding kernel, and the GEMMs stay the float32 kernels."""
    rewritten = rewrite_to_kernels(small_tower()[0], FLOAT32_KERNELS, rounded=dtype)
    calls = kernel_calls(rewritten)
    assert calls["gemm"] == 6 * LAYERS + 1 and calls["to_pairs"] == 0
    weights = 6 * LAYERS + 1
    inputs = 1 + 4 * LAYERS  # im2col; per layer LayerNorm 1 (Q, K, V), attention, LayerNorm 2, fc1
    assert calls["round"] == weights + inputs


@pytest.mark.parametrize(
    "options, dtype, precision",
    [
        ({}, "float32", "float32"),
        ({}, "bfloat16", "float32"),  # the casts to float32 lifted with the packing
        (rounding("bfloat16"), "float32", "bfloat16"),  # rounding kernels before the packing
        pytest.param({}, "float32", "bfloat16", marks=needs_bf16),  # bfloat16 pairs
    ],
    ids=["float32", "bfloat16-model", "rounded", "bf16-pairs"],
)
def test_packing_into_buffers_equals_transform_params(options, dtype, precision, tmp_path):
    """`transform_params_into` writes each kernel-made result into the buffer it is given
    (`transform_params_into_shapes`), and every result equals `transform_params`' bit for
    bit; `pack_params` stores those, the parameters read where they lie. Packed step by
    step (`packing_steps`), as a build packs while it writes, the results are the same."""
    mod, params = small_tower(dtype)
    target = cpu_target(options)
    executable = llvm.compile(mod, target, precision)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    order = [name for name, _ in params]
    arrays = artifact.cast_params(random_weights(dict(params), seed=5), dtype)
    inputs = [tvm.runtime.tensor(arrays[name]) for name in order]
    reference = [t.numpy() for t in vm["transform_params"](*inputs)]
    shapes = [tuple(int(d) for d in s) for s in vm["transform_params_into_shapes"]()]
    gemms = 6 * LAYERS + 1
    assert len(shapes) == gemms and len(reference) > gemms
    buffers = artifact.empty_arrays([(shape, np.dtype(np.float32)) for shape in shapes])
    for b in buffers:
        b.fill(np.nan)
    results = vm["transform_params_into"](*inputs, *(tvm.runtime.from_dlpack(b) for b in buffers))
    got = [t.numpy() for t in results]
    assert [r.dtype for r in got] == [r.dtype for r in reference]
    for ours, ref in zip(got, reference, strict=True):
        np.testing.assert_array_equal(ours.view(np.uint8), ref.view(np.uint8))
    addresses = {np.from_dlpack(t).ctypes.data for t in results if str(t.dtype) != "bfloat16"}
    assert {b.ctypes.data for b in buffers} <= addresses  # written where they were given
    names, packed = pack_params(executable, order, arrays)
    assert names == [f"packed.{i}" for i in range(len(reference))]
    for name, ref in zip(names, reference, strict=True):
        np.testing.assert_array_equal(packed[name].view(np.uint8), ref.view(np.uint8))
    # One step per result, each kernel-made one computed alone into a buffer of the caller's,
    # and the file written from the steps is the file of the whole call, byte for byte.
    steps = executable.pack_steps
    assert len(steps) == len(reference)
    assert sum("calls" in step for step in steps) >= gemms  # a bfloat16 model: its casts too
    names, streamed = pack_params(executable, order, arrays, steps)
    assert names == [f"packed.{i}" for i in range(len(reference))]
    for name, ref in zip(names, reference, strict=True):
        value = streamed[name]
        if isinstance(value, Packed):
            out = artifact.empty_arrays([(value.shape, value.dtype)])[0]
            out.fill(np.nan)
            value.fill(out)
            value = out
        assert (value.dtype, value.shape) == (ref.dtype, ref.shape)
        np.testing.assert_array_equal(value.view(np.uint8), ref.view(np.uint8))
    whole, steady = tmp_path / "whole", tmp_path / "streamed"
    whole.mkdir(), steady.mkdir()
    artifact.save_params(whole, names, packed)
    artifact.save_params(steady, names, streamed)
    assert (whole / artifact.PARAMS).read_bytes() == (steady / artifact.PARAMS).read_bytes()


def test_patch_conv_with_a_remainder_is_a_gemm():
    """An image side that is not a multiple of the patch (SigLIP so400m: 384 px, patch 14)
    still makes the patch conv a GEMM: the conv drops the remainder, and so does the crop
    before the im2col. (The stock pipeline's result is compared in
    test_scheduled_equals_stock_pipeline's 'gelu_tanh-head72' case, 32 px.)"""
    mod, _ = small_tower(image_size=32)  # 5 x 5 patches of 6, 2 px left over
    assert op_calls(mod)["nn.conv2d"] == 1
    rewritten = rewrite_to_kernels(mod, FLOAT32_KERNELS)
    assert op_calls(rewritten) == {}
    assert kernel_calls(rewritten)["gemm"] == 6 * LAYERS + 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtype_model_becomes_the_float32_graph(dtype):
    """A float16 / bfloat16 model reaches the kernel rewrite as the float32 graph: each
    parameter cast once, no value computed in the half dtype, and the same kernel calls as
    the float32 model (without the widening, only the patch conv's: about 100x slower)."""
    half, params = small_tower(dtype)
    widened = widen_to_float32(half)
    func = widened["forward"]
    assert all(str(p.ty.dtype) == dtype for p in func.params[1:])  # the signature stays
    casts = collections.Counter()
    for block in func.body.blocks:
        for b in block.bindings:
            assert str(b.var.ty.dtype) == "float32", b.var
            if getattr(b.value, "op", None) == tvm.ir.Op.get("relax.astype"):
                casts[b.value.args[0].name] += 1
    assert casts == {name: 1 for name, _ in params}

    def rewritten(mod):
        return kernel_calls(rewrite_to_kernels(mod, FLOAT32_KERNELS))

    assert rewritten(widened) == rewritten(small_tower()[0])
    assert rewritten(half)["gemm"] == 1  # unwidened: only the patch conv (in float32)


def test_widening_keeps_what_the_graph_computes():
    """A hand-made float16 graph with each case the widening handles: a cast of the input
    and back, a parameter used directly, a float16 constant, an op whose attribute names
    float16 (`zeros`), and the function's output bound to a dropped cast; run by TVM's stock
    pipeline, it computes the float32 graph of the float16 parameter."""
    x = relax.Var("x", relax.TensorType((2, 4), "float32"))
    w = relax.Var("w", relax.TensorType((2, 4), "float16"))
    bb = relax.BlockBuilder()
    with bb.function("forward", [x, w]):
        with bb.dataflow():
            h = bb.emit(relax.op.astype(x, "float16"))
            h = bb.emit(relax.op.multiply(h, w))
            h = bb.emit(relax.op.add(h, relax.const(1.7, "float16")))
            h = bb.emit(relax.op.add(h, relax.op.zeros((2, 4), "float16")))
            out = bb.emit_output(relax.op.astype(h, "float32"))
        bb.emit_func_output(out)
    widened = widen_to_float32(bb.finalize())
    bindings = widened["forward"].body.blocks[0].bindings
    half = [b.value.op.name for b in bindings if str(b.var.ty.dtype) != "float32"]
    assert half == ["relax.zeros"]  # its attribute says float16; a cast follows it
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((2, 4)).astype(np.float32)
    ws = rng.standard_normal((2, 4)).astype(np.float16)
    vm = relax.VirtualMachine(tvm.compile(widened, "llvm"), tvm.cpu())
    got = vm["forward"](tvm.runtime.tensor(xs), tvm.runtime.tensor(ws)).numpy()
    want = xs * ws.astype(np.float32) + np.float32(np.float16(1.7))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    in_float16 = (xs.astype(np.float16) * ws + np.float16(1.7)).astype(np.float32)
    assert not np.allclose(got, in_float16, rtol=1e-6)  # the inputs tell the two apart


def rounded(a: np.ndarray, pairs: str) -> np.ndarray:
    """`a` rounded to float16 (numpy's rounding) or bfloat16 (ml_dtypes', to nearest even),
    as float32."""
    return a.astype(np.float16 if pairs == "float16" else ml_dtypes.bfloat16).astype(np.float32)


def pair_words(a: np.ndarray, pairs: str = "float16") -> np.ndarray:
    """`a` [R, K] rounded to `pairs`, as the kernels' words: [R, K/2] uint32 of (even k,
    odd k) pairs, an odd K's last word padded with a zero half."""
    r = rounded(a, pairs)
    bits = r.astype(np.float16).view(np.uint16) if pairs == "float16" else r.view(np.uint32) >> 16
    h = np.zeros((a.shape[0], a.shape[1] + a.shape[1] % 2), np.uint16)
    h[:, : a.shape[1]] = bits
    return h.view(np.uint32)


def with_epilogue(v: np.ndarray, act) -> np.ndarray:
    """The GEMM kernels' activation, in float64."""
    if act == ("silu", 1.702):
        return v / (1 + np.exp(-1.702 * v))
    if act == ("gelu",):
        return 0.5 * v * (1 + np.vectorize(math.erf)(v / np.sqrt(2)))
    assert act is None
    return v


@pytest.mark.parametrize(
    "M,K,N,act,steps",
    [
        # k steps: weight blocks of 64 columns (AVX-512's) over half the L2; AVX2's 16-column
        # blocks need K over 8192 for that.
        pytest.param(13, 2304, 128, ("gelu",), 2, marks=needs_avx512),
        pytest.param(8, 4304, 64, None, 3, marks=needs_avx512),
        (7, 75, 70, ("silu", 1.702), 1),
    ],
    ids=str,
)
def test_gemm_against_numpy(M, K, N, act, steps):
    """The float32 GEMM against float64 sums: weight blocks of over 512 KiB in k steps (the
    partial sums kept in Y between them), a full row tile, a last tile of 1 or 2 rows (run
    row by row), a ragged last weight block, and the residual epilogue. The L2 is set to
    1 MiB (Zen 4 and 5), where the host's may be larger."""
    cfg = dataclasses.replace(kernels.kernel_config(HOST), l2=1 << 20)
    assert len(kernels.gemm_k_steps(cfg, K, N)) == steps
    rng = np.random.default_rng(K)
    x = rng.standard_normal((M, K), dtype=np.float32)
    w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
    bias, res = rng.standard_normal(N).astype(np.float32), rng.standard_normal((M, N))
    wp = tvm.runtime.empty((-(-N // cfg.nb), K, cfg.nb), "float32")
    compile_kernel(kernels.pack_weight_kernel(cfg, N, K, True), HOST)(tvm.runtime.tensor(w), wp)
    gemm = compile_kernel(kernels.gemm_kernel(cfg, K, N, True, act, True), HOST)
    y = tvm.runtime.empty((M, N), "float32")
    gemm(
        tvm.runtime.tensor(x),
        wp,
        tvm.runtime.tensor(bias),
        tvm.runtime.tensor(res.astype(np.float32)),
        y,
    )
    v = with_epilogue(x.astype(np.float64) @ w.astype(np.float64).T + bias, act)
    assert_close(y.numpy(), v + res, rel=1e-5)


@pytest.mark.parametrize("vectors", [(16, 4), (8, 2)], ids=["avx512", "avx2"])
@pytest.mark.parametrize("N, K", [(128, 64), (100, 37), (64, 7), (20, 40), (192, 4096)])
@pytest.mark.parametrize("nk", [True, False], ids=["NK", "KN"])
def test_pack_weight_layout(N, K, nk, vectors):
    """The packed layout, as numpy writes it: W's columns (rows of an [N, K] weight) in
    panels of NB, `[ceil(N/NB), K, NB]`, zero past N; whole panels go through the tiled
    copy, a ragged last panel, a K short of a tile and a [K, N] weight element by element."""
    vec, nv = vectors
    cfg = kernels.KernelConfig(vec=vec, nv=nv, mr=6)
    target = HOST if vec == 16 else llvm.tvm_target(TargetConfig(mcpu="x86-64-v3"))[0]
    w = np.random.default_rng(N + K).standard_normal((N, K)).astype(np.float32)
    NP = -(-N // cfg.nb)
    padded = np.zeros((NP * cfg.nb, K), np.float32)
    padded[:N] = w
    expected = padded.reshape(NP, cfg.nb, K).transpose(0, 2, 1)
    wp = tvm.runtime.tensor(np.full((NP, K, cfg.nb), np.nan, np.float32))
    source = w if nk else np.ascontiguousarray(w.T)
    compile_kernel(kernels.pack_weight_kernel(cfg, N, K, nk), target)(
        tvm.runtime.tensor(source), wp
    )
    np.testing.assert_array_equal(wp.numpy(), expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rounding_kernel_matches_numpy(dtype):
    """The float32 GEMMs' operands under a 16-bit `precision` without its arithmetic
    (`round_kernel`; for bfloat16 the same bit operations as the bfloat16 GEMMs'
    conversions): numpy's float16, ml_dtypes' bfloat16 (nearest, ties to even), bit for bit;
    whole vectors and a scalar tail."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 75)).astype(np.float32)
    bits = x.view(np.uint32)
    bits[0, :40] = (bits[0, :40] & 0xFFFF0000) | 0x8000  # bfloat16's exact ties, odd and even
    bits[1, :40] = (bits[1, :40] & 0xFFFF0000) | 0x7FFF  # just below them
    y = tvm.runtime.empty(x.shape, "float32")
    compile_kernel(kernels.round_kernel(kernels.kernel_config(HOST), 75, dtype), HOST)(
        tvm.runtime.tensor(x), y
    )
    want = rounded(x, dtype)
    np.testing.assert_array_equal(y.numpy().view(np.uint32), want.view(np.uint32))
    if dtype == "float16":
        return
    odd = (bits[0, :40] >> 16) & 1 == 1
    assert odd.any() and (~odd).any()  # ties both ways: up from odd, down from even
    assert (want.view(np.uint32)[0, :40][odd] >> 16 == (bits[0, :40][odd] >> 16) + 1).all()


@pytest.mark.parametrize("S", [20, 64])
def test_k_pack_writes_every_key_with_4_lane_vectors(S):
    """With 4-lane vectors (NEON, SSE) the N block is 8 keys: K^T's width an odd number of
    blocks (20 keys: 24) is still packed whole, in tiles of 8 keys."""
    cfg = kernels.KernelConfig(vec=4, nv=2, mr=6)
    H, D = 2, 8
    k = np.random.default_rng(S).standard_normal((1, S, H, D)).astype(np.float32)
    (DK, SP), _ = kernels.attn_packed(cfg, S, D)
    kt = tvm.runtime.tensor(np.full((1, H, DK, SP), np.nan, np.float32))
    compile_kernel(kernels.attn_pack_k_kernel(cfg, S, H, D), HOST)(tvm.runtime.tensor(k), kt)
    want = np.zeros((1, H, DK, SP), np.float32)
    want[..., :S] = k.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(kt.numpy(), want)


@pytest.mark.parametrize("queries", [1, 7])
def test_cross_attention_kernel_against_numpy(queries):
    """Fewer queries than keys (SigLIP's pooling probe: one) through the attention kernel."""
    cfg = kernels.kernel_config(HOST)
    B, S, H, D = 2, 50, 3, 16
    rng = np.random.default_rng(queries)
    q = rng.standard_normal((B, queries, H, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, S, H, D)).astype(np.float32) for _ in range(2))
    SP, DP = kernels.attn_padding(cfg, S, D)
    kt = tvm.runtime.empty((B, H, D, SP), "float32")
    vp = tvm.runtime.empty((B, H, S, DP), "float32")
    compile_kernel(kernels.attn_pack_k_kernel(cfg, S, H, D), HOST)(tvm.runtime.tensor(k), kt)
    compile_kernel(kernels.attn_pack_v_kernel(cfg, S, H, D), HOST)(tvm.runtime.tensor(v), vp)
    o = tvm.runtime.empty((B, queries, H, D), "float32")
    attention = kernels.attention_kernel(cfg, S, H, D, D**-0.5, queries=queries)
    compile_kernel(attention, HOST)(tvm.runtime.tensor(q), kt, vp, o)
    s = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k) * D**-0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)
    assert_close(o.numpy(), ref, rel=1e-5)


@needs_bf16
@pytest.mark.parametrize(
    "S,D,queries",
    [(51, 16, None), (50, 64, None), (197, 64, 1), (26, 72, 7)],
    ids=["odd-keys-scalar-q", "vector-q", "probe", "head72"],
)
def test_bf16_attention_against_numpy(S, D, queries):
    """bfloat16 attention (AVX-512 BF16): K^T packed as pairs along the head dim and V as
    pairs of keys, bit for bit the roundings to bfloat16 (an odd head dim or key count
    padded with a zero half); the output that of float64 sums of the rounded Q, K and V and
    of the rounded unnormalized probabilities, with the softmax in float32. Odd key counts,
    head dims converted in vectors (64) and one at a time (16, 72: 4-row tiles), and fewer
    queries than keys."""
    cfg = kernels.kernel_config(HOST, bf16=True)
    B, H = 2, 3
    SQ = S if queries is None else queries
    rng = np.random.default_rng(S + D)
    q = rng.standard_normal((B, SQ, H, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, S, H, D)).astype(np.float32) for _ in range(2))
    (kt_shape, vp_shape) = kernels.attn_packed(cfg, S, D)
    SP, DP = kernels.attn_padding(cfg, S, D)
    assert kt_shape == (-(-D // 2), SP) and vp_shape == (-(-S // 2), DP)
    kt = tvm.runtime.empty((B, H, *kt_shape), "float32")
    vp = tvm.runtime.empty((B, H, *vp_shape), "float32")
    compile_kernel(kernels.attn_pack_k_kernel(cfg, S, H, D), HOST)(tvm.runtime.tensor(k), kt)
    compile_kernel(kernels.attn_pack_v_kernel(cfg, S, H, D), HOST)(tvm.runtime.tensor(v), vp)
    keys = np.zeros((B, H, SP, D), np.float32)  # each key's head dim, keys padded to SP
    keys[:, :, :S] = k.transpose(0, 2, 1, 3)
    want_kt = pair_words(keys.reshape(-1, D), "bfloat16").reshape(B, H, SP, -1)
    np.testing.assert_array_equal(kt.numpy().view(np.uint32), want_kt.transpose(0, 1, 3, 2))
    values = np.zeros((B, H, DP, S), np.float32)  # each head dim's keys, head dim padded
    values[:, :, :D] = v.transpose(0, 2, 3, 1)
    want_vp = pair_words(values.reshape(-1, S), "bfloat16").reshape(B, H, DP, -1)
    np.testing.assert_array_equal(vp.numpy().view(np.uint32), want_vp.transpose(0, 1, 3, 2))
    o = tvm.runtime.empty((B, SQ, H, D), "float32")
    attention = kernels.attention_kernel(cfg, S, H, D, D**-0.5, queries=queries)
    compile_kernel(attention, HOST)(tvm.runtime.tensor(q), kt, vp, o)

    def reference(q, k, v, round_p):
        s = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k) * D**-0.5
        p = np.exp(s - s.max(-1, keepdims=True))
        pv = rounded(p.astype(np.float32), "bfloat16") if round_p else p
        return np.einsum("bhqk,bkhd->bqhd", pv, v) / p.sum(-1)[..., None].transpose(0, 2, 1, 3)

    bf16 = [rounded(a, "bfloat16") for a in (q, k, v)]
    assert_close(o.numpy(), reference(*bf16, True), rel=1e-3)
    # against float32 operands: bfloat16's error, not float32's
    assert assert_close(o.numpy(), reference(q, k, v, False), rel=3e-2) > 1e-4


def test_bf16_attention_only_where_the_cpu_has_it():
    """`precision: bfloat16` makes attention's packed K and V bfloat16 pairs for a CPU with
    AVX-512 BF16 (Zen 4) and keeps them float32 for one without (x86-64-v4: AVX-512, no BF16),
    whose GEMMs take rounded operands instead; float32 keeps them float32 everywhere."""
    from builder.targets.cpu.pipeline import _with_kernels

    mod, _ = small_tower()
    D, S = 16, 26  # CASES["quick_gelu"]: width 64 in 4 heads; 30 px in patches of 6, and CLS

    def packed(mcpu: str, precision: str) -> dict[str, tuple[int, ...]]:
        target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
        forward = _with_kernels(mod, target, precision)[0]["forward"]
        call_tir, shapes = tvm.ir.Op.get("relax.call_tir"), {}
        for block in forward.body.blocks:
            for b in block.bindings:
                if isinstance(b.value, tvm.ir.Call) and b.value.op.same_as(call_tir):
                    name = re.sub(r"\d+$", "", b.value.args[0].name_hint)
                    if name.startswith("attn_pack"):
                        shapes[name] = tuple(int(d) for d in b.var.ty.shape.values[2:])
        return shapes

    SP = 64
    pairs = {"attn_pack_k": (D // 2, SP), "attn_pack_v": (S // 2, D)}
    floats = {"attn_pack_k": (D, SP), "attn_pack_v": (S, D)}
    assert packed("znver4", "bfloat16") == pairs
    assert packed("x86-64-v4", "bfloat16") == floats
    assert packed("znver4", "float32") == floats


# The float16 GEMM sums 64 products in float16 (measured 5.4-6.0e-4); the bfloat16 one sums
# in float32 (measured 5e-8 to 1e-6).
PAIR_GEMM_TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-5}


@pytest.mark.parametrize(
    "pairs",
    [pytest.param("float16", marks=needs_half), pytest.param("bfloat16", marks=needs_bf16)],
)
@pytest.mark.parametrize(
    "M,K,N,act",
    [(577, 1024, 256, ("silu", 1.702)), (7, 75, 70, ("gelu",)), (2, 130, 64, None)],
    ids=str,
)
def test_pair_gemm_against_numpy(M, K, N, act, pairs):
    """The float16 and bfloat16 GEMMs' operands are the roundings to that type, bit for bit
    (weights packed in panels of k pairs, the activations converted on the way in), and their
    results those of float64 sums of their products, within the float16 partial sums'
    rounding; odd K, a ragged last weight block, a last row tile of 1 row and every
    epilogue."""
    cfg = kernels.kernel_config(HOST, half=pairs == "float16", bf16=pairs == "bfloat16")
    rng = np.random.default_rng(K)
    x = rng.standard_normal((M, K), dtype=np.float32)
    w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
    bias, res = rng.standard_normal(N).astype(np.float32), rng.standard_normal((M, N))
    NP, KW = -(-N // cfg.nb), -(-K // 2)
    wp = tvm.runtime.empty((NP, KW, cfg.nb), "float32")
    compile_kernel(kernels.pack_weight_kernel(cfg, N, K, True), HOST)(tvm.runtime.tensor(w), wp)
    panels = np.zeros((NP * cfg.nb, K), np.float32)
    panels[:N] = w
    words = pair_words(panels, pairs).reshape(NP, cfg.nb, KW).transpose(0, 2, 1)
    np.testing.assert_array_equal(wp.numpy().view(np.uint32), words)
    xw = tvm.runtime.empty((M, KW), "float32")
    compile_kernel(kernels.pairs_kernel(cfg, K), HOST)(tvm.runtime.tensor(x), xw)
    np.testing.assert_array_equal(xw.numpy().view(np.uint32), pair_words(x, pairs))
    gemm = compile_kernel(kernels.gemm_kernel(cfg, K, N, True, act, True), HOST)
    y = tvm.runtime.empty((M, N), "float32")
    gemm(xw, wp, tvm.runtime.tensor(bias), tvm.runtime.tensor(res.astype(np.float32)), y)
    v = rounded(x, pairs).astype(np.float64) @ rounded(w, pairs).astype(np.float64).T
    v = with_epilogue(v + bias, act) + res
    assert_close(y.numpy(), v, rel=PAIR_GEMM_TOLERANCE[pairs])


# The GEMM and attention kernels hand out their tasks from a shared atomic counter. With more
# pool threads than cores, threads are preempted mid-task and take tasks in every order; an
# output prefilled with NaN shows a task that was skipped.
WORK_QUEUE = """
import numpy as np
from builder.tvm_import import import_tvm
tvm = import_tvm()  # without torch: seconds
from builder.targets import llvm
from builder.targets.cpu import kernels as K
from builder.targets.cpu.pipeline import compile_kernel
from builder.config import TargetConfig

target, _ = llvm.tvm_target(TargetConfig())
cfg = K.kernel_config(target)

def build(f):
    return compile_kernel(f, target)

def nan(shape):
    return tvm.runtime.tensor(np.full(shape, np.nan, "float32"))

rng = np.random.default_rng(0)
M, KD, N = 1001, 72, 200  # 167 row tiles, 4 weight blocks (the last ragged): 16 tasks
x, w, b = (rng.standard_normal(s).astype("float32") for s in ((M, KD), (N, KD), (N,)))
wp = nan((-(-N // cfg.nb), KD, cfg.nb))
build(K.pack_weight_kernel(cfg, N, KD, True))(tvm.runtime.tensor(w), wp)
gemm = build(K.gemm_kernel(cfg, KD, N, True, None, False))
half = K.half_gemms(target)
if half:
    hc = K.kernel_config(target, half=True)
    hwp, hx = nan((-(-N // hc.nb), KD // 2, hc.nb)), nan((M, KD // 2))
    build(K.pack_weight_kernel(hc, N, KD, True))(tvm.runtime.tensor(w), hwp)
    build(K.pairs_kernel(hc, KD))(tvm.runtime.tensor(x), hx)
    half_gemm = build(K.gemm_kernel(hc, KD, N, True, None, False))
B, S, H, D = 5, 50, 3, 72  # 13 query tiles of 4 per head: 2 tasks per (batch, head)
q, k, v = (rng.standard_normal((B, S, H, D)).astype("float32") for _ in range(3))
kt, vp = nan((B, H, D, K.attn_padding(cfg, S, D)[0])), nan((B, H, S, K.attn_padding(cfg, S, D)[1]))
build(K.attn_pack_k_kernel(cfg, S, H, D))(tvm.runtime.tensor(k), kt)
build(K.attn_pack_v_kernel(cfg, S, H, D))(tvm.runtime.tensor(v), vp)
attention = build(K.attention_kernel(cfg, S, H, D, D ** -0.5))
s = np.einsum("bshd,bthd->bhst", q, k) * D ** -0.5
p = np.exp(s - s.max(-1, keepdims=True))
ref_o = np.einsum("bhst,bthd->bshd", p / p.sum(-1, keepdims=True), v)
ref_y = x @ w.T + b
for _ in range(20):
    y, o = nan((M, N)), nan((B, S, H, D))
    gemm(tvm.runtime.tensor(x), wp, tvm.runtime.tensor(b), y)
    attention(tvm.runtime.tensor(q), kt, vp, o)
    np.testing.assert_allclose(y.numpy(), ref_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(o.numpy(), ref_o, rtol=1e-4, atol=1e-4)
    if half:
        y = nan((M, N))
        half_gemm(hx, hwp, tvm.runtime.tensor(b), y)
        np.testing.assert_allclose(y.numpy(), ref_y, rtol=0, atol=1e-2 * np.abs(ref_y).max())
print("ok")
"""


def test_kernels_share_their_tasks_across_more_threads_than_cores():
    env = {**os.environ, "TVM_NUM_THREADS": str(4 * available_cores())}
    proc = subprocess.run(
        [sys.executable, "-c", WORK_QUEUE], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("upper", [True, False])
def test_vector_exp_matches_numpy_over_its_range(upper):
    from builder.targets.cpu import kernels as K

    lo, hi = -87.0, 88.0 if upper else 0.0
    x = np.concatenate(
        [
            np.linspace(lo, hi, 40_000, dtype=np.float32),
            np.float32([0.0, -0.0, 1e-8, -1e-8, -87.5, -100.0, -1e30, np.log(2) / 2]),
        ]
        + ([np.float32([88.5, 100.0, 1e30])] if upper else [])
    )
    x = np.concatenate([x, np.zeros(-len(x) % 16, np.float32)])
    n = len(x)
    body = "\n".join(K._exp_lines("x[i * 16 + l]", "e", " " * 12, "q", upper=upper))
    src = f"""
@T.prim_func
def main(x: T.Buffer(({n},), "float32"), y: T.Buffer(({n},), "float32")):
    for i in range({n // 16}):
        for l in T.vectorized(16):
{body}
            y[i * 16 + l] = e
"""
    fn = tvm.compile(tvm.script.from_source(src), HOST)["main"]
    y = tvm.runtime.tensor(np.zeros(n, np.float32))
    fn(tvm.runtime.tensor(x), y)
    got = y.numpy().astype(np.float64)
    want = np.exp(np.clip(x.astype(np.float64), -87.0, 88.0))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=3e-7, atol=0)
