"""How the machine's slow spells fall on the GEMM kernel and on the FMA loop, moment by moment.

    python benchmarks/gemm_phases.py [--seconds 20] [--threads 1 N] [--out docs/gemm-phases.md]

Round after round, for `--seconds`: a short sample of the FMA loop (`fma_peak.c`), then
about `ROUND_S` seconds of calls of the shipped GEMM kernel on operands that fit in L2
(192 x 512 x 512: 1.75 MiB in all), then as long of it at llava-clip's MLP shape
(577 x 1024 x 4096: 27 MiB, in L3), all on the same threads. Each round gives one GFLOP/s
for each. The table gives their spread over the rounds, each GEMM as a share of the FMA
sample of its round, and how the three rise and fall together (correlation over the rounds).
The small GEMM's level is lower than the large one's (its K is half as long, so a tile's
fixed costs weigh twice as much, and its calls are short); what it shows is when it dips.

A slow spell that slows the GEMMs as much as the FMA loop is a slower core; one that slows
both GEMMs but not the FMA loop is on the memory side of the core (its caches, which a
virtual machine may share with the host's other tenants); one that slows only the large
GEMM is in L3 or memory. By default it runs on one thread, then on all cores (on two threads
the FMA loop dips whenever either core does). Needs a C compiler with OpenMP, as
`bench_cpu.py` does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from benchmarks.bench_cpu import fma_peak_sampler  # noqa: E402
from builder.runtime import available_cores, set_threads  # noqa: E402

ROUND_S = 0.05  # seconds of calls per GEMM per round
FMA_FLOP_PER_ITER = 2 * 16 * 16  # fma_peak.c: 16 chains of 16-lane FMAs
SHAPES = {"L2-resident GEMM": (192, 512, 512), "llava-clip fc1 GEMM": (577, 1024, 4096)}


def gemm_runner(m: int, k: int, n: int):
    """A function that calls the shipped GEMM kernel (bias, no activation) on random operands
    of this shape for about `ROUND_S` seconds and returns its GFLOP/s."""
    import numpy as np
    import tvm

    from builder.config import TargetConfig
    from builder.targets.cpu.kernels import gemm_kernel, kernel_config
    from builder.targets.cpu.pipeline import compile_kernel
    from builder.targets.llvm import tvm_target

    target = tvm_target(TargetConfig())[0]
    cfg = kernel_config(target)
    fn = compile_kernel(gemm_kernel(cfg, k, n, True, None, False), target)
    rng = np.random.default_rng(0)
    shapes = [(m, k), (-(-n // cfg.nb), k, cfg.nb), (n,), (m, n)]
    args = [tvm.runtime.tensor(rng.standard_normal(s, dtype="float32")) for s in shapes]
    work = 2 * m * k * n / 1e9
    fn(*args)

    def run() -> float:
        calls, start = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - start < ROUND_S:
            fn(*args)
            calls += 1
        return work * calls / (time.perf_counter() - start)

    return run


def deciles(values: list[float]) -> tuple[float, float, float]:
    """p10, median and p90."""
    cuts = statistics.quantiles(values, n=10, method="inclusive")
    return cuts[0], cuts[4], cuts[8]


def measure(threads: int, seconds: float) -> dict[str, list[float]]:
    """Each runner's GFLOP/s, one per round, on `threads` threads (TVM's pool size is fixed
    when it starts: one process per thread count)."""
    set_threads(threads)
    scratch = Path(tempfile.mkdtemp(prefix="gemm-phases-"))
    try:
        return _measure(threads, seconds, fma_peak_sampler(threads, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _measure(threads: int, seconds: float, sample_fma) -> dict[str, list[float]]:
    rate = sample_fma()  # sizes the short samples to about ROUND_S seconds
    iterations = int(rate * 1e9 * ROUND_S / (FMA_FLOP_PER_ITER * threads))
    runners = {"FMA loop": lambda: sample_fma(iterations)}
    runners |= {name: gemm_runner(*shape) for name, shape in SHAPES.items()}
    series: dict[str, list[float]] = {name: [] for name in runners}
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for name, run in runners.items():
            series[name].append(run())
    return series


def table(threads: int, seconds: float, series: dict[str, list[float]]) -> list[str]:
    fma = series["FMA loop"]
    lines = [
        f"## {threads} thread{'s' if threads > 1 else ''}",
        "",
        f"{len(fma)} rounds in {seconds:.0f} s.",
        "",
        "| runner | M x K x N | p10 | median | p90 | max | share p10 | share median | "
        "share p90 | rounds under 85% |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rates in series.items():
        shape = " x ".join(map(str, SHAPES[name])) if name in SHAPES else "-"
        cells = [f"{q:.1f}" for q in deciles(rates)] + [f"{max(rates):.1f}"]
        if name in SHAPES:
            shares = [g / f for g, f in zip(rates, fma, strict=True)]
            cells += [f"{100 * q:.0f}%" for q in deciles(shares)]
            cells.append(f"{100 * sum(s < 0.85 for s in shares) / len(shares):.0f}%")
        else:
            cells += ["-"] * 4
        lines.append(f"| {name} | {shape} | " + " | ".join(cells) + " |")
    names = list(series)
    lines += ["", "Correlation of the rounds' rates:", "", "| | " + " | ".join(names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for a in names:
        cells = [f"{statistics.correlation(series[a], series[b]):.2f}" for b in names]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines + [""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per thread count")
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, available_cores()}))
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "gemm-phases.md")
    parser.add_argument("--part", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:  # one thread count, in a process of its own: JSON on stdout
        print(json.dumps(measure(args.threads[0], args.seconds)))
        return 0

    lines = [
        "# GEMM and FMA loop, round by round",
        "",
        f"Written by `benchmarks/gemm_phases.py` on {datetime.date.today()}: "
        f"{platform.processor() or platform.machine()}; each round is about {ROUND_S} s of "
        "each runner in turn. GFLOP/s; a share is the GEMM's rate over the FMA sample of "
        "its round.",
        "",
    ]
    for threads in args.threads:
        cmd = [sys.executable, __file__, "--part", "--threads", str(threads)]
        out = subprocess.run(
            cmd + ["--seconds", str(args.seconds)], check=True, capture_output=True, text=True
        )
        lines += table(threads, args.seconds, json.loads(out.stdout))
    args.out.write_text("\n".join(lines))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
