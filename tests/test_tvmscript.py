"""The kernels' fast TVMScript parse (`builder/targets/cpu/tvmscript.py`) against
`tvm.script.from_source`, well-formedness check included, on every kind of kernel."""

from __future__ import annotations

import pytest
import tvm
import tvm_ffi

from builder import cache
from builder.targets.cpu import kernels, tvmscript

pytestmark = pytest.mark.ir

F32 = kernels.KernelConfig(vec=16, nv=4, mr=6)
AVX2 = kernels.KernelConfig(vec=8, nv=2, mr=6)
HALF = kernels.KernelConfig(vec=16, nv=4, mr=6, half=True)
BF16 = kernels.KernelConfig(vec=16, nv=4, mr=6, bf16=True)
SHUFFLE = kernels.Shuffle(factor=2, side=6, width=8, skip=1)
GELU = ("gelu",)

KERNELS = {
    "gemm": lambda: kernels.gemm_kernel(F32, 64, 128, True, GELU, False),
    # ragged N, a k tail, a residual, one row per tile at the end
    "gemm-ragged": lambda: kernels.gemm_kernel(F32, 37, 100, False, None, True),
    "gemm-avx2-glu": lambda: kernels.gemm_kernel(
        AVX2, 40, 48, True, ("silu", 1.0), False, glu=True
    ),
    "gemm-shuffle": lambda: kernels.gemm_kernel(F32, 32, 64, True, None, False, shuffle=SHUFFLE),
    "gemm-half": lambda: kernels.gemm_kernel(HALF, 96, 128, True, GELU, False, pairs_out=True),
    "gemm-bf16": lambda: kernels.gemm_kernel(BF16, 70, 64, False, ("gelu_tanh",), False),
    "pack-nk": lambda: kernels.pack_weight_kernel(F32, 100, 37, True),
    "pack-half": lambda: kernels.pack_weight_kernel(HALF, 64, 40, False),
    "pairs": lambda: kernels.pairs_kernel(HALF, 40),
    "round": lambda: kernels.round_kernel(F32, 40, "bfloat16"),
    "avg-pool": lambda: kernels.avg_pool_kernel(F32, 4, 2, 16),
    "attention": lambda: kernels.attention_kernel(F32, 20, 2, 72, 72**-0.5),
    "attention-cross-bf16": lambda: kernels.attention_kernel(BF16, 20, 2, 64, 0.125, queries=1),
    "attention-seq": lambda: kernels.attention_seq_kernel(F32, 2, 40, 40**-0.5, segments=True),
    "attn-pack-k": lambda: kernels.attn_pack_k_kernel(F32, 20, 2, 64),
    "attn-pack-v": lambda: kernels.attn_pack_v_kernel(BF16, None, 2, 64),
    "segments": kernels.attn_segments_kernel,
    "layer-norm": lambda: kernels.layer_norm_kernel(F32, 40, 1e-6),
    "rms-norm-pairs": lambda: kernels.rms_norm_kernel(HALF, 64, 1e-5, pairs_out=True),
}


@pytest.fixture
def fresh_parses(monkeypatch, tmp_path):
    """Kernels parsed here, not loaded from a kernel store or this process's cache; the
    texts given to `tvmscript.parse`, in order."""
    monkeypatch.setenv(cache.KERNELS_ENV, str(tmp_path / "kernels"))
    kernels._parse.cache_clear()
    texts = []
    real = tvmscript.parse
    monkeypatch.setattr(tvmscript, "parse", lambda src: texts.append(src) or real(src))
    yield texts
    kernels._parse.cache_clear()


@pytest.mark.parametrize("kind", list(KERNELS))
def test_parse_equals_from_source(kind, fresh_parses):
    func = KERNELS[kind]()
    (text,) = fresh_parses
    reference = tvm.script.from_source(text)  # checks well-formedness too
    assert tvm_ffi.structural_equal(func, reference), tvm_ffi.get_first_structural_mismatch(
        func, reference
    )


def test_a_template_serves_other_literals(fresh_parses):
    """Two shapes of one kernel share a template; each parse has its own literals."""
    tvmscript._template.cache_clear()
    small = kernels.gemm_kernel(F32, 64, 128, True, GELU, False)
    large = kernels.gemm_kernel(F32, 128, 256, True, GELU, False)
    assert not tvm_ffi.structural_equal(small, large)
    for func, text in zip((small, large), fresh_parses, strict=True):
        assert tvm_ffi.structural_equal(func, tvm.script.from_source(text))
    assert tvmscript._template.cache_info()[:2] == (1, 1)  # (hits, misses)


def test_a_script_error_names_what_is_wrong():
    body = "private=True)\ndef f(x: T.handle):\n    y = undefined_name\n"
    text = tvmscript._DECORATOR + body
    with pytest.raises(Exception, match="undefined_name"):
        tvmscript.parse(text)


RARER = {
    # taken by the parse's own evaluator: a chained comparison, a unary minus, a starred
    # argument
    "chain-minus-starred": "for i in range(T.int64(8)):\n"
    "    if T.int64(1) <= i < T.int64(7):\n"
    "        b[i] = T.max(-a[i], *[b[i]])\n",
    # handed to TVMScript's: a conditional expression, `and`, `or`, `not`
    "if-and-or-not": "for i in range(T.int64(8)):\n"
    "    b[i] = a[i] if i < T.int64(4) and i > T.int64(0) else a[i] * T.float32(2)\n"
    "    if i == T.int64(3) or not i == T.int64(5):\n"
    "        b[i] = a[i]\n",
    # sliced operands of a call: buffer regions
    "regions": "for i in range(T.int64(8)):\n"
    '    with T.sblock("b"):\n'
    "        vi = T.axis.spatial(T.int64(8), i)\n"
    "        T.reads(a[vi : vi + T.int64(1)])\n"
    "        T.writes(b[vi : vi + T.int64(1)])\n"
    "        b[vi] = a[vi]\n",
}


@pytest.mark.parametrize("kind", list(RARER))
def test_rarer_expressions_parse_as_from_source(kind):
    """Expressions no kernel writes today, parsed as `from_source` parses them: those the
    parse's own evaluator takes and those it hands to TVMScript's."""
    body = "".join(f"        {line}\n" for line in RARER[kind].splitlines())
    text = (
        "@T.prim_func(private=True, check_well_formed=False)\n"
        'def probe(a: T.Buffer((T.int64(8),), "float32"), '
        'b: T.Buffer((T.int64(8),), "float32")):\n'
        '    T.func_attr({"tir.noalias": True, "s_tir": True})\n'
        '    with T.sblock("root"):\n' + body
    )
    reference = tvm.script.from_source(text)
    func = tvmscript.parse(text)
    assert tvm_ffi.structural_equal(func, reference), tvm_ffi.get_first_structural_mismatch(
        func, reference
    )
