"""The newer tower families' patterns on the CPU pipeline, each against the same module with
that pattern left to the fallback schedule.

    python benchmarks/cpu_patterns.py [--rounds 15] [--seconds 20] [--threads N] [--only NAME]
                                      [--cpu-time]

Each case is a small module of `tests/test_cpu_patterns.py` at a real width, compiled with
the llvm pipeline as shipped and with one of the rewrite's steps switched off (patched here,
for the benchmark only): the pattern's match, so that what it covers goes through the stock
legalization and the fallback schedule, or for SwiGLU also the merging of its two halves
into one GEMM (the up GEMM's epilogue then multiplies by the gate GEMM's output). The
builds are called in turn, round after round (`bench_cpu.interleaved_times`), batch 1.
The norms are timed as kernels alone, the RMSNorm kernel against the stock legalization of
`R.nn.rms_norm` under the fallback schedule: a module of one norm spends most of its call in
the VM and in copying its output.
Prints one table, a row per switch: the median of each build, and the median of their
ratios within a round (`bench_cpu.paired_ratio`) with the quartiles of those ratios.
`--cpu-time` times the process's CPU time instead of the wall clock: on a machine that other
work shares, time spent preempted does not count (with one thread it is the kernels' time;
with more, idle pool threads' spinning counts too).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from benchmarks.bench_cpu import interleaved_times, paired_ratio  # noqa: E402
from builder.runtime import available_cores, set_threads  # noqa: E402

SWIGLU = ["gate", "merge"]

# name -> (module, tokens, width, the steps switched off, one build each)
CASES = {
    "RMSNorm kernel, AIMv2-large (257 x 1024)": ("norm", 257, 1024, ["rms_norm"]),
    "qk-norm kernel, InternViT-6B (257 x 3200)": ("norm", 257, 3200, ["rms_norm"]),
    "SwiGLU, DINOv2-giant (257 x 1536 -> 4096, biases)": ("swiglu-bias", 257, 1536, SWIGLU),
    "SwiGLU, AIMv2-large (256 x 1024 -> 2816, no biases)": ("swiglu", 256, 1024, SWIGLU),
    "layer scale, DINOv2-giant out_proj (257 x 1536)": ("scaled", 257, 1536, ["scale"]),
    "bias-less linear + residual, AIMv2-large (256 x 1024)": ("no-bias", 256, 1024, ["linear"]),
}


def module(kind: str, width: int):
    from tests.test_cpu_patterns import Residual, SwiGLU

    hidden = {1536: 4096, 1024: 2816}.get(width)
    return {
        "swiglu-bias": lambda: SwiGLU(width, hidden, True),
        "swiglu": lambda: SwiGLU(width, hidden, False),
        "scaled": lambda: Residual(width, True, scale=True),
        "no-bias": lambda: Residual(width, False),
    }[kind]()


@contextlib.contextmanager
def switched_off(match: str):
    """The rewrite without one step: RMSNorm's match, the same-shape multiply a GEMM takes
    in (the SwiGLU's gating), the [N] multiply it folds (a layer scale), linear layers, or
    the merging of a GLU's halves."""
    from builder.targets.cpu import rewrite

    plan = rewrite._Plan
    fused, norm = plan._fused, plan._match_norm

    def without_norm(self, var, call):
        if rewrite._op_name(call) != "relax.nn.rms_norm":
            norm(self, var, call)

    def without_multiply(rank: int):
        def wrapped(self, cur, op, fits):
            found = fused(self, cur, op, fits)
            if found and op == "relax.multiply" and len(found[0].ty.shape.values) == rank:
                self.claimed.discard(found[1])
                return None
            return found

        return wrapped

    patches = {
        "rms_norm": ("_match_norm", without_norm),
        "gate": ("_fused", without_multiply(rank=3)),
        "scale": ("_fused", without_multiply(rank=1)),
        "linear": ("_match_linear", lambda self, var, call: None),
        "merge": ("_merge_glus", lambda self: None),
    }
    name, replacement = patches[match]
    with mock.patch.object(plan, name, replacement):
        yield


def norm_runner(tokens: int, width: int, switch: str | None):
    """The RMSNorm kernel alone, or (`switch`) the legalized op under the fallback schedule."""
    import numpy as np
    import tvm
    from tvm import te, topi

    from builder.targets.cpu.kernels import kernel_config, rms_norm_kernel
    from builder.targets.cpu.pipeline import compile_kernel
    from builder.targets.cpu.schedule import _fallback_schedule
    from tests.conftest import HOST

    cfg = kernel_config(HOST)
    if switch:
        x, w = te.placeholder((tokens, width), name="x"), te.placeholder((width,), name="w")
        stock = te.create_prim_func([x, w, topi.nn.rms_norm(x, w, axis=[1], epsilon=1e-6)])
        kernel = compile_kernel(_fallback_schedule(stock, cfg), HOST)
    else:
        kernel = compile_kernel(rms_norm_kernel(cfg, width, 1e-6), HOST)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype(np.float32) for s in ((tokens, width), (width,))]
    args = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.empty((tokens, width), "float32")]
    return lambda: kernel(*args)


def runner(case: tuple, switch: str | None):
    import numpy as np
    import tvm
    from tvm import relax
    from tvm.relax.frontend import nn

    from builder.packing import pack_params
    from builder.targets.cpu.pipeline import compile_cpu
    from tests.conftest import HOST
    from tests.test_cpu_patterns import weights

    kind, tokens, width, _ = case
    if kind == "norm":
        return norm_runner(tokens, width, switch)
    spec = {"forward": {"x": nn.spec.Tensor([1, tokens, width], "float32")}}
    mod, params = module(kind, width).export_tvm(spec=spec)
    shapes = [(name, tuple(int(d) for d in p.shape)) for name, p in params]
    with switched_off(switch) if switch else contextlib.nullcontext():
        executable = compile_cpu(mod, HOST)
    order, packed = pack_params(executable, [n for n, _ in shapes], weights(shapes))
    forward = relax.VirtualMachine(executable, tvm.cpu())["forward"]
    args = [tvm.runtime.tensor(np.ones((1, tokens, width), np.float32))]
    args += [tvm.runtime.tensor(packed[n]) for n in order]
    return lambda: forward(*args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--only", help="the cases whose name contains this")
    parser.add_argument("--cpu-time", action="store_true", help="time CPU, not wall, time")
    args = parser.parse_args()
    set_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    what = "CPU time" if args.cpu_time else "wall time"
    print(f"{args.threads} threads, {what}, medians of at least {args.rounds} interleaved rounds")
    print("| case | switched off | shipped | switched off | shipped / switched off, paired |")
    print("|---|---|---|---|---|")
    for name, case in CASES.items():
        if args.only and args.only not in name:
            continue
        builds = {"shipped": runner(case, None)}
        builds.update((switch, runner(case, switch)) for switch in case[3])
        times = interleaved_times(builds, args.rounds, args.seconds, clock)
        ours = statistics.median(times["shipped"]) * 1e3
        for switch in case[3]:
            theirs = statistics.median(times[switch]) * 1e3
            ratios = [a / b for a, b in zip(times["shipped"], times[switch], strict=True)]
            low, _, high = statistics.quantiles(ratios, n=4)
            ratio = paired_ratio(times["shipped"], times[switch])
            print(
                f"| {name} | {switch} | {ours:.3f} ms | {theirs:.3f} ms "
                f"| {ratio:.3f} ({low:.3f}-{high:.3f}) |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
