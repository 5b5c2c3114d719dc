"""One artifact made on a cache miss: the graph exported, the library compiled (or reused
from the cache's libraries), the parameters made and packed (or reused from its params), and
the manifest written. Imports TVM; `builder.build` imports this module only on a miss."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .tvm_import import import_tvm

tvm = import_tvm()

import numpy as np  # noqa: E402
import tvm_ffi  # noqa: E402
from tvm import relax  # noqa: E402

from . import __version__, artifact, targets  # noqa: E402
from .assemble import ENTRY, export, outputs  # noqa: E402
from .assemble import inputs as forward_inputs  # noqa: E402
from .cache import (  # noqa: E402
    KEY_FORMAT,
    Cache,
    digest,
    pipeline_sources,
    rebuilding_objects,
    write_part,
)
from .config import Preset, TargetConfig  # noqa: E402
from .errors import BuilderError  # noqa: E402
from .flops import gflop, per_patch  # noqa: E402
from .runtime import set_threads  # noqa: E402
from .weights import load_weights  # noqa: E402

PACK_FUNCTION = "transform_params"
# The same packing into buffers of the caller's; `_shapes` gives their shapes.
PACK_INTO = "transform_params_into"
# What a compile pipeline reports about its library, kept with it in the cache.
PIPELINE_REPORT = ("fallback_ops",)
Progress = Callable[[str], None]


def make_artifact(
    folder: Path,
    preset: Preset,
    entry: TargetConfig,
    key: str,
    weights_digest: dict[str, Any],
    inputs: dict[str, Any],
    cache: Cache,
    progress: Progress,
    force: bool = False,
) -> None:
    """Fill `folder` with the artifact of `entry`. `inputs` holds what the targets of one
    build share (the exported graph, the weights), made on first need. `force` compiles and
    packs again whatever the cache holds."""
    kind = targets.pipeline(entry.kind)
    lacking = kind.missing(entry)
    if lacking:
        raise BuilderError(f"cannot build on this machine: {'; '.join(lacking)}")
    mod, params = _exported(preset, inputs, progress)
    target, options = kind.tvm_target(entry)
    library_key = make_library_key(_graph_digest(mod, inputs), entry, target, options)
    packing = kind.params_packing(entry)
    params_key = make_params_key(library_key, weights_digest, preset.dtype, packing)
    if force or not cache.entry(params_key, "params").is_dir():
        # The weights will be needed: make them (random init, or read a checkpoint) on
        # another thread while the library compiles, mostly on one core.
        _start_weights(preset, params, inputs, progress)
    with cache.lock(library_key):
        library = None if force else cache.lookup_part("libraries", library_key)
        if library is None:
            rebuilding = rebuilding_objects() if force else contextlib.nullcontext()
            with cache.store(library_key, "libraries") as tmp, rebuilding:
                report = _compile(tmp / kind.LIBRARY, mod, kind, entry, target, options, progress)
                write_part(tmp, {"library_key": library_key, "target": options, **report})
            library = cache.lookup_part("libraries", library_key)
        else:
            progress(f"[{entry.name}] compiled library reused {library_key[:12]}")
    lib_folder = cache.entry(library_key, "libraries")
    with cache.lock(params_key):
        stored = None if force else cache.lookup_part("params", params_key)
        if stored is None:
            with cache.store(params_key, "params") as tmp:
                order, source, written = _params(
                    tmp,
                    preset,
                    entry,
                    params,
                    packing,
                    lib_folder / kind.LIBRARY,
                    inputs,
                    progress,
                )
                record = {"order": order, "source": source, "packing": packing}
                write_part(tmp, record, known=written)
            stored = cache.lookup_part("params", params_key)
        else:
            progress(f"[{entry.name}] parameters reused {params_key[:12]}")
    if library is None or stored is None:
        raise BuilderError("the build cache lost an entry while it was being made")
    artifact.fill(lib_folder, folder, [kind.LIBRARY])
    artifact.fill(cache.entry(params_key, "params"), folder, [artifact.PARAMS])
    manifest = {
        "format": artifact.FORMAT,
        "preset": preset.name,
        "resolved_preset": preset.to_dict(),
        "target": {
            "name": entry.name,
            "kind": entry.kind,
            "precision": entry.precision,
            "options": options,
        },
        "runs_on": kind.runs_on(entry, options, folder / kind.LIBRARY),
        "versions": {
            "builder": __version__,
            "tvm": tvm.__version__,
            "tvm_ffi": tvm_ffi.__version__,
        },
        "cache_key": key,
        "library_key": library_key,
        "params_key": params_key,
        "library": kind.LIBRARY,
        "entry": ENTRY,
        "inputs": forward_inputs(preset.model, preset.blocks),
        "outputs": outputs(preset.model, preset.blocks),
        # Matmuls, attention and the patch conv of one image (`builder/flops.py`); a native
        # tower's as a function of its patch count.
        **_work(mod, preset),
        "params": {
            "file": artifact.PARAMS,
            "order": stored["order"],
            "dtype": preset.dtype,
            # "build": stored packed; "load": the runtime calls transform_params on load.
            "packing": packing,
        },
        # Parameters and computation; pixel values and features are float32 regardless.
        "dtype": preset.dtype,
        "weights": stored["source"],
        # What `Encoder.encode_images` and `build run` apply to an image file.
        "preprocess": dataclasses.asdict(preset.preprocess.resolved(preset.model.image_size)),
        # llvm: what `forward` runs on the fallback schedule (docs/cpu-pipeline.md).
        **{k: library[k] for k in PIPELINE_REPORT if k in library},
    }
    artifact.write_manifest(folder, manifest, known={**library["files"], **stored["files"]})


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
            "versions": {"tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__},
        }
    )


def make_params_key(
    library_key: str, weights_digest: dict[str, Any], dtype: str, packing: str
) -> str:
    """The stored parameters' key: the library that packs them, the weights, the dtype."""
    return digest(
        {
            "key_format": KEY_FORMAT,
            "library": library_key,
            "weights": weights_digest,
            "dtype": dtype,
            "packing": packing,
        }
    )


def graph_digest(mod: tvm.IRModule) -> str:
    """sha256 of the exported module's TVMScript: its operators, shapes and dtypes."""
    return digest(mod.script(show_meta=False))


def _exported(
    preset: Preset, inputs: dict[str, Any], progress: Progress
) -> tuple[tvm.IRModule, list[tuple[str, tuple[int, ...]]]]:
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


def _weights(
    preset: Preset,
    params: list[tuple[str, tuple[int, ...]]],
    inputs: dict[str, Any],
    progress: Progress,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and their source: made once per build (`_start_weights` may have begun
    them), and what making them raised is raised here."""
    _start_weights(preset, params, inputs, progress)
    return inputs["weights"].result()


def _start_weights(
    preset: Preset,
    params: list[tuple[str, tuple[int, ...]]],
    inputs: dict[str, Any],
    progress: Progress,
) -> None:
    """Make the weights on a thread of their own (numpy's generators and file reads release
    the GIL), unless begun already: `inputs["weights"]` is their future."""
    if "weights" in inputs:
        return
    future: Future = Future()

    def make() -> None:
        t0 = time.perf_counter()
        try:
            arrays, source = load_weights(preset, dict(params))
        except BaseException as e:  # handed to the thread that needs the weights
            future.set_exception(e)
            return
        kind = source["kind"]
        what = f"random init (seed {source['seed']})" if kind == "random" else source["path"]
        progress(f"weights: {what} [{time.perf_counter() - t0:.1f} s]")
        future.set_result((arrays, source))

    inputs["weights"] = future
    # A daemon: an interrupted build does not wait for it to finish.
    threading.Thread(target=make, name="weights", daemon=True).start()


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
    return {k: getattr(executable, k) for k in PIPELINE_REPORT if hasattr(executable, k)}


def _params(
    folder: Path,
    preset: Preset,
    entry: TargetConfig,
    params: list[tuple[str, tuple[int, ...]]],
    packing: str,
    library: Path,
    inputs: dict[str, Any],
    progress: Progress,
) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """Write the parameters `forward` takes into `folder`; their order, their source and
    the file's record (`artifact.save_params`)."""
    arrays, source = _weights(preset, params, inputs, progress)
    t0 = time.perf_counter()
    # In the build's dtype before packing: `transform_params` takes what `forward` takes.
    arrays = artifact.cast_params(arrays, preset.dtype)
    order, stored = [name for name, _ in params], arrays
    if packing == "build":
        order, stored = pack_params(tvm.runtime.load_module(str(library)), order, arrays)
        progress(f"[{entry.name}] packed weights [{time.perf_counter() - t0:.1f} s]")
    written = artifact.save_params(folder, order, stored)
    progress(f"[{entry.name}] wrote parameters [{time.perf_counter() - t0:.1f} s]")
    return order, source, written


def pack_params(
    library: Any, order: list[str], arrays: dict[str, np.ndarray]
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Run the `transform_params` of a library (an executable, or a loaded module): the
    weight layouts its pipeline chose, such as GEMM panels, made once at build time, so the
    artifact stores the packed weights and `forward` takes them as they are. Libraries
    without it get the parameters unchanged.

    Where the pipeline offers `transform_params_into` (the same kernels, writing into the
    caller's buffers), the packed weights land in arrays of the builder's own
    (`artifact.empty_arrays`) rather than memory the VM allocates, and the kernels read
    the parameters where they are, without a copy; TVM's pool runs them on every core
    (`runtime.set_threads`)."""
    vm = relax.VirtualMachine(library, tvm.cpu())
    if not vm.module.implements_function(PACK_FUNCTION):
        return order, arrays
    set_threads(None)
    inputs = [_device_tensor(arrays[name]) for name in order]
    if vm.module.implements_function(PACK_INTO):
        shapes = [tuple(int(d) for d in s) for s in vm[f"{PACK_INTO}_shapes"]()]
        outs = artifact.empty_arrays([(s, np.dtype(np.float32)) for s in shapes])
        packed = vm[PACK_INTO](*inputs, *(tvm.runtime.from_dlpack(o) for o in outs))
    else:
        packed = vm[PACK_FUNCTION](*inputs)
    names = [f"packed.{i}" for i in range(len(packed))]
    return names, {name: _host_array(t) for name, t in zip(names, packed, strict=True)}


def _device_tensor(a: np.ndarray) -> tvm.runtime.Tensor:
    """A TVM tensor of `a`: a view where TVM can take one (a float32 or float16 array,
    C-contiguous, aligned as TVM aligns its own), else a copy."""
    viewable = a.dtype in (np.float32, np.float16) and a.flags.c_contiguous and a.flags.writeable
    if viewable and a.ctypes.data % artifact.ALIGN == 0:
        return tvm.runtime.from_dlpack(a)
    return tvm.runtime.tensor(a)


def _host_array(t: tvm.runtime.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a CPU tensor (`Tensor.numpy()` copies: seconds for a ViT-L's
    1.2 GB); numpy has no bfloat16, so those are copied."""
    return t.numpy() if str(t.dtype) == "bfloat16" else np.from_dlpack(t)


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
