"""Time the commands of the edit-build loop as a user types them, each in a new process.

    python benchmarks/fast_loop.py [PRESET] [KEY=VALUE ...]     (default: llava-clip)

Runs, in a fresh cache and output folder (a temporary directory it deletes, or BENCH_DIR,
kept): `build --help`, `build list`, `build check`, `build show` (ROUNDS times each), the
first build of the preset (a miss), the same build again (a hit, ROUNDS times), `--verify`
on the hit, and a build whose `weights.seed` alone differs (the compiled library reused).
Prints a Markdown table of wall times, the interpreter's start included, and whether the
two builds' `lib.so` files are byte-identical. Whether torch is importable is printed: with
it installed, `import tvm` takes seconds longer (docs/tvm-notes.md).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 5


def command() -> list[str]:
    """The `build` console script where it is installed, else `python -m builder`."""
    script = shutil.which("build")
    return [script] if script else [sys.executable, "-m", "builder"]


def timed(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([*command(), *args], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return seconds, proc.stderr


def main(argv: list[str]) -> None:
    if os.environ.get("BENCH_DIR"):
        measure(argv, Path(os.environ["BENCH_DIR"]))
        return
    with tempfile.TemporaryDirectory(prefix="fast-loop-") as root:
        measure(argv, Path(root))


def measure(argv: list[str], root: Path) -> None:
    preset = argv[0] if argv else "llava-clip"
    overrides = argv[1:]
    env = {**os.environ, "BUILDER_CACHE_DIR": str(root / "cache")}
    out = ["--out", str(root / "out")]
    rows: list[tuple[str, list[float]]] = []

    def repeat(label: str, args: list[str], rounds: int = ROUNDS) -> None:
        rows.append((label, [timed(args, env)[0] for _ in range(rounds)]))

    repeat("`build --help`", ["--help"])
    repeat("`build list`", ["list"])
    repeat(f"`build check {preset}`", ["check", preset, *overrides])
    repeat(f"`build show {preset}`", ["show", preset, *overrides])
    miss, log = timed([preset, *overrides, *out], env)
    rows.append((f"`build {preset}`, first build (a miss)", [miss]))
    stages = [line for line in log.splitlines() if line.rstrip().endswith(" s]")]
    repeat(f"`build {preset}` unchanged (a cache hit)", [preset, *overrides, *out])
    repeat(
        "the same hit with `--verify` (sha256 of every file)",
        [preset, *overrides, *out, "--verify"],
        rounds=1,
    )
    lib = root / "out" / Path(preset).stem / "llvm" / "lib.so"
    first = lib.read_bytes()
    seed, _ = timed([preset, *overrides, "weights.seed=12345", *out], env)
    rows.append(("`weights.seed` changed: library reused, weights made and packed", [seed]))
    same = lib.read_bytes() == first

    torch = importlib.util.find_spec("torch") is not None
    print(f"preset {preset} {' '.join(overrides)}; torch installed: {torch}; {os.cpu_count()} CPUs")
    print()
    print("| command | median | min | runs |")
    print("|---|---|---|---|")
    for label, times in rows:
        print(f"| {label} | {statistics.median(times):.2f} s | {min(times):.2f} s | {len(times)} |")
    print()
    print(f"seed change / first build: {seed / miss:.2f}; lib.so byte-identical: {same}")
    print("first build's stages:")
    for line in stages:
        print(f"  {line}")


if __name__ == "__main__":
    main(sys.argv[1:])
