"""`build import`: HF config.json -> a sparse preset that validates, builds and (from a
checkpoint's own config) matches HF."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from builder.assemble import export, output_shape
from builder.cli import main
from builder.preset import load_preset

from .conftest import (
    TINY,
    assert_close,
    build_and_load,
    expected_output,
    pixels,
    save_siglip_model,
)

TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "vocab_size": 99}
SIGLIP = {**TINY, "hidden_act": "gelu_pytorch_tanh"}


def _configs():
    from transformers import (
        CLIPConfig,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        SiglipConfig,
        SiglipVisionConfig,
    )

    llama = LlamaConfig(**TEXT, num_hidden_layers=1)
    return {
        "clip-vision": CLIPVisionConfig(**TINY),
        "clip": CLIPConfig(vision_config=TINY, text_config=TEXT, projection_dim=16),
        "siglip-vision": SiglipVisionConfig(**SIGLIP, vision_use_head=False),
        "siglip": SiglipConfig(vision_config=SIGLIP, text_config=TEXT),
        "llava": LlavaConfig(vision_config=CLIPVisionConfig(**TINY), text_config=llama),
        "llava-siglip": LlavaConfig(
            vision_config=SiglipVisionConfig(**SIGLIP),
            text_config=llama,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
        ),
    }


# What each import must produce (beyond the tiny widths every one of them has): the family,
# model fields, and the blocks that follow from them. A standalone tower gives HF's
# last_hidden_state (feature_layer -1); a LLaVA keeps its own layer.
EXPECTED = {
    "clip-vision": ("clip", {"feature_layer": -1}, {"embeddings": "clip_embeddings"}),
    "clip": ("clip", {"projection_dim": 16, "feature_layer": -1}, {"head": "cls_pooling"}),
    "siglip-vision": (
        "siglip",
        {"vision_use_head": False},
        {"embeddings": "siglip_embeddings", "head": "cls_pooling"},
    ),
    "siglip": (
        "siglip",
        {},
        {"embeddings": "siglip_embeddings", "head": "siglip_attention_pooling"},
    ),
    "llava": ("clip", {"feature_select_strategy": "default", "feature_layer": -2}, {}),
    "llava-siglip": (
        "siglip",
        {"feature_layer": -1, "feature_select_strategy": "full", "final_norm": False},
        {"embeddings": "siglip_embeddings", "head": "siglip_attention_pooling"},
    ),
}


@pytest.mark.ir
@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_import_writes_a_sparse_preset_that_validates_and_exports(kind, tmp_path, capsys):
    config = _configs()[kind]
    source, out = tmp_path / "config.json", tmp_path / "presets" / f"{kind}.yaml"
    config.to_json_file(source)
    assert main(["import", str(source), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    written = yaml.safe_load(out.read_text())
    family, model_fields, block_fields = EXPECTED[kind]
    assert written.get("family", "clip") == family
    assert "blocks" not in written  # they follow from the family and its fields
    preset = load_preset(out)
    for key, value in model_fields.items():
        assert getattr(preset.model, key) == value, key
    for slot, block in block_fields.items():
        assert getattr(preset.blocks, slot) == block, slot
    # Unused keys are printed and listed in the file's header, not dropped.
    unused = [line.removeprefix("not used: ") for line in err.splitlines() if "not used" in line]
    assert "transformers_version" in unused
    assert all(f"#   {key}\n" in out.read_text() for key in unused)
    if "text_config" in json.loads(source.read_text()):
        assert "text_config" in unused
    m = preset.model
    assert (m.hidden_size, m.num_hidden_layers, m.image_size, m.patch_size) == (32, 3, 30, 8)
    mod, params = export(m, preset.blocks)
    assert params and output_shape(m, preset.blocks)[-1] == 32


@pytest.mark.parity
def test_imported_siglip_checkpoint_config_matches_hf(tmp_path, capsys):
    """Round trip: a SiglipVisionModel's own config.json -> a preset -> an artifact built from
    that checkpoint, equal to HF's last_hidden_state."""
    hf_model = save_siglip_model(tmp_path / "ckpt", seed=2, hidden_act="gelu_pytorch_tanh")
    out = tmp_path / "siglip.yaml"
    assert main(["import", str(tmp_path / "ckpt" / "config.json"), "--out", str(out)]) == 0
    overrides = [f"weights.path={tmp_path / 'ckpt'}"]
    preset = load_preset(out, overrides)
    enc = build_and_load(out, overrides, tmp_path / "out")
    x = pixels(2, preset.model.image_size)
    assert_close(enc(x), expected_output(hf_model, preset.model, x))


@pytest.mark.unit
@pytest.mark.parametrize(
    "config_class, vision, shipped_name",
    [
        (
            "Siglip2Config",
            {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27}
            | {"num_attention_heads": 16, "num_patches": 256},
            "siglip2-so400m-patch16-naflex",
        ),
        (
            "Qwen2_5_VLConfig",
            {"hidden_size": 1280, "out_hidden_size": 2048},
            "qwen2-5-vl-3b-instruct",
        ),
    ],
    ids=["siglip2", "qwen2_5_vl"],
)
def test_import_of_a_native_model_gives_the_shipped_preset(
    config_class, vision, shipped_name, tmp_path
):
    """The config.json of a model with a native tower in vision_config (SigLIP2 NaFlex,
    Qwen2.5-VL 3B) -> its family at the shipped preset's widths, with its processor's rule and
    steps (SigLIP2's filter, mean and std; Qwen2.5-VL's pixel budget)."""
    import transformers

    source, out = tmp_path / "config.json", tmp_path / "imported.yaml"
    config = getattr(transformers, config_class)(vision_config=vision, text_config=TEXT)
    config.to_json_file(source)
    assert main(["import", str(source), "--out", str(out)]) == 0
    imported, shipped = load_preset(out), load_preset(shipped_name)
    assert imported.family == shipped.family
    assert imported.model == dataclasses.replace(shipped.model, kwargs=imported.model.kwargs)
    assert imported.preprocess == shipped.preprocess
    assert imported.blocks == shipped.blocks


@pytest.mark.unit
def test_import_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_type": "bert", "hidden_size": 8}')
    assert main(["import", str(bad), "--out", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: model_type 'bert' is not supported; the supported model types: [" in err
    assert "'clip_vision_model'" in err and "'siglip_vision_model'" in err
    bad.write_text("{")
    assert main(["import", str(bad), "--out", str(tmp_path / "x.yaml")]) == 2
    assert f"{bad}: not JSON" in capsys.readouterr().err
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"model_type": "clip_vision_model", "num_attention_heads": 5}))
    assert main(["import", str(good), "--out", str(tmp_path / "x.yaml")]) == 2
    assert "768 is not divisible by model.num_attention_heads (5)" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()  # validated before writing
    (tmp_path / "x.yaml").write_text("keep")
    good.write_text(json.dumps({"model_type": "clip_vision_model"}))
    assert main(["import", str(good), "--out", str(tmp_path / "x.yaml")]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["import", str(good), "--out", str(tmp_path / "x.yaml"), "--force"]) == 0
