"""Hand-written, pre-scheduled TensorIR kernels for x86 CPUs, generated as TVMScript text.

The micro-kernel layout is explicit (6 rows x 4 vectors of accumulators, one per row buffer,
so LLVM keeps all 24 in vector registers), which is easier to get right than steering a
generic schedule there. Sizes derive from the target's vector width (`kernel_config`).
"""

from __future__ import annotations

import functools
import math
import os
import struct
from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm_ffi.serialization import from_json_graph_str

from ... import cache
from . import tvmscript

KERNEL_ATTR = "builder.cpu_kernel"


# --------------------------------------------------------------------------------------
# Target-derived kernel configuration
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    vec: int  # fp32 lanes per SIMD register
    nv: int  # SIMD registers per accumulator row (N block = vec * nv)
    mr: int  # rows per micro tile
    half: bool = False  # GEMMs multiply in float16 (AVX-512 FP16), see `gemm_kernel`
    bf16: bool = False  # GEMMs multiply in bfloat16 (AVX-512 BF16's vdpbf16ps)
    cores: int = 1  # threads the work is split for: the target's num-cores
    l2: int = 1 << 20  # bytes of L2 per core (`l2_bytes`)

    @property
    def nb(self) -> int:
        return self.vec * self.nv

    @property
    def pairs(self) -> str | None:
        """The GEMM operands' 16-bit type, held in pairs of k steps per 32-bit word."""
        return "float16" if self.half else "bfloat16" if self.bf16 else None


def _has(target: tvm.target.Target, feature: str) -> bool:
    try:
        return bool(tvm.target.codegen.target_has_features(feature, target))
    except Exception:  # pylint: disable=broad-except
        return False


def half_gemms(target: tvm.target.Target) -> bool:
    """Whether the target multiplies float16 vectors natively (AVX-512 FP16:
    `vfmadd231ph`, 32 lanes at the float32 FMA's rate)."""
    return _has(target, "avx512fp16")  # which implies AVX-512F


def bf16_gemms(target: tvm.target.Target) -> bool:
    """Whether the target has AVX-512 BF16's `vdpbf16ps` (bfloat16 pair dot products into
    float32 lanes). Its rate is the CPU's: twice the float32 FMA's flops on Zen 5, half of
    them on Intel's Sapphire and Emerald Rapids (`benchmarks/bf16_dot.py`)."""
    return _has(target, "avx512bf16") and _has(target, "avx512f")


_L2_PATH = "/sys/devices/system/cpu/cpu0/cache"


def l2_bytes(target: tvm.target.Target) -> int:
    """L2 per core of the CPU the kernels are for: the build machine's (from sysfs) where
    the target's mcpu is the build machine's CPU, else 1 MiB, the smallest L2 of the
    AVX-512 server cores (Skylake-SP, Zen 4 and 5; Sapphire Rapids has 2 MiB)."""
    default = 1 << 20
    if str(target.attrs.get("mcpu", "")) != tvm.target.codegen.llvm_get_system_cpu():
        return default
    try:
        for index in sorted(os.listdir(_L2_PATH)):
            folder = os.path.join(_L2_PATH, index)
            with open(os.path.join(folder, "level")) as level:
                if level.read().strip() != "2":
                    continue
            with open(os.path.join(folder, "size")) as size:
                text = size.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return default


def kernel_config(
    target: tvm.target.Target, half: bool = False, bf16: bool = False
) -> KernelConfig:
    """Register-tile shape from the target: 6 x (4 vectors) needs 24 accumulators + 2
    scratch registers -> only with 32 vector registers (AVX-512); otherwise 6 x 2.
    `half`: float16 GEMMs, where `half_gemms(target)`; `bf16`: bfloat16 GEMMs, where
    `bf16_gemms(target)`."""
    if _has(target, "sse2"):  # x86: TVM 0.27 reports 512 bits for every x86 mcpu
        bits = 512 if _has(target, "avx512f") else 256 if _has(target, "avx") else 128
    else:
        try:
            bits = int(tvm.target.codegen.llvm_get_vector_width(target))
        except Exception:  # pylint: disable=broad-except
            bits = 128
    vec = max(bits // 32, 4)
    if half and not half_gemms(target):
        raise ValueError(f"float16 GEMMs need AVX-512 FP16, which {target} does not have")
    if bf16 and not bf16_gemms(target):
        raise ValueError(f"bfloat16 GEMMs need AVX-512 BF16, which {target} does not have")
    nv = 4 if vec >= 16 else 2
    cores = int(target.attrs.get("num-cores", 1))
    return KernelConfig(
        vec=vec, nv=nv, mr=6, half=half, bf16=bf16, cores=cores, l2=l2_bytes(target)
    )


# --------------------------------------------------------------------------------------
# TVMScript helpers
# --------------------------------------------------------------------------------------
def _i(v) -> str:
    return f"T.int64({int(v)})"


def _f(v) -> str:
    return f"T.float32({float(v)!r})"


_ATTRS = (
    '    T.func_attr({"tir.noalias": True, "s_tir": True, "op_pattern": 8, "%s": True})'
    % KERNEL_ATTR
)


def _local(name: str, n: int, dtype: str = "float32") -> str:
    # disable_lower_builtin keeps the buffer a stack alloca (LowerTVMBuiltin would otherwise
    # turn anything >= 1 KiB, or whatever it cannot size, into TVMBackendAllocWorkspace).
    return (
        f'{name} = T.alloc_buffer(({_i(n)},), "{dtype}", scope="local", '
        'annotations={"disable_lower_builtin": True})'
    )


def _tile_rows(mr: int, last: str, ind: str) -> list[str]:
    """Row indices r0..r{mr-1} of the tile at m0, clamped to `last` (a partial last tile
    recomputes the last row instead of reading out of bounds)."""
    return [f"{ind}r{i}: T.let[T.int64] = T.min(m0 + {_i(i)}, {last})" for i in range(mr)]


def _fill(
    name: str, n: int, ind: str, value: float = 0.0, dtype: str = "float32", vec: int = 0
) -> list[str]:
    """`name[:n] = value`; with `vec`, in whole vectors of that many lanes, unrolled: a buffer
    that must stay in registers needs every access at a constant offset in vectors the
    target has (one 80-lane store kept the attention tile's accumulators on the stack)."""
    if not vec:
        return [
            f"{ind}for j in T.vectorized({_i(n)}):",
            f"{ind}    {name}[j] = T.{dtype}({value!r})",
        ]
    return [
        f"{ind}for v in T.unroll({_i(n // vec)}):",
        f"{ind}    for l in T.vectorized({_i(vec)}):",
        f"{ind}        {name}[v * {_i(vec)} + l] = T.{dtype}({value!r})",
    ]


def _bf16_bits(value: str, dtype: str) -> str:
    """The bfloat16 bits of a float32 expression, rounded to nearest even, in the low half
    of `dtype` (uint32 lanes). Written with integer operations: TVM's bfloat16 legalization
    would widen a bfloat16 vector back to float32."""
    b = f'T.reinterpret("{dtype}", {value})'
    return f"T.shift_right({b} + T.shift_right({b}, 16) % 2 + 32767, 16)"


def _as_pairs(vector: str, lanes: int, pairs: str = "float16") -> str:
    """A float32 vector expression of `lanes` lanes as lanes / 2 words of `pairs` pairs."""
    if pairs == "bfloat16":
        half = f'T.Cast("uint16x{lanes}", {_bf16_bits(vector, f"uint32x{lanes}")})'
    else:
        half = f'T.Cast("float16x{lanes}", {vector})'
    return f'T.reinterpret("float32x{lanes // 2}", {half})'


def _pair_word(lo: str, hi: str, pairs: str = "float16") -> str:
    """A float32-typed word holding two 16-bit values of type `pairs` (`lo` in the low
    bits): the operands of the float16 and bfloat16 GEMMs travel as such words, so a pair of
    k steps is one 32-bit load or broadcast."""
    if pairs == "bfloat16":
        bits = lambda v: _bf16_bits(f'T.Cast("float32", {v})', "uint32")  # noqa: E731
    else:
        bits = lambda v: f'T.Cast("uint32", T.reinterpret("uint16", T.Cast("float16", {v})))'  # noqa: E731
    return (
        f'T.reinterpret("float32", T.bitwise_or({bits(lo)}, '
        f"T.shift_left({bits(hi)}, T.uint32(16))))"
    )


@dataclass(frozen=True)
class Shuffle:
    """A pixel shuffle that a kernel reads in place (the VLM projectors'): the kernel's
    [M, f^2 D] input X is the shuffle of a [B, skip + side^2, D] tensor of tokens, read where
    it lies instead of copied. Row m of X is the merged token (b, i, j) of image b's
    n x n grid (n = side / f); its columns are the f x f tokens it covers, in the order (row
    in the block, column in the block, channel), as HF's Idefics3 and InternVL shuffles give
    them. `skip`: the tokens before the grid (a CLS token the feature selection drops)."""

    factor: int
    side: int
    width: int
    skip: int = 0

    @property
    def tokens(self) -> int:
        return self.skip + self.side**2

    def declare(self) -> list[str]:
        """The kernel's input `x` as the token tensor (the symbolic M then comes from the
        output's shape)."""
        return [
            "    XB = T.int64()",
            f'    X = T.match_buffer(x, (XB, {_i(self.tokens)}, {_i(self.width)}), "float32")',
        ]

    def flat(self) -> str:
        """`Xf`, a flat view of the tokens (after the kernel's other declarations)."""
        return f'    Xf = T.decl_buffer((XB * {_i(self.tokens * self.width)},), "float32", data=X.data)'

    def row(self, m: str) -> str:
        """Xf's offset of row m's first element (the first token of its block)."""
        f, side, n = self.factor, self.side, self.side // self.factor
        token = (
            f"{m} // {_i(n * n)} * {_i(self.tokens)} + {_i(self.skip)} + "
            f"{m} % {_i(n * n)} // {_i(n)} * {_i(f * side)} + {m} % {_i(n)} * {_i(f)}"
        )
        return f"({token}) * {_i(self.width)}"

    def col(self, k: str) -> str:
        """The offset of column k from its row's: the whole segments of f D columns are rows
        of the grid apart, and a segment's columns lie side by side."""
        f, d = self.factor, self.width
        return f"({k}) // {_i(f * d)} * {_i(self.side * d)} + ({k}) % {_i(f * d)}"

    def whole(self, lanes: int) -> bool:
        """Whether vectors of `lanes` columns each lie within one segment."""
        return self.factor * self.width % lanes == 0


def _x_input(shuffle: Shuffle | None, cols: int) -> list[str]:
    """The declarations of a kernel's input X: [M, cols], or the tokens that `shuffle`
    reads in place."""
    if shuffle is None:
        return [f'    X = T.match_buffer(x, (M, {_i(cols)}), "float32")']
    return shuffle.declare()


def _x_at(shuffle: Shuffle | None, k: str) -> str:
    """X[r, k] (`xr`, with a shuffle: row r's offset, bound by the kernel)."""
    return f"X[r, {k}]" if shuffle is None else f"Xf[xr + {shuffle.col(k)}]"


def _x_vector(shuffle: Shuffle | None, k: str, lanes: int) -> str:
    """X[r, k:k + lanes], with a shuffle within one segment (`Shuffle.whole`)."""
    if shuffle is None:
        return f"X[r, T.Ramp({k}, {_i(1)}, {lanes})]"
    return f"Xf[T.Ramp(xr + {shuffle.col(k)}, {_i(1)}, {lanes})]"


# Work queue. TIR's `parallel` splits a loop statically over the pool's threads, so a thread
# that the OS or the hypervisor slows holds up every kernel. The kernels below instead run
# `_WORKERS` static workers that take tasks from a shared counter until none are left: a
# fast thread takes more. The counter's atomic add is written in LLVM IR and linked into the
# module through TIR's `pragma_import_llvm` (the llvm CPU codegen has no atomic intrinsic);
# it is inlined, so the library needs no runtime support (libatomic) for it.
_TASK_NEXT = "builder_task_next"
_TASK_IR = f"""
define linkonce_odr i64 @{_TASK_NEXT}(ptr %p) alwaysinline {{
  %r = atomicrmw add ptr %p, i64 1 monotonic, align 8
  ret i64 %r
}}
"""
# vdpbf16ps on 16 float32 lanes: TIR cannot hand a bfloat16 vector to the LLVM intrinsic (its
# bfloat16 legalization widens it), so the words go in as int32 lanes and are bitcast here.
BF16_DOT = "builder_bf16_dot"
BF16_DOT_IR = f"""
define linkonce_odr <16 x float> @{BF16_DOT}(<16 x float> %c, <16 x i32> %a,
                                              <16 x i32> %b) alwaysinline {{
  %x = bitcast <16 x i32> %a to <32 x bfloat>
  %y = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %c,
                                                          <32 x bfloat> %x, <32 x bfloat> %y)
  ret <16 x float> %r
}}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
"""
_WORKERS = 256  # the most threads that can share a kernel; a surplus worker costs one atomic add


def _task_loop(ntask: str, ir: str = "") -> list[str]:
    """Lines that run a task loop over `ntask` tasks: the task index is `cur[0]`, the task
    that this thread will take next (or >= ntask) is `nx[0]` (for prefetching). The task
    body goes at 16 spaces of indentation. `ir`: more LLVM IR for the module."""
    take = f"T.call_extern('int64', '{_TASK_NEXT}', T.address_of(cnt[0]))"
    return [
        f"    with T.attr(T.int32(0), 'pragma_import_llvm', {_TASK_IR + ir!r}):",
        '        cnt = T.alloc_buffer((1,), "int64", annotations={"disable_lower_builtin": True})',
        "        cnt[0] = T.int64(0)",
        f"        for worker in T.parallel({_i(_WORKERS)}):",
        '            cur = T.alloc_buffer((1,), "int64", scope="local")',
        '            nx = T.alloc_buffer((1,), "int64", scope="local")',
        f"            nx[0] = {take}",
        f"            while nx[0] < {ntask}:",
        "                cur[0] = nx[0]",
        f"                nx[0] = {take}",
    ]


def _tree(op, terms: list[str]) -> str:
    """A balanced reduction expression over `terms` (a serial one is a chain of latencies)."""
    while len(terms) > 1:
        pairs = [op(terms[k], terms[k + 1]) for k in range(0, len(terms) - 1, 2)]
        terms = pairs + ([terms[-1]] if len(terms) % 2 else [])
    return terms[0]


# exp's rounding constant: 1.5 * 2^23 + 127. Added to x / ln 2, the float sum rounds to an
# integer, and its low mantissa bits hold n + 127 (n = round(x / ln 2)); shifted left by 23
# they are the bits of 2^n (the bits above shift out). n itself is read back from the same
# bits: `(t + M) - M` would not do, because TIR's simplifier treats float arithmetic as exact
# and folds it to `t`.
_EXP_MAGIC = 1.5 * 2**23 + 127
_EXP_MAGIC_BITS = struct.unpack("<i", struct.pack("<f", _EXP_MAGIC))[0]


def _exp_lines(src: str, dst: str, ind: str, tag: str, upper: bool = True) -> list[str]:
    """Vectorizable exp (Cephes expf polynomial, 2^n from the exponent bits): LLVM would
    scalarize llvm.exp.v16f32 into 16 libm calls. Relative error ~1e-7 on the clamped range,
    [-87, 88]; `upper=False` drops the upper clamp where the caller knows that src <= 0."""
    xc = f"T.min({src}, {_f(88.0)})" if upper else src
    return [
        f"{ind}{tag}xc: T.let[T.float32] = T.max({xc}, {_f(-87.0)})",
        f"{ind}{tag}t: T.let[T.float32] = {tag}xc * {_f(1.4426950408889634)} + {_f(_EXP_MAGIC)}",
        f'{ind}{tag}n: T.let[T.float32] = T.Cast("float32", T.reinterpret("int32", {tag}t)'
        f" - {_EXP_MAGIC_BITS})",
        f"{ind}{tag}r: T.let[T.float32] = {tag}xc - {tag}n * {_f(0.693359375)} + {tag}n * {_f(2.12194440e-4)}",
        f"{ind}{tag}p: T.let[T.float32] = (((((({_f(1.9875691500e-4)} * {tag}r + {_f(1.3981999507e-3)}) * {tag}r"
        f" + {_f(8.3334519073e-3)}) * {tag}r + {_f(4.1665795894e-2)}) * {tag}r"
        f" + {_f(1.6666665459e-1)}) * {tag}r + {_f(5.0000001201e-1)}) * {tag}r * {tag}r"
        f" + {tag}r + {_f(1.0)})",
        f'{ind}{dst}: T.let[T.float32] = {tag}p * T.reinterpret("float32", T.shift_left('
        f'T.reinterpret("int32", {tag}t), 23))',
    ]


# Eigen's float erf rational approximation (|err| < 1e-7 after clamping to [-4, 4]).
_ERF_A = [
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
]
_ERF_B = [
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
]


def _horner(coefs, x):
    s = _f(coefs[0])
    for c in coefs[1:]:
        s = f"({s} * {x} + {_f(c)})"
    return s


def _act_lines(act, v: str, dst: str, ind: str) -> list[str]:
    """Epilogue activation: dst = act(v), written as vectorizable TIR let-statements."""
    if act is None:
        return [f"{ind}{dst}: T.let[T.float32] = {v}"]
    kind = act[0]
    if kind == "silu":  # x * sigmoid(c * x): quick_gelu (c = 1.702) or SiLU (c = 1)
        return _exp_lines(f"{_f(-act[1])} * {v}", "ae", ind, "a") + [
            f"{ind}{dst}: T.let[T.float32] = {v} / ({_f(1.0)} + ae)"
        ]
    if kind == "gelu":  # 0.5 x (1 + erf(x / sqrt 2))
        return [
            f"{ind}ez: T.let[T.float32] = T.max(T.min({v} * {_f(0.7071067811865476)}, {_f(4.0)}), {_f(-4.0)})",
            f"{ind}ez2: T.let[T.float32] = ez * ez",
            f"{ind}{dst}: T.let[T.float32] = {_f(0.5)} * {v} * ({_f(1.0)} + ez * {_horner(_ERF_A, 'ez2')}"
            f" / {_horner(_ERF_B, 'ez2')})",
        ]
    if kind == "gelu_tanh":  # 0.5 x (1 + tanh(z)) = x * sigmoid(2 z)
        return (
            [
                f"{ind}gz: T.let[T.float32] = {_f(-1.5957691216057308)} * ({v} + {_f(0.044715)} * {v} * {v} * {v})",
            ]
            + _exp_lines("gz", "ae", ind, "a")
            + [f"{ind}{dst}: T.let[T.float32] = {v} / ({_f(1.0)} + ae)"]
        )
    raise ValueError(act)


@functools.cache
def _parse(src: str) -> tirx.PrimFunc:
    # Parsing TVMScript is a large share of a compile; a PrimFunc is immutable, so one parsed
    # kernel serves every compile of this process that emits the same text, and the build
    # cache's kernel store serves other processes (`cache.kernel_json`).
    key = cache.kernel_key(src)
    stored = cache.Cache().kernel_json(key)
    if stored is not None:
        try:
            # Not tvm.ir.load_json: its upgrade of older TVM versions' JSON decodes and
            # re-encodes the text in Python, and the key holds the TVM version that wrote it.
            return from_json_graph_str(stored)
        except Exception:  # a damaged entry is a miss; storing the parse replaces it
            pass
    # Relax passes (e.g. RewriteDataflowReshape's HasReshapePattern) require every PrimFunc
    # body to be a root SBlockRealize ("s_tir" dialect): wrap the main loop nest in one
    # (match_buffer declarations must stay outside; a shuffle's flat view of X goes in).
    lines = src.strip("\n").split("\n")
    k = next(i for i, l in enumerate(lines) if l.startswith(("    for ", "    with ", "    Xf = ")))
    body = ["    " + l if l.strip() else l for l in lines[k:]]
    func = tvmscript.parse("\n".join(lines[:k] + ['    with T.sblock("root"):'] + body))
    cache.Cache().store_kernel_json(key, tvm.ir.save_json(func))
    return func


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
# Tasks: each weight block's row tiles in `_gemm_chunks` parts. A thread prefetches the block
# of its next task while it works on the current one, so a task that is long enough to cover
# that prefetch matters more than a fine split (measured in docs/cpu-pipeline.md).
_GEMM_TASKS_PER_THREAD = 4  # at least, where the blocks alone are too few for the threads


def _gemm_chunks(cfg: KernelConfig, blocks: int) -> int:
    # At most 16 parts: a bound on the split for many cores, not a tuned figure.
    return min(max(2, -(-_GEMM_TASKS_PER_THREAD * cfg.cores // blocks)), 16)


# Largest weight panel (k steps x one N block) that a tile streams from L2, as a share of the
# L2: half, so that the panel stays there beside the X rows and the next panel's prefetch.
# Longer K runs in steps (llava-clip's fc2 in two on a 1 MiB L2); docs/cpu-pipeline.md has
# what the steps gained on a 1 MiB L2 and cost on a 2 MiB one.
_GEMM_PANEL_SHARE = 0.5
_GEMM_PF = 2  # prefetches per `unroll` k steps, at most
# Half GEMMs: k pairs summed in float16 before each float32 add. Against the float32 kernel
# on one thread, 16 / 32 / 64 pairs ran 1.37-1.52x / 1.70-1.87x / 1.89-1.96x as fast, and put
# llava-clip (2 layers) 7.8e-3 / 1.0e-2 / 1.6e-2 off HF (docs/cpu-pipeline.md, "float16 GEMMs").
_HALF_BLOCK = 32


def gemm_k_steps(cfg: KernelConfig, K: int, N: int, unroll: int = 1) -> list[tuple[int, int]]:
    """(first k, k count) of each k step of the GEMM's tiles: one, unless a weight block is
    larger than `_GEMM_PANEL_SHARE` of the L2 (float32 and whole N blocks only: the partial
    sums go through Y); steps are whole multiples of `unroll`."""
    KW = -(-K // 2) if cfg.pairs else K
    panel = int(cfg.l2 * _GEMM_PANEL_SHARE)
    steps = 1 if cfg.pairs or N % cfg.nb else -(-K * cfg.nb * 4 // panel)
    kc = -(-KW // (steps * unroll)) * unroll
    return [(k0, min(kc, KW - k0)) for k0 in range(0, KW, kc)]


def gemm_kernel(
    cfg: KernelConfig,
    K: int,
    N: int,
    has_bias: bool,
    act,
    has_res: bool,
    pairs_out: bool = False,
    has_gate: bool = False,
    glu: bool = False,
    shuffle: Shuffle | None = None,
):
    """Y[M, N] = act(X[M, K] @ W + bias) (* G) (+ R), W packed as [NP, K, NB]; G, a
    tensor of Y's shape, is a GLU's other half (SwiGLU: the up projection times the
    activated gate).

    `glu`: both halves of a GLU in one GEMM, Y = act(X @ W_g + b_g) * (X @ W_u + b_u). Each
    weight block holds NB/2 columns of W_g and then the same NB/2 columns of W_u, and the
    bias [NP * NB] likewise (`rewrite` interleaves them, zero-padded to whole blocks, before
    the packing), so a tile's accumulators hold both factors of its NB/2 outputs; X is read
    once for both halves and neither is stored. Always one k step (Y has no room for the
    partial sums of both halves).

    A task is one weight block (K * NB floats) and a part of the M tiles (`_gemm_chunks`);
    the threads take tasks from a work queue (`_task_loop`), in order, so a thread streams X
    rows against a weight block that stays in L2. While it does, the tiles prefetch the block
    of the thread's next task into L2 (software prefetch, spread over the tiles), so a task's
    first tile does not wait on memory. A block larger than half the L2 runs in k
    steps: all the task's tiles over the first panel of k, their partial sums stored in Y,
    then over the next (which the tiles of the step before prefetch). M is symbolic and needs no padding copy: a last,
    partial M tile either clamps its row index to M-1 (rows are recomputed, never read out
    of bounds) or, when only a row or two are left, runs them one at a time.

    With `cfg.half`, X and W hold float16 pairs of k steps in float32-typed words
    (`pairs_kernel`, `pack_weight_kernel`): X [M, K/2], W [NP, K/2, NB]. One broadcast
    word of X times one vector of W is then 2 k steps for NB/2 columns, lanes 2j and 2j+1
    holding column j's even and odd k. Every `_HALF_BLOCK` pairs, each column's two float16
    partial sums are added and go into its float32 accumulator. `pairs_out` (N a multiple of
    NB, no residual): Y is written as [M, N/2] words of float16 pairs, the next 16-bit GEMM's
    X.

    `shuffle` (float32 GEMMs): X is a pixel shuffle's input, read in place (`Shuffle`);
    the k steps go in groups within a segment of the shuffle, each group's offset computed
    once."""
    assert shuffle is None or not cfg.pairs
    mr, nb, vec = cfg.mr, cfg.nb, cfg.vec
    ow = nb // 2 if glu else nb  # output columns per weight block
    NP = -(-N // ow)
    KW = -(-K // 2) if cfg.pairs else K  # rows of a weight block (k pairs with cfg.pairs)
    args = [f'x: T.handle, w: T.Buffer(({_i(NP)}, {_i(KW)}, {_i(nb)}), "float32")']
    if has_bias:
        args.append(f'bias: T.Buffer(({_i(NP * nb if glu else N)},), "float32")')
    if has_gate:
        args.append("gate: T.handle")
    if has_res:
        args.append("res: T.handle")
    args.append("y: T.handle")
    L = [
        "@T.prim_func(private=True, check_well_formed=False)",
        f"def gemm({', '.join(args)}):",
        _ATTRS,
        "    M = T.int64()",
        *_x_input(shuffle, KW),
        f'    Y = T.match_buffer(y, (M, {_i(N // 2 if pairs_out else N)}), "float32")',
    ]
    assert not pairs_out or (cfg.pairs and N % ow == 0 and not has_res)
    for flag, name, buffer in ((has_gate, "gate", "G"), (has_res, "res", "R")):
        if flag:
            L.append(f'    {buffer} = T.match_buffer({name}, (M, {_i(N)}), "float32")')
    if shuffle:
        L.append(shuffle.flat())
    mt = f"((M + {_i(mr - 1)}) // {_i(mr)})"
    # k steps per group: with a shuffle, a divisor of its segments' width
    along = shuffle.width if shuffle else K
    unroll = 8 if cfg.pairs else next(u for u in (8, 4, 2, 1) if along % u == 0)
    ksteps = [(0, KW)] if glu else gemm_k_steps(cfg, K, N, unroll)
    C, PF = _gemm_chunks(cfg, NP), _GEMM_PF
    ct = f"(({mt} + {_i(C - 1)}) // {_i(C)})"  # M tiles per task
    L += _task_loop(_i(NP * C), BF16_DOT_IR if cfg.bf16 else "")
    ind = " " * 16
    L += [
        f"{ind}nbk: T.let[T.int64] = cur[0] // {_i(C)}",
        f"{ind}mlo: T.let[T.int64] = cur[0] % {_i(C)} * {ct}",
        f"{ind}nxt: T.let[T.int64] = T.min(nx[0] // {_i(C)}, {_i(NP - 1)})",
    ]

    def prefetch(ind: str, ko: str, panel: tuple[str, int, int]) -> list[str]:
        """This tile's share of the lines of the next weight panel, `panel` (block, first
        k, k steps), for step group `ko`."""
        block, k0, kn = panel
        lines = -(-kn * nb // 16)
        return [
            f"{ind}for pi in T.unroll({_i(PF)}):",
            f"{ind}    if {ko} * {_i(PF)} + pi < lp:",
            f"{ind}        f16: T.let[T.int64] = T.min((mi - mlo) * lp + {ko} * {_i(PF)} + pi, {_i(lines - 1)}) * {_i(16)}",
            f"{ind}        T.evaluate(T.call_intrin('void', 'tirx.prefetch', "
            f"T.address_of(w[{block}, {_i(k0)} + f16 // {_i(nb)}, f16 % {_i(nb)}]), 0, 2, 1))",
        ]

    def k_groups(ind: str, base: str, n: int, group: str, pf, steps) -> list[str]:
        """`n` k steps (k pairs with cfg.pairs) from `base`, in unrolled groups (the first
        is step group `group`, for the prefetch) and a tail; `steps(ind, k)`: one step's
        lines. With a shuffle, `kq` is the offset of a group's first column in X's row."""
        o = []
        groups, tail = divmod(n, unroll)
        if groups:
            o.append(f"{ind}for kg in range({_i(groups)}):")
            if pf:
                o += prefetch(ind + "    ", f"({group} + kg)", pf)
            first = f"{base} + kg * {_i(unroll)}"
            if shuffle:
                o.append(f"{ind}    kq: T.let[T.int64] = {shuffle.col(first)}")
            o.append(f"{ind}    for ku in T.unroll({_i(unroll)}):")
            o += steps(ind + "        ", f"{first} + ku")
        if tail:
            first = f"{base} + {_i(groups * unroll)}"
            if shuffle:
                o.append(f"{ind}kq: T.let[T.int64] = {shuffle.col(first)}")
            o.append(f"{ind}for ku in T.unroll({_i(tail)}):")
            o += steps(ind + "    ", f"{first} + ku")
        return o

    def k_loop(rows: int, ind: str, pre: str, pf, k0: int, kn: int) -> list[str]:
        """float32: acc{i}[j] accumulates row i, column j over k in [k0, k0 + kn)."""

        def steps(ind: str, k: str) -> list[str]:
            o = [f"{ind}k: T.let[T.int64] = {k}"]
            for i in range(rows):
                x = f"Xf[xr{i} + kq + ku]" if shuffle else f"X[r{i}, k]"
                o += [
                    f"{ind}for j in T.vectorized({_i(nb)}):",
                    f"{ind}    {pre}acc{i}[j] = {pre}acc{i}[j] + {x} * w[nbk, k, j]",
                ]
            return o

        return k_groups(ind, _i(k0), kn, _i(0), pf, steps)

    def pair_steps(rows: int, ind: str, kp: str, lanes: str, update) -> list[str]:
        """One k pair, `kp`: the broadcast X words xb{i} and the weight vectors wv{v} as
        vectors of `lanes`, then `update(i, v)` for each row and vector."""
        o = [f"{ind}kp: T.let[T.int64] = {kp}"]
        o += [
            f'{ind}xb{i}: T.let[T.{lanes}] = T.reinterpret("{lanes}", '
            f"T.Broadcast(X[r{i}, kp], {vec}))"
            for i in range(rows)
        ]
        o += [
            f'{ind}wv{v}: T.let[T.{lanes}] = T.reinterpret("{lanes}", '
            f"w[nbk, kp, T.Ramp({_i(v * vec)}, {_i(1)}, {vec})])"
            for v in range(cfg.nv)
        ]
        return o + [ind + update(i, v) for i in range(rows) for v in range(cfg.nv)]

    def k_loop_pairs(rows: int, ind: str, pre: str, pf, k0: int, kn: int) -> list[str]:
        """float16: h{i}[2j + p] sums row i, column j over the block's k steps of parity p;
        acc{i}[j], over all of K."""
        hl = 2 * vec  # float16 lanes per vector
        out = [ind + _local(f"{pre}h{i}", 2 * nb, "float16") for i in range(rows)]

        def update(i: int, v: int) -> str:
            h = f"{pre}h{i}[T.Ramp({_i(v * hl)}, {_i(1)}, {hl})]"
            return f"{h} = {h} + xb{i} * wv{v}"

        def block(ind: str, base: str, n: int, group: str) -> list[str]:
            """n pairs from `base` into h, then h into acc; `group`: the first step group."""
            o = []
            for i in range(rows):
                o += _fill(f"{pre}h{i}", 2 * nb, ind, 0.0, "float16")
            steps = lambda ind, kp: pair_steps(rows, ind, kp, f"float16x{hl}", update)  # noqa: E731
            o += k_groups(ind, base, n, group, pf, steps)
            for i in range(rows):
                h = f"{pre}h{i}"
                o += [
                    f"{ind}for j in T.vectorized({_i(nb)}):",
                    f'{ind}    {pre}acc{i}[j] = {pre}acc{i}[j] + T.Cast("float32", {h}[j * {_i(2)}] + {h}[j * {_i(2)} + {_i(1)}])',
                ]
            return o

        full, rest = divmod(KW, _HALF_BLOCK)
        per = _HALF_BLOCK // unroll
        if full:
            out.append(f"{ind}for kb in range({_i(full)}):")
            out += block(ind + "    ", f"kb * {_i(_HALF_BLOCK)}", _HALF_BLOCK, f"kb * {_i(per)}")
        if rest:
            out += block(ind, _i(full * _HALF_BLOCK), rest, _i(full * per))
        return out

    def k_loop_bf16(rows: int, ind: str, pre: str, pf, k0: int, kn: int) -> list[str]:
        """bfloat16: acc{i}[j] accumulates row i, column j over the k pairs [k0, k0 + kn),
        one vdpbf16ps (2 k steps for `vec` columns) per row and vector."""

        def update(i: int, v: int) -> str:
            a = f"{pre}acc{i}[T.Ramp({_i(v * vec)}, {_i(1)}, {vec})]"
            return f"{a} = T.call_extern('float32x{vec}', '{BF16_DOT}', {a}, xb{i}, wv{v})"

        steps = lambda ind, kp: pair_steps(rows, ind, kp, f"int32x{vec}", update)  # noqa: E731
        return k_groups(ind, _i(k0), kn, _i(0), pf, steps)

    def tile(rows: int, ind: str, pre: str, pf, step: int) -> list[str]:
        """One tile: `rows` rows (row indices r0.. bound by the caller) x one weight block,
        over the k steps of `ksteps[step]`; `pf`: the panel to prefetch, or None."""
        (k0, kn), first, last = ksteps[step], step == 0, step == len(ksteps) - 1
        out = []
        if shuffle:  # each row's offset in X
            out += [f"{ind}xr{i}: T.let[T.int64] = {shuffle.row(f'r{i}')}" for i in range(rows)]
        for i in range(rows):
            out.append(ind + _local(f"{pre}acc{i}", nb))
            if first:
                out += _fill(f"{pre}acc{i}", nb, ind)
            else:  # the partial sums of the steps before
                out += [
                    f"{ind}for j in T.vectorized({_i(nb)}):",
                    f"{ind}    {pre}acc{i}[j] = Y[r{i}, nbk * {_i(nb)} + j]",
                ]
        loop = k_loop_pairs if cfg.half else k_loop_bf16 if cfg.bf16 else k_loop
        out += loop(rows, ind, pre, pf, k0, kn)
        if not last:
            for i in range(rows):
                out += [
                    f"{ind}for j in T.vectorized({_i(nb)}):",
                    f"{ind}    Y[r{i}, nbk * {_i(nb)} + j] = {pre}acc{i}[j]",
                ]
            return out

        def biased(i: int, j: str) -> str:
            """Accumulator j of row i plus its bias (the bias of the block's column j)."""
            return f"{pre}acc{i}[{j}]" + (f" + bias[nbk * {_i(nb)} + {j}]" if has_bias else "")

        def epilogue(i, j_loop, ind2, guard, dst=None):
            """Row i's outputs into Y, or into the stack vector `dst`."""
            col = f"nbk * {_i(ow)} + j"
            ep = [f"{ind2}{j_loop}"]
            body = ind2 + "    "
            if guard:
                ep.append(f"{body}if {col} < {_i(N)}:")
                body += "    "
            ep.append(f"{body}v: T.let[T.float32] = {biased(i, 'j')}")
            ep += _act_lines(act, "v", "o", body)
            o = f"o * ({biased(i, f'j + {_i(ow)}')})" if glu else "o"
            o += f" * G[r{i}, {col}]" if has_gate else ""
            if dst:
                ep.append(f"{body}{dst}[j] = {o}")
            else:
                ep.append(f"{body}Y[r{i}, {col}] = {o}" + (f" + R[r{i}, {col}]" if has_res else ""))
            return ep

        vectors = f"for j in T.vectorized({_i(ow)}):"
        if pairs_out:  # each row's outputs through a stack vector, stored as float16 pairs
            out.append(ind + _local(f"{pre}ob", ow))
            for i in range(rows):
                out += epilogue(i, vectors, ind, False, f"{pre}ob")
                ob = f"{pre}ob[T.Ramp({_i(0)}, {_i(1)}, {ow})]"
                out.append(
                    f"{ind}Y[r{i}, T.Ramp(nbk * {_i(ow // 2)}, {_i(1)}, {ow // 2})] = "
                    + _as_pairs(ob, ow, cfg.pairs)
                )
        elif N % ow == 0:
            for i in range(rows):
                out += epilogue(i, vectors, ind, False)
        else:  # ragged last N block: scalar, guarded stores (zero-padded weights keep K clean)
            out.append(f"{ind}if nbk < {_i(NP - 1)}:")
            for i in range(rows):
                out += epilogue(i, vectors, ind + "    ", False)
            out.append(f"{ind}else:")
            for i in range(rows):
                out += epilogue(i, f"for j in range({_i(ow)}):", ind + "    ", True)
        return out

    # A last tile of at most `short` rows runs them one at a time (577 rows: 96 tiles and 1
    # row), where the clamped full tile would recompute the missing rows. A lone row's FMA
    # chains are latency bound, about 4 cycles per k step; a full tile takes mr * nv / 2
    # cycles (two FMA ports): with AVX-512 a row costs a third of a tile, so up to 2 rows pay.
    # These rows skip their tile's share of the next block's prefetch (one tile per block).
    short = (mr * cfg.nv - 1) // 8
    for step in range(len(ksteps)):
        # The M tiles of one task share the prefetch of the next weight panel into L2: the
        # next k step's, else the first of the block of this thread's next task. Tile mi
        # asks for its slice of `lp` lines, up to PF per `unroll` k steps.
        panel = ("nbk", *ksteps[step + 1]) if step + 1 < len(ksteps) else ("nxt", *ksteps[0])
        ind = " " * 16
        L += [
            f"{ind}lp{step}: T.let[T.int64] = ({_i(-(-panel[2] * nb // 16))} + {ct} - {_i(1)}) // {ct}",
            f"{ind}for mi in range(mlo, T.min(mlo + {ct}, {mt})):",
            f"{ind}    lp: T.let[T.int64] = lp{step}",
            f"{ind}    m0: T.let[T.int64] = mi * {_i(mr)}",
        ]
        ind = " " * 20
        L.append(f"{ind}if M - m0 > {_i(short)}:")
        L += _tile_rows(mr, f"M - {_i(1)}", ind + "    ")
        L += tile(mr, ind + "    ", "", panel, step)
        L += [
            f"{ind}else:",
            f"{ind}    for rr in range(M - m0):",
            f"{ind}        r0: T.let[T.int64] = m0 + rr",
        ]
        L += tile(1, ind + "        ", "t", None, step)
    return _parse("\n".join(L))


def pack_weight_kernel(cfg: KernelConfig, N: int, K: int, nk: bool):
    """W ([N, K] if nk else [K, N]) -> [NP, K, NB] zero-padded panels (run once, lifted);
    with `cfg.pairs`, [NP, K/2, NB] words of float16 or bfloat16 pairs (k even, k odd)."""
    nb = cfg.nb
    NP = -(-N // nb)
    KW = -(-K // 2) if cfg.pairs else K
    shape = f"({_i(N)}, {_i(K)})" if nk else f"({_i(K)}, {_i(N)})"

    def elem(k: str) -> str:
        """W at (k, column p * nb + j), zero past N (and past K: an odd K's last pair)."""
        n = f"p * {_i(nb)} + j"
        kk, ok = (f"T.min({k}, {_i(K - 1)})", f" and {k} < {_i(K)}") if cfg.pairs else (k, "")
        load = f"w[T.min({n}, {_i(N - 1)}), {kk}]" if nk else f"w[{kk}, T.min({n}, {_i(N - 1)})]"
        return f"T.if_then_else({n} < {_i(N)}{ok}, {load}, {_f(0.0)})"

    value = (
        _pair_word(elem(f"k * {_i(2)}"), elem(f"k * {_i(2)} + {_i(1)}"), cfg.pairs)
        if cfg.pairs
        else elem("k")
    )
    elementwise = [
        f"for k in range({_i(KW)}):",
        f"    for j in range({_i(nb)}):",
        f"        wp[p, k, j] = {value}",
    ]
    tiles = min(N // nb, K // cfg.vec)  # whole panels and whole tiles along k
    flat = ""
    if cfg.pairs or not nk or not tiles:
        body = [" " * 8 + line for line in elementwise]
    else:
        # W as one vector of N * K floats, for the gathers along its columns.
        flat = f'    wf = T.decl_buffer(({_i(N * K)},), "float32", data=w.data)\n'
        if N % nb:  # the last panel, padded with zeros, element by element
            body = [f"        if p < {_i(N // nb)}:"] + _pack_panel_tiles(cfg, N, K, 12)
            body += ["        else:"] + [" " * 12 + line for line in elementwise]
        else:  # no code for a case that does not occur: it costs compile time
            body = _pack_panel_tiles(cfg, N, K, 8)
    src = f"""
@T.prim_func(private=True, check_well_formed=False)
def pack_weight(w: T.Buffer({shape}, "float32"), wp: T.Buffer(({_i(NP)}, {_i(KW)}, {_i(nb)}), "float32")):
{_ATTRS}
{flat}    for p in T.parallel({_i(NP)}):
"""
    return _parse(src + "\n".join(body) + "\n")


def _pack_panel_tiles(cfg: KernelConfig, N: int, K: int, indent: int) -> list[str]:
    """The float32 [N, K] weight's whole panels (a panel: nb rows of W, as [K, nb]), in
    tiles of vec rows x vec columns: each of the tile's vec columns of W is gathered (a
    vector load with a stride of K) and stored as a vector of the panel, so the tile's vec
    cache lines of W are read while they are in L1 and each panel is written in order (one
    element at a time, with the padding tests, was slower: docs/build-stages.md). The last k
    columns short of a tile go one by one."""
    vec, nb = cfg.vec, cfg.nb
    whole = K // vec * vec
    gather = (
        f"wf[T.Ramp((p * {_i(nb)} + jb * {_i(vec)}) * {_i(K)} + kb * {_i(vec)} + c, "
        f"{_i(K)}, {vec})]"
    )
    lines = [
        f"for kb in range({_i(K // vec)}):",
        f"    for jb in range({_i(nb // vec)}):",
        f"        for c in range({_i(vec)}):",
        f"            wp[p, kb * {_i(vec)} + c, T.Ramp(jb * {_i(vec)}, {_i(1)}, {vec})] = {gather}",
    ]
    if whole < K:
        lines += [
            f"for k in range({_i(whole)}, {_i(K)}):",
            f"    for j in range({_i(nb)}):",
            f"        wp[p, k, j] = w[p * {_i(nb)} + j, k]",
        ]
    return [" " * indent + line for line in lines]


def _rows_of_x(shuffle: Shuffle | None) -> str:
    """The header of a row-parallel kernel's loop over X's rows (with a shuffle, the flat
    view and row r's offset `xr`)."""
    if shuffle is None:
        return "    for r in T.parallel(M):"
    return f"{shuffle.flat()}\n    for r in T.parallel(M):\n        xr: T.let[T.int64] = {shuffle.row('r')}"


def pairs_kernel(cfg: KernelConfig, K: int, shuffle: Shuffle | None = None):
    """X [M, K] float32 -> [M, K/2] words of `cfg.pairs` pairs (k even, k odd; an odd K's
    last word has a zero high half): the X operand of a float16 or bfloat16 GEMM
    (`gemm_kernel`). `shuffle`: X is a pixel shuffle's input, read in place."""
    vec = cfg.vec
    KW = -(-K // 2)
    # whole vectors: 2 * vec floats -> vec words
    full = K // (2 * vec) if shuffle is None or shuffle.whole(2 * vec) else 0
    odd = _x_at(shuffle, f"T.min(kp * {_i(2)} + {_i(1)}, {_i(K - 1)})")
    tail = _pair_word(
        _x_at(shuffle, f"kp * {_i(2)}"),
        f"T.if_then_else(kp * {_i(2)} + {_i(1)} < {_i(K)}, {odd}, {_f(0.0)})",
        cfg.pairs,
    )
    words = _as_pairs(_x_vector(shuffle, f"q * {_i(2 * vec)}", 2 * vec), 2 * vec, cfg.pairs)
    header = "\n".join(["    M = T.int64()", *_x_input(shuffle, K)])
    src = f"""
@T.prim_func(private=True, check_well_formed=False)
def to_pairs(x: T.handle, xw: T.handle):
{_ATTRS}
{header}
    XW = T.match_buffer(xw, (M, {_i(KW)}), "float32")
{_rows_of_x(shuffle)}
        for q in range({_i(full)}):
            XW[r, T.Ramp(q * {_i(vec)}, {_i(1)}, {vec})] = {words}
        for kp in range({_i(full * vec)}, {_i(KW)}):
            XW[r, kp] = {tail}
"""
    return _parse(src)


def round_kernel(cfg: KernelConfig, C: int, dtype: str, shuffle: Shuffle | None = None):
    """X [M, C] float32 -> its values rounded to `dtype` (float16, or bfloat16 to nearest
    even), as float32: the operands of the float32 GEMMs under a 16-bit `precision` on a CPU
    without that arithmetic. (Relax's astype to bfloat16 and back does not round on llvm:
    fused into one kernel, TVM's bfloat16 legalization computes the pair in float32.)
    `shuffle`: X is a pixel shuffle's input, read in place."""
    vec = cfg.vec
    full = C // vec if shuffle is None or shuffle.whole(vec) else 0

    def rounded(x: str, lanes: str) -> str:
        if dtype == "bfloat16":
            bits = _bf16_bits(x, f"uint32{lanes}")
            return f'T.reinterpret("float32{lanes}", T.shift_left({bits}, 16))'
        return f'T.Cast("float32{lanes}", T.Cast("float16{lanes}", {x}))'

    header = "\n".join(["    M = T.int64()", *_x_input(shuffle, C)])
    src = f"""
@T.prim_func(private=True, check_well_formed=False)
def round16(x: T.handle, y: T.handle):
{_ATTRS}
{header}
    Y = T.match_buffer(y, (M, {_i(C)}), "float32")
{_rows_of_x(shuffle)}
        for q in range({_i(full)}):
            Y[r, T.Ramp(q * {_i(vec)}, {_i(1)}, {vec})] = {rounded(_x_vector(shuffle, f"q * {_i(vec)}", vec), f"x{vec}")}
        for c in range({_i(full * vec)}, {_i(C)}):
            Y[r, c] = {rounded(_x_at(shuffle, "c"), "")}
"""
    return _parse(src)


def avg_pool_kernel(cfg: KernelConfig, side: int, k: int, D: int):
    """The mean of each k x k block of tokens of a [B, side^2, D] grid (row-major) -> Y
    [B t^2, D], t = side / k, its rows the blocks in row-major order (Gemma 3's projector).
    Rows in parallel; a row's sums in a stack buffer of D floats, to which the block's
    tokens are added one after another, in whole vectors and a scalar tail."""
    t = side // k
    L = [
        "@T.prim_func(private=True, check_well_formed=False)",
        "def avg_pool(x: T.handle, y: T.handle):",
        _ATTRS,
        "    B = T.int64()",
        "    M = T.int64()",
        f'    X = T.match_buffer(x, (B, {_i(side * side)}, {_i(D)}), "float32")',
        f'    Y = T.match_buffer(y, (M, {_i(D)}), "float32")',
        "    for r in T.parallel(M):",
        f"        b: T.let[T.int64] = r // {_i(t * t)}",
        f"        first: T.let[T.int64] = r % {_i(t * t)} // {_i(t)} * {_i(k * side)} + r % {_i(t)} * {_i(k)}",
        "        " + _local("acc", D),
        *_columns(cfg, D, " " * 8, f"acc[c] = {_f(0.0)}"),
        f"        for a in range({_i(k)}):",
        f"            for e in range({_i(k)}):",
        f"                tok: T.let[T.int64] = first + a * {_i(side)} + e",
        *_columns(cfg, D, " " * 16, "acc[c] = acc[c] + X[b, tok, c]"),
        *_columns(cfg, D, " " * 8, f"Y[r, c] = acc[c] * {_f(1.0 / (k * k))}"),
    ]
    return _parse("\n".join(L))


def attn_padding(cfg: KernelConfig, S: int, D: int) -> tuple[int, int]:
    """(SP, DP): keys padded to whole N blocks, head dim padded to whole vectors."""
    return -(-S // cfg.nb) * cfg.nb, -(-D // cfg.vec) * cfg.vec


def attn_packed(cfg: KernelConfig, S: int, D: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The shapes after (B, H) of the packed K^T and V that `attention_kernel` takes:
    float32 [D, SP] and [S, DP], or with `cfg.bf16` words of bfloat16 pairs: K^T's pairs
    along the head dim, [D/2, SP], V's pairs of keys, [S/2, DP] (odd counts rounded up, the
    last word's high half zero)."""
    SP, DP = attn_padding(cfg, S, D)
    if cfg.bf16:
        return (-(-D // 2), SP), (-(-S // 2), DP)
    return (D, SP), (S, DP)


def _n(v: int | str) -> str:
    """A size in TVMScript: a constant, or the name of a symbolic one."""
    return v if isinstance(v, str) else _i(v)


def _last(v: int | str) -> str:
    """The last index below a size (`_n`)."""
    return f"{v} - {_i(1)}" if isinstance(v, str) else _i(v - 1)


def _bf16_pair_at(at, index: str, count: int | str) -> str:
    """The word of the bfloat16 pair (`at(2 index)`, `at(2 index + 1)`), where `at(i)` is the
    element expression at i of `count` (past it, an odd count's last word, a zero half)."""
    odd = f"{index} * {_i(2)} + {_i(1)}"
    high = f"T.if_then_else({odd} < {_n(count)}, {at(f'T.min({odd}, {_last(count)})')}, {_f(0.0)})"
    return _pair_word(at(f"{index} * {_i(2)}"), high, "bfloat16")


def attn_pack_k_kernel(cfg: KernelConfig, S: int | None, H: int, D: int):
    """K [B,S,H,D] -> K^T [B,H,D,SP] (keys contiguous, zero padded to the N block; tiled by
    16 keys so the 16 source rows stay in L1 across the head dim); with `cfg.bf16`,
    [B,H,D/2,SP] words of bfloat16 pairs (d even, d odd) of each key (`attn_packed`).
    `S` None: the key count is K's symbolic length, and SP whatever whole N blocks K^T's
    shape gives (`attention_seq_kernel`'s)."""
    (DK, SP), _ = attn_packed(cfg, S or 1, D)
    tile = math.gcd(16, cfg.nb)
    j = f"jb * {_i(tile)} + jj"
    n, blocks = ("S", f"SP // {_i(tile)}") if S is None else (_i(S), _i(SP // tile))
    sizes = "    S = T.int64()\n    SP = T.int64()\n" if S is None else ""
    width = "SP" if S is None else _i(SP)

    def k_at(d: str) -> str:
        return f"Kb[bh // {_i(H)}, T.min({j}, {_last(S or n)}), bh % {_i(H)}, {d}]"

    value = _bf16_pair_at(k_at, "d", D) if cfg.bf16 else k_at("d")
    kt = f"""
@T.prim_func(private=True, check_well_formed=False)
def attn_pack_k(k: T.handle, kt: T.handle):
{_ATTRS}
    B = T.int64()
{sizes}    Kb = T.match_buffer(k, (B, {n}, {_i(H)}, {_i(D)}), "float32")
    KT = T.match_buffer(kt, (B, {_i(H)}, {_i(DK)}, {width}), "float32")
    for bh in T.parallel(B * {_i(H)}):
        for jb in range({blocks}):
            for d in range({_i(DK)}):
                for jj in range({_i(tile)}):
                    KT[bh // {_i(H)}, bh % {_i(H)}, d, {j}] = T.if_then_else({j} < {n}, {value}, {_f(0.0)})
"""
    return _parse(kt)


def attn_pack_v_kernel(cfg: KernelConfig, S: int | None, H: int, D: int):
    """V [B,S,H,D] -> [B,H,S,DP] (head dim padded to whole vectors); with `cfg.bf16`,
    [B,H,S/2,DP] words of bfloat16 pairs of keys (even, odd) for each d (`attn_packed`).
    `S` None: the key count is V's symbolic length."""
    _, (SK, DP) = attn_packed(cfg, S or 1, D)
    n, rows = ("S", "SK") if S is None else (_i(S), _i(SK))
    sizes = "    S = T.int64()\n    SK = T.int64()\n" if S is None else ""

    def v_at(j: str) -> str:
        return f"Vb[bh // {_i(H)}, {j}, bh % {_i(H)}, T.min(d, {_i(D - 1)})]"

    value = _bf16_pair_at(v_at, "j", S or n) if cfg.bf16 else v_at("j")
    vp = f"""
@T.prim_func(private=True, check_well_formed=False)
def attn_pack_v(v: T.handle, vp: T.handle):
{_ATTRS}
    B = T.int64()
{sizes}    Vb = T.match_buffer(v, (B, {n}, {_i(H)}, {_i(D)}), "float32")
    VP = T.match_buffer(vp, (B, {_i(H)}, {rows}, {_i(DP)}), "float32")
    for bh in T.parallel(B * {_i(H)}):
        for j in range({rows}):
            for d in range({_i(DP)}):
                VP[bh // {_i(H)}, bh % {_i(H)}, j, d] = T.if_then_else(d < {_i(D)}, {value}, {_f(0.0)})
"""
    return _parse(vp)


def _attn_pair_products(
    cfg: KernelConfig,
    mr: int,
    ind: str,
    step: str,
    count: str,
    acc: str,
    word: str,
    operand,
    n: int,
) -> list[str]:
    """A loop over `count` pair steps (index `step`) that adds to vector v < n of each of the
    mr rows' `acc`{i} the pair products of the broadcast word `word`{i}[step] and the vector
    `operand(v)` (vdpbf16ps)."""
    vec = cfg.vec
    lanes = f"int32x{vec}"
    out = [f"{ind}for {step} in range({count}):"]
    for v in range(n):
        w = f'T.reinterpret("{lanes}", {operand(v)})'
        for i in range(mr):
            a = f"{acc}{i}[T.Ramp({_i(v * vec)}, {_i(1)}, {vec})]"
            x = f'T.reinterpret("{lanes}", T.Broadcast({word}{i}[{step}], {vec}))'
            out.append(
                f"{ind}    {a} = T.call_extern('float32x{vec}', '{BF16_DOT}', {a}, {x}, {w})"
            )
    return out


def _attn_scores(
    cfg: KernelConfig, mr: int, D: int, base: str, width: int, ind: str, at: str, valid=None
) -> list[str]:
    """The raw scores s_i[`at` + j] = q_i . k_(`base` + j) of one block of `width` keys, for
    the mr rows r_i of the tile; where `valid(i, key)` is given, a key it rejects scores
    `_ATTN_MASKED` instead."""
    vec = cfg.vec
    out = []
    for i in range(mr):
        out += _fill(f"acc{i}", width, ind)
    if cfg.bf16:
        kv = lambda v: f"KT[b, h, d, T.Ramp({base} + {_i(v * vec)}, {_i(1)}, {vec})]"  # noqa: E731
        count = _i(-(-D // 2))
        out += _attn_pair_products(cfg, mr, ind, "d", count, "acc", "qw", kv, width // vec)
    else:
        out.append(f"{ind}for d in range({_i(D)}):")
        for i in range(mr):
            out += [
                f"{ind}    for j in T.vectorized({_i(width)}):",
                f"{ind}        acc{i}[j] = acc{i}[j] + Q[b, r{i}, h, d] * KT[b, h, d, {base} + j]",
            ]
    for i in range(mr):
        value = f"acc{i}[j]"
        if valid is not None:
            value = f"T.Select({valid(i, f'{base} + j')}, {value}, {_f(_ATTN_MASKED)})"
        out += [
            f"{ind}for j in T.vectorized({_i(width)}):",
            f"{ind}    s{i}[{at} + j] = {value}",
        ]
    return out


def _attn_q_pairs(cfg: KernelConfig, mr: int, D: int, ind: str) -> list[str]:
    """The tile's Q rows as bfloat16 pairs along the head dim, in `qw`{i}."""
    vec, out = cfg.vec, []
    for i in range(mr):
        if D % (2 * vec) == 0:
            out += [
                f"{ind}for c in range({_i(D // (2 * vec))}):",
                f"{ind}    qw{i}[T.Ramp(c * {_i(vec)}, {_i(1)}, {vec})] = "
                + _as_pairs(
                    f"Q[b, r{i}, h, T.Ramp(c * {_i(2 * vec)}, {_i(1)}, {2 * vec})]",
                    2 * vec,
                    "bfloat16",
                ),
            ]
        else:
            q_at = lambda d, i=i: f"Q[b, r{i}, h, {d}]"  # noqa: E731
            out += [
                f"{ind}for c in range({_i(-(-D // 2))}):",
                f"{ind}    qw{i}[c] = {_bf16_pair_at(q_at, 'c', D)}",
            ]
    return out


def _attn_p_pairs(cfg: KernelConfig, mr: int, groups: str, ind: str) -> list[str]:
    """P as bfloat16 pairs of keys, in place, `groups` vector pairs of each row: word t of
    row i goes to s_i[t], where the scores it came from (2t, 2t + 1) or ones already
    converted lay."""
    vec, out = cfg.vec, []
    for i in range(mr):
        out += [
            f"{ind}for c in range({groups}):",
            f"{ind}    s{i}[T.Ramp(c * {_i(vec)}, {_i(1)}, {vec})] = "
            + _as_pairs(
                f"s{i}[T.Ramp(c * {_i(2 * vec)}, {_i(1)}, {2 * vec})]", 2 * vec, "bfloat16"
            ),
        ]
    return out


def _attn_store(cfg: KernelConfig, mr: int, D: int, ind: str) -> list[str]:
    """The output rows, `out`{i} times `sc`{i}[1], in whole vectors and an unrolled tail, as
    the tile was zeroed (`_fill`)."""
    vec, out = cfg.vec, []
    full_v, tail = divmod(D, vec)
    for i in range(mr):
        out += [
            f"{ind}for v in T.unroll({_i(full_v)}):",
            f"{ind}    for l in T.vectorized({_i(vec)}):",
            f"{ind}        O[b, r{i}, h, v * {_i(vec)} + l] = out{i}[v * {_i(vec)} + l] * sc{i}[1]",
        ]
        if tail:
            out += [
                f"{ind}for l in T.unroll({_i(tail)}):",
                f"{ind}    O[b, r{i}, h, {_i(full_v * vec)} + l] = out{i}[{_i(full_v * vec)} + l] * sc{i}[1]",
            ]
    return out


def _attn_tasks(
    cfg: KernelConfig, mr: int, H: int, CA: str, HCA: str, MT: str, ca: str = ""
) -> list[str]:
    """The work queue over (batch, head, `_ATTN_TILES` query tiles): `CA` tasks per (batch,
    head), `HCA` per batch, `MT` tiles per head; `ca`, where given, is the value of `CA`, a
    let bound in each task. The tile's body goes at 20 spaces, its first row `m0`."""
    G, ind = _ATTN_TILES, " " * 16
    ntask = f"B * {_i(H)} * ({ca})" if ca else f"B * {HCA}"
    out = _task_loop(ntask, BF16_DOT_IR if cfg.bf16 else "")
    if ca:
        out.append(f"{ind}{CA}: T.let[T.int64] = {ca}")
    return out + [
        f"{ind}b: T.let[T.int64] = cur[0] // {HCA}",
        f"{ind}h: T.let[T.int64] = cur[0] // {CA} % {_i(H)}",
        f"{ind}mlo: T.let[T.int64] = cur[0] % {CA} * {_i(G)}",
        f"{ind}for mi in range(mlo, T.min(mlo + {_i(G)}, {MT})):",
        f"{ind}    m0: T.let[T.int64] = mi * {_i(mr)}",
    ]


def _attn_locals(cfg: KernelConfig, mr: int, scores: int, DP: int, DK: int, ind: str) -> list[str]:
    """The tile's stack buffers, per row: `scores` scores, a key block's accumulators, the
    output row, a vector for the row reductions, two scalars; with `cfg.bf16` the Q row's
    pairs."""
    out = []
    for i in range(mr):
        out += [
            ind + _local(f"s{i}", scores),
            ind + _local(f"acc{i}", cfg.nb),
            ind + _local(f"out{i}", DP),
            ind + _local(f"red{i}", cfg.vec),
            ind + _local(f"sc{i}", 2),
        ]
        if cfg.bf16:
            out.append(ind + _local(f"qw{i}", DK))
    return out


def _attn_row_max(cfg: KernelConfig, mr: int, count: str, ind: str) -> list[str]:
    """red_i = the lane-wise max of red_i and the scores s_i of `count` vectors, the rows side
    by side so that their max chains overlap."""
    vec, out = cfg.vec, [f"{ind}for jv in range({count}):"]
    for i in range(mr):
        out += [
            f"{ind}    for l in T.vectorized({_i(vec)}):",
            f"{ind}        red{i}[l] = T.max(red{i}[l], s{i}[jv * {_i(vec)} + l])",
        ]
    return out


def _attn_exps(cfg: KernelConfig, mr: int, count: str, scale: float, top, ind: str) -> list[str]:
    """p = exp(s_i * scale - `top(i)`) (one FMA, <= 0) in place of the scores of `count`
    vectors, summed lane-wise into red_i."""
    vec, out = cfg.vec, [f"{ind}for jv in range({count}):"]
    for i in range(mr):
        out.append(f"{ind}    for l in T.vectorized({_i(vec)}):")
        out += _exp_lines(
            f"s{i}[jv * {_i(vec)} + l] * {_f(scale)} - {top(i)}",
            f"ex{i}",
            ind + "        ",
            f"e{i}",
            upper=False,
        )
        out += [
            f"{ind}        s{i}[jv * {_i(vec)} + l] = ex{i}",
            f"{ind}        red{i}[l] = red{i}[l] + ex{i}",
        ]
    return out


def _attn_pv(cfg: KernelConfig, mr: int, DP: int, count: str, row: str, ind: str) -> list[str]:
    """out_i += p_i[j] V[`row`] for j < `count`, in whole vectors (an 80-lane vector, head
    dim 72, made LLVM shuffle through the stack), unrolled so the accumulators stay in
    registers."""
    vec = cfg.vec
    out = [f"{ind}for j in range({count}):", f"{ind}    for v in T.unroll({_i(DP // vec)}):"]
    for i in range(mr):
        out += [
            f"{ind}        for l in T.vectorized({_i(vec)}):",
            f"{ind}            out{i}[v * {_i(vec)} + l] = out{i}[v * {_i(vec)} + l]"
            f" + s{i}[j] * VP[b, h, {row}, v * {_i(vec)} + l]",
        ]
    return out


_ATTN_TILES = 8  # query tiles per task
# The score of a key that the kernel must not weigh (past the last key, outside the query's
# segment). Its weight, exp(score * scale - max), is the exp's floor, exp(-87) ~ 1.6e-38.
_ATTN_MASKED = -1e30


def attention_kernel(
    cfg: KernelConfig, S: int, H: int, D: int, scale: float, queries: int | None = None
):
    """O = softmax(Q K^T * scale) V over S keys, for `queries` queries (S unless given: a
    cross-attention such as SigLIP's pooling probe has fewer); a task is `_ATTN_TILES`
    tiles of mr queries of one (batch, head), taken from a work queue (`_task_loop`).

    Scores for the tile live in a [mr, SV] stack buffer (<= ~20 KiB, L1); Q.K^T and P.V use
    the same broadcast-FMA micro kernel as the GEMM. Q.K^T runs whole key blocks, then only
    the vectors the last keys need (577 keys: 9 blocks of 64 and one vector, not 10 blocks).
    P.V runs one vector at a time, unrolled: an 80-lane vector (head dim 72) made LLVM
    shuffle through the stack (docs/cpu-pipeline.md). The scale goes into the exponent; the 1/sum
    normalization is applied to the output tile instead of P. Needs scale > 0.

    With `cfg.bf16`, Q.K^T and P.V sum products of bfloat16 operands in float32 lanes
    (vdpbf16ps, as the bfloat16 GEMMs): K^T and V come packed as bfloat16 pairs
    (`attn_packed`), each tile converts its Q rows to pairs along the head dim and, after
    the softmax (float32), its P rows to pairs of keys. The last key block then covers
    whole pairs of vectors (P's pairs are converted a vector pair at a time)."""
    nb, vec, mr = cfg.nb, cfg.vec, cfg.mr
    bf16 = cfg.bf16
    (DK, SP), (SK, DP) = attn_packed(cfg, S, D)
    full, rest = divmod(S, nb)
    step = 2 * vec if bf16 else vec
    rv = -(-rest // step) * step  # lanes of the last, partial key block
    SV = full * nb + rv  # scores computed (the rest of SP is never read)
    if DP // vec > 4:  # keep accumulators within the register file
        mr = 4
    SQ = S if queries is None else queries
    MT = -(-SQ // mr)
    L = [
        "@T.prim_func(private=True, check_well_formed=False)",
        "def attention(q: T.handle, kt: T.handle, vp: T.handle, o: T.handle):",
        _ATTRS,
        "    B = T.int64()",
        f'    Q = T.match_buffer(q, (B, {_i(SQ)}, {_i(H)}, {_i(D)}), "float32")',
        f'    KT = T.match_buffer(kt, (B, {_i(H)}, {_i(DK)}, {_i(SP)}), "float32")',
        f'    VP = T.match_buffer(vp, (B, {_i(H)}, {_i(SK)}, {_i(DP)}), "float32")',
        f'    O = T.match_buffer(o, (B, {_i(SQ)}, {_i(H)}, {_i(D)}), "float32")',
    ]
    G = _ATTN_TILES
    CA = -(-MT // G)  # tasks per (batch, head)
    L += _attn_tasks(cfg, mr, H, _i(CA), _i(H * CA), _i(MT))
    ind = " " * 20
    L += _tile_rows(mr, _i(SQ - 1), ind)
    L += _attn_locals(cfg, mr, SV, DP, DK, ind)
    for i in range(mr):
        L += _fill(f"red{i}", vec, ind, -1e30)
    if bf16:  # the tile's Q rows as bfloat16 pairs along the head dim
        L += _attn_q_pairs(cfg, mr, D, ind)

    # ---- raw scores s_i[j] = q_i . k_j, keys [base, base + width)
    def score_block(base: str, width: int, ind2: str, ragged: bool) -> list[str]:
        valid = (lambda i, j: f"{j} < {_i(S)}") if ragged else None  # noqa: E731
        return _attn_scores(cfg, mr, D, base, width, ind2, base, valid)

    if full:
        L.append(f"{ind}for jb in range({_i(full)}):")
        L += score_block(f"jb * {_i(nb)}", nb, ind + "    ", False)
    if rv:
        L += score_block(_i(full * nb), rv, ind, True)
    # ---- softmax: row max (a pass of its own: folded into the score stores it was slower),
    # p = exp(s * scale - max * scale) (one FMA, always <= 0), vector sums, then horizontal.
    # Each pass walks the rows side by side so that their max/sum chains overlap (one row at
    # a time, the chains' latency cost as much as the exps).
    nv = SV // vec
    L += _attn_row_max(cfg, mr, _i(nv), ind)
    for i in range(mr):
        lanes = [f"red{i}[{l}]" for l in range(vec)]
        L += [
            f"{ind}sc{i}[0] = {_tree(lambda a, b: f'T.max({a}, {b})', lanes)} * {_f(scale)}",
            *_fill(f"red{i}", vec, ind),
        ]
    L += _attn_exps(cfg, mr, _i(nv), scale, lambda i: f"sc{i}[0]", ind)
    for i in range(mr):
        lanes = [f"red{i}[{l}]" for l in range(vec)]
        L.append(f"{ind}sc{i}[1] = {_f(1.0)} / {_tree(lambda a, b: f'({a} + {b})', lanes)}")
    # ---- O tile = P V, scaled by 1/sum
    for i in range(mr):
        L += _fill(f"out{i}", DP, ind, vec=vec)
    if bf16:
        # P as bfloat16 pairs of keys, in place (`_attn_p_pairs`). A masked key's p is at
        # most exp(-87) (the exp's clamp) and past S its V pairs are zero.
        L += _attn_p_pairs(cfg, mr, _i(SV // (2 * vec)), ind)
        vv = lambda v: f"VP[b, h, t, T.Ramp({_i(v * vec)}, {_i(1)}, {vec})]"  # noqa: E731
        L += _attn_pair_products(cfg, mr, ind, "t", _i(SK), "out", "s", vv, DP // vec)
    else:
        L += _attn_pv(cfg, mr, DP, _i(S), "j", ind)
    L += _attn_store(cfg, mr, D, ind)
    return _parse("\n".join(L))


# Keys per chunk of the sequence kernel: the tile's scores of one chunk stay in a stack buffer
# (mr x 512 floats, 12 KiB), in L1 beside the K^T block the tile reads.
_ATTN_CHUNK = 512


def attn_seq_padding(cfg: KernelConfig, S, segments: bool = False):
    """The packed K^T's width for `attention_seq_kernel` over S keys (a symbolic length):
    whole N blocks, one more where the tiles' key ranges start anywhere (`segments`)."""
    SP, _ = attn_padding(cfg, S, 1)
    return SP + cfg.nb if segments else SP


def attn_segments_kernel():
    """The key range [lo, hi) of each query of `attention_var_len` (cu_seqlens as HF and
    flash-attention define them): query i is in segment c = #{k >= 1: seqstart_q[k] <= i}
    and attends to the keys of segment c, [seqstart_k[c], seqstart_k[c + 1]) (from 0 for
    the first, to the last key for the one past the last start). Rows in parallel, c by
    binary search; the range clamped to [0, S] whatever the starts hold."""
    src = f"""
@T.prim_func(private=True, check_well_formed=False)
def attn_segments(sq: T.handle, sk: T.handle, S: T.int64, seg: T.handle):
{_ATTRS}
    K1 = T.int64()
    SQ = T.int64()
    SSQ = T.match_buffer(sq, (K1,), "int32")
    SSK = T.match_buffer(sk, (K1,), "int32")
    SEG = T.match_buffer(seg, (SQ, {_i(2)}), "int32")
    for r in T.parallel(SQ):
        lo = T.alloc_buffer(({_i(1)},), "int64", scope="local")
        up = T.alloc_buffer(({_i(1)},), "int64", scope="local")
        lo[0] = {_i(1)}
        up[0] = K1
        while lo[0] < up[0]:
            mid: T.let[T.int64] = (lo[0] + up[0]) // {_i(2)}
            if T.Cast("int64", SSQ[mid]) > r:
                up[0] = mid
            else:
                lo[0] = mid + {_i(1)}
        c: T.let[T.int64] = lo[0] - {_i(1)}
        first: T.let[T.int64] = T.if_then_else(c == {_i(0)}, {_i(0)}, T.Cast("int64", SSK[c]))
        end: T.let[T.int64] = T.if_then_else(c + {_i(1)} < K1, T.Cast("int64", SSK[T.min(c + {_i(1)}, K1 - {_i(1)})]), S)
        klo: T.let[T.int64] = T.min(T.max(first, {_i(0)}), S)
        SEG[r, 0] = T.Cast("int32", klo)
        SEG[r, 1] = T.Cast("int32", T.min(T.max(end, klo), S))
"""
    return _parse(src)


def attention_seq_kernel(cfg: KernelConfig, H: int, D: int, scale: float, segments: bool = False):
    """`attention_kernel` for a sequence length known only at run time: S keys (the argument
    after the inputs), as many queries as Q has. The tile's keys go by in chunks of
    `_ATTN_CHUNK` with an online softmax: each chunk's scores in the stack buffer, then its
    row max; where that raises the running max, the tile's sums and output so far are scaled
    down by exp(old - new) before the chunk's exps and P.V add to them. Up to one chunk
    (512 keys) it computes what `attention_kernel` does, plus one mask per score (whether
    the key is past S).

    `segments` (`attention_var_len`): a fourth input, [SQ, 2] int32, holds each query's key
    range (`attn_segments_kernel`); a tile runs the keys from the least start of its rows to
    the greatest end, and masks each row's keys outside its own range. So each tile costs
    the segments it touches, never the whole sequence; K^T then has an N block more
    (`attn_seq_padding`), for a range that starts within a block.

    With `cfg.bf16` the products take bfloat16 pairs as in `attention_kernel` (a segment
    tile's keys start at an even key, so that P's pairs are V's)."""
    nb, vec, mr = cfg.nb, cfg.vec, cfg.mr
    bf16 = cfg.bf16
    DK, DP = (-(-D // 2) if bf16 else D), -(-D // vec) * vec
    if DP // vec > 4:  # keep accumulators within the register file
        mr = 4
    C, G = _ATTN_CHUNK, _ATTN_TILES
    seg = "seg: T.handle, " if segments else ""
    L = [
        "@T.prim_func(private=True, check_well_formed=False)",
        f"def attention_seq(q: T.handle, kt: T.handle, vp: T.handle, {seg}S: T.int64, o: T.handle):",
        _ATTRS,
        "    B = T.int64()",
        "    SQ = T.int64()",
        "    SP = T.int64()",
        "    SK = T.int64()",
        f'    Q = T.match_buffer(q, (B, SQ, {_i(H)}, {_i(D)}), "float32")',
        f'    KT = T.match_buffer(kt, (B, {_i(H)}, {_i(DK)}, SP), "float32")',
        f'    VP = T.match_buffer(vp, (B, {_i(H)}, SK, {_i(DP)}), "float32")',
        f'    O = T.match_buffer(o, (B, SQ, {_i(H)}, {_i(D)}), "float32")',
    ]
    if segments:
        L.append(f'    SEG = T.match_buffer(seg, (SQ, {_i(2)}), "int32")')
    MT = f"(SQ + {_i(mr - 1)}) // {_i(mr)}"
    CA = f"({MT} + {_i(G - 1)}) // {_i(G)}"  # tasks per (batch, head)
    L += _attn_tasks(cfg, mr, H, "ca", f"({_i(H)} * ca)", MT, ca=CA)
    ind = " " * 20
    L += _tile_rows(mr, "SQ - T.int64(1)", ind)
    if segments:
        for i in range(mr):
            L += [
                f'{ind}lo{i}: T.let[T.int64] = T.Cast("int64", SEG[r{i}, 0])',
                f'{ind}hi{i}: T.let[T.int64] = T.Cast("int64", SEG[r{i}, 1])',
            ]
        first = _tree(lambda a, b: f"T.min({a}, {b})", [f"lo{i}" for i in range(mr)])
        if bf16:
            first = f"{first} // {_i(2)} * {_i(2)}"
        last = _tree(lambda a, b: f"T.max({a}, {b})", [f"hi{i}" for i in range(mr)])
        L += [f"{ind}klo: T.let[T.int64] = {first}", f"{ind}khi: T.let[T.int64] = {last}"]
        valid = lambda i, j: f"lo{i} <= {j} and {j} < hi{i}"  # noqa: E731
    else:
        L += [f"{ind}klo: T.let[T.int64] = {_i(0)}", f"{ind}khi: T.let[T.int64] = S"]
        valid = lambda i, j: f"{j} < S"  # noqa: E731
    L += _attn_locals(cfg, mr, C + 2, DP, DK, ind)
    for i in range(mr):
        L += _fill(f"out{i}", DP, ind, vec=vec)
        # The running max (scaled) and sum, past the scores in memory, not in registers that
        # P.V needs for its accumulators (held in vectors there, they spilled these); and
        # at the buffer's end, so that it keeps its size (compacted to the extent of the
        # scores, it would be a stack buffer of a symbolic size). The max starts above any
        # masked score's: a chunk of masked keys alone weighs them at the exp's floor.
        L += [
            f"{ind}s{i}[{_i(C)}] = {_f(0.5 * _ATTN_MASKED * scale)}",
            f"{ind}s{i}[{_i(C + 1)}] = {_f(0.0)}",
        ]
    if bf16:
        L += _attn_q_pairs(cfg, mr, D, ind)
    L.append(f"{ind}for ch in range((khi - klo + {_i(C - 1)}) // {_i(C)}):")
    ind = " " * 24
    L += [
        f"{ind}c0: T.let[T.int64] = klo + ch * {_i(C)}",
        f"{ind}kn: T.let[T.int64] = T.min({_i(C)}, khi - c0)",
        f"{ind}nblk: T.let[T.int64] = (kn + {_i(nb - 1)}) // {_i(nb)}",
        f"{ind}for jb in range(nblk):",
    ]
    L += _attn_scores(cfg, mr, D, f"c0 + jb * {_i(nb)}", nb, ind + "    ", f"jb * {_i(nb)}", valid)
    # ---- online softmax: the chunk's row max, the running max, the rescale of what is summed
    for i in range(mr):
        L += _fill(f"red{i}", vec, ind, _ATTN_MASKED)
    vectors = f"nblk * {_i(nb // vec)}"
    L += _attn_row_max(cfg, mr, vectors, ind)
    for i in range(mr):
        lanes = [f"red{i}[{l}]" for l in range(vec)]
        top = f"T.max(s{i}[{_i(C)}], {_tree(lambda a, b: f'T.max({a}, {b})', lanes)} * {_f(scale)})"
        L += [f"{ind}top{i}: T.let[T.float32] = {top}"]
        L += _exp_lines(f"s{i}[{_i(C)}] - top{i}", f"al{i}", ind, f"a{i}", upper=False)
        L += [f"{ind}sc{i}[1] = al{i}", f"{ind}s{i}[{_i(C)}] = top{i}"]
    for i in range(mr):
        L += [
            f"{ind}for v in T.unroll({_i(DP // vec)}):",
            f"{ind}    for l in T.vectorized({_i(vec)}):",
            f"{ind}        out{i}[v * {_i(vec)} + l] = out{i}[v * {_i(vec)} + l] * sc{i}[1]",
            *_fill(f"red{i}", vec, ind),
        ]
    L += _attn_exps(cfg, mr, vectors, scale, lambda i: f"top{i}", ind)
    for i in range(mr):
        lanes = [f"red{i}[{l}]" for l in range(vec)]
        total = _tree(lambda a, b: f"({a} + {b})", lanes)
        L.append(f"{ind}s{i}[{_i(C + 1)}] = s{i}[{_i(C + 1)}] * sc{i}[1] + {total}")
    # ---- out += P V over the chunk's keys
    if bf16:
        # Pairs of keys from c0 (even): a last odd key's partner is masked (or past S, with
        # zero V), its weight at most exp(-87).
        L += _attn_p_pairs(cfg, mr, f"nblk * {_i(nb // (2 * vec))}", ind)
        vv = lambda v: f"VP[b, h, c0 // {_i(2)} + t, T.Ramp({_i(v * vec)}, {_i(1)}, {vec})]"  # noqa: E731
        count = f"(kn + {_i(1)}) // {_i(2)}"
        L += _attn_pair_products(cfg, mr, ind, "t", count, "out", "s", vv, DP // vec)
    else:
        L += _attn_pv(cfg, mr, DP, "kn", "c0 + j", ind)
    ind = " " * 20
    for i in range(mr):
        L.append(f"{ind}sc{i}[1] = {_f(1.0)} / s{i}[{_i(C + 1)}]")
    L += _attn_store(cfg, mr, D, ind)
    return _parse("\n".join(L))


def layer_norm_kernel(
    cfg: KernelConfig,
    C: int,
    eps: float,
    pairs_out: bool = False,
    shuffle: Shuffle | None = None,
):
    """Row-parallel LayerNorm over the last axis: two passes (mean, then centered variance)
    for accuracy, fused scale and shift on the store (`_norm_kernel`)."""
    return _norm_kernel(cfg, C, eps, pairs_out, centered=True, shuffle=shuffle)


def rms_norm_kernel(
    cfg: KernelConfig,
    C: int,
    eps: float,
    pairs_out: bool = False,
    shuffle: Shuffle | None = None,
):
    """Row-parallel RMSNorm over the last axis, x / sqrt(mean(x^2) + eps) * weight: one pass
    for the sum of squares, the scale on the store (`_norm_kernel`)."""
    return _norm_kernel(cfg, C, eps, pairs_out, centered=False, shuffle=shuffle)


def _norm_kernel(
    cfg: KernelConfig,
    C: int,
    eps: float,
    pairs_out: bool,
    centered: bool,
    shuffle: Shuffle | None = None,
):
    """LayerNorm (`centered`: gamma and beta) or RMSNorm (gamma only) of each row of X
    [M, C], rows in parallel. The sums run in vector partial sums over whole vectors, a
    scalar tail past them (the legalized version reduces in one serial scalar chain).
    `pairs_out` (C % (2 vec) == 0): Y is [M, C/2] words of float16 or
    bfloat16 pairs, a 16-bit GEMM's X. `shuffle` (its segments whole vectors, of 2 vec
    with `pairs_out`): X is a pixel shuffle's input, read in place (`Shuffle`)."""
    assert shuffle is None or shuffle.whole(2 * cfg.vec if pairs_out else cfg.vec)
    vec = cfg.vec
    # X's element of column c: with a shuffle, `cx` is its offset in row r (`_row_sum`)
    x = "X[r, c]" if shuffle is None else "Xf[xr + cx]"
    col = shuffle.col if shuffle else None
    name = "layer_norm" if centered else "rms_norm"
    params = [f'gamma: T.Buffer(({_i(C)},), "float32")']
    if centered:
        params.append(f'beta: T.Buffer(({_i(C)},), "float32")')
    L = [
        "@T.prim_func(private=True, check_well_formed=False)",
        f"def {name}(x: T.handle, {', '.join(params)}, y: T.handle):",
        _ATTRS,
        "    M = T.int64()",
        *_x_input(shuffle, C),
        f'    Y = T.match_buffer(y, (M, {_i(C // 2 if pairs_out else C)}), "float32")',
        _rows_of_x(shuffle),
        "        " + _local("red", vec),
        "        " + _local("sc", 2),
    ]
    if centered:
        L += _row_sum(cfg, C, "sc[0]", x, " " * 8, col)
        L.append(f"        sc[0] = sc[0] * {_f(1.0 / C)}")
        squares = f"({x} - sc[0]) * ({x} - sc[0])"
        norm = f"({x} - sc[0]) * sc[1] * gamma[c] + beta[c]"
    else:
        squares = f"{x} * {x}"
        norm = f"{x} * sc[1] * gamma[c]"
    L += _row_sum(cfg, C, "sc[1]", squares, " " * 8, col)
    L.append(f"        sc[1] = {_f(1.0)} / T.sqrt(sc[1] * {_f(1.0 / C)} + {_f(eps)})")
    if not pairs_out:
        L += _row_store(cfg, C, norm, " " * 8, col)
        return _parse("\n".join(L))
    assert cfg.pairs and C % (2 * vec) == 0
    L += [
        "        " + _local("ob", 2 * vec),
        f"        for jw in range({_i(C // (2 * vec))}):",
        *_column_base(col, f"jw * {_i(2 * vec)}", " " * 12),
        f"            for l in T.vectorized({_i(2 * vec)}):",
        f"                c: T.let[T.int64] = jw * {_i(2 * vec)} + l",
        *_column_at(col, "cq + l", " " * 16),
        f"                ob[l] = {norm}",
        f"            Y[r, T.Ramp(jw * {_i(vec)}, {_i(1)}, {vec})] = "
        + _as_pairs(f"ob[T.Ramp({_i(0)}, {_i(1)}, {2 * vec})]", 2 * vec, cfg.pairs),
    ]
    return _parse("\n".join(L))


def _column_base(col, first: str, ind: str) -> list[str]:
    """With a shuffle's `col`: `cq`, the offset in X's row of a vector's first column."""
    return [] if col is None else [f"{ind}cq: T.let[T.int64] = {col(first)}"]


def _column_at(col, offset: str, ind: str) -> list[str]:
    """With a shuffle's `col`: `cx`, the offset in X's row of the column at hand."""
    return [] if col is None else [f"{ind}cx: T.let[T.int64] = {offset}"]


def _row_sum(cfg: KernelConfig, C: int, dst: str, term: str, ind: str, col=None) -> list[str]:
    """`dst` = the sum of `term` (an expression of the column `c`, and with a shuffle's
    `col` of its offset `cx`) over row r's C columns: vector partial sums in `red` over whole
    vectors, then a scalar tail."""
    vectors, tail = _column_loops(
        cfg, C, ind, f"red[l] = red[l] + {term}", f"{dst} = {dst} + {term}", col
    )
    lanes = [f"red[{l}]" for l in range(cfg.vec)]
    total = f"{ind}{dst} = {_tree(lambda a, b: f'({a} + {b})', lanes)}"
    return _fill("red", cfg.vec, ind) + vectors + [total] + tail


def _row_store(cfg: KernelConfig, C: int, value: str, ind: str, col=None) -> list[str]:
    """Y[r, c] = `value` (an expression of the column `c`, and with a shuffle's `col` of its
    offset `cx`) over row r: whole vectors, then a scalar tail."""
    return _columns(cfg, C, ind, f"Y[r, c] = {value}", col)


def _columns(cfg: KernelConfig, C: int, ind: str, line: str, col=None) -> list[str]:
    """`line`, a statement of the column `c` (and with a shuffle's `col`, of its offset `cx`
    in X's row), for each of C columns: whole vectors, then a scalar tail."""
    vectors, tail = _column_loops(cfg, C, ind, line, line, col)
    return vectors + tail


def _column_loops(
    cfg: KernelConfig, C: int, ind: str, vector: str, scalar: str, col=None
) -> tuple[list[str], list[str]]:
    """The loop over C columns' whole vectors (`vector`, a statement of the column `c` and
    the lane `l`) and the loop over the columns past them (`scalar`); with a shuffle's `col`,
    `cx` is the column's offset in X's row."""
    vec, whole = cfg.vec, C // cfg.vec * cfg.vec
    vectors, tail = [], []
    if whole:
        vectors = [
            f"{ind}for jv in range({_i(whole // vec)}):",
            *_column_base(col, f"jv * {_i(vec)}", ind + "    "),
            f"{ind}    for l in T.vectorized({_i(vec)}):",
            f"{ind}        c: T.let[T.int64] = jv * {_i(vec)} + l",
            *_column_at(col, "cq + l", ind + "        "),
            f"{ind}        {vector}",
        ]
    if whole < C:
        tail = [
            f"{ind}for c in range({_i(whole)}, {_i(C)}):",
            *_column_at(col, col("c") if col else "", ind + "    "),
            f"{ind}    {scalar}",
        ]
    return vectors, tail
