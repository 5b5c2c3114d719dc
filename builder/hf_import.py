"""An HF transformers config.json -> a sparse preset.

Reads `CLIPVisionConfig`, `CLIPConfig`, `SiglipVisionConfig`, `SiglipConfig` and
`LlavaConfig` JSON (a LLaVA's tower may be CLIP or SigLIP). The preset holds only the fields
that differ from the defaults of `builder/config.py`; every key of the JSON that the builder
does not use is listed (kept in `CLIPVisionConfig.kwargs` and returned), never dropped in
silence. The result is validated like any preset before it is written.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import BlocksConfig, CLIPVisionConfig
from .errors import InputError
from .weights.hf import HF_ACTIVATIONS, LLAVA_FIELDS, TOWER_FIELDS

VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
WRAPPERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


@dataclass
class Imported:
    """The sparse preset, and the JSON keys the builder does not use (dotted paths)."""

    preset: dict[str, Any]
    unused: list[str]
    kind: str


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not JSON: {e}") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object (an HF config.json)")
    return data


def _tower(path: Path, cfg: dict[str, Any]) -> tuple[str, dict[str, Any], str, str]:
    """(kind, the tower's dict, its key prefix, the tower's model_type)."""
    model_type = cfg.get("model_type", "")
    if model_type in VISION_TYPES or ("vision_config" not in cfg and "patch_size" in cfg):
        return model_type or "clip_vision_model", cfg, "", model_type or "clip_vision_model"
    vision = cfg.get("vision_config")
    if isinstance(vision, dict):
        inner = vision.get("model_type") or WRAPPERS.get(model_type, "clip_vision_model")
        if inner not in VISION_TYPES:
            raise InputError(
                f"{path}: vision_config.model_type {inner!r} is not one of {list(VISION_TYPES)}"
            )
        return model_type or "unknown", vision, "vision_config.", inner
    raise InputError(
        f"{path}: not a CLIP, SigLIP or LLaVA config (model_type {model_type!r}, no "
        "vision_config, no patch_size)"
    )


def _size(path: Path, where: str, value: Any) -> Any:
    # SiglipVisionConfig allows [height, width]; the builder's towers are square.
    if isinstance(value, list):
        if len(value) == 2 and value[0] == value[1]:
            return value[0]
        raise InputError(f"{path}: {where} is {value}; only square sizes are supported")
    return value


def import_config(path: str | Path) -> Imported:
    """Read an HF config.json and map it to a sparse preset (not yet written)."""
    path = Path(path)
    cfg = _read(path)
    kind, vision, prefix, tower_type = _tower(path, cfg)
    siglip = tower_type == "siglip_vision_model"
    used = {prefix + "model_type", "model_type"}
    model: dict[str, Any] = {}
    for f in (*TOWER_FIELDS, "projection_dim"):
        if f in vision:
            value = vision[f]
            if f in ("image_size", "patch_size"):
                value = _size(path, prefix + f, value)
            model[f] = HF_ACTIVATIONS.get(value, value) if f == "hidden_act" else value
            used.add(prefix + f)
    if prefix and not siglip and "projection_dim" in cfg:
        # CLIPConfig's own projection_dim is the one CLIPModel's visual_projection uses.
        model["projection_dim"] = cfg["projection_dim"]
        used.add("projection_dim")
    blocks: dict[str, Any] = {}
    if siglip:
        blocks["embeddings"] = "siglip_embeddings"
        model["pre_layernorm"] = False
        if vision.get("vision_use_head", True):
            blocks["head"] = "siglip_attention_pooling"
        used.add(prefix + "vision_use_head")
    for theirs, ours in LLAVA_FIELDS.items():
        if theirs in cfg:
            model[ours] = cfg[theirs]
            used.add(theirs)
    if siglip and "feature_layer" not in model:
        # A SigLIP tower alone: HF's last_hidden_state, post-LayerNorm on the final state.
        model.update(feature_layer=-1, post_layernorm=True)
    unused = sorted(_leaves(cfg, used))
    config = CLIPVisionConfig(**model, kwargs={k: _get(cfg, k) for k in unused})
    sparse_model = _sparse(config, CLIPVisionConfig())
    sparse_blocks = _sparse(BlocksConfig(**blocks), BlocksConfig())
    preset: dict[str, Any] = {"description": f"imported from {path.name} ({kind})"}
    if sparse_model:
        preset["model"] = sparse_model
    if sparse_blocks:
        preset["blocks"] = sparse_blocks
    return Imported(preset, unused, kind)


def _sparse(obj: Any, default: Any) -> dict[str, Any]:
    return {
        f.name: getattr(obj, f.name)
        for f in dataclasses.fields(obj)
        if f.name != "kwargs" and getattr(obj, f.name) != getattr(default, f.name)
    }


def _leaves(cfg: dict[str, Any], used: set[str]) -> list[str]:
    """Dotted keys of `cfg` the builder did not read: a nested tower config is walked, any
    other map (text_config, id2label) is one key."""
    out = []
    for key, value in cfg.items():
        if key in used:
            continue
        if key == "vision_config" and isinstance(value, dict):
            out += [f"vision_config.{k}" for k in value if f"vision_config.{k}" not in used]
        else:
            out.append(key)
    return out


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def render(imported: Imported, source: Path) -> str:
    """The preset file's text: a header naming the source and the unused keys, then YAML."""
    head = [f"# Imported from {source} by `build import`."]
    if imported.unused:
        head.append("# Keys of that config the builder does not use:")
        head += [f"#   {key}" for key in imported.unused]
    body = yaml.safe_dump(imported.preset, sort_keys=False, width=100)
    return "\n".join(head) + "\n" + body
