"""VLM projectors (`builder/vlm.py`, `builder/blocks/projectors.py`): PaliGemma, Gemma 3,
Idefics3, SmolVLM and InternVL, one crop per image.

Each VLM is a tiny HF model with every parameter random (tower, projector and the language
model), saved with save_pretrained; `build import` of its config.json gives the preset, which
is built from the checkpoint. The artifact must equal HF's `get_image_features(...)
.pooler_output` on the same pixels, and, through `encode_images`, on image files of several
aspect ratios preprocessed by the VLM's HF Pil image processor (pixels equal bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from builder.cli import main
from builder.crops import cut, most_crops, scheme
from builder.errors import InputError
from builder.preprocess import preprocess_batch, rgb_image, steps_from_manifest
from builder.preset import load_preset
from builder.weights import load_weights

from .conftest import assert_close, build_and_load, pixels, randomize
from .test_weights import needed

SIZE, PATCH = 32, 8  # a 4 x 4 patch grid: 2 x 2 merges and 2 x 2 pooling fit
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "image_size": SIZE,
    "patch_size": PATCH,
}
TEXT_WIDTH = 48  # not the tower's 32 nor a merge's 128: a swapped width is a shape error


def _text(model_type: str) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": 300,
        "head_dim": 12,
    }


@dataclass
class Case:
    """A tiny VLM: its HF model, how its get_image_features is called, its image processor."""

    model: str
    tokens: int
    width: int = TEXT_WIDTH

    def config(self) -> Any:
        import transformers as t

        siglip = {"model_type": "siglip_vision_model", **VISION}
        if self.model == "paligemma":
            return t.PaliGemmaConfig(
                vision_config=siglip,
                text_config=_text("gemma"),
                projection_dim=self.width,
                image_token_index=299,
                vocab_size=300,
            )
        if self.model == "gemma3":
            return t.Gemma3Config(
                vision_config=siglip,
                text_config=_text("gemma3_text"),
                mm_tokens_per_image=self.tokens,
                image_token_index=299,
                boi_token_index=297,
                eoi_token_index=298,
            )
        if self.model in ("idefics3", "smolvlm"):
            config = t.Idefics3Config if self.model == "idefics3" else t.SmolVLMConfig
            return config(
                vision_config=VISION, text_config=_text("llama"), scale_factor=2, image_token_id=299
            )
        square = {"image_size": [SIZE, SIZE], "patch_size": [PATCH, PATCH]}
        return t.InternVLConfig(
            vision_config={**VISION, **square, "attention_bias": True},
            text_config=_text("qwen2"),
            image_token_id=299,
        )

    def hf_class(self) -> Any:
        import transformers as t

        return getattr(
            t,
            {
                "paligemma": "PaliGemmaForConditionalGeneration",
                "gemma3": "Gemma3ForConditionalGeneration",
                "idefics3": "Idefics3ForConditionalGeneration",
                "smolvlm": "SmolVLMForConditionalGeneration",
                "internvl": "InternVLForConditionalGeneration",
            }[self.model],
        )

    def features(self, hf: Any, x: np.ndarray) -> np.ndarray:
        """HF's get_image_features(...).pooler_output for a batch of single crops."""
        px = torch.from_numpy(x)
        with torch.inference_mode():
            if self.model in ("idefics3", "smolvlm"):
                out = hf.get_image_features(px[:, None]).pooler_output  # one crop per image
                return torch.stack(list(out)).numpy()
            if self.model == "internvl":
                out = hf.get_image_features(
                    px, vision_feature_layer=-1, vision_feature_select_strategy="default"
                )
                return out.pooler_output.numpy()
            return hf.get_image_features(px).pooler_output.numpy()

    def processor(self) -> Any:
        import transformers as t

        square = {"height": SIZE, "width": SIZE}
        if self.model == "paligemma":
            return t.SiglipImageProcessorPil(size=square)
        if self.model == "gemma3":
            return t.Gemma3ImageProcessorPil(size=square)
        if self.model in ("idefics3", "smolvlm"):
            processor = t.Idefics3ImageProcessorPil
            if self.model == "smolvlm":
                processor = t.SmolVLMImageProcessorPil
            return processor(
                do_image_splitting=True,
                size={"longest_edge": 4 * SIZE},
                max_image_size={"longest_edge": SIZE},
            )
        # InternVL's preprocessor_config.json: dynamic tiles (1 to 12), ImageNet's mean and
        # std (the class defaults to OpenAI CLIP's, and to one crop).
        return t.GotOcr2ImageProcessorPil(
            size=square,
            crop_to_patches=True,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )

    def per_image(self, hf: Any, images: list) -> tuple[list, list]:
        """The HF processor's crops of each image, and get_image_features's sequence for
        each image (its crops' tokens in order)."""
        if self.model in ("idefics3", "smolvlm"):
            out = self.processor()([[image] for image in images], return_tensors="pt")
            with torch.inference_mode():
                feats = hf.get_image_features(
                    out["pixel_values"], pixel_attention_mask=out["pixel_attention_mask"]
                ).pooler_output
            counts = [len(f) // self.tokens for f in feats]
            pixels = [p[:n].numpy() for p, n in zip(out["pixel_values"], counts, strict=True)]
            return pixels, [f.numpy() for f in feats]
        out = self.processor()(images, return_tensors="np")
        pixels = np.asarray(out["pixel_values"], np.float32)
        feats = self.features(hf, pixels)
        counts = out.get("num_patches", [1] * len(images))
        spans = [slice(end - n, end) for n, end in zip(counts, np.cumsum(counts), strict=True)]
        width = feats.shape[-1]
        return [pixels[s] for s in spans], [feats[s].reshape(-1, width) for s in spans]


# Tokens per crop: PaliGemma keeps the 16 patches; Gemma 3 pools them to 4; Idefics3 and
# InternVL merge 2 x 2 of them (InternVL after dropping CLS).
CASES = {
    "paligemma": Case("paligemma", 16, width=40),
    "gemma3": Case("gemma3", 4),
    "idefics3": Case("idefics3", 4),
    "smolvlm": Case("smolvlm", 4),
    "internvl": Case("internvl", 4),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request, tmp_path_factory):
    """(case, HF model, the imported preset file, the loaded artifact, its checkpoint)."""
    case = CASES[request.param]
    folder = tmp_path_factory.mktemp(case.model)
    hf = randomize(case.hf_class()(case.config()), seed=5)
    hf.save_pretrained(folder / "ckpt")
    preset = folder / f"{case.model}.yaml"
    assert main(["import", str(folder / "ckpt" / "config.json"), "--out", str(preset)]) == 0
    enc = build_and_load(preset, [f"weights.path={folder / 'ckpt'}"], folder / "out")
    return case, hf, preset, enc, folder / "ckpt"


@pytest.mark.parity
def test_projector_matches_hf_get_image_features(built):
    case, hf, _, enc, _ = built
    x = pixels(2, SIZE, seed=7)
    ref = case.features(hf, x)
    assert ref.shape == (2, case.tokens, case.width)
    assert enc.output_shape == ["batch", case.tokens, case.width]
    assert_close(enc(x), ref)


def _images(folder) -> list:
    """Image files of several aspect ratios (wide, tall, square, RGBA)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    paths = []
    for i, (w, h, mode) in enumerate([(70, 41, "RGB"), (37, 90, "RGB"), (48, 48, "RGBA")]):
        data = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
        path = folder / f"img{i}.png"
        Image.fromarray(data, mode).save(path)
        paths.append(path)
    return paths


@pytest.mark.parity
def test_image_files_through_encode_images(built, tmp_path):
    """The preset's crops of each image equal the VLM's HF Pil processor's (max abs
    difference 0): one crop, or InternVL's dynamic tiles, or Idefics3's and SmolVLM's image
    splitting; and encode_images gives, per image, get_image_features's sequence."""
    from PIL import Image

    case, hf, _, enc, _ = built
    paths = _images(tmp_path)
    hf_pixels, ref = case.per_image(hf, [Image.open(p) for p in paths])
    steps = steps_from_manifest(enc.manifest)
    for path, want in zip(paths, hf_pixels, strict=True):
        if scheme(steps):
            mine = cut(rgb_image(path, steps, str(path)), steps, SIZE, str(path)).pixels
        else:
            mine = preprocess_batch([path], steps)
        assert mine.shape == want.shape, path
        assert float(np.abs(mine - want).max()) == 0.0, path
    ours = enc.encode_images(paths, batch_size=2)
    assert isinstance(ours, list) == bool(scheme(steps))
    for mine, theirs in zip(ours, ref, strict=True):
        assert_close(mine, theirs)
    if scheme(steps):  # the count follows the image
        assert len({len(o) for o in ours}) > 1


@pytest.mark.e2e
def test_bench_times_an_image_of_crops(built, capsys):
    """`build bench` of an artifact with a crop scheme times one image, its crops as one
    batch (the most the scheme cuts, or --crops), and reports it per image and per crop;
    --batch is refused there, and --crops where there is no crop scheme."""
    case, _, _, enc, _ = built
    art = str(enc.folder)
    steps = steps_from_manifest(enc.manifest)
    if not scheme(steps):
        assert main(["bench", art, "--crops", "2", "--runs", "1"]) == 2
        assert "has no crop scheme (one crop per image)" in capsys.readouterr().err
        return
    most = {"idefics3": 17, "smolvlm": 17, "internvl": 13}[case.model]  # 4 x 4 tiles, 12
    assert most_crops(steps, SIZE) == most
    assert main(["bench", art, "--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert f" ms per image ({most} crops as one batch: " in out, out
    assert " ms per crop)" in out and "images/s" in out and "crops/s" in out
    assert main(["bench", art, "--crops", "3", "--runs", "2"]) == 0
    assert "(3 crops as one batch: " in capsys.readouterr().out
    assert main(["bench", art, "--batch", "2"]) == 2
    assert "runs one image at a time, its crops as one batch; set --crops instead" in (
        capsys.readouterr().err
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    "preset, most",
    [
        ("smolvlm-256m-instruct", 17),  # 2048 px in 512 px tiles: 4 x 4, and the whole image
        ("idefics3-8b-llama3", 17),  # 1456 in 364: 4 x 4
        ("internvl3-1b", 13),  # 12 tiles and the thumbnail
        ("llava-v1-6-mistral-7b", 5),  # the base crop and 2 x 2 (or 3 x 1) tiles
        ("llava-onevision-qwen2-0-5b-ov", 37),  # the base crop and 6 x 6 tiles
        ("paligemma2-3b-pt-224", None),  # one crop per image
        ("smolvlm-256m-instruct preprocess.do_image_splitting=false", None),
        ("smolvlm-256m-instruct preprocess.longest_edge=1024", 5),
    ],
)
def test_most_crops_of_the_shipped_schemes(preset, most):
    name, *overrides = preset.split()
    resolved = load_preset(name, overrides)
    assert most_crops(resolved.preprocess, resolved.model.image_size) == most


@pytest.mark.unit
def test_imported_presets_name_the_projector(built):
    case, _, preset, _, _ = built
    resolved = load_preset(preset)
    want = {
        "paligemma": "paligemma_linear",
        "gemma3": "gemma3_projector",
        "idefics3": "idefics3_connector",
        "smolvlm": "idefics3_connector",
        "internvl": "internvl_projector",
    }
    assert resolved.blocks.projector == want[case.model]
    assert resolved.model.projector_hidden_size == case.width


@pytest.mark.unit
def test_missing_projector_tensors_are_named(built, tmp_path, capsys):
    """A checkpoint without the projector's tensors: one error naming the folder and the key
    searched. And a checkpoint of this VLM with another VLM's projector block is refused by
    its config.json."""
    case, _, preset, _, ckpt = built
    state = load_file(ckpt / "model.safetensors")
    merged = case.model in ("idefics3", "smolvlm")
    anchor = "connector." if merged else "multi_modal_projector."
    kept = {k: v for k, v in state.items() if anchor not in k}
    save_file(kept, tmp_path / "model.safetensors")
    resolved = load_preset(preset, [f"weights.path={tmp_path}"])
    with pytest.raises(InputError) as e:
        load_weights(resolved, needed(resolved))
    (line,) = e.value.lines
    assert line.startswith(f"{tmp_path}: no projector of blocks.projector ")
    assert anchor in line
    # From the command line: exit 2, that one line, no traceback, no artifact.
    out = tmp_path / "out"
    assert main(["build", str(preset), f"weights.path={tmp_path}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert line in err and "Traceback" not in err
    assert not list(out.glob("*/*/manifest.json"))
    other = "internvl_projector" if case.model != "internvl" else "idefics3_connector"
    wrong = load_preset(preset, [f"weights.path={ckpt}", f"blocks.projector={other}"])
    with pytest.raises(InputError) as e:
        load_weights(wrong, needed(wrong))
    assert f"but the preset has blocks.projector {other!r}" in e.value.lines[0]


@pytest.mark.unit
def test_grid_errors_name_the_field(tmp_path, capsys):
    """A merge that does not fit the patch grid is bad input: exit 2, the field named."""
    base = "internvit-300m-448px"
    shuffle = ["blocks.projector=internvl_projector", "model.feature_select_strategy=default"]
    assert main(["check", base, *shuffle, "model.scale_factor=3"]) == 2
    err = capsys.readouterr().err
    assert "model.scale_factor: 3 does not divide the patch grid's side 32" in err
    assert main(["check", base, "blocks.projector=internvl_projector"]) == 2
    assert "model.feature_select_strategy: blocks.projector 'internvl_projector'" in (
        capsys.readouterr().err
    )
    pooled = ["blocks.projector=gemma3_projector", "model.mm_tokens_per_image=15"]
    assert main(["check", "siglip-so400m-14-384", *pooled]) == 2
    assert "model.mm_tokens_per_image: 15 must be a square number" in capsys.readouterr().err
    # Crop schemes: one per preset, and a tile range that is one.
    assert main(["check", "internvl3-1b", "preprocess.do_image_splitting=true"]) == 2
    assert (
        "preprocess.do_image_splitting: one crop scheme per preset, but "
        "preprocess.crop_to_patches is set too"
    ) in capsys.readouterr().err
    tiles = ["preprocess.min_patches=5", "preprocess.max_patches=2"]
    assert main(["check", "internvl3-1b", *tiles]) == 2
    assert "preprocess.min_patches: 5 is more than preprocess.max_patches 2" in (
        capsys.readouterr().err
    )


@pytest.mark.unit
def test_import_of_an_older_idefics3_config(tmp_path):
    """Older Idefics3 files name the VLM's own model_type in vision_config: the record says
    which family the tower is."""
    import json

    config = CASES["idefics3"].config().to_dict()
    config["vision_config"]["model_type"] = "idefics3"
    source, out = tmp_path / "config.json", tmp_path / "idefics3.yaml"
    source.write_text(json.dumps(config))
    assert main(["import", str(source), "--out", str(out)]) == 0
    preset = load_preset(out)
    assert (preset.family, preset.blocks.projector) == ("siglip", "idefics3_connector")
    assert preset.model.hidden_size == VISION["hidden_size"]
