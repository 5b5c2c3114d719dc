"""The inputs of `build encode`: folders, globs, lists of paths, webdataset tars, parquet
files, each turned into a list of `Item`s, and one item's image bytes read and decoded.

Listing happens in the process that plans the run; reading and decoding happen in worker
processes (`decode_batch`), which import numpy, Pillow and `builder.preprocess`, never tvm.
An item carries what a worker needs to find its bytes: a path, or a tar member's offset and
size, or a parquet file's row group and row.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import PreprocessConfig
from .errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# A webdataset sample's image entry, when it has several: the first of these it holds.
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True, slots=True)
class Item:
    """One image of the dataset. `key` names it in the index; `source` says where it came
    from (a path, `TAR#MEMBER`, `PARQUET#ROW`). `kind` is `file`, `tar` or `parquet`:
    a file is read from `path`; a tar member is `size` bytes at `offset` of `path`; a
    parquet image is row `row` of row group `offset` of `path`, column `column`."""

    key: str
    source: str
    kind: str
    path: str
    offset: int = 0
    size: int = 0
    row: int = 0
    column: str = ""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _folder_items(folder: Path) -> list[Item]:
    items = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if is_image_name(name):
                path = Path(root) / name
                key = path.relative_to(folder).as_posix()
                items.append(Item(key, str(path), "file", str(path)))
    if not items:
        raise InputError(
            f"{folder}: no image files in this folder or below "
            f"(looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return items


def _glob_items(pattern: str) -> list[Item]:
    # Keys are relative to the pattern's leading folders without wildcards.
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if GLOB_CHARS.search(part):
            break
        fixed.append(part)
    root = Path(*fixed) if fixed else Path(".")
    paths = sorted(
        p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p) and is_image_name(p)
    )
    items = [Item(Path(p).relative_to(root).as_posix(), p, "file", p) for p in paths]
    if not items:
        raise InputError(f"{pattern}: no image file matches this pattern")
    return items


def _list_items(listing: Path) -> list[Item]:
    items = []
    for line in listing.read_text().splitlines():
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        path = Path(name) if Path(name).is_absolute() else listing.parent / name
        items.append(Item(name, str(path), "file", str(path)))
    if not items:
        raise InputError(f"{listing}: lists no image paths (one path per line)")
    return items


def wds_split(member: str) -> tuple[str, str]:
    """(key, extension) of a tar member as webdataset splits it: the key is the path up to
    the first dot of the file name, the extension all after it (`a/b.seg.jpg` -> `a/b`,
    `seg.jpg`)."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", member)
    if match is None:
        return member, ""
    return match.group(1), match.group(2)


def _tar_items(path: Path) -> list[Item]:
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = wds_split(info.name)
                samples.setdefault(key, {})[ext.rsplit(".", 1)[-1].lower()] = info
    except tarfile.ReadError as e:
        raise InputError(f"{path}: not a tar file (webdataset shards are plain .tar): {e}") from e
    items = []
    for key, entries in samples.items():
        ext = next((e for e in WDS_IMAGE_EXTS if e in entries), None)
        if ext is None:
            continue  # a sample without an image (metadata only)
        info = entries[ext]
        items.append(
            Item(key, f"{path}#{info.name}", "tar", str(path), info.offset_data, info.size)
        )
    if not items:
        raise InputError(f"{path}: no image entries ({', '.join(WDS_IMAGE_EXTS)}) in this tar")
    return items


def _parquet_items(path: Path, column: str | None) -> list[Item]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: not a parquet file: {e}") from e
    schema = file.schema_arrow
    names = schema.names
    if column is None:
        binary = [f.name for f in schema if _image_column_type(f.type) == "bytes"]
        if len(binary) != 1:
            raise InputError(f"{path}: pass --column: one of {names} holding image bytes or paths")
        column = binary[0]
    if column not in names:
        raise InputError(f"{path}: --column {column!r}: no such column; it has {names}")
    kind = _image_column_type(schema.field(column).type)
    if kind is None:
        raise InputError(
            f"{path}: column {column!r} is {schema.field(column).type}: an image column "
            "holds bytes (binary), paths (string), or a struct with 'bytes' or 'path'"
        )
    key_column = next((k for k in ("__key__", "key") if k in names and k != column), None)
    items = []
    for group in range(file.num_row_groups):
        keys = (
            file.read_row_group(group, columns=[key_column]).column(0).to_pylist()
            if key_column
            else None
        )
        for row in range(file.metadata.row_group(group).num_rows):
            index = len(items)
            key = str(keys[row]) if keys else f"{path.name}#{index}"
            items.append(Item(key, f"{path}#{index}", "parquet", str(path), group, 0, row, column))
    if not items:
        raise InputError(f"{path}: no rows")
    return items


def _image_column_type(t: Any) -> str | None:
    import pyarrow as pa

    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "bytes"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "path"
    if pa.types.is_struct(t) and {"bytes", "path"} & {f.name for f in t}:
        return "bytes"  # HF datasets' Image feature: {bytes, path}
    return None


def list_items(inputs: list[str], column: str | None = None) -> list[Item]:
    """Every image the inputs name, in a fixed order (inputs as given; files sorted within a
    folder or glob). Raises `InputError` with one line per bad input, and for keys that two
    inputs share (keys name the rows of the index, so they must be unique)."""
    if not inputs:
        raise InputError("encode: no inputs given")
    items: list[Item] = []
    errors: list[str] = []
    for text in inputs:
        path = Path(text)
        try:
            if path.is_dir():
                items += _folder_items(path)
            elif path.is_file():
                suffix = path.suffix.lower()
                if suffix == ".txt":
                    items += _list_items(path)
                elif suffix == ".tar":
                    items += _tar_items(path)
                elif suffix == ".parquet":
                    items += _parquet_items(path, column)
                elif is_image_name(path.name):
                    items.append(Item(path.name, str(path), "file", str(path)))
                else:
                    raise InputError(
                        f"{path}: not an input kind encode reads: a folder, a glob, a .txt "
                        "list of paths, a webdataset .tar, a .parquet file or an image file"
                    )
            elif GLOB_CHARS.search(text):
                items += _glob_items(text)
            else:
                raise InputError(f"{path}: no such file or folder")
        except InputError as e:
            errors.extend(e.lines)
    if errors:
        raise InputError(errors)
    seen: dict[str, str] = {}
    for item in items:
        if item.key in seen:
            errors.append(
                f"key {item.key!r}: both {seen[item.key]} and {item.source}; keys name the "
                "rows of the index and must be unique (encode such inputs into separate folders)"
            )
            if len(errors) >= 10:
                break
        seen[item.key] = item.source
    if errors:
        raise InputError(errors)
    return items


# --- in the worker processes ----------------------------------------------------------------


def watch_parent(parent: int, every: float = 0.5) -> None:
    """A worker's initializer: exit when the process that started it is gone. A killed
    (SIGKILL) encoder cannot stop its pool, and an idle worker would wait for work forever."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


_row_group_cache: dict[tuple[str, int, str], Any] = {}


def read_bytes(item: Item) -> bytes | str:
    """The item's encoded image bytes, or (a file, or a parquet path column) its path."""
    if item.kind == "file":
        return item.path
    if item.kind == "tar":
        with open(item.path, "rb") as f:
            f.seek(item.offset)
            data = f.read(item.size)
        if len(data) != item.size:
            raise InputError(f"{item.source}: the tar is shorter than its member")
        return data
    cache_key = (item.path, item.offset, item.column)
    column = _row_group_cache.get(cache_key)
    if column is None:
        import pyarrow.parquet as pq

        # One row group per worker at a time: a batch reads its rows from one group.
        _row_group_cache.clear()
        table = pq.ParquetFile(item.path).read_row_group(item.offset, columns=[item.column])
        column = _row_group_cache[cache_key] = table.column(0)
    value = column[item.row].as_py()
    if isinstance(value, dict):  # {bytes, path}
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise InputError(f"{item.source}: column {item.column!r} is null")
    if isinstance(value, str):
        path = Path(value)
        return str(path if path.is_absolute() else Path(item.path).parent / path)
    return bytes(value)


def decode(item: Item) -> Any:
    """The item's image, opened and fully decoded (a PIL image); `InputError` naming the
    source if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    from . import preprocess

    data = read_bytes(item)
    if isinstance(data, str):
        return preprocess.load_image(data)
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise InputError(f"{item.source}: not an image Pillow can read") from e
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{item.source}: cannot decode the image: {e}") from e
    return img


@dataclass
class Decoded:
    """A batch of items decoded: pixels of the ones that worked, (n_ok, 3, H, W) float32,
    and for every item its original width and height and its error (None when decoded)."""

    pixels: np.ndarray
    sizes: list[tuple[int, int] | None]
    errors: list[str | None]


def decode_batch(
    items: list[Item], steps: PreprocessConfig, shape: tuple[int, int, int]
) -> Decoded:
    """Read, decode and preprocess `items` with `builder.preprocess` (the same function
    `Encoder.encode_images` applies) into pixels of `shape` (C, H, W), the artifact's input.
    An image that fails gets its error; the rest go on."""
    from . import preprocess

    rows, sizes, errors = [], [], []
    for item in items:
        try:
            img = decode(item)
            size = (img.width, img.height)
            pixels = preprocess.preprocess(img, steps, item.source)
            if pixels.shape != shape:
                raise InputError(
                    f"{item.source}: preprocessed to {pixels.shape}, the artifact takes {shape}"
                )
            rows.append(pixels)
        except InputError as e:
            sizes.append(None)
            errors.append(" ".join(e.lines))
            continue
        except Exception as e:  # any decoder failure is this image's, never the run's
            sizes.append(None)
            errors.append(f"{item.source}: {type(e).__name__}: {e}")
            continue
        sizes.append(size)
        errors.append(None)
    pixels = np.stack(rows) if rows else np.zeros((0, *shape), np.float32)
    return Decoded(pixels, sizes, errors)
