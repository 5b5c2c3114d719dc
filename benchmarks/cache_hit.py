"""Time a build-cache hit: build a preset once (a miss), then rebuild it unchanged.

    python benchmarks/cache_hit.py [PRESET] [KEY=VALUE ...]     (default: llava-clip)

Uses a fresh cache and output folder in a temporary directory that it deletes (or in
BENCH_DIR, kept). Prints the miss, the in-process hit (`builder.build.build`: key, lock,
check, publish) and the whole `python -m builder` command on a hit (interpreter start and
`import tvm` included).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str]) -> None:
    if os.environ.get("BENCH_DIR"):
        measure(argv, Path(os.environ["BENCH_DIR"]))
        return
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as root:
        measure(argv, Path(root))


def measure(argv: list[str], root: Path) -> None:
    preset_arg = argv[0] if argv else "llava-clip"
    overrides = argv[1:]
    os.environ["BUILDER_CACHE_DIR"] = str(root / "cache")
    out = root / "out"

    from builder.build import build
    from builder.preset import load_preset

    preset = load_preset(preset_arg, overrides)
    t0 = time.perf_counter()
    (miss,) = build(preset, out, ["llvm"])
    t_miss = time.perf_counter() - t0
    assert not miss.cached
    hits = []
    for _ in range(3):
        t0 = time.perf_counter()
        (hit,) = build(load_preset(preset_arg, overrides), out, ["llvm"])
        hits.append(time.perf_counter() - t0)
        assert hit.cached
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "builder", preset_arg, *overrides, "--out", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    t_cli = time.perf_counter() - t0
    t0 = time.perf_counter()
    (full,) = build(load_preset(preset_arg, overrides), out, ["llvm"], verify=True)
    t_verify = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in miss.path.resolve().iterdir())
    print(f"preset {preset.name}: artifact {size / 1e9:.2f} GB")
    print(f"miss (assemble, weights, compile, write): {t_miss:.1f} s")
    print(f"hit, in process: {min(hits) * 1e3:.0f} ms (best of {len(hits)})")
    print(f"hit, in process, --verify (hash every file): {t_verify:.1f} s")
    print(f"hit, whole `python -m builder` command: {t_cli:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
