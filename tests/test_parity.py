"""Numbers against HF transformers' CLIPVisionModel (CPU torch) with the same weights, saved
by save_pretrained and read back through our loader. fp32: max abs error < 1e-4 * max|ref|."""

from __future__ import annotations

import pytest

from builder.preset import load_preset

from .conftest import (
    assert_close,
    build_and_load,
    expected_features,
    expected_output,
    pixels,
    save_siglip_model,
    save_vision_model,
    tiny_overrides,
)

pytestmark = pytest.mark.parity

SELECTIONS = [
    ["model.feature_layer=-2"],
    ["model.feature_layer=-1"],
    ["model.feature_layer=-1", "model.post_layernorm=true"],
    ["model.feature_layer=0"],
    ["model.feature_layer=1"],
    ["model.feature_layer=[-2,-3]"],
    ["model.feature_layer=[3,1]", "model.post_layernorm=true"],
    ["model.feature_layer=-2", "model.feature_select_strategy=default"],
    ["model.feature_layer=-1", "model.feature_select_strategy=default"],
    ["model.feature_layer=[-2,-3]", "model.feature_select_strategy=default"],
    [
        "model.feature_layer=[0,-1]",
        "model.post_layernorm=true",
        "model.feature_select_strategy=default",
    ],
]


@pytest.mark.parametrize("selection", SELECTIONS, ids=lambda s: ",".join(s))
def test_tiny_feature_selection(selection, tiny_checkpoint, tmp_path):
    folder, hf_model = tiny_checkpoint
    overrides = tiny_overrides() + [f"weights.path={folder}"] + selection
    preset = load_preset("clip-vit-b-32", overrides)
    enc = build_and_load("clip-vit-b-32", overrides, tmp_path)
    for batch in (1, 3):
        x = pixels(batch, preset.model.image_size, seed=batch)
        assert_close(enc(x), expected_features(hf_model, preset.model, x))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu", "gelu_tanh"])
def test_tiny_activations(act, tmp_path):
    hf_act = {"gelu_tanh": "gelu_pytorch_tanh"}.get(act, act)
    hf_model = save_vision_model(tmp_path / "ckpt", hidden_act=hf_act, layer_norm_eps=1e-6)
    overrides = tiny_overrides(hidden_act=act, layer_norm_eps=1e-6)
    overrides += [f"weights.path={tmp_path / 'ckpt'}", "model.feature_layer=-1"]
    preset = load_preset("clip-vit-b-32", overrides)
    enc = build_and_load("clip-vit-b-32", overrides, tmp_path / "out")
    x = pixels(2, preset.model.image_size)
    assert_close(enc(x), expected_features(hf_model, preset.model, x))


SIGLIP_SELECTIONS = [
    ["model.feature_layer=-1"],  # last_hidden_state (post-LayerNorm)
    ["model.feature_layer=-1", "model.post_layernorm=false"],  # hidden_states[-1]
    ["model.feature_layer=0", "model.post_layernorm=false"],  # embeddings: no pre-LayerNorm
    ["model.feature_layer=[-2,-1]"],
    ["model.output=pooled"],  # pooler_output of the attention-pooling head
]


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-siglip")
    return folder, save_siglip_model(folder, seed=5, hidden_act="gelu_pytorch_tanh")


@pytest.mark.parametrize("selection", SIGLIP_SELECTIONS, ids=lambda s: ",".join(s))
def test_tiny_siglip(selection, tiny_siglip, tmp_path):
    """SigLIP against HF SiglipVisionModel: last_hidden_state, hidden states, pooler_output."""
    folder, hf_model = tiny_siglip
    overrides = tiny_overrides() + [f"weights.path={folder}", *selection]
    preset = load_preset("siglip-so400m-14-384", overrides)
    enc = build_and_load("siglip-so400m-14-384", overrides, tmp_path)
    for batch in (1, 2):
        x = pixels(batch, preset.model.image_size, seed=batch)
        assert_close(enc(x), expected_output(hf_model, preset.model, x))


def test_tiny_clip_pooled(tiny_checkpoint, tmp_path):
    """CLIP's pooler_output: post-LayerNorm of the CLS token (`cls_pooling`)."""
    folder, hf_model = tiny_checkpoint
    overrides = tiny_overrides() + [f"weights.path={folder}", "model.output=pooled"]
    overrides += ["model.feature_layer=-1", "model.post_layernorm=true"]
    preset = load_preset("clip-vit-b-32", overrides)
    enc = build_and_load("clip-vit-b-32", overrides, tmp_path)
    x = pixels(2, preset.model.image_size)
    assert_close(enc(x), expected_output(hf_model, preset.model, x))
