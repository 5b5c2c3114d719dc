"""Native-resolution towers against PyTorch eager, image size by image size, in one process.

    python benchmarks/bench_native.py [--presets mistral-small-3-1-24b-instruct ...]
                                      [--grids 16x16 24x32 32x32 40x48] [--runs 3]
                                      [--seconds 20] [--threads N]
                                      [--out docs/benchmarks-native.md]

For each native preset, its tower (the projector left out: a VLM's reference would be the
whole VLM, language model included; the projector is a few percent of the work), built once
by the builder with the random init, against the family's HF reference model with the same
config (PyTorch eager, `torch.inference_mode`, same thread count), on one image of each patch
grid: random patches in the family's layout (`NativeTower.sample`), through
`Encoder.run_patches` (the host's rotary tables and windows included) and the family's
`NativeTower.reference` (HF's forward, its own rotary tables and windows included). One
library serves every grid. The runners take turns as in `bench_cpu.py` (interleaved rounds
after a warm-up, medians, and the paired ratio); the FMA peak is sampled before and after each
preset. Writes Markdown. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from benchmarks.bench_cpu import Row, fma_peak_sampler, interleaved_times  # noqa: E402
from builder.runtime import available_cores  # noqa: E402  (imports no TVM)

PRESETS = ["mistral-small-3-1-24b-instruct"]
GRIDS = ["16x16", "24x32", "32x32", "40x48"]


def bench_preset(name: str, grids: list[tuple[int, int]], args, workdir: Path) -> list[Row]:
    import torch

    import builder
    from builder import families
    from builder.build import build
    from builder.flops import native_gflop
    from builder.preset import load_preset

    preset = load_preset(name, ["blocks.projector=null"])
    family = families.get(preset.family)
    (built,) = build(preset, workdir / name, only=["llvm"])
    encoder = builder.load(built.path, threads=args.threads)
    torch.manual_seed(0)
    hf = family.reference_model(preset.model)
    rows = []
    for rows_, cols in grids:
        patches, grid = family.native.sample(preset.model, rows_, cols, 0)
        runners = {
            "artifact": lambda p=patches, g=grid: encoder.run_patches(p, g),
            "torch": lambda p=patches, g=grid: family.native.reference(hf, p, g),
        }
        work = native_gflop(encoder.manifest["gflop_per_patch"], len(patches))
        row = Row(
            f"{name} {rows_}x{cols}", 1, work, interleaved_times(runners, args.runs, args.seconds)
        )
        print(
            f"{row.name}: {row.median('artifact'):.3f} s, PyTorch {row.median('torch'):.3f} s",
            file=sys.stderr,
        )
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--grids", nargs="+", default=GRIDS, metavar="ROWSxCOLS")
    parser.add_argument("--runs", type=int, default=3, help="fewest timed rounds")
    parser.add_argument("--seconds", type=float, default=20.0, help="rounds until this much time")
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks-native.md")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    grids = [tuple(int(v) for v in g.split("x")) for g in args.grids]

    import torch
    from tvm.target.codegen import llvm_get_system_cpu

    torch.set_num_threads(args.threads)
    rows, peaks = [], []
    with tempfile.TemporaryDirectory(prefix="bench-native-") as scratch:
        workdir = Path(scratch)
        sample_peak = fma_peak_sampler(args.threads, workdir)
        peaks += [sample_peak() for _ in range(3)]
        for name in args.presets:
            rows += bench_preset(name, grids, args, workdir)
            peaks += [sample_peak() for _ in range(3)]
    peak = max(peaks)
    lines = [
        "# CPU benchmark: native-resolution towers",
        "",
        f"Written by `benchmarks/bench_native.py` on {datetime.date.today()}: "
        f"{platform.machine()}, LLVM's CPU `{llvm_get_system_cpu()}`, {args.threads} threads, "
        "float32, random init, the tower without its projector, one image per call, medians of "
        "interleaved rounds after a warm-up. FMA peak by `benchmarks/fma_peak.c`: "
        f"{peak:.1f} GFLOP/s (highest of {len(peaks)} samples; lowest {min(peaks):.1f}). "
        "GFLOP counts the linear layers and the attention over the whole image (windowed "
        "attention left out). One library per preset serves every grid.",
        "",
        "| preset, patch grid | patches | GFLOP | artifact s | PyTorch eager s | "
        "artifact GFLOP/s | % of FMA peak | vs PyTorch | vs PyTorch, paired | rounds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours = r.median("artifact")
        grid = r.name.rsplit(" ", 1)[1]
        rows_, cols = (int(v) for v in grid.split("x"))
        lines.append(
            f"| {r.name} | {rows_ * cols} | {r.work:.1f} | {ours:.3f} | "
            f"{r.median('torch'):.3f} | {r.work / ours:.1f} | {100 * r.work / ours / peak:.0f}% | "
            + r.ratio_cells("artifact", ("torch",))
            + f" | {len(r.times['artifact'])} |"
        )
    worst = max(r.ratio("artifact", "torch") for r in rows)
    lines += ["", f"Largest ratio to PyTorch over the sizes: {worst:.2f}.", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out} (peak median {statistics.median(peaks):.1f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
