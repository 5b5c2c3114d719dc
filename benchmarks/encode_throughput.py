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
  process (`ru_maxrss`), its workers together and the process with its workers (sampled
  every 100 ms).

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


class ArtifactAlone:
    """The artifact in this process, timed on one pre-decoded batch called repeatedly."""

    def __init__(self, art: Path, folder: Path, batch: int):
        from builder.preprocess import preprocess_batch, steps_from_manifest
        from builder.runtime import load

        self.enc = load(art)
        files = sorted(folder.iterdir())[:batch]
        self.pixels = preprocess_batch(files, steps_from_manifest(self.enc.manifest))
        self.enc(self.pixels)  # warm-up

    def rate(self, seconds: float) -> float:
        """Images/s over at least `seconds`."""
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            self.enc(self.pixels)
            n += len(self.pixels)
        return n / (time.perf_counter() - t0)


DECODER = """
import sys, time
from pathlib import Path
from builder.config import PreprocessConfig
from builder.encode_inputs import Item, decode_batch
steps, files = PreprocessConfig().resolved(224), sorted(Path(sys.argv[1]).iterdir())
items = [Item(f.name, str(f), "file", str(f)) for f in files]
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < float(sys.argv[2]):
    start = n % (len(items) - 8)
    decode_batch(items[start : start + 8], steps, (3, 224, 224))
    n += 8
print(n / (time.perf_counter() - t0))
"""


def interference(alone: ArtifactAlone, folder: Path, seconds: float = 12) -> list[float]:
    """The artifact alone; then beside a process that only decodes (what a worker does, no
    pipeline); then alone again. Returns [alone, beside, decoder's images/s, alone]."""
    first = alone.rate(seconds)
    proc = subprocess.Popen(
        [sys.executable, "-c", DECODER, str(folder), str(seconds + 3)],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    time.sleep(1.5)  # its imports
    beside = alone.rate(seconds)
    decoder = float(proc.communicate()[0])
    return [first, beside, decoder, alone.rate(seconds)]


def child(art: str, folder: str, out: str, batch: int, workers: int) -> None:
    """Runs in a fresh process: one encode_dataset, its timings as JSON on stdout."""
    t_start = time.perf_counter()
    first: list[float] = []
    trace: list[tuple[int, float]] = []  # (images done, RSS MiB) at each tenth of the run

    def progress(done: int, total: int, failed: int) -> None:
        if not first:
            first.append(time.perf_counter())
        if not trace or done - trace[-1][0] >= total / 10 or done == total:
            status = Path("/proc/self/status").read_text().splitlines()
            kb = next(int(x.split()[1]) for x in status if x.startswith("VmRSS"))
            trace.append((done, round(kb / 1024)))

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
                "timings": record.get("timings", {}),
                "rss_trace_mb": trace,
            }
        )
    )


def rss_mb(pid: int) -> tuple[float, float]:
    """RSS of `pid`, and the sum over its descendants (found through every thread's
    `children`), MiB."""
    own, others, todo, seen = 0, 0, [pid], set()
    while todo:
        p = todo.pop()
        seen.add(p)
        try:
            status = Path(f"/proc/{p}/status").read_text()
            kb = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS"))
            if p == pid:
                own = kb
            else:
                others += kb
            for children in Path(f"/proc/{p}/task").glob("*/children"):
                todo += [int(c) for c in children.read_text().split() if int(c) not in seen]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return own / 1024, others / 1024


def run_child(art: Path, folder: Path, out: Path, batch: int, workers: int) -> dict:
    code = (
        "import sys; from benchmarks.encode_throughput import child; "
        f"child({str(art)!r}, {str(folder)!r}, {str(out)!r}, {batch}, {workers})"
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE)
    peak = [0.0, 0.0, 0.0]  # the process, its workers, both at once
    while proc.poll() is None:
        own, others = rss_mb(proc.pid)
        peak = [max(peak[0], own), max(peak[1], others), max(peak[2], own + others)]
        time.sleep(0.1)
    stdout = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"encode failed ({proc.returncode})")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    result.update(
        wall_s=time.perf_counter() - t0,
        own_peak_mb=peak[0],
        workers_peak_mb=peak[1],
        tree_peak_mb=peak[2],
    )
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
    alone = ArtifactAlone(art, folders[args.sizes[0]], args.batch)
    inter_load = os.getloadavg()[0]
    inter = interference(alone, folders[args.sizes[0]])
    print(f"interference (load {inter_load:.1f}): {inter}", file=sys.stderr)
    rows = []
    plan = [(n, args.workers) for n in args.sizes] + [(args.sizes[0], 0)]
    for n, workers in plan:
        # The machine may be shared: the artifact is timed just before each run (10 s) and
        # just after it (a tenth of the run, at least 10 s); the mean is the reference.
        before = alone.rate(10)
        load = os.getloadavg()[0]
        out = args.work / f"out-{n}-{workers}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        r = run_child(art, folders[n], out, args.batch, workers)
        after = alone.rate(max(10, r["encoding_s"] / 10))
        own = (before + after) / 2
        rate = r["images"] / r["encoding_s"]
        rows.append((n, workers, r, rate, own, load))
        print(
            f"{n} images, {workers} workers: {rate:.1f} images/s, alone {before:.1f} / "
            f"{after:.1f}, load {load:.1f}, {r}",
            file=sys.stderr,
        )
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
        f"under more names). `artifact alone`: `Encoder(pixels)` on one pre-decoded batch of "
        f"{args.batch}, called repeatedly just before and just after the run (the mean), in "
        f"another process, with {threads} TVM thread(s). `images/s while encoding`: from the "
        "first progress call (artifact loaded, workers not started) to the end; `whole "
        "process`: the encode process from start to exit, `import tvm` included. `load`: "
        "the machine's 1-minute load average when the run started (other work on the "
        "machine included).",
        "",
        "| images | decoding workers | load | artifact alone (images/s) | images/s while "
        "encoding | ratio | in the artifact (images/s) | waiting for decoding (s) "
        "| whole process (s) | peak RSS (MiB): encoder process | decoding workers | both |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, workers, r, rate, own, load in rows:
        t = r["timings"]
        lines.append(
            f"| {n:,} | {workers or '0 (in the encoder process)'} | {load:.1f} | {own:.1f} "
            f"| {rate:.1f} | {rate / own:.2f} | {r['encoded'] / t['encoding_s']:.1f} "
            f"| {t['waiting_for_decoding_s']:.1f} | {r['wall_s']:.1f} "
            f"| {r['self_maxrss_mb']:.0f} | {r['workers_peak_mb']:.0f} "
            f"| {r['tree_peak_mb']:.0f} |"
        )
    lines += [
        "",
        f"The artifact beside a decoder (load {inter_load:.1f} when it started): alone "
        f"{inter[0]:.1f} images/s; beside a process that only decodes and preprocesses "
        f"(no pipeline, {inter[2]:.1f} images/s of its own) {inter[1]:.1f} images/s; alone "
        f"again {inter[3]:.1f} images/s.",
    ]
    lines += ["", "RSS of the encoding process (MiB) as the images go by, (images done, RSS):", ""]
    for n, workers, r, _, _, _ in rows:
        lines.append(f"- {n:,} images, {workers} workers: {r['rss_trace_mb']}")
    args.doc.write_text("\n".join(lines) + "\n")
    print(args.doc)


if __name__ == "__main__":
    main()
