"""`build encode --engine ray`: the local engine's job as a Ray Data pipeline.

    items of the pending shards -> map_batches(decode)       Ray tasks, 1 CPU each
                                -> map_batches(EncodeActor)   an actor pool, each actor one
                                                              loaded artifact
                                -> iter_batches, in order     this process writes the shards

The decode step is `encode_inputs.decode_batch`, the local engine's, and the results go
through the same `encode.write_results`, so the shards and the index equal the local
engine's. Rows come back in item order (`preserve_order`). The output folder is written by
this process (the driver): the features travel through Ray's object store to it. The
artifact folder and the inputs must be at the same paths on every node (shared storage, or
copied to each).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from .encode import Chunk, Plan
from .encode_inputs import Item, decode_batch
from .errors import InputError

ITEM_FIELDS = [f.name for f in dataclasses.fields(Item)]


def _decode(batch: dict[str, np.ndarray], steps: dict[str, Any], shape: list[int]) -> dict:
    """A Ray Data batch of items -> pixels (zeros where an image failed) and each item's
    size and error ("" when decoded)."""
    from .config import PreprocessConfig

    n = len(batch["index"])
    items = [Item(**{f: _py(batch[f][i]) for f in ITEM_FIELDS}) for i in range(n)]
    decoded = decode_batch(items, PreprocessConfig(**steps), tuple(shape))
    ok = np.array([e is None for e in decoded.errors], bool)
    pixels = np.zeros((n, *shape), np.float32)
    pixels[ok] = decoded.pixels
    return {
        "index": batch["index"],
        "pixels": pixels,
        "ok": ok,
        "width": np.array([s[0] if s else -1 for s in decoded.sizes], np.int64),
        "height": np.array([s[1] if s else -1 for s in decoded.sizes], np.int64),
        "error": np.array([e or "" for e in decoded.errors], object),
    }


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


class EncodeActor:
    """Holds one loaded artifact; encodes the decoded images of each batch."""

    def __init__(self, artifact: str, threads: int):
        from .runtime import Encoder

        self.encoder = Encoder(artifact, threads=threads)
        self.row_shape = tuple(self.encoder.output_shape[1:])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["ok"].astype(bool)
        features = np.zeros((len(ok), *self.row_shape), np.float32)
        if ok.any():
            features[ok] = self.encoder(np.ascontiguousarray(batch["pixels"][ok]))
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["features"] = features
        return out


def ray_chunks(p: Plan) -> Iterator[Chunk]:
    """The pending shards' results from a Ray Data pipeline on the cluster at
    `p.req.address` (a local one when None; an already initialized Ray is used as it is)."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise InputError(
            "--engine ray: Ray is not installed; pip install 'clip-tvm-builder[ray]'"
        ) from e
    from .preprocess import steps_from_manifest

    indices = [i for j in p.pending for i in p.shard_range(j)]
    if not indices:
        return
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=p.req.address)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise InputError(f"--address {p.req.address}: cannot connect to Ray: {e}") from e
    try:
        actors, threads = p.req.workers or 1, p.req.threads or 1
        cpus = ray.cluster_resources().get("CPU", 0)
        if actors * threads >= cpus:
            # Ray would wait forever for a CPU to decode on.
            raise InputError(
                f"--workers {actors} x --threads {threads}: the encoder actors would take "
                f"{actors * threads} of the cluster's {cpus:g} CPUs, leaving none for decoding"
            )
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        rows = [{"index": i, **{f: getattr(p.items[i], f) for f in ITEM_FIELDS}} for i in indices]
        batch = p.req.batch
        ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // (4 * batch))))
        ds = ds.map_batches(
            _decode,
            batch_size=batch,
            batch_format="numpy",
            fn_kwargs={
                "steps": dataclasses.asdict(steps_from_manifest(p.manifest)),
                "shape": list(p.image_shape),
            },
            num_cpus=1,
            # A worker process with numpy and Pillow loaded, and a batch's pixels twice over
            # (decoded and stacked); Ray Data's memory report is the check. This also
            # keeps the decode tasks apart: with the actors' resources Ray Data would fuse
            # them into the encoder actors, which would then decode and encode in turn.
            memory=(192 << 20) + 8 * batch * int(np.prod(p.image_shape)),
        )
        ds = ds.map_batches(
            EncodeActor,
            batch_size=batch,
            batch_format="numpy",
            fn_constructor_kwargs={
                "artifact": str(p.req.artifact.resolve()),
                "threads": threads,
            },
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=threads,
        )
        for b in ds.iter_batches(batch_size=batch, batch_format="numpy", prefetch_batches=2):
            ok = b["ok"].astype(bool)
            yield Chunk(
                [int(i) for i in b["index"]],
                np.ascontiguousarray(b["features"][ok], np.float32),
                [
                    (int(w), int(h)) if w >= 0 else None
                    for w, h in zip(b["width"], b["height"], strict=True)
                ],
                [str(e) or None for e in b["error"]],
            )
    finally:
        if started:
            ray.shutdown()
