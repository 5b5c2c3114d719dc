"""HF transformers checkpoints: CLIPVisionModel, CLIPModel and LLaVA, single or sharded
safetensors, under every key prefix that real files carry.

Our parameter names are HF's own (`vision_model.encoder.layers.0.mlp.fc1.weight`), so the
name map is one rule: find the tower's prefix, strip it, put `vision_model.` in front. The
prefix is found, not guessed from the model class, because it depends on both the class and
the transformers version that wrote the file (4.x hub files: `vision_model.`,
`vision_tower.vision_model.`, `model.vision_tower.vision_model.`; 5.x `save_pretrained`: none,
`vision_model.`, `vision_tower.`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import CLIPVisionConfig
from ..errors import InputError
from ..safetensors_io import SafetensorsFile

ANCHOR = "embeddings.patch_embedding.weight"
OUR_PREFIX = "vision_model."
# LLaVA's projector: `multi_modal_projector.` at the top in transformers 4 hub files and
# transformers 5 save_pretrained, `model.multi_modal_projector.` in files written from the
# transformers >= 4.52 module tree; found by this anchor, like the tower.
PROJECTOR_ANCHOR = "linear_1.weight"
OUR_PROJECTOR = "multi_modal_projector."
INDEX = "model.safetensors.index.json"
# Buffers some transformers 4 files carry; they are not parameters.
BUFFERS = ("embeddings.position_ids",)
# HF config field -> ours, for the fields that must agree with the preset.
TOWER_FIELDS = (
    "hidden_size",
    "image_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "patch_size",
    "num_channels",
    "layer_norm_eps",
    "hidden_act",
)
LLAVA_FIELDS = {
    "vision_feature_layer": "feature_layer",
    "vision_feature_select_strategy": "feature_select_strategy",
}
# LlavaConfig fields that the `mlp2x_gelu` projector fixes.
PROJECTOR_FIELDS = {"projector_hidden_act": "gelu", "multimodal_projector_bias": True}
HF_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
# Ours -> the name HF writes for it.
TO_HF_ACTIVATION = {"gelu_tanh": "gelu_pytorch_tanh"}


@dataclass
class Checkpoint:
    root: Path
    files: list[Path]
    keys: dict[str, SafetensorsFile] = field(default_factory=dict)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint folder (single or sharded) or one .safetensors file."""
    if "\x00" in str(path):
        raise InputError(f"{str(path)!r}: a path cannot hold a NUL byte")
    root = Path(path)
    if root.is_file():
        if root.suffix != ".safetensors":
            raise InputError(f"{root}: expected a .safetensors file or a checkpoint folder")
        files = [root]
        folder = root.parent
    elif root.is_dir():
        folder = root
        index = root / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
                files = [root / name for name in names]
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise InputError(f"{index}: not a safetensors index (no 'weight_map')") from e
            outside = [n for n in names if Path(n).name != n or n in ("", ".", "..")]
            if outside:
                raise InputError(f"{index}: shard names must be files beside it, got {outside}")
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise InputError(f"{index}: lists shards that are not there: {missing}")
        else:
            files = sorted(root.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in root.glob("*.bin"))
            extra = f" (found {bins}: only safetensors is read)" if bins else ""
            raise InputError(f"{root}: no .safetensors files{extra}")
    else:
        raise InputError(f"{root}: no such file or folder")
    ckpt = Checkpoint(folder, files)
    for f in files:
        shard = SafetensorsFile(f)
        for key in shard.entries:
            ckpt.keys[key] = shard
    return ckpt


def checkpoint_files(path: str | Path) -> list[Path]:
    """Every file a build reads from the checkpoint at `path`: its safetensors files, and its
    index and config.json where present (the build cache hashes them)."""
    ckpt = open_checkpoint(path)
    extra = [ckpt.root / INDEX, ckpt.root / "config.json"]
    return ckpt.files + [f for f in extra if f.is_file()]


def tower_prefix(ckpt: Checkpoint) -> str:
    found = sorted(k[: -len(ANCHOR)] for k in ckpt.keys if k.endswith(ANCHOR))
    if not found:
        sample = sorted(ckpt.keys)[:5]
        raise InputError(
            f"{ckpt.root}: no vision tower: no key ends with {ANCHOR!r} (keys start {sample})"
        )
    if len(found) > 1:
        raise InputError(f"{ckpt.root}: several vision towers, under prefixes {found}")
    return found[0]


def projector_prefix(ckpt: Checkpoint) -> str:
    anchor = OUR_PROJECTOR + PROJECTOR_ANCHOR
    found = sorted(k[: -len(PROJECTOR_ANCHOR)] for k in ckpt.keys if k.endswith(anchor))
    if not found:
        raise InputError(
            f"{ckpt.root}: no LLaVA projector (no key ends with {anchor!r}), but the preset "
            "sets blocks.projector; set blocks.projector=null for the tower's features alone"
        )
    if len(found) > 1:
        raise InputError(f"{ckpt.root}: several LLaVA projectors, under prefixes {found}")
    return found[0]


def read_tower(
    path: str | Path,
    needed: dict[str, tuple[int, ...]],
    known: dict[str, tuple[int, ...]],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fill every parameter in `needed` exactly once from the checkpoint: the tower's, and
    LLaVA's projector's when the preset has one.

    `known` holds every parameter of the full tower: keys for parameters that exist but are
    not computed (layers after the feature layer, an unused post-LayerNorm) are skipped;
    a vision key outside `known` is an error, as is a missing key or a shape mismatch.
    """
    ckpt = open_checkpoint(path)
    # (checkpoint prefix, our prefix); the projector first: the tower's prefix may be "".
    sections = [(tower_prefix(ckpt), OUR_PREFIX)]
    if any(name.startswith(OUR_PROJECTOR) for name in needed):
        sections.insert(0, (projector_prefix(ckpt), OUR_PROJECTOR))
    errors: list[str] = []
    plan: dict[str, tuple[str, SafetensorsFile]] = {}
    skipped = used = 0
    misshapen: set[str] = set()
    for key, shard in sorted(ckpt.keys.items()):
        section = next(((t, o) for t, o in sections if key.startswith(t)), None)
        if section is None:
            continue
        theirs, ours = section
        used += 1
        local = key[len(theirs) :]
        if local in BUFFERS:
            continue
        name = ours + local
        if name not in known:
            errors.append(f"{shard.path}: unexpected vision key {key!r}")
            continue
        if tuple(shard.shape(key)) != known[name]:
            errors.append(
                f"{shard.path}: {key!r} has shape {list(shard.shape(key))}, "
                f"the preset needs {list(known[name])}"
            )
            misshapen.add(name)
            continue
        if name in needed:
            plan[name] = (key, shard)
        else:
            skipped += 1
    for name in sorted(set(needed) - set(plan) - misshapen):
        theirs, ours = next((t, o) for t, o in sections if name.startswith(o))
        errors.append(f"{ckpt.root}: missing key {theirs + name[len(ours) :]!r}")
    if errors:
        raise InputError(errors)
    arrays = {name: shard.read(key) for name, (key, shard) in plan.items()}
    info = {
        "kind": "hf",
        "path": str(Path(path).resolve()),
        "files": [f.name for f in ckpt.files],
        "prefix": sections[-1][0],
        "skipped_keys": skipped,
        "ignored_non_vision_keys": len(ckpt.keys) - used,
    }
    if len(sections) > 1:
        info["projector_prefix"] = sections[0][0]
    return arrays, info


def hf_tower_config(model: CLIPVisionConfig) -> dict[str, Any]:
    """The tower fields of an HF CLIPVisionConfig / SiglipVisionConfig for this tower: what
    `check_config` compares, the other way round (to make a matching HF model)."""
    fields = {f: getattr(model, f) for f in TOWER_FIELDS}
    fields["hidden_act"] = TO_HF_ACTIVATION.get(model.hidden_act, model.hidden_act)
    return fields


def check_config(path: str | Path, model: CLIPVisionConfig, projector: str | None = None) -> None:
    """Compare the tower fields of the checkpoint's config.json (if any) with the preset,
    and LLaVA's projector fields when the preset has a projector."""
    root = Path(path)
    config_path = (root if root.is_dir() else root.parent) / "config.json"
    if not config_path.is_file():
        return
    try:
        cfg = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{config_path}: not JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise InputError(f"{config_path}: expected a JSON object")
    vision, where = (
        (cfg["vision_config"], "vision_config.") if "vision_config" in cfg else (cfg, "")
    )
    pairs = [(where + f, vision.get(f), f) for f in TOWER_FIELDS if isinstance(vision, dict)]
    pairs += [(f, cfg.get(f), ours) for f, ours in LLAVA_FIELDS.items()]
    errors = []
    if projector:
        text = cfg.get("text_config")
        width = text.get("hidden_size") if isinstance(text, dict) else None
        pairs.append(("text_config.hidden_size", width, "projector_hidden_size"))
        for theirs_name, want in PROJECTOR_FIELDS.items():
            if cfg.get(theirs_name, want) != want:
                errors.append(
                    f"{config_path}: {theirs_name} is {cfg[theirs_name]!r}; blocks.projector "
                    f"{projector!r} has {theirs_name} {want!r}"
                )
    for theirs_name, theirs, ours_name in pairs:
        if theirs is None:
            continue
        ours = getattr(model, ours_name)
        if ours_name == "hidden_act" and isinstance(theirs, str):
            theirs = HF_ACTIVATIONS.get(theirs, theirs)
        numbers = all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in (theirs, ours)
        )
        same = math.isclose(theirs, ours, rel_tol=1e-6) if numbers else theirs == ours
        if not same:
            errors.append(
                f"{config_path}: {theirs_name} is {theirs!r} but the preset has "
                f"model.{ours_name} {ours!r}; change the preset (or override "
                f"model.{ours_name}={json.dumps(theirs)}) to match the checkpoint"
            )
    if errors:
        raise InputError(errors)
