"""LLaVA-NeXT's and LLaVA-OneVision's anyres crops and packing (`builder/crops.py`) against
HF transformers' `LlavaNextImageProcessorPil` / `LlavaOnevisionImageProcessorPil` and their
models' `get_image_features`.

A tiny LLaVA-NeXT and a tiny OneVision (a 4 x 4 patch grid, every parameter random, the
`image_newline` vector included; OneVision with anyres_max_1, so that its grids are
downscaled) saved with save_pretrained; `build import` of its
config.json; a build from the checkpoint. Image files of several aspect ratios go through
`encode_images`: each image's crops equal the HF processor's pixels (max abs difference 0)
and its packed sequence HF's pooler_output for it, newline tokens included.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from builder.cli import main
from builder.crops import anyres_crops
from builder.preprocess import rgb_image, steps_from_manifest
from builder.preset import load_preset

from .conftest import TINY, assert_close, build_and_load, randomize
from .test_llava import tiny_llama

SIZE = 32  # the tower's crop: 4 x 4 patches of 8
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
# (width, height): wide, tall, square, very wide, small
SHAPES = [(70, 41), (37, 90), (48, 48), (150, 40), (20, 13)]


# The two anyres VLMs: LLaVA-NeXT (CLIP, hidden_states[-2] without CLS) and OneVision
# (SigLIP, hidden_states[-1], every token; grids past one tile's patches downscaled).
KINDS = {
    "next": {"limit": None, "layer": -2, "strategy": "default"},
    "onevision": {"limit": "anyres_max_1", "layer": -1, "strategy": "full"},
}


@pytest.fixture(scope="module", params=sorted(KINDS))
def next_model(request, tmp_path_factory):
    import transformers as t

    kind = KINDS[request.param]
    folder = tmp_path_factory.mktemp(f"llava-{request.param}")
    if request.param == "next":
        vision = {**TINY, "image_size": SIZE, "model_type": "clip_vision_model"}
        config = t.LlavaNextConfig(
            vision_config=vision,
            text_config=tiny_llama(),
            image_grid_pinpoints=PINPOINTS,
            image_token_index=99,
        )
        hf = t.LlavaNextForConditionalGeneration(config)
    else:
        vision = {**TINY, "image_size": SIZE, "model_type": "siglip_vision_model"}
        config = t.LlavaOnevisionConfig(
            vision_config=vision,
            text_config=tiny_llama(),
            image_grid_pinpoints=PINPOINTS,
            image_token_index=99,
            vision_aspect_ratio=kind["limit"],
        )
        hf = t.LlavaOnevisionForConditionalGeneration(config)
    hf = randomize(hf, seed=4)
    hf.save_pretrained(folder / "ckpt")
    preset = folder / "llava.yaml"
    assert main(["import", str(folder / "ckpt" / "config.json"), "--out", str(preset)]) == 0
    enc = build_and_load(preset, [f"weights.path={folder / 'ckpt'}"], folder / "out")
    return hf, preset, enc, kind


def _processor(kind):
    import transformers as t

    if kind["limit"] is None:
        return t.LlavaNextImageProcessorPil(
            size={"shortest_edge": SIZE},
            crop_size={"height": SIZE, "width": SIZE},
            image_grid_pinpoints=PINPOINTS,
        )
    # OneVision's preprocessor_config.json sets mean and std 0.5.
    return t.LlavaOnevisionImageProcessorPil(
        size={"height": SIZE, "width": SIZE},
        image_grid_pinpoints=PINPOINTS,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def _grid(width: int, height: int) -> list[int]:
    """The tile grid HF's processor picks for an image of that size."""
    from transformers.image_processing_utils import select_best_resolution

    best = select_best_resolution((height, width), PINPOINTS)
    return [best[0] // SIZE, best[1] // SIZE]


def _images(folder):
    from PIL import Image

    rng = np.random.default_rng(8)
    paths = []
    for i, (w, h) in enumerate(SHAPES):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parity
def test_anyres_features_equal_hf_get_image_features(next_model, tmp_path):
    from PIL import Image

    hf, _, enc, kind = next_model
    paths = _images(tmp_path)
    batch = _processor(kind)([Image.open(p) for p in paths], return_tensors="pt")
    steps = steps_from_manifest(enc.manifest)
    for i, path in enumerate(paths):
        cut = anyres_crops(rgb_image(path, steps, str(path)), steps, SIZE, str(path))
        want = batch["pixel_values"][i, : len(cut.pixels)].numpy()
        assert float(np.abs(cut.pixels - want).max()) == 0.0, path
        assert list(cut.size) == batch["image_sizes"][i].tolist()
    with torch.inference_mode():
        options = {"vision_aspect_ratio": kind["limit"]} if kind["limit"] else {}
        ref = hf.get_image_features(
            batch["pixel_values"],
            batch["image_sizes"],
            vision_feature_layer=kind["layer"],
            vision_feature_select_strategy=kind["strategy"],
            **options,
        ).pooler_output
    record: list = []
    ours = enc.encode_images(paths, record=record)
    assert isinstance(ours, list) and len(ours) == len(paths)
    assert len({o.shape[0] for o in ours}) > 1  # the token count follows the image
    for mine, theirs in zip(ours, ref, strict=True):
        assert_close(mine, theirs.numpy())
    assert [r["grid"] for r in record] == [_grid(w, h) for w, h in SHAPES]
    # What a call returns is the caller's: the newline vector, a parameter the graph returns
    # as it is, comes as a copy, and changing it changes nothing the artifact computes.
    cut = anyres_crops(rgb_image(paths[0], steps, "a"), steps, SIZE, "a")
    features, newline = enc._run(cut.pixels)
    kept = newline.copy()
    newline[...] = 0
    features[...] = 0
    again = enc._run(cut.pixels)
    np.testing.assert_array_equal(again[1], kept)
    assert float(np.abs(again[0]).max()) > 0


@pytest.mark.e2e
def test_build_run_writes_one_tensor_per_image(next_model, tmp_path, capsys):
    from safetensors.numpy import load_file

    _, _, enc, _ = next_model
    paths = _images(tmp_path)[:2]
    out = tmp_path / "feats.safetensors"
    args = ["run", str(enc.folder), *map(str, paths), "--out", str(out)]
    assert main(args) == 0
    stored = load_file(str(out))
    want = enc.encode_images(paths)
    assert sorted(stored) == ["0", "1"]
    for i, w in enumerate(want):
        np.testing.assert_array_equal(stored[str(i)], w)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["images"] == [str(p) for p in paths]
    assert record["shapes"] == [list(w.shape) for w in want]
    grids = [_grid(w, h) for w, h in SHAPES[:2]]
    assert [r["grid"] for r in record["crops"]] == grids
    assert [r["crops"] for r in record["crops"]] == [1 + rows * cols for rows, cols in grids]
    # A .npy cannot hold them: exit 2, nothing written.
    bad = tmp_path / "feats.npy"
    assert main(["run", str(enc.folder), str(paths[0]), "--out", str(bad)]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert not bad.exists()
    # `build encode` writes fixed-size rows: it refuses the artifact, naming it.
    shards = tmp_path / "shards"
    assert main(["encode", str(enc.folder), str(paths[0]), "--out", str(shards)]) == 2
    assert f"{enc.folder}: its images have variable token counts" in capsys.readouterr().err
    assert not shards.exists()


@pytest.mark.unit
def test_anyres_preset_errors(next_model, capsys):
    _, preset, _, kind = next_model
    resolved = load_preset(preset)
    assert resolved.preprocess.vision_aspect_ratio == kind["limit"]
    assert resolved.blocks.projector == "mlp2x_gelu" and resolved.model.image_newline
    assert resolved.preprocess.image_grid_pinpoints == PINPOINTS
    assert main(["check", str(preset), "preprocess.image_grid_pinpoints=[[32,48]]"]) == 2
    err = capsys.readouterr().err
    assert "preprocess.image_grid_pinpoints[0]: [32, 48] is not a multiple of model.image_size" in (
        err
    )
    assert main(["check", str(preset), "model.image_newline=false"]) == 2
    assert "model.image_newline: false, but preprocess.image_grid_pinpoints" in (
        capsys.readouterr().err
    )


@pytest.mark.unit
def test_an_image_too_small_for_the_crops_is_named(next_model, tmp_path, capsys):
    """An image so thin that its grid keeps no row of patches (200 x 3: HF's packing returns
    its base tokens alone), or no pinpoint keeps any of its pixels (300 x 1: HF's processor
    fails): one line naming the file and the field, exit 2, nothing written."""
    from PIL import Image

    _, _, enc, _ = next_model
    out = tmp_path / "feats.safetensors"
    for w, h in ((200, 3), (300, 1)):
        path = tmp_path / f"thin{w}.png"
        Image.new("RGB", (w, h), (200, 10, 10)).save(path)
        assert main(["run", str(enc.folder), str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{path}: {w} x {h} pixels is too small for preprocess.image_grid_pinpoints" in err
        assert "Traceback" not in err and not out.exists()
