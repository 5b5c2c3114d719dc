"""open_clip and timm configs -> a sparse preset of the clip family, giving the image
embedding (open_clip's `encode_image`; timm's `forward` with its `head`).

Three kinds of JSON are read, told apart by their keys:

- an open_clip hub repo's `open_clip_config.json`: `model_cfg` (the model config) and
  `preprocess_cfg` (mean, std, interpolation, resize mode);
- an open_clip model config (`model_configs/ViT-H-14.json`): `embed_dim`, `quick_gelu`,
  `vision_cfg`, `text_cfg`;
- a timm hub repo's `config.json`: `architecture` (the model name, whose widths are timm's),
  `num_classes` (the projection width), `model_args` (overrides) and `pretrained_cfg` (the
  preprocessing).

Only ViT towers with a class token and the features the builder computes are read; any other
setting is an error naming the field and what is supported. Keys the builder does not use are
listed, as for HF configs (`hf_import.py`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from .config import CLIP_MEAN, CLIP_STD, CLIPVisionConfig, PreprocessConfig
from .errors import InputError

# open_clip's `CLIPVisionCfg` settings the builder computes with their defaults' meaning;
# a value other than the one listed is an error. (Training-only settings are not listed.)
VISION_FIXED: dict[str, Any] = {
    "ls_init_value": None,
    "attentional_pool": False,
    "pos_embed_type": "learnable",
    "pool_type": "tok",
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "timm_model_name": None,
    "act_kwargs": None,
}
# Settings that change nothing at inference: read and dropped without a note.
VISION_INERT = (
    "patch_dropout",
    "output_tokens",
    "final_ln_after_pool",  # with the class token, LayerNorm before or after pooling is one
    "timm_model_pretrained",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
    "timm_drop",
    "timm_drop_path",
    "attn_pooler_queries",
    "attn_pooler_heads",
)
# open_clip's interpolation / resize mode -> our preprocessing.
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
RESIZE_MODES = {"shortest": ("shortest_edge", True), "squash": ("square", False)}

# timm's CLIP ViTs: size name -> (width, depth, heads, mlp width) (timm `vision_transformer.py`).
TIMM_SIZES = {
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "huge": (1280, 32, 16, 5120),
    "giant": (1408, 40, 16, 6144),
    "gigantic": (1664, 48, 16, 8192),
}
TIMM_NAME = re.compile(
    r"^vit_(?P<size>[a-z]+)_patch(?P<patch>\d+)_clip_(?P<quick>quickgelu_)?(?P<image>\d+)$"
)
# timm `model_args` -> ours (the rest of the tower is fixed by the CLIP architecture).
TIMM_ARGS = {
    "embed_dim": "hidden_size",
    "depth": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "patch_size": "patch_size",
    "img_size": "image_size",
    "in_chans": "num_channels",
}
# `model_args` that repeat a top-level key of the config.
TIMM_TOP = ("num_classes", "global_pool")


def recognizes(cfg: dict[str, Any]) -> bool:
    """The JSON is one of the kinds above (not an HF config)."""
    return "model_type" not in cfg and (
        "model_cfg" in cfg or "vision_cfg" in cfg or "architecture" in cfg
    )


def import_config(path: Path, cfg: dict[str, Any]) -> Any:
    from .hf_import import Imported

    if "architecture" in cfg:
        model, preprocess, used, kind = _timm(path, cfg)
    else:
        model, preprocess, used, kind = _open_clip(path, cfg)
    model.update(output="embeds", feature_layer=-1, post_layernorm=True)
    defaults = CLIPVisionConfig()
    preset: dict[str, Any] = {"description": f"imported from {path.name} ({kind})"}
    preset["model"] = {k: v for k, v in model.items() if getattr(defaults, k) != v}
    # A resize or crop to the image size is the default (null: model.image_size).
    image = model.get("image_size", defaults.image_size)
    preprocess = {k: v for k, v in preprocess.items() if not (k.endswith("size") and v == image)}
    sparse = {k: v for k, v in preprocess.items() if getattr(PreprocessConfig(), k) != v}
    if sparse:
        preset["preprocess"] = sparse
    unused = sorted(k for k in _leaves(cfg) if not any(_within(k, u) for u in used))
    return Imported(preset, unused, kind)


def _within(key: str, used: str) -> bool:
    return key == used or key.startswith(used + ".")


def _leaves(cfg: dict[str, Any], where: str = "") -> list[str]:
    """Dotted keys; the config sections we read (`model_cfg`, `vision_cfg`, ...) are walked,
    any other map (text_cfg) is one key."""
    out = []
    for key, value in cfg.items():
        dotted = where + key
        if isinstance(value, dict) and key in ("model_cfg", "vision_cfg", "preprocess_cfg"):
            out += _leaves(value, dotted + ".")
        else:
            out.append(dotted)
    return out


def _check(path: Path, where: str, value: Any, allowed: Any, errors: list[str]) -> None:
    """Append the line for a value that is not `allowed` (one value, or a list or dict of
    them)."""
    choices = list(allowed) if isinstance(allowed, list | tuple | dict) else [allowed]
    if value not in choices:
        shown = choices if len(choices) > 1 else repr(choices[0])
        errors.append(f"{path}: {where}: {value!r} is not supported; supported: {shown}")


def _positive(path: Path, where: str, value: Any, integer: bool, errors: list[str]) -> None:
    kinds, what = (int, "integer") if integer else (int | float, "number")
    if not isinstance(value, kinds) or isinstance(value, bool) or value <= 0:
        errors.append(f"{path}: {where}: {value!r} is not a positive {what}")


def _side(path: Path, where: str, value: Any) -> int:
    if isinstance(value, list):
        if len(value) != 2 or value[0] != value[1]:
            raise InputError(f"{path}: {where} is {value!r}; only square sizes are supported")
        value = value[0]
    errors: list[str] = []
    _positive(path, where, value, True, errors)
    if errors:
        raise InputError(errors)
    return value


def _open_clip(path: Path, cfg: dict[str, Any]) -> tuple[dict, dict, list[str], str]:
    model_cfg, where = (cfg["model_cfg"], "model_cfg.") if "model_cfg" in cfg else (cfg, "")
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict):
        raise InputError(f"{path}: {where}vision_cfg: expected an open_clip vision config")
    vision = model_cfg["vision_cfg"]
    at = f"{where}vision_cfg."
    errors = []
    layers = vision.get("layers", 12)
    if isinstance(layers, list):
        errors.append(
            f"{path}: {at}layers: {layers!r} is a ModifiedResNet tower; only ViT towers are "
            "supported (vision_cfg.layers an integer)"
        )
    timm_name = vision.get("timm_model_name")
    if timm_name is not None:
        errors.append(
            f"{path}: {at}timm_model_name: {timm_name!r} is a timm tower (ConvNeXt, ...); only "
            "open_clip's own ViT is supported (no timm_model_name)"
        )
    for key, allowed in VISION_FIXED.items():
        if key != "timm_model_name":
            _check(path, at + key, vision.get(key, allowed), allowed, errors)
    numbers = {"width": 768, "head_width": 64, "mlp_ratio": 4.0, "embed_dim": 512}
    if not isinstance(layers, list):
        numbers["layers"] = 12
    for key, default in numbers.items():
        place, within = (where, model_cfg) if key == "embed_dim" else (at, vision)
        _positive(path, place + key, within.get(key, default), isinstance(default, int), errors)
    if errors:
        raise InputError(errors)
    width = vision.get("width", 768)
    head_width = vision.get("head_width", 64)
    if width % head_width:
        raise InputError(f"{path}: {at}head_width: {head_width} does not divide width {width}")
    eps = (vision.get("norm_kwargs") or {}).get("eps", 1e-5)
    model = {
        "hidden_size": width,
        "num_hidden_layers": layers,
        "num_attention_heads": width // head_width,
        "intermediate_size": int(width * vision.get("mlp_ratio", 4.0)),
        "patch_size": _side(path, at + "patch_size", vision.get("patch_size", 16)),
        "image_size": _side(path, at + "image_size", vision.get("image_size", 224)),
        "projection_dim": model_cfg.get("embed_dim", 512),
        "hidden_act": "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu",
        "layer_norm_eps": eps,
        "pre_layernorm": not vision.get("no_ln_pre", False),
    }
    read = ["width", "layers", "head_width", "mlp_ratio", "patch_size", "image_size"]
    read += ["norm_kwargs", "no_ln_pre", *VISION_FIXED, *VISION_INERT]
    used = [at + k for k in read] + [where + "embed_dim", where + "quick_gelu"]
    preprocess, more = _open_clip_preprocess(path, cfg.get("preprocess_cfg"))
    kind = "open_clip_config" if where else "open_clip model config"
    return model, preprocess, used + more, kind


def _open_clip_preprocess(path: Path, cfg: Any) -> tuple[dict[str, Any], list[str]]:
    """open_clip's eval transform (`image_transform(..., is_train=False)`) as our steps."""
    if cfg is None:
        return {}, []
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: preprocess_cfg: expected an object")
    at = "preprocess_cfg."
    errors = []
    interpolation = cfg.get("interpolation", "bicubic")
    mode = cfg.get("resize_mode", "shortest")
    _check(path, at + "interpolation", interpolation, INTERPOLATIONS, errors)
    _check(path, at + "resize_mode", mode, RESIZE_MODES, errors)
    _check(path, at + "mode", cfg.get("mode", "RGB"), "RGB", errors)
    if errors:
        raise InputError(errors)
    resize, crop = RESIZE_MODES[mode]
    out = {
        "resize": resize,
        "center_crop": crop,
        "resample": interpolation,
        "mean": [float(x) for x in cfg.get("mean", CLIP_MEAN)],
        "std": [float(x) for x in cfg.get("std", CLIP_STD)],
    }
    if "size" in cfg:
        size = _side(path, at + "size", cfg["size"])
        out["size"] = size
        if crop:
            out["crop_size"] = size
    used = [at + k for k in ("interpolation", "resize_mode", "mode", "mean", "std", "size")]
    # The padding colour of 'longest' only, which is refused above.
    return out, [*used, at + "fill_color"]


def _timm(path: Path, cfg: dict[str, Any]) -> tuple[dict, dict, list[str], str]:
    name = cfg["architecture"]
    match = TIMM_NAME.match(name) if isinstance(name, str) else None
    if match is None or match["size"] not in TIMM_SIZES:
        raise InputError(
            f"{path}: architecture: {name!r} is not a timm CLIP ViT this builder reads; "
            f"supported: vit_{{{','.join(TIMM_SIZES)}}}_patchP_clip[_quickgelu]_SIZE"
        )
    width, depth, heads, mlp = TIMM_SIZES[match["size"]]
    model: dict[str, Any] = {
        "hidden_size": width,
        "num_hidden_layers": depth,
        "num_attention_heads": heads,
        "intermediate_size": mlp,
        "patch_size": int(match["patch"]),
        "image_size": int(match["image"]),
        "hidden_act": "quick_gelu" if match["quick"] else "gelu",
        "projection_bias": True,
    }
    args = cfg.get("model_args") or {}
    if not isinstance(args, dict):
        raise InputError(f"{path}: model_args: expected an object")
    errors = []
    for key, value in args.items():
        if key in TIMM_ARGS:
            where = f"model_args.{key}"
            if key in ("img_size", "patch_size"):
                value = _side(path, where, value)
            model[TIMM_ARGS[key]] = value
        elif key == "mlp_ratio" or key in TIMM_TOP:
            continue
        elif key == "act_layer" and value in ("quick_gelu", "gelu"):
            model["hidden_act"] = value
        else:
            errors.append(
                f"{path}: model_args.{key}: not supported; supported: "
                f"{[*TIMM_ARGS, 'mlp_ratio', 'act_layer', *TIMM_TOP]}"
            )
    for key in ("embed_dim", "mlp_ratio"):
        if key in args:
            _positive(path, f"model_args.{key}", args[key], key == "embed_dim", errors)
    if "mlp_ratio" in args and not errors:
        model["intermediate_size"] = int(model["hidden_size"] * args["mlp_ratio"])
    cfg = {**cfg, **{k: args[k] for k in TIMM_TOP if k in args}}
    classes = cfg.get("num_classes", 0)
    if not classes:
        errors.append(
            f"{path}: num_classes: {classes!r}: the model has no head, so no embedding; "
            "a timm CLIP ViT with its projection head (num_classes the embedding width) "
            "is supported"
        )
    _check(path, "global_pool", cfg.get("global_pool", "token"), "token", errors)
    if errors:
        raise InputError(errors)
    model["projection_dim"] = classes
    preprocess = _timm_preprocess(path, cfg.get("pretrained_cfg") or {}, model["image_size"])
    used = ["architecture", "model_args", "num_classes", "global_pool", "num_features"]
    used += ["pretrained_cfg"]
    return model, preprocess, used, f"timm {name}"


def _timm_preprocess(path: Path, cfg: dict[str, Any], image_size: int) -> dict[str, Any]:
    """timm's eval transform (`transforms_factory.transforms_imagenet_eval`): the shorter
    side to image_size / crop_pct, then a center crop of image_size."""
    if not cfg:
        return {}
    at = "pretrained_cfg."
    errors = []
    resample = cfg.get("interpolation", "bicubic")
    _check(path, at + "interpolation", resample, INTERPOLATIONS, errors)
    _check(path, at + "crop_mode", cfg.get("crop_mode", "center"), "center", errors)
    if errors:
        raise InputError(errors)
    crop_pct = cfg.get("crop_pct") or 1.0
    _positive(path, at + "crop_pct", crop_pct, False, errors)
    if errors:
        raise InputError(errors)
    return {
        "resample": resample,
        "size": math.floor(image_size / crop_pct),
        "crop_size": image_size,
        "mean": [float(x) for x in cfg.get("mean", CLIP_MEAN)],
        "std": [float(x) for x in cfg.get("std", CLIP_STD)],
    }


CONFIG = "open_clip_config.json"


def check_config(path: str | Path, model: CLIPVisionConfig) -> None:
    """Compare the tower fields of an `open_clip_config.json` beside the checkpoint (if any)
    with the preset's: a difference is an error naming both, never a silent choice (a
    QuickGELU repo built with GELU has the same shapes and wrong numbers)."""
    from .hf_import import _read

    root = Path(path)
    config = (root if root.is_dir() else root.parent) / CONFIG
    if not config.is_file():
        return
    theirs, _, _, _ = _open_clip(config, _read(config))
    errors = [
        f"{config}: {name} is {value!r} but the preset has model.{name} "
        f"{getattr(model, name)!r}; change the preset (or override model.{name}={value}) to "
        "match the checkpoint"
        for name, value in theirs.items()
        if getattr(model, name) != value
    ]
    if errors:
        raise InputError(errors)
