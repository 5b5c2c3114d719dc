"""HF transformers checkpoints of any tower family, single or sharded safetensors, under every
key prefix that real files carry.

The family's name map (`builder/families/`, `NameMap`) says how a checkpoint key becomes a
parameter name: the tower's prefix is found by the family's anchor key, not guessed from the
model class, because it depends on both the class and the transformers version that wrote
the file (CLIP in 4.x hub files: `vision_model.`, `vision_tower.vision_model.`,
`model.vision_tower.vision_model.`; 5.x `save_pretrained`: none, `vision_model.`,
`vision_tower.`); the rest of the key goes through the family's renames and splits.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TowerConfig
from ..errors import InputError
from ..families import Family, NameMap
from ..hf_config import LLAVA_FIELDS, vision_fields
from ..safetensors_io import SafetensorsFile
from .torch_pickle import SUFFIXES, TorchPickleFile

TensorFile = SafetensorsFile | TorchPickleFile

# LLaVA's projector: `multi_modal_projector.` at the top in transformers 4 hub files and
# transformers 5 save_pretrained, `model.multi_modal_projector.` in files written from the
# transformers >= 4.52 module tree; found by this anchor, like the tower.
PROJECTOR_ANCHOR = "linear_1.weight"
OUR_PROJECTOR = "multi_modal_projector."
INDEX = "model.safetensors.index.json"
# LlavaConfig fields that the `mlp2x_gelu` projector fixes.
PROJECTOR_FIELDS = {"projector_hidden_act": "gelu", "multimodal_projector_bias": True}


@dataclass
class Checkpoint:
    root: Path
    files: list[Path]
    keys: dict[str, TensorFile] = field(default_factory=dict)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint folder (single or sharded) or one .safetensors file; PyTorch pickles
    (`.bin`, `.pt`, `.pth`) where there is no safetensors, when torch is installed."""
    folder, files = _checkpoint_paths(path)
    ckpt = Checkpoint(folder, files)
    for f in files:
        shard = SafetensorsFile(f) if f.suffix == ".safetensors" else TorchPickleFile(f)
        ckpt.keys.update(dict.fromkeys(shard.keys(), shard))
    return ckpt


def _checkpoint_paths(path: str | Path) -> tuple[Path, list[Path]]:
    """The checkpoint's folder and the weight files `open_checkpoint` reads, found without
    reading them (a PyTorch pickle can only be read whole, through torch)."""
    if "\x00" in str(path):
        raise InputError(f"{str(path)!r}: a path cannot hold a NUL byte")
    root = Path(path)
    if root.is_file():
        if root.suffix not in (".safetensors", *SUFFIXES):
            raise InputError(
                f"{root}: expected a .safetensors file, a PyTorch pickle ({', '.join(SUFFIXES)}) "
                "or a checkpoint folder"
            )
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
            files = sorted(p for p in root.iterdir() if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise InputError(f"{root}: no .safetensors files (nor PyTorch pickles)")
    else:
        raise InputError(f"{root}: no such file or folder")
    return folder, files


def _named(ckpt: Checkpoint) -> Path:
    """How an error about the whole checkpoint names it: its one file, or its folder."""
    return ckpt.files[0] if len(ckpt.files) == 1 else ckpt.root


def checkpoint_files(path: str | Path) -> list[Path]:
    """Every file a build reads from the checkpoint at `path`: its safetensors files, and its
    index, config.json and open_clip_config.json where present (the build cache hashes
    them). Listed, not read: the cache decides a hit without opening a weight."""
    folder, files = _checkpoint_paths(path)
    extra = [folder / INDEX, folder / "config.json", folder / "open_clip_config.json"]
    return files + [f for f in extra if f.is_file()]


def find_tower(ckpt: Checkpoint, family: Family) -> tuple[NameMap, str]:
    """The checkpoint's layout (the first of the family's whose anchor a key ends with) and
    the tower's prefix in it."""
    for names in family.name_maps:
        anchor = names.anchor
        found = sorted(k[: -len(anchor)] for k in ckpt.keys if k.endswith(anchor))
        if len(found) > 1:
            raise InputError(f"{ckpt.root}: several vision towers, under prefixes {found}")
        if found:
            return names, found[0]
    sample = sorted(ckpt.keys)[:5]
    anchors = " or ".join(f"{n.anchor!r} ({n.name})" for n in family.name_maps)
    raise InputError(
        f"{_named(ckpt)}: no vision tower of the {family.name} family: no key ends with "
        f"{anchors} (keys start {sample}){_other_family(ckpt, family)}"
    )


def _other_family(ckpt: Checkpoint, family: Family) -> str:
    """'; it looks like a checkpoint of the dinov2 family ...' when another family's anchor
    is in the checkpoint."""
    from .. import families

    ours = {n.anchor for n in family.name_maps}
    for other in families.all_families():
        anchors = {n.anchor for n in other.name_maps} - ours
        if any(k.endswith(a) for a in anchors for k in ckpt.keys):
            return (
                f"; it looks like a checkpoint of the {other.name} family: set family: "
                f"{other.name} (or import its config.json with `build import`)"
            )
    return ""


@dataclass
class Mapped:
    """Where one of our parameters comes from: a checkpoint key, maybe a part of it (split),
    maybe transposed, maybe a position table to resample."""

    key: str
    shard: TensorFile
    part: tuple[int, int, int] | None = None  # (index, count, axis)
    transpose: bool = False
    resample: int | None = None  # leading rows kept when resampling a position table
    squeeze: bool = False  # leading axes of size 1 dropped


def local_names(names: NameMap, local: str) -> list[tuple[str, tuple[int, int, int] | None]]:
    """Our local names for a checkpoint's local key: one, or one per part of a split."""
    for pattern, replacement in names.renames:
        local = re.sub(pattern, replacement, local)
    for split in names.splits:
        if re.search(split.pattern, local):
            count = len(split.parts)
            return [
                (re.sub(split.pattern, part, local), (i, count, split.axis))
                for i, part in enumerate(split.parts)
            ]
    return [(local, None)]


def _local_key(key: str, tower: str, names: NameMap) -> str | None:
    """The key's local part: under the tower's prefix, or a key of the layout's `beside` one
    level above that prefix; None: not the tower's."""
    if key.startswith(tower):
        return key[len(tower) :]
    if not tower:
        return None  # no level above
    parent = tower[:-1].rpartition(".")[0]
    parent += "." if parent else ""
    rest = key[len(parent) :]
    if key.startswith(parent) and any(rest.startswith(b) for b in names.beside):
        return rest
    return None


def _squeezed(shape: tuple[int, ...] | list[int]) -> list[int]:
    shape = list(shape)
    while len(shape) > 1 and shape[0] == 1:
        shape.pop(0)
    return shape


def _stored_shape(mapped: Mapped) -> tuple[int, ...]:
    shape = list(mapped.shard.shape(mapped.key))
    if mapped.squeeze:
        shape = _squeezed(shape)
    if mapped.part is not None:
        _, count, axis = mapped.part
        if shape[axis] % count:  # not equal parts: the whole shape, which cannot match
            return tuple(shape)
        shape[axis] //= count
    return tuple(reversed(shape)) if mapped.transpose else tuple(shape)


def _read(mapped: Mapped, want: tuple[int, ...], family: Family) -> np.ndarray:
    array = mapped.shard.read(mapped.key)
    if mapped.squeeze:
        array = array.reshape(_squeezed(array.shape))
    if mapped.part is not None:
        index, count, axis = mapped.part
        array = np.split(array, count, axis=axis)[index]
    if mapped.transpose:
        array = array.T
    if mapped.resample is not None and array.shape != want:
        from .resample import resample_position_table

        side = math.isqrt(want[-2] - mapped.resample)
        mode, antialias = family.resample
        array = resample_position_table(
            array,
            (side, side),
            prefix=mapped.resample,
            mode=mode,
            antialias=antialias,
            name=f"{mapped.shard.path}: {mapped.key!r}",
        )
    return np.ascontiguousarray(array)


def read_tower(
    path: str | Path,
    family: Family,
    needed: dict[str, tuple[int, ...]],
    known: dict[str, tuple[int, ...]],
    projector_block: str | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fill every parameter in `needed` exactly once from the checkpoint: the tower's, and
    the projector's (the block `projector_block`) when the preset has one.

    `known` holds every parameter of the full tower: keys for parameters that exist but are
    not computed (layers after the feature layer, an unused final norm) are skipped;
    a vision key outside `known` is an error, as is a missing key or a shape mismatch (but a
    position table of another grid is resampled where the family says how).
    """
    ckpt = open_checkpoint(path)
    names, tower = find_tower(ckpt, family)
    projector = None
    if projector_block and any(name.startswith(OUR_PROJECTOR) for name in needed):
        projector = projector_prefix(ckpt, projector_block)
    tables = dict(names.position_tables)
    errors: list[str] = []
    unexpected: list[str] = []
    plan: dict[str, Mapped] = {}
    skipped = ignored = used = 0
    misshapen: set[str] = set()
    for key, shard in sorted(ckpt.keys.items()):
        # The projector first: the tower's prefix may be "".
        if projector is not None and key.startswith(projector):
            mapped_names = [(OUR_PROJECTOR + key[len(projector) :], None)]
            ours = ""
        elif (local := _local_key(key, tower, names)) is not None:
            if any(re.search(pattern, local) for pattern in names.ignore):
                used += 1
                ignored += 1
                continue
            mapped_names = local_names(names, local)
            ours = names.ours
        else:
            continue
        used += 1
        for local, part in mapped_names:
            name = ours + local
            if name not in known:
                unexpected.append(f"{shard.path}: unexpected vision key {key!r}")
                errors.append(unexpected[-1])
                continue
            transpose = any(re.search(t, local) for t in names.transposes)
            squeeze = any(re.search(t, local) for t in names.squeeze)
            mapped = Mapped(key, shard, part, transpose, tables.get(local), squeeze)
            shape = _stored_shape(mapped)
            if shape != known[name] and not _resamplable(mapped, shape, known[name], family):
                if part is None or part[0] == 0:  # a fused tensor: one line, not one a part
                    errors.append(_misshapen(mapped, known[name], mapped_names))
                misshapen.add(name)
                continue
            if name in needed:
                plan[name] = mapped
            else:
                skipped += 1
    # Top-level parameters of the VLM (LLaVA-NeXT's image_newline): the one key that is the
    # name or ends with it.
    for name in needed:
        if name.startswith((names.ours, OUR_PROJECTOR)):
            continue
        found = sorted(k for k in ckpt.keys if k == name or k.endswith("." + name))
        if len(found) > 1:
            errors.append(f"{ckpt.root}: several keys for {name!r}: {found}")
        elif found:
            mapped = Mapped(found[0], ckpt.keys[found[0]])
            if _stored_shape(mapped) != needed[name]:
                errors.append(
                    f"{mapped.shard.path}: {found[0]!r} has shape "
                    f"{list(_stored_shape(mapped))}, the preset needs {list(needed[name])}"
                )
                misshapen.add(name)
            else:
                plan[name] = mapped
                used += 1
    missing = sorted(set(needed) - set(plan) - misshapen)
    if unexpected and (len(unexpected) * 2 > used or len(missing) * 2 > len(needed)):
        # Most keys are not this family's, or most parameters are missing beside keys it does
        # not know (a family sharing the anchor): one line, not hundreds. The missing and
        # misshapen parameters follow from that, so they are not listed.
        raise InputError(_other_checkpoint(ckpt, family, unexpected, used))
    for name in missing:
        errors.append(f"{ckpt.root}: missing {_checkpoint_name(name, names, tower, projector)}")
    if errors:
        raise InputError(errors)
    arrays = {name: _read(mapped, needed[name], family) for name, mapped in plan.items()}
    info = {
        "kind": "hf",
        "family": family.name,
        "layout": names.name,
        "path": str(Path(path).resolve()),
        "files": [f.name for f in ckpt.files],
        "prefix": tower,
        "skipped_keys": skipped,
        "ignored_keys": ignored,
        "ignored_non_vision_keys": len(ckpt.keys) - used,
    }
    resampled = sorted(
        n for n, m in plan.items() if m.resample is not None and _stored_shape(m) != needed[n]
    )
    if resampled:
        info["resampled"] = {"names": resampled, "method": family.resample}
    if projector is not None:
        info["projector_prefix"] = projector
    return arrays, info


def _misshapen(mapped: Mapped, want: tuple[int, ...], parts: list[tuple[str, Any]]) -> str:
    """The line for a checkpoint tensor of the wrong shape; a fused one says what it fuses."""
    stored = list(mapped.shard.shape(mapped.key))
    head = f"{mapped.shard.path}: {mapped.key!r} has shape {stored}"
    if mapped.part is None:
        return f"{head}, the preset needs {list(want)}"
    _, count, axis = mapped.part
    whole = list(reversed(want)) if mapped.transpose else list(want)
    whole[axis] *= count
    names = ", ".join(local.rsplit(".", 2)[-2] for local, _ in parts)
    return (
        f"{head}: a fused tensor of {count} equal parts ({names}) on axis {axis}; the preset "
        f"needs {whole} ({count} x {list(want)})"
    )


def _resamplable(
    mapped: Mapped, shape: tuple[int, ...], want: tuple[int, ...], family: Family
) -> bool:
    """A position table whose grid differs from ours, of the same width, in a family that
    says how to resample."""
    if mapped.resample is None or family.resample is None or len(shape) != len(want):
        return False
    return shape[:-2] == want[:-2] and shape[-1] == want[-1]


def _other_checkpoint(ckpt: Checkpoint, family: Family, lines: list[str], used: int) -> str:
    """The one line for a checkpoint most of whose keys are not the family's."""
    from .. import families

    return (
        f"{_named(ckpt)}: {len(lines)} of its {used} vision keys are not parameters of the "
        f"{family.name} family's tower ({lines[0].split(': ', 1)[1]}): a checkpoint of another "
        f"family? Set the preset's family to the checkpoint's (the families: "
        f"{families.names()}), or import its config.json with `build import`"
    )


def _checkpoint_name(name: str, names: NameMap, tower: str, projector: str | None) -> str:
    """How a missing parameter is named to the user: its checkpoint key where the name map
    is the identity, else our name and the prefix searched."""
    if not name.startswith(names.ours) and not name.startswith(OUR_PROJECTOR):
        return f"key {name!r} (model.{name} is set)"
    if projector is not None and name.startswith(OUR_PROJECTOR):
        return f"key {projector + name[len(OUR_PROJECTOR) :]!r}"
    local = name[len(names.ours) :]
    if not names.renames and not names.splits:
        return f"key {tower + local!r}"
    return f"parameter {local!r} (under prefix {tower!r}; the family's name map: builder/families/)"


def projector_prefix(ckpt: Checkpoint, block: str) -> str:
    """The checkpoint's prefix of the projector module, found by the block's anchor key
    (`anchor` behind its `checkpoint_module`, as the block declares them)."""
    from .. import registry

    entry = registry.get(block, "projector")
    local = entry.attr("anchor", PROJECTOR_ANCHOR)
    anchor = entry.attr("checkpoint_module", OUR_PROJECTOR[:-1]) + "." + local
    found = sorted(k[: -len(local)] for k in ckpt.keys if k.endswith(anchor))
    if not found:
        raise InputError(
            f"{ckpt.root}: no projector of blocks.projector {block!r} (no key ends with "
            f"{anchor!r}); set blocks.projector=null for the tower's features alone"
        )
    if len(found) > 1:
        raise InputError(f"{ckpt.root}: several projectors, under prefixes {found}")
    return found[0]


def square(value: Any) -> Any:
    """An HF size given as [height, width] with equal sides, as one number (the builder's
    towers are square); anything else unchanged."""
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    return value


def check_config(
    path: str | Path, family: Family, model: TowerConfig, projector: str | None = None
) -> None:
    """Compare the tower fields of the checkpoint's config.json (if any) with the preset,
    and the projector's fields when the preset has a projector (a VLM's, `builder/vlm.py`,
    or LLaVA's)."""
    from .. import families, vlm

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
    vision = vision_fields(cfg, vision) if isinstance(vision, dict) else vision
    if not isinstance(vision, dict):
        vision = {}
    model_type = vision.get("model_type") or cfg.get("model_type")
    other = families.for_model_type(model_type) if isinstance(model_type, str) else None
    if other is not None and other.name != family.name:
        raise InputError(
            f"{config_path}: a checkpoint of the {other.name} family (model_type "
            f"{model_type!r}), but the preset's family is {family.name}; set family: "
            f"{other.name} (or import this config.json with `build import`)"
        )
    record = vlm.for_model_type(cfg.get("model_type"))
    omitted = record.vision_defaults if record else {}
    # A learnt position grid of another size is resampled where the family says how.
    sized = ("image_size",) if family.resample else ()
    pairs = [
        (where + f, family.from_hf(f, square(vision.get(f, omitted.get(f)))), f)
        for f in family.hf_field_names()
        if f not in sized
    ]
    theirs_fields = record.fields if record else {}
    pairs += [(f, cfg.get(f), ours) for f, ours in LLAVA_FIELDS.items() if f not in theirs_fields]
    errors = []
    if projector and record is not None:
        if projector != record.projector:
            errors.append(
                f"{config_path}: a {cfg['model_type']} checkpoint, whose projector is "
                f"{record.projector!r}, but the preset has blocks.projector {projector!r}"
            )
        pairs.append((record.width, vlm.hf_value(cfg, record.width), "projector_hidden_size"))
        pairs += vlm.read_fields(record, cfg)
    elif projector:
        text = cfg.get("text_config")
        width = text.get("hidden_size") if isinstance(text, dict) else None
        pairs.append(("text_config.hidden_size", width, "projector_hidden_size"))
    fixed = record.fixed if record else PROJECTOR_FIELDS
    if projector:
        for theirs_name, want in fixed.items():
            if cfg.get(theirs_name, want) != want:
                errors.append(
                    f"{config_path}: {theirs_name} is {cfg[theirs_name]!r}; blocks.projector "
                    f"{projector!r} has {theirs_name} {want!r}"
                )
    for theirs_name, theirs, ours_name in pairs:
        if theirs is None:
            continue
        ours = getattr(model, ours_name)
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
