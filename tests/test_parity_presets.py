"""Every shipped preset's tower at its real widths against the HF model class it names, and
llava-clip's 16-bit GEMMs at real widths (a file of its own: the suite's workers take whole
files, and these are most of the parity tests' time)."""

from __future__ import annotations

import pytest

from builder.preset import load_preset

from .conftest import (
    PRESETS,
    assert_close,
    assert_native_images_match,
    build_and_load,
    expected_output,
    hf_names,
    needs_bf16,
    needs_half,
    pixels,
    save_hf_tower,
)

pytestmark = pytest.mark.parity


def distinct_towers(paths: list) -> list:
    """The presets whose tower's widths (every model field but the image size and the
    projector's) no earlier preset has: a VLM's preset reuses a shipped tower (Gemma 3's and
    PaliGemma's SigLIP so400m, InternVL's InternViT-300M), and its projector is checked
    against HF in tests/test_vlm.py."""
    skip = {"image_size", "projector_hidden_size", "scale_factor", "mm_tokens_per_image"}
    skip |= {"feature_layer", "feature_select_strategy", "post_layernorm", "output"}
    skip |= {"vision_use_head", "image_newline", "kwargs"}

    def key(preset):
        m = preset.model
        return preset.family, *[(f, str(getattr(m, f))) for f in sorted(vars(m)) if f not in skip]

    presets = {path: load_preset(path) for path in paths}
    seen = {key(p) for p in presets.values() if p.blocks.projector is None}
    out = []
    for path, preset in presets.items():
        if preset.blocks.projector is None or key(preset) not in seen:
            out.append(path)
        seen.add(key(preset))
    return out


def two_layers(path) -> list[str]:
    """Overrides that keep 2 layers of a preset's tower, under its HF config's name for the
    count (Qwen2.5-VL's `depth`). A windowed tower (Qwen2.5-VL's) also gets windows of 2 x 2
    merge blocks, which the test images' grids overflow, and its second layer over the whole
    image: both kinds of layer are checked."""
    preset = load_preset(path)
    model = preset.model
    out = [f"model.{k}={v}" for k, v in hf_names(preset.family, {"num_hidden_layers": 2}).items()]
    if hasattr(model, "fullatt_block_indexes"):
        window = 2 * model.spatial_merge_size * model.patch_size
        out += ["model.fullatt_block_indexes=[1]", f"model.window_size={window}"]
    return out


@pytest.mark.parametrize("path", distinct_towers(PRESETS), ids=lambda p: p.stem)
def test_preset_real_widths(path, tmp_path):
    """Each shipped preset at its real widths and image size, with 2 layers instead of all
    (CI time), its own feature selection and output, against the HF model class it names
    (CLIPVisionModel or SiglipVisionModel), through the CPU pipeline as shipped."""
    # The tower alone: a projector is checked in tests/test_vlm.py.
    tower = [*two_layers(path), "blocks.projector=null"]
    preset = load_preset(path, tower)
    hf_model = save_hf_tower(tmp_path / "ckpt", preset, seed=3)
    overrides = [*tower, f"weights.path={tmp_path / 'ckpt'}"]
    enc = build_and_load(path, overrides, tmp_path / "out")
    if preset.model.native:
        assert_native_images_match(enc, hf_model, preset.model)
        return
    x = pixels(1, preset.model.image_size)
    assert_close(enc(x), expected_output(hf_model, preset.model, x))


@pytest.mark.parametrize(
    "precision",
    [pytest.param("float16", marks=needs_half), pytest.param("bfloat16", marks=needs_bf16)],
)
def test_half_precision_gemms_at_real_widths(tmp_path, precision):
    """llava-clip at its real widths (2 layers) with `precision: float16` or `bfloat16`: the
    float16 / bfloat16 GEMMs (and with bfloat16 attention's products) against HF float32.
    Measured 1.0e-2 x max|ref| for float16 (HF's own model cast to float16, norms, attention
    and all: 4.9-5.1e-3); bfloat16 stays under HF's own model in bfloat16 (3.6e-2); see
    docs/cpu-pipeline.md."""
    overrides = ["model.num_hidden_layers=2"]
    preset = load_preset("llava-clip", overrides)
    hf_model = save_hf_tower(tmp_path / "ckpt", preset, seed=3)
    overrides += [
        f"weights.path={tmp_path / 'ckpt'}",
        f"targets=[{{name: llvm, kind: llvm, precision: {precision}}}]",
    ]
    enc = build_and_load("llava-clip", overrides, tmp_path / "out")
    x = pixels(1, preset.model.image_size)
    reference = expected_output(hf_model, preset.model, x)
    ours = assert_close(enc(x), reference, rel=5e-2)
    assert ours > 1e-4
    if precision == "bfloat16":
        import torch

        in_bf16 = expected_output(hf_model.to(torch.bfloat16), preset.model, x)
        assert ours < assert_close(in_bf16, reference, rel=5e-2)
