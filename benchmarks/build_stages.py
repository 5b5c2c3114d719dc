"""Time the stages of a first build (an empty build cache) of the llvm target.

    python benchmarks/build_stages.py [PRESET] [KEY=VALUE ...] [--runs N] [--src DIR]
                                      [--compare DIR] [--json FILE]

Each run is a fresh process building into a fresh cache and output folder (a second build
in one process would reuse memory the first one freed, which is not what a user's first
build sees). A stage lasts from one of the build's progress messages to the next:

| stage | from | to |
|---|---|---|
| export | `building` | `assembled ...` (the module exported, its parameters listed) |
| weights | `assembled` | `weights: ...` (random init, or the checkpoint read) |
| compile | `compiling for` | `compiled` |
| packing | `compiled` | `packed weights` (`transform_params` at build time) |
| writing | `packed weights` | `wrote` (lib.so, params.safetensors, manifest, publish) |
| total | `building` | `wrote` |

(Where the library has its packing as steps, `packed weights into the file` ends the
packing and the writing of the parameters together: the packing stage holds both, and
writing what is left, the manifest and the publish.)

and within writing, `library`, `params` and `manifest` time the library export,
`artifact.save_params` and `artifact.write_manifest` (hashing) alone; within packing, `VM`
the making of the VM that runs `transform_params` (LLVM's JIT compiles the module, which
the export compiles again later).

Prints a markdown table of wall time (min and median over the runs) and CPU time (user and
system, all threads: the better guide on a machine shared with other jobs), with the CPU it
ran on; `--json` also writes every run's figures. `--src DIR` times the builder sources in
DIR instead of this checkout's; `--compare DIR` also times those in DIR (another checkout:
before and after), the two in turn. TVM's thread pool gets every core this process may use
(TVM_NUM_THREADS, unless set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ["export", "weights", "compile", "packing", "writing", "total"]
WRITING = ["writing: library", "writing: params", "writing: manifest"]
VM = ["packing: VM"]
# The progress message that ends each stage (and the one that starts the next).
MARKS = {
    "start": "building (",
    "export": "assembled ",
    "weights": "weights: ",
    "compile_start": "compiling for ",
    "compile": "compiled [",
    "packing": "packed weights",
    "writing": "wrote ",
}


def one_run(preset_arg: str, overrides: list[str], root: Path) -> dict[str, float]:
    """One build in this process; the stage times in seconds."""
    os.environ["BUILDER_CACHE_DIR"] = str(root / "cache")
    from tvm import relax

    from builder import artifact
    from builder.build import build
    from builder.preset import load_preset
    from builder.targets import llvm

    seen: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def progress(line: str) -> None:
        now, used = time.perf_counter(), cpu_seconds()
        for stage, mark in MARKS.items():
            if mark in line and stage not in seen:
                seen[stage], cpu[stage] = now, used

    spent = dict.fromkeys(WRITING + VM, 0.0)

    def timed(owner, name: str, stage: str) -> None:
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spent[stage] += time.perf_counter() - t0

        setattr(owner, name, wrapper)

    timed(llvm, "export", "writing: library")
    timed(artifact, "save_params", "writing: params")
    timed(artifact, "write_manifest", "writing: manifest")
    timed(relax, "VirtualMachine", "packing: VM")
    preset = load_preset(preset_arg, overrides)
    (built,) = build(preset, root / "out", ["llvm"], progress=progress, force=True)
    missing = sorted(set(MARKS) - set(seen))
    if missing:
        raise RuntimeError(f"the build printed no progress message for {missing}")
    spans = {
        "export": ("start", "export"),
        "weights": ("export", "weights"),
        "compile": ("compile_start", "compile"),
        "packing": ("compile", "packing"),
        "writing": ("packing", "writing"),
        "total": ("start", "writing"),
    }
    times = {stage: seen[end] - seen[begin] for stage, (begin, end) in spans.items()}
    times.update({f"{stage} cpu": cpu[end] - cpu[begin] for stage, (begin, end) in spans.items()})
    return {**times, **spent}


def cpu_seconds() -> float:
    """User and system time of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} CPUs"


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """Per stage and per source: wall time (min, median) and CPU time (median)."""
    head = ["stage"]
    for label in results:
        head += [f"{label}: wall min", "wall median", "CPU median"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage in STAGES + WRITING + VM:
        cells = [stage]
        for runs in results.values():
            wall = [r[stage] for r in runs if stage in r]
            if not wall:
                cells += ["", "", ""]
                continue
            used = [r[f"{stage} cpu"] for r in runs if f"{stage} cpu" in r]
            cells += [f"{min(wall):.2f} s", f"{statistics.median(wall):.2f} s"]
            cells.append(f"{statistics.median(used):.2f} s" if used else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset", nargs="?", default="llava-clip")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--src", type=Path, default=REPO, help="builder sources to time")
    parser.add_argument(
        "--compare", type=Path, help="other builder sources, timed in turn with --src's"
    )
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # a child: one run
    args = parser.parse_args(argv)
    if args.one:
        sys.path.insert(0, str(args.src.resolve()))
        print(json.dumps(one_run(args.preset, args.overrides, args.one)))
        return
    sources = [s.resolve() for s in ([args.compare] if args.compare else []) + [args.src]]
    threads = os.environ.get("TVM_NUM_THREADS") or str(len(os.sched_getaffinity(0)))
    env = {**os.environ, "TVM_NUM_THREADS": threads}
    load = os.getloadavg()[0]
    results: dict[str, list[dict[str, float]]] = {str(s): [] for s in sources}
    for _ in range(args.runs):
        for src in sources:  # in turn, so that a slow spell of the machine hits both
            with tempfile.TemporaryDirectory(prefix="build-stages-") as root:
                child = [sys.executable, __file__, args.preset, *args.overrides]
                child += ["--src", str(src), "--one", root]
                done = subprocess.run(child, env=env, capture_output=True, text=True, check=False)
                if done.returncode:
                    sys.exit(f"a run of {src} failed:\n{done.stderr}")
                results[str(src)].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.preset} {' '.join(args.overrides)}: {args.runs} fresh-cache builds per source")
    for i, src in enumerate(sources):
        print(f"source {i + 1}: {src} ({describe(src)})")
    print(f"CPU: {cpu_name()}; TVM_NUM_THREADS={threads}")
    print(f"load average (1 min) before: {load:.1f}, after: {os.getloadavg()[0]:.1f}\n")
    print(table({f"source {i + 1}": results[str(s)] for i, s in enumerate(sources)}))
    if args.json:
        record = {"preset": args.preset, "overrides": args.overrides, "runs": results}
        args.json.write_text(json.dumps(record, indent=2) + "\n")


def describe(src: Path) -> str:
    """The checkout's commit, or what its files are."""
    git = subprocess.run(
        ["git", "-C", str(src), "log", "-1", "--format=%h %<(50,trunc)%s"],
        capture_output=True,
        text=True,
        check=False,
    )
    return git.stdout.strip() if git.returncode == 0 else "not a git checkout"


if __name__ == "__main__":
    main(sys.argv[1:])
