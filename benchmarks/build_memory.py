"""Peak memory of building a preset and of loading its artifact, against its float32
parameter bytes.

    python benchmarks/build_memory.py [PRESET] [KEY=VALUE ...] [--forward]

Each step runs in a process of its own, started from this one, and its peak resident set
(`ru_maxrss` of that child, from `os.wait4`) is reported: `build` with an empty build cache
of its own (random init: a checkpoint would add the file's pages the kernel caches, not
process memory), then `builder.load` of the artifact (and one forward at batch 1 with
`--forward`). The reference is 4 bytes per parameter of the exported graph. Default preset:
open-clip-vit-bigg-14-laion2b. Figures are in docs/large-towers.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

GIB = 1 << 30

LOAD = """
import sys, numpy as np, builder
encoder = builder.load(sys.argv[1])
if sys.argv[2] == "1":
    size = encoder.input_shape[-1]
    encoder(np.zeros((1, 3, size, size), np.float32))
"""


def peak_of(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(peak RSS in bytes, wall seconds) of one child process; fails if it fails."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, cwd=REPO)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{argv[:4]} exited {child.returncode}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset", nargs="?", default="open-clip-vit-bigg-14-laion2b")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--forward", action="store_true", help="also run one image")
    args = parser.parse_args()

    import numpy as np

    from builder.assemble import parameter_shapes  # imports TVM, in this process only
    from builder.preset import load_preset

    preset = load_preset(args.preset, args.overrides)
    shapes = parameter_shapes(preset.model, preset.blocks)
    count = sum(int(np.prod(s)) for s in shapes.values())
    reference = 4 * count
    print(f"{preset.name}: {count / 1e9:.3f} G parameters, {reference / GIB:.2f} GiB float32")
    with tempfile.TemporaryDirectory(prefix="build-memory-") as scratch:
        env = {**os.environ, "BUILDER_CACHE_DIR": str(Path(scratch) / "cache")}
        env["PYTHONPATH"] = str(REPO)
        out = Path(scratch) / "out"
        build = [sys.executable, "-m", "builder", args.preset, *args.overrides]
        built, build_s = peak_of([*build, "targets=[llvm]", "--out", str(out)], env)
        folder = out / preset.name / "llvm"
        flag = "1" if args.forward else "0"
        loaded, load_s = peak_of([sys.executable, "-c", LOAD, str(folder), flag], env)
    for what, peak, seconds in (("build", built, build_s), ("load", loaded, load_s)):
        print(
            f"{what}: peak RSS {peak / GIB:.2f} GiB = {peak / reference:.2f} x the float32 "
            f"parameter bytes [{seconds:.0f} s]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
