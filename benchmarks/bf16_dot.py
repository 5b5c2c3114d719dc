"""Throughput of AVX-512 BF16's `vdpbf16ps` against fp32 FMA on this CPU, through TVM.

    python benchmarks/bf16_dot.py [--seconds 1]

One thread runs 24 independent accumulators in registers: `acc += a * b` on float32x16
(one FMA: 32 flops) or `vdpbf16ps acc, a, b` on bfloat16 pairs (64 flops). TIR cannot pass
a bfloat16 vector to the intrinsic (TVM's BF16 legalization widens it to float32), so the
call goes through the GEMM kernels' LLVM IR function (`BF16_DOT_IR`, linked in with
`pragma_import_llvm`), which takes int32x16 words and bitcasts them (see
docs/tvm-notes.md). Prints GFLOP/s for each; a `precision: bfloat16` build only pays where
the second is well above the first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.targets.cpu.kernels import BF16_DOT, BF16_DOT_IR  # noqa: E402

ACCUMULATORS = 24


def loop_source(kind: str) -> str:
    """A PrimFunc: `n` rounds of one multiply-accumulate into each accumulator."""
    vec = lambda buf, at: f"{buf}[T.Ramp({at}, 1, 16)]"  # noqa: E731
    acc = [f"acc{i}" for i in range(ACCUMULATORS)]
    lines = [
        "@T.prim_func",
        "def f(a: T.Buffer((16,), 'int32'), b: T.Buffer((16,), 'int32'),"
        f" c: T.Buffer(({16 * ACCUMULATORS},), 'float32'), n: T.int32):",
        "    T.func_attr({'global_symbol': 'f', 'tir.noalias': True})",
        f"    with T.attr(T.int32(0), 'pragma_import_llvm', {BF16_DOT_IR!r}):",
    ]
    for i, name in enumerate(acc):
        lines += [
            f"        {name} = T.alloc_buffer((16,), 'float32', scope='local',"
            " annotations={'disable_lower_builtin': True})",
            f"        {vec(name, 0)} = {vec('c', i * 16)}",
        ]
    lines.append("        for it in range(n):")
    for name in acc:
        w = vec("b", 0)  # one operand pair for all: 24 + 2 registers of 32
        if kind == "bfloat16":
            update = (
                f"T.call_extern('float32x16', '{BF16_DOT}', {vec(name, 0)}, {vec('a', 0)}, {w})"
            )
        else:
            update = (
                f"{vec(name, 0)} + T.reinterpret('float32x16', {vec('a', 0)})"
                f" * T.reinterpret('float32x16', {w})"
            )
        lines.append(f"            {vec(name, 0)} = {update}")
    lines += [f"        {vec('c', i * 16)} = {vec(name, 0)}" for i, name in enumerate(acc)]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args(argv)

    import tvm

    from builder.config import TargetConfig
    from builder.targets.cpu.pipeline import compile_kernel
    from builder.targets.llvm import tvm_target

    target, options = tvm_target(TargetConfig())
    if not tvm.target.codegen.target_has_features("avx512bf16", target):
        print(f"this CPU ({options.get('mcpu')}) has no avx512_bf16", file=sys.stderr)
        return 2
    ones = np.full(16, 0x3F803F80, np.int32)  # bfloat16 pairs (1, 1); float32 1.0039
    print(f"{options.get('mcpu')}, one thread, {ACCUMULATORS} accumulators")
    print("| instruction | flops each | GFLOP/s |\n|---|---|---|")
    for kind, flops in (("float32", 32), ("bfloat16", 64)):
        f = compile_kernel(tvm.script.from_source(loop_source(kind)), target)
        a, b = tvm.runtime.tensor(ones), tvm.runtime.tensor(ones)
        c = tvm.runtime.tensor(np.zeros(16 * ACCUMULATORS, np.float32))
        n = 100_000
        while True:
            t = time.perf_counter()
            f(a, b, c, n)
            dt = time.perf_counter() - t
            if dt > args.seconds:
                break
            n *= 2
        name = "vfmadd231ps" if kind == "float32" else "vdpbf16ps"
        print(f"| {name} ({kind}) | {flops} | {n * ACCUMULATORS * flops / dt / 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
