"""`build`: argv -> one request -> a plain library call. The only module that prints or exits.

    build PRESET [KEY=VALUE ...] [--out DIR] [--target NAME ...]   build every listed target
    build show PRESET [KEY=VALUE ...]                               the resolved preset as YAML
    build check PRESET [PRESET ...] [KEY=VALUE ...]                 validate only
    build list                                                      presets and block types

Exit codes: 0 done, 1 a failure while building, 2 bad input (usage, preset, override).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import yaml

from . import __version__, registry, resources
from .build import DEFAULT_OUT, TargetsFailed, build
from .errors import BuilderError, InputError
from .preset import find_preset, load_preset, read_preset

COMMANDS = ("build", "show", "check", "list")


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
        description="Build CLIP-family vision encoders from YAML presets with Apache TVM.",
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
    p.add_argument("--verbose", action="store_true", help="show a traceback on a build failure")

    p = sub.add_parser("show", help="print the resolved, validated preset as YAML")
    p.add_argument("preset")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    p = sub.add_parser("check", help="validate presets; print every error of every file")
    p.add_argument("args", nargs="+", metavar="PRESET|KEY=VALUE")

    sub.add_parser("list", help="list shipped presets and registered block types")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "build")
    parser = _parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return {"build": _build, "show": _show, "check": _check, "list": _list}[args.command](args)
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
    preset = load_preset(args.preset, args.overrides)
    chosen = args.target or [t.name for t in preset.targets]
    _err(
        f"build {preset.name}: preset {args.preset}, overrides {args.overrides or 'none'}, "
        f"targets {chosen}, out {args.out}"
    )
    if preset.weights.is_random:
        _err(f"weights: RANDOM init (seed {preset.weights.seed}), not a trained model")
    try:
        built = build(preset, args.out, args.target, progress=_err)
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


def _show(args: argparse.Namespace) -> int:
    preset = load_preset(args.preset, args.overrides)
    print(yaml.safe_dump(preset.to_dict(), sort_keys=False), end="")
    return 0


def _check(args: argparse.Namespace) -> int:
    files, overrides = _split(args.args)
    if not files:
        raise InputError("check: no preset given")
    errors: list[str] = []
    for f in files:
        try:
            load_preset(f, overrides)
            _err(f"{f}: ok")
        except InputError as e:
            errors.extend(e.lines)
    if errors:
        raise InputError(errors)
    return 0


def _list(args: argparse.Namespace) -> int:
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
    from .config import KNOWN_TARGETS
    from .targets import KINDS

    print("target kinds (what an artifact is, what builds and runs it):")
    for name, kind in KINDS.items():
        print(f"  {name:8} {kind.DESCRIPTION}")
    print("target names a preset may list bare:")
    for name, entry in KNOWN_TARGETS.items():
        options = ", ".join(f"{k}: {v}" for k, v in entry.items() if k != "name")
        print(f"  {name:8} {options}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
