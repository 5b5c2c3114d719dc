"""`build encode` / `builder.encode_dataset`: every input kind against `Encoder.encode_images`
on the same file, bad images as error rows, a run killed with SIGKILL then resumed, and the
arguments it refuses."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

import builder
from builder.build import build
from builder.cli import main
from builder.encode_inputs import wds_split
from builder.preset import load_preset
from builder.runtime import load

from .conftest import REPO, tiny_overrides
from .test_preprocess import photo

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def encode_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny random-weight artifact for the encode tests, from the session's build cache
    (conftest's `shared_cache`): another worker or module asking for it gets a cache hit."""
    base = tmp_path_factory.getbasetemp()
    (built,) = build(load_preset("clip-vit-b-32", tiny_overrides()), base / "encode-art")
    return built.path


def save(img, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images of every extension a folder input reads, of different sizes, in subfolders,
    and a file that is not an image (not listed)."""
    root = tmp_path_factory.mktemp("tree")
    save(photo(64, 48, "RGB", 1), root / "a.jpg", quality=90)
    save(photo(40, 70, "RGBA", 2), root / "sub" / "b.png")
    save(photo(30, 30, "RGB", 3), root / "sub" / "deeper" / "c.webp")
    save(photo(50, 35, "RGB", 4), root / "d.bmp")
    save(photo(33, 45, "P", 5), root / "sub" / "e.gif")
    save(photo(45, 33, "L", 6), root / "f.tiff")
    (root / "notes.txt").write_text("not an image")
    return root


def jpeg_bytes(seed: int, w: int = 48, h: int = 36) -> bytes:
    buf = io.BytesIO()
    photo(w, h, "RGB", seed).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def png_bytes(seed: int, w: int = 31, h: int = 52) -> bytes:
    buf = io.BytesIO()
    photo(w, h, "RGBA", seed).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_parquet(path: Path, columns: dict[str, list], row_group_size: int = 2) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def input_kind(kind: str, tree: Path, tmp: Path) -> tuple[list[str], dict, dict[str, Path]]:
    """(inputs, encode_dataset options, {key: an image file holding that key's bytes})."""
    files = {p.relative_to(tree).as_posix(): p for p in tree.rglob("*") if p.suffix != ".txt"}
    files = {k: v for k, v in files.items() if v.is_file()}
    if kind == "folder":
        return [str(tree)], {}, files
    if kind == "glob":
        pattern = str(tree / "**" / "*.*")
        return [pattern], {}, files
    if kind == "txt":
        listing = tmp / "list.txt"
        # An absolute path, a comment, a blank line, a path relative to the list's folder.
        rel = Path(os.path.relpath(tree, tmp)) / "sub" / "b.png"
        listing.write_text(f"# images\n{tree / 'a.jpg'}\n\n{rel}\n")
        return (
            [str(listing)],
            {},
            {
                str(tree / "a.jpg"): tree / "a.jpg",
                str(rel): tree / "sub" / "b.png",
            },
        )
    if kind == "tar":
        members = {
            "s000.jpg": jpeg_bytes(1),
            "s000.json": b"{}",
            "s001.png": png_bytes(2),
            "dir/s002.seg.webp": (tree / "sub" / "deeper" / "c.webp").read_bytes(),
            "s003.txt": b"a caption, no image",
            "s004.json": b"{}",
            "s004.png": png_bytes(4, 60, 20),
            "s004.jpg": jpeg_bytes(5),  # both: the jpg is the image entry
        }
        tar = write_tar(tmp / "shard-000.tar", members)
        ext = {"s000": "jpg", "s001": "png", "dir/s002": "seg.webp", "s004": "jpg"}
        return (
            [str(tar)],
            {},
            {k: extract(tmp, f"{k}.{e}", members[f"{k}.{e}"]) for k, e in ext.items()},
        )
    if kind == "parquet-bytes":
        blobs = [jpeg_bytes(7), png_bytes(8), jpeg_bytes(9, 70, 40)]
        pq = write_parquet(tmp / "images.parquet", {"__key__": ["x", "y", "z"], "jpg": blobs})
        names = ["x.jpg", "y.png", "z.jpg"]
        return (
            [str(pq)],
            {},
            {k: extract(tmp, n, b) for k, n, b in zip("xyz", names, blobs, strict=True)},
        )
    if kind == "parquet-struct":  # HF datasets' Image feature, one row group
        blobs = [png_bytes(10), jpeg_bytes(11)]
        rows = [{"bytes": b, "path": f"x{i}.png"} for i, b in enumerate(blobs)]
        pq = write_parquet(tmp / "hf.parquet", {"image": rows, "label": [3, 4]}, 10)
        keys = [f"hf.parquet#{i}" for i in range(2)]
        return (
            [str(pq)],
            {},
            {
                k: extract(tmp, f"{i}.img", b)
                for i, (k, b) in enumerate(zip(keys, blobs, strict=True))
            },
        )
    if kind == "parquet-path":
        paths = ["a.jpg", str(tree / "sub" / "b.png"), "d.bmp"]
        pq = write_parquet(tmp / "paths.parquet", {"path": paths})
        # Relative paths are relative to the parquet file's folder.
        shutil.copy(tree / "a.jpg", tmp / "a.jpg")
        shutil.copy(tree / "d.bmp", tmp / "d.bmp")
        keys = [f"{pq.name}#{i}" for i in range(3)]
        refs = [tree / "a.jpg", tree / "sub" / "b.png", tree / "d.bmp"]
        return [str(pq)], {"column": "path"}, dict(zip(keys, refs, strict=True))
    raise AssertionError(kind)


def extract(folder: Path, name: str, data: bytes) -> Path:
    path = folder / "extracted" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read_index(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(out / "index.parquet").to_pylist()


def features_of(out: Path, row: dict) -> np.ndarray:
    return np.load(out / row["shard"])[row["row"]]


@pytest.mark.parametrize(
    "kind", ["folder", "glob", "txt", "tar", "parquet-bytes", "parquet-struct", "parquet-path"]
)
def test_every_input_kind_equals_encode_images(kind, encode_artifact, image_tree, tmp_path):
    from PIL import Image

    inputs, options, refs = input_kind(kind, image_tree, tmp_path)
    out = tmp_path / "out"
    seen = []
    record = builder.encode_dataset(
        encode_artifact,
        inputs,
        out,
        shard_size=2,
        batch=2,
        workers=1,
        progress=lambda *a: seen.append(a),
        **options,
    )
    rows = read_index(out)
    assert sorted(r["key"] for r in rows) == sorted(refs)
    assert record["images"] == record["encoded"] == len(refs) and record["failed"] == 0
    assert record["shards"] == -(-len(refs) // 2) and record["state"] == "done"
    assert seen[0] == (0, len(refs), 0) and seen[-1] == (len(refs), len(refs), 0)
    assert json.loads((out / "encode.json").read_text()) == record
    enc = load(encode_artifact)
    for i, row in enumerate(rows):
        assert row["error"] is None
        assert (row["shard"], row["row"]) == (f"shard-{i // 2:05d}.npy", i % 2)
        ref = enc.encode_images([refs[row["key"]]])[0]
        np.testing.assert_array_equal(features_of(out, row), ref, err_msg=row["key"])
        with Image.open(refs[row["key"]]) as img:
            assert (row["width"], row["height"]) == img.size
        assert row["tokens"] == ref.shape[0] == 10  # CLS and 3 x 3 patches
    for shard in out.glob("shard-*.npy"):
        assert np.load(shard).dtype == np.float32


def corrupt_inputs(folder: Path) -> tuple[list[str], set[str]]:
    """A folder and a tar, each with good and bad images; returns the inputs and the keys
    that must fail."""
    save(photo(40, 30, "RGB", 1), folder / "good.jpg", quality=90)
    full = jpeg_bytes(2, 120, 90)
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "text.png").write_text("not a png")
    (folder / "empty.webp").write_bytes(b"")
    save(photo(30, 40, "RGB", 3), folder / "z-good.png")
    tar = write_tar(
        folder.parent / "mixed.tar",
        {"t0.png": png_bytes(4), "t1.jpg": b"\xff\xd8garbage", "t2.jpg": jpeg_bytes(5)},
    )
    bad = {"truncated.jpg", "text.png", "empty.webp", "t1"}
    return [str(folder), str(tar)], bad


def test_bad_images_become_error_rows_and_strict_exits_1(encode_artifact, tmp_path, capsys):
    inputs, bad = corrupt_inputs(tmp_path / "imgs")
    out = tmp_path / "out"
    args = ["encode", str(encode_artifact), *inputs, "--shard-size", "3", "--workers", "1"]
    assert main([*args, "--out", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    # Not a terminal: progress as lines, every 10 s and at the end.
    progress = [line for line in err if line.startswith("encoded ")]
    assert progress and progress[-1].startswith("encoded 8/8 images, 4 failed, ")
    assert progress[-1].endswith(" images/s, ETA 0 s")
    assert "8 images: 4 encoded, 4 failed, 0 of 3 shards kept from an earlier run" in err
    rows = read_index(out)
    assert {r["key"] for r in rows if r["error"]} == bad
    enc = load(encode_artifact)
    for row in rows:
        if row["error"] is None:
            assert row["shard"] and row["row"] is not None and row["width"] > 0
            continue
        assert row["shard"] is row["row"] is row["width"] is row["tokens"] is None
        assert row["error"].startswith(row["source"]), row["error"]
    messages = {r["key"]: r["error"] for r in rows}
    assert messages["text.png"].endswith("not an image Pillow can read")
    assert "cannot decode the image" in messages["truncated.jpg"]
    good = [r for r in rows if r["key"] in ("good.jpg", "z-good.png")]
    np.testing.assert_array_equal(
        np.stack([features_of(out, r) for r in good]),
        enc.encode_images([tmp_path / "imgs" / r["key"] for r in good]),
    )
    # Shard 0 holds empty.webp, good.jpg, text.png: one row.
    assert np.load(out / "shard-00000.npy").shape == (1, 10, 32)
    record = json.loads((out / "encode.json").read_text())
    assert (record["encoded"], record["failed"]) == (4, 4)
    assert main([*args, "--out", str(tmp_path / "strict"), "--strict", "--quiet"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "--strict: 4 images failed (the error column of index.parquet)"
    assert not [line for line in err if line.startswith("encoded ")]  # --quiet
    assert read_index(tmp_path / "strict") == rows


def children(pid: int) -> list[int]:
    """The processes `pid`'s threads started (Linux)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(c) for c in task.read_text().split()]
    return found


def cli_command(art: Path, folder: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "builder",
        "encode",
        str(art),
        str(folder),
        "--out",
        str(out),
        "--shard-size",
        "2",
        "--batch",
        "1",
        "--workers",
        "1",
        "--threads",
        "1",
        "--quiet",
    ]


@pytest.mark.parametrize("moment", ["shard-00000.npy", "parts/shard-00000.parquet"])
def test_sigkill_after_the_first_shard_then_resume_equals_an_uninterrupted_run(
    moment, encode_artifact, tmp_path
):
    """Killed once the first shard's features are in place (its index part perhaps not yet
    written), or once the shard is done (its part written): the rerun equals a whole run."""
    folder = tmp_path / "imgs"
    save(photo(40, 30, "RGB", 1), folder / "a0.jpg", quality=90)
    save(photo(30, 40, "RGB", 2), folder / "a1.png")
    (folder / "a2-bad.png").write_text("broken")
    # Slow to decode, so the kill lands while later shards are still to do.
    big = save(photo(1600, 1600, "RGB", 3), folder / "b00.jpg", quality=95)
    for i in range(1, 10):
        shutil.copy(big, folder / f"b{i:02d}.jpg")
    out = tmp_path / "killed"
    proc = subprocess.Popen(cli_command(encode_artifact, folder, out), cwd=REPO)
    deadline = time.monotonic() + 120
    while not (out / moment).exists():
        assert proc.poll() is None, "the run ended before its first shard was seen"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    workers = children(proc.pid)
    assert workers, "no decoding worker seen"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "index.parquet").exists(), "killed too late: the run had finished"
    written = sorted(p.name for p in out.glob("shard-*.npy"))
    assert "shard-00006.npy" not in written
    # The workers notice that their parent is gone and exit.
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() for w in workers):
        assert time.monotonic() < deadline, f"workers {workers} outlived the killed run"
        time.sleep(0.05)
    # The same command again, then an uninterrupted run to compare with.
    subprocess.run(cli_command(encode_artifact, folder, out), cwd=REPO, check=True)
    whole = tmp_path / "whole"
    builder.encode_dataset(encode_artifact, [str(folder)], whole, shard_size=2, workers=0)
    record = json.loads((out / "encode.json").read_text())
    assert record["failed"] == 1
    if moment.startswith("parts"):
        assert record["resumed_shards"] >= 1
    assert read_index(out) == read_index(whole)
    names = sorted(p.name for p in whole.glob("shard-*.npy"))
    assert sorted(p.name for p in out.glob("shard-*.npy")) == names
    assert len(names) == 7
    for name in names:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    assert not list(out.rglob("*.tmp"))


def test_a_finished_run_rerun_changes_nothing(encode_artifact, image_tree, tmp_path):
    out = tmp_path / "out"
    first = builder.encode_dataset(encode_artifact, [str(image_tree)], out, shard_size=4)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npy")}
    again = builder.encode_dataset(encode_artifact, [str(image_tree)], out, shard_size=4)
    assert again["resumed_shards"] == again["shards"] == first["shards"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npy")} == before


def other_artifact(art: Path, folder: Path) -> Path:
    """A copy of the artifact whose preprocessing differs: another artifact."""
    shutil.copytree(art.resolve(), folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["preprocess"]["mean"] = [0.5, 0.5, 0.5]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_bad_arguments_exit_2_with_one_line(encode_artifact, image_tree, tmp_path, capsys):
    art = str(encode_artifact)

    def refused(*args: str) -> str:
        assert main(["encode", *args, "--quiet"]) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 2 and lines[0].startswith("encode "), lines
        return lines[1]

    out = tmp_path / "out"
    gone = tmp_path / "gone"
    assert refused(art, str(gone), "--out", str(out)) == f"{gone}: no such file or folder"
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert refused(art, str(tmp_path / "empty"), "--out", str(out)).startswith(
        f"{tmp_path / 'empty'}: no image files in this folder or below"
    )
    (tmp_path / "file").write_text("x")
    assert refused(art, str(image_tree), "--out", str(tmp_path / "file")) == (
        f"--out {tmp_path / 'file'}: is a file; encode writes a folder of shards"
    )
    assert refused(str(tmp_path), str(image_tree), "--out", str(out)).endswith(
        "not an artifact folder (no manifest.json)"
    )
    assert not out.exists()
    assert main(["encode", art, str(image_tree), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    other = other_artifact(encode_artifact, tmp_path / "other-art")
    assert refused(str(other), str(image_tree), "--out", str(out)) == (
        f"--out {out}: holds features of another artifact (artifact {art} (preset "
        "clip-vit-b-32)); resume with the same arguments, or give another --out"
    )
    assert "holds features of another input set" in refused(
        art, str(image_tree / "sub"), "--out", str(out)
    )
    assert "holds features of another shard size" in refused(
        art, str(image_tree), "--out", str(out), "--shard-size", "2"
    )
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    assert refused(art, str(image_tree), "--out", str(tmp_path / "mine")).startswith(
        f"--out {tmp_path / 'mine'}: a folder that holds no encode.json"
    )


@pytest.mark.unit
def test_webdataset_keys():
    assert wds_split("s000.jpg") == ("s000", "jpg")
    assert wds_split("a/b.seg.jpg") == ("a/b", "seg.jpg")
    assert wds_split("a.b/c.d.png") == ("a.b/c", "d.png")


@pytest.mark.unit
def test_import_builder_and_the_workers_do_not_load_tvm(image_tree):
    code = (
        "import sys, builder\n"
        "assert not {'tvm', 'pyarrow', 'ray'} & set(sys.modules), 'builder'\n"
        "from builder.config import PreprocessConfig\n"
        "from builder.encode_inputs import Item, decode_batch\n"
        f"p = {str(image_tree / 'a.jpg')!r}\n"
        "steps = PreprocessConfig().resolved(30)\n"
        "d = decode_batch([Item('a', p, 'file', p)], steps, (3, 30, 30))\n"
        "assert d.pixels.shape == (1, 3, 30, 30) and d.errors == [None]\n"
        "assert 'tvm' not in sys.modules, 'decode_batch'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_loading_an_artifact_imports_neither_tvm_nor_torch(encode_artifact):
    """An encode worker or a Ray actor loads the artifact in a fresh process: TVM's runtime
    library alone, without TVM's compiler or torch (seconds each), and both still work
    with it afterwards: torch exchanges tensors with TVM imported later."""
    code = (
        "import sys, numpy as np, builder\n"
        f"enc = builder.load({str(encode_artifact)!r})\n"
        "x = np.zeros((1, 3, 30, 30), np.float32)\n"
        "out = enc(x)\n"
        "assert not {'tvm', 'torch'} & set(sys.modules), 'load'\n"
        "import torch, tvm\n"
        "t = torch.from_dlpack(tvm.runtime.tensor(out))\n"
        "assert torch.equal(t, torch.from_numpy(out))\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_a_folder_left_by_a_run_killed_before_its_record_is_taken(
    encode_artifact, image_tree, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "encode.json.tmp").write_text('{"format": 1, "sta')  # killed while writing it
    record = builder.encode_dataset(encode_artifact, [str(image_tree)], out, workers=0)
    assert record["encoded"] == 6 and not list(out.rglob("*.tmp"))
