"""`build encode`: a dataset of images through an artifact into feature shards and an index.

The items (`encode_inputs.list_items`) are cut into shards of `shard_size` consecutive
items; shard j is `shard-0000j.npy`, float32 (n_ok, tokens, dim), its rows the items of the
shard that were encoded, in order. A shard is written to a `.tmp` file row by row as
batches come back (memory holds a few batches, never a shard) and renamed into place when
complete; then its part of the index goes to `parts/shard-0000j.parquet`, also renamed into
place, which marks the shard done. A rerun keeps the done shards and encodes the rest, so the
result equals an uninterrupted run's. `index.parquet` (all parts, in order) and
`encode.json` (what made the folder, and the counts) are rewritten at the end.

Engines: `local` decodes and preprocesses in worker processes (`encode_inputs.decode_batch`,
which never imports tvm) while this process runs the artifact; `ray` runs the same steps
as a Ray Data pipeline (`encode_ray`). Both feed `ShardWriter`s through `write_results`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import artifact
from .encode_inputs import Item, list_items
from .errors import BuilderError, InputError

RECORD = "encode.json"
INDEX = "index.parquet"
PARTS = "parts"
FORMAT = 1
ENGINES = ("local", "ray")

# (done, total, failed): images handled so far (resumed shards included), of all, failed.
Progress = Callable[[int, int, int], None]


@dataclass
class EncodeRequest:
    artifact: Path
    inputs: list[str]
    out: Path
    shard_size: int = 1000
    batch: int = 8
    workers: int | None = None
    threads: int | None = None
    column: str | None = None
    engine: str = "local"
    address: str | None = None


@dataclass
class Plan:
    """What a run does: the items, their shards, which shards are still to do."""

    req: EncodeRequest
    items: list[Item]
    manifest: dict[str, Any]
    record: dict[str, Any]
    pending: list[int] = field(default_factory=list)
    # Local engine: seconds spent waiting for decoded batches, and in the artifact. Where
    # a run falls short of the artifact's own speed, these say which side held it back.
    timings: dict[str, float] = field(
        default_factory=lambda: {"waiting_for_decoding_s": 0.0, "encoding_s": 0.0}
    )

    @property
    def shards(self) -> int:
        return -(-len(self.items) // self.req.shard_size)

    def shard_range(self, j: int) -> range:
        size = self.req.shard_size
        return range(j * size, min((j + 1) * size, len(self.items)))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["inputs"][0]["shape"][1:])  # type: ignore[return-value]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["outputs"][0]["shape"][1:])


def shard_name(j: int) -> str:
    return f"shard-{j:05d}.npy"


def default_workers(cores: int) -> int:
    """Decoding processes: a quarter of the cores, at least one."""
    return max(1, cores // 4)


def _check(req: EncodeRequest) -> None:
    errors = []
    for flag in ("shard_size", "batch"):
        if getattr(req, flag) < 1:
            errors.append(f"--{flag.replace('_', '-')} {getattr(req, flag)}: must be at least 1")
    if req.workers is not None and req.workers < 0:
        errors.append(f"--workers {req.workers}: must be 0 (decode in this process) or more")
    if req.threads is not None and req.threads < 1:
        errors.append(f"--threads {req.threads}: must be at least 1")
    if req.engine not in ENGINES:
        errors.append(f"--engine {req.engine!r}: must be one of {list(ENGINES)}")
    if req.address is not None and req.engine != "ray":
        errors.append("--address: only with --engine ray")
    if req.out.exists() and not req.out.is_dir():
        errors.append(f"--out {req.out}: is a file; encode writes a folder of shards")
    if errors:
        raise InputError(errors)


def artifact_id(manifest: dict[str, Any]) -> str:
    """What makes the features: the artifact's files (by sha256) and its preprocessing."""
    what = {
        "files": {n: f.get("sha256") for n, f in sorted(manifest.get("files", {}).items())},
        "preprocess": manifest.get("preprocess"),
        "entry": manifest.get("entry"),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def inputs_id(items: list[Item]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.key}\0{item.source}\n".encode())
    return digest.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def plan(req: EncodeRequest) -> Plan:
    """Check the request, list the items, and prepare `req.out`: a new folder, or one this
    same job left (same artifact, same inputs, same shard size), whose done shards are kept.
    Any other folder is refused with an `InputError`."""
    _check(req)
    try:
        manifest = artifact.read_manifest(req.artifact.resolve())
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from e
    if "preprocess" not in manifest:
        raise InputError(f"{req.artifact}: the manifest records no preprocessing; rebuild it")
    from .crops import scheme
    from .preprocess import steps_from_manifest

    if scheme(steps_from_manifest(manifest)):
        raise InputError(
            f"{req.artifact}: its images have variable token counts (the crop scheme "
            f"{scheme(steps_from_manifest(manifest))!r} of its preprocess) and shards hold "
            "fixed-size rows; use `build run` or Encoder.encode_images"
        )
    items = list_items(req.inputs, req.column)
    record = {
        "format": FORMAT,
        "artifact": str(req.artifact),
        "artifact_id": artifact_id(manifest),
        "preset": manifest.get("preset"),
        "weights": manifest.get("weights", {}).get("kind"),
        "inputs": list(req.inputs),
        "inputs_id": inputs_id(items),
        "shard_size": req.shard_size,
        "images": len(items),
        "features": {"dtype": "float32", "row_shape": list(manifest["outputs"][0]["shape"][1:])},
        "state": "running",
    }
    p = Plan(req, items, manifest, record)
    _prepare_out(p)
    p.pending = [j for j in range(p.shards) if not _shard_done(req.out, j)]
    return p


def _prepare_out(p: Plan) -> None:
    out = p.req.out
    old_path = out / RECORD
    # A run killed while writing its first record leaves only that record's .tmp.
    left = [e for e in out.iterdir() if e.name != RECORD + ".tmp"] if out.is_dir() else []
    if left and not old_path.exists():
        raise InputError(
            f"--out {out}: a folder that holds no {RECORD}, so not an encode output; "
            "give a new or empty folder"
        )
    if old_path.exists():
        try:
            old = json.loads(old_path.read_text())
        except ValueError as e:
            raise InputError(f"{old_path}: not JSON: {e}") from e
        for name, what in (
            ("artifact_id", "artifact"),
            ("inputs_id", "input set"),
            ("shard_size", "shard size"),
        ):
            if old.get(name) != p.record[name]:
                was = {
                    "artifact_id": f"artifact {old.get('artifact')} (preset {old.get('preset')})",
                    "inputs_id": f"inputs {old.get('inputs')} ({old.get('images')} images)",
                    "shard_size": f"--shard-size {old.get('shard_size')}",
                }[name]
                raise InputError(
                    f"--out {out}: holds features of another {what} ({was}); "
                    "resume with the same arguments, or give another --out"
                )
    out.mkdir(parents=True, exist_ok=True)
    _write_json(old_path, p.record)  # first: it makes the folder an encode output
    (out / PARTS).mkdir(exist_ok=True)
    for stray in [*out.glob("*.tmp"), *(out / PARTS).glob("*.tmp")]:
        stray.unlink()  # a killed run's unfinished shard


def _shard_done(out: Path, j: int) -> bool:
    part = out / PARTS / shard_name(j).replace(".npy", ".parquet")
    return part.exists() and (out / shard_name(j)).exists()


# --- writing ---------------------------------------------------------------------------------


def _npy_header(shape: tuple[int, ...], length: int | None = None) -> bytes:
    """An .npy (version 1.0) header for float32 C-order `shape`, padded to `length` bytes
    (so a header for fewer rows can overwrite the first one in place)."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    if length is None:
        length = 10 + len(text) + 1 + 32  # room for any shorter or longer row count
        length += -length % 64
    body = text + " " * (length - 10 - len(text) - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


class ShardWriter:
    """One shard's .npy, written row by row to `NAME.tmp`, renamed into place by `finish`."""

    def __init__(self, path: Path, capacity: int, row_shape: tuple[int, ...]):
        self.path, self.row_shape = path, row_shape
        self.tmp = path.with_name(path.name + ".tmp")
        self.file = self.tmp.open("wb")
        self.header_len = len(_npy_header((capacity, *row_shape)))
        self.file.write(_npy_header((capacity, *row_shape)))
        self.rows = 0

    def add(self, features: np.ndarray) -> None:
        if features.shape[1:] != self.row_shape or features.dtype != np.float32:
            raise ValueError(
                f"features {features.shape} {features.dtype}, expected (n, "
                f"{', '.join(map(str, self.row_shape))}) float32"
            )
        self.file.write(memoryview(np.ascontiguousarray(features)).cast("B"))
        self.rows += len(features)

    def finish(self) -> None:
        self.file.seek(0)
        self.file.write(_npy_header((self.rows, *self.row_shape), self.header_len))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)


INDEX_COLUMNS = ("key", "source", "shard", "row", "error", "width", "height", "tokens")


def _index_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("source", pa.string()),
            ("shard", pa.string()),
            ("row", pa.int64()),
            ("error", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("tokens", pa.int64()),
        ]
    )


def _write_table(path: Path, rows: dict[str, list[Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(rows, schema=_index_schema()), tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Chunk:
    """Results for the items at `indices` (into the plan's items, in order): features of the
    ones encoded (rows in order), and each item's original size and error."""

    indices: list[int]
    features: np.ndarray
    sizes: list[tuple[int, int] | None]
    errors: list[str | None]


def write_results(p: Plan, chunks: Iterator[Chunk], progress: Progress | None = None) -> None:
    """Write the pending shards from `chunks`, which must cover exactly their items, in
    order (a chunk may span shards). Each shard is renamed into place when its last item
    arrives, then its index part."""
    tokens = p.row_shape[0] if len(p.row_shape) == 2 else 1
    expected = (i for j in p.pending for i in p.shard_range(j))
    total = len(p.items)
    done = total - sum(len(p.shard_range(j)) for j in p.pending)
    failed = _failed_in_parts(p, sorted(set(range(p.shards)) - set(p.pending)))
    if progress:
        progress(done, total, failed)
    writer: ShardWriter | None = None
    rows: dict[str, list[Any]] = {}
    for chunk in chunks:
        if not len(chunk.indices) == len(chunk.sizes) == len(chunk.errors):
            raise RuntimeError("a chunk of results with lists of different lengths")
        ok = [k for k, e in enumerate(chunk.errors) if e is None]
        if len(ok) != len(chunk.features):
            raise RuntimeError(f"{len(chunk.features)} feature rows for {len(ok)} images")
        feature_row = 0
        for index, size, error in zip(chunk.indices, chunk.sizes, chunk.errors, strict=True):
            want = next(expected, None)
            if index != want:
                raise RuntimeError(f"results out of order: item {index}, expected {want}")
            j = index // p.req.shard_size
            shard = p.shard_range(j)
            if writer is None:
                writer = ShardWriter(p.req.out / shard_name(j), len(shard), p.row_shape)
                rows = {c: [] for c in INDEX_COLUMNS}
            item = p.items[index]
            rows["key"].append(item.key)
            rows["source"].append(item.source)
            rows["error"].append(error)
            encoded = error is None
            rows["shard"].append(shard_name(j) if encoded else None)
            rows["row"].append(writer.rows if encoded else None)
            rows["tokens"].append(tokens if encoded else None)
            rows["width"].append(size[0] if size else None)
            rows["height"].append(size[1] if size else None)
            if encoded:
                writer.add(chunk.features[feature_row : feature_row + 1])
                feature_row += 1
            else:
                failed += 1
            if index == shard.stop - 1:
                writer.finish()
                _write_table(_part(p, j), rows)
                writer = None
        done += len(chunk.indices)
        if progress:
            progress(done, total, failed)
    missing = next(expected, None)
    if missing is not None:
        raise RuntimeError(f"the results stopped before item {missing}")


def _part(p: Plan, j: int) -> Path:
    return p.req.out / PARTS / shard_name(j).replace(".npy", ".parquet")


def _failed_in_parts(p: Plan, shards: list[int]) -> int:
    import pyarrow.parquet as pq

    failed = 0
    for j in shards:
        table = pq.read_table(_part(p, j))
        failed += len(table) - table["error"].null_count
    return failed


def finish(p: Plan, engine: str, seconds: float) -> dict[str, Any]:
    """Join the parts into index.parquet and complete the record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [pq.read_table(_part(p, j)) for j in range(p.shards)]
    table = pa.concat_tables(parts)
    tmp = p.req.out / (INDEX + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, p.req.out / INDEX)
    failed = len(table) - table["error"].null_count
    p.record.update(
        state="done",
        engine=engine,
        shards=p.shards,
        encoded=len(table) - failed,
        failed=failed,
        resumed_shards=p.shards - len(p.pending),
        seconds=round(seconds, 3),
    )
    _write_json(p.req.out / RECORD, p.record)
    return p.record


# --- the local engine ------------------------------------------------------------------------


def _tasks(p: Plan) -> Iterator[tuple[int, list[Item]]]:
    """(first item index, items) batches of the pending shards, never across a shard."""
    for j in p.pending:
        shard = p.shard_range(j)
        for start in range(shard.start, shard.stop, p.req.batch):
            stop = min(start + p.req.batch, shard.stop)
            yield start, p.items[start:stop]


def local_chunks(p: Plan, encoder: Any, workers: int) -> Iterator[Chunk]:
    """Decode in `workers` processes (0: in this one) a few batches ahead of the encoder."""
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor

    from .encode_inputs import decode_batch, watch_parent
    from .preprocess import steps_from_manifest

    steps = steps_from_manifest(p.manifest)
    shape = p.image_shape
    tasks = _tasks(p)
    timings = p.timings
    if workers == 0:
        for start, items in tasks:
            t0 = time.perf_counter()
            d = decode_batch(items, steps, shape)
            timings["waiting_for_decoding_s"] += time.perf_counter() - t0
            yield Chunk(
                list(range(start, start + len(items))),
                _encode(p, encoder, d.pixels),
                d.sizes,
                d.errors,
            )
        return
    # spawn: the workers start clean (this process holds TVM's threads), importing numpy,
    # Pillow and builder.preprocess only.
    context = multiprocessing.get_context("spawn")
    ahead = 2 * workers + 1  # batches decoded or decoding while one is encoded
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=watch_parent, initargs=(os.getpid(),)
    ) as pool:
        inflight: deque[tuple[int, int, Future[Any]]] = deque()
        try:
            for start, items in tasks:
                future = pool.submit(decode_batch, items, steps, shape)
                inflight.append((start, len(items), future))
                if len(inflight) > ahead:
                    yield _encoded(p, encoder, *inflight.popleft())
            while inflight:
                yield _encoded(p, encoder, *inflight.popleft())
        finally:
            for _, _, future in inflight:
                future.cancel()


def _encoded(p: Plan, encoder: Any, start: int, n: int, future: Any) -> Chunk:
    from concurrent.futures.process import BrokenProcessPool

    t0 = time.perf_counter()
    try:
        d = future.result()
    except BrokenProcessPool as e:
        raise BuilderError(
            "a decoding worker process died: a decoder crashed on one of images "
            f"{start}-{start + n - 1} of the listing, or the worker could not "
            "start (a script calling encode_dataset needs `if __name__ == '__main__':`, as "
            "any code using multiprocessing's spawn); done shards are kept"
        ) from e
    p.timings["waiting_for_decoding_s"] += time.perf_counter() - t0
    indices = list(range(start, start + len(d.errors)))
    return Chunk(indices, _encode(p, encoder, d.pixels), d.sizes, d.errors)


def _encode(p: Plan, encoder: Any, pixels: np.ndarray) -> np.ndarray:
    if len(pixels) == 0:
        return np.zeros((0, *encoder.output_shape[1:]), np.float32)
    t0 = time.perf_counter()
    features = encoder(pixels)
    p.timings["encoding_s"] += time.perf_counter() - t0
    return features


def _threads_and_workers(req: EncodeRequest) -> tuple[int | None, int]:
    """Workers and TVM threads share the cores: by default the artifact gets the cores the
    workers leave (unless TVM_NUM_THREADS says otherwise)."""
    from .runtime import THREADS_ENV, available_cores

    cores = available_cores()
    workers = default_workers(cores) if req.workers is None else req.workers
    threads = req.threads
    if threads is None and THREADS_ENV not in os.environ:
        threads = max(1, cores - workers)
    return threads, workers


def encode_dataset(
    artifact: str | Path,
    inputs: list[str] | str,
    out: str | Path,
    *,
    shard_size: int = 1000,
    batch: int = 8,
    workers: int | None = None,
    threads: int | None = None,
    column: str | None = None,
    engine: str = "local",
    address: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Encode every image of `inputs` (folders, globs, .txt lists, webdataset .tar shards,
    .parquet files) with the artifact into feature shards and `index.parquet` in `out`.

    Resumes what a killed run with the same arguments left in `out`. An image that cannot
    be read gets an index row with its error; the run goes on. Returns the record written to
    `out/encode.json` (counts included). Bad arguments are an `InputError`."""
    req = EncodeRequest(
        Path(artifact),
        [inputs] if isinstance(inputs, str) else list(inputs),
        Path(out),
        shard_size,
        batch,
        workers,
        threads,
        column,
        engine,
        address,
    )
    return run(req, progress)


def run(req: EncodeRequest, progress: Progress | None = None) -> dict[str, Any]:
    p = plan(req)
    t0 = time.perf_counter()
    if req.engine == "ray":
        from .encode_ray import ray_chunks

        write_results(p, ray_chunks(p), progress)
    elif p.pending:
        from .runtime import Encoder

        threads, workers = _threads_and_workers(req)
        try:
            encoder = Encoder(req.artifact, threads=threads)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(str(e)) from e
        p.record.update(workers=workers, threads=encoder.threads)
        write_results(p, local_chunks(p, encoder, workers), progress)
        p.record["timings"] = {k: round(v, 3) for k, v in p.timings.items()}
    else:
        write_results(p, iter(()), progress)
    return finish(p, req.engine, time.perf_counter() - t0)
