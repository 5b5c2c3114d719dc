"""One artifact made on a cache miss, from its plan: the compiled library and the manifest
fields that follow from it, the parameters' names, shapes and packing (`library.plan`).
The cache keeps each plan under a key computed without TVM (`Cache.plan_key`: the artifact
key without the weights), so a build whose weights alone changed finds the plan and its
library stored, and makes, packs (`builder.packing`, TVM's runtime alone) and writes the
new parameters without importing TVM. Otherwise `builder.library` exports the graph and
compiles the library, or reuses a stored one of the same library key."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, artifact
from .cache import KEY_FORMAT, Cache, digest, write_part
from .config import Preset, TargetConfig
from .errors import BuilderError
from .weights import load_weights

Progress = Callable[[str], None]
Params = list[tuple[str, tuple[int, ...]]]


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
    plan_key = cache.plan_key(preset, entry)
    found = None if force else _stored_plan(cache, plan_key, entry, progress)
    if found is None:
        from . import library  # imports TVM

        def early(library_key: str, packing: str, params: Params) -> None:
            # The weights will be needed: make them (random init, or read a checkpoint) on
            # another thread while the library compiles, mostly on one core.
            params_key = make_params_key(library_key, weights_digest, preset.dtype, packing)
            if force or not cache.entry(params_key, "params").is_dir():
                _start_weights(preset, params, inputs, progress)

        found = library.plan(preset, entry, inputs, cache, progress, early, force)
        cache.store_plan(plan_key, found[0])
    plan, library_part = found
    facts = plan["manifest"]
    library_key, packing = plan["library_key"], plan["packing"]
    params: Params = [(name, tuple(shape)) for name, shape in plan["params"]]
    lib_folder = cache.entry(library_key, "libraries")
    params_key = make_params_key(library_key, weights_digest, preset.dtype, packing)
    with cache.lock(params_key):
        stored = None if force else cache.lookup_part("params", params_key)
        if stored is None:
            with cache.store(params_key, "params") as tmp:
                library = lib_folder / facts["library"]
                # The library's packing as steps, where its pipeline gives them.
                steps = library_part.get("pack_steps") if packing == "build" else None
                order, source, written = _params(
                    tmp, preset, entry, params, packing, library, steps, inputs, progress
                )
                record = {"order": order, "source": source, "packing": packing}
                write_part(tmp, record, known=written)
            stored = cache.lookup_part("params", params_key)
        else:
            progress(f"[{entry.name}] parameters reused {params_key[:12]}")
    if stored is None:
        raise BuilderError("the build cache lost an entry while it was being made")
    artifact.fill(lib_folder, folder, [facts["library"]])
    artifact.fill(cache.entry(params_key, "params"), folder, [artifact.PARAMS])
    manifest = {
        "format": artifact.FORMAT,
        "preset": preset.name,
        "resolved_preset": preset.to_dict(),
        **facts,
        "versions": {"builder": __version__, **facts["versions"]},
        "cache_key": key,
        "library_key": library_key,
        "params_key": params_key,
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
    }
    known = {**library_part["files"], **stored["files"]}
    artifact.write_manifest(folder, manifest, known=known)


def _stored_plan(
    cache: Cache, plan_key: str, entry: TargetConfig, progress: Progress
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The cache's plan of `plan_key` and its library's `part.json`, where the library is
    stored intact."""
    plan = cache.plan(plan_key)
    if plan is None:
        return None
    with cache.lock(plan["library_key"]):
        part = cache.lookup_part("libraries", plan["library_key"])
    if part is None:
        return None
    progress(f"[{entry.name}] compiled library reused {plan['library_key'][:12]}")
    return plan, part


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


def _weights(
    preset: Preset, params: Params, inputs: dict[str, Any], progress: Progress
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and their source: made once per build (`_start_weights` may have begun
    them), and what making them raised is raised here."""
    _start_weights(preset, params, inputs, progress)
    return inputs["weights"].result()


def _start_weights(
    preset: Preset, params: Params, inputs: dict[str, Any], progress: Progress
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


def _params(
    folder: Path,
    preset: Preset,
    entry: TargetConfig,
    params: Params,
    packing: str,
    library: Path,
    steps: list[dict[str, Any]] | None,
    inputs: dict[str, Any],
    progress: Progress,
) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """Write the parameters `forward` takes into `folder`, packed by `library` (`steps`:
    its packing as steps, or None); their order, their source and the file's record
    (`artifact.save_params`)."""
    # A random init not begun beside a compile is made parameter by parameter as the packing
    # reaches it (`random_init.RandomParams`), never all in memory; it is float32, the dtype
    # the steps then write it in.
    on_demand = steps is not None and preset.weights.is_random and preset.dtype == "float32"
    if on_demand and "weights" not in inputs:
        arrays, source = load_weights(preset, dict(params), on_demand=True)
        progress(f"weights: random init (seed {source['seed']}), made as they are packed")
    else:
        arrays, source = _weights(preset, params, inputs, progress)
        # In the build's dtype before packing: `transform_params` takes what `forward` takes.
        arrays = artifact.cast_params(arrays, preset.dtype)
    t0 = time.perf_counter()
    order, stored = [name for name, _ in params], arrays
    what = "wrote parameters"
    if packing == "build":
        from .packing import pack_params  # TVM's runtime library, not its compiler

        order, stored = pack_params(library, order, arrays, steps)
        if steps is None:
            progress(f"[{entry.name}] packed weights [{time.perf_counter() - t0:.1f} s]")
        else:
            what = "packed weights into the file"  # each packed as the writer reaches it
    written = artifact.save_params(folder, order, stored)
    progress(f"[{entry.name}] {what} [{time.perf_counter() - t0:.1f} s]")
    return order, source, written
