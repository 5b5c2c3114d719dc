"""An AVX2 build against PyTorch eager limited to AVX2, on a CPU that also has AVX-512.

    python benchmarks/bench_avx2.py [PRESET] [--batch 1] [--runs 6] [--threads N]

Builds PRESET (default llava-clip, random init) for `mcpu: x86-64-v3` (AVX2 and FMA: 8-lane
vectors, 6 x 2-vector GEMM tiles) and for this CPU, and times both artifacts and HF's
`CLIPVisionModel` in turn, round after round, as bench_cpu.py does. PyTorch is held to AVX2
by its own settings, made before torch is imported: `ATEN_CPU_CAPABILITY=avx2` for its
kernels, `ONEDNN_MAX_CPU_ISA=AVX2` and `MKL_ENABLE_INSTRUCTIONS=AVX2` for the GEMM libraries
it may call. (onnxruntime has no such setting, so it is left out.) Prints one table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

AVX2_ONLY = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
os.environ.update(AVX2_ONLY)  # before anything imports torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from benchmarks.bench_cpu import hf_model, interleaved_times, paired_ratio  # noqa: E402
from builder.runtime import available_cores  # noqa: E402

TARGETS = "targets=[llvm, {name: avx2, kind: llvm, mcpu: x86-64-v3}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", default="llava-clip")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=available_cores())
    args = parser.parse_args()

    import numpy as np
    import torch

    import builder
    from builder.build import build
    from builder.preset import load_preset

    torch.set_num_threads(args.threads)
    preset = load_preset(args.preset, [TARGETS])
    with tempfile.TemporaryDirectory(prefix="bench-avx2-") as scratch:
        paths = {b.target: b.path for b in build(preset, Path(scratch))}
        avx2 = builder.load(paths["avx2"], threads=args.threads)
        host = builder.load(paths["llvm"], threads=args.threads)
        hf = hf_model(preset.model)
        size = preset.model.image_size
        x = np.random.default_rng(1).standard_normal((args.batch, 3, size, size), np.float32)
        xt = torch.from_numpy(x)

        def eager():
            with torch.inference_mode():
                return hf(pixel_values=xt)

        runners = {"avx2": lambda: avx2(x), "host": lambda: host(x), "torch": eager}
        times = interleaved_times(runners, args.runs, 0)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"{args.preset}, batch {args.batch}, {args.threads} threads, {len(times['avx2'])} rounds")
    print(f"PyTorch's CPU capability: {capability}")
    print("| runner | median s | avx2 artifact / runner, paired |")
    print("|---|---|---|")
    for name, label in (
        ("avx2", "artifact, x86-64-v3"),
        ("host", "artifact, this CPU"),
        ("torch", f"PyTorch eager ({capability})"),
    ):
        ratio = paired_ratio(times["avx2"], times[name])
        print(f"| {label} | {statistics.median(times[name]):.3f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
