"""The compiled library of a build, and its plan: the graph exported, the library key, the
library compiled (or reused from the cache's libraries), and what the artifact's
parameters and manifest are made from (`plan`). Imports TVM; `builder.make_artifact`
imports this module only when the cache holds no plan for the build (builder/cache.py)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .tvm_import import import_tvm, versions

tvm = import_tvm()

import numpy as np  # noqa: E402

from . import targets  # noqa: E402
from .assemble import ENTRY, export, outputs  # noqa: E402
from .assemble import inputs as forward_inputs  # noqa: E402
from .cache import KEY_FORMAT, Cache, digest, pipeline_sources, rebuilding_objects, write_part  # noqa: E402
from .config import Preset, TargetConfig  # noqa: E402
from .errors import BuilderError  # noqa: E402
from .flops import gflop, per_patch  # noqa: E402
from .make_artifact import Params, Progress  # noqa: E402

# What a compile pipeline reports about its library, kept with it in the cache.
PIPELINE_REPORT = ("fallback_ops",)
# What else the library's part.json keeps of the compile: the packing as steps
# (`targets/cpu/packing_steps.py`), where the pipeline has them.
PIPELINE_FACTS = (*PIPELINE_REPORT, "pack_steps")
# Called once the library key is known, before any compile: the build starts the weights.
Early = Callable[[str, str, Params], None]


def plan(
    preset: Preset,
    entry: TargetConfig,
    inputs: dict[str, Any],
    cache: Cache,
    progress: Progress,
    early: Early,
    force: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The plan of `entry`'s artifact (see `builder.make_artifact`) and its library's
    `part.json`, the library compiled into the cache's libraries unless stored there already
    (or `force`). `inputs` holds what the targets of one build share: the exported graph.
    `early(library_key, packing, params)` runs before the compile."""
    kind = targets.pipeline(entry.kind)
    lacking = kind.missing(entry)
    if lacking:
        raise BuilderError(f"cannot build on this machine: {'; '.join(lacking)}")
    mod, params = _exported(preset, inputs, progress)
    target, options = kind.tvm_target(entry)
    library_key = make_library_key(_graph_digest(mod, inputs), entry, target, options)
    packing = kind.params_packing(entry)
    early(library_key, packing, params)
    with cache.lock(library_key):
        library = None if force else cache.lookup_part("libraries", library_key)
        if library is None:
            rebuilding = rebuilding_objects() if force else contextlib.nullcontext()
            with cache.store(library_key, "libraries") as tmp, rebuilding:
                report = _compile(tmp / kind.LIBRARY, mod, kind, entry, target, options, progress)
                write_part(tmp, {"library_key": library_key, "target": options, **report})
            library = cache.lookup_part("libraries", library_key)
            if library is None:
                raise BuilderError("the build cache lost an entry while it was being made")
        else:
            progress(f"[{entry.name}] compiled library reused {library_key[:12]}")
    path = cache.entry(library_key, "libraries") / kind.LIBRARY
    made = {
        "library_key": library_key,
        "params": [[name, list(shape)] for name, shape in params],
        "packing": packing,
        # The manifest's fields that follow from the library.
        "manifest": {
            "target": {
                "name": entry.name,
                "kind": entry.kind,
                "precision": entry.precision,
                "options": options,
            },
            "runs_on": kind.runs_on(entry, options, path),
            "versions": versions(),  # what `artifact.check` compares with
            "library": kind.LIBRARY,
            "entry": ENTRY,
            "inputs": forward_inputs(preset.model, preset.blocks),
            "outputs": outputs(preset.model, preset.blocks),
            # Matmuls, attention and the patch conv of one image (`builder/flops.py`); a
            # native tower's as a function of its patch count.
            **_work(mod, preset),
            # llvm: what `forward` runs on the fallback schedule (docs/cpu-pipeline.md).
            **{k: library[k] for k in PIPELINE_REPORT if k in library},
        },
    }
    return made, library


def _work(mod: tvm.IRModule, preset: Preset) -> dict[str, Any]:
    if preset.model.native:
        model = per_patch(mod)
        return {"gflop_per_patch": {k: round(v, 9) for k, v in model.items()}}
    return {"gflop_per_image": round(gflop(mod), 6)}


def make_library_key(
    graph: str, entry: TargetConfig, target: tvm.target.Target, options: dict[str, Any]
) -> str:
    """The compiled library's key: the graph's digest (`graph_digest`), the target options
    and the kernel facts they imply, the precision, the kind's pipeline and TVM."""
    kind = targets.pipeline(entry.kind)
    return digest(
        {
            "key_format": KEY_FORMAT,
            "graph": graph,
            "target": options,
            "kernels": kind.kernel_facts(target),
            "precision": entry.precision,
            "pipeline": {
                "kind": entry.kind,
                "version": kind.PIPELINE_VERSION,
                "sources": pipeline_sources(),
            },
            "versions": versions(),
        }
    )


def graph_digest(mod: tvm.IRModule) -> str:
    """sha256 of the exported module's TVMScript: its operators, shapes and dtypes."""
    return digest(mod.script(show_meta=False))


def _exported(preset: Preset, inputs: dict[str, Any], progress: Progress) -> tuple[Any, Params]:
    if "graph" not in inputs:
        model = preset.model
        t0 = time.perf_counter()
        mod, params = export(model, preset.blocks, preset.dtype)
        count = sum(int(np.prod(s)) for _, s in params)
        progress(
            f"assembled {len(params)} parameters ({count / 1e6:.1f} M), "
            f"{model.num_layers_computed} of {model.num_hidden_layers} layers computed "
            f"[{time.perf_counter() - t0:.1f} s]"
        )
        inputs["graph"] = (mod, params)
    return inputs["graph"]


def _graph_digest(mod: tvm.IRModule, inputs: dict[str, Any]) -> str:
    if "graph_digest" not in inputs:
        inputs["graph_digest"] = graph_digest(mod)
    return inputs["graph_digest"]


def _compile(
    path: Path,
    mod: tvm.IRModule,
    kind: Any,
    entry: TargetConfig,
    target: tvm.target.Target,
    options: dict[str, Any],
    progress: Progress,
) -> dict[str, Any]:
    """Compile and export the library to `path`; what the pipeline reports about it (an
    llvm library's `fallback_ops`)."""
    t0 = time.perf_counter()
    progress(f"[{entry.name}] compiling for {options}, precision {entry.precision}")
    with _noting_interrupts() as interrupted:
        try:
            executable = kind.compile(mod, target, entry.precision)
        except Exception as e:  # TVM raises many types; the message is what matters
            if interrupted:
                raise KeyboardInterrupt from e
            raise BuilderError(f"compile failed: {type(e).__name__}: {e}") from e
        if interrupted:  # a pass that tolerates errors may have swallowed it
            raise KeyboardInterrupt
    try:
        kind.export(executable, path, entry)
    except Exception as e:
        raise BuilderError(f"export failed: {type(e).__name__}: {e}") from e
    progress(f"[{entry.name}] compiled [{time.perf_counter() - t0:.1f} s]")
    return {k: getattr(executable, k) for k in PIPELINE_FACTS if hasattr(executable, k)}


@contextmanager
def _noting_interrupts() -> Iterator[list[int]]:
    """A list that gets an entry when SIGINT arrives. A Ctrl-C that lands in Python code
    called back from TVM's C++ surfaces as a bare RuntimeError; this tells it apart."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield []  # Python's Ctrl-C handling is not in charge here: leave it alone
        return
    seen: list[int] = []

    def note(signum: int, frame: Any) -> None:
        seen.append(signum)
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)
