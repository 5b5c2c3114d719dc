"""The vision fields of an HF `config.json`, as the config importer (`hf_import`) and the
checkpoint check (`weights/hf.py`) both read them; without numpy or the weights code, so that
`build import` answers at once."""

from __future__ import annotations

from typing import Any

# LLaVA's own fields of the tower's feature selection, under the builder's names.
LLAVA_FIELDS = {
    "vision_feature_layer": "feature_layer",
    "vision_feature_select_strategy": "feature_select_strategy",
}


def vision_fields(cfg: dict[str, Any], vision: dict[str, Any]) -> dict[str, Any]:
    """A tower's fields from its config (a two-tower or VLM config's `vision_config`, or the
    tower's own): with the model's own projection_dim where both hold one (CLIPModel's
    visual_projection is CLIPConfig's projection_dim wide, and its vision_config keeps the
    default), and the rotary base where transformers 5 nests it (`rope_parameters`)."""
    out = dict(vision)
    if "projection_dim" in cfg and "projection_dim" in vision:
        out["projection_dim"] = cfg["projection_dim"]
    # transformers 5 writes a rotary base under rope_parameters; older files beside the rest.
    rope = vision.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in vision:
        out["rope_theta"] = rope["rope_theta"]
    return out
