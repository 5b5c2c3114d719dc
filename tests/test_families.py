"""Every tower family against its HF reference classes, end to end as a user goes: a
checkpoint written by HF transformers (every parameter random, norms and biases included, odd
widths), `build import` of its config.json, a build from the checkpoint by the family's name
map, and the artifact equal to HF's last_hidden_state. The families, their variants and their
references come from the family records (`builder/families/`), so a new family is covered
without a change here."""

from __future__ import annotations

import dataclasses

import pytest

from builder import families
from builder.cli import main
from builder.preset import load_preset

from .conftest import (
    assert_close,
    assert_native_images_match,
    build_and_load,
    expected_output,
    hf_names,
    pixels,
    randomize,
)

# Odd widths: head_dim 9, an MLP of 76; a 3 x 3 patch grid from 30 px in patches of 8.
ODD = {
    "hidden_size": 36,
    "num_attention_heads": 4,
    "intermediate_size": 76,
    "num_hidden_layers": 2,
    "image_size": 30,
    "patch_size": 8,
}


# Native towers' 2-D rotary positions split a head in four: head_dim 12.
NATIVE_ODD = {"hidden_size": 48}


def tiny_fields(family: families.Family, **extra) -> dict:
    """ODD's fields that the family has, under its HF config's names for them (Qwen2.5-VL's
    `depth` and `num_heads`), then `extra`."""
    names = {f.name for f in dataclasses.fields(family.config)}
    odd = hf_names(family.name, {**ODD, **NATIVE_ODD} if family.native else ODD)
    return {**{k: v for k, v in odd.items() if k in names}, **extra}


def cases():
    for family in families.all_families():
        references = [(family.reference, family.reference_config), *family.also_equals]
        for variant in ({}, *family.variants):
            for classes in references:
                label = ",".join(f"{k}={v}" for k, v in variant.items())
                yield pytest.param(family.name, variant, classes, id=f"{classes[0]}[{label}]")


def save_checkpoint(folder, family, fields, classes, seed=0):
    """The reference HF model at `fields`, every parameter random, saved as HF saves it."""
    model = family.reference_model(family.config(**fields), classes)
    randomize(model, seed).save_pretrained(folder)
    return model


@pytest.mark.parity
@pytest.mark.parametrize("name, variant, classes", list(cases()))
def test_imported_checkpoint_matches_its_hf_reference(name, variant, classes, tmp_path):
    family = families.get(name)
    hf_model = save_checkpoint(tmp_path / "ckpt", family, tiny_fields(family, **variant), classes)
    preset_path = tmp_path / "imported.yaml"
    assert main(["import", str(tmp_path / "ckpt" / "config.json"), "--out", str(preset_path)]) == 0
    overrides = [f"weights.path={tmp_path / 'ckpt'}"]
    preset = load_preset(preset_path, overrides)
    assert preset.family == name and preset.model.feature_layers == [preset.model.num_hidden_layers]
    enc = build_and_load(preset_path, overrides, tmp_path / "out")
    assert enc.manifest["weights"]["family"] == name
    if family.native:
        assert_native_images_match(enc, hf_model, preset.model)
        return
    x = pixels(2, preset.model.image_size)
    assert_close(enc(x), expected_output(hf_model, preset.model, x))


@pytest.mark.parity
@pytest.mark.parametrize("name", [f.name for f in families.all_families() if f.resample])
def test_built_at_another_size_matches_hf_run_at_that_size(name, tmp_path):
    """A preset whose image size is not the checkpoint's: the position grid is resampled once
    at build time, as HF resamples it at run time (the checkpoint's 3 x 3 grid to 5 x 5)."""
    family = families.get(name)
    fields = tiny_fields(family)
    hf_model = save_checkpoint(tmp_path / "ckpt", family, fields, None)
    preset_path = tmp_path / "imported.yaml"
    assert main(["import", str(tmp_path / "ckpt" / "config.json"), "--out", str(preset_path)]) == 0
    overrides = [f"weights.path={tmp_path / 'ckpt'}", "model.image_size=46"]
    enc = build_and_load(preset_path, overrides, tmp_path / "out")
    assert enc.manifest["weights"]["resampled"]["method"] == list(family.resample)
    preset = load_preset(preset_path, overrides)
    x = pixels(2, 46)
    assert_close(enc(x), expected_output(hf_model, preset.model, x))


@pytest.mark.unit
@pytest.mark.parametrize(
    "name, key",
    [
        ("dinov2_with_registers", "embeddings.register_tokens"),
        ("dinov2", "encoder.layer.1.layer_scale2.lambda1"),
    ],
)
def test_a_missing_register_or_layer_scale_tensor_is_one_error_line(name, key, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    family = families.get(name)
    save_checkpoint(tmp_path / "ckpt", family, tiny_fields(family), None)
    file = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(file)
    del state[key]
    save_file(state, file, metadata={"format": "pt"})
    preset_path = tmp_path / "imported.yaml"
    assert main(["import", str(tmp_path / "ckpt" / "config.json"), "--out", str(preset_path)]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    assert main([str(preset_path), f"weights.path={tmp_path / 'ckpt'}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    local = key.replace("encoder.layer.", "encoder.layers.").replace(".lambda1", "")
    assert [line for line in err if ": missing " in line] == [
        f"{tmp_path / 'ckpt'}: missing parameter {local!r} (under prefix ''; the family's name "
        "map: builder/families/)"
    ]
    assert "Traceback" not in "\n".join(err)
