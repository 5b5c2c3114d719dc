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
from .safetensors_io import SafetensorsFile

ANCHOR = "embeddings.patch_embedding.weight"
OUR_PREFIX = "vision_model."
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
HF_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


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


def read_tower(
    path: str | Path,
    needed: dict[str, tuple[int, ...]],
    known: dict[str, tuple[int, ...]],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fill every parameter in `needed` exactly once from the checkpoint.

    `known` holds every parameter of the full tower: keys for parameters that exist but are
    not computed (layers after the feature layer, an unused post-LayerNorm) are skipped;
    a vision key outside `known` is an error, as is a missing key or a shape mismatch.
    """
    ckpt = open_checkpoint(path)
    prefix = tower_prefix(ckpt)
    errors: list[str] = []
    tower_keys = {k: f for k, f in ckpt.keys.items() if k.startswith(prefix)}
    plan: dict[str, tuple[str, SafetensorsFile]] = {}
    skipped = 0
    misshapen: set[str] = set()
    for key, shard in sorted(tower_keys.items()):
        local = key[len(prefix) :]
        if local in BUFFERS:
            continue
        name = OUR_PREFIX + local
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
    missing = sorted(set(needed) - set(plan) - misshapen)
    for name in missing:
        errors.append(f"{ckpt.root}: missing key {prefix + name[len(OUR_PREFIX) :]!r}")
    if errors:
        raise InputError(errors)
    arrays = {name: shard.read(key) for name, (key, shard) in plan.items()}
    info = {
        "kind": "hf",
        "path": str(Path(path).resolve()),
        "files": [f.name for f in ckpt.files],
        "prefix": prefix,
        "skipped_keys": skipped,
        "ignored_non_vision_keys": len(ckpt.keys) - len(tower_keys),
    }
    return arrays, info


def check_config(path: str | Path, model: CLIPVisionConfig) -> None:
    """Compare the tower fields of the checkpoint's config.json (if any) with the preset."""
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
