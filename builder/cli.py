"""`build`: argv -> one request -> a plain library call. The only module that prints or exits.

    build PRESET [KEY=VALUE ...] [--out DIR] [--target NAME ...]   build every listed target
    build show PRESET [KEY=VALUE ...]                               the resolved preset as YAML
    build check PRESET [PRESET ...] [KEY=VALUE ...]                 validate only
    build verify ARTIFACT [ARTIFACT ...]                            hash an artifact's files
    build list                                                      families, presets, blocks
    build import CONFIG.json --out PRESET.yaml [--force]            a preset from a model config

`--plugin MODULE` (repeatable) imports a block-plugin module first.
    build run ARTIFACT IMG [IMG ...] --out FEATS.npy [--batch N]    images -> features
    build bench ARTIFACT [--batch N | --crops N | --grid RxC] [--threads N]  latency and throughput
    build encode ARTIFACT INPUT [INPUT ...] --out DIR               a dataset -> feature shards

Exit codes: 0 done, 1 a failure while building, 2 bad input (usage, preset, override).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import DEFAULT_OUT
from .errors import BuilderError, InputError

# Each command imports what it needs when it runs: `build --help`, `list`, `check`, `show`
# and `import` never import TVM (seconds, with torch installed), and a cache hit neither.

COMMANDS = ("build", "show", "check", "list", "import", "run", "bench", "verify", "encode")


def _err(*lines: str) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def _split(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(presets, overrides): an argument with '=' is an override."""
    presets = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    return presets, overrides


def _parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="build",
        description="Build the vision towers of vision-language models from YAML presets with "
        "Apache TVM.",
        epilog="With no command, `build PRESET ...` builds. Exit codes: 1 build failure, "
        "2 bad input.",
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("build", help="build every target of a preset (the default command)")
    p.add_argument("preset", help="a preset file, or the name of a shipped preset")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.image_size=224")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)"
    )
    p.add_argument(
        "--target", action="append", metavar="NAME", help="build only this target (repeatable)"
    )
    p.add_argument(
        "--force", action="store_true", help="rebuild even if the build cache holds the result"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="hash a cached artifact's files before reusing it (default: sizes and times)",
    )
    p.add_argument("--verbose", action="store_true", help="show a traceback on a build failure")
    _plugin_option(p)

    p = sub.add_parser("show", help="print the resolved, validated preset as YAML")
    p.add_argument("preset")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    _plugin_option(p)

    p = sub.add_parser("check", help="validate presets; print every error of every file")
    p.add_argument("args", nargs="+", metavar="PRESET|KEY=VALUE")
    _plugin_option(p)

    p = sub.add_parser("bench", help="time a built artifact: latency and throughput")
    p.add_argument("artifact", type=Path, help="an artifact folder, e.g. artifacts/llava-clip/llvm")
    p.add_argument("--batch", type=int, default=1, help="images per call (default: %(default)s)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all this process may use)")
    p.add_argument("--runs", type=int, default=10, help="timed runs after one warm-up")
    p.add_argument(
        "--crops",
        type=int,
        help="crops per image, for an artifact with a crop scheme (anyres, dynamic tiles, "
        "image splitting): a run is one image, its crops as one batch (default: the most "
        "the scheme cuts)",
    )
    p.add_argument(
        "--grid",
        metavar="ROWSxCOLS",
        help="a native-resolution artifact: the patch grid of the image a run takes (default: "
        "the largest square image its processor gives)",
    )

    p = sub.add_parser(
        "list", help="list tower families, shipped presets and registered block types"
    )
    _plugin_option(p)

    p = sub.add_parser(
        "import",
        help="write a sparse preset from a model's config: an HF config.json (a tower "
        "family's, or a VLM's around one), open_clip's open_clip_config.json or model config, "
        "or timm's config.json",
        description="Keys of the config that the builder does not use are printed and "
        "listed in the preset's header. The preset is validated before it is written.",
    )
    p.add_argument("config", type=Path, help="an HF, open_clip or timm config JSON")
    p.add_argument("--out", type=Path, required=True, help="the preset file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p = sub.add_parser(
        "run",
        help="encode image files with a built artifact; write the features (.npy) and a "
        "record of the image order and shape (.json beside it)",
    )
    p.add_argument("artifact", type=Path, help="an artifact folder, e.g. artifacts/llava-clip/llvm")
    p.add_argument("images", nargs="+", metavar="IMG", help="image files (JPEG, PNG, ...)")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the features file (.npy; .safetensors, a tensor per image, with anyres crops)",
    )
    p.add_argument("--batch", type=int, default=8, help="images per call (default: %(default)s)")
    p.add_argument("--threads", type=int, help="CPU threads (default: every core available)")
    p.add_argument("--verbose", action="store_true", help="show a traceback on a failure")

    p = sub.add_parser(
        "encode",
        help="encode a dataset of images into feature shards (.npy) and index.parquet; "
        "resumable, bad images recorded not fatal",
        description="Inputs: folders (walked recursively), globs, .txt files of paths, "
        "webdataset .tar shards, .parquet files. A rerun with the same arguments resumes. "
        "See docs/encode.md.",
    )
    p.add_argument("artifact", type=Path, help="an artifact folder, e.g. artifacts/llava-clip/llvm")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="folder, glob, .txt, .tar, .parquet")
    p.add_argument("--out", type=Path, required=True, help="the output folder")
    p.add_argument(
        "--shard-size", type=int, default=1000, help="images per shard (default: %(default)s)"
    )
    p.add_argument("--batch", type=int, default=8, help="images per call (default: %(default)s)")
    p.add_argument(
        "--workers",
        type=int,
        help="decoding processes (default: a quarter of the cores, at least 1); with "
        "--engine ray, encoder actors (default: 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="TVM threads (default: the cores the workers leave); with --engine ray, per actor "
        "(default: 1)",
    )
    p.add_argument("--column", help="a .parquet input's image column (bytes or paths)")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="(default: local)")
    p.add_argument("--address", help="with --engine ray: the cluster (default: a local one)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any image failed")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--verbose", action="store_true", help="show a traceback on a failure")

    p = sub.add_parser(
        "verify", help="check artifact folders: every file's sha256, and the TVM version"
    )
    p.add_argument("artifacts", nargs="+", type=Path, metavar="ARTIFACT")
    return top


def _plugin_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a block-plugin module first (repeatable; see docs/plugins.md)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "build")
    parser = _parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command in LOADS_ARTIFACTS:
        from .tvm_import import import_runtime

        import_runtime()  # before anything imports torch (builder.tvm_import)
    try:
        return COMMAND_FUNCTIONS[args.command](args)
    except InputError as e:
        _err(*e.lines)
        return 2
    except BuilderError as e:
        if getattr(args, "verbose", False):
            traceback.print_exc()
        _err(f"build failed: {e}")
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except Exception as e:  # a bug or a TVM failure: exit 1, traceback only on request
        if getattr(args, "verbose", False):
            traceback.print_exc()
        _err(f"build failed: {type(e).__name__}: {e} (--verbose shows a traceback)")
        return 1


def _build(args: argparse.Namespace) -> int:
    from .build import TargetsFailed, build
    from .preset import load_preset

    preset = load_preset(args.preset, args.overrides, args.plugin)
    chosen = args.target or [t.name for t in preset.targets]
    _err(
        f"build {preset.name}: preset {args.preset}, overrides {args.overrides or 'none'}, "
        f"plugins {preset.plugins or 'none'}, targets {chosen}, out {args.out}"
    )
    if preset.weights.is_random:
        _err(f"weights: RANDOM init (seed {preset.weights.seed}), not a trained model")
    try:
        built = build(
            preset, args.out, args.target, progress=_err, force=args.force, verify=args.verify
        )
    except TargetsFailed as e:
        for b in e.built:  # what was written, before the failures are reported
            print(b.path)
        if args.verbose:
            for f in e.failed:
                _err(f"[{f.target}] traceback:")
                traceback.print_exception(f.error)
        raise
    for b in built:
        print(b.path)
    return 0


def _run(args: argparse.Namespace) -> int:
    from .run import RunRequest, record_path, run_images

    req = RunRequest(args.artifact, args.images, args.out, args.batch, args.threads)
    _err(
        f"run {req.artifact}: {len(req.images)} images, batch {req.batch}, "
        f"out {req.out} (+ {record_path(req.out).name})"
    )
    record = run_images(req, progress=_err)
    if record["weights"] == "random":
        _err("note: the artifact has RANDOM weights: these features mean nothing")
    if "shapes" in record:
        tokens = sorted({shape[0] for shape in record["shapes"]})
        _err(f"features of {tokens} tokens x {record['shapes'][0][1]} per image, float32")
    else:
        _err(f"features {tuple(record['shape'])} {record['dtype']}")
    print(req.out)
    return 0


def _encode(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    from .encode import INDEX, EncodeRequest, run

    req = EncodeRequest(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(EncodeRequest)}
    )
    _err(
        f"encode {req.artifact}: inputs {req.inputs}, out {req.out}, shard size "
        f"{req.shard_size}, batch {req.batch}, engine {req.engine}"
    )
    bar = None  # a tqdm bar, on a terminal, from the first report on
    since = {"time": 0.0, "done": -1}  # the previous progress line, off a terminal

    def progress(done: int, total: int, failed: int) -> None:
        nonlocal bar
        if args.quiet:
            return
        if sys.stderr.isatty():
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=total, initial=done, unit="img", file=sys.stderr)
            bar.set_postfix(failed=failed, refresh=False)
            bar.update(done - bar.n)
            return
        now = time.monotonic()
        if since["done"] < 0:
            since.update(time=now, done=done)
        elif now - since["time"] >= 10 or done == total:
            rate = (done - since["done"]) / max(now - since["time"], 1e-9)
            eta = f", ETA {(total - done) / rate:.0f} s" if rate > 0 else ""
            _err(f"encoded {done}/{total} images, {failed} failed, {rate:.1f} images/s{eta}")
            since.update(time=now, done=done)

    try:
        record = run(req, progress)
    finally:
        if bar is not None:
            bar.close()
    if record["weights"] == "random":
        _err("note: the artifact has RANDOM weights: these features mean nothing")
    _err(
        f"{record['images']} images: {record['encoded']} encoded, {record['failed']} failed, "
        f"{record['resumed_shards']} of {record['shards']} shards kept from an earlier run"
    )
    print(req.out)
    if args.strict and record["failed"]:
        _err(f"--strict: {record['failed']} images failed (the error column of {INDEX})")
        return 1
    return 0


def _show(args: argparse.Namespace) -> int:
    import yaml

    from .preset import load_preset

    preset = load_preset(args.preset, args.overrides, args.plugin)
    print(yaml.safe_dump(preset.to_dict(), sort_keys=False), end="")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .preset import load_preset

    files, overrides = _split(args.args)
    if not files:
        raise InputError("check: no preset given")
    errors: list[str] = []
    for f in files:
        try:
            load_preset(f, overrides, args.plugin)
            _err(f"{f}: ok")
        except InputError as e:
            errors.extend(e.lines)
    if errors:
        raise InputError(errors)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from . import artifact

    errors: list[str] = []
    for folder in args.artifacts:
        try:
            artifact.check(folder.resolve(), full=True)
            _err(f"{folder}: ok")
        except (InputError, FileNotFoundError, ValueError) as e:
            errors.extend(e.lines if isinstance(e, InputError) else [str(e)])
    if errors:
        raise InputError(errors)
    return 0


def _list(args: argparse.Namespace) -> int:
    from . import families, registry, resources
    from .config import KIND_DESCRIPTIONS, KNOWN_TARGETS
    from .plugins import load_plugins
    from .preset import find_preset, read_preset

    load_plugins([(m, f"--plugin {m!r}") for m in args.plugin])
    print("tower families (a preset's family):")
    for family in families.all_families():
        print(f"  {family.name:24} {family.description}")
    print("presets:")
    for path in sorted(resources.presets_dir().glob("*.yaml")):
        try:
            desc = read_preset(find_preset(str(path))).data.get("description", "")
        except InputError:
            desc = "(invalid: run `build check`)"
        print(f"  {path.stem:24} {desc}")
    print("blocks (slot: name - summary):")
    for kind in registry.kinds():
        for block in registry.all_blocks():
            if block.kind == kind:
                print(f"  {kind}: {block.name:24} {block.summary}")
    print("target kinds (what an artifact is, what builds and runs it):")
    for name, description in KIND_DESCRIPTIONS.items():
        print(f"  {name:8} {description}")
    print("target names a preset may list bare:")
    for name, entry in KNOWN_TARGETS.items():
        options = ", ".join(f"{k}: {v}" for k, v in entry.items() if k != "name")
        print(f"  {name:8} {options}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import bench, most_crops
    from .runtime import load

    for flag in ("batch", "runs", "threads", "crops"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag} {value}: must be at least 1")
    try:
        encoder = load(args.artifact, threads=args.threads)
    except (OSError, ValueError) as e:
        raise InputError(f"{args.artifact}: {e}") from e
    crops = None
    grid = _grid(args.grid) if args.grid else None
    if grid and not encoder.native:
        raise InputError(f"--grid {args.grid}: {args.artifact} is not a native-resolution tower's")
    if encoder.native:
        if args.batch != 1 or args.crops:
            raise InputError(
                f"{args.artifact} takes one image at its own size per call; set --grid instead "
                "of --batch or --crops"
            )
        _err(f"bench {args.artifact}: {args.runs} runs, threads {encoder.threads}")
        r = bench(encoder, 1, args.runs, progress=_err, grid=grid)
        _print_bench(r, f" per image of {r.grid[0]} x {r.grid[1]} patches", "")
        return 0
    if encoder.variable_length:
        if args.batch != 1:
            raise InputError(
                f"--batch {args.batch}: {args.artifact} has a crop scheme and runs one image "
                "at a time, its crops as one batch; set --crops instead"
            )
        crops = args.crops or most_crops(encoder)
        if crops is None:
            raise InputError(
                f"{args.artifact}: image splitting without preprocess.longest_edge has no "
                "largest crop count; set --crops"
            )
    elif args.crops is not None:
        raise InputError(
            f"--crops {args.crops}: {args.artifact} has no crop scheme (one crop per image)"
        )
    what = f"{crops} crops per image" if crops else f"batch {args.batch}"
    _err(f"bench {args.artifact}: {what}, {args.runs} runs, threads {encoder.threads}")
    r = bench(encoder, args.batch, args.runs, progress=_err, crops=crops)
    if crops:
        per = f" per image ({crops} crops as one batch: {r.per_crop * 1e3:.1f} ms per crop)"
        _print_bench(r, per, f", {1 / r.per_crop:.2f} crops/s")
    else:
        _print_bench(r, "", "", f", batch {r.batch}")
    return 0


def _print_bench(r: Any, per: str, rate: str, runs: str = "") -> None:
    print(
        f"latency   median {r.median * 1e3:.1f} ms{per}, min {min(r.runs) * 1e3:.1f} ms, "
        f"max {max(r.runs) * 1e3:.1f} ms ({len(r.runs)} runs{runs})"
    )
    print(
        f"throughput {r.images_per_s:.2f} images/s{rate}, {r.gflops:.1f} GFLOP/s on "
        f"{r.threads} threads"
    )


def _grid(text: str) -> tuple[int, int]:
    rows, _, cols = text.partition("x")
    if not (rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
        raise InputError(f"--grid {text}: expected ROWSxCOLS, two positive patch counts")
    return int(rows), int(cols)


def _import(args: argparse.Namespace) -> int:
    import copy

    from .hf_import import import_config, render
    from .preset import RawPreset, validate

    imported = import_config(args.config)
    if args.out.exists() and not args.force:
        raise InputError(f"{args.out}: exists; pass --force to overwrite it")
    # Validated as the file it will be, so a bad value is reported before anything is written.
    validate(RawPreset(str(args.out), copy.deepcopy(imported.preset)))
    _err(f"import {args.config}: {imported.kind} config -> {args.out}")
    for key in imported.unused:
        _err(f"not used: {key}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(imported, args.config))
    print(args.out)
    return 0


# Commands that load an artifact, so TVM's runtime library (builder.vm). `build` imports TVM
# only to compile, or to find the library of a build it has no plan of
# (builder.make_artifact).
LOADS_ARTIFACTS = ("run", "bench", "encode")

COMMAND_FUNCTIONS = {
    "build": _build,
    "show": _show,
    "check": _check,
    "list": _list,
    "import": _import,
    "run": _run,
    "bench": _bench,
    "verify": _verify,
    "encode": _encode,
}

if __name__ == "__main__":
    sys.exit(main())
