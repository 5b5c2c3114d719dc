"""Image files through an artifact: `Encoder.encode_images` and `build run`, against HF's
processor and model on the same files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from builder.cli import main
from builder.preset import load_preset
from builder.runtime import load

from .conftest import assert_close, expected_features, tiny_overrides
from .test_preprocess import hf_pixels, photo

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    files = [folder / "a.jpg", folder / "b.png", folder / "c.png"]
    photo(64, 48, "RGB", seed=1).save(files[0], quality=90)
    photo(40, 70, "RGBA", seed=2).save(files[1])
    photo(30, 30, "L", seed=3).save(files[2])
    return files


@pytest.fixture(scope="module")
def tiny_artifact(tiny_checkpoint, tmp_path_factory):
    folder, hf_model = tiny_checkpoint
    overrides = tiny_overrides() + [f"weights.path={folder}"]
    out = tmp_path_factory.mktemp("out")
    assert main(["clip-vit-b-32", *overrides, "--out", str(out)]) == 0
    return out / "clip-vit-b-32" / "llvm", load_preset("clip-vit-b-32", overrides), hf_model


def hf_reference(files, preset, hf_model) -> np.ndarray:
    from PIL import Image

    steps = preset.preprocess.resolved(preset.model.image_size)
    x = np.stack([hf_pixels(Image.open(f), steps) for f in files])
    return expected_features(hf_model, preset.model, x)


@pytest.mark.parity
def test_encode_images_matches_hf_processor_and_model(tiny_artifact, image_files):
    from PIL import Image

    art, preset, hf_model = tiny_artifact
    enc = load(art)
    seen = []
    ours = enc.encode_images(image_files, batch_size=2, progress=lambda *a: seen.append(a))
    assert seen == [(2, 3), (3, 3)]
    assert_close(ours, hf_reference(image_files, preset, hf_model))
    # PIL images and paths mixed, any batch size: the same rows in the same order.
    mixed = [image_files[2], Image.open(image_files[0]), image_files[1]]
    again = enc.encode_images(mixed, batch_size=1)
    np.testing.assert_array_equal(again, ours[[2, 0, 1]])


def test_build_run_writes_features_and_their_order(tiny_artifact, image_files, tmp_path, capsys):
    art, preset, hf_model = tiny_artifact
    files = [image_files[1], image_files[0]]
    out = tmp_path / "feats.npy"
    code = main(["run", str(art), *map(str, files), "--out", str(out), "--batch", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "encoded 1/2 images" in captured.err and "encoded 2/2 images" in captured.err
    feats = np.load(out)
    record = json.loads((tmp_path / "feats.json").read_text())
    assert record["images"] == [str(f) for f in files]
    assert record["shape"] == list(feats.shape) == [2, 10, 32]
    assert record["dtype"] == "float32" and record["features"] == "feats.npy"
    assert_close(feats, hf_reference(files, preset, hf_model))


def test_build_run_bad_images_exit_2_and_write_nothing(
    tiny_artifact, image_files, tmp_path, capsys
):
    art, _, _ = tiny_artifact
    (tmp_path / "notes.png").write_text("text")
    out = tmp_path / "feats.npy"
    args = [str(image_files[0]), str(tmp_path / "gone.jpg"), str(tmp_path / "notes.png")]
    assert main(["run", str(art), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[1:] == [
        f"{tmp_path / 'gone.jpg'}: no such image file",
        f"{tmp_path / 'notes.png'}: not an image Pillow can read",
    ]
    assert not out.exists() and not (tmp_path / "feats.json").exists()


def test_build_run_bad_arguments(tiny_artifact, image_files, tmp_path, capsys):
    art, _, _ = tiny_artifact
    img = str(image_files[0])
    assert main(["run", str(tmp_path), img, "--out", str(tmp_path / "f.npy")]) == 2
    assert "not an artifact folder" in capsys.readouterr().err
    assert main(["run", str(art), img, "--out", str(tmp_path / "f.txt"), "--batch", "0"]) == 2
    assert capsys.readouterr().err.splitlines()[1:] == [
        f"--out {tmp_path / 'f.txt'}: the features file must end in .npy",
        "--batch 0: must be at least 1",
    ]
