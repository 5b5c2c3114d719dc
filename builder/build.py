"""A resolved preset -> one artifact folder per target."""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from . import __version__, artifact, targets
from .assemble import ENTRY, INPUT_NAME, export, input_shape, output_shape
from .cache import Cache
from .config import Preset, TargetConfig
from .errors import BuilderError, InputError
from .runtime import set_threads
from .weights import load_weights

DEFAULT_OUT = Path("artifacts")
PACK_FUNCTION = "transform_params"
# The same packing into buffers of the caller's; `_shapes` gives their shapes.
PACK_INTO = "transform_params_into"
Progress = Callable[[str], None]


@dataclass
class Built:
    target: str
    path: Path
    seconds: float
    cached: bool = False


@dataclass
class Failed:
    target: str
    reason: str
    error: Exception | None = field(default=None, repr=False)


class TargetsFailed(BuilderError):
    """Some targets could not be built; the others were written."""

    def __init__(self, built: list[Built], failed: list[Failed]):
        self.built, self.failed = built, failed
        total = len(built) + len(failed)
        lines = [f"{len(failed)} of {total} targets failed:"]
        lines += [f"  [{f.target}] {f.reason}" for f in failed]
        super().__init__("\n".join(lines))


def _quiet(_: str) -> None:
    pass


def select_targets(preset: Preset, names: list[str] | None) -> list[TargetConfig]:
    if not names:
        return preset.targets
    known = [t.name for t in preset.targets]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"--target {unknown}: not among the preset's targets {known}")
    return [t for t in preset.targets if t.name in names]


def build(
    preset: Preset,
    out: Path = DEFAULT_OUT,
    only: list[str] | None = None,
    progress: Progress = _quiet,
    force: bool = False,
    verify: bool = False,
    cache: Cache | None = None,
) -> list[Built]:
    """Every selected target: reused from the build cache when its key is there (hashing
    the cached files first with `verify`), else assembled, compiled and stored; then
    published to `out/<preset>/<target>`. `force` rebuilds whatever the cache holds."""
    chosen = select_targets(preset, only)
    cache = cache if cache is not None else Cache()
    cache.sweep()
    digest = cache.weights_digest(preset)  # a bad checkpoint path fails here, before any work
    inputs = _Inputs(preset, progress)
    built: list[Built] = []
    failed: list[Failed] = []
    # Each target on its own: one that cannot be built does not stop the others. Bad input
    # (a checkpoint that does not fit the preset) is not a target's failure: it stops all.
    for entry in chosen:
        try:
            built.append(
                _target(preset, entry, digest, inputs, cache, out, progress, force, verify)
            )
        except (InputError, KeyboardInterrupt):
            raise
        except Exception as e:  # reported per target, then raised for them all
            reason = str(e) if isinstance(e, BuilderError) else f"{type(e).__name__}: {e}"
            progress(f"[{entry.name}] FAILED: {reason}")
            failed.append(Failed(entry.name, reason, e))
    if failed:
        raise TargetsFailed(built, failed)
    return built


class _Inputs:
    """The exported module and the weights, made on first need (a cache hit needs neither)."""

    def __init__(self, preset: Preset, progress: Progress):
        self.preset = preset
        self.progress = progress
        self._made: tuple[Any, ...] | None = None

    def get(self) -> tuple[tvm.IRModule, list[tuple[str, tuple[int, ...]]], dict, dict]:
        if self._made is None:
            model = self.preset.model
            t0 = time.perf_counter()
            mod, params = export(model, self.preset.blocks, self.preset.dtype)
            shapes = dict(params)
            count = sum(int(np.prod(s)) for s in shapes.values())
            self.progress(
                f"assembled {len(params)} parameters ({count / 1e6:.1f} M), "
                f"{model.num_layers_computed} of {model.num_hidden_layers} layers computed"
            )
            arrays, source = load_weights(self.preset, shapes)
            what = (
                f"random init (seed {source['seed']})"
                if source["kind"] == "random"
                else source["path"]
            )
            self.progress(f"weights: {what} [{time.perf_counter() - t0:.1f} s]")
            self._made = (mod, params, arrays, source)
        return self._made


def _target(
    preset: Preset,
    entry: TargetConfig,
    digest: dict[str, Any],
    inputs: _Inputs,
    cache: Cache,
    out: Path,
    progress: Progress,
    force: bool,
    verify: bool,
) -> Built:
    t0 = time.perf_counter()
    kind = targets.pipeline(entry.kind)
    _, options = kind.tvm_target(entry)
    key = cache.key(preset, entry, options, kind, digest)
    final = out / preset.name / entry.name

    def waiting() -> None:
        progress(f"[{entry.name}] waiting for another build of the same key {key[:12]}")

    with cache.lock(key, waiting):
        folder, why = (None, "--force") if force else cache.lookup(key, verify)
        if folder is None:
            lacking = kind.missing(entry)
            if lacking:
                raise BuilderError(f"cannot build on this machine: {'; '.join(lacking)}")
            progress(f"[{entry.name}] building ({why}; cache key {key[:12]})")
            with cache.store(key) as tmp:
                _compile_into(tmp, preset, entry, key, inputs, progress)
            folder = cache.entry(key)
        else:
            progress(f"[{entry.name}] cache hit {key[:12]}")
        artifact.publish(folder, final, cache.out_lock(final))
    seconds = time.perf_counter() - t0
    progress(f"[{entry.name}] wrote {final} [{seconds:.1f} s]")
    return Built(entry.name, final, seconds, cached=not why)


def pack_params(
    executable: tvm.runtime.Executable, order: list[str], arrays: dict[str, np.ndarray]
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Run the executable's `transform_params` (weight layouts its pipeline chose, such as
    GEMM panels) once, at build time, so the artifact stores the packed weights and `forward`
    takes them as they are. Executables without it get the parameters unchanged.

    Where the pipeline offers `transform_params_into` (the same kernels, writing into the
    caller's buffers), the packed weights land in arrays of the builder's own
    (`artifact.empty_arrays`) rather than memory the VM allocates, and the kernels read
    the parameters where they are, without a copy; TVM's pool runs them on every core
    (`runtime.set_threads`)."""
    vm = relax.VirtualMachine(executable, tvm.cpu())
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


def _compile_into(
    folder: Path,
    preset: Preset,
    entry: TargetConfig,
    key: str,
    inputs: _Inputs,
    progress: Progress,
) -> None:
    mod, params, arrays, source = inputs.get()
    kind = targets.pipeline(entry.kind)
    target, options = kind.tvm_target(entry)
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
    progress(f"[{entry.name}] compiled [{time.perf_counter() - t0:.1f} s]")
    # In the build's dtype before packing: `transform_params` takes what `forward` takes.
    arrays = artifact.cast_params(arrays, preset.dtype)
    order, stored = [name for name, _ in params], arrays
    packing = kind.params_packing(entry)
    if packing == "build":
        order, stored = pack_params(executable, order, arrays)
        progress(f"[{entry.name}] packed weights [{time.perf_counter() - t0:.1f} s]")
    try:
        kind.export(executable, folder / kind.LIBRARY, entry)
    except Exception as e:
        raise BuilderError(f"export failed: {type(e).__name__}: {e}") from e
    artifact.save_params(folder, order, stored)
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
        "library": kind.LIBRARY,
        "entry": ENTRY,
        "inputs": [{"name": INPUT_NAME, "shape": input_shape(preset.model), "dtype": "float32"}],
        "outputs": [
            {
                "name": preset.model.output,
                "shape": output_shape(preset.model, preset.blocks),
                "dtype": "float32",
            }
        ],
        "params": {
            "file": artifact.PARAMS,
            "order": order,
            "dtype": preset.dtype,
            # "build": stored packed; "load": the runtime calls transform_params on load.
            "packing": packing,
        },
        # Parameters and computation; pixel values and features are float32 regardless.
        "dtype": preset.dtype,
        "weights": source,
        # What `Encoder.encode_images` and `build run` apply to an image file.
        "preprocess": dataclasses.asdict(preset.preprocess.resolved(preset.model.image_size)),
    }
    artifact.write_manifest(folder, manifest)
