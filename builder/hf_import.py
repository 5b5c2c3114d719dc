"""A model's config JSON -> a sparse preset: HF transformers' config.json here; open_clip's
and timm's configs are recognized here and read by `openclip_import`.

Reads the config of a standalone tower (`CLIPVisionConfig`, `Dinov2Config`, ...), of a model
that holds one (`CLIPConfig`, `SiglipConfig`), or of a VLM (`LlavaConfig`) whose
`vision_config` is one. The tower's `model_type` names its family (`builder/families/`: each
lists the `model_type`s it reads); an unknown one is an error, never a guess. The family's
fields are read under their HF names; the preset holds only those that differ from the
family's defaults. Every key of the JSON that the builder does not use is listed (kept in the
config's `kwargs` and returned), never dropped in silence. A standalone tower's preset gives
HF's `last_hidden_state`; a VLM's keeps its feature layer. The result is validated like any
preset before it is written.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import families, openclip_import, vlm
from .config import PreprocessConfig
from .errors import InputError
from .families import Family
from .hf_config import LLAVA_FIELDS, vision_fields

PREPROCESS = PreprocessConfig()


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
        raise InputError(f"{path}: expected a JSON object (a model's config JSON)")
    return data


def _supported() -> str:
    types = sorted(t for f in families.all_families() for t in f.hf_model_types)
    return f"the supported model types: {types}, and VLM configs whose vision_config is one"


def _tower(path: Path, cfg: dict[str, Any]) -> tuple[Family, dict[str, Any], str]:
    """(the family, the tower's dict, its key prefix)."""
    model_type = cfg.get("model_type")
    vision = cfg.get("vision_config")
    if isinstance(vision, dict):
        inner = vision.get("model_type")
        family = families.for_model_type(inner) if isinstance(inner, str) else None
        if family is None and inner is None and isinstance(model_type, str):
            family = families.for_model_type(model_type)  # CLIPConfig's tower has no type
        record = vlm.for_model_type(model_type)
        if family is None and record is not None:
            family = families.get(record.family)
        if family is None:
            raise InputError(
                f"{path}: vision_config.model_type {inner!r} is not a tower this builder "
                f"reads; {_supported()}"
            )
        return family, vision, "vision_config."
    family = families.for_model_type(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise InputError(f"{path}: model_type {model_type!r} is not supported; {_supported()}")
    return family, cfg, ""


def _value(path: Path, family: Family, where: str, name: str, value: Any) -> Any:
    if isinstance(value, list) and name in ("image_size", "patch_size"):
        if len(value) == 2 and value[0] == value[1]:
            return value[0]
        raise InputError(f"{path}: {where} is {value}; only square sizes are supported")
    return family.from_hf(name, value)


def import_config(path: str | Path) -> Imported:
    """Read a config JSON (HF, open_clip or timm) and map it to a sparse preset (not yet
    written)."""
    path = Path(path)
    cfg = _read(path)
    if openclip_import.recognizes(cfg):  # open_clip's or timm's, not HF's
        return openclip_import.import_config(path, cfg)
    family, vision, prefix = _tower(path, cfg)
    vision = vision_fields(cfg, vision)
    used = {prefix + "model_type", "model_type"}
    model: dict[str, Any] = {}
    for f in family.hf_field_names():
        if f in vision:
            model[f] = _value(path, family, prefix + f, f, vision[f])
            used.add(prefix + f)
    if prefix and "projection_dim" in cfg and "projection_dim" in model:
        used.add("projection_dim")  # read through vision_fields
    llava = [theirs for theirs in LLAVA_FIELDS if theirs in cfg]
    for theirs in llava:
        model[LLAVA_FIELDS[theirs]] = cfg[theirs]
        used.add(theirs)
    record = vlm.for_model_type(cfg.get("model_type")) if prefix else None
    if record is not None:
        _vlm_fields(record, cfg, vision, family, model, used)
    if "feature_layer" not in model:
        model["feature_layer"] = -1  # HF's last_hidden_state
    # A VLM with a vision_feature_layer takes hidden_states[i], without the final norm.
    takes_states = llava or (record is not None and "vision_feature_layer" in record.fields)
    if takes_states and family.config(**model).normed_last_state:
        model["post_layernorm"] = False  # a VLM takes hidden_states[i], without the final norm
    unused = sorted(_leaves(cfg, used))
    config = family.config(**model, kwargs={k: _get(cfg, k) for k in unused})
    defaults = family.config()
    preset: dict[str, Any] = {
        "description": f"imported from {path.name} ({cfg.get('model_type', family.name)})"
    }
    if family.name != families.DEFAULT:
        preset["family"] = family.name
    sparse_model = _sparse(config, defaults)
    if sparse_model:
        preset["model"] = sparse_model
    # The blocks follow from the family and its fields (`Family.blocks`): only a VLM's
    # projector is written.
    if record is not None:
        preset["blocks"] = {"projector": record.projector}
        # Lists copied: YAML would write a list met twice as an anchor and an alias.
        steps = {
            k: list(v) if isinstance(v, list) else v
            for k, v in record.preprocess.items()
            if getattr(PREPROCESS, k) != v
        }
        if record.image_grid_pinpoints:
            pinpoints = cfg.get("image_grid_pinpoints", record.image_grid_pinpoints)
            steps["image_grid_pinpoints"] = [list(pair) for pair in pinpoints]
        if record.vision_aspect_ratio:
            limit = cfg.get("vision_aspect_ratio", record.vision_aspect_ratio)
            steps["vision_aspect_ratio"] = limit
        if record.longest_edge_tiles:
            side = config.image_size * record.longest_edge_tiles
            steps = {"longest_edge": side, **steps}
        if steps:
            preset["preprocess"] = steps
    if family.native:  # its processor's rule: each image at its own size
        rule = {"resize": family.native.resize, "center_crop": False}
        rule |= {k: list(v) if isinstance(v, tuple) else v for k, v in family.native.steps}
        preset["preprocess"] = {**rule, **preset.get("preprocess", {})}
    return Imported(preset, unused, cfg.get("model_type", family.name))


def _vlm_fields(
    record: vlm.VLM,
    cfg: dict[str, Any],
    vision: dict[str, Any],
    family: Family,
    model: dict[str, Any],
    used: set[str],
) -> None:
    """A VLM's projector fields, and the HF vision config's defaults its config.json omits."""
    for name, value in record.vision_defaults.items():
        if name not in vision and name in family.hf_field_names():
            model[name] = value
    for theirs, value, ours in vlm.read_fields(record, cfg):
        model[ours] = value
        used.add(theirs)
    if record.image_grid_pinpoints:
        model["image_newline"] = True
        used.update({"image_grid_pinpoints", "vision_aspect_ratio"})
    width = vlm.hf_value(cfg, record.width)
    if width is not None:
        model["projector_hidden_size"] = width
        if "." not in record.width:
            used.add(record.width)


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
