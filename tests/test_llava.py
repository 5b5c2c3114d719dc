"""LLaVA's projector (`blocks.projector: mlp2x_gelu`) against HF transformers'
`LlavaForConditionalGeneration.get_image_features` on a tiny random LLaVA saved with
save_pretrained, and its keys under both prefix conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from builder.errors import InputError
from builder.preset import load_preset
from builder.weights import load_weights

from .conftest import assert_close, build_and_load, hf_vision_config, pixels, randomize
from .test_weights import needed

TEXT_WIDTH = 48  # not the tower's 32: a swapped width shows up as a shape error


def tiny_llama():
    """A one-layer Llama of width TEXT_WIDTH: the language model of the tiny LLaVAs."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=1,
        vocab_size=100,
    )


def save_llava(folder, feature_layer, strategy, seed=0):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=hf_vision_config(),
        text_config=tiny_llama(),
        image_token_index=99,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    model = randomize(LlavaForConditionalGeneration(config), seed)
    model.save_pretrained(folder)
    return model


def llava_overrides(folder, feature_layer, strategy) -> list[str]:
    from .conftest import tiny_overrides

    layer = str(feature_layer).replace(" ", "")
    return tiny_overrides() + [
        f"weights.path={folder}",
        f"model.feature_layer={layer}",
        f"model.feature_select_strategy={strategy}",
        f"model.projector_hidden_size={TEXT_WIDTH}",
        "blocks.projector=mlp2x_gelu",
    ]


@pytest.mark.parity
@pytest.mark.parametrize(
    "feature_layer, strategy", [(-2, "default"), ([-2, -3], "full"), ([1, -1], "default")]
)
def test_projector_matches_hf_get_image_features(feature_layer, strategy, tmp_path):
    hf = save_llava(tmp_path / "llava", feature_layer, strategy)
    overrides = llava_overrides(tmp_path / "llava", feature_layer, strategy)
    enc = build_and_load("clip-vit-b-32", overrides, tmp_path / "out")
    assert enc.manifest["weights"]["projector_prefix"] == "multi_modal_projector."
    x = pixels(2, 30)
    with torch.inference_mode():
        out = hf.get_image_features(
            torch.from_numpy(x),
            vision_feature_layer=feature_layer,
            vision_feature_select_strategy=strategy,
        )
    ref = torch.stack(list(out.pooler_output)).numpy()
    tokens = 9 if strategy == "default" else 10
    assert ref.shape == (2, tokens, TEXT_WIDTH)
    assert_close(enc(x), ref)


# transformers 4 hub files and transformers 5 save_pretrained; files written from the
# transformers >= 4.52 module tree (`model.` in front of both).
CONVENTIONS = {
    "transformers-5": ("vision_tower.", "multi_modal_projector."),
    "transformers-4-hub": ("vision_tower.vision_model.", "multi_modal_projector."),
    "module-tree": ("model.vision_tower.vision_model.", "model.multi_modal_projector."),
}


@pytest.fixture(scope="module")
def llava_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    save_llava(folder, -2, "default")
    return folder, load_file(folder / "model.safetensors")


def rewrite(state, tower, projector) -> dict:
    out = {}
    for key, value in state.items():
        if key.startswith("vision_tower."):
            key = tower + key.removeprefix("vision_tower.")
        elif key.startswith("multi_modal_projector."):
            key = projector + key.removeprefix("multi_modal_projector.")
        out[key] = value
    return out


@pytest.mark.unit
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_projector_keys_under_each_prefix(convention, llava_file, tmp_path):
    folder, state = llava_file
    tower, projector = CONVENTIONS[convention]
    save_file(rewrite(state, tower, projector), tmp_path / "model.safetensors")
    preset = load_preset("clip-vit-b-32", llava_overrides(tmp_path, -2, "default"))
    arrays, info = load_weights(preset, needed(preset))
    assert set(arrays) == set(needed(preset))
    for name in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"):
        want = state["multi_modal_projector." + name].numpy()
        np.testing.assert_array_equal(arrays["multi_modal_projector." + name], want)
    assert (info["prefix"], info["projector_prefix"]) == (tower, projector)
    language_keys = [k for k in state if k.startswith("language_model.")]
    assert info["ignored_non_vision_keys"] == len(language_keys)


@pytest.mark.unit
def test_projector_errors(llava_file, tmp_path):
    folder, state = llava_file
    tower_only = {k: v for k, v in state.items() if not k.startswith("multi_modal_projector.")}
    save_file(tower_only, tmp_path / "model.safetensors")
    preset = load_preset("clip-vit-b-32", llava_overrides(tmp_path, -2, "default"))
    with pytest.raises(InputError) as e:
        load_weights(preset, needed(preset))
    assert e.value.lines == [
        f"{tmp_path}: no projector of blocks.projector 'mlp2x_gelu' (no key ends with "
        "'multi_modal_projector.linear_1.weight'); set blocks.projector=null for the "
        "tower's features alone"
    ]
    # The language model's width comes from config.json and must agree with the preset.
    wrong = llava_overrides(folder, -2, "default") + ["model.projector_hidden_size=64"]
    with pytest.raises(InputError) as e:
        load_weights(load_preset("clip-vit-b-32", wrong), {})
    assert e.value.lines == [
        f"{folder / 'config.json'}: text_config.hidden_size is 48 but the preset has "
        "model.projector_hidden_size 64; change the preset (or override "
        "model.projector_hidden_size=48) to match the checkpoint"
    ]
    # Without a projector in the preset, the projector's keys are ignored, not an error.
    plain = load_preset("clip-vit-b-32", llava_overrides(folder, -2, "default")[:-1])
    _, info = load_weights(plain, needed(plain))
    assert "projector_prefix" not in info


@pytest.mark.ir
def test_llava_clip_with_projector_has_llava_15_widths():
    from builder.assemble import output_shape, parameter_shapes

    preset = load_preset("llava-clip", ["blocks.projector=mlp2x_gelu"])
    shapes = parameter_shapes(preset.model, preset.blocks)
    assert shapes["multi_modal_projector.linear_1.weight"] == (4096, 1024)
    assert shapes["multi_modal_projector.linear_2.weight"] == (4096, 4096)
    assert output_shape(preset.model, preset.blocks) == ["batch", 576, 4096]
