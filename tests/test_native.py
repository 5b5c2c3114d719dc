"""Native-resolution towers end to end as a user runs them: `build import` of the model's
config.json, a build from its checkpoint, then image files of several sizes through `build
run` (the family's processor, one call per image) against the HF processor and model on the
same files, image by image; and the errors a bad image gets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from builder.cli import main

from .conftest import assert_close, build_and_load, randomize

TOWER = {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2}
TOWER |= {"num_attention_heads": 4, "patch_size": 8}


@dataclass
class Case:
    name: str
    # The HF model (random), saved to the folder given.
    make: Any
    # (hf_model, list of PIL images) -> per image features.
    reference: Any


def _mistral3(folder: Path) -> Any:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = {"hidden_size": 40, "num_hidden_layers": 1, "num_attention_heads": 4}
    text |= {"num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 100}
    text |= {"head_dim": 10, "rms_norm_eps": 1e-5}
    vision = {**TOWER, "hidden_act": "silu", "image_size": 64}
    config = Mistral3Config(vision_config=vision, text_config=text)
    model = randomize(Mistral3ForConditionalGeneration(config).eval(), seed=5)
    model.save_pretrained(folder)
    return model


def _mistral3_reference(model: Any, images: list) -> list[np.ndarray]:
    import torch
    from transformers import PixtralImageProcessorPil

    # What PixtralProcessor asks of its image processor: sides in multiples of the patch
    # times the merge.
    proc = PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size=16)
    out = []
    for image in images:
        batch = proc(images=[image], return_tensors="pt")
        with torch.inference_mode():
            feats = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"])
        out.append(feats.pooler_output[0].numpy())
    return out


def _siglip2(folder: Path) -> Any:
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    config = Siglip2VisionConfig(**TOWER, num_patches=16)
    model = randomize(Siglip2VisionModel(config).eval(), seed=6)
    model.save_pretrained(folder)
    return model


def _siglip2_reference(model: Any, images: list) -> list[np.ndarray]:
    """Every image in one batch, padded to max_num_patches (HF's default, 256) with HF's mask:
    each image's valid rows, which one call per image must equal."""
    import torch
    from transformers import Siglip2ImageProcessorPil

    proc = Siglip2ImageProcessorPil(patch_size=8, do_convert_rgb=True)
    batch = proc(images=images, return_tensors="pt")
    with torch.inference_mode():
        states = model(**batch).last_hidden_state
    return [states[i, : int(h * w)].numpy() for i, (h, w) in enumerate(batch["spatial_shapes"])]


def _qwen2_5_vl(folder: Path) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {"hidden_size": 40, "num_hidden_layers": 1, "num_attention_heads": 4}
    text |= {"num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 100}
    # Windows of 2 x 2 merge blocks (ragged at the edges of these images), the second layer
    # over the whole image.
    vision = {"depth": 2, "hidden_size": 48, "intermediate_size": 64, "num_heads": 4}
    vision |= {"patch_size": 8, "window_size": 32, "fullatt_block_indexes": [1]}
    vision |= {"out_hidden_size": 40}
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text)
    model = randomize(Qwen2_5_VLForConditionalGeneration(config).eval(), seed=7)
    model.save_pretrained(folder)
    return model


def _qwen2_5_vl_reference(model: Any, images: list) -> list[np.ndarray]:
    """Every image in one call of get_image_features (HF packs them into one sequence):
    each image's merged tokens."""
    import torch
    from transformers import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2)
    batch = proc(images=images, return_tensors="pt")
    with torch.inference_mode():
        feats = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    return [f.numpy() for f in feats.pooler_output]


CASES = [
    Case(
        "mistral3",
        _mistral3,
        _mistral3_reference,
    ),
    Case("siglip2", _siglip2, _siglip2_reference),
    Case("qwen2_5_vl", _qwen2_5_vl, _qwen2_5_vl_reference),
]


def _images(folder: Path) -> list[Path]:
    """Image files of odd sizes: wide, tall, larger than the budget, RGBA, tiny."""
    from PIL import Image

    rng = np.random.default_rng(11)
    paths = []
    sizes = [(70, 41, "RGB"), (23, 90, "RGB"), (200, 130, "RGB"), (48, 33, "RGBA"), (9, 17, "RGB")]
    for i, (w, h, mode) in enumerate(sizes):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def built(request, tmp_path_factory):
    case = request.param
    folder = tmp_path_factory.mktemp(case.name)
    model = case.make(folder / "ckpt")
    preset = folder / f"{case.name}.yaml"
    assert main(["import", str(folder / "ckpt" / "config.json"), "--out", str(preset)]) == 0
    overrides = [f"weights.path={folder / 'ckpt'}"]
    return case, model, build_and_load(preset, overrides, folder / "out"), folder


@pytest.mark.parity
def test_image_files_through_build_run_match_hf(built, tmp_path):
    """`build run` writes one tensor per image, each HF's features for that image."""
    from PIL import Image
    from safetensors.numpy import load_file

    case, model, enc, _ = built
    paths = _images(tmp_path)
    out = tmp_path / "feats.safetensors"
    assert main(["run", str(enc.folder), *map(str, paths), "--out", str(out)]) == 0
    ours = load_file(out)
    record = json.loads(out.with_suffix(".json").read_text())
    theirs = case.reference(model, [Image.open(p) for p in paths])
    assert sorted(ours, key=int) == [str(i) for i in range(len(paths))]
    for i, want in enumerate(theirs):
        assert ours[str(i)].shape == want.shape, paths[i]
        assert_close(ours[str(i)], want)
    assert len({f.shape[0] for f in theirs}) > 2  # the token count follows the image
    assert [len(r["grid"]) for r in record["crops"]] == [len(record["crops"][0]["grid"])] * len(
        paths
    )


@pytest.mark.e2e
def test_a_bad_image_is_named_and_nothing_is_written(built, tmp_path, capsys):
    _, _, enc, _ = built
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    good = _images(tmp_path)[0]
    out = tmp_path / "feats.safetensors"
    assert main(["run", str(enc.folder), str(good), str(empty), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "Traceback" not in err
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.e2e
def test_bench_times_one_image_of_a_grid(built, capsys):
    """`build bench` of a native artifact times one image of the patch grid asked for (the
    host's part included), with the manifest's work model's GFLOP at that size; --batch
    and --crops are refused."""
    from builder.assemble import export
    from builder.flops import gflop, native_gflop
    from builder.preset import load_preset

    _, _, enc, folder = built
    art = str(enc.folder)
    assert main(["bench", art, "--grid", "4x6", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "ms per image of 4 x 6 patches" in out and "GFLOP/s" in out
    preset = load_preset(next(folder.glob("*.yaml")), [f"weights.path={folder / 'ckpt'}"])
    mod, _ = export(preset.model, preset.blocks)
    want = gflop(mod, sizes={"patches": 24, "kept_patches": 24})
    assert native_gflop(enc.manifest["gflop_per_patch"], 24) == pytest.approx(want, rel=1e-6)
    assert main(["bench", art, "--batch", "2"]) == 2
    assert "set --grid instead of --batch or --crops" in capsys.readouterr().err


@pytest.mark.unit
def test_siglip2_refuses_a_pooled_output_and_a_table_that_is_not_square(capsys):
    args = ["check", "siglip2-so400m-patch16-naflex", "model.output=pooled"]
    assert main([*args, "model.num_patches=250"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "override 'model.num_patches=250': model.num_patches: 250 is not a square number",
        "override 'model.output=pooled': model.output: 'pooled', but the siglip2 tower takes "
        "one image at its own size and returns its features only (no pooling head is built); "
        "set output: features",
    ]


@pytest.mark.unit
def test_qwen2_5_vl_refuses_an_inner_feature_layer_a_rotary_width_and_a_small_window(capsys):
    args = ["check", "qwen2-5-vl-3b-instruct", "model.feature_layer=-2", "model.num_heads=128"]
    assert main([*args, "model.window_size=20"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "override 'model.feature_layer=-2': model.feature_layer: -2: the tower returns its "
        "merger's tokens, made from the final state (HF's pooler_output); only -1 is allowed",
        "override 'model.num_heads=128': model.num_heads: hidden_size 1280 / num_heads 128 must "
        "be a whole head width that is a multiple of 4 (the 2-D rotary layout)",
        "override 'model.window_size=20': model.window_size: 20 pixels is less than one merge "
        "block (2 x 14 pixels)",
    ]


@pytest.mark.unit
def test_a_projector_of_the_other_kind_is_refused(capsys):
    """A fixed-size tower's projector takes no image context, and a native one needs it."""
    assert main(["check", "siglip2-so400m-patch16-naflex", "blocks.projector=mlp2x_gelu"]) == 2
    err = capsys.readouterr().err
    assert "'mlp2x_gelu' is not a projector of native-resolution towers" in err
    assert main(["check", "llava-clip", "blocks.projector=mistral3_projector"]) == 2
    assert "'mistral3_projector' is not a projector of fixed-size towers" in capsys.readouterr().err
