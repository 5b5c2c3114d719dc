"""`build encode` end to end against the artifact's own throughput, and its peak memory.

    TVM_NUM_THREADS=1 python -m benchmarks.encode_throughput [--sizes 1000 10000] [--layers 2]
        [--workers 1] [--batch 8] [--work DIR] [--doc docs/encode-benchmark.md]

Builds a small tower (clip-vit-b-32's widths and 224 px, `--layers` layers, random weights),
makes a folder of JPEG photos (640 x 480; a few hundred distinct files, hard-linked under
more names for the larger sets), then:

- the artifact's own throughput: `Encoder(pixels)` on pre-decoded batches of `--batch`
  images, after one warm-up call;
- `encode_dataset` on each folder in a fresh process, with `--workers` decoding processes
  (and once with 0: decoding in the encoder's process, for comparison). The rate is taken
  from the first progress call (the artifact loaded, the workers not yet started) to the
  end; the wall time of the whole process is shown beside it. Peak RSS: the encoding
  process alone (`ru_maxrss`) and the sum over it and its workers, sampled every 50 ms.

Writes a markdown table to `--doc`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DISTINCT = 300


def build_tower(work: Path, layers: int) -> Path:
    from builder.build import build
    from builder.preset import load_preset

    os.environ.setdefault("BUILDER_CACHE_DIR", str(work / "cache"))
    preset = load_preset("clip-vit-b-32", [f"model.num_hidden_layers={layers}"])
    (built,) = build(preset, work / "artifacts")
    return built.path


def make_images(work: Path, sizes: list[int]) -> dict[int, Path]:
    from PIL import Image

    src = work / "src"
    if not (src / f"{DISTINCT - 1:05d}.jpg").exists():
        src.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:480, 0:640].astype(np.float32)
        for i in range(DISTINCT):
            a, b = rng.uniform(0.5, 2, 2)
            rgb = np.stack([x * a / 5, y * b / 3, (x + y) / 4], -1) % 256
            rgb += rng.normal(0, 10, rgb.shape)
            Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(
                src / f"{i:05d}.jpg", quality=90
            )
    folders = {}
    for n in sizes:
        folder = work / f"images-{n}"
        if not folder.exists():
            tmp = work / f".images-{n}"
            tmp.mkdir()
            for i in range(n):
                os.link(src / f"{i % DISTINCT:05d}.jpg", tmp / f"{i:06d}.jpg")
            tmp.rename(folder)
        folders[n] = folder
    return folders


def artifact_rate(art: Path, folder: Path, batch: int, runs: int = 10) -> float:
    from builder.preprocess import preprocess_batch, steps_from_manifest
    from builder.runtime import load

    enc = load(art)
    files = sorted(folder.iterdir())[:batch]
    pixels = preprocess_batch(files, steps_from_manifest(enc.manifest))
    enc(pixels)
    t0 = time.perf_counter()
    for _ in range(runs):
        enc(pixels)
    return batch * runs / (time.perf_counter() - t0)


def child(art: str, folder: str, out: str, batch: int, workers: int) -> None:
    """Runs in a fresh process: one encode_dataset, its timings as JSON on stdout."""
    t_start = time.perf_counter()
    first: list[float] = []

    def progress(done: int, total: int, failed: int) -> None:
        if not first:
            first.append(time.perf_counter())

    from builder.encode import encode_dataset

    record = encode_dataset(
        art, [folder], out, batch=batch, workers=workers, shard_size=1000, progress=progress
    )
    end = time.perf_counter()
    print(
        json.dumps(
            {
                "images": record["images"],
                "encoded": record["encoded"],
                "encoding_s": end - first[0] if first else None,
                "process_s": end - t_start,
                "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def tree_rss_mb(pid: int) -> float:
    """RSS of `pid` and all its descendants, MiB."""
    parents, rss = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            status = (stat.parent / "status").read_text()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        p = int(stat.parent.name)
        parents[p] = int(fields[1])
        rss[p] = next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:")), 0)
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo += [c for c, parent in parents.items() if parent == p and c not in tree]
    return sum(rss.get(p, 0) for p in tree) / 1024


def run_child(art: Path, folder: Path, out: Path, batch: int, workers: int) -> dict:
    code = (
        "import sys; from benchmarks.encode_throughput import child; "
        f"child({str(art)!r}, {str(folder)!r}, {str(out)!r}, {batch}, {workers})"
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.05)
    stdout = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"encode failed ({proc.returncode})")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    result.update(wall_s=time.perf_counter() - t0, tree_peak_mb=peak)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/tmp/encode-bench"))
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "encode-benchmark.md")
    args = ap.parse_args()
    threads = os.environ.get("TVM_NUM_THREADS")
    if threads is None:
        raise SystemExit("set TVM_NUM_THREADS (the artifact's threads) for a fair comparison")
    args.work.mkdir(parents=True, exist_ok=True)
    art = build_tower(args.work, args.layers)
    folders = make_images(args.work, args.sizes)
    own = artifact_rate(art, folders[args.sizes[0]], args.batch)
    print(f"artifact alone: {own:.1f} images/s at batch {args.batch}", file=sys.stderr)
    rows = []
    plan = [(n, args.workers) for n in args.sizes] + [(args.sizes[0], 0)]
    for n, workers in plan:
        out = args.work / f"out-{n}-{workers}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        r = run_child(art, folders[n], out, args.batch, workers)
        rate = r["images"] / r["encoding_s"]
        rows.append((n, workers, r, rate))
        print(f"{n} images, {workers} workers: {rate:.1f} images/s, {r}", file=sys.stderr)
        subprocess.run(["rm", "-rf", str(out)], check=True)
    cpu = platform.processor() or platform.machine()
    lines = [
        "# `build encode`: throughput and memory",
        "",
        f"`TVM_NUM_THREADS={threads} python -m benchmarks.encode_throughput "
        f"--sizes {' '.join(map(str, args.sizes))} --layers {args.layers} "
        f"--workers {args.workers} --batch {args.batch}` on {os.cpu_count()} cores ({cpu}).",
        "",
        f"Tower: clip-vit-b-32's widths at 224 px with {args.layers} layers, random weights, "
        f"features (50, 768). Images: 640 x 480 JPEGs ({DISTINCT} distinct files, hard-linked "
        "under more names). The artifact alone, on pre-decoded batches of "
        f"{args.batch}: **{own:.1f} images/s** ({threads} TVM thread(s)).",
        "",
        "| images | decoding workers | images/s while encoding | of the artifact alone "
        "| whole process (s) | peak RSS, encoder process (MiB) | peak RSS, with workers (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, workers, r, rate in rows:
        lines.append(
            f"| {n:,} | {workers or '0 (in the encoder process)'} | {rate:.1f} | {rate / own:.2f} "
            f"| {r['wall_s']:.1f} | {r['self_maxrss_mb']:.0f} | {r['tree_peak_mb']:.0f} |"
        )
    args.doc.write_text("\n".join(lines) + "\n")
    print(args.doc)


if __name__ == "__main__":
    main()
